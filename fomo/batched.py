"""Batched multi-device PEFT steps: K devices' steps as one forward/backward over one frozen model.

All devices of a round start from the same global PEFT state and share the frozen base weights;
they differ only in their trainable tensors (LoRA A/B matrices and the classification head).
:class:`DeviceStack` holds K copies of every trainable tensor stacked along a leading *device*
axis (shape ``(K, *shape)``). The K devices' batches are concatenated device-major (rows
``k*B .. k*B+B-1`` belong to device k) and go through the model once: the frozen base (almost
all the work) runs once over the K x B rows, while inside :func:`per_device_modules` every
module that directly owns a trainable tensor (an ``nn.Linear``: ``lora_A``/``lora_B`` of each
LoRA layer, the head's linear layers) applies device k's slice to device k's rows: one
``torch.bmm`` over the stacked weights (:class:`StackedLinear`), or, for a layer with a bias
(the head) or with a few rows per device (the pruned last block's query, see
:mod:`fomo.last_block`), one ``F.linear`` per device. Frozen linear layers that see only a few
rows per device (the pooler: one row per example) run once per device too, see
:data:`SMALL_ROWS`.

Exactness. The loss is ``sum_k loss_k`` with ``loss_k`` device k's own mean cross-entropy, so
the gradient of device k's slice depends only on device k's rows (devices share no trainable
tensor and the frozen base mixes no rows of a batch). One AdamW/SGD over the stacked tensors is
K independent optimizers: both are element-wise, and the k-th slices of the moments are device
k's own. Beyond equal maths, the numbers are the same too: :class:`StackedLinear` computes the
forward, input gradient and weight gradient with the same products autograd uses for
``F.linear`` on one device (``x W^T``, ``g W``, ``g^T x``), batched; the frozen base's kernels
(matrix products over many rows, attention per example and head, row-wise norms, element-wise
ops) give each row the same numbers whatever the batch size; element-wise optimizer updates do
not depend on the tensor's length. So it is the same maths as one-device-at-a-time training: with
same-length batches the float32 results were bitwise equal on AMD EPYC (Zen 4), but other
CPUs' kernels (Intel Xeon with AVX-512/AMX) sum in other orders and differ at float32 rounding.
When the lengths differ, every device's rows are padded to the longest: masked positions carry
exactly zero attention weight. Equivalence is tested in float64: losses within 1e-10 relative, gradients within 1e-8 of the largest entry, AdamW updates within 1e-4 lr per step; docs/performance.md.

AdamW note: an AdamW step moves a coordinate by about ``lr * g / (|g| + eps)``, so for a
gradient coordinate near ``eps`` a float32 rounding difference in ``g`` is amplified by up to
``lr / eps``; when the steps are not bitwise equal (uneven lengths, other BLAS libraries),
AdamW updates can differ by more than the gradients do. SGD updates differ by ``lr`` times the
gradient difference.

Prompt tuning: the soft prompt is a trainable ``nn.Embedding`` (num_virtual_tokens x hidden)
that peft's ``get_prompt`` looks up once and repeats over the batch; in the combined batch each
device's rows get its own table's prompt, computed the way peft computes it for the device alone
(:func:`_device_prompts`), and the prompted sequences go through the frozen base together.

Device and precision (:mod:`fomo.execution`): the stacked tensors live on the model's device
(:meth:`DeviceStack.from_states` with ``device``) and the updates come back where the devices'
starting states are (the CPU), so a GPU pass returns what a CPU pass returns. Under
``execution.precision: bf16`` (autocast), :class:`StackedLinear` gets its inputs cast to
bfloat16 outside the autograd function, as autocast casts ``F.linear``'s, so each device's
products are bfloat16 products with float32 accumulation like its own sequential step, and its
float32 stacked weights get float32 gradients; results then agree with sequential bf16 steps to
bfloat16 rounding (a batched kernel may round a product differently), not bitwise.

Supported: LoRA without dropout (``peft.dropout = 0``: dropout masks would come from one RNG
stream instead of each job's own seed) and prompt tuning, whose trainable tensors all live in
``nn.Linear`` or ``nn.Embedding`` modules, LoRA on a quantised base (``peft.base_quantization``)
included: its frozen quantised layers are split per device like float ones. Anything else runs
sequentially (see :func:`unsupported_reason`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fomo.quantization import QuantizedLinear

BATCHED_METHODS = ("lora", "prompt_tuning")
"""PEFT methods whose steps can run batched (others run one device at a time)."""

SMALL_ROWS = 16
"""A linear layer whose input has fewer rows than this per device runs once per device: BLAS
kernels for a handful of rows (e.g. the pooler's one row per example) may round
differently depending on the total row count, while their cost is negligible."""


def owner_modules(model: nn.Module) -> dict[str, tuple[nn.Module, dict[str, str]]]:
    """Modules that directly own a trainable parameter.

    Returns module name -> (module, {local parameter name: full parameter name})."""
    owners: dict[str, tuple[nn.Module, dict[str, str]]] = {}
    for module_name, module in model.named_modules():
        local = {
            pname: f"{module_name}.{pname}" if module_name else pname
            for pname, p in module.named_parameters(recurse=False)
            if p.requires_grad
        }
        if local:
            owners[module_name] = (module, local)
    return owners


def unsupported_reason(model: nn.Module, method: str, lora_dropout: float) -> Optional[str]:
    """Why batched execution cannot reproduce sequential training for this model (None if it
    can)."""
    if method not in BATCHED_METHODS:
        return f"peft.method={method!r}: only {' and '.join(BATCHED_METHODS)} steps are batched (runs sequentially)"
    if method == "lora" and lora_dropout > 0:
        return (f"peft.dropout={lora_dropout}: LoRA dropout masks are drawn from each job's own seed, "
                "which one batched pass cannot reproduce (runs sequentially)")
    for name, (module, local) in owner_modules(model).items():
        if type(module) not in (nn.Linear, nn.Embedding):
            return (f"trainable parameters {sorted(local.values())} live in a {type(module).__name__}, "
                    "not an nn.Linear or nn.Embedding (runs sequentially)")
    return None


class DeviceStack:
    """K devices' own copies of the trainable tensors, stacked along a leading device axis.

    Parameters
    ----------
    state : dict name -> tensor
        The state every device starts from (the global PEFT state).
    num_devices : int
        K.

    Attributes
    ----------
    tensors : dict name -> (K, *shape) leaf tensor with ``requires_grad``; ``tensors[n][k]``
        is device k's tensor ``n``.
    """

    def __init__(self, state: dict[str, torch.Tensor], num_devices: int,
                 device: Optional[torch.device] = None) -> None:
        self.num_devices = int(num_devices)
        self.tensors: dict[str, torch.Tensor] = {
            name: _on(t.detach(), device).unsqueeze(0).repeat(self.num_devices, *([1] * t.dim())).requires_grad_(True)
            for name, t in state.items()
        }

    @classmethod
    def from_states(cls, states: list[dict[str, torch.Tensor]],
                    device: Optional[torch.device] = None) -> "DeviceStack":
        """K devices starting from their own states (``states[k]``: the model version device k
        downloaded); one shared state object is repeated as in the constructor. ``device``:
        where the stacked tensors live (default: where the states are; each state is moved
        there once)."""
        if all(st is states[0] for st in states):
            return cls(states[0], len(states), device)
        stack = cls.__new__(cls)
        stack.num_devices = len(states)
        stack.tensors = {name: torch.stack([_on(st[name].detach(), device) for st in states]).requires_grad_(True)
                         for name in states[0]}
        return stack

    def parameters(self) -> list[torch.Tensor]:
        return list(self.tensors.values())

    def updates(self, state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Per-device local minus ``state`` (the global state), one dict per device."""
        diffs = {name: (_on(t.detach(), state[name].device) - state[name]).unbind(0)
                 for name, t in self.tensors.items()}
        return [{name: d[k] for name, d in diffs.items()} for k in range(self.num_devices)]

    def updates_from(self, states: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """Per-device local minus the device's own starting state ``states[k]``, computed where
        the states are (the stacked tensors are copied there once: the updates a GPU pass
        returns are CPU tensors when the states are)."""
        if all(st is states[0] for st in states):
            return self.updates(states[0])
        local = {name: _on(t.detach(), states[0][name].device) for name, t in self.tensors.items()}
        return [{name: t[k] - states[k][name] for name, t in local.items()}
                for k in range(self.num_devices)]


def _on(tensor: torch.Tensor, device: Optional[torch.device]) -> torch.Tensor:
    """``tensor`` on ``device`` (itself when ``device`` is None or already its device)."""
    return tensor if device is None else tensor.to(device)


class StackedLinear(torch.autograd.Function):
    """``y[k] = x[k] @ w[k]^T`` for x (K, M, in), w (K, out, in), with the products autograd
    uses for a one-device ``F.linear`` (input gradient ``g w``, weight gradient ``g^T x``), so
    each device gets the numbers it gets alone."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return torch.bmm(x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_w = torch.bmm(grad.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


def _autocast_inputs(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Under ``torch.autocast`` (``execution.precision: bf16``), ``x`` and ``weight`` cast to the
    autocast dtype the way autocast casts ``F.linear``'s inputs (differentiable casts outside
    :class:`StackedLinear`, so its backward sees one dtype and the float32 stacked weights get
    float32 gradients); unchanged otherwise."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return x, weight
    dtype = torch.get_autocast_dtype(device_type)
    return x.to(dtype), weight.to(dtype)


def _check_rows(x: torch.Tensor, rows: int) -> None:
    if x.shape[0] != rows:
        raise RuntimeError(
            f"batched execution expected an input with {rows} rows (devices x batch) first, got "
            f"shape {tuple(x.shape)}: this model reorders the batch, use execution.strategy=sequential"
        )


def _device_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   num_devices: int, rows: int) -> torch.Tensor:
    """A trainable ``nn.Linear`` with device k's slice of ``weight`` (K, out, in) and ``bias``
    (K, out) on device k's rows of ``x`` (``rows`` rows, device-major): one
    :class:`StackedLinear` if there is no bias and every device has at least
    :data:`SMALL_ROWS` rows, else one ``F.linear`` per device."""
    _check_rows(x, rows)
    if bias is None and x.numel() // x.shape[-1] // num_devices >= SMALL_ROWS:
        lead = x.shape[:-1]
        x, weight = _autocast_inputs(x, weight)
        y = StackedLinear.apply(x.reshape(num_devices, -1, x.shape[-1]), weight)
        return y.reshape(*lead, weight.shape[1])
    parts = x.split(rows // num_devices)
    biases = [None] * num_devices if bias is None else bias.unbind(0)
    return torch.cat([F.linear(xk, wk, bk) for xk, wk, bk in zip(parts, weight.unbind(0), biases)])


def _device_prompts(model: nn.Module, weight: torch.Tensor, batch_size: int, num_devices: int,
                    rows: int) -> torch.Tensor:
    """Prompt tuning's ``get_prompt`` for the combined batch: device k's soft prompt (its table
    ``weight[k]``, num_virtual_tokens x hidden) for each of its rows, computed as peft computes
    it for one device (look up the prompt tokens once, repeat over the device's batch), so the
    forward and backward are those of the device alone."""
    if batch_size != rows:
        raise RuntimeError(f"batched prompt tuning expected a batch of {rows} rows (devices x batch), "
                           f"got {batch_size}: use execution.strategy=sequential")
    tokens = model.prompt_tokens[model.active_adapter].unsqueeze(0)   # (1, num_virtual_tokens)
    per_device = rows // num_devices
    return torch.cat([F.embedding(tokens, wk).repeat(per_device, 1, 1) for wk in weight.unbind(0)])


def _frozen_linear(module: nn.Linear, x: torch.Tensor, num_devices: int, rows: int) -> torch.Tensor:
    """A shared (frozen) ``nn.Linear`` on the combined batch: one call over all rows, or one call
    per device when each device has fewer than :data:`SMALL_ROWS` rows."""
    if x.shape[0] == rows and x.numel() // x.shape[-1] // num_devices < SMALL_ROWS:
        return torch.cat([F.linear(xk, module.weight, module.bias) for xk in x.split(rows // num_devices)])
    return F.linear(x, module.weight, module.bias)


def _frozen_quantized(module: QuantizedLinear, x: torch.Tensor, num_devices: int, rows: int) -> torch.Tensor:
    """A frozen quantised linear layer (``peft.base_quantization``) on the combined batch, split
    per device exactly as :func:`_frozen_linear` splits a float one."""
    forward = type(module).forward
    if x.shape[0] == rows and x.numel() // x.shape[-1] // num_devices < SMALL_ROWS:
        return torch.cat([forward(module, xk) for xk in x.split(rows // num_devices)])
    return forward(module, x)


@contextlib.contextmanager
def per_device_modules(model: nn.Module, stack: DeviceStack, rows: int) -> Iterator[None]:
    """Within the block, every trainable ``nn.Linear`` of ``model`` computes each device's rows
    with that device's slice of ``stack`` (the combined batch has ``rows`` = K x B rows,
    device-major); the rest of the model runs once over all rows (frozen linear layers with
    fewer than :data:`SMALL_ROWS` rows per device once per device)."""
    patched: list[tuple[object, str]] = []   # (object, instance attribute that shadows its method)
    owners = {id(module): local for module, local in owner_modules(model).values()}
    k = stack.num_devices
    try:
        for name, module in model.named_modules():
            local = owners.get(id(module))
            if local is None:
                if type(module) is nn.Linear:
                    module.forward = lambda x, _m=module: _frozen_linear(_m, x, k, rows)
                    patched.append((module, "forward"))
                elif isinstance(module, QuantizedLinear):   # a quantised base: the same split
                    module.forward = lambda x, _m=module: _frozen_quantized(_m, x, k, rows)
                    patched.append((module, "forward"))
                continue
            weight = stack.tensors[local["weight"]]
            if type(module) is nn.Embedding:  # prompt tuning's soft prompt, looked up by get_prompt
                if not callable(getattr(model, "get_prompt", None)):
                    raise RuntimeError(f"cannot batch a trainable nn.Embedding outside prompt tuning ({name})")
                model.get_prompt = lambda batch_size, *args, _w=weight, **kw: _device_prompts(
                    model, _w, batch_size, k, rows)
                patched.append((model, "get_prompt"))
                continue
            if type(module) is not nn.Linear:  # guarded by unsupported_reason
                raise RuntimeError(f"cannot batch a trainable {type(module).__name__}")
            if "bias" in local:
                bias: Optional[torch.Tensor] = stack.tensors[local["bias"]]
            elif module.bias is not None:  # a frozen bias, shared by all devices
                bias = module.bias.detach().unsqueeze(0).expand(k, -1)
            else:
                bias = None
            module.forward = lambda x, _w=weight, _b=bias: _device_linear(x, _w, _b, k, rows)
            patched.append((module, "forward"))
        yield
    finally:
        for obj, attr in patched:
            delattr(obj, attr)   # the class's own method is visible again
