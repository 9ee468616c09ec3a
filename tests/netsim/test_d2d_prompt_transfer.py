"""The d2d_prompt_transfer protocol (netsim/protocols/d2d_prompt_transfer.py) with the torch-free,
deterministic stand-in tuner (tests/netsim/fake_service_tuner.py), against values computed by
hand: zones from polar angles, the locality law of the sources' tasks, sidelink hop times
bits / (B log2(1 + SNR)) with fading off, store-and-forward multi-hop times as sums of hops,
one message at a time per radio, the choice rules of every variant, compute time = FLOPs /
device speed, energies P T, and the section's validation errors.

The fake tuner: a state's test skill k_t on task t gives accuracy floor(k_t) / 100 (and the same
balanced accuracy); a step on t raises k_t by 3; a fresh state has k = 50 on every task; its
task embedding is 1 + (k - 50) per task. Tolerances: durations are a division or a short sum
computed in another order than the protocol's (relative 1e-12); counts, choices and accuracies
are exact.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from pydantic import ValidationError

from fake_service_tuner import STEP_FLOPS_PER_TOKEN, FakeServiceTuner, lengths_tokens
from netsim.network import Network, child_rng
from netsim.protocols.d2d_prompt_transfer import (D2DTransferSimulation, SourcePrompts, TargetResult, assign_tasks,
                                                  build_source_prompts, zone_index)
from netsim.scenario import Scenario
from netsim.sidelink import route, sidelink, transfer

TASKS = ["fake/a", "fake/b", "fake/c", "fake/d"]
REL = 1e-12
SPEED = 1e9   # device FLOP/s


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


BASE = {
    "name": "d2d",
    "experiment": "d2d_prompt_transfer",
    "devices": [{"name": "phones", "count": 12, "tx_power_w": 0.2, "rx_power_w": 0.1, "compute_power_w": 2.0,
                 "compute_flops_per_s": SPEED, "placement": {"min_distance_m": 20.0, "max_distance_m": 150.0}}],
    # one coherence block covers every transfer: a hop is size / rate in one division
    "channel": {"fading": "none", "rate_mode": "shannon", "coherence_time_s": 1e5},
    "d2d": {"kind": "knn", "k": 3, "bandwidth_hz": 1e6},
    "training": {"batch_size": 8},
    "d2d_prompt_transfer": {"tasks": TASKS, "locality": 1.0, "targets": 3, "source_steps": 20,
                            "source_examples": 40, "examples_per_device": 32, "warmup_steps": 2, "max_steps": 12,
                            "eval_every_steps": 2, "target_accuracy": 0.8, "target_metric": "accuracy",
                            "max_hops": 2, "cost_weight_per_s": 0.0, "embedding": "prompt"},
}


def scenario(**over) -> Scenario:
    return Scenario.model_validate(_merge(BASE, over))


def spec_over(**d2d) -> Scenario:
    return scenario(d2d_prompt_transfer=d2d)


def run(sc: Scenario, variant: str, seed: int = 0, tuner=None, sources=None):
    tuner = tuner or FakeServiceTuner(TASKS)
    sources = sources or build_source_prompts(tuner, sc.d2d_prompt_transfer, seed, sc.training.batch_size)
    sim = D2DTransferSimulation(sc, seed, tuner, variant, sources)
    sim.run()
    return sim


def events(sim, kind: str, group: str | None = None):
    frame = sim.recorder.to_frame()
    frame = frame[frame["kind"] == kind]
    return frame if group is None else frame[frame["group"] == group]


def hop_rate_bps(graph, a, b, bandwidth_hz: float) -> float:
    return bandwidth_hz * math.log2(1.0 + 10.0 ** (sidelink(graph, a, b).mean_snr_db(bandwidth_hz) / 10.0))


# ------------------------------------------------------------------------------------------------
# who holds what
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("position, zones, expected", [
    ((1.0, 0.0), 4, 0), ((0.0, 1.0), 4, 1), ((-1.0, 0.0), 4, 2), ((0.0, -1.0), 4, 3), ((1.0, -1e-9), 4, 3),
    ((1.0, 1.0), 4, 0), ((-1.0, 1.0), 4, 1), ((1.0, 1.0), 8, 1), ((5.0, 5.0), 1, 0), ((0.0, 0.0), 3, 0)])
def test_zone_is_the_angular_sector(position, zones, expected):
    assert zone_index(position, (0.0, 0.0), zones) == expected


def test_zone_is_about_the_server():
    assert zone_index((10.0, 11.0), (10.0, 10.0), 4) == 1
    assert zone_index((9.0, 10.0), (10.0, 10.0), 4) == 2


def test_locality_one_gives_every_source_its_zone_task_and_targets_their_zone_task():
    sc = scenario()
    net = Network(sc, 0)
    a = assign_tasks(net, sc.d2d_prompt_transfer, 0)
    assert len(a.targets) == 3 and list(a.targets) == sorted(a.targets)
    assert set(a.source_task) == set(range(12)) - set(a.targets)
    for d, task in a.source_task.items():
        assert task == TASKS[zone_index(net.devices[d].position_m, (0.0, 0.0), 4)] == TASKS[a.zone[d]]
    for k in a.targets:
        assert a.target_task[k] == TASKS[a.zone[k]]


def test_locality_law_of_the_sources_tasks():
    """P(zone task) = rho + (1 - rho) / Z; the other tasks (1 - rho) / Z each; 5 sigma."""
    rho, n = 0.3, 4000
    sc = scenario(experiment="fedavg", devices=[{"count": n}], d2d={"kind": "none"},   # no graph needed here
                  d2d_prompt_transfer={"locality": rho, "targets": 1})
    a = assign_tasks(Network(sc, 1), sc.d2d_prompt_transfer, 1)
    sources = len(a.source_task)
    own = sum(task == TASKS[a.zone[d]] for d, task in a.source_task.items())
    p = rho + (1 - rho) / 4
    assert abs(own - sources * p) < 5 * math.sqrt(sources * p * (1 - p))
    other = sum(task == TASKS[(a.zone[d] + 1) % 4] for d, task in a.source_task.items())
    q = (1 - rho) / 4
    assert abs(other - sources * q) < 5 * math.sqrt(sources * q * (1 - q))


def test_target_tasks_are_drawn_from_the_list():
    sc = spec_over(target_tasks=["fake/d"], targets=5)
    a = assign_tasks(Network(sc, 0), sc.d2d_prompt_transfer, 0)
    assert set(a.target_task.values()) == {"fake/d"}


def test_source_prompts_are_tuned_per_task():
    tuner = FakeServiceTuner(TASKS)
    sources = build_source_prompts(tuner, scenario().d2d_prompt_transfer, 0, 8)
    assert sources.steps == 4 * 20
    for t, task in enumerate(TASKS):
        skills = sources.states[task][0]
        assert skills[t] == min(100, 50 + 3 * 20) and all(skills[u] == 50 for u in range(4) if u != t)
        assert sources.own_accuracy[task] == 1.0
    assert sources.metrics(tuner, "fake/a", "fake/a") == (1.0, 1.0)
    assert sources.metrics(tuner, "fake/a", "fake/b") == (0.5, 0.5)


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------

def test_scratch_tunes_from_the_fresh_prompt_and_sends_nothing():
    """k = 50 + 3 s >= 80 after s = 10 steps, measured at step 10 (every 2 steps)."""
    sim = run(scenario(), "scratch")
    assert events(sim, "d2d_transfer").empty
    for k, r in sim.results.items():
        assert r.init == "fresh" and r.steps == 10 and r.d2d_bytes == 0
        flops = 0.0
        examples = FakeServiceTuner(TASKS).draw_examples(r.task, 32, child_rng(0, 47, k))
        for s in range(10):
            batch = examples[8 * (s % 4): 8 * (s % 4) + 8]
            flops += STEP_FLOPS_PER_TOKEN * float(lengths_tokens(batch).sum())
        assert r.compute_flops == pytest.approx(flops, rel=REL)
        assert r.reached_s == pytest.approx(flops / SPEED, rel=REL)
        assert r.energy_to_target_j == pytest.approx(2.0 * flops / SPEED, rel=REL)
        assert [m.phase for m in r.curve] == ["fresh"] + ["tune"] * 5


def test_single_hop_fetch_is_bits_over_the_shannon_rate():
    sc = spec_over(max_hops=1)
    sim = run(sc, "best_link")
    prompts = events(sim, "d2d_transfer", "prompt")
    assert len(prompts) > 0
    for row in prompts.itertuples():
        a, b = int(row.node[3:]), int(row.peer[3:])
        rate = hop_rate_bps(sim.graph, a, b, 1e6)
        assert row.duration_s == pytest.approx(8 * 16_908 / rate, rel=REL)
        assert row.bytes == 16_908
        assert row.energy_j == pytest.approx((0.2 + 0.1) * row.duration_s, rel=REL)


def test_multi_hop_send_is_the_sum_of_its_hops_store_and_forward():
    """Along a two-hop path each hop starts when the previous one ended, and the message
    arrives where netsim.sidelink.transfer says when nothing else uses the radios."""
    sc = scenario()
    sim = D2DTransferSimulation(sc, 0, FakeServiceTuner(TASKS), "best_link",
                                build_source_prompts(FakeServiceTuner(TASKS), sc.d2d_prompt_transfer, 0, 8))
    a = 0
    b = min(sim.graph.adj[a])
    c = min(n for n in sim.graph.adj[b] if n != a and not sim.graph.has_edge(a, n))
    res = TargetResult(c, "fake/a", 0, "best_link")
    sim.env.process(sim._send(c, res, [a, b, c], 16_908, "prompt"))
    sim.env.run()
    hops = events(sim, "d2d_transfer", "prompt")
    assert list(hops["node"]) == ["dev0", f"dev{b}"] and list(hops["peer"]) == [f"dev{b}", f"dev{c}"]
    rates = [hop_rate_bps(sim.graph, a, b, 1e6), hop_rate_bps(sim.graph, b, c, 1e6)]
    assert list(hops["duration_s"]) == pytest.approx([8 * 16_908 / r for r in rates], rel=REL)
    assert hops["t_s"].iloc[1] == hops["t_s"].iloc[0] + hops["duration_s"].iloc[0]
    expected = transfer(sim.graph, [a, b, c], 8 * 16_908, 0.0, 1e6)
    assert sim.env.now == pytest.approx(expected.end_s, rel=REL)
    assert res.d2d_bytes == 2 * 16_908


def test_a_multi_hop_source_is_fetched_along_its_route():
    """With locality 0 and three hops some target's best source is beyond its neighbours; its
    fetch follows netsim.sidelink.route, hop after hop (a hop may wait for its sender's radio,
    busy with another target's messages)."""
    found = 0
    for seed in range(6):
        sim = run(spec_over(max_hops=3, locality=0.0, targets=4), "oracle", seed=seed)
        for r in sim.results.values():
            if r.source_hops is None or r.source_hops < 2:
                continue
            found += 1
            chosen = next(c for c in r.candidates if c.device == r.source_device)
            assert chosen.path == route(sim.graph, chosen.device, r.device, 8 * 16_908, 1e6, "expected_time")
            mine = events(sim, "d2d_transfer", "prompt")
            mine = mine[mine["round"] == r.device]
            assert list(mine["node"]) == [f"dev{n}" for n in chosen.path[:-1]]
            starts, ends = mine["t_s"].to_numpy(), (mine["t_s"] + mine["duration_s"]).to_numpy()
            assert starts[0] >= r.fetch_start_s and np.all(starts[1:] >= ends[:-1])   # waits for busy radios
            assert r.fetch_end_s == ends[-1]
    assert found > 0


def test_discovery_is_a_query_and_a_reply_per_candidate_before_the_fetch():
    sim = run(spec_over(max_hops=1), "random_neighbour")
    for k, r in sim.results.items():
        mine = sim.recorder.to_frame()
        mine = mine[(mine["kind"] == "d2d_transfer") & (mine["round"] == k)]
        q, e = mine[mine["group"] == "query"], mine[mine["group"] == "embedding"]
        assert len(q) == len(e) == len(r.candidates) > 0
        assert set(q["node"]) == {f"dev{k}"}
        assert set(e["peer"]) == {f"dev{k}"}
        assert (q["bytes"] == 64).all() and (e["bytes"] == 4 * 4).all()     # 4 values x 4 bytes
        assert r.discovery_end_s == pytest.approx(float((e["t_s"] + e["duration_s"]).max()), rel=REL)
        assert r.fetch_start_s == r.discovery_end_s
        assert r.d2d_bytes == int(mine["bytes"].sum())
        assert r.d2d_energy_j == pytest.approx(float(mine["energy_j"].sum()), rel=REL)


def test_a_radio_sends_one_message_at_a_time():
    """Every sender's d2d_transfer events never overlap (FIFO per radio)."""
    sim = run(spec_over(max_hops=2, targets=5), "similarity")
    frame = events(sim, "d2d_transfer")
    assert len(frame) > 10
    for node, rows in frame.groupby("node"):
        rows = rows.sort_values("t_s")
        ends = (rows["t_s"] + rows["duration_s"]).to_numpy()
        assert np.all(rows["t_s"].to_numpy()[1:] >= ends[:-1] * (1 - 1e-15)), node


# ------------------------------------------------------------------------------------------------
# choices
# ------------------------------------------------------------------------------------------------

def test_oracle_fetches_a_same_task_source_and_starts_at_target():
    sim = run(scenario(), "oracle")
    for r in sim.results.values():
        same = [c for c in r.candidates if c.task == r.task]
        if same:
            assert r.source_task == r.task
            assert r.start.accuracy == 1.0 and r.reached_s == r.fetch_end_s and r.steps == 0
            best = min(same, key=lambda c: (c.expected_fetch_s, c.device))
            assert r.source_device == best.device


def test_similarity_without_cost_picks_the_most_similar_and_with_cost_the_fastest():
    """cos(e_k, e_j) with e_k = 1 + 6 on the target's task after 2 warm-up steps, e_j = 1 + 60
    on the source's: a same-task source is the most similar. With a huge cost weight the score
    is the fetch time: the same choice as best_link."""
    sc = scenario()
    sim = run(sc, "similarity")
    for r in sim.results.values():
        own = np.ones(4)
        own[TASKS.index(r.task)] += 6
        for c in r.candidates:
            e = np.ones(4)
            e[TASKS.index(c.task)] += 50     # the skill is capped at the 100 test examples
            assert c.similarity == pytest.approx(own @ e / np.linalg.norm(own) / np.linalg.norm(e), rel=1e-12)
        top = max(c.similarity for c in r.candidates)
        chosen = next(c for c in r.candidates if c.device == r.source_device)
        assert chosen.similarity == top
        assert r.curve[1].phase == "warmup" and r.curve[1].steps == 2
    fast = run(spec_over(cost_weight_per_s=1e9), "similarity")
    link = run(scenario(), "best_link")
    assert {k: r.source_device for k, r in fast.results.items()} == {k: r.source_device
                                                                     for k, r in link.results.items()}


def test_text_centroid_needs_no_warm_up_and_costs_one_forward_pass():
    """The fake centroid of task t is 1 + 4 on t: the same-task source is the most similar;
    the target's embed compute lasts its forward FLOPs / speed, then it fetches."""
    sim = run(spec_over(embedding="text_centroid"), "similarity")
    tuner = FakeServiceTuner(TASKS)
    for k, r in sim.results.items():
        assert "warmup" not in [m.phase for m in r.curve]
        embed = events(sim, "compute", "embed")
        embed = embed[embed["round"] == k].iloc[0]
        examples = tuner.draw_examples(r.task, 32, child_rng(0, 47, k))
        assert embed["flops"] == tuner.forward_flops(r.task, examples)
        assert embed["duration_s"] == pytest.approx(embed["flops"] / SPEED, rel=REL)
        own = np.ones(4)
        own[TASKS.index(r.task)] += 4
        for c in r.candidates:
            e = np.ones(4)
            e[TASKS.index(c.task)] += 4
            assert c.similarity == pytest.approx(own @ e / (own @ own), rel=1e-12)
        if any(c.task == r.task for c in r.candidates):
            assert r.source_task == r.task
        assert r.fetch_start_s >= embed["duration_s"] and r.fetch_start_s >= r.discovery_end_s
    lib = run(spec_over(embedding="text_centroid"), "edge_library")
    assert all(r.source_task == r.task and r.steps == 0 for r in lib.results.values())


def test_random_neighbour_is_seeded_per_target():
    a, b = run(scenario(), "random_neighbour"), run(scenario(), "random_neighbour")
    assert {k: r.source_device for k, r in a.results.items()} == {k: r.source_device for k, r in b.results.items()}
    for k, r in a.results.items():
        expected = r.candidates[int(child_rng(0, 49, k).integers(len(r.candidates)))]
        assert r.source_device == expected.device


def test_edge_library_uploads_the_embedding_and_downloads_the_most_similar_entry():
    sc = scenario(channel={"uplink_bandwidth_hz": 2e6, "downlink_bandwidth_hz": 4e6})
    sim = run(sc, "edge_library")
    assert events(sim, "d2d_transfer").empty
    for k, r in sim.results.items():
        dev = sim.network.devices[k]
        assert r.source_task == r.task     # the warm-up points at the target's task
        up, down = events(sim, "uplink"), events(sim, "downlink")
        up, down = up[up["round"] == k].iloc[0], down[down["round"] == k].iloc[0]
        assert up["bytes"] == 16 and down["bytes"] == 16_908
        snr_up = 10 ** (dev.uplink.mean_snr_db(2e6) / 10)
        snr_down = 10 ** (dev.downlink.mean_snr_db(4e6) / 10)
        assert up["duration_s"] == pytest.approx(8 * 16 / (2e6 * math.log2(1 + snr_up)), rel=REL)
        assert down["duration_s"] == pytest.approx(8 * 16_908 / (4e6 * math.log2(1 + snr_down)), rel=REL)
        assert r.cellular_energy_j == pytest.approx(0.2 * up["duration_s"] + 0.1 * down["duration_s"], rel=REL)
        assert r.fetch_end_s == pytest.approx(up["t_s"] + up["duration_s"] + down["duration_s"], rel=REL)
        assert r.cellular_bytes == 16 + 16_908 and r.d2d_bytes == 0


def test_energy_to_target_is_what_was_spent_until_then():
    sim = run(scenario(), "similarity")
    for r in sim.results.values():
        assert r.energy_to_target_j == pytest.approx(r.compute_energy_j + r.d2d_energy_j, rel=REL)
        assert r.compute_energy_j == pytest.approx(2.0 * r.compute_flops / SPEED, rel=REL)


def test_an_isolated_target_falls_back_to_its_own_prompt():
    sc = spec_over(max_hops=1)
    sim = D2DTransferSimulation(sc, 0, FakeServiceTuner(TASKS), "similarity",
                                build_source_prompts(FakeServiceTuner(TASKS), sc.d2d_prompt_transfer, 0, 8))
    k = sim.assignment.targets[0]
    for j in list(sim.graph.adj[k]):
        sim.graph.remove_edge(k, j)
    sim.run()
    r = sim.results[k]
    assert r.candidates == [] and r.init == "warm-up (no source in reach)" and r.d2d_bytes == 0
    assert r.reached_s is not None and r.steps == 10


def test_same_seed_same_event_log():
    a, b = run(scenario(), "similarity"), run(scenario(), "similarity")
    assert a.recorder.to_frame().equals(b.recorder.to_frame())
    c = run(scenario(), "similarity", seed=1)
    assert not a.recorder.to_frame().equals(c.recorder.to_frame())


# ------------------------------------------------------------------------------------------------
# bad settings
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("over, words", [
    ({"d2d": {"kind": "none"}}, ["d2d.kind='none'"]),
    ({"d2d_prompt_transfer": {"targets": 12}}, ["d2d_prompt_transfer.targets=12", "1..11"]),
    ({"d2d_prompt_transfer": {"variants": ["scratch", "scratch"]}}, ["repeats a variant"]),
    ({"d2d_prompt_transfer": {"tasks": ["fake/a", "fake/a"]}}, ["repeats a task"]),
    ({"d2d_prompt_transfer": {"tasks": ["Not A Task"]}}, ["tasks"]),
    ({"d2d_prompt_transfer": {"locality": 1.5}}, ["locality"]),
    ({"d2d_prompt_transfer": {"max_hops": 0}}, ["max_hops"]),
    ({"d2d_prompt_transfer": {"cost_weight_per_s": -1.0}}, ["cost_weight_per_s"]),
    ({"d2d_prompt_transfer": {"variants": ["teleport"]}}, ["variants"]),
    ({"trainer": "fake"}, ["trainer: real"]),
])
def test_bad_settings_are_refused_naming_the_field(over, words):
    with pytest.raises(ValidationError) as err:
        scenario(**over)
    for word in words:
        assert word in str(err.value)


def test_a_graph_without_sidelinks_is_refused():
    sc = scenario(d2d={"kind": "distance", "threshold_m": 1e-3})
    tuner = FakeServiceTuner(TASKS)
    with pytest.raises(ValueError, match="no sidelink.*d2d.threshold_m"):
        D2DTransferSimulation(sc, 0, tuner, "similarity", SourcePrompts({}, {"x": np.ones(4)}, 0, 0.0, {}))


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="teleport"):
        D2DTransferSimulation(scenario(), 0, FakeServiceTuner(TASKS), "teleport",
                              SourcePrompts({}, {"x": np.ones(4)}, 0, 0.0, {}))
