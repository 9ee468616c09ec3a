"""The real trainer: PEFT fine-tuning of a pre-trained transformer.

:class:`PeftTrainer` implements :class:`netsim.interfaces.Trainer`. It holds the global PEFT
state (the trainable tensors: adapter + classification head) and one base model. A local job
loads the global state into the model, runs ``job.steps`` real AdamW/SGD steps on batches drawn
from the device's own data, and returns local minus global as the update. FLOPs and memory come
from :mod:`fomo.profiling`, profiled once per (batch_size, seq_len) shape and cached.

Execution strategies (``scenario.execution``; they never change the simulated timeline):

* ``sequential``: one job after another;
* ``batched``: the jobs of a call that share (steps, batch_size) run together, up to
  ``max_devices_per_pass`` at a time, as one forward/backward per step with per-device LoRA
  tensors and optimizer state (:mod:`fomo.batched`);
* ``activation_cache_bytes > 0``: the frozen lower blocks' output is cached per example
  (:mod:`fomo.prefix_cache`), for training and evaluation.

Every device still reports the FLOPs and saved activations of its own uncached step of its own
shape, so the simulated timeline is the same for every strategy.

Device and precision (``execution.device``, ``execution.precision``; :mod:`fomo.execution`):
the one frozen model and the per-device trainable tensors live on the resolved device (CPU or a
CUDA GPU), each step's batch is moved there once, and ``bf16`` runs every forward pass under
``torch.autocast`` with float32 parameters, gradients and optimizer state. The global state,
updates, losses and evaluation results stay on the CPU (float32 tensors, Python floats), and
every step profile is taken outside autocast on a float32 CPU model (with a GPU: a CPU replica
used only for profiling), so the timeline does not depend on either setting.

Shared base, per-device state only while active: there is one model whatever the device count;
a device's data indices are a slice of the partition, its batch-sampling generator is created
on its first job, and its PEFT tensors and optimizer state exist only during its job (the
update it returns lives until :meth:`PeftTrainer.aggregate`).

Determinism: all randomness comes from the run seed (see :mod:`fomo.data`), base-model dropout
is off, so the same calls in the same order give bit-identical numbers.

Threads: ``torch.set_num_threads`` is called only if the environment variable
``DEFTSIM_TORCH_THREADS`` is set; ``deftsim run`` and ``deftsim sweep`` set it (the thread policy
of :mod:`deftsim.threads`) before the trainer is built.
"""
from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fomo import batched as fbatched
from fomo import data as fdata
from fomo import execution as fexec
from fomo import models, profiling
from fomo.last_block import probe_last_block, pruned
from fomo.prefix_cache import ActivationCache, find_frozen_prefix
from fomo.tasks import balanced_accuracy
from fomo.profiling import StepProfile
from netsim.interfaces import EvalResult, JobCost, LocalJob, LocalResult, PlannedJob

if TYPE_CHECKING:  # pragma: no cover
    from fomo.cost_model import CostModel
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

    def seq_len(self, examples: np.ndarray) -> int:
        """Tokens of the longest of ``examples`` (the dynamic-padding length of their batch)."""
        return int(self.lengths_tokens[examples].max())

    def padded(self, examples: np.ndarray) -> bool:
        """Whether the batch of ``examples`` has padding (some example is shorter than the
        longest): its attention mask is then applied, otherwise transformers drops it."""
        lengths = self.lengths_tokens[examples]
        return bool(lengths.min() < lengths.max())

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
    strategy : str
        The execution strategy in use: ``"batched"`` or ``"sequential"`` (``"sequential"``
        when batched was asked for but does not apply; ``execution_notes`` says why).
    activation_cache : ActivationCache or None
        The frozen-prefix cache, if asked for and applicable.
    pruned_block : torch.nn.Module or None
        The last transformer block, computed at position 0 only (``execution.prune_last_block``,
        :mod:`fomo.last_block`), if asked for and applicable.
    execution_notes : list[str]
        Why an asked-for strategy, cache or pruning does not apply (empty if everything applies).
    placement : fomo.execution.Placement
        Where the steps run and in what precision (``execution.device``/``precision``;
        ``placement.record()`` for a run's record, ``placement.note`` says what ``auto`` chose).
    """

    SUPPORTS_PLACEMENT = True
    """Whether this class runs ``execution.device`` other than cpu and ``precision`` other than
    fp32. Read from the class itself, not inherited: a subclass that trains through other code
    paths declares it once it moves its batches and autocasts its forwards (see
    :meth:`_resolve_placement`)."""

    def __init__(self, scenario: "Scenario", seed: int) -> None:
        configure_threads()
        self.placement = self._resolve_placement(scenario)
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
        # batch-sampling generators, created on a device's first job (see _device_rng)
        self._device_rngs: dict[int, np.random.Generator] = {}

        torch.manual_seed(fdata.torch_init_seed(self.seed))
        tokenizer, base = self._load_model(scenario)
        self._model_name = self._model_label(scenario)
        self._base_parameters = int(sum(p.numel() for p in base.parameters()))
        self.model = self._training_model(scenario, base)
        self._tokens = self._tokenize(tokenizer, texts, labels, scenario)

        self._trainable = models.trainable_parameters(self.model)
        self._global: PeftState = {n: p.detach().clone() for n, p in self._trainable}
        self._adapter_bytes = models.tensor_bytes(list(self._global.values()))
        self._weights_bytes = profiling.weights_bytes(self.model)
        self._weight_ptrs = profiling.storage_ptrs(self.model)
        self._step_profiles: dict[tuple[int, int, bool], StepProfile] = {}
        self._eval_flops: dict[tuple[int, int], float] = {}
        self.cost_model = self._cost_model(scenario)
        if self.cost_model is not None:
            self._adapter_bytes = self.cost_model.payload_bytes
        self._configure_execution(scenario)
        self._place_model()

    def _resolve_placement(self, scenario: "Scenario") -> fexec.Placement:
        """``scenario.execution``'s device and precision (:func:`fomo.execution.resolve`);
        ``ValueError`` naming the field if they cannot run here or in this trainer class."""
        placement = fexec.resolve(scenario.execution)
        if placement.is_default or type(self).__dict__.get("SUPPORTS_PLACEMENT", False):
            return placement
        if placement.requested_device == "auto" and placement.precision == "fp32":
            return fexec.Placement("auto", torch.device("cpu"), "fp32",
                                   f"execution.device=auto resolved to cpu ({type(self).__name__} runs on cpu only)")
        raise ValueError(
            f"execution.device={scenario.execution.device!r}, execution.precision={scenario.execution.precision!r}: "
            f"{type(self).__name__} runs on the CPU in float32 only; allowed: execution.device cpu (or auto), "
            "execution.precision fp32")

    def _place_model(self) -> None:
        """Move the model to the placement's device (nothing to do on the CPU). Off the CPU the
        step profiles need a float32 CPU model: a replica of the model is kept for them alone,
        and the weights excluded from saved activations are the replica's."""
        self._cpu_replica: torch.nn.Module | None = None
        if self.placement.on_cpu:
            return
        self._cpu_replica = copy.deepcopy(self.model)
        self._weight_ptrs = profiling.storage_ptrs(self._cpu_replica)
        self.placement.place_model(self.model)
        self._trainable = models.trainable_parameters(self.model)

    def _profile_model(self) -> torch.nn.Module:
        """The float32 CPU model that step profiles and FLOP counts run on: the model itself on
        the CPU (profiled outside autocast), its CPU replica when the steps run on a GPU."""
        return self.model if self._cpu_replica is None else self._cpu_replica

    def _load_model(self, scenario: "Scenario") -> tuple["PreTrainedTokenizerBase", torch.nn.Module]:
        """(tokenizer, base model) of ``model.path``: a sequence-classification checkpoint with a
        fresh head of ``num_classes`` outputs. Subclasses load other models (a decoder)."""
        return models.load_base(scenario.model, self.num_classes)

    def _model_label(self, scenario: "Scenario") -> str:
        """The trained model's name in ``summary.json`` (its folder, or the default's name)."""
        return scenario.model.path or "all-MiniLM-L6-v2"

    def _tokenize(self, tokenizer: "PreTrainedTokenizerBase", texts: list[str], labels: np.ndarray,
                  scenario: "Scenario") -> TokenizedTexts:
        """Every text tokenized once (:func:`tokenize_all`); subclasses build other examples."""
        return tokenize_all(tokenizer, texts, labels, self._max_length_tokens)

    def _training_model(self, scenario: "Scenario", base: torch.nn.Module) -> torch.nn.Module:
        """The model the devices train: the base wrapped with the ``peft`` section's method.
        Subclasses that train something else (an emulator, a split model) override this; its
        parameters with ``requires_grad`` are the PEFT state."""
        return models.apply_peft(base, scenario.peft)

    def _cost_model(self, scenario: "Scenario") -> "CostModel | None":
        """``model.cost_model``: the architecture whose counted FLOPs, memory and payload drive
        the timeline instead of the trained model's (:mod:`fomo.cost_model`); None when not set."""
        from fomo.cost_model import scenario_cost_model

        return scenario_cost_model(scenario, self.num_classes)

    def _configure_execution(self, scenario: "Scenario") -> None:
        """Choose the execution strategy and the activation cache (``scenario.execution``)."""
        spec = scenario.execution
        self.execution_notes: list[str] = []
        self.strategy = "sequential"
        self._max_devices_per_pass = int(spec.max_devices_per_pass)
        if spec.strategy == "batched":
            reason = fbatched.unsupported_reason(self.model, scenario.peft.method, float(scenario.peft.dropout))
            if reason is None:
                self.strategy = "batched"
            else:
                self.execution_notes.append(f"execution.strategy=batched not applied: {reason}")
        self.activation_cache: ActivationCache | None = None
        if spec.activation_cache_bytes > 0:
            probe = self._train_examples[:1]
            input_ids, mask, _ = self._tokens.batch(probe)
            prefix, reason = find_frozen_prefix(self.model, input_ids, mask)
            if prefix is None:
                self.execution_notes.append(f"execution.activation_cache_bytes not applied: {reason}")
            else:
                self.activation_cache = ActivationCache(
                    self.model, prefix, self._tokens.batch, self._tokens.lengths_tokens,
                    spec.activation_cache_bytes,
                )
        self.pruned_block: torch.nn.Module | None = None
        if spec.prune_last_block:
            self.pruned_block, reason = probe_last_block(self.model, self._tokens, self._train_examples)
            if self.pruned_block is None:
                self.execution_notes.append(f"execution.prune_last_block not applied: {reason}")
        for note in self.execution_notes:  # results are unaffected: say so, don't fail
            warnings.warn(note, RuntimeWarning, stacklevel=3)

    # ---------------------------------------------------------------- sizes
    def num_devices(self) -> int:
        """Number of devices whose data the trainer holds."""
        return len(self._device_examples)

    def device_num_examples(self, device_id: int) -> int:
        """Local training-set size of a device [examples]."""
        return int(len(self._device_examples[device_id]))

    def adapter_bytes(self) -> int:
        """Size of the global PEFT state (adapter + classification head) [bytes]; with
        ``model.cost_model``, the cost model's (what the timeline uploads)."""
        return self._adapter_bytes

    def job_memory_bytes(self, batch_size: int) -> int:
        """Peak memory of a local job of this batch size at the worst-case sequence length
        ``model.max_length_tokens`` [bytes] (profiled once per batch size, model unchanged; with
        ``model.cost_model``, the cost model's)."""
        if self.cost_model is not None:
            shape = self._worst_case_shape(batch_size)[1]
            return self.cost_model.job_memory_bytes(self.cost_model.profile(*shape))
        return self._memory_of(self._trained_step_profile(batch_size))

    def _worst_case_shape(self, batch_size: int) -> tuple[np.ndarray, tuple[int, int, bool]]:
        """(examples, (batch, tokens, padded)) of the worst-case batch of :meth:`job_memory_bytes`:
        the first training examples, every one cut or padded to ``model.max_length_tokens``."""
        examples = np.resize(self._train_examples, batch_size)
        padded = bool(self._tokens.lengths_tokens[examples].min() < self._max_length_tokens)
        return examples, (int(batch_size), self._max_length_tokens, padded)

    def cost_report(self, batch_size: int) -> dict:
        """Where the timeline's costs come from, for ``summary.json``: ``costs_from`` is
        ``trained_model`` or ``cost_model``; ``trained_model`` holds the model actually trained
        and, with ``model.cost_model``, ``cost_model`` the counted costs of that architecture,
        each {name, parameters, flops_per_step, peak_memory_bytes, payload_bytes} of one step of
        ``batch_size`` examples at ``model.max_length_tokens``. Accuracy always comes from the
        trained model."""
        step = self._trained_step_profile(batch_size)
        payload = models.tensor_bytes(list(self._global.values()))
        memory = profiling.job_memory_bytes(self._weights_bytes, payload, self._optimizer_name,
                                            step.saved_activation_bytes)
        trained = {"name": self._model_name, "parameters": self._base_parameters, "flops_per_step": step.flops,
                   "peak_memory_bytes": int(memory), "payload_bytes": int(payload),
                   "batch_size": int(batch_size), "seq_len": self._max_length_tokens}
        out: dict = {"costs_from": "trained_model" if self.cost_model is None else "cost_model",
                     "trained_model": trained, "execution": self.placement.record()}
        if self.cost_model is not None:
            out["cost_model"] = {**self.cost_model.summary(*self._worst_case_shape(batch_size)[1]).to_dict(),
                                 "notes": list(self.cost_model.notes)}
        return out

    def _trained_step_profile(self, batch_size: int) -> StepProfile:
        """The trained model's own profile of one step at the worst-case shape (the batch of
        :meth:`job_memory_bytes`, whose cache it shares), whatever drives the timeline."""
        examples, shape = self._worst_case_shape(batch_size)
        if shape not in self._step_profiles:
            input_ids, mask, labels = self._full_length_batch(examples)
            self._step_profiles[shape] = profiling.count_step_flops(
                self._profile_model(), input_ids, mask, labels, self._weight_ptrs)
        return self._step_profiles[shape]

    def min_job_flops(self, steps: int, batch_size: int) -> float:
        """Fewest FLOPs a local job of ``steps`` x ``batch_size`` can count: every batch as
        short as the shortest training text (dynamic padding) [FLOP]."""
        shortest = self._train_examples[int(np.argmin(self._tokens.lengths_tokens[self._train_examples]))]
        return steps * self._step_profile(np.full(int(batch_size), shortest)).flops

    def global_state(self) -> PeftState:
        """A copy of the global PEFT state (name -> tensor)."""
        return {n: t.clone() for n, t in self._global.items()}

    # ---------------------------------------------------------------- training
    def snapshot(self) -> PeftState:
        """The current global state. :meth:`aggregate` builds a new dict of new tensors, so
        this one never changes: a job planned on it trains from it whenever it runs."""
        return self._global

    def plan(self, job: LocalJob, base: PeftState) -> PlannedJob:
        """Draw the job's batches from the device's generator and count their cost: FLOPs of
        each step's shape (dynamic padding) and the peak of their saved activations."""
        batches = [self._sample_batch(job.device_id, job.batch_size) for _ in range(job.steps)]
        flops, saved_bytes = 0.0, 0
        for examples in batches:
            profile = self._step_profile(examples)
            flops += profile.flops
            saved_bytes = max(saved_bytes, profile.saved_activation_bytes)
        cost = JobCost(flops=flops, peak_memory_bytes=self._memory_of(StepProfile(0.0, saved_bytes)),
                       update_bytes=self._adapter_bytes, num_examples=self.device_num_examples(job.device_id))
        return PlannedJob(job, base, cost, batches)

    def execute(self, plans: Sequence[PlannedJob]) -> list[LocalResult]:
        """Run planned jobs, each from its own base (one after another, or batched: see the
        module docstring); results in plan order. The model holds the global state again
        afterwards."""
        if self.strategy == "batched" and plans:
            return self._run_batched(plans)
        results = [self._run_job(plan) for plan in plans]
        self._load_state(self._global)
        return results

    def local_train(self, jobs: Sequence[LocalJob]) -> list[LocalResult]:
        """Plan and run ``jobs``, each from the current global state."""
        base = self.snapshot()
        return self.execute([self.plan(job, base) for job in jobs])

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

    def flatten_update(self, result: LocalResult) -> np.ndarray:
        """A result's update as one float64 vector, tensors in global-state order (for
        over-the-air aggregation, netsim.protocols.aircomp_fedavg)."""
        return np.concatenate([result.update[n].detach().reshape(-1).double().numpy() for n in self._global])

    def aggregate_flat(self, vector: np.ndarray) -> None:
        """global <- global + vector (an already weighted sum of flat updates, as received over
        the air), split back into the global-state tensors."""
        flat = torch.as_tensor(np.asarray(vector, dtype=np.float64))
        if flat.numel() != sum(t.numel() for t in self._global.values()):
            raise ValueError(f"flat update has {flat.numel()} values, the PEFT state has "
                             f"{sum(t.numel() for t in self._global.values())}")
        new_state: PeftState = {}
        offset = 0
        for name, tensor in self._global.items():
            n = tensor.numel()
            new_state[name] = tensor + flat[offset:offset + n].reshape(tensor.shape).to(tensor.dtype)
            offset += n
        self._global = new_state
        self._load_state(self._global)

    def evaluate(self) -> EvalResult:
        """Accuracy and mean cross-entropy of the global model on the first
        ``data.max_test_examples`` test examples (batches of 64, forward FLOPs counted once per
        shape)."""
        self._load_state(self._global)
        return self._evaluate_with(self.model, self._eval_forward)

    # ------------------------------------------------ per-device states (gossip FL)
    # netsim.interfaces.StateTrainer: a state is a dict name -> tensor like snapshot(); none of
    # these change the global state.
    def trained_state(self, base: PeftState, result: LocalResult) -> PeftState:
        """base + the job's update, as new tensors."""
        return {n: base[n] + result.update[n] for n in self._global}

    def state_vector(self, state: PeftState) -> np.ndarray:
        """A state as one float64 vector, tensors in global-state order."""
        return np.concatenate([state[n].detach().reshape(-1).double().numpy() for n in self._global])

    def state_from_vector(self, vector: np.ndarray) -> PeftState:
        """A new state from a float64 vector (:meth:`state_vector`'s layout), cast to the
        global state's dtypes."""
        flat = torch.as_tensor(np.asarray(vector, dtype=np.float64))
        total = sum(t.numel() for t in self._global.values())
        if flat.ndim != 1 or flat.numel() != total:
            raise ValueError(f"state vector has shape {tuple(flat.shape)}; allowed: ({total},), the PEFT state's values")
        state: PeftState = {}
        offset = 0
        for name, tensor in self._global.items():
            n = tensor.numel()
            state[name] = flat[offset:offset + n].reshape(tensor.shape).to(tensor.dtype).clone()
            offset += n
        return state

    def evaluate_state(self, state: PeftState) -> EvalResult:
        """Evaluate a given state like :meth:`evaluate`; the model holds the global state
        again afterwards."""
        self._load_state(state)
        try:
            return self._evaluate_with(self.model, self._eval_forward)
        finally:
            self._load_state(self._global)

    def _evaluate_with(self, model: torch.nn.Module, forward) -> EvalResult:
        """Accuracy and mean cross-entropy on the test examples, in batches of 64, with
        ``forward(input_ids, mask, examples) -> (logits, forward FLOPs)``; ``model`` is in eval
        mode meanwhile."""
        model.eval()
        correct, loss_sum, flops, predicted = 0, 0.0, 0.0, []
        try:
            with torch.no_grad():
                for start in range(0, len(self._test_examples), EVAL_BATCH_SIZE):
                    examples = self._test_examples[start:start + EVAL_BATCH_SIZE]
                    input_ids, mask, labels = self.placement.batch(self._tokens.batch(examples))
                    logits, batch_flops = forward(input_ids, mask, examples)
                    flops += batch_flops
                    loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
                    correct += int((logits.argmax(dim=-1) == labels).sum())
                    predicted.append(fexec.to_host(logits.argmax(dim=-1)).numpy())
        finally:
            model.train()
        n = len(self._test_examples)
        truth = self._tokens.labels[torch.from_numpy(self._test_examples)].numpy()
        balanced = balanced_accuracy(truth, np.concatenate(predicted), self.num_classes)
        return EvalResult(accuracy=correct / n, loss=loss_sum / n, flops=flops, num_examples=n,
                          balanced_accuracy=balanced)

    # ---------------------------------------------------------------- internals
    def _run_job(self, plan: PlannedJob) -> LocalResult:
        """One device's local training from its base state, on its planned batches."""
        job = plan.job
        self._load_state(plan.base)
        torch.manual_seed(fdata.job_torch_seed(self.seed, job.device_id, job.round))
        optimizer = self._make_optimizer()
        base = self.placement.state_to_device(plan.base) if job.prox_mu > 0 else plan.base
        losses = [self._train_step(optimizer, examples, base, job.prox_mu) for examples in plan.inputs]
        update = {n: fexec.to_host(p.detach()) - plan.base[n] for n, p in self._trainable}
        return self._result(plan, update, losses)

    def _result(self, plan: PlannedJob, update: PeftState, losses: list[torch.Tensor]) -> LocalResult:
        return local_result(plan, update, float(torch.stack(losses).mean()) if losses else float("nan"))

    def _train_step(self, optimizer: torch.optim.Optimizer, examples: np.ndarray, base: PeftState,
                    prox_mu: float = 0.0) -> torch.Tensor:
        """One optimizer step on a batch of ``examples`` (through the host's execution tricks:
        activation cache, pruned last block); returns the loss (:meth:`_batch_loss`). FedProx (``prox_mu``
        > 0) adds mu/2 ||w - w_base||^2 over the trainable tensors to the minimised loss."""
        optimizer.zero_grad(set_to_none=True)
        loss = self._batch_loss(examples)
        total = loss
        if prox_mu > 0:
            total = loss + 0.5 * prox_mu * sum(((p - base[n]) ** 2).sum() for n, p in self._trainable)
        total.backward()
        optimizer.step()
        return loss.detach()

    def _batch_loss(self, examples: np.ndarray) -> torch.Tensor:
        """The training loss of a batch of ``examples``: cross-entropy of the classification
        logits (subclasses train other objectives)."""
        input_ids, mask, labels = self.placement.batch(self._tokens.batch(examples))
        return F.cross_entropy(self._logits(input_ids, mask, examples), labels)

    def _run_batched(self, plans: Sequence[PlannedJob]) -> list[LocalResult]:
        """Batched strategy: jobs grouped by (steps, batch_size), in plan order, each group cut
        into passes of at most ``max_devices_per_pass`` devices."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, plan in enumerate(plans):
            groups.setdefault((plan.job.steps, plan.job.batch_size, plan.job.prox_mu), []).append(i)
        results: list[LocalResult | None] = [None] * len(plans)
        for members in groups.values():
            for start in range(0, len(members), self._max_devices_per_pass):
                chunk = members[start:start + self._max_devices_per_pass]
                if len(chunk) == 1:  # nothing to batch: the one-device path is the reference
                    results[chunk[0]] = self._run_job(plans[chunk[0]])
                    self._load_state(self._global)
                    continue
                for i, result in zip(chunk, self._run_pass([plans[i] for i in chunk])):
                    results[i] = result
        # leave torch's global RNG where the sequential strategy leaves it (nothing in a LoRA
        # step without dropout draws from it)
        last = plans[-1].job
        torch.manual_seed(fdata.job_torch_seed(self.seed, last.device_id, last.round))
        return [r for r in results if r is not None]

    def _run_pass(self, plans: Sequence[PlannedJob]) -> list[LocalResult]:
        """K jobs with the same (steps, batch_size) as one forward/backward per step over the
        combined batch (device-major rows), with per-device trainable tensors (each from the
        job's own base) and optimizer state (:class:`fomo.batched.DeviceStack`). The loss is the
        sum of the devices' mean losses, so each device's gradient is the one it gets alone."""
        k, steps, batch_size = len(plans), plans[0].job.steps, plans[0].job.batch_size
        bases = [plan.base for plan in plans]
        stack = fbatched.DeviceStack.from_states(bases, self.placement.device)
        optimizer = self._make_optimizer(stack.parameters())
        mu = float(plans[0].job.prox_mu)
        if any(plan.job.prox_mu != mu for plan in plans):
            raise ValueError("jobs of one batched pass must share prox_mu")
        start = {n: t.detach().clone() for n, t in stack.tensors.items()} if mu > 0 else {}
        losses: list[list[torch.Tensor]] = [[] for _ in range(k)]
        for step in range(steps):
            examples = np.concatenate([plan.inputs[step] for plan in plans])
            input_ids, mask, labels = self.placement.batch(self._tokens.batch(examples))
            optimizer.zero_grad(set_to_none=True)
            with fbatched.per_device_modules(self.model, stack, k * batch_size):
                logits = self._logits(input_ids, mask, examples)
            per_device = torch.stack([
                F.cross_entropy(lg, lb) for lg, lb in zip(logits.split(batch_size), labels.split(batch_size))
            ])
            total = per_device.sum()
            if mu > 0:   # FedProx: device k adds mu/2 ||w_k - w_base,k||^2
                total = total + 0.5 * mu * sum(((t - start[n]) ** 2).sum() for n, t in stack.tensors.items())
            total.backward()
            optimizer.step()
            for d, loss in enumerate(per_device.detach().unbind()):
                losses[d].append(loss)
        updates = stack.updates_from(bases)
        return [self._result(plan, updates[d], losses[d]) for d, plan in enumerate(plans)]

    def _eval_forward(
        self, input_ids: torch.Tensor, mask: torch.Tensor, examples: np.ndarray
    ) -> tuple[torch.Tensor, float]:
        """Logits of an evaluation batch and its forward FLOPs (counted once per shape, by a
        separate forward of the plain model)."""
        shape = (int(input_ids.shape[0]), int(input_ids.shape[1]))
        if shape not in self._eval_flops and self.cost_model is not None:
            padded = bool(self._tokens.padded(examples))
            self._eval_flops[shape] = self.cost_model.eval_flops(*shape, padded=padded)
        if shape not in self._eval_flops:
            self._eval_flops[shape] = profiling.counted_forward(
                self._profile_model(), fexec.to_host(input_ids), fexec.to_host(mask))[1]
        return self._logits(input_ids, mask, examples), self._eval_flops[shape]

    def _logits(self, input_ids: torch.Tensor, mask: torch.Tensor, examples: np.ndarray) -> torch.Tensor:
        """Logits of a batch of ``examples``, through the activation cache and the pruned last
        block where they apply (profiling runs the plain model instead), in the placement's
        precision (``bf16``: under autocast, the logits then returned as float32; otherwise in
        the model's own dtype, e.g. float64 in the equivalence tests)."""
        with self.placement.autocast(), pruned(self.pruned_block):
            if self.activation_cache is None:
                logits = profiling.classification_logits(self.model, input_ids, mask)
            else:
                hidden = self.activation_cache.hidden_states(examples, int(input_ids.shape[1]))
                with self.activation_cache.substituted(hidden):
                    logits = profiling.classification_logits(self.model, input_ids, mask)
        return logits if self.placement.precision == "fp32" else logits.float()

    def _step_profile(self, examples: np.ndarray) -> StepProfile:
        """Profile of the uncached one-device step of this batch's shape (profiled by a separate
        forward/backward that changes nothing, once per shape and padding; with
        ``model.cost_model``, the cost model's profile of the shape)."""
        shape = (len(examples), self._tokens.seq_len(examples), self._tokens.padded(examples))
        if self.cost_model is not None:
            return self.cost_model.profile(*shape)
        profile = self._step_profiles.get(shape)
        if profile is None:
            profile = profiling.count_step_flops(self._profile_model(), *self._tokens.batch(examples), self._weight_ptrs)
            self._step_profiles[shape] = profile
        return profile

    def _sample_batch(self, device_id: int, batch_size: int) -> np.ndarray:
        """Example indices of one batch from the device's data (:func:`fomo.data.sample_batch`)."""
        return fdata.sample_batch(self._device_rng(device_id), self._device_examples[device_id], batch_size)

    def _device_rng(self, device_id: int) -> np.random.Generator:
        """The device's persistent batch-sampling generator (created on first use: the stream
        depends only on the seed and the device, not on when it is created)."""
        rng = self._device_rngs.get(device_id)
        if rng is None:
            rng = self._device_rngs[device_id] = fdata.device_rng(self.seed, device_id)
        return rng

    def _full_length_batch(self, examples: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch padded to ``model.max_length_tokens`` (the worst-case shape)."""
        index = torch.from_numpy(np.asarray(examples, dtype=np.int64))
        return (
            self._tokens.input_ids[index],
            self._tokens.attention_mask[index],
            self._tokens.labels[index],
        )

    def _make_optimizer(self, params: list[torch.Tensor] | None = None) -> torch.optim.Optimizer:
        """A fresh optimizer over ``params`` (default: the model's trainable parameters); no
        state is carried across jobs. Both are element-wise, so over devices' tensors stacked
        along a device axis they act as one independent optimizer per device."""
        if params is None:
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
        if self.cost_model is not None:
            return self.cost_model.job_memory_bytes(profile)
        return profiling.job_memory_bytes(
            self._weights_bytes,
            self._adapter_bytes,
            self._optimizer_name,
            profile.saved_activation_bytes,
        )


def local_result(plan: PlannedJob, update, loss: float) -> LocalResult:
    """The result of a planned job: its update and mean loss, its planned cost."""
    cost = plan.cost
    return LocalResult(device_id=plan.job.device_id, update=update, num_examples=cost.num_examples, loss=loss,
                       flops=cost.flops, peak_memory_bytes=cost.peak_memory_bytes, update_bytes=cost.update_bytes)
