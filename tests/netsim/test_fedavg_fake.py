"""The FedAvg timeline with the fake trainer: invariants, determinism, budgets."""
import math

import numpy as np
import pandas as pd
import pytest

from analysis.metrics import energy_per_device_j, round_breakdown, summarize
from netsim import FakeTrainer, FedAvgSimulation, Network
from netsim.budgets import bandwidth_shares


def run(scenario, seed=0):
    sim = FedAvgSimulation(scenario, seed, FakeTrainer(scenario, seed))
    outcome = sim.run()
    return sim, outcome, sim.recorder.to_frame()


def test_same_seed_same_events_different_seed_differs(fake_scenario):
    sc = fake_scenario()
    _, _, a = run(sc, 3)
    _, _, b = run(sc, 3)
    _, _, c = run(sc, 4)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)


def test_bandwidth_shares_never_exceed_total(fake_scenario):
    for weights in ([1, 1, 1], [0.1, 5, 2.5, 1e-3], [7]):
        shares = bandwidth_shares(weights)
        assert sum(shares) <= 1.0 + 1e-12
        assert all(s > 0 for s in shares)
    sc = fake_scenario(devices=[{"count": 5}], channel={"uplink_shares": [1, 2, 3, 4, 5]},
                       training={"rounds": 3, "devices_per_round": 3})
    sim = FedAvgSimulation(sc, 0, FakeTrainer(sc, 0))
    shares = sim._uplink_shares(sim.network.devices[:3])
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares[2] == pytest.approx(3 / 6)


def test_energy_per_device_is_sum_of_its_events(fake_scenario):
    sc = fake_scenario()
    sim, _, ev = run(sc)
    summary = summarize(ev, num_classes=5, stop_reason="x", target_accuracy=None)
    for dev in sim.network.devices:
        mine = ev[ev["node"] == dev.name]
        expected = mine["energy_j"].sum()
        assert summary["energy_per_device_j"].get(dev.name, 0.0) == pytest.approx(expected)
        # and each event's energy is power x duration
        g = dev.group
        for kind, power in (("compute", g.compute_power_w), ("uplink", g.tx_power_w), ("downlink", g.rx_power_w)):
            rows = mine[mine["kind"] == kind]
            np.testing.assert_allclose(rows["energy_j"], power * rows["duration_s"], rtol=1e-12)


def test_compute_time_is_flops_over_speed(fake_scenario):
    sc = fake_scenario(devices=[{"count": 2, "compute_flops_per_s": 2e11}, {"count": 2, "compute_flops_per_s": 8e11}],
                       training={"rounds": 2, "local_steps": 3})
    _, _, ev = run(sc)
    comp = ev[ev["kind"] == "compute"]
    expected_flops = 3 * sc.fake.step_flops
    assert (comp["flops"] == expected_flops).all()
    speeds = {"dev0": 2e11, "dev1": 2e11, "dev2": 8e11, "dev3": 8e11}
    np.testing.assert_allclose(comp["duration_s"], expected_flops / comp["node"].map(speeds).astype(float))


def test_uplink_time_matches_fixed_rate_without_fading(fake_scenario):
    sc = fake_scenario(devices=[{"count": 4}], channel={"fading": "none", "uplink_bandwidth_hz": 8e6},
                       training={"rounds": 1})
    sim, _, ev = run(sc)
    up = ev[ev["kind"] == "uplink"]
    for _, row in up.iterrows():
        dev = sim.network.devices[int(row["node"][3:])]
        rate = dev.uplink.rate_bps(0, 8e6 / 4)
        assert row["duration_s"] == pytest.approx(8 * sc.fake.adapter_bytes / rate, rel=1e-9)


def test_round_latency_is_slowest_device_plus_edge(fake_scenario):
    sc = fake_scenario()
    _, _, ev = run(sc)
    rb = round_breakdown(ev)
    for r in rb["round"]:
        rows = ev[ev["round"] == r]
        per_dev = rows[rows["kind"].isin(["downlink", "compute", "uplink"])].groupby("node")["duration_s"].sum()
        edge = rows[rows["kind"].isin(["aggregate", "evaluate"])]["duration_s"].sum()
        lat = rb.set_index("round").loc[r, "latency_s"]
        assert lat == pytest.approx(per_dev.max() + edge, rel=1e-9)
        bcast = rows[rows["kind"] == "broadcast"]["duration_s"].iloc[0]
        assert bcast == pytest.approx(rows[rows["kind"] == "downlink"]["duration_s"].max())


def test_stops_at_target_round_limit_and_horizon(fake_scenario):
    sc = fake_scenario(training={"rounds": 200, "devices_per_round": 3}, stop={"target_accuracy": 0.5})
    _, out, _ = run(sc)
    assert out.stop_reason == "target_accuracy" and out.final_accuracy >= 0.5
    sc = fake_scenario(training={"rounds": 3})
    _, out, _ = run(sc)
    assert out.stop_reason == "round_limit" and out.rounds_completed == 3
    sc = fake_scenario(training={"rounds": 1000}, stop={"horizon_s": 0.5})
    _, out, ev = run(sc)
    assert out.stop_reason == "horizon"
    assert ev[ev["kind"] == "round_start"]["t_s"].max() < 0.5


def test_memory_exceeded_devices_are_reported_not_run(fake_scenario):
    sc = fake_scenario(devices=[{"count": 2, "memory_bytes": 1e6}, {"count": 3}], fake={"job_memory_bytes": 5e8},
                       training={"rounds": 2})
    _, _, ev = run(sc)
    exceeded = ev[ev["kind"] == "memory_exceeded"]
    assert set(exceeded["node"]) == {"dev0", "dev1"}
    assert not ev[(ev["kind"] == "compute") & ev["node"].isin(["dev0", "dev1"])].shape[0]
    summary = summarize(ev, num_classes=5, stop_reason="x", target_accuracy=None)
    assert summary["memory_exceeded_devices"] == ["dev0", "dev1"]


def test_devices_per_round_and_placement(fake_scenario):
    sc = fake_scenario(devices=[{"count": 30, "placement": {"min_distance_m": 50, "max_distance_m": 80}}],
                       training={"rounds": 5, "devices_per_round": 7})
    sim, _, ev = run(sc)
    per_round = ev[ev["kind"] == "compute"].groupby("round").size()
    assert (per_round == 7).all()
    for d in sim.network.devices:
        r = math.hypot(*d.position_m)
        assert 50 - 1e-9 <= r <= 80 + 1e-9


def test_d2d_graph_distance_and_knn(fake_scenario):
    sc = fake_scenario(devices=[{"count": 12}], d2d={"kind": "distance", "threshold_m": 100})
    net = Network(sc, 0)
    for i, j, a in net.d2d.edges(data=True):
        assert a["distance_m"] <= math.sqrt(100**2 + 0) + 1e-6
        assert math.isfinite(a["mean_snr_db"])
    sc = fake_scenario(devices=[{"count": 12}], d2d={"kind": "knn", "k": 3})
    net = Network(sc, 0)
    assert all(deg >= 3 for _, deg in net.d2d.degree())
    sc = fake_scenario(d2d={"kind": "none"})
    assert Network(sc, 0).d2d.number_of_edges() == 0


def test_ten_thousand_devices_smoke(fake_scenario):
    sc = fake_scenario(devices=[{"count": 10_000}], d2d={"kind": "none"},
                       training={"rounds": 3, "devices_per_round": 100})
    _, out, ev = run(sc)
    assert out.rounds_completed == 3
    assert (ev["kind"] == "compute").sum() == 300
