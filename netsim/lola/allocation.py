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
Offloading needs no matching; it is simulated in :mod:`netsim.lola.simulate`.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.special import lambertw
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching

ALGORITHMS = ("crunch", "jbba", "random", "greedy", "depth_unaware", "equal_bandwidth", "offloading")
_BIG = 1e30


class InfeasibleError(ValueError):
    """No matching of every block to a distinct device fits the memory constraints."""


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
        """Mean Shannon rate R_k(b) = b log2(1 + gamma_k / b) [bit/s] (0 for b = 0)."""
        b = np.asarray(bandwidth_hz, dtype=float)
        g = np.asarray(self.snr_hz, dtype=float)[k]
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(b > 0, b * np.log2(1.0 + g / np.where(b > 0, b, 1.0)), 0.0)
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
    gives it with order 0..N-1 when upload sizes are equal."""
    ranks = np.argsort(np.argsort(np.where(np.isfinite(latency), latency, _BIG), axis=1, kind="stable"), axis=1)
    order = np.argsort(ranks.sum(axis=0), kind="stable")
    sorted_rows = latency[:, order]
    if np.all(np.diff(np.where(np.isfinite(sorted_rows), sorted_rows, _BIG), axis=1) >= 0):
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
    k_dev, n_blk = latency.shape
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
def _bandwidth_for_rate(snr_hz: np.ndarray, rate_bps: np.ndarray) -> np.ndarray:
    """Bandwidth b with b log2(1 + gamma/b) = rate, in closed form (inf where the rate exceeds
    the wideband limit gamma / ln 2, 0 for rate 0).

    With a = rate ln2 / gamma and y = 1 + gamma/b the equation is ln y = a (y - 1), whose root
    y > 1 is y = -W_{-1}(-a e^{-a}) / a (Lambert W, lower branch), so b = gamma / (y - 1)."""
    gamma = np.asarray(snr_hz, dtype=float)
    rate = np.asarray(rate_bps, dtype=float)
    a = rate * math.log(2.0) / gamma
    out = np.full(a.shape, np.inf)
    zero = rate <= 0
    ok = (a > 0) & (a < 1)
    if np.any(ok):
        aa = a[ok]
        y = -np.real(lambertw(-aa * np.exp(-aa), k=-1)) / aa
        out[ok] = gamma[ok] / np.maximum(y - 1.0, 1e-300)
    out[zero] = 0.0
    return out


def minmax_bandwidth(compute_s: np.ndarray, upload_bits: np.ndarray, snr_hz: np.ndarray,
                     total_hz: float, iters: int = 100) -> np.ndarray:
    """Exact min-max bandwidth split of ``total_hz`` for a fixed assignment (one entry per
    involved device): the optimum equalises latencies, C_k + S_k / R_k(b_k) = T, so
    b_k(T) = R_k^{-1}(S_k / (T - C_k)) and T is the root of sum_k b_k(T) = B (bisection; T lies
    between the compute floor and the equal-share latency). Unused slack (from the bisection
    tolerance) is handed out in proportion to b_k, so the shares sum to ``total_hz``."""
    m = len(compute_s)
    eq = np.full(m, total_hz / m)
    t_hi = float(np.max(compute_s + upload_bits / (eq * np.log2(1.0 + snr_hz / eq))))
    t_lo = float(np.max(compute_s))
    for _ in range(iters):
        if t_hi - t_lo <= 1e-13 * t_hi:
            break
        t = 0.5 * (t_lo + t_hi)
        slack = t - compute_s
        if np.any(slack <= 0):
            t_lo = t
            continue
        b = _bandwidth_for_rate(snr_hz, upload_bits / slack)
        if np.sum(b) <= total_hz:
            t_hi = t
        else:
            t_lo = t
    b = _bandwidth_for_rate(snr_hz, upload_bits / (t_hi - compute_s))
    if not np.all(np.isfinite(b)) or np.sum(b) > total_hz * (1 + 1e-9):
        b = eq.copy()  # numerical fall-back: equal share is always feasible
    b = b * (total_hz / np.sum(b))
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
        cost = np.where(finite, lam[:, None] * np.where(finite, lat, 0.0), _BIG)
        rows, cols = linear_sum_assignment(cost)
        if np.any(cost[rows, cols] >= _BIG):
            break
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
    cost = np.where(inst.memory_ok, rng.random((inst.num_devices, inst.num_blocks)), _BIG)
    rows, cols = linear_sum_assignment(cost)
    if np.any(cost[rows, cols] >= _BIG):
        raise InfeasibleError("no memory-feasible matching")
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
    cost = np.where(inst.memory_ok[chosen], cost, _BIG)
    rows, cols = linear_sum_assignment(cost)
    if np.any(cost[rows, cols] >= _BIG):  # chosen set cannot hold all blocks: use all devices
        cost_all = np.where(inst.memory_ok, np.abs(np.arange(inst.num_devices)[:, None] - np.arange(n_blk)[None, :]), _BIG)
        rows, cols = linear_sum_assignment(cost_all)
        if np.any(cost_all[rows, cols] >= _BIG):
            raise InfeasibleError("no memory-feasible matching")
        chosen = np.arange(inst.num_devices)
    dev = np.empty(n_blk, dtype=int)
    dev[cols] = chosen[rows]
    b = _only_involved(inst, dev, offer)
    return Allocation("depth_unaware", dev, b, round_latency_s(inst, dev, b))


def allocate(name: str, inst: Instance, rng: Optional[np.random.Generator] = None, **kw) -> Allocation:
    """Run one allocation algorithm by name (``offloading`` is not a matching: see simulate)."""
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
