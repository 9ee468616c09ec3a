"""Quantised frozen base weights for LoRA on a quantised model (QLoRA-style), in pure torch.

``peft.base_quantization`` stores every frozen ``nn.Linear`` weight of the base model quantised
and dequantises it in each forward (and again in the backward) pass; LoRA's A/B matrices, the
biases and the classification head stay float32. Two formats:

* ``int8``: per-output-row absmax (LLM.int8()'s vector-wise quantisation without its outlier
  decomposition, Dettmers et al. 2022): for row r, ``s_r = max_j |W_rj| / 127`` and
  ``q_rj = round(W_rj / s_r)`` in -127..127; ``W_hat = q s``. Error per weight
  ``|W_rj - W_hat_rj| <= s_r / 2 = absmax_r / 254`` (exact arithmetic; float32 adds at most
  ``255 s_r u``, u = 2^-24). Storage: ``out x in`` bytes of codes + ``out`` float32 scales.
* ``nf4``: QLoRA's 4-bit NormalFloat (Dettmers, Pagnoni, Holtzman and Zettlemoyer, "QLoRA:
  Efficient Finetuning of Quantized LLMs", 2023): the weight, flattened row-major, is cut into
  blocks of 64; block b has ``absmax_b = max |w|`` and each weight gets the index of the nearest
  of the 16 code values :data:`NF4_CODE` to ``w / absmax_b`` (quantiles of N(0, 1) scaled to
  [-1, 1] with an exact 0, see :func:`nf4_code_from_normal_quantiles`); ``w_hat = code[i] x
  absmax_b``. Error per weight ``<= absmax_b x max_gap / 2`` (``max_gap`` = the largest
  difference of consecutive codes, 0.3038 between -1 and -0.6962). Storage: two 4-bit indices
  per byte (``ceil(numel / 2)`` bytes) + one float32 absmax per block (``ceil(numel / 64) x 4``
  bytes), i.e. 4.5 bits per weight. QLoRA's second, "double" quantisation of the absmax
  values (8-bit, blocks of 256) is not done here.

Codes and scales are *buffers* of :class:`QuantizedLinear`, so
:func:`fomo.profiling.weights_bytes` (the job's weight memory) counts the quantised storage, and
the profiler's saved-activation meter, which skips the model's own buffers, does not count them
as activations. The dequantised weight is not kept for the backward pass
(:class:`DequantizedLinear` dequantises again), as bitsandbytes' 4-bit matmul does, so a step's
saved activations equal those of LoRA on the float base, and its counted FLOPs too (the
dequantisation is element-wise work, which the FLOP counter does not count).

Why not bitsandbytes: its 0.50 wheel runs ``Linear4bit``/``Linear8bitLt`` on a CPU with torch
2.13, but keeps the nf4 absmax outside the module's parameters and buffers (the memory count
would miss it), its CPU 4-bit matmul is a custom op the FLOP counter does not see (0 FLOPs
counted), and it tries to fetch a kernel from a model hub at run time. The emulator's 8-bit
middle weights (:mod:`fomo.emulator`) use the same absmax code as ``int8`` here, per tensor
(:func:`absmax_scale`, :func:`symmetric_codes`).

Weightless models (the meta device, as the cost model builds them): :func:`quantize_frozen_linears`
allocates codes and scales of the right shapes on the meta device and computes nothing.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

BASE_QUANTIZATIONS = ("none", "int8", "nf4")
"""Allowed ``peft.base_quantization`` values."""

INT8_LEVELS = 127
"""Largest int8 code of symmetric absmax quantisation (codes -127..127)."""

NF4_BLOCK = 64
"""Weights per nf4 absmax block (QLoRA's block size)."""

NF4_OFFSET = 0.9677083
"""QLoRA's quantile offset: the outermost codes are the N(0, 1) quantiles at this probability
(bitsandbytes' ``create_normal_map``), which are then scaled to -1 and 1."""

NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
            -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
            0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
            0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
"""The 16 values of the 4-bit NormalFloat data type, ascending (QLoRA, appendix; bitsandbytes'
table). :func:`nf4_code_from_normal_quantiles` recomputes them from the normal quantiles."""

SCALE_DTYPE = torch.float32


# --------------------------------------------------------------------------------------------
# Shared absmax code (int8 here, the emulator's 8-bit middle weights)
# --------------------------------------------------------------------------------------------
def absmax_scale(weight: torch.Tensor, levels: int = INT8_LEVELS, dim: Optional[int] = None) -> torch.Tensor:
    """``s = max |w| / levels`` over the whole tensor (``dim=None``: a 0-d tensor) or along
    ``dim`` (kept as a size-1 dimension, e.g. ``dim=1`` of an (out, in) weight: one scale per
    output row), float32."""
    w = weight.detach().to(SCALE_DTYPE).abs()
    top = w.amax() if dim is None else w.amax(dim=dim, keepdim=True)
    return top / levels


def symmetric_codes(weight: torch.Tensor, scale: torch.Tensor, levels: int = INT8_LEVELS) -> torch.Tensor:
    """``q = round(w / s)`` clamped to ``-levels..levels`` as int8 (torch.round: ties to even);
    ``s`` broadcasts against ``w``. Where ``s = 0`` (an all-zero row or tensor) ``q = 0``,
    which reconstructs it exactly."""
    w = weight.detach().to(SCALE_DTYPE)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(w / safe).clamp_(-levels, levels).to(torch.int8)


def quantize_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-row absmax int8 of an (out, in) weight: (codes int8 (out, in), scales
    float32 (out,)), ``W_hat[r] = codes[r] x scales[r]``."""
    scale = absmax_scale(weight, INT8_LEVELS, dim=1)
    return symmetric_codes(weight, scale, INT8_LEVELS), scale.reshape(-1)


def dequantize_int8_rows(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``W_hat = codes x scales[:, None]`` in ``dtype``."""
    return (codes.to(dtype) * scales.to(dtype).unsqueeze(1))


# --------------------------------------------------------------------------------------------
# NF4
# --------------------------------------------------------------------------------------------
def nf4_code_from_normal_quantiles(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The NF4 values from their definition (QLoRA, eq. 4, as bitsandbytes builds them): 8
    non-negative quantiles ``Phi^-1(p)`` for p = 8 equal steps from ``offset`` towards 0.5, 7
    negative ones ``-Phi^-1(p)`` for 7 steps, an exact 0, all divided by the largest, float64."""
    def quantiles(n: int) -> torch.Tensor:
        p = torch.linspace(offset, 0.5, n + 1, dtype=torch.float64)[:-1]
        return torch.special.ndtri(p)

    values = torch.cat([quantiles(8), torch.zeros(1, dtype=torch.float64), -quantiles(7)]).sort().values
    return values / values.abs().max()


def nf4_table(device: Any = None) -> torch.Tensor:
    """:data:`NF4_CODE` as a float32 tensor."""
    return torch.tensor(NF4_CODE, dtype=SCALE_DTYPE, device=device)


def nf4_pair_table(device: Any = None) -> torch.Tensor:
    """(256, 2) float32: for every byte, the NF4 values of its low and its high 4 bits (the
    order :func:`quantize_nf4` packs them in)."""
    table = nf4_table(device)
    byte = torch.arange(256, device=device)
    return torch.stack([table[byte & 0x0F], table[byte >> 4]], dim=1)


def nf4_max_gap() -> float:
    """Largest difference between consecutive NF4 values (between -1 and the next)."""
    return max(b - a for a, b in zip(NF4_CODE, NF4_CODE[1:]))


def nf4_storage(numel: int, block: int = NF4_BLOCK) -> tuple[int, int]:
    """(packed code bytes, number of absmax blocks) of a weight of ``numel`` entries."""
    return (numel + 1) // 2, math.ceil(numel / block)


def quantize_nf4(weight: torch.Tensor, block: int = NF4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 of ``weight`` (any shape, flattened row-major, zero-padded to whole blocks): (packed
    uint8 codes (ceil(numel / 2),): entry 2i in the low 4 bits, 2i+1 in the high 4 bits; absmax
    float32 (blocks,)). Nearest code by the midpoints between consecutive values (a weight on
    a midpoint takes the upper value)."""
    flat = weight.detach().to(SCALE_DTYPE).reshape(-1)
    numel = flat.numel()
    packed_bytes, blocks = nf4_storage(numel, block)
    padded = torch.zeros(blocks * block, dtype=SCALE_DTYPE, device=flat.device)
    padded[:numel] = flat
    grouped = padded.reshape(blocks, block)
    absmax = grouped.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normed = (grouped / safe.unsqueeze(1)).reshape(-1)[: 2 * packed_bytes]
    table = nf4_table(flat.device)
    midpoints = (table[1:] + table[:-1]) / 2
    index = torch.bucketize(normed, midpoints, right=True).to(torch.uint8)
    if index.numel() % 2:
        index = torch.cat([index, index.new_zeros(1)])
    pairs = index.reshape(-1, 2)
    packed = pairs[:, 0] | (pairs[:, 1] << 4)
    return packed, absmax


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...],
                   block: int = NF4_BLOCK, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``w_hat = code[index] x absmax[block]`` of :func:`quantize_nf4`'s output, reshaped to
    ``shape``, in ``dtype``."""
    numel = math.prod(shape)
    values = nf4_pair_table(packed.device)[packed.long()].reshape(-1)   # one lookup per byte
    blocks = absmax.numel()
    if values.numel() != blocks * block:   # a partial last block (numel not a multiple of 64)
        padded = torch.zeros(blocks * block, dtype=SCALE_DTYPE, device=packed.device)
        padded[: min(values.numel(), blocks * block)] = values[: blocks * block]
        values = padded
    scaled = values.reshape(blocks, block) * absmax.unsqueeze(1)
    return scaled.reshape(-1)[:numel].reshape(shape).to(dtype)


# --------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------
class DequantizedLinear(torch.autograd.Function):
    """``y = x W_hat^T + b`` with the frozen ``W_hat`` rebuilt from codes and scales by
    ``layer.dequantize`` in the forward and again in the backward, so the float weight is never
    kept between the two (only the input gradient ``g W_hat`` is computed: weight and bias are
    frozen)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: "QuantizedLinear") -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype), None if layer.bias is None else layer.bias.to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad.matmul(ctx.layer.dequantize(grad.dtype)), None


class QuantizedLinear(nn.Module):
    """A frozen linear layer whose weight is stored quantised (``scheme``: ``int8`` or ``nf4``,
    see the module docstring): buffers ``codes`` and ``scales``, the bias a frozen float32
    parameter. Built from an ``nn.Linear`` by :meth:`from_linear` (on the meta device: buffers of
    the right shapes, nothing computed)."""

    def __init__(self, in_features: int, out_features: int, scheme: str, codes: torch.Tensor,
                 scales: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        if scheme not in BASE_QUANTIZATIONS[1:]:
            raise ValueError(f"peft.base_quantization={scheme!r}: allowed {list(BASE_QUANTIZATIONS[1:])} "
                             "for a quantised layer")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.scheme = scheme
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str) -> "QuantizedLinear":
        """The quantised copy of ``linear`` (its weight is not kept)."""
        w = linear.weight
        out_f, in_f = w.shape
        if w.is_meta:
            if scheme == "int8":
                codes = torch.empty((out_f, in_f), dtype=torch.int8, device="meta")
                scales = torch.empty((out_f,), dtype=SCALE_DTYPE, device="meta")
            else:
                packed_bytes, blocks = nf4_storage(w.numel())
                codes = torch.empty((packed_bytes,), dtype=torch.uint8, device="meta")
                scales = torch.empty((blocks,), dtype=SCALE_DTYPE, device="meta")
        elif scheme == "int8":
            codes, scales = quantize_int8_rows(w)
        else:
            codes, scales = quantize_nf4(w)
        return cls(in_f, out_f, scheme, codes, scales, linear.bias)

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W_hat (out, in) in ``dtype``."""
        if self.scheme == "int8":
            return dequantize_int8_rows(self.codes, self.scales, dtype)
        return dequantize_nf4(self.codes, self.scales, self.weight_shape, NF4_BLOCK, dtype)

    def stored_weight_bytes(self) -> int:
        """Bytes of the quantised weight: codes + scales [bytes]."""
        return int(self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.codes.is_meta or not torch.is_grad_enabled():
            return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return DequantizedLinear.apply(x, self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"


_HEAD_COPIES = (".original_module", ".modules_to_save.")


def quantizable_linears(model: nn.Module) -> list[str]:
    """Names of the frozen ``nn.Linear`` modules of ``model`` (weight without ``requires_grad``):
    the base model's linear layers, not LoRA's A/B matrices or the classification head (peft
    keeps the trained copy and the unused original inside a ``ModulesToSaveWrapper``; both stay
    float, as QLoRA keeps the output layer in 16 bits)."""
    return [name for name, m in model.named_modules()
            if type(m) is nn.Linear and not m.weight.requires_grad
            and not any(part in f".{name}." for part in _HEAD_COPIES)]


def quantize_frozen_linears(model: nn.Module, scheme: str) -> list[str]:
    """Replace every frozen ``nn.Linear`` of ``model`` (:func:`quantizable_linears`; inside a
    LoRA layer that is its ``base_layer``) by a :class:`QuantizedLinear` of ``scheme``, in place.
    ``scheme="none"`` changes nothing. Returns the replaced module names."""
    if scheme == "none":
        return []
    if scheme not in BASE_QUANTIZATIONS:
        raise ValueError(f"peft.base_quantization={scheme!r}: allowed {list(BASE_QUANTIZATIONS)}")
    names = quantizable_linears(model)
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, QuantizedLinear.from_linear(getattr(parent, attr), scheme))
    return names
