"""Split fine-tuning with gradient download (SplitFed-style "download gradients").

The device never runs the whole foundation model. A BERT-layout sequence classifier
(all-MiniLM-L6-v2: embeddings, ``bert.encoder.layer`` of L = 6 blocks, pooler, classifier) is cut
after block ``cut_layer`` (0 <= cut_layer <= L):

* **device part**: the embedding layer, blocks ``[0, cut_layer)`` and a trainable soft prompt
  P (``num_virtual_tokens`` x hidden);
* **edge part**: blocks ``[cut_layer, L)``, the pooler and the classification head. The base is
  frozen on both sides; the head (``classifier``) is optionally trainable at the edge
  (``train_head``).

One local step is one round trip (Vepakomma et al. 2018, split learning; Thapa et al. 2022,
SplitFed): the device uploads the cut activations h, the token mask and the labels; the edge
runs the rest forward, the cross-entropy loss and the backward, and sends back dL/dh; the
device completes the backward into P and steps its optimizer.

Prompt placement. P sits *after* the embedding layer, after the first position:

    h_0 = [ E(x)_0 ; P_1 .. P_nv ; E(x)_1 .. E(x)_{T-1} ]            (B, T + n_v, d)

E(x) = LayerNorm(word + position + token-type embeddings) of the T real tokens at their own
positions 0..T-1 (the positions the checkpoint was trained with). Position 0 stays the ``[CLS]``
token because the pooler reads position 0 (``last_hidden_state[:, 0]``); P is inserted right
after it. (peft's prompt tuning instead prepends P to the *word* embeddings, before the
embedding layer, so the pooler then reads the first virtual token.) The attention mask is
extended the same way, ``[m_0, 1 x n_v, m_1 .. m_{T-1}]``: every position attends to the
virtual tokens, padding stays masked. Initialisation (Lester et al. 2021, "sampled vocabulary",
who draw from the 5,000 most common tokens; here from ``init_token_ids``, by default the whole
vocabulary except the pad token): P_j is the embedding layer's output for a token drawn
uniformly by the caller's numpy Generator, at position j (1..n_v), i.e. what the blocks see had
that token followed ``[CLS]``; P then lives on the scale of the hidden states it is mixed with.

Trainable tensors: P on the device and, with ``train_head``, the classifier at the edge; the
constructor freezes everything else. A tensor of a block below the cut that the caller makes
trainable afterwards (a PEFT tensor) gets its gradient from the device backward too and is in
:meth:`SplitModel.device_parameters`. Dropout, if the model has any active, draws from torch's
RNG exactly as in the unsplit model (``fomo.models.load_base`` switches it off).

Payloads (:func:`payload_formula`; ``value_bytes`` = 4 in float32), batch B, T tokens, hidden d:

* cut_layer >= 0, full gradient (the general case):
  uplink   = B (T + n_v) d value_bytes   (cut activations)
           + B T                           (token mask, bool; the edge inserts the n_v ones)
           + 8 B                           (labels, int64: the edge computes the loss)
  downlink = B (T + n_v) d value_bytes   (dL/dh at the cut)
* cut_layer = 0 and ``grad_of_prompt_only``: the device uploads the token embeddings E(x) and P
  separately, the edge assembles h_0 and returns only dL/dP summed over the batch:
  uplink   = B T d value_bytes + n_v d value_bytes + B T + 8 B
  downlink = n_v d value_bytes

Worked example (B = 8, T = 64, n_v = 10, d = 384, float32): the general case moves 909,312 B of
activations each way; the prompt-only case uploads 786,432 + 15,360 B and downloads 15,360 B.
The cut activations are a privacy risk: at cut_layer = 0 they are the token embeddings, which a
nearest-neighbour search over the embedding table inverts to the tokens; a cut after one or
more blocks makes inversion harder but not impossible.

FLOPs of each side are counted with :func:`fomo.profiling.flop_counter` (matrix products only,
as everywhere in deftsim): the device's forward + backward and the edge's forward + backward.
Their sum equals the counted FLOPs of the same step on the unsplit prompted model (the same
products on the same shapes); at cut_layer = 0 the device counts 0 (an embedding lookup and a
LayerNorm are not matrix products).

Exactness: the split step computes exactly the products of the unsplit model, so losses and
gradients agree with autograd through the whole model to rounding (tested in float64: losses
within 1e-10 relative, gradients within 1e-8 of the largest entry).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fomo.models import num_hidden_layers, tensor_bytes
from fomo.profiling import SavedTensorMeter, flop_counter

LABEL_BYTES = 8
"""Bytes per uploaded label (int64, the dtype of deftsim's label tensors)."""

MASK_BYTES_PER_TOKEN = 1
"""Bytes per uploaded token-mask entry (bool)."""

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(input_ids (B, T) int64, attention_mask (B, T) 0/1, labels (B,) int64), right-padded."""


# --------------------------------------------------------------------------------------------
# Payloads
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Payload:
    """Bytes of one split step's radio transfers.

    Attributes
    ----------
    activations_bytes : uploaded hidden states: the cut activations (B, T + n_v, d), or the
        token embeddings (B, T, d) when only dL/dP comes back [bytes]
    prompt_bytes : uploaded prompt P (n_v, d); 0 unless only dL/dP comes back [bytes]
    mask_bytes : uploaded token mask (B, T) as bool [bytes]
    labels_bytes : uploaded labels (B,) as int64 [bytes]
    downlink_bytes : downloaded gradient, dL/dh (B, T + n_v, d) or dL/dP (n_v, d) [bytes]
    """

    activations_bytes: int
    prompt_bytes: int
    mask_bytes: int
    labels_bytes: int
    downlink_bytes: int

    @property
    def uplink_bytes(self) -> int:
        """Total uplink [bytes] = activations + prompt + mask + labels."""
        return self.activations_bytes + self.prompt_bytes + self.mask_bytes + self.labels_bytes


def payload_formula(batch_size: int, seq_len_tokens: int, num_virtual_tokens: int, hidden_size: int,
                    grad_of_prompt_only: bool = False, value_bytes: int = 4) -> Payload:
    """Bytes of one split step from the shapes (see the module docstring for the formulas).

    ``value_bytes``: bytes per activation/gradient value (4 for float32)."""
    b, t, nv, d = int(batch_size), int(seq_len_tokens), int(num_virtual_tokens), int(hidden_size)
    mask = b * t * MASK_BYTES_PER_TOKEN
    labels = b * LABEL_BYTES
    if grad_of_prompt_only:
        return Payload(b * t * d * value_bytes, nv * d * value_bytes, mask, labels, nv * d * value_bytes)
    cut = b * (t + nv) * d * value_bytes
    return Payload(cut, 0, mask, labels, cut)


@dataclass(frozen=True)
class Uplink:
    """What the device sends to the edge in one step (detached tensors, as they travel).

    Attributes
    ----------
    hidden : cut activations (B, T + n_v, d); token embeddings (B, T, d) in prompt-only mode
    token_mask : (B, T) bool, True = real token
    labels : (B,) int64
    prompt : P (n_v, d) in prompt-only mode, else None
    """

    hidden: torch.Tensor
    token_mask: torch.Tensor
    labels: torch.Tensor
    prompt: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class EdgeResult:
    """The edge's answer to one uplink.

    Attributes
    ----------
    loss : mean cross-entropy of the batch (detached scalar)
    grad : the downlink: dL/dh (B, T + n_v, d), or dL/dP (n_v, d) summed over the batch in
        prompt-only mode
    head_grads : gradient of each trainable head parameter (name -> tensor; empty when the head
        is frozen). They stay at the edge.
    """

    loss: torch.Tensor
    grad: torch.Tensor
    head_grads: dict[str, torch.Tensor]


@dataclass(frozen=True)
class SideFlops:
    """Counted FLOPs of one split step per side (forward + backward) [FLOP].

    ``device_forward_flops`` and ``device_backward_flops`` are the device's two passes
    (``device_flops`` is their sum; 0 when the instance was built from totals only)."""

    device_flops: float
    edge_flops: float
    device_forward_flops: float = 0.0
    device_backward_flops: float = 0.0


@dataclass(frozen=True)
class SplitStepProfile:
    """Counts of one split step of one shape (:meth:`SplitModel.profile_step`).

    Attributes
    ----------
    flops : counted FLOPs per side
    payload : measured bytes of the transfers
    device_saved_bytes : bytes autograd saves during the device forward for the device
        backward (distinct storages, weights excluded) [bytes]
    edge_saved_bytes : the same for the edge forward [bytes]
    """

    flops: SideFlops
    payload: Payload
    device_saved_bytes: int
    edge_saved_bytes: int


@dataclass(frozen=True)
class SplitStepResult:
    """One split step: loss before the update, measured payload and (if counted) FLOPs."""

    loss: float
    payload: Payload
    flops: Optional[SideFlops]


def measured_payload(uplink: Uplink, downlink: torch.Tensor) -> Payload:
    """Bytes of the tensors that travel (numel x element size of each)."""
    prompt = tensor_bytes([uplink.prompt]) if uplink.prompt is not None else 0
    return Payload(tensor_bytes([uplink.hidden]), prompt, tensor_bytes([uplink.token_mask]),
                   tensor_bytes([uplink.labels]), tensor_bytes([downlink]))


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def insert_after_first(tokens: torch.Tensor, virtual: torch.Tensor) -> torch.Tensor:
    """[tokens[:, :1]; virtual; tokens[:, 1:]] along dim 1 (``virtual`` is (B, n_v, ...))."""
    return torch.cat([tokens[:, :1], virtual, tokens[:, 1:]], dim=1)


def extend_mask(token_mask: torch.Tensor, num_virtual_tokens: int) -> torch.Tensor:
    """(B, T) mask -> (B, T + n_v): ones for the virtual tokens, inserted after position 0."""
    ones = torch.ones(token_mask.shape[0], num_virtual_tokens, dtype=token_mask.dtype,
                      device=token_mask.device)
    return insert_after_first(token_mask, ones)


def _block_output(out: Any) -> torch.Tensor:
    """A transformer block's hidden states (blocks return a tensor or a tuple led by one)."""
    return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def _metered(exclude_ptrs: Optional[frozenset[int]]) -> Iterator[list[int]]:
    """Yield a one-element list that receives the bytes autograd saves inside the block
    (:class:`fomo.profiling.SavedTensorMeter`; 0 and no hooks if ``exclude_ptrs`` is None)."""
    box = [0]
    if exclude_ptrs is None:
        yield box
        return
    with SavedTensorMeter(exclude_ptrs) as meter:
        yield box
    box[0] = int(meter.saved_bytes)


@contextlib.contextmanager
def _counted(enabled: bool) -> Iterator[list[float]]:
    """Yield a one-element list that receives the counted FLOPs of the block (0 if disabled)."""
    box = [0.0]
    if not enabled:
        yield box
        return
    with flop_counter() as counter:
        yield box
    box[0] = float(counter.get_total_flops())


def _check_int(name: str, value: Any, low: int, high: Optional[int], what: str) -> int:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        allowed = f"an integer in {low}..{high}" if high is not None else f"an integer >= {low}"
        raise ValueError(f"{name}={value!r}: must be {allowed}{what}")
    return int(value)


# --------------------------------------------------------------------------------------------
# The split model
# --------------------------------------------------------------------------------------------
class SplitModel(nn.Module):
    """A BERT-layout sequence classifier cut into a device part and an edge part.

    Parameters
    ----------
    model : e.g. from :func:`fomo.models.load_base` (``BertForSequenceClassification`` layout:
        ``<prefix>.embeddings``, ``<prefix>.encoder.layer``, ``<prefix>.pooler``, ``classifier``).
        It is used in place: all its parameters are frozen, except the classifier when
        ``train_head``.
    cut_layer : number of blocks on the device, 0..L
    num_virtual_tokens : n_v >= 1, rows of the soft prompt P
    rng : draws the vocabulary tokens P is initialised from (e.g. a
        ``netsim.network.child_rng`` stream of the device)
    train_head : the classifier is trainable at the edge
    grad_of_prompt_only : (cut_layer = 0 only) upload E(x) and P separately; the edge returns
        dL/dP (n_v, d) summed over the batch instead of dL/dh
    init_token_ids : candidate token ids for P's initialisation (default: the whole vocabulary
        except the pad token)
    """

    def __init__(self, model: nn.Module, cut_layer: int, num_virtual_tokens: int, rng: np.random.Generator,
                 *, train_head: bool = False, grad_of_prompt_only: bool = False,
                 init_token_ids: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        _, blocks = _bert_parts(model)
        n_layers = len(blocks)
        self.cut_layer = _check_int("cut_layer", cut_layer, 0, n_layers,
                                    f" (the model has {n_layers} transformer blocks)")
        self.num_virtual_tokens = _check_int("num_virtual_tokens", num_virtual_tokens, 1, None, "")
        if grad_of_prompt_only and self.cut_layer != 0:
            raise ValueError(f"grad_of_prompt_only=True needs cut_layer=0 (got cut_layer={self.cut_layer}): "
                             "only then is P an input of the edge part")
        candidates = _candidate_token_ids(model.config, init_token_ids)
        self.model = model   # the only registered submodule (base and blocks are views of it)
        self._prefix = model.base_model_prefix
        self.train_head = bool(train_head)
        self.grad_of_prompt_only = bool(grad_of_prompt_only)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.classifier.parameters():
            p.requires_grad_(self.train_head)
        self.prompt = nn.Parameter(self._initial_prompt(rng, candidates))
        self._pending: Optional[torch.Tensor] = None

    @property
    def base(self) -> nn.Module:
        """The base encoder (``model.bert`` for BERT)."""
        return getattr(self.model, self._prefix)

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks (``base.encoder.layer``)."""
        return self.base.encoder.layer

    # ------------------------------------------------------------------ construction
    def _initial_prompt(self, rng: np.random.Generator, candidates: np.ndarray) -> torch.Tensor:
        """P (n_v, d): the embedding layer's output for n_v tokens drawn uniformly (with
        replacement) from ``candidates``, at positions 1..n_v."""
        ids = torch.as_tensor(rng.choice(candidates, size=self.num_virtual_tokens), dtype=torch.long)
        device = self.base.embeddings.word_embeddings.weight.device
        positions = torch.arange(1, self.num_virtual_tokens + 1, device=device)[None]
        with torch.no_grad():
            rows = self.base.embeddings(input_ids=ids[None].to(device), position_ids=positions)[0]
        return rows.detach().clone()

    # ------------------------------------------------------------------ parameters
    def device_parameters(self) -> list[nn.Parameter]:
        """Trainable tensors on the device: P (and any trainable tensor of the blocks below the
        cut, whose gradients the device backward also fills)."""
        below = [p for b in self.blocks[: self.cut_layer] for p in b.parameters() if p.requires_grad]
        return [self.prompt, *below]

    def head_parameters(self) -> dict[str, nn.Parameter]:
        """Trainable head tensors at the edge (``classifier.*``; empty unless ``train_head``)."""
        return {f"classifier.{n}": p for n, p in self.model.classifier.named_parameters() if p.requires_grad}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Device tensors then head tensors (what one optimizer of the whole step holds)."""
        return [*self.device_parameters(), *self.head_parameters().values()]

    def device_weights_bytes(self) -> int:
        """Bytes of what the device holds: embedding layer, blocks below the cut and P [bytes]."""
        tensors = list(self.base.embeddings.parameters()) + list(self.base.embeddings.buffers())
        for b in self.blocks[: self.cut_layer]:
            tensors += list(b.parameters()) + list(b.buffers())
        return tensor_bytes([*tensors, self.prompt])

    # ------------------------------------------------------------------ shared pieces
    def _attention_mask(self, hidden: torch.Tensor, full_mask: torch.Tensor) -> Any:
        """The blocks' attention mask for (B, T + n_v) 0/1 ``full_mask``, built as BertModel
        builds it for its attention implementation."""
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.base.config, inputs_embeds=hidden,
                                         attention_mask=full_mask.long())

    def _run_blocks(self, hidden: torch.Tensor, full_mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        attn = self._attention_mask(hidden, full_mask)
        for block in self.blocks[start:stop]:
            hidden = _block_output(block(hidden, attn))
        return hidden

    def _prompted_embeddings(self, token_embeddings: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        batch = token_embeddings.shape[0]
        return insert_after_first(token_embeddings, prompt[None].expand(batch, -1, -1))

    # ------------------------------------------------------------------ device side
    def device_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The device's forward. Returns the cut activations h (B, T + n_v, d) with their
        autograd graph back to P; in prompt-only mode the token embeddings E(x) (B, T, d)
        (P is uploaded separately). Keeps h for :meth:`device_backward`."""
        token_embeddings = self.base.embeddings(input_ids=input_ids)
        if self.grad_of_prompt_only:
            self._pending = None
            return token_embeddings
        hidden = self._prompted_embeddings(token_embeddings, self.prompt)
        full_mask = extend_mask(attention_mask, self.num_virtual_tokens)
        hidden = self._run_blocks(hidden, full_mask, 0, self.cut_layer)
        self._pending = hidden
        return hidden

    def uplink(self, hidden: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> Uplink:
        """The tensors sent to the edge: detached ``hidden``, the mask as bool, int64 labels
        and, in prompt-only mode, a copy of P."""
        prompt = self.prompt.detach().clone() if self.grad_of_prompt_only else None
        return Uplink(hidden.detach(), attention_mask.bool(), labels.long(), prompt)

    def device_backward(self, grad: torch.Tensor) -> None:
        """Complete the backward on the device: accumulate dL/dP (and the gradients of any
        trainable tensor below the cut) into ``.grad``. ``grad`` is the downlink of
        :meth:`edge_step`."""
        if self.grad_of_prompt_only:
            g = grad.to(self.prompt.dtype)
            self.prompt.grad = g.clone() if self.prompt.grad is None else self.prompt.grad + g
            return
        if self._pending is None:
            raise RuntimeError("device_backward needs a device_forward first (once per forward)")
        hidden, self._pending = self._pending, None
        hidden.backward(grad)

    # ------------------------------------------------------------------ edge side
    def edge_logits(self, hidden: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes) of the edge part from cut activations (B, T + n_v, d)."""
        full_mask = extend_mask(token_mask, self.num_virtual_tokens)
        hidden = self._run_blocks(hidden, full_mask, self.cut_layer, len(self.blocks))
        pooled = self.base.pooler(hidden)
        return self.model.classifier(self.model.dropout(pooled))

    def edge_step(self, hidden: torch.Tensor, token_mask: torch.Tensor, labels: torch.Tensor,
                  prompt: Optional[torch.Tensor] = None) -> EdgeResult:
        """The edge's forward + loss + backward for one uplink. Leaves every ``.grad`` alone.

        ``hidden``: cut activations (B, T + n_v, d), or with ``prompt`` (prompt-only mode) the
        token embeddings (B, T, d) and P (n_v, d). Returns the loss, dL/dh (or dL/dP summed
        over the batch) and the head gradients."""
        if (prompt is not None) != self.grad_of_prompt_only:
            raise ValueError("edge_step: give prompt exactly in prompt-only mode (grad_of_prompt_only)")
        head = self.head_parameters()
        if prompt is not None:
            leaf = prompt.detach().requires_grad_(True)
            cut = self._prompted_embeddings(hidden.detach(), leaf)
        else:
            leaf = hidden.detach().requires_grad_(True)
            cut = leaf
        saved = {name: p.grad for name, p in head.items()}
        for p in head.values():
            p.grad = None
        try:
            # backward(), not autograd.grad(): FlopCounterMode's module hooks refuse the latter
            with torch.enable_grad():
                loss = F.cross_entropy(self.edge_logits(cut, token_mask), labels)
                loss.backward()
            head_grads = {name: p.grad for name, p in head.items()}
        finally:
            for name, p in head.items():
                p.grad = saved[name]
        assert leaf.grad is not None
        return EdgeResult(loss.detach(), leaf.grad, head_grads)

    # ------------------------------------------------------------------ the round trip
    def split_step(self, optimizer: torch.optim.Optimizer, batch: Batch,
                   edge_optimizer: Optional[torch.optim.Optimizer] = None,
                   count_flops: bool = False) -> SplitStepResult:
        """One local step: device forward, uplink, edge step, downlink, device backward, then
        ``optimizer.step()`` (and ``edge_optimizer.step()`` if given). Gradients of all
        trainable tensors are reset first and set by this step only: P's from the downlink,
        the head's from the edge. ``optimizer`` holds P (and the head, if no
        ``edge_optimizer`` does). With ``count_flops`` the FLOPs of each side are counted."""
        for p in self.trainable_parameters():
            p.grad = None
        up, result, flops, _ = self._round_trip(batch, count_flops)
        for name, p in self.head_parameters().items():
            p.grad = result.head_grads[name]
        optimizer.step()
        if edge_optimizer is not None:
            edge_optimizer.step()
        return SplitStepResult(float(result.loss), measured_payload(up, result.grad), flops)

    def _round_trip(self, batch: Batch, count_flops: bool, exclude_ptrs: Optional[frozenset[int]] = None):
        """Device forward, uplink, edge step and device backward of one batch; returns the
        uplink, the edge's result, (with ``count_flops``) the FLOPs of each side and (with
        ``exclude_ptrs``, the weights' storages) the saved bytes of the device and edge forward."""
        input_ids, attention_mask, labels = batch
        with _counted(count_flops) as dev_fwd, _metered(exclude_ptrs) as dev_saved:
            hidden = self.device_forward(input_ids, attention_mask)
        up = self.uplink(hidden, attention_mask, labels)
        with _counted(count_flops) as edge, _metered(exclude_ptrs) as edge_saved:
            result = self.edge_step(up.hidden, up.token_mask, up.labels, up.prompt)
        with _counted(count_flops) as dev_bwd:
            self.device_backward(result.grad)
        flops = SideFlops(dev_fwd[0] + dev_bwd[0], edge[0], dev_fwd[0], dev_bwd[0]) if count_flops else None
        return up, result, flops, (dev_saved[0], edge_saved[0])

    def count_split_flops(self, batch: Batch) -> SideFlops:
        """Counted FLOPs per side of one step of this batch's shape, without changing the model
        (no optimizer step; gradients reset to None afterwards; torch RNG state restored)."""
        return self.profile_step(batch).flops

    def profile_step(self, batch: Batch, exclude_ptrs: Optional[frozenset[int]] = None) -> SplitStepProfile:
        """FLOPs per side, payload and saved-activation bytes per side of one step of this
        batch's shape, without changing the model (no optimizer step; gradients reset to None
        afterwards; torch RNG state restored). ``exclude_ptrs``: storages not counted as saved
        activations (default: this model's parameters and buffers)."""
        if exclude_ptrs is None:
            exclude_ptrs = frozenset(t.untyped_storage().data_ptr()
                                     for t in [*self.parameters(), *self.buffers()])
        with torch.random.fork_rng(devices=[]):
            up, result, flops, (dev_saved, edge_saved) = self._round_trip(batch, True, exclude_ptrs)
        for p in self.trainable_parameters():
            p.grad = None
        return SplitStepProfile(flops, measured_payload(up, result.grad), dev_saved, edge_saved)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes) of the whole prompted split model: the device part then the edge
        part on the same tensors, with no transfer (evaluation at the edge; call under
        ``torch.no_grad()``)."""
        hidden = self._prompted_embeddings(self.base.embeddings(input_ids=input_ids), self.prompt)
        hidden = self._run_blocks(hidden, extend_mask(attention_mask, self.num_virtual_tokens), 0, self.cut_layer)
        return self.edge_logits(hidden, attention_mask)


def _candidate_token_ids(config: Any, init_token_ids: Optional[Sequence[int]]) -> np.ndarray:
    """Token ids P may start from: ``init_token_ids`` (checked against the vocabulary), or every
    id except the pad token."""
    vocab = int(config.vocab_size)
    if init_token_ids is None:
        pad = getattr(config, "pad_token_id", None)
        return np.array([i for i in range(vocab) if i != pad], dtype=np.int64)
    candidates = np.asarray(list(init_token_ids), dtype=np.int64)
    bad = candidates[(candidates < 0) | (candidates >= vocab)]
    if candidates.size == 0 or bad.size:
        raise ValueError(f"init_token_ids: {bad.tolist() or 'empty'}: token ids must be in 0..{vocab - 1}")
    return candidates


def _bert_parts(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """(base model, its block list) of a BERT-layout sequence classifier, or ValueError saying
    what is missing."""
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    missing = []
    if base is None:
        missing.append(f"the base model ({prefix or 'base_model_prefix'})")
    else:
        for part in ("embeddings", "encoder", "pooler"):
            if getattr(base, part, None) is None:
                missing.append(f"{prefix}.{part}")
    for part in ("classifier", "dropout"):
        if not isinstance(getattr(model, part, None), nn.Module):
            missing.append(part)
    blocks = getattr(getattr(base, "encoder", None), "layer", None)
    if base is not None and not isinstance(blocks, nn.ModuleList):
        missing.append(f"{prefix}.encoder.layer")
    if missing:
        raise ValueError(f"split fine-tuning needs a BERT-layout sequence classifier (embeddings, "
                         f"encoder.layer blocks, a pooler reading position 0, classifier); "
                         f"{type(model).__name__} lacks {', '.join(missing)}")
    if getattr(base.config, "is_decoder", False):
        raise ValueError(f"split fine-tuning needs an encoder: {type(model).__name__} is configured as a decoder")
    n_layers = num_hidden_layers(base.config)
    if n_layers is not None and n_layers != len(blocks):
        raise ValueError(f"{type(model).__name__}: encoder.layer has {len(blocks)} blocks, the config says {n_layers}")
    return base, blocks
