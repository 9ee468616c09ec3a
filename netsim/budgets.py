"""Pure functions that turn work into simulated time and energy.

These are the only places where simulated durations are made: compute time from counted
FLOPs and the device's throughput, radio time from bits and link rate (``netsim.channel``).
The host clock is never read.
"""
from __future__ import annotations


def compute_time_s(flops: float, flops_per_s: float) -> float:
    """T = FLOPs / f [s], with f the device's sustained throughput [FLOP/s]."""
    if flops_per_s <= 0:
        raise ValueError(f"flops_per_s must be > 0, got {flops_per_s}")
    return flops / flops_per_s


def energy_j(power_w: float, duration_s: float) -> float:
    """E = P T [J] for a constant power draw P [W] over T [s]."""
    return power_w * duration_s


def fits_in_memory(required_bytes: float, available_bytes: float) -> bool:
    return required_bytes <= available_bytes


def bandwidth_shares(weights: list[float]) -> list[float]:
    """Normalised FDMA shares beta_k = w_k / sum_j w_j; they sum to 1 (never more)."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"bandwidth weights must have a positive sum, got {weights}")
    return [w / total for w in weights]
