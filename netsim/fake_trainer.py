"""A deterministic, torch-free trainer for network-side tests and large populations.

It follows the :class:`~netsim.interfaces.Trainer` protocol with a one-number model of
learning: the global state is a progress value p in [0, 1). A device's E local steps move it
towards 1 by ``learning_speed`` per step with multiplicative noise,

.. math::
    \\Delta_k = (1 - p)\\,(1 - e^{-\\lambda E})\\,(1 + 0.1 z_k), \\quad z_k \\sim N(0, 1),

FedAvg gives p <- p + sum_k w_k Delta_k, and the test accuracy is chance + (0.95 - chance) p.
FLOPs, update size and memory come from the ``fake`` section of the scenario. Use it to test
and time the network side; it says nothing about real accuracy.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import numpy as np
from pydantic import Field

from .interfaces import EvalResult, JobCost, LocalJob, LocalResult, PlannedJob
from .spec_base import Int, PositiveFloat, Spec

if TYPE_CHECKING:  # netsim.scenario imports FakeTrainerSpec: no import of it at run time
    from .scenario import Scenario


class FakeTrainerSpec(Spec):
    """Parameters of the torch-free stand-in trainer (``trainer: fake``)."""

    step_flops: PositiveFloat = Field(5.0e9, ge=1, le=1e24)
    adapter_bytes: Int = Field(300_000, ge=1, le=10**13)
    job_memory_bytes: PositiveFloat = Field(5.0e8, ge=1, le=1e18)
    examples_per_device: Int = Field(64, ge=1, le=10_000_000)
    num_classes: Int = Field(5, ge=2, le=100_000)
    learning_speed: PositiveFloat = Field(0.02, le=100, description="accuracy gain rate per local step")


class FakeTrainer:
    def __init__(self, scenario: "Scenario", seed: int):
        self.spec = scenario.fake
        self.num_classes = self.spec.num_classes
        self._n_devices = scenario.num_devices
        # training-side randomness: the scenario's training seed (``training_seed``, else ``seed``)
        self._rng = np.random.default_rng(np.random.SeedSequence(scenario.train_seed(seed), spawn_key=(9,)))
        self.progress = 0.0

    def num_devices(self) -> int:
        return self._n_devices

    def device_num_examples(self, device_id: int) -> int:
        return self.spec.examples_per_device

    def adapter_bytes(self) -> int:
        return self.spec.adapter_bytes

    def job_memory_bytes(self, batch_size: int) -> int:
        return int(self.spec.job_memory_bytes)

    def min_job_flops(self, steps: int, batch_size: int) -> float:
        """Fewest FLOPs a job of this shape can count (every job counts the same here)."""
        return self.spec.step_flops * steps

    def snapshot(self) -> float:
        """The global state is one number: the progress p."""
        return self.progress

    def plan(self, job: LocalJob, base: float) -> PlannedJob:
        spec = self.spec
        cost = JobCost(spec.step_flops * job.steps, int(spec.job_memory_bytes), spec.adapter_bytes,
                       self.device_num_examples(job.device_id))
        return PlannedJob(job, float(base), cost)

    def execute(self, plans: Sequence[PlannedJob]) -> list[LocalResult]:
        """Each job moves its own base progress; the noise z_k is drawn in plan order."""
        out = []
        noise = self._rng.standard_normal(len(plans))
        for plan, z in zip(plans, noise):
            job, base = plan.job, plan.base
            gain = (1.0 - base) * (1.0 - math.exp(-self.spec.learning_speed * job.steps))
            delta = gain * (1.0 + 0.1 * float(z))
            loss = math.log(self.num_classes) * (1.0 - base)
            out.append(LocalResult(job.device_id, delta, plan.cost.num_examples, loss, plan.cost.flops,
                                   plan.cost.peak_memory_bytes, plan.cost.update_bytes))
        return out

    def local_train(self, jobs: Sequence[LocalJob]) -> list[LocalResult]:
        base = self.snapshot()
        return self.execute([self.plan(job, base) for job in jobs])

    def aggregate(self, results: Sequence[LocalResult], weights: Sequence[float]) -> None:
        self.progress = min(self.progress + sum(w * r.update for r, w in zip(results, weights)), 0.999999)

    # Flat-vector form of updates, for over-the-air aggregation (netsim.protocols.aircomp_fedavg): the
    # one-number update is spread over the adapter's float32 values (adapter_bytes / 4).
    def flatten_update(self, result: LocalResult) -> np.ndarray:
        return np.full(max(self.spec.adapter_bytes // 4, 1), float(result.update))

    def aggregate_flat(self, vector: np.ndarray) -> None:
        """global <- global + the (already weighted and summed) flat update."""
        self.progress = min(max(self.progress + float(np.mean(vector)), 0.0), 0.999999)

    def evaluate(self) -> EvalResult:
        return self.evaluate_state(self.progress)

    # Per-device states (netsim.interfaces.StateTrainer, for gossip FL): a state is a progress
    # value p, its vector the one number [p].
    def trained_state(self, base: float, result: LocalResult) -> float:
        """p + Delta, capped below 1 as :meth:`aggregate` caps the global progress."""
        return min(max(float(base) + float(result.update), 0.0), 0.999999)

    def state_vector(self, state: float) -> np.ndarray:
        return np.array([float(state)], dtype=np.float64)

    def state_from_vector(self, vector: np.ndarray) -> float:
        v = np.asarray(vector, dtype=np.float64).reshape(-1)
        if v.size != 1:
            raise ValueError(f"fake trainer state vector has {v.size} values; allowed: 1 (the progress)")
        return min(max(float(v[0]), 0.0), 0.999999)

    def evaluate_state(self, state: float) -> EvalResult:
        """Accuracy chance + (0.95 - chance) p of a progress value p."""
        p = float(state)
        chance = 1.0 / self.num_classes
        acc = chance + (0.95 - chance) * p
        return EvalResult(acc, math.log(self.num_classes) * (1.0 - p), 1e9, 256)
