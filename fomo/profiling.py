"""Counted FLOPs and measured memory of training and evaluation steps.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (matrix products:
``mm``/``addmm``/``bmm``/convolutions/attention; element-wise work and the optimizer update are
not counted). The CPU flash-attention kernels that ``scaled_dot_product_attention`` runs on CPU
are not in torch's FLOP registry, so formulas for them are added here (torch's own
``sdpa_flop_count`` / ``sdpa_backward_flop_count``).

Saved activations are measured with ``torch.autograd.graph.saved_tensors_hooks`` during the
forward pass: the bytes of every distinct storage autograd keeps for the backward pass
(deduplicated by storage: :func:`storage_key`), excluding the model's own parameters and
buffers, which are counted with the weights.

Memory of a local job [bytes] =
    all parameter and buffer bytes
    + trainable parameter bytes * (1 gradient + optimizer states: 2 for AdamW, 0 for SGD)
    + saved activation bytes of one step.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

OPTIMIZER_STATES_PER_PARAM = {"adamw": 2, "sgd": 0}


@dataclass(frozen=True)
class StepProfile:
    """Cost of one training step of a given (batch_size, seq_len) shape.

    Attributes
    ----------
    flops : float
        Counted FLOPs of forward + backward [FLOP].
    saved_activation_bytes : int
        Bytes of the tensors autograd saves during the forward pass [bytes].
    """

    flops: float
    saved_activation_bytes: int


# --------------------------------------------------------------------------------------------
# FLOP counting
# --------------------------------------------------------------------------------------------
def _sdpa_cpu_forward_flops(
    query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    """FLOPs of ``aten._scaled_dot_product_flash_attention_for_cpu`` (QK^T and AV)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flops(
    grad_out_shape: Any,
    query_shape: Any,
    key_shape: Any,
    value_shape: Any,
    *args: Any,
    out_shape: Any = None,
    **kwargs: Any,
) -> int:
    """FLOPs of ``aten._scaled_dot_product_flash_attention_for_cpu_backward``."""
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def extra_flop_formulas() -> dict[Any, Callable[..., int]]:
    """FLOP formulas for ops missing from torch's registry (the CPU flash-attention kernels)."""
    aten = torch.ops.aten
    formulas: dict[Any, Callable[..., int]] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_forward_flops
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_cpu_backward_flops
    return formulas


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that also knows the CPU attention kernels."""
    return FlopCounterMode(display=False, custom_mapping=extra_flop_formulas())


# --------------------------------------------------------------------------------------------
# Saved activations
# --------------------------------------------------------------------------------------------
def storage_key(tensor: torch.Tensor) -> int:
    """What tells a tensor's storage apart from every other live one: its data address, or for a
    tensor without data (a fake or meta tensor, see :mod:`fomo.cost_model`) the address of its
    storage object (views share both)."""
    storage = tensor.untyped_storage()
    if tensor.is_meta or getattr(tensor, "fake_mode", None) is not None:
        return int(storage._cdata)
    return int(storage.data_ptr())


def storage_ptrs(model: nn.Module) -> frozenset[int]:
    """Storage keys (:func:`storage_key`) of the model's parameters and buffers (excluded from
    activations)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return frozenset(storage_key(t) for t in tensors)


class SavedTensorMeter:
    """Context manager summing the bytes of distinct storages autograd saves for backward.

    ``exclude_ptrs``: storage addresses not to count (the model's weights)."""

    def __init__(self, exclude_ptrs: frozenset[int] = frozenset()) -> None:
        self._exclude = exclude_ptrs
        self._seen: set[int] = set()
        self.saved_bytes = 0
        self._hooks: Optional[contextlib.AbstractContextManager[Any]] = None

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        """Record the tensor's storage once, then hand the tensor to autograd unchanged."""
        try:
            storage = tensor.untyped_storage()
            ptr = storage_key(tensor)
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage
            return tensor
        if ptr not in self._seen and ptr not in self._exclude:
            self._seen.add(ptr)
            self.saved_bytes += int(storage.nbytes())
        return tensor

    @staticmethod
    def _unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._hooks is not None
        self._hooks.__exit__(*exc)
        self._hooks = None


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------
def classification_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Logits (batch, num_classes) of a sequence-classification model."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits


def classification_loss(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy loss of a batch (with autograd graph)."""
    return F.cross_entropy(classification_logits(model, input_ids, attention_mask), labels)


def labels_loss(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """transformers' own loss of a model given ``labels`` (an encoder-decoder's decoder targets:
    mean cross-entropy over the labelled target tokens)."""
    return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def step_loss(objective: str) -> LossFn:
    """The training loss of ``model.objective``: classification, or the causal LM's next-token
    loss (:func:`fomo.causal_lm.causal_lm_loss`)."""
    if objective == "causal_lm":
        from fomo.causal_lm import causal_lm_loss

        return causal_lm_loss
    if objective == "classification":
        return classification_loss
    raise ValueError(f"model.objective={objective!r} (allowed: classification, causal_lm)")


def profiled_forward_backward(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    exclude_ptrs: frozenset[int],
    loss: LossFn = classification_loss,
) -> tuple[torch.Tensor, StepProfile]:
    """Forward + backward under the FLOP counter, with saved activations measured during the
    forward. Gradients are accumulated into ``.grad`` exactly as in an unprofiled step.

    Returns (detached loss, profile)."""
    loss_fn = loss
    with flop_counter() as counter:
        with SavedTensorMeter(exclude_ptrs) as meter:
            loss = loss_fn(model, input_ids, attention_mask, labels)
        loss.backward()
    return loss.detach(), StepProfile(float(counter.get_total_flops()), meter.saved_bytes)


def count_step_flops(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    exclude_ptrs: Optional[frozenset[int]] = None,
    loss: LossFn = classification_loss,
) -> StepProfile:
    """Profile one training step (forward + backward) without changing the model: no optimizer
    step, gradients reset to None afterwards, torch RNG state restored. ``loss``: the training
    loss (:func:`step_loss`)."""
    exclude = storage_ptrs(model) if exclude_ptrs is None else exclude_ptrs
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.random.fork_rng(devices=[]):
        _, profile = profiled_forward_backward(model, input_ids, attention_mask, labels, exclude, loss)
    for p in params:
        p.grad = None
    return profile


def counted_forward(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Forward pass under the FLOP counter (call inside ``torch.no_grad()`` for evaluation).

    Returns (logits, counted forward FLOPs)."""
    with flop_counter() as counter:
        logits = classification_logits(model, input_ids, attention_mask)
    return logits, float(counter.get_total_flops())


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------
def weights_bytes(model: nn.Module) -> int:
    """Bytes of all parameters (trainable and frozen) and buffers of the model [bytes]."""
    tensors = list(model.parameters()) + list(model.buffers())
    return int(sum(t.numel() * t.element_size() for t in tensors))


def optimizer_states_per_param(optimizer: str) -> int:
    """Optimizer state tensors kept per trainable parameter (AdamW: 2 moments; SGD: 0)."""
    try:
        return OPTIMIZER_STATES_PER_PARAM[optimizer]
    except KeyError:
        raise ValueError(
            f"training.optimizer={optimizer!r} is not one of {sorted(OPTIMIZER_STATES_PER_PARAM)}"
        ) from None


def job_memory_bytes(
    all_weights_bytes: int, trainable_bytes: int, optimizer: str, saved_activation_bytes: int
) -> int:
    """Peak memory of a local job [bytes]: weights + trainable * (1 gradient + optimizer
    states) + saved activations."""
    per_trainable = 1 + optimizer_states_per_param(optimizer)
    return int(all_weights_bytes + trainable_bytes * per_trainable + saved_activation_bytes)
