"""Instruction/response examples for causal-LM fine-tuning, built from the text-classification
data (``model.objective: causal_lm``).

Every text of the data set (:func:`fomo.data.load_texts`, ``data.dataset`` or ``data.task``)
with class name ``label`` becomes one token sequence::

    [special prefix] prompt_before  text  prompt_after  response  EOS  [padding]

where ``data.prompt_template`` = ``prompt_before + "{text}" + prompt_after`` (default
``"{text}\\nTopic:"``), ``response`` = ``data.response_template`` with ``{label}`` replaced
(default ``" {label}"``, so the response of a BBC sports article is ``" sports"``), EOS the
tokenizer's end-of-sequence token and the special prefix what the tokenizer puts before a text
(Llama's BOS; nothing for GPT-2 or SmolLM2). The text is cut (token-exactly) so the whole
sequence fits ``model.max_length_tokens``; the templates and the response are never cut. The
pieces are tokenized separately and concatenated, so the response tokens are the same for every
example of a class.

Labels (for the next-token loss, ``-100`` = no loss): ``data.loss_on: response`` labels the
response tokens (with EOS), ``all`` every real token (plain-text language modelling over the
whole example). :attr:`LMTokens.response_mask` always marks the response tokens (exact match).
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from fomo.trainer import TokenizedTexts

if TYPE_CHECKING:  # pragma: no cover
    from netsim.scenario import DataSpec
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
"""Label of a position without loss (``torch.nn.functional.cross_entropy``'s ignore_index)."""


def split_template(template: str, name: str) -> tuple[str, str]:
    """(text before, text after) the one ``{name}`` placeholder of a ``str.format`` template,
    with ``{{``/``}}`` unescaped (the template was checked by ``DataSpec.check_template``)."""
    before, after, seen = [], [], False
    for literal, field, _, _ in string.Formatter().parse(template):
        (after if seen else before).append(literal)
        if field is not None:
            if field != name or seen:
                raise ValueError(f"template {template!r} must hold {{{name}}} exactly once")
            seen = True
    if not seen:
        raise ValueError(f"template {template!r} must hold {{{name}}} exactly once")
    return "".join(before), "".join(after)


def response_text(template: str, label: str) -> str:
    """The response of an example of class ``label``."""
    before, after = split_template(template, "label")
    return before + label + after


@dataclass(frozen=True)
class LMTokens(TokenizedTexts):
    """Every example tokenized once, padded on the right to ``model.max_length_tokens``
    (:class:`fomo.trainer.TokenizedTexts` with per-token labels and the response mask).

    Attributes (N examples, L = max_length_tokens)
    ----------
    input_ids : (N, L) int64 tensor
    attention_mask : (N, L) int64 tensor, 1 on real tokens
    lengths_tokens : (N,) int64 array, real tokens per example (dynamic padding)
    labels : (N, L) int64 tensor, the token where the loss applies, -100 elsewhere
    response_mask : (N, L) bool tensor, True on the response tokens (EOS included)
    class_labels : (N,) int64 array, class index of each example
    """

    response_mask: torch.Tensor
    class_labels: np.ndarray

    def batch(self, examples: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, labels) of ``examples``, cut to the longest of them."""
        seq_len, index = self.seq_len(examples), torch.from_numpy(np.asarray(examples, dtype=np.int64))
        return (self.input_ids[index, :seq_len], self.attention_mask[index, :seq_len], self.labels[index, :seq_len])

    def responses(self, examples: np.ndarray) -> torch.Tensor:
        """Response mask of ``examples``, cut like :meth:`batch`."""
        index = torch.from_numpy(np.asarray(examples, dtype=np.int64))
        return self.response_mask[index, : self.seq_len(examples)]


def _ids(tokenizer: "PreTrainedTokenizerBase", text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def special_prefix(tokenizer: "PreTrainedTokenizerBase") -> list[int]:
    """Token ids the tokenizer puts before a text (BOS for Llama, none for GPT-2): those of
    ``tokenizer("x")`` before the ids of ``"x"`` alone, when the former ends with the latter."""
    with_special = list(tokenizer("x")["input_ids"])
    plain = _ids(tokenizer, "x")
    cut = len(with_special) - len(plain)
    return with_special[:cut] if cut > 0 and with_special[cut:] == plain else []


def tokenize_examples(tokenizer: "PreTrainedTokenizerBase", texts: list[str], class_labels: np.ndarray,
                      class_names: list[str], data_spec: "DataSpec", max_length_tokens: int) -> LMTokens:
    """Tokenize every example (module docstring). ValueError naming ``model.max_length_tokens``
    when the templates and the longest response leave no token for the text."""
    from fomo.trainer import truncated_texts

    if tokenizer.eos_token_id is None:
        raise ValueError("the decoder's tokenizer has no end-of-sequence token: causal-LM responses end with one")
    before, after = split_template(data_spec.prompt_template, "text")
    head = special_prefix(tokenizer) + _ids(tokenizer, before)
    tail = _ids(tokenizer, after)
    responses = [_ids(tokenizer, response_text(data_spec.response_template, name)) + [tokenizer.eos_token_id]
                 for name in class_names]
    fixed = len(head) + len(tail) + max(len(r) for r in responses)
    budget = max_length_tokens - fixed
    if budget < 1:
        raise ValueError(f"model.max_length_tokens={max_length_tokens} leaves no token for the text: the prompt "
                         f"template, the longest response and EOS take {fixed}; allowed: at least {fixed + 1}")
    text_ids = tokenizer(truncated_texts(tokenizer, list(texts), budget), add_special_tokens=False,
                         truncation=True, max_length=budget)["input_ids"]
    n = len(texts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = np.full((n, max_length_tokens), pad, dtype=np.int64)
    mask = np.zeros((n, max_length_tokens), dtype=np.int64)
    response = np.zeros((n, max_length_tokens), dtype=bool)
    labels = np.full((n, max_length_tokens), IGNORE_INDEX, dtype=np.int64)
    lengths = np.zeros(n, dtype=np.int64)
    for i, (body, label) in enumerate(zip(text_ids, np.asarray(class_labels))):
        prompt = head + list(body) + tail
        resp = responses[int(label)]
        seq = prompt + resp
        ids[i, :len(seq)] = seq
        mask[i, :len(seq)] = 1
        response[i, len(prompt):len(seq)] = True
        lengths[i] = len(seq)
    if data_spec.loss_on == "response":
        labels[response] = ids[response]
    else:
        labels[mask == 1] = ids[mask == 1]
    return LMTokens(torch.from_numpy(ids), torch.from_numpy(mask), lengths, torch.from_numpy(labels),
                    torch.from_numpy(response), np.asarray(class_labels, dtype=np.int64))
