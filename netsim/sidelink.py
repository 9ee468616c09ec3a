"""Device-to-device (D2D) traffic over the sidelink graph: hop times, routes, store-and-forward
transfers, decentralised averaging (gossip) weights, and the similarity-versus-cost rule for
choosing where to fetch a prompt from.

The graph is the one :func:`netsim.network.build_d2d_graph` builds: nodes are device indices,
every edge ``(a, b)`` carries a sidelink :class:`~netsim.channel.Link` (``link``) with its own
block fading. A hop's time comes from that link's channel model (bits / rate over the coherence
blocks it spans), never from the host clock; nothing here draws random numbers.

Units: sizes in bits, times in seconds of simulated time, bandwidths in Hz.

References
----------
L. Xiao, S. Boyd, "Fast linear iterations for distributed averaging", Systems & Control
Letters 53 (2004) 65-78 (Metropolis-Hastings weights, convergence factor).
S. Boyd, A. Ghosh, B. Prabhakar, D. Shah, "Randomized gossip algorithms", IEEE Trans. Inf.
Theory 52 (2006) 2508-2530.
T. Vu, B. Lester, N. Constant, R. Al-Rfou, D. Cer, "SPoT: Better frozen model adaptation through
soft prompt transfer", ACL 2022 (choosing a source prompt by task-embedding similarity).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Hashable, Mapping, NamedTuple, Optional, Sequence

import networkx as nx
import numpy as np

from .channel import Link

METRICS = ("expected_time", "hops")
"""What :func:`route` minimises."""


def _name(node) -> str:
    return f"dev{node}"


def _check_node(graph: nx.Graph, node, what: str) -> None:
    if node not in graph:
        raise ValueError(f"{what}={node!r} is not a device of the D2D graph; allowed: one of its "
                         f"{graph.number_of_nodes()} nodes (device indices)")


def _check_size_and_bandwidth(size_bits: float, bandwidth_hz: float) -> None:
    if not (isinstance(size_bits, (int, float, np.integer, np.floating)) and math.isfinite(size_bits)
            and size_bits >= 0):
        raise ValueError(f"size_bits={size_bits!r}; allowed: a finite number >= 0")
    if not (isinstance(bandwidth_hz, (int, float, np.integer, np.floating)) and math.isfinite(bandwidth_hz)
            and bandwidth_hz > 0):
        raise ValueError(f"bandwidth_hz={bandwidth_hz!r}; allowed: a finite number > 0")


def sidelink(graph: nx.Graph, a, b) -> Link:
    """The sidelink :class:`Link` from ``a`` to ``b``: the edge's ``link`` (from the lower device
    index to the higher) or, from the higher to the lower, ``link_ba`` where the graph has one
    (:func:`netsim.network.build_d2d_graph` does; the two share the fading and differ in the
    sender's transmit power). ValueError when either device is not in the graph or the two are
    not D2D neighbours."""
    _check_node(graph, a, "a")
    _check_node(graph, b, "b")
    if not graph.has_edge(a, b):
        raise ValueError(f"devices {_name(a)} and {_name(b)} are not D2D neighbours (no sidelink between them); "
                         f"allowed: one of {_name(a)}'s {graph.degree(a)} neighbours "
                         f"{sorted(graph.adj[a])[:10]}{' ...' if graph.degree(a) > 10 else ''}")
    data = graph.edges[a, b]
    link = data.get("link_ba") if a > b and "link_ba" in data else data.get("link")   # the sender's power
    if not isinstance(link, Link):
        raise ValueError(f"edge {_name(a)}-{_name(b)} of the D2D graph has no 'link' attribute "
                         f"(a netsim.channel.Link), got {link!r}")
    return link


def hop_duration_s(graph: nx.Graph, a, b, size_bits: float, start_s: float, bandwidth_hz: float) -> float:
    """Time [s] to send ``size_bits`` from ``a`` to ``b`` over their sidelink, starting at
    simulated time ``start_s`` [s], over ``bandwidth_hz`` [Hz].

    The payload goes at each coherence block's rate R_b (``shannon``: B log2(1 + SNR_b);
    ``fixed``: R B or 0 in outage) through the blocks it spans,
    S = sum_b R_b tau_b, T = sum_b tau_b (:meth:`netsim.channel.Link.transfer_duration_s`).

    ValueError when ``(a, b)`` is not an edge, or (from the link, naming it) for a bad size,
    bandwidth or a rate that cannot finish the transfer.
    """
    link = sidelink(graph, a, b)
    return link.transfer_duration_s(size_bits, start_s, bandwidth_hz)


def expected_rate_bps(link: Link, bandwidth_hz: float) -> float:
    """Rate estimate of a link for routing [bit/s], with the fading averaged out of the SNR.

    ``shannon``: B log2(1 + mean SNR), mean SNR = P g / (N0 NF B) (E|h|^2 = 1). By Jensen's
    inequality this is an upper bound on the ergodic rate E[B log2(1 + SNR |h|^2)] of a Rayleigh
    link, so the times derived from it are optimistic.
    ``fixed``: R B (1 - P_out), the exact mean rate of a fixed-rate code with outage
    probability P_out per block (:meth:`netsim.channel.Link.outage_probability`).

    0 for a link that carries nothing on average (mean SNR 0, or certain outage).
    """
    if not (math.isfinite(bandwidth_hz) and bandwidth_hz > 0):
        raise ValueError(f"{link.name}: bandwidth_hz={bandwidth_hz!r}; allowed: a finite number > 0")
    if link.fixed_rate:
        p_out = link.outage_probability(bandwidth_hz)
        if not 0.0 <= p_out <= 1.0:
            raise ValueError(f"{link.name}: outage probability {p_out!r} over {bandwidth_hz} Hz; check the powers, "
                             "noise PSD and positions of the scenario")
        return link.spectral_efficiency_bps_per_hz * bandwidth_hz * (1.0 - p_out)
    snr_db = link.mean_snr_db(bandwidth_hz)
    if math.isnan(snr_db) or snr_db == math.inf:
        raise ValueError(f"{link.name}: mean SNR {snr_db!r} dB over {bandwidth_hz} Hz; allowed: a finite SNR >= 0 "
                         "(check the powers, noise PSD and positions of the scenario)")
    if snr_db == -math.inf:
        return 0.0
    return bandwidth_hz * math.log2(1.0 + 10.0 ** (snr_db / 10.0))


def expected_hop_s(graph: nx.Graph, a, b, size_bits: float, bandwidth_hz: float) -> float:
    """Estimated time [s] of one hop from ``a`` to ``b``: size_bits / (B log2(1 + mean SNR))
    (see :func:`expected_rate_bps`; R B (1 - P_out) in ``fixed`` rate mode).

    An estimate for routing that ignores the fading: the realised :func:`hop_duration_s`
    depends on the blocks the transfer spans. ``math.inf`` for a link whose expected rate is 0.
    0 for ``size_bits`` = 0.
    """
    _check_size_and_bandwidth(size_bits, bandwidth_hz)
    rate = expected_rate_bps(sidelink(graph, a, b), bandwidth_hz)
    if size_bits == 0:
        return 0.0
    return math.inf if rate == 0 else float(size_bits) / rate


def route(graph: nx.Graph, src, dst, size_bits: float, bandwidth_hz: float,
          metric: str = "expected_time", max_hops: Optional[int] = None) -> list:
    """The D2D path from ``src`` to ``dst`` (a list of devices, both ends included).

    ``metric="expected_time"`` minimises the sum of :func:`expected_hop_s` (store-and-forward,
    so the estimated end-to-end time); ``"hops"`` minimises the hop count. Sidelinks whose
    expected rate is 0 are not used. Ties are broken by the other metric, then by the
    lexicographically smallest node sequence, so the result does not depend on the order in
    which nodes or edges were added (Dijkstra on keys (cost, tie-break, path); the weights
    are >= 0, so a path's key only grows when it is extended).

    ``max_hops``: only paths of at most that many hops (Dijkstra over the states (device, hops
    used), so the best path of at most ``max_hops`` hops is found even when a longer one would
    be faster); None: any length.

    ``src == dst`` gives ``[src]``. ValueError naming both devices when there is no usable path.
    """
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}; allowed: one of {list(METRICS)}")
    _check_node(graph, src, "src")
    _check_node(graph, dst, "dst")
    _check_size_and_bandwidth(size_bits, bandwidth_hz)
    if max_hops is not None and not (isinstance(max_hops, (int, np.integer)) and not isinstance(max_hops, bool)
                                     and max_hops >= 1):
        raise ValueError(f"max_hops={max_hops!r}; allowed: an integer >= 1, or None (any length)")
    if src == dst:
        return [src]
    by_time = metric == "expected_time"
    heap: list = [(0.0, 0, (src,))] if by_time else [(0, 0.0, (src,))]
    done: set = set()
    while heap:
        first, second, path = heapq.heappop(heap)
        node = path[-1]
        state = node if max_hops is None else (node, len(path) - 1)
        if state in done:
            continue
        done.add(state)
        if node == dst:
            return list(path)
        if max_hops is not None and len(path) - 1 >= max_hops:
            continue
        for nxt in graph.adj[node]:
            if max_hops is None and nxt in done:
                continue
            if nxt in path:
                continue
            t = expected_hop_s(graph, node, nxt, size_bits, bandwidth_hz)
            if t == math.inf:
                continue
            key = (first + t, second + 1) if by_time else (first + 1, second + t)
            heapq.heappush(heap, (*key, path + (nxt,)))
    if max_hops is not None and nx.has_path(graph, src, dst) and nx.shortest_path_length(graph, src, dst) > max_hops:
        why = (f"they are {nx.shortest_path_length(graph, src, dst)} hops apart, more than max_hops={max_hops}")
    elif nx.has_path(graph, src, dst):
        why = "every path between them crosses a sidelink whose expected rate is 0 (mean SNR 0 or certain outage)"
    else:
        k = nx.number_connected_components(graph)
        why = (f"they are in different connected components (the D2D graph has {k} components; "
               f"{_name(src)}'s has {len(nx.node_connected_component(graph, src))} devices, "
               f"{_name(dst)}'s has {len(nx.node_connected_component(graph, dst))})")
    raise ValueError(f"no D2D path from {_name(src)} to {_name(dst)}: {why}")


class Hop(NamedTuple):
    """One store-and-forward hop: from ``a`` to ``b``, starting at ``start_s`` [s], lasting
    ``duration_s`` [s]."""

    a: Hashable
    b: Hashable
    start_s: float
    duration_s: float


@dataclass(frozen=True)
class Transfer:
    """A payload sent along a D2D path.

    ``hops``: one :class:`Hop` per edge of the path; ``total_s`` [s] = the sum of the hop
    durations; ``end_s`` [s]: when the last hop ends (``start_s`` for a one-device path);
    ``tx_energy_j`` [J] = sum over hops of the sidelink's transmit power P_tx times the hop's
    duration (radiated energy only, no circuit power).
    """

    start_s: float
    end_s: float
    total_s: float
    size_bits: float
    hops: list[Hop] = field(default_factory=list)
    tx_energy_j: float = 0.0

    @property
    def path(self) -> list:
        """The devices the payload visited, in order."""
        return [self.hops[0].a] + [h.b for h in self.hops] if self.hops else []


def transfer(graph: nx.Graph, path: Sequence, size_bits: float, start_s: float, bandwidth_hz: float) -> Transfer:
    """Send ``size_bits`` along ``path`` (consecutive devices must be D2D neighbours), store and
    forward: hop k starts when hop k-1 ends (a relay forwards only once it has the whole
    payload), each through the fading blocks of its own time span, so

    .. math::
        t_0 = start, \\quad t_{k+1} = t_k + T_k(t_k), \\quad total = \\sum_k T_k(t_k)

    with T_k(t) the :func:`hop_duration_s` of hop k started at t. A one-device path has no hops
    and takes 0 s. ValueError for an empty path, a non-edge (naming both devices) or bad sizes.
    """
    nodes = list(path)
    if not nodes:
        raise ValueError("path=[]; allowed: a list of one or more devices, consecutive ones D2D neighbours")
    _check_size_and_bandwidth(size_bits, bandwidth_hz)
    if not math.isfinite(start_s):
        raise ValueError(f"start_s={start_s!r}; allowed: a finite time [s]")
    for node in nodes:
        _check_node(graph, node, "path device")
    links = [sidelink(graph, a, b) for a, b in zip(nodes, nodes[1:])]
    hops: list[Hop] = []
    t = float(start_s)
    total = 0.0
    energy = 0.0
    for (a, b), link in zip(zip(nodes, nodes[1:]), links):
        d = link.transfer_duration_s(size_bits, t, bandwidth_hz)
        hops.append(Hop(a, b, t, d))
        total += d
        energy += link.tx_power_w * d
        t = t + d
    return Transfer(float(start_s), t, total, float(size_bits), hops, energy)


# ------------------------------------------------------------------ decentralised averaging
def metropolis_weights(graph: nx.Graph) -> np.ndarray:
    """Metropolis-Hastings averaging weights of the graph (Xiao and Boyd 2004, eq. 13), an
    (N, N) matrix over the nodes in ``sorted(graph.nodes)`` order (device index for a
    :class:`~netsim.network.Network`'s graph):

    .. math::
        W_{ij} = \\frac{1}{1 + \\max(d_i, d_j)} \\ (ij \\in E), \\quad
        W_{ii} = 1 - \\sum_{j \\ne i} W_{ij}, \\quad 0 \\text{ otherwise}

    with d_i the degree of i. W is symmetric and doubly stochastic with W_ii >= 1/(1 + d_i) > 0,
    and needs only local information (each device knows its neighbours' degrees). An isolated
    device gets W_ii = 1 (it keeps its value). ValueError for a graph with self-loops.
    """
    if nx.number_of_selfloops(graph):
        loops = sorted(u for u, _ in nx.selfloop_edges(graph))
        raise ValueError(f"the D2D graph has self-loops at {[_name(u) for u in loops[:10]]}; "
                         "allowed: a simple graph (a device is not its own neighbour)")
    nodes = sorted(graph.nodes)
    index = {u: i for i, u in enumerate(nodes)}
    n = len(nodes)
    w = np.zeros((n, n))
    for u, v in graph.edges:
        i, j = index[u], index[v]
        w[i, j] = w[j, i] = 1.0 / (1.0 + max(graph.degree(u), graph.degree(v)))
    np.fill_diagonal(w, 1.0 - w.sum(axis=1))
    return w


def _check_square(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"W has shape {w.shape}; allowed: a square (N, N) averaging matrix")
    if not np.isfinite(w).all():
        raise ValueError("W has non-finite entries; allowed: finite weights")
    return w


def gossip_step(values, w) -> np.ndarray:
    """One synchronous decentralised averaging step: x_{t+1} = W x_t, where row i of ``values``
    (shape (N,) or (N, d)) is device i's vector and ``w`` an (N, N) averaging matrix (e.g.
    :func:`metropolis_weights`). Device i needs only its neighbours' values. A doubly stochastic
    W keeps the network average: 1^T W x = 1^T x."""
    w = _check_square(w)
    x = np.asarray(values, dtype=np.float64)
    if x.ndim not in (1, 2) or x.shape[0] != w.shape[0]:
        raise ValueError(f"values has shape {x.shape}; allowed: (N,) or (N, d) with N = {w.shape[0]} "
                         "(one row per device of W)")
    return w @ x


def gossip_error_bound(w, steps: int = 1) -> float:
    """Convergence factor of gossip with a symmetric doubly stochastic W, raised to ``steps``.

    lambda = ||W - 11^T/N||_2 = max(|lambda_2(W)|, |lambda_N(W)|), the second-largest eigenvalue
    modulus of W (Xiao and Boyd 2004). Since x_t - xbar = (W - 11^T/N)^t (x_0 - xbar),

    .. math::
        \\|x_t - \\bar x\\| \\le \\lambda^t \\|x_0 - \\bar x\\|

    (column by column, hence also in the Frobenius norm for (N, d) values). lambda < 1 exactly
    when the graph is connected (Metropolis weights have W_ii > 0, so lambda_N > -1); a graph
    with more than one component has lambda = 1. Returns lambda^steps (lambda for steps = 1).
    ValueError for a W that is not square, symmetric and doubly stochastic (within 1e-9).
    """
    w = _check_square(w)
    if not (isinstance(steps, (int, np.integer)) and not isinstance(steps, bool) and steps >= 0):
        raise ValueError(f"steps={steps!r}; allowed: an integer >= 0")
    n = w.shape[0]
    if n == 0:
        return 0.0
    if np.abs(w - w.T).max() > 1e-9:
        raise ValueError("W is not symmetric; the bound holds for symmetric doubly stochastic W")
    if np.abs(w.sum(axis=1) - 1.0).max() > 1e-9:
        raise ValueError("W is not doubly stochastic (rows must sum to 1); the bound needs it")
    lam = float(np.abs(np.linalg.eigvalsh(w - np.full((n, n), 1.0 / n))).max())
    return lam ** int(steps)


# ------------------------------------------------------------------ choosing a source
def task_similarity(a, b) -> float:
    """Cosine similarity <a, b> / (||a|| ||b||) in [-1, 1] of two task embeddings of the same
    shape (e.g. a soft prompt averaged over its tokens; SPoT, Vu et al. 2022). ValueError for a
    shape mismatch, non-finite entries or a zero vector."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.size == 0:
        raise ValueError(f"task embeddings of shapes {x.shape} and {y.shape}; allowed: two non-empty arrays of "
                         "the same shape")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("task embedding with non-finite entries; allowed: finite numbers")
    x, y = x.ravel(), y.ravel()
    nx_, ny_ = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    if nx_ == 0.0 or ny_ == 0.0:
        raise ValueError(f"task embedding {'a' if nx_ == 0.0 else 'b'} is the zero vector; cosine similarity "
                         "needs a non-zero vector")
    return float(np.clip(np.dot(x / nx_, y / ny_), -1.0, 1.0))


def rank_sources(own_embedding, candidates: Mapping, cost_weight_per_s: float) -> list[tuple]:
    """Rank candidate source devices for a prompt fetch.

    ``candidates`` maps a device to ``(embedding, fetch_time_s)``; each gets

    .. math::
        score = \\cos(e_{own}, e_{cand}) - c \\, T_{fetch}

    with c = ``cost_weight_per_s`` [1/s] (similarity given up per second of fetch time). Returns
    ``[(device, score), ...]`` by score descending, equal scores by device ascending.
    ValueError for a negative or non-finite weight or fetch time, or a bad embedding (naming
    the device).
    """
    if not (isinstance(cost_weight_per_s, (int, float, np.integer, np.floating))
            and math.isfinite(cost_weight_per_s) and cost_weight_per_s >= 0):
        raise ValueError(f"cost_weight_per_s={cost_weight_per_s!r}; allowed: a finite number >= 0")
    scored = []
    for node, entry in candidates.items():
        try:
            embedding, fetch_time_s = entry
        except (TypeError, ValueError):
            raise ValueError(f"candidate {_name(node)}: {entry!r}; allowed: a pair (embedding, fetch_time_s)") from None
        if not (isinstance(fetch_time_s, (int, float, np.integer, np.floating)) and math.isfinite(fetch_time_s)
                and fetch_time_s >= 0):
            raise ValueError(f"candidate {_name(node)}: fetch_time_s={fetch_time_s!r}; allowed: a finite number >= 0")
        try:
            sim = task_similarity(own_embedding, embedding)
        except ValueError as e:
            raise ValueError(f"candidate {_name(node)}: {e}") from None
        scored.append((node, sim - float(cost_weight_per_s) * float(fetch_time_s)))
    scored.sort(key=lambda ns: (-ns[1], ns[0]))
    return scored
