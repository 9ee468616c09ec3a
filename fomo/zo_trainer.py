"""The real trainer of the ``zeroth_order`` variant: MeZO steps with FedKSeed's shared seeds.

:class:`ZerothOrderTrainer` is a :class:`fomo.trainer.PeftTrainer` (same data, partition,
per-device batch sampling, PEFT model and evaluation) whose local steps are MeZO's SPSA steps
(Malladi et al., NeurIPS 2023; :func:`fomo.zeroth_order.spsa_step`) and whose round exchanges
FedKSeed's seed pools (Qin et al., ICML 2024) instead of tensors.

Trainable tensors: the ``peft`` section's (LoRA or prompt tuning) plus the classification head,
exactly :class:`PeftTrainer`'s. K = ``zeroth_order.candidate_seeds`` candidate seeds are drawn
once from the run seed (:data:`fomo.data.ZO_SEEDS_SPAWN_KEY`); the edge and every device share
them (each derives them from the run seed, so they cost no transmission).

A device's job: for each step t, a batch B_t (drawn from the device's batch generator, the very
stream :class:`PeftTrainer` uses) and a candidate index i_t (uniform in [0, K), drawn from the
device's own seed generator, spawn key ``(ZO_DEVICE_SPAWN_KEY, device_id)``, a separate stream),
then one MeZO step with seed s = seeds[i_t]:

    g_t = (f_B(theta + eps z_s) - f_B(theta - eps z_s)) / (2 eps),
    theta <- theta - lr (g_t z_s + wd theta),

lr = ``training.learning_rate`` (the variant's override, applied by the experiment), eps and
wd = ``zeroth_order.eps`` / ``weight_decay``. The step is plain SGD on the SPSA estimate whatever
``training.optimizer`` says (MeZO's ZO-SGD; there is no optimizer state). FedProx
(``LocalJob.prox_mu`` > 0) adds mu/2 ||theta - theta_base||^2 to the minimised f (so to g),
not to the reported loss.

Update and payload: the job's update is the dense vector G in R^K, G_i = sum of the g_t of the
steps that drew candidate i (float64 here; float32 on the wire). Each round a device uploads G
and the edge broadcasts the K aggregated scalars P = sum_k w_k G_k, which every device replays
(:func:`fomo.zeroth_order.replay`: theta <- theta - lr (P_i z_{seeds[i]} + wd theta) for each
nonzero P_i, ascending seed). Both directions use the dense form, 4 K bytes
(:func:`fomo.zeroth_order.dense_payload_bytes`), so :meth:`adapter_bytes` is both the upload
and the broadcast: over-the-air aggregation (``uplink_access: aircomp``) sums vectors element
by element, which needs every device's scalars in the same, fixed positions (candidate order);
the sparse (index, scalar) encoding would be smaller for few steps but cannot be superposed.
A device that missed rounds would need every missed round's P (FedKSeed keeps that history at
the server); the protocols here download the current state each round, so this is not counted.

Replay equals FedAvg: with wd = 0 the device's update is -lr sum_i G_i z_i exactly (in exact
arithmetic), so replaying P = sum_k w_k G_k gives theta + sum_k w_k (theta_k - theta): the FedAvg
of the devices' models. With wd > 0 replay decays once per nonzero seed, the devices once per
step (FedKSeed's approximation).

Cost (known at planning, from shapes): FLOPs = sum over steps of 2 x the counted forward FLOPs
of the step's (batch, seq_len) shape (:func:`fomo.profiling.counted_forward`, matrix products
only; the element-wise perturbation and update work, 4 passes over the trainable tensors and
their Gaussian draws, is not counted, as the backprop step's optimizer update is not).
Peak memory (MeZO's inference-level memory) = :func:`fomo.zeroth_order.zo_step_memory_bytes`
(all weights + the largest perturbation buffer, + a copy of the trainable tensors with
``exact_restore``) + the measured transient peak of one no-grad forward of the job's largest
shape (:func:`fomo.zeroth_order.measured_peak_bytes`: bytes of operator outputs alive at once;
no saved activations, gradients or optimizer state). The buffer and the forward transients are
never alive together, so the sum overestimates the peak by at most the buffer (36,864 B for
LoRA r 8 on all-MiniLM-L6-v2: the largest tensor's float64 draw + its float32 cast). Both are profiled once per shape and cached; the model is unchanged.

Reported loss: the mean over the job's steps of (f(theta + eps z) + f(theta - eps z)) / 2, the
two-sided mean (the loss at theta up to O(eps^2); no extra forward), cross-entropy only.

Replay cost: replaying n nonzero scalars is n regenerated perturbations and n multiply-adds
over the trainable tensors (:meth:`ZerothOrderTrainer.replay_flops`), at the edge and on every
device; a pool received over the air is dense (noise makes every entry nonzero), so it replays
all K (on one AMD EPYC thread, K = 1024 over LoRA r 8's 75,653 values takes about 2.6 s).

Restore: by default theta is restored in place after the two forwards (MeZO; error bounded in
:mod:`fomo.zeroth_order`); ``exact_restore=True`` keeps a copy (its bytes are counted) and the
device's trajectory is then bitwise what :func:`fomo.zeroth_order.replay` rebuilds from its own
(seed, g_t) sequence. The global model never depends on a device's restore error: the edge
and devices rebuild it by replaying the aggregated pool from the previous global state.

Execution: sequential only, one job after another in plan order, each from its own base;
``execution.strategy: batched`` falls back to sequential with an execution note (the batched
pass stacks per-device LoRA tensors for one backward; a ZO step has no backward and each device
perturbs its own tensors along its own seed's z, so there is nothing to share but the forward).
The frozen-prefix activation cache and the pruned last block apply as for :class:`PeftTrainer`
(the perturbation touches only trainable tensors). Every forward runs in eval mode (dropout off)
so both SPSA forwards compute the same function; the model is in train mode again afterwards.
No global RNG is used: batches and seed indices come from the devices' generators and z from
seeded CPU generators, so results do not depend on the order or grouping of execute calls.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fomo import data as fdata
from fomo import profiling
from fomo import zeroth_order as zo
from fomo.trainer import PeftState, PeftTrainer, local_result
from netsim.interfaces import JobCost, LocalJob, LocalResult, PlannedJob

if TYPE_CHECKING:  # pragma: no cover
    from netsim.scenario import Scenario


@dataclass(frozen=True)
class ZerothOrderInputs:
    """What a zeroth-order job fixes at planning time.

    Attributes
    ----------
    batches : list of int64 arrays
        Example indices of each step's batch.
    seed_indices : (steps,) int64 array
        Candidate index i_t in [0, K) of each step (its seed is ``candidate_seeds[i_t]``).
    """

    batches: list[np.ndarray]
    seed_indices: np.ndarray


def zo_device_rng(seed: int, device_id: int) -> np.random.Generator:
    """A device's persistent generator of step-seed draws (spawn key
    ``(fomo.data.ZO_DEVICE_SPAWN_KEY, device_id)``; independent of its batch sampling)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(fdata.ZO_DEVICE_SPAWN_KEY, int(device_id))))


def shared_candidate_seeds(seed: int, k: int) -> np.ndarray:
    """The run's K candidate seeds (:func:`fomo.zeroth_order.candidate_seeds` from spawn key
    ``(fomo.data.ZO_SEEDS_SPAWN_KEY,)``), identical at the edge and on every device."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(fdata.ZO_SEEDS_SPAWN_KEY,)))
    return zo.candidate_seeds(k, rng)


class ZerothOrderTrainer(PeftTrainer):
    """MeZO + FedKSeed trainer (see the module docstring); implements
    :class:`netsim.interfaces.Trainer` and the flat-vector hooks of over-the-air aggregation.

    Parameters
    ----------
    scenario : netsim.scenario.Scenario
        As :class:`PeftTrainer`, plus ``zeroth_order`` (candidate_seeds K, eps, weight_decay);
        ``training.learning_rate`` is the ZO-SGD step (``training.optimizer`` is not used).
    seed : int
        Run seed.
    exact_restore : bool
        Restore theta after the two forwards from a copy (bitwise) instead of in place.

    Attributes
    ----------
    candidate_seeds : (K,) int64 array
        The shared candidate seeds, in candidate order (the order of every update vector).
    eps, weight_decay, learning_rate : float
    exact_restore : bool
    """

    def __init__(self, scenario: "Scenario", seed: int, exact_restore: bool = False) -> None:
        spec = scenario.zeroth_order
        self.num_candidates = int(spec.candidate_seeds)
        self.eps = float(spec.eps)
        self.weight_decay = float(spec.weight_decay)
        self.exact_restore = bool(exact_restore)
        super().__init__(scenario, seed)
        self.learning_rate = self._learning_rate
        self.candidate_seeds: np.ndarray = shared_candidate_seeds(self.seed, self.num_candidates)
        self._seed_rngs: dict[int, np.random.Generator] = {}
        self._forward_peaks: dict[tuple[int, int], int] = {}

    def _configure_execution(self, scenario: "Scenario") -> None:
        """As :class:`PeftTrainer`, except that the batched strategy never applies."""
        super()._configure_execution(scenario)
        if self.strategy == "batched":
            self.strategy = "sequential"
            note = ("execution.strategy=batched not applied: a zeroth-order step has no backward pass and "
                    "each device perturbs its own tensors along its own seed, so jobs run one after another")
            self.execution_notes.append(note)
            warnings.warn(note, RuntimeWarning, stacklevel=3)

    # ---------------------------------------------------------------- sizes
    def adapter_bytes(self) -> int:
        """Bytes each way per round: K float32 scalars in candidate order, 4 K (the device's
        accumulated projected gradients up, the aggregated ones down; dense both ways so that
        over-the-air aggregation can sum them)."""
        return zo.dense_payload_bytes(self.num_candidates)

    def trainable_bytes(self) -> int:
        """Bytes of the trainable tensors (PEFT + head) [bytes] (what plain FedAvg would send)."""
        return self._adapter_bytes

    def job_memory_bytes(self, batch_size: int) -> int:
        """Peak memory of a zeroth-order job of this batch size at ``model.max_length_tokens``
        [bytes]: :func:`fomo.zeroth_order.zo_step_memory_bytes` + the measured forward peak."""
        shape = (int(batch_size), self._max_length_tokens)
        if shape not in self._forward_peaks:
            examples = np.resize(self._train_examples, int(batch_size))
            input_ids, mask, labels = self._full_length_batch(examples)
            self._forward_peaks[shape] = self._measure_forward_peak(input_ids, mask, labels)
        return self._zo_memory(self._forward_peaks[shape])

    def min_job_flops(self, steps: int, batch_size: int) -> float:
        """Fewest FLOPs a job of ``steps`` x ``batch_size`` can count: 2 forwards per step of
        batches as short as the shortest training text [FLOP]."""
        shortest = self._train_examples[int(np.argmin(self._tokens.lengths_tokens[self._train_examples]))]
        return steps * self.step_flops(np.full(int(batch_size), shortest))

    def replay_flops(self, num_pairs: int) -> float:
        """Element-wise FLOPs of replaying ``num_pairs`` nonzero (seed, scalar) pairs: a
        multiply-add per trainable value per pair (2 FLOP), + a multiply with weight decay
        [FLOP] (the Gaussian draws are not counted)."""
        per_value = 2.0 + (1.0 if self.weight_decay > 0 else 0.0)
        return per_value * int(num_pairs) * sum(t.numel() for t in self._global.values())

    def step_flops(self, examples: np.ndarray) -> float:
        """Counted FLOPs of one MeZO step on this batch: 2 forwards of its shape [FLOP]."""
        return 2.0 * self._forward_flops(examples)

    # ---------------------------------------------------------------- training
    def plan(self, job: LocalJob, base: PeftState) -> PlannedJob:
        """Draw the job's batches (the device's batch stream, as :class:`PeftTrainer`) and its
        step seeds (the device's seed stream) and count the cost from the batch shapes."""
        batches = [self._sample_batch(job.device_id, job.batch_size) for _ in range(job.steps)]
        indices = zo.draw_seed_indices(self.num_candidates, job.steps, self._seed_rng(job.device_id))
        flops = sum(self.step_flops(examples) for examples in batches)
        peak = max((self._forward_peak(examples) for examples in batches), default=0)
        cost = JobCost(flops=float(flops), peak_memory_bytes=self._zo_memory(peak),
                       update_bytes=self.adapter_bytes(), num_examples=self.device_num_examples(job.device_id))
        return PlannedJob(job, base, cost, ZerothOrderInputs(batches, indices.astype(np.int64)))

    def execute(self, plans: Sequence[PlannedJob]) -> list[LocalResult]:
        """Run planned jobs one after another, each from its own base; results in plan order.
        The model holds the global state (in train mode) again afterwards."""
        try:
            return [self.run_local(plan)[0] for plan in plans]
        finally:
            self._load_state(self._global)
            self.model.train()

    def aggregate(self, results: Sequence[LocalResult], weights: Sequence[float]) -> None:
        """global <- replay(global, P) with P = sum_k weights[k] update_k (dense, float64,
        summed in the given order)."""
        if len(results) != len(weights):
            raise ValueError(f"{len(results)} results but {len(weights)} weights")
        pool = np.zeros(self.num_candidates, dtype=np.float64)
        for result, weight in zip(results, weights):
            pool += float(weight) * self.flatten_update(result)
        self._replay_pool(pool)

    def flatten_update(self, result: LocalResult) -> np.ndarray:
        """A result's update: the K accumulated projected gradients in candidate order
        (float64 copy)."""
        vector = np.array(result.update, dtype=np.float64)
        if vector.shape != (self.num_candidates,):
            raise ValueError(f"zeroth-order update has shape {vector.shape}, expected ({self.num_candidates},)")
        return vector

    def aggregate_flat(self, vector: np.ndarray) -> None:
        """global <- replay(global, vector): ``vector`` is an already weighted sum of flat
        updates (K scalars, as received over the air)."""
        self._replay_pool(np.asarray(vector, dtype=np.float64))

    def pool_pairs(self, vector: np.ndarray) -> dict[int, float]:
        """{seed: scalar} of the nonzero entries of a K-vector (the pairs :meth:`aggregate`
        replays, in ascending seed order)."""
        vector = np.asarray(vector, dtype=np.float64)
        if vector.shape != (self.num_candidates,):
            raise ValueError(f"seed pool has shape {vector.shape}, expected ({self.num_candidates},)")
        if not np.all(np.isfinite(vector)):
            raise ValueError("seed pool has non-finite scalars: the zeroth-order update diverged; "
                             "lower training.learning_rate or zeroth_order.eps")
        nonzero = np.flatnonzero(vector)
        return {int(self.candidate_seeds[i]): float(vector[i]) for i in nonzero}

    # ---------------------------------------------------------------- internals
    def _replay_pool(self, vector: np.ndarray) -> None:
        """Set the global state to the replay of a K-vector of scalars from it."""
        pairs = self.pool_pairs(vector)
        names = list(self._global)
        params = zo.replay([self._global[n] for n in names], pairs, self._learning_rate, self.weight_decay)
        self._global = dict(zip(names, params))
        self._load_state(self._global)

    def run_local(self, plan: PlannedJob) -> tuple[LocalResult, PeftState]:
        """One device's MeZO steps from its base state: its result (update = G in R^K) and
        its own trained tensors (name -> copy). Leaves the model holding them (:meth:`execute`
        restores the global state)."""
        job, inputs = plan.job, plan.inputs
        self._load_state(plan.base)
        params = [p for _, p in self._trainable]
        base = [plan.base[n] for n, _ in self._trainable]
        update = np.zeros(self.num_candidates, dtype=np.float64)
        step_losses: list[float] = []
        for examples, index in zip(inputs.batches, inputs.seed_indices):
            recorded: list[float] = []
            loss_fn = self._loss_fn(examples, params, base, float(job.prox_mu), recorded)
            g = zo.spsa_step(loss_fn, params, int(self.candidate_seeds[index]), self.eps, self._learning_rate,
                             self.weight_decay, self.exact_restore)
            update[int(index)] += g
            step_losses.append(0.5 * (recorded[0] + recorded[1]))
        result = local_result(plan, update, float(np.mean(step_losses)) if step_losses else float("nan"))
        return result, {n: p.detach().clone() for n, p in self._trainable}

    def _loss_fn(self, examples: np.ndarray, params: list[torch.Tensor], base: list[torch.Tensor],
                 prox_mu: float, recorded: list[float]) -> Callable[[], float]:
        """Loss closure of one batch for :func:`fomo.zeroth_order.spsa_step` (eval mode, no
        grad, through the execution tricks): the cross-entropy (appended to ``recorded``) +
        the FedProx term mu/2 ||theta - theta_base||^2 when mu > 0."""
        input_ids, mask, labels = self._tokens.batch(examples)

        def loss() -> float:
            self.model.eval()
            with torch.no_grad():
                ce = float(F.cross_entropy(self._logits(input_ids, mask, examples), labels))
                recorded.append(ce)
                if prox_mu > 0:
                    prox = sum(float(((p - b) ** 2).sum()) for p, b in zip(params, base))
                    return ce + 0.5 * prox_mu * prox
                return ce

        return loss

    def _seed_rng(self, device_id: int) -> np.random.Generator:
        """The device's persistent step-seed generator (created on first use)."""
        rng = self._seed_rngs.get(device_id)
        if rng is None:
            rng = self._seed_rngs[device_id] = zo_device_rng(self.seed, device_id)
        return rng

    def _forward_flops(self, examples: np.ndarray) -> float:
        """Counted FLOPs of one forward of this batch's shape (the plain model, no grad; cached
        per shape, shared with evaluation's count)."""
        input_ids, mask, _ = self._tokens.batch(examples)
        shape = (int(input_ids.shape[0]), int(input_ids.shape[1]))
        if shape not in self._eval_flops:
            with torch.no_grad():
                self._eval_flops[shape] = profiling.counted_forward(self.model, input_ids, mask)[1]
        return self._eval_flops[shape]

    def _forward_peak(self, examples: np.ndarray) -> int:
        """Measured transient peak of one no-grad forward + loss of this batch's shape [bytes]
        (cached per shape)."""
        shape = (len(examples), self._tokens.seq_len(examples))
        if shape not in self._forward_peaks:
            self._forward_peaks[shape] = self._measure_forward_peak(*self._tokens.batch(examples))
        return self._forward_peaks[shape]

    def _measure_forward_peak(self, input_ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> int:
        """:func:`fomo.zeroth_order.measured_peak_bytes` of the plain model's eval-mode,
        no-grad forward and cross-entropy (the model is left in train mode)."""
        self.model.eval()
        try:
            with torch.no_grad():
                return zo.measured_peak_bytes(lambda: profiling.classification_loss(self.model, input_ids, mask, labels))
        finally:
            self.model.train()

    def _zo_memory(self, forward_peak_bytes: int) -> int:
        """Job memory [bytes]: weights + perturbation buffer (+ copy) + forward transients."""
        params = [p for _, p in self._trainable]
        return zo.zo_step_memory_bytes(self._weights_bytes, params, self.exact_restore) + int(forward_peak_bytes)
