"""AirComp: the power budget with unequal weights, the radiated energy, and the statistics of
the aggregate actually applied with several edge servers (torch-free)."""
import math

import numpy as np
import pytest
from scipy.special import exp1

from netsim import FakeTrainer
from netsim.aircomp import ofdm_symbol_s, over_the_air_sum, truncation_probability
from netsim.protocols.aircomp_fedavg import AirCompFedAvgSimulation
from netsim.channel import BlockFading, Link
from netsim.network import child_rng
from netsim.scenario import ChannelSpec, Scenario

M = 64
SPACING = 15e3
T_SYM = ofdm_symbol_s(SPACING)


def links(gains, powers):
    return [Link(g, p, BlockFading("rayleigh", 0.01, child_rng(5, 7, i)), ChannelSpec())
            for i, (g, p) in enumerate(zip(gains, powers))]


def slot(x, w, ls, policy, g_th=0.2, noise_w=1e-18):
    """One slot with a new coherence block every OFDM symbol: value j rides sub-carrier j % M of
    symbol j // M, i.e. draw j of the link's fading stream."""
    return over_the_air_sum(x, w, ls, num_subcarriers=M, subcarrier_spacing_hz=SPACING, noise_w_per_subcarrier=noise_w,
                            truncation_threshold=g_th, power_policy=policy, coherence_time_s=T_SYM,
                            rng=np.random.default_rng(0))


def independent_symbol_powers(x, w, ls, rho0, g_th):
    """(K, q) power each device radiates on each value, rebuilt from the definitions: symbols
    u = K a x / s (s the RMS of all K a x), |p|^2 = rho0 / (g |h~|^2) where |h~|^2 >= g_th,
    h~ of value j = draw j of the link's fading stream (block j // M, sub-carrier j % M)."""
    k, q = x.shape
    scaled = k * np.asarray(w)[:, None] * x
    u = scaled / math.sqrt(np.mean(scaled**2))
    h2 = np.stack([l.fading.power_gains(0, q) for l in ls])
    g = np.array([l.large_scale_gain for l in ls])[:, None]
    return np.where(h2 >= g_th, rho0 * u**2 / (g * h2), 0.0), u


# non-IID: one device holds 70 % of the data, the others 10 % each; unequal gains and budgets
WEIGHTS = np.array([0.7, 0.1, 0.1, 0.1])
GAINS = [1e-10, 2e-10, 5e-10, 5e-9]
POWERS = [0.2, 0.2, 0.05, 0.2]


def updates(q, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 1.0, (4, q)) * np.array([[1.0], [0.5], [2.0], [1.0]])


def test_peak_policy_never_exceeds_any_budget_on_any_symbol():
    q = M * 300
    x = updates(q)
    ls = links(GAINS, POWERS)
    _, st = slot(x, WEIGHTS, ls, "peak")
    power, _ = independent_symbol_powers(x, WEIGHTS, ls, st.rho0_w, 0.2)
    per_symbol = power.reshape(4, -1, M).sum(axis=2)            # (K, symbols): total over the M sub-carriers
    assert np.all(per_symbol <= np.array(POWERS)[:, None] * (1 + 1e-12))
    per_subcarrier_peak = power.max(axis=1) / (np.array(POWERS) / M)
    assert per_subcarrier_peak.max() <= 1 + 1e-12               # the bound holds value by value
    # and rho0 is not smaller than needed: the binding device's bound is met with equality
    u2max = np.max((4 * WEIGHTS[:, None] * x) ** 2, axis=1) / np.mean((4 * WEIGHTS[:, None] * x) ** 2)
    binding = np.min(np.array(POWERS) / M * np.array(GAINS) * 0.2 / u2max)
    assert st.rho0_w == pytest.approx(binding, rel=1e-12)


def test_average_policy_meets_the_budget_in_expectation_and_in_the_realisation():
    q = M * 4000
    x = updates(q)
    ls = links(GAINS, POWERS)
    g_th = 0.2
    _, st = slot(x, WEIGHTS, ls, "average", g_th)
    # expected power per sub-carrier symbol rho0 E1(g_th) c_k / g_k <= P_k / M, equality for the binding device
    scaled = 4 * WEIGHTS[:, None] * x
    c = np.mean(scaled**2, axis=1) / np.mean(scaled**2)
    expected = st.rho0_w * exp1(g_th) * c / np.array(GAINS)
    ratio = expected / (np.array(POWERS) / M)
    assert ratio.max() == pytest.approx(1.0, rel=1e-12) and np.all(ratio <= 1 + 1e-12)
    assert c[0] > 2.0  # the heavy device's symbols carry > 2x the mean power: unit power would overspend
    # realised mean power over the slot: within sampling error (1/|h|^2 on h^2 >= g_th has
    # finite variance; relative std over q = 256,000 values < 1 %) of the expectation, so below budget
    realised = np.array(st.tx_energy_j) / st.latency_s
    np.testing.assert_allclose(realised, expected * M, rtol=0.05)
    assert np.all(realised <= np.array(POWERS) * 1.05)


@pytest.mark.parametrize("policy", ["average", "peak"])
def test_logged_energy_is_the_radiated_energy(policy):
    q = M * 50 + 17           # a partial last symbol too
    x = updates(q, seed=3)
    ls = links(GAINS, POWERS)
    _, st = slot(x, WEIGHTS, ls, policy)
    power, _ = independent_symbol_powers(x, WEIGHTS, ls, st.rho0_w, 0.2)
    np.testing.assert_allclose(st.tx_energy_j, power.sum(axis=1) * T_SYM, rtol=1e-12)


def test_unit_symbol_power_would_overspend_with_unequal_weights():
    """The reason for counting c_k: with unit-power symbols assumed, rho0 would be larger and the
    heavy device (the weakest P g too) would radiate about c_0 times its budget (here > 3x)."""
    q = M * 2000
    x = updates(q)
    ls = links(GAINS, POWERS)
    _, st = slot(x, WEIGHTS, ls, "average")
    naive_rho0 = np.min(np.array(POWERS) / M * np.array(GAINS) / exp1(0.2))
    power, _ = independent_symbol_powers(x, WEIGHTS, ls, naive_rho0, 0.2)
    assert np.max(power.sum(axis=1) * T_SYM / st.latency_s / np.array(POWERS)) > 1.5
    assert st.rho0_w < naive_rho0


# ------------------------------------------------------------------ several edge servers
class RecordingTrainer(FakeTrainer):
    """FakeTrainer with non-IID data sizes and a random update vector per (device, round); it
    keeps every round's flattened updates and the aggregate it was asked to apply."""

    def __init__(self, scenario, seed, q):
        super().__init__(scenario, seed)
        self.q = q
        self.applied, self.vectors = [], {}

    def device_num_examples(self, device_id):
        return 10 + 37 * (device_id % 4)


    def flatten_update(self, result):
        key = (result.device_id, len(self.applied))
        if key not in self.vectors:
            rng = np.random.default_rng(1000 * result.device_id + len(self.applied))
            self.vectors[key] = 1e-3 * (rng.normal(size=self.q) + 0.3 * (result.device_id % 3))
        return self.vectors[key]

    def aggregate_flat(self, vector):
        self.applied.append(np.array(vector))
        super().aggregate_flat(vector)


def multi_server_scenario(servers, debias=False):
    edges = [{"name": f"e{i}", "position_m": [400.0 * i, 0.0]} for i in range(servers)]
    groups = [{"name": f"g{i}", "count": 3 + i, "placement": {"around_server": i, "max_distance_m": 120.0}}
              for i in range(servers)]
    return Scenario.model_validate({
        "trainer": "fake", "devices": groups, "edge_servers": edges,
        "channel": {"uplink_access": "aircomp", "uplink_bandwidth_hz": 10e6},
        "aircomp": {"num_subcarriers": 64, "receive_snr_db": 5.0, "truncation_threshold": 0.3, "debias": debias},
        "training": {"rounds": 12}, "fake": {"adapter_bytes": 4 * 64 * 60}})


@pytest.mark.parametrize("servers,debias", [(2, False), (3, False), (3, True)])
def test_multi_server_mse_is_measured_on_the_applied_aggregate(servers, debias):
    sc = multi_server_scenario(servers, debias)
    q = 64 * 60
    trainer = RecordingTrainer(sc, 0, q)
    sim = AirCompFedAvgSimulation(sc, 0, trainer)
    sim.run()
    ev = sim.recorder.to_frame()
    assert len(trainer.applied) == 12 and len(sim.aircomp_log) == 12
    measured, theory = [], []
    for r, (row, applied) in enumerate(zip(sim.aircomp_log, trainer.applied)):
        ids = [int(n[3:]) for n in ev[(ev["kind"] == "uplink") & (ev["round"] == r + 1)]["node"]]
        n = np.array([trainer.device_num_examples(i) for i in ids], dtype=float)
        x = np.stack([trainer.vectors[(i, r)] for i in ids])
        target = (n / n.sum()) @ x
        mse = np.mean((applied - target) ** 2)
        assert row["mse"] == pytest.approx(mse, rel=1e-12)
        assert row["nmse"] == pytest.approx(mse / np.mean(target**2), rel=1e-12)
        measured.append(row["mse"])
        theory.append(row["mse_theory"])
    # the closed form of the applied aggregate's MSE (truncation of all devices with their global
    # weights + W_s^2-weighted noise of each server) matches the measurement over 12 rounds x
    # 3840 values to a few per cent (sampling error of the truncation pattern and the noise)
    assert np.mean(measured) == pytest.approx(np.mean(theory), rel=0.05)


def test_applied_error_equals_direct_computation_with_three_server_slots():
    """Three slots (as three servers would run them), combined with their data shares W_s: the
    combined statistics equal a direct computation on the combined estimate."""
    from netsim.protocols.aircomp_fedavg import applied_aggregate_error

    rng = np.random.default_rng(7)
    q = M * 200
    sizes = [np.array([30.0, 5.0]), np.array([12.0, 40.0, 3.0]), np.array([20.0])]
    total = sum(s.sum() for s in sizes)
    xs = [rng.normal(size=(len(s), q)) + 0.2 for s in sizes]
    estimate, stats, shares = 0.0, [], []
    for i, (s, x) in enumerate(zip(sizes, xs)):
        ls = [Link(10 ** rng.uniform(-10, -9), 0.2, BlockFading("rayleigh", 0.01, child_rng(9, i, j)), ChannelSpec())
              for j in range(len(s))]
        w = s / total
        est, st = over_the_air_sum(x, w / w.sum(), ls, num_subcarriers=M, subcarrier_spacing_hz=SPACING,
                                   noise_w_per_subcarrier=0.0, truncation_threshold=0.3, coherence_time_s=T_SYM,
                                   rng=np.random.default_rng(i), receive_snr_db=0.0)
        estimate = estimate + est * w.sum()
        stats.append(st)
        shares.append(float(w.sum()))
    x_all = np.concatenate(xs)
    w_all = np.concatenate(sizes) / total
    out = applied_aggregate_error(estimate, x_all, w_all, stats, shares, 0.3, False)
    target = w_all @ x_all
    assert out["mse"] == pytest.approx(np.mean((estimate - target) ** 2), rel=1e-12)
    assert out["nmse"] == pytest.approx(out["mse"] / np.mean(target**2), rel=1e-12)
    # closed form written out: per value, sum_k w_k^2 x^2 p(1-p) + (sum_k w_k x p)^2 + sum_s W_s^2 s_s^2 sigma_s^2/(2 K_s^2 rho_s)
    p = truncation_probability(0.3)
    trunc = np.mean(np.sum((w_all[:, None] * x_all) ** 2 * p * (1 - p), axis=0) + (p * target) ** 2)
    noise = 0.0
    for s, x, st, share in zip(sizes, xs, stats, shares):
        a = (s / total) / share
        scale2 = np.mean((len(s) * a[:, None] * x) ** 2)
        noise += share**2 * scale2 * st.noise_w / (2 * len(s) ** 2 * st.rho0_w)
    assert out["mse_theory"] == pytest.approx(trunc + noise, rel=1e-12)
    # and it is not the sum of the per-server (normalised-weight) MSEs the log used to report
    assert abs(sum(st.mse for st in stats) - out["mse"]) > 0.1 * out["mse"]
