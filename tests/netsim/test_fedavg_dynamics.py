"""Synchronous FedAvg with faults, stragglers, mobility, energy models and plug-in strategies,
checked against theory where there is one."""
import math

import numpy as np
import pytest

from netsim import FakeTrainer, Scenario
from netsim.protocols import make_simulation


def fake(**sections):
    return Scenario.model_validate({"trainer": "fake", **sections})


def run(sc, seed=0):
    sim = make_simulation(sc, seed, FakeTrainer(sc, seed))
    out = sim.run()
    return sim, out, sim.recorder.to_frame()


# the transfers of these scenarios take microseconds: rounds are decided by compute times
FAST_LINKS = {"fading": "none", "uplink_bandwidth_hz": 1e12, "downlink_bandwidth_hz": 1e12,
              "pathloss": {"model": "log_distance", "exponent": 2.0, "ref_loss_db": 0.0}}


def test_available_count_is_binomial():
    n, p, rounds = 40, 0.3, 400
    sc = fake(devices=[{"count": n}], training={"rounds": rounds},
              dynamics={"availability": {"model": "bernoulli", "p_available": p}})
    _, _, ev = run(sc)
    counts = ev[ev.kind == "compute"].groupby("round").size().reindex(range(1, rounds + 1), fill_value=0)
    mean, var = n * p, n * p * (1 - p)
    assert counts.mean() == pytest.approx(mean, abs=5 * math.sqrt(var / rounds))
    # sample variance: SE from the binomial fourth moment (mu4 = var (1 + 3 (n - 2) p (1 - p)))
    mu4 = var * (1 + 3 * (n - 2) * p * (1 - p))
    assert counts.var() == pytest.approx(var, abs=5 * math.sqrt((mu4 - var**2) / rounds))


def test_deadline_drop_rate_matches_the_jitter_tail():
    sigma, steps, rounds, n = 0.5, 5, 200, 20
    sc = fake(devices=[{"count": n, "compute_flops_per_s": 1e12}], channel=FAST_LINKS,
              training={"rounds": rounds, "local_steps": steps, "deadline_s": 0.03},
              dynamics={"stragglers": {"jitter": "lognormal", "jitter_sigma": sigma}})
    sim, out, ev = run(sc)
    t0 = steps * sc.fake.step_flops / 1e12          # nominal compute time (0.025 s)
    late = (ev.kind == "update_late").sum()
    total = (ev.kind == "compute").sum()
    assert total == n * rounds
    # P(T > d) for T = t0 X, X lognormal with E[X] = 1 (transfers take ~1e-6 s)
    z = (math.log(0.03 / t0) + sigma**2 / 2) / sigma
    p = 0.5 * math.erfc(z / math.sqrt(2))
    assert late / total == pytest.approx(p, abs=5 * math.sqrt(p * (1 - p) / total))
    assert sim.dynamics_summary()["late_updates"] == late
    # the jobs of late devices were cancelled, never trained
    assert sim.engine.stats()["jobs_run"] == total - late


def test_min_results_waits_past_the_deadline():
    sc = fake(devices=[{"count": 10}], channel=FAST_LINKS,
              training={"rounds": 20, "deadline_s": 0.026, "min_results": 6},
              dynamics={"stragglers": {"jitter": "lognormal", "jitter_sigma": 0.5}})
    _, _, ev = run(sc)
    kept = ev[ev.kind == "compute"].groupby("round").size() - ev[ev.kind == "update_late"].groupby("round").size().reindex(
        range(1, 21), fill_value=0)
    assert (kept >= 6).all()


def test_over_selection_keeps_the_first_k():
    sc = fake(devices=[{"count": 30}], channel=FAST_LINKS,
              training={"rounds": 10, "devices_per_round": 10, "over_selection": 1.3},
              dynamics={"stragglers": {"jitter": "lognormal", "jitter_sigma": 0.5}})
    sim, _, ev = run(sc)
    per_round = ev[ev.kind == "compute"].groupby("round").size()
    assert (per_round == 13).all()
    assert (ev[ev.kind == "update_late"].groupby("round").size() == 3).all()
    assert sim.engine.stats()["jobs_run"] == 100


def test_device_going_offline_loses_its_update():
    # on-sojourns of mean 0.03 s against rounds of ~0.03 s: some devices leave mid-round
    sc = fake(devices=[{"count": 20}], channel=FAST_LINKS, training={"rounds": 30},
              dynamics={"availability": {"model": "markov", "mean_on_s": 0.05, "mean_off_s": 0.02}})
    sim, _, ev = run(sc)
    dropped = ev[ev.kind == "update_dropped"]
    assert len(dropped) > 0 and len(dropped) == sim.dynamics_summary()["dropped_updates"]
    for _, row in dropped.head(20).iterrows():
        device = int(row.node[3:])
        assert not sim.availability.online(device, row.t_s + 1e-12)      # it really is off then
        assert sim.availability.online(device, row.t_s - 1e-9)
    # a dropped device's compute event stops when it goes off
    comp = ev[ev.kind == "compute"].set_index(["node", "round"])
    for _, row in dropped.head(20).iterrows():
        c = comp.loc[(row.node, row["round"])]
        assert c.t_s + c.duration_s <= row.t_s + 1e-12


def test_idle_energy_and_dvfs():
    kappa, f, fpc = 1e-28, 1.5e9, 16.0
    sc = fake(devices=[{"count": 4, "idle_power_w": 0.3, "compute_model": "dvfs", "cpu_frequency_hz": f,
                        "flops_per_cycle": fpc, "kappa": kappa},
                       {"name": "fast", "count": 4, "idle_power_w": 0.3}],
              channel=FAST_LINKS, training={"rounds": 3, "local_steps": 5})
    _, _, ev = run(sc)
    comp = ev[(ev.kind == "compute") & (ev.group == "phone")]
    cycles = 5 * sc.fake.step_flops / fpc
    assert np.allclose(comp.duration_s, cycles / f, rtol=1e-12)
    assert np.allclose(comp.energy_j, kappa * cycles * f**2, rtol=1e-12)
    idle = ev[ev.kind == "idle"]
    assert len(idle) > 0 and np.allclose(idle.energy_j, 0.3 * idle.duration_s, rtol=1e-12)
    # the fast group waits for the slow DVFS group
    assert idle[idle.group == "fast"].duration_s.min() > 0


def test_mobility_hands_over_and_moves_devices():
    sc = fake(devices=[{"count": 20, "placement": {"max_distance_m": 150.0}}],
              edge_servers=[{"name": "a", "position_m": [0.0, 0.0]}, {"name": "b", "position_m": [300.0, 0.0]}],
              training={"rounds": 40, "local_steps": 200},
              dynamics={"mobility": {"model": "random_waypoint", "tick_s": 0.2, "v_min_mps": 30.0,
                                     "v_max_mps": 60.0, "handover_hysteresis_db": 3.0}})
    sim, _, ev = run(sc)
    handovers = ev[ev.kind == "handover"]
    assert len(handovers) > 0 and len(handovers) == sim.dynamics_summary()["handovers"]
    assert (handovers.peer != handovers.server).all()
    # after the run each device is associated with the server it last handed over to
    last = handovers.groupby("node").peer.last()
    for name, peer in last.items():
        dev = sim.network.devices[int(name[3:])]
        assert sim.network.servers[dev.server].name == peer
    a, b = run(sc)[2], ev
    assert a.equals(b)


def test_compression_sets_the_payload_and_server_optimizer_runs():
    sc = fake(devices=[{"count": 6}], training={"rounds": 4},
              strategies={"compression": {"name": "qsgd", "params": {"bits": 4}},
                          "aggregation": {"name": "fedadam", "params": {"server_lr": 0.5}}})
    sim, out, ev = run(sc)
    q = sc.fake.adapter_bytes // 4
    bits = sim.compressor.payload_bits(q)
    assert (ev.loc[ev.kind == "uplink", "bytes"] == math.ceil(bits / 8)).all()
    assert math.ceil(bits / 8) < sc.fake.adapter_bytes / 4
    assert out.final_accuracy > out.initial_accuracy


def test_channel_aware_selection_picks_the_best_snr():
    sc = fake(devices=[{"count": 12}], training={"rounds": 3, "devices_per_round": 4},
              strategies={"selection": {"name": "channel_aware"}})
    sim, _, ev = run(sc)
    snr = np.array([d.uplink.mean_snr_db(sc.channel.uplink_bandwidth_hz) for d in sim.network.devices])
    best = {f"dev{i}" for i in np.argsort(-snr)[:4]}
    for _, g in ev[ev.kind == "compute"].groupby("round"):
        assert set(g.node) == best


def test_defaults_add_no_event_kind():
    sc = fake(devices=[{"count": 8}], training={"rounds": 3})
    _, _, ev = run(sc)
    assert set(ev.kind) == {"evaluate", "round_start", "broadcast", "downlink", "compute", "uplink", "aggregate",
                            "round_end"}
    assert (ev.model_version == -1).all() and (ev.staleness == -1).all()


def test_late_devices_stop_when_the_round_closes():
    sc = fake(devices=[{"count": 10}], channel=FAST_LINKS,
              training={"rounds": 8, "deadline_s": 0.03},
              dynamics={"stragglers": {"jitter": "lognormal", "jitter_sigma": 0.8}})
    _, _, ev = run(sc)
    ends = ev[ev.kind == "aggregate"].set_index("round")["t_s"]   # the round closed just before
    work = ev[ev.kind.isin(["downlink", "compute", "uplink"])]
    assert (ev.kind == "update_late").sum() > 0
    assert ((work.t_s + work.duration_s) <= work["round"].map(ends) + 1e-12).all()
    # the cut compute events are charged for the time they ran
    comp = work[work.kind == "compute"]
    assert np.allclose(comp.energy_j, 5.0 * comp.duration_s, rtol=1e-12)
