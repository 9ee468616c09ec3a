"""Gossip FL against theory, with the fake trainer: the network average is kept (doubly
stochastic W), the consensus distance contracts within prod_s lambda(W_s), a disconnected graph
keeps per-component averages, each step lasts as long as its slowest sidelink exchange plus
mixing, mobility changes the graph, determinism, bad settings."""
import math

import networkx as nx
import numpy as np
import pandas as pd
import pytest

from netsim import FakeTrainer
from netsim.protocols import PROTOCOLS, make_simulation, protocol_name
from netsim.protocols.gossip_fl import GossipFLSimulation, consensus_distance
from netsim.scenario import Scenario
from netsim.sidelink import gossip_error_bound, hop_duration_s, metropolis_weights

EPS = np.finfo(np.float64).eps
B_SL = 5e6


def scenario(**over):
    base = {"name": "g", "trainer": "fake", "devices": [{"count": 8}],
            "training": {"rounds": 3, "topology": "gossip"},
            "gossip": {"steps_per_round": 2},
            "d2d": {"kind": "knn", "k": 2, "bandwidth_hz": B_SL}}
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return Scenario.model_validate(base)


def make(sc, seed=0):
    return make_simulation(sc, seed, FakeTrainer(sc, seed))


def run(sc, seed=0):
    sim = make(sc, seed)
    sim.run()
    return sim, sim.recorder.to_frame()


def one_step(sim, r=1):
    """Run one gossip step of ``sim`` on its SimPy clock; returns (lambda, components)."""
    out = {}

    def proc():
        out["v"] = yield from sim._gossip_step(r)
    sim.env.process(proc())
    sim.env.run()
    return out["v"]


def test_topology_routes_to_the_protocol_registered_under_its_module_name():
    sc = scenario()
    assert protocol_name(sc) == "gossip_fl"
    assert PROTOCOLS["gossip_fl"] is GossipFLSimulation
    assert isinstance(make(sc), GossipFLSimulation)


# ------------------------------------------------------------------ averaging
def test_a_gossip_step_keeps_the_network_average_and_is_w_times_x():
    sim = make(scenario(devices=[{"count": 9}], d2d={"kind": "knn", "k": 3, "bandwidth_hz": B_SL}))
    rng = np.random.default_rng(0)
    sim.x = rng.uniform(0.0, 0.9, size=(9, 1))
    x0 = sim.x.copy()
    w = metropolis_weights(sim.network.d2d)
    lam, comps = one_step(sim)
    np.testing.assert_allclose(sim.x, w @ x0, rtol=0, atol=16 * EPS)
    # 1^T W x = 1^T x: the mean moves only by rounding, <= ~N eps max|x|
    assert sim.x.mean() == pytest.approx(x0.mean(), rel=0, abs=9 * 4 * EPS)
    assert lam == pytest.approx(gossip_error_bound(w, 1), rel=1e-12)
    assert comps == nx.number_connected_components(sim.network.d2d) == 1
    # the states the devices train from next are the mixed values
    assert [sim.states[i] for i in range(9)] == pytest.approx(list(sim.x[:, 0]), abs=0)
    assert consensus_distance(sim.x) <= lam * consensus_distance(x0) + 1e-15


def test_step_lasts_the_slowest_exchange_plus_mixing_and_logs_each_hop():
    sc = scenario(channel={"fading": "rayleigh", "coherence_time_s": 0.01})
    sim = make(sc)
    sim.env.run(until=0.0123)   # start inside a coherence block
    t0 = sim.env.now
    one_step(sim)
    ev = sim.recorder.to_frame()
    g = sim.network.d2d
    bits = 8 * sim.trainer.adapter_bytes()
    hops = ev[ev.kind == "d2d_transfer"]
    assert len(hops) == 2 * g.number_of_edges()
    for _, row in hops.iterrows():   # each hop: bits / rate over the blocks it spans, from t0
        src, dst = int(row["node"][3:]), int(row["peer"][3:])
        assert row["t_s"] == t0
        assert row["duration_s"] == pytest.approx(hop_duration_s(g, src, dst, bits, t0, B_SL), rel=1e-12)
    want_end = 0.0
    for i in g.nodes:
        arrivals = [hop_duration_s(g, j, i, bits, t0, B_SL) for j in g.adj[i]]
        t_mix = 2 * (g.degree(i) + 1) * sim.trainer.adapter_bytes() / 4 / sc.devices[0].compute_flops_per_s
        want_end = max(want_end, max(arrivals) + t_mix)
    assert sim.env.now - t0 == pytest.approx(want_end, rel=1e-12)
    # energies: sender P_tx x T, receiver rx_power_w x T
    rx = ev[ev.kind == "d2d_receive"]
    np.testing.assert_allclose(hops["energy_j"], 0.2 * hops["duration_s"], rtol=1e-12)
    np.testing.assert_allclose(rx["energy_j"], 0.1 * rx["duration_s"], rtol=1e-12)
    assert (hops["bytes"] == sim.trainer.adapter_bytes()).all()


def test_consensus_contracts_within_the_spectral_bound_every_round():
    sim, ev = run(scenario(devices=[{"count": 10}], training={"rounds": 5}, gossip={"steps_per_round": 3}))
    w = metropolis_weights(sim.network.d2d)
    lam = gossip_error_bound(w, 1)
    assert lam < 1
    for entry in sim.consensus_log:
        assert entry["bound_factor"] == pytest.approx(lam ** 3, rel=1e-12)
        assert entry["distance_after"] <= entry["bound_factor"] * entry["distance_before"] * (1 + 1e-12)
        assert entry["within_bound"]
        assert entry["distance_before"] > 0
    summary = sim.dynamics_summary()
    assert summary["gossip"]["within_bound_all_rounds"]
    assert summary["topology"] == "gossip"
    assert summary["uplink_bytes"] == 0 and (ev.kind == "uplink").sum() == 0
    assert summary["d2d_bytes"] == int(ev.loc[ev.kind == "d2d_transfer", "bytes"].sum())
    # every round: steps x 2|E| transfers of the whole adapter
    assert summary["d2d_bytes"] == 5 * 3 * 2 * sim.network.d2d.number_of_edges() * sim.trainer.adapter_bytes()


def test_many_steps_reach_the_network_average_and_evaluation_is_the_consensus_model():
    sc = scenario(training={"rounds": 1}, gossip={"steps_per_round": 200, "evaluate_devices": True})
    sim = make(sc)
    sim.run()
    ev = sim.recorder.to_frame()
    x = sim.x[:, 0]
    entry = sim.consensus_log[0]
    assert entry["bound_factor"] < 1e-3   # lambda^200 on a connected graph
    assert entry["distance_after"] <= entry["bound_factor"] * entry["distance_before"] * (1 + 1e-12)
    last = ev[ev.kind == "evaluate"].iloc[-1]
    assert last["accuracy"] == pytest.approx(sim.trainer.evaluate_state(float(x.mean())).accuracy, rel=1e-12)
    dev = ev[ev.kind == "evaluate_devices"].iloc[-1]
    # the fake's accuracy is affine in p, so the mean of the devices' accuracies is the accuracy of
    # the mean (up to rounding)
    assert dev["accuracy"] == pytest.approx(last["accuracy"], rel=1e-12)
    assert sim.dynamics_summary()["gossip"]["final_device_mean_accuracy"] == pytest.approx(dev["accuracy"])


def test_local_steps_train_from_each_devices_own_state():
    sim = make(scenario(training={"rounds": 1}))
    own = [float(v) for v in np.random.default_rng(1).uniform(0.0, 0.5, size=8)]
    sim.states = list(own)
    sim.x = np.array(own)[:, None]
    bases = {}
    submit = sim._submit

    def spy(device, r, base=None):
        bases[device.index] = base
        return submit(device, r, base=base)
    sim._submit = spy
    sim.run()
    assert bases == dict(enumerate(own))   # each job's base: the device's own state, not a global one


def test_disconnected_graph_keeps_per_component_averages():
    sc = scenario(devices=[{"count": 6}], d2d={"kind": "distance", "threshold_m": 1e6, "bandwidth_hz": B_SL})
    sim = make(sc)
    g = sim.network.d2d
    left, right = {0, 1, 2}, {3, 4, 5}
    g.remove_edges_from([(a, b) for a in left for b in right])
    sim.x = np.array([[0.1], [0.2], [0.6], [0.3], [0.25], [0.8]])   # averages 0.3 and 0.45
    for _ in range(60):
        lam, comps = one_step(sim)
    assert comps == 2 and lam == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(sim.x[:3, 0], 0.3, atol=1e-12)
    np.testing.assert_allclose(sim.x[3:, 0], 0.45, atol=1e-12)


def test_an_isolated_device_keeps_its_state_and_sends_nothing():
    sc = scenario(devices=[{"count": 5}], d2d={"kind": "distance", "threshold_m": 1e6, "bandwidth_hz": B_SL})
    sim = make(sc)
    sim.network.d2d.remove_edges_from([(4, j) for j in range(4)])
    sim.x = np.array([[0.1], [0.2], [0.3], [0.4], [0.9]])
    one_step(sim)
    assert sim.x[4, 0] == 0.9
    ev = sim.recorder.to_frame()
    assert not ((ev.node == "dev4") & ev.kind.isin(["d2d_transfer", "d2d_receive", "gossip_mix"])).any()


# ------------------------------------------------------------------ mobility, determinism
def test_mobility_changes_the_graph_between_steps():
    sc = scenario(devices=[{"count": 10}], training={"rounds": 6},
                  d2d={"kind": "distance", "threshold_m": 150, "bandwidth_hz": B_SL},
                  dynamics={"mobility": {"model": "random_waypoint", "tick_s": 0.5, "v_min_mps": 20.0,
                                         "v_max_mps": 40.0}})
    sim, ev = run(sc)
    pairs_per_round = [frozenset(zip(e.node, e.peer)) for _, e in ev[ev.kind == "d2d_transfer"].groupby("round")]
    assert len(set(pairs_per_round)) > 1
    for entry in sim.consensus_log:
        assert entry["within_bound"]


def test_same_seed_same_event_log():
    sc = scenario(channel={"fading": "rayleigh"}, training={"rounds": 3, "devices_per_round": 5},
                  dynamics={"stragglers": {"jitter": "lognormal", "jitter_sigma": 0.3}})
    a_sim, a = run(sc, 7)
    b_sim, b = run(sc, 7)
    pd.testing.assert_frame_equal(a, b)
    np.testing.assert_array_equal(a_sim.x, b_sim.x)
    _, c = run(sc, 8)
    assert not a.equals(c)


def test_devices_per_round_train_and_every_device_gossips():
    sim, ev = run(scenario(training={"rounds": 2, "devices_per_round": 3}))
    for r in (1, 2):
        e = ev[ev["round"] == r]
        assert (e.kind == "compute").sum() == 3
        senders = set(e.loc[e.kind == "d2d_transfer", "node"])
        assert senders == {f"dev{i}" for i in sim.network.d2d.nodes if sim.network.d2d.degree(i) > 0}


# ------------------------------------------------------------------ bad settings
@pytest.mark.parametrize("over, fields", [
    ({"d2d": {"kind": "none"}}, ["training.topology", "d2d.kind"]),
    ({"channel": {"uplink_access": "aircomp"}}, ["training.topology", "channel.uplink_access"]),
    ({"training": {"mode": "asynchronous"}, "strategies": {"aggregation": {"name": "fedbuff"}}},
     ["training.topology", "training.mode"]),
    ({"strategies": {"aggregation": {"name": "fedadam"}}}, ["training.topology", "strategies.aggregation"]),
    ({"dynamics": {"availability": {"model": "markov"}}}, ["training.topology", "dynamics.availability"]),
    ({"training": {"deadline_s": 10.0}}, ["training.topology", "training.deadline_s"]),
    ({"strategies": {"compression": {"name": "topk"}}}, ["training.topology", "strategies.compression"]),
])
def test_bad_combinations_name_the_fields(over, fields):
    with pytest.raises(ValueError) as err:
        scenario(**over)
    for f in fields:
        assert f in str(err.value)


@pytest.mark.parametrize("section", [{"steps_per_round": 0}, {"steps_per_round": 2.0},
                                     {"steps_per_round": 10_001}, {"evaluate_devices": "yes"},
                                     {"evaluate_devices": 1}, {"mixing": "max_degree"}])
def test_section_field_ranges(section):
    with pytest.raises(ValueError, match="gossip"):
        scenario(gossip=section)


def test_a_graph_without_edges_is_refused_at_construction():
    sc = scenario(d2d={"kind": "distance", "threshold_m": 1e-3, "bandwidth_hz": B_SL})
    with pytest.raises(ValueError, match="no edges.*d2d.threshold_m"):
        make(sc)


def test_a_trainer_without_per_device_states_is_refused():
    sc = scenario()

    class Plain(FakeTrainer):
        trained_state = None
    with pytest.raises(ValueError, match="trained_state"):
        GossipFLSimulation(sc, 0, Plain(sc, 0))


def test_consensus_distance_by_hand():
    x = np.array([[0.0, 0.0], [3.0, 4.0]])   # xbar = (1.5, 2); each row at distance 2.5
    assert consensus_distance(x) == pytest.approx(2.5, rel=1e-15)
    assert consensus_distance(x[:1]) == 0.0
    assert math.isclose(consensus_distance(np.ones((4, 3))), 0.0, abs_tol=0)


def test_the_fedavg_experiment_reports_gossip_and_its_consensus(tmp_path):
    import json

    from deftsim.runner import run_scenario
    run_scenario(scenario(), tmp_path)
    saved = json.loads((tmp_path / "summary.json").read_text())
    ev = pd.read_parquet(tmp_path / "events.parquet")
    assert saved["protocol"] == "gossip_fl" and saved["topology"] == "gossip"
    assert saved["d2d_bytes"] == int(ev.loc[ev.kind == "d2d_transfer", "bytes"].sum()) > 0
    assert saved["uplink_bytes"] == 0
    g = saved["gossip"]
    assert len(g["consensus_distance_after"]) == 3 and g["within_bound_all_rounds"]
    assert all(a <= f * b * (1 + 1e-12) for a, b, f in zip(g["consensus_distance_after"],
                                                            g["consensus_distance_before"], g["bound_factor"]))
