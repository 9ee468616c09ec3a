"""Frozen-prefix activation cache: the frozen lower blocks run once per example, not per step.

When only the top blocks of the transformer hold trainable parameters (``peft.layers``, e.g.
LoRA on the top 2 of 6 blocks), the output of the frozen lower part (embeddings + blocks
``0..m-1``, m = first block with a trainable parameter) depends only on the example. The cache
keeps that output per example (its real tokens only, float32) and training/evaluation steps
feed it to block m: the lower blocks are replaced, within the step, by a function returning
the cached hidden states (the embeddings still run; they are cheap).

Exactness: the cached rows are what the lower blocks compute for the example; padding
positions are filled with zeros, which no real position attends to (their attention weight is
exactly 0), so the loss, gradients and updates equal the uncached path up to float32 rounding
(the rows may have been computed in a batch of another size). Equivalence is
tested in float64: losses within 1e-10 relative, gradients within 1e-8 of the largest entry, AdamW updates within 1e-4 lr per step; docs/performance.md.

It is a host execution trick: the simulated device has no cache, so the trainer still reports
the FLOPs and saved activations of the full, uncached step (profiled once per shape).

Device and precision (``execution.device``/``precision``, :mod:`fomo.execution`): the rows are
computed on the model's device, in whatever precision context the step that needs them runs
(the trainer fills the cache inside its autocast region), and kept there; with ``bf16`` a row
has the dtype the frozen block returns (float32 for BERT-style blocks, whose residual stream
stays float32 under autocast).

Memory is bounded by ``max_bytes`` (tensor bytes of the cached rows); the least recently used
examples are evicted first.

Applies when: the model's transformer blocks are found (an ``nn.ModuleList`` with one entry per
block), m >= 1, every trainable parameter is in blocks ``m..`` or in the classification head,
the lower part has no active dropout, and a block returns a tensor (or a tuple whose other
entries are None). :func:`find_frozen_prefix` says why otherwise.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch import nn

from fomo.models import num_hidden_layers

FILL_BATCH = 64  # examples per forward pass when filling the cache


class _StopForward(Exception):
    """Raised by the pre-hook on block m once its input is captured."""


@dataclass
class FrozenPrefix:
    """Where the frozen lower part of a model ends.

    Attributes
    ----------
    blocks : the model's transformer blocks (``nn.ModuleList``)
    first_trainable : m, index of the first block holding a trainable parameter
    tuple_len : 0 if a block returns a tensor, else the length of the tuple it returns
    """

    blocks: nn.ModuleList
    first_trainable: int
    tuple_len: int = 0


def block_list(model: nn.Module) -> tuple[Optional[str], Optional[nn.ModuleList]]:
    """(name, list) of the ``nn.ModuleList`` with one entry per transformer block."""
    n_layers = num_hidden_layers(getattr(model, "config", None))
    if n_layers is None:
        return None, None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and n_layers > 0:
            if all(type(b) is type(module[0]) for b in module):
                return name, module
    return None, None


def _probe_output(model: nn.Module, block: nn.Module, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor) -> Any:
    """The output of ``block`` in a no-grad forward of one example (the rest is skipped)."""
    seen: dict[str, Any] = {}

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        seen["out"] = output
        raise _StopForward

    handle = block.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return seen.get("out")


def find_frozen_prefix(model: nn.Module, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor) -> tuple[Optional[FrozenPrefix], str]:
    """Locate the frozen lower blocks of a PEFT model.

    ``input_ids``/``attention_mask``: one example, used to probe what a block returns.
    Returns (prefix, "") or (None, why the cache does not apply)."""
    list_name, blocks = block_list(model)
    if blocks is None:
        return None, "the transformer blocks were not found (no nn.ModuleList of num_hidden_layers blocks)"
    prefix = f"{list_name}."
    first: Optional[int] = None
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(prefix):
            index = int(name[len(prefix):].split(".", 1)[0])
            first = index if first is None else min(first, index)
        elif ".modules_to_save." not in name:
            return None, f"trainable parameter {name} is outside the transformer blocks and the head"
    if first is None or first == 0:
        return None, "block 0 holds trainable parameters: there is no frozen prefix"
    lower = [m for b in blocks[:first] for m in b.modules()]
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in lower):
        return None, "the frozen blocks have active dropout"
    out = _probe_output(model, blocks[first - 1], input_ids, attention_mask)
    if isinstance(out, torch.Tensor):
        return FrozenPrefix(blocks, first, 0), ""
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor) and all(o is None for o in out[1:]):
        return FrozenPrefix(blocks, first, len(out)), ""
    return None, f"a block returns {type(out).__name__}, not a tensor"


class ActivationCache:
    """LRU cache of the frozen prefix's output per example.

    Parameters
    ----------
    model : the PEFT model
    prefix : from :func:`find_frozen_prefix`
    batch_of : callable(example indices) -> (input_ids, attention_mask, labels), dynamically
        padded (``TokenizedTexts.batch``)
    lengths_tokens : real tokens per example (indexed by example index)
    max_bytes : bound on the bytes of the cached rows [bytes]

    Attributes
    ----------
    hits, misses : lookups served from / added to the cache
    bytes_used : current size of the cached rows [bytes]
    """

    def __init__(self, model: nn.Module, prefix: FrozenPrefix,
                 batch_of: Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                 lengths_tokens: np.ndarray, max_bytes: int) -> None:
        self.model = model
        self.prefix = prefix
        self._batch_of = batch_of
        self._lengths = lengths_tokens
        self.max_bytes = int(max_bytes)
        self._rows: "OrderedDict[int, torch.Tensor]" = OrderedDict()
        self.bytes_used = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._rows)

    # ------------------------------------------------------------------ filling
    def _compute(self, examples: np.ndarray) -> list[torch.Tensor]:
        """Frozen-prefix output rows (real tokens only) of ``examples``, computed in batches."""
        block = self.prefix.blocks[self.prefix.first_trainable]
        captured: dict[str, torch.Tensor] = {}

        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            captured["h"] = args[0] if args else kwargs["hidden_states"]
            raise _StopForward

        rows: list[torch.Tensor] = []
        device = next(self.model.parameters()).device   # execution.device: batches go where the model is
        handle = block.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                for start in range(0, len(examples), FILL_BATCH):
                    chunk = examples[start:start + FILL_BATCH]
                    input_ids, mask, _ = (t.to(device) for t in self._batch_of(chunk))
                    try:
                        self.model(input_ids=input_ids, attention_mask=mask)
                    except _StopForward:
                        pass
                    hidden = captured.pop("h")
                    for i, e in enumerate(chunk):
                        rows.append(hidden[i, : int(self._lengths[e])].clone())
        finally:
            handle.remove()
        return rows

    def _insert(self, example: int, row: torch.Tensor) -> None:
        size = row.numel() * row.element_size()
        if size > self.max_bytes:
            return
        self._rows[example] = row
        self.bytes_used += size
        while self.bytes_used > self.max_bytes:
            _, old = self._rows.popitem(last=False)
            self.bytes_used -= old.numel() * old.element_size()

    def rows(self, examples: np.ndarray) -> list[torch.Tensor]:
        """The cached rows of ``examples`` (computing and inserting the missing ones)."""
        out: dict[int, torch.Tensor] = {}
        missing: dict[int, None] = {}  # insertion-ordered set
        for e in (int(x) for x in examples):
            if e in out or e in missing:
                continue
            row = self._rows.get(e)
            if row is None:
                missing[e] = None
            else:
                self._rows.move_to_end(e)
                out[e] = row
                self.hits += 1
        if missing:
            self.misses += len(missing)
            for e, row in zip(missing, self._compute(np.asarray(list(missing), dtype=np.int64))):
                out[e] = row
                self._insert(e, row)
        return [out[int(e)] for e in examples]

    def hidden_states(self, examples: np.ndarray, seq_len: int) -> torch.Tensor:
        """(len(examples), seq_len, hidden) input of block m for a batch padded to
        ``seq_len`` tokens (padding positions zero)."""
        rows = self.rows(examples)
        hidden = rows[0].shape[-1]
        out = rows[0].new_zeros((len(rows), seq_len, hidden))
        for i, row in enumerate(rows):
            out[i, : row.shape[0]] = row
        return out

    # ------------------------------------------------------------------ using
    @contextlib.contextmanager
    def substituted(self, hidden: torch.Tensor) -> Iterator[None]:
        """Within the block, the frozen blocks ``0..m-1`` skip their work and the input of
        block m is ``hidden``."""
        value: Any = hidden if self.prefix.tuple_len == 0 else (hidden,) + (None,) * (self.prefix.tuple_len - 1)
        lower = list(self.prefix.blocks[: self.prefix.first_trainable])

        def forward(*args: Any, **kwargs: Any) -> Any:
            return value

        try:
            for block in lower:
                block.forward = forward
            yield
        finally:
            for block in lower:
                if "forward" in block.__dict__:
                    del block.forward
