"""Reading results files and writing report files, with every failure a :class:`ReportError`.

A results folder may be truncated (a run killed mid-write, a disk that filled up), edited by hand
or not a results folder at all. Every reader here turns the OSError, JSON and Parquet errors into
a :class:`ReportError` that names the file and what is wrong with it, and never quotes the file's
content. Sizes are bounded so that a hostile file cannot exhaust memory.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Iterable, Optional

import pandas as pd

MAX_JSON_BYTES = 64 * 2**20
"""Largest ``summary.json``/``scenario.json``/``sweep.json`` read [bytes] (real ones are a few kB
to a few MB)."""

EVENT_COLUMNS = ("t_s", "duration_s", "kind", "node", "round", "energy_j", "accuracy")
"""Columns an ``events.parquet`` must have for the report (others, e.g. ``group``, ``server``,
``algorithm``, ``variant``, are optional)."""


class ReportError(ValueError):
    """A results folder or file is missing, unreadable or malformed, or the report folder cannot
    be written. The message names the file and what is wrong; the CLI exits with status 2."""


def _name(path: Path) -> str:
    return repr(str(path))


def read_json(path: Path, *, what: str = "JSON file", mapping: bool = True):
    """The parsed content of a JSON file; with ``mapping`` it must be a JSON object.

    Raises :class:`ReportError` when the file is missing, unreadable, larger than
    :data:`MAX_JSON_BYTES`, not UTF-8, not valid JSON (line and column named), nested too deep,
    or (``mapping``) not an object."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise ReportError(f"{_name(path)}: {what} of {size} bytes is larger than the {MAX_JSON_BYTES} bytes "
                              "a results file may have")
        text = path.read_bytes().decode("utf-8")
    except ReportError:
        raise
    except FileNotFoundError:
        raise ReportError(f"{_name(path)}: {what} is missing") from None
    except UnicodeDecodeError as err:
        raise ReportError(f"{_name(path)}: {what} is not UTF-8 text (byte {err.start}); the file is corrupt") from None
    except OSError as err:
        raise ReportError(f"{_name(path)}: cannot read the {what} ({err.strerror or type(err).__name__})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ReportError(f"{_name(path)}: {what} is not valid JSON ({err.msg} at line {err.lineno}, column "
                          f"{err.colno}); the file is truncated or corrupt") from None
    except RecursionError:
        raise ReportError(f"{_name(path)}: {what} is nested too deeply to be a results file") from None
    if mapping and not isinstance(value, dict):
        raise ReportError(f"{_name(path)}: {what} must hold a JSON object, not a JSON {type(value).__name__}")
    return value


def read_parquet(path: Path, *, what: str = "Parquet table", columns: Iterable[str] = ()) -> pd.DataFrame:
    """A Parquet file as a DataFrame; ``columns`` it must have (extra columns are kept).

    Raises :class:`ReportError` when the file is missing, unreadable, not Parquet (truncated,
    corrupt) or lacks a required column."""
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"{_name(path)}: {what} is missing")
    try:
        frame = pd.read_parquet(path)
    except OSError as err:
        raise ReportError(f"{_name(path)}: cannot read the {what} ({err.strerror or type(err).__name__})") from None
    except Exception as err:  # pyarrow.ArrowInvalid / ArrowException and friends: a corrupt file
        raise ReportError(f"{_name(path)}: {what} is not a readable Parquet file (truncated or corrupt; "
                          f"{type(err).__name__})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ReportError(f"{_name(path)}: {what} lacks the column(s) {', '.join(missing)}; it is not a deftsim "
                          "event log")
    return frame


NUMERIC_EVENT_COLUMNS = ("t_s", "duration_s", "round", "energy_j", "accuracy")


def read_events(run_dir: Path) -> pd.DataFrame:
    """``run_dir/events.parquet`` with the columns the report needs (:data:`EVENT_COLUMNS`),
    the times, round, energy and accuracy numeric and ``kind``/``node`` text."""
    path = Path(run_dir) / "events.parquet"
    frame = read_parquet(path, what="event log", columns=EVENT_COLUMNS)
    for col in NUMERIC_EVENT_COLUMNS:
        if not pd.api.types.is_numeric_dtype(frame[col]) or pd.api.types.is_bool_dtype(frame[col]):
            raise ReportError(f"{_name(path)}: event log column {col} must be numeric, not {frame[col].dtype}")
    for col in ("kind", "node"):
        if not (pd.api.types.is_object_dtype(frame[col]) or pd.api.types.is_string_dtype(frame[col])) \
                or not all(isinstance(v, str) for v in frame[col]):
            raise ReportError(f"{_name(path)}: event log column {col} must hold text")
    return frame


def check_numbers(summary: dict, path: Path, required: Iterable[str], optional: Iterable[str] = ()) -> None:
    """Each ``required`` key of a ``summary.json`` is a number, each ``optional`` one a number or
    null if present (a :class:`ReportError` naming the file and the key otherwise)."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    for key in required:
        if key not in summary:
            raise ReportError(f"{_name(path)}: run summary lacks {key!r}; it is not a complete FedAvg run summary")
        if not number(summary[key]):
            raise ReportError(f"{_name(path)}: {key} must be a number, not a JSON {type(summary[key]).__name__}")
    for key in optional:
        if key in summary and summary[key] is not None and not number(summary[key]):
            raise ReportError(f"{_name(path)}: {key} must be a number or null, not a JSON "
                              f"{type(summary[key]).__name__}")


def prepare_out_dir(out: Path) -> Path:
    """Create the report folder (parents too) and check that files can be written in it.

    Raises :class:`ReportError` when the path is a file or device (``/dev/null``), the folder
    cannot be created, or it is read-only."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ReportError(f"report folder {_name(out)} exists and is not a folder; choose another with --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ReportError(f"cannot create the report folder {_name(out)} ({err.strerror or type(err).__name__})") \
            from None
    probe = out / f".write-test-{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ReportError(f"cannot write into the report folder {_name(out)} "
                          f"({err.strerror or type(err).__name__}); choose another with --out") from None
    return out


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it and a rename, so that a
    reader never sees half a file; an OSError becomes a :class:`ReportError`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise ReportError(f"cannot write {_name(path)} ({err.strerror or type(err).__name__})") from None


def safe_run_id(run_id, where: str) -> str:
    """A sweep's run id used as a folder name: a plain name, never a path out of the sweep."""
    text = str(run_id)
    if not text or text in (".", "..") or "/" in text or "\\" in text or "\x00" in text:
        raise ReportError(f"{where}: run_id {text[:40]!r} is not a plain folder name")
    return text


def optional_json(path: Path, what: str) -> Optional[dict]:
    """Like :func:`read_json`, but ``None`` when the file does not exist."""
    return read_json(path, what=what) if Path(path).exists() else None
