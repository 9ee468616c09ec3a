"""Device-to-device prompt transfer (DEFT technique 5; SPoT over the sidelink graph), on one
SimPy timeline.

Devices hold soft prompts tuned for their own tasks. A few devices (the *targets*) get a new
task; each finds the prompts held within ``max_hops`` D2D hops, chooses one, fetches it over
the sidelinks, initialises its prompt from it and tunes (Vu et al., SPoT, ACL 2022: a source
prompt transfers best to tasks whose prompts are similar).

Who holds what
--------------
The area around the edge server is cut into Z = len(``tasks``) equal angular sectors (zones);
device d is in zone z(d) = floor(phi_d Z / 2 pi), phi_d its polar angle about the server. The
``targets`` devices (drawn uniformly, ``child_rng(seed, 46)``) hold no prompt; their new task is
their zone's task (or, with ``target_tasks``, one of those drawn uniformly). Every other device
is a *source*: with probability rho = ``locality`` it holds a prompt for its zone's task, else
for a task drawn uniformly from ``tasks`` (``child_rng(seed, 45, d)``), so rho sets how related
neighbours' tasks are. Sources holding the same task hold the same prompt, tuned before the run
for ``source_steps`` steps on ``source_examples`` examples of the task (``child_rng(seed, 48,
z)``, z the task's index; real steps, no simulated time). The edge's library holds the same
prompts, one per task of ``tasks``.

One target k, on the timeline (all targets at once, from t = 0)
----------------------------------------------------------------
* **Discovery** (every variant that fetches from a device): k's query (``query_bytes``) goes
  to each source j within ``max_hops`` hops along the route r_jk (:func:`netsim.sidelink.route`
  by ``route_metric``, for the prompt's size, among the paths of at most ``max_hops`` hops), and j replies with its task embedding e_j
  (D x ``embedding_bytes_per_value`` bytes, D the embedding's length) along r_jk. Discovery
  ends when the last reply has arrived.
* **Choice of a source** among the candidates:

  - ``random_neighbour``: uniform (``child_rng(seed, 49, k)``);
  - ``best_link``: the least expected fetch time tau_j = sum over r_jk of
    bits / (B log2(1 + mean SNR)) (:func:`netsim.sidelink.expected_hop_s`);
  - ``similarity``: k takes its task embedding e_k (below) while discovery runs, then scores
    s_j = cos(e_k, e_j) - c tau_j, c = ``cost_weight_per_s`` (:func:`netsim.sidelink.rank_sources`);
  - ``oracle``: the candidate whose prompt has the best ``target_metric`` on k's test set (it
    uses the test labels, at no cost: an upper bound of the choice);
  - ``edge_library``: no discovery; k takes e_k, uploads it to the edge over its uplink, the
    edge picks the library entry of greatest cos(e_k, e_entry) and sends it over the downlink;
  - ``scratch``: no source, tuning from the initial prompt.

  The task embedding (``embedding``) is either SPoT's, ``prompt``: the soft prompt averaged over
  its virtual tokens (k first tunes its own prompt from scratch for ``warmup_steps`` steps; a
  source's is its tuned prompt's; for a PEFT method without a soft prompt, all trainable
  tensors flattened), or ``text_centroid``: the frozen model's sentence embeddings of the
  device's examples, averaged (one forward pass over k's examples on its processor; a source's
  over the examples its prompt was tuned on). The second needs no tuning but shares a summary
  of the device's texts.
* **Fetch**: the chosen prompt and classification head (the adapter's bytes) go along r_jk,
  store and forward: each hop at its sidelink's per-block rate from the moment the previous hop
  ended (:func:`netsim.sidelink.hop_duration_s`); a device's radio sends one message at a time
  (a FIFO queue per sender), so fetches and replies through one device wait for each other.
* **Tuning**: up to ``max_steps`` real optimizer steps on k's ``examples_per_device`` examples
  (``child_rng(seed, 47, k)``, batches of ``training.batch_size`` in order, cycling), each
  lasting its counted FLOPs on k's processor (:func:`netsim.dynamics.compute_time_energy`).
* **Measurement** (no simulated time): k's current prompt on the task's test set at t = 0 (the
  initial prompt), after the warm-up, when the fetched prompt is in place, and every
  ``eval_every_steps`` steps; k stops as soon as its ``target_metric`` reaches
  ``target_accuracy``. Time-to-target counts from t = 0 (warm-up, discovery and fetch included).

Energy (device side): a D2D hop costs the sender's P_tx T plus the receiver's P_rx T; an uplink
P_tx T, a downlink reception P_rx T (the edge is mains-powered and not counted); computing, the
device's compute energy. A target's energy-to-target sums what was spent on its behalf (its own
computing and every message of its discovery and fetch) up to the moment it reached the target.

Simplifications (documented, each a parameter or a stated limit): the graph is the one at
t = 0 (the transfer takes seconds; mobility is not applied); routes are known to the devices;
D2D hops of different senders do not interfere (each sidelink has its own band
``d2d.bandwidth_hz``); targets that finish do not become sources during the run.

The variants run one after another on the same drop, tasks, targets and examples (common
random numbers). The real work goes through a tuner (``fomo.service_tuner.TaskTuner``); netsim
never imports torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Optional, Protocol, Sequence

import networkx as nx
import numpy as np
import simpy
from pydantic import Field, model_validator

from ..dynamics import compute_time_energy
from ..network import Network, child_rng
from ..records import Recorder
from ..sidelink import expected_hop_s, hop_duration_s, rank_sources, route, sidelink, task_similarity
from ..spec_base import Float, Int, NonNegFloat, PositiveFloat, Spec
from .prompt_service import TaskName, _accuracy, _batches, balanced_accuracy

if TYPE_CHECKING:  # netsim.scenario imports D2DPromptTransferSpec: no import of it at run time
    from ..scenario import Scenario

VARIANTS = ("scratch", "edge_library", "random_neighbour", "best_link", "similarity", "oracle")
FETCHES_FROM_DEVICE = ("random_neighbour", "best_link", "similarity", "oracle")
NEEDS_EMBEDDING = ("similarity", "edge_library")
TASKS_SPAWN_KEY = (45,)
"""Device d's task: ``child_rng(seed, 45, d)``."""
TARGETS_SPAWN_KEY = (46,)
"""Which devices are targets: ``child_rng(seed, 46)``."""
EXAMPLES_SPAWN_KEY = (47,)
"""Target k's labelled examples: ``child_rng(seed, 47, k)``."""
SOURCE_SPAWN_KEY = (48,)
"""The source prompt of task z (its index in ``tasks``): ``child_rng(seed, 48, z)``."""
RANDOM_SPAWN_KEY = (49,)
"""random_neighbour's choice for target k: ``child_rng(seed, 49, k)``."""


class D2DPromptTransferSpec(Spec):
    """Experiment ``d2d_prompt_transfer``: who holds which prompt, who gets a new task, how a
    source is chosen and fetched, and when tuning stops."""

    variants: list[Literal["scratch", "edge_library", "random_neighbour", "best_link", "similarity", "oracle"]] = Field(
        default_factory=lambda: list(VARIANTS), min_length=1, description="where a target's tuning starts")
    tasks: list[TaskName] = Field(
        default_factory=lambda: ["tweets_sentiment/airlines", "tweets_sentiment/apple", "tweets_sentiment/coachella",
                                 "tweets_sentiment/nfl"], min_length=1, max_length=100,
        description="the tasks of the zones: the area around the edge server is cut into len(tasks) equal angular "
        "sectors, sector z has task z")
    locality: Float = Field(0.8, ge=0, le=1, description="probability rho that a source device holds its zone's task "
                            "(otherwise a task drawn uniformly from tasks): task relatedness of neighbours")
    targets: Int = Field(4, ge=1, le=100_000, description="devices that get a new task (drawn uniformly); the others "
                         "are sources that hold a tuned prompt")
    target_tasks: Optional[list[TaskName]] = Field(
        None, min_length=1, max_length=100, description="the new tasks, one drawn uniformly per target (null: the "
        "target's zone task)")
    source_steps: Int = Field(100, ge=1, le=100_000, description="tuning steps of a source's prompt (before the run)")
    source_examples: Int = Field(800, ge=1, le=10_000_000, description="labelled examples a source tuned on")
    examples_per_device: Int = Field(64, ge=1, le=1_000_000, description="labelled examples a target holds")
    embedding: Literal["prompt", "text_centroid"] = Field(
        "text_centroid", description="the task embedding: 'prompt' (SPoT: the soft prompt averaged over its tokens; "
        "a target tunes warmup_steps first) or 'text_centroid' (the frozen model's mean sentence embedding of the "
        "device's examples: one forward pass over them, no tuning)")
    warmup_steps: Int = Field(10, ge=1, le=100_000, description="embedding prompt: steps a target tunes its own "
                              "prompt from scratch before it takes its embedding (similarity, edge_library)")
    max_steps: Int = Field(40, ge=0, le=1_000_000, description="most tuning steps after the start (or the fetch)")
    eval_every_steps: Int = Field(10, ge=1, le=1_000_000)
    target_accuracy: Float = Field(0.45, gt=0, le=1, description="the target_metric a target wants")
    target_metric: Literal["accuracy", "balanced_accuracy"] = "balanced_accuracy"
    test_examples: Int = Field(100, ge=1, le=100_000, description="held-out test examples per task")
    max_hops: Int = Field(1, ge=1, le=64, description="sources within this many D2D hops are candidates")
    route_metric: Literal["expected_time", "hops"] = Field(
        "expected_time", description="multi-hop route: least expected store-and-forward time, or fewest hops")
    cost_weight_per_s: NonNegFloat = Field(1.0, le=1e9, description="similarity: score = cos(e_target, e_source) - "
                                           "c x expected fetch time; c [1/s]")
    embedding_bytes_per_value: Int = Field(4, ge=1, le=8, description="bytes of one value of a task embedding")
    query_bytes: Int = Field(64, ge=1, le=10**9, description="size of a target's discovery query [bytes]")
    downlink_bandwidth_hz: Optional[PositiveFloat] = Field(
        None, ge=1, le=1e12, description="edge_library: downlink band of one fetch [Hz] (null: "
        "channel.downlink_bandwidth_hz)")
    uplink_bandwidth_hz: Optional[PositiveFloat] = Field(
        None, ge=1, le=1e12, description="edge_library: uplink band of the embedding upload [Hz] (null: "
        "channel.uplink_bandwidth_hz)")

    @model_validator(mode="after")
    def _consistent(self) -> "D2DPromptTransferSpec":
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"d2d_prompt_transfer.variants={self.variants} repeats a variant; allowed: each of "
                             f"{list(VARIANTS)} at most once")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"d2d_prompt_transfer.tasks={self.tasks} repeats a task; allowed: distinct tasks")
        return self

    def warms_up(self, variant: str) -> bool:
        """Whether a target of ``variant`` tunes ``warmup_steps`` before choosing (the prompt
        embedding of similarity and edge_library)."""
        return self.embedding == "prompt" and variant in NEEDS_EMBEDDING

    def all_tasks(self) -> list[str]:
        """The zones' tasks, then the targets' new tasks (each once)."""
        return list(dict.fromkeys([*self.tasks, *(self.target_tasks or [])]))

    def check(self, scenario: "Scenario") -> None:
        """What the experiment needs of the shared sections (ValueError naming the fields)."""
        if scenario.trainer != "real":
            raise ValueError(f"experiment=d2d_prompt_transfer needs trainer: real, not {scenario.trainer!r} (targets "
                             "tune the real model)")
        if scenario.d2d.kind == "none":
            raise ValueError("experiment=d2d_prompt_transfer fetches prompts over sidelinks: d2d.kind='none' builds no "
                             "D2D graph; allowed: 'distance' or 'knn'")
        n = scenario.num_devices
        if self.targets >= n:
            raise ValueError(f"d2d_prompt_transfer.targets={self.targets} leaves no source among the {n} devices; "
                             f"allowed: 1..{n - 1}")


# ------------------------------------------------------------------------------------------------
# what the protocol needs of the real model
# ------------------------------------------------------------------------------------------------

class TransferTuner(Protocol):   # pragma: no cover - an interface
    """The real model (``fomo.service_tuner.TaskTuner``); states are opaque."""

    def draw_examples(self, task: str, count: int, rng: np.random.Generator) -> np.ndarray: ...
    def fresh_state(self) -> Any: ...
    def start_job(self, task: str, init: Any) -> Any: ...             # .step(examples) -> loss, .state()
    def test_probabilities(self, states: Sequence[Any], task: str) -> np.ndarray: ...   # (P, n_test, C)
    def test_labels(self, task: str) -> np.ndarray: ...
    def step_flops(self, task: str, examples: np.ndarray) -> float: ...
    def adapter_bytes(self) -> int: ...
    def task_embedding(self, state: Any) -> np.ndarray: ...
    def text_embedding(self, task: str, examples: np.ndarray) -> tuple[np.ndarray, float]: ...   # (vector, FLOPs)


# ------------------------------------------------------------------------------------------------
# who holds what
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Assignment:
    """Zones, the sources' tasks and the targets' new tasks of one drop (see the module
    docstring): ``zone[d]`` for every device, ``source_task[j]`` for every source,
    ``targets`` in increasing order, ``target_task[k]`` for every target."""

    zone: tuple[int, ...]
    source_task: dict[int, str]
    targets: tuple[int, ...]
    target_task: dict[int, str]


def no_sidelink_error(scenario: "Scenario", network: Network) -> Optional[str]:
    """The message refusing a drop whose D2D graph has no sidelink (None when it has one)."""
    if network.d2d.number_of_edges():
        return None
    return (f"the D2D graph of this drop has no sidelink (d2d.kind={scenario.d2d.kind!r}, "
            f"d2d.threshold_m={scenario.d2d.threshold_m}, {len(network.devices)} devices); experiment "
            "d2d_prompt_transfer fetches prompts over sidelinks: raise d2d.threshold_m, or use d2d.kind 'knn'")


def zone_index(position_m: Sequence[float], centre_m: Sequence[float], zones: int) -> int:
    """z = floor(phi Z / 2 pi) with phi in [0, 2 pi) the polar angle of ``position_m`` about
    ``centre_m`` (a device at the centre is in zone 0)."""
    phi = math.atan2(position_m[1] - centre_m[1], position_m[0] - centre_m[0]) % (2.0 * math.pi)
    return min(int(phi * zones / (2.0 * math.pi)), zones - 1)


def assign_tasks(network: Network, spec: D2DPromptTransferSpec, seed: int) -> Assignment:
    """Draw the targets and every device's task (module docstring: zones, locality rho)."""
    n = len(network.devices)
    if not 1 <= spec.targets < n:
        raise ValueError(f"d2d_prompt_transfer.targets={spec.targets}; allowed: 1..{n - 1} (the network has {n} "
                         "devices)")
    centre = network.servers[0].position_m
    zones = len(spec.tasks)
    zone = tuple(zone_index(d.position_m, centre, zones) for d in network.devices)
    targets = tuple(sorted(int(k) for k in child_rng(seed, *TARGETS_SPAWN_KEY).choice(n, size=spec.targets,
                                                                                        replace=False)))
    source_task, target_task = {}, {}
    for d in range(n):
        rng = child_rng(seed, *TASKS_SPAWN_KEY, d)
        if d in targets:
            new = spec.target_tasks
            target_task[d] = spec.tasks[zone[d]] if new is None else new[int(rng.integers(len(new)))]
        else:
            local = rng.random() < spec.locality
            source_task[d] = spec.tasks[zone[d]] if local else spec.tasks[int(rng.integers(zones))]
    return Assignment(zone, source_task, targets, target_task)


@dataclass
class SourcePrompts:
    """The prompts tuned before the run, one per task of ``tasks`` (what sources and the edge
    library hold), their task embeddings and test metrics, and a cache of every prompt's
    test metric on every target task (shared by the variants)."""

    states: dict[str, Any]
    embeddings: dict[str, np.ndarray]
    steps: int
    flops: float
    own_accuracy: dict[str, float]
    metric_cache: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)

    def metrics(self, tuner: TransferTuner, source_task: str, target_task: str) -> tuple[float, float]:
        """(accuracy, balanced accuracy) of the ``source_task`` prompt on ``target_task``'s test set."""
        key = (source_task, target_task)
        if key not in self.metric_cache:
            probs = tuner.test_probabilities([self.states[source_task]], target_task)[0]
            labels = tuner.test_labels(target_task)
            self.metric_cache[key] = (_accuracy(probs, labels), balanced_accuracy(probs, labels))
        return self.metric_cache[key]


def build_source_prompts(tuner: TransferTuner, spec: D2DPromptTransferSpec, seed: int,
                         batch_size: int) -> SourcePrompts:
    """Tune one prompt per task of ``tasks`` from the initial state: ``source_steps`` steps on
    ``source_examples`` examples (``child_rng(seed, 48, z)``), batches in order, cycling; its
    embedding is the tuned prompt's, or the centroid of those examples' texts."""
    states, embeddings, own, flops = {}, {}, {}, 0.0
    for z, task in enumerate(spec.tasks):
        examples = tuner.draw_examples(task, spec.source_examples, child_rng(seed, *SOURCE_SPAWN_KEY, z))
        batches = _batches(examples, batch_size)
        job = tuner.start_job(task, tuner.fresh_state())
        for step in range(spec.source_steps):
            batch = batches[step % len(batches)]
            flops += tuner.step_flops(task, batch)
            job.step(batch)
        states[task] = job.state()
        if spec.embedding == "prompt":
            embeddings[task] = np.asarray(tuner.task_embedding(states[task]), dtype=np.float64)
        else:
            embeddings[task] = np.asarray(tuner.text_embedding(task, examples)[0], dtype=np.float64)
        own[task] = _accuracy(tuner.test_probabilities([states[task]], task)[0], tuner.test_labels(task))
    return SourcePrompts(states, embeddings, spec.source_steps * len(spec.tasks), flops, own)


# ------------------------------------------------------------------------------------------------
# one target's transfer
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Measurement:
    """Target's prompt measured on its task's test set at ``t_s`` [s] after ``steps`` tuning
    steps (warm-up included), in ``phase`` (fresh, warmup, start, tune); ``energy_j`` spent on
    its behalf so far [J]."""

    t_s: float
    steps: int
    accuracy: float
    balanced_accuracy: float
    phase: str
    energy_j: float


@dataclass
class Candidate:
    """A source within reach of a target: its device, task, route (devices from source to
    target), expected fetch time [s] and, once known, the similarity of its embedding to the
    target's and its prompt's metrics on the target's test set."""

    device: int
    task: str
    path: list
    expected_fetch_s: float
    similarity: Optional[float] = None
    accuracy: float = math.nan
    balanced_accuracy: float = math.nan

    @property
    def hops(self) -> int:
        return len(self.path) - 1


@dataclass
class TargetResult:
    """What one target's transfer produced (times [s], energies [J], sizes [bytes])."""

    device: int
    task: str
    zone: int
    variant: str
    candidates: list[Candidate] = field(default_factory=list)
    init: str = "fresh"
    source_device: Optional[int] = None
    source_task: Optional[str] = None
    source_hops: Optional[int] = None
    discovery_end_s: Optional[float] = None
    fetch_start_s: Optional[float] = None
    fetch_end_s: Optional[float] = None
    curve: list[Measurement] = field(default_factory=list)
    reached_s: Optional[float] = None
    energy_to_target_j: Optional[float] = None
    steps: int = 0
    compute_flops: float = 0.0
    compute_energy_j: float = 0.0
    d2d_bytes: int = 0
    d2d_energy_j: float = 0.0
    cellular_bytes: int = 0
    cellular_energy_j: float = 0.0

    @property
    def energy_j(self) -> float:
        return self.compute_energy_j + self.d2d_energy_j + self.cellular_energy_j

    @property
    def final(self) -> Measurement:
        return self.curve[-1]

    @property
    def start(self) -> Measurement:
        """The measurement tuning started from (after the fetch or the warm-up; t = 0 for scratch)."""
        started = [m for m in self.curve if m.phase == "start"]
        return started[-1] if started else self.curve[0]


class D2DTransferSimulation:
    """One variant of D2D prompt transfer on one SimPy timeline (see the module docstring).

    Parameters
    ----------
    scenario : Scenario
        Uses ``d2d_prompt_transfer``, ``d2d``, ``training.batch_size``, the devices, the
        channel and the edge servers.
    seed : int
        Run seed (targets, tasks, examples; the drop uses ``scenario.network_seed``).
    tuner : TransferTuner
    variant : str
        One of :data:`VARIANTS`.
    sources : SourcePrompts
        The prompts the sources and the edge hold (shared by the variants; only its metric
        cache grows).
    """

    def __init__(self, scenario: "Scenario", seed: int, tuner: TransferTuner, variant: str, sources: SourcePrompts):
        if variant not in VARIANTS:
            raise ValueError(f"d2d_prompt_transfer variant {variant!r}; allowed: {list(VARIANTS)}")
        self.scenario, self.seed, self.tuner, self.variant, self.sources = scenario, int(seed), tuner, variant, sources
        self.spec = spec = scenario.d2d_prompt_transfer
        self.batch_size = int(scenario.training.batch_size)
        self.env = simpy.Environment()
        self.recorder = Recorder()
        self.network = Network(scenario, scenario.network_seed(seed))
        self.graph: nx.Graph = self.network.d2d
        error = no_sidelink_error(scenario, self.network)
        if error:
            raise ValueError(error)
        self.assignment = assign_tasks(self.network, spec, self.seed)
        self.d2d_bandwidth_hz = float(scenario.d2d.bandwidth_hz)
        self.uplink_bandwidth_hz = float(spec.uplink_bandwidth_hz or scenario.channel.uplink_bandwidth_hz)
        self.downlink_bandwidth_hz = float(spec.downlink_bandwidth_hz or scenario.channel.downlink_bandwidth_hz)
        self.adapter_bytes = int(tuner.adapter_bytes())
        dim = len(next(iter(sources.embeddings.values())))
        self.embedding_bytes = int(dim * spec.embedding_bytes_per_value)
        self._radios: dict[int, simpy.Resource] = {}
        self.results: dict[int, TargetResult] = {}

    # -------------------------------------------------------------------------------- running
    def run(self) -> dict[int, TargetResult]:
        """Run every target's transfer to its end; returns the results by target device."""
        for k in self.assignment.targets:
            self.env.process(self._target(k))
        self.env.run()
        return self.results

    def candidates(self, k: int) -> list[Candidate]:
        """The sources within ``max_hops`` hops of target k, by device index, with their routes
        (source to target, at most ``max_hops`` hops) and expected fetch times of the adapter."""
        spec, bits = self.spec, 8 * self.adapter_bytes
        reach = nx.single_source_shortest_path_length(self.graph, k, cutoff=spec.max_hops)
        found = []
        for j in sorted(reach):
            if j == k or j not in self.assignment.source_task:
                continue
            try:
                path = route(self.graph, j, k, bits, self.d2d_bandwidth_hz, spec.route_metric, spec.max_hops)
            except ValueError:   # every path crosses a sidelink that carries nothing on average
                continue
            tau = sum(expected_hop_s(self.graph, a, b, bits, self.d2d_bandwidth_hz) for a, b in zip(path, path[1:]))
            found.append(Candidate(j, self.assignment.source_task[j], path, tau))
        return found

    # -------------------------------------------------------------------------------- the target
    def _target(self, k: int):
        spec, tuner = self.spec, self.tuner
        task = self.assignment.target_task[k]
        res = TargetResult(k, task, self.assignment.zone[k], self.variant)
        self.results[k] = res
        examples = tuner.draw_examples(task, spec.examples_per_device, child_rng(self.seed, *EXAMPLES_SPAWN_KEY, k))
        batches = _batches(examples, self.batch_size)
        state = tuner.fresh_state()
        self._measure(res, state, "fresh")
        if self.variant != "scratch" and res.reached_s is None:
            if self.variant in FETCHES_FROM_DEVICE:
                res.candidates = self.candidates(k)
                for c in res.candidates:
                    c.accuracy, c.balanced_accuracy = self.sources.metrics(tuner, c.task, task)
            state, fetched = yield from self._find_start(k, res, state, batches)
            if fetched:
                self._measure(res, state, "start")
        if res.reached_s is None:
            yield from self._tune(k, res, state, batches)

    def _find_start(self, k: int, res: TargetResult, state: Any, batches: list[np.ndarray]):
        """Warm-up, discovery, choice and fetch of the variant; returns (the state tuning starts
        from, whether it was fetched): the fetched prompt, or the fresh or warmed-up one."""
        spec, variant = self.spec, self.variant
        procs = []
        if variant in FETCHES_FROM_DEVICE and res.candidates:
            procs.append(self.env.process(self._discover(k, res)))
        warm = embed = None
        if spec.warms_up(variant):
            warm = self.env.process(self._warm_up(k, res, state, batches))
            procs.append(warm)
        elif variant in NEEDS_EMBEDDING:
            embed = self.env.process(self._embed_texts(k, res, batches))
            procs.append(embed)
        if procs:
            yield simpy.AllOf(self.env, procs)
        own = None
        if warm is not None:
            state = warm.value
            own = self.tuner.task_embedding(state)
            if res.reached_s is not None:
                return state, False
        if embed is not None:
            own = embed.value
        if variant == "edge_library":
            return (yield from self._fetch_from_edge(k, res, own)), True
        if not res.candidates:
            res.init = "warm-up (no source in reach)" if warm is not None else "fresh (no source in reach)"
            return state, False
        chosen = self._choose(k, res, own)
        res.init = f"dev{chosen.device} ({chosen.task}, {chosen.hops} hop{'s' if chosen.hops != 1 else ''})"
        res.source_device, res.source_task, res.source_hops = chosen.device, chosen.task, chosen.hops
        res.fetch_start_s = self.env.now
        yield from self._send(k, res, chosen.path, self.adapter_bytes, "prompt")
        res.fetch_end_s = self.env.now
        return self.sources.states[chosen.task], True

    def _choose(self, k: int, res: TargetResult, own: Optional[np.ndarray]) -> Candidate:
        """The candidate of the variant's rule (``own``: the target's embedding, similarity)."""
        cands = res.candidates
        if self.variant == "random_neighbour":
            return cands[int(child_rng(self.seed, *RANDOM_SPAWN_KEY, k).integers(len(cands)))]
        if self.variant == "best_link":
            return min(cands, key=lambda c: (c.expected_fetch_s, c.device))
        if self.variant == "oracle":
            value = (lambda c: c.balanced_accuracy) if self.spec.target_metric == "balanced_accuracy" else \
                (lambda c: c.accuracy)
            return min(cands, key=lambda c: (-value(c), c.expected_fetch_s, c.device))
        for c in cands:
            c.similarity = task_similarity(own, self.sources.embeddings[c.task])
        ranked = rank_sources(own, {c.device: (self.sources.embeddings[c.task], c.expected_fetch_s) for c in cands},
                              self.spec.cost_weight_per_s)
        best = ranked[0][0]
        return next(c for c in cands if c.device == best)

    def _warm_up(self, k: int, res: TargetResult, state: Any, batches: list[np.ndarray]):
        """``warmup_steps`` steps from ``state``; returns the warmed-up state (measured)."""
        job = self.tuner.start_job(res.task, state)
        for step in range(self.spec.warmup_steps):
            batch = batches[res.steps % len(batches)]
            yield from self._compute(k, res, self.tuner.step_flops(res.task, batch), "warmup_step")
            job.step(batch)
            res.steps += 1
        warmed = job.state()
        self._measure(res, warmed, "warmup")
        return warmed

    def _embed_texts(self, k: int, res: TargetResult, batches: list[np.ndarray]):
        """The target's text centroid over its examples: one forward pass over them on its
        processor; returns the embedding."""
        examples = np.concatenate(batches)
        embedding, flops = self.tuner.text_embedding(res.task, examples)
        yield from self._compute(k, res, flops, "embed")
        return np.asarray(embedding, dtype=np.float64)

    def _discover(self, k: int, res: TargetResult):
        """Query every candidate along its route and wait for every reply (module docstring)."""
        exchanges = [self.env.process(self._exchange(k, res, c)) for c in res.candidates]
        yield simpy.AllOf(self.env, exchanges)
        res.discovery_end_s = self.env.now

    def _exchange(self, k: int, res: TargetResult, c: Candidate):
        yield from self._send(k, res, list(reversed(c.path)), self.spec.query_bytes, "query")
        yield from self._send(k, res, c.path, self.embedding_bytes, "embedding")

    def _fetch_from_edge(self, k: int, res: TargetResult, own: np.ndarray):
        """edge_library: upload e_k, the edge picks the most similar entry, download it."""
        device = self.network.devices[k]
        server = self.network.servers[device.server]
        up = device.uplink.transfer_duration_s(8 * self.embedding_bytes, self.env.now, self.uplink_bandwidth_hz)
        energy = device.group.tx_power_w * up
        self.recorder.emit("uplink", t_s=self.env.now, duration_s=up, node=device.name, peer=server.name, round=k,
                           bytes=self.embedding_bytes, energy_j=energy, group="embedding")
        res.cellular_bytes += self.embedding_bytes
        res.cellular_energy_j += energy
        yield self.env.timeout(up)
        scores = [(task_similarity(own, self.sources.embeddings[t]), -z) for z, t in enumerate(self.spec.tasks)]
        best = self.spec.tasks[-max(scores)[1]]     # the most similar entry; ties: the first in tasks
        down = device.downlink.transfer_duration_s(8 * self.adapter_bytes, self.env.now, self.downlink_bandwidth_hz)
        energy = device.group.rx_power_w * down
        self.recorder.emit("downlink", t_s=self.env.now, duration_s=down, node=device.name, peer=server.name, round=k,
                           bytes=self.adapter_bytes, energy_j=energy, group="prompt")
        res.cellular_bytes += self.adapter_bytes
        res.cellular_energy_j += energy
        res.init, res.source_task = f"edge entry ({best})", best
        res.fetch_start_s = self.env.now
        yield self.env.timeout(down)
        res.fetch_end_s = self.env.now
        return self.sources.states[best]

    def _tune(self, k: int, res: TargetResult, state: Any, batches: list[np.ndarray]):
        """Up to ``max_steps`` steps from ``state``, measured every ``eval_every_steps``."""
        spec, tuner = self.spec, self.tuner
        job = tuner.start_job(res.task, state)
        for step in range(spec.max_steps):
            batch = batches[res.steps % len(batches)]
            yield from self._compute(k, res, tuner.step_flops(res.task, batch), "tune_step")
            job.step(batch)
            res.steps += 1
            if (step + 1) % spec.eval_every_steps == 0 or step + 1 == spec.max_steps:
                self._measure(res, job.state(), "tune")
                if res.reached_s is not None:
                    return

    # -------------------------------------------------------------------------------- timeline
    def _radio(self, device: int) -> simpy.Resource:
        if device not in self._radios:
            self._radios[device] = simpy.Resource(self.env, capacity=1)
        return self._radios[device]

    def _send(self, k: int, res: TargetResult, path: Sequence, size_bytes: int, what: str):
        """Store and forward ``size_bytes`` along ``path`` on behalf of target k: each hop waits
        for its sender's radio, then lasts :func:`netsim.sidelink.hop_duration_s` from then."""
        bits = 8 * int(size_bytes)
        for a, b in zip(path, path[1:]):
            with self._radio(a).request() as turn:
                yield turn
                d = hop_duration_s(self.graph, a, b, bits, self.env.now, self.d2d_bandwidth_hz)
                energy = sidelink(self.graph, a, b).tx_power_w * d + self.network.devices[b].group.rx_power_w * d
                self.recorder.emit("d2d_transfer", t_s=self.env.now, duration_s=d, node=f"dev{a}", peer=f"dev{b}",
                                   round=k, bytes=int(size_bytes), energy_j=energy, group=what)
                res.d2d_bytes += int(size_bytes)
                res.d2d_energy_j += energy
                yield self.env.timeout(d)

    def _compute(self, k: int, res: TargetResult, flops: float, what: str):
        device = self.network.devices[k]
        duration, energy = compute_time_energy(device.group, flops)
        self.recorder.emit("compute", t_s=self.env.now, duration_s=duration, node=device.name, round=k, flops=flops,
                           energy_j=energy, group=what)
        res.compute_flops += flops
        res.compute_energy_j += energy
        yield self.env.timeout(duration)

    def _measure(self, res: TargetResult, state: Any, phase: str) -> None:
        labels = self.tuner.test_labels(res.task)
        probs = self.tuner.test_probabilities([state], res.task)[0]
        m = Measurement(self.env.now, res.steps, _accuracy(probs, labels), balanced_accuracy(probs, labels), phase,
                        res.energy_j)
        res.curve.append(m)
        self.recorder.emit("evaluate", t_s=m.t_s, node=f"dev{res.device}", round=res.device, accuracy=m.accuracy,
                           group=phase)
        value = m.balanced_accuracy if self.spec.target_metric == "balanced_accuracy" else m.accuracy
        if res.reached_s is None and value >= self.spec.target_accuracy:
            res.reached_s, res.energy_to_target_j = m.t_s, m.energy_j
