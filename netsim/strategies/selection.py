"""Device selection: which k of a round's candidate devices take part.

The protocol calls ``strategy.select(candidates, k, ctx)`` with the indices of the devices that
may take part and a :class:`SelectionContext`; it gets k device indices back, sorted ascending
(all candidates when k >= their number, without drawing any random number).

Built-in strategies: ``uniform``, ``channel_aware``, ``compute_aware``, ``power_of_choice``,
``age_based`` (see ``docs/extending.md`` for the formulas and references).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from pydantic import Field

from ..spec_base import Int, PositiveFloat, Spec
from .registry import Strategy, StrategyError, register


@dataclass(frozen=True, eq=False)
class SelectionContext:
    """What a selection strategy may look at. Arrays are indexed by device index and cover all
    devices of the scenario (not only the candidates). Compared by identity (it holds arrays).

    Attributes
    ----------
    round : int
        The round being selected for (1-based).
    now_s : float
        Simulated time of the selection [s].
    rng : numpy.random.Generator
        The run's selection stream (``child_rng(train_seed, 0, 4)``): the only randomness a
        strategy may use.
    mean_uplink_snr_db : ndarray
        Mean uplink SNR over the whole uplink band, fading averaged out [dB] (-inf: no signal).
    compute_flops_per_s : ndarray
        Sustained training throughput [FLOP/s].
    last_round : ndarray
        Round in which the device last contributed an update (-1: never).
    last_loss : ndarray
        Last local training loss the device reported (NaN: unknown).
    num_examples : ndarray
        Size of the device's local data set.
    """

    round: int
    now_s: float
    rng: np.random.Generator
    mean_uplink_snr_db: np.ndarray
    compute_flops_per_s: np.ndarray
    last_round: np.ndarray
    last_loss: np.ndarray
    num_examples: np.ndarray

    def __post_init__(self):
        n = len(self.mean_uplink_snr_db)
        for name in ("compute_flops_per_s", "last_round", "last_loss", "num_examples"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"SelectionContext.{name} has {len(getattr(self, name))} entries, "
                                 f"mean_uplink_snr_db has {n}: every array covers all devices")

    @property
    def num_devices(self) -> int:
        return len(self.mean_uplink_snr_db)


class SelectionStrategy(Strategy):
    """Base of selection strategies.

    :meth:`select` checks its inputs, returns every candidate when k >= their number, and
    otherwise asks :meth:`choose` for k distinct candidates, which it checks and sorts.
    Subclasses implement :meth:`choose` (or override :meth:`select` entirely)."""

    def select(self, candidates: Sequence[int], k: int, ctx: SelectionContext) -> list[int]:
        """k device indices out of ``candidates``, sorted ascending (all when k >= len)."""
        cand = np.asarray(list(candidates), dtype=np.int64)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"{self.strategy_name or type(self).__name__}: k={k!r}; allowed: an integer >= 0")
        if cand.size and (cand.min() < 0 or cand.max() >= ctx.num_devices):
            raise ValueError(f"{self.strategy_name}: candidate indices must lie in [0, {ctx.num_devices}), "
                             f"got {cand.tolist()}")
        if len(np.unique(cand)) != cand.size:
            raise ValueError(f"{self.strategy_name}: candidates repeat a device: {cand.tolist()}")
        if k >= cand.size:
            return sorted(int(c) for c in cand)
        if k == 0:
            return []
        picked = [int(c) for c in np.asarray(self.choose(cand, int(k), ctx)).ravel()]
        if len(picked) != k or len(set(picked)) != k or not set(picked) <= set(cand.tolist()):
            raise StrategyError(f"selection strategy {self.strategy_name or type(self).__name__!r} returned "
                                f"{picked}: expected {k} distinct devices out of the candidates {cand.tolist()}")
        return sorted(picked)

    def choose(self, candidates: np.ndarray, k: int, ctx: SelectionContext) -> np.ndarray:
        """k distinct entries of ``candidates`` (0 < k < len(candidates)), in any order."""
        raise NotImplementedError(f"{type(self).__name__} implements neither select nor choose")

    def check_k(self, k: Optional[int], num_devices: int) -> None:
        """Raise ValueError (naming the parameter) when the strategy cannot select ``k`` of
        ``num_devices`` devices (None: all); a scenario cross-check. Default: always can."""


def _top_k(candidates: np.ndarray, score: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """The k candidates of highest score; NaN counts as -inf; ties broken uniformly at random
    (a random permutation of the candidates from ``rng``, then a stable sort)."""
    order = rng.permutation(candidates.size)
    s = np.where(np.isnan(score), -np.inf, score)[order]
    return candidates[order[np.argsort(-s, kind="stable")[:k]]]


@register("selection", "uniform")
class Uniform(SelectionStrategy):
    """k candidates uniformly at random without replacement: the entries
    ``rng.choice(len(candidates), size=k, replace=False)`` of the candidates (McMahan et al.
    2017), exactly the draws the FedAvg protocol has always made."""

    def choose(self, candidates, k, ctx):
        return candidates[ctx.rng.choice(len(candidates), size=k, replace=False)]


@register("selection", "channel_aware")
class ChannelAware(SelectionStrategy):
    """The k candidates with the best mean uplink SNR.

    With ``softmax_temperature_db`` = T set, k candidates are drawn without replacement with
    probabilities proportional to exp(SNR_dB / T) (successive sampling), by the Gumbel-top-k
    trick (Kool, van Hoof & Welling 2019): the k largest SNR_dB / T + G_i, G_i ~ Gumbel(0, 1)."""

    class Params(Spec):
        softmax_temperature_db: Optional[PositiveFloat] = Field(
            None, ge=1e-3, le=1e3, description="T [dB]: sample with probabilities ~ exp(SNR_dB / T) "
            "(null: deterministic top-k)")

    def choose(self, candidates, k, ctx):
        snr = np.asarray(ctx.mean_uplink_snr_db, dtype=np.float64)[candidates]
        t = self.params.softmax_temperature_db
        if t is not None:
            snr = np.where(np.isnan(snr), -np.inf, snr) / t + ctx.rng.gumbel(size=candidates.size)
        return _top_k(candidates, snr, k, ctx.rng)


@register("selection", "compute_aware")
class ComputeAware(SelectionStrategy):
    """The k candidates with the highest compute throughput (ties at random)."""

    def choose(self, candidates, k, ctx):
        return _top_k(candidates, np.asarray(ctx.compute_flops_per_s, dtype=np.float64)[candidates], k, ctx.rng)


@register("selection", "power_of_choice")
class PowerOfChoice(SelectionStrategy):
    """Power-of-choice (Cho, Wang & Joshi 2020): draw d >= k candidates uniformly without
    replacement, keep the k with the highest last local loss; a device whose loss is unknown
    comes first; ties keep the (random) draw order. d is capped at the number of candidates."""

    class Params(Spec):
        d: Int = Field(10, ge=1, le=1_000_000, description="size of the uniformly drawn candidate set (d >= k)")

    def check_k(self, k, num_devices):
        if k is not None and k < num_devices and self.params.d < k:
            raise ValueError(f"strategies.selection.params.d={self.params.d} must be >= training.devices_per_round"
                             f"={k}: power of choice keeps k of d uniformly drawn candidates")

    def choose(self, candidates, k, ctx):
        if self.params.d < k:
            raise ValueError(f"power_of_choice: d={self.params.d} < k={k}; allowed: d >= k")
        d = min(self.params.d, candidates.size)
        drawn = candidates[ctx.rng.choice(candidates.size, size=d, replace=False)]
        loss = np.asarray(ctx.last_loss, dtype=np.float64)[drawn]
        key = np.where(np.isnan(loss), np.inf, loss)
        return drawn[np.argsort(-key, kind="stable")[:k]]


@register("selection", "age_based")
class AgeBased(SelectionStrategy):
    """Age of update (Yang, Arafa, Quek & Poor 2020, age-based scheduling): the k candidates with
    the largest age round - last_round (a device that never contributed has age round + 1);
    ties at random."""

    def choose(self, candidates, k, ctx):
        age = ctx.round - np.asarray(ctx.last_round, dtype=np.float64)[candidates]
        return _top_k(candidates, age, k, ctx.rng)

