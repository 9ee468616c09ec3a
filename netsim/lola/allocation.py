"""Block-device allocation for LoLa cooperative fine-tuning (torch-free).

Problem (reconstruction of Wu/Chen/Huang, see ``docs/lola.md`` and the paper digest, section 4.2):
K devices, N <= K PEFT parameter blocks. Block n = 0 sits next to the output, block N-1 is the
deepest; training block n needs forward + backward down to that block's depth. Each round every
block goes to exactly one device and every device trains at most one block (a matching). The
latency of device k on block n with uplink bandwidth b_k is

.. math::
    T_{k,n}(b_k) = C_{k,n} + S_n / R_k(b_k), \\qquad R_k(b) = b \\log_2(1 + \\gamma_k / b)

with C_{k,n} the compute time, S_n the upload size of block n [bit] and gamma_k = P_k g_k /
(N_0 NF) the device's mean receive SNR times hertz (so the SNR over b hertz is gamma_k / b).
Pairs whose memory M_{k,n} exceeds the device's memory are infeasible (T = inf). The round
latency is the maximum over involved devices (min-max objective); bandwidths satisfy
sum_k b_k <= B.

Algorithms (all return an :class:`Allocation`):

``crunch``          optimal min-max matching for a fixed per-device bandwidth (Cut a threshold,
                    Recount the feasible prefix of every device, Check Hall's condition).
``jbba``            joint bandwidth and block allocation: dual ascent on the min-max epigraph,
                    blocks by the Hungarian method, bandwidth in closed form, every candidate
                    polished by the exact min-max bandwidth split; started from CRUNCH.
``random``          a random memory-feasible matching, equal bandwidth among involved devices.
``greedy``          deepest block first, each to the fastest (FLOP/s) free feasible device.
``depth_unaware``   picks devices as if every block cost the same (the mean), then hands the
                    blocks out in device-index order (memory still respected).
``equal_bandwidth`` CRUNCH's optimal blocks, but the band statically split B/K over all K
                    devices (no bandwidth management: idle devices keep their share).
Offloading needs no matching; it is simulated in :mod:`netsim.protocols.lola`.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from scipy.optimize import brentq, linear_sum_assignment
from scipy.special import lambertw
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching

ALGORITHMS = ("crunch", "jbba", "random", "greedy", "depth_unaware", "equal_bandwidth", "offloading")


class InfeasibleError(ValueError):
    """No matching of every block to a distinct device fits the memory constraints."""


def _assignment(cost: np.ndarray) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Minimum-cost assignment of every column to a distinct row (Hungarian method,
    ``scipy.optimize.linear_sum_assignment``); ``np.inf`` marks a forbidden pair, whatever the
    magnitude of the finite costs. None when no assignment avoids the forbidden pairs."""
    cost = np.asarray(cost, dtype=float)
    if np.isnan(cost).any():
        raise ValueError("assignment cost matrix contains NaN")
    try:
        rows, cols = linear_sum_assignment(cost)
    except ValueError:  # "cost matrix is infeasible": no complete assignment of finite pairs
        return None
    if not np.all(np.isfinite(cost[rows, cols])):
        return None
    return rows, cols


@dataclass(frozen=True)
class Instance:
    """One allocation problem.

    Attributes
    ----------
    compute_s : (K, N) array
        C_{k,n}: compute time of device k on block n per round [s].
    memory_ok : (K, N) bool array
        Whether device k can hold the job of block n.
    upload_bits : (N,) array
        S_n: size of block n's update [bit].
    snr_hz : (K,) array
        gamma_k = P_k g_k / (N0 NF) [Hz]: mean SNR over b hertz is gamma_k / b.
    bandwidth_hz : float
        Total uplink band B [Hz].
    compute_flops_per_s : (K,) array, optional
        Device speeds (only the ``greedy`` baseline looks at them).
    """

    compute_s: np.ndarray
    memory_ok: np.ndarray
    upload_bits: np.ndarray
    snr_hz: np.ndarray
    bandwidth_hz: float
    compute_flops_per_s: Optional[np.ndarray] = None

    @property
    def num_devices(self) -> int:
        return int(self.compute_s.shape[0])

    @property
    def num_blocks(self) -> int:
        return int(self.compute_s.shape[1])

    def rate_bps(self, k, bandwidth_hz):
        """Mean Shannon rate R_k(b) = b log2(1 + gamma_k / b) [bit/s] (0 for b = 0; computed as
        b ln(1 + gamma_k/b) / ln 2 with log1p, exact at low SNR per share)."""
        b = np.asarray(bandwidth_hz, dtype=float)
        g = np.asarray(self.snr_hz, dtype=float)[k]
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(b > 0, _rate_bps(g, np.where(b > 0, b, 1.0)), 0.0)
        return r

    def latency_matrix(self, bandwidth_hz: np.ndarray) -> np.ndarray:
        """T_{k,n}(b_k) [s] for per-device bandwidths (K,); inf where infeasible or b_k = 0."""
        b = np.asarray(bandwidth_hz, dtype=float)
        rate = self.rate_bps(np.arange(self.num_devices), b)
        with np.errstate(divide="ignore"):
            up = np.where(rate[:, None] > 0, self.upload_bits[None, :] / np.where(rate > 0, rate, 1.0)[:, None], np.inf)
        t = self.compute_s + up
        return np.where(self.memory_ok, t, np.inf)


@dataclass
class Allocation:
    """An allocation: ``device_of_block[n]`` = device training block n; ``bandwidth_hz[k]``
    (0 for uninvolved devices); ``planned_latency_s`` = the min-max latency under the mean
    channel (what the planner believes; the simulation draws the fading)."""

    algorithm: str
    device_of_block: np.ndarray
    bandwidth_hz: np.ndarray
    planned_latency_s: float
    info: dict = field(default_factory=dict)


def round_latency_s(inst: Instance, device_of_block: np.ndarray, bandwidth_hz: np.ndarray) -> float:
    """max_n T_{k(n), n}(b_{k(n)}) of an allocation under the mean channel [s]."""
    t = inst.latency_matrix(bandwidth_hz)
    return float(max(t[k, n] for n, k in enumerate(device_of_block)))


# --------------------------------------------------------------------------------------------
# CRUNCH
# --------------------------------------------------------------------------------------------
def common_block_order(latency: np.ndarray) -> Optional[np.ndarray]:
    """A block order along which every device's latency row is non-decreasing (inf last), or
    None if there is none. With such an order the feasible blocks of every device under any
    threshold form a prefix (the nested structure CRUNCH exploits); the monotone depth cost
    gives it with order 0..N-1 when upload sizes are equal.

    ``np.inf`` (infeasible) sorts after every finite latency, however large; the order test
    compares neighbours directly (inf >= inf holds), so no finite stand-in for infinity is
    used anywhere."""
    ranks = np.argsort(np.argsort(latency, axis=1, kind="stable"), axis=1)
    order = np.argsort(ranks.sum(axis=0), kind="stable")
    sorted_rows = latency[:, order]
    if np.all(sorted_rows[:, 1:] >= sorted_rows[:, :-1]):
        return order
    return None


def hall_check(counts: np.ndarray, num_blocks: int) -> bool:
    """Check step: with nested prefixes (device k can serve the c_k cheapest blocks), a matching
    covering all N blocks exists iff |{k : c_k >= j}| >= N - j + 1 for j = 1..N."""
    for j in range(1, num_blocks + 1):
        if int(np.count_nonzero(counts >= j)) < num_blocks - j + 1:
            return False
    return True


def _matching_at(latency: np.ndarray, tau: float) -> Optional[np.ndarray]:
    """Bipartite (Hopcroft-Karp) feasibility at threshold tau: device_of_block or None."""
    graph = csr_matrix((latency <= tau).astype(np.int8).T)  # rows = blocks, cols = devices
    match = maximum_bipartite_matching(graph, perm_type="column")
    return None if np.any(match < 0) else match.astype(int)


def crunch_matching(latency: np.ndarray) -> tuple[np.ndarray, float, dict]:
    """Optimal min-max matching of N blocks (columns) to distinct devices (rows) of a latency
    matrix (inf = infeasible). Returns (device_of_block, optimal latency, info).

    Cut: binary search over the sorted distinct finite latencies tau. Recount: c_k(tau) = number
    of blocks device k finishes within tau. Check: Hall's condition on the counts. When no
    common block order exists (non-monotone costs, e.g. very unequal upload sizes) the check is
    a maximum bipartite matching instead (same answer, no nested structure needed).
    """
    latency = np.asarray(latency, dtype=float)
    k_dev, n_blk = latency.shape
    if np.isnan(latency).any():
        raise ValueError("latency matrix contains NaN (use np.inf for an infeasible pair)")
    if n_blk > k_dev:
        raise InfeasibleError(f"{n_blk} blocks need at least {n_blk} devices, got {k_dev}")
    order = common_block_order(latency)
    cands = np.unique(latency[np.isfinite(latency)])
    if cands.size == 0:
        raise InfeasibleError("no device can hold any block")

    def feasible(tau: float) -> bool:
        if order is not None:
            return hall_check(np.count_nonzero(latency <= tau, axis=1), n_blk)
        return _matching_at(latency, tau) is not None

    lo, hi = 0, cands.size - 1
    if not feasible(cands[hi]):
        raise InfeasibleError("no matching of every block to a distinct device fits the memory budgets")
    checks = 1
    while lo < hi:
        mid = (lo + hi) // 2
        checks += 1
        if feasible(cands[mid]):
            hi = mid
        else:
            lo = mid + 1
    tau = float(cands[lo])
    if order is not None:
        counts = np.count_nonzero(latency <= tau, axis=1)
        device_of_block = np.full(n_blk, -1, dtype=int)
        free = np.ones(k_dev, dtype=bool)
        for pos in range(n_blk - 1, -1, -1):  # most expensive block first
            eligible = np.nonzero(free & (counts >= pos + 1))[0]
            # the device with the fewest options that still covers the block (ties: lowest index)
            k = int(eligible[np.argmin(counts[eligible])])
            device_of_block[order[pos]] = k
            free[k] = False
    else:
        device_of_block = _matching_at(latency, tau)
    return device_of_block, tau, {"checks": checks, "nested": order is not None}


def equal_bandwidth_hz(inst: Instance, among: int) -> np.ndarray:
    """Bandwidth offer B / among to every device."""
    return np.full(inst.num_devices, inst.bandwidth_hz / among)


def _only_involved(inst: Instance, device_of_block: np.ndarray, per_device_hz: np.ndarray) -> np.ndarray:
    b = np.zeros(inst.num_devices)
    b[device_of_block] = per_device_hz[device_of_block]
    return b


def crunch(inst: Instance, bandwidth_hz: Optional[np.ndarray] = None) -> Allocation:
    """CRUNCH with a fixed bandwidth per device (default: equal split B/N among the N involved
    devices, known in advance because exactly N devices are involved)."""
    offer = equal_bandwidth_hz(inst, inst.num_blocks) if bandwidth_hz is None else np.asarray(bandwidth_hz, float)
    dev, tau, info = crunch_matching(inst.latency_matrix(offer))
    return Allocation("crunch", dev, _only_involved(inst, dev, offer), tau, info)


def equal_bandwidth(inst: Instance) -> Allocation:
    """CRUNCH's optimal blocks with the band statically split B/K over all K devices."""
    offer = equal_bandwidth_hz(inst, inst.num_devices)
    dev, tau, info = crunch_matching(inst.latency_matrix(offer))
    return Allocation("equal_bandwidth", dev, _only_involved(inst, dev, offer), tau, info)


# --------------------------------------------------------------------------------------------
# Bandwidth for a fixed assignment
# --------------------------------------------------------------------------------------------
_LN2 = math.log(2.0)


def share_snr_for_efficiency(a: np.ndarray, iterations: int = 60) -> np.ndarray:
    """The SNR per share x > 0 at which ln(1 + x) / x = a, for 0 < a < 1 [linear].

    ln(1 + x)/x falls from 1 (x -> 0, the wideband limit) to 0 (x -> inf), so the root is
    unique. Newton's method on phi(u) = ln(ln(1 + e^u)/e^u) - ln a in u = ln x (phi is
    decreasing and concave, so from the first step on the iterates approach the root from
    above, monotonically). Start: for a <= 1/2 the closed form x = -W_{-1}(-a e^{-a})/a - 1
    (Lambert W, far from its branch point there); for a > 1/2 the series inversion
    x = 2 d + (8/3) d^2, d = 1 - a (ln(1+x)/x = 1 - x/2 + x^2/3 - ...). Near a = 1 (SNR per
    share below about -40 dB) the Lambert form is useless: -a e^{-a} is within rounding of
    -1/e, where W has a square-root singularity; the series and Newton steps in ln x keep
    the relative error of x at about eps / d, the conditioning of the problem itself."""
    a = np.asarray(a, dtype=float)
    x = np.empty_like(a)
    far = a <= 0.5
    if np.any(far):
        af = a[far]
        x[far] = -np.real(lambertw(-af * np.exp(-af), k=-1)) / af - 1.0
    near = ~far
    d = 1.0 - a[near]
    x[near] = 2.0 * d + (8.0 / 3.0) * d * d
    u = np.log(x)
    log_a = np.log(a)
    for _ in range(iterations):
        xu = np.exp(u)
        l1 = np.log1p(xu)
        phi = np.log(l1 / xu) - log_a
        dphi = xu / ((1.0 + xu) * l1) - 1.0
        step = np.clip(phi / dphi, -30.0, 30.0)
        u = u - step
        if np.all(np.abs(step) <= 4.0 * np.finfo(float).eps * np.maximum(1.0, np.abs(u))):
            break
    return np.exp(u)


def _bandwidth_for_rate(snr_hz: np.ndarray, rate_bps: np.ndarray) -> np.ndarray:
    """Bandwidth b with b log2(1 + gamma/b) = rate [Hz] (inf where the rate reaches the wideband
    limit gamma / ln 2, 0 for rate 0).

    With x = gamma / b (the SNR per share) the equation is ln(1 + x)/x = a, a = rate ln2 / gamma,
    solved by :func:`share_snr_for_efficiency`; b = gamma / x."""
    gamma = np.asarray(snr_hz, dtype=float)
    rate = np.asarray(rate_bps, dtype=float)
    a = rate * _LN2 / gamma
    out = np.full(a.shape, np.inf)
    ok = (a > 0) & (a < 1)
    if np.any(ok):
        out[ok] = gamma[ok] / share_snr_for_efficiency(a[ok])
    out[rate <= 0] = 0.0
    return out


def _rate_bps(snr_hz: np.ndarray, bandwidth_hz: np.ndarray) -> np.ndarray:
    """b log2(1 + gamma / b) = b ln(1 + gamma/b) / ln 2 [bit/s] (log1p: exact at low SNR per share)."""
    return bandwidth_hz * np.log1p(snr_hz / bandwidth_hz) / _LN2


def _wideband_latency_s(compute_s: np.ndarray, upload_bits: np.ndarray, snr_hz: np.ndarray) -> np.ndarray:
    """C_k + S_k ln2 / gamma_k: the latency with unlimited bandwidth (rate gamma / ln 2)."""
    return compute_s + upload_bits * _LN2 / snr_hz


def minmax_bandwidth(compute_s: np.ndarray, upload_bits: np.ndarray, snr_hz: np.ndarray,
                     total_hz: float) -> np.ndarray:
    """Exact min-max bandwidth split of ``total_hz`` for a fixed assignment (one entry per
    involved device) [Hz].

    The optimum equalises latencies, C_k + S_k / R_k(b_k) = T, so b_k(T) = R_k^{-1}(S_k / (T - C_k))
    (:func:`_bandwidth_for_rate`) and T is the root of F(T) = sum_k b_k(T) / B - 1, which is
    decreasing in T: +inf at the largest wideband latency T_0 = max_k C_k + S_k ln2 / gamma_k,
    <= 0 at the equal-share latency. Bracketed root find: the lower end approaches T_0 by
    halving the gap until F > 0, then Brent's method (``scipy.optimize.brentq``) to relative
    precision 4 eps. The rounding left over (sum_k b_k(T) - B) goes to the device whose latency
    is least sensitive to its bandwidth (|dT_k/db_k| smallest), so the shares sum to
    ``total_hz`` and the latencies stay equal to rounding at every SNR per share (tested from
    -80 dB to +60 dB). A device with S_k = 0 gets no bandwidth."""
    comp = np.asarray(compute_s, dtype=float)
    bits = np.asarray(upload_bits, dtype=float)
    gamma = np.asarray(snr_hz, dtype=float)
    m = comp.size
    if not (math.isfinite(total_hz) and total_hz > 0):
        raise ValueError(f"total bandwidth {total_hz!r} Hz: must be a finite number > 0")
    if m == 0:
        return np.zeros(0)
    if not (np.all(np.isfinite(comp)) and np.all(comp >= 0) and np.all(np.isfinite(bits)) and np.all(bits >= 0)
            and np.all(np.isfinite(gamma)) and np.all(gamma > 0)):
        raise ValueError("minmax_bandwidth: compute times and upload sizes must be finite and >= 0, "
                         f"SNRs finite and > 0; got {comp}, {bits}, {gamma}")
    sends = bits > 0
    if not np.any(sends):
        return np.full(m, total_hz / m)
    eq = np.full(m, total_hz / m)
    t_hi = float(np.max(comp + np.where(sends, bits / np.where(sends, _rate_bps(gamma, eq), 1.0), 0.0)))
    t_0 = float(np.max(np.where(sends, _wideband_latency_s(comp, bits, gamma), comp)))

    def shares(t: float) -> np.ndarray:
        slack = t - comp
        with np.errstate(divide="ignore", invalid="ignore"):
            rate = np.where(sends, bits / np.where(slack > 0, slack, np.nan), 0.0)
        b = _bandwidth_for_rate(gamma, np.where(np.isnan(rate), np.inf, rate))
        return np.where(sends, b, 0.0)

    def excess(t: float) -> float:
        return float(np.sum(shares(t)) / total_hz - 1.0)

    f_hi = excess(t_hi)
    if f_hi > 0:  # rounding at the equal share: the equal split is the optimum to rounding
        t_lo = t_hi
    else:
        t_lo, gap = t_hi, t_hi - t_0
        while True:
            gap *= 0.5
            t = t_0 + gap
            if t <= t_0 or t >= t_lo:
                break
            if excess(t) > 0:
                t_lo = t
                break
            t_hi = t
    if t_lo < t_hi:
        t_star = brentq(excess, t_lo, t_hi, xtol=1e-300, rtol=4.0 * np.finfo(float).eps, maxiter=500)
    else:
        t_star = t_hi
    b = shares(t_star)
    b[~np.isfinite(b)] = 0.0
    return _close_budget(b, comp, bits, gamma, total_hz, sends)


def _close_budget(b: np.ndarray, comp: np.ndarray, bits: np.ndarray, gamma: np.ndarray, total_hz: float,
                  sends: np.ndarray) -> np.ndarray:
    """Give ``total_hz - sum(b)`` (root-finding rounding) to the sending device whose latency
    changes least per hertz, |dT_k/db_k| = S_k R_k'(b_k) / R_k(b_k)^2 with
    R'(b) = (ln(1 + x) - x/(1 + x)) / ln 2, x = gamma / b; in proportion to b if that would
    leave it without bandwidth."""
    b = b.copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        x = gamma / b
        rate = _rate_bps(gamma, b)
        slope = bits * (np.log1p(x) - x / (1.0 + x)) / _LN2 / rate**2
    slope = np.where(sends & (b > 0) & np.isfinite(slope), slope, np.inf)
    k = int(np.argmin(slope))
    rest = total_hz - (np.sum(b) - b[k])
    if np.isfinite(slope[k]) and rest > 0:
        b[k] = rest
    elif np.sum(b) > 0:
        b = b * (total_hz / np.sum(b))
    else:
        b = np.where(sends, total_hz / np.count_nonzero(sends), 0.0)
    return b


def polish(inst: Instance, device_of_block: np.ndarray) -> tuple[np.ndarray, float]:
    """Min-max bandwidth (:func:`minmax_bandwidth`) of the whole band among the devices of an
    assignment; returns (bandwidth per device (K,), latency)."""
    devs = np.asarray(device_of_block)
    comp = inst.compute_s[devs, np.arange(len(devs))]
    b_inv = minmax_bandwidth(comp, inst.upload_bits.astype(float), inst.snr_hz[devs].astype(float), inst.bandwidth_hz)
    b = np.zeros(inst.num_devices)
    b[devs] = b_inv
    return b, round_latency_s(inst, devs, b)


# --------------------------------------------------------------------------------------------
# JBBA
# --------------------------------------------------------------------------------------------
def jbba(inst: Instance, iterations: int = 60, step: float = 0.5) -> Allocation:
    """Joint bandwidth-and-block allocation by dual ascent.

    Epigraph form: min T s.t. sum_n x_{k,n} T_{k,n}(b_k) <= T for every k, with multipliers
    lambda_k >= 0, sum_k lambda_k = 1 (stationarity in T). Each iteration:

    1. blocks: Hungarian method (``scipy.optimize.linear_sum_assignment``) on cost
       lambda_k T_{k,n}(b~_k) (memory-infeasible pairs excluded), where b~_k is the device's
       current bandwidth if involved, else the equal share B/N;
    2. bandwidth in closed form (fixed spectral efficiency r_k at the equal share):
       b_k = B sqrt(lambda_k S_{n(k)} / r_k) / sum_j sqrt(lambda_j S_{n(j)} / r_j) over involved k;
    3. lambda_k <- [lambda_k + s_t (T_k - mean T) / mean T]_+, normalised, s_t = step / sqrt(t+1).

    Every assignment met (and CRUNCH's, the starting point) is polished with the exact min-max
    bandwidth split (:func:`polish`); the best is returned, so JBBA is never worse than CRUNCH
    under equal bandwidth, and its bottleneck device never gets less than the equal share.
    """
    k_dev, n_blk = inst.num_devices, inst.num_blocks
    big_b = inst.bandwidth_hz
    eq = big_b / n_blk
    r_eq = np.log2(1.0 + inst.snr_hz / eq)  # spectral efficiency at the equal share [bit/s/Hz]

    start = crunch(inst)
    best_dev = start.device_of_block.copy()
    best_b, best_t = polish(inst, best_dev)
    lam = np.full(k_dev, 1.0 / k_dev)
    offer = np.full(k_dev, eq)
    history = [best_t]
    for t in range(iterations):
        lat = inst.latency_matrix(offer)
        finite = np.isfinite(lat)
        cost = np.where(finite, lam[:, None] * np.where(finite, lat, 0.0), np.inf)
        found = _assignment(cost)
        if found is None:
            break
        rows, cols = found
        dev = np.full(n_blk, -1, dtype=int)
        dev[cols] = rows
        # closed-form bandwidth for the involved devices
        w = np.sqrt(np.maximum(lam[dev], 1e-12) * inst.upload_bits / r_eq[dev])
        b = np.zeros(k_dev)
        b[dev] = big_b * w / w.sum()
        t_k = inst.latency_matrix(b)[dev, np.arange(n_blk)]
        # candidate: polished bandwidth for this assignment
        pb, pt = polish(inst, dev)
        history.append(pt)
        if pt < best_t - 1e-12:
            best_dev, best_b, best_t = dev.copy(), pb, pt
        # dual step
        mean_t = float(np.mean(t_k))
        grad = np.zeros(k_dev)
        grad[dev] = (t_k - mean_t) / mean_t
        lam = np.maximum(lam + step / math.sqrt(t + 1) * grad, 0.0)
        lam = lam / lam.sum() if lam.sum() > 0 else np.full(k_dev, 1.0 / k_dev)
        offer = np.full(k_dev, eq)
        offer[dev] = b[dev]
    return Allocation("jbba", best_dev, best_b, best_t,
                      {"crunch_start_latency_s": start.planned_latency_s, "iterations": len(history) - 1,
                       "lambda": lam.tolist()})


# --------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------
def random_allocation(inst: Instance, rng: np.random.Generator) -> Allocation:
    """A random memory-feasible matching (Hungarian on i.i.d. uniform costs), B/N each."""
    cost = np.where(inst.memory_ok, rng.random((inst.num_devices, inst.num_blocks)), np.inf)
    found = _assignment(cost)
    if found is None:
        raise InfeasibleError("no memory-feasible matching of every block to a distinct device")
    rows, cols = found
    dev = np.empty(inst.num_blocks, dtype=int)
    dev[cols] = rows
    b = _only_involved(inst, dev, equal_bandwidth_hz(inst, inst.num_blocks))
    return Allocation("random", dev, b, round_latency_s(inst, dev, b))


def greedy(inst: Instance) -> Allocation:
    """Deepest block first, each to the fastest (highest FLOP/s) free device that can hold it;
    ties by index. Equal share B/N. Ignores channels."""
    speed = inst.compute_flops_per_s
    if speed is None:  # fall back to the device's compute time of the cheapest block
        speed = 1.0 / inst.compute_s[:, 0]
    order = np.lexsort((np.arange(inst.num_devices), -np.asarray(speed)))
    free = np.ones(inst.num_devices, dtype=bool)
    dev = np.full(inst.num_blocks, -1, dtype=int)
    for n in range(inst.num_blocks - 1, -1, -1):
        for k in order:
            if free[k] and inst.memory_ok[k, n]:
                dev[n] = k
                free[k] = False
                break
        else:
            raise InfeasibleError(f"greedy: no free device can hold block {n}")
    b = _only_involved(inst, dev, equal_bandwidth_hz(inst, inst.num_blocks))
    return Allocation("greedy", dev, b, round_latency_s(inst, dev, b))


def depth_unaware(inst: Instance) -> Allocation:
    """Believes every block costs the same (its mean over blocks): picks the N devices with the
    smallest believed latency, then hands blocks 0..N-1 to them in device-index order (a
    memory-feasible reordering if that order does not fit). Equal share B/N."""
    offer = equal_bandwidth_hz(inst, inst.num_blocks)
    lat = inst.latency_matrix(offer)
    believed = np.mean(np.where(np.isfinite(lat), lat, np.nan), axis=1)
    believed = np.where(np.isnan(believed), np.inf, believed)
    chosen = np.sort(np.argsort(believed, kind="stable")[: inst.num_blocks])
    n_blk = inst.num_blocks
    # depth-oblivious hand-out: position order, repaired for memory by an assignment
    cost = np.abs(np.arange(n_blk)[:, None] - np.arange(n_blk)[None, :]).astype(float)
    found = _assignment(np.where(inst.memory_ok[chosen], cost, np.inf))
    if found is None:  # chosen set cannot hold all blocks: use all devices
        cost_all = np.abs(np.arange(inst.num_devices)[:, None] - np.arange(n_blk)[None, :]).astype(float)
        found = _assignment(np.where(inst.memory_ok, cost_all, np.inf))
        if found is None:
            raise InfeasibleError("no memory-feasible matching of every block to a distinct device")
        chosen = np.arange(inst.num_devices)
    rows, cols = found
    dev = np.empty(n_blk, dtype=int)
    dev[cols] = chosen[rows]
    b = _only_involved(inst, dev, offer)
    return Allocation("depth_unaware", dev, b, round_latency_s(inst, dev, b))


def allocate(name: str, inst: Instance, rng: Optional[np.random.Generator] = None, **kw) -> Allocation:
    """Run one allocation algorithm by name (``offloading`` is not a matching: see netsim.protocols.lola)."""
    if name == "crunch":
        return crunch(inst)
    if name == "jbba":
        return jbba(inst, **kw)
    if name == "random":
        return random_allocation(inst, rng if rng is not None else np.random.default_rng(0))
    if name == "greedy":
        return greedy(inst)
    if name == "depth_unaware":
        return depth_unaware(inst)
    if name == "equal_bandwidth":
        return equal_bandwidth(inst)
    raise ValueError(f"unknown allocation algorithm {name!r}; known: {ALGORITHMS}")


def brute_force_minmax(latency: np.ndarray) -> float:
    """Reference optimum: min over all injective block->device maps of the max latency
    (itertools.permutations; small instances only)."""
    k_dev, n_blk = latency.shape
    best = math.inf
    for perm in itertools.permutations(range(k_dev), n_blk):
        best = min(best, max(latency[k, n] for n, k in enumerate(perm)))
    return best
