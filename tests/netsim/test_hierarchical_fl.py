"""Hierarchical (D2D cluster) FL against theory and hand values, with the fake trainer:
member -> head time = bits / rate over the blocks it spans, the two-tier aggregate = FedAvg of
the same updates, uplink bytes = heads x update size, clustering rules, mobility, determinism,
bad settings."""
import math

import networkx as nx
import numpy as np
import pandas as pd
import pytest

from netsim import FakeTrainer, FedAvgSimulation
from netsim.protocols import PROTOCOLS, make_simulation, protocol_name
from netsim.protocols.hierarchical_fl import (
    Cluster, HierarchicalFLSimulation, combine_partials, form_clusters, partial_sum,
)
from netsim.scenario import Scenario
from netsim.sidelink import hop_duration_s

EPS = np.finfo(np.float64).eps
B_SL = 5e6


def scenario(**over):
    base = {"name": "h", "trainer": "fake", "devices": [{"count": 8}],
            "training": {"rounds": 3, "topology": "hierarchical"},
            "d2d": {"kind": "knn", "k": 2, "bandwidth_hz": B_SL}}
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return Scenario.model_validate(base)


def run(sc, seed=0):
    sim = make_simulation(sc, seed, FakeTrainer(sc, seed))
    sim.run()
    return sim, sim.recorder.to_frame()


# ------------------------------------------------------------------ routing and registration
def test_topology_routes_to_the_protocol_registered_under_its_module_name():
    sc = scenario()
    assert protocol_name(sc) == "hierarchical_fl"
    assert PROTOCOLS["hierarchical_fl"] is HierarchicalFLSimulation
    assert isinstance(make_simulation(sc, 0, FakeTrainer(sc, 0)), HierarchicalFLSimulation)


# ------------------------------------------------------------------ clustering rules
def path_graph_with_links(n, sc):
    """A path 0-1-...-(n-1) whose edges carry the sidelinks of a network's complete graph."""
    from netsim.network import Network
    net = Network(sc, 0)
    g = nx.Graph()
    g.add_nodes_from(range(n))
    for i in range(n - 1):
        g.add_edge(i, i + 1, **net.d2d.edges[i, i + 1])
    return g


def complete_scenario(n):
    return Scenario.model_validate({"name": "c", "trainer": "fake", "devices": [{"count": n}],
                                    "d2d": {"kind": "distance", "threshold_m": 1e6}})


def test_best_uplink_heads_are_taken_in_snr_order_and_dominate_independently():
    g = path_graph_with_links(5, complete_scenario(5))
    snr = [0.0, 10.0, 5.0, 20.0, 1.0]   # 3 first (takes 2, 4), then 1 (takes 0)
    clusters = form_clusters(g, range(5), snr, "best_uplink")
    assert clusters == [Cluster(1, (0,)), Cluster(3, (2, 4))]
    heads = {c.head for c in clusters}
    assert not any(g.has_edge(a, b) for a in heads for b in heads)        # independent
    assert all(g.has_edge(m, c.head) for c in clusters for m in c.members)  # one hop from the head


def test_degree_rule_is_the_greedy_dominating_set():
    sc = complete_scenario(6)
    from netsim.network import Network
    net = Network(sc, 0)
    g = nx.Graph()
    g.add_nodes_from(range(6))
    for a, b in [(0, 1), (0, 2), (0, 3), (3, 4), (4, 5)]:   # hub 0 (degree 3), then 4 covers 5
        g.add_edge(a, b, **net.d2d.edges[a, b])
    snr = [0.0, 50.0, 40.0, 30.0, 20.0, 60.0]
    # 0 covers 3 unassigned devices; then 4 and 5 cover one each, 5 has the stronger uplink
    assert form_clusters(g, range(6), snr, "degree") == [Cluster(0, (1, 2, 3)), Cluster(5, (4,))]
    # best_uplink: 5 (takes 4), 1 (takes 0), then 2 and 3 have no unassigned neighbour left
    assert form_clusters(g, range(6), snr, "best_uplink") == [Cluster(1, (0,)), Cluster(2), Cluster(3),
                                                             Cluster(5, (4,))]


def test_cluster_size_limit_and_unselected_devices():
    g = path_graph_with_links(5, complete_scenario(5))
    snr = [0.0, 10.0, 5.0, 20.0, 1.0]
    limited = form_clusters(g, range(5), snr, "best_uplink", max_cluster_size=2)
    assert all(len(c.devices) <= 2 for c in limited)
    assert sorted(d for c in limited for d in c.devices) == list(range(5))
    # only selected devices take part: 2 not selected cuts the path, 0-1 and 3-4 cluster apart
    part = form_clusters(g, [0, 1, 3, 4], snr, "best_uplink")
    assert part == [Cluster(1, (0,)), Cluster(3, (4,))]
    # a device with no selected neighbour is a cluster of one (uploads directly)
    assert form_clusters(g, [0, 2, 4], snr, "degree") == [Cluster(0), Cluster(2), Cluster(4)]
    with pytest.raises(ValueError, match="head_selection"):
        form_clusters(g, range(5), snr, "nearest")


# ------------------------------------------------------------------ the aggregate is FedAvg
def test_partial_sums_combine_to_the_fedavg_mean():
    rng = np.random.default_rng(0)

    class R:
        def __init__(self, n, v):
            self.num_examples, self.v = n, v
    results = [R(int(n), rng.standard_normal(7)) for n in rng.integers(1, 100, size=9)]
    partials = [partial_sum(results[:4], lambda r: r.v), partial_sum(results[4:5], lambda r: r.v),
                partial_sum(results[5:], lambda r: r.v)]
    n = np.array([r.num_examples for r in results], dtype=float)
    want = sum(w * r.v for w, r in zip(n / n.sum(), results))
    # two float64 sums of 9 terms of size <= max|v|: error <= ~2 * 9 eps max|v| per value
    tol = 20 * 9 * EPS * max(np.abs(r.v).max() for r in results)
    np.testing.assert_allclose(combine_partials(partials), want, rtol=0, atol=tol)


class Recording(HierarchicalFLSimulation):
    """Records the updates behind every aggregation and the progress before and after."""

    def _aggregate(self, r, uploads, staleness=None, weights=None):
        before = self.trainer.progress
        results = [res for u in uploads for res in u.results]
        yield from super()._aggregate(r, uploads)
        self.log = getattr(self, "log", []) + [(r, before, self.trainer.progress, results, uploads)]


def test_hierarchical_aggregate_equals_star_fedavg_of_the_same_updates():
    sc = scenario(devices=[{"count": 10}], training={"rounds": 4})
    trainer = FakeTrainer(sc, 3)
    sim = Recording(sc, 3, trainer)
    sim.run()
    assert len(sim.log) == 4
    for r, before, after, results, uploads in sim.log:
        assert len(results) == 10   # every device's update arrives (no deadline, always online)
        n = np.array([res.num_examples for res in results], dtype=float)
        u = np.array([res.update for res in results])
        fedavg = float(np.sum(n / n.sum() * u))
        # the fake's flat update is the scalar repeated; mean of the combined vector = the scalar
        # sum up to float64 rounding of K = 10 terms (|u| < 1)
        assert after == pytest.approx(min(before + fedavg, 0.999999), rel=0, abs=50 * 10 * EPS)
        assert len(uploads) < 10    # some devices did go through a head
    # and round 1 of a star run of the same seed (same base, same noise order) gives the same model
    star = scenario(devices=[{"count": 10}], training={"rounds": 1, "topology": "star"})
    s = FedAvgSimulation(star, 3, FakeTrainer(star, 3))
    s.run()
    assert s.trainer.progress == pytest.approx(sim.log[0][2], rel=0, abs=50 * 10 * EPS)


def test_max_cluster_size_one_is_the_star():
    sc = scenario(hierarchical={"max_cluster_size": 1}, training={"rounds": 3, "devices_per_round": 5})
    sim, ev = run(sc, 1)
    assert (ev["kind"] == "d2d_transfer").sum() == 0
    star = scenario(training={"rounds": 3, "devices_per_round": 5, "topology": "star"})
    s = FedAvgSimulation(star, 1, FakeTrainer(star, 1))
    s.run()
    sev = s.recorder.to_frame()
    pd.testing.assert_series_equal(ev.loc[ev.kind == "uplink", "duration_s"].reset_index(drop=True),
                                   sev.loc[sev.kind == "uplink", "duration_s"].reset_index(drop=True))
    assert sim.trainer.progress == pytest.approx(s.trainer.progress, rel=0, abs=100 * EPS)


# ------------------------------------------------------------------ bytes and times
def test_uplink_bytes_are_heads_times_update_size_and_d2d_bytes_are_members():
    sc = scenario(devices=[{"count": 12}], training={"rounds": 3, "devices_per_round": 9})
    sim, ev = run(sc, 2)
    size = sim.update_bytes()
    for r, clusters in enumerate(sim.cluster_log, start=1):
        e = ev[ev["round"] == r]
        assert (e.kind == "uplink").sum() == len(clusters)
        assert e.loc[e.kind == "uplink", "bytes"].sum() == len(clusters) * size
        members = sum(len(c.members) for c in clusters)
        assert e.loc[e.kind == "d2d_transfer", "bytes"].sum() == members * size
        assert set(e.loc[e.kind == "uplink", "node"]) == {f"dev{c.head}" for c in clusters}
        # a member's transfer goes to its own head
        for c in clusters:
            for m in c.members:
                row = e[(e.kind == "d2d_transfer") & (e.node == f"dev{m}")]
                assert list(row["peer"]) == [f"dev{c.head}"]
    summary = sim.dynamics_summary()
    d2d = ev[ev.kind == "d2d_transfer"]
    assert summary["d2d_bytes"] == int(d2d["bytes"].sum())
    assert summary["d2d_tx_energy_j"] == pytest.approx(d2d["energy_j"].sum(), rel=1e-12)
    assert summary["d2d_rx_energy_j"] == pytest.approx(ev.loc[ev.kind == "d2d_receive", "energy_j"].sum(), rel=1e-12)
    n_members = sum(len(c.members) for cl in sim.cluster_log for c in cl)
    assert summary["uplink_bytes_saved_vs_star"] == n_members * size
    assert summary["clusters_per_round"] == [len(c) for c in sim.cluster_log]
    assert summary["topology"] == "hierarchical"


def test_member_to_head_time_is_bits_over_the_shannon_rate_without_fading():
    sc = scenario(channel={"fading": "none", "rate_mode": "shannon"})
    sim, ev = run(sc)
    d2d = ev[ev.kind == "d2d_transfer"]
    assert len(d2d) > 0
    bits = 8 * sim.update_bytes()
    for _, row in d2d.iterrows():
        m, h = int(row["node"][3:]), int(row["peer"][3:])
        link = sim.network.d2d.edges[min(m, h), max(m, h)]["link" if m < h else "link_ba"]
        want = bits / (B_SL * math.log2(1 + link.snr(0, B_SL)))
        assert row["duration_s"] == pytest.approx(want, rel=1e-9)
        assert row["energy_j"] == pytest.approx(link.tx_power_w * want, rel=1e-9)
        rx = ev[(ev.kind == "d2d_receive") & (ev.node == row["peer"]) & (ev.peer == row["node"]) &
                (ev["round"] == row["round"])]
        assert rx["duration_s"].item() == pytest.approx(want, rel=1e-9)
        assert rx["energy_j"].item() == pytest.approx(0.1 * want, rel=1e-9)   # default rx_power_w 0.1 W


def test_member_to_head_time_over_rayleigh_blocks_by_hand():
    tc = 0.01
    sc = scenario(channel={"fading": "rayleigh", "coherence_time_s": tc, "rate_mode": "shannon"})
    sim, ev = run(sc, 4)
    bits = 8 * sim.update_bytes()
    d2d = ev[ev.kind == "d2d_transfer"]
    for _, row in d2d.iterrows():
        m, h = int(row["node"][3:]), int(row["peer"][3:])
        link = sim.network.d2d.edges[min(m, h), max(m, h)]["link" if m < h else "link_ba"]
        t, left = row["t_s"], bits
        blk = int(math.floor(t / tc))
        while True:   # S = sum_b R_b tau_b over the blocks the transfer spans
            rate = link.rate_bps(blk, B_SL)
            span = (blk + 1) * tc - t
            if rate * span >= left:
                t += left / rate
                break
            left -= rate * span
            t = (blk + 1) * tc
            blk += 1
        assert row["duration_s"] == pytest.approx(t - row["t_s"], rel=1e-9)
        assert row["duration_s"] == pytest.approx(hop_duration_s(sim.network.d2d, m, h, bits, row["t_s"], B_SL),
                                                  rel=1e-12)


def test_head_uploads_after_its_members_arrived_and_its_partial_sum():
    sim, ev = run(scenario(devices=[{"count": 10}]), 5)
    for r, clusters in enumerate(sim.cluster_log, start=1):
        e = ev[ev["round"] == r]
        for c in clusters:
            up = e[(e.kind == "uplink") & (e.node == f"dev{c.head}")]["t_s"].item()
            agg = e[(e.kind == "partial_aggregate") & (e.node == f"dev{c.head}")]
            if not c.members:
                assert agg.empty
                continue
            assert agg["t_s"].item() + agg["duration_s"].item() == pytest.approx(up, rel=1e-12)
            assert agg["flops"].item() == 2 * (len(c.members) + 1) * sim.trainer.adapter_bytes() / 4
            arrivals = e[(e.kind == "d2d_transfer") & (e.peer == f"dev{c.head}")]
            compute = e[(e.kind == "compute") & (e.node == f"dev{c.head}")]
            ready = max([(arrivals.t_s + arrivals.duration_s).max() if len(arrivals) else 0.0,
                         (compute.t_s + compute.duration_s).item()])
            assert agg["t_s"].item() == pytest.approx(ready, rel=1e-12)


# ------------------------------------------------------------------ deadlines and timeouts
def test_head_timeout_keeps_only_what_arrived():
    sc = scenario(hierarchical={"head_timeout_s": 1e-6})   # no member can be ready this early
    sim, ev = run(sc)
    assert (ev.kind == "d2d_transfer").sum() == 0
    n_members = sum(len(c.members) for cl in sim.cluster_log for c in cl)
    assert n_members > 0
    assert (ev.kind == "update_late").sum() == n_members == sim.counters["late_updates"]
    assert (ev.kind == "uplink").sum() == sum(len(cl) for cl in sim.cluster_log)


def test_round_deadline_drops_whole_clusters_still_busy():
    sc = scenario(training={"rounds": 2, "deadline_s": 1e3})
    base, _ = run(sc)
    assert base.counters["late_updates"] == 0
    # a deadline between the earliest and the latest head upload end
    _, ev0 = run(scenario(training={"rounds": 1}))
    ends = sorted((ev0.t_s + ev0.duration_s)[ev0.kind == "uplink"])
    assert len(ends) >= 2
    cut = 0.5 * (ends[0] + ends[-1])
    sim, ev = run(scenario(training={"rounds": 1, "deadline_s": cut}))
    kept = sum(1 for t in ends if t <= cut)
    assert 1 <= kept < len(ends)
    late = ev[ev.kind == "update_late"]
    assert len(late) > 0
    cl = {c.head: c for c in sim.cluster_log[0]}
    late_heads = {int(n[3:]) for n in late.node} & set(cl)
    assert len(late_heads) == len(cl) - kept
    assert len(late) == sum(len(cl[h].devices) for h in late_heads)


# ------------------------------------------------------------------ mobility, determinism
def test_mobility_changes_the_graph_and_the_clusters_follow_it():
    sc = scenario(devices=[{"count": 10}], training={"rounds": 8},
                  d2d={"kind": "distance", "threshold_m": 120, "bandwidth_hz": B_SL},
                  dynamics={"mobility": {"model": "random_waypoint", "tick_s": 0.5, "v_min_mps": 20.0,
                                         "v_max_mps": 40.0}})
    sim, ev = run(sc, 0)
    assert len(set(tuple(c) for c in sim.cluster_log)) > 1
    # each round's members are neighbours of their head in the graph of that round's start:
    # recompute the clusters from the event log's cluster_member rows
    for r, clusters in enumerate(sim.cluster_log, start=1):
        rows = ev[(ev.kind == "cluster_member") & (ev["round"] == r)]
        assert sorted(zip(rows.node, rows.peer)) == sorted((f"dev{m}", f"dev{c.head}") for c in clusters
                                                           for m in c.members)


def test_same_seed_same_event_log():
    sc = scenario(channel={"fading": "rayleigh"}, dynamics={"stragglers": {"jitter": "lognormal",
                                                                          "jitter_sigma": 0.3}})
    _, a = run(sc, 7)
    _, b = run(sc, 7)
    pd.testing.assert_frame_equal(a, b)


# ------------------------------------------------------------------ bad settings
@pytest.mark.parametrize("over, fields", [
    ({"d2d": {"kind": "none"}}, ["training.topology", "d2d.kind"]),
    ({"channel": {"uplink_access": "aircomp"}}, ["training.topology", "channel.uplink_access"]),
    ({"training": {"mode": "semi_synchronous"}, "async_fl": {"period_s": 1.0}}, ["training.topology", "training.mode"]),
    ({"strategies": {"compression": {"name": "topk"}}}, ["training.topology", "strategies.compression"]),
    ({"training": {"over_selection": 1.5, "devices_per_round": 3}}, ["training.topology", "training.over_selection"]),
    ({"experiment": "lola_compare"}, ["training.topology", "experiment"]),
])
def test_bad_combinations_name_the_fields(over, fields):
    with pytest.raises(ValueError) as err:
        scenario(**over)
    for f in fields:
        assert f in str(err.value)


@pytest.mark.parametrize("section", [{"head_selection": "random"}, {"max_cluster_size": 0},
                                     {"max_cluster_size": 2.0}, {"head_timeout_s": 0.0},
                                     {"head_timeout_s": -1.0}, {"head_timeout_s": True}, {"clusters": 3}])
def test_section_field_ranges(section):
    with pytest.raises(ValueError, match="hierarchical"):
        scenario(hierarchical=section)


def test_a_graph_without_edges_is_refused_at_construction():
    sc = scenario(d2d={"kind": "distance", "threshold_m": 1e-3, "bandwidth_hz": B_SL})
    with pytest.raises(ValueError, match="no edges.*d2d.threshold_m"):
        make_simulation(sc, 0, FakeTrainer(sc, 0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_selected_update_is_aggregated_dropped_or_late_under_churn(seed):
    """Devices going offline mid-round (Markov on/off with sojourns of the order of a round):
    each selected device's update ends in exactly one of the aggregate, update_dropped,
    update_late."""
    # rounds last about 0.3 s here: the head timeout and the deadline both cut some
    sc = scenario(devices=[{"count": 10}], training={"rounds": 6, "deadline_s": 0.25},
                  hierarchical={"head_timeout_s": 0.1},
                  dynamics={"availability": {"model": "markov", "mean_on_s": 2.0, "mean_off_s": 1.0}})
    sim = Recording(sc, seed, FakeTrainer(sc, seed))
    sim.run()
    ev = sim.recorder.to_frame()
    aggregated = {r: sorted(res.device_id for res in results) for r, _, _, results, _ in getattr(sim, "log", [])}
    assert ev.kind.isin(["update_dropped"]).any() and ev.kind.isin(["update_late"]).any()
    assert sim.counters["dropped_updates"] == (ev.kind == "update_dropped").sum()
    assert sim.counters["late_updates"] == (ev.kind == "update_late").sum()
    for r, clusters in enumerate(sim.cluster_log, start=1):
        e = ev[ev["round"] == r]
        selected = sorted(d for c in clusters for d in c.devices)
        gone = sorted(int(n[3:]) for n in e.loc[e.kind.isin(["update_dropped", "update_late"]), "node"])
        assert sorted(aggregated.get(r, []) + gone) == selected


def test_the_fedavg_experiment_reports_the_d2d_traffic_from_its_event_log(tmp_path):
    import json

    from deftsim.runner import run_scenario
    summary = run_scenario(scenario(devices=[{"count": 10}]), tmp_path)
    saved = json.loads((tmp_path / "summary.json").read_text())
    ev = pd.read_parquet(tmp_path / "events.parquet")
    assert saved["protocol"] == "hierarchical_fl" and saved["topology"] == "hierarchical"
    assert saved["d2d_bytes"] == int(ev.loc[ev.kind == "d2d_transfer", "bytes"].sum()) > 0
    assert saved["d2d_energy_j"] == pytest.approx(ev.loc[ev.kind.isin(["d2d_transfer", "d2d_receive"]), "energy_j"]
                                                  .sum(), rel=1e-12)
    assert saved["uplink_bytes"] == int(ev.loc[ev.kind == "uplink", "bytes"].sum())
    assert saved["uplink_bytes_saved_vs_star"] == (ev.kind == "d2d_transfer").sum() * 300_000
    assert len(saved["clusters_per_round"]) == 3 and summary["clusters_per_round"] == saved["clusters_per_round"]
