"""Bandwidth strategies: equal, proportional (= netsim.budgets.bandwidth_shares), and the
min-max latency shares against a brute-force grid and the equal-finish-time condition."""
import math

import numpy as np
import pytest

from netsim.budgets import bandwidth_shares
from netsim.strategies import BandwidthContext, get
from netsim.strategies.bandwidth import finish_times_s, rate_bps


def ctx(bits, snr, ready=None, weights=None, band=10e6):
    k = len(bits)
    return BandwidthContext(weights=np.ones(k) if weights is None else np.asarray(weights, dtype=float),
                            payload_bits=np.asarray(bits, dtype=float), mean_snr_over_band=np.asarray(snr, dtype=float),
                            bandwidth_hz=band, ready_s=None if ready is None else np.asarray(ready, dtype=float))


def test_equal_and_proportional():
    w = [0.1, 5.0, 2.5, 1e-3]
    c = ctx([1e6] * 4, [10.0] * 4, weights=w)
    assert get("bandwidth", "equal")().shares(range(4), c).tolist() == [0.25] * 4
    got = get("bandwidth", "proportional")().shares(range(4), c)
    assert got.dtype == np.float64 and got.tolist() == bandwidth_shares(w)
    with pytest.raises(ValueError, match="positive sum"):
        get("bandwidth", "proportional")().shares(range(2), ctx([1, 1], [1, 1], weights=[0, 0]))


def test_rate_model_is_increasing_in_the_share():
    """g(b) = b B log2(1 + x/b) increases from 0 (g' = B [log2(1 + y) - y / ((1 + y) ln 2)] > 0, y = x/b)."""
    b = np.linspace(1e-6, 1, 10_001)
    for x in (1e-3, 1.0, 1e3):
        g = rate_bps(b, np.full_like(b, x), 1e6)
        assert np.all(np.diff(g) > 0)
        assert g[-1] == pytest.approx(1e6 * math.log2(1 + x))
    assert rate_bps(np.zeros(1), np.ones(1), 1e6)[0] == 0.0


CASES = [
    ([1e6, 4e6], [100.0, 10.0], [0.0, 0.0]),
    ([2e6, 2e6], [1000.0, 0.5], [0.3, 0.0]),
    ([5e5, 3e6, 1e6], [30.0, 300.0, 3.0], [0.0, 0.1, 0.05]),
    ([1e6, 1e6, 1e6], [1e4, 1.0, 50.0], [0.2, 0.0, 0.0]),
    ([1e6, 1e6], [100.0, 100.0], [5.0, 0.0]),             # device 0 starts late: device 1 gets a sliver
    ([1e6, 8e6, 1e3], [1e-2, 1e5, 10.0], [0.0, 0.0, 3.0]),
]


@pytest.mark.parametrize("bits,snr,ready", CASES)
def test_min_max_latency_equalises_finish_times_and_beats_a_grid(bits, snr, ready):
    c = ctx(bits, snr, ready)
    k = len(bits)
    b = get("bandwidth", "min_max_latency")().shares(range(k), c)
    assert b.shape == (k,) and np.all(b > 0) and abs(b.sum() - 1) <= 4 * k * 2**-52
    t = finish_times_s(b, c)
    assert t.max() / t.min() - 1 <= 1e-9          # equal finish times: the optimality condition
    # brute force: every share vector on a grid of the simplex does no better
    if k == 2:
        g = np.linspace(0, 1, 200_001)[1:-1]
        grid = np.stack([g, 1 - g], axis=1)
    else:
        g = np.linspace(0, 1, 801)[1:-1]
        b1, b2 = np.meshgrid(g, g, indexing="ij")
        keep = b1 + b2 < 1 - 1e-12
        grid = np.stack([b1[keep], b2[keep], 1 - b1[keep] - b2[keep]], axis=1)
    worst = np.max(np.stack([finish_times_s(grid[:, i], ctx([bits[i]], [snr[i]], [ready[i]]))
                             for i in range(k)], axis=1), axis=1)
    assert t.max() <= worst.min() * (1 + 1e-12)
    assert worst.min() <= t.max() * (1 + 1e-2)     # the grid comes close to it


def test_min_max_latency_identical_devices_share_equally_and_edge_cases():
    b = get("bandwidth", "min_max_latency")().shares(range(4), ctx([1e6] * 4, [20.0] * 4))
    assert np.allclose(b, 0.25, rtol=1e-12, atol=0)
    assert get("bandwidth", "min_max_latency")().shares([7], ctx([1e6], [20.0])).tolist() == [1.0]
    with pytest.raises(ValueError, match=r"payload_bits=0.0 for device 1"):
        get("bandwidth", "min_max_latency")().shares([0, 1], ctx([1e6, 0.0], [1.0, 1.0]))
    with pytest.raises(ValueError, match="mean_snr_over_band=nan"):
        get("bandwidth", "min_max_latency")().shares([0, 1], ctx([1e6, 1.0], [np.nan, 1.0]))
    with pytest.raises(ValueError, match="ready_s has 1 entries"):
        ctx([1.0, 1.0], [1.0, 1.0], ready=[0.0])


def test_min_max_latency_never_worse_than_equal_or_proportional():
    rng = np.random.default_rng(4)
    for _ in range(40):
        k = int(rng.integers(2, 40))
        c = ctx(rng.uniform(1e5, 1e7, k), 10 ** rng.uniform(-2, 5, k), rng.uniform(0, 2.0, k),
                weights=rng.uniform(0.1, 3, k))
        t = finish_times_s(get("bandwidth", "min_max_latency")().shares(range(k), c), c)
        assert t.max() / t.min() - 1 <= 1e-9
        best = t.max()
        for other in ("equal", "proportional"):
            assert best <= finish_times_s(get("bandwidth", other)().shares(range(k), c), c).max() * (1 + 1e-12)
