"""Run a planned sweep: here in worker processes, or on a Dask cluster; resumable.

The sweep folder::

    DIR/sweep.json            the plan (sweep file, swept fields, every run's id, point, seed, values)
    DIR/runs/<run_id>/        one complete folder per finished run: the files of `deftsim run`
                              (events.parquet, summary.json, scenario.json, ...) + params.json;
                              a failed run has params.json + error.json instead
    DIR/runs.parquet          one row per planned run: status, swept values, headline metrics, error
    DIR/.lock                 held (flock) while a sweep writes to DIR

Crash safety: a worker never writes into DIR. It runs the scenario in its own temporary folder
and sends the files back; the driver writes them to ``runs/.tmp-<run_id>-<random>/``, syncs
them to disk and renames the folder to ``runs/<run_id>`` (one atomic rename). A folder under its
final name is therefore complete; on start, leftover ``.tmp-*``/``.trash-*`` folders are
deleted and every planned run without a final folder is run. Killing the sweep at any moment
and running the same command again finishes every run exactly once. Failed runs are kept (and
skipped) on a rerun unless ``retry_failed``.

Run ids are ``p<point>-s<seed>-<hash>``, the hash being over the fully resolved scenario: if
the sweep or scenario file changes, changed runs get new ids and are run afresh; folders that
are not in the current plan are left alone and ignored.

Determinism: a run's results depend only on its resolved scenario (which holds its seed). The
real trainer's PyTorch thread count is pinned to ``threads_per_run`` (default 1) in every
backend, so 1 worker, N workers and a cluster give the same numbers.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
import time
import traceback
import uuid
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

from .jsonio import NonFinite, dumps_strict
from .sweep import PlannedRun, SweepError, SweepPlan

PLAN_FILE = "sweep.json"
RUNS_DIR = "runs"
RUNS_TABLE = "runs.parquet"
LOCK_FILE = ".lock"
THREADS_ENV = "DEFTSIM_TORCH_THREADS"  # read by fomo.trainer
CRASH_ENV = "DEFTSIM_SWEEP_CRASH_AT"  # fault injection for tests: "<point>:<n>"
MAX_WORKER_LOSSES = 3  # a run in flight when its worker died this often is recorded as failed
BACKENDS = ("local", "dask")


class SweepInterrupted(Exception):
    """Ctrl-C: finished runs are kept; running the same command again goes on."""


_crash_counts: dict[str, int] = {}


def _crashpoint(name: str) -> None:
    """Kill this process with SIGKILL the n-th time ``name`` is reached, if the environment
    variable DEFTSIM_SWEEP_CRASH_AT is ``name:n`` (tests of crash safety only)."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    point, _, n = spec.partition(":")
    if point != name:
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if _crash_counts[name] == int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------- worker side
def pin_threads(threads: int) -> None:
    """Pin PyTorch's and the BLAS libraries' threads of runs started in this process (read when
    the trainer is built; ``fomo.trainer.configure_threads``), and let idle OpenMP threads
    sleep soon (the wait setting of :mod:`deftsim.threads`, read when torch is imported, which a
    worker process does after this)."""
    for var in (THREADS_ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    from .threads import set_default_wait

    set_default_wait()


def _threads_record(threads: int) -> dict:
    from .threads import current_wait_setting

    return {"torch_threads": threads, "omp_wait_policy": current_wait_setting() or "",
            "source": "--threads-per-run"}


def execute_run(task: dict) -> dict:
    """Run one scenario in a private temporary folder; return its files (bytes) or its error.

    ``task``: ``{"run_id", "scenario" (resolved dict), "threads"}``. Runs on a worker process
    or a cluster worker; needs deftsim installed there, never the sweep folder.
    """
    pin_threads(int(task.get("threads", 1)))
    t0 = time.perf_counter()
    info = {"host": socket.gethostname(), "pid": os.getpid()}
    phase = "validate"
    try:
        from netsim.scenario import Scenario

        from .checks import check_scenario_resources
        from .runner import run_scenario

        scenario = Scenario.model_validate(task["scenario"])
        check_scenario_resources(scenario)
        phase = "run"
        with tempfile.TemporaryDirectory(prefix=f"deftsim-{task['run_id']}-") as tmp:
            run_scenario(scenario, tmp, timing_extra={"threads": _threads_record(int(task.get("threads", 1)))})
            files = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir())
                     if p.is_file() and not p.name.startswith(".")}  # not the lock and manifest
        return {"status": "ok", "files": files, "wall_s": time.perf_counter() - t0, **info}
    except Exception as err:  # noqa: BLE001 - a failed run is data, not a crash of the sweep
        return {"status": "failed", "phase": phase, "error_type": type(err).__name__,
                "error_message": str(err), "traceback": traceback.format_exc(),
                "wall_s": time.perf_counter() - t0, **info}


def _init_local_worker(threads: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver handles Ctrl-C and stops us
    pin_threads(threads)
    _exit_with_parent()


def _exit_with_parent() -> None:
    """End this worker process as soon as the driver is gone (killed with SIGKILL, machine
    trouble): an orphaned worker would otherwise wait for work forever."""
    import multiprocessing
    import threading
    from multiprocessing.connection import wait

    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="deftsim-parent-watch", daemon=True).start()


# ------------------------------------------------------------------------ the folder
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` through a temporary file in the same folder and an atomic rename."""
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        _write_file(tmp, data)
        _crashpoint("before_replace_" + path.name)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _json_bytes(obj: Any, nonfinite: NonFinite = "string") -> bytes:
    """Strict JSON (:mod:`deftsim.jsonio`); scenario values keep +-inf as "inf"/"-inf"."""
    return (dumps_strict(obj, nonfinite, default=str) + "\n").encode()


class SweepStore:
    """The sweep folder: which runs are finished, and atomic commits of new ones."""

    def __init__(self, out_dir: str | Path):
        self.root = Path(out_dir)
        self.runs = self.root / RUNS_DIR
        self._lock_fd: Optional[int] = None

    def open(self) -> "SweepStore":
        self.runs.mkdir(parents=True, exist_ok=True)
        self._lock()
        self.clean_partial()
        return self

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _lock(self) -> None:
        from .run_folder import LockBusy, take_lock

        try:
            self._lock_fd = take_lock(self.root / LOCK_FILE)
        except LockBusy as busy:
            raise SweepError(f"another sweep is writing to {str(self.root)!r} ({busy.holder}); "
                             "wait for it or use another --out folder") from None

    def clean_partial(self) -> int:
        """Delete what an interrupted sweep left half-written; return how many."""
        n = 0
        for p in self.runs.iterdir():
            if p.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                n += 1
        for p in self.root.glob(".*.tmp"):
            p.unlink(missing_ok=True)
        return n

    def status(self, run_id: str) -> Optional[str]:
        """'ok' or 'failed' for a finished run, None for one still to run."""
        try:
            return json.loads((self.runs / run_id / "params.json").read_text())["status"]
        except (OSError, ValueError, KeyError):
            return None

    def commit(self, run: PlannedRun, result: dict) -> None:
        """Write a finished run's folder under a temporary name, sync, rename into place."""
        final = self.runs / run.run_id
        stage = self.runs / f".tmp-{run.run_id}-{uuid.uuid4().hex[:8]}"
        stage.mkdir()
        params = {"run_id": run.run_id, "point": run.point, "seed": run.seed, "params": run.params,
                  "status": result["status"]}
        for name, data in result.get("files", {}).items():
            _write_file(stage / name, data)
        if result["status"] != "ok":
            _write_file(stage / "error.json", _json_bytes({
                "run_id": run.run_id, "point": run.point, "seed": run.seed, "params": run.params,
                "phase": result.get("phase"), "type": result.get("error_type"),
                "message": result.get("error_message"), "traceback": result.get("traceback")}))
        _write_file(stage / "worker.json", _json_bytes(
            {k: result.get(k) for k in ("host", "pid", "wall_s", "backend")}))
        _write_file(stage / "params.json", _json_bytes(params))
        _fsync_dir(stage)
        _crashpoint("staged")
        if final.exists():  # a failed run being retried: swap it out, then delete it
            trash = self.runs / f".trash-{run.run_id}-{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)
            os.rename(stage, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(stage, final)
        _fsync_dir(self.runs)
        _crashpoint("committed")

    def write_plan(self, plan: SweepPlan) -> None:
        write_atomic(self.root / PLAN_FILE, _json_bytes(plan.to_json()))

    def write_table(self) -> Path:
        """Rebuild ``runs.parquet`` from the plan and the run folders."""
        import io

        from analysis.sweep import collect_runs

        frame = collect_runs(self.root)
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        write_atomic(self.root / RUNS_TABLE, buf.getvalue())
        return self.root / RUNS_TABLE


# ------------------------------------------------------------------------- backends
class WorkerLost(Exception):
    """The process or cluster worker running a task died."""


class Backend(Protocol):
    name: str

    def slots(self) -> int: ...
    def submit(self, task: dict) -> Any: ...
    def wait(self, handles: list) -> list: ...
    def result(self, handle: Any) -> dict: ...
    def close(self, cancel: bool) -> None: ...


class LocalBackend:
    """Worker processes on this machine (spawned, so they share nothing with the driver)."""

    name = "local"

    def __init__(self, workers: int, threads: int):
        self.workers = workers
        self.threads = threads
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        import multiprocessing

        return ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_local_worker, initargs=(self.threads,))

    def slots(self) -> int:
        return self.workers

    def submit(self, task: dict):
        try:
            return self._pool.submit(execute_run, task)
        except BrokenProcessPool:
            self._restart()
            return self._pool.submit(execute_run, task)

    def wait(self, handles: list) -> list:
        done, _ = wait_futures(handles, timeout=1.0, return_when=FIRST_COMPLETED)
        return list(done)

    def result(self, handle) -> dict:
        try:
            return handle.result()
        except BrokenProcessPool as err:
            self._restart()
            raise WorkerLost(f"worker process died (killed, or out of memory): {err}") from None

    def _restart(self) -> None:
        if getattr(self._pool, "_broken", False):
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()

    def close(self, cancel: bool) -> None:
        if cancel:
            processes = list((getattr(self._pool, "_processes", None) or {}).values())
            self._pool.shutdown(wait=False, cancel_futures=True)
            for p in processes:
                if p.is_alive():
                    p.terminate()
            for p in processes:
                p.join(timeout=5)
        else:
            self._pool.shutdown(wait=True)


class DaskBackend:
    """A Dask distributed cluster: ``address`` of a running scheduler, or a LocalCluster of
    ``workers`` processes started here (one thread each). Each worker needs deftsim (and the
    scenario's model and data files, if any) installed; results travel back to this process,
    so the workers need no access to the sweep folder.

    Failure handling is Dask's: a task whose worker dies is rerun elsewhere, and after
    ``distributed.scheduler.allowed-failures`` deaths it fails with ``KilledWorker``, which is
    recorded as a failed run. Python errors inside a run never reach Dask (execute_run turns
    them into a failed-run record)."""

    name = "dask"

    def __init__(self, address: Optional[str], workers: int, threads: int):
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise SweepError("--backend dask needs Dask distributed: pip install 'deftsim[dask]'") from None
        self.threads = threads
        self._cluster = None
        if address is None:
            self._cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                         dashboard_address=None)
            address = self._cluster.scheduler_address
        try:
            self._client = Client(address, timeout="30s")
        except (OSError, TimeoutError) as err:
            if self._cluster is not None:
                self._cluster.close()
            raise SweepError(f"--address {address}: cannot reach a Dask scheduler there ({err})") from None

    def slots(self) -> int:
        return max(1, sum(self._client.nthreads().values()))

    def submit(self, task: dict):
        return self._client.submit(execute_run, task, key=f"deftsim-{task['run_id']}-{uuid.uuid4().hex[:8]}",
                                   pure=False)

    def wait(self, handles: list) -> list:
        from distributed import wait

        try:
            done, _ = wait(handles, timeout=1.0, return_when="FIRST_COMPLETED")
        except TimeoutError:
            return []
        return list(done)

    def result(self, handle) -> dict:
        try:
            return handle.result()
        except Exception as err:  # KilledWorker, CancelledError, communication errors
            raise WorkerLost(f"{type(err).__name__}: {err}") from None
        finally:
            handle.release()

    def close(self, cancel: bool) -> None:
        try:
            self._client.close()
        finally:
            if self._cluster is not None:
                self._cluster.close()


def make_backend(name: str, workers: int, threads: int, address: Optional[str]) -> Backend:
    if name == "local":
        if address:
            raise SweepError("--address is for --backend dask; the local backend runs on this machine")
        return LocalBackend(workers, threads)
    if name == "dask":
        return DaskBackend(address, workers, threads)
    raise SweepError(f"--backend {name!r}: allowed: {', '.join(BACKENDS)}")


# --------------------------------------------------------------------------- driver
@dataclass
class SweepResult:
    planned: int
    skipped: int  # finished before this call (kept)
    ran: int  # finished by this call (ok + failed)
    failed: list[dict] = field(default_factory=list)  # every failed run of the sweep
    table: Optional[Path] = None
    wall_s: float = 0.0
    stale: list[str] = field(default_factory=list)  # run folders of an earlier plan (ignored, kept)


class Progress(Protocol):
    def start(self, todo: int, skipped: int) -> None: ...
    def update(self, done: int, running: int, failed: int) -> None: ...
    def close(self) -> None: ...


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def run_sweep(plan: SweepPlan, out_dir: str | Path, *, backend: str = "local", workers: Optional[int] = None,
              address: Optional[str] = None, threads_per_run: int = 1, retry_failed: bool = False,
              progress: Optional[Progress] = None,
              backend_factory: Callable[..., Backend] = make_backend) -> SweepResult:
    """Run every planned run that has no finished folder in ``out_dir`` yet."""
    t0 = time.perf_counter()
    workers = workers or default_workers()
    if workers < 1 or threads_per_run < 1:
        raise SweepError(f"--workers {workers} / --threads-per-run {threads_per_run}: must be >= 1")
    store = SweepStore(out_dir).open()
    try:
        store.write_plan(plan)
        todo, skipped = [], 0
        for run in plan.runs:
            status = store.status(run.run_id)
            if status == "ok" or (status == "failed" and not retry_failed):
                skipped += 1
            else:
                todo.append(run)
        if progress is not None:
            progress.start(len(todo), skipped)
        counts = {"done": 0, "failed": 0}

        def finished(run: PlannedRun, result: dict, backend_name: str) -> None:
            store.commit(run, {**result, "backend": backend_name})
            counts["done"] += 1
            counts["failed"] += result["status"] != "ok"

        queue = deque()
        for run in todo:
            if run.valid:
                queue.append(run)
            else:  # invalid combination: a failed run, never started
                finished(run, {"status": "failed", "phase": "validate", "error_type": "ScenarioError",
                               "error_message": run.error}, "none")
        if progress is not None:
            progress.update(counts["done"], 0, counts["failed"])
        if queue:
            _drive(queue, backend_factory(backend, workers, threads_per_run, address), threads_per_run,
                   finished, counts, progress)
        table = store.write_table()
    except KeyboardInterrupt:
        try:
            store.write_table()
        finally:
            store.close()
        raise SweepInterrupted(f"interrupted: finished runs are kept in {str(out_dir)!r}; "
                               "run the same command again to finish the rest") from None
    finally:
        store.close()
        if progress is not None:
            progress.close()
    failed = []
    for run in plan.runs:
        if store.status(run.run_id) == "failed":
            try:
                err = json.loads((store.runs / run.run_id / "error.json").read_text())
            except (OSError, ValueError):
                err = {}
            failed.append({"run_id": run.run_id, "point": run.point, "seed": run.seed, "params": run.params,
                           "type": err.get("type"), "message": err.get("message")})
    planned = {r.run_id for r in plan.runs}
    stale = sorted(p.name for p in store.runs.iterdir() if not p.name.startswith(".") and p.name not in planned)
    return SweepResult(len(plan.runs), skipped, counts["done"], failed, table, time.perf_counter() - t0, stale)


def _drive(queue: deque, backend: Backend, threads: int, finished, counts: dict,
           progress: Optional[Progress]) -> None:
    inflight: dict[Any, tuple[PlannedRun, int]] = {}
    losses: dict[str, int] = {}
    clean = False
    try:
        while queue or inflight:
            while queue and len(inflight) < backend.slots():
                run = queue.popleft()
                task = {"run_id": run.run_id, "scenario": run.scenario, "threads": threads}
                inflight[backend.submit(task)] = (run, losses.get(run.run_id, 0))
                if progress is not None:
                    progress.update(counts["done"], len(inflight), counts["failed"])
            for handle in backend.wait(list(inflight)):
                run, _ = inflight.pop(handle)
                try:
                    result = backend.result(handle)
                except WorkerLost as err:
                    losses[run.run_id] = losses.get(run.run_id, 0) + 1
                    if backend.name == "local" and losses[run.run_id] < MAX_WORKER_LOSSES:
                        queue.appendleft(run)  # the pool was restarted: run it again
                        continue
                    result = {"status": "failed", "phase": "worker", "error_type": "WorkerLost",
                              "error_message": str(err)}
                finished(run, result, backend.name)
                if progress is not None:
                    progress.update(counts["done"], len(inflight), counts["failed"])
        clean = True
    finally:
        backend.close(cancel=not clean)
