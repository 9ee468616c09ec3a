"""The CPU thread policy of the real trainer: how many PyTorch threads, and how they wait.

One policy for ``deftsim run``, ``deftsim sweep`` and the benchmarks:

* **Thread count** (:func:`resolve_threads`): ``--threads N`` if given, else the environment
  variable ``DEFTSIM_TORCH_THREADS``, else the default
  ``min(available_cores(), DEFAULT_MAX_THREADS)``: the physical cores this process may run on
  (its CPU affinity, and a container's CPU quota), at most ``DEFAULT_MAX_THREADS``. The
  default is a function of the machine only, never of its current load: the float32 rounding
  of a step depends on the thread count, and the same scenario and seed must give the same
  event log bit for bit on one machine.
* **Sweeps** (:func:`sweep_threads`): W runs in parallel share the cores, so each run's default
  is ``max(1, available_cores() // W)`` (at most ``DEFAULT_MAX_THREADS``).
* **Waiting** (:func:`apply_thread_policy`): ``GOMP_SPINCOUNT=300``. After every parallel
  region OpenMP's idle worker threads spin before they sleep; GNU OpenMP (libgomp, which the
  Linux PyTorch wheels use) spins 300,000 times by default. Beside another CPU-bound process
  the spinning burns the cores that process (or this run's own working thread) needs: a step
  slowed 4x beside one busy-loop process and 27x beside a second deftsim run on an Intel Xeon.
  A spin of 300 iterations keeps most of the quiet speed (the gaps between a step's parallel
  regions are microseconds) and sleeps soon enough to share the cores. Measured on AMD EPYC
  (Zen 4), 2 cores, ms per quickstart step quiet / beside a busy loop / beside a second run:
  torch's default 78 / 256 / 348, ``GOMP_SPINCOUNT=300`` 93 / 150 / 156,
  ``OMP_WAIT_POLICY=PASSIVE`` (no spin) 104 / 146 / 149 (docs/performance.md,
  ``bench/contention.py``). Other OpenMP runtimes (LLVM's libomp, Intel's) ignore the
  variable: there ``OMP_WAIT_POLICY=PASSIVE`` is the portable choice.

The wait settings are read once, when the OpenMP runtime initialises, which happens when torch
is imported. :func:`apply_thread_policy` therefore sets ``GOMP_SPINCOUNT`` in ``os.environ``
only if torch is not imported yet, and says in its record when it could not. A value the user
set in the environment (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``) is kept;
``OMP_WAIT_POLICY=ACTIVE`` restores torch's behaviour.

This module does not import torch when it is imported; :func:`apply_thread_policy` does.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Optional

THREADS_ENV = "DEFTSIM_TORCH_THREADS"
"""Environment variable holding the torch thread count (read by the trainer when it is built)."""

WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
SPINCOUNT_ENV = "GOMP_SPINCOUNT"
DEFAULT_SPINCOUNT = "300"
DEFAULT_WAIT_POLICY = f"{SPINCOUNT_ENV}={DEFAULT_SPINCOUNT}"
"""What :func:`openmp_wait_setting` reports for deftsim's default (see the module docstring)."""

DEFAULT_MAX_THREADS = 8
"""Upper bound of the default thread count. A real step multiplies small matrices (a batch of
8 x 32 tokens is 256 rows of hidden size 384): split over many more threads, each thread's
share becomes too small to pay for the synchronisation. Measured on 2 cores only; a
many-core machine may want ``--threads`` tuned."""

MAX_THREADS = 1024
"""Largest thread count accepted from ``--threads`` or ``DEFTSIM_TORCH_THREADS``."""


class ThreadPolicyError(ValueError):
    """A thread count that is not a positive integer (the message names where it came from)."""


# ----------------------------------------------------------------------- the machine
def _affinity_cpus() -> list[int]:
    """Logical CPUs this process may run on (its affinity mask; all CPUs where unknown)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _physical_cores(cpus: list[int], sysfs: Path = Path("/sys/devices/system/cpu")) -> int:
    """Distinct (package, core) pairs among ``cpus`` (SMT siblings count once), from Linux
    sysfs; ``len(cpus)`` where the topology cannot be read."""
    cores = set()
    for cpu in cpus:
        topology = sysfs / f"cpu{cpu}" / "topology"
        try:
            cores.add((topology.joinpath("physical_package_id").read_text().strip(),
                       topology.joinpath("core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return max(1, len(cores))


def _cgroup_cpu_quota(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> Optional[int]:
    """CPUs granted by a cgroup v2 CPU quota (``quota period`` in cpu.max), rounded up; None
    when there is no quota or it cannot be read."""
    try:
        fields = path.read_text().split()
    except OSError:
        return None
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota_us, period_us = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return max(1, math.ceil(quota_us / period_us)) if quota_us > 0 and period_us > 0 else None


def available_cores() -> int:
    """Physical cores this process may use: the cores of its affinity mask, at most the CPUs a
    cgroup quota grants (>= 1)."""
    cores = _physical_cores(_affinity_cpus())
    quota = _cgroup_cpu_quota()
    return max(1, min(cores, quota) if quota is not None else cores)


def default_threads() -> int:
    """The default torch thread count: ``min(available_cores(), DEFAULT_MAX_THREADS)``."""
    return min(available_cores(), DEFAULT_MAX_THREADS)


# ----------------------------------------------------------------------- the policy
def _check_count(value: object, where: str) -> int:
    """``value`` as a thread count in 1..MAX_THREADS, or ThreadPolicyError naming ``where``."""
    if isinstance(value, bool):
        raise ThreadPolicyError(f"{where}={value!r}: must be a whole number of threads from 1 to {MAX_THREADS}")
    try:
        count = int(str(value).strip()) if isinstance(value, str) else int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise ThreadPolicyError(
            f"{where}={value!r}: must be a whole number of threads from 1 to {MAX_THREADS}") from None
    if isinstance(value, float) and value != count:
        raise ThreadPolicyError(f"{where}={value!r}: must be a whole number of threads from 1 to {MAX_THREADS}")
    if not 1 <= count <= MAX_THREADS:
        raise ThreadPolicyError(f"{where}={value!r}: must be from 1 to {MAX_THREADS} threads")
    return count


def thread_source(requested: Optional[int]) -> str:
    """Where :func:`resolve_threads` takes the count from: ``"--threads"``,
    ``"DEFTSIM_TORCH_THREADS"`` or ``"default"``."""
    if requested is not None:
        return "--threads"
    if os.environ.get(THREADS_ENV, "").strip():
        return THREADS_ENV
    return "default"


def resolve_threads(requested: Optional[int]) -> int:
    """The torch thread count: ``requested`` (``--threads``) if not None, else
    ``DEFTSIM_TORCH_THREADS`` if set, else :func:`default_threads`.

    Raises ThreadPolicyError (naming ``--threads`` or the variable, the value and the allowed
    range) for anything but a whole number from 1 to MAX_THREADS."""
    source = thread_source(requested)
    if source == "--threads":
        return _check_count(requested, "--threads")
    if source == THREADS_ENV:
        return _check_count(os.environ[THREADS_ENV], THREADS_ENV)
    return default_threads()


def apply_thread_policy(threads: int, source: str = "default") -> dict:
    """Apply the policy for ``threads`` torch threads in this process; return what was applied.

    1. Waiting: if torch is not imported yet and neither ``OMP_WAIT_POLICY`` nor
       ``GOMP_SPINCOUNT`` is set, set ``GOMP_SPINCOUNT=300`` in ``os.environ`` (read by OpenMP
       when torch is imported); a value already in the environment is kept (and reported as
       applied: it was there when torch started, unless something set it after importing
       torch). If torch was imported before, the setting in force cannot be changed any more
       and the record says so.
    2. ``DEFTSIM_TORCH_THREADS`` is set to ``threads`` (the trainer applies it when built;
       processes started from here inherit it).
    3. ``torch.set_num_threads(threads)``; ``torch.set_num_interop_threads(1)`` where torch
       still allows it (deftsim runs no inter-op parallel work).

    Returns ``{"torch_threads": int, "interop_threads": int, "omp_wait_policy": str,
    "wait_policy_applied": bool, "source": str, "available_cores": int, "note": str}`` for
    timing.json; ``note`` is "" or says why the wait policy is not the one asked for.
    """
    threads = _check_count(threads, "threads")
    torch_loaded = "torch" in sys.modules
    note = ""
    existing = current_wait_setting()
    if existing is not None:  # the user's (or an earlier call's) choice
        policy, applied = existing, True
    elif torch_loaded:
        policy, applied = "ACTIVE", False  # OpenMP's default, fixed when torch was imported
        note = (f"{SPINCOUNT_ENV} not applied: torch was imported before the thread policy; set "
                f"{DEFAULT_WAIT_POLICY} before starting Python")
    else:
        policy, applied = set_default_wait(), True
    os.environ[THREADS_ENV] = str(threads)

    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # inter-op pool already started (a second run in this process)
        pass
    return {
        "torch_threads": int(torch.get_num_threads()),
        "interop_threads": int(torch.get_num_interop_threads()),
        "omp_wait_policy": policy,
        "wait_policy_applied": applied,
        "source": source,
        "available_cores": available_cores(),
        "note": note,
    }


def sweep_threads(workers: int) -> int:
    """Default torch threads of each run of a sweep with ``workers`` runs in parallel:
    ``max(1, min(available_cores() // workers, DEFAULT_MAX_THREADS))``, so that the workers
    together do not ask for more cores than the process may use."""
    workers = _check_count(workers, "--workers")
    return max(1, min(available_cores() // workers, DEFAULT_MAX_THREADS))


def current_wait_setting() -> Optional[str]:
    """The wait setting already in the environment, as recorded: ``OMP_WAIT_POLICY``'s value
    (upper case) or ``GOMP_SPINCOUNT=N``; None if neither is set."""
    policy = os.environ.get(WAIT_POLICY_ENV, "").strip()
    if policy:
        return policy.upper()
    spin = os.environ.get(SPINCOUNT_ENV, "").strip()
    return f"{SPINCOUNT_ENV}={spin}" if spin else None


def set_default_wait() -> str:
    """Put deftsim's default wait setting into ``os.environ`` unless the user chose one; return
    the setting in force. Only effective before torch is imported (worker processes call it
    first thing)."""
    existing = current_wait_setting()
    if existing is not None:
        return existing
    os.environ[SPINCOUNT_ENV] = DEFAULT_SPINCOUNT
    return DEFAULT_WAIT_POLICY


def configure_threads(requested: Optional[int] = None) -> dict:
    """:func:`resolve_threads` then :func:`apply_thread_policy` with the matching source: the
    one call a command makes before it builds a trainer (before importing torch, so that the
    wait policy applies)."""
    source = thread_source(requested)
    return apply_thread_policy(resolve_threads(requested), source)


def describe(record: dict) -> str:
    """One line for the CLI, e.g. ``torch threads: 2 (default: 2 cores available), OpenMP
    wait policy PASSIVE``."""
    origin = {"default": f"default: {record['available_cores']} cores available",
              "--threads": "--threads", THREADS_ENV: THREADS_ENV}.get(record["source"], record["source"])
    line = f"torch threads: {record['torch_threads']} ({origin}), OpenMP wait policy {record['omp_wait_policy']}"
    return f"{line} ({record['note']})" if record.get("note") else line
