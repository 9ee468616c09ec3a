"""Network dynamics (netsim/dynamics.py) against theory: availability (Bernoulli, Markov on/off,
trace), log-normal stragglers, random waypoint and Gauss-Markov mobility, handover hysteresis,
DVFS. Fixed seeds; tolerances are 5 standard errors (estimated across independent devices
where the samples of one device are correlated)."""
import ast
import math
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from netsim.dynamics import (Availability, AvailabilitySpec, ComputeJitter, DynamicsSpec, GaussMarkov, Mobility,
                             MobilitySpec, RandomWaypoint, StragglerSpec, associate, compute_time_energy,
                             dvfs_time_energy, load_availability_trace)
from netsim.scenario import DeviceGroup

NAMES = [f"dev{i}" for i in range(5000)]


def _availability(spec: AvailabilitySpec, n: int, groups=None, seed: int = 0) -> Availability:
    return Availability.from_spec(spec, n, groups or ["phone"] * n, NAMES[:n], seed)


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


# ----------------------------------------------------------------------------------------------
# scenario section
# ----------------------------------------------------------------------------------------------

def test_defaults_switch_everything_off():
    spec = DynamicsSpec()
    assert spec.availability.model == "always"
    assert spec.stragglers.jitter == "none"
    assert spec.mobility.model == "none"
    a = _availability(spec.availability, 7)
    assert a.available_count(3, 12.0) == 7 and a.offline_at(2, 5.0) == math.inf
    j = ComputeJitter.from_spec(spec.stragglers, 3, 0)
    assert j.factor(1, 9) == 1.0
    m = Mobility.from_spec(spec.mobility, [(1.0, 2.0), (3.0, 4.0)], 0)
    assert m.advance(100.0).tolist() == [[1.0, 2.0], [3.0, 4.0]]


@pytest.mark.parametrize("section,data,message", [
    ("availability", {"model": "bernoulli", "p_available": 0.0}, "availability 0: no device could ever train"),
    ("availability", {"p_available": 1.5}, "less than or equal to 1"),
    ("availability", {"mean_on_s": 0.0}, "greater than 0"),
    ("availability", {"mean_off_s": -3.0}, "greater than 0"),
    ("availability", {"model": "trace"}, "needs trace_path"),
    ("availability", {"model": "trace", "trace_path": "/no/such/trace.csv"}, "does not exist"),
    ("availability", {"trace_path": "x.csv"}, "only with model 'trace'"),
    ("availability", {"per_group": {"phone": {"p_available": 0.5}}}, "'bernoulli' and 'markov' only"),
    ("availability", {"model": "bernoulli", "per_group": {"phone": {"p_available": 0.0}}}, "availability 0"),
    ("availability", {"model": "markov", "start": "off"}, "'stationary' or 'on'"),
    ("availability", {"p_availble": 0.5}, "Extra inputs are not permitted"),
    ("stragglers", {"jitter": "lognormal", "jitter_sigma": -0.1}, "greater than or equal to 0"),
    ("stragglers", {"jitter": "gamma"}, "'none' or 'lognormal'"),
    ("mobility", {"v_min_mps": 0.0}, "speed decay problem"),
    ("mobility", {"v_min_mps": 2.0, "v_max_mps": 1.0}, "must be <= v_max_mps"),
    ("mobility", {"area_m": [10.0, 0.0, 5.0, 100.0]}, "x_min < x_max"),
    ("mobility", {"area_m": [0.0, 0.0, 5.0, 0.0]}, "y_min < y_max"),
    ("mobility", {"area_m": [0.0, 0.0, 5.0]}, r"area_m\.3\s+Field required"),
    ("mobility", {"tick_s": 0.0}, "greater than or equal to 0.01"),
    ("mobility", {"gm_alpha": 1.2}, "less than or equal to 1"),
    ("mobility", {"handover_hysteresis_db": float("nan")}, "finite number"),
    ("mobility", {"v_max_mps": "fast"}, "valid number"),
])
def test_bad_section_values_are_clear_errors(section, data, message):
    with pytest.raises(ValidationError, match=message) as err:
        DynamicsSpec.model_validate({section: data})
    assert section in str(err.value)


def test_per_group_names_must_exist():
    spec = AvailabilitySpec(model="bernoulli", per_group={"tablet": {"p_available": 0.5}})
    with pytest.raises(ValueError, match=r"unknown device group\(s\) \['tablet'\].*\['phone'\]"):
        _availability(spec, 4)


def test_dynamics_module_imports_no_scenario_at_run_time():
    """netsim.scenario imports DynamicsSpec from netsim.dynamics: neither dynamics nor the
    channel module it uses may import netsim.scenario (or netsim.network) at module level."""
    root = Path(__file__).resolve().parents[2] / "netsim"
    for name in ("dynamics.py", "channel.py"):
        tree = ast.parse((root / name).read_text())
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                assert node.module in ("channel", "spec_base"), (name, node.module)


# ----------------------------------------------------------------------------------------------
# Bernoulli availability
# ----------------------------------------------------------------------------------------------

def test_bernoulli_count_is_binomial():
    n, p, rounds = 200, 0.3, 3000
    a = _availability(AvailabilitySpec(model="bernoulli", p_available=p), n, seed=4)
    counts = np.array([a.available_count(r, 10.0 * r) for r in range(rounds)], dtype=np.float64)
    q = 1.0 - p
    mean, var = n * p, n * p * q
    assert abs(counts.mean() - mean) < 5.0 * math.sqrt(var / rounds)
    mu4 = n * p * q * (1.0 + 3.0 * (n - 2) * p * q)        # fourth central moment of Binomial(n, p)
    se_var = math.sqrt((mu4 - var**2) / rounds)
    assert abs(counts.var(ddof=1) - var) < 5.0 * se_var


def test_bernoulli_per_group_probabilities():
    groups = ["a"] * 100 + ["b"] * 100 + ["c"] * 50
    spec = AvailabilitySpec(model="bernoulli", p_available=0.6,
                            per_group={"a": {"p_available": 0.2}, "b": {"p_available": 0.9}})
    a = _availability(spec, 250, groups, seed=1)
    rounds = 1000
    on = np.array([a.online_mask(0.0, r) for r in range(rounds)])
    for sl, p in ((slice(0, 100), 0.2), (slice(100, 200), 0.9), (slice(200, 250), 0.6)):
        k = on[:, sl].size
        assert abs(on[:, sl].mean() - p) < 5.0 * math.sqrt(p * (1 - p) / k)


def test_bernoulli_is_order_independent_and_per_device():
    spec = AvailabilitySpec(model="bernoulli", p_available=0.5)
    a, b = _availability(spec, 20, seed=9), _availability(spec, 20, seed=9)
    forward = [[a.online(d, 0.0, r) for d in range(20)] for r in range(30)]
    backward = [[b.online(d, 0.0, r) for d in reversed(range(20))][::-1] for r in reversed(range(30))][::-1]
    assert forward == backward
    assert forward == [b.online_mask(0.0, r).tolist() for r in range(30)]
    # adding devices does not change the draws of the first ones
    big = _availability(spec, 40, seed=9)
    assert [big.online_mask(0.0, r)[:20].tolist() for r in range(30)] == forward
    # another seed gives other draws
    other = _availability(spec, 20, seed=10)
    assert [other.online_mask(0.0, r).tolist() for r in range(30)] != forward
    # within a round: off means off now, on means never off within the round
    r = 3
    for d in range(20):
        t = a.offline_at(d, 7.0, r)
        assert t == (math.inf if forward[r][d] else 7.0)
    with pytest.raises(ValueError, match="round"):
        a.online(0, 0.0, -1)


# ----------------------------------------------------------------------------------------------
# Markov on/off availability
# ----------------------------------------------------------------------------------------------

def _sojourns(a: Availability, d: int, horizon_s: float):
    """Complete on and off sojourns of device d in [0, horizon) (first and last cut ones left out)."""
    on, off, on_time = [], [], 0.0
    t, first = 0.0, True
    while t < horizon_s:
        if a.online(d, t):
            end = a.offline_at(d, t)
            (on if not first and end < horizon_s else []).append(end - t)
            on_time += min(end, horizon_s) - t
        else:
            end = a.online_at(d, t)
            (off if not first and end < horizon_s else []).append(end - t)
        t, first = end, False
    return on, off, on_time / horizon_s


def test_markov_long_run_fraction_and_sojourn_means():
    mean_on, mean_off, n, horizon = 600.0, 200.0, 120, 120_000.0
    a = _availability(AvailabilitySpec(model="markov", mean_on_s=mean_on, mean_off_s=mean_off), n, seed=2)
    on_all, off_all, fractions = [], [], []
    for d in range(n):
        on, off, frac = _sojourns(a, d, horizon)
        on_all += on
        off_all += off
        fractions.append(frac)
    # exponential sojourns: the sample mean has standard error mean / sqrt(count)
    assert abs(np.mean(on_all) - mean_on) < 5.0 * mean_on / math.sqrt(len(on_all))
    assert abs(np.mean(off_all) - mean_off) < 5.0 * mean_off / math.sqrt(len(off_all))
    pi_on = mean_on / (mean_on + mean_off)          # mu / (lambda + mu)
    fractions = np.array(fractions)
    assert abs(fractions.mean() - pi_on) < 5.0 * fractions.std(ddof=1) / math.sqrt(n)
    # exponential law, not only the mean: P(on sojourn > mean) = e^-1
    k = len(on_all)
    assert abs(np.mean(np.array(on_all) > mean_on) - math.exp(-1)) < 5.0 * math.sqrt(0.25 / k)


def test_markov_stationary_start_and_snapshot_counts():
    n = 4000
    spec = AvailabilitySpec(model="markov", mean_on_s=300.0, mean_off_s=100.0)
    a = _availability(spec, n, seed=5)
    for t in (0.0, 50.0, 5000.0):
        frac = a.available_count(0, t) / n
        assert abs(frac - 0.75) < 5.0 * math.sqrt(0.75 * 0.25 / n)
    on_start = _availability(spec.model_copy(update={"start": "on"}), n, seed=5)
    assert on_start.available_count(0, 0.0) == n
    # per-group means: group b is on a quarter of the time
    groups = ["a"] * (n // 2) + ["b"] * (n // 2)
    spec_g = AvailabilitySpec(model="markov", mean_on_s=300.0, mean_off_s=100.0,
                              per_group={"b": {"mean_on_s": 100.0, "mean_off_s": 300.0}})
    g = _availability(spec_g, n, groups, seed=5)
    mask = g.online_mask(2000.0)
    for sl, p in ((slice(0, n // 2), 0.75), (slice(n // 2, n), 0.25)):
        assert abs(mask[sl].mean() - p) < 5.0 * math.sqrt(p * (1 - p) / (n // 2))


def test_markov_answers_do_not_depend_on_query_order():
    spec = AvailabilitySpec(model="markov", mean_on_s=50.0, mean_off_s=20.0)
    times = [3.0, 170.0, 40.0, 900.0, 0.5, 333.3, 899.0]
    a, b = _availability(spec, 6, seed=8), _availability(spec, 6, seed=8)
    answers = [(a.online(d, t), a.offline_at(d, t), a.online_at(d, t)) for t in times for d in range(6)]
    fresh = []
    for t in times:
        for d in range(6):
            c = _availability(spec, 6, seed=8)
            fresh.append((c.online(d, t), c.offline_at(d, t), c.online_at(d, t)))
    assert answers == fresh
    masks = [b.online_mask(t).tolist() for t in times]
    assert masks == [[x[0] for x in answers[6 * i:6 * i + 6]] for i in range(len(times))]
    # a switch time is where the state flips (half-open sojourns)
    for d in range(6):
        t_off = a.offline_at(d, a.online_at(d, 10.0))
        assert a.online(d, math.nextafter(t_off, 0.0)) and not a.online(d, t_off)


# ----------------------------------------------------------------------------------------------
# trace availability
# ----------------------------------------------------------------------------------------------

def _write(tmp_path, text: str) -> str:
    p = tmp_path / "trace.csv"
    p.write_text(text)
    return str(p)


def test_trace_intervals_exactly(tmp_path):
    path = _write(tmp_path, "device,t_on_s,t_off_s\n0,10,20\n0,15,30\ndev1,0,5\n1,40,50\n\n2,7,7\n")
    spec = AvailabilitySpec(model="trace", trace_path=path)
    a = _availability(spec, 4)
    # device 0: on in [10, 30) (overlapping rows merged)
    assert [a.online(0, t) for t in (0.0, 9.99, 10.0, 22.0, 29.99, 30.0, 99.0)] == [
        False, False, True, True, True, False, False]
    assert a.offline_at(0, 12.0) == 30.0 and a.offline_at(0, 5.0) == 5.0
    assert a.online_at(0, 5.0) == 10.0 and a.online_at(0, 12.0) == 12.0 and a.online_at(0, 30.0) == math.inf
    # device 1 (by name and by index): [0, 5) and [40, 50)
    assert a.online(1, 0.0) and not a.online(1, 5.0) and a.online_at(1, 5.0) == 40.0
    assert a.offline_at(1, 45.0) == 50.0
    # device 2: only an empty interval: named, so off always
    assert not a.online(2, 7.0) and a.online_at(2, 0.0) == math.inf
    # device 3: absent from the trace: always on
    assert a.online(3, 1e6) and a.offline_at(3, 0.0) == math.inf
    assert a.online_mask(12.0).tolist() == [True, False, False, True]
    assert a.available_count(0, 45.0) == 2


@pytest.mark.parametrize("text,message", [
    ("device,t_on_s\n0,1\n", r"row 1: columns.*missing \['t_off_s'\]"),
    ("device,t_on_s,t_off_s,extra\n0,1,2,3\n", r"unknown \['extra'\]"),
    ("", "is empty"),
    ("device,t_on_s,t_off_s\n0,5,4\n", r"row 2: t_off_s=4\.0 < t_on_s=5\.0"),
    ("device,t_on_s,t_off_s\n0,1,2\n1,nan,3\n", r"row 3: t_on_s='nan'.*finite"),
    ("device,t_on_s,t_off_s\n0,1,inf\n", r"row 2: t_off_s='inf'.*finite"),
    ("device,t_on_s,t_off_s\n0,1,soon\n", r"row 2: t_off_s='soon' is not a number"),
    ("device,t_on_s,t_off_s\nphone7,1,2\n", r"row 2: device='phone7' is unknown"),
    ("device,t_on_s,t_off_s\n9,1,2\n", r"row 2: device='9' is not a device index \(allowed: 0\.\.3"),
    ("device,t_on_s,t_off_s\n0,1\n", r"row 2: 2 fields"),
])
def test_bad_traces_are_rejected_with_file_and_row(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match=message) as err:
        load_availability_trace(path, 4, NAMES[:4])
    assert path in str(err.value)


def test_missing_trace_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_availability_trace(str(tmp_path / "gone.csv"), 4, NAMES[:4])


# ----------------------------------------------------------------------------------------------
# stragglers
# ----------------------------------------------------------------------------------------------

def test_lognormal_jitter_moments_and_deadline_drops():
    sigma = 0.5
    j = ComputeJitter.from_spec(StragglerSpec(jitter="lognormal", jitter_sigma=sigma), 500, 3)
    x = j.factors(np.arange(500)[:, None], np.arange(600)[None, :]).ravel()
    n = x.size
    ex = [math.exp(k * (k - 1) * sigma**2 / 2) for k in range(5)]     # E[X^k] for E[X] = 1
    var = ex[2] - 1.0
    mu4 = ex[4] - 4 * ex[3] + 6 * ex[2] - 3.0                         # E[(X - 1)^4]
    assert abs(x.mean() - 1.0) < 5.0 * math.sqrt(var / n)
    assert abs(x.var(ddof=1) - var) < 5.0 * math.sqrt((mu4 - var**2) / n)
    base_s = 2.0
    for deadline_s in (1.5, 2.5, 4.0):
        p = 1.0 - _phi((math.log(deadline_s / base_s) + sigma**2 / 2) / sigma)
        drop = np.mean(base_s * x > deadline_s)
        assert abs(drop - p) < 5.0 * math.sqrt(p * (1 - p) / n)


def test_jitter_is_deterministic_per_device_and_job():
    spec = StragglerSpec(jitter="lognormal", jitter_sigma=0.8)
    a, b = ComputeJitter.from_spec(spec, 10, 7), ComputeJitter.from_spec(spec, 30, 7)
    grid = a.factors(np.arange(10)[:, None], np.arange(5)[None, :])
    assert grid.tolist() == [[b.factor(d, k) for k in range(5)] for d in range(10)]
    assert a.factor(3, 4) == a.factor(3, 4) and a.factor(3, 4) != a.factor(4, 3)
    assert ComputeJitter.from_spec(spec, 10, 8).factor(3, 4) != a.factor(3, 4)
    with pytest.raises(ValueError, match="job_index"):
        a.factor(0, -1)


# ----------------------------------------------------------------------------------------------
# random waypoint
# ----------------------------------------------------------------------------------------------

def _segment_length_in_box(p: np.ndarray, q: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Length of the part of segment pq inside the square [lo, hi]^2 (Liang-Barsky clipping)."""
    d = q - p
    t0, t1 = np.zeros(len(p)), np.ones(len(p))
    for k in range(2):
        with np.errstate(divide="ignore", invalid="ignore"):
            ta, tb = (lo - p[:, k]) / d[:, k], (hi - p[:, k]) / d[:, k]
        t0, t1 = np.maximum(t0, np.minimum(ta, tb)), np.minimum(t1, np.maximum(ta, tb))
    return np.where(t1 > t0, (t1 - t0) * np.hypot(d[:, 0], d[:, 1]), 0.0)


def _rwp_samples(n=600, ticks=2400, burn=200, area=100.0, v=(1.0, 5.0), pause_s=0.0, seed=6):
    rng = np.random.default_rng(0)
    start = rng.random((n, 2)) * area
    m = Mobility.from_spec(MobilitySpec(model="random_waypoint", area_m=[0.0, 0.0, area, area], v_min_mps=v[0],
                                        v_max_mps=v[1], pause_s=pause_s, tick_s=1.0), start, seed)
    assert isinstance(m, RandomWaypoint)
    centre, speed, prev = np.zeros(n), np.zeros(n), m.positions_m.copy()
    for k in range(1, burn + ticks + 1):
        pos = m.advance(float(k))
        legs = m.leg_speeds_mps
        assert legs.min() >= v[0] and legs.max() <= v[1]
        assert (np.hypot(*(pos - prev).T) <= v[1] * 1.0 * (1 + 1e-12)).all()
        assert (pos >= 0).all() and (pos <= area).all()
        prev = pos.copy()
        if k > burn:
            inside = (np.abs(pos - area / 2) <= area / 4).all(axis=1)
            centre += inside
            speed += m.speeds_mps
    return centre / ticks, speed / ticks


def test_random_waypoint_stationary_density_and_speed():
    centre, speed = _rwp_samples()
    n = len(centre)
    # time-average fraction in the central square of half width L/4
    # (a) exact for zero pause (renewal-reward): E|leg within A| / E|leg|, legs between uniform points
    rng = np.random.default_rng(123)
    m = 2_000_000
    p, q = rng.random((m, 2)), rng.random((m, 2))
    inside = _segment_length_in_box(p, q, 0.25, 0.75)
    length = np.hypot(*(q - p).T)
    exact = inside.sum() / length.sum()
    ratio_terms = inside - exact * length                # delta method: SE of a ratio of means
    se_exact = ratio_terms.std() / (length.mean() * math.sqrt(m))
    se_sim = centre.std(ddof=1) / math.sqrt(n)
    assert abs(centre.mean() - exact) < 5.0 * math.hypot(se_sim, se_exact)
    # (b) Bettstetter, Resta & Santi 2003: f(x, y) ~ (36/L^6)(x^2 - L^2/4)(y^2 - L^2/4): per axis
    # the mass of |x| <= L/4 is 6 (1/8 - 1/96) = 0.6875, so 0.6875^2 = 0.4727 (the product form
    # is an approximation; it is about 0.018 above the exact 0.4545)
    assert abs(centre.mean() - 0.6875**2) < 0.03
    assert centre.mean() > 0.25 + 0.15          # far from uniform: denser in the centre
    # time-average speed with no pause: 1 / E[1/V] = (v_max - v_min) / ln(v_max / v_min)
    harmonic = (5.0 - 1.0) / math.log(5.0)
    assert abs(speed.mean() - harmonic) < 5.0 * speed.std(ddof=1) / math.sqrt(n)
    assert abs(speed.mean() - 3.0) > 0.3        # the arithmetic mean speed is not the time average


def test_random_waypoint_pause_fraction():
    """With pause P, a device pauses a fraction P / (P + E|leg| E[1/V]) of the time."""
    pause, area = 10.0, 100.0
    centre, speed = _rwp_samples(n=300, ticks=1500, pause_s=pause, seed=8)
    # E|leg| between uniform points of the square (about 0.5214 L), by Monte Carlo
    rng = np.random.default_rng(5)
    m = 1_000_000
    lengths = np.hypot(*(rng.random((m, 2)) - rng.random((m, 2))).T) * area
    e_len, se_len = lengths.mean(), lengths.std() / math.sqrt(m)
    e_inv_v = math.log(5.0) / 4.0                        # E[1/V], V ~ U(1, 5)
    # time-average speed = E|leg| / (E|leg| E[1/V] + P) (renewal-reward over leg + pause cycles)
    expected = e_len / (e_len * e_inv_v + pause)
    d_expected = pause / (e_len * e_inv_v + pause) ** 2 * se_len   # propagated Monte Carlo error
    se_sim = speed.std(ddof=1) / math.sqrt(len(speed))
    assert abs(speed.mean() - expected) < 5.0 * math.hypot(se_sim, d_expected)
    # pausing lowers it below the no-pause value 1 / E[1/V]
    assert speed.mean() < 1.0 / e_inv_v - 0.5


def test_random_waypoint_positions_do_not_depend_on_tick():
    spec = dict(model="random_waypoint", area_m=[0.0, 0.0, 50.0, 50.0], v_min_mps=0.5, v_max_mps=2.0, pause_s=3.0)
    start = [(10.0, 10.0), (40.0, 25.0), (0.0, 50.0)]
    fine = Mobility.from_spec(MobilitySpec(tick_s=0.5, **spec), start, 4)
    coarse = Mobility.from_spec(MobilitySpec(tick_s=10.0, **spec), start, 4)
    for t in (10.0, 200.0, 1000.0):
        np.testing.assert_allclose(fine.advance(t), coarse.advance(t), rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="before the current time"):
        coarse.advance(5.0)


def test_area_must_contain_devices_and_default_area():
    with pytest.raises(ValueError, match=r"does not contain device 1"):
        Mobility.from_spec(MobilitySpec(model="random_waypoint", area_m=[0.0, 0.0, 10.0, 10.0]),
                           [(1.0, 1.0), (20.0, 5.0)], 0)
    m = Mobility.from_spec(MobilitySpec(model="random_waypoint"), [(1.0, 1.0), (20.0, 5.0)], 0,
                           server_positions_m=[(500.0, -100.0)])
    assert m.area_m == (1.0 - 300.0, -100.0 - 300.0, 500.0 + 300.0, 5.0 + 300.0)


# ----------------------------------------------------------------------------------------------
# Gauss-Markov
# ----------------------------------------------------------------------------------------------

def test_gauss_markov_speed_mean_and_std():
    n, ticks, alpha, mean, std = 400, 1500, 0.75, 1.2, 0.3
    spec = MobilitySpec(model="gauss_markov", gm_alpha=alpha, gm_mean_speed_mps=mean, gm_speed_std_mps=std,
                        area_m=[-1e4, -1e4, 1e4, 1e4])
    m = Mobility.from_spec(spec, np.zeros((n, 2)), 11)
    assert isinstance(m, GaussMarkov)
    s = np.empty((ticks, n))
    for k in range(ticks):
        m.advance(float(k + 1))
        s[k] = m.speeds_mps
    per_device_mean = s.mean(axis=0)
    assert abs(per_device_mean.mean() - mean) < 5.0 * per_device_mean.std(ddof=1) / math.sqrt(n)
    # AR(1) with stationary start: E[(s - mean)^2] = std^2 at every step
    per_device_sq = ((s - mean) ** 2).mean(axis=0)
    assert abs(per_device_sq.mean() - std**2) < 5.0 * per_device_sq.std(ddof=1) / math.sqrt(n)
    # lag-1 autocorrelation of the speed is alpha
    c = ((s[1:] - mean) * (s[:-1] - mean)).mean(axis=0) / std**2
    assert abs(c.mean() - alpha) < 5.0 * c.std(ddof=1) / math.sqrt(n)


def test_gauss_markov_stays_in_area_and_moves_at_its_speed():
    spec = MobilitySpec(model="gauss_markov", gm_mean_speed_mps=3.0, gm_speed_std_mps=1.0, tick_s=2.0,
                        area_m=[0.0, 0.0, 20.0, 10.0])
    m = Mobility.from_spec(spec, np.full((200, 2), 5.0), 3)
    prev, speed = m.positions_m.copy(), m.speeds_mps
    for k in range(1, 300):
        pos = m.advance(2.0 * k)
        assert (pos[:, 0] >= 0).all() and (pos[:, 0] <= 20).all() and (pos[:, 1] >= 0).all() and (pos[:, 1] <= 10).all()
        # a reflection only shortens the straight-line displacement
        assert (np.hypot(*(pos - prev).T) <= np.abs(speed) * 2.0 + 1e-9).all()
        prev, speed = pos.copy(), m.speeds_mps
    constant = Mobility.from_spec(spec.model_copy(update={"gm_alpha": 1.0}), np.full((5, 2), 5.0), 3)
    s0 = constant.speeds_mps
    constant.advance(100.0)
    assert constant.speeds_mps.tolist() == s0.tolist()


def test_mobility_is_reproducible():
    spec = MobilitySpec(model="gauss_markov", area_m=[0.0, 0.0, 100.0, 100.0])
    a = Mobility.from_spec(spec, np.full((30, 2), 50.0), 2)
    b = Mobility.from_spec(spec, np.full((60, 2), 50.0), 2)   # more devices: the first 30 move the same
    a.advance(50.0)
    b.advance(20.0)
    b.advance(50.0)
    assert a.positions_m.tolist() == b.positions_m[:30].tolist()


# ----------------------------------------------------------------------------------------------
# handover
# ----------------------------------------------------------------------------------------------

def test_hysteresis_prevents_ping_pong_and_clear_win_hands_over():
    rng = np.random.default_rng(0)
    steps = 500
    # a device on the cell boundary: the two servers' powers differ by +-1.5 dB of noise
    diff = rng.uniform(-1.5, 1.5, steps)
    current = np.array([0])
    flips_hyst = 0
    for dlt in diff:
        p = np.array([[-80.0, -80.0 + dlt]])
        current, ho = associate(p, current, 3.0)
        flips_hyst += int(ho[0])
    assert flips_hyst == 0 and current[0] == 0
    current, flips_none = np.array([0]), 0
    for dlt in diff:
        current, ho = associate(np.array([[-80.0, -80.0 + dlt]]), current, 0.0)
        flips_none += int(ho[0])
    assert flips_none > steps // 4        # without hysteresis it ping-pongs
    # a clear win (5 dB > 3 dB) hands over, a win by exactly the margin does not
    new, ho = associate(np.array([[-80.0, -75.0], [-80.0, -77.0], [-70.0, -90.0]]), np.array([0, 0, 1]), 3.0)
    assert new.tolist() == [1, 0, 0] and ho.tolist() == [True, False, True]
    # a first association (-1) takes the strongest server and is not a handover
    new, ho = associate(np.array([[-90.0, -60.0, -60.0]]), np.array([-1]), 3.0)
    assert new.tolist() == [1] and ho.tolist() == [False]
    with pytest.raises(ValueError, match="out of range"):
        associate(np.array([[-90.0, -60.0]]), np.array([2]), 3.0)


# ----------------------------------------------------------------------------------------------
# DVFS
# ----------------------------------------------------------------------------------------------

def test_dvfs_time_and_energy():
    flops, fpc, f, kappa = 3.2e12, 16.0, 2.0e9, 1e-28
    t, e = dvfs_time_energy(flops, fpc, f, kappa)
    cycles = flops / fpc
    assert t == pytest.approx(cycles / f, rel=1e-15)
    assert e == pytest.approx(kappa * cycles * f**2, rel=1e-15)
    t2, e2 = dvfs_time_energy(flops, fpc, 2 * f, kappa)
    assert t2 == pytest.approx(t / 2, rel=1e-15) and e2 == pytest.approx(4 * e, rel=1e-15)   # E ~ f^2, T ~ 1/f
    assert dvfs_time_energy(0.0, fpc, f, kappa) == (0.0, 0.0)
    with pytest.raises(ValueError, match="cpu_frequency_hz"):
        dvfs_time_energy(flops, fpc, 0.0, kappa)
    g = DeviceGroup(compute_model="dvfs", cpu_frequency_hz=f, flops_per_cycle=fpc, kappa=kappa)
    assert compute_time_energy(g, flops) == (t, e)
    g = DeviceGroup(compute_flops_per_s=1e12, compute_power_w=4.0)
    assert compute_time_energy(g, flops) == pytest.approx((3.2, 12.8), rel=1e-15)


def test_documented_section_is_the_default_and_lists_every_field():
    import yaml

    text = (Path(__file__).resolve().parents[2] / "docs" / "dynamics.md").read_text(encoding="utf-8")
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    documented = DynamicsSpec.model_validate(yaml.safe_load(block)["dynamics"])
    assert documented == DynamicsSpec()
    for part in ("availability", "stragglers", "mobility"):
        fields = set(type(getattr(documented, part)).model_fields)
        assert fields == set(yaml.safe_load(block)["dynamics"][part]), part
