"""FedAvg over AirComp with the fake trainer, and the aircomp_vs_ofdma experiment."""
import json
import math

import numpy as np
import pandas as pd
import pytest

from deftsim.runner import run_scenario
from netsim import FakeTrainer, FedAvgSimulation
from netsim.aircomp import aircomp_latency_s
from netsim.protocols import make_simulation
from netsim.protocols.aircomp_fedavg import AirCompFedAvgSimulation, num_subcarriers
from netsim.scenario import Scenario


def scenario(**over):
    base = {"name": "ac", "trainer": "fake", "devices": [{"count": 12}],
            "channel": {"uplink_access": "aircomp", "uplink_bandwidth_hz": 10e6},
            "training": {"rounds": 4, "devices_per_round": 6}, "fake": {"adapter_bytes": 40_000}}
    for key, value in over.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return Scenario.model_validate(base)


def run(sc, seed=0):
    sim = make_simulation(sc, seed, FakeTrainer(sc, seed))
    out = sim.run()
    return sim, out, sim.recorder.to_frame()


def test_scenario_defaults_and_factory():
    sc = Scenario.model_validate({"trainer": "fake"})
    assert sc.channel.uplink_access == "ofdma" and sc.aircomp.truncation_threshold == 0.1
    assert type(make_simulation(sc, 0, FakeTrainer(sc, 0))) is FedAvgSimulation
    sc = scenario()
    assert isinstance(make_simulation(sc, 0, FakeTrainer(sc, 0)), AirCompFedAvgSimulation)
    assert num_subcarriers(sc) == 666
    with pytest.raises(ValueError):
        Scenario.model_validate({"channel": {"uplink_access": "analog"}})
    with pytest.raises(ValueError):
        Scenario.model_validate({"aircomp": {"truncation_threshold": 0}})


def test_aircomp_round_timeline_and_stats():
    sim, out, ev = run(scenario())
    assert out.rounds_completed == 4
    q = 40_000 // 4
    t_air = aircomp_latency_s(q, 666, 15e3, 0.07)
    up = ev[ev["kind"] == "uplink"]
    assert len(up) == 4 * 6
    np.testing.assert_allclose(up["duration_s"], t_air)
    # all uplinks of a round start together, after the last device finished computing
    for r, grp in ev.groupby("round"):
        if r == 0:
            continue
        u = grp[grp["kind"] == "uplink"]
        c = grp[grp["kind"] == "compute"]
        assert u["t_s"].nunique() == 1
        assert u["t_s"].iloc[0] == pytest.approx((c["t_s"] + c["duration_s"]).max())
        agg = grp[grp["kind"] == "aggregate"]
        assert agg["t_s"].iloc[0] == pytest.approx(u["t_s"].iloc[0] + t_air)
    assert len(sim.aircomp_log) == 4
    row = sim.aircomp_log[0]
    assert row["truncation_ratio"] == pytest.approx(1 - math.exp(-0.1), abs=0.02)
    assert row["num_values"] == q and row["scheduled"] == 6
    assert (up["energy_j"] > 0).all()
    assert (up["energy_j"] <= 0.2 * t_air * 1.5).all()   # average-power budget (realised, one slot)


def test_same_seed_same_events():
    _, _, a = run(scenario(), 3)
    _, _, b = run(scenario(), 3)
    pd.testing.assert_frame_equal(a, b)


def test_distortion_reaches_the_model():
    """Low receive SNR (tiny power) degrades what the trainer gets; high SNR matches OFDMA."""
    _, ofdma, _ = run(scenario(channel={"uplink_access": "ofdma"}))
    _, good, _ = run(scenario(aircomp={"truncation_threshold": 1e-3}))   # ~no truncation bias
    assert good.final_accuracy == pytest.approx(ofdma.final_accuracy, abs=0.02)
    sim, bad, _ = run(scenario(devices=[{"count": 12, "tx_power_w": 1e-9, "placement": {"max_distance_m": 400}}],
                               fake={"adapter_bytes": 400}))
    assert sim.aircomp_log[0]["nmse"] > 1.0
    assert bad.final_accuracy != pytest.approx(good.final_accuracy, abs=0.02)


def test_truncation_threshold_lowers_update():
    """Truncated entries count as zeros: a higher g_th shrinks the aggregate (less progress)."""
    _, lo, _ = run(scenario(aircomp={"truncation_threshold": 0.01}))
    _, hi, _ = run(scenario(aircomp={"truncation_threshold": 1.0}))
    assert hi.final_accuracy < lo.final_accuracy


def test_debias_removes_the_truncation_shrink():
    """With debias the aggregate is divided by exp(-g_th): at g_th = 1 (63 % truncated) training
    progresses like the nearly untruncated case, unlike BAA's shrunk estimate."""
    _, lo, _ = run(scenario(aircomp={"truncation_threshold": 0.01}))
    _, hi, _ = run(scenario(aircomp={"truncation_threshold": 1.0}))
    sim, hi_debiased, _ = run(scenario(aircomp={"truncation_threshold": 1.0, "debias": True}))
    assert hi.final_accuracy < hi_debiased.final_accuracy
    assert hi_debiased.final_accuracy == pytest.approx(lo.final_accuracy, abs=0.03)
    for row in sim.aircomp_log:
        assert row["mse"] == pytest.approx(row["mse_theory"], rel=0.15)


def test_cell_interior_scheduling():
    sc = scenario(devices=[{"count": 12, "placement": {"min_distance_m": 10, "max_distance_m": 300}}],
                  aircomp={"interior_radius_m": 150})
    sim, out, ev = run(sc)
    inside = {d.name for d in sim.network.devices if sim.scheduled(d)}
    assert 0 < len(inside) < 12
    up = ev[ev["kind"] == "uplink"]
    assert set(up["node"]) <= inside
    assert set(ev.loc[ev["kind"] == "not_scheduled", "node"]).isdisjoint(inside)
    # interior scheduling raises the receive SNR (the weakest scheduled device is closer)
    full, _, _ = run(scenario(devices=[{"count": 12, "placement": {"min_distance_m": 10, "max_distance_m": 300}}]))
    assert np.mean([r["receive_snr_db"] for r in sim.aircomp_log if r["scheduled"]]) > np.mean(
        [r["receive_snr_db"] for r in full.aircomp_log])


def test_aircomp_vs_ofdma_experiment(tmp_path):
    sc = scenario(experiment="aircomp_vs_ofdma", devices=[{"count": 20}],
                  channel={"uplink_access": "ofdma"}, aircomp={"device_counts": [2, 5, 10, 20]})
    run_scenario(sc, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("aggregation_latency_s", "final_accuracy"):
        assert set(summary[key]) == {"aircomp", "ofdma"}
        for uplink in ("aircomp", "ofdma"):
            assert set(summary[key][uplink]) == {"2", "5", "10", "20"}
    lat = summary["aggregation_latency_s"]
    assert len(set(lat["aircomp"].values())) == 1          # independent of K
    ratios = [summary["latency_ratio_ofdma_over_aircomp"][k] for k in ("2", "5", "10", "20")]
    assert all(b > a for a, b in zip(ratios, ratios[1:])) and ratios[0] > 1
    for name in ("latency_vs_devices.png", "accuracy_mse_vs_devices.png", "accuracy_vs_time.png",
                 "accuracy_vs_energy.png"):
        assert (tmp_path / name).stat().st_size > 0
    ev = pd.read_parquet(tmp_path / "events.parquet")
    assert set(ev["uplink_access"]) == {"aircomp", "ofdma"}
    # energy and simulated time per uplink and K agree with the events; the over-the-air
    # uplink costs less transmit energy, and its noise share falls with K
    for uplink in ("aircomp", "ofdma"):
        for k in (2, 5, 10, 20):
            run_ev = ev[(ev["uplink_access"] == uplink) & (ev["device_count"] == k)]
            up = run_ev[run_ev["kind"] == "uplink"]
            assert summary["uplink_energy_j"][uplink][str(k)] == pytest.approx(up["energy_j"].sum())
            dev = run_ev[run_ev["node"].str.startswith("dev")]
            assert summary["total_device_energy_j"][uplink][str(k)] == pytest.approx(dev["energy_j"].sum())
    for k in ("2", "5", "10", "20"):
        assert summary["uplink_energy_j"]["aircomp"][k] < summary["uplink_energy_j"]["ofdma"][k]
        assert summary["aircomp_nmse"][k] == summary["runs"]["aircomp"][k]["aircomp"]["mean_nmse"]
    nmse = [summary["aircomp_nmse"][k] for k in ("2", "5", "10", "20")]
    assert nmse[0] > nmse[-1]


def test_experiment_rejects_too_many_devices(tmp_path):
    from deftsim.config import ScenarioError

    sc = scenario(experiment="aircomp_vs_ofdma", aircomp={"device_counts": [5, 50]})
    with pytest.raises(ScenarioError, match="exceeds"):
        run_scenario(sc, tmp_path)


@pytest.mark.parametrize("snr_db", [-10.0, 0.0, 20.0])
def test_emulated_receive_snr(snr_db):
    """aircomp.receive_snr_db sets sigma^2 = rho0 / SNR: the slots' receive SNR is that value and
    the measured MSE still follows the closed form."""
    sim, _, _ = run(scenario(aircomp={"receive_snr_db": snr_db}))
    for row in sim.aircomp_log:
        assert row["receive_snr_db"] == pytest.approx(snr_db, abs=1e-9)
        assert row["mse"] == pytest.approx(row["mse_theory"], rel=0.1)


def test_emulated_snr_orders_the_error_and_inf_is_noise_free():
    nmse = {snr: np.mean([r["nmse"] for r in run(scenario(aircomp={"receive_snr_db": snr}))[0].aircomp_log])
            for snr in (-20.0, 0.0, 20.0, math.inf)}
    assert nmse[-20.0] > nmse[0.0] > nmse[20.0] > nmse[math.inf] > 0   # truncation bias remains
    sim, _, _ = run(scenario(aircomp={"receive_snr_db": math.inf}))
    for row in sim.aircomp_log:
        assert math.isinf(row["receive_snr_db"])
        assert row["mse"] == pytest.approx(row["mse_theory"], rel=0.1)   # truncation only


@pytest.mark.parametrize("bad", [float("nan"), -math.inf])
def test_emulated_snr_rejects_nan_and_minus_inf(bad):
    with pytest.raises(ValueError, match="receive_snr_db"):
        Scenario.model_validate({"aircomp": {"receive_snr_db": bad}})
