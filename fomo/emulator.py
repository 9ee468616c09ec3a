"""Offsite-Tuning emulator of a real checkpoint: the device fine-tunes a compressed copy.

Offsite-Tuning (Xiao, Lin and Han, "Offsite-Tuning: Transfer Learning without Full Model",
2023) splits a model of N transformer blocks into

* the **adapter**: the bottom ``a`` and the top ``a`` blocks (``a = adapter_layers``), kept
  whole; they carry the trainable parameters (here the PEFT tensors, e.g. LoRA on those
  blocks, plus the classification head);
* the **middle**: the M = N - 2a blocks in between, frozen. The emulator keeps
  ``k = emulator_layers`` of them by *uniform layer drop* (:func:`uniform_drop`) and may
  quantise their weights (:func:`quantize_symmetric`).

The edge sends the emulator once (:attr:`Emulator.download_bytes`); devices train the adapter
on it; the edge copies the trained adapter tensors into the full model ("plug-in",
:func:`plug_in`), matching them by module name. FederatedScope-LLM's offsite-tuning builds the
same emulator (bottom + kept middle + top) but keeps at least one adapter block on each side,
as :func:`emulator_layer_indices` requires here.

Layer names. The emulator's block list is renumbered 0..len(kept)-1, as the module names of a
model with that many blocks; :meth:`Emulator.full_name` maps a name back to the original
block index, so tensors always travel between the two models by name, never by order.

Distillation (optional, :func:`distill`): at the edge, the kept middle blocks learn to
reproduce the output of all the original middle blocks (Offsite-Tuning's normalised MSE at the
last middle block), on the edge's own public text; its edge FLOPs are counted.

Only the building blocks live here: no scenario section reaches them yet.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Mapping, Optional

import torch
from torch import nn

from fomo.models import num_hidden_layers
from fomo.prefix_cache import block_list
from fomo.quantization import absmax_scale, symmetric_codes

QUANTIZE_BITS = (8,)
"""Supported ``quantize_bits`` (besides None: no quantisation)."""

SCALE_BYTES = 4
"""Bytes of one per-tensor quantisation scale (float32)."""


# --------------------------------------------------------------------------------------------
# Which blocks the emulator keeps
# --------------------------------------------------------------------------------------------
def uniform_drop(num_middle: int, keep: int) -> list[int]:
    """Positions (0..num_middle-1) of the middle blocks kept by uniform layer drop.

    Offsite-Tuning's ``uniform_choose_layers``: position ``round(i * stride)`` for
    i = 0..keep-1, stride = (M - 1) / (keep - 1), so the first (0) and the last (M - 1) middle
    blocks are always kept. ``round`` is Python's (ties to even), as in Offsite-Tuning; here it
    is applied to the exact rational i (M - 1) / (keep - 1), so a tie is a tie on every machine.
    ``keep = 1`` (a division by zero in Offsite-Tuning) keeps the centre block, position
    floor((M - 1) / 2) (the lower of the two centre blocks when M is even). ``keep = M`` keeps
    all. The positions are strictly increasing: consecutive values differ by stride >= 1 before
    rounding, hence by at least 1 after (a tie on both would need an integer stride, which
    gives integers).
    """
    if not 1 <= keep <= num_middle:
        raise ValueError(f"keep={keep}: must be in 1..{num_middle} (the number of middle blocks)")
    if keep == 1:
        return [(num_middle - 1) // 2]
    stride = Fraction(num_middle - 1, keep - 1)
    return [round(i * stride) for i in range(keep)]


def emulator_layer_indices(num_layers: int, adapter_layers: int, emulator_layers: int,
                           prefix: str = "") -> tuple[list[int], list[int], list[int]]:
    """(bottom, kept_middle, top): original block indices of an emulator's three parts.

    bottom = 0..a-1 and top = N-a..N-1 (a = ``adapter_layers``, N = ``num_layers``) stay whole;
    of the M = N - 2a middle blocks a..N-a-1, ``emulator_layers`` are kept by
    :func:`uniform_drop` (indices a + position). Example: N = 6, a = 1, k = 2 keeps
    [0], [1, 4], [5].

    Raises ValueError naming the field (``prefix`` + field name, e.g. ``prefix="emulator."``)
    for adapter_layers < 1, 2 a >= N (no middle block) and emulator_layers outside 1..M.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers}: the model must have at least one transformer block")
    if adapter_layers < 1:
        raise ValueError(f"{prefix}adapter_layers={adapter_layers}: must be >= 1 (the bottom and top "
                         "blocks that stay whole and carry the trainable parameters)")
    num_middle = num_layers - 2 * adapter_layers
    if num_middle < 1:
        raise ValueError(f"{prefix}adapter_layers={adapter_layers}: 2 x {adapter_layers} adapter blocks leave no "
                         f"middle block in a model of {num_layers} blocks (allowed: "
                         f"1..{(num_layers - 1) // 2})")
    if not 1 <= emulator_layers <= num_middle:
        raise ValueError(f"{prefix}emulator_layers={emulator_layers} but the model has {num_middle} middle blocks "
                         f"({num_layers} blocks, adapter_layers={adapter_layers} each side); allowed: "
                         f"1..{num_middle}")
    bottom = list(range(adapter_layers))
    top = list(range(num_layers - adapter_layers, num_layers))
    middle = [adapter_layers + j for j in uniform_drop(num_middle, emulator_layers)]
    return bottom, middle, top


# --------------------------------------------------------------------------------------------
# Quantisation
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantizedTensor:
    """A tensor stored as int8 codes and one float32 scale: w_hat = q * s.

    Attributes
    ----------
    codes : int8 tensor of the weight's shape, values in -127..127
    scale : float32 scalar tensor s [weight units per code]
    """

    codes: torch.Tensor
    scale: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """w_hat = q * s in float32."""
        return self.codes.to(torch.float32) * self.scale

    @property
    def stored_bytes(self) -> int:
        """numel x 1 byte + one float32 scale [bytes]."""
        return int(self.codes.numel() * self.codes.element_size()) + SCALE_BYTES


def quantize_symmetric(weight: torch.Tensor, bits: int = 8) -> QuantizedTensor:
    """Uniform symmetric per-tensor quantisation: s = max|w| / (2^(b-1) - 1), q = round(w / s).

    For b = 8: s = max|w| / 127, q in -127..127 (torch.round: ties to even). The reconstruction
    error is |w - q s| <= s / 2 per weight (exact arithmetic; float32 adds at most 255 s u,
    u = 2^-24). An all-zero tensor gets s = 0 and q = 0 (exact). Offsite-Tuning's ``quantize``
    is the asymmetric min/max variant of the same uniform grid.
    """
    if bits not in QUANTIZE_BITS:
        raise ValueError(f"quantize_bits={bits}: allowed values are {list(QUANTIZE_BITS)} or null")
    levels = 2 ** (bits - 1) - 1
    scale = absmax_scale(weight, levels)   # the absmax code of peft.base_quantization int8, per tensor
    return QuantizedTensor(codes=symmetric_codes(weight, scale, levels), scale=scale.reshape(()))


# --------------------------------------------------------------------------------------------
# The emulator
# --------------------------------------------------------------------------------------------
def _unique_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter and buffer, each tensor object once (tied weights once)."""
    seen: set[int] = set()
    out: list[tuple[str, torch.Tensor]] = []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        key = id(t)
        if key in seen:
            continue
        seen.add(key)
        out.append((name, t))
    return out


@dataclass
class Emulator:
    """A compressed copy of a model: bottom + kept middle + top blocks (Offsite-Tuning).

    Attributes
    ----------
    model : the emulator (an ``nn.Module`` of the original's class; its block list holds
        ``len(kept_layers)`` blocks and ``config.num_hidden_layers`` says so)
    kept_layers : original block index of each emulator block, in emulator order
    bottom, middle, top : original indices of the three parts (middle = kept middle blocks)
    block_list_name : dotted name of the block list (``bert.encoder.layer``, or
        ``base_model.model.bert.encoder.layer`` under PEFT)
    quantized : emulator parameter name -> its int8 codes and scale, for the quantised middle
        weights (empty without quantisation); the model computes with their dequantised values
    shares_middle : True while the kept middle blocks' frozen tensors are the original
        model's own (``build_emulator(share_frozen=True)``); :func:`own_middle` copies them
        before anything writes them (quantisation, distillation)
    """

    model: nn.Module
    kept_layers: tuple[int, ...]
    bottom: tuple[int, ...]
    middle: tuple[int, ...]
    top: tuple[int, ...]
    block_list_name: str
    quantized: dict[str, QuantizedTensor] = field(default_factory=dict)
    shares_middle: bool = False

    @property
    def num_parameters(self) -> int:
        """Number of parameter elements of the emulator (tied weights once)."""
        seen: set[int] = set()
        total = 0
        for p in self.model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total

    @property
    def download_bytes(self) -> int:
        """What the edge sends once [bytes]: every parameter and buffer of the emulator at its
        stored precision, numel x element size (float32: 4 bytes), except the quantised middle
        weights: numel x 1 byte + 4 bytes of scale each. Buffers (e.g. BERT's position ids) are
        part of the shipped module, as when FederatedScope-LLM serialises the whole emulator."""
        total = 0
        for name, t in _unique_tensors(self.model):
            q = self.quantized.get(name)
            total += q.stored_bytes if q is not None else t.numel() * t.element_size()
        return int(total)

    def full_name(self, name: str) -> str:
        """The original model's name of an emulator tensor: the block position j after
        ``block_list_name`` becomes ``kept_layers[j]``; names outside the blocks are unchanged."""
        head = self.block_list_name + "."
        if not name.startswith(head):
            return name
        position, _, rest = name[len(head):].partition(".")
        return f"{head}{self.kept_layers[int(position)]}.{rest}"


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList, int]:
    """(name, block list, number of blocks) of a Hugging Face model, or ValueError."""
    n_layers = num_hidden_layers(getattr(model, "config", None))
    name, blocks = block_list(model)
    if n_layers is None or blocks is None or name is None:
        raise ValueError("model: its transformer blocks were not found (no nn.ModuleList of "
                         "config.num_hidden_layers blocks); the emulator needs them")
    return name, blocks, n_layers


def _set_submodule(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, attr = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


def _update_config(config: object, kept: list[int]) -> None:
    """Make the (copied) config describe the kept blocks: ``num_hidden_layers`` (or ``n_layer``
    / ``num_layers``) = len(kept); a per-block list ``layer_types`` is subset to them."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, key, None), int):
            setattr(config, key, len(kept))
            break
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list):
        setattr(config, "layer_types", [layer_types[i] for i in kept])


def _renumber_blocks(blocks: nn.ModuleList) -> None:
    """Set every ``layer_idx`` attribute inside block j to j (its position: the index a
    key/value cache uses; the original index is in :attr:`Emulator.kept_layers`)."""
    for position, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position


def _quantize_middle(model: nn.Module, list_name: str, positions: list[int],
                     bits: int) -> dict[str, QuantizedTensor]:
    """Quantise every float parameter of dimension >= 2 (the weight matrices) of the blocks at
    ``positions``; biases and LayerNorm parameters (1-D) stay float32, as Offsite-Tuning's
    ``quantize`` skips 1-D tensors. Each weight is replaced in place by its dequantised value."""
    wanted = {f"{list_name}.{j}." for j in positions}
    out: dict[str, QuantizedTensor] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and p.is_floating_point() and any(name.startswith(w) for w in wanted):
                q = quantize_symmetric(p, bits)
                p.copy_(q.dequantize())
                out[name] = q
    return out


def _frozen_memo(model: nn.Module) -> dict[int, object]:
    """A ``copy.deepcopy`` memo that maps every frozen parameter (``requires_grad`` False) and
    every buffer of ``model`` to itself, so a deep copy shares them instead of copying them."""
    memo: dict[int, object] = {}
    for p in model.parameters():
        if not p.requires_grad:
            memo[id(p)] = p
    for b in model.buffers():
        memo[id(b)] = b
    return memo


def build_emulator(model: nn.Module, adapter_layers: int, emulator_layers: int,
                   quantize_bits: Optional[int] = None, prefix: str = "",
                   share_frozen: bool = False) -> Emulator:
    """The Offsite-Tuning emulator of ``model`` (plain or PEFT-wrapped; ``model`` is unchanged).

    A deep copy whose block list becomes bottom + kept middle + top
    (:func:`emulator_layer_indices`), ``config.num_hidden_layers`` = their number. Every
    parameter of the kept middle blocks is frozen (``requires_grad = False``, PEFT tensors
    placed there included: the middle is the frozen, compressed part). Other parameters keep
    their ``requires_grad``: under PEFT with LoRA on the adapter blocks, the trainable tensors
    are that LoRA and the head. ``quantize_bits=8`` quantises the middle blocks' weight
    matrices (:func:`quantize_symmetric`); the emulator computes with the dequantised weights
    and :attr:`Emulator.download_bytes` counts them at 1 byte + one scale per tensor.
    ``prefix`` is prepended to field names in error messages (e.g. ``"emulator."``).

    ``share_frozen=True``: the emulator's frozen parameters and buffers are ``model``'s own
    tensors (one copy in host memory; the emulator computes with the very same storages, so
    with every block kept it gives ``model``'s numbers bit for bit whatever the kernels'
    sensitivity to memory alignment); trainable tensors are copied. Nothing of ``model`` is
    ever written: :func:`own_middle` gives the kept middle blocks their own copies first
    (quantisation and :func:`distill` call it).
    """
    if quantize_bits is not None and quantize_bits not in QUANTIZE_BITS:
        raise ValueError(f"{prefix}quantize_bits={quantize_bits}: allowed values are "
                         f"{list(QUANTIZE_BITS)} or null")
    _, _, n_layers = _find_blocks(model)
    bottom, middle, top = emulator_layer_indices(n_layers, adapter_layers, emulator_layers, prefix)
    kept = bottom + middle + top
    emu = copy.deepcopy(model, _frozen_memo(model)) if share_frozen else copy.deepcopy(model)
    list_name, blocks, _ = _find_blocks(emu)
    new_blocks = nn.ModuleList([blocks[i] for i in kept])
    _set_submodule(emu, list_name, new_blocks)
    _update_config(emu.config, kept)
    _renumber_blocks(new_blocks)
    for j in range(len(bottom), len(bottom) + len(middle)):
        new_blocks[j].requires_grad_(False)
    emulator = Emulator(model=emu, kept_layers=tuple(kept), bottom=tuple(bottom), middle=tuple(middle),
                        top=tuple(top), block_list_name=list_name, shares_middle=bool(share_frozen))
    if quantize_bits is not None:
        quantize_emulator(emulator, quantize_bits)
    return emulator


def middle_positions(emulator: Emulator) -> list[int]:
    """Positions, in the emulator's block list, of its kept middle blocks."""
    start = len(emulator.bottom)
    return list(range(start, start + len(emulator.middle)))


def own_middle(emulator: Emulator) -> Emulator:
    """Give the kept middle blocks their own copies of every parameter and buffer, if they
    share them with the original model (:attr:`Emulator.shares_middle`); a no-op otherwise.
    The copies are new tensors (new storages: anything holding the old parameter objects or
    storage addresses must look them up again)."""
    if not emulator.shares_middle:
        return emulator
    blocks = emulator.model.get_submodule(emulator.block_list_name)
    with torch.no_grad():
        for j in middle_positions(emulator):
            for module in blocks[j].modules():
                for name, p in list(module._parameters.items()):
                    if p is not None:
                        module._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                for name, b in list(module._buffers.items()):
                    if b is not None:
                        module._buffers[name] = b.clone()
    emulator.shares_middle = False
    return emulator


def quantize_emulator(emulator: Emulator, bits: int = 8) -> Emulator:
    """Quantise the middle blocks' weight matrices of ``emulator`` in place (see
    :func:`quantize_symmetric`; after :func:`distill` if the emulator is distilled) and return
    it. ValueError if it is quantised already. Middle tensors shared with the original model
    are copied first (:func:`own_middle`)."""
    if emulator.quantized:
        raise ValueError("quantize_bits: the emulator is quantised already")
    own_middle(emulator)
    emulator.quantized = _quantize_middle(emulator.model, emulator.block_list_name,
                                          middle_positions(emulator), bits)
    return emulator


# --------------------------------------------------------------------------------------------
# Plug-in: the trained adapter back into the full model
# --------------------------------------------------------------------------------------------
def adapter_state(emulator: Emulator) -> dict[str, torch.Tensor]:
    """The emulator's trainable tensors (PEFT + head), keyed by the *full model's* names
    (:meth:`Emulator.full_name`), detached copies. This is what a device trains and uploads."""
    return {emulator.full_name(name): p.detach().clone()
            for name, p in emulator.model.named_parameters() if p.requires_grad}


def load_adapter_state(full_model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Copy ``state`` (full-model name -> tensor) into ``full_model``'s parameters by name.

    Every name must be a parameter of ``full_model`` of the same shape (ValueError listing the
    offenders otherwise; nothing is copied then). Other tensors are untouched. Returns the
    names copied, in the order of ``state``."""
    params = dict(full_model.named_parameters())
    missing = [n for n in state if n not in params]
    shapes = [f"{n}: {tuple(state[n].shape)} vs {tuple(params[n].shape)}"
              for n in state if n in params and tuple(state[n].shape) != tuple(params[n].shape)]
    if missing or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} trainable tensor(s) have no counterpart in the full model "
                         f"(first: {missing[:3]})")
        if shapes:
            parts.append(f"shapes differ (emulator vs full model) for {shapes[:3]}")
        raise ValueError("plug-in: " + "; ".join(parts) + ". The full model must be the model the "
                         "emulator was built from, with the same PEFT configuration")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)
    return list(state)


def plug_in(full_model: nn.Module, emulator: Emulator) -> list[str]:
    """Offsite-Tuning's plug-in: copy the emulator's trainable tensors into ``full_model`` by
    module name (emulator block j -> original block ``kept_layers[j]``), never by order.
    Raises ValueError if a trainable tensor has no counterpart or its shape differs. Returns
    the full-model names written."""
    return load_adapter_state(full_model, adapter_state(emulator))


# --------------------------------------------------------------------------------------------
# Distillation at the edge (optional)
# --------------------------------------------------------------------------------------------
DISTILL_LEARNING_RATE = 1e-4
"""Offsite-Tuning's emulator distillation learning rate (AdamW, ``scripts/distill_emulator``)."""


class _StopForward(Exception):
    """Raised by the hook on the last middle block once its output is captured."""


@dataclass(frozen=True)
class DistillResult:
    """Outcome of :func:`distill`.

    Attributes
    ----------
    losses : normalised MSE of each step, before its update (dimensionless)
    edge_flops : counted FLOPs of all steps at the edge [FLOP]: the emulator's forward up to its
        last middle block, the teacher's forward, the student's backward (matrix products,
        counted by :func:`fomo.profiling.flop_counter`; element-wise work and AdamW uncounted).
        For a BERT block on B x T tokens (hidden h, feed-forward f) the forward counts
        2 B T (4 h^2 + 2 h f) + 4 B T^2 h (attention scores and values), the backward twice the
        linear part (weight and input gradients; the input gradients of the first student
        block's query/key/value projections, 6 B T h^2, are not needed) and 10 B T^2 h for
        attention (torch's count, which recomputes the scores)
    """

    losses: tuple[float, ...]
    edge_flops: float


def teacher_blocks(full_model: nn.Module, emulator: Emulator) -> list[nn.Module]:
    """The original middle blocks (all M of them, indices a..N-a-1) of ``full_model``: the
    teacher whose output the emulator's kept middle blocks learn to reproduce."""
    _, blocks, n_layers = _find_blocks(full_model)
    if n_layers != emulator.top[-1] + 1:
        raise ValueError(f"distill: the full model has {n_layers} blocks, the emulator was built from a model "
                         f"of {emulator.top[-1] + 1}")
    return [blocks[i] for i in range(len(emulator.bottom), emulator.top[0])]


def normalized_mse(teacher_out: torch.Tensor, student_out: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
    """Offsite-Tuning's distillation loss, mean(((t - s) / rms(t))^2) with rms(t)^2 = mean(t^2),
    i.e. sum (t - s)^2 / sum t^2, here over the real tokens only (``attention_mask`` = 1; the
    reference trains on unpadded text) and every hidden unit. Dimensionless."""
    m = attention_mask.to(teacher_out.dtype).unsqueeze(-1)
    return ((teacher_out - student_out).pow(2) * m).sum() / (teacher_out.pow(2) * m).sum()


def _first(output: object) -> torch.Tensor:
    """The hidden states of a block's output (a tensor, or the first entry of a tuple)."""
    return output[0] if isinstance(output, tuple) else output  # type: ignore[return-value]


def middle_io(emulator: Emulator, input_ids: torch.Tensor, attention_mask: torch.Tensor
              ) -> tuple[tuple, dict, torch.Tensor]:
    """(args, kwargs, output) of the emulator's middle part on a batch: the positional and
    keyword arguments its first middle block receives (hidden states first) and the hidden
    states its last middle block returns. The forward stops there (the top blocks and the head
    do not run)."""
    blocks = emulator.model.get_submodule(emulator.block_list_name)
    positions = middle_positions(emulator)
    seen: dict[str, object] = {}

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen["args"], seen["kwargs"] = args, dict(kwargs)

    def post(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        seen["out"] = _first(output)
        raise _StopForward

    handles = [blocks[positions[0]].register_forward_pre_hook(pre, with_kwargs=True),
               blocks[positions[-1]].register_forward_hook(post, with_kwargs=True)]
    try:
        emulator.model(input_ids=input_ids, attention_mask=attention_mask)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return seen["args"], seen["kwargs"], seen["out"]  # type: ignore[return-value]


def _teacher_forward(teacher: list[nn.Module], args: tuple, kwargs: dict) -> torch.Tensor:
    """The teacher blocks run in sequence on the student's input (no autograd graph)."""
    hidden = args[0]
    with torch.no_grad():
        for block in teacher:
            hidden = _first(block(hidden, *args[1:], **kwargs))
    return hidden


def student_parameters(emulator: Emulator) -> list[tuple[str, nn.Parameter]]:
    """The base weights of the kept middle blocks (PEFT tensors, named ``lora_``, excluded)."""
    heads = tuple(f"{emulator.block_list_name}.{j}." for j in middle_positions(emulator))
    return [(n, p) for n, p in emulator.model.named_parameters()
            if n.startswith(heads) and "lora_" not in n]


def distill(emulator: Emulator, teacher: list[nn.Module], input_ids: torch.Tensor,
            attention_mask: torch.Tensor, steps: int, batch_size: int = 8,
            learning_rate: float = DISTILL_LEARNING_RATE) -> DistillResult:
    """Distil the emulator's kept middle blocks towards the teacher (Offsite-Tuning, KD term).

    Each step takes the next ``batch_size`` rows of the edge's tokenised public text
    (``input_ids``/``attention_mask``, (n, T); rows cycled in order: step t uses rows
    (t b + i) mod n), runs the emulator up to its last middle block (:func:`middle_io`), the
    ``teacher`` (:func:`teacher_blocks`) on the same input, and one AdamW step (weight decay 0,
    as Offsite-Tuning) of :func:`normalized_mse` on the middle blocks' base weights; every
    other tensor stays as it is (the bottom blocks are not trained, so the student's input does
    not move). Offsite-Tuning adds a language-model term (weight 1 against 30 for KD); a
    classifier has no such term at the edge, so only KD is used. The middle blocks end frozen,
    as before. A quantised emulator is refused: distil first, then :func:`quantize_emulator`.
    """
    from fomo.profiling import flop_counter

    if emulator.quantized:
        raise ValueError("distill: the emulator is quantised; distil first, then quantize_emulator")
    if steps < 0 or batch_size < 1 or not learning_rate > 0:
        raise ValueError(f"distill: steps={steps} (>= 0), batch_size={batch_size} (>= 1), "
                         f"learning_rate={learning_rate} (> 0)")
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape or input_ids.shape[0] < 1:
        raise ValueError(f"distill: input_ids {tuple(input_ids.shape)} and attention_mask "
                         f"{tuple(attention_mask.shape)} must be the same (n >= 1, T) shape")
    if len(teacher) < 1:
        raise ValueError("distill: the teacher has no block")
    own_middle(emulator)   # never write the teacher's own tensors
    student = [p for _, p in student_parameters(emulator)]
    flags = {id(p): p.requires_grad for p in emulator.model.parameters()}
    was_training = emulator.model.training
    for p in emulator.model.parameters():
        p.requires_grad_(False)
    for p in student:
        p.requires_grad_(True)
    teacher_modes = [block.training for block in teacher]
    for block in teacher:
        block.eval()
    optimizer = torch.optim.AdamW(student, lr=learning_rate, weight_decay=0.0)
    n = input_ids.shape[0]
    losses: list[float] = []
    try:
        emulator.model.train()
        with flop_counter() as counter:
            for step in range(steps):
                rows = torch.tensor([(step * batch_size + i) % n for i in range(batch_size)])
                ids, mask = input_ids[rows], attention_mask[rows]
                args, kwargs, student_out = middle_io(emulator, ids, mask)
                loss = normalized_mse(_teacher_forward(teacher, args, kwargs), student_out, mask)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
        edge_flops = float(counter.get_total_flops())
    finally:
        for p in emulator.model.parameters():
            p.requires_grad_(flags[id(p)])
            p.grad = None
        emulator.model.train(was_training)
        for block, mode in zip(teacher, teacher_modes):
            block.train(mode)
    return DistillResult(losses=tuple(losses), edge_flops=edge_flops)
