"""The prompt_service protocol (netsim/protocols/prompt_service.py) with a torch-free,
deterministic stand-in tuner (tests/netsim/fake_service_tuner.py), against values computed by
hand from the models: upload times from the Shannon rate B log2(1 + SNR), compute times from
FLOPs / slot speed, accuracies from the fake's closed form (a state with test skill k gets
floor(k) of the N test examples right), Hedge weights exp(-eta L_j) / sum_i exp(-eta L_i),
FCFS list scheduling, the admission estimate, the library's growth rule and the section's
validation errors.

Tolerances: durations and times are sums of a few floating-point terms computed in another
order than the protocol's, so they agree to a few ulps per term (relative 1e-12 is loose by
three orders of magnitude); counts, bytes, accuracies and choices are compared exactly.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from pydantic import ValidationError

from fake_service_tuner import (FORWARD_FLOPS_PER_TOKEN, MAX_TOKENS, STEP_FLOPS_PER_TOKEN, FakeServiceTuner,
                                lengths_tokens, make_state)
from netsim.network import Network, child_rng
from netsim.protocols.prompt_service import (LibraryEntry, PromptServiceSimulation, PromptServiceSpec, SeedLibrary,
                                             build_seed_library)
from netsim.records import COLUMNS
from netsim.scenario import Scenario

TASKS = ["fake/a", "fake/b", "fake/c"]
N_TEST = 100
REL = 1e-12


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


BASE = {
    "name": "ps",
    "experiment": "prompt_service",
    "devices": [{"name": "low", "count": 1, "tx_power_w": 0.2}, {"name": "high", "count": 2, "tx_power_w": 0.5}],
    "edge_servers": [{"compute_flops_per_s": 1e12}],
    # one coherence block covers every transfer: a constant-rate upload is size / rate in one division
    "channel": {"fading": "none", "rate_mode": "shannon", "coherence_time_s": 1e5, "uplink_bandwidth_hz": 1e6},
    "training": {"batch_size": 8},
    "prompt_service": {
        "variants": ["scratch", "best_single", "oracle", "ensemble"],
        "serve_with": "scratch",
        "user_classes": [{"name": "u", "rate_per_s": 0.05, "tasks": ["fake/a"], "target_accuracy": 0.99}],
        "horizon_s": 1e6,
        "max_requests": 3,
        "examples_per_request": 32,
        "max_steps": 6,
        "eval_every_steps": 5,
        "library": {"tasks": ["fake/b", "fake/c"], "steps": 5, "examples": 20},
        "ensemble": {"learner": "hedge", "loss": "zero_one", "probe_examples": 16},
    },
}


def scenario(**over) -> Scenario:
    return Scenario.model_validate(_merge(BASE, over))


def service(**ps) -> Scenario:
    """BASE with prompt_service fields overridden."""
    return scenario(prompt_service=ps)


def tuner(**kw) -> FakeServiceTuner:
    return FakeServiceTuner(TASKS, n_test=N_TEST, **kw)


def library(*states_and_tasks) -> SeedLibrary:
    """A seed library of (task, state) pairs, entry ids 0, 1, ..."""
    entries = [LibraryEntry(k, task, "seed", state) for k, (task, state) in enumerate(states_and_tasks)]
    return SeedLibrary(entries, steps=0, flops=0.0, accuracies={})


def default_library() -> SeedLibrary:
    return library(("fake/b", make_state(TASKS, {"fake/a": 60})), ("fake/c", make_state(TASKS, {"fake/a": 40})))


def run(sc: Scenario, variant: str, lib: SeedLibrary | None = None, fake: FakeServiceTuner | None = None,
        seed: int = 0) -> tuple[PromptServiceSimulation, FakeServiceTuner]:
    fake = fake or tuner()
    sim = PromptServiceSimulation(sc, seed, fake, variant, lib or default_library())
    sim.run()
    return sim, fake


def events(sim: PromptServiceSimulation, kind: str, request_id: int | None = None, group: str | None = None) -> list:
    rows = [dict(zip(COLUMNS, r)) for r in sim.recorder.rows]
    return [r for r in rows if r["kind"] == kind and (request_id is None or r["round"] == request_id)
            and (group is None or r["group"] == group)]


def request_batches(fake: FakeServiceTuner, sc: Scenario, request_id: int, task: str, seed: int = 0) -> list:
    """The request's examples, drawn as documented (child_rng(seed, 42, i)), in batches."""
    n, b = sc.prompt_service.examples_per_request, sc.training.batch_size
    examples = fake.draw_examples(task, n, child_rng(seed, 42, request_id))
    return [examples[i:i + b] for i in range(0, n, b)]


def hand_step_flops(batch) -> float:
    return STEP_FLOPS_PER_TOKEN * float(lengths_tokens(batch).sum())


def hand_forward_flops(batch) -> float:
    return FORWARD_FLOPS_PER_TOKEN * float(lengths_tokens(batch).sum())


def served_records(sim):
    return [r for r in sim.edge.records if r.outcome == "admitted"]


# ------------------------------------------------------------------------------------------------
# 1. uploads
# ------------------------------------------------------------------------------------------------

def test_uploads_follow_the_shannon_rate_back_to_back_from_arrival():
    sc = scenario(edge_servers=[{"compute_flops_per_s": 1e15}],
                  prompt_service={"variants": ["scratch"], "slots": 2, "max_requests": 4})
    sim, fake = run(sc, "scratch")
    bandwidth = 1e6 / 2                       # upload_bandwidth_hz null: channel.uplink_bandwidth_hz / slots
    network = Network(sc, sc.network_seed(0))
    owners = set()
    for record in sim.edge.records:
        request = record.request
        owners.add(request.owner_device)
        device = network.devices[request.owner_device]
        rate_bps = bandwidth * math.log2(1.0 + device.uplink.snr(0, bandwidth))
        batches = request_batches(fake, sc, request.request_id, request.task)
        sizes = [2 * int(lengths_tokens(b).sum()) + len(b) for b in batches]
        durations = [8 * s / rate_bps for s in sizes]
        ready = request.arrival_s + np.cumsum(durations)
        ups = events(sim, "upload", request.request_id)
        assert [u["bytes"] for u in ups] == sizes
        assert [u["node"] for u in ups] == [f"dev{request.owner_device}"] * len(batches)
        assert all(u["peer"] == "edge0" for u in ups)
        for j, u in enumerate(ups):
            start = request.arrival_s if j == 0 else ready[j - 1]
            assert u["t_s"] == pytest.approx(start, rel=REL)
            assert u["duration_s"] == pytest.approx(durations[j], rel=REL)
            assert u["energy_j"] == pytest.approx(device.group.tx_power_w * durations[j], rel=REL)
        served = record.result
        assert served.upload_bytes == sum(sizes)
        assert served.uploads_done_s == pytest.approx(ready[-1], rel=REL)
        # the slot is far faster than the uplink: tuning step k < m starts when batch k is at the edge
        steps = events(sim, "compute", request.request_id, "tune_step")
        assert max(s["duration_s"] for s in steps) < min(durations)
        for k in range(len(batches)):
            assert steps[k]["t_s"] == pytest.approx(max(ready[k], record.start_s), rel=REL)
    # both groups' transmit powers are exercised
    assert {network.devices[o].group.name for o in owners} == {"low", "high"}


def test_upload_bandwidth_setting_overrides_the_share():
    sc = service(variants=["scratch"], slots=2, max_requests=1, upload_bandwidth_hz=2e5)
    sim, fake = run(sc, "scratch")
    request = sim.edge.records[0].request
    device = Network(sc, sc.network_seed(0)).devices[request.owner_device]
    rate_bps = 2e5 * math.log2(1.0 + device.uplink.snr(0, 2e5))
    first = request_batches(fake, sc, 0, request.task)[0]
    assert events(sim, "upload", 0)[0]["duration_s"] == pytest.approx(
        8 * (2 * int(lengths_tokens(first).sum()) + 8) / rate_bps, rel=REL)


# ------------------------------------------------------------------------------------------------
# 2. compute timing
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("slot_flops", [None, 3e9])
def test_compute_events_last_flops_over_slot_speed_and_service_is_their_sum_plus_upload_waits(slot_flops):
    sc = scenario(edge_servers=[{"compute_flops_per_s": 2e10}],
                  prompt_service={"variants": ["scratch"], "slots": 2, "max_requests": 5,
                                  "slot_flops_per_s": slot_flops,
                                  "user_classes": [{"name": "u", "rate_per_s": 20.0, "tasks": ["fake/a"],
                                                    "target_accuracy": 0.99}]})
    speed = 1e10 if slot_flops is None else slot_flops       # null: edge compute_flops_per_s / slots
    sim, fake = run(sc, "scratch")
    no_upload_wait = 0
    for record in served_records(sim):
        rid = record.request.request_id
        batches = request_batches(fake, sc, rid, record.request.task)
        ready = [u["t_s"] + u["duration_s"] for u in events(sim, "upload", rid)]
        steps = events(sim, "compute", rid)
        assert [s["group"] for s in steps] == ["tune_step"] * 6
        assert all(s["node"] == "edge0" and s["server"] == f"slot{record.slot}" for s in steps)
        t = record.start_s
        for k, s in enumerate(steps):
            flops = hand_step_flops(batches[k % len(batches)])
            assert s["flops"] == flops
            assert s["duration_s"] == pytest.approx(flops / speed, rel=REL)
            t = max(t, ready[k % len(batches)]) + flops / speed
        assert record.end_s == pytest.approx(t, rel=REL)
        assert record.result.edge_flops == pytest.approx(sum(s["flops"] for s in steps), rel=REL)
        if ready[-1] <= record.start_s:      # waited in the queue while its examples went up
            no_upload_wait += 1
            assert record.service_s == pytest.approx(sum(s["duration_s"] for s in steps), rel=REL)
    assert no_upload_wait >= 1


@pytest.mark.parametrize("variant", ["best_single", "ensemble"])
def test_probe_forwards_cost_p_forward_passes_per_probe_batch(variant):
    sc = service(variants=[variant], serve_with=variant, max_requests=2, max_steps=3, slot_flops_per_s=5e11)
    lib = library(("fake/b", make_state(TASKS, {"fake/a": 60})), ("fake/c", make_state(TASKS, {"fake/a": 40})),
                  ("fake/b", make_state(TASKS, {"fake/a": 20})))
    sim, fake = run(sc, variant, lib)
    for record in served_records(sim):
        rid = record.request.request_id
        batches = request_batches(fake, sc, rid, record.request.task)
        forwards = events(sim, "compute", rid, "ensemble_forward")
        p = record.result.library_size          # 3 seed entries, then the served ones
        assert p == 3 + rid
        assert [f["flops"] for f in forwards] == [p * hand_forward_flops(batches[j]) for j in range(2)]
        for f in forwards:
            assert f["duration_s"] == pytest.approx(f["flops"] / 5e11, rel=REL)
        steps = events(sim, "compute", rid, "tune_step")
        # tuning continues with the batches after the probe: batch (2 + k) mod 4
        assert [s["flops"] for s in steps] == [hand_step_flops(batches[(2 + k) % 4]) for k in range(3)]


# ------------------------------------------------------------------------------------------------
# 3. the stopping rule and the measurement schedule
# ------------------------------------------------------------------------------------------------

def _curve(record):
    return [(m.examples_seen, m.accuracy, m.phase) for m in record.result.curve]


def test_stops_at_the_first_measurement_that_meets_the_target():
    # fresh skill 50, +3 per step: after k steps accuracy (50 + 3k) / 100; measured at 0, 5, 10
    sc = service(variants=["scratch"], max_requests=1, examples_per_request=64, max_steps=40,
                 user_classes=[{"name": "u", "tasks": ["fake/a"], "target_accuracy": 0.7}])
    sim, _ = run(sc, "scratch")
    record = sim.edge.records[0]
    served = record.result
    assert served.steps == 10
    assert _curve(record) == [(0, 0.50, "start"), (40, 0.65, "tune"), (64, 0.80, "tune")]
    steps = events(sim, "compute", 0, "tune_step")
    assert len(steps) == 10
    end_of_10th = steps[9]["t_s"] + steps[9]["duration_s"]
    assert served.reached_s == pytest.approx(end_of_10th, rel=REL)
    assert record.end_s == pytest.approx(end_of_10th, rel=REL)
    assert served.examples_to_target == 64
    evaluations = events(sim, "evaluate", 0)
    assert [e["accuracy"] for e in evaluations] == [0.50, 0.65, 0.80]
    assert evaluations[1]["t_s"] == pytest.approx(steps[4]["t_s"] + steps[4]["duration_s"], rel=REL)


def test_a_measurement_equal_to_the_target_stops():
    # after 4 steps the skill is 62: accuracy 0.62 and, with an even skill, both class recalls are
    # 31/50 too, so the balanced accuracy is 0.62 exactly as well
    sc = service(variants=["scratch"], max_requests=1, max_steps=40, eval_every_steps=2,
                 user_classes=[{"name": "u", "tasks": ["fake/a"], "target_accuracy": 0.62}])
    sim, _ = run(sc, "scratch")
    record = sim.edge.records[0]
    assert record.result.steps == 4
    assert [(m.accuracy, m.balanced_accuracy) for m in record.result.curve] == [(0.5, 0.5), (0.56, 0.56), (0.62, 0.62)]


def test_unreached_target_runs_max_steps_and_measures_at_the_end():
    sc = service(variants=["scratch"], max_requests=1, max_steps=12)
    sim, fake = run(sc, "scratch")
    served = sim.edge.records[0].result
    assert served.steps == 12 and served.reached_s is None and served.examples_to_target is None
    assert _curve(sim.edge.records[0]) == [(0, 0.50, "start"), (32, 0.65, "tune"), (32, 0.80, "tune"),
                                           (32, 0.86, "tune")]
    assert fake.steps_taken == 12


def test_max_steps_zero_measures_the_start_only():
    sc = service(variants=["scratch"], max_requests=2, max_steps=0)
    sim, fake = run(sc, "scratch")
    for record in sim.edge.records:
        assert _curve(record) == [(0, 0.50, "start")]
        assert record.result.steps == 0 and record.service_s == 0.0
    assert fake.steps_taken == 0 and events(sim, "compute") == []


# ------------------------------------------------------------------------------------------------
# 4. how each variant starts
# ------------------------------------------------------------------------------------------------

# E0 is the best on the test set but poor on the owners' examples, E1 the reverse
E0 = make_state(TASKS, {"fake/a": 80}, train_skill={"fake/a": 30})
E1 = make_state(TASKS, {"fake/a": 60}, train_skill={"fake/a": 90})
E2 = make_state(TASKS, {"fake/a": 40})
THREE = (("fake/b", E0), ("fake/c", E1), ("fake/b", E2))


def probe_mistakes(fake, sc, request_id, train_skills, batches=2):
    """Per-entry count of probe examples an entry gets wrong: (e mod N) >= floor(s_j)."""
    probe = np.concatenate(request_batches(fake, sc, request_id, "fake/a")[:batches])
    return np.array([np.sum(probe % N_TEST >= s) for s in train_skills])


def mixture_accuracy(weights, skills, confidence=0.7):
    """Test example i is right iff sum_j w_j (c if i < k_j else 1 - c) > 1/2."""
    i = np.arange(N_TEST)[:, None]
    p_right = np.where(i < np.asarray(skills)[None, :], confidence, 1 - confidence) @ np.asarray(weights)
    return float(np.mean(p_right > 0.5))


def test_oracle_starts_from_the_entry_with_the_best_test_accuracy():
    sc = service(variants=["oracle"], serve_with="oracle", max_requests=1, max_steps=5)
    sim, fake = run(sc, "oracle", library(*THREE))
    served = sim.edge.records[0].result
    assert served.init == "entry 0 (fake/b)"
    assert _curve(sim.edge.records[0]) == [(0, 0.80, "start"), (32, 0.95, "tune")]
    np.testing.assert_array_equal(fake.jobs[0].init, E0)
    assert events(sim, "compute", 0, "ensemble_forward") == []      # the oracle's choice costs nothing


def test_best_single_starts_from_the_entry_most_right_on_the_probe():
    sc = service(variants=["best_single"], serve_with="best_single", max_requests=1, max_steps=5)
    sim, fake = run(sc, "best_single", library(*THREE))
    correct = 16 - probe_mistakes(fake, sc, 0, [30, 90, 40])
    best = int(np.argmax(correct))
    assert best == 1 and correct[1] > max(correct[0], correct[2])   # the test's premise: E1, not the oracle's E0
    served = sim.edge.records[0].result
    assert served.init == "entry 1 (fake/c)"
    assert _curve(sim.edge.records[0]) == [(16, 0.60, "start"), (32, 0.75, "tune")]
    np.testing.assert_array_equal(fake.jobs[0].init, E1)
    batches = request_batches(fake, sc, 0, "fake/a")
    assert fake.jobs[0].batches == [tuple(int(e) for e in batches[(2 + k) % 4]) for k in range(5)]


def test_best_single_ties_go_to_the_older_entry():
    twin = E1.copy()
    sc = service(variants=["best_single"], serve_with="best_single", max_requests=1, max_steps=1)
    sim, fake = run(sc, "best_single", library(("fake/b", E2), ("fake/c", E1), ("fake/b", twin)))
    assert sim.edge.records[0].result.init == "entry 1 (fake/c)"


def test_oracle_ties_go_to_the_older_entry():
    sc = service(variants=["oracle"], serve_with="oracle", max_requests=1, max_steps=1)
    sim, _ = run(sc, "oracle", library(("fake/c", E1), ("fake/b", E1.copy())))
    assert sim.edge.records[0].result.init == "entry 0 (fake/c)"


def test_ensemble_starts_uniform_learns_hedge_weights_and_tunes_the_mixed_prompt():
    eta = 0.5
    sc = service(variants=["ensemble"], serve_with="ensemble", max_requests=1, max_steps=5)
    sim, fake = run(sc, "ensemble", library(*THREE), tuner(eta=eta))
    record = sim.edge.records[0]
    served = record.result
    skills = [80, 60, 40]
    after_one = np.exp(-eta * probe_mistakes(fake, sc, 0, [30, 90, 40], batches=1))
    after_one /= after_one.sum()
    final = np.exp(-eta * probe_mistakes(fake, sc, 0, [30, 90, 40], batches=2))
    final /= final.sum()
    mixed_skill = math.floor(float(final @ np.array(skills)))
    # uniform mixture of equal-confidence entries: right where most entries are, i < median skill = 60
    assert (served.curve[0].t_s, served.curve[0].accuracy, served.curve[0].phase) == (record.start_s, 0.60, "start")
    assert _curve(record) == [(0, 0.60, "start"), (8, mixture_accuracy(after_one, skills), "ensemble"),
                              (16, mixture_accuracy(final, skills), "ensemble"), (16, mixed_skill / 100, "tune"),
                              (32, min(100, mixed_skill + 15) / 100, "tune")]
    assert served.init == "mixed"
    np.testing.assert_allclose(served.weights, final, rtol=REL)
    np.testing.assert_allclose(fake.jobs[0].init, np.einsum("p,pij->ij", final, np.stack([E0, E1, E2])), rtol=REL)
    assert served.steps == 5


def test_ensemble_top_entry_init_tunes_the_heaviest_entry():
    sc = service(variants=["ensemble"], serve_with="ensemble", max_requests=1, max_steps=5,
                 ensemble={"init": "top_entry"})
    sim, fake = run(sc, "ensemble", library(*THREE), tuner(eta=0.5))
    mistakes = probe_mistakes(fake, sc, 0, [30, 90, 40])
    top = int(np.argmin(mistakes))        # largest exp(-eta L_j)
    assert top == 1
    served = sim.edge.records[0].result
    assert served.init == "entry 1 (fake/c)"
    np.testing.assert_array_equal(fake.jobs[0].init, E1)
    assert [(m.examples_seen, m.accuracy, m.phase) for m in served.curve][-2:] == [(16, 0.60, "tune"),
                                                                                    (32, 0.75, "tune")]


def test_ensemble_without_then_tune_never_steps():
    sc = service(variants=["ensemble"], serve_with="ensemble", max_requests=2, max_steps=6,
                 ensemble={"then_tune": False})
    sim, fake = run(sc, "ensemble", library(*THREE))
    for record in sim.edge.records:
        served = record.result
        assert served.steps == 0 and served.final_state is None
        assert [m.phase for m in served.curve] == ["start", "ensemble", "ensemble"]
        assert events(sim, "compute", record.request.request_id, "tune_step") == []
        assert len(served.weights) == 3
    assert fake.jobs == [] and len(sim.library) == 3          # nothing tuned, nothing added


def test_ensemble_that_meets_the_target_during_the_probe_stops_there():
    # E0 is right on the owners' examples and the test set; Hedge (eta 2) moves onto it after one batch
    lib = library(("fake/b", make_state(TASKS, {"fake/a": 80}, train_skill={"fake/a": 100})),
                  ("fake/c", make_state(TASKS, {"fake/a": 40}, train_skill={"fake/a": 0})),
                  ("fake/b", make_state(TASKS, {"fake/a": 45}, train_skill={"fake/a": 0})))
    sc = service(variants=["ensemble"], serve_with="ensemble", max_requests=1, max_steps=6,
                 user_classes=[{"name": "u", "tasks": ["fake/a"], "target_accuracy": 0.75}])
    sim, fake = run(sc, "ensemble", lib, tuner(eta=2.0))
    record = sim.edge.records[0]
    served = record.result
    w = np.exp(-2.0 * np.array([0, 8, 8]))
    w /= w.sum()
    assert _curve(record) == [(0, 0.45, "start"), (8, 0.80, "ensemble")]
    np.testing.assert_allclose(served.weights, w, rtol=REL)
    assert served.reached_s == record.end_s and served.steps == 0
    assert len(events(sim, "compute", 0, "ensemble_forward")) == 1


def test_ensemble_whose_uniform_mixture_meets_the_target_ends_at_once():
    sc = service(variants=["ensemble"], serve_with="ensemble", max_requests=1, max_steps=6,
                 user_classes=[{"name": "u", "tasks": ["fake/a"], "target_accuracy": 0.6}])
    sim, _ = run(sc, "ensemble", library(*THREE))
    record = sim.edge.records[0]
    assert record.result.curve[0].accuracy == 0.60 and record.result.reached_s == record.start_s
    assert events(sim, "compute", 0) == []
    assert record.service_s == 0.0


# ------------------------------------------------------------------------------------------------
# 5. the library grows with served requests
# ------------------------------------------------------------------------------------------------

def _queued(**ps):
    base = {"variants": ["scratch", "oracle"], "max_requests": 5, "max_steps": 2,
            "user_classes": [{"name": "u", "rate_per_s": 50.0, "tasks": ["fake/a"], "target_accuracy": 0.99}]}
    return service(**_merge(base, ps))


def test_every_served_request_that_stepped_adds_one_entry():
    sim, _ = run(_queued(), "scratch")
    records = sim.edge.records
    assert [r.result.library_size for r in records] == [2, 3, 4, 5, 6]
    assert [(e.entry_id, e.source, e.request_id) for e in sim.library] == [
        (0, "seed", -1), (1, "seed", -1), (2, "served", 0), (3, "served", 1), (4, "served", 2), (5, "served", 3),
        (6, "served", 4)]
    # a served entry is the request's final state: fresh 50 + 2 steps of 3 on its task
    assert all(e.task == "fake/a" and e.state[0, 0] == 56 for e in sim.library[2:])


def test_oracle_uses_what_earlier_requests_added():
    lib = library(("fake/b", make_state(TASKS, {"fake/a": 70})), ("fake/c", make_state(TASKS, {"fake/a": 40})))
    sim, _ = run(_queued(), "oracle", lib)
    inits = [r.result.init for r in sim.edge.records]
    assert inits == ["entry 0 (fake/b)", "entry 2 (fake/a)", "entry 3 (fake/a)", "entry 4 (fake/a)",
                     "entry 5 (fake/a)"]
    assert [r.result.curve[0].accuracy for r in sim.edge.records] == [0.70, 0.76, 0.82, 0.88, 0.94]


def test_max_entries_drops_the_oldest_served_entry_never_a_seed():
    sim, _ = run(_queued(library={"max_entries": 4}), "scratch")
    assert [r.result.library_size for r in sim.edge.records] == [2, 3, 4, 4, 4]
    assert [(e.entry_id, e.source, e.request_id) for e in sim.library] == [
        (0, "seed", -1), (1, "seed", -1), (5, "served", 3), (6, "served", 4)]


def test_max_entries_below_the_seed_count_keeps_the_seeds_only():
    sim, _ = run(_queued(library={"max_entries": 1}), "scratch")
    assert [r.result.library_size for r in sim.edge.records] == [2] * 5
    assert [e.entry_id for e in sim.library] == [0, 1]


def test_add_served_false_keeps_the_library_fixed():
    seed_lib = default_library()
    sim, _ = run(_queued(library={"add_served": False}), "scratch", seed_lib)
    assert [r.result.library_size for r in sim.edge.records] == [2] * 5
    assert sim.library == seed_lib.entries and len(seed_lib.entries) == 2


def test_a_request_served_without_steps_adds_nothing():
    # the oracle's start entry (skill 70) already meets target 0.6: no step, no entry
    lib = library(("fake/b", make_state(TASKS, {"fake/a": 70})), ("fake/c", make_state(TASKS, {"fake/a": 40})))
    sim, fake = run(_queued(user_classes=[{"name": "u", "rate_per_s": 50.0, "tasks": ["fake/a"],
                                           "target_accuracy": 0.6}]), "oracle", lib)
    assert [r.result.steps for r in sim.edge.records] == [0] * 5
    assert [r.result.library_size for r in sim.edge.records] == [2] * 5 and len(sim.library) == 2
    assert fake.jobs == []


def test_build_seed_library_tunes_each_task_from_the_fresh_state():
    sc = service()     # library: fake/b, fake/c, 5 steps on 20 examples, batches of 8
    fake = tuner()
    seed_lib = build_seed_library(fake, sc.prompt_service, 3, 8)
    assert [(e.entry_id, e.task, e.source) for e in seed_lib.entries] == [(0, "fake/b", "seed"), (1, "fake/c", "seed")]
    assert seed_lib.steps == 10 and seed_lib.accuracies == {"fake/b": 0.65, "fake/c": 0.65}
    flops = 0.0
    for k, task in enumerate(["fake/b", "fake/c"]):
        examples = fake.draw_examples(task, 20, child_rng(3, 44, k))
        batches = [examples[0:8], examples[8:16], examples[16:20]]
        order = [batches[s % 3] for s in range(5)]
        flops += sum(hand_step_flops(b) for b in order)
        assert fake.jobs[k].batches == [tuple(int(e) for e in b) for b in order]
        assert seed_lib.entries[k].state[0, TASKS.index(task)] == 65
        np.testing.assert_array_equal(fake.jobs[k].init, fake.fresh_state())
    assert seed_lib.flops == pytest.approx(flops, rel=REL)


# ------------------------------------------------------------------------------------------------
# 6. common random numbers and determinism
# ------------------------------------------------------------------------------------------------

def _crn_scenario():
    return service(max_requests=6, max_steps=3,
                   user_classes=[{"name": "u", "rate_per_s": 0.5, "tasks": ["fake/a", "fake/c"],
                                  "target_accuracy": 0.99}])


def test_every_variant_sees_the_same_arrivals_tasks_owners_and_examples():
    sc = _crn_scenario()
    seen = {}
    for variant in ("scratch", "best_single", "oracle", "ensemble"):
        sim, _ = run(sc, variant, library(*THREE))
        seen[variant] = [(r.request.request_id, r.request.arrival_s, r.request.task, r.request.owner_device,
                          r.result.upload_bytes) for r in sim.edge.records]
    assert len({repr(v) for v in seen.values()}) == 1
    # by hand: exponential gaps of mean 1 / rate from child_rng(0, 40, 0); the task, then the owner
    # (every device: owners null), from child_rng(0, 41, 0)
    gaps, attributes = child_rng(0, 40, 0), child_rng(0, 41, 0)
    t, expected = 0.0, []
    for i in range(6):
        t += float(gaps.exponential(1 / 0.5))
        task = ["fake/a", "fake/c"][int(attributes.integers(2))]
        owner = int(attributes.integers(3))
        expected.append((i, t, task, owner))
    got = [(i, a, task, owner) for i, a, task, owner, _ in seen["scratch"]]
    assert [(i, task, owner) for i, _, task, owner in got] == [(i, task, owner) for i, _, task, owner in expected]
    np.testing.assert_allclose([a for _, a, _, _ in got], [a for _, a, _, _ in expected], rtol=REL)
    assert len({task for _, _, task, _ in expected}) == 2 and len({o for *_, o in expected}) >= 2


@pytest.mark.parametrize("variant", ["scratch", "best_single", "oracle", "ensemble"])
def test_same_variant_twice_gives_identical_event_logs(variant):
    sc = _crn_scenario()
    first, _ = run(sc, variant, library(*THREE))
    second, _ = run(sc, variant, library(*THREE))
    assert repr(first.recorder.rows) == repr(second.recorder.rows)
    assert repr([r.result.curve for r in first.edge.records]) == repr([r.result.curve for r in second.edge.records])
    assert len(first.recorder.rows) > 20


def test_a_different_seed_changes_the_run():
    sc = _crn_scenario()
    a, _ = run(sc, "scratch", library(*THREE), seed=0)
    b, _ = run(sc, "scratch", library(*THREE), seed=1)
    assert repr(a.recorder.rows) != repr(b.recorder.rows)


# ------------------------------------------------------------------------------------------------
# 7. the queue through the protocol
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("slots", [1, 2])
def test_fcfs_list_scheduling(slots):
    sc = scenario(edge_servers=[{"compute_flops_per_s": 1e10 * slots}],
                  prompt_service={"variants": ["scratch"], "slots": slots, "max_requests": 6, "max_steps": 6,
                                  "user_classes": [{"name": "u", "rate_per_s": 100.0, "tasks": ["fake/a"],
                                                    "target_accuracy": 0.99}]})
    sim, _ = run(sc, "scratch")
    records = sim.edge.records
    free = [0.0] * slots                     # when each slot frees
    waited = 0
    for r in records:
        idle = [s for s in range(slots) if free[s] <= r.request.arrival_s]
        k = idle[0] if idle else int(np.argmin(free))      # the lowest idle slot, else the first to free
        start = max(r.request.arrival_s, free[k])
        assert r.start_s == start and r.slot == k
        free[k] = r.end_s
        waited += r.start_s > r.request.arrival_s
    assert waited >= 2


def _deadline_run(variant, deadline_s):
    sc = service(variants=[variant], serve_with=variant, max_requests=1, max_steps=40, admission="deadline_feasible",
                 user_classes=[{"name": "u", "tasks": ["fake/a"], "target_accuracy": 0.99,
                                "relative_deadline_s": deadline_s}])
    sim, _ = run(sc, variant, library(*THREE))
    return sim.edge.records[0]


# before any completion: 40 steps x worst step (6e6 FLOP/token x 8 tokens x 8 examples) / 1e12 FLOP/s
SCRATCH_ESTIMATE_S = 40 * STEP_FLOPS_PER_TOKEN * MAX_TOKENS * 8 / 1e12
# the probe adds P = 3 entries x 2 probe batches x a worst forward (2e6 x 8 x 8)
PROBE_ESTIMATE_S = 3 * 2 * FORWARD_FLOPS_PER_TOKEN * MAX_TOKENS * 8 / 1e12


@pytest.mark.parametrize("variant, deadline_s, outcome", [
    ("scratch", SCRATCH_ESTIMATE_S * (1 - 1e-6), "rejected"),
    ("scratch", SCRATCH_ESTIMATE_S * (1 + 1e-6), "admitted"),
    ("oracle", SCRATCH_ESTIMATE_S * (1 + 1e-6), "admitted"),
    ("ensemble", SCRATCH_ESTIMATE_S * (1 + 1e-6), "rejected"),
    ("best_single", SCRATCH_ESTIMATE_S + PROBE_ESTIMATE_S * (1 - 1e-4), "rejected"),
    ("best_single", SCRATCH_ESTIMATE_S + PROBE_ESTIMATE_S * (1 + 1e-4), "admitted"),
    ("ensemble", SCRATCH_ESTIMATE_S + PROBE_ESTIMATE_S * (1 + 1e-4), "admitted"),
])
def test_deadline_admission_uses_the_budget_before_any_completion(variant, deadline_s, outcome):
    record = _deadline_run(variant, deadline_s)
    assert record.outcome == outcome
    assert record.reason == ("deadline_infeasible" if outcome == "rejected" else "")
    assert (record.result is None) == (outcome == "rejected")


def test_after_completions_the_estimate_is_the_mean_observed_service():
    sc = _queued()
    sim, _ = run(sc, "scratch")
    services = [r.service_s for r in sim.edge.records]
    assert sim.estimate_service_s(sim.edge.records[0].request) == pytest.approx(np.mean(services), rel=REL)


def test_memory_admission_uses_the_tuners_job_memory():
    # job memory 1000 B x 8 + 10,000 = 18,000 B
    for memory, outcome in ((17_999, "rejected"), (18_000, "admitted")):
        sc = service(variants=["scratch"], max_requests=1, admission="memory_fits", slot_memory_bytes=memory)
        sim, _ = run(sc, "scratch")
        assert sim.edge.records[0].outcome == outcome
        assert sim.edge.records[0].request.memory_bytes == 18_000


# ------------------------------------------------------------------------------------------------
# 8. bad settings
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, words", [
    ({"prompt_service": {"user_classes": [{"rate_per_s": 0}]}}, ["user_classes.0.rate_per_s"]),
    ({"prompt_service": {"user_classes": [{"rate_per_s": -1.0}]}}, ["user_classes.0.rate_per_s"]),
    ({"prompt_service": {"user_classes": [{"relative_deadline_s": 0}]}}, ["user_classes.0.relative_deadline_s"]),
    ({"prompt_service": {"user_classes": [{"relative_deadline_s": -5.0}]}}, ["relative_deadline_s"]),
    ({"prompt_service": {"slots": 0}}, ["prompt_service.slots"]),
    ({"prompt_service": {"slots": 3, "capacity": 2}}, ["capacity=2", "slots=3"]),
    ({"prompt_service": {"variants": ["scratch", "oracle"], "serve_with": "ensemble"}}, ["serve_with", "variants"]),
    ({"prompt_service": {"variants": ["scratch", "scratch"]}}, ["variants", "repeats"]),
    ({"prompt_service": {"variants": ["scratch", "bogus"]}}, ["variants.1"]),
    ({"prompt_service": {"user_classes": [{"owners": [3]}]}}, ["owners", "[3]", "0..2"]),
    ({"edge_servers": [{"name": "e0"}, {"name": "e1"}]}, ["edge_servers has 2", "allowed: 1"]),
    ({"trainer": "fake"}, ["trainer: real", "'fake'"]),
    ({"prompt_service": {"user_classes": [{"tasks": ["NoSlash"]}]}}, ["user_classes.0.tasks.0"]),
    ({"prompt_service": {"ensemble": {"learner": "exponentiated_gradient", "loss": "balanced_error"}}},
     ["ensemble.loss='balanced_error'", "exponentiated_gradient"]),
])
def test_bad_settings_are_refused_naming_the_field(override, words):
    with pytest.raises(ValidationError) as info:       # (_merge replaces lists whole)
        Scenario.model_validate(_merge(BASE, override))
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)


def test_spec_alone_refuses_a_zero_rate_and_a_repeated_class_name():
    with pytest.raises(ValidationError, match="rate_per_s"):
        PromptServiceSpec.model_validate({"user_classes": [{"rate_per_s": 0.0}]})
    with pytest.raises(ValidationError, match="names"):
        PromptServiceSpec.model_validate({"user_classes": [{"name": "x"}, {"name": "x"}]})


def test_simulation_refuses_an_unknown_variant():
    with pytest.raises(ValueError, match="variant 'bogus'"):
        PromptServiceSimulation(service(), 0, tuner(), "bogus", default_library())
