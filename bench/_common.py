"""Helpers shared by the benchmark scripts (not a benchmark itself)."""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/x.py` from anywhere
    sys.path.insert(0, str(ROOT))


def set_threads() -> int:
    """Apply deftsim's thread policy (deftsim/threads.py: ``DEFTSIM_TORCH_THREADS`` if set, else
    the available physical cores up to 8; OpenMP passive wait, which needs this to run before
    torch is imported); returns the torch thread count."""
    from deftsim.threads import configure_threads, describe

    record = configure_threads(None)
    if record["note"]:
        print(describe(record), file=sys.stderr)
    return int(record["torch_threads"])


def small_scenario(devices: int, batch_size: int = 4, tokens: int = 32, **sections: Any):
    """A BBC News LoRA scenario with ``devices`` devices (IID split) and the given sections
    merged over the defaults."""
    from netsim.scenario import Scenario

    spec: dict[str, Any] = {
        "name": "bench",
        "devices": [{"count": devices}],
        "model": {"max_length_tokens": tokens},
        "data": {"partition": "iid", "max_test_examples": 64, "min_examples_per_device": 1},
        "training": {"batch_size": batch_size, "local_steps": 1, "learning_rate": 1e-3},
    }
    for section, values in sections.items():
        spec[section] = {**spec.get(section, {}), **values} if isinstance(values, dict) else values
    return Scenario.model_validate(spec)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def matmul_peak_gflops(rows: int = 4096, inner: int = 384, cols: int = 1536, seconds: float = 1.0) -> float:
    """Best float32 GFLOP/s of one large ``torch.mm`` (rows x inner @ inner x cols, the shape of
    a feed-forward layer over a combined batch) on this machine and thread count: the roofline
    that a compute-bound step cannot beat."""
    import torch

    a, b = torch.randn(rows, inner), torch.randn(inner, cols)
    flops = 2.0 * rows * inner * cols
    best, deadline = 0.0, time.perf_counter() + seconds
    torch.mm(a, b)
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, flops / (time.perf_counter() - t0) / 1e9)
    return best


def median(values: list[float]) -> float:
    return statistics.median(values)


F32_LOSS_RTOL = 1e-4
"""float32 losses of two execution strategies agree to this relative tolerance: mixed-sign
rounding errors grow like sqrt(n) u = 2.4e-6 for the 1536-term reductions of MiniLM, times a
forward conditioning of about 5 (tests/fomo/test_fomo_execution.py derives and tests it)."""

F32_UPDATE_REL_L2_TOL = 1e-2
"""float32 AdamW updates: |u_a - u_b|_2 / |u_a|_2 over all devices' update tensors. Empirical,
not derived: AdamW moves a coordinate by lr * g / (|g| + eps), so a rounding flip of a
near-zero gradient changes that coordinate by up to 2 lr, and how many coordinates sit there
has no bound. Measured between a float32 and a float64 run (a larger rounding gap than any
two summation orders): 1e-4 to 5e-4, 20x inside this tolerance."""


def same_costs(results_a: list, results_b: list) -> bool:
    """Same devices, FLOPs, peak memory, upload bytes and example counts: what the simulated
    timeline is made of; identical on any machine."""
    def costs(r):
        return (r.device_id, r.flops, r.peak_memory_bytes, r.update_bytes, r.num_examples)
    return len(results_a) == len(results_b) and [costs(a) for a in results_a] == [costs(b) for b in results_b]


def loss_rel_diff(results_a: list, results_b: list) -> float:
    """Largest |loss_a - loss_b| / |loss_a| over the devices."""
    return max(abs(a.loss - b.loss) / abs(a.loss) for a, b in zip(results_a, results_b))


def update_rel_l2(results_a: list, results_b: list) -> float:
    """|u_a - u_b|_2 / |u_a|_2 over every update tensor of every device (float64 sums)."""
    num = den = 0.0
    for a, b in zip(results_a, results_b):
        for name, tensor in a.update.items():
            ref = tensor.double()
            num += float(((ref - b.update[name].double()) ** 2).sum())
            den += float((ref ** 2).sum())
    return (num / den) ** 0.5 if den > 0 else num ** 0.5


def max_abs_diff(results_a: list, results_b: list) -> float:
    """Largest |a - b| over every update tensor of two lists of LocalResult."""
    worst = 0.0
    for a, b in zip(results_a, results_b):
        for name, tensor in a.update.items():
            worst = max(worst, float((tensor - b.update[name]).abs().max()))
    return worst


def result_line(**values: Any) -> str:
    """``RESULT key=value ...`` (floats with 4 significant digits)."""
    parts = []
    for key, value in values.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        parts.append(f"{key}={value}")
    return "RESULT " + " ".join(parts)


def bare_simpy_timeouts_s(processes: int, timeouts_each: int) -> float:
    """Wall seconds of a bare SimPy run: ``processes`` processes, each a loop of
    ``timeouts_each`` ``env.timeout`` with distinct delays (so the event heap holds them all
    interleaved): the floor under any SimPy protocol with that many events."""
    import simpy

    env = simpy.Environment()

    def proc(env, k):
        delay = 1.0 + k * 1e-6
        for _ in range(timeouts_each):
            yield env.timeout(delay)

    t0 = time.perf_counter()
    for k in range(processes):
        env.process(proc(env, k))
    env.run()
    return time.perf_counter() - t0


def min_of_alternating(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Best wall time of each named run over ``repeats`` rounds, the order rotated every round
    (run i first in round i), so that load from other processes and warm-up effects fall on
    every run alike; min-of-N discards the rounds that other processes slowed down."""
    return min_of_alternating_clocks(runs, repeats)["wall"]


def min_of_alternating_clocks(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, float]]:
    """As :func:`min_of_alternating`, for two clocks: ``{"wall": {name: s}, "cpu": {name: s}}``,
    ``cpu`` being this process's CPU time (``time.process_time``, all its threads), which
    other processes' load disturbs less than wall time (they take cores, not this process's
    instructions; caches and memory bandwidth they still share)."""
    names = list(runs)
    best = {clock: {name: float("inf") for name in names} for clock in ("wall", "cpu")}
    for rep in range(repeats):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            c0, t0 = time.process_time(), time.perf_counter()
            runs[name]()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            best["wall"][name] = min(best["wall"][name], wall)
            best["cpu"][name] = min(best["cpu"][name], cpu)
    return best


def load_average() -> str:
    """The host's 1/5/15-minute load averages and CPU count, e.g. ``1.7/1.8/1.9 on 2 CPUs``
    (how busy the machine was while a benchmark ran)."""
    import os

    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.2f}/{five:.2f}/{fifteen:.2f} on {os.cpu_count()} CPUs"
