"""`deftsim report` on damaged results folders: exit 2 with a message naming the file and what is
wrong, never a traceback, never the file's content; an unwritable report folder likewise."""
import os

import pandas as pd
import pytest

from analysis import ReportError, build_report, load_sweep

SECRET = "SECRET-CONTENT-4711"  # written into damaged files: must never appear in a message


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _refused(cli, folder, *names, extra=()):
    res = cli("report", folder, *extra)
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and SECRET not in res.stderr
    for name in names:
        assert name in res.stderr, res.stderr
    return res.stderr


DAMAGE = {
    "truncated events": ("events.parquet", lambda p: _truncate(p), "not a readable Parquet file"),
    "empty events": ("events.parquet", lambda p: p.write_bytes(b""), "not a readable Parquet file"),
    "text as events": ("events.parquet", lambda p: p.write_text(SECRET), "not a readable Parquet file"),
    "events without columns": ("events.parquet", lambda p: pd.DataFrame({"x": [1]}).to_parquet(p),
                               "lacks the column(s) t_s"),
    "cut summary": ("summary.json", lambda p: p.write_text('{"final_accuracy": 0.5, "' + SECRET),
                    "is not valid JSON"),
    "binary summary": ("summary.json", lambda p: p.write_bytes(b"\xff\xfe\x00" + SECRET.encode()), "not UTF-8"),
    "list summary": ("summary.json", lambda p: p.write_text(f'["{SECRET}"]'), "must hold a JSON object"),
    "deep summary": ("summary.json", lambda p: p.write_text("[" * 100_000 + "]" * 100_000), "nested too deeply"),
    "cut scenario": ("scenario.json", lambda p: _truncate(p, 0.3), "is not valid JSON"),
    "unreadable summary": ("summary.json", lambda p: (p.unlink(), p.mkdir()), "cannot read"),
    "summary without best accuracy": ("summary.json", lambda p: _edit_json(p, best_accuracy=None, drop=True),
                                      "lacks 'best_accuracy'"),
    "text accuracy": ("summary.json", lambda p: _edit_json(p, final_accuracy=SECRET), "final_accuracy must be a number"),
    "text times in events": ("events.parquet", lambda p: _edit_events(p, t_s=SECRET), "t_s must be numeric"),
}


def _edit_json(path, drop=False, **values):
    import json

    data = json.loads(path.read_text())
    for key, value in values.items():
        if drop:
            data.pop(key)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def _edit_events(path, **values):
    frame = pd.read_parquet(path)
    for key, value in values.items():
        frame[key] = value
    frame.to_parquet(path)


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_run_folder(cli, results, copy_of, case):
    name, damage, what = DAMAGE[case]
    folder = copy_of(results["run"])
    damage(folder / name)
    _refused(cli, folder, name, what)


@pytest.mark.parametrize("case", ["truncated events", "cut summary", "cut scenario"])
def test_damaged_run_inside_a_sweep(cli, results, copy_of, case):
    name, damage, what = DAMAGE[case]
    folder = copy_of(results["sweep"])
    run_dir = sorted((folder / "runs").iterdir())[1]
    damage(run_dir / name)
    _refused(cli, folder, f"{run_dir.name}/{name}", what)


def test_damaged_sweep_plan(cli, results, copy_of):
    folder = copy_of(results["sweep"])
    _truncate(folder / "sweep.json")
    _refused(cli, folder, "sweep.json", "not valid JSON")


def test_bad_plan_and_params(cli, results, tmp_path):
    import json
    import shutil

    folder = tmp_path / "s"
    shutil.copytree(results["sweep"], folder)
    plan = json.loads((folder / "sweep.json").read_text())
    plan["runs"][0]["run_id"] = "../../etc"
    (folder / "sweep.json").write_text(json.dumps(plan))
    _refused(cli, folder, "sweep.json", "not a plain folder name")
    shutil.rmtree(folder)
    shutil.copytree(results["sweep"], folder)
    run_dir = sorted((folder / "runs").iterdir())[0]
    (run_dir / "params.json").write_text('{"status": "ok", ' + SECRET)
    _refused(cli, folder, "params.json", "not valid JSON")


def test_truncated_runs_table_is_a_cache(cli, results, copy_of):
    """runs.parquet is rebuilt from the run folders when it is unreadable: the report and
    load_sweep work and agree with the intact folder."""
    folder = copy_of(results["sweep"])
    _truncate(folder / "runs.parquet")
    res = cli("report", folder)
    assert res.returncode == 0, res.stderr
    intact = load_sweep(results["sweep"])
    rebuilt = load_sweep(folder)
    assert list(rebuilt["run_id"]) == list(intact["run_id"])
    assert rebuilt["final_accuracy"].tolist() == intact["final_accuracy"].tolist()


def test_report_folder_that_cannot_be_written(cli, results, tmp_path):
    _refused(cli, results["run"], "/dev/null", "not a folder", extra=("--out", "/dev/null"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _refused(cli, results["run"], "cannot create the report folder", extra=("--out", blocker / "sub"))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permissions: nothing to test
            pytest.skip("running as a user that can write into read-only folders")
        _refused(cli, results["run"], "cannot write into the report folder", extra=("--out", ro))
    finally:
        ro.chmod(0o700)


def test_read_only_report_folder_in_process(results, tmp_path, monkeypatch):
    """A folder whose files cannot be written (what a read-only folder does for a normal user; root
    ignores the mode bits, so the refusal is simulated): a ReportError before any figure is drawn."""
    import pathlib

    ro = tmp_path / "ro"
    ro.mkdir()
    real = pathlib.Path.write_bytes

    def refuse(self, data):
        if ro in self.parents:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", refuse)
    with pytest.raises(ReportError, match="cannot write into the report folder .*Permission denied"):
        build_report(results["run"], ro)
    assert list(ro.iterdir()) == []


def test_library_errors_are_report_errors(results, tmp_path):
    with pytest.raises(ReportError, match="figure format 'gif'"):
        build_report(results["run"], tmp_path / "r", formats=("png", "gif"))
    with pytest.raises(ReportError, match="does not exist"):
        build_report(tmp_path / "missing")
    from analysis import load_run

    with pytest.raises(ReportError, match="run summary is missing"):
        load_run(tmp_path)
