"""The seam between simulated time and the maths (standard library only).

The SimPy side (``netsim``) never imports torch. It talks to a *trainer* through the
:class:`Trainer` protocol below and only ever sees plain numbers: FLOPs, bytes, losses and
accuracies. The real trainer (``fomo.trainer.PeftTrainer``) runs real forward/backward/optimizer
steps on a pre-trained transformer; ``netsim.fake_trainer.FakeTrainer`` is a deterministic,
torch-free stand-in for fast network-side tests.

Simulated time is derived from these numbers by ``netsim.budgets`` (FLOPs / device speed,
bits / link rate), never from how long the host took.

A job is planned when a device starts it (its batches are drawn and its cost is known:
FLOPs, memory, payload) and executed later, together with every other job pending at the
moment a value is first needed (:mod:`netsim.engine`). So the timeline advances on costs
while the trainer still runs many devices' steps as one batched pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence


@dataclass(frozen=True)
class LocalJob:
    """One device's local fine-tuning work in one round.

    Attributes
    ----------
    device_id : int
        Index of the device (0-based, as in the scenario's device list).
    round : int
        Communication round (1-based).
    steps : int
        Number of local optimizer steps E.
    batch_size : int
        Examples per step.
    prox_mu : float
        FedProx: the local loss gets mu/2 ||w - w_start||^2 over the trainable tensors (0: none).
    """

    device_id: int
    round: int
    steps: int
    batch_size: int
    prox_mu: float = 0.0


@dataclass(frozen=True)
class JobCost:
    """What a local job costs, known before it runs (it depends on shapes only).

    Attributes
    ----------
    flops : float
        Counted floating-point operations of all the job's steps (forward + backward) [FLOP].
    peak_memory_bytes : int
        Peak memory the job needs on the device [bytes].
    update_bytes : int
        Size of the update to upload [bytes].
    num_examples : int
        Size of the device's local data set (FedAvg weight).
    """

    flops: float
    peak_memory_bytes: int
    update_bytes: int
    num_examples: int


@dataclass(frozen=True)
class RoundTripCost:
    """One split-learning step of one device (the device and the edge each run their part).

    Attributes
    ----------
    device_forward_flops : float
        The device's forward below the cut [FLOP].
    uplink_bytes : int
        Cut activations (+ token mask and labels) the device uploads [bytes].
    edge_flops : float
        The edge's forward + loss + backward above the cut [FLOP].
    downlink_bytes : int
        The gradient at the cut the edge sends back [bytes].
    device_backward_flops : float
        The device's backward into its trainable tensors [FLOP].
    """

    device_forward_flops: float
    uplink_bytes: int
    edge_flops: float
    downlink_bytes: int
    device_backward_flops: float


@dataclass(frozen=True)
class SplitJobCost(JobCost):
    """A split-learning job's cost: :class:`JobCost` (``flops`` = the device's share of all its
    steps, ``update_bytes`` = the device-held tensors it uploads at the end of the round) and
    every step's round trip."""

    steps: tuple[RoundTripCost, ...] = ()


@dataclass(frozen=True)
class PlannedJob:
    """A job the trainer has planned: its cost is known, its values are not computed yet.

    Attributes
    ----------
    job : LocalJob
    base : Any
        The global state the job starts from (a :meth:`Trainer.snapshot`): the model version
        the device downloaded, whatever the global state is when the job is finally run.
    cost : JobCost
    inputs : Any
        Trainer-private data fixed at planning time (for the real trainer: the example indices
        of every step's batch, drawn from the device's own generator).
    """

    job: LocalJob
    base: Any
    cost: JobCost
    inputs: Any = None


@dataclass(frozen=True)
class LocalResult:
    """What a device's local training produced.

    Attributes
    ----------
    device_id : int
    update : Any
        Opaque update handed back to :meth:`Trainer.aggregate` (for the real trainer: a dict of
        tensors holding local minus global PEFT parameters).
    num_examples : int
        Size of the device's local data set (FedAvg weight).
    loss : float
        Mean training loss over the local steps.
    flops : float
        Counted floating-point operations of all local steps (forward + backward) [FLOP].
    peak_memory_bytes : int
        Peak memory the job needs on the device: weights + trainable state + saved activations
        [bytes].
    update_bytes : int
        Size of the update to upload [bytes].
    """

    device_id: int
    update: Any
    num_examples: int
    loss: float
    flops: float
    peak_memory_bytes: int
    update_bytes: int


@dataclass(frozen=True)
class EvalResult:
    """Evaluation of the global model on the held-out test set. ``balanced_accuracy``: the
    mean per-class recall over the classes present (NaN where the trainer does not compute it)."""

    accuracy: float
    loss: float
    flops: float
    num_examples: int
    balanced_accuracy: float = float("nan")


class Trainer(Protocol):
    """What the simulator needs from a trainer. Implementations must be deterministic for a
    given seed: the same calls in the same order give the same numbers, bit for bit."""

    num_classes: int

    def num_devices(self) -> int:
        """Number of devices whose data the trainer holds."""

    def device_num_examples(self, device_id: int) -> int:
        """Local training-set size of a device."""

    def adapter_bytes(self) -> int:
        """Size of the global PEFT state the edge broadcasts each round [bytes]."""

    def job_memory_bytes(self, batch_size: int) -> int:
        """Peak memory a local job of this batch size needs on a device [bytes]."""

    def snapshot(self) -> Any:
        """A handle on the current global PEFT state that later aggregations do not change
        (a job planned on it trains from it, whenever it runs)."""

    def plan(self, job: LocalJob, base: Any) -> PlannedJob:
        """Fix the job's inputs (its batches) and return its cost, without training."""

    def execute(self, plans: Sequence[PlannedJob]) -> list[LocalResult]:
        """Run planned jobs, each from its own ``base``, and return one result per plan, in
        order. Implementations may batch them; the results must equal running them one at a
        time. The global state is unchanged."""

    def local_train(self, jobs: Sequence[LocalJob]) -> list[LocalResult]:
        """Plan and execute ``jobs`` from the current global state (a convenience for
        benchmarks and tests; the protocols go through :class:`netsim.engine.Engine`)."""

    def aggregate(self, results: Sequence[LocalResult], weights: Sequence[float]) -> None:
        """Set the global PEFT state to global + sum_k weights[k] * update_k (FedAvg)."""

    def evaluate(self) -> EvalResult:
        """Evaluate the global model on the held-out test set."""


class StateTrainer(Trainer, Protocol):
    """A trainer that also handles per-device PEFT states, for protocols without one global
    model (decentralised / gossip FL, :mod:`netsim.protocols.gossip_fl`). A *state* is what
    :meth:`Trainer.snapshot` returns; a job planned on any state trains from it
    (:meth:`Trainer.plan`). Only additions: the :class:`Trainer` methods are unchanged."""

    def trained_state(self, base: Any, result: LocalResult) -> Any:
        """The state after a job: ``base`` + the job's update (a new handle; ``base`` is
        unchanged)."""

    def state_vector(self, state: Any) -> Any:
        """The state as one float64 numpy vector (tensors in global-state order)."""

    def state_from_vector(self, vector: Any) -> Any:
        """A new state holding ``vector`` (the inverse of :meth:`state_vector`, at the
        trainer's precision)."""

    def evaluate_state(self, state: Any) -> EvalResult:
        """Evaluate ``state`` on the held-out test set (the global state is unchanged)."""
