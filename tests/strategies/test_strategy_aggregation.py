"""Aggregation strategies: FedAvg / FedProx weights, FedAdam / FedYogi against Reddi et al.
(2021) Algorithm 2 written out per coordinate, FedBuff weights and the staleness functions."""
import math

import numpy as np
import pytest

from netsim.strategies import StrategiesSpec, build, get, staleness_weight


def test_fedavg_weights_and_identity_step():
    agg = get("aggregation", "fedavg")()
    w = agg.weights(np.array([10, 30, 60]), np.zeros(3))
    assert w.tolist() == [0.1, 0.3, 0.6]
    delta = np.array([1.0, -2.0])
    assert agg.server_step(delta) is delta
    assert agg.identity_step and agg.local_prox_mu == 0.0
    with pytest.raises(ValueError, match="positive sum"):
        agg.weights(np.zeros(2), np.zeros(2))
    with pytest.raises(ValueError, match="staleness"):
        agg.weights(np.ones(2), np.array([0.0, -1.0]))


def test_fedprox_exposes_mu():
    spec = StrategiesSpec.model_validate({"aggregation": {"name": "fedprox", "params": {"mu": 0.1}}})
    agg = build(spec, "aggregation")
    assert agg.local_prox_mu == 0.1 and agg.identity_step
    assert agg.weights(np.array([1, 3]), np.zeros(2)).tolist() == [0.25, 0.75]
    with pytest.raises(ValueError, match="greater than 0"):
        StrategiesSpec.model_validate({"aggregation": {"name": "fedprox", "params": {"mu": 0.0}}})


def reference_adaptive(deltas, eta, b1, b2, tau, yogi):
    """Reddi et al. (2021) Algorithm 2, one coordinate at a time in Python floats."""
    q = len(deltas[0])
    m, v = [0.0] * q, [tau * tau] * q
    steps = []
    for d in deltas:
        step = []
        for i in range(q):
            m[i] = b1 * m[i] + (1 - b1) * d[i]
            d2 = d[i] * d[i]
            if yogi:
                v[i] = v[i] - (1 - b2) * d2 * (1.0 if v[i] > d2 else -1.0 if v[i] < d2 else 0.0)
            else:
                v[i] = b2 * v[i] + (1 - b2) * d2
            step.append(eta * m[i] / (math.sqrt(v[i]) + tau))
        steps.append(step)
    return steps


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_adaptive_server_optimisers_follow_the_paper(name):
    rng = np.random.default_rng(1)
    deltas = [rng.normal(0, s, 7) for s in (1e-2, 1e-3, 1e-1, 1e-2, 1e-4)]
    params = {"server_lr": 0.03, "beta1": 0.8, "beta2": 0.95, "tau": 1e-3}
    agg = build(StrategiesSpec.model_validate({"aggregation": {"name": name, "params": params}}), "aggregation")
    assert not agg.identity_step
    ref = reference_adaptive([d.tolist() for d in deltas], 0.03, 0.8, 0.95, 1e-3, yogi=name == "fedyogi")
    for d, want in zip(deltas, ref):
        got = agg.server_step(d.copy())
        # a handful of float64 operations per coordinate: relative error a few ulp
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=0)
    assert np.all(agg.v > 0)
    with pytest.raises(ValueError, match="7"):
        agg.server_step(np.zeros(3))


def test_fedadam_defaults_and_first_step_closed_form():
    """Defaults beta1 = 0.9, beta2 = 0.99, tau = 1e-3. From m = 0, v = tau^2 the first step is
    eta (1 - b1) delta / (sqrt(b2 tau^2 + (1 - b2) delta^2) + tau)."""
    agg = get("aggregation", "fedadam")()
    p = agg.params
    assert (p.beta1, p.beta2, p.tau) == (0.9, 0.99, 1e-3)
    d = np.array([0.5, -1e-4, 0.0])
    want = p.server_lr * 0.1 * d / (np.sqrt(0.99 * 1e-6 + 0.01 * d * d) + 1e-3)
    np.testing.assert_allclose(agg.server_step(d), want, rtol=1e-14)


def test_fedyogi_second_moment_moves_towards_delta_squared():
    agg = get("aggregation", "fedyogi")()
    agg.server_step(np.array([1.0, 1.0]))           # v = tau^2 + (1 - b2) (v < delta^2: grows)
    v1 = agg.v.copy()
    assert v1 == pytest.approx(1e-6 + 0.01)
    agg.server_step(np.array([1e-2, 10.0]))         # coordinate 0: v > delta^2 shrinks; 1: grows
    assert agg.v[0] == pytest.approx(v1[0] - 0.01 * 1e-4, rel=1e-12)
    assert agg.v[0] < v1[0] and agg.v[1] == pytest.approx(v1[1] + 0.01 * 100, rel=1e-12)


def test_staleness_functions():
    tau = np.array([0, 1, 3, 4, 5, 8])
    assert staleness_weight("constant", tau).tolist() == [1.0] * 6
    np.testing.assert_allclose(staleness_weight("polynomial", tau, a=0.5), 1 / np.sqrt(1 + tau), rtol=1e-15)
    assert staleness_weight("polynomial", 3, a=0.5) == 0.5
    assert staleness_weight("hinge", tau, a=10, b=4).tolist() == [1, 1, 1, 1, 1 / 11, 1 / 41]
    with pytest.raises(ValueError, match="allowed: constant, polynomial, hinge"):
        staleness_weight("linear", tau)
    with pytest.raises(ValueError, match=">= 0"):
        staleness_weight("constant", [-1])


def test_fedbuff_weights_and_step():
    spec = StrategiesSpec.model_validate({"aggregation": {"name": "fedbuff", "params": {
        "buffer_size": 4, "staleness": "hinge", "hinge_a": 2.0, "hinge_b": 1.0, "server_lr": 0.5}}})
    agg = build(spec, "aggregation")
    w = agg.weights(np.array([5, 5, 5, 5]), np.array([0, 1, 2, 5]))
    assert w.tolist() == [0.25, 0.25, 1 / 3 / 4, 1 / 9 / 4]
    assert not agg.identity_step
    assert agg.server_step(np.array([2.0, -4.0])).tolist() == [1.0, -2.0]
    default = get("aggregation", "fedbuff")()
    p = default.params
    assert (p.buffer_size, p.staleness, p.poly_a, p.server_lr) == (10, "polynomial", 0.5, 1.0)
    assert default.identity_step
    np.testing.assert_allclose(default.weights(np.ones(2), np.array([0, 3])), [0.1, 0.05], rtol=1e-15)
    with pytest.raises(ValueError, match="buffer_size"):
        StrategiesSpec.model_validate({"aggregation": {"name": "fedbuff", "params": {"buffer_size": 0}}})
