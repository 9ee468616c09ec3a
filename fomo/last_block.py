"""Last-block pruning: the top transformer block computes only the position the head reads.

A BERT-style sequence classifier reads one position of the last block's output: the pooler
takes ``last_hidden_state[:, 0]`` (the ``[CLS]`` token; with prompt tuning, the first virtual
token). Every other position of the *last* block is computed and thrown away. Pruned, the last
block computes

* keys and values for every position (position 0 attends to all of them),
* the query, the attention output, the attention projection, both LayerNorms and the
  feed-forward network for position 0 only,

and returns a ``(batch, 1, hidden)`` output, which the pooler reads as before. Per token a
block costs about ``12 h^2`` multiply-adds (Q, K, V, output projection: ``4 h^2``; the
feed-forward network: ``8 h^2``), so the pruned last block costs ``2 h^2`` per token plus
``10 h^2`` once: for all-MiniLM-L6-v2 (6 blocks, 32 tokens) the forward and the backward do
about 14 % fewer multiply-adds.

Exactness: position 0's numbers are the same products over the same inputs; only the matrix
shapes change, so results agree with the unpruned model to float32 rounding (tested in float64: losses within 1e-10 relative, gradients within 1e-8 of the largest entry, AdamW updates within 1e-4 lr per step; docs/performance.md). It is a host execution trick like the activation
cache: the simulated device runs the whole model, so the trainer profiles FLOPs and memory
on the unpruned model and the simulated timeline does not change.

Applies when the model's blocks are found, the last block has the BERT block layout
(``attention.self.{query,key,value}``, ``attention.output``, ``feed_forward_chunk``: BERT,
tested here with all-MiniLM-L6-v2; RoBERTa and ELECTRA share the layout) and a pruned
forward of a probe batch gives the unpruned logits. :func:`find_prunable_last_block` says why otherwise, e.g. for a decoder
classifier that reads the last real token.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch import nn

from fomo.prefix_cache import block_list

PROBE_TOLERANCE = 1e-4
"""Largest |logit difference| accepted between the pruned and unpruned probe forward."""

_BLOCK_PARTS = ("attention.self.query", "attention.self.key", "attention.self.value",
                "attention.output", "intermediate", "output")


def _has(module: nn.Module, dotted: str) -> bool:
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return False
    return True


def _attend_one_query(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      mask: Optional[torch.Tensor], scaling: float) -> torch.Tensor:
    """softmax(q k^T * scaling + mask) v for one query position: query (B, H, 1, d), key and
    value (B, H, T, d), mask None, boolean (True = attend) or additive, broadcastable to
    (B, H, 1, T). Returns (B, 1, H, d).

    Written out rather than through the model's attention kernel: a fused kernel may split a
    one-row query differently for different batch sizes, while these matrix products give every
    example the same numbers whatever the batch (batched execution relies on it)."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.matmul(scores.softmax(dim=-1), value).transpose(1, 2)


def position0_forward(block: nn.Module) -> Callable[..., torch.Tensor]:
    """A forward for ``block`` (a BERT-layout block) that returns only position 0:
    ``(batch, seq, hidden) -> (batch, 1, hidden)``, see the module docstring."""
    self_attention = block.attention.self
    head_size = int(self_attention.attention_head_size)

    def forward(hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                *args: Any, **kwargs: Any) -> torch.Tensor:
        batch, seq_len, _ = hidden_states.shape
        first = hidden_states[:, :1]
        query = self_attention.query(first).view(batch, 1, -1, head_size).transpose(1, 2)
        key = self_attention.key(hidden_states).view(batch, seq_len, -1, head_size).transpose(1, 2)
        value = self_attention.value(hidden_states).view(batch, seq_len, -1, head_size).transpose(1, 2)
        mask = attention_mask
        if mask is not None and mask.dim() == 4 and mask.shape[-2] == seq_len:
            mask = mask[:, :, :1, :]   # the mask row of query position 0
        context = _attend_one_query(query, key, value, mask, float(self_attention.scaling))
        context = context.reshape(batch, 1, -1)
        attended = block.attention.output(context, first)
        return block.feed_forward_chunk(attended)

    return forward


def _uses_prefix(model: nn.Module) -> bool:
    """Whether a peft config of the model is prefix tuning (keys and values prepended per block)."""
    configs = getattr(model, "peft_config", None) or {}
    return any(str(getattr(c, "peft_type", "")).endswith("PREFIX_TUNING") for c in configs.values())


def find_prunable_last_block(model: nn.Module, input_ids: torch.Tensor,
                             attention_mask: torch.Tensor) -> tuple[Optional[nn.Module], str]:
    """The model's last transformer block if it can be pruned to position 0, else
    (None, why not). ``input_ids``/``attention_mask``: a probe batch (a few examples of
    different lengths), whose pruned logits must equal the unpruned ones."""
    _, blocks = block_list(model)
    if blocks is None:
        return None, "the transformer blocks were not found (no nn.ModuleList of num_hidden_layers blocks)"
    block = blocks[-1]
    missing = [p for p in _BLOCK_PARTS if not _has(block, p)]
    if missing or not callable(getattr(block, "feed_forward_chunk", None)):
        return None, (f"the last block ({type(block).__name__}) does not have the BERT block layout "
                      f"(missing {missing or ['feed_forward_chunk']})")
    if getattr(block, "is_decoder", False):
        return None, "the last block is a decoder block"
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in block.modules()):
        return None, "the last block has active dropout"
    if _uses_prefix(model):
        return None, ("prefix tuning prepends learned keys and values in every block's attention, which the "
                      "pruned block does not see")
    try:
        with torch.no_grad():
            full = model(input_ids=input_ids, attention_mask=attention_mask).logits
            with pruned(block):
                first_only = model(input_ids=input_ids, attention_mask=attention_mask).logits
    except (RuntimeError, IndexError, TypeError, ValueError, AttributeError) as err:
        return None, f"the model does not run with its last block pruned ({type(err).__name__}: {err})"
    diff = float((full - first_only).abs().max()) if full.shape == first_only.shape else float("inf")
    if not diff <= PROBE_TOLERANCE:
        return None, (f"the classification head reads more than position 0 of the last block "
                      f"(pruned logits differ by {diff:.3g} on a probe batch)")
    return block, ""


def probe_last_block(model: nn.Module, tokens: Any, examples: np.ndarray) -> tuple[Optional[nn.Module], str]:
    """:func:`find_prunable_last_block` probed with the shortest and the longest of
    ``examples`` (so the probe has padding if the data has any); ``tokens``: the tokenized
    texts (``lengths_tokens`` and ``batch(examples)``, see ``fomo.trainer.TokenizedTexts``)."""
    lengths = tokens.lengths_tokens[examples]
    input_ids, mask, _ = tokens.batch(examples[[int(lengths.argmin()), int(lengths.argmax())]])
    return find_prunable_last_block(model, input_ids, mask)


@contextlib.contextmanager
def pruned(block: Optional[nn.Module]) -> Iterator[None]:
    """Within the block, ``block`` computes position 0 only (:func:`position0_forward`); with
    ``block=None`` nothing changes."""
    if block is None:
        yield
        return
    block.forward = position0_forward(block)
    try:
        yield
    finally:
        del block.forward   # the class's own forward is visible again
