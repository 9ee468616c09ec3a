"""Helpers shared by the benchmark scripts (not a benchmark itself)."""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/x.py` from anywhere
    sys.path.insert(0, str(ROOT))


def set_threads() -> int:
    """torch threads: ``DEFTSIM_TORCH_THREADS`` if set, else the CPU count (at most 16)."""
    import torch

    threads = int(os.environ.get("DEFTSIM_TORCH_THREADS") or min(os.cpu_count() or 1, 16))
    torch.set_num_threads(threads)
    return threads


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
