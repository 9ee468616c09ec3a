"""Fine-tuning as a service: requests arrive at the edge, queue for its compute slots, are served.

A request asks the edge to fine-tune the foundation model for one task with the data of one
owner device, to a target accuracy, before an (optional) deadline. This module is the
queueing core of that service, torch-free and independent of what serving means:

* **arrivals** -- :class:`PoissonArrivals` (one Poisson process of rate lambda_k [1/s] per user
  class k: exponential inter-arrival times of mean 1 / lambda_k) or :class:`TraceArrivals`
  (a sorted list of arrival times and request fields); both are SimPy processes that hand each
  :class:`Request` to a callback (normally :meth:`ServiceEdge.submit`);
* **the edge** -- :class:`ServiceEdge`: ``c`` compute slots (a SimPy
  :class:`~simpy.resources.resource.PriorityResource` of capacity c), an optional system capacity
  K (requests in the system, waiting or in service; an arrival that finds K is *blocked*), a
  non-preemptive queue discipline (``fcfs``, ``priority``, ``edf``) and an admission policy
  ``admit(request, now_s, state) -> (bool, reason)`` (a refused arrival is *rejected*);
* **service** -- an executor ``serve(request, slot)``, a SimPy process body; its return value is
  kept as the request's ``result``. :func:`surrogate_service` waits ``request.work`` seconds
  (a drawn service time), which makes the edge an M/G/c/K queue for the theory tests; the real
  fine-tuning plugs in here.

Randomness (``netsim.network.child_rng``): user class k draws its inter-arrival times from
``child_rng(seed, *ARRIVAL_SPAWN_KEY, k)`` and its request attributes (owner device, work) from
``child_rng(seed, *ATTRIBUTE_SPAWN_KEY, k)``, so adding a class, or changing how one class's
work is drawn, leaves the arrival times of every class unchanged, and a queue discipline
change leaves every request's work unchanged (common random numbers).

Queueing theory the tests compare against (Kleinrock, *Queueing Systems, Vol. 1: Theory*,
Wiley 1975, sections 3.2-3.6 and 5.7; Cobham 1954 for priorities) is in the functions at the end
of this module: :func:`mm1_mean_wait_s`, :func:`md1_mean_wait_s`, :func:`erlang_c`,
:func:`mmc_mean_wait_s`, :func:`mm1k_blocking_probability`, :func:`mm1k_mean_in_system`,
:func:`priority_mean_waits_s`.

Bounded time and memory: one run creates at most :data:`MAX_REQUESTS` requests; an arrival
process whose expected count exceeds it, or that has neither a horizon nor a count, is refused.
"""
from __future__ import annotations

import heapq
import inspect
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Generator, Mapping, Optional, Sequence

import numpy as np
import simpy

from .network import child_rng
from .records import Recorder

MAX_REQUESTS = 1_000_000
"""Most requests one arrival process may create (time and memory of a run are linear in it)."""

ARRIVAL_SPAWN_KEY = (40,)
"""User class k's inter-arrival times: ``child_rng(seed, 40, k)``."""

ATTRIBUTE_SPAWN_KEY = (41,)
"""User class k's request attributes (owner device, then work): ``child_rng(seed, 41, k)``."""

DISCIPLINES = ("fcfs", "priority", "edf")
OUTCOMES = ("admitted", "blocked", "rejected")
_REQUEST_FIELDS = ("user_class", "task", "owner_device", "target_accuracy", "deadline_s", "priority", "work",
                   "memory_bytes")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------------------
# requests
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Request:
    """One fine-tuning request.

    Attributes
    ----------
    request_id : int
        Unique within a run (>= 0); arrival processes number requests 0, 1, ... in arrival order.
    user_class : str
        The class of user that sent it.
    arrival_s : float
        Simulated arrival time [s] (>= 0).
    task : str
        The task to fine-tune for (a task registry name; opaque here).
    owner_device : int | str
        The device that holds the request's labelled data (opaque here).
    target_accuracy : float
        Accuracy the user asks for, in [0, 1] (0: any).
    deadline_s : float or None
        Absolute simulated time [s] by which service must end (>= arrival_s); None: no deadline.
    priority : int
        Smaller is more urgent (the ``priority`` discipline).
    work : object
        What the executor serves: a service time [s] for :func:`surrogate_service`, a training
        job for the real service.
    memory_bytes : int
        Memory the request's job needs on one slot [bytes] (>= 0).
    """

    request_id: int
    user_class: str
    arrival_s: float
    task: str = ""
    owner_device: Any = ""
    target_accuracy: float = 0.0
    deadline_s: Optional[float] = None
    priority: int = 0
    work: Any = None
    memory_bytes: int = 0

    def __post_init__(self):
        where = f"Request {self.request_id!r}"
        if not _is_int(self.request_id) or self.request_id < 0:
            raise ValueError(f"{where}: request_id = {self.request_id!r}; allowed: an integer >= 0")
        if not _is_real(self.arrival_s) or not math.isfinite(self.arrival_s) or self.arrival_s < 0:
            raise ValueError(f"{where}: arrival_s = {self.arrival_s!r}; allowed: a finite time >= 0 s")
        _check_request_attributes(where, self.target_accuracy, self.priority, self.memory_bytes)
        if self.deadline_s is not None and (not _is_real(self.deadline_s) or not math.isfinite(self.deadline_s)
                                            or self.deadline_s < self.arrival_s):
            raise ValueError(f"{where}: deadline_s = {self.deadline_s!r} with arrival_s = {self.arrival_s!r}; "
                             f"allowed: None or a finite time >= arrival_s (the deadline is absolute)")


def _check_request_attributes(where: str, target_accuracy, priority, memory_bytes) -> None:
    if not _is_real(target_accuracy) or not 0.0 <= target_accuracy <= 1.0:
        raise ValueError(f"{where}: target_accuracy = {target_accuracy!r}; allowed: a number in [0, 1]")
    if not _is_int(priority):
        raise ValueError(f"{where}: priority = {priority!r}; allowed: an integer (smaller = more urgent)")
    if not _is_int(memory_bytes) or memory_bytes < 0:
        raise ValueError(f"{where}: memory_bytes = {memory_bytes!r}; allowed: an integer >= 0")


@dataclass(frozen=True)
class UserClass:
    """A class of users whose requests arrive as a Poisson process of rate ``rate_per_s``.

    Each request of the class gets ``task``, ``target_accuracy``, ``priority``,
    ``memory_bytes``, the deadline ``arrival_s + relative_deadline_s`` (None: no deadline), an
    owner device drawn uniformly from ``owner_devices`` and the work ``work(rng)`` (None: no
    work), both drawn from the class's attribute stream. With ``tasks`` (a non-empty
    sequence), the task is drawn uniformly from it first, and ``task`` is ignored.
    """

    name: str
    rate_per_s: float
    task: str = ""
    owner_devices: Sequence[Any] = ("",)
    target_accuracy: float = 0.0
    relative_deadline_s: Optional[float] = None
    priority: int = 0
    memory_bytes: int = 0
    work: Optional[Callable[[np.random.Generator], Any]] = None
    tasks: Sequence[str] = ()

    def __post_init__(self):
        where = f"UserClass {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"UserClass.name = {self.name!r}; allowed: a non-empty string")
        if not _is_real(self.rate_per_s) or not math.isfinite(self.rate_per_s) or self.rate_per_s <= 0:
            raise ValueError(f"{where}: rate_per_s = {self.rate_per_s!r}; allowed: a finite arrival rate > 0 per s")
        if len(self.owner_devices) == 0:
            raise ValueError(f"{where}: owner_devices is empty; allowed: at least one device")
        if self.relative_deadline_s is not None and (not _is_real(self.relative_deadline_s)
                                                     or not math.isfinite(self.relative_deadline_s)
                                                     or self.relative_deadline_s <= 0):
            raise ValueError(f"{where}: relative_deadline_s = {self.relative_deadline_s!r}; "
                             f"allowed: None or a finite time > 0 s after arrival")
        if self.work is not None and not callable(self.work):
            raise ValueError(f"{where}: work = {self.work!r}; allowed: None or a callable work(rng)")
        _check_request_attributes(where, self.target_accuracy, self.priority, self.memory_bytes)

    def make(self, request_id: int, arrival_s: float, rng: np.random.Generator) -> Request:
        """The class's request arriving at ``arrival_s``; draws the task (if ``tasks`` has
        several), the owner device, then the work."""
        task = self.task
        if len(self.tasks) == 1:
            task = self.tasks[0]
        elif len(self.tasks) > 1:
            task = self.tasks[int(rng.integers(len(self.tasks)))]
        owners = self.owner_devices
        owner = owners[int(rng.integers(len(owners)))] if len(owners) > 1 else owners[0]
        work = self.work(rng) if self.work is not None else None
        deadline = None if self.relative_deadline_s is None else arrival_s + self.relative_deadline_s
        return Request(request_id, self.name, arrival_s, task=task, owner_device=owner,
                       target_accuracy=self.target_accuracy, deadline_s=deadline, priority=self.priority, work=work,
                       memory_bytes=self.memory_bytes)


# ------------------------------------------------------------------------------------------------
# arrival processes
# ------------------------------------------------------------------------------------------------

def _check_bounds(source: str, horizon_s: Optional[float], max_count: Optional[int]) -> None:
    if horizon_s is not None and (not _is_real(horizon_s) or not math.isfinite(horizon_s) or horizon_s <= 0):
        raise ValueError(f"{source}: horizon_s = {horizon_s!r}; allowed: None or a finite time > 0 s")
    if max_count is not None and (not _is_int(max_count) or not 1 <= max_count <= MAX_REQUESTS):
        raise ValueError(f"{source}: max_count = {max_count!r}; allowed: None or an integer in "
                         f"[1, {MAX_REQUESTS}] (MAX_REQUESTS)")


class _ArrivalSource:
    """Numbers requests in arrival order and stops at ``horizon_s`` (arrivals in [0, horizon_s))
    or after ``max_count`` requests (of all classes together), whichever comes first."""

    def __init__(self, env: simpy.Environment, on_arrival: Callable[[Request], Any], horizon_s, max_count):
        if not callable(on_arrival):
            raise ValueError(f"{type(self).__name__}: on_arrival = {on_arrival!r}; allowed: a callable "
                             f"on_arrival(request)")
        self.env = env
        self.on_arrival = on_arrival
        self.horizon_s = None if horizon_s is None else float(horizon_s)
        self.max_count = MAX_REQUESTS if max_count is None else int(max_count)
        self.count = 0

    def _open(self, arrival_s: float) -> bool:
        """Whether an arrival at ``arrival_s`` still belongs to the process."""
        return self.count < self.max_count and (self.horizon_s is None or arrival_s < self.horizon_s)

    def _emit(self, request: Request) -> None:
        self.count += 1
        self.on_arrival(request)


class PoissonArrivals(_ArrivalSource):
    """Independent Poisson arrivals per user class, fed to ``on_arrival`` (a SimPy process each).

    Class k's inter-arrival times are exponential of mean 1 / lambda_k, drawn from
    ``child_rng(seed, *ARRIVAL_SPAWN_KEY, k)``; its request attributes from
    ``child_rng(seed, *ATTRIBUTE_SPAWN_KEY, k)`` (:meth:`UserClass.make`). The superposition is
    a Poisson process of rate sum_k lambda_k.

    Parameters
    ----------
    env : simpy.Environment
    classes : sequence of UserClass
        At least one; names unique.
    seed : int
        Run seed of the arrival streams.
    on_arrival : callable
        ``on_arrival(request)`` at each arrival (e.g. :meth:`ServiceEdge.submit`).
    horizon_s : float, optional
        Arrivals at simulated times in [0, horizon_s) only.
    max_count : int, optional
        At most this many requests (all classes together; <= MAX_REQUESTS).

    At least one of horizon_s and max_count is required, and the expected count
    sum_k lambda_k x horizon_s must not exceed :data:`MAX_REQUESTS` unless max_count bounds it.

    Attributes
    ----------
    process : simpy.Process
        Ends when every class has stopped.
    count : int
        Requests created so far.
    """

    def __init__(self, env: simpy.Environment, classes: Sequence[UserClass], seed: int,
                 on_arrival: Callable[[Request], Any], *, horizon_s: Optional[float] = None,
                 max_count: Optional[int] = None):
        classes = list(classes)
        if not classes or not all(isinstance(c, UserClass) for c in classes):
            raise ValueError(f"PoissonArrivals: classes = {classes!r}; allowed: a non-empty list of UserClass")
        names = [c.name for c in classes]
        if len(set(names)) != len(names):
            raise ValueError(f"PoissonArrivals: user class names {names} repeat; allowed: unique names")
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"PoissonArrivals: seed = {seed!r}; allowed: an integer >= 0")
        _check_bounds("PoissonArrivals", horizon_s, max_count)
        if horizon_s is None and max_count is None:
            raise ValueError("PoissonArrivals: horizon_s and max_count are both None; allowed: set at least one "
                             "(the arrival process must end)")
        if max_count is None:
            expected = sum(c.rate_per_s for c in classes) * horizon_s
            if expected > MAX_REQUESTS:
                raise ValueError(f"PoissonArrivals: rate_per_s (sum {sum(c.rate_per_s for c in classes):g} per s over "
                                 f"classes {names}) x horizon_s = {horizon_s:g} s would create about {expected:.3g} "
                                 f"requests; allowed: at most MAX_REQUESTS = {MAX_REQUESTS} (lower rate_per_s or "
                                 f"horizon_s, or set max_count)")
        super().__init__(env, on_arrival, horizon_s, max_count)
        self.classes = classes
        processes = [env.process(self._class_arrivals(k, c, seed)) for k, c in enumerate(classes)]
        self.process = env.process(self._all(processes))

    def _all(self, processes):
        yield self.env.all_of(processes)

    def _class_arrivals(self, k: int, user_class: UserClass, seed: int):
        gaps = child_rng(seed, *ARRIVAL_SPAWN_KEY, k)
        attributes = child_rng(seed, *ATTRIBUTE_SPAWN_KEY, k)
        mean_gap_s = 1.0 / user_class.rate_per_s
        while True:
            gap = float(gaps.exponential(mean_gap_s))
            if not self._open(self.env.now + gap):
                return
            yield self.env.timeout(gap)
            if not self._open(self.env.now):   # another class reached max_count meanwhile
                return
            self._emit(user_class.make(self.count, self.env.now, attributes))


class TraceArrivals(_ArrivalSource):
    """Arrivals replayed from a trace: ``[(arrival_s, fields), ...]`` sorted by arrival_s.

    ``fields`` is a mapping of :class:`Request` fields other than request_id and arrival_s
    (``user_class`` defaults to ``"trace"``); ``deadline_s`` is absolute. Requests are numbered
    in trace order; a request's arrival_s is the simulated time it is emitted at (the trace's
    time, or 1 ulp from it where now + (t - now) rounds). The trace is checked whole before the
    run (at most MAX_REQUESTS entries).

    Attributes
    ----------
    process : simpy.Process
        Ends after the last arrival.
    count : int
        Requests created so far.
    """

    def __init__(self, env: simpy.Environment, trace: Sequence[tuple[float, Mapping[str, Any]]],
                 on_arrival: Callable[[Request], Any], *, horizon_s: Optional[float] = None,
                 max_count: Optional[int] = None):
        _check_bounds("TraceArrivals", horizon_s, max_count)
        trace = list(trace)
        if len(trace) > MAX_REQUESTS:
            raise ValueError(f"TraceArrivals: the trace has {len(trace)} entries; allowed: at most "
                             f"MAX_REQUESTS = {MAX_REQUESTS}")
        self.requests = [self._request(i, entry) for i, entry in enumerate(trace)]
        for i in range(1, len(self.requests)):
            if self.requests[i].arrival_s < self.requests[i - 1].arrival_s:
                raise ValueError(f"TraceArrivals: entry {i} arrives at {self.requests[i].arrival_s!r} s, before "
                                 f"entry {i - 1} ({self.requests[i - 1].arrival_s!r} s); allowed: a trace sorted "
                                 f"by arrival_s")
        super().__init__(env, on_arrival, horizon_s, max_count)
        self.process = env.process(self._replay())

    @staticmethod
    def _request(i: int, entry) -> Request:
        try:
            arrival_s, fields = entry
        except (TypeError, ValueError):
            raise ValueError(f"TraceArrivals: entry {i} = {entry!r}; allowed: a pair (arrival_s, fields)") from None
        if not isinstance(fields, Mapping):
            raise ValueError(f"TraceArrivals: entry {i}: fields = {fields!r}; allowed: a mapping of Request fields")
        unknown = sorted(set(fields) - set(_REQUEST_FIELDS))
        if unknown:
            raise ValueError(f"TraceArrivals: entry {i}: unknown field(s) {unknown}; allowed: {list(_REQUEST_FIELDS)}")
        values = {"user_class": "trace", **fields}
        if not _is_real(arrival_s) or not math.isfinite(arrival_s) or arrival_s < 0:
            raise ValueError(f"TraceArrivals: entry {i}: arrival_s = {arrival_s!r}; allowed: a finite time >= 0 s")
        try:
            return Request(i, arrival_s=float(arrival_s), **values)
        except ValueError as err:
            raise ValueError(f"TraceArrivals: entry {i}: {err}") from None

    def _replay(self):
        for request in self.requests:
            if not self._open(request.arrival_s):
                return
            if request.arrival_s > self.env.now:
                yield self.env.timeout(request.arrival_s - self.env.now)
            if self.env.now != request.arrival_s:   # now + (t - now) may round to t +- 1 ulp
                deadline = request.deadline_s
                request = replace(request, arrival_s=self.env.now,
                                  deadline_s=None if deadline is None else max(deadline, self.env.now))
            self._emit(request)


# ------------------------------------------------------------------------------------------------
# the edge: per-request records, the state admission policies see
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Slot:
    """One compute slot of the edge: its index (0 .. c-1) and memory [bytes] (None: unlimited)."""

    index: int
    memory_bytes: Optional[int]


@dataclass
class RequestRecord:
    """What happened to one request.

    ``outcome``: ``admitted``, ``blocked`` (the system held K requests) or ``rejected`` (the
    admission policy refused, ``reason`` says why). ``start_s`` / ``end_s``: service start and
    end [s] (None until they happen); ``slot``: the slot index; ``result``: the executor's
    return value.
    """

    request: Request
    outcome: str
    reason: str = ""
    slot: Optional[int] = None
    start_s: Optional[float] = None
    end_s: Optional[float] = None
    result: Any = None

    @property
    def completed(self) -> bool:
        return self.end_s is not None

    @property
    def wait_s(self) -> Optional[float]:
        """Waiting time W_q = start - arrival [s] (None before service starts)."""
        return None if self.start_s is None else self.start_s - self.request.arrival_s

    @property
    def service_s(self) -> Optional[float]:
        """Service time S = end - start [s] (None before service ends)."""
        return None if self.end_s is None else self.end_s - self.start_s

    @property
    def sojourn_s(self) -> Optional[float]:
        """Sojourn (response) time W = end - arrival = W_q + S [s] (None before service ends)."""
        return None if self.end_s is None else self.end_s - self.request.arrival_s

    @property
    def met_deadline(self) -> bool:
        """Completed, and by its deadline (end_s <= deadline_s) if it has one."""
        return self.completed and (self.request.deadline_s is None or self.end_s <= self.request.deadline_s)


def discipline_key(discipline: str, request: Request, seq: int) -> tuple:
    """Sort key of a waiting request (smaller is served first); ``seq`` breaks ties in
    submission order.

    * ``fcfs``: (0, arrival_s, seq);
    * ``priority``: (priority, arrival_s, seq) -- non-preemptive head-of-line priority;
    * ``edf``: (deadline_s, arrival_s, seq), a request without deadline as deadline +inf.
    """
    if discipline == "fcfs":
        return (0, request.arrival_s, seq)
    if discipline == "priority":
        return (request.priority, request.arrival_s, seq)
    if discipline == "edf":
        return (math.inf if request.deadline_s is None else request.deadline_s, request.arrival_s, seq)
    raise ValueError(f"discipline = {discipline!r}; allowed: {list(DISCIPLINES)}")


class EdgeState:
    """Read-only view of a :class:`ServiceEdge` for admission policies (computed on demand)."""

    def __init__(self, edge: "ServiceEdge"):
        self._edge = edge

    @property
    def now_s(self) -> float:
        return self._edge.env.now

    @property
    def slots(self) -> int:
        return self._edge.slots

    @property
    def idle_slots(self) -> int:
        return self._edge.slots - len(self._edge._in_service)

    @property
    def in_system(self) -> int:
        """Requests waiting or in service."""
        return len(self._edge._waiting) + len(self._edge._in_service)

    @property
    def capacity(self) -> Optional[int]:
        return self._edge.capacity

    @property
    def slot_memory_bytes(self) -> Optional[int]:
        return self._edge.slot_memory_bytes

    @property
    def discipline(self) -> str:
        return self._edge.discipline

    @property
    def in_service(self) -> tuple[tuple[Request, float], ...]:
        """``(request, start_s)`` of the requests in service, by slot index."""
        return tuple(self._edge._in_service[s] for s in sorted(self._edge._in_service))

    def ahead_of(self, request: Request) -> tuple[Request, ...]:
        """Waiting requests the discipline would serve before ``request`` if it were admitted
        now, in service order (later arrivals may still overtake it under priority and edf)."""
        key = discipline_key(self.discipline, request, self._edge._seq)
        ahead = sorted((k, r.request_id, r) for k, r in self._edge._waiting.values() if k < key)
        return tuple(r for _, _, r in ahead)


# ------------------------------------------------------------------------------------------------
# admission policies: admit(request, now_s, state) -> (bool, reason)
# ------------------------------------------------------------------------------------------------

AdmissionPolicy = Callable[[Request, float, EdgeState], tuple[bool, str]]


def always(request: Request, now_s: float, state: EdgeState) -> tuple[bool, str]:
    """Admit every request."""
    return True, ""


def memory_fits(request: Request, now_s: float, state: EdgeState) -> tuple[bool, str]:
    """Admit if the request's job fits one slot: memory_bytes <= slot memory (unlimited: always)."""
    if state.slot_memory_bytes is None or request.memory_bytes <= state.slot_memory_bytes:
        return True, ""
    return False, "memory_exceeded"


def estimated_start_s(request: Request, state: EdgeState, estimate_service_s: Callable[[Request], float]) -> float:
    """Estimated service start [s] of ``request`` if admitted now, with no further arrivals.

    List scheduling of the known work: each slot is free at now + max(S^_j - (now - start_j), 0)
    (in service, S^ = ``estimate_service_s``) or now (idle); the waiting requests served before
    this one (:meth:`EdgeState.ahead_of`) take, in order, the slot that frees first, each
    holding it S^_i; the request starts when a slot frees next. Exact for FCFS when the
    estimates are the service times; under ``priority`` and ``edf`` a lower bound (a later,
    more urgent arrival may overtake).
    """
    now = state.now_s
    free = [now + max(estimate_service_s(r) - (now - start), 0.0) for r, start in state.in_service]
    free += [now] * state.idle_slots
    heapq.heapify(free)
    for ahead in state.ahead_of(request):
        heapq.heapreplace(free, free[0] + estimate_service_s(ahead))
    return free[0]


class DeadlineFeasible:
    """Admit if the request's deadline looks feasible:
    now + estimated wait + estimated service <= deadline_s, i.e.
    :func:`estimated_start_s` + S^(request) <= deadline_s. A request without deadline is admitted.

    Parameters
    ----------
    estimate_service_s : callable
        ``estimate_service_s(request) -> float`` [s], e.g. ``lambda r: r.work`` for
        :func:`surrogate_service`, or FLOPs of the job / slot FLOP/s for fine-tuning.
    """

    def __init__(self, estimate_service_s: Callable[[Request], float]):
        if not callable(estimate_service_s):
            raise ValueError(f"DeadlineFeasible: estimate_service_s = {estimate_service_s!r}; allowed: a callable "
                             f"estimate_service_s(request) -> seconds")
        self.estimate_service_s = estimate_service_s

    def __call__(self, request: Request, now_s: float, state: EdgeState) -> tuple[bool, str]:
        if request.deadline_s is None:
            return True, ""
        end = estimated_start_s(request, state, self.estimate_service_s) + self.estimate_service_s(request)
        return (True, "") if end <= request.deadline_s else (False, "deadline_infeasible")


def deadline_feasible(estimate_service_s: Callable[[Request], float]) -> DeadlineFeasible:
    """The :class:`DeadlineFeasible` policy with the given service-time estimator."""
    return DeadlineFeasible(estimate_service_s)


def all_of(*policies: AdmissionPolicy) -> AdmissionPolicy:
    """Admit if every policy admits; the reason is the first refusal's (policies run in order)."""
    for p in policies:
        if not callable(p):
            raise ValueError(f"all_of: policy {p!r}; allowed: callables admit(request, now_s, state)")

    def admit(request: Request, now_s: float, state: EdgeState) -> tuple[bool, str]:
        for policy in policies:
            ok, reason = policy(request, now_s, state)
            if not ok:
                return False, reason
        return True, ""

    return admit


ADMISSION_POLICIES = ("always", "memory_fits", "deadline_feasible", "memory_and_deadline")


def admission_policy(name: str, estimate_service_s: Optional[Callable[[Request], float]] = None) -> AdmissionPolicy:
    """The built-in policy called ``name`` (one of :data:`ADMISSION_POLICIES`; the deadline
    policies need ``estimate_service_s``); ``memory_and_deadline`` checks memory first."""
    if name not in ADMISSION_POLICIES:
        raise ValueError(f"admission = {name!r}; allowed: {list(ADMISSION_POLICIES)}")
    if name == "always":
        return always
    if name == "memory_fits":
        return memory_fits
    if estimate_service_s is None:
        raise ValueError(f"admission = {name!r} needs estimate_service_s (a service-time estimator)")
    deadline = DeadlineFeasible(estimate_service_s)
    return deadline if name == "deadline_feasible" else all_of(memory_fits, deadline)


# ------------------------------------------------------------------------------------------------
# executors: serve(request, slot) -> generator (a SimPy process body)
# ------------------------------------------------------------------------------------------------

Executor = Callable[[Request, Slot], Generator]


def surrogate_service(env: simpy.Environment) -> Executor:
    """Executor that serves a request by holding its slot ``request.work`` seconds (a drawn
    service time, finite and >= 0); returns None."""

    def serve(request: Request, slot: Slot):
        duration = request.work
        if not _is_real(duration) or not math.isfinite(duration) or duration < 0:
            raise ValueError(f"surrogate_service: request {request.request_id}: work = {duration!r}; allowed: a "
                             f"finite service time >= 0 s")
        yield env.timeout(float(duration))

    return serve


# ------------------------------------------------------------------------------------------------
# the edge
# ------------------------------------------------------------------------------------------------

class _Level:
    """A piecewise-constant count n(t) and its integral int_0^t n(u) du."""

    def __init__(self) -> None:
        self.value = 0
        self._area = 0.0
        self._since_s = 0.0

    def change(self, now_s: float, delta: int) -> None:
        self._area += self.value * (now_s - self._since_s)
        self._since_s = now_s
        self.value += delta

    def integral(self, until_s: float) -> float:
        """int_0^until n(t) dt for until_s >= the last change."""
        return self._area + self.value * (until_s - self._since_s)


class ServiceEdge:
    """An edge serving requests on ``slots`` compute slots (non-preemptive, work-conserving).

    An arrival (:meth:`submit`) that finds ``capacity`` requests in the system is blocked; else
    the admission policy decides; an admitted request waits in the discipline's order
    (:func:`discipline_key`) for a free slot (the lowest free index), is served by
    ``serve(request, slot)`` and leaves. With Poisson arrivals, i.i.d. service times and
    ``always`` this is the M/G/c/K queue (K = capacity, infinite if None).

    Parameters
    ----------
    env : simpy.Environment
    serve : callable
        Executor ``serve(request, slot) -> generator`` (:func:`surrogate_service`, or the real
        fine-tuning); its return value becomes the record's ``result``.
    slots : int
        c >= 1 compute slots.
    capacity : int, optional
        K >= c, most requests in the system (waiting + in service); None: unlimited.
    discipline : str
        ``fcfs``, ``priority`` or ``edf`` (non-preemptive).
    admission : callable
        ``admit(request, now_s, state) -> (bool, reason)``; default :func:`always`.
    slot_memory_bytes : int, optional
        Memory of one slot [bytes] (for :func:`memory_fits`); None: unlimited.
    recorder : Recorder, optional
        Gets ``request_arrival``, ``request_blocked``, ``request_rejected`` (at arrival),
        ``request_wait`` (arrival to start) and ``request_service`` (start to end) events;
        ``node`` = ``name``, ``peer`` = owner device, ``round`` = request_id.
    name : str
        The edge's name in the event log.

    Attributes
    ----------
    records : list of RequestRecord
        One per submitted request, in arrival order.
    """

    def __init__(self, env: simpy.Environment, serve: Executor, *, slots: int = 1, capacity: Optional[int] = None,
                 discipline: str = "fcfs", admission: AdmissionPolicy = always,
                 slot_memory_bytes: Optional[int] = None, recorder: Optional[Recorder] = None, name: str = "edge"):
        if not _is_int(slots) or slots < 1:
            raise ValueError(f"ServiceEdge: slots = {slots!r}; allowed: an integer >= 1 (compute slots)")
        if capacity is not None and (not _is_int(capacity) or capacity < slots):
            raise ValueError(f"ServiceEdge: capacity = {capacity!r} with slots = {slots}; allowed: None (unlimited) "
                             f"or an integer K >= slots (requests in the system, in service included)")
        if discipline not in DISCIPLINES:
            raise ValueError(f"ServiceEdge: discipline = {discipline!r}; allowed: {list(DISCIPLINES)}")
        if slot_memory_bytes is not None and (not _is_int(slot_memory_bytes) or slot_memory_bytes <= 0):
            raise ValueError(f"ServiceEdge: slot_memory_bytes = {slot_memory_bytes!r}; allowed: None (unlimited) "
                             f"or an integer > 0")
        if not callable(serve):
            raise ValueError(f"ServiceEdge: serve = {serve!r}; allowed: a callable serve(request, slot) -> generator")
        if not callable(admission):
            raise ValueError(f"ServiceEdge: admission = {admission!r}; allowed: a callable "
                             f"admit(request, now_s, state) -> (bool, reason)")
        self.env = env
        self.serve = serve
        self.slots = int(slots)
        self.capacity = None if capacity is None else int(capacity)
        self.discipline = discipline
        self.admission = admission
        self.slot_memory_bytes = None if slot_memory_bytes is None else int(slot_memory_bytes)
        self.recorder = recorder
        self.name = name
        self.records: list[RequestRecord] = []
        self.state = EdgeState(self)
        self._resource = simpy.PriorityResource(env, capacity=self.slots)
        self._free_slots = list(range(self.slots))
        self._waiting: dict[int, tuple[tuple, Request]] = {}        # seq -> (key, request)
        self._in_service: dict[int, tuple[Request, float]] = {}     # slot -> (request, start_s)
        self._seq = 0
        self._in_system = _Level()
        self._busy = _Level()

    # -------------------------------------------------------------------------------- arrivals
    def submit(self, request: Request) -> RequestRecord:
        """Hand the edge a request arriving now (``request.arrival_s`` = env.now); returns its
        record (outcome decided at once; start and end filled in later)."""
        now = self.env.now
        if abs(request.arrival_s - now) > 1e-9 * max(1.0, abs(now)):
            raise ValueError(f"ServiceEdge.submit: request {request.request_id} has arrival_s = {request.arrival_s!r} "
                             f"but the simulated time is {now!r} s; allowed: submit a request at its arrival time")
        self._log("request_arrival", request, now)
        if self.capacity is not None and self.state.in_system >= self.capacity:
            record = RequestRecord(request, "blocked", reason="capacity")
        else:
            ok, reason = self.admission(request, now, self.state)
            record = RequestRecord(request, "admitted" if ok else "rejected", reason="" if ok else str(reason))
        self.records.append(record)
        if record.outcome == "admitted":
            key = discipline_key(self.discipline, request, self._seq)
            self._waiting[self._seq] = (key, request)
            self._in_system.change(now, +1)
            self.env.process(self._lifecycle(record, key, self._seq))
        else:
            self._log(f"request_{record.outcome}", request, now)
        self._seq += 1
        return record

    # ------------------------------------------------------------------------------- service
    def _lifecycle(self, record: RequestRecord, key: tuple, seq: int):
        request = record.request
        claim = self._resource.request(priority=key)
        yield claim
        del self._waiting[seq]
        slot = heapq.heappop(self._free_slots)
        record.slot, record.start_s = slot, self.env.now
        self._in_service[slot] = (request, record.start_s)
        self._busy.change(self.env.now, +1)
        self._log("request_wait", request, request.arrival_s, duration_s=record.wait_s)
        body = self.serve(request, Slot(slot, self.slot_memory_bytes))
        if not inspect.isgenerator(body):
            raise ValueError(f"ServiceEdge: serve(request {request.request_id}, slot {slot}) returned {body!r}; "
                             f"allowed: a generator (a SimPy process body that yields events)")
        record.result = yield from body   # the executor runs inside this request's process
        record.end_s = self.env.now
        del self._in_service[slot]
        heapq.heappush(self._free_slots, slot)
        self._busy.change(self.env.now, -1)
        self._in_system.change(self.env.now, -1)
        self._log("request_service", request, record.start_s, duration_s=record.service_s)
        self._resource.release(claim)

    def _log(self, kind: str, request: Request, t_s: float, duration_s: float = 0.0) -> None:
        if self.recorder is not None:
            self.recorder.emit(kind, t_s=t_s, duration_s=duration_s, node=self.name, peer=str(request.owner_device),
                               round=request.request_id, memory_bytes=request.memory_bytes)

    # ------------------------------------------------------------------------------- metrics
    def summary(self, horizon_s: Optional[float] = None) -> dict:
        """Metrics of the run so far, time averages over [0, T] with T = ``horizon_s``
        (default env.now). T > env.now is allowed only while the edge is empty (it stays empty up
        to T unless arrivals not yet simulated come: run the environment to T first).

        Counts: ``arrived``, ``admitted``, ``blocked``, ``rejected`` (and
        ``rejected_by_reason``), ``completed``, ``met_deadline`` (:attr:`RequestRecord.met_deadline`),
        ``in_system`` (at T). Times [s]: ``mean_wait_s``, ``p95_wait_s`` (nearest rank:
        the ceil(0.95 n)-th smallest) over requests whose service started, ``mean_sojourn_s``
        over completed ones. Ratios: ``acceptance_ratio`` = admitted / arrived,
        ``blocking_ratio`` = blocked / arrived, ``deadline_hit_ratio`` = met_deadline /
        completed. Rates [1/s]: ``arrival_rate_per_s`` = arrived / T,
        ``admitted_rate_per_s`` = admitted / T (lambda_eff), ``throughput_per_s`` =
        completed / T, ``goodput_per_s`` = met_deadline / T. Time averages:
        ``utilisation`` = int_0^T busy slots dt / (c T), ``mean_in_system`` =
        int_0^T N(t) dt / T (N: requests waiting or in service; Little: L = lambda_eff W).
        Ratios and means with an empty denominator are 0.
        """
        now = self.env.now
        horizon = now if horizon_s is None else horizon_s
        if not _is_real(horizon) or not math.isfinite(horizon) or horizon <= 0 or horizon < now \
                or (horizon > now and self._in_system.value > 0):
            raise ValueError(f"ServiceEdge.summary: horizon_s = {horizon_s!r} at simulated time {now!r} s with "
                             f"{self._in_system.value} request(s) in the system; allowed: T > 0 with T = env.now, or "
                             f"T > env.now once the edge is empty (run the environment to T first)")
        by_outcome = {o: 0 for o in OUTCOMES}
        reasons: dict[str, int] = {}
        for r in self.records:
            by_outcome[r.outcome] += 1
            if r.outcome == "rejected":
                reasons[r.reason] = reasons.get(r.reason, 0) + 1
        waits = np.sort(np.array([r.wait_s for r in self.records if r.start_s is not None], dtype=float))
        sojourns = np.array([r.sojourn_s for r in self.records if r.completed], dtype=float)
        completed = len(sojourns)
        met = sum(1 for r in self.records if r.met_deadline)
        arrived = len(self.records)

        def ratio(a, b):
            return a / b if b else 0.0

        return {
            "arrived": arrived,
            "admitted": by_outcome["admitted"],
            "blocked": by_outcome["blocked"],
            "rejected": by_outcome["rejected"],
            "rejected_by_reason": dict(sorted(reasons.items())),
            "completed": completed,
            "met_deadline": met,
            "in_system": self._in_system.value,
            "mean_wait_s": float(waits.mean()) if len(waits) else 0.0,
            "p95_wait_s": float(waits[math.ceil(0.95 * len(waits)) - 1]) if len(waits) else 0.0,
            "mean_sojourn_s": float(sojourns.mean()) if completed else 0.0,
            "acceptance_ratio": ratio(by_outcome["admitted"], arrived),
            "blocking_ratio": ratio(by_outcome["blocked"], arrived),
            "deadline_hit_ratio": ratio(met, completed),
            "arrival_rate_per_s": arrived / horizon,
            "admitted_rate_per_s": by_outcome["admitted"] / horizon,
            "throughput_per_s": completed / horizon,
            "goodput_per_s": met / horizon,
            "utilisation": self._busy.integral(horizon) / (self.slots * horizon),
            "mean_in_system": self._in_system.integral(horizon) / horizon,
            "horizon_s": float(horizon),
        }


# ------------------------------------------------------------------------------------------------
# queueing theory (Kleinrock 1975, Vol. 1; Cobham 1954)
# ------------------------------------------------------------------------------------------------

def _check_stable(rate_per_s: float, service_rate_per_s: float, servers: int = 1) -> float:
    if not rate_per_s > 0 or not service_rate_per_s > 0 or servers < 1:
        raise ValueError(f"rate_per_s = {rate_per_s!r}, service_rate_per_s = {service_rate_per_s!r}, servers = "
                         f"{servers!r}; allowed: rates > 0, servers >= 1")
    rho = rate_per_s / (servers * service_rate_per_s)
    if rho >= 1:
        raise ValueError(f"utilisation rho = lambda / (c mu) = {rho:g}; allowed: rho < 1 (a stable queue)")
    return rho


def mm1_mean_wait_s(rate_per_s: float, service_rate_per_s: float) -> float:
    """M/M/1 mean waiting time W_q = rho / (mu - lambda), rho = lambda / mu (Kleinrock 3.2)."""
    rho = _check_stable(rate_per_s, service_rate_per_s)
    return rho / (service_rate_per_s - rate_per_s)


def md1_mean_wait_s(rate_per_s: float, service_rate_per_s: float) -> float:
    """M/D/1 mean waiting time, Pollaczek-Khinchine W_q = lambda E[S^2] / (2 (1 - rho)) with
    S = 1/mu: rho / (2 mu (1 - rho)) (Kleinrock 5.7)."""
    rho = _check_stable(rate_per_s, service_rate_per_s)
    return rho / (2.0 * service_rate_per_s * (1.0 - rho))


def erlang_c(servers: int, offered_load: float) -> float:
    """Erlang C: probability that an arrival waits in M/M/c, offered load a = lambda / mu < c.

    .. math::
        C(c, a) = \\frac{\\frac{a^c}{c!} \\frac{c}{c - a}}{\\sum_{k=0}^{c-1} \\frac{a^k}{k!}
                  + \\frac{a^c}{c!} \\frac{c}{c - a}}

    (Kleinrock 1975, eq. 3.40), computed without factorials from the Erlang B recursion
    B(0) = 1, B(k) = a B(k-1) / (k + a B(k-1)) as C = c B / (c - a (1 - B)).
    """
    if not _is_int(servers) or servers < 1 or not 0 < offered_load < servers:
        raise ValueError(f"erlang_c: servers = {servers!r}, offered_load = {offered_load!r}; allowed: servers >= 1, "
                         f"0 < offered_load < servers")
    b = 1.0
    for k in range(1, servers + 1):
        b = offered_load * b / (k + offered_load * b)
    return servers * b / (servers - offered_load * (1.0 - b))


def mmc_mean_wait_s(servers: int, rate_per_s: float, service_rate_per_s: float) -> float:
    """M/M/c mean waiting time W_q = C(c, a) / (c mu - lambda), a = lambda / mu (Kleinrock 3.5)."""
    _check_stable(rate_per_s, service_rate_per_s, servers)
    return erlang_c(servers, rate_per_s / service_rate_per_s) / (servers * service_rate_per_s - rate_per_s)


def mm1k_blocking_probability(rho: float, capacity: int) -> float:
    """M/M/1/K probability that an arrival finds K in the system (PASTA):
    P_K = (1 - rho) rho^K / (1 - rho^(K+1)), and 1 / (K + 1) at rho = 1 (Kleinrock 3.6)."""
    if not rho > 0 or not _is_int(capacity) or capacity < 1:
        raise ValueError(f"mm1k_blocking_probability: rho = {rho!r}, capacity = {capacity!r}; allowed: rho > 0, K >= 1")
    if rho == 1.0:
        return 1.0 / (capacity + 1)
    return (1.0 - rho) * rho ** capacity / (1.0 - rho ** (capacity + 1))


def mm1k_mean_in_system(rho: float, capacity: int) -> float:
    """M/M/1/K mean number in the system
    L = rho / (1 - rho) - (K + 1) rho^(K+1) / (1 - rho^(K+1)), and K / 2 at rho = 1 (Kleinrock 3.6)."""
    if not rho > 0 or not _is_int(capacity) or capacity < 1:
        raise ValueError(f"mm1k_mean_in_system: rho = {rho!r}, capacity = {capacity!r}; allowed: rho > 0, K >= 1")
    if rho == 1.0:
        return capacity / 2.0
    return rho / (1.0 - rho) - (capacity + 1) * rho ** (capacity + 1) / (1.0 - rho ** (capacity + 1))


def priority_mean_waits_s(rates_per_s: Sequence[float], mean_service_s: Sequence[float],
                          second_moment_service_s2: Sequence[float]) -> list[float]:
    """Mean waits of an M/G/1 queue with non-preemptive priority classes 1 (most urgent) .. P,
    Cobham's formula (Cobham 1954; Kleinrock Vol. 2, 1976, eq. 3.30):

    .. math::
        W_k = \\frac{W_0}{(1 - \\sigma_{k-1})(1 - \\sigma_k)}, \\quad
        W_0 = \\sum_i \\frac{\\lambda_i E[S_i^2]}{2}, \\quad \\sigma_k = \\sum_{i \\le k} \\lambda_i E[S_i]
    """
    if not (len(rates_per_s) == len(mean_service_s) == len(second_moment_service_s2) >= 1):
        raise ValueError("priority_mean_waits_s: rates_per_s, mean_service_s and second_moment_service_s2 must have "
                         "the same length >= 1")
    w0 = sum(lam * s2 for lam, s2 in zip(rates_per_s, second_moment_service_s2)) / 2.0
    waits, sigma = [], 0.0
    for lam, s in zip(rates_per_s, mean_service_s):
        previous, sigma = sigma, sigma + lam * s
        if sigma >= 1:
            raise ValueError(f"priority_mean_waits_s: load up to this class {sigma:g}; allowed: < 1 (stable)")
        waits.append(w0 / ((1.0 - previous) * (1.0 - sigma)))
    return waits
