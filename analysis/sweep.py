"""A sweep folder (``deftsim sweep``) -> tidy DataFrames.

``load_sweep(DIR)``         one row per planned run: ``run_id, point, seed, status``, one column
                            per swept field (named by its path, e.g. ``peft.rank``), the headline
                            metrics of ``summary.json`` (nested ones flattened with dots, e.g.
                            ``aircomp.mean_nmse``), and ``error_type``/``error_message``.
``load_sweep_events(DIR)``  the events of every finished run, with ``run_id, point, seed`` and the
                            swept fields as extra columns.

Reads files only (``sweep.json``, ``runs/<run_id>/``); never runs the simulator.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import pandas as pd

from .load import flatten_summary

PathLike = Union[str, Path]
PLAN_FILE = "sweep.json"
RUNS_DIR = "runs"
RUNS_TABLE = "runs.parquet"
KEY_COLUMNS = ["run_id", "point", "seed", "status"]


def load_plan(sweep_dir: PathLike) -> dict:
    path = Path(sweep_dir) / PLAN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(sweep_dir)!r} is not a sweep folder: it has no {PLAN_FILE}")
    return json.loads(path.read_text())


def _cell(value):
    """Swept values as parquet-friendly cells (lists and mappings as JSON text)."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_status(sweep_dir: PathLike, run_id: str) -> str:
    """``ok``, ``failed`` or ``pending`` (no finished folder yet)."""
    params = _read_json(Path(sweep_dir) / RUNS_DIR / run_id / "params.json")
    return (params or {}).get("status", "pending")


def collect_runs(sweep_dir: PathLike) -> pd.DataFrame:
    """Build the one-row-per-run table from ``sweep.json`` and the run folders."""
    root = Path(sweep_dir)
    plan = load_plan(root)
    rows = []
    for run in plan["runs"]:
        folder = root / RUNS_DIR / run["run_id"]
        status = run_status(root, run["run_id"])
        row = {"run_id": run["run_id"], "point": run["point"], "seed": run["seed"], "status": status}
        row.update({p: _cell(run["params"].get(p)) for p in plan["params"]})
        summary = _read_json(folder / "summary.json") if status == "ok" else None
        if summary:
            row.update(flatten_summary(summary))
        error = _read_json(folder / "error.json") if status == "failed" else None
        row["error_type"] = (error or {}).get("type")
        row["error_message"] = (error or {}).get("message")
        row["run_dir"] = f"{RUNS_DIR}/{run['run_id']}"
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        frame = pd.DataFrame(columns=KEY_COLUMNS + plan["params"])
    return frame


def load_sweep(sweep_dir: PathLike, refresh: bool = False) -> pd.DataFrame:
    """One row per planned run (see the module docstring). Reads ``runs.parquet``; rebuilds it
    from the run folders when ``refresh`` is true or the table is missing or out of date."""
    root = Path(sweep_dir)
    table = root / RUNS_TABLE
    if not refresh and table.is_file():
        frame = pd.read_parquet(table)
        plan = load_plan(root)
        if list(frame["run_id"]) == [r["run_id"] for r in plan["runs"]] and all(
                s == run_status(root, r) for r, s in zip(frame["run_id"], frame["status"])):
            return frame
    return collect_runs(root)


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
        ev = pd.read_parquet(root / RUNS_DIR / run["run_id"] / "events.parquet")
        extra = {"run_id": run["run_id"], "point": run["point"], "seed": run["seed"]}
        extra.update({p: _cell(run["params"].get(p)) for p in plan["params"]})
        frames.append(ev.assign(**extra))
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)
