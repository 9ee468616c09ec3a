"""The real trainer: PEFT fine-tuning of a pre-trained transformer, one device at a time.

:class:`PeftTrainer` implements :class:`netsim.interfaces.Trainer`. It holds the global PEFT
state (the trainable tensors: adapter + classification head) and one base model. A local job
loads the global state into the model, runs ``job.steps`` real AdamW/SGD steps on batches drawn
from the device's own data, and returns local minus global as the update. FLOPs and memory come
from :mod:`fomo.profiling`, profiled once per (batch_size, seq_len) shape and cached.

Determinism: all randomness comes from the run seed (see :mod:`fomo.data`), base-model dropout
is off, so the same calls in the same order give bit-identical numbers.

Threads: ``torch.set_num_threads`` is called only if the environment variable
``DEFTSIM_TORCH_THREADS`` is set.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fomo import data as fdata
from fomo import models, profiling
from fomo.profiling import StepProfile
from netsim.interfaces import EvalResult, LocalJob, LocalResult

if TYPE_CHECKING:  # pragma: no cover
    from netsim.scenario import Scenario
    from transformers import PreTrainedTokenizerBase

EVAL_BATCH_SIZE = 64
CHARS_PER_TOKEN_BOUND = 12  # texts are cut near 12 characters per wanted token
THREADS_ENV = "DEFTSIM_TORCH_THREADS"

PeftState = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TokenizedTexts:
    """Every text tokenized once, padded to ``max_length_tokens``.

    Attributes
    ----------
    input_ids : (num_texts, max_length_tokens) int64 tensor
    attention_mask : (num_texts, max_length_tokens) int64 tensor
    lengths_tokens : (num_texts,) int64 array, real tokens per text (for dynamic padding)
    labels : (num_texts,) int64 tensor of class indices
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths_tokens: np.ndarray
    labels: torch.Tensor

    def batch(self, examples: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, labels) of the given example indices, cut to the longest
        example among them (dynamic padding; padding is on the right)."""
        seq_len = int(self.lengths_tokens[examples].max())
        index = torch.from_numpy(examples)
        return (
            self.input_ids[index, :seq_len],
            self.attention_mask[index, :seq_len],
            self.labels[index],
        )


def _cut_at_whitespace(text: str, max_chars: int) -> str:
    """``text`` cut at the last space or newline before ``max_chars`` characters (unchanged if
    it is shorter or has no such whitespace)."""
    if len(text) <= max_chars:
        return text
    cut = max(text.rfind(" ", 0, max_chars), text.rfind("\n", 0, max_chars))
    return text[:cut] if cut > 0 else text


def truncated_texts(
    tokenizer: "PreTrainedTokenizerBase", texts: list[str], max_length_tokens: int
) -> list[str]:
    """Texts shortened for fast tokenization without changing their first tokens.

    Long texts are cut at a whitespace after about ``CHARS_PER_TOKEN_BOUND * max_length_tokens``
    characters; a cut text is kept only if it still yields at least ``max_length_tokens`` tokens
    (otherwise the full text is used). Tokenizers split text into words before sub-word
    tokenization, so the kept prefix tokenizes to the same first ``max_length_tokens`` tokens
    as the full text (checked against full tokenization in the tests)."""
    max_chars = CHARS_PER_TOKEN_BOUND * max_length_tokens
    cut = [_cut_at_whitespace(t, max_chars) for t in texts]
    shortened = [i for i, (c, t) in enumerate(zip(cut, texts)) if len(c) < len(t)]
    if not shortened:
        return cut
    counts = tokenizer(
        [cut[i] for i in shortened],
        add_special_tokens=False,
        truncation=True,
        max_length=max_length_tokens,
    )["input_ids"]
    for i, ids in zip(shortened, counts):
        if len(ids) < max_length_tokens:
            cut[i] = texts[i]
    return cut


def tokenize_all(
    tokenizer: "PreTrainedTokenizerBase", texts: list[str], labels: np.ndarray, max_length_tokens: int
) -> TokenizedTexts:
    """Tokenize all texts once (truncation and right padding to ``max_length_tokens``)."""
    tokenizer.padding_side = "right"  # dynamic padding cuts the padding columns on the right
    encoded = tokenizer(
        truncated_texts(tokenizer, texts, max_length_tokens),
        truncation=True,
        max_length=max_length_tokens,
        padding="max_length",
        return_tensors="pt",
    )
    mask = encoded["attention_mask"].to(torch.int64)
    return TokenizedTexts(
        input_ids=encoded["input_ids"].to(torch.int64).contiguous(),
        attention_mask=mask.contiguous(),
        lengths_tokens=mask.sum(dim=1).numpy().astype(np.int64),
        labels=torch.from_numpy(np.asarray(labels, dtype=np.int64)),
    )


def configure_threads() -> None:
    """Apply ``DEFTSIM_TORCH_THREADS`` (if set) to ``torch.set_num_threads``."""
    value = os.environ.get(THREADS_ENV)
    if value:
        threads = int(value)
        if threads < 1:
            raise ValueError(f"{THREADS_ENV}={value!r} must be a positive integer")
        torch.set_num_threads(threads)


class PeftTrainer:
    """Real PEFT trainer for the co-simulator (see :class:`netsim.interfaces.Trainer`).

    Parameters
    ----------
    scenario : netsim.scenario.Scenario
        Uses ``model``, ``peft``, ``data``, ``training`` and ``num_devices``.
    seed : int
        Run seed: data split/partition, batch sampling and PEFT initialisation.

    Attributes
    ----------
    num_classes : int
    class_names : list[str]
    model : the PEFT-wrapped model (holds the global state outside :meth:`local_train`)
    """

    def __init__(self, scenario: "Scenario", seed: int) -> None:
        configure_threads()
        self.seed = int(seed)
        self._optimizer_name = scenario.training.optimizer
        self._learning_rate = float(scenario.training.learning_rate)
        self._max_length_tokens = int(scenario.model.max_length_tokens)

        texts, labels, self.class_names = fdata.load_texts(scenario.data)
        self.num_classes: int = len(self.class_names)
        train_idx, test_idx, parts = fdata.split_and_partition(
            labels, scenario.data, scenario.num_devices, self.seed
        )
        self._train_examples: np.ndarray = train_idx
        self._device_examples: list[np.ndarray] = [train_idx[p] for p in parts]
        self._test_examples: np.ndarray = test_idx[: scenario.data.max_test_examples]
        self._device_rngs = [fdata.device_rng(self.seed, d) for d in range(len(parts))]

        torch.manual_seed(fdata.torch_init_seed(self.seed))
        tokenizer, base = models.load_base(scenario.model, self.num_classes)
        self.model = models.apply_peft(base, scenario.peft)
        self._tokens = tokenize_all(tokenizer, texts, labels, self._max_length_tokens)

        self._trainable = models.trainable_parameters(self.model)
        self._global: PeftState = {n: p.detach().clone() for n, p in self._trainable}
        self._adapter_bytes = models.tensor_bytes(list(self._global.values()))
        self._weights_bytes = profiling.weights_bytes(self.model)
        self._weight_ptrs = profiling.storage_ptrs(self.model)
        self._step_profiles: dict[tuple[int, int], StepProfile] = {}
        self._eval_flops: dict[tuple[int, int], float] = {}

    # ---------------------------------------------------------------- sizes
    def num_devices(self) -> int:
        """Number of devices whose data the trainer holds."""
        return len(self._device_examples)

    def device_num_examples(self, device_id: int) -> int:
        """Local training-set size of a device [examples]."""
        return int(len(self._device_examples[device_id]))

    def adapter_bytes(self) -> int:
        """Size of the global PEFT state (adapter + classification head) [bytes]."""
        return self._adapter_bytes

    def job_memory_bytes(self, batch_size: int) -> int:
        """Peak memory of a local job of this batch size at the worst-case sequence length
        ``model.max_length_tokens`` [bytes] (profiled once per batch size, model unchanged)."""
        shape = (int(batch_size), self._max_length_tokens)
        if shape not in self._step_profiles:
            examples = np.resize(self._train_examples, batch_size)
            input_ids, mask, labels = self._full_length_batch(examples)
            self._step_profiles[shape] = profiling.count_step_flops(
                self.model, input_ids, mask, labels, self._weight_ptrs
            )
        return self._memory_of(self._step_profiles[shape])

    def global_state(self) -> PeftState:
        """A copy of the global PEFT state (name -> tensor)."""
        return {n: t.clone() for n, t in self._global.items()}

    # ---------------------------------------------------------------- training
    def local_train(self, jobs: Sequence[LocalJob]) -> list[LocalResult]:
        """Run the jobs one after another, each from the current global state; the model holds
        the global state again afterwards."""
        results = [self._run_job(job) for job in jobs]
        self._load_state(self._global)
        return results

    def aggregate(self, results: Sequence[LocalResult], weights: Sequence[float]) -> None:
        """global <- global + sum_k weights[k] * update_k, summed in the given order."""
        if len(results) != len(weights):
            raise ValueError(f"{len(results)} results but {len(weights)} weights")
        new_state: PeftState = {}
        for name, tensor in self._global.items():
            total = tensor.clone()
            for result, weight in zip(results, weights):
                total.add_(result.update[name], alpha=float(weight))
            new_state[name] = total
        self._global = new_state
        self._load_state(self._global)

    def evaluate(self) -> EvalResult:
        """Accuracy and mean cross-entropy of the global model on the first
        ``data.max_test_examples`` test examples (batches of 64, forward FLOPs counted once per
        shape)."""
        self._load_state(self._global)
        self.model.eval()
        correct, loss_sum, flops = 0, 0.0, 0.0
        try:
            with torch.no_grad():
                for start in range(0, len(self._test_examples), EVAL_BATCH_SIZE):
                    examples = self._test_examples[start:start + EVAL_BATCH_SIZE]
                    input_ids, mask, labels = self._tokens.batch(examples)
                    logits, batch_flops = self._eval_forward(input_ids, mask)
                    flops += batch_flops
                    loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
                    correct += int((logits.argmax(dim=-1) == labels).sum())
        finally:
            self.model.train()
        n = len(self._test_examples)
        return EvalResult(accuracy=correct / n, loss=loss_sum / n, flops=flops, num_examples=n)

    # ---------------------------------------------------------------- internals
    def _run_job(self, job: LocalJob) -> LocalResult:
        """One device's local training from the global state."""
        self._load_state(self._global)
        torch.manual_seed(fdata.job_torch_seed(self.seed, job.device_id, job.round))
        optimizer = self._make_optimizer()
        losses: list[torch.Tensor] = []
        flops, saved_bytes = 0.0, 0
        for _ in range(job.steps):
            examples = self._sample_batch(job.device_id, job.batch_size)
            loss, profile = self._train_step(optimizer, *self._tokens.batch(examples))
            losses.append(loss)
            flops += profile.flops
            saved_bytes = max(saved_bytes, profile.saved_activation_bytes)
        update = {n: p.detach() - self._global[n] for n, p in self._trainable}
        return LocalResult(
            device_id=job.device_id,
            update=update,
            num_examples=self.device_num_examples(job.device_id),
            loss=float(torch.stack(losses).mean()) if losses else float("nan"),
            flops=flops,
            peak_memory_bytes=self._memory_of(StepProfile(0.0, saved_bytes)),
            update_bytes=self._adapter_bytes,
        )

    def _train_step(
        self,
        optimizer: torch.optim.Optimizer,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        labels: torch.Tensor,
    ) -> tuple[torch.Tensor, StepProfile]:
        """One optimizer step; the first step of each (batch, seq_len) shape runs under the
        profiler (same numerics), later ones reuse its profile."""
        shape = (int(input_ids.shape[0]), int(input_ids.shape[1]))
        optimizer.zero_grad(set_to_none=True)
        profile = self._step_profiles.get(shape)
        if profile is None:
            loss, profile = profiling.profiled_forward_backward(
                self.model, input_ids, mask, labels, self._weight_ptrs
            )
            self._step_profiles[shape] = profile
        else:
            loss = profiling.classification_loss(self.model, input_ids, mask, labels)
            loss.backward()
            loss = loss.detach()
        optimizer.step()
        return loss, profile

    def _eval_forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Logits of an evaluation batch and its forward FLOPs (counted once per shape)."""
        shape = (int(input_ids.shape[0]), int(input_ids.shape[1]))
        if shape not in self._eval_flops:
            logits, self._eval_flops[shape] = profiling.counted_forward(self.model, input_ids, mask)
            return logits, self._eval_flops[shape]
        return profiling.classification_logits(self.model, input_ids, mask), self._eval_flops[shape]

    def _sample_batch(self, device_id: int, batch_size: int) -> np.ndarray:
        """Example indices of one batch from the device's data: without replacement, or with
        replacement if the device has fewer examples than ``batch_size``."""
        examples = self._device_examples[device_id]
        rng = self._device_rngs[device_id]
        picks = rng.choice(len(examples), size=batch_size, replace=batch_size > len(examples))
        return examples[picks]

    def _full_length_batch(self, examples: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch padded to ``model.max_length_tokens`` (the worst-case shape)."""
        index = torch.from_numpy(np.asarray(examples, dtype=np.int64))
        return (
            self._tokens.input_ids[index],
            self._tokens.attention_mask[index],
            self._tokens.labels[index],
        )

    def _make_optimizer(self) -> torch.optim.Optimizer:
        """A fresh optimizer over the trainable parameters (no state carried across jobs)."""
        params = [p for _, p in self._trainable]
        if self._optimizer_name == "adamw":
            return torch.optim.AdamW(params, lr=self._learning_rate)
        if self._optimizer_name == "sgd":
            return torch.optim.SGD(params, lr=self._learning_rate)
        raise ValueError(f"training.optimizer={self._optimizer_name!r} is not supported")

    def _load_state(self, state: PeftState) -> None:
        """Copy a PEFT state into the model's trainable parameters."""
        with torch.no_grad():
            for name, param in self._trainable:
                param.copy_(state[name])

    def _memory_of(self, profile: StepProfile) -> int:
        """Job memory for a step profile [bytes] (see :func:`fomo.profiling.job_memory_bytes`)."""
        return profiling.job_memory_bytes(
            self._weights_bytes,
            self._adapter_bytes,
            self._optimizer_name,
            profile.saved_activation_bytes,
        )
