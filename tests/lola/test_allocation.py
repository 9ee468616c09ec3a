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
