"""The federated_deft protocols on the timeline (torch-free, with stand-in trainers): the edge
queue against queueing theory, the split round trip against a hand-computed timeline, the
emulator's one-off download, and the zeroth-order seed broadcast and catch-up downloads."""
import math

import numpy as np
import pytest
import simpy

from netsim import FakeTrainer, Scenario
from netsim.edge_queue import EdgeBatchServer
from netsim.federated_deft import variant_scenario
from netsim.interfaces import EvalResult, PlannedJob, RoundTripCost, SplitJobCost
from netsim.protocols import deft_simulation
from netsim.protocols.emulator_fl import EmulatorFedAvgSimulation
from netsim.protocols.split_fl import SplitFedSimulation
from netsim.protocols.zeroth_order_fl import ZerothOrderSimulation


# ------------------------------------------------------------------------------- the edge queue
def poisson_waits(rate_per_s, service_s, n, max_batch=1, overhead_s=0.0, seed=0):
    env = simpy.Environment()
    edge = EdgeBatchServer(env, flops_per_s=1.0, max_batch=max_batch, overhead_s=overhead_s)
    rng = np.random.default_rng(seed)

    def arrivals():
        for _ in range(n):
            yield env.timeout(rng.exponential(1.0 / rate_per_s))
            edge.request(service_s)   # flops / (1 FLOP/s) = service time

    env.process(arrivals())
    env.run()
    return np.array(edge.stats.waits_s), edge


def test_single_server_queue_is_m_d_1():
    """max_batch 1, no overhead, Poisson arrivals, equal requests: Pollaczek-Khinchine's mean
    wait rho / (2 mu (1 - rho)); the standard error from batch means (waits are correlated)."""
    mu, rho = 1.0, 0.6
    waits, edge = poisson_waits(rho * mu, 1.0 / mu, 200_000)
    theory = rho / (2 * mu * (1 - rho))
    batches = waits[: len(waits) // 100 * 100].reshape(100, -1).mean(axis=1)
    se = batches.std(ddof=1) / math.sqrt(len(batches))
    assert abs(waits.mean() - theory) < 5 * se, (waits.mean(), theory, se)
    assert edge.stats.passes == edge.stats.requests == 200_000


def test_utilisation_is_the_offered_load():
    """Little / the utilisation law: busy fraction = lambda E[S] (for a stable queue)."""
    waits, edge = poisson_waits(0.5, 1.0, 50_000)
    summary = edge.stats.summary(horizon_s=edge.env.now)
    assert summary["utilisation"] == pytest.approx(0.5, abs=0.02)


def test_simultaneous_requests_are_served_in_batches():
    env = simpy.Environment()
    edge = EdgeBatchServer(env, flops_per_s=1e12, max_batch=3, overhead_s=0.01)
    done = [edge.request(1e9) for _ in range(5)]
    env.run()
    services = [d.value for d in done]
    first = 0.01 + 3e9 / 1e12
    assert [s.batch_size for s in services] == [3, 3, 3, 2, 2]
    assert [s.wait_s for s in services[:3]] == [0.0] * 3
    assert services[3].wait_s == pytest.approx(first)
    assert services[3].duration_s == pytest.approx(0.01 + 2e9 / 1e12)
    assert edge.stats.passes == 2


def test_bad_edge_settings_are_refused():
    with pytest.raises(ValueError, match="max_batch"):
        EdgeBatchServer(simpy.Environment(), 1e12, max_batch=0)


# ------------------------------------------------------------------------------- stand-in trainers
STEP = RoundTripCost(device_forward_flops=2e9, uplink_bytes=100_000, edge_flops=4e10, downlink_bytes=90_000,
                     device_backward_flops=3e9)


class FakeSplitTrainer(FakeTrainer):
    """Plans carry a SplitJobCost of identical steps."""

    def plan(self, job, base):
        cost = SplitJobCost(flops=job.steps * (STEP.device_forward_flops + STEP.device_backward_flops),
                            peak_memory_bytes=10**8, update_bytes=self.adapter_bytes(),
                            num_examples=self.device_num_examples(job.device_id), steps=(STEP,) * job.steps)
        return PlannedJob(job, float(base), cost)


class FakeEmulatorTrainer(FakeTrainer):
    distill_edge_flops = 5e12

    def emulator_download_bytes(self):
        return 40_000_000

    def evaluate_emulator(self):
        ev = self.evaluate()
        return EvalResult(ev.accuracy * 0.9, ev.loss, ev.flops, ev.num_examples)


def deft_scenario(**extra):
    data = {"experiment": "federated_deft", "trainer": "real", "federated_deft": {"variants": ["lora"]},
            "devices": [{"count": 2, "compute_flops_per_s": 1e12, "idle_power_w": 0.5,
                         "placement": {"min_distance_m": 50, "max_distance_m": 60}}],
            "channel": {"fading": "none"}, "fake": {"adapter_bytes": 40_000},
            "training": {"rounds": 2, "local_steps": 3}}
    data.update(extra)
    return Scenario.model_validate(data)


def run_variant(sim_cls, trainer_cls, sc, variant):
    sc = variant_scenario(sc, variant)
    sim = sim_cls(sc, 0, trainer_cls(sc, 0))
    out = sim.run()
    return sim, out, sim.recorder.to_frame()


# ------------------------------------------------------------------------------- split
def test_split_round_trip_timeline_matches_the_hand_computed_one():
    """One device: download, then per step forward, uplink, edge pass, downlink, backward, then
    the prompt upload; every duration from its own model."""
    sc = deft_scenario(devices=[{"count": 1, "compute_flops_per_s": 1e12, "idle_power_w": 0.5,
                                 "placement": {"min_distance_m": 50, "max_distance_m": 60}}],
                       split={"edge_max_batch": 4, "edge_batch_overhead_s": 0.002})
    sim, out, ev = run_variant(SplitFedSimulation, FakeSplitTrainer, sc, "split")
    dev = sim.network.devices[0]
    ch = sim.scenario.channel
    r1 = ev[ev["round"] == 1]
    edge_s = 0.002 + STEP.edge_flops / sim.network.servers[0].spec.compute_flops_per_s
    t_up = dev.uplink.transfer_duration_s(8 * STEP.uplink_bytes, 0.0, ch.uplink_bandwidth_hz)
    t_dn = dev.downlink.transfer_duration_s(8 * STEP.downlink_bytes, 0.0, ch.downlink_bandwidth_hz)
    step_s = 2e9 / 1e12 + t_up + edge_s + t_dn + 3e9 / 1e12
    dl = r1[r1.kind == "downlink"].iloc[0]
    prompt_up = r1[(r1.kind == "uplink") & (r1.bytes == 40_000)].iloc[0]
    assert prompt_up.t_s == pytest.approx(dl.t_s + dl.duration_s + 3 * step_s, rel=1e-12)
    waits = r1[r1.kind == "edge_wait"]
    assert len(waits) == 3 and np.allclose(waits.duration_s, edge_s)
    assert np.allclose(waits.energy_j, 0.5 * edge_s)
    assert (r1[r1.kind == "uplink"].bytes == STEP.uplink_bytes).sum() == 3
    assert (r1[r1.kind == "downlink"].bytes == STEP.downlink_bytes).sum() == 3
    assert r1.loc[r1.kind == "compute", "flops"].sum() == pytest.approx(3 * 5e9)
    assert waits["loss"].notna().sum() == 1   # the job's mean loss, on its last edge step
    assert out.rounds_completed == 2


def test_split_devices_in_step_share_the_edge_pass():
    """Two identical devices at the same distance reach the edge together: each pass serves
    both, so a pass lasts overhead + 2 f / F and nobody waits in the queue."""
    sc = deft_scenario(devices=[{"count": 2, "compute_flops_per_s": 1e12,
                                 "placement": {"min_distance_m": 50, "max_distance_m": 50}}],
                       split={"edge_max_batch": 8, "edge_batch_overhead_s": 0.002})
    sim, _, ev = run_variant(SplitFedSimulation, FakeSplitTrainer, sc, "split")
    passes = ev[ev.kind == "edge_compute"]
    edge = sim.edge_summary()["edge0"]
    assert edge["requests"] == 2 * 2 * 3 and edge["passes"] == len(passes)
    # same path loss, no fading: the two devices arrive at the same instants
    assert edge["mean_batch_size"] == pytest.approx(2.0)
    assert np.allclose(passes.duration_s, 0.002 + 2 * STEP.edge_flops / 1e14)
    assert edge["mean_queue_delay_s"] == pytest.approx(0.0, abs=1e-12)


def test_split_queueing_grows_with_devices_when_the_edge_serves_one_at_a_time():
    delays = []
    for n in (1, 4, 16):
        sc = deft_scenario(devices=[{"count": n, "compute_flops_per_s": 1e12}],
                           edge_servers=[{"compute_flops_per_s": 2e12}],
                           split={"edge_max_batch": 1, "edge_batch_overhead_s": 0.0})
        sim, _, _ = run_variant(SplitFedSimulation, FakeSplitTrainer, sc, "split")
        delays.append(sim.edge_summary()["edge0"]["mean_queue_delay_s"])
    assert delays[0] == 0.0 and delays[0] < delays[1] < delays[2]


def test_split_protocol_refuses_a_trainer_without_round_trips():
    sc = variant_scenario(deft_scenario(), "split")
    with pytest.raises(TypeError, match="SplitJobCost"):
        SplitFedSimulation(sc, 0, FakeTrainer(sc, 0)).run()


# ------------------------------------------------------------------------------- emulator
def test_emulator_is_distilled_then_sent_once_before_the_first_round():
    sim, out, ev = run_variant(EmulatorFedAvgSimulation, FakeEmulatorTrainer, deft_scenario(), "emulator")
    distill = ev[ev.kind == "distill"].iloc[0]
    assert distill.duration_s == pytest.approx(5e12 / 1e14)
    once = ev[(ev["round"] == 0) & (ev.kind == "downlink")]
    assert len(once) == 2 and (once.bytes == 40_000_000).all()
    assert (once.t_s == distill.duration_s).all()
    bcast = ev[ev.kind == "emulator_broadcast"].iloc[0]
    assert bcast.duration_s == pytest.approx(once.duration_s.max())
    first_eval = ev[ev.kind == "evaluate"].iloc[0]
    assert first_eval.t_s == pytest.approx(bcast.t_s + bcast.duration_s)
    emu = ev[ev.kind == "evaluate_emulator"]
    assert len(emu) == out.rounds_completed + 1 and (emu.duration_s == 0).all()


# ------------------------------------------------------------------------------- zeroth order
class FakeSeedTrainer(FakeTrainer):
    def trainable_bytes(self):
        return 10_000

    def replay_flops(self, num_pairs):
        return 2.0 * num_pairs * 2_500


def test_seeds_are_sent_once_and_devices_catch_up_on_missed_steps():
    """K = 256: the seeds once (4 K bytes); then a device downloads 4 K bytes per server step it
    missed, at most the whole state (10 kB here), nothing before the first aggregation."""
    sc = deft_scenario(devices=[{"count": 4, "compute_flops_per_s": 1e12}],
                       training={"rounds": 6, "local_steps": 2, "devices_per_round": 1},
                       zeroth_order={"candidate_seeds": 256}, fake={"adapter_bytes": 1024})
    sim, out, ev = run_variant(ZerothOrderSimulation, FakeSeedTrainer, sc, "zeroth_order")
    seeds = ev[ev.kind == "seed_broadcast"]
    assert len(seeds) == 1 and seeds.bytes.iloc[0] == 4 * 256
    last = {}
    for _, row in ev[(ev.kind == "downlink") & (ev["round"] > 0)].iterrows():
        missed = (row["round"] - 1) - last.get(row.node, 0)
        assert row.bytes == min(1024 * missed, 10_000), (row.node, row["round"])
        replay = ev[(ev.kind == "replay") & (ev.node == row.node) & (ev["round"] == row["round"])]
        assert replay.flops.sum() == (2.0 * 256 * missed * 2_500 if missed else 0.0)
        last[row.node] = row["round"] - 1
    edge_replays = ev[(ev.kind == "replay") & (ev.node == "edge0")]
    assert len(edge_replays) == 6 and (edge_replays.flops == 2.0 * 256 * 2_500).all()
    assert out.rounds_completed == 6


def test_deft_simulation_picks_the_variant_protocol():
    sc = deft_scenario(zeroth_order={"uplink_access": "aircomp"})
    zo = variant_scenario(sc, "zeroth_order")
    assert zo.channel.uplink_access == "aircomp"
    assert type(deft_simulation("zeroth_order", zo, 0, FakeSeedTrainer(zo, 0))).__name__ == \
        "ZerothOrderAirCompSimulation"
    assert type(deft_simulation("split", variant_scenario(sc, "split"), 0, FakeSplitTrainer(sc, 0))) \
        is SplitFedSimulation
    with pytest.raises(ValueError, match="allowed"):
        deft_simulation("nope", sc, 0, FakeTrainer(sc, 0))


def test_variant_overrides_apply_to_its_own_training_only():
    sc = deft_scenario(split={"local_steps": 7, "learning_rate": 0.05}, zeroth_order={"local_steps": 40})
    assert variant_scenario(sc, "split").training.local_steps == 7
    assert variant_scenario(sc, "split").training.learning_rate == 0.05
    assert variant_scenario(sc, "zeroth_order").training.local_steps == 40
    assert variant_scenario(sc, "lora").training.local_steps == 3
    assert variant_scenario(sc, "emulator").training.local_steps == 3


def test_zeroth_order_over_the_air_aggregates_and_replays_each_round():
    sc = variant_scenario(deft_scenario(devices=[{"count": 4, "compute_flops_per_s": 1e12}],
                                        training={"rounds": 3, "local_steps": 2},
                                        zeroth_order={"candidate_seeds": 64, "uplink_access": "aircomp"},
                                        fake={"adapter_bytes": 256}), "zeroth_order")
    sim = deft_simulation("zeroth_order", sc, 0, FakeSeedTrainer(sc, 0))
    out = sim.run()
    ev = sim.recorder.to_frame()
    assert out.rounds_completed == 3 and sim.counters["server_steps"] == 3
    up = ev[ev.kind == "uplink"]
    assert len(up) == 12 and (up.bytes == 256).all()
    # one over-the-air slot per round: every device's uplink of a round starts and ends together
    assert up.groupby("round").t_s.nunique().eq(1).all()
    assert len(ev[(ev.kind == "replay") & (ev.node == "edge0")]) == 3
