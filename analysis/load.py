"""Load one results folder, or many, into DataFrames.

Every reader raises :class:`analysis.files.ReportError` naming the file when it is missing,
truncated or malformed (never a raw OSError, JSON or Parquet error)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Union

import pandas as pd

from .files import read_events, read_json

PathLike = Union[str, Path]


def load_events(run_dir: PathLike) -> pd.DataFrame:
    """The event log of one run (one row per event; ``events.parquet``)."""
    return read_events(Path(run_dir))


def load_run(run_dir: PathLike) -> tuple[pd.DataFrame, dict, dict]:
    """(events, summary, scenario) of one results folder."""
    run_dir = Path(run_dir)
    summary = read_json(run_dir / "summary.json", what="run summary")
    scenario = read_json(run_dir / "scenario.json", what="resolved scenario")
    return load_events(run_dir), summary, scenario


def flatten_summary(summary: dict, prefix: str = "") -> dict:
    """Scalar entries of a ``summary.json``, nested mappings flattened with dots
    (``{"aircomp": {"mean_nmse": x}}`` -> ``aircomp.mean_nmse``); lists are left out."""
    out = {}
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_summary(value, f"{name}."))
        elif not isinstance(value, list):
            out[name] = value
    return out


def load_runs(run_dirs: Iterable[PathLike]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Many runs: (events of all runs with a ``run`` column, one summary row per run)."""
    events, rows = [], []
    for d in run_dirs:
        ev, summary, _ = load_run(d)
        events.append(ev.assign(run=str(d)))
        rows.append({"run": str(d), **flatten_summary(summary)})
    return pd.concat(events, ignore_index=True), pd.DataFrame(rows)
