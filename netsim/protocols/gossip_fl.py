"""Decentralised (gossip) federated fine-tuning over the D2D graph (``training.topology:
gossip``): every device keeps its own adapter, trains it locally and averages it with its D2D
neighbours; no server aggregates.

Decentralised SGD with local steps (Lian et al. 2017; Koloskova et al. 2020, "local SGD +
gossip"), with Metropolis-Hastings mixing weights (Xiao and Boyd 2004). Device i holds the
PEFT state x_i (all devices start from the same initial adapter, the trainer's initial global
state: a shared initialisation seed, no download). One round r:

1. **local steps**: the round's selected devices (``training.devices_per_round`` via
   ``strategies.selection``; all devices when null) run E local steps from their own state,
   x_i <- x_i + Delta_i (the job's base is x_i: :mod:`netsim.engine` with
   ``base=state``), compute time FLOPs / device speed (or DVFS) times the straggler factor.
   Devices not selected keep x_i. The gossip phase starts when the last local job ends (a
   synchronous barrier; devices that finish early are ``idle`` meanwhile);
2. **gossip**: ``gossip.steps_per_round`` synchronous averaging steps. Step s uses the D2D
   graph G_s at its start (``self.network.d2d``, rebuilt by every mobility tick) and its
   Metropolis weights

   .. math::
       W_{ij} = \\frac{1}{1 + \\max(d_i, d_j)} \\ (ij \\in E_s), \\quad
       W_{ii} = 1 - \\sum_{j \\ne i} W_{ij}

   (:func:`netsim.sidelink.metropolis_weights`: symmetric, doubly stochastic). Every device
   sends its state (``adapter_bytes``, uncompressed) to each neighbour by unicast over the
   sidelink i -> j (:func:`netsim.sidelink.transfer`, path [i, j]: the payload over the rates
   of the coherence blocks it spans, T = sum_b tau_b with S = sum_b R_b tau_b), every
   directed sidelink on its own band of ``d2d.bandwidth_hz``, concurrently and without
   interference (orthogonal resource pools, full duplex across bands: a documented
   simplification). Device i then mixes, x_i <- sum_j W_ij x_j (2 (d_i + 1) n FLOPs at its
   compute speed, ``gossip_mix`` event; n = the adapter's float32 values). The step ends when
   the slowest device has received from all its neighbours and mixed:

   .. math::
       t_{s+1} = t_s + \\max_i \\Big( \\max_{j \\in N(i)} T_{j \\to i}(t_s) + T^{mix}_i \\Big)

   Events: ``d2d_transfer`` (``node`` = sender, ``peer`` = receiver, bytes, the sender's
   transmit power x T) and ``d2d_receive`` (``node`` = receiver, its ``rx_power_w`` x T);
3. **evaluation** of the consensus (network-average) model xbar = (1/N) sum_i x_i on the test
   set (``evaluate``; an instrument of the experiment: it takes no simulated time, there is no
   server in the loop), and with ``gossip.evaluate_devices`` the mean over devices of each
   device's own accuracy (``evaluate_devices``; N evaluations per round).

Consensus: with e_s = ||X_s - 1 xbar^T||_F / sqrt(N) the root-mean-square distance of the
devices' states to their average (:func:`consensus_distance`), a doubly stochastic W keeps
xbar and

.. math::
    e_{after} \\le \\prod_s \\lambda(W_s) \\; e_{before}, \\qquad
    \\lambda(W) = \\|W - 11^T/N\\|_2

(:func:`netsim.sidelink.gossip_error_bound`; lambda < 1 iff G_s is connected, lambda = 1
otherwise, when each connected component keeps its own average). Each round logs e before and
after the gossip and the bound (``consensus_log``, in the summary under ``gossip``).

Devices are always available (``dynamics.availability: always``) and there is no round
deadline: a decentralised round has no server to close it. The states live in float64 in the
simulation (N x n values); the real trainer trains from them at its own precision (float32).

References
----------
X. Lian, C. Zhang, H. Zhang, C.-J. Hsieh, W. Zhang, J. Liu, "Can decentralized algorithms
outperform centralized algorithms? A case study for decentralized parallel stochastic gradient
descent", NeurIPS 2017.
A. Koloskova, N. Loizou, S. Boreiri, M. Jaggi, S. U. Stich, "A unified theory of decentralized
SGD with changing topology and local updates", ICML 2020.
L. Xiao, S. Boyd, "Fast linear iterations for distributed averaging", Systems & Control
Letters 53 (2004) 65-78.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import networkx as nx
import numpy as np
import simpy
from pydantic import Field

from ..budgets import energy_j
from ..dynamics import compute_time_energy
from ..network import Device
from ..records import COLUMNS
from ..sidelink import gossip_error_bound, gossip_step, metropolis_weights, transfer
from ..spec_base import Bool, Int, Spec
from .fedavg import FedAvgSimulation
from .hierarchical_fl import d2d_topology_errors, d2d_traffic

if TYPE_CHECKING:  # netsim.scenario imports GossipSpec: no import of it at run time
    from ..scenario import Scenario

GOSSIP_AGGREGATIONS = ("fedavg", "fedprox")
"""Aggregations gossip supports: no server step (FedProx's proximal term is local)."""

STATE_METHODS = ("trained_state", "state_vector", "state_from_vector", "evaluate_state")
"""What gossip needs of a trainer besides :class:`netsim.interfaces.Trainer`
(:class:`netsim.interfaces.StateTrainer`)."""


class GossipSpec(Spec):
    """``training.topology: gossip``: devices average their adapters with their D2D neighbours,
    no server aggregates (:mod:`netsim.protocols.gossip_fl`)."""

    steps_per_round: Int = Field(1, ge=1, le=10_000, description="synchronous Metropolis averaging steps after the "
                                 "local steps of each round")
    evaluate_devices: Bool = Field(False, description="also evaluate every device's own adapter each round and log "
                                   "their mean accuracy (N evaluations per round)")

    def check(self, scenario: "Scenario") -> None:
        """What the topology needs of the other sections (ValueError naming the fields)."""
        d2d_topology_errors(scenario, "gossip")
        tr = scenario.training
        agg = scenario.strategies.aggregation.name
        if agg not in GOSSIP_AGGREGATIONS:
            raise ValueError(f"training.topology=gossip has no server step: strategies.aggregation.name={agg!r} is "
                             f"not supported; allowed: {list(GOSSIP_AGGREGATIONS)}")
        if scenario.dynamics.availability.model != "always":
            raise ValueError(f"training.topology=gossip needs every device online: dynamics.availability.model="
                             f"{scenario.dynamics.availability.model!r} is not supported; allowed: 'always'")
        if tr.deadline_s is not None or tr.min_results is not None:
            raise ValueError(f"training.topology=gossip has no server to close a round: training.deadline_s="
                             f"{tr.deadline_s} / training.min_results={tr.min_results}; allowed: null")


def consensus_distance(x: np.ndarray) -> float:
    """e = sqrt((1/N) sum_i ||x_i - xbar||^2) = ||X - 1 xbar^T||_F / sqrt(N) of the (N, n)
    matrix of device states (0 for N <= 1)."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape[0] <= 1:
        return 0.0
    return float(np.sqrt(np.mean(np.sum((x - x.mean(axis=0)) ** 2, axis=1))))


class GossipFLSimulation(FedAvgSimulation):
    """Gossip FL over the D2D graph; same constructor as
    :class:`~netsim.protocols.fedavg.FedAvgSimulation`. The trainer must implement
    :class:`netsim.interfaces.StateTrainer`.

    Attributes
    ----------
    states : list
        Device i's current PEFT state (a trainer state handle).
    x : numpy.ndarray
        (N, n) float64: row i = ``trainer.state_vector(states[i])``.
    consensus_log : list[dict]
        Per round: ``round``, ``distance_before``, ``distance_after``, ``bound_factor``
        (prod_s lambda(W_s)), ``within_bound``, ``components`` (of each step's graph).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.spec: GossipSpec = self.scenario.gossip
        missing = [m for m in STATE_METHODS if not callable(getattr(self.trainer, m, None))]
        if missing:
            raise ValueError(f"training.topology=gossip needs per-device states: {type(self.trainer).__name__} has no "
                             f"{', '.join(missing)} (netsim.interfaces.StateTrainer); allowed: trainer 'fake' or the "
                             "PEFT trainer of experiment fedavg")
        if self.network.d2d.number_of_edges() == 0 and len(self.network.devices) > 1:
            d2d = self.scenario.d2d
            raise ValueError(f"training.topology=gossip: the D2D graph has no edges (d2d.kind={d2d.kind}, "
                             f"threshold_m={d2d.threshold_m}, k={d2d.k}), so no device can average with another; "
                             "allowed: a graph with edges (raise d2d.threshold_m or use d2d.kind knn)")
        initial = self.trainer.snapshot()
        n = len(self.network.devices)
        self.states: list[Any] = [initial] * n
        self.x = np.tile(self.trainer.state_vector(initial), (n, 1))
        self.consensus_log: list[dict] = []

    # ------------------------------------------------------------------ one round
    def _round(self, r: int, devices: list[Device]):
        """Local steps from each device's own state, then the gossip steps; nothing for the
        edge to aggregate (returns [])."""
        jobs: dict[int, Any] = {}
        procs = [self.env.process(self._local_phase(r, d, jobs)) for d in devices]
        if procs:
            yield simpy.AllOf(self.env, procs)
        self._idle_until_close(r, [(d, jobs[d.index]) for d in devices if d.index in jobs])
        for d in devices:
            res = jobs[d.index].result
            self.states[d.index] = self.trainer.trained_state(self.states[d.index], res)
            self.x[d.index] = self.trainer.state_vector(self.states[d.index])
            self._last_round[d.index] = r
            self._last_loss[d.index] = res.loss
        before = consensus_distance(self.x)
        factor, components = 1.0, []
        for _ in range(self.spec.steps_per_round):
            lam, k = yield from self._gossip_step(r)
            factor *= lam
            components.append(k)
        after = consensus_distance(self.x)
        # float64 rounding of W x: a few ulps of the values per step (relative 1e-12 is ample)
        slack = 1e-12 * (float(np.abs(self.x).max()) + 1.0) * self.spec.steps_per_round
        self.consensus_log.append({"round": r, "distance_before": before, "distance_after": after,
                                   "bound_factor": factor, "within_bound": bool(after <= factor * before + slack),
                                   "components": components})
        return []

    def _local_phase(self, r: int, device: Device, jobs: dict):
        """E local steps from the device's own state (its job's base)."""
        job = self._submit(device, r, base=self.states[device.index])
        jobs[device.index] = job
        yield from self._local_steps(device, r, job, math.inf)
        self._phase_rows.pop(device.index, None)
        self._upload_end_s[device.index] = self.env.now

    def _gossip_step(self, r: int):
        """One synchronous Metropolis step on the current graph, timed on its sidelinks;
        returns (lambda(W), number of connected components)."""
        graph = self.network.d2d
        w = metropolis_weights(graph)
        nodes = sorted(graph.nodes)
        if nodes != list(range(len(self.network.devices))):
            raise ValueError("the D2D graph's nodes are not the device indices 0..N-1")
        size = int(self.trainer.adapter_bytes())
        bw = self.scenario.d2d.bandwidth_hz
        t0 = self.env.now
        received_by = np.zeros(len(nodes))   # when device i has all its neighbours' states [s after t0]
        devices = self.network.devices
        for a, b in sorted(graph.edges):
            for src, dst in ((a, b), (b, a)):
                tr_ = transfer(graph, [src, dst], 8 * size, t0, bw)
                sender, receiver = devices[src], devices[dst]
                self.recorder.emit("d2d_transfer", t_s=t0, duration_s=tr_.total_s, node=sender.name,
                                   peer=receiver.name, round=r, bytes=size, energy_j=tr_.tx_energy_j,
                                   **self._tags(sender))
                self.recorder.emit("d2d_receive", t_s=t0, duration_s=tr_.total_s, node=receiver.name,
                                   peer=sender.name, round=r, energy_j=energy_j(receiver.group.rx_power_w, tr_.total_s),
                                   **self._tags(receiver))
                received_by[dst] = max(received_by[dst], tr_.total_s)
        n_values = self.trainer.adapter_bytes() / 4.0
        step_s = 0.0
        for i in nodes:
            degree = graph.degree(i)
            if degree == 0:
                continue
            flops = 2.0 * (degree + 1) * n_values
            t_mix, e_mix = compute_time_energy(devices[i].group, flops)
            self.recorder.emit("gossip_mix", t_s=t0 + received_by[i], duration_s=t_mix, node=devices[i].name,
                               round=r, flops=flops, energy_j=e_mix, **self._tags(devices[i]))
            step_s = max(step_s, received_by[i] + t_mix)
        yield self.env.timeout(step_s)
        self.x = gossip_step(self.x, w)
        for i in nodes:
            if graph.degree(i) > 0:
                self.states[i] = self.trainer.state_from_vector(self.x[i])
        return gossip_error_bound(w, 1), nx.number_connected_components(graph)

    # ------------------------------------------------------------------ evaluation
    def consensus_state(self):
        """The network-average state xbar = (1/N) sum_i x_i."""
        return self.trainer.state_from_vector(self.x.mean(axis=0))

    def _evaluate(self, r: int):
        """Accuracy of the consensus model (and, with ``gossip.evaluate_devices``, the mean of
        the devices' own); no simulated time (an instrument, no server in the loop)."""
        ev = self.last_evaluation = self.trainer.evaluate_state(self.consensus_state())
        self.recorder.emit("evaluate", t_s=self.env.now, node=self._edge_name, round=r, flops=ev.flops,
                           loss=ev.loss, accuracy=ev.accuracy)
        if self.spec.evaluate_devices:
            evs = [self.trainer.evaluate_state(s) for s in self.states]
            self.recorder.emit("evaluate_devices", t_s=self.env.now, node=self._edge_name, round=r,
                               flops=float(sum(e.flops for e in evs)), loss=float(np.mean([e.loss for e in evs])),
                               accuracy=float(np.mean([e.accuracy for e in evs])))
        return ev.accuracy
        yield  # pragma: no cover  (a SimPy generator that takes no time)

    # ------------------------------------------------------------------ summary
    def dynamics_summary(self) -> dict:
        """FedAvg's dynamics summary plus the D2D traffic (from the event log) and the
        consensus per round."""
        out = super().dynamics_summary()
        out["topology"] = "gossip"
        out.update(d2d_traffic(self.recorder.rows))
        log = self.consensus_log
        out["gossip"] = {
            "steps_per_round": self.spec.steps_per_round,
            "consensus_distance_before": [e["distance_before"] for e in log],
            "consensus_distance_after": [e["distance_after"] for e in log],
            "bound_factor": [e["bound_factor"] for e in log],
            "within_bound_all_rounds": bool(all(e["within_bound"] for e in log)),
            "components_per_step": [e["components"] for e in log],
        }
        kind, accuracy = COLUMNS.index("kind"), COLUMNS.index("accuracy")
        dev = [row for row in self.recorder.rows if row[kind] == "evaluate_devices"]
        if dev:
            out["gossip"]["final_device_mean_accuracy"] = float(dev[-1][accuracy])
        return out
