"""Network dynamics as scenario data: device availability (churn), compute stragglers, device
mobility with server handover, and the DVFS compute model.

The scenario section ``dynamics`` (:class:`DynamicsSpec`) says which models run; its defaults
switch everything off, so a scenario without the section behaves as before. The runtime
classes are torch-free and deterministic: every random quantity is a pure function of the run
seed, a fixed spawn key, the entity (device) and a counter (round, sojourn, job, leg or tick),
through the counter-based generator of :mod:`netsim.channel` (SplitMix64). So a draw does not
depend on the order of the queries, adding a device does not change another device's draws,
and a device costs O(1) memory however long the run.

==========================  ====================  ==========================================
what                        spawn key             counter
==========================  ====================  ==========================================
availability                (20,)                 round (bernoulli), sojourn index (markov)
compute-time jitter         (21,)                 job index
mobility                    (22,)                 leg (random waypoint), tick (Gauss-Markov)
==========================  ====================  ==========================================

The generator of spawn key K, ``child_rng(seed, *K)``, draws one 64-bit base key b; device i
gets the key k_i = SplitMix64(SplitMix64(b XOR SplitMix64(s)) XOR SplitMix64(i)) for stream s
of the model, and its n-th uniform is u = (SplitMix64(k_i XOR SplitMix64(n)) >> 11 + 1/2) 2^-53
in (0, 1), as in :class:`netsim.channel.BlockFading`.

See docs/dynamics.md for the models, formulas and references.
"""
from __future__ import annotations

import csv
import math
import os
from typing import TYPE_CHECKING, Annotated, Literal, Optional, Sequence

import numpy as np
from pydantic import Field, model_validator

from .channel import splitmix64_array
from .spec_base import Float, NonNegFloat, PositiveFloat, Spec

if TYPE_CHECKING:  # netsim.scenario imports this module: no import of it at run time
    from .scenario import DeviceGroup

AVAILABILITY_SPAWN_KEY = (20,)
JITTER_SPAWN_KEY = (21,)
MOBILITY_SPAWN_KEY = (22,)

MAX_TIME_S = 1e12
"""Largest sojourn mean, pause or tick the section accepts [s] (about 31,700 years)."""


# ----------------------------------------------------------------------------------------------
# scenario section
# ----------------------------------------------------------------------------------------------

class GroupAvailabilitySpec(Spec):
    """Availability parameters of one device group (unset fields: the section's values)."""

    p_available: Optional[Float] = Field(None, ge=0.0, le=1.0, description="bernoulli: P(available in a round)")
    mean_on_s: Optional[PositiveFloat] = Field(None, le=MAX_TIME_S, description="markov: mean on sojourn 1/lambda [s]")
    mean_off_s: Optional[PositiveFloat] = Field(None, le=MAX_TIME_S, description="markov: mean off sojourn 1/mu [s]")

    @model_validator(mode="after")
    def _not_zero(self) -> "GroupAvailabilitySpec":
        if self.p_available == 0.0:
            raise ValueError("p_available=0.0: availability 0: no device of the group could ever train "
                             "(allowed: 0 < p_available <= 1)")
        return self


class AvailabilitySpec(Spec):
    """When a device can take part (device churn).

    ``always``: every device, always. ``bernoulli``: each device independently available in a
    round with probability ``p_available``. ``markov``: a two-state continuous-time Markov
    chain per device, on -> off at rate lambda = 1/mean_on_s, off -> on at rate
    mu = 1/mean_off_s. ``trace``: on in the union of a device's intervals of a CSV file.
    """

    model: Literal["always", "bernoulli", "markov", "trace"] = "always"
    p_available: Float = Field(0.8, ge=0.0, le=1.0, description="bernoulli: P(a device is available in a round)")
    mean_on_s: PositiveFloat = Field(600.0, le=MAX_TIME_S, description="markov: mean on sojourn 1/lambda [s]")
    mean_off_s: PositiveFloat = Field(200.0, le=MAX_TIME_S, description="markov: mean off sojourn 1/mu [s]")
    start: Literal["stationary", "on"] = Field(
        "stationary", description="markov initial state: 'stationary' (on with probability mu/(lambda+mu)) or 'on'")
    per_group: dict[str, GroupAvailabilitySpec] = Field(
        default_factory=dict, description="overrides of p_available / mean_on_s / mean_off_s per device group name")
    trace_path: Optional[str] = Field(
        None, description="trace: CSV with columns device,t_on_s,t_off_s (device: index or name devN); devices "
        "absent from the trace are always on")

    @model_validator(mode="after")
    def _consistent(self) -> "AvailabilitySpec":
        if self.p_available == 0.0:
            raise ValueError("p_available=0.0: availability 0: no device could ever train (allowed: 0 < p_available <= 1)")
        if self.model == "trace":
            if not self.trace_path:
                raise ValueError("availability model 'trace' needs trace_path (a CSV file with columns "
                                 "device,t_on_s,t_off_s)")
            if not os.path.isfile(self.trace_path):
                raise ValueError(f"availability trace_path={self.trace_path!r} does not exist or is not a file")
        elif self.trace_path is not None:
            raise ValueError(f"trace_path={self.trace_path!r} is set but model={self.model!r}; the trace is read "
                             "only with model 'trace'")
        if self.per_group and self.model not in ("bernoulli", "markov"):
            raise ValueError(f"per_group overrides ({', '.join(sorted(self.per_group))}) apply to the models "
                             f"'bernoulli' and 'markov' only, not model={self.model!r}")
        return self

    def check_group_names(self, group_names: Sequence[str]) -> None:
        """Raise ValueError when ``per_group`` names a group that is not in ``group_names``."""
        unknown = sorted(set(self.per_group) - set(group_names))
        if unknown:
            raise ValueError(f"dynamics.availability.per_group names unknown device group(s) {unknown}; the "
                             f"groups are {sorted(set(group_names))}")


class StragglerSpec(Spec):
    """Per-job compute-time multiplier X = exp(sigma Z - sigma^2 / 2), Z ~ N(0, 1): log-normal
    with E[X] = 1 and Var[X] = exp(sigma^2) - 1."""

    jitter: Literal["none", "lognormal"] = "none"
    jitter_sigma: NonNegFloat = Field(0.5, le=3.0, description="lognormal: sigma of ln X")


Coordinate = Annotated[Float, Field(ge=-1e7, le=1e7)]


class MobilitySpec(Spec):
    """Device movement in a rectangle, and server re-association with hysteresis.

    ``random_waypoint``: each device walks straight to a uniform waypoint of the area at a
    speed ~ U(v_min_mps, v_max_mps), pauses ``pause_s`` and repeats. ``gauss_markov``
    (Liang & Haas 1999): speed and direction are first-order Gauss-Markov processes updated
    every ``tick_s``, reflected at the border.
    """

    model: Literal["none", "random_waypoint", "gauss_markov"] = "none"
    tick_s: PositiveFloat = Field(1.0, ge=1e-2, le=1e6, description="positions are updated every tick_s [s]")
    area_m: Optional[tuple[Coordinate, Coordinate, Coordinate, Coordinate]] = Field(
        None, description="[x_min, y_min, x_max, y_max] of the rectangle the devices move in [m]; null: the bounding "
        "box of the edge servers and the initial device positions, extended by area_margin_m on every side")
    area_margin_m: NonNegFloat = Field(300.0, le=1e7, description="margin of the default area [m]")
    v_min_mps: Float = Field(0.5, le=1e4, description="random waypoint: least speed [m/s], > 0")
    v_max_mps: PositiveFloat = Field(1.5, le=1e4, description="random waypoint: largest speed [m/s]")
    pause_s: NonNegFloat = Field(0.0, le=MAX_TIME_S, description="random waypoint: pause at each waypoint [s]")
    gm_alpha: Float = Field(0.75, ge=0.0, le=1.0, description="Gauss-Markov memory a (0: memoryless, 1: constant)")
    gm_mean_speed_mps: NonNegFloat = Field(1.0, le=1e4, description="Gauss-Markov mean speed [m/s]")
    gm_speed_std_mps: NonNegFloat = Field(0.3, le=1e4, description="Gauss-Markov stationary speed std [m/s]")
    gm_direction_std_rad: NonNegFloat = Field(0.5, le=10.0, description="Gauss-Markov stationary direction std [rad]")
    handover_hysteresis_db: NonNegFloat = Field(
        3.0, le=100.0, description="a device changes server only when another server's mean received power beats "
        "the current one's by more than this margin [dB]")

    @model_validator(mode="after")
    def _ranges(self) -> "MobilitySpec":
        if not self.v_min_mps > 0:
            raise ValueError(
                f"v_min_mps={self.v_min_mps} must be > 0: with speeds down to 0 the random waypoint model has no "
                "stationary regime (E[1/v] is infinite, the mean speed decays towards 0 as the run goes on: the speed "
                "decay problem of Yoon, Liu & Noble 2003)")
        if self.v_min_mps > self.v_max_mps:
            raise ValueError(f"v_min_mps={self.v_min_mps} must be <= v_max_mps={self.v_max_mps}")
        if self.area_m is not None:
            x0, y0, x1, y1 = self.area_m
            if not (x0 < x1 and y0 < y1):
                raise ValueError(f"area_m={list(self.area_m)} must be [x_min, y_min, x_max, y_max] with "
                                 "x_min < x_max and y_min < y_max")
        return self


class DynamicsSpec(Spec):
    """Network dynamics of a run (every model off by default)."""

    availability: AvailabilitySpec = AvailabilitySpec()
    stragglers: StragglerSpec = StragglerSpec()
    mobility: MobilitySpec = MobilitySpec()


# ----------------------------------------------------------------------------------------------
# counter-based random numbers
# ----------------------------------------------------------------------------------------------

_U64 = np.uint64


def _mix(x) -> np.ndarray:
    """SplitMix64 of a uint64 array (at least one dimension: no numpy scalar overflow warnings)."""
    return splitmix64_array(np.atleast_1d(np.asarray(x, dtype=np.uint64)))


def base_key(seed: int, spawn_key: tuple[int, ...]) -> int:
    """The 64-bit base key of a model: one draw of ``child_rng(seed, *spawn_key)``."""
    from .network import child_rng  # at call time: netsim.network imports netsim.scenario
    return int(child_rng(seed, *spawn_key).integers(0, 2**63, dtype=np.int64))


class CounterStream:
    """Uniforms u(entity, n) in (0, 1) of one stream of one model, a pure function of
    (base key, stream, entity, n)."""

    def __init__(self, key: int, stream: int):
        self._key = _mix(_U64(key) ^ _mix(stream))[0]

    def entity_keys(self, entities) -> np.ndarray:
        return _mix(self._key ^ _mix(entities))

    @staticmethod
    def uniforms(entity_keys: np.ndarray, counters) -> np.ndarray:
        """u = ((SplitMix64(k XOR SplitMix64(n)) >> 11) + 1/2) 2^-53 (broadcast over k and n)."""
        h = splitmix64_array(np.asarray(entity_keys, dtype=np.uint64) ^ _mix(counters))
        return ((h >> _U64(11)).astype(np.float64) + 0.5) * 2.0**-53


def _normals(u1: np.ndarray, u2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two independent N(0, 1) arrays from two uniform arrays (Box & Muller 1958)."""
    r = np.sqrt(-2.0 * np.log(u1))
    return r * np.cos(2.0 * math.pi * u2), r * np.sin(2.0 * math.pi * u2)


# ----------------------------------------------------------------------------------------------
# availability
# ----------------------------------------------------------------------------------------------

def _check_time(t_s: float) -> float:
    if not (math.isfinite(t_s) and t_s >= 0):
        raise ValueError(f"availability query at t_s={t_s!r}; allowed: a finite time >= 0")
    return float(t_s)


class Availability:
    """Which devices can take part, when. Base class: every device always available.

    ``online(device, t_s, round)``: whether ``device`` is available at simulated time ``t_s``
    in round ``round``; ``offline_at(device, t_s, round)``: the first time >= t_s at which it is
    off (``t_s`` itself when it is off at t_s, ``math.inf`` if it never goes off);
    ``online_at(device, t_s, round)``: the first time >= t_s at which it is on (``math.inf`` if
    never); ``online_mask(t_s, round)``: all devices at once (bool array).
    """

    model = "always"

    def __init__(self, num_devices: int):
        if num_devices < 1:
            raise ValueError(f"num_devices={num_devices}; allowed: >= 1")
        self.num_devices = int(num_devices)

    @staticmethod
    def from_spec(spec: AvailabilitySpec, num_devices: int, group_of_device: Sequence[str],
                  device_names: Sequence[str], seed: int) -> "Availability":
        """The availability model of ``spec`` for ``num_devices`` devices; ``group_of_device[i]``
        is the group name of device i (for ``per_group``), ``device_names[i]`` its name (for
        traces). Raises ValueError on a per_group name that is no group, or a bad trace."""
        if len(group_of_device) != num_devices or len(device_names) != num_devices:
            raise ValueError(f"group_of_device ({len(group_of_device)}) and device_names ({len(device_names)}) "
                             f"must have num_devices={num_devices} entries")
        spec.check_group_names(group_of_device)
        if spec.model == "always":
            return Availability(num_devices)
        if spec.model == "bernoulli":
            p = _per_device(spec, group_of_device, "p_available")
            return BernoulliAvailability(p, base_key(seed, AVAILABILITY_SPAWN_KEY))
        if spec.model == "markov":
            return MarkovAvailability(_per_device(spec, group_of_device, "mean_on_s"),
                                      _per_device(spec, group_of_device, "mean_off_s"),
                                      base_key(seed, AVAILABILITY_SPAWN_KEY), start=spec.start)
        intervals = load_availability_trace(spec.trace_path, num_devices, device_names)
        return TraceAvailability(num_devices, intervals)

    def _check_device(self, device: int) -> int:
        if not 0 <= device < self.num_devices:
            raise ValueError(f"device={device!r}; allowed: 0..{self.num_devices - 1}")
        return int(device)

    def online(self, device: int, t_s: float, round: int = 0) -> bool:
        self._check_device(device)
        _check_time(t_s)
        return True

    def offline_at(self, device: int, t_s: float, round: Optional[int] = None) -> float:
        self._check_device(device)
        _check_time(t_s)
        return math.inf

    def online_at(self, device: int, t_s: float, round: Optional[int] = None) -> float:
        self._check_device(device)
        return _check_time(t_s)

    def online_mask(self, t_s: float, round: int = 0) -> np.ndarray:
        _check_time(t_s)
        return np.ones(self.num_devices, dtype=bool)

    def available_count(self, round: int, t_s: float) -> int:
        """Number of devices available at ``t_s`` in round ``round``."""
        return int(np.count_nonzero(self.online_mask(t_s, round)))


def _per_device(spec: AvailabilitySpec, group_of_device: Sequence[str], field: str) -> np.ndarray:
    """``field`` of every device: its group's override, else the section's value."""
    values = []
    for g in group_of_device:
        override = spec.per_group.get(g)
        v = getattr(override, field) if override is not None else None
        values.append(getattr(spec, field) if v is None else v)
    return np.asarray(values, dtype=np.float64)


class BernoulliAvailability(Availability):
    """Device i is available in round r when u_i(r) < p_i: independent across devices and
    rounds, so the number of available devices in a round is Poisson-binomial (binomial(N, p)
    with one p). Within a round a device does not go off."""

    model = "bernoulli"

    def __init__(self, p_available: np.ndarray, key: int):
        super().__init__(len(p_available))
        self.p_available = np.asarray(p_available, dtype=np.float64)
        self._keys = CounterStream(key, 0).entity_keys(np.arange(self.num_devices))

    @staticmethod
    def _check_round(round) -> int:
        if isinstance(round, bool) or not isinstance(round, (int, np.integer)) or round < 0:
            raise ValueError(f"round={round!r}; allowed: an integer >= 0")
        return int(round)

    def online(self, device: int, t_s: float, round: int = 0) -> bool:
        d = self._check_device(device)
        _check_time(t_s)
        u = CounterStream.uniforms(self._keys[d:d + 1], self._check_round(round))
        return bool(u[0] < self.p_available[d])

    def offline_at(self, device: int, t_s: float, round: Optional[int] = None) -> float:
        if round is not None and not self.online(device, t_s, round):
            return float(t_s)
        return super().offline_at(device, t_s)

    def online_at(self, device: int, t_s: float, round: Optional[int] = None) -> float:
        if round is not None and not self.online(device, t_s, round):
            return math.inf   # not within this round
        return super().online_at(device, t_s)

    def online_mask(self, t_s: float, round: int = 0) -> np.ndarray:
        _check_time(t_s)
        return CounterStream.uniforms(self._keys, self._check_round(round)) < self.p_available


class MarkovAvailability(Availability):
    """Two-state continuous-time Markov chain per device: on sojourns ~ Exp(mean mean_on_s),
    off sojourns ~ Exp(mean mean_off_s), alternating.

    Stationary P(on) = mu / (lambda + mu) = mean_on / (mean_on + mean_off). With
    ``start='stationary'`` the state at t = 0 is drawn from that law, and (memorylessness)
    the residual first sojourn has the same exponential law as any other. Sojourn k of device i
    lasts -mean ln u_i(k); the device keeps only its current sojourn (O(1) memory) and replays
    from t = 0 when asked about an earlier time.
    """

    model = "markov"

    def __init__(self, mean_on_s: np.ndarray, mean_off_s: np.ndarray, key: int, start: str = "stationary"):
        super().__init__(len(mean_on_s))
        self.mean_on_s = np.asarray(mean_on_s, dtype=np.float64)
        self.mean_off_s = np.asarray(mean_off_s, dtype=np.float64)
        devices = np.arange(self.num_devices)
        self._keys = CounterStream(key, 1).entity_keys(devices)
        if start == "on":
            self._first_on = np.ones(self.num_devices, dtype=bool)
        else:
            u0 = CounterStream.uniforms(CounterStream(key, 2).entity_keys(devices), 0)
            self._first_on = u0 < self.mean_on_s / (self.mean_on_s + self.mean_off_s)
        self._k = np.zeros(self.num_devices, dtype=np.int64)      # current sojourn index
        self._start = np.zeros(self.num_devices)                  # its start [s]
        self._end = self._duration(devices, self._k)              # its end [s]

    def _is_on(self, devices: np.ndarray, k: np.ndarray) -> np.ndarray:
        return self._first_on[devices] ^ (k % 2 == 1)

    def _duration(self, devices: np.ndarray, k: np.ndarray) -> np.ndarray:
        u = CounterStream.uniforms(self._keys[devices], k.astype(np.uint64))
        mean = np.where(self._is_on(devices, k), self.mean_on_s[devices], self.mean_off_s[devices])
        return -mean * np.log(u)

    def _advance(self, devices: np.ndarray, t_s: float) -> None:
        """Move the current sojourn of ``devices`` to the one that contains ``t_s``
        (half-open: [start, end))."""
        back = devices[t_s < self._start[devices]]
        if back.size:
            self._k[back] = 0
            self._start[back] = 0.0
            self._end[back] = self._duration(back, self._k[back])
        todo = devices[self._end[devices] <= t_s]
        while todo.size:
            self._k[todo] += 1
            self._start[todo] = self._end[todo]
            self._end[todo] = self._start[todo] + self._duration(todo, self._k[todo])
            todo = todo[self._end[todo] <= t_s]

    def _state(self, device: int, t_s: float) -> tuple[bool, float]:
        d = self._check_device(device)
        t = _check_time(t_s)
        idx = np.array([d])
        self._advance(idx, t)
        return bool(self._is_on(idx, self._k[idx])[0]), float(self._end[d])

    def online(self, device: int, t_s: float, round: int = 0) -> bool:
        return self._state(device, t_s)[0]

    def offline_at(self, device: int, t_s: float, round: Optional[int] = None) -> float:
        on, end = self._state(device, t_s)
        return end if on else float(t_s)

    def online_at(self, device: int, t_s: float, round: Optional[int] = None) -> float:
        on, end = self._state(device, t_s)
        return float(t_s) if on else end

    def online_mask(self, t_s: float, round: int = 0) -> np.ndarray:
        t = _check_time(t_s)
        devices = np.arange(self.num_devices)
        self._advance(devices, t)
        return self._is_on(devices, self._k)


class TraceAvailability(Availability):
    """Availability from a trace: device i is on in the union of its intervals [t_on, t_off)
    and off elsewhere; a device the trace does not name is always on."""

    model = "trace"

    def __init__(self, num_devices: int, intervals: dict[int, tuple[np.ndarray, np.ndarray]]):
        super().__init__(num_devices)
        self._intervals = intervals   # device -> (starts, ends), sorted, disjoint, non-touching

    def _locate(self, device: int, t_s: float):
        d = self._check_device(device)
        t = _check_time(t_s)
        if d not in self._intervals:
            return None, t
        starts, ends = self._intervals[d]
        i = int(np.searchsorted(starts, t, side="right")) - 1
        return (starts, ends, i), t

    def online(self, device: int, t_s: float, round: int = 0) -> bool:
        loc, t = self._locate(device, t_s)
        if loc is None:
            return True
        starts, ends, i = loc
        return i >= 0 and t < ends[i]

    def offline_at(self, device: int, t_s: float, round: Optional[int] = None) -> float:
        loc, t = self._locate(device, t_s)
        if loc is None:
            return math.inf
        starts, ends, i = loc
        return float(ends[i]) if i >= 0 and t < ends[i] else t

    def online_at(self, device: int, t_s: float, round: Optional[int] = None) -> float:
        loc, t = self._locate(device, t_s)
        if loc is None:
            return t
        starts, ends, i = loc
        if i >= 0 and t < ends[i]:
            return t
        return float(starts[i + 1]) if i + 1 < len(starts) else math.inf

    def online_mask(self, t_s: float, round: int = 0) -> np.ndarray:
        t = _check_time(t_s)
        mask = np.ones(self.num_devices, dtype=bool)
        for d, (starts, ends) in self._intervals.items():
            i = int(np.searchsorted(starts, t, side="right")) - 1
            mask[d] = i >= 0 and t < ends[i]
        return mask


TRACE_COLUMNS = ("device", "t_on_s", "t_off_s")


def _trace_device(token: str, path: str, row: int, num_devices: int, by_name: dict[str, int]) -> int:
    token = token.strip()
    if token.isdigit():
        d = int(token)
        if d >= num_devices:
            raise ValueError(f"availability trace {path}, row {row}: device={token!r} is not a device index "
                             f"(allowed: 0..{num_devices - 1} or a device name)")
        return d
    if token in by_name:
        return by_name[token]
    raise ValueError(f"availability trace {path}, row {row}: device={token!r} is unknown (allowed: an index "
                     f"0..{num_devices - 1} or a device name such as {next(iter(by_name), 'dev0')!r})")


def _trace_time(token: str, column: str, path: str, row: int) -> float:
    try:
        value = float(token)
    except ValueError:
        raise ValueError(f"availability trace {path}, row {row}: {column}={token!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"availability trace {path}, row {row}: {column}={token!r}; allowed: a finite number")
    return value


def load_availability_trace(path: str, num_devices: int, device_names: Sequence[str]
                            ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Read an availability trace: a CSV with the header ``device,t_on_s,t_off_s`` and one
    interval per row (device: an index 0..N-1 or one of ``device_names``; times in seconds,
    finite, t_off_s >= t_on_s). Returns, per device named, the union of its intervals as sorted
    disjoint [start, end) arrays (overlapping or touching intervals merged, empty ones
    dropped). Raises ValueError naming the file, the row (1 = header) and the value."""
    if path is None or not os.path.isfile(path):
        raise ValueError(f"availability trace {path!r} does not exist or is not a file")
    by_name = {str(n): i for i, n in enumerate(device_names)}
    raw: dict[int, list[tuple[float, float]]] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:   # tolerate a byte-order mark
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"availability trace {path} is empty; expected the header {','.join(TRACE_COLUMNS)}")
        header = [h.strip() for h in header]
        missing = [c for c in TRACE_COLUMNS if c not in header]
        extra = [c for c in header if c not in TRACE_COLUMNS]
        if missing or extra:
            raise ValueError(f"availability trace {path}, row 1: columns {header}; missing {missing}, unknown "
                             f"{extra} (expected exactly {list(TRACE_COLUMNS)})")
        col = {c: header.index(c) for c in TRACE_COLUMNS}
        for row, fields in enumerate(reader, start=2):
            if not fields or all(not x.strip() for x in fields):
                continue
            if len(fields) != len(header):
                raise ValueError(f"availability trace {path}, row {row}: {len(fields)} fields {fields}; expected "
                                 f"{len(header)} ({','.join(header)})")
            d = _trace_device(fields[col["device"]], path, row, num_devices, by_name)
            t_on = _trace_time(fields[col["t_on_s"]], "t_on_s", path, row)
            t_off = _trace_time(fields[col["t_off_s"]], "t_off_s", path, row)
            if t_off < t_on:
                raise ValueError(f"availability trace {path}, row {row}: t_off_s={t_off!r} < t_on_s={t_on!r} "
                                 "(allowed: t_off_s >= t_on_s)")
            raw.setdefault(d, []).append((t_on, t_off))
    return {d: _union(iv) for d, iv in raw.items()}


def _union(intervals: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted disjoint union of half-open intervals (empty ones dropped, touching ones merged)."""
    merged: list[list[float]] = []
    for a, b in sorted(intervals):
        if b <= a:
            continue
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    arr = np.asarray(merged, dtype=np.float64).reshape(-1, 2)
    return arr[:, 0].copy(), arr[:, 1].copy()


# ----------------------------------------------------------------------------------------------
# stragglers
# ----------------------------------------------------------------------------------------------

class ComputeJitter:
    """Per-job compute-time multiplier X = exp(sigma Z - sigma^2/2), Z ~ N(0, 1) (log-normal,
    E[X] = 1, Var[X] = exp(sigma^2) - 1, P(X > x) = 1 - Phi((ln x + sigma^2/2) / sigma)).
    Z of (device, job) comes from two uniforms (Box-Muller) of the device's stream."""

    def __init__(self, sigma: float, num_devices: int, key: int):
        self.sigma = float(sigma)
        self.num_devices = int(num_devices)
        self._keys = CounterStream(key, 0).entity_keys(np.arange(self.num_devices))

    @staticmethod
    def from_spec(spec: StragglerSpec, num_devices: int, seed: int) -> "ComputeJitter":
        sigma = spec.jitter_sigma if spec.jitter == "lognormal" else 0.0
        return ComputeJitter(sigma, num_devices, base_key(seed, JITTER_SPAWN_KEY))

    def factors(self, devices, job_index) -> np.ndarray:
        """X of each (device, job_index) pair (broadcast) [dimensionless]."""
        devices = np.asarray(devices, dtype=np.int64)
        jobs = np.asarray(job_index, dtype=np.int64)
        if devices.size and (devices.min() < 0 or devices.max() >= self.num_devices):
            raise ValueError(f"devices out of range 0..{self.num_devices - 1}")
        if jobs.size and jobs.min() < 0:
            raise ValueError(f"job_index={job_index!r}; allowed: integers >= 0")
        shape = np.broadcast_shapes(devices.shape, jobs.shape)
        if self.sigma == 0.0:
            return np.ones(shape)
        keys = np.broadcast_to(self._keys[devices], shape)
        j = np.broadcast_to(jobs, shape).astype(np.uint64)
        u1 = CounterStream.uniforms(keys, 2 * j)
        u2 = CounterStream.uniforms(keys, 2 * j + _U64(1))
        z, _ = _normals(u1, u2)
        return np.exp(self.sigma * z - 0.5 * self.sigma**2).reshape(shape)

    def factor(self, device: int, job_index: int) -> float:
        """X of job ``job_index`` of ``device``."""
        return float(self.factors(np.array([device]), np.array([job_index]))[0])


# ----------------------------------------------------------------------------------------------
# mobility
# ----------------------------------------------------------------------------------------------

def default_area_m(initial_positions_m: np.ndarray, server_positions_m: Sequence[tuple[float, float]],
                   margin_m: float) -> tuple[float, float, float, float]:
    """Bounding box of the servers and the devices, extended by ``margin_m`` on every side."""
    pts = np.vstack([np.asarray(initial_positions_m, dtype=np.float64).reshape(-1, 2),
                     np.asarray(server_positions_m, dtype=np.float64).reshape(-1, 2)])
    lo, hi = pts.min(axis=0) - margin_m, pts.max(axis=0) + margin_m
    if margin_m == 0:   # a degenerate box (one point, or points on a line) gets 1 m
        hi = np.where(hi > lo, hi, lo + 1.0)
    return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])


class Mobility:
    """Device positions over simulated time. Base class: devices do not move.

    ``advance(t_s)`` moves every device to the last tick k tick_s <= t_s (positions change only
    at ticks); ``positions_m`` is the (N, 2) array of positions [m] at ``time_s``;
    ``speeds_mps`` the (N,) speeds [m/s] there.
    """

    model = "none"

    def __init__(self, initial_positions_m, tick_s: float = 1.0,
                 area_m: Optional[tuple[float, float, float, float]] = None):
        pos = np.array(initial_positions_m, dtype=np.float64).reshape(-1, 2)
        if not np.isfinite(pos).all():
            raise ValueError("initial_positions_m: every coordinate must be finite")
        self._pos = pos
        self.tick_s = float(tick_s)
        self.area_m = area_m
        self.tick = 0
        if area_m is not None:
            x0, y0, x1, y1 = area_m
            outside = ~((pos[:, 0] >= x0) & (pos[:, 0] <= x1) & (pos[:, 1] >= y0) & (pos[:, 1] <= y1))
            if outside.any():
                i = int(np.argmax(outside))
                raise ValueError(f"dynamics.mobility.area_m={list(area_m)} does not contain device {i} at "
                                 f"{tuple(pos[i].tolist())} (and {int(outside.sum()) - 1} more); enlarge the area "
                                 "or place the devices inside it")

    @staticmethod
    def from_spec(spec: MobilitySpec, initial_positions_m, seed: int,
                  server_positions_m: Sequence[tuple[float, float]] = ()) -> "Mobility":
        pos = np.array(initial_positions_m, dtype=np.float64).reshape(-1, 2)
        if spec.model == "none":
            return Mobility(pos, spec.tick_s)
        area = spec.area_m if spec.area_m is not None else default_area_m(pos, server_positions_m,
                                                                          spec.area_margin_m)
        key = base_key(seed, MOBILITY_SPAWN_KEY)
        if spec.model == "random_waypoint":
            return RandomWaypoint(pos, area, spec.v_min_mps, spec.v_max_mps, spec.pause_s, spec.tick_s, key)
        return GaussMarkov(pos, area, spec.gm_alpha, spec.gm_mean_speed_mps, spec.gm_speed_std_mps,
                           spec.gm_direction_std_rad, spec.tick_s, key)

    @property
    def positions_m(self) -> np.ndarray:
        view = self._pos.view()
        view.flags.writeable = False
        return view

    @property
    def speeds_mps(self) -> np.ndarray:
        return np.zeros(len(self._pos))

    @property
    def time_s(self) -> float:
        return self.tick * self.tick_s

    def _target_tick(self, t_s: float) -> int:
        if not (math.isfinite(t_s) and t_s >= 0):
            raise ValueError(f"mobility advance to t_s={t_s!r}; allowed: a finite time >= 0")
        n = int(math.floor(t_s / self.tick_s + 1e-9))
        if n < self.tick:
            raise ValueError(f"mobility advance to t_s={t_s!r} is before the current time {self.time_s!r} s "
                             "(positions only move forward)")
        return n

    def advance(self, t_s: float) -> np.ndarray:
        """Move to the last tick <= t_s; returns :attr:`positions_m`."""
        self.tick = self._target_tick(t_s)
        return self.positions_m


class RandomWaypoint(Mobility):
    """Random waypoint (Johnson & Maltz 1996; stationary analysis Bettstetter, Resta & Santi
    2003). Leg k of device i goes from its position to the waypoint W_k ~ U(area) at speed
    V_k ~ U(v_min, v_max), then the device pauses ``pause_s``. Positions are exact at every
    tick (the trajectory does not depend on tick_s).

    Time-averaged, a device is where the legs cross most: the stationary density is higher in
    the centre; with no pause the time-average speed is 1 / E[1/V] =
    (v_max - v_min) / ln(v_max / v_min) (< the mean (v_min + v_max)/2 the legs draw).
    """

    model = "random_waypoint"

    def __init__(self, initial_positions_m, area_m, v_min_mps: float, v_max_mps: float, pause_s: float,
                 tick_s: float, key: int):
        super().__init__(initial_positions_m, tick_s, area_m)
        if not (0 < v_min_mps <= v_max_mps):
            raise ValueError(f"v_min_mps={v_min_mps}, v_max_mps={v_max_mps}; allowed: 0 < v_min <= v_max")
        self.v_min_mps, self.v_max_mps, self.pause_s = float(v_min_mps), float(v_max_mps), float(pause_s)
        n = len(self._pos)
        devices = np.arange(n)
        self._kx = CounterStream(key, 10).entity_keys(devices)
        self._ky = CounterStream(key, 11).entity_keys(devices)
        self._kv = CounterStream(key, 12).entity_keys(devices)
        self._leg = np.zeros(n, dtype=np.int64)
        self._from = self._pos.copy()
        self._depart = np.zeros(n)
        self._to = np.empty((n, 2))
        self._speed = np.empty(n)
        self._arrive = np.empty(n)
        self._draw_leg(devices)
        self._moving = self._arrive > 0.0
        self.legs_started = n   # legs drawn so far, all devices together

    def _draw_leg(self, d: np.ndarray) -> None:
        """Waypoint, speed and arrival time of the current leg of devices ``d`` (leg index
        ``self._leg[d]``, starting at ``self._from[d]`` at ``self._depart[d]``)."""
        x0, y0, x1, y1 = self.area_m
        leg = self._leg[d].astype(np.uint64)
        self._to[d, 0] = x0 + (x1 - x0) * CounterStream.uniforms(self._kx[d], leg)
        self._to[d, 1] = y0 + (y1 - y0) * CounterStream.uniforms(self._ky[d], leg)
        self._speed[d] = self.v_min_mps + (self.v_max_mps - self.v_min_mps) * CounterStream.uniforms(self._kv[d], leg)
        dist = np.hypot(*(self._to[d] - self._from[d]).T)
        self._arrive[d] = self._depart[d] + dist / self._speed[d]

    def advance(self, t_s: float) -> np.ndarray:
        n = self._target_tick(t_s)
        t = n * self.tick_s
        done = np.flatnonzero(self._arrive + self.pause_s <= t)
        while done.size:
            self._depart[done] = self._arrive[done] + self.pause_s
            self._from[done] = self._to[done]
            self._leg[done] += 1
            self._draw_leg(done)
            self.legs_started += done.size
            done = done[self._arrive[done] + self.pause_s <= t]
        moving = t < self._arrive
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(moving, (t - self._depart) / (self._arrive - self._depart), 1.0)
        frac = np.clip(frac, 0.0, 1.0)[:, None]
        self._pos = self._from + frac * (self._to - self._from)
        self._moving = moving
        self.tick = n
        return self.positions_m

    @property
    def speeds_mps(self) -> np.ndarray:
        """Speed at :attr:`time_s`: the leg's speed while moving, 0 while pausing."""
        return np.where(self._moving, self._speed, 0.0)

    @property
    def leg_speeds_mps(self) -> np.ndarray:
        """Speed of each device's current leg [m/s]."""
        return self._speed.copy()


def _reflect(x: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """Fold ``x`` into [lo, hi] by mirror reflections; returns (folded, odd number of
    reflections?)."""
    w = hi - lo
    q = np.floor((x - lo) / w)
    u = (x - lo) - q * w
    odd = (q.astype(np.int64) % 2) == 1
    return np.where(odd, hi - u, lo + u), odd


class GaussMarkov(Mobility):
    """Gauss-Markov mobility (Liang & Haas 1999; Camp, Boleng & Davies 2002). Every tick:

    .. math::
        s_n = a s_{n-1} + (1 - a) \\bar s + \\sqrt{1 - a^2}\\, \\sigma_s z_n, \\qquad
        d_n = a d_{n-1} + (1 - a) \\bar d + \\sqrt{1 - a^2}\\, \\sigma_d z'_n

    and x_n = x_{n-1} + s_{n-1} (cos d_{n-1}, sin d_{n-1}) tick_s, mirrored at the border of the
    area (a reflection mirrors the direction and the mean direction of the device). The speed
    process is stationary from t = 0 (s_0 ~ N(s_bar, sigma_s^2)): long-run mean s_bar, std
    sigma_s. It is Gaussian, not clipped: a negative s moves the device backwards along d.
    Each device has its own mean direction d_bar ~ U[0, 2 pi); d_0 ~ N(d_bar, sigma_d^2).
    """

    model = "gauss_markov"

    def __init__(self, initial_positions_m, area_m, alpha: float, mean_speed_mps: float, speed_std_mps: float,
                 direction_std_rad: float, tick_s: float, key: int):
        super().__init__(initial_positions_m, tick_s, area_m)
        self.alpha, self.mean_speed_mps = float(alpha), float(mean_speed_mps)
        self.speed_std_mps, self.direction_std_rad = float(speed_std_mps), float(direction_std_rad)
        n = len(self._pos)
        devices = np.arange(n)
        self._k1 = CounterStream(key, 20).entity_keys(devices)
        self._k2 = CounterStream(key, 21).entity_keys(devices)
        z_s, z_d = self._normals(0)
        u = CounterStream.uniforms(CounterStream(key, 22).entity_keys(devices), 0)
        self._mean_dir = 2.0 * math.pi * u
        self._speed = self.mean_speed_mps + self.speed_std_mps * z_s
        self._dir = self._mean_dir + self.direction_std_rad * z_d

    def _normals(self, tick: int) -> tuple[np.ndarray, np.ndarray]:
        return _normals(CounterStream.uniforms(self._k1, tick), CounterStream.uniforms(self._k2, tick))

    def advance(self, t_s: float) -> np.ndarray:
        n = self._target_tick(t_s)
        a = self.alpha
        b = math.sqrt(max(1.0 - a * a, 0.0))
        x0, y0, x1, y1 = self.area_m
        for tick in range(self.tick + 1, n + 1):
            step = self._speed * self.tick_s
            x, flip_x = _reflect(self._pos[:, 0] + step * np.cos(self._dir), x0, x1)
            y, flip_y = _reflect(self._pos[:, 1] + step * np.sin(self._dir), y0, y1)
            self._pos = np.column_stack([x, y])
            # mirror at a vertical wall: d -> pi - d; at a horizontal wall: d -> -d
            self._dir = np.where(flip_x, math.pi - self._dir, self._dir)
            self._mean_dir = np.where(flip_x, math.pi - self._mean_dir, self._mean_dir)
            self._dir = np.where(flip_y, -self._dir, self._dir)
            self._mean_dir = np.where(flip_y, -self._mean_dir, self._mean_dir)
            z_s, z_d = self._normals(tick)
            self._speed = a * self._speed + (1 - a) * self.mean_speed_mps + b * self.speed_std_mps * z_s
            self._dir = a * self._dir + (1 - a) * self._mean_dir + b * self.direction_std_rad * z_d
            self.tick = tick
        self.tick = n
        return self.positions_m

    @property
    def speeds_mps(self) -> np.ndarray:
        """The Gauss-Markov speed process s_n at :attr:`time_s` (signed) [m/s]."""
        return self._speed.copy()


# ----------------------------------------------------------------------------------------------
# handover
# ----------------------------------------------------------------------------------------------

def associate(rx_power_dbm: np.ndarray, current: np.ndarray, hysteresis_db: float
              ) -> tuple[np.ndarray, np.ndarray]:
    """Server association with hysteresis (the A3-event rule of LTE/NR handover).

    ``rx_power_dbm`` (N, S): mean received power of each device from each server [dBm];
    ``current`` (N,): each device's server (-1: none yet). A device with a server moves to the
    strongest one s* only when P[s*] > P[current] + hysteresis_db; a device without one takes
    s*. Ties go to the lowest server index. Returns (new servers (N,), handed over (N,) bool;
    a first association is not a handover).
    """
    p = np.asarray(rx_power_dbm, dtype=np.float64)
    cur = np.asarray(current, dtype=np.int64)
    if p.ndim != 2 or cur.shape != (p.shape[0],):
        raise ValueError(f"rx_power_dbm shape {p.shape} and current shape {cur.shape}; expected (N, S) and (N,)")
    if not (math.isfinite(hysteresis_db) and hysteresis_db >= 0):
        raise ValueError(f"hysteresis_db={hysteresis_db!r}; allowed: a finite number >= 0")
    if np.isnan(p).any():
        raise ValueError("rx_power_dbm has NaN entries")
    if ((cur < -1) | (cur >= p.shape[1])).any():
        raise ValueError(f"current servers out of range -1..{p.shape[1] - 1}")
    best = np.argmax(p, axis=1)
    rows = np.arange(p.shape[0])
    has = cur >= 0
    cur_power = np.where(has, p[rows, np.maximum(cur, 0)], -np.inf)
    switch = has & (p[rows, best] > cur_power + hysteresis_db)
    new = np.where(has, np.where(switch, best, cur), best)
    return new, switch & (new != cur)


# ----------------------------------------------------------------------------------------------
# compute model
# ----------------------------------------------------------------------------------------------

def dvfs_time_energy(flops: float, flops_per_cycle: float, cpu_frequency_hz: float, kappa: float
                     ) -> tuple[float, float]:
    """Time [s] and energy [J] of ``flops`` FLOPs at clock ``cpu_frequency_hz`` (DVFS model of
    Mao et al. 2017 and Yang et al. 2021):

    .. math::
        C = \\frac{\\text{FLOPs}}{\\text{flops\\_per\\_cycle}}, \\quad
        T = \\frac{C}{f}, \\quad E = \\kappa\\, C f^2

    (dynamic CMOS power kappa f^3 for C / f seconds). Energy grows as f^2 for a fixed cycle
    count while time falls as 1/f.
    """
    for name, v in (("flops", flops), ("flops_per_cycle", flops_per_cycle), ("cpu_frequency_hz", cpu_frequency_hz),
                    ("kappa", kappa)):
        if not (math.isfinite(v) and v >= 0) or (name != "flops" and v == 0):
            raise ValueError(f"dvfs_time_energy: {name}={v!r}; allowed: a finite number {'>= 0' if name == 'flops' else '> 0'}")
    cycles = flops / flops_per_cycle
    return cycles / cpu_frequency_hz, kappa * cycles * cpu_frequency_hz**2


def compute_time_energy(group: "DeviceGroup", flops: float) -> tuple[float, float]:
    """Time [s] and energy [J] of ``flops`` FLOPs on a device of ``group``: ``throughput``:
    T = FLOPs / compute_flops_per_s, E = compute_power_w T; ``dvfs``: :func:`dvfs_time_energy`."""
    if group.compute_model == "dvfs":
        return dvfs_time_energy(flops, group.flops_per_cycle, group.cpu_frequency_hz, group.kappa)
    if not (math.isfinite(flops) and flops >= 0):
        raise ValueError(f"compute_time_energy: flops={flops!r}; allowed: a finite number >= 0")
    t = flops / group.compute_flops_per_s
    return t, group.compute_power_w * t
