"""Uplink bandwidth allocation: the FDMA shares of one edge server's band among its devices.

The protocol calls ``strategy.shares(devices, ctx)`` once per server and round with that
server's uploading devices and a :class:`BandwidthContext` whose arrays are aligned with
``devices``; it gets fractions b_k >= 0 with sum_k b_k = 1 (device k sends over b_k B Hz).

Rate model: with a share b of the band B, the noise power is N0 NF b B, so the SNR is x / b
where x is the SNR over the whole band, and the rate is

.. math::
    g(b) = b B \\log_2(1 + x / b),

increasing and concave in b, g(0+) = 0 (Shannon; fading averaged out).

Built-in strategies: ``equal``, ``proportional``, ``min_max_latency``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..budgets import bandwidth_shares
from .registry import Strategy, register

_LN2 = math.log(2.0)
BISECTION_STEPS = 64
"""Bisection steps of each b_k(T) in :class:`MinMaxLatency`: the bracket [0, 1] shrinks to
2^-64, below the float64 spacing of shares >= 2^-11 and within 2^-64 of smaller ones."""
OUTER_STEPS = 200
"""Most Illinois steps on T in :class:`MinMaxLatency` (it converges superlinearly: about ten)."""
SUM_TOLERANCE = 1e-14
"""Stop when 1 - 1e-14 <= sum_k b_k(T) <= 1."""


@dataclass(frozen=True, eq=False)
class BandwidthContext:
    """What a bandwidth strategy may look at; arrays aligned with the ``devices`` argument.
    Compared by identity (it holds arrays).

    Attributes
    ----------
    weights : ndarray
        ``channel.uplink_shares`` weights of the devices (>= 0).
    payload_bits : ndarray
        Bits each device uploads (> 0).
    mean_snr_over_band : ndarray
        Linear mean SNR of each device if it used the whole band B (fading averaged out).
    bandwidth_hz : float
        B, the server's uplink band [Hz].
    ready_s : ndarray or None
        When each device starts its upload, relative to now [s] (None: all now, zeros).
    """

    weights: np.ndarray
    payload_bits: np.ndarray
    mean_snr_over_band: np.ndarray
    bandwidth_hz: float
    ready_s: Optional[np.ndarray] = None

    def __post_init__(self):
        n = len(self.weights)
        for name in ("payload_bits", "mean_snr_over_band") + (("ready_s",) if self.ready_s is not None else ()):
            if len(getattr(self, name)) != n:
                raise ValueError(f"BandwidthContext.{name} has {len(getattr(self, name))} entries, weights has {n}")

    @property
    def ready(self) -> np.ndarray:
        """``ready_s`` as a float64 array (zeros when unknown) [s]."""
        if self.ready_s is None:
            return np.zeros(len(self.weights))
        return np.asarray(self.ready_s, dtype=np.float64)


class BandwidthStrategy(Strategy):
    """Base of bandwidth strategies: :meth:`shares` returns float64 fractions summing to 1."""

    def shares(self, devices: Sequence[int], ctx: BandwidthContext) -> np.ndarray:
        raise NotImplementedError


def _check_count(devices: Sequence[int], ctx: BandwidthContext, name: str) -> int:
    k = len(devices)
    if k == 0:
        raise ValueError(f"{name}: no devices to share the band among")
    if len(ctx.weights) != k:
        raise ValueError(f"{name}: {k} devices but {len(ctx.weights)} context entries")
    return k


@register("bandwidth", "equal")
class Equal(BandwidthStrategy):
    """b_k = 1 / K."""

    def shares(self, devices, ctx):
        k = _check_count(devices, ctx, "equal")
        return np.full(k, 1.0 / k)


@register("bandwidth", "proportional")
class Proportional(BandwidthStrategy):
    """b_k = w_k / sum_j w_j with w the ``channel.uplink_shares`` weights
    (:func:`netsim.budgets.bandwidth_shares`, the FedAvg protocol's allocation)."""

    def shares(self, devices, ctx):
        _check_count(devices, ctx, "proportional")
        return np.asarray(bandwidth_shares([float(w) for w in ctx.weights]), dtype=np.float64)


def rate_bps(share: np.ndarray, snr_over_band: np.ndarray, bandwidth_hz: float) -> np.ndarray:
    """g(b) = b B log2(1 + x / b) [bit/s] (0 at b = 0)."""
    share = np.asarray(share, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = share * bandwidth_hz * np.log1p(snr_over_band / share) / _LN2
    return np.where(share > 0, r, 0.0)


def finish_times_s(share: np.ndarray, ctx: BandwidthContext) -> np.ndarray:
    """ready_k + S_k / g_k(b_k) [s]: when each device's upload ends with shares b."""
    with np.errstate(divide="ignore"):
        return ctx.ready + np.asarray(ctx.payload_bits, dtype=np.float64) / rate_bps(
            share, np.asarray(ctx.mean_snr_over_band, dtype=np.float64), ctx.bandwidth_hz)


@register("bandwidth", "min_max_latency")
class MinMaxLatency(BandwidthStrategy):
    """Shares that minimise the latest upload end max_k (r_k + S_k / g_k(b_k)) subject to
    sum_k b_k = 1, by equalising the finish times.

    Each finish time decreases in b_k, so at the optimum all are equal to some T, with
    b_k(T) = g_k^{-1}(S_k / (T - r_k)). sum_k b_k(T) decreases in T; T is found by bisection
    between T_lo = max_k (r_k + S_k / g_k(1)) (sum >= 1) and T_hi = max_k (r_k + S_k / g_k(1/K))
    (sum <= 1) with the Illinois variant of regula falsi (Dowell & Jarratt 1971), each b_k(T)
    by bisection of the increasing rate g_k on [0, 1] (clipped at 1). The shares at the upper
    end of the final bracket (sum <= 1) are returned normalised to sum 1."""

    def shares(self, devices, ctx):
        k = _check_count(devices, ctx, "min_max_latency")
        bits = np.asarray(ctx.payload_bits, dtype=np.float64)
        snr = np.asarray(ctx.mean_snr_over_band, dtype=np.float64)
        ready = ctx.ready
        band = float(ctx.bandwidth_hz)
        for name, arr, ok in (("payload_bits", bits, bits > 0), ("mean_snr_over_band", snr, snr > 0),
                              ("ready_s", ready, ready >= 0)):
            bad = ~(np.isfinite(arr) & ok)
            if bad.any():
                i = int(np.argmax(bad))
                raise ValueError(f"min_max_latency: {name}={float(arr[i])!r} for device {devices[i]}; allowed: a finite "
                                 f"number {'>= 0' if name == 'ready_s' else '> 0'}")
        if not (math.isfinite(band) and band > 0):
            raise ValueError(f"min_max_latency: bandwidth_hz={band!r}; allowed: a finite number > 0")
        if k == 1:
            return np.ones(1)
        full_rate = rate_bps(np.ones(k), snr, band)
        lo = float(np.max(ready + bits / full_rate))
        hi = float(np.max(ready + bits / rate_bps(np.full(k, 1.0 / k), snr, band)))
        best = self._shares_at(hi, bits, snr, ready, band, full_rate)
        f_hi = best.sum() - 1.0
        f_lo = self._shares_at(lo, bits, snr, ready, band, full_rate).sum() - 1.0
        side = 0
        for _ in range(OUTER_STEPS):
            if f_hi >= -SUM_TOLERANCE or not f_lo > 0 or hi - lo <= 4 * math.ulp(hi):
                break
            t = hi - f_hi * (hi - lo) / (f_hi - f_lo)          # regula falsi on sum_k b_k(T) - 1
            if not lo < t < hi:
                t = 0.5 * (lo + hi)
            b = self._shares_at(t, bits, snr, ready, band, full_rate)
            f = b.sum() - 1.0
            if f <= 0:
                hi, f_hi, best = t, f, b
                if side == -1:
                    f_lo *= 0.5                                # Illinois: the kept end's value halves
                side = -1
            else:
                lo, f_lo = t, f
                if side == 1:
                    f_hi *= 0.5
                side = 1
        return best / best.sum()

    @staticmethod
    def _shares_at(t_s: float, bits, snr, ready, band, full_rate) -> np.ndarray:
        """b_k(T): the smallest shares with which every device ends by T (1 where even the
        whole band is too slow: the sum is then > 1 anyway for K >= 2)."""
        with np.errstate(divide="ignore"):
            need = bits / (t_s - ready)            # required rate [bit/s]
        feasible = (t_s > ready) & (need <= full_rate)
        lo, hi = np.zeros_like(bits), np.ones_like(bits)
        for _ in range(BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            fast = rate_bps(mid, snr, band) >= need
            hi = np.where(fast, mid, hi)
            lo = np.where(fast, lo, mid)
        return np.where(feasible, hi, 1.0)
