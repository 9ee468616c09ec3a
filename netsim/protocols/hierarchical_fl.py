"""Hierarchical (cluster) federated fine-tuning over the D2D graph (``training.topology:
hierarchical``): cluster heads aggregate their members' updates over sidelinks and upload one
partial sum each.

One round r (synchronous; FedAvg of the PEFT parameters, McMahan et al. 2017; two-tier
aggregation as in client-edge-cloud hierarchical FL, Liu et al. 2020, with device heads as in
D2D-assisted FL, e.g. Lin et al. 2021 and Hosseinalipour et al. 2022):

1. the edge selects the round's devices S as in :mod:`netsim.protocols.fedavg` (availability,
   ``strategies.selection``, memory);
2. **clusters** are formed on G_r = the D2D graph of the round start (``self.network.d2d``,
   rebuilt by every mobility tick) restricted to S, by a deterministic greedy dominating set
   (:func:`form_clusters`, ``hierarchical.head_selection``):

   - ``best_uplink``: devices in order of decreasing mean uplink SNR (ties: lower index); the
     first device not yet in a cluster becomes a head and takes its unassigned neighbours;
   - ``degree``: the classic greedy dominating set (Johnson 1974; ln(Delta) approximation):
     repeatedly the unassigned device with the most unassigned neighbours becomes a head (ties:
     higher mean uplink SNR, then lower index) and takes them.

   A head takes at most ``hierarchical.max_cluster_size`` - 1 members (null: no limit), its
   neighbours in order of decreasing mean sidelink SNR (ties: lower index); the others stay
   unassigned for a later head. A device with no selected neighbour left is a head of a
   cluster of one: it uploads directly, as in the star. The heads form an independent set of
   G_r that dominates S (without a size limit), so every member is one hop from its head;
3. every selected device receives the global adapter from the edge (the multicast of
   :mod:`netsim.protocols.fedavg`: each device decodes at its own per-block rate; members are
   not served by their head, a documented choice: the multicast costs the edge the same
   airtime whoever listens) and runs its E local steps (its job from the global state);
4. each **member** m sends its update (``update_bytes``) to its head h over the sidelink m -> h
   as soon as its local steps end (:func:`netsim.sidelink.transfer`, path [m, h]): the duration
   is the payload over the rates of the coherence blocks it spans,

   .. math::
       S = \\sum_b R_b \\tau_b, \\quad T_{m \\to h} = \\sum_b \\tau_b, \\quad
       R_b = B_{sl} \\log_2(1 + \\mathrm{SNR}_b)

   with B_sl = ``d2d.bandwidth_hz``: every member transmits on its own sidelink band of B_sl,
   concurrently and without interference (orthogonal sidelink resource pools, a documented
   simplification). Energy: the member's transmit power times T (``d2d_transfer`` event,
   ``node`` = member, ``peer`` = head), the head's ``rx_power_w`` times T
   (``d2d_receive``, ``node`` = head, ``peer`` = member). A head may receive while it computes
   (its radio and its processor are separate);
5. the **head** waits until its own local steps have ended and every member's update has
   arrived (or, with ``hierarchical.head_timeout_s``, until that long after the round start,
   keeping what has arrived: the others are ``update_late``), then forms the partial sums

   .. math::
       P_h = \\sum_{k \\in C_h} n_k \\, \\Delta_k, \\qquad N_h = \\sum_{k \\in C_h} n_k

   (2 |C_h| n FLOPs on the head at its compute speed, ``partial_aggregate`` event; n = the
   adapter's float32 values; none for a head that received nothing, which uploads its own
   update as in the star) and uploads ONE update of ``update_bytes`` (P_h; N_h is one number
   and its few bytes are neglected) over its FDMA share of the uplink band. Only heads share
   the band (``strategies.bandwidth`` splits it among the round's heads);
6. the edge, once every partial has arrived (or at ``training.deadline_s``, keeping the
   partials that arrived; a head still busy then loses its whole cluster's updates, all
   ``update_late``), combines

   .. math::
       \\Delta = \\frac{\\sum_h P_h}{\\sum_h N_h} = \\sum_{k} \\frac{n_k}{\\sum_j n_j} \\Delta_k,

   exactly the FedAvg aggregate of the same updates (up to float64 rounding of the reordered
   sum), applies ``strategies.aggregation``'s server step (identity for FedAvg / FedProx,
   FedAdam / FedYogi on the flat vector) and evaluates as in FedAvg.

A device that goes offline before its update is delivered loses it (``update_dropped``): a
member that leaves, or whose head leaves, before its sidelink transfer ends; a head that
leaves before its upload ends drops its own update and those of the members it had received.

Assumptions and simplifications: the sidelink's large-scale gain is that of the graph the
clusters were formed on (the round start; fading goes on block by block); members and heads
are one hop apart (no multi-hop relaying); sidelink resource pools are orthogonal to the
uplink and to each other; partial sums are sent uncompressed (``strategies.compression`` must
be ``none``).

Summary fields (:meth:`HierarchicalFLSimulation.dynamics_summary`, recomputed from the event
log): ``topology``, ``d2d_bytes``, ``d2d_tx_energy_j``, ``d2d_rx_energy_j``, ``d2d_energy_j``
(tx + rx), ``uplink_bytes``, ``uplink_bytes_saved_vs_star`` (the uploads the members did not
make, at ``update_bytes`` each), ``clusters_per_round`` and its mean, ``mean_cluster_size``.

References
----------
L. Liu, J. Zhang, S. H. Song, K. B. Letaief, "Client-edge-cloud hierarchical federated
learning", IEEE ICC 2020.
F. P.-C. Lin, S. Hosseinalipour, S. S. Azam, C. G. Brinton, N. Michelusi, "Semi-decentralized
federated learning with cooperative D2D local model aggregations", IEEE JSAC 39 (2021).
D. S. Johnson, "Approximation algorithms for combinatorial problems", J. Comput. Syst. Sci. 9
(1974) 256-278 (greedy dominating set).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Optional, Sequence

import networkx as nx
import numpy as np
import simpy
from pydantic import Field

from ..budgets import energy_j
from ..dynamics import compute_time_energy
from ..interfaces import LocalResult
from ..network import Device
from ..records import COLUMNS
from ..sidelink import sidelink, transfer
from ..spec_base import Int, PositiveFloat, Spec
from .fedavg import FedAvgSimulation

if TYPE_CHECKING:  # netsim.scenario imports HierarchicalSpec: no import of it at run time
    from ..engine import PendingJob
    from ..scenario import Scenario

HEAD_RULES = ("best_uplink", "degree")
"""The cluster-head selection rules of :func:`form_clusters`."""

KIND, BYTES, ENERGY = COLUMNS.index("kind"), COLUMNS.index("bytes"), COLUMNS.index("energy_j")

D2D_AGGREGATIONS = ("fedavg", "fedprox", "fedadam", "fedyogi")
"""Aggregations whose weights are n_k / sum_j n_j (so that partial sums combine exactly)."""


def d2d_topology_errors(scenario: "Scenario", topology: str) -> None:
    """The settings every D2D topology (hierarchical, gossip) needs of the shared sections;
    ValueError naming the fields, their values and what is allowed."""
    tr, st, ch = scenario.training, scenario.strategies, scenario.channel
    head = f"training.topology={topology}"
    if scenario.d2d.kind == "none":
        raise ValueError(f"{head} sends updates over sidelinks but d2d.kind=none builds no D2D graph; allowed: "
                         "d2d.kind 'distance' or 'knn' (or training.topology 'star')")
    if scenario.experiment != "fedavg":
        raise ValueError(f"{head} runs in experiment 'fedavg', not experiment={scenario.experiment!r}; allowed: "
                         "experiment fedavg (or training.topology 'star')")
    if tr.mode != "synchronous":
        raise ValueError(f"{head} runs synchronous rounds, not training.mode={tr.mode}; allowed: training.mode "
                         "'synchronous'")
    if ch.uplink_access != "ofdma":
        raise ValueError(f"{head} sends digital updates: channel.uplink_access={ch.uplink_access} is not supported; "
                         "allowed: 'ofdma'")
    if st.compression.name != "none":
        raise ValueError(f"{head} sends updates uncompressed over the sidelinks: strategies.compression.name="
                         f"{st.compression.name!r} is not supported; allowed: 'none'")
    if tr.over_selection != 1.0:
        raise ValueError(f"{head}: training.over_selection={tr.over_selection} keeps the first K uploads, which "
                         "has no meaning when one upload carries a cluster (or no upload exists); allowed: 1.0")


class HierarchicalSpec(Spec):
    """``training.topology: hierarchical``: cluster heads aggregate their members' updates over
    sidelinks before uploading (:mod:`netsim.protocols.hierarchical_fl`)."""

    head_selection: Literal["best_uplink", "degree"] = Field(
        "best_uplink", description="cluster heads: 'best_uplink' (greedy dominating set, strongest mean uplink SNR "
        "first) or 'degree' (greedy dominating set, most unassigned neighbours first)")
    max_cluster_size: Optional[Int] = Field(
        None, ge=1, le=1_000_000, description="devices per cluster, head included (null: no limit; 1: every device "
        "uploads directly, the star)")
    head_timeout_s: Optional[PositiveFloat] = Field(
        None, le=1e12, description="a head stops waiting for its members this long after the round start and "
        "uploads what has arrived (null: it waits for every member)")

    def check(self, scenario: "Scenario") -> None:
        """What the topology needs of the other sections (ValueError naming the fields)."""
        d2d_topology_errors(scenario, "hierarchical")
        agg = scenario.strategies.aggregation.name
        if agg not in D2D_AGGREGATIONS:
            raise ValueError(f"training.topology=hierarchical combines partial sums with FedAvg weights n_k / sum n_j: "
                             f"strategies.aggregation.name={agg!r} is not supported; allowed: {list(D2D_AGGREGATIONS)}")


# ------------------------------------------------------------------ clustering
@dataclass(frozen=True)
class Cluster:
    """A head and its members (device indices; members in increasing index order)."""

    head: int
    members: tuple[int, ...] = ()

    @property
    def devices(self) -> tuple[int, ...]:
        """Head and members, in increasing index order."""
        return tuple(sorted((self.head, *self.members)))


def form_clusters(graph: nx.Graph, devices: Sequence[int], uplink_snr_db: Sequence[float], rule: str,
                  max_cluster_size: Optional[int] = None, bandwidth_hz: float = 1.0) -> list[Cluster]:
    """Clusters of ``devices`` on ``graph`` (restricted to them) by a greedy dominating set.

    ``uplink_snr_db[i]``: device i's mean uplink SNR [dB] (indexed by device index).
    ``rule``: ``best_uplink`` or ``degree`` (see the module docstring). A head takes its
    unassigned neighbours by decreasing mean sidelink SNR member -> head over ``bandwidth_hz``
    (ties: lower index), at most ``max_cluster_size`` - 1 of them. Deterministic: the result
    depends only on the graph, the SNRs and the rule, never on insertion orders. Returns the
    clusters in order of their head's index.
    """
    if rule not in HEAD_RULES:
        raise ValueError(f"hierarchical.head_selection={rule!r}; allowed: one of {list(HEAD_RULES)}")
    chosen = sorted(set(int(d) for d in devices))
    sub = graph.subgraph(chosen)
    unassigned = set(chosen)
    cap = math.inf if max_cluster_size is None else int(max_cluster_size) - 1
    clusters: list[Cluster] = []

    def snr(i: int) -> float:
        return float(uplink_snr_db[i])

    def take(head: int) -> None:
        unassigned.discard(head)
        free = [j for j in sub.adj[head] if j in unassigned]
        free.sort(key=lambda j: (-sidelink(sub, j, head).mean_snr_db(bandwidth_hz), j))
        members = tuple(sorted(free[:cap] if cap != math.inf else free))
        unassigned.difference_update(members)
        clusters.append(Cluster(head, members))

    if rule == "best_uplink":
        for i in sorted(chosen, key=lambda i: (-snr(i), i)):
            if i in unassigned:
                take(i)
    else:
        while unassigned:
            best = min(unassigned, key=lambda i: (-sum(1 for j in sub.adj[i] if j in unassigned), -snr(i), i))
            take(best)
    return sorted(clusters, key=lambda c: c.head)


def partial_sum(results: Sequence[LocalResult], flatten) -> tuple[np.ndarray, int]:
    """(P_h, N_h) = (sum_k n_k flatten(result_k), sum_k n_k), summed in the given order."""
    total, n = None, 0
    for res in results:
        term = float(res.num_examples) * np.asarray(flatten(res), dtype=np.float64)
        total = term if total is None else total + term
        n += int(res.num_examples)
    if total is None:
        raise ValueError("partial_sum of no results")
    return total, n


def combine_partials(partials: Sequence[tuple[np.ndarray, int]]) -> np.ndarray:
    """Delta = sum_h P_h / sum_h N_h (the FedAvg mean of the updates behind the partials)."""
    if not partials:
        raise ValueError("combine_partials of no partial sums")
    total = None
    for vec, _ in partials:
        total = vec.copy() if total is None else total + vec
    return total / float(sum(n for _, n in partials))


@dataclass
class _Inbox:
    """What a head has received from its members this round: (member, job) in arrival order;
    ``closed`` once the head has stopped waiting (later arrivals are late)."""

    arrived: list = field(default_factory=list)
    closed: bool = False


@dataclass
class ClusterUpload:
    """A cluster's contribution that reached the edge: the head and the (device, job) pairs
    behind its partial sum, in device order."""

    head: Device
    jobs: list

    @property
    def results(self) -> list[LocalResult]:
        return [job.result for _, job in self.jobs]


class HierarchicalFLSimulation(FedAvgSimulation):
    """Hierarchical FL over D2D clusters; same constructor as
    :class:`~netsim.protocols.fedavg.FedAvgSimulation`.

    Attributes
    ----------
    cluster_log : list[list[Cluster]]
        The clusters of every round, in round order.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.spec: HierarchicalSpec = self.scenario.hierarchical
        self.cluster_log: list[list[Cluster]] = []
        self._jobs: dict[int, "PendingJob"] = {}   # device -> its job of the round in progress
        for name in ("flatten_update", "aggregate_flat"):
            if not callable(getattr(self.trainer, name, None)):
                raise ValueError(f"training.topology=hierarchical needs a trainer with {name}() (flat updates); "
                                 f"{type(self.trainer).__name__} has none")
        if self.network.d2d.number_of_edges() == 0 and len(self.network.devices) > 1:
            d2d = self.scenario.d2d
            raise ValueError(f"training.topology=hierarchical: the D2D graph has no edges (d2d.kind={d2d.kind}, "
                             f"threshold_m={d2d.threshold_m}, k={d2d.k}), so every device would upload directly; "
                             "allowed: a graph with edges (raise d2d.threshold_m or use d2d.kind knn)")

    # ------------------------------------------------------------------ clustering
    def clusters(self, devices: Sequence[Device]) -> list[Cluster]:
        """The round's clusters on the current D2D graph (:func:`form_clusters`)."""
        bw = self.scenario.channel.uplink_bandwidth_hz
        snr = {d.index: d.uplink.mean_snr_db(bw) for d in devices}
        return form_clusters(self.network.d2d, [d.index for d in devices], snr, self.spec.head_selection,
                             self.spec.max_cluster_size, self.scenario.d2d.bandwidth_hz)

    # ------------------------------------------------------------------ one round
    def _round(self, r: int, devices: list[Device]):
        """Clusters, broadcast, local work, member -> head sidelink transfers, partial sums and
        the heads' uploads; returns the :class:`ClusterUpload` that reached the edge, in head
        order."""
        tr = self.scenario.training
        t_start = self.env.now
        graph = self.network.d2d
        clusters = self.clusters(devices)
        self.cluster_log.append(clusters)
        by_index = {d.index: d for d in devices}
        for c in clusters:
            for m in c.members:
                self.recorder.emit("cluster_member", t_s=t_start, node=by_index[m].name, peer=by_index[c.head].name,
                                   round=r, **self._tags(by_index[m]))
        download_s = self._broadcast(r, devices)
        heads = [by_index[c.head] for c in clusters]
        shares = self._uplink_shares(heads, download_s)
        uploads: list[ClusterUpload] = []
        delivered: list = []
        procs = {}
        for c in clusters:
            head = by_index[c.head]
            inbox = _Inbox()
            t_off_head = self.availability.offline_at(head.index, self.env.now, r)
            members = []
            for m in c.members:
                dev = by_index[m]
                members.append(self.env.process(self._member_round(r, dev, head, graph, download_s[m], inbox,
                                                                   t_off_head)))
                procs[m] = members[-1]
            procs[head.index] = self.env.process(self._head_round(r, head, download_s[head.index], shares[head.index],
                                                                  members, inbox, t_start, t_off_head, uploads,
                                                                  delivered))
        if tr.deadline_s is None:
            yield simpy.AllOf(self.env, list(procs.values()))
        else:
            yield from self._wait_deadline(t_start, procs, uploads)
        self._idle_until_close(r, delivered)
        uploads.sort(key=lambda u: u.head.index)
        for u in uploads:
            u.jobs.sort(key=lambda dj: dj[0].index)
            for d, job in u.jobs:
                self._last_round[d.index] = r
                self._last_loss[d.index] = job.result.loss
        return uploads

    def _wait_deadline(self, t_start: float, procs: dict, uploads: list):
        """Until every process is done, or the deadline has passed with at least
        ``training.min_results`` updates in the partials that reached the edge; the processes
        still running are then interrupted (their updates are late)."""
        tr = self.scenario.training
        deadline = self.env.timeout(max(t_start + tr.deadline_s - self.env.now, 0.0))
        need = min(tr.min_results or 0, len(procs))
        while True:
            alive = [p for p in procs.values() if p.is_alive]
            if not alive:
                break
            if deadline.processed and sum(len(u.jobs) for u in uploads) >= need:
                break
            waits = [simpy.AnyOf(self.env, alive)]
            if not deadline.processed:
                waits.append(deadline)
            yield simpy.AnyOf(self.env, waits)
        interrupted = [p for p in procs.values() if p.is_alive]
        for p in interrupted:
            p.interrupt("round closed")
        if interrupted:
            yield simpy.AllOf(self.env, interrupted)

    def _train(self, r: int, device: Device, download_s: float, t_off: float):
        """Download and local steps (as in FedAvg); returns the job, or None if the device went
        offline first (then it is recorded as dropped). Sets ``self._job[device]`` as soon as
        the job exists, for interruption."""
        server_name = self.network.servers[device.server].name
        size_bytes = self._download_bytes(device)
        dl = min(download_s, max(t_off - self.env.now, 0.0))
        self._phase_rows[device.index] = self.recorder.emit(
            "downlink", t_s=self.env.now, duration_s=dl, node=device.name, peer=server_name, round=r,
            bytes=size_bytes, energy_j=energy_j(device.group.rx_power_w, dl), **self._tags(device))
        if not (yield from self._until(download_s, t_off)):
            self._dropped(r, device, None)
            return None
        job = self._submit(device, r)
        self._jobs[device.index] = job
        if not (yield from self._local_steps(device, r, job, t_off)):
            self._dropped(r, device, job)
            return None
        return job

    def _member_round(self, r: int, device: Device, head: Device, graph: nx.Graph, download_s: float,
                      inbox: _Inbox, t_off_head: float):
        """A member: download, local steps, then its update to its head over their sidelink."""
        t_off = self.availability.offline_at(device.index, self.env.now, r)
        self._jobs.pop(device.index, None)
        try:
            job = yield from self._train(r, device, download_s, t_off)
            if job is None:
                return None
            if inbox.closed:   # the head stopped waiting (timeout) before this member was ready
                self._phase_rows.pop(device.index, None)
                self._late(r, device, job)
                return None
            size = self.update_bytes()
            tr_ = transfer(graph, [device.index, head.index], 8 * size, self.env.now, self.scenario.d2d.bandwidth_hz)
            t_link_off = min(t_off, t_off_head)
            t_eff = min(tr_.total_s, max(t_link_off - self.env.now, 0.0))
            p_tx = tr_.tx_energy_j / tr_.total_s if tr_.total_s > 0 else 0.0
            self._phase_rows[device.index] = self.recorder.emit(
                "d2d_transfer", t_s=self.env.now, duration_s=t_eff, node=device.name, peer=head.name, round=r,
                bytes=size, energy_j=p_tx * t_eff, **self._tags(device))
            rx_row = self.recorder.emit(
                "d2d_receive", t_s=self.env.now, duration_s=t_eff, node=head.name, peer=device.name, round=r,
                energy_j=energy_j(head.group.rx_power_w, t_eff), **self._tags(head))
            try:
                ok = yield from self._until(tr_.total_s, t_link_off)
            except simpy.Interrupt:
                self.recorder.cut(rx_row, self.env.now)
                raise
            if not ok:
                self._dropped(r, device, job)
                return None
            self._phase_rows.pop(device.index, None)
            self._upload_end_s[device.index] = self.env.now
            if inbox.closed:   # arrived after the head's timeout
                self._late(r, device, job)
                return None
            inbox.arrived.append((device, job))
            return job
        except simpy.Interrupt:   # the round (or the head's wait) closed: the member stops
            self._stop_phase(device.index)
            self._late(r, device, self._jobs.get(device.index))
            return None

    def _head_round(self, r: int, head: Device, download_s: float, share: float, members: list, inbox: _Inbox,
                    t_start: float, t_off: float, uploads: list, delivered: list):
        """A head: download and local steps, wait for its members, partial sums, one upload."""
        self._jobs.pop(head.index, None)
        try:
            job = yield from self._train(r, head, download_s, t_off)
            if job is None:   # members' transfers to it fail on their own (they know t_off of the head)
                self._drop_received(r, inbox)
                return None
            yield from self._wait_members(members, t_start, t_off, inbox)
            if self.env.now >= t_off:
                self._dropped(r, head, job)
                self._drop_received(r, inbox)
                return None
            received = list(inbox.arrived)
            if received:   # a head alone uploads its own update directly, as in the star
                n_values = self.trainer.adapter_bytes() / 4.0
                flops = 2.0 * (len(received) + 1) * n_values
                t_agg, e_agg = compute_time_energy(head.group, flops)
                self._log_compute("partial_aggregate", head, r, t_agg, e_agg, t_off, flops=flops)
                if not (yield from self._until(t_agg, t_off)):
                    self._dropped(r, head, job)
                    self._drop_received(r, inbox)
                    return None
            ok = yield from self._upload(r, head, job, share, t_off)
            if ok is False:
                self._dropped(r, head, job)
                self._drop_received(r, inbox)
                return None
            self._phase_rows.pop(head.index, None)
            jobs = [(head, job)] + received
            uploads.append(ClusterUpload(head, jobs))
            delivered.extend(jobs)
            return job
        except simpy.Interrupt:
            inbox.closed = True
            self._stop_phase(head.index)
            self._late(r, head, self._jobs.get(head.index))
            for d, member_job in inbox.arrived:
                self._late(r, d, member_job)
            inbox.arrived.clear()
            return None

    def _wait_members(self, members: list, t_start: float, t_off: float, inbox: _Inbox):
        """Wait for the members' processes, until the head goes offline or its timeout. On a
        timeout the inbox closes and the members still running are interrupted (late); when
        the head goes offline the members' transfers fail on their own (dropped)."""
        alive = [p for p in members if p.is_alive]
        if alive:
            waits = [simpy.AllOf(self.env, alive)]
            if t_off < math.inf:
                waits.append(self.env.timeout(max(t_off - self.env.now, 0.0)))
            if self.spec.head_timeout_s is not None:
                waits.append(self.env.timeout(max(t_start + self.spec.head_timeout_s - self.env.now, 0.0)))
            yield simpy.AnyOf(self.env, waits)
        if self.env.now >= t_off:
            return
        inbox.closed = True
        still = [p for p in members if p.is_alive]
        for p in still:
            p.interrupt("head stopped waiting")
        if still:
            yield simpy.AllOf(self.env, still)

    def _drop_received(self, r: int, inbox: _Inbox) -> None:
        """The head left: the updates it had received are lost with its own."""
        for d, job in inbox.arrived:
            self._dropped(r, d, job)
        inbox.arrived.clear()

    # ------------------------------------------------------------------ edge
    def _aggregate(self, r: int, uploads: list[ClusterUpload], staleness=None, weights=None):
        """global <- global + server_step(sum_h P_h / sum_h N_h): the heads' partial sums
        (formed on the heads, in device order) combined at the edge; FedAvg of the same
        updates."""
        flatten = self.trainer.flatten_update
        partials = [partial_sum(u.results, flatten) for u in uploads]
        delta = combine_partials(partials)
        self.trainer.aggregate_flat(self.aggregator.server_step(delta))
        # sum of H partial vectors and one division, over n values
        flops = (len(partials) + 1) * self.trainer.adapter_bytes() / 4.0
        duration = self._edge_time_s(flops)
        self.recorder.emit("aggregate", t_s=self.env.now, duration_s=duration, node=self._edge_name, round=r,
                           flops=flops)
        self.counters["server_steps"] += 1
        yield self.env.timeout(duration)

    # ------------------------------------------------------------------ summary
    def dynamics_summary(self) -> dict:
        """FedAvg's dynamics summary plus the D2D traffic, recomputed from the event log
        (:func:`d2d_traffic`), and the clustering."""
        out = super().dynamics_summary()
        out["topology"] = "hierarchical"
        traffic = d2d_traffic(self.recorder.rows)
        out.update(traffic)
        kinds = [row[KIND] for row in self.recorder.rows]
        # every member transfer replaces the upload the member would have made in the star
        out["uplink_bytes_saved_vs_star"] = int(kinds.count("d2d_transfer") * self.update_bytes())
        out["uplinks"] = kinds.count("uplink")
        counts = [len(c) for c in self.cluster_log]
        out["clusters_per_round"] = counts
        out["clusters_per_round_mean"] = float(np.mean(counts)) if counts else 0.0
        sizes = [len(cl.devices) for c in self.cluster_log for cl in c]
        out["mean_cluster_size"] = float(np.mean(sizes)) if sizes else 0.0
        return out


def d2d_traffic(rows) -> dict:
    """D2D bytes and energies from event rows (``d2d_transfer``: bytes and transmit energy;
    ``d2d_receive``: receive energy) and the uplink bytes (``uplink`` events)."""
    d2d_bytes = sum(row[BYTES] for row in rows if row[KIND] == "d2d_transfer")
    tx = sum(row[ENERGY] for row in rows if row[KIND] == "d2d_transfer")
    rx = sum(row[ENERGY] for row in rows if row[KIND] == "d2d_receive")
    up = sum(row[BYTES] for row in rows if row[KIND] == "uplink")
    return {"d2d_bytes": int(d2d_bytes), "d2d_tx_energy_j": float(tx), "d2d_rx_energy_j": float(rx),
            "d2d_energy_j": float(tx + rx), "uplink_bytes": int(up)}
