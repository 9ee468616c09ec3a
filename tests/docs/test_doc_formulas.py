"""Every formula docs/model.md and docs/aircomp.md state, checked against the code with concrete
numbers (torch-free). Each test first checks that the doc still states the formula, so a doc
edit that drops or changes it shows up here too."""
import math
import re
from pathlib import Path

import numpy as np
import pytest
from scipy.special import exp1

from netsim import FakeTrainer, FedAvgSimulation, Network
from netsim.aircomp import (aircomp_latency_s, aircomp_symbols, expected_mse, noise_for_snr, ofdm_symbol_s,
                            over_the_air_sum, receive_power, truncation_probability)
from netsim.protocols import make_simulation
from netsim.protocols.aircomp_fedavg import num_subcarriers
from netsim.budgets import bandwidth_shares, compute_time_s, energy_j
from netsim.channel import (MAX_TRANSFER_BLOCKS, BlockFading, Link, noise_power_w, pathloss_db, shannon_rate_bps,
                            transfer_duration_s)
from netsim.network import child_rng, drop_positions
from netsim.scenario import ChannelSpec, DeviceGroup, PathLossSpec, Scenario

DOCS = Path(__file__).resolve().parents[2] / "docs"
MODEL = (DOCS / "model.md").read_text(encoding="utf-8")
AIRCOMP = (DOCS / "aircomp.md").read_text(encoding="utf-8")


def states(doc: str, *fragments: str) -> None:
    flat = re.sub(r"\s+", " ", doc)
    for f in fragments:
        assert re.sub(r"\s+", " ", f) in flat, f"the doc no longer states {f!r}"


# ------------------------------------------------------------------ docs/model.md
def test_pathloss_formulas_and_example():
    states(MODEL, "UMi LOS `32.4 + 21 log10 d + 20 log10 f_c`", "UMi NLOS' `35.3 log10 d + 22.4 + 21.3 log10 f_c",
           "UMa LOS `28.0 + 22 log10 d + 20 log10 f_c`", "UMa NLOS' `13.54 + 39.08", "(clamped to >= 1 m)",
           "`ref_loss_db + 10 n log10 d`", "UMi NLOS at 100 m and 3.5 GHz is 35.3 x 2 + 22.4 + 21.3 log10 3.5 = 104.6 dB")
    fc = 3.5e9
    assert pathloss_db(PathLossSpec(model="umi_nlos"), 100.0, fc) == pytest.approx(104.589, abs=5e-4)
    assert pathloss_db(PathLossSpec(model="umi_los"), 100.0, fc) == pytest.approx(32.4 + 42 + 20 * math.log10(3.5))
    assert pathloss_db(PathLossSpec(model="uma_los"), 250.0, fc) == pytest.approx(
        28.0 + 22 * math.log10(250) + 20 * math.log10(3.5))
    # UMa NLOS' with a 3 m terminal: -0.6 (h_UT - 1.5) = -0.9 dB
    assert pathloss_db(PathLossSpec(model="uma_nlos"), 250.0, fc, ut_height_m=3.0) == pytest.approx(
        13.54 + 39.08 * math.log10(250) + 20 * math.log10(3.5) - 0.9)
    # NLOS = max(LOS, NLOS'): at 2 m NLOS' is below LOS
    assert pathloss_db(PathLossSpec(model="umi_nlos"), 2.0, fc) == pathloss_db(PathLossSpec(model="umi_los"), 2.0, fc)
    assert pathloss_db(PathLossSpec(model="umi_los"), 0.2, fc) == pathloss_db(PathLossSpec(model="umi_los"), 1.0, fc)
    assert pathloss_db(PathLossSpec(model="log_distance", exponent=3.5, ref_loss_db=38.0), 50.0, fc) == \
        pytest.approx(38.0 + 35 * math.log10(50))


def test_noise_power_example():
    states(MODEL, "`N0 * NF * B`", "-174 dBm/Hz + 7 dB over 20 MHz is -94.0 dBm = 3.99e-13 W")
    n = noise_power_w(ChannelSpec(noise_psd_dbm_per_hz=-174.0, noise_figure_db=7.0), 20e6)
    assert 10 * math.log10(n / 1e-3) == pytest.approx(-93.99, abs=0.005)
    assert n == pytest.approx(3.99e-13, rel=2e-3)


def test_shannon_rate_and_link_snr():
    states(MODEL, "Shannon `B log2(1 + P g |h|^2 / (N0 NF B))`")
    ch = ChannelSpec(fading="none")
    link = Link(1e-10, 0.2, BlockFading("none", 0.01, np.random.default_rng(0)), ch)
    b = 5e6
    snr = 0.2 * 1e-10 / noise_power_w(ch, b)
    assert link.rate_bps(3, b) == pytest.approx(b * math.log2(1 + snr), rel=1e-12)
    assert shannon_rate_bps(1e6, 3.0) == 2e6


def test_transfer_time_sum_over_blocks_and_s_over_r():
    states(MODEL, "`S = sum_b R_b tau_b`, `T = sum_b tau_b`", "`T = S / R`", "more than 2^26 coherence blocks")
    assert MAX_TRANSFER_BLOCKS == 2**26
    # T_c = 1 s, start at 0.25: 0.75 s at 400 bit/s (300 bit), 1 s at 100 bit/s, then 50 bit at 200 bit/s
    rates = {0: 400.0, 1: 100.0, 2: 200.0}
    assert transfer_duration_s(450.0, 0.25, 1.0, lambda k: rates[k]) == pytest.approx(0.75 + 1.0 + 0.25)
    assert transfer_duration_s(8e6, 3.3, 0.01, lambda k: 2e6) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="rate"):
        Link(0.0, 0.2, BlockFading("none", 0.01, np.random.default_rng(0)), ChannelSpec()).transfer_duration_s(8.0, 0, 1e6)


def test_bandwidth_shares_and_compute_time_and_energy():
    states(MODEL, "`beta_k = w_k / sum_j w_j`", "`d = FLOPs / compute_flops_per_s`", "`E = P * T`")
    assert bandwidth_shares([1.0, 3.0]) == [0.25, 0.75]
    assert compute_time_s(5e12, 2e12) == 2.5
    assert energy_j(0.2, 2.5) == 0.5


def test_uniform_annulus_drop():
    states(MODEL, "`r = sqrt(U (r_max^2 - r_min^2) + r_min^2)`")
    g = DeviceGroup(count=20000, placement={"min_distance_m": 10.0, "max_distance_m": 200.0})
    pts = np.array(drop_positions(g, (50.0, -20.0), np.random.default_rng(0)))
    r = np.hypot(pts[:, 0] - 50.0, pts[:, 1] + 20.0)
    assert r.min() >= 10.0 - 1e-9 and r.max() <= 200.0 + 1e-9
    # uniform in area: P(r <= x) = (x^2 - r_min^2) / (r_max^2 - r_min^2); at x = 100: 0.2481
    p = (100.0**2 - 10.0**2) / (200.0**2 - 10.0**2)
    assert np.mean(r <= 100.0) == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / 20000))


def fedavg_run():
    sc = Scenario.model_validate({
        "trainer": "fake", "devices": [{"name": "near", "count": 2, "placement": {"min_distance_m": 20, "max_distance_m": 40}},
                                       {"name": "far", "count": 2, "placement": {"min_distance_m": 300, "max_distance_m": 400}}],
        "channel": {"downlink_bandwidth_hz": 1e6}, "training": {"rounds": 2}, "fake": {"adapter_bytes": 200_000}})
    sim = FedAvgSimulation(sc, 0, FakeTrainer(sc, 0))
    sim.run()
    return sc, sim, sim.recorder.to_frame()


def test_downlink_is_decoded_per_device_and_broadcast_lasts_the_longest():
    states(MODEL, "so each device has its own download time", "the server transmits until its last device has decoded",
           "the `broadcast` event lasts the longest download")
    sc, sim, ev = fedavg_run()
    for r in (1, 2):
        down = ev[(ev["kind"] == "downlink") & (ev["round"] == r)]
        t0 = float(down["t_s"].iloc[0])
        for _, row in down.iterrows():
            dev = sim.network.devices[int(row["node"][3:])]
            own = dev.downlink.transfer_duration_s(8 * 200_000, t0, 1e6)
            assert row["duration_s"] == own
            assert row["energy_j"] == pytest.approx(dev.group.rx_power_w * own, rel=1e-15)
            comp = ev[(ev["kind"] == "compute") & (ev["round"] == r) & (ev["node"] == row["node"])]
            assert float(comp["t_s"].iloc[0]) == pytest.approx(t0 + own, rel=1e-15)   # starts when decoded
        assert down["duration_s"].nunique() == 4                  # not one common time
        bc = ev[(ev["kind"] == "broadcast") & (ev["round"] == r)]
        assert float(bc["duration_s"].iloc[0]) == down["duration_s"].max()
        assert float(bc["energy_j"].iloc[0]) == pytest.approx(10.0 * down["duration_s"].max())


def test_energy_is_power_times_time_for_every_ofdma_device_event():
    states(MODEL, "compute at `compute_power_w`, upload at `tx_power_w`, download at `rx_power_w`")
    sc, sim, ev = fedavg_run()
    for _, row in ev[ev["node"].str.startswith("dev")].iterrows():
        g = sim.network.devices[int(row["node"][3:])].group
        power = {"compute": g.compute_power_w, "uplink": g.tx_power_w, "downlink": g.rx_power_w}[row["kind"]]
        assert row["energy_j"] == pytest.approx(power * row["duration_s"], rel=1e-15)


def test_edge_aggregation_costs_2kn_flops():
    states(MODEL, "Edge aggregation costs `2 K n` FLOPs")
    sc, sim, ev = fedavg_run()
    agg = ev[ev["kind"] == "aggregate"]
    assert (agg["flops"] == 2 * 4 * 200_000 / 4).all()
    assert np.allclose(agg["duration_s"], 2 * 4 * 200_000 / 4 / 1e14)


def test_shadowing_is_shared_by_uplink_and_downlink():
    states(MODEL, "drawn once per device and shared by its uplink and downlink")
    sc = Scenario.model_validate({"trainer": "fake", "devices": [{"count": 3}],
                                  "channel": {"pathloss": {"shadowing_std_db": 8.0}}})
    net = Network(sc, 1)
    for d in net.devices:
        assert d.uplink.large_scale_gain == d.downlink.large_scale_gain
    from netsim.network import distance_3d_m
    d = net.devices[0]
    pl = pathloss_db(sc.channel.pathloss, distance_3d_m(d.position_m, (0.0, 0.0), 1.5, 10.0), sc.channel.carrier_hz)
    shadow = child_rng(1, 0, 1, 0).normal(0.0, 8.0)
    assert d.uplink.large_scale_gain == pytest.approx(10 ** (-(pl + shadow) / 10), rel=1e-12)


def test_fading_gain_is_minus_log_of_a_counter_based_uniform():
    states(MODEL, "`-ln u_b`", "SplitMix64")
    fading = BlockFading("rayleigh", 0.01, np.random.default_rng(4))
    later = fading.power_gain(1000)
    assert fading.power_gain(3) == fading.power_gains(3, 1)[0]
    assert fading.power_gain(1000) == later
    assert np.mean(fading.power_gains(0, 100_000)) == pytest.approx(1.0, abs=4 / math.sqrt(100_000))


def test_spawn_keys_of_the_randomness_table():
    states(MODEL, "| topology | device positions of group g | `(0, 0, g)` |", "| training | device selection per round | `(0, 4)` |")
    sc = Scenario.model_validate({"trainer": "fake", "devices": [{"count": 4}], "topology_seed": 5, "training_seed": 6,
                                  "training": {"devices_per_round": 2}})
    sim = FedAvgSimulation(sc, 0, FakeTrainer(sc, 0))
    expected = drop_positions(sc.devices[0], (0.0, 0.0), child_rng(5, 0, 0, 0))
    assert [d.position_m for d in sim.network.devices] == expected
    assert sorted(d.index for d in sim._select(1, list(sim.network.devices))) == sorted(int(i) for i in child_rng(6, 0, 4).choice(4, 2, replace=False))


# ------------------------------------------------------------------ docs/aircomp.md
def test_subcarriers_and_ofdm_symbol():
    states(AIRCOMP, "M = ⌊uplink_bandwidth_hz / Δf⌋", "10 MHz / 15 kHz → 666", "⌈q/M⌉ OFDM symbols of (1 + CP)/Δf",
           "22 OFDM symbols × 71.3 µs = 1.57 ms")
    sc = Scenario.model_validate({"trainer": "fake", "channel": {"uplink_bandwidth_hz": 10e6}})
    assert num_subcarriers(sc) == 666
    assert ofdm_symbol_s(15e3, 0.07) == pytest.approx(71.33e-6, rel=1e-4)
    assert aircomp_symbols(14_213, 666) == 22
    assert aircomp_latency_s(14_213, 666, 15e3, 0.07) == pytest.approx(1.569e-3, rel=1e-3)


def test_truncation_probability():
    states(AIRCOMP, "Truncation probability 1 − exp(−g_th)", "(theory 1 − e^−0.1 = 9.5 %)")
    assert truncation_probability(0.1) == pytest.approx(0.0952, abs=1e-4)
    assert truncation_probability(0.5, mean_gain=2.0) == pytest.approx(1 - math.exp(-0.25))


def test_receive_power_policies_with_symbol_power():
    states(AIRCOMP, "ρ₀ = min_k (P_k/M) g_k / (E1(g_th) c_k)", "ρ₀ = min_k (P_k/M) g_k g_th / max_j u_kj²")
    budgets, gains, c = np.array([0.2, 0.1]) / 64, np.array([1e-10, 4e-10]), np.array([2.5, 0.4])
    assert receive_power("average", 0.1, budgets, gains, c) == pytest.approx(
        min(0.2 / 64 * 1e-10 / (exp1(0.1) * 2.5), 0.1 / 64 * 4e-10 / (exp1(0.1) * 0.4)), rel=1e-15)
    assert receive_power("peak", 0.1, budgets, gains, c) == pytest.approx(0.2 / 64 * 1e-10 * 0.1 / 2.5, rel=1e-15)
    # unit symbol power: the unweighted BAA form
    assert receive_power("average", 0.1, budgets, gains) == pytest.approx(0.2 / 64 * 1e-10 / exp1(0.1), rel=1e-15)


def two_device_slot(debias=False, snr_db=None, noise_w=1e-16):
    links = [Link(g, 0.2, BlockFading("rayleigh", 0.01, child_rng(2, 7, i)), ChannelSpec())
             for i, g in enumerate([2e-10, 6e-10])]
    x = np.vstack([np.linspace(-1.0, 1.0, 640), np.linspace(0.5, 2.0, 640)])
    a = np.array([0.25, 0.75])
    est, st = over_the_air_sum(x, a, links, num_subcarriers=64, subcarrier_spacing_hz=15e3,
                               noise_w_per_subcarrier=noise_w, truncation_threshold=0.2, coherence_time_s=None,
                               rng=np.random.default_rng(0), receive_snr_db=snr_db, debias=debias)
    return x, a, links, est, st


def test_signal_estimate_and_closed_form_mse():
    states(AIRCOMP, "u_kj = K a_k x_kj / s", "x̂ = s Re(y) / (K √ρ₀) = Σ_k a_k x_k χ_k + noise",
           "MSE = (1/q) Σ_j [Σ_k a_k² x_kj² p(1−p) + (Σ_k a_k x_kj p)²] + s²σ² / (2K²ρ₀), p = 1 − e^{−g_th}")
    x, a, links, est, st = two_device_slot(snr_db=math.inf)   # noise off: the estimate is the masked sum
    h2 = np.stack([l.fading.power_gains(0, 64) for l in links])[:, np.arange(640) % 64]
    np.testing.assert_allclose(est, np.sum(np.where(h2 >= 0.2, a[:, None] * x, 0.0), axis=0), rtol=1e-12, atol=1e-15)
    x, a, links, est, st = two_device_slot()
    p = 1 - math.exp(-0.2)
    s2 = np.mean((2 * a[:, None] * x) ** 2)
    closed = np.mean(np.sum((a[:, None] * x) ** 2 * p * (1 - p), axis=0) + (np.sum(a[:, None] * x, axis=0) * p) ** 2) \
        + s2 * st.noise_w / (2 * 4 * st.rho0_w)
    assert st.mse_theory == pytest.approx(closed, rel=1e-12)
    assert st.receive_snr_db == pytest.approx(10 * math.log10(st.rho0_w / 1e-16), rel=1e-12)


def test_debiased_mse_closed_form():
    states(AIRCOMP, "MSE = (1/q) Σ_j Σ_k a_k² x_kj² p/(1−p) + s²σ²/(2K²ρ₀(1−p)²)", "divides it by 1 − p = e^(−g_th)")
    x, a, links, est, st = two_device_slot(debias=True)
    _, _, _, biased, _ = two_device_slot(debias=False)
    np.testing.assert_allclose(est * math.exp(-0.2), biased, rtol=1e-12, atol=1e-15)
    p = 1 - math.exp(-0.2)
    s2 = np.mean((2 * a[:, None] * x) ** 2)
    closed = np.mean(np.sum((a[:, None] * x) ** 2 * p / (1 - p), axis=0)) + s2 * st.noise_w / (8 * st.rho0_w * (1 - p) ** 2)
    assert st.mse_theory == pytest.approx(closed, rel=1e-12)
    assert expected_mse(x, a, np.full(2, p), math.sqrt(s2), st.noise_w, st.rho0_w, debias=True) == pytest.approx(closed)


def test_emulated_snr():
    states(AIRCOMP, "σ² = ρ₀/10^(SNR/10) instead of N0·NF·Δf")
    assert noise_for_snr(2e-12, 5e-13, 10.0) == pytest.approx(2e-13)
    assert noise_for_snr(2e-12, 5e-13, None) == 5e-13
    assert noise_for_snr(2e-12, 5e-13, math.inf) == 0.0
    assert noise_power_w(ChannelSpec(), 15e3) == pytest.approx(10 ** ((-174 + 7 - 30) / 10) * 15e3)


def test_radiated_energy_formula():
    states(AIRCOMP, "E_k = T_sym Σ_{j sent} ρ₀ u_kj² / (g_k |h̃_kj|²)")
    x, a, links, est, st = two_device_slot()
    h2 = np.stack([l.fading.power_gains(0, 64) for l in links])[:, np.arange(640) % 64]
    u = 2 * a[:, None] * x / math.sqrt(np.mean((2 * a[:, None] * x) ** 2))
    g = np.array([2e-10, 6e-10])[:, None]
    energy = ofdm_symbol_s(15e3) * np.sum(np.where(h2 >= 0.2, st.rho0_w * u**2 / (g * h2), 0.0), axis=1)
    np.testing.assert_allclose(st.tx_energy_j, energy, rtol=1e-12)


def test_aircomp_fedavg_timeline_and_aggregate_flops():
    states(AIRCOMP, "then the edge adds the estimate to the global PEFT state (2q FLOPs)")
    sc = Scenario.model_validate({"trainer": "fake", "devices": [{"count": 4}], "training": {"rounds": 2},
                                  "channel": {"uplink_access": "aircomp", "uplink_bandwidth_hz": 10e6},
                                  "fake": {"adapter_bytes": 4 * 14_213}})
    sim = make_simulation(sc, 0, FakeTrainer(sc, 0))
    sim.run()
    ev = sim.recorder.to_frame()
    up = ev[ev["kind"] == "uplink"]
    assert np.allclose(up["duration_s"], aircomp_latency_s(14_213, 666, 15e3, 0.07))
    assert (ev[ev["kind"] == "aggregate"]["flops"] == 2 * 14_213).all()


def test_docs_cite_nothing_outside_the_repository():
    for doc in (MODEL, AIRCOMP):
        assert "shared/docs" not in doc and "../shared" not in doc
        assert not re.search(r"\b[Ii]ssue \d", doc) and "of the issue" not in doc
        assert "this machine" not in doc and "development host" not in doc


def test_threshold_to_snr_table_of_the_aircomp_fedavg_drop():
    """The closed-form table of docs/aircomp.md (unit symbol power) from the scenario's drop."""
    from deftsim.config import load_scenario

    states(AIRCOMP, "| 0.1 | 9.5% | 2.3 dB | −5.1 dB |", "| 1.0 | 63.2% | 11.5 dB | 4.9 dB |")
    path = Path(__file__).resolve().parents[2] / "scenarios" / "aircomp_fedavg.yaml"
    sc = load_scenario(path)
    net = Network(sc, sc.network_seed())
    m = num_subcarriers(sc)
    g = np.array([d.uplink.large_scale_gain for d in net.devices])
    p = np.array([d.uplink.tx_power_w for d in net.devices])
    noise = noise_power_w(sc.channel, sc.aircomp.subcarrier_spacing_hz)
    rows = re.findall(r"^\| ([0-9.]+) \| ([0-9.]+)% \| (−?[0-9.]+) dB \| (−?[0-9.]+) dB \|$", AIRCOMP, re.M)
    assert len(rows) == 5
    for g_th, trunc, avg_db, peak_db in rows:
        g_th = float(g_th)
        assert 100 * truncation_probability(g_th) == pytest.approx(float(trunc), abs=0.05)
        for policy, want in (("average", avg_db), ("peak", peak_db)):
            got = 10 * math.log10(receive_power(policy, g_th, p / m, g) / noise)
            assert got == pytest.approx(float(want.replace("−", "-")), abs=0.05)


def test_peak_vs_average_gap_stated_from_the_table():
    states(AIRCOMP, "`peak` power control costs 6–14 dB of SNR vs. `average` in the unit-symbol-power table")
    rows = re.findall(r"^\| ([0-9.]+) \| ([0-9.]+)% \| (−?[0-9.]+) dB \| (−?[0-9.]+) dB \|$", AIRCOMP, re.M)
    gaps = [float(a.replace("−", "-")) - float(p.replace("−", "-")) for _, _, a, p in rows]
    assert round(min(gaps)) == 6 and round(max(gaps)) == 14
