"""Where and in what arithmetic the real PEFT steps run (``execution.device``, ``execution.precision``).

:func:`resolve` turns the scenario's ``execution`` section into a :class:`Placement`: the torch
device the frozen model, the per-device adapters and the batches live on, and the precision of
the steps. The trainer (:class:`fomo.trainer.PeftTrainer`, :mod:`fomo.batched`) moves the model
there once, moves each step's batch there once, and hands every loss, update and state back to
the timeline side as CPU tensors or Python floats, so nothing outside :mod:`fomo` sees a device.

Devices
    ``cpu``; ``cuda`` (the first visible CUDA GPU: a ``ValueError`` naming
    ``execution.device`` when torch sees none); ``auto``: ``cuda`` if
    ``torch.cuda.is_available()``, else ``cpu``, and :attr:`Placement.note` records which.

Precision
    ``fp32``: float32 throughout (the default; bitwise the path deftsim always had).
    ``bf16``: automatic mixed precision, ``torch.autocast(device_type, dtype=torch.bfloat16)``
    around every forward pass (training, batched passes, activation-cache fills, evaluation).
    The parameters stay float32: the frozen weights, the trainable tensors (the master copy),
    their gradients and the optimizer state (AdamW's two moments) are all float32. Inside
    autocast, matrix products (``linear``, ``matmul``, ``bmm``, attention) cast their inputs to
    bfloat16 and return bfloat16 (float32 accumulation in the kernels: oneDNN with AVX-512-BF16
    or AMX on x86 CPUs, tensor cores on GPUs); LayerNorm and element-wise ops keep their
    input's dtype, so the residual stream, which adds a bfloat16 product to a float32 input,
    stays float32; the cross-entropy runs in float32 (autocast's float32 list) and the logits
    are returned as float32.

    Why autocast rather than a model stored in bfloat16: a bfloat16 number has 8 significant
    bits (unit roundoff u = 2^-8 = 0.0039), so an AdamW step, which moves a weight by about
    ``lr`` (1e-4 to 1e-3) while LoRA/head weights are of order 0.01 to 1, would often round
    back to the old value; with float32 master weights every update is kept, and the
    reductions outside matrix products (softmax, LayerNorm, loss) keep float32 accuracy. The
    price is that the weights' memory is not halved on the host (bf16 activations are); the
    simulated device's memory is not affected either way, see below.

The simulated timeline never depends on the device or the precision: the FLOPs, saved
activation bytes, weight bytes and payload bytes that drive it are those of the float32 model
on the CPU (the trainer profiles outside autocast, and with ``device: cuda`` on a float32 CPU
replica used for nothing else, see :meth:`fomo.trainer.PeftTrainer._profile_model`); the
payload is the float32 PEFT state the devices exchange.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from netsim.scenario import ExecutionSpec

DEVICES = ("cpu", "cuda", "auto")
PRECISIONS = ("fp32", "bf16")
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

BF16_UNIT_ROUNDOFF = 2.0**-8
"""Unit roundoff of bfloat16 (8 significant bits, round to nearest): relative error of one
rounding [dimensionless]."""


def cuda_available() -> bool:
    """Whether torch sees a usable CUDA GPU."""
    return bool(torch.cuda.is_available())


def available_devices() -> list[str]:
    """The devices this torch build and host can run on (``cpu`` always, ``cuda`` with a GPU)."""
    return ["cpu", "cuda"] if cuda_available() else ["cpu"]


def _describe_torch() -> str:
    build = f"torch {torch.__version__}"
    if torch.version.cuda is None:
        return f"{build} is a CPU-only build"
    return f"{build} (CUDA {torch.version.cuda}) sees no GPU"


def resolve_device(requested: str) -> tuple[torch.device, str]:
    """The torch device for ``execution.device`` = ``requested`` and a note on how it was chosen.

    Raises ``ValueError`` for ``cuda`` without a GPU and for an unknown value."""
    if requested not in DEVICES:
        raise ValueError(f"execution.device={requested!r}: allowed: {', '.join(DEVICES)}")
    if requested == "cpu":
        return torch.device("cpu"), "execution.device=cpu"
    if requested == "cuda":
        if not cuda_available():
            raise ValueError(f"execution.device='cuda' but no CUDA GPU is available ({_describe_torch()}); "
                             f"available here: {', '.join(available_devices())} (or use 'auto': cuda if "
                             "available, else cpu)")
        return torch.device("cuda", torch.cuda.current_device()), f"execution.device=cuda: {torch.cuda.get_device_name()}"
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device()), \
            f"execution.device=auto resolved to cuda ({torch.cuda.get_device_name()})"
    return torch.device("cpu"), f"execution.device=auto resolved to cpu (no CUDA GPU: {_describe_torch()})"


def check_precision(precision: str, device: torch.device) -> None:
    """Raise ``ValueError`` if ``execution.precision`` cannot run on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"execution.precision={precision!r}: allowed: {', '.join(PRECISIONS)}")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"execution.precision='bf16': the GPU {torch.cuda.get_device_name(device)} has no "
                         "bfloat16 support (compute capability 8.0 or newer needed); allowed here: fp32")


@dataclass(frozen=True)
class Placement:
    """A resolved ``execution.device`` / ``execution.precision``.

    Attributes
    ----------
    requested_device : str
        The scenario's value (``cpu``, ``cuda`` or ``auto``).
    device : torch.device
        Where the model, the adapters and the batches live.
    precision : str
        ``fp32`` or ``bf16`` (autocast, float32 parameters; see the module docstring).
    note : str
        How the device was chosen (for ``auto``: what it resolved to and why).
    """

    requested_device: str
    device: torch.device
    precision: str
    note: str

    @property
    def compute_dtype(self) -> torch.dtype:
        """dtype of the matrix products (float32 or bfloat16)."""
        return COMPUTE_DTYPES[self.precision]

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"

    @property
    def is_default(self) -> bool:
        """Float32 on the CPU: the path that involves no transfer and no autocast."""
        return self.on_cpu and self.precision == "fp32"

    def record(self) -> dict[str, str]:
        """What a run records: ``{device, precision, note}`` (the device as run, e.g. ``cuda:0``)."""
        return {"device": str(self.device), "precision": self.precision, "note": self.note}

    def autocast(self) -> contextlib.AbstractContextManager:
        """The precision context of a forward pass: nothing for fp32, else
        ``torch.autocast(device_type, dtype=bfloat16)``."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on the device (the same object when it is already there)."""
        return tensor.to(self.device)

    def batch(self, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Every tensor of a batch (input_ids, attention_mask, labels, ...) moved to the device once."""
        return tuple(self.to_device(t) for t in tensors)

    def state_to_device(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A PEFT state's tensors on the device (the same dict when it is already there)."""
        if all(t.device == self.device for t in state.values()):
            return state
        return {n: self.to_device(t) for n, t in state.items()}

    def place_model(self, model: nn.Module) -> nn.Module:
        """Move ``model``'s parameters and buffers to the device (in place; the parameter objects
        stay the same, so references to them stay valid). Float32 is kept in every precision."""
        if not self.on_cpu:
            model.to(self.device)
        return model


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the CPU (the same object when it is already there)."""
    return tensor if tensor.device.type == "cpu" else tensor.cpu()


def state_to_host(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A PEFT state or update with every tensor on the CPU."""
    return {n: to_host(t) for n, t in state.items()}


def resolve(spec: "ExecutionSpec") -> Placement:
    """The placement of a scenario's ``execution`` section (``ValueError`` naming the field if it
    cannot run here)."""
    device, note = resolve_device(str(spec.device))
    check_precision(str(spec.precision), device)
    return Placement(requested_device=str(spec.device), device=device, precision=str(spec.precision), note=note)


def check_execution(spec: "ExecutionSpec") -> None:
    """Raise the ``ValueError`` :func:`resolve` would (for ``deftsim validate``)."""
    resolve(spec)


def model_device(model: nn.Module) -> Optional[torch.device]:
    """The device of a model's first parameter (None without parameters)."""
    for p in model.parameters():
        return p.device
    return None

