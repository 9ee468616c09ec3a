"""Real step time quiet and beside a competing CPU-bound process, torch's default threads vs
deftsim's thread policy (deftsim/threads.py).

For each policy one measuring process is started (the OpenMP wait policy is fixed when torch is
imported, so each policy needs its own process). It builds the quickstart trainer
(all-MiniLM-L6-v2, LoRA r=8, batch 8 x 32 tokens) and, on the parent's request, times local
jobs of 5 real AdamW steps, in three conditions:

* ``quiet``: nothing else started by this script;
* ``busy``: beside one busy-loop process (``while True: pass``, one core's worth of work);
* ``torch``: beside a second trainer process of the same policy that trains without pause (two
  deftsim runs side by side).

The conditions are repeated ``--repeats`` times, interleaved (quiet, busy, torch, quiet, ...)
and the policies alternate which goes first, so slow drifts of the machine's other load hit
every cell alike. A condition's figure is the median ms per step over its jobs and repeats;
its ratio is that over the same policy's quiet median. On a machine shared with other users
the absolute times move; the ratios between policies are what the benchmark is for.

    python bench/contention.py [--quick] [--repeats 3] [--jobs 4] [--policies torch-default,deftsim,deftsim-1]

Policies: ``torch-default`` (torch's own thread count, OpenMP's default active wait),
``deftsim`` (deftsim.threads.configure_threads(): its default count and wait setting),
``deftsim-N`` (the policy with N threads, as ``--threads N``), ``spin-N`` (torch's own thread
count, OpenMP's default policy with ``GOMP_SPINCOUNT=N``: a shorter spin before sleeping).

Ends with ``RESULT cores=... <policy>_quiet_ms=... <policy>_busy_ratio=... <policy>_torch_ratio=...
... busy_gain=... torch_gain=...`` where a gain is the torch-default time over the deftsim
time in that condition.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from _common import median, result_line

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_JOB = 5
CONDITIONS = ("quiet", "busy", "torch")
BUSY_LOOP = "while True: pass"
_POLICY_VARS = ("OMP_WAIT_POLICY", "DEFTSIM_TORCH_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GOMP_SPINCOUNT")


# ----------------------------------------------------------------------- worker side
def _apply(policy: str) -> dict:
    """Apply ``policy`` in this (fresh) process before torch is imported; its record."""
    if policy.startswith("spin-"):  # OpenMP's default policy with a shorter spin (GNU OpenMP)
        os.environ["GOMP_SPINCOUNT"] = policy.split("-", 1)[1]
        import torch

        return {"torch_threads": torch.get_num_threads(),
                "omp_wait_policy": f"GOMP_SPINCOUNT={os.environ['GOMP_SPINCOUNT']}", "source": "torch"}
    if policy == "torch-default":
        import torch

        return {"torch_threads": torch.get_num_threads(), "omp_wait_policy": "ACTIVE (OpenMP default)",
                "source": "torch"}
    from deftsim.threads import configure_threads

    requested = int(policy.split("-", 1)[1]) if policy.startswith("deftsim-") else None
    return configure_threads(requested)


def worker(policy: str, forever: bool) -> None:
    """Build the quickstart trainer under ``policy``; print ``ready {record}``; then either train
    without pause (``forever``: a competing job) or answer each stdin line ``N`` with the wall
    seconds per step of N jobs of STEPS_PER_JOB steps (one JSON list)."""
    record = _apply(policy)
    sys.path.insert(0, str(ROOT))
    from deftsim.config import load_scenario
    from fomo import build_trainer
    from netsim.interfaces import LocalJob

    scenario = load_scenario(ROOT / "scenarios" / "quickstart.yaml", [])
    trainer = build_trainer(scenario, seed=0)
    batch, devices = scenario.training.batch_size, trainer.num_devices()
    counter = iter(range(1, 10**9))

    def job_seconds_per_step() -> float:
        n = next(counter)
        job = LocalJob(device_id=n % devices, round=n, steps=STEPS_PER_JOB, batch_size=batch)
        t0 = time.perf_counter()
        trainer.local_train([job])
        return (time.perf_counter() - t0) / STEPS_PER_JOB

    job_seconds_per_step()  # warm-up: profiles the step shape (not timed)
    print("ready " + json.dumps(record), flush=True)
    if forever:
        while True:
            job_seconds_per_step()
    for line in sys.stdin:
        print(json.dumps([job_seconds_per_step() for _ in range(int(line))]), flush=True)


# ----------------------------------------------------------------------- parent side
def _env(policy: str) -> dict:
    """The environment of a policy's processes: none of the thread variables of the caller."""
    env = {k: v for k, v in os.environ.items() if k not in _POLICY_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "bench"), str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _start_worker(policy: str, forever: bool) -> tuple[subprocess.Popen, dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", policy] + (["--forever"] if forever else [])
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env(policy),
                            cwd=ROOT)
    line = proc.stdout.readline()
    if not line.startswith("ready "):
        proc.kill()
        raise SystemExit(f"worker {policy} failed to start (exit {proc.wait()})")
    return proc, json.loads(line[len("ready "):])


def _stop(proc: Optional[subprocess.Popen]) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def _measure(proc: subprocess.Popen, jobs: int) -> list[float]:
    proc.stdin.write(f"{jobs}\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def _competitor(condition: str, policy: str) -> Optional[subprocess.Popen]:
    """Start the competing process of ``condition`` (None for quiet); it is running when this
    returns (a torch competitor has built its trainer and trains)."""
    if condition == "busy":
        return subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    if condition == "torch":
        return _start_worker(policy, forever=True)[0]
    return None


def measure_policy(policy: str, proc: subprocess.Popen, conditions: tuple[str, ...], jobs: int,
                   times: dict[tuple[str, str], list[float]]) -> None:
    """One repeat of every condition for one policy (appends ms per step to ``times``)."""
    for condition in conditions:
        rival = _competitor(condition, policy)
        try:
            if rival is not None:
                time.sleep(1.0)  # let the rival reach its steady state
            times[(policy, condition)] += [1000 * s for s in _measure(proc, jobs)]
        finally:
            _stop(rival)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--forever", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="1 repeat of 3 jobs")
    ap.add_argument("--repeats", type=int, default=None, help="rounds of all conditions (default 3; quick 1)")
    ap.add_argument("--jobs", type=int, default=None, help=f"jobs of {STEPS_PER_JOB} steps per condition and repeat "
                                                          "(default 4; quick 3)")
    ap.add_argument("--policies", default="torch-default,deftsim", help="comma-separated policies to compare")
    ap.add_argument("--no-torch-rival", action="store_true", help="skip the second-trainer condition")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.forever)
        return
    repeats = args.repeats or (1 if args.quick else 3)
    jobs = args.jobs or (3 if args.quick else 4)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    conditions = tuple(c for c in CONDITIONS if not (c == "torch" and args.no_torch_rival))

    from deftsim.threads import available_cores

    cores = available_cores()
    print(f"{cores} cores available; quickstart step (batch 8 x 32 tokens, LoRA r=8); {repeats} repeats x "
          f"{jobs} jobs x {STEPS_PER_JOB} steps per condition; conditions {', '.join(conditions)}", flush=True)
    workers: dict[str, subprocess.Popen] = {}
    records: dict[str, dict] = {}
    times: dict[tuple[str, str], list[float]] = {(p, c): [] for p in policies for c in conditions}
    t_all = time.perf_counter()
    try:
        for policy in policies:
            workers[policy], records[policy] = _start_worker(policy, forever=False)
            print(f"  {policy}: threads {records[policy]['torch_threads']}, wait policy "
                  f"{records[policy]['omp_wait_policy']}", flush=True)
        for rep in range(repeats):
            order = policies if rep % 2 == 0 else policies[::-1]
            for policy in order:
                measure_policy(policy, workers[policy], conditions, jobs, times)
            print(f"  repeat {rep + 1}/{repeats} done ({time.perf_counter() - t_all:.0f} s)", flush=True)
    finally:
        for proc in workers.values():
            _stop(proc)

    out: dict[str, object] = {"cores": cores}
    for policy in policies:
        quiet = median(times[(policy, "quiet")])
        key = policy.replace("-", "_")
        out[f"{key}_threads"] = records[policy]["torch_threads"]
        out[f"{key}_quiet_ms"] = quiet
        parts = [f"quiet {quiet:7.1f} ms/step"]
        for condition in conditions[1:]:
            ms = median(times[(policy, condition)])
            out[f"{key}_{condition}_ms"] = ms
            out[f"{key}_{condition}_ratio"] = ms / quiet
            label = "beside a busy loop" if condition == "busy" else "beside a second run"
            parts.append(f"{label} {ms:7.1f} ms ({ms / quiet:4.2f}x)")
        print(f"{policy:>14} ({records[policy]['torch_threads']} threads): " + ", ".join(parts))
    if "torch-default" in policies and "deftsim" in policies:
        for condition in conditions:
            gain = median(times[("torch-default", condition)]) / median(times[("deftsim", condition)])
            out[f"{condition}_gain"] = gain
        print("gain of the deftsim policy over torch's default (time ratio): "
              + ", ".join(f"{c} {out[f'{c}_gain']:.2f}x" for c in conditions))
    out["wall_s"] = time.perf_counter() - t_all
    print(result_line(**out))


if __name__ == "__main__":
    main()
