"""The real model behind the fine-tuning service: one frozen foundation model, many tasks, many
prompts.

:class:`TaskTuner` loads the base model once, wraps it with the scenario's PEFT method (prompt
tuning by default for the service) and holds every task the service knows (the library's tasks
and the requests' tasks, all with one label set), each tokenized once and split into a pool of
labelled examples (what owners hold and upload) and a held-out test set (what measures a
request's accuracy). It serves the protocol :mod:`netsim.protocols.prompt_service` through:

* :meth:`TaskTuner.fresh_state` -- the initial PEFT state (soft prompt and classification head,
  drawn once from the run seed): the start of prompt tuning from scratch;
* :meth:`TaskTuner.start_job` -- a :class:`TuningJob`, real optimizer steps from a given state
  on given examples; jobs keep their own tensors and optimizer state, so jobs in different
  compute slots interleave on the timeline without disturbing each other;
* :meth:`TaskTuner.evaluate` -- accuracy of a state on a task's test set;
* :meth:`TaskTuner.library_probabilities` -- the class probabilities of P library states on some
  examples in one batched forward (:func:`fomo.prompt_ensemble.library_predictions`), with the
  counted FLOPs;
* FLOP and byte counts for the timeline: :meth:`TaskTuner.step_flops`,
  :meth:`TaskTuner.forward_flops`, :meth:`TaskTuner.example_bytes`,
  :meth:`TaskTuner.job_memory_bytes`.

Determinism: the PEFT initialisation comes from the run seed, each task's split from
``SeedSequence(seed, spawn_key=(43, crc32(task name)))`` (so it does not depend on which other
tasks the service holds); no other randomness is drawn here (the
protocol chooses which examples a request holds), and base-model dropout is off.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fomo import data as fdata
from fomo import models, profiling
from fomo import prompt_ensemble as pe
from fomo.tasks import balanced_accuracy, load_task
from fomo.trainer import EVAL_BATCH_SIZE, PeftState, TokenizedTexts, configure_threads, tokenize_all
from netsim.interfaces import EvalResult

if TYPE_CHECKING:  # pragma: no cover
    from netsim.scenario import Scenario

SPLIT_SPAWN_KEY = (43,)
"""A task's pool/test split: ``SeedSequence(seed, spawn_key=(43, crc32(name)))``."""

LABEL_BYTES = 1
"""Bytes of one uploaded label (a class index < 256)."""


@dataclass(frozen=True)
class TaskSplit:
    """One task's examples: indices into its tokenized texts."""

    name: str
    tokens: TokenizedTexts
    pool: np.ndarray     # labelled examples the owners hold (what requests draw from)
    test: np.ndarray     # held-out examples that measure accuracy


class TaskTuner:
    """One base model and the tasks of a fine-tuning service (see the module docstring).

    Parameters
    ----------
    scenario : netsim.scenario.Scenario
        Uses ``model``, ``peft``, ``training.optimizer`` and ``training.learning_rate``.
    seed : int
        Run seed (PEFT initialisation, task splits).
    tasks : sequence of str
        Registered task names (:mod:`fomo.tasks`), all with the same class names in the same
        order (the classification head is shared).
    test_examples : int
        Held-out test examples per task (at most a fifth of the task's examples).
    bytes_per_token : int
        Bytes of one uploaded token id (2 holds vocabularies up to 65,536).
    """

    def __init__(self, scenario: "Scenario", seed: int, tasks: Sequence[str], test_examples: int = 200,
                 bytes_per_token: int = 2) -> None:
        configure_threads()
        names = list(dict.fromkeys(tasks))
        if not names:
            raise ValueError("the service needs at least one task")
        self.seed = int(seed)
        self.bytes_per_token = int(bytes_per_token)
        self._optimizer_name = scenario.training.optimizer
        self._learning_rate = float(scenario.training.learning_rate)
        self._max_length_tokens = int(scenario.model.max_length_tokens)
        loaded = {name: load_task(name) for name in names}
        self.class_names = loaded[names[0]][2]
        for name in names[1:]:
            if loaded[name][2] != self.class_names:
                raise ValueError(f"task {name!r} has classes {loaded[name][2]}, task {names[0]!r} has "
                                 f"{self.class_names}: every task of the service must share one label set (one "
                                 f"classification head serves them all)")
        self.num_classes = len(self.class_names)
        torch.manual_seed(fdata.torch_init_seed(self.seed))
        tokenizer, base = models.load_base(scenario.model, self.num_classes)
        self.model = models.apply_peft(base, scenario.peft)
        self._trainable = models.trainable_parameters(self.model)
        self._fresh: PeftState = {n: p.detach().clone() for n, p in self._trainable}
        self._adapter_bytes = models.tensor_bytes(list(self._fresh.values()))
        self._weights_bytes = profiling.weights_bytes(self.model)
        self._weight_ptrs = profiling.storage_ptrs(self.model)
        self.tasks: dict[str, TaskSplit] = {}
        for name in names:
            texts, labels, _ = loaded[name]
            n_test = min(int(test_examples), len(texts) // 5)
            if n_test < 1:
                raise ValueError(f"task {name!r} has {len(texts)} examples: too few to hold out a test set")
            key = zlib.crc32(name.encode())   # by name: a task's split does not depend on the other tasks
            order = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(*SPLIT_SPAWN_KEY, key)))
            order = order.permutation(len(texts))
            self.tasks[name] = TaskSplit(name, tokenize_all(tokenizer, texts, labels, self._max_length_tokens),
                                         np.sort(order[n_test:]), np.sort(order[:n_test]))
        self._step_flops: dict[tuple[int, int], profiling.StepProfile] = {}
        self._forward_flops: dict[tuple[int, int], float] = {}

    # ---------------------------------------------------------------- sizes and costs
    def pool_size(self, task: str) -> int:
        """Labelled examples of ``task`` that owners can hold."""
        return int(len(self._split(task).pool))

    def adapter_bytes(self) -> int:
        """Size of one PEFT state (soft prompt + head) [bytes]."""
        return self._adapter_bytes

    def step_flops(self, task: str, examples: np.ndarray) -> float:
        """Counted FLOPs of one training step (forward + backward) on ``examples`` of ``task``
        at their dynamic-padding length (profiled once per shape)."""
        return self._profile(task, examples).flops

    def forward_flops(self, task: str, examples: np.ndarray) -> float:
        """Counted FLOPs of one forward pass of one state on ``examples`` of ``task``."""
        tokens = self._split(task).tokens
        shape = (len(examples), tokens.seq_len(examples))
        if shape not in self._forward_flops:
            input_ids, mask, _ = tokens.batch(np.asarray(examples))
            with torch.no_grad():
                self._forward_flops[shape] = profiling.counted_forward(self.model, input_ids, mask)[1]
        return self._forward_flops[shape]

    def example_bytes(self, task: str, examples: np.ndarray) -> int:
        """Bytes the owner uploads for ``examples``: real tokens x bytes_per_token + a label each."""
        lengths = self._split(task).tokens.lengths_tokens[np.asarray(examples)]
        return int(lengths.sum()) * self.bytes_per_token + LABEL_BYTES * len(examples)

    def worst_step_flops(self, batch_size: int) -> float:
        """FLOPs of one training step of ``batch_size`` examples at ``model.max_length_tokens``."""
        return self._profile_full_length(batch_size).flops

    def worst_forward_flops(self, batch_size: int) -> float:
        """FLOPs of one forward pass of ``batch_size`` examples at ``model.max_length_tokens``."""
        shape = (int(batch_size), self._max_length_tokens)
        if shape not in self._forward_flops:
            input_ids, mask, _ = self._full_length_batch(batch_size)
            with torch.no_grad():
                self._forward_flops[shape] = profiling.counted_forward(self.model, input_ids, mask)[1]
        return self._forward_flops[shape]

    def job_memory_bytes(self, batch_size: int) -> int:
        """Peak memory of a tuning job on one slot at the worst-case length
        ``model.max_length_tokens`` [bytes]: weights + trainable x (gradient + optimizer states)
        + saved activations (:func:`fomo.profiling.job_memory_bytes`)."""
        return profiling.job_memory_bytes(self._weights_bytes, self._adapter_bytes, self._optimizer_name,
                                          self._profile_full_length(batch_size).saved_activation_bytes)

    # ---------------------------------------------------------------- examples
    def draw_examples(self, task: str, count: int, rng: np.random.Generator) -> np.ndarray:
        """``count`` distinct labelled examples of ``task`` drawn with ``rng``, in random order (one owner's data; the order is the order of upload and of training)."""
        pool = self._split(task).pool
        if not 1 <= count <= len(pool):
            raise ValueError(f"task {task!r}: {count} labelled examples per request asked for; allowed: 1.."
                             f"{len(pool)} (the task's pool)")
        return rng.choice(pool, size=int(count), replace=False)

    def labels(self, task: str, examples: np.ndarray) -> np.ndarray:
        """Class indices of ``examples`` of ``task``."""
        return self._split(task).tokens.labels[torch.from_numpy(np.asarray(examples))].numpy()

    def test_labels(self, task: str) -> np.ndarray:
        """Class indices of ``task``'s test set (the order of :meth:`test_probabilities`)."""
        return self.labels(task, self._split(task).test)

    # ---------------------------------------------------------------- states
    def fresh_state(self) -> PeftState:
        """A copy of the initial PEFT state (from the run seed)."""
        return {n: t.clone() for n, t in self._fresh.items()}

    def start_job(self, task: str, init: PeftState) -> "TuningJob":
        """A tuning job for ``task`` from a copy of ``init``, with a fresh optimizer."""
        return TuningJob(self, task, init)

    def evaluate(self, state: PeftState, task: str) -> EvalResult:
        """Accuracy, balanced accuracy and mean cross-entropy of ``state`` on ``task``'s test set."""
        probabilities = self.test_probabilities([state], task)[0]
        return self._eval_result(probabilities, task)

    def evaluate_mixture(self, probabilities: np.ndarray, weights: np.ndarray, task: str) -> EvalResult:
        """The same for a mixture sum_i w_i p_i of test-set probabilities (P, n_test, C)."""
        return self._eval_result(pe.mixture(weights, probabilities), task)

    def test_probabilities(self, states: Sequence[PeftState], task: str) -> np.ndarray:
        """Class probabilities (P, n_test, C) of each state on ``task``'s test set, in batches of
        64 (one batched forward over the P states per batch)."""
        split = self._split(task)
        parts = []
        for start in range(0, len(split.test), EVAL_BATCH_SIZE):
            examples = split.test[start:start + EVAL_BATCH_SIZE]
            input_ids, mask, _ = split.tokens.batch(examples)
            parts.append(pe.library_predictions(self, list(states), input_ids, mask)[0])
        return np.concatenate(parts, axis=1)

    def library_probabilities(self, states: Sequence[PeftState], task: str,
                              examples: np.ndarray) -> tuple[np.ndarray, float]:
        """Class probabilities (P, B, C) of the P ``states`` on ``examples`` of ``task`` (one
        batched forward) and the counted FLOPs (P forwards)."""
        input_ids, mask, _ = self._split(task).tokens.batch(np.asarray(examples))
        return pe.library_predictions(self, list(states), input_ids, mask)

    def mixed_state(self, states: Sequence[PeftState], weights: np.ndarray) -> PeftState:
        """sum_i w_i state_i (:func:`fomo.prompt_ensemble.mixed_prompt`)."""
        return pe.mixed_prompt(list(states), weights)

    def task_embedding(self, state: PeftState) -> np.ndarray:
        """The task embedding of a state (float64): its soft prompt averaged over the virtual
        tokens, e = (1/T) sum_t P_t (SPoT, Vu et al. 2022), of the model's width; for a PEFT
        method without a soft prompt, every trainable tensor flattened and concatenated (in
        name order)."""
        prompts = [name for name in sorted(state) if "prompt_encoder" in name]
        if prompts:
            return state[prompts[0]].detach().to(torch.float64).mean(dim=0).numpy()
        return torch.cat([state[name].detach().to(torch.float64).reshape(-1) for name in sorted(state)]).numpy()

    def text_embedding(self, task: str, examples: np.ndarray) -> tuple[np.ndarray, float]:
        """The centroid of ``examples``' sentence embeddings under the frozen base model (each
        example's last hidden states averaged over its real tokens, then averaged over the
        examples; float64), and its cost: one counted forward pass of the model per batch of 64
        (:meth:`forward_flops`, which includes the soft prompt's virtual tokens: a slight upper
        bound). A task embedding that needs no tuning, at the price of sharing a summary of the
        texts."""
        split = self._split(task)
        classifier = self.model.get_base_model()
        encoder = getattr(classifier, classifier.base_model_prefix)
        examples = np.asarray(examples)
        total, flops = None, 0.0
        for start in range(0, len(examples), EVAL_BATCH_SIZE):
            part = examples[start:start + EVAL_BATCH_SIZE]
            input_ids, mask, _ = split.tokens.batch(part)
            with torch.no_grad():
                hidden = encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state.to(torch.float64)
            weights = mask.unsqueeze(-1).to(torch.float64)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
            total = pooled.sum(dim=0) if total is None else total + pooled.sum(dim=0)
            flops += self.forward_flops(task, part)
        return (total / len(examples)).numpy(), flops

    def online_ensemble(self, learner: str, num_entries: int, horizon: int, loss: str = "log") -> "OnlineEnsemble":
        """An :class:`OnlineEnsemble` over ``num_entries`` library entries."""
        return OnlineEnsemble(learner, num_entries, self.num_classes, horizon, loss)

    # ---------------------------------------------------------------- internals
    def _full_length_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        split = next(iter(self.tasks.values()))
        index = torch.from_numpy(np.resize(split.pool, int(batch_size)))
        t = split.tokens
        return t.input_ids[index], t.attention_mask[index], t.labels[index]

    def _profile_full_length(self, batch_size: int) -> profiling.StepProfile:
        shape = (int(batch_size), self._max_length_tokens)
        if shape not in self._step_flops:
            self._step_flops[shape] = profiling.count_step_flops(self.model, *self._full_length_batch(batch_size),
                                                                 self._weight_ptrs)
        return self._step_flops[shape]

    def _split(self, task: str) -> TaskSplit:
        try:
            return self.tasks[task]
        except KeyError:
            raise ValueError(f"task {task!r} is not one of the service's tasks {sorted(self.tasks)}") from None

    def _eval_result(self, probabilities: np.ndarray, task: str) -> EvalResult:
        split = self._split(task)
        truth = self.labels(task, split.test)
        predicted = probabilities.argmax(axis=1)
        picked = np.clip(probabilities[np.arange(len(truth)), truth], 1e-300, None)
        return EvalResult(accuracy=float(np.mean(predicted == truth)), loss=float(-np.log(picked).mean()),
                          flops=0.0, num_examples=len(truth),
                          balanced_accuracy=balanced_accuracy(truth, predicted, self.num_classes))

    def _profile(self, task: str, examples: np.ndarray) -> profiling.StepProfile:
        tokens = self._split(task).tokens
        examples = np.asarray(examples)
        shape = (len(examples), tokens.seq_len(examples))
        if shape not in self._step_flops:
            self._step_flops[shape] = profiling.count_step_flops(self.model, *tokens.batch(examples),
                                                                 self._weight_ptrs)
        return self._step_flops[shape]

    def _make_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        if self._optimizer_name == "adamw":
            return torch.optim.AdamW(params, lr=self._learning_rate)
        if self._optimizer_name == "sgd":
            return torch.optim.SGD(params, lr=self._learning_rate)
        raise ValueError(f"training.optimizer={self._optimizer_name!r} is not supported")


class TuningJob:
    """Real optimizer steps for one request: its own copy of the PEFT tensors and its own
    optimizer. A step loads the job's tensors into the shared model, runs forward and backward
    there, moves the gradients onto the job's tensors and steps the job's optimizer: the same
    arithmetic as training the model's parameters directly."""

    def __init__(self, tuner: TaskTuner, task: str, init: PeftState) -> None:
        self.tuner = tuner
        self.task = task
        tuner._split(task)
        self.params = {n: init[n].detach().clone().requires_grad_(True) for n, _ in tuner._trainable}
        self.optimizer = tuner._make_optimizer(list(self.params.values()))
        self.steps = 0

    def step(self, examples: np.ndarray) -> float:
        """One optimizer step on ``examples``; returns the batch's mean cross-entropy."""
        tuner = self.tuner
        input_ids, mask, labels = tuner._split(self.task).tokens.batch(np.asarray(examples))
        with torch.no_grad():
            for name, param in tuner._trainable:
                param.copy_(self.params[name])
        for _, param in tuner._trainable:
            param.grad = None
        loss = F.cross_entropy(profiling.classification_logits(tuner.model, input_ids, mask), labels)
        loss.backward()
        for name, param in tuner._trainable:
            self.params[name].grad = param.grad
            param.grad = None
        self.optimizer.step()
        self.steps += 1
        return float(loss.detach())

    def state(self) -> PeftState:
        """A copy of the job's current PEFT state."""
        return {n: t.detach().clone() for n, t in self.params.items()}


class OnlineEnsemble:
    """Ensemble weights over P library entries learned from labelled batches, test then train
    (:func:`fomo.prompt_ensemble.prequential`): ``hedge`` (anytime learning rate, bounded
    per-entry ``loss`` per example, or ``balanced_error`` per batch) or ``exponentiated_gradient``
    (the mixture's log loss, learning rate tuned to ``horizon`` examples)."""

    def __init__(self, learner: str, num_entries: int, num_classes: int, horizon: int, loss: str = "log") -> None:
        self.loss = loss
        if learner == "hedge":
            self.learner = pe.Hedge(num_entries)
        elif learner == "exponentiated_gradient":
            self.learner = pe.ExponentiatedGradient(num_entries, num_classes, horizon=max(int(horizon), 1))
        else:
            raise ValueError(f"prompt_service.ensemble.learner={learner!r}; allowed: 'hedge', "
                             f"'exponentiated_gradient'")

    @property
    def weights(self) -> np.ndarray:
        """The weights for the next example (P,): uniform before the first."""
        return self.learner.weights

    def observe(self, probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Predict each example of the (P, B, C) batch with the current weights, then learn its
        label (loss ``balanced_error``: learn the batch as one round, entry i's loss
        1 - its balanced accuracy on the batch, in [0, 1]); returns whether the mixture was
        right, (B,)."""
        if self.loss != "balanced_error":
            return pe.prequential(self.learner, probabilities, labels, loss=self.loss).correct
        p = pe.check_predictions(probabilities)
        y = pe.check_labels(labels, p.shape[1], p.shape[2])
        correct = pe.mixture(self.learner.weights, p).argmax(axis=1) == y
        self.learner.update([1.0 - balanced_accuracy(y, entry.argmax(axis=1), p.shape[2]) for entry in p])
        return correct
