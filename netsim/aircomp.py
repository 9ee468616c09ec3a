"""Broadband analog aggregation (BAA): over-the-air computation over M OFDM sub-carriers.

Torch-free (numpy + scipy). Model after Zhu, Wang and Huang, "Broadband Analog Aggregation for
Low-Latency Federated Edge Learning", IEEE TWC 2020 (see docs/aircomp.md).

Channel. Device k, sub-carrier m, coherence block b:
``h_{k,m} = sqrt(g_k) * h~_{k,m}`` with g_k the link's large-scale gain (path loss and
shadowing, :class:`netsim.channel.Link`) and ``|h~|^2 ~ Exp(1)`` Rayleigh block fading,
independent across sub-carriers and coherence blocks. Sub-carrier m of block b is draw number
``b * M + m`` of the device's own uplink fading stream (``Link.fading``): deterministic, O(1)
memory, and injective in (b, m), so all draws are independent.

Power control (truncated channel inversion). Device k transmits on sub-carrier m only if
``|h~_{k,m}|^2 >= g_th`` and then pre-equalises the channel so that every transmitting device
arrives with the same amplitude ``sqrt(rho0)``:

.. math::
    p_{k,m} = \\sqrt{\\rho_0} / (\\sqrt{g_k}\\, \\tilde h_{k,m})  \\text{ if } |\\tilde h_{k,m}|^2 \\ge g_{th},
    \\text{ else } 0.

Signal. Device k sends the real symbols u_kj = K a_k x_kj / s (value j on one sub-carrier of
one OFDM symbol, in-phase axis), a_k the aggregation weights (sum 1 over scheduled devices), s
the RMS of all K a_k x_kj (one scalar of side information, so the symbols have mean power 1
over all devices, but device k's own mean power c_k = (1/q) sum_j u_kj^2 differs from 1 when the
weights or update sizes differ, e.g. non-IID data sizes). What device k radiates on value j is
|p_kj|^2 u_kj^2 = rho0 u_kj^2 / (g_k |h~_kj|^2) for one OFDM symbol time T_sym.

rho0 (the common receive power per sub-carrier) is the largest value every scheduled device's
power budget P_k allows, counting its real symbol power (per-sub-carrier budget P_k / M, so
that the M sub-carriers of a symbol together stay within P_k):

* ``average`` (BAA): expected power per sub-carrier symbol, over the fading,
  E[|p|^2] c_k = rho0 E1(g_th) c_k / g_k <= P_k / M, E1 the exponential integral, so
  rho0 = min_k (P_k / M) g_k / (E1(g_th) c_k);
* ``peak``: every symbol, |p|^2 u^2 <= rho0 max_j u_kj^2 / (g_k g_th) <= P_k / M, so
  rho0 = min_k (P_k / M) g_k g_th / max_j u_kj^2.

The device with the largest c_k / (P_k g_k) (weight or update size against power and gain)
meets its budget with equality; every other device stays below its own. Both are limited by
the weakest scheduled device (near-far problem): hence cell-interior scheduling (only devices
within ``radius_m`` of the server transmit). The energy each device is charged is what it
radiates, E_k = T_sym sum_{j sent} rho0 u_kj^2 / (g_k |h~_kj|^2) (:func:`radiated_energy_j`).

The edge receives
``y_m = sum_{k transmitting} sqrt(rho0) u_k + n_m``, n ~ CN(0, sigma^2), sigma^2 = N0 NF Delta_f,
and estimates

.. math::
    \\hat x = \\frac{s}{K \\sqrt{\\rho_0}} \\Re(y) = \\sum_k a_k x_k \\chi_{k,m} + \\frac{s}{K\\sqrt{\\rho_0}} n_R

(truncated entries count as zeros, as in BAA's estimator ``y / (sqrt(rho0) |K_in|)``).
Receive SNR = rho0 / sigma^2. Expected MSE per value, given x (closed form, tested):

.. math::
    \\mathrm{MSE} = \\frac{1}{q}\\sum_j\\Big[\\sum_k a_k^2 x_{kj}^2 p_k (1 - p_k) + \\big(\\sum_k a_k x_{kj} p_k\\big)^2\\Big]
                + \\frac{s^2 \\sigma^2}{2 K^2 \\rho_0}

with p_k = 1 - exp(-g_th) the truncation probability (Rayleigh, mean small-scale gain 1).
Truncation shrinks the estimate by (1 - p) on average (a bias that acts like a smaller
learning rate); ``debias=True`` divides the estimate by 1 - p: unbiased, at the price of
amplifying the truncation variance and the noise (:func:`expected_mse`).

Latency. q values over M sub-carriers take ``ceil(q / M)`` OFDM symbols of ``(1 + cp) /
Delta_f`` seconds, whatever K. OFDMA: each of K devices sends q values of ``bits_per_value``
bits over its share of the band at its Shannon rate; time grows linearly with K.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
from scipy.special import exp1

from .channel import Link, shannon_rate_bps

POWER_POLICIES = ("average", "peak")


# ---------------------------------------------------------------------------- latency
def ofdm_symbol_s(subcarrier_spacing_hz: float, cyclic_prefix_fraction: float = 0.0) -> float:
    """Duration of one OFDM symbol including the cyclic prefix [s]."""
    return (1.0 + cyclic_prefix_fraction) / subcarrier_spacing_hz


def aircomp_symbols(num_values: int, num_subcarriers: int) -> int:
    """OFDM symbols to send ``num_values`` analog values, one per sub-carrier: ceil(q / M)."""
    return int(math.ceil(num_values / num_subcarriers))


def aircomp_latency_s(num_values: int, num_subcarriers: int, subcarrier_spacing_hz: float,
                      cyclic_prefix_fraction: float = 0.0) -> float:
    """Air time of one over-the-air aggregation of q values (independent of K) [s]."""
    return aircomp_symbols(num_values, num_subcarriers) * ofdm_symbol_s(subcarrier_spacing_hz, cyclic_prefix_fraction)


def ofdma_latency_s(num_values: int, bits_per_value: int, bandwidth_hz: float, snrs: Sequence[float]) -> float:
    """Time for K devices (one SNR each, measured over their own share B / K) to send q values
    of ``bits_per_value`` bits over equal OFDMA shares at their Shannon rates: the slowest
    device decides [s]."""
    k = len(snrs)
    if k == 0:
        return 0.0
    share = bandwidth_hz / k
    return max(num_values * bits_per_value / shannon_rate_bps(share, float(s)) for s in snrs)


# ---------------------------------------------------------------------------- power control
def truncation_probability(g_th: float, mean_gain: float = 1.0) -> float:
    """P(|h|^2 < g_th) for Rayleigh fading with E|h|^2 = mean_gain: 1 - exp(-g_th / mean_gain)."""
    return 1.0 - math.exp(-g_th / mean_gain)


def symbol_power(symbols: np.ndarray, policy: str) -> np.ndarray:
    """(K,) what device k's symbols u_kj weigh in its power budget: the mean (1/q) sum_j u_kj^2
    for ``average``, the largest u_kj^2 for ``peak`` [dimensionless]."""
    u2 = np.asarray(symbols, dtype=float) ** 2
    if policy == "average":
        return np.mean(u2, axis=1)
    if policy == "peak":
        return np.max(u2, axis=1)
    raise ValueError(f"power policy {policy!r} unknown; allowed: {POWER_POLICIES}")


def receive_power(policy: str, g_th: float, budgets_w_per_subcarrier: np.ndarray,
                  large_scale_gains: np.ndarray, symbol_powers: Optional[np.ndarray] = None) -> float:
    """Common receive power rho0 per sub-carrier that every device's budget allows [W]:
    ``average`` min_k (P_k/M) g_k / (E1(g_th) c_k), ``peak`` min_k (P_k/M) g_k g_th / c_k, with
    c_k = ``symbol_powers`` (:func:`symbol_power`; None: 1, unit-power symbols). Devices with
    c_k = 0 (nothing to send) do not limit rho0; if no device sends anything, c = 1."""
    if g_th <= 0:
        raise ValueError(f"truncation threshold must be > 0, got {g_th}")
    budgets = np.asarray(budgets_w_per_subcarrier, dtype=float)
    gains = np.asarray(large_scale_gains, dtype=float)
    c = np.ones_like(budgets) if symbol_powers is None else np.asarray(symbol_powers, dtype=float)
    if not np.any(c > 0):
        c = np.ones_like(budgets)
    with np.errstate(divide="ignore"):
        if policy == "average":
            return float(np.min(np.where(c > 0, budgets * gains / (exp1(g_th) * c), np.inf)))
        if policy == "peak":
            return float(np.min(np.where(c > 0, budgets * gains * g_th / c, np.inf)))
    raise ValueError(f"power policy {policy!r} unknown; allowed: {POWER_POLICIES}")


def radiated_energy_j(rho0_w: float, large_scale_gains: np.ndarray, small_scale_gains: np.ndarray,
                      transmit: np.ndarray, symbols: np.ndarray, symbol_s: float) -> np.ndarray:
    """(K,) energy each device radiates in the slot [J]: every value j it sends (``transmit``)
    occupies one sub-carrier for one OFDM symbol at power |p_kj|^2 u_kj^2 = rho0 u_kj^2 /
    (g_k |h~_kj|^2), so E_k = T_sym sum_{j sent} rho0 u_kj^2 / (g_k |h~_kj|^2)."""
    u2 = np.asarray(symbols, dtype=float) ** 2
    per_value = np.where(transmit, u2 / np.where(transmit, small_scale_gains, 1.0), 0.0)
    return rho0_w / np.asarray(large_scale_gains, dtype=float) * np.sum(per_value, axis=1) * symbol_s


def value_gains(links: Sequence[Link], num_values: int, num_subcarriers: int, symbol_s: float,
                start_s: float = 0.0, coherence_time_s: Optional[float] = None) -> np.ndarray:
    """(K, q) small-scale gains |h~_{k,m}|^2 seen by value j of a slot starting at ``start_s``:
    value j rides sub-carrier j % M of symbol j // M, whose coherence block is
    floor((start_s + i T_sym) / T_c) (one block if ``coherence_time_s`` is None). Sub-carrier m
    of block b is draw ``b M + m`` of the link's fading stream; the slot's blocks are
    consecutive, so the whole slot is one contiguous run of draws per link."""
    m, q = int(num_subcarriers), int(num_values)
    n_sym = aircomp_symbols(q, m)
    if coherence_time_s is None:
        block_of_sym = np.zeros(n_sym, dtype=np.int64)
    else:
        block_of_sym = np.floor((start_s + np.arange(n_sym) * symbol_s) / coherence_time_s + 1e-9).astype(np.int64)
    block_of_value = block_of_sym[np.arange(q) // m]
    b0, nb = int(block_of_sym[0]), int(block_of_sym[-1] - block_of_sym[0]) + 1
    cols = (block_of_value - b0) * m + np.arange(q) % m
    return np.stack([link.fading.power_gains(b0 * m, nb * m) for link in links])[:, cols]


def snr_db(rho0_w: float, noise_w: float) -> float:
    """Receive SNR 10 log10(rho0 / sigma^2) [dB]; +inf when the noise is off."""
    return 10.0 * math.log10(rho0_w / noise_w) if noise_w > 0 else math.inf


def noise_for_snr(rho0_w: float, noise_w: float, receive_snr_db: Optional[float]) -> float:
    """Noise power per sub-carrier sigma^2 [W]: ``noise_w`` (real receiver) when
    ``receive_snr_db`` is None, else rho0 / 10^(SNR/10) (0 for SNR = +inf: noise off)."""
    if receive_snr_db is None:
        return float(noise_w)
    if math.isinf(receive_snr_db) and receive_snr_db > 0:
        return 0.0
    return float(rho0_w / 10.0 ** (receive_snr_db / 10.0))


# ---------------------------------------------------------------------------- aggregation
@dataclass
class AirCompStats:
    """What one over-the-air aggregation did.

    truncation_ratio : fraction of (device, value) entries not transmitted (truncated).
    receive_snr_db : 10 log10(rho0 / sigma^2).
    mse : measured mean squared error per value of the estimate vs. the exact weighted sum.
    mse_theory : the closed-form expectation of ``mse`` given the inputs (module docstring).
    noise_mse : the receiver-noise part of ``mse_theory``, s^2 sigma^2 / (2 K^2 rho0)
        (divided by (1 - p)^2 when debiased), to combine several servers' slots.
    signal_power : mean squared value of the exact weighted sum (for a normalised MSE).
    latency_s, num_symbols, rho0_w, noise_w.
    tx_energy_j : per device, the energy it radiated (:func:`radiated_energy_j`) [J].
    symbol_power : per device, c_k of :func:`symbol_power` under the power policy.
    """

    num_devices: int
    num_values: int
    num_symbols: int
    latency_s: float
    rho0_w: float
    noise_w: float
    receive_snr_db: float
    truncation_ratio: float
    mse: float
    mse_theory: float
    signal_power: float
    tx_energy_j: list[float] = field(default_factory=list)
    noise_mse: float = 0.0
    symbol_power: list[float] = field(default_factory=list)

    @property
    def nmse(self) -> float:
        return self.mse / self.signal_power if self.signal_power > 0 else float("nan")


def truncation_mse(updates: np.ndarray, weights: np.ndarray, p_trunc: np.ndarray, debias: bool = False) -> float:
    """The truncation part of E[MSE] per value given the updates:
    (1/q) sum_j [sum_k a_k^2 x_kj^2 p_k (1 - p_k) + (sum_k a_k x_kj p_k)^2] (BAA estimator), or
    (1/q) sum_j sum_k a_k^2 x_kj^2 p / (1 - p) (debiased: divided by 1 - p, p common)."""
    a = np.asarray(weights, dtype=float)[:, None] * updates
    p = np.asarray(p_trunc, dtype=float)[:, None]
    if debias:
        return float(np.mean(np.sum(a**2 * p / (1.0 - p), axis=0)))
    return float(np.mean(np.sum(a**2 * p * (1.0 - p), axis=0) + np.sum(a * p, axis=0) ** 2))


def noise_mse(scale: float, noise_w: float, num_devices: int, rho0_w: float, keep: float = 1.0) -> float:
    """The receiver-noise part of E[MSE] per value: s^2 sigma^2 / (2 K^2 rho0 keep^2), keep = 1 - p
    when debiased, else 1 (the real part of CN(0, sigma^2) has variance sigma^2 / 2)."""
    return scale**2 * noise_w / (2.0 * num_devices**2 * rho0_w * keep**2)


def expected_mse(updates: np.ndarray, weights: np.ndarray, p_trunc: np.ndarray, scale: float,
                 noise_w: float, rho0_w: float, debias: bool = False) -> float:
    """Closed-form E[MSE] per value given the updates (module docstring):
    :func:`truncation_mse` + :func:`noise_mse`. With ``debias`` the estimate is divided by
    1 - p (p the common truncation probability): unbiased, with
    MSE = (1/q) sum_j sum_k a_k^2 x_kj^2 p / (1 - p) + s^2 sigma^2 / (2 K^2 rho0 (1 - p)^2)."""
    k = updates.shape[0]
    keep = float(1.0 - np.asarray(p_trunc, dtype=float)[0]) if debias else 1.0
    return float(truncation_mse(updates, weights, p_trunc, debias) + noise_mse(scale, noise_w, k, rho0_w, keep))


def over_the_air_sum(updates: np.ndarray, weights: Optional[np.ndarray], links: Sequence[Link], *,
                     num_subcarriers: int, subcarrier_spacing_hz: float, noise_w_per_subcarrier: float,
                     truncation_threshold: float, power_policy: str = "average",
                     tx_power_w: Optional[Sequence[float]] = None, start_s: float = 0.0,
                     coherence_time_s: Optional[float] = None, cyclic_prefix_fraction: float = 0.0,
                     rng: Optional[np.random.Generator] = None,
                     receive_snr_db: Optional[float] = None, debias: bool = False) -> tuple[np.ndarray, AirCompStats]:
    """Aggregate K update vectors over the air.

    Parameters
    ----------
    updates : (K, q) float array, one row per scheduled device.
    weights : (K,) aggregation weights a_k (None: 1/K, the mean); the estimate targets
        ``sum_k a_k x_k``.
    links : K uplinks (large-scale gain, power budget ``tx_power_w`` and fading stream).
    noise_w_per_subcarrier : sigma^2 = N0 NF Delta_f [W].
    start_s, coherence_time_s : when the slot starts; symbol i lies in coherence block
        floor((start_s + i T_sym) / T_c) and sees that block's fading (None: one block).
    rng : generator for the receiver noise.
    receive_snr_db : None: the noise is ``noise_w_per_subcarrier`` (the real receiver);
        a number: emulate that receive SNR, sigma^2 = rho0 / 10^(SNR/10) (``inf``: noise off).
    debias : divide the estimate by 1 - p = exp(-g_th), the expected share of entries sent, so
        that it is unbiased (False: BAA's estimator, truncated entries count as zeros).

    Returns the (q,) estimate and :class:`AirCompStats`.
    """
    x = np.asarray(updates, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"updates must be (K, q), got shape {x.shape}")
    k, q = x.shape
    if k != len(links):
        raise ValueError(f"{k} updates but {len(links)} links")
    m = int(num_subcarriers)
    a = np.full(k, 1.0 / k) if weights is None else np.asarray(weights, dtype=np.float64)
    rng = rng if rng is not None else np.random.default_rng(0)
    powers = np.array([l.tx_power_w for l in links] if tx_power_w is None else tx_power_w, dtype=float)
    g = np.array([l.large_scale_gain for l in links], dtype=float)
    scaled = k * a[:, None] * x                        # K a_k x_k: exact sum is mean over k
    scale = float(np.sqrt(np.mean(scaled**2))) or 1.0  # s: RMS, so the mean of u^2 over all is 1
    symbols = scaled / scale                           # u_kj
    c = symbol_power(symbols, power_policy)
    rho0 = receive_power(power_policy, truncation_threshold, powers / m, g, c)
    noise_w_per_subcarrier = noise_for_snr(rho0, noise_w_per_subcarrier, receive_snr_db)
    t_sym = ofdm_symbol_s(subcarrier_spacing_hz, cyclic_prefix_fraction)
    n_sym = aircomp_symbols(q, m)

    h2 = value_gains(links, q, m, t_sym, start_s, coherence_time_s)
    transmit = h2 >= truncation_threshold
    noise = rng.standard_normal(q) * math.sqrt(noise_w_per_subcarrier / 2.0)
    received = math.sqrt(rho0) * np.sum(np.where(transmit, symbols, 0.0), axis=0) + noise
    estimate = scale * received / (k * math.sqrt(rho0))
    p_trunc = np.full(k, truncation_probability(truncation_threshold))
    if debias:
        estimate = estimate / (1.0 - p_trunc[0])

    exact = np.sum(a[:, None] * x, axis=0)
    latency = n_sym * t_sym
    energy = radiated_energy_j(rho0, g, h2, transmit, symbols, t_sym)
    keep = float(1.0 - p_trunc[0]) if debias else 1.0
    stats = AirCompStats(
        num_devices=k, num_values=q, num_symbols=n_sym, latency_s=latency, rho0_w=rho0,
        noise_w=noise_w_per_subcarrier, receive_snr_db=snr_db(rho0, noise_w_per_subcarrier),
        truncation_ratio=float(1.0 - transmit.mean()), mse=float(np.mean((estimate - exact) ** 2)),
        mse_theory=expected_mse(x, a, p_trunc, scale, noise_w_per_subcarrier, rho0, debias),
        signal_power=float(np.mean(exact**2)), tx_energy_j=[float(e) for e in energy],
        noise_mse=noise_mse(scale, noise_w_per_subcarrier, k, rho0, keep), symbol_power=[float(v) for v in c])
    return estimate, stats
