"""Compression strategies: QSGD unbiasedness and its variance bound (Alistarh et al. 2017,
Lemma 3.1), top-k error feedback conservation (Stich et al. 2018), payload formulas."""
import math

import numpy as np
import pytest

from netsim.strategies import StrategiesSpec, build, get


def make(name, **params):
    return build(StrategiesSpec.model_validate({"compression": {"name": name, "params": params}}), "compression")


def test_none_is_identity_with_float32_payload():
    c = make("none")
    x = np.random.default_rng(0).normal(size=37)
    decoded, bits = c.compress(3, x, np.random.default_rng(1))
    assert np.array_equal(decoded, x) and bits == 32 * 37 == c.payload_bits(37)
    with pytest.raises(ValueError, match="device 3 has value inf at position 2"):
        c.compress(3, np.array([0.0, 1.0, np.inf]), np.random.default_rng(1))
    with pytest.raises(ValueError, match="flat vector"):
        c.compress(3, np.zeros((2, 2)), np.random.default_rng(1))


def qsgd_level_variance(x, s):
    """Exact per-coordinate variance of QSGD: (||x|| / s)^2 p (1 - p), p = frac(s |x_i| / ||x||)."""
    norm = np.linalg.norm(x)
    r = s * np.abs(x) / norm
    p = r - np.floor(r)
    return (norm / s) ** 2 * p * (1 - p)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_qsgd_is_unbiased_within_5_sigma(bits):
    c = make("qsgd", bits=bits)
    s = 2**bits - 1
    x = np.random.default_rng(bits).normal(size=16) * np.geomspace(1e-3, 10, 16)
    rng = np.random.default_rng(100 + bits)
    draws = 20_000
    total = np.zeros_like(x)
    sq_err = np.empty(draws)
    for t in range(draws):
        decoded, payload = c.compress(0, x, rng)
        total += decoded
        sq_err[t] = np.sum((decoded - x) ** 2)
    assert payload == 32 + 16 * (bits + 1)
    var = qsgd_level_variance(x, s)
    sigma = np.sqrt(var / draws)
    norm = np.linalg.norm(x)
    assert np.all(np.abs(total / draws - x) <= 5 * sigma + 1e-12 * norm)
    # the mean squared error: its expectation is sum(var), within 5 standard errors
    se = sq_err.std(ddof=1) / math.sqrt(draws)
    assert abs(sq_err.mean() - var.sum()) <= 5 * se
    bound = min(16 / s**2, math.sqrt(16) / s) * norm**2
    assert sq_err.mean() <= bound + 5 * se


def test_qsgd_variance_bound_lemma_3_1():
    """E ||Q(x) - x||^2 = sum_i (||x||/s)^2 p_i (1 - p_i) <= min(q / s^2, sqrt(q) / s) ||x||^2."""
    rng = np.random.default_rng(7)
    for _ in range(200):
        q = int(rng.integers(1, 2000))
        s = 2 ** int(rng.integers(1, 9)) - 1
        x = rng.standard_t(2, size=q)
        exact = qsgd_level_variance(x, s).sum()
        assert exact <= min(q / s**2, math.sqrt(q) / s) * np.dot(x, x) * (1 + 1e-12)


def test_qsgd_levels_fit_in_b_bits_and_zero_vector():
    c = make("qsgd", bits=3)
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(size=50), [0.0]])
    decoded, _ = c.compress(1, x, rng)
    norm = np.linalg.norm(x)
    levels = np.abs(decoded) * 7 / norm
    assert np.allclose(levels, np.round(levels), rtol=0, atol=1e-9)
    assert levels.max() <= 7 + 1e-9 and decoded[-1] == 0.0
    assert np.all((np.sign(decoded) == np.sign(x)) | (decoded == 0))
    one_hot = np.zeros(5)
    one_hot[2] = -3.0
    assert c.compress(0, one_hot, rng)[0].tolist() == one_hot.tolist()   # |x_i| = ||x||: level s exactly
    zeros, bits = c.compress(0, np.zeros(9), rng)
    assert not zeros.any() and bits == 32 + 9 * 4


def run_topk(c, inputs, device=0):
    decoded = [c.compress(device, x, np.random.default_rng(0))[0] for x in inputs]
    return decoded, c.residual[device]


def test_topk_error_feedback_conserves_the_sum_exactly_on_integers():
    rng = np.random.default_rng(3)
    q, rounds = 200, 40
    inputs = [rng.integers(-1000, 1000, q).astype(np.float64) for _ in range(rounds)]
    c = make("topk", fraction=0.05)
    decoded, residual = run_topk(c, inputs)
    # integer values below 2^53: every add is exact, so the identity holds bit for bit
    assert np.array_equal(np.sum(decoded, axis=0) + residual, np.sum(inputs, axis=0))
    assert all(np.count_nonzero(d) <= 10 for d in decoded)


def test_topk_error_feedback_conserves_the_sum_up_to_rounding():
    rng = np.random.default_rng(4)
    q, rounds = 500, 50
    inputs = [rng.normal(size=q) for _ in range(rounds)]
    c = make("topk", fraction=0.02)
    decoded, residual = run_topk(c, inputs, device=9)
    # each of the ~3 T adds per coordinate (in the compressor and here) errs by at most 2^-53
    # times a magnitude bounded by T max|x|
    tol = 3 * rounds * 2.0**-53 * rounds * max(np.abs(x).max() for x in inputs)
    assert np.max(np.abs(np.sum(decoded, axis=0) + residual - np.sum(inputs, axis=0))) <= tol


def test_topk_sends_the_largest_entries_of_update_plus_residual():
    rng = np.random.default_rng(5)
    q = 64
    c = make("topk", fraction=0.1)
    k = math.ceil(0.1 * q)
    mine = {0: np.zeros(q), 1: np.zeros(q)}
    for t in range(10):
        for dev in (0, 1):
            x = rng.normal(size=q)
            sent, bits = c.compress(dev, x, rng)
            acc = x + mine[dev]
            top = np.argsort(-np.abs(acc))[:k]
            assert set(np.flatnonzero(sent)) == set(top)
            assert np.array_equal(sent[top], acc[top])
            mine[dev] = np.where(sent != 0, 0.0, acc)
            assert np.array_equal(c.residual[dev], mine[dev])
            assert bits == k * (32 + math.ceil(math.log2(q))) == 7 * 38
    with pytest.raises(ValueError, match="device 0 has 10 values, its residual 64"):
        c.compress(0, np.ones(10), rng)


def test_topk_payload_formula():
    c = make("topk", fraction=0.25)
    assert [c.kept(q) for q in (1, 3, 4, 5, 1000)] == [1, 1, 1, 2, 250]
    assert c.payload_bits(1) == 32
    assert c.payload_bits(1000) == 250 * (32 + 10)
    assert c.payload_bits(1024) == 256 * (32 + 10)
    assert c.payload_bits(1025) == 257 * (32 + 11)
    with pytest.raises(ValueError, match="less than or equal to 1"):
        make("topk", fraction=1.5)
