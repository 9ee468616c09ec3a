"""Fine-tuning as a service with on-the-fly prompt-ensemble tuning, on one SimPy timeline.

Users send fine-tuning requests to the edge (:mod:`netsim.service`: Poisson arrivals per user
class, a finite number of compute slots, a queue discipline and an admission policy). A
request names a task, an owner device that holds ``examples_per_request`` labelled examples of
it, and a target accuracy; the edge keeps a *library* of tuned PEFT states (soft prompt and
classification head), seeded with prompts tuned on ``library.tasks`` before the service opens,
and every served request adds its final state to it.

Serving one request on a slot of speed F [FLOP/s] (``slot_flops_per_s``):

1. the owner uploads its examples in batches of ``training.batch_size`` over its uplink
   (bandwidth ``upload_bandwidth_hz``), one after another from the request's arrival (the edge
   buffers them while the request waits); batch j is at the edge at u_j; the bytes are the
   examples' tokens x ``bytes_per_token`` + one byte per label (``upload`` events, owner's
   transmit energy);
2. the variant (``prompt_service.variants``) chooses where tuning starts, using the library as
   it is when service starts:

   * ``scratch``: the initial PEFT state (no library);
   * ``oracle``: the library entry with the highest ``target_metric`` on the request's test
     set (an upper bound of selection: it uses the test labels, at no cost);
   * ``best_single``: every entry scores the first ``ensemble.probe_examples`` labelled
     examples as they arrive (P forward passes per batch: P x forward FLOPs / F); the entry
     with the best ``target_metric`` on them (accuracy, or balanced accuracy over the probe's
     classes; ties: the older entry) starts the tuning;
   * ``ensemble``: the request is answered at once by the uniform mixture of the P entries'
     predictions; as labelled batches arrive the weights are learned online (Hedge or
     exponentiated gradient, :mod:`fomo.prompt_ensemble`; P forward passes per batch, no
     training); after ``ensemble.probe_examples`` examples, if the target is not met and
     ``ensemble.then_tune``, tuning starts from the mixed prompt (the weighted average of the
     entries' tensors) or the top-weighted entry (``ensemble.init``);

3. tuning: up to ``max_steps`` optimizer steps, step k on the next batch of the request's
   examples in upload order (cycling), each waiting for its batch's upload and lasting its
   counted FLOPs / F (``compute`` events at the edge);
4. measurement: the request's current answer (tuned state, or ensemble mixture) is measured on
   the task's held-out test set at service start, after every ensemble update and every
   ``eval_every_steps`` steps (``evaluate`` events, no simulated time: the user's own check);
   the job ends as soon as the measured accuracy (``target_metric``: accuracy or balanced
   accuracy) reaches the request's target (the same stopping rule for every variant), or after
   ``max_steps``.

The variants run one after another on the same arrivals, owners and examples (common random
numbers): requests are numbered in arrival order and request i draws its examples from
``child_rng(seed, 42, i)``.

The real work goes through a *tuner* (``fomo.service_tuner.TaskTuner``; netsim never imports
torch): see :class:`ServiceTuner` for the methods used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional, Protocol, Sequence

import numpy as np
import simpy
from pydantic import Field, model_validator

from ..network import Network, child_rng
from ..records import Recorder
from ..service import PoissonArrivals, Request, RequestRecord, ServiceEdge, Slot, UserClass, admission_policy
from ..spec_base import Bool, Float, Int, PositiveFloat, Spec

if TYPE_CHECKING:  # netsim.scenario imports PromptServiceSpec: no import of it at run time
    from ..scenario import Scenario

VARIANTS = ("scratch", "best_single", "oracle", "ensemble")
EXAMPLES_SPAWN_KEY = (42,)
"""Request i's labelled examples: ``child_rng(seed, 42, i)``."""
LIBRARY_SPAWN_KEY = (44,)
"""Library task k's tuning examples: ``child_rng(seed, 44, k)``."""
TASK_NAME = r"^[a-z][a-z0-9_]*/[a-z][a-z0-9_]*$"
TaskName = Annotated[str, Field(pattern=TASK_NAME, max_length=200)]
"""A registered task ``<family>/<name>`` (the full name is checked when the tuner loads it)."""
DeviceIndex = Annotated[Int, Field(ge=0, le=10_000_000)]


# ------------------------------------------------------------------------------------------------
# the scenario section
# ------------------------------------------------------------------------------------------------

class UserClassSpec(Spec):
    """A class of users: Poisson arrivals of rate ``rate_per_s``, each request for one of
    ``tasks`` (drawn uniformly) with data on one of ``owners`` (device indices, drawn
    uniformly; null: every device)."""

    name: str = Field("users", min_length=1, max_length=100)
    rate_per_s: PositiveFloat = Field(0.05, le=1e6, description="arrival rate lambda of the class [1/s] (> 0)")
    tasks: list[TaskName] = Field(default_factory=lambda: ["tweets_sentiment/nfl"], min_length=1,
                                        max_length=100, description="registered tasks (docs/tasks.md) requests ask for")
    owners: Optional[list[DeviceIndex]] = Field(None, min_length=1, description="device indices that hold the "
                                                     "requests' data (null: every device)")
    target_accuracy: Float = Field(0.7, gt=0, le=1, description="accuracy each request asks for")
    relative_deadline_s: Optional[PositiveFloat] = Field(
        None, le=1e9, description="deadline after arrival [s] (> 0; null: no deadline)")
    priority: Int = Field(0, ge=-1000, le=1000, description="smaller is more urgent (discipline: priority)")


class LibrarySpec(Spec):
    """The prompts the edge holds when the service opens, and how it grows."""

    tasks: list[TaskName] = Field(default_factory=lambda: ["tweets_sentiment/airlines"], min_length=1,
                                        max_length=100, description="one entry is tuned for each before the service "
                                        "opens")
    steps: Int = Field(150, ge=1, le=100_000, description="tuning steps per library entry")
    examples: Int = Field(1200, ge=1, le=10_000_000, description="labelled examples per library task")
    add_served: Bool = Field(True, description="every served request adds its final state to the library")
    max_entries: Int = Field(32, ge=1, le=10_000, description="most entries; when full, the oldest served entry "
                             "leaves (the seed entries stay)")


class EnsembleSpec(Spec):
    """How variants ``ensemble`` and ``best_single`` use the library."""

    learner: Literal["hedge", "exponentiated_gradient"] = "hedge"
    loss: Literal["zero_one", "log", "balanced_error"] = Field(
        "log", description="hedge: the bounded loss of an entry, per example (zero_one, log: the clipped log loss) "
        "or per probe batch (balanced_error: 1 - the entry's balanced accuracy on the batch, for targets in "
        "balanced accuracy)")
    probe_examples: Int = Field(32, ge=1, le=1_000_000, description="labelled examples scored by the library before "
                                "tuning starts (rounded up to whole batches)")
    then_tune: Bool = Field(True, description="ensemble: tune after the probe if the target is not met")
    init: Literal["mixed_prompt", "top_entry"] = Field(
        "mixed_prompt", description="ensemble: tuning starts from the weighted average of the entries' tensors, or "
        "from the entry of largest weight")

    @model_validator(mode="after")
    def _loss_fits_learner(self) -> "EnsembleSpec":
        if self.loss != "log" and self.learner == "exponentiated_gradient":
            raise ValueError(f"prompt_service.ensemble.loss={self.loss!r} is a Hedge loss; learner "
                             "exponentiated_gradient learns the mixture's log loss (allowed: loss 'log')")
        return self


class PromptServiceSpec(Spec):
    """Experiment ``prompt_service``: requests, the edge's slots and queue, the variants."""

    variants: list[Literal["scratch", "best_single", "oracle", "ensemble"]] = Field(
        default_factory=lambda: list(VARIANTS), min_length=1, description="how a request's tuning starts")
    serve_with: Literal["scratch", "best_single", "oracle", "ensemble"] = Field(
        "ensemble", description="the variant whose queue metrics are summary.json's top level")
    user_classes: list[UserClassSpec] = Field(default_factory=lambda: [UserClassSpec()], min_length=1, max_length=100)
    horizon_s: PositiveFloat = Field(600.0, le=1e9, description="requests arrive in [0, horizon_s) [s]")
    max_requests: Int = Field(12, ge=1, le=100_000, description="most requests of one run (all classes)")
    slots: Int = Field(1, ge=1, le=10_000, description="compute slots of the edge (c >= 1)")
    capacity: Optional[Int] = Field(None, ge=1, le=1_000_000, description="most requests in the system, waiting "
                                    "or served (K >= slots; null: unlimited)")
    discipline: Literal["fcfs", "priority", "edf"] = "fcfs"
    admission: Literal["always", "memory_fits", "deadline_feasible", "memory_and_deadline"] = "always"
    slot_flops_per_s: Optional[PositiveFloat] = Field(
        None, ge=1e3, le=1e24, description="speed of one slot [FLOP/s] (null: the edge server's "
        "compute_flops_per_s / slots)")
    slot_memory_bytes: Optional[Int] = Field(None, ge=1, le=10**15, description="memory of one slot [bytes] "
                                             "(null: unlimited)")
    upload_bandwidth_hz: Optional[PositiveFloat] = Field(
        None, ge=1, le=1e12, description="uplink band of one owner's upload [Hz] (null: "
        "channel.uplink_bandwidth_hz / slots)")
    examples_per_request: Int = Field(64, ge=1, le=1_000_000, description="labelled examples an owner holds")
    max_steps: Int = Field(40, ge=0, le=1_000_000, description="most tuning steps per request")
    eval_every_steps: Int = Field(10, ge=1, le=1_000_000)
    target_metric: Literal["accuracy", "balanced_accuracy"] = Field(
        "balanced_accuracy", description="what a request's target_accuracy is compared with: test accuracy, or "
        "balanced accuracy (mean per-class recall; the tasks' label priors differ)")
    test_examples: Int = Field(100, ge=1, le=100_000, description="held-out test examples per task")
    bytes_per_token: Int = Field(2, ge=1, le=8, description="bytes of one uploaded token id")
    library: LibrarySpec = LibrarySpec()
    ensemble: EnsembleSpec = EnsembleSpec()

    @model_validator(mode="after")
    def _consistent(self) -> "PromptServiceSpec":
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"prompt_service.variants={self.variants} repeats a variant; allowed: each of "
                             f"{list(VARIANTS)} at most once")
        if self.serve_with not in self.variants:
            raise ValueError(f"prompt_service.serve_with={self.serve_with!r} is not among prompt_service.variants="
                             f"{self.variants}")
        if self.capacity is not None and self.capacity < self.slots:
            raise ValueError(f"prompt_service.capacity={self.capacity} < prompt_service.slots={self.slots}; allowed: "
                             f"null or K >= slots (requests in service count)")
        names = [c.name for c in self.user_classes]
        if len(set(names)) != len(names):
            raise ValueError(f"prompt_service.user_classes names {names} repeat; allowed: unique names")
        return self

    def all_tasks(self) -> list[str]:
        """Library tasks first, then the requests' tasks (each once)."""
        return list(dict.fromkeys([*self.library.tasks, *(t for c in self.user_classes for t in c.tasks)]))


# ------------------------------------------------------------------------------------------------
# what the protocol needs of the real model
# ------------------------------------------------------------------------------------------------

class ServiceTuner(Protocol):   # pragma: no cover - an interface
    """The real model behind the service (``fomo.service_tuner.TaskTuner``); states are opaque."""

    num_classes: int

    def draw_examples(self, task: str, count: int, rng: np.random.Generator) -> np.ndarray: ...
    def labels(self, task: str, examples: np.ndarray) -> np.ndarray: ...
    def fresh_state(self) -> Any: ...
    def start_job(self, task: str, init: Any) -> Any: ...                 # .step(examples) -> loss, .state()
    def test_probabilities(self, states: Sequence[Any], task: str) -> np.ndarray: ...   # (P, n_test, C)
    def test_labels(self, task: str) -> np.ndarray: ...
    def library_probabilities(self, states: Sequence[Any], task: str, examples: np.ndarray) -> tuple[np.ndarray, float]: ...
    def online_ensemble(self, learner: str, num_entries: int, horizon: int, loss: str) -> Any: ...  # .weights, .observe
    def mixed_state(self, states: Sequence[Any], weights: np.ndarray) -> Any: ...
    def step_flops(self, task: str, examples: np.ndarray) -> float: ...
    def worst_step_flops(self, batch_size: int) -> float: ...
    def worst_forward_flops(self, batch_size: int) -> float: ...
    def example_bytes(self, task: str, examples: np.ndarray) -> int: ...
    def job_memory_bytes(self, batch_size: int) -> int: ...


# ------------------------------------------------------------------------------------------------
# the library
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LibraryEntry:
    """One tuned PEFT state of the edge's library: its id (unique in a run), the task it was
    tuned for, where it came from (``seed``: before the service opened; ``served``: a
    request's result) and the request that made it (-1 for seed entries)."""

    entry_id: int
    task: str
    source: str
    state: Any = field(repr=False)
    request_id: int = -1


@dataclass
class SeedLibrary:
    """The entries tuned before the service opens, and what tuning them cost (real steps on
    the host; no simulated time: the edge did it before the run)."""

    entries: list[LibraryEntry]
    steps: int
    flops: float
    accuracies: dict[str, float]   # each entry's test accuracy on its own task


def build_seed_library(tuner: ServiceTuner, spec: PromptServiceSpec, seed: int, batch_size: int) -> SeedLibrary:
    """Tune one entry per ``library.tasks`` from the initial state: ``library.steps`` steps on
    ``library.examples`` examples of the task drawn with ``child_rng(seed, 44, k)``, in
    batches of ``batch_size`` taken in order (cycling)."""
    lib = spec.library
    entries, flops, accuracies = [], 0.0, {}
    for k, task in enumerate(lib.tasks):
        examples = tuner.draw_examples(task, lib.examples, child_rng(seed, *LIBRARY_SPAWN_KEY, k))
        batches = _batches(examples, batch_size)
        job = tuner.start_job(task, tuner.fresh_state())
        for step in range(lib.steps):
            batch = batches[step % len(batches)]
            flops += tuner.step_flops(task, batch)
            job.step(batch)
        state = job.state()
        entries.append(LibraryEntry(k, task, "seed", state))
        accuracies[task] = _accuracy(tuner.test_probabilities([state], task)[0], tuner.test_labels(task))
    return SeedLibrary(entries, lib.steps * len(lib.tasks), flops, accuracies)


def _batches(examples: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]


def _accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(probabilities.argmax(axis=1) == labels))


def balanced_accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean recall over the classes present in ``labels`` (argmax predictions)."""
    predicted = probabilities.argmax(axis=1)
    return float(np.mean([np.mean(predicted[labels == c] == c) for c in np.unique(labels)]))


# ------------------------------------------------------------------------------------------------
# one request's service
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Measurement:
    """The request's answer measured on its task's test set at ``t_s`` [s], after
    ``examples_seen`` labelled examples were used, in the service ``phase`` (``start``,
    ``ensemble``, ``tune``)."""

    t_s: float
    examples_seen: int
    accuracy: float
    balanced_accuracy: float
    phase: str


@dataclass
class ServedRequest:
    """What serving one request produced (a :class:`netsim.service.RequestRecord`'s result)."""

    request_id: int
    task: str
    variant: str
    start_s: float
    init: str          # where tuning started: fresh, entry <id> (<task>), mixed; or "ensemble only"
    curve: list[Measurement] = field(default_factory=list)
    reached_s: Optional[float] = None           # first time the target was met [s]
    examples_to_target: Optional[int] = None
    steps: int = 0
    edge_flops: float = 0.0
    upload_bytes: int = 0
    uploads_done_s: float = 0.0
    library_size: int = 0
    weights: Optional[list[float]] = None       # ensemble: the final weights over the library
    final_state: Any = field(default=None, repr=False)   # the tuned state (None if nothing was tuned)

    @property
    def final(self) -> Measurement:
        return self.curve[-1]


class PromptServiceSimulation:
    """One variant of the service on one SimPy timeline (see the module docstring).

    Parameters
    ----------
    scenario : Scenario
        Uses ``prompt_service``, ``training.batch_size``, the devices (owners' uplinks), the
        channel and the edge server.
    seed : int
        Run seed (arrivals, owners, examples; the network drop uses ``scenario.network_seed``).
    tuner : ServiceTuner
    variant : str
        One of :data:`VARIANTS`.
    seed_library : SeedLibrary
        The entries the library starts with (shared by the variants; never modified).

    Attributes
    ----------
    edge : netsim.service.ServiceEdge
    recorder : Recorder
    library : list[LibraryEntry]
        The library now (seed entries first, then served ones in completion order).
    """

    def __init__(self, scenario: "Scenario", seed: int, tuner: ServiceTuner, variant: str,
                 seed_library: SeedLibrary):
        if variant not in VARIANTS:
            raise ValueError(f"prompt_service variant {variant!r}; allowed: {list(VARIANTS)}")
        if len(scenario.edge_servers) != 1:
            raise ValueError(f"experiment=prompt_service runs on one edge server; edge_servers has "
                             f"{len(scenario.edge_servers)}")
        self.scenario, self.seed, self.tuner, self.variant = scenario, int(seed), tuner, variant
        self.spec = spec = scenario.prompt_service
        self.batch_size = int(scenario.training.batch_size)
        self.env = simpy.Environment()
        self.recorder = Recorder()
        self.network = Network(scenario, scenario.network_seed(seed))
        server = scenario.edge_servers[0]
        self.edge_name = server.name
        self.slot_flops_per_s = float(spec.slot_flops_per_s or server.compute_flops_per_s / spec.slots)
        self.upload_bandwidth_hz = float(spec.upload_bandwidth_hz or scenario.channel.uplink_bandwidth_hz / spec.slots)
        self.library: list[LibraryEntry] = list(seed_library.entries)
        self._next_entry_id = 1 + max(e.entry_id for e in self.library)
        self._test_cache: dict[tuple[Any, str], np.ndarray] = {}
        self._served_s, self._served_count = 0.0, 0      # sum and count of completed services
        self.memory_bytes = int(tuner.job_memory_bytes(self.batch_size))
        self.edge = ServiceEdge(self.env, self._serve, slots=spec.slots, capacity=spec.capacity,
                                discipline=spec.discipline,
                                admission=admission_policy(spec.admission, self.estimate_service_s),
                                slot_memory_bytes=spec.slot_memory_bytes, recorder=self.recorder,
                                name=self.edge_name)
        n = len(self.network.devices)
        classes = []
        for c in spec.user_classes:
            owners = tuple(range(n)) if c.owners is None else tuple(c.owners)
            bad = [o for o in owners if o >= n]
            if bad:
                raise ValueError(f"prompt_service.user_classes {c.name!r}: owners {bad} are not devices; allowed: "
                                 f"0..{n - 1}")
            classes.append(UserClass(c.name, c.rate_per_s, tasks=tuple(c.tasks), owner_devices=owners,
                                     target_accuracy=c.target_accuracy, relative_deadline_s=c.relative_deadline_s,
                                     priority=c.priority, memory_bytes=self.memory_bytes))
        self.arrivals = PoissonArrivals(self.env, classes, self.seed, self.edge.submit, horizon_s=spec.horizon_s,
                                        max_count=spec.max_requests)

    # -------------------------------------------------------------------------------- running
    def run(self) -> list[RequestRecord]:
        """Run until every arrival has been served; returns the edge's records."""
        self.env.run()
        return self.edge.records

    def summary(self) -> dict:
        """The edge's queue metrics (:meth:`netsim.service.ServiceEdge.summary`) over [0, T], T
        the time the last request left (or the last arrival)."""
        return self.edge.summary(max(self.env.now, 1e-12))

    def estimate_service_s(self, request: Request) -> float:
        """Service-time estimate for admission [s]: the mean of the services completed so far,
        or before the first, the budget: the probe (P forward passes per probe batch) plus
        ``max_steps`` steps at the worst-case length, at the slot's speed."""
        if self._served_count:
            return self._served_s / self._served_count
        b, spec = self.batch_size, self.spec
        flops = spec.max_steps * self.tuner.worst_step_flops(b)
        if self.variant in ("best_single", "ensemble"):
            flops += len(self.library) * self._probe_batches() * self.tuner.worst_forward_flops(b)
        return flops / self.slot_flops_per_s

    # -------------------------------------------------------------------------------- service
    def _probe_batches(self) -> int:
        n = self.spec.examples_per_request
        return min(math.ceil(self.spec.ensemble.probe_examples / self.batch_size), math.ceil(n / self.batch_size))

    def _serve(self, request: Request, slot: Slot):
        """The executor: one request on one slot (a SimPy process body)."""
        tuner, spec, task = self.tuner, self.spec, request.task
        examples = tuner.draw_examples(task, spec.examples_per_request,
                                       child_rng(self.seed, *EXAMPLES_SPAWN_KEY, request.request_id))
        batches = _batches(examples, self.batch_size)
        served = ServedRequest(request.request_id, task, self.variant, self.env.now, "fresh",
                               library_size=len(self.library))
        ready_s = self._upload(request, batches, served)
        library = list(self.library)
        labels = tuner.test_labels(task)
        state, offset = None, 0
        if self.variant == "scratch":
            state = tuner.fresh_state()
            self._measure(served, request, self._test_probabilities(("fresh",), state, task), 0, "start")
        elif self.variant == "oracle":
            probs = self._library_test_probabilities(library, task)
            best = int(np.argmax([self._target_value(p, labels) for p in probs]))
            state, served.init = library[best].state, f"entry {library[best].entry_id} ({library[best].task})"
            self._measure(served, request, probs[best], 0, "start")
        else:
            state, offset = yield from self._use_library(request, slot, served, library, batches, ready_s)
        if state is not None and served.reached_s is None:
            yield from self._tune(request, slot, served, state, batches, ready_s, offset)
        if spec.library.add_served:
            self._add_to_library(request, served)
        self._served_s += self.env.now - served.start_s
        self._served_count += 1
        return served

    def _use_library(self, request, slot, served, library, batches, ready_s):
        """Variants best_single and ensemble: score the probe batches with every entry as they
        arrive (P forward passes each). Returns (state tuning starts from or None, batches used)."""
        tuner, task, spec = self.tuner, request.task, self.spec.ensemble
        states = [e.state for e in library]
        test_probs = self._library_test_probabilities(library, task)
        learner = None
        if self.variant == "ensemble":
            learner = tuner.online_ensemble(spec.learner, len(states), self._probe_batches() * self.batch_size,
                                            spec.loss)
            self._measure(served, request, _mix(learner.weights, test_probs), 0, "start")
            if served.reached_s is not None:     # the uniform mixture already meets the target
                served.weights = [float(w) for w in learner.weights]
                served.init = "ensemble only"
                return None, 0
        probe_probs, probe_labels = [], []
        seen = 0
        used = 0
        for j in range(self._probe_batches()):
            yield from self._wait_upload(ready_s[j])
            probs, flops = tuner.library_probabilities(states, task, batches[j])
            yield from self._compute(request, slot, served, flops, "ensemble_forward")
            labels = tuner.labels(task, batches[j])
            probe_probs.append(probs)
            probe_labels.append(labels)
            seen += len(batches[j])
            used = j + 1
            if learner is not None:
                learner.observe(probs, labels)
                self._measure(served, request, _mix(learner.weights, test_probs), seen, "ensemble")
                if served.reached_s is not None:
                    served.weights = [float(w) for w in learner.weights]
                    served.init = "ensemble only"
                    return None, used
        if learner is None:
            probs, labels = np.concatenate(probe_probs, axis=1), np.concatenate(probe_labels)
            best = int(np.argmax([self._target_value(p, labels) for p in probs]))   # ties: the older entry
            served.init = f"entry {library[best].entry_id} ({library[best].task})"
            self._measure(served, request, test_probs[best], seen, "start")
            return library[best].state, used
        weights = np.asarray(learner.weights, dtype=float)
        served.weights = [float(w) for w in weights]
        if not spec.then_tune or self.spec.max_steps == 0:
            served.init = "ensemble only"
            return None, used
        if spec.init == "mixed_prompt":
            state = tuner.mixed_state(states, weights)
            served.init = "mixed"
        else:
            top = int(np.argmax(weights))
            state, served.init = library[top].state, f"entry {library[top].entry_id} ({library[top].task})"
        self._measure(served, request, tuner.test_probabilities([state], task)[0], seen, "tune")
        return state, used

    def _tune(self, request, slot, served, state, batches, ready_s, offset):
        """Up to ``max_steps`` real steps from ``state``, step k on batch (offset + k) mod m."""
        tuner, task, spec = self.tuner, request.task, self.spec
        job = tuner.start_job(task, state)
        n = sum(len(b) for b in batches)
        used = sum(len(batches[i]) for i in range(offset))    # examples the probe used
        for k in range(spec.max_steps):
            j = (offset + k) % len(batches)
            yield from self._wait_upload(ready_s[j])
            yield from self._compute(request, slot, served, tuner.step_flops(task, batches[j]), "tune_step")
            job.step(batches[j])
            served.steps += 1
            used += len(batches[j])
            if (k + 1) % spec.eval_every_steps == 0 or k + 1 == spec.max_steps:
                seen = min(n, used)
                self._measure(served, request, tuner.test_probabilities([job.state()], task)[0], seen, "tune")
                if served.reached_s is not None:
                    break
        if served.steps:
            served.final_state = job.state()

    # -------------------------------------------------------------------------------- timeline
    def _upload(self, request: Request, batches: list[np.ndarray], served: ServedRequest) -> list[float]:
        """The owner's uploads of its batches, back to back from the request's arrival; returns
        the time each batch is at the edge [s]."""
        device = self.network.devices[int(request.owner_device)]
        t = request.arrival_s
        ready = []
        for batch in batches:
            size = self.tuner.example_bytes(request.task, batch)
            duration = device.uplink.transfer_duration_s(8 * size, t, self.upload_bandwidth_hz)
            self.recorder.emit("upload", t_s=t, duration_s=duration, node=device.name, peer=self.edge_name,
                               round=request.request_id, bytes=size, energy_j=device.group.tx_power_w * duration)
            t += duration
            served.upload_bytes += size
            ready.append(t)
        served.uploads_done_s = t
        return ready

    def _wait_upload(self, ready_s: float):
        if ready_s > self.env.now:
            yield self.env.timeout(ready_s - self.env.now)

    def _compute(self, request: Request, slot: Slot, served: ServedRequest, flops: float, what: str):
        duration = flops / self.slot_flops_per_s
        self.recorder.emit("compute", t_s=self.env.now, duration_s=duration, node=self.edge_name,
                           peer=str(request.owner_device), round=request.request_id, flops=flops,
                           group=what, server=f"slot{slot.index}")
        served.edge_flops += flops
        yield self.env.timeout(duration)

    def _measure(self, served: ServedRequest, request: Request, probabilities: np.ndarray, seen: int,
                 phase: str) -> None:
        labels = self.tuner.test_labels(request.task)
        m = Measurement(self.env.now, int(seen), _accuracy(probabilities, labels),
                        balanced_accuracy(probabilities, labels), phase)
        served.curve.append(m)
        self.recorder.emit("evaluate", t_s=m.t_s, node=self.edge_name, peer=str(request.owner_device),
                           round=request.request_id, accuracy=m.accuracy, group=phase)
        value = m.balanced_accuracy if self.spec.target_metric == "balanced_accuracy" else m.accuracy
        if served.reached_s is None and value >= request.target_accuracy:
            served.reached_s, served.examples_to_target = m.t_s, m.examples_seen

    def _target_value(self, probabilities: np.ndarray, labels: np.ndarray) -> float:
        """The ``target_metric`` of argmax predictions."""
        if self.spec.target_metric == "balanced_accuracy":
            return balanced_accuracy(probabilities, labels)
        return _accuracy(probabilities, labels)

    # -------------------------------------------------------------------------------- library
    def _test_probabilities(self, key: tuple, state: Any, task: str) -> np.ndarray:
        if (key, task) not in self._test_cache:
            self._test_cache[(key, task)] = self.tuner.test_probabilities([state], task)[0]
        return self._test_cache[(key, task)]

    def _library_test_probabilities(self, library: list[LibraryEntry], task: str) -> np.ndarray:
        """(P, n_test, C) test-set probabilities of the entries (each computed once per task)."""
        missing = [e for e in library if ((e.entry_id,), task) not in self._test_cache]
        if missing:
            probs = self.tuner.test_probabilities([e.state for e in missing], task)
            for e, p in zip(missing, probs):
                self._test_cache[((e.entry_id,), task)] = p
        return np.stack([self._test_cache[((e.entry_id,), task)] for e in library])

    def _add_to_library(self, request: Request, served: ServedRequest) -> None:
        state, served.final_state = served.final_state, None
        if state is None:    # nothing was tuned (answered by the ensemble alone, or max_steps 0)
            return
        self.library.append(LibraryEntry(self._next_entry_id, request.task, "served", state, request.request_id))
        self._next_entry_id += 1
        if len(self.library) > self.spec.library.max_entries:
            oldest = next((i for i, e in enumerate(self.library) if e.source == "served"), None)
            if oldest is not None:
                self.library.pop(oldest)


def _mix(weights: Any, probabilities: np.ndarray) -> np.ndarray:
    """sum_i w_i p_i over the library axis of (P, n, C) probabilities."""
    return np.einsum("p,pnc->nc", np.asarray(weights, dtype=float), probabilities)
