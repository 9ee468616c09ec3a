"""Server-side aggregation: how updates are weighted and how their mean moves the global model.

The protocol asks the aggregator for the weights of the updates it aggregates,
``weights(num_examples, staleness)``, forms the weighted sum of the updates
delta = sum_k w_k delta_k (delta_k = local model - model it started from, as a float64 flat
vector) and adds ``server_step(delta)`` to the global flat state. An aggregator whose
``identity_step`` is True returns delta unchanged (FedAvg, FedProx), so the protocol can keep
its own tensor path for the mean.

Built-in strategies: ``fedavg``, ``fedprox``, ``fedadam``, ``fedyogi``, ``fedbuff``.
"""
from __future__ import annotations

from typing import Literal, Optional

import numpy as np
from pydantic import Field

from ..spec_base import Float, Int, NonNegFloat, PositiveFloat, Spec
from .registry import Strategy, register

StalenessKind = Literal["constant", "polynomial", "hinge"]


def staleness_weight(kind: str, tau, a: float = 0.5, b: float = 4.0):
    """Staleness function s(tau) of an update trained on a model tau versions old (Xie, Koyejo
    & Gupta 2019, FedAsync; Nguyen et al. 2022, FedBuff):

    - ``constant``: s = 1;
    - ``polynomial``: s = (1 + tau)^-a;
    - ``hinge``: s = 1 if tau <= b else 1 / (a (tau - b) + 1).

    ``tau`` a number or an array (>= 0); returns the same shape (a float for a scalar).
    FedAsync mixes x <- (1 - alpha_t) x + alpha_t x_new with alpha_t = alpha s(tau).
    """
    t = np.asarray(tau, dtype=np.float64)
    if not np.all(np.isfinite(t) & (t >= 0)):
        raise ValueError(f"staleness tau={tau!r}; allowed: finite numbers >= 0")
    if kind == "constant":
        out = np.ones_like(t)
    elif kind == "polynomial":
        out = (1.0 + t) ** (-float(a))
    elif kind == "hinge":
        out = np.where(t <= b, 1.0, 1.0 / (float(a) * (t - float(b)) + 1.0))
    else:
        raise ValueError(f"staleness kind {kind!r}; allowed: constant, polynomial, hinge")
    return float(out) if out.ndim == 0 else out


def _check_inputs(num_examples, staleness) -> tuple[np.ndarray, np.ndarray]:
    n = np.asarray(num_examples, dtype=np.float64)
    s = np.asarray(staleness, dtype=np.float64)
    if n.ndim != 1 or s.shape != n.shape:
        raise ValueError(f"num_examples (shape {n.shape}) and staleness (shape {s.shape}) must be 1-D arrays "
                         "of the same length")
    if not (np.all(np.isfinite(n) & (n >= 0)) and n.sum() > 0):
        raise ValueError(f"num_examples={n.tolist()}; allowed: finite numbers >= 0 with a positive sum")
    if not np.all(np.isfinite(s) & (s >= 0)):
        raise ValueError(f"staleness={s.tolist()}; allowed: finite numbers >= 0")
    return n, s


class Aggregator(Strategy):
    """Base of aggregation strategies (FedAvg behaviour).

    Attributes
    ----------
    local_prox_mu : float
        mu of the proximal term mu/2 ||w - w_start||^2 the trainer adds to the local loss
        (0: none).
    identity_step : bool
        True when :meth:`server_step` returns its argument unchanged.
    """

    local_prox_mu: float = 0.0
    identity_step: bool = True

    def weights(self, num_examples: np.ndarray, staleness: np.ndarray) -> np.ndarray:
        """w_k = n_k / sum_j n_j (McMahan et al. 2017); staleness ignored."""
        n, _ = _check_inputs(num_examples, staleness)
        return n / n.sum()

    def server_step(self, delta: np.ndarray) -> np.ndarray:
        """The vector to add to the global flat state, given the weighted mean update."""
        return delta


@register("aggregation", "fedavg")
class FedAvg(Aggregator):
    """FedAvg (McMahan et al. 2017): w_k = n_k / sum_j n_j, x <- x + delta."""


@register("aggregation", "fedprox")
class FedProx(Aggregator):
    """FedProx (Li et al. 2020): FedAvg weights and step; each device minimises
    F_k(w) + mu/2 ||w - w_start||^2 (``local_prox_mu``)."""

    class Params(Spec):
        mu: PositiveFloat = Field(0.01, le=1e6, description="proximal coefficient mu of the local loss")

    def __init__(self, params=None):
        super().__init__(params)
        self.local_prox_mu = float(self.params.mu)


class _AdaptiveServer(Aggregator):
    """Shared state of FedAdam / FedYogi (Reddi et al. 2021, Algorithm 2): FedAvg weights,
    m <- beta1 m + (1 - beta1) delta, v updated by :meth:`_second_moment`, and the step
    eta m / (sqrt(v) + tau). m starts at 0, v at tau^2 (the paper's v_{-1} >= tau^2)."""

    identity_step = False

    class Params(Spec):
        server_lr: PositiveFloat = Field(0.01, le=1e3, description="server learning rate eta")
        beta1: NonNegFloat = Field(0.9, lt=1.0, description="first-moment decay beta1 in [0, 1)")
        beta2: NonNegFloat = Field(0.99, lt=1.0, description="second-moment decay beta2 in [0, 1)")
        tau: PositiveFloat = Field(1e-3, le=10.0, description="adaptivity tau (added to sqrt(v))")

    def __init__(self, params=None):
        super().__init__(params)
        self.m: Optional[np.ndarray] = None
        self.v: Optional[np.ndarray] = None

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def server_step(self, delta):
        d = np.asarray(delta, dtype=np.float64)
        if d.ndim != 1 or not np.all(np.isfinite(d)):
            raise ValueError(f"{self.strategy_name}: delta must be a finite 1-D float64 vector, got shape {d.shape}")
        p = self.params
        if self.m is None:
            self.m = np.zeros_like(d)
            self.v = np.full_like(d, p.tau ** 2)
        elif self.m.shape != d.shape:
            raise ValueError(f"{self.strategy_name}: delta has {d.size} values, the server state {self.m.size}")
        self.m = p.beta1 * self.m + (1.0 - p.beta1) * d
        self.v = self._second_moment(self.v, d * d)
        return p.server_lr * self.m / (np.sqrt(self.v) + p.tau)


@register("aggregation", "fedadam")
class FedAdam(_AdaptiveServer):
    """FedAdam: v <- beta2 v + (1 - beta2) delta^2."""

    def _second_moment(self, v, d2):
        return self.params.beta2 * v + (1.0 - self.params.beta2) * d2


@register("aggregation", "fedyogi")
class FedYogi(_AdaptiveServer):
    """FedYogi: v <- v - (1 - beta2) delta^2 sign(v - delta^2) (Zaheer et al. 2018's Yogi)."""

    def _second_moment(self, v, d2):
        return v - (1.0 - self.params.beta2) * d2 * np.sign(v - d2)


@register("aggregation", "fedbuff")
class FedBuff(Aggregator):
    """FedBuff (Nguyen et al. 2022): the server aggregates once K updates are buffered, with
    weights w_k = s(tau_k) / K (s: :func:`staleness_weight`, tau_k the staleness of update k)
    and step x <- x + eta_g delta."""

    class Params(Spec):
        buffer_size: Int = Field(10, ge=1, le=1_000_000, description="K: updates per server step")
        server_lr: PositiveFloat = Field(1.0, le=1e3, description="server learning rate eta_g")
        staleness: StalenessKind = Field("polynomial", description="staleness weighting s(tau)")
        poly_a: NonNegFloat = Field(0.5, le=100.0, description="polynomial: s = (1 + tau)^-a")
        hinge_a: NonNegFloat = Field(10.0, le=1e6, description="hinge: s = 1 / (a (tau - b) + 1) for tau > b")
        hinge_b: Float = Field(4.0, ge=0.0, le=1e9, description="hinge: s = 1 for tau <= b")

    @property
    def identity_step(self) -> bool:   # type: ignore[override]
        return self.params.server_lr == 1.0

    def staleness_weight(self, tau):
        p = self.params
        if p.staleness == "hinge":
            return staleness_weight("hinge", tau, p.hinge_a, p.hinge_b)
        return staleness_weight(p.staleness, tau, p.poly_a)

    def weights(self, num_examples, staleness):
        _, s = _check_inputs(num_examples, staleness)
        return np.asarray(self.staleness_weight(s), dtype=np.float64) / self.params.buffer_size

    def server_step(self, delta):
        return delta if self.identity_step else self.params.server_lr * np.asarray(delta, dtype=np.float64)
