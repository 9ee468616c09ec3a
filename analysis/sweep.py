"""A sweep folder (``deftsim sweep``) -> tidy DataFrames.

``load_sweep(DIR)``         one row per planned run: ``run_id, point, seed, status``, one column
                            per swept field (named by its path, e.g. ``peft.rank``), the headline
                            metrics of ``summary.json`` (nested ones flattened with dots, e.g.
                            ``aircomp.mean_nmse``), ``error_type``/``error_message``, and (FedAvg)
                            time- and energy-to-accuracy at the report's target accuracy.
``load_sweep_events(DIR)``  the events of every finished run, with ``run_id, point, seed`` and the
                            swept fields as extra columns.

Reads files only (``sweep.json``, ``runs/<run_id>/``); never runs the simulator.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Union

import pandas as pd

from .files import ReportError, read_events, read_json, read_parquet, safe_run_id
from .load import flatten_summary
from .metrics import choose_target, energy_to_accuracy_j, run_target, time_to_accuracy_s

PathLike = Union[str, Path]
PLAN_FILE = "sweep.json"
RUNS_DIR = "runs"
RUNS_TABLE = "runs.parquet"
KEY_COLUMNS = ["run_id", "point", "seed", "status"]


def load_plan(sweep_dir: PathLike) -> dict:
    """The sweep's ``sweep.json`` (checked: ``params`` a list of field paths, ``runs`` a list of
    runs with ``run_id``, ``point``, ``seed`` and ``params``)."""
    path = Path(sweep_dir) / PLAN_FILE
    if not path.is_file():
        raise ReportError(f"{str(sweep_dir)!r} is not a sweep folder: it has no {PLAN_FILE}")
    plan = read_json(path, what="sweep plan")
    where = repr(str(path))
    if not isinstance(plan.get("params"), list) or not all(isinstance(p, str) for p in plan["params"]):
        raise ReportError(f"{where}: 'params' must be a list of field paths")
    if not isinstance(plan.get("runs"), list):
        raise ReportError(f"{where}: 'runs' must be a list of runs")
    for i, run in enumerate(plan["runs"]):
        if not isinstance(run, dict) or not {"run_id", "point", "seed", "params"} <= set(run) \
                or not isinstance(run["params"], dict):
            raise ReportError(f"{where}: runs[{i}] must have run_id, point, seed and params")
        safe_run_id(run["run_id"], f"{where}: runs[{i}]")
        for key in ("point", "seed"):
            if isinstance(run[key], bool) or not isinstance(run[key], int):
                raise ReportError(f"{where}: runs[{i}].{key} must be an integer")
    plan.setdefault("name", Path(sweep_dir).resolve().name)
    return plan


def _cell(value):
    """Swept values as parquet-friendly cells (lists and mappings as JSON text)."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _read_json(path: Path, strict: bool = False, what: str = "JSON file") -> Optional[dict]:
    """The JSON object in ``path``; ``None`` when it is missing, or (not ``strict``) unreadable."""
    if not path.exists():
        return None
    try:
        return read_json(path, what=what)
    except ReportError:
        if strict:
            raise
        return None


def run_status(sweep_dir: PathLike, run_id: str, strict: bool = False) -> str:
    """``ok``, ``failed`` or ``pending`` (no finished folder yet)."""
    params = _read_json(Path(sweep_dir) / RUNS_DIR / run_id / "params.json", strict, "run parameters")
    status = (params or {}).get("status", "pending")
    if strict and status not in ("ok", "failed", "pending"):
        raise ReportError(f"{str(Path(sweep_dir) / RUNS_DIR / run_id / 'params.json')!r}: status must be ok, "
                          "failed or pending")
    return status if status in ("ok", "failed") else "pending"


def collect_runs(sweep_dir: PathLike, strict: bool = False) -> pd.DataFrame:
    """Build the one-row-per-run table from ``sweep.json`` and the run folders. ``strict``: an
    unreadable ``params.json``, ``summary.json`` or ``error.json`` is a :class:`ReportError`
    naming it (otherwise the run counts as pending / without metrics)."""
    root = Path(sweep_dir)
    plan = load_plan(root)
    rows = []
    for run in plan["runs"]:
        folder = root / RUNS_DIR / run["run_id"]
        status = run_status(root, run["run_id"], strict)
        row = {"run_id": run["run_id"], "point": run["point"], "seed": run["seed"], "status": status}
        row.update({p: _cell(run["params"].get(p)) for p in plan["params"]})
        summary = _read_json(folder / "summary.json", strict, "run summary") if status == "ok" else None
        if strict and status == "ok" and summary is None:
            raise ReportError(f"{str(folder / 'summary.json')!r}: run summary is missing (the run is marked ok)")
        if summary:
            row.update(flatten_summary(summary))
        error = _read_json(folder / "error.json", strict, "run error record") if status == "failed" else None
        row["error_type"] = (error or {}).get("type")
        row["error_message"] = (error or {}).get("message")
        row["run_dir"] = f"{RUNS_DIR}/{run['run_id']}"
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        frame = pd.DataFrame(columns=KEY_COLUMNS + plan["params"])
    return frame


def _cached_table(root: Path, plan: dict) -> Optional[pd.DataFrame]:
    """``runs.parquet`` if it is readable and matches the plan and the run folders' status; else
    ``None`` (it is a cache: a truncated or stale one is rebuilt)."""
    table = root / RUNS_TABLE
    if not table.is_file():
        return None
    try:
        frame = read_parquet(table, what="run table", columns=("run_id", "status"))
    except ReportError:
        return None
    if list(frame["run_id"]) == [r["run_id"] for r in plan["runs"]] and all(
            s == run_status(root, r) for r, s in zip(frame["run_id"], frame["status"])):
        return frame
    return None


def stop_targets(sweep_dir: PathLike, frame: pd.DataFrame) -> list:
    """Each finished run's target accuracy from its ``scenario.json`` (:func:`analysis.metrics.run_target`;
    None if unset)."""
    root = Path(sweep_dir)
    out = []
    for run_id in frame.loc[frame["status"] == "ok", "run_id"]:
        resolved = read_json(root / RUNS_DIR / run_id / "scenario.json", what="resolved scenario")
        out.append(run_target(resolved.get("scenario") or {}))
    return out


def add_target_metrics(frame: pd.DataFrame, events: dict, target: float) -> pd.DataFrame:
    """``frame`` with ``target_accuracy_used``, ``time_to_target_s``, ``energy_to_target_j`` and
    ``target_reached`` for each run whose events are in ``events`` (run_id -> event log): what
    :func:`load_sweep` and the report both compute, at the same ``target``."""
    out = frame.copy()
    tta, eta = [], []
    for run_id in out["run_id"]:
        ev = events.get(run_id)
        t = None if ev is None else time_to_accuracy_s(ev, target)
        e = None if ev is None else energy_to_accuracy_j(ev, target)
        tta.append(math.nan if t is None else t)
        eta.append(math.nan if e is None else e)
    out["target_accuracy_used"] = target
    out["time_to_target_s"] = tta
    out["energy_to_target_j"] = eta
    out["target_reached"] = out["time_to_target_s"].notna()
    return out


def is_fedavg(frame: pd.DataFrame) -> bool:
    """True if every finished run is a FedAvg run (its summary names no other experiment)."""
    if "experiment" not in frame:
        return True
    kinds = {e for e, s in zip(frame["experiment"], frame["status"]) if s == "ok" and isinstance(e, str)}
    return kinds <= {"fedavg"}


def load_sweep(sweep_dir: PathLike, refresh: bool = False, target: Optional[float] = None) -> pd.DataFrame:
    """One row per planned run (see the module docstring). Reads ``runs.parquet``; rebuilds it
    from the run folders when ``refresh`` is true or the table is missing, unreadable or out of
    date.

    For FedAvg sweeps it adds ``target_accuracy_used``, ``time_to_target_s``,
    ``energy_to_target_j`` and ``target_reached`` at the target chosen by
    :func:`analysis.metrics.choose_target` (``target`` if given): the same numbers as the
    report's. Sweeps of other experiments (several variants per run) get them per variant from
    :func:`analysis.load_variants`."""
    root = Path(sweep_dir)
    plan = load_plan(root)
    frame = None if refresh else _cached_table(root, plan)
    if frame is None:
        frame = collect_runs(root)
    ok = frame[frame["status"] == "ok"] if "status" in frame else frame.iloc[0:0]
    if len(ok) == 0 or "best_accuracy" not in frame or not is_fedavg(frame):
        return frame
    chosen, _ = choose_target(ok["best_accuracy"].astype(float), stop_targets(root, frame), target)
    events = {r: read_events(root / RUNS_DIR / r) for r in ok["run_id"]}
    return add_target_metrics(frame, events, chosen)


def swept_params(sweep_dir: PathLike) -> list[str]:
    """The swept field paths, in sweep-file order."""
    return list(load_plan(sweep_dir)["params"])


def load_sweep_events(sweep_dir: PathLike) -> pd.DataFrame:
    """Events of every finished (``ok``) run, with ``run_id, point, seed`` and the swept
    fields as columns."""
    root = Path(sweep_dir)
    plan = load_plan(root)
    frames = []
    for run in plan["runs"]:
        if run_status(root, run["run_id"]) != "ok":
            continue
        ev = read_events(root / RUNS_DIR / run["run_id"])
        extra = {"run_id": run["run_id"], "point": run["point"], "seed": run["seed"]}
        extra.update({p: _cell(run["params"].get(p)) for p in plan["params"]})
        frames.append(ev.assign(**extra))
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)
