"""Running sweeps: results, failures, resume after SIGKILL, and the same numbers on every backend."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from analysis.sweep import load_sweep as load_sweep_table
from analysis.sweep import load_sweep_events
from deftsim.sweep import SweepError, plan_sweep
from deftsim.sweep_run import SweepStore

GRID = {"vary": {"grid": {"training.devices_per_round": [2, 3, 5],
                          "channel.uplink_bandwidth_hz": [5.0e6, 2.0e7]}}, "seeds": 2}  # 6 points x 2 seeds


def results(out: Path) -> dict:
    """run_id -> (summary, events) of every finished run."""
    got = {}
    for run_dir in sorted((out / "runs").iterdir()):
        got[run_dir.name] = (json.loads((run_dir / "summary.json").read_text()),
                             pd.read_parquet(run_dir / "events.parquet"))
    return got


def assert_same_results(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for run_id in a:
        assert a[run_id][0] == b[run_id][0], run_id
        pd.testing.assert_frame_equal(a[run_id][1], b[run_id][1], check_exact=True)


def planned_ids(out: Path) -> list[str]:
    """Run ids of the plan the CLI wrote (sweep.json)."""
    return [r["run_id"] for r in json.loads((out / "sweep.json").read_text())["runs"]]


def assert_complete(out: Path, plan) -> None:
    """Every planned run has exactly one complete folder; nothing half-written is left."""
    names = sorted(p.name for p in (out / "runs").iterdir())
    assert len(names) == len(plan.runs)
    assert names == sorted(planned_ids(out))
    for name in names:
        params = json.loads((out / "runs" / name / "params.json").read_text())
        assert params["status"] == "ok"
        for f in ["events.parquet", "summary.json", "scenario.json", "topology.json", "accuracy_vs_time.png"]:
            assert (out / "runs" / name / f).is_file(), (name, f)
    table = pd.read_parquet(out / "runs.parquet")
    assert list(table["run_id"]) == planned_ids(out)
    assert table["run_id"].is_unique and (table["status"] == "ok").all()


def test_sweep_writes_one_folder_per_run_and_table(write_sweep, tmp_path, deftsim):
    path = write_sweep(GRID)
    plan = plan_sweep(path)
    out = tmp_path / "out"
    res = deftsim("sweep", path, "--out", out, "--workers", 2)
    assert res.returncode == 0, res.stderr
    assert "12 runs (6 points x 2 seeds): 12 ok, 0 failed; 12 ran now, 0 already done" in res.stdout
    assert "run/s" in res.stderr or "s/run" in res.stderr  # the progress bar
    assert "running=" in res.stderr and "failed=" in res.stderr
    assert_complete(out, plan)
    table = load_sweep_table(out)
    assert {"training.devices_per_round", "channel.uplink_bandwidth_hz", "final_accuracy", "sim_time_s",
            "total_device_energy_j", "seed", "point"} <= set(table.columns)
    assert len(table) == 12
    # each run's summary agrees with a plain `deftsim run` of its resolved scenario
    run_id = planned_ids(out)[4]
    scen = tmp_path / "one.json"
    scen.write_text(json.dumps(json.loads((out / "runs" / run_id / "scenario.json").read_text())["scenario"]))
    assert deftsim("run", scen, "--out", tmp_path / "one", "--quiet").returncode == 0
    assert json.loads((tmp_path / "one" / "summary.json").read_text()) == json.loads(
        (out / "runs" / run_id / "summary.json").read_text())
    events = load_sweep_events(out)
    assert set(events["run_id"]) == set(table["run_id"])
    assert {"t_s", "kind", "energy_j", "training.devices_per_round", "seed"} <= set(events.columns)
    # rerun: everything is kept and skipped
    before = {p.name: (p / "worker.json").read_text() for p in (out / "runs").iterdir()}
    res = deftsim("sweep", path, "--out", out, "--quiet")
    assert res.returncode == 0 and "0 ran now, 12 already done" in res.stdout
    assert before == {p.name: (p / "worker.json").read_text() for p in (out / "runs").iterdir()}
    # dry run on the folder shows the status of each run
    res = deftsim("sweep", path, "--out", out, "--dry-run")
    assert res.stdout.count(" ok") >= 12 and res.stdout.strip().endswith("runs: 12")


def test_failed_runs_are_recorded_and_the_sweep_goes_on(write_sweep, tmp_path, deftsim):
    csv = tmp_path / "data.csv"
    csv.write_text("text,label\n" + "".join(f"example {i},{i % 2}\n" for i in range(40)))
    path = write_sweep({
        "set": {"data.dataset": "csv", "data.path": str(csv)},
        "vary": {
            "grid": {"devices.0.count": [6, 8], "training.devices_per_round": [3, 8]},  # (6, 8) is invalid
            # the real trainer with a missing text column fails inside the worker
            "zip": {"trainer": ["fake", "real"], "data.text_column": ["text", "nosuch"]}},
        "seeds": 1})
    out = tmp_path / "out"
    res = deftsim("sweep", path, "--out", out, "--workers", 2, "--quiet")
    assert res.returncode == 3, res.stderr
    assert "8 runs (8 points x 1 seeds): 3 ok, 5 failed" in res.stdout
    assert "failed runs:" in res.stdout and "devices_per_round=8 exceeds" in res.stdout and "nosuch" in res.stdout
    table = load_sweep_table(out)
    failed = table[table["status"] == "failed"]
    assert len(failed) == 5 and failed["error_message"].notna().all()
    assert set(failed["error_type"]) == {"ScenarioError", "ValueError"}
    err = json.loads((out / "runs" / failed["run_id"].iloc[0] / "error.json").read_text())
    assert {"params", "seed", "message", "traceback", "phase"} <= set(err)
    ok = table[table["status"] == "ok"]
    assert len(ok) == 3 and ok["final_accuracy"].notna().all()
    # failed runs are kept on a rerun unless --retry-failed
    res = deftsim("sweep", path, "--out", out, "--quiet")
    assert res.returncode == 3 and "0 ran now, 8 already done" in res.stdout
    res = deftsim("sweep", path, "--out", out, "--quiet", "--retry-failed")
    assert res.returncode == 3 and "5 ran now, 3 already done" in res.stdout
    assert not [p for p in (out / "runs").iterdir() if p.name.startswith(".")]


def _start(args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    # SIGINT back to its default in the child: a test run started in the background of a
    # non-interactive shell inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
    return subprocess.Popen([sys.executable, "-m", "deftsim", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _finish(proc, timeout=180):
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of that sweep is left (its own group)
        except ProcessLookupError:
            pass
    return proc.returncode, out, err


def _finished_folders(out: Path) -> dict:
    runs = out / "runs"
    if not runs.is_dir():
        return {}
    return {p.name: (p / "worker.json").read_text() for p in runs.iterdir() if not p.name.startswith(".")}


def _check_no_half_written(out: Path) -> None:
    for p in (out / "runs").iterdir():
        if p.name.startswith("."):
            continue  # a staging folder: deleted on the next start
        assert json.loads((p / "params.json").read_text())["status"] == "ok"
        assert (p / "summary.json").is_file() and (p / "events.parquet").is_file()


def test_sigkill_at_several_points_then_rerun_completes_each_run_once(write_sweep, tmp_path, deftsim):
    path = write_sweep(GRID)
    plan = plan_sweep(path)
    out = tmp_path / "out"
    args = ["sweep", path, "--out", out, "--workers", 2, "--quiet"]
    kept: dict = {}
    # 1-3: the driver SIGKILLs itself: with a run staged but not renamed; right after a rename;
    # with every run done but runs.parquet half-written
    for crash in ["staged:3", "committed:5", "before_replace_runs.parquet:1"]:
        code, _, err = _finish(_start(args, {"DEFTSIM_SWEEP_CRASH_AT": crash}))
        assert code == -signal.SIGKILL, (crash, code, err)
        _check_no_half_written(out)
        now = _finished_folders(out)
        assert {k: now[k] for k in kept} == kept, "a finished run was run again"
        assert len(now) > len(kept) or crash.startswith("before_replace")
        kept = now
        if crash == "staged:3":
            assert [p for p in (out / "runs").iterdir() if p.name.startswith(".tmp-")]
    assert len(kept) == len(plan.runs)
    assert not (out / "runs.parquet").exists()
    # 4: a fresh folder, the whole process group killed from outside while runs are in flight
    out2 = tmp_path / "out2"
    proc = _start(["sweep", path, "--out", out2, "--workers", 2, "--quiet"])
    deadline = time.time() + 120
    while len(_finished_folders(out2)) < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    _finish(proc)
    _check_no_half_written(out2)
    before = _finished_folders(out2)
    assert 4 <= len(before) < len(plan.runs)
    # reruns complete every run exactly once
    res = deftsim(*args)
    assert res.returncode == 0, res.stderr
    assert f"0 ran now, {len(plan.runs)} already done" in res.stdout
    assert_complete(out, plan)
    assert _finished_folders(out) == kept
    res = deftsim("sweep", path, "--out", out2, "--workers", 2, "--quiet")
    assert res.returncode == 0, res.stderr
    assert f"{len(plan.runs) - len(before)} ran now, {len(before)} already done" in res.stdout
    assert_complete(out2, plan)
    after = _finished_folders(out2)
    assert {k: after[k] for k in before} == before
    assert_same_results(results(out), results(out2))


def test_ctrl_c_keeps_finished_runs(write_sweep, tmp_path, deftsim, tiny_scenario):
    # runs of ~0.5 s (400 rounds): the interrupt lands while later runs are still to do, even
    # when a loaded machine delays this polling loop by seconds
    slow = {**tiny_scenario, "training": {**tiny_scenario["training"], "rounds": 400}}
    path = write_sweep(GRID, scenario=slow)
    out = tmp_path / "out"
    proc = _start(["sweep", path, "--out", out, "--workers", 1, "--quiet"])
    deadline = time.time() + 120
    while len(_finished_folders(out)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    code, stdout, err = _finish(proc)
    assert code == 130, (code, err)
    assert "run the same command again" in err and "Traceback" not in err
    assert (out / "runs.parquet").is_file()
    table = pd.read_parquet(out / "runs.parquet")
    assert len(table) == 12 and (table["status"] == "ok").sum() >= 2 and (table["status"] == "pending").any()
    res = deftsim("sweep", path, "--out", out, "--quiet")
    assert res.returncode == 0 and "12 ok" in res.stdout


def test_second_sweep_on_the_same_folder_is_refused(tmp_path):
    first = SweepStore(tmp_path).open()
    try:
        with pytest.raises(SweepError, match="another sweep is writing"):
            SweepStore(tmp_path).open()
    finally:
        first.close()
    SweepStore(tmp_path).open().close()  # free again


def test_same_results_on_1_and_2_workers_and_dask(write_sweep, tmp_path, deftsim):
    distributed = pytest.importorskip("distributed")
    path = write_sweep({"vary": {"grid": {"training.devices_per_round": [2, 5]},
                                 "random": {"samples": 2, "seed": 1, "params": {
                                     "channel.uplink_bandwidth_hz": {"log_uniform": [2e6, 5e7]}}}},
                        "seeds": 2})
    one, two, dask = tmp_path / "w1", tmp_path / "w2", tmp_path / "dask"
    assert deftsim("sweep", path, "--out", one, "--workers", 1, "--quiet").returncode == 0
    assert deftsim("sweep", path, "--out", two, "--workers", 2, "--quiet").returncode == 0
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        res = deftsim("sweep", path, "--out", dask, "--backend", "dask", "--address", cluster.scheduler_address,
                      "--quiet")
        assert res.returncode == 0, res.stderr
        hosts = {json.loads((p / "worker.json").read_text())["pid"] for p in (dask / "runs").iterdir()}
        assert len(hosts) == 2  # both cluster workers ran runs
    assert len(results(one)) == 8
    assert_same_results(results(one), results(two))
    assert_same_results(results(one), results(dask))
    for p in (dask / "runs").iterdir():
        assert json.loads((p / "worker.json").read_text())["backend"] == "dask"
    res = deftsim("sweep", path, "--out", tmp_path / "x", "--backend", "dask", "--address", "tcp://127.0.0.1:9",
                  "--quiet")
    assert res.returncode == 2 and "cannot reach a Dask scheduler" in res.stderr


def test_changed_sweep_file_runs_changed_runs_and_ignores_old_folders(write_sweep, tmp_path, deftsim):
    out = tmp_path / "out"
    path = write_sweep({"seeds": 1})
    assert deftsim("sweep", path, "--out", out, "--quiet").returncode == 0
    res = deftsim("sweep", path, "--out", out, "--quiet", "--set", "training.rounds=3")
    assert res.returncode == 0 and "1 ran now, 0 already done" in res.stdout
    assert "1 folder(s) in" in res.stdout and "earlier plan" in res.stdout
    table = pd.read_parquet(out / "runs.parquet")
    assert len(table) == 1 and table["rounds_completed"].iloc[0] == 3
