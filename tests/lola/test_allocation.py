"""CRUNCH against brute force, JBBA's bandwidth properties, the baselines (torch-free)."""
import numpy as np
import pytest

from netsim.lola.allocation import (Instance, InfeasibleError, allocate, brute_force_minmax, crunch,
                                    crunch_matching, jbba, minmax_bandwidth, round_latency_s, _bandwidth_for_rate)


def random_instance(rng, k=None, n=None, integer=False, memory=True) -> Instance:
    """Monotone depth cost: block n costs an increasing amount of FLOPs; memory grows with depth."""
    k = k or int(rng.integers(1, 7))
    n = n or int(rng.integers(1, k + 1))
    step = rng.integers(1, 4, size=n) if integer else rng.random(n) + 0.05
    flops = np.cumsum(step).astype(float) * 1e9
    speed = (rng.integers(1, 4, size=k) if integer else rng.random(k) + 0.2) * 1e9
    mem_need = np.cumsum(rng.random(n) + 0.1)
    dev_mem = rng.random(k) * mem_need[-1] * 1.5 if memory else np.full(k, np.inf)
    return Instance(compute_s=flops[None, :] / speed[:, None], memory_ok=mem_need[None, :] <= dev_mem[:, None],
                    upload_bits=np.full(n, 1e6), snr_hz=10 ** rng.uniform(9, 13, size=k),
                    bandwidth_hz=10e6, compute_flops_per_s=speed)


def check_matching(latency, dev, value):
    assert len(set(dev.tolist())) == len(dev)
    assert max(latency[k, j] for j, k in enumerate(dev)) == pytest.approx(value, rel=0, abs=0)


def test_crunch_equals_brute_force_on_monotone_instances():
    rng = np.random.default_rng(1)
    solved = 0
    for i in range(400):
        inst = random_instance(rng, integer=(i % 3 == 0))
        lat = inst.latency_matrix(np.full(inst.num_devices, inst.bandwidth_hz / inst.num_blocks))
        best = brute_force_minmax(lat)
        if not np.isfinite(best):
            with pytest.raises(InfeasibleError):
                crunch(inst)
            continue
        alloc = crunch(inst)
        assert alloc.info["nested"]  # the Hall-count check was used
        assert alloc.planned_latency_s == best
        check_matching(lat, alloc.device_of_block, best)
        solved += 1
    assert solved >= 200


def test_crunch_equals_brute_force_without_monotone_structure():
    """Arbitrary latency matrices (unequal uploads): the bipartite-matching check takes over."""
    rng = np.random.default_rng(2)
    for _ in range(200):
        k = int(rng.integers(1, 6))
        n = int(rng.integers(1, k + 1))
        lat = rng.integers(1, 10, size=(k, n)).astype(float)
        lat[rng.random((k, n)) < 0.2] = np.inf
        best = brute_force_minmax(lat)
        if not np.isfinite(best):
            with pytest.raises(InfeasibleError):
                crunch_matching(lat)
            continue
        dev, value, _ = crunch_matching(lat)
        assert value == best
        check_matching(lat, dev, best)


def test_bandwidth_inverse_is_exact():
    g = np.array([1e8, 1e10, 1e13])
    r = np.array([1e5, 3e7, 2e8])
    b = _bandwidth_for_rate(g, r)
    assert np.allclose(b * np.log2(1 + g / b), r, rtol=1e-9)
    assert np.isinf(_bandwidth_for_rate(np.array([1e6]), np.array([1e7])))[0]  # above gamma/ln2


def test_minmax_bandwidth_equalises_latencies():
    comp = np.array([0.1, 0.3, 0.05])
    bits = np.array([2e6, 2e6, 2e6])
    g = np.array([1e10, 1e11, 1e9])
    b = minmax_bandwidth(comp, bits, g, 10e6)
    assert b.sum() == pytest.approx(10e6, rel=1e-12)
    t = comp + bits / (b * np.log2(1 + g / b))
    assert np.ptp(t) < 1e-6 * t.max()


def test_jbba_shares_sum_to_budget_and_favour_the_bottleneck():
    rng = np.random.default_rng(3)
    done = 0
    for _ in range(150):
        inst = random_instance(rng)
        try:
            ref = crunch(inst)
        except InfeasibleError:
            continue
        alloc = jbba(inst, iterations=10)
        dev = alloc.device_of_block
        n = inst.num_blocks
        assert alloc.bandwidth_hz.sum() == pytest.approx(inst.bandwidth_hz, rel=1e-9)
        assert np.all(alloc.bandwidth_hz[np.setdiff1d(np.arange(inst.num_devices), dev)] == 0)
        # bottleneck = the involved device slowest under the equal share B/N
        eq = np.full(inst.num_devices, inst.bandwidth_hz / n)
        t_eq = inst.latency_matrix(eq)[dev, np.arange(n)]
        bottleneck = dev[int(np.argmax(t_eq))]
        assert alloc.bandwidth_hz[bottleneck] >= inst.bandwidth_hz / n * (1 - 1e-9)
        # never worse than CRUNCH with equal bandwidth
        assert alloc.planned_latency_s <= ref.planned_latency_s * (1 + 1e-9)
        assert round_latency_s(inst, dev, alloc.bandwidth_hz) == pytest.approx(alloc.planned_latency_s)
        done += 1
    assert done >= 60


@pytest.mark.parametrize("name", ["crunch", "jbba", "random", "greedy", "depth_unaware", "equal_bandwidth"])
def test_every_algorithm_gives_a_feasible_matching(name):
    rng = np.random.default_rng(4)
    for _ in range(30):
        inst = random_instance(rng, k=5, n=3)
        try:
            crunch(inst)
        except InfeasibleError:
            continue
        alloc = allocate(name, inst, rng=np.random.default_rng(0), **({"iterations": 5} if name == "jbba" else {}))
        dev = alloc.device_of_block
        assert len(set(dev.tolist())) == 3
        assert all(inst.memory_ok[k, j] for j, k in enumerate(dev))
        assert alloc.bandwidth_hz.sum() <= inst.bandwidth_hz * (1 + 1e-9)
        assert alloc.planned_latency_s >= crunch(inst).planned_latency_s * (1 - 1e-9) or name == "jbba"


def test_greedy_gives_the_deepest_block_to_the_fastest_device():
    inst = Instance(compute_s=np.array([[1.0, 2.0], [0.5, 1.0], [0.25, 0.5]]), memory_ok=np.ones((3, 2), bool),
                    upload_bits=np.ones(2), snr_hz=np.full(3, 1e12), bandwidth_hz=1e6,
                    compute_flops_per_s=np.array([1.0, 2.0, 4.0]))
    assert allocate("greedy", inst).device_of_block.tolist() == [1, 2]


# ------------------------------------------------------------------ infeasibility marker
def test_crunch_with_latencies_beyond_1e30_and_infeasible_pairs_equals_brute_force():
    """np.inf is the only infeasibility marker: finite latencies of any size (here 1e28..1e34,
    i.e. above the 1e30 once used as infinity) are never confused with infeasible pairs."""
    rng = np.random.default_rng(11)
    solved = 0
    for i in range(600):
        k = int(rng.integers(1, 6))
        n = int(rng.integers(1, k + 1))
        lat = 10.0 ** rng.uniform(28, 34, size=(k, n))
        if i % 2 == 0:
            lat = np.sort(lat, axis=1)  # nested (Hall-count) path
        lat[rng.random((k, n)) < 0.3] = np.inf
        best = brute_force_minmax(lat)
        if not np.isfinite(best):
            with pytest.raises(InfeasibleError, match="device"):
                crunch_matching(lat)
            continue
        dev, value, _ = crunch_matching(lat)
        assert value == best
        assert all(np.isfinite(lat[kk, j]) for j, kk in enumerate(dev))
        check_matching(lat, dev, best)
        solved += 1
    assert solved >= 150


def test_the_case_a_finite_big_number_used_to_break():
    # device 0 can only do block 1 (latency 1e31); device 1 can do both. With 1e30 standing for
    # infinity, block 0 looked cheaper than block 1 for device 0.
    lat = np.array([[np.inf, 1e31], [5.0, 2e31]])
    dev, value, info = crunch_matching(lat)
    assert dev.tolist() == [1, 0] and value == 1e31


def test_no_feasible_matching_is_a_clear_error_for_every_algorithm():
    inst = Instance(compute_s=np.ones((2, 2)), memory_ok=np.array([[True, False], [True, False]]),
                    upload_bits=np.ones(2), snr_hz=np.full(2, 1e9), bandwidth_hz=1e6,
                    compute_flops_per_s=np.ones(2))
    for name in ("crunch", "jbba", "random", "greedy", "depth_unaware", "equal_bandwidth"):
        with pytest.raises(InfeasibleError):
            allocate(name, inst, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="NaN"):
        crunch_matching(np.array([[np.nan, 1.0]]))


def test_hungarian_baselines_respect_infeasible_pairs_with_huge_latencies():
    rng = np.random.default_rng(12)
    for _ in range(50):
        inst = random_instance(rng, k=5, n=3)
        inst = Instance(compute_s=inst.compute_s * 1e32, memory_ok=inst.memory_ok, upload_bits=inst.upload_bits,
                        snr_hz=inst.snr_hz, bandwidth_hz=inst.bandwidth_hz,
                        compute_flops_per_s=inst.compute_flops_per_s)
        try:
            crunch(inst)
        except InfeasibleError:
            continue
        for name in ("jbba", "random", "depth_unaware"):
            alloc = allocate(name, inst, rng=np.random.default_rng(0), **({"iterations": 3} if name == "jbba" else {}))
            assert all(inst.memory_ok[k, j] for j, k in enumerate(alloc.device_of_block))


# ------------------------------------------------------------------ min-max split at extreme SNRs
LN2 = np.log(2.0)


def _latencies(comp, bits, gamma, b):
    return comp + bits * LN2 / (b * np.log1p(gamma / b))


def _reference_minmax_latency(comp, bits, gamma, total_hz):
    """Independent reference: bisection on T (200 steps), inside it bisection on ln b (200 steps)
    of R(b) = b ln(1 + gamma/b)/ln 2 = S / (T - C); no closed form, no Newton."""
    def band(g, r):
        lo, hi = -700.0, 700.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if np.exp(mid) * np.log1p(g / np.exp(mid)) / LN2 < r:
                lo = mid
            else:
                hi = mid
        return np.exp(0.5 * (lo + hi))

    lo = float(np.max(comp + bits * LN2 / gamma))
    hi = float(np.max(_latencies(comp, bits, gamma, np.full(len(comp), total_hz / len(comp)))))
    for _ in range(200):
        t = 0.5 * (lo + hi)
        rates = bits / (t - comp)
        need = sum(np.inf if r >= g / LN2 else band(g, r) for g, r in zip(gamma, rates))
        lo, hi = (t, hi) if need > total_hz else (lo, t)
    return 0.5 * (lo + hi)


@pytest.mark.parametrize("snr_db", [[-80, -80, -80], [-80, -60, -40], [-45, -40, -50], [-20, 0, 20],
                                    [40, 60, 50], [60, 60, 60], [-80, 0, 60], [-80, 60]])
def test_minmax_bandwidth_equalises_latencies_at_extreme_snr(snr_db):
    """SNR per equal share from -80 dB (deep in the wideband regime, where the Lambert-W form
    lost every digit) to +60 dB: the latencies are equal and equal to the reference optimum.
    The optimum T is well conditioned (relative error ~ eps of the inputs), so 1e-12 is a
    tolerance of the maths, not of one libm."""
    total = 10e6
    m = len(snr_db)
    gamma = 10.0 ** (np.array(snr_db) / 10.0) * total / m
    comp = np.array([0.1, 0.3, 0.05][:m])
    bits = np.array([2e6, 1e6, 3e6][:m])
    b = minmax_bandwidth(comp, bits, gamma, total)
    assert np.all(b > 0)
    assert b.sum() == pytest.approx(total, rel=1e-12)
    t = _latencies(comp, bits, gamma, b)
    ref = _reference_minmax_latency(comp, bits, gamma, total)
    assert np.ptp(t) <= 1e-12 * t.max()
    np.testing.assert_allclose(t, ref, rtol=1e-12)
    # and never worse than the equal split
    eq = _latencies(comp, bits, gamma, np.full(m, total / m))
    assert t.max() <= eq.max() * (1 + 1e-15)


def test_share_snr_inverse_across_the_range():
    from netsim.lola.allocation import share_snr_for_efficiency

    x = 10.0 ** np.linspace(-9, 9, 73)
    a = np.log1p(x) / x
    got = share_snr_for_efficiency(a)
    # conditioning: d ln x / d ln a ~ 1/(1 - a) near a = 1, so the reachable relative error is
    # ~ eps / (1 - a) there, and a few eps elsewhere
    tol = 8 * np.finfo(float).eps * (1 + 1 / np.maximum(1 - a, 1e-300) + np.abs(np.log(x)))
    assert np.all(np.abs(got / x - 1) <= tol)
