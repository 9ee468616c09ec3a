"""Federated fine-tuning with FedAvg of the PEFT parameters, on one SimPy timeline.

One round (McMahan et al. 2017, with PEFT parameters only):

1. the edge samples ``training.devices_per_round`` devices (uniformly, without replacement);
   a sampled device whose memory cannot hold the job is recorded (``memory_exceeded``) and
   sits the round out;
2. each edge server multicasts the global adapter to its sampled devices with rateless coding:
   each device decodes once it has accumulated the payload at its own per-block rate;
3. every device runs E real local steps from the moment its download ends; their compute time
   is counted FLOPs / device speed (the job's cost is known when it starts; its values are
   computed with the round's other jobs in one batched pass, see :mod:`netsim.engine`);
4. every device uploads its update over its FDMA share of its server's uplink band
   (shares proportional to ``channel.uplink_shares`` among the round's devices);
5. when the last upload arrives the edge aggregates (weights n_k / sum n_j), evaluates on the
   held-out test set (time = counted FLOPs / edge speed) and ends the round.

Edge servers are assumed connected by an ideal backhaul: with several servers, aggregation is
global and costs no backhaul time (a documented simplification).

The run stops at the target accuracy, the round limit or the simulated-time horizon (no
round starts at or after ``stop.horizon_s``), whichever comes first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import simpy

from ..budgets import bandwidth_shares, compute_time_s, energy_j, fits_in_memory
from ..engine import Engine, PendingJob
from ..interfaces import LocalJob, LocalResult, Trainer
from ..network import Device, Network, child_rng
from ..records import Recorder
from ..scenario import Scenario

RoundCallback = Callable[[int, float, float], None]


@dataclass
class RunOutcome:
    """What the protocol returns besides the event log."""

    stop_reason: str
    rounds_completed: int
    initial_accuracy: float
    final_accuracy: float


class FedAvgSimulation:
    """Runs the FedAvg protocol of a scenario with a given trainer.

    Parameters
    ----------
    scenario : Scenario
    seed : int
        Run seed. The network (positions, shadowing, fading, D2D graph) is drawn with
        ``scenario.network_seed(seed)`` (``topology_seed``, else ``seed``), the device selection
        with ``scenario.train_seed(seed)`` (``training_seed``, else ``seed``); see
        ``netsim.network`` for the per-entity streams.
    trainer : Trainer
        Real (``fomo.PeftTrainer``) or fake (``netsim.FakeTrainer``).
    on_round : callable, optional
        ``on_round(round, accuracy, t_s)`` after each evaluated round (progress bars).
    """

    def __init__(self, scenario: Scenario, seed: int, trainer: Trainer, on_round: Optional[RoundCallback] = None):
        self.scenario = scenario
        self.seed = seed
        self.trainer = trainer
        self.on_round = on_round
        self.env = simpy.Environment()
        self.network_seed = scenario.network_seed(seed)
        self.train_seed = scenario.train_seed(seed)
        self.network = Network(scenario, self.network_seed)
        self.recorder = Recorder()
        self.engine = Engine(trainer)
        self._select_rng = child_rng(self.train_seed, 0, 4)
        self._uplink_weights = self.network.uplink_weights()
        self.outcome: Optional[RunOutcome] = None
        self._edge_name = self.network.servers[0].name

    def _tags(self, device: Device) -> dict:
        """The ``group`` and ``server`` columns of a device's events."""
        return {"group": device.group.name, "server": self.network.servers[device.server].name}

    # ------------------------------------------------------------------ public
    def run(self) -> RunOutcome:
        self.env.process(self._main())
        self.env.run()
        assert self.outcome is not None
        return self.outcome

    # ------------------------------------------------------------------ rounds
    def _main(self):
        sc = self.scenario
        initial = yield from self._evaluate(0)
        accuracy, rounds_done, reason = initial, 0, "round_limit"
        for r in range(1, sc.training.rounds + 1):
            if sc.stop.horizon_s is not None and self.env.now >= sc.stop.horizon_s:
                reason = "horizon"
                break
            devices = self._runnable(r, self._select())
            if not devices:
                reason = "no_device_fits_memory"
                break
            self.recorder.emit("round_start", t_s=self.env.now, node=self._edge_name, round=r)
            download_s = self._broadcast(r, devices)
            shares = self._uplink_shares(devices)
            # each device submits its job when its download ends; the values of all of them are
            # computed together (one batched pass) when the aggregation first reads them
            pending = [self.env.process(self._device_round(r, d, download_s[d.index], shares[d.index]))
                       for d in devices]
            yield simpy.AllOf(self.env, pending)
            results = [p.value.result for p in pending]
            yield from self._aggregate(r, results)
            accuracy = yield from self._evaluate(r)
            rounds_done = r
            self.recorder.emit("round_end", t_s=self.env.now, node=self._edge_name, round=r, accuracy=accuracy)
            if self.on_round is not None:
                self.on_round(r, accuracy, self.env.now)
            if sc.stop.target_accuracy is not None and accuracy >= sc.stop.target_accuracy:
                reason = "target_accuracy"
                break
        self.outcome = RunOutcome(reason, rounds_done, initial, accuracy)

    def _select(self) -> list[Device]:
        k = self.scenario.training.devices_per_round
        devices = self.network.devices
        if k is None or k >= len(devices):
            return list(devices)
        chosen = self._select_rng.choice(len(devices), size=k, replace=False)
        return [devices[i] for i in sorted(int(c) for c in chosen)]

    def _runnable(self, r: int, selected: list[Device]) -> list[Device]:
        """Drop (and record) devices whose memory cannot hold the local job."""
        need = self.trainer.job_memory_bytes(self.scenario.training.batch_size)
        fit = []
        for d in selected:
            if fits_in_memory(need, d.group.memory_bytes):
                fit.append(d)
            else:
                self.recorder.emit("memory_exceeded", t_s=self.env.now, node=d.name, round=r, memory_bytes=need,
                                   **self._tags(d))
        return fit

    def _uplink_shares(self, devices: list[Device]) -> dict[int, float]:
        """FDMA shares per device, normalised within each edge server's band."""
        shares: dict[int, float] = {}
        for server in self.network.servers:
            members = [d for d in devices if d.server == server.index]
            if members:
                for d, s in zip(members, bandwidth_shares([self._uplink_weights[d.index] for d in members])):
                    shares[d.index] = s
        return shares

    # ------------------------------------------------------------- transfers
    def _broadcast(self, r: int, devices: list[Device]) -> dict[int, float]:
        """Each server multicasts the adapter to its devices with rateless (fountain) coding:
        a device decodes once the bits it has accumulated at its own per-block rate reach the
        payload, so each device has its own download time; the server transmits until its last
        device has decoded. Returns device index -> download time [s]."""
        ch = self.scenario.channel
        size_bytes = self.trainer.adapter_bytes()
        t0 = self.env.now
        download_s: dict[int, float] = {}
        for server in self.network.servers:
            members = [d for d in devices if d.server == server.index]
            if not members:
                continue
            for d in members:
                download_s[d.index] = d.downlink.transfer_duration_s(8 * size_bytes, t0, ch.downlink_bandwidth_hz)
            longest = max(download_s[d.index] for d in members)
            self.recorder.emit("broadcast", t_s=t0, duration_s=longest, node=server.name, round=r,
                               bytes=size_bytes, energy_j=energy_j(server.spec.tx_power_w, longest))
        return download_s

    def _device_round(self, r: int, device: Device, download_s: float, share: float):
        """Download the global adapter, run the local steps, upload over the FDMA share.
        Returns the device's :class:`~netsim.engine.PendingJob`."""
        g = device.group
        server_name = self.network.servers[device.server].name
        size_bytes = self.trainer.adapter_bytes()
        self.recorder.emit("downlink", t_s=self.env.now, duration_s=download_s, node=device.name, peer=server_name,
                           round=r, bytes=size_bytes, energy_j=energy_j(g.rx_power_w, download_s), **self._tags(device))
        yield self.env.timeout(download_s)
        sc = self.scenario.training
        job = self.engine.submit(LocalJob(device.index, r, sc.local_steps, sc.batch_size))
        cost = job.cost
        t_compute = compute_time_s(cost.flops, g.compute_flops_per_s)
        row = self.recorder.emit("compute", t_s=self.env.now, duration_s=t_compute, node=device.name, round=r,
                                 flops=cost.flops, memory_bytes=cost.peak_memory_bytes,
                                 energy_j=energy_j(g.compute_power_w, t_compute), **self._tags(device))
        job.when_done(lambda res: self.recorder.fill(row, loss=res.loss))
        yield self.env.timeout(t_compute)
        yield from self._upload(r, device, job, share)
        return job

    def _upload(self, r: int, device: Device, job: PendingJob, share: float):
        """Upload the update over the device's FDMA share (overridden by AirComp uplinks)."""
        size_bytes = job.cost.update_bytes
        t_up = device.uplink.transfer_duration_s(8 * size_bytes, self.env.now,
                                                 share * self.scenario.channel.uplink_bandwidth_hz)
        self.recorder.emit("uplink", t_s=self.env.now, duration_s=t_up, node=device.name,
                           peer=self.network.servers[device.server].name, round=r, bytes=size_bytes,
                           energy_j=energy_j(device.group.tx_power_w, t_up), **self._tags(device))
        yield self.env.timeout(t_up)

    # ------------------------------------------------------------ edge work
    def _edge_time_s(self, flops: float) -> float:
        return compute_time_s(flops, self.network.servers[0].spec.compute_flops_per_s)

    def _aggregate(self, r: int, results: list[LocalResult]):
        total = float(sum(res.num_examples for res in results))
        weights = [res.num_examples / total for res in results]
        self.trainer.aggregate(results, weights)
        # A weighted sum of K updates of n values costs 2 K n FLOPs (n = bytes / 4 for float32).
        flops = 2.0 * len(results) * self.trainer.adapter_bytes() / 4.0
        duration = self._edge_time_s(flops)
        self.recorder.emit("aggregate", t_s=self.env.now, duration_s=duration, node=self._edge_name, round=r, flops=flops)
        yield self.env.timeout(duration)

    def _evaluate(self, r: int):
        ev = self.trainer.evaluate()
        duration = self._edge_time_s(ev.flops)
        self.recorder.emit("evaluate", t_s=self.env.now, duration_s=duration, node=self._edge_name, round=r,
                           flops=ev.flops, loss=ev.loss, accuracy=ev.accuracy)
        yield self.env.timeout(duration)
        return ev.accuracy
