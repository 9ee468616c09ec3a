"""Experiment ``federated_deft`` from the command line: bad settings exit 2 with a clear message
(``deftsim validate`` and ``deftsim run``, which fails before it creates the results folder), and
a tiny real run of all four variants (LoRA, emulator, split, zeroth-order) on the real model whose
summary, event log, figures, report and dry run hold the relations the protocols imply.

The tiny scenario: 2 devices, 2 rounds, 1 local step (zeroth-order: 2), batch 4, 16 tokens,
32 test examples: about 15 s of host time per run on one thread."""
import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cli_helpers import assert_exit_2, deftsim
from cli_helpers import sets as _sets

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ["lora", "emulator", "split", "zeroth_order"]
DEPTH = 6  # all-MiniLM-L6-v2's transformer blocks

TINY = {
    "name": "tiny_deft",
    "seed": 0,
    "experiment": "federated_deft",
    "trainer": "real",
    "devices": [{"name": "phone", "count": 2, "compute_flops_per_s": 1.0e12, "memory_bytes": 4.0e9,
                 "placement": {"min_distance_m": 20, "max_distance_m": 150}}],
    "edge_servers": [{"name": "edge0", "position_m": [0.0, 0.0], "compute_flops_per_s": 1.0e14}],
    "model": {"path": None, "max_length_tokens": 16},
    "peft": {"method": "lora", "rank": 4, "alpha": 8, "target_modules": ["query", "value"]},
    "data": {"dataset": "bbc_news", "max_test_examples": 32},
    "training": {"rounds": 2, "local_steps": 1, "batch_size": 4, "learning_rate": 2.0e-3, "devices_per_round": 2},
    "federated_deft": {"variants": VARIANTS, "target_accuracy": 0.3},
    "emulator": {"adapter_layers": 1, "emulator_layers": 2},
    "split": {"cut_layer": 1, "num_virtual_tokens": 4},
    "zeroth_order": {"candidate_seeds": 16, "local_steps": 2},
}
DEVICES = 2


def run_ok(out, *extra, scenario):
    res = deftsim("run", scenario, "--out", out, "--threads", 1, *extra, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    return res


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("deft_scenario") / "tiny_deft.yaml"
    path.write_text(yaml.safe_dump(TINY, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_file):
    out = tmp_path_factory.mktemp("deft_run") / "run"
    res = run_ok(out, scenario=tiny_file)   # not --quiet: the console table is printed
    return out, res


def _summary(out):
    return json.loads((out / "summary.json").read_text())


# --------------------------------------------------------------------------------------------
# bad settings
# --------------------------------------------------------------------------------------------
# name -> (--set assignments, fragments the message must contain)
BAD = {
    "emulator_layers_more_than_the_middle": (
        ["emulator.emulator_layers=5"],
        ["emulator.emulator_layers=5", f"{DEPTH} blocks", "4 middle blocks", "allowed: 1..4"]),
    "emulator_layers_more_than_a_2_block_middle": (
        ["emulator.adapter_layers=2", "emulator.emulator_layers=3"],
        ["emulator.emulator_layers=3", "2 middle blocks", "allowed: 1..2"]),
    "zero_adapter_layers": (
        ["emulator.adapter_layers=0"],
        ["emulator.adapter_layers", "0", "greater than or equal to 1"]),
    "adapter_layers_leave_no_middle": (
        ["emulator.adapter_layers=3"],
        ["emulator.adapter_layers=3", f"{DEPTH} blocks", "at most 2 adapter layers"]),
    "zero_candidate_seeds": (
        ["zeroth_order.candidate_seeds=0"],
        ["zeroth_order.candidate_seeds", "0", "greater than or equal to 1"]),
    "cut_below_the_last_block": (
        ["split.cut_layer=7"],
        ["split.cut_layer=7", f"{DEPTH} blocks", f"allowed: 0..{DEPTH}"]),
    "prompt_only_gradient_above_cut_0": (
        ["split.prompt_only_gradient=true"],
        ["split.prompt_only_gradient=true", "split.cut_layer=0", "got 1"]),
    "no_variants": (
        ["federated_deft.variants=[]"],
        ["federated_deft.variants", "[]", "at least 1 item"]),
    "duplicated_variant": (
        ["federated_deft.variants=[split,lora,split]"],
        ["federated_deft.variants=['split', 'lora', 'split']", "each variant at most once"]),
    "unknown_variant": (
        ["federated_deft.variants=[lora,offsite]"],
        ["federated_deft.variants.1", "'offsite'", "'lora'", "'emulator'", "'split'", "'zeroth_order'"]),
    "asynchronous_mode": (   # the experiment's own rule fires first, before asynchronous-needs-fedbuff
        ["training.mode=asynchronous"],
        ["experiment=federated_deft", "training.mode", "'synchronous'", "not 'asynchronous'"]),
    "asynchronous_mode_with_fedbuff": (
        ["training.mode=asynchronous", "strategies.aggregation.name=fedbuff"],
        ["experiment=federated_deft", "training.mode", "'synchronous'", "not 'asynchronous'"]),
    "aircomp_uplink": (
        ["channel.uplink_access=aircomp"],
        ["experiment=federated_deft", "channel.uplink_access", "'ofdma'", "zeroth_order.uplink_access"]),
    "aircomp_seeds_with_compression": (
        ["zeroth_order.uplink_access=aircomp", "strategies.compression.name=topk"],
        ["zeroth_order.uplink_access=aircomp", "strategies.compression.name", "'none'", "not 'topk'"]),
    "fake_trainer": (
        ["trainer=fake"],
        ["experiment=federated_deft", "trainer: real"]),
}


def check_exit_2(res, fragments):
    assert_exit_2(res, fragments, "tiny_deft.yaml")


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_setting_validate_exits_2(name, tiny_file):
    sets, fragments = BAD[name]
    check_exit_2(deftsim("validate", tiny_file, *_sets(sets), timeout=300), fragments)


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_setting_run_exits_2_before_training(name, tiny_file, tmp_path):
    """``deftsim run`` fails at loading: the results folder is never created, nothing trained."""
    sets, fragments = BAD[name]
    out = tmp_path / "out"
    check_exit_2(deftsim("run", tiny_file, "--out", out, "--quiet", *_sets(sets), timeout=300), fragments)
    assert not out.exists()


def test_depth_limits_are_inclusive(tiny_file):
    """The largest allowed emulator (every middle block kept), the deepest and the shallowest cut,
    and the prompt-only gradient at cut 0 are valid: the limits above are the model's, not lower."""
    for sets in (["emulator.emulator_layers=4"], ["emulator.adapter_layers=2", "emulator.emulator_layers=2"],
                 [f"split.cut_layer={DEPTH}"], ["split.cut_layer=0", "split.prompt_only_gradient=true"]):
        res = deftsim("validate", tiny_file, *_sets(sets), timeout=300)
        assert res.returncode == 0, (sets, res.stderr)
        assert "warning:" not in res.stderr, (sets, res.stderr)


def test_depth_checks_only_for_the_variants_run(tiny_file):
    """A variant section that is not run is not checked against the model, and is reported as
    a setting without effect."""
    res = deftsim("validate", tiny_file, "--set", "federated_deft.variants=[lora,zeroth_order]",
                  "--set", "emulator.emulator_layers=9", "--set", "split.cut_layer=7", timeout=300)
    assert res.returncode == 0, res.stderr
    assert "emulator=" in res.stderr and "'emulator' is not in federated_deft.variants" in res.stderr
    assert "split=" in res.stderr and "'split' is not in federated_deft.variants" in res.stderr
    assert "zeroth_order=" not in res.stderr


def test_shipped_scenario_validates_without_warnings():
    res = deftsim("validate", ROOT / "scenarios" / "federated_deft.yaml", timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ok: ") and "trainer=real" in res.stdout
    assert "warning" not in res.stderr.lower() and "Traceback" not in res.stderr


# --------------------------------------------------------------------------------------------
# dry run
# --------------------------------------------------------------------------------------------
def _planned(scenario: dict) -> tuple[int, int]:
    """Device steps and evaluations of each variant: rounds x devices per round x local steps,
    and one evaluation before round 1 and after every round (the variant's own overrides)."""
    steps = evaluations = 0
    for v in scenario["federated_deft"]["variants"]:
        section = scenario.get(v, {}) if v != "lora" else {}
        rounds = section.get("rounds", scenario["training"]["rounds"])
        local = section.get("local_steps", scenario["training"]["local_steps"])
        steps += rounds * scenario["training"]["devices_per_round"] * local
        evaluations += rounds + 1
    return steps, evaluations


@pytest.mark.parametrize("which", ["tiny", "shipped"])
def test_dry_run_prints_the_planned_work(which, tiny_file, tmp_path):
    path = tiny_file if which == "tiny" else ROOT / "scenarios" / "federated_deft.yaml"
    scenario = yaml.safe_load(path.read_text())
    res = deftsim("run", path, "--dry-run", timeout=300)
    assert res.returncode == 0, res.stderr
    steps, evaluations = _planned(scenario)
    assert "experiment federated_deft, trainer real" in res.stdout and "nothing was run" in res.stdout
    assert f"real device steps: at most {steps:,}" in res.stdout, res.stdout
    assert f"evaluations:       at most {evaluations:,}" in res.stdout, res.stdout
    for v in scenario["federated_deft"]["variants"]:
        assert f"{v}: " in res.stdout


# --------------------------------------------------------------------------------------------
# a tiny real run of the four variants
# --------------------------------------------------------------------------------------------
METRICS = ("final_accuracy", "time_to_target_accuracy_s", "uplink_bytes", "downlink_bytes",
           "device_flops_per_step", "peak_device_memory_bytes", "energy_per_device_j")


@pytest.mark.slow
def test_summary_has_every_variant_and_metric(tiny_run):
    out, res = tiny_run
    for name in ("events.parquet", "summary.json", "scenario.json", "topology.json", "accuracy_vs_time.png",
                 "costs.png"):
        assert (out / name).is_file(), name
    for png in ("accuracy_vs_time.png", "costs.png"):
        data = (out / png).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000, png
    s = _summary(out)
    assert s["experiment"] == "federated_deft" and s["variant_order"] == VARIANTS
    assert sorted(s["variants"]) == sorted(VARIANTS) and s["target_accuracy"] == 0.3
    for v in VARIANTS:
        m = s["variants"][v]
        for key in METRICS:
            assert key in m, (v, key)
        assert 0.0 <= m["final_accuracy"] <= 1.0
        assert m["rounds_completed"] == TINY["training"]["rounds"] and m["stop_reason"] == "round_limit"
        for key in ("uplink_bytes", "downlink_bytes", "device_flops_per_step", "peak_device_memory_bytes",
                    "energy_per_device_j"):
            assert m[key] > 0 and math.isfinite(m[key]), (v, key, m[key])
    # the console table: one row per variant
    table = [line.split() for line in res.stdout.splitlines()]
    for v in VARIANTS:
        assert any(row and row[0] == v for row in table), res.stdout


@pytest.mark.slow
def test_metrics_follow_from_the_event_log(tiny_run):
    """Bytes, energy, steps and time to target are those of the variant's own events."""
    out, _ = tiny_run
    s = _summary(out)
    ev = pd.read_parquet(out / "events.parquet")
    assert set(ev["variant"].unique()) == set(VARIANTS)
    for v in VARIANTS:
        m, e = s["variants"][v], ev[ev["variant"] == v]
        dev = e[e["node"].str.startswith("dev")]
        assert m["uplink_bytes"] == int(dev.loc[dev["kind"] == "uplink", "bytes"].sum())
        assert m["downlink_bytes"] == int(dev.loc[dev["kind"] == "downlink", "bytes"].sum())
        assert m["energy_per_device_j"] == pytest.approx(dev["energy_j"].sum() / DEVICES, rel=1e-9)
        assert m["device_steps"] == m["rounds_completed"] * DEVICES * m["local_steps"]
        flops = dev.loc[dev["kind"] == "compute", "flops"].sum()
        assert m["device_flops_per_step"] == pytest.approx(flops / m["device_steps"], rel=1e-12)
        evals = e[e["kind"] == "evaluate"]
        assert len(evals) == m["rounds_completed"] + 1
        assert m["final_accuracy"] == evals["accuracy"].iloc[-1]
        hit = evals[evals["accuracy"] >= s["target_accuracy"]]
        expected = None if hit.empty else float((hit["t_s"] + hit["duration_s"]).iloc[0])
        assert m["time_to_target_accuracy_s"] == expected
    assert s["variants"]["zeroth_order"]["local_steps"] == TINY["zeroth_order"]["local_steps"]


@pytest.mark.slow
def test_lora_bytes_are_the_adapter_both_ways(tiny_run):
    out, _ = tiny_run
    m = _summary(out)["variants"]["lora"]
    per_direction = m["rounds_completed"] * DEVICES * m["round_payload_bytes"]
    assert m["uplink_bytes"] == per_direction and m["downlink_bytes"] == per_direction


@pytest.mark.slow
def test_emulator_download_and_layers(tiny_run):
    """The emulator goes down once to each device, then only adapters move; it keeps the
    adapter blocks and a uniform pick of the middle (first and last kept); it costs the device
    fewer FLOPs per step than the whole model."""
    out, _ = tiny_run
    s = _summary(out)
    m, lora = s["variants"]["emulator"], s["variants"]["lora"]
    emu = m["emulator"]
    assert emu["kept_layers"] == [0, 1, 4, 5]   # 1 + (middle 1..4: keep 2 -> first and last) + 1
    assert 0 < emu["parameters"] < emu["full_parameters"]
    assert m["downlink_bytes"] >= DEVICES * emu["download_bytes"]
    assert m["downlink_bytes"] == (DEVICES * emu["download_bytes"]
                                   + m["rounds_completed"] * DEVICES * m["round_payload_bytes"])
    assert m["uplink_bytes"] == m["rounds_completed"] * DEVICES * m["round_payload_bytes"]
    assert m["round_payload_bytes"] < lora["round_payload_bytes"]   # adapters on 2 of 6 blocks (+ head)
    assert m["device_flops_per_step"] < lora["device_flops_per_step"]
    assert m["peak_device_memory_bytes"] < lora["peak_device_memory_bytes"]
    ev = pd.read_parquet(out / "events.parquet")
    e = ev[ev["variant"] == "emulator"]
    bc = e[e["kind"] == "emulator_broadcast"]
    assert len(bc) == 1 and int(bc["bytes"].iloc[0]) == emu["download_bytes"]
    first = e[(e["kind"] == "downlink") & (e["round"] == 0)]
    assert sorted(first["node"]) == ["dev0", "dev1"] and (first["bytes"] == emu["download_bytes"]).all()
    # no training before the emulator has arrived
    arrived = float((first["t_s"] + first["duration_s"]).max())
    assert e.loc[e["kind"] == "compute", "t_s"].min() >= arrived
    emu_evals = e[e["kind"] == "evaluate_emulator"]
    assert len(emu_evals) == m["rounds_completed"] + 1
    assert emu["final_emulator_accuracy"] == emu_evals["accuracy"].iloc[-1]
    assert "evaluate_emulator" not in set(ev.loc[ev["variant"] != "emulator", "kind"])


@pytest.mark.slow
def test_split_round_trips_and_device_memory(tiny_run):
    """Every local step is one request to the edge (an ``edge_wait`` on the device); the device
    holds the embeddings, one block and a prompt: less memory and FLOPs than the whole model."""
    out, _ = tiny_run
    s = _summary(out)
    m, lora = s["variants"]["split"], s["variants"]["lora"]
    assert m["peak_device_memory_bytes"] < lora["peak_device_memory_bytes"]
    assert m["device_flops_per_step"] < lora["device_flops_per_step"]
    assert m["split"]["cut_layer"] == TINY["split"]["cut_layer"]
    edge = m["split"]["edges"]["edge0"]
    ev = pd.read_parquet(out / "events.parquet")
    e = ev[ev["variant"] == "split"]
    waits, passes = e[e["kind"] == "edge_wait"], e[e["kind"] == "edge_compute"]
    assert len(waits) == m["device_steps"] == edge["requests"]
    assert len(passes) == edge["passes"] and 1 <= edge["passes"] <= edge["requests"]
    assert edge["mean_batch_size"] == pytest.approx(edge["requests"] / edge["passes"])
    assert 0 < edge["utilisation"] <= 1 and edge["mean_queue_delay_s"] >= 0
    assert edge["flops"] == pytest.approx(passes["flops"].sum(), rel=1e-12)
    assert set(waits["node"]) == {"dev0", "dev1"} and set(passes["node"]) == {"edge0"}
    for kind in ("edge_wait", "edge_compute"):
        assert kind not in set(ev.loc[ev["variant"] != "split", "kind"])


@pytest.mark.slow
def test_zeroth_order_seed_payloads(tiny_run):
    """FedKSeed: the K candidate seeds go down once; a round moves K float32 scalars (4 K bytes)
    each way; replays rebuild the model; memory is that of inference (below LoRA's backprop)."""
    out, _ = tiny_run
    s = _summary(out)
    m, lora = s["variants"]["zeroth_order"], s["variants"]["lora"]
    k = TINY["zeroth_order"]["candidate_seeds"]
    assert m["zeroth_order"]["candidate_seeds"] == k and m["zeroth_order"]["uplink_access"] == "ofdma"
    assert m["zeroth_order"]["payload_bytes_per_round"] == 4 * k == m["round_payload_bytes"]
    ev = pd.read_parquet(out / "events.parquet")
    e = ev[ev["variant"] == "zeroth_order"]
    sb = e[e["kind"] == "seed_broadcast"]
    assert len(sb) == 1 and int(sb["bytes"].iloc[0]) == 4 * k
    up = e[e["kind"] == "uplink"]
    assert len(up) == m["rounds_completed"] * DEVICES and (up["bytes"] == 4 * k).all()
    assert m["uplink_bytes"] == m["rounds_completed"] * DEVICES * 4 * k
    assert m["downlink_bytes"] <= (1 + m["rounds_completed"]) * DEVICES * 4 * k
    assert m["uplink_bytes"] < lora["uplink_bytes"] / 100
    replays = e[e["kind"] == "replay"]
    assert len(replays) and (replays["flops"] > 0).all()
    assert "edge0" in set(replays["node"])   # the edge replays each aggregated pool
    assert m["peak_device_memory_bytes"] < lora["peak_device_memory_bytes"]
    assert m["device_steps"] == m["rounds_completed"] * DEVICES * TINY["zeroth_order"]["local_steps"]
    for kind in ("seed_broadcast", "replay"):
        assert kind not in set(ev.loc[ev["variant"] != "zeroth_order", "kind"])


@pytest.mark.slow
def test_report_draws_the_comparison(tiny_run, tmp_path):
    out, _ = tiny_run
    s = _summary(out)
    rep = tmp_path / "rep"
    res = deftsim("report", out, "--out", rep, "--target", s["target_accuracy"], timeout=300)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    page = (rep / "report.html").read_text()
    assert "federated_deft" in page and "Metrics per variant" in page
    assert f"target accuracy <b>{s['target_accuracy']:g}</b>" in page
    for png in ("variants.png", "variant_accuracy_vs_time.png"):
        data = (rep / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, png
    table = pd.read_parquet(rep / "variants.parquet").set_index("variant")
    assert list(table.index) == VARIANTS
    for v in VARIANTS:
        m = s["variants"][v]
        for key in ("final_accuracy", "uplink_bytes", "downlink_bytes", "device_flops_per_step",
                    "peak_device_memory_bytes", "energy_per_device_j"):
            assert table.loc[v, key] == m[key], (v, key)
        t = m["time_to_target_accuracy_s"]
        if t is None:
            assert math.isnan(table.loc[v, "time_to_target_s"])
        else:
            assert table.loc[v, "time_to_target_s"] == pytest.approx(t, rel=1e-12)
    split = s["variants"]["split"]["split"]["edges"]["edge0"]
    assert table.loc["split", "edge_utilisation"] == split["utilisation"]
    assert math.isnan(table.loc["lora", "edge_utilisation"])


@pytest.mark.slow
def test_report_default_target_is_the_runs_target(tiny_run, tmp_path):
    """Without --target, the report's time to target is the summary's: it uses the target the
    run reported (here set to an accuracy the LoRA variant reached)."""
    out, _ = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    s = _summary(copy)
    reached = s["variants"]["lora"]["best_accuracy"]
    ev = pd.read_parquet(copy / "events.parquet")
    s["target_accuracy"] = reached
    for v in VARIANTS:
        evals = ev[(ev["variant"] == v) & (ev["kind"] == "evaluate")]
        hit = evals[evals["accuracy"] >= reached]
        s["variants"][v]["time_to_target_accuracy_s"] = (None if hit.empty
                                                         else float((hit["t_s"] + hit["duration_s"]).iloc[0]))
    (copy / "summary.json").write_text(json.dumps(s))
    resolved = json.loads((copy / "scenario.json").read_text())
    resolved["scenario"]["federated_deft"]["target_accuracy"] = reached
    (copy / "scenario.json").write_text(json.dumps(resolved))
    res = deftsim("report", copy, "--out", tmp_path / "rep", timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"target accuracy <b>{reached:g}</b>" in (tmp_path / "rep" / "report.html").read_text()


@pytest.mark.slow
def test_same_seed_identical(tiny_run, tiny_file, tmp_path):
    out, _ = tiny_run
    again = tmp_path / "again"
    run_ok(again, "--quiet", scenario=tiny_file)
    assert (again / "summary.json").read_bytes() == (out / "summary.json").read_bytes()
    assert (again / "events.parquet").read_bytes() == (out / "events.parquet").read_bytes()


@pytest.mark.slow
def test_a_variant_does_not_depend_on_the_others(tiny_run, tiny_file, tmp_path):
    """Every variant starts from the same seed: the split variant alone gives the same metrics
    and events as inside the four-variant run."""
    out, _ = tiny_run
    alone = tmp_path / "split"
    run_ok(alone, "--quiet", "--set", "federated_deft.variants=[split]", scenario=tiny_file)
    s = _summary(alone)
    assert s["variant_order"] == ["split"]
    assert s["variants"]["split"] == _summary(out)["variants"]["split"]
    ev_all = pd.read_parquet(out / "events.parquet")
    ev_alone = pd.read_parquet(alone / "events.parquet")
    pd.testing.assert_frame_equal(ev_all[ev_all["variant"] == "split"].reset_index(drop=True), ev_alone)
