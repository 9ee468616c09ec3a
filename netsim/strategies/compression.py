"""Update compression: what a device sends instead of its float32 update, and its size.

The protocol calls ``compressor.compress(device, vector, rng)`` on the device's update (a
float64 flat vector of q values) with that device's compression stream; it gets back the
vector the edge decodes and the payload in bits, which sets the upload time.
``payload_bits(q)`` gives the same payload before the values are known (the cost of a job).

Built-in strategies: ``none``, ``qsgd``, ``topk``.
"""
from __future__ import annotations

import math

import numpy as np
from pydantic import Field

from ..spec_base import Int, PositiveFloat, Spec
from .registry import Strategy, register

FLOAT_BITS = 32
"""Bits of one transmitted real number (float32), of a value or of a norm."""


def _check_vector(name: str, device: int, vector) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"{name}: the update of device {device} has shape {v.shape}; allowed: a flat vector")
    if not np.all(np.isfinite(v)):
        i = int(np.argmax(~np.isfinite(v)))
        raise ValueError(f"{name}: the update of device {device} has value {float(v[i])!r} at position {i}; "
                         "allowed: finite numbers")
    return v


class Compressor(Strategy):
    """Base of compression strategies."""

    def compress(self, device: int, vector: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """(decoded vector, payload bits) of ``device``'s update ``vector``."""
        raise NotImplementedError

    def payload_bits(self, q: int) -> int:
        """Payload of an update of q values [bit]."""
        raise NotImplementedError


@register("compression", "none")
class NoCompression(Compressor):
    """The update itself as float32: payload 32 q bits; the decoded vector is the input."""

    def compress(self, device, vector, rng):
        v = _check_vector("none", device, vector)
        return v, self.payload_bits(v.size)

    def payload_bits(self, q):
        return FLOAT_BITS * int(q)


@register("compression", "qsgd")
class QSGD(Compressor):
    """QSGD stochastic quantisation (Alistarh et al. 2017) with s = 2^b - 1 levels:

    Q(v)_i = ||v||_2 sign(v_i) xi_i / s, xi_i = l + 1 with probability r_i - l, else l, where
    r_i = s |v_i| / ||v||_2 and l = floor(r_i). Unbiased, E Q(v) = v, with variance
    E ||Q(v) - v||^2 <= min(q / s^2, sqrt(q) / s) ||v||^2 (Lemma 3.1). Payload: the norm as a
    float32 plus b bits of level and 1 sign bit per value, 32 + q (b + 1) bits.
    """

    class Params(Spec):
        bits: Int = Field(8, ge=1, le=31, description="b: bits per value (s = 2^b - 1 levels) besides the sign")

    @property
    def levels(self) -> int:
        return (1 << self.params.bits) - 1

    def payload_bits(self, q):
        return FLOAT_BITS + int(q) * (self.params.bits + 1)

    def compress(self, device, vector, rng):
        v = _check_vector("qsgd", device, vector)
        norm = float(np.linalg.norm(v))
        if norm == 0.0:
            return np.zeros_like(v), self.payload_bits(v.size)
        s = self.levels
        r = np.minimum(np.abs(v) * (s / norm), float(s))   # the cap only removes a rounding overshoot
        low = np.floor(r)
        level = low + (rng.random(v.size) < (r - low))
        return np.copysign(level * (norm / s), v), self.payload_bits(v.size)


@register("compression", "topk")
class TopK(Compressor):
    """Top-k sparsification with error feedback (Stich, Cordonnier & Jaggi 2018).

    Device k keeps a residual e (0 at first), sends the k = ceil(fraction q) entries of largest
    magnitude of a = v + e and keeps e <- a - sent. So sum over rounds of what was sent plus the
    final residual equals the sum of the updates. Payload: k (32 + ceil(log2 q)) bits (a float32
    value and an index per entry). Ties among equal magnitudes follow numpy's introselect.
    The residuals (q float64 per device that has sent) live in this instance, one per run.
    """

    class Params(Spec):
        fraction: PositiveFloat = Field(0.01, le=1.0, description="share of the values sent per update")

    def __init__(self, params=None):
        super().__init__(params)
        self.residual: dict[int, np.ndarray] = {}

    def kept(self, q: int) -> int:
        """k = min(q, max(1, ceil(fraction q))) entries sent per update of q values."""
        return min(int(q), max(1, math.ceil(self.params.fraction * int(q))))

    def payload_bits(self, q):
        q = int(q)
        return self.kept(q) * (FLOAT_BITS + math.ceil(math.log2(q))) if q > 0 else 0

    def compress(self, device, vector, rng):
        v = _check_vector("topk", device, vector)
        e = self.residual.get(device)
        if e is None:
            acc = v.copy()
        elif e.shape != v.shape:
            raise ValueError(f"topk: the update of device {device} has {v.size} values, its residual {e.size}")
        else:
            acc = v + e
        if v.size == 0:
            return acc, 0
        k = self.kept(v.size)
        idx = np.argpartition(np.abs(acc), v.size - k)[v.size - k:]
        sent = np.zeros_like(acc)
        sent[idx] = acc[idx]
        acc[idx] = 0.0
        self.residual[device] = acc
        return sent, self.payload_bits(v.size)
