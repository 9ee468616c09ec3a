"""Hostile and malformed input: every case exits 2 with a message naming the file or field,
in bounded time and memory, and never with a traceback. Fake trainer only (no torch)."""
import fcntl
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deftsim.config import MAX_EXPANDED_VALUES, MAX_NESTING_DEPTH, ScenarioError, load_scenario, parse_yaml
from deftsim.run_folder import MANIFEST_FILE, STAGING_PREFIX, RunFolder

TINY = {"name": "tiny", "trainer": "fake", "devices": [{"count": 4}], "d2d": {"kind": "none"},
        "training": {"rounds": 2, "local_steps": 2}}
MEMORY_LIMIT_BYTES = 3 * 2**30  # address space of the CLI process: far below what the hostile inputs used
TIME_LIMIT_S = 60               # generous for a loaded 2-core machine; the cases take ~1-2 s each


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))


def deftsim(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "deftsim", *map(str, args)], capture_output=True, text=True,
                          timeout=TIME_LIMIT_S, preexec_fn=_limit_memory, cwd=cwd)


def assert_refused(res, *fragments):
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr + res.stdout, res.stderr[-2000:]
    for fragment in fragments:
        assert fragment in res.stderr, (fragment, res.stderr[-2000:])


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def tiny_file(tmp_path, name="tiny.yaml", **changes):
    data = json.loads(json.dumps(TINY))
    data.update(changes)
    return write(tmp_path, name, yaml.safe_dump(data))


# ------------------------------------------------------------------------ YAML bombs
BILLION_LAUGHS = "\n".join(
    ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]) + "\n"


@pytest.mark.parametrize("text,fragment", [
    (BILLION_LAUGHS, "aliases"),
    ("a: &x [*x]\n", "recursive alias"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", f"nested deeper than {MAX_NESTING_DEPTH}"),
    ("a:\n" + "".join("  " * i + "b:\n" for i in range(1, 3000)), f"nested deeper than {MAX_NESTING_DEPTH}"),
    ("a: " + "{b: " * 4000 + "1" + "}" * 4000 + "\n", f"nested deeper than {MAX_NESTING_DEPTH}"),
    ("name: x\ntraining: {rounds: 3}\ntraining: {rounds: 5}\n", "duplicate key 'training'"),
    ("name: x\ntraining: {rounds: 3, rounds: 5}\n", "duplicate key 'rounds'"),
], ids=["billion_laughs", "recursive_alias", "deep_flow_lists", "deep_block_maps", "deep_flow_maps",
        "duplicate_section", "duplicate_field"])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_yaml_bombs_and_duplicates_exit_2(tmp_path, text, fragment, command):
    path = write(tmp_path, "hostile.yaml", text)
    extra = ["--out", tmp_path / "out"] if command == "run" else []
    assert_refused(deftsim(command, path, *extra), "hostile.yaml", fragment)


def test_yaml_limits_leave_sane_files_alone():
    # a large but sane document: 200,000 values with aliases, 60 levels deep
    text = "base: &b {x: 1, y: 2}\nitems: [" + ", ".join(["*b"] * 60_000) + "]\n"
    assert len(parse_yaml(text)["items"]) == 60_000
    deep = "a: " + "[" * (MAX_NESTING_DEPTH - 2) + "1" + "]" * (MAX_NESTING_DEPTH - 2)
    assert parse_yaml(deep)["a"]
    with pytest.raises(yaml.YAMLError, match="aliases"):
        parse_yaml("a: &a [" + ", ".join(["1"] * 1000) + "]\nb: [" + ", ".join(["*a"] * (MAX_EXPANDED_VALUES // 1000 + 1)) + "]")


def test_sweep_file_bombs_and_duplicates(tmp_path):
    tiny_file(tmp_path)
    bomb = write(tmp_path, "bomb_sweep.yaml", "scenario: tiny.yaml\n" + BILLION_LAUGHS)
    assert_refused(deftsim("sweep", bomb, "--dry-run"), "bomb_sweep.yaml", "aliases")
    dup = write(tmp_path, "dup_sweep.yaml", "scenario: tiny.yaml\nseeds: 2\nseeds: 3\n")
    assert_refused(deftsim("sweep", dup, "--dry-run"), "dup_sweep.yaml", "duplicate key 'seeds'")


# --------------------------------------------------------------- numbers: strict and finite
@pytest.mark.parametrize("override,fragments", [
    ("training.rounds=true", ["training.rounds", "valid integer"]),
    ("training.rounds=3.0", ["training.rounds", "valid integer"]),
    ("training.learning_rate=.inf", ["training.learning_rate", "finite number"]),
    ("training.learning_rate=yes", ["training.learning_rate", "valid number"]),
    ("devices.0.compute_flops_per_s=.inf", ["devices.0.compute_flops_per_s", "finite number"]),
    ("channel.uplink_bandwidth_hz=.nan", ["channel.uplink_bandwidth_hz", "finite number"]),
    ("channel.uplink_bandwidth_hz=1e308", ["channel.uplink_bandwidth_hz", "less than or equal to"]),
    ("channel.downlink_bandwidth_hz=1e-300", ["channel.downlink_bandwidth_hz", "greater than or equal to 1"]),
    ("channel.noise_psd_dbm_per_hz=.inf", ["channel.noise_psd_dbm_per_hz", "finite number"]),
    ("channel.noise_psd_dbm_per_hz=1e308", ["channel.noise_psd_dbm_per_hz", "less than or equal to 0"]),
    ("devices.0.tx_power_w=1e-300", ["devices.0.tx_power_w", "greater than or equal to"]),
    ("devices.0.tx_power_w=yes", ["devices.0.tx_power_w", "valid number"]),
    ("edge_servers.0.position_m=[.inf, 0]", ["edge_servers.0.position_m", "finite number"]),
    ("edge_servers.0.position_m=[1e308, 0]", ["edge_servers.0.position_m", "less than or equal to"]),
    ("devices.0.placement.max_distance_m=.nan", ["devices.0.placement.max_distance_m", "finite number"]),
    ("training.batch_size=1000000000", ["training.batch_size", "less than or equal to 65536"]),
    ("aircomp.num_subcarriers=1000000000", ["aircomp.num_subcarriers", "less than or equal to 1000000"]),
    ("execution.prune_last_block=maybe", ["execution.prune_last_block", "valid boolean"]),
    ("execution.prune_last_block=1", ["execution.prune_last_block", "valid boolean"]),
    ("seed=1e30", ["seed", "valid integer"]),
])
def test_non_finite_absurd_and_wrongly_typed_numbers(tmp_path, override, fragments):
    path = tiny_file(tmp_path)
    assert_refused(deftsim("validate", path, "--set", override), *fragments)


def test_bad_number_refused_by_run_before_any_work(tmp_path):
    path = tiny_file(tmp_path, channel={"uplink_bandwidth_hz": float("inf")})
    res = deftsim("run", path, "--out", tmp_path / "out", "--quiet")
    assert_refused(res, "channel.uplink_bandwidth_hz", "finite number")
    assert not (tmp_path / "out" / "summary.json").exists()


def test_infinite_snr_stays_allowed_and_json_is_strict(tmp_path):
    path = tiny_file(tmp_path, channel={"uplink_access": "aircomp"}, aircomp={"receive_snr_db": float("inf")})
    out = tmp_path / "out"
    res = deftsim("run", path, "--out", out, "--quiet")
    assert res.returncode == 0, res.stderr

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    for name in ("summary.json", "scenario.json", "timing.json", "topology.json"):
        json.loads((out / name).read_text(), parse_constant=no_constants)
    resolved = json.loads((out / "scenario.json").read_text())
    assert resolved["scenario"]["aircomp"]["receive_snr_db"] == "inf"
    from netsim.scenario import Scenario
    assert Scenario.model_validate(resolved["scenario"]).aircomp.receive_snr_db == float("inf")


# -------------------------------------------------------------------------- sweep sizes
@pytest.mark.parametrize("sweep,fragments", [
    ({"vary": {"grid": {f"fake.{f}": list(range(1, 11)) for f in
                        ("step_flops", "adapter_bytes", "examples_per_device", "learning_speed")}
               | {f"training.{f}": list(range(1, 11)) for f in ("rounds", "local_steps", "batch_size")}
               | {"peft.rank": list(range(1, 11)), "peft.alpha": list(range(1, 11))}}},
     ["1,000,000,000 runs", "at most 10,000"]),
    ({"seeds": 1_000_000_000}, ["1,000,000,000 seeds", "at most 10,000"]),
    ({"vary": {"random": {"samples": 100, "params": {"training.learning_rate": {"uniform": [0.001, float("inf")]}}}}},
     ["training.learning_rate", "finite bounds"]),
    ({"vary": {"random": {"samples": True, "params": {"training.learning_rate": {"uniform": [0.001, 0.01]}}}}},
     ["vary.random.samples", "valid integer"]),
])
def test_sweep_plans_are_sized_before_expanding(tmp_path, sweep, fragments):
    tiny_file(tmp_path)
    path = write(tmp_path, "big_sweep.yaml", yaml.safe_dump({"scenario": "tiny.yaml", **sweep}))
    assert_refused(deftsim("sweep", path, "--dry-run"), "big_sweep.yaml", *fragments)


def test_messages_never_echo_file_content(tmp_path):
    secret = "root:SECRET-LINE-0123:0:0"
    write(tmp_path, "passwd", secret + "\nsecond line\n")
    sweep = write(tmp_path, "s.yaml", "scenario: passwd\n")
    res = deftsim("sweep", sweep, "--dry-run")
    assert_refused(res, "passwd", "mapping")
    assert "SECRET" not in res.stderr + res.stdout
    res = deftsim("validate", tmp_path / "passwd")
    assert_refused(res, "passwd")
    assert "SECRET" not in res.stderr + res.stdout


# -------------------------------------------------------------------------------- --out
@pytest.mark.parametrize("out,fragment", [("", "--out is empty"), ("/dev/null", "is not a folder"),
                                          ("/proc/deftsim-cannot-be-here", "cannot create"),
                                          ("/sys", "is not writable")])  # an existing read-only folder, even for root
def test_bad_out_fails_before_any_work(tmp_path, out, fragment):
    assert_refused(deftsim("run", tiny_file(tmp_path), "--out", out, "--quiet"), fragment)


def test_existing_run_refused_unless_overwrite_and_user_files_kept(tmp_path):
    path, out = tiny_file(tmp_path), tmp_path / "out"
    assert deftsim("run", path, "--out", out, "--quiet").returncode == 0
    (out / "my_notes.txt").write_text("mine")
    first = (out / "events.parquet").read_bytes()
    assert_refused(deftsim("run", path, "--out", out, "--quiet"), "already holds a run", "--overwrite")
    assert (out / "events.parquet").read_bytes() == first
    res = deftsim("run", path, "--out", out, "--quiet", "--overwrite", "--set", "training.rounds=1")
    assert res.returncode == 0, res.stderr
    assert (out / "my_notes.txt").read_text() == "mine"
    assert json.loads((out / "summary.json").read_text())["rounds_completed"] == 1
    assert "summary.json" in (out / MANIFEST_FILE).read_text().split()


def test_concurrent_run_into_one_folder_is_refused(tmp_path):
    path, out = tiny_file(tmp_path), tmp_path / "out"
    out.mkdir()
    with open(out / ".deftsim.lock", "w") as held:  # another run holds the lock
        fcntl.flock(held, fcntl.LOCK_EX)
        assert_refused(deftsim("run", path, "--out", out, "--quiet"), "another deftsim run")
    assert deftsim("run", path, "--out", out, "--quiet").returncode == 0


def test_stale_staging_of_a_killed_run_is_cleaned(tmp_path):
    path, out = tiny_file(tmp_path), tmp_path / "out"
    stale = out / f"{STAGING_PREFIX}killed"
    stale.mkdir(parents=True)
    (stale / "events.parquet").write_bytes(b"half")
    assert deftsim("run", path, "--out", out, "--quiet").returncode == 0
    assert not stale.exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(STAGING_PREFIX)] == []


def test_a_kill_while_moving_files_in_never_mixes_two_runs(tmp_path, monkeypatch):
    """The old summary.json goes first: after an interruption half-way through the move, the
    folder has no summary.json (incomplete), never the old summary beside new events."""
    out = tmp_path / "out"
    for content in ("old", "new"):
        with RunFolder(out, overwrite=True) as folder:
            for name in ("events.parquet", "scenario.json", "summary.json"):
                (folder.staging / name).write_text(content)
            if content == "new":
                real_replace = os.replace
                calls = []

                def dying_replace(src, dst):
                    calls.append(dst)
                    if len(calls) == 2:
                        raise KeyboardInterrupt  # stands for SIGKILL between two renames
                    real_replace(src, dst)

                monkeypatch.setattr(os, "replace", dying_replace)
                with pytest.raises(KeyboardInterrupt):
                    folder.commit()
                monkeypatch.setattr(os, "replace", real_replace)
            else:
                folder.commit()
    assert not (out / "summary.json").exists()
    assert (out / "events.parquet").read_text() == "new"


# ------------------------------------------------------------------- paths and seeds
def test_relative_paths_are_relative_to_the_file_that_names_them(tmp_path):
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "data.csv").write_text("text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(40)))
    scenario = tiny_file(folder, data={"dataset": "csv", "path": "data.csv"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = deftsim("validate", scenario, cwd=elsewhere)
    assert res.returncode == 0, res.stderr
    assert load_scenario(scenario).data.path == str(folder / "data.csv")
    # on the command line a relative path is relative to the current folder
    with pytest.raises(ScenarioError, match="does not exist"):
        load_scenario(scenario, ["data.path=data.csv"])
    sweep = write(tmp_path, "sweep.yaml", yaml.safe_dump({"scenario": "study/tiny.yaml",
                                                          "set": {"data.path": "study/data.csv"}}))
    from deftsim.sweep import plan_sweep
    plan = plan_sweep(sweep)
    assert plan.runs[0].scenario["data"]["path"] == str(folder / "data.csv")


def test_topology_and_training_seeds_are_recorded(tmp_path):
    path = tiny_file(tmp_path, topology_seed=5)
    out = tmp_path / "out"
    assert deftsim("run", path, "--out", out, "--quiet", "--seed", "3").returncode == 0
    resolved = json.loads((out / "scenario.json").read_text())
    assert (resolved["seed"], resolved["topology_seed"], resolved["training_seed"]) == (3, 5, 3)


def test_dry_run_counts_the_real_work(tmp_path):
    path = tiny_file(tmp_path, training={"rounds": 3, "local_steps": 2, "devices_per_round": 3})
    res = deftsim("run", path, "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "real device steps: at most 18" in res.stdout and "evaluations:       at most 4" in res.stdout
    out = tmp_path / "out"
    assert deftsim("run", path, "--out", out, "--quiet").returncode == 0
    import pandas as pd
    events = pd.read_parquet(out / "events.parquet")
    assert (events["kind"] == "compute").sum() * 2 == 18
    assert (events["kind"] == "evaluate").sum() == 4
