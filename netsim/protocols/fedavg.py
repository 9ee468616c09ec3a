"""Federated fine-tuning with FedAvg of the PEFT parameters, on one SimPy timeline.

One round (McMahan et al. 2017, with PEFT parameters only):

1. the edge selects ``training.devices_per_round`` devices among those online
   (``strategies.selection``, uniform by default; ``dynamics.availability``); with
   ``training.over_selection`` > 1 it selects ceil(over_selection x K) and keeps the first K
   updates to arrive. A selected device whose memory cannot hold the job is recorded
   (``memory_exceeded``) and sits the round out;
2. each edge server multicasts the global adapter to its selected devices with rateless
   coding: each device decodes once it has accumulated the payload at its own per-block rate;
3. every device runs E real local steps from the moment its download ends; their compute time
   is counted FLOPs / device speed (or the DVFS model), times a straggler factor
   (``dynamics.stragglers``). The job's cost is known when it starts; its values are computed
   with the round's other jobs in one batched pass (:mod:`netsim.engine`);
4. every device uploads its update (compressed by ``strategies.compression``) over its FDMA
   share of its server's uplink band (``strategies.bandwidth``: shares proportional to
   ``channel.uplink_shares`` by default);
5. when the last upload arrives (or at ``training.deadline_s`` after the round start, keeping
   what has arrived, but waiting for at least ``training.min_results``) the edge aggregates
   (``strategies.aggregation``: FedAvg weights n_k / sum n_j by default), evaluates on the
   held-out test set (time = counted FLOPs / edge speed) and ends the round.

A device that goes offline before its upload ends loses its update (``update_dropped``); one
still busy when the round closes is ``update_late``; both jobs are cancelled, never trained.
Devices that finished early wait for the round to end at ``idle_power_w`` (``idle`` events).
With ``dynamics.mobility`` devices move every tick, path loss and the D2D graph follow, and a
device hands over to a stronger server past the hysteresis margin (``handover`` events).

Edge servers are assumed connected by an ideal backhaul: with several servers, aggregation is
global and costs no backhaul time (a documented simplification).

The run stops at the target accuracy, the round limit or the simulated-time horizon (no
round starts at or after ``stop.horizon_s``), whichever comes first.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import simpy

from ..budgets import compute_time_s, energy_j, fits_in_memory
from ..dynamics import Availability, ComputeJitter, Mobility, associate, compute_time_energy
from ..engine import Engine, PendingJob
from ..interfaces import LocalJob, LocalResult, Trainer
from ..network import Device, Network, child_rng
from ..records import Recorder
from ..strategies import BandwidthContext, SelectionContext

if TYPE_CHECKING:  # netsim.scenario imports protocol sections: no import of it at run time
    from ..scenario import Scenario

RoundCallback = Callable[[int, float, float], None]

COMPRESSION_SPAWN_KEY = (0, 10)
"""Stream of the stochastic update compression (``child_rng(train_seed, 0, 10)``)."""


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
        Run seed. The network (positions, shadowing, fading, D2D graph) and its dynamics
        (availability, stragglers, mobility) are drawn with ``scenario.network_seed(seed)``
        (``topology_seed``, else ``seed``), the device selection and the update compression
        with ``scenario.train_seed(seed)`` (``training_seed``, else ``seed``); see
        ``netsim.network`` for the per-entity streams.
    trainer : Trainer
        Real (``fomo.PeftTrainer``) or fake (``netsim.FakeTrainer``).
    on_round : callable, optional
        ``on_round(round, accuracy, t_s)`` after each evaluated round (progress bars).

    Attributes
    ----------
    counters : collections.Counter
        ``dropped_updates``, ``late_updates``, ``stale_updates``, ``handovers``,
        ``server_steps``: what the summary reports.
    """

    def __init__(self, scenario: "Scenario", seed: int, trainer: Trainer, on_round: Optional[RoundCallback] = None):
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
        self.counters: Counter = Counter()
        self.outcome: Optional[RunOutcome] = None
        self.last_evaluation = None   # the latest EvalResult (balanced accuracy is not in the event log)
        self._upload_end_s: dict[int, float] = {}
        self._last_compute_s: dict[int, float] = {}
        self._phase_rows: dict[int, int] = {}   # device -> row of its transfer or compute in progress
        self._edge_name = self.network.servers[0].name
        self._uplink_weights = self.network.uplink_weights()
        self._setup_strategies()
        self._setup_dynamics()
        self._check_deadline()

    def _setup_strategies(self) -> None:
        st = self.scenario.strategies
        self.selection = st.selection.build()
        self.bandwidth = st.bandwidth.build()
        self.aggregator = st.aggregation.build()
        self.compressor = st.compression.build()
        self._select_rng = child_rng(self.train_seed, 0, 4)
        self._compress_rng = child_rng(self.train_seed, *COMPRESSION_SPAWN_KEY)
        self._flat_aggregation = st.compression.name != "none" or not self.aggregator.identity_step
        n = len(self.network.devices)
        self._last_round = np.full(n, -1, dtype=np.int64)
        self._last_loss = np.full(n, np.nan)
        self._num_examples = np.array([trainer_examples(self.trainer, i) for i in range(n)], dtype=np.int64)
        self._compute_speed = np.array([d.group.compute_flops_per_s for d in self.network.devices])
        self._mean_snr_db: Optional[np.ndarray] = None

    def _setup_dynamics(self) -> None:
        dyn = self.scenario.dynamics
        devices = self.network.devices
        self.availability = Availability.from_spec(
            dyn.availability, len(devices), [d.group.name for d in devices], [d.name for d in devices],
            self.network_seed)
        self.jitter = ComputeJitter.from_spec(dyn.stragglers, len(devices), self.network_seed)
        self._jobs_started = np.zeros(len(devices), dtype=np.int64)
        self.mobility: Optional[Mobility] = None
        if dyn.mobility.model != "none":
            self.mobility = Mobility.from_spec(
                dyn.mobility, np.array([d.position_m for d in devices]), self.network_seed,
                server_positions_m=[s.position_m for s in self.network.servers])

    def _check_deadline(self) -> None:
        """Refuse a round deadline that no round can meet (:func:`deadline_error`)."""
        min_flops = getattr(self.trainer, "min_job_flops", None)
        tr = self.scenario.training
        if tr.deadline_s is not None and min_flops is not None:
            error = deadline_error(self.scenario, float(min_flops(tr.local_steps, tr.batch_size)))
            if error:
                raise ValueError(error)

    def dynamics_summary(self) -> dict:
        """What the run's dynamics did: ``dropped_updates`` (device went offline),
        ``late_updates`` (round closed first), ``stale_updates`` (discarded as too stale),
        ``stale_updates_mean`` (mean staleness of the aggregated updates; 0 in synchronous
        rounds), ``handovers``, ``server_steps``, and the engine's batching statistics."""
        staleness = getattr(self, "staleness", [])
        return {
            "dropped_updates": int(self.counters["dropped_updates"]),
            "late_updates": int(self.counters["late_updates"]),
            "stale_updates": int(self.counters["stale_updates"]),
            "stale_updates_mean": float(np.mean(staleness)) if len(staleness) else 0.0,
            "handovers": int(self.counters["handovers"]),
            "server_steps": int(self.counters["server_steps"]),
            "engine": self.engine.stats(),
        }

    def _tags(self, device: Device) -> dict:
        """The ``group`` and ``server`` columns of a device's events."""
        return {"group": device.group.name, "server": self.network.servers[device.server].name}

    # ------------------------------------------------------------------ public
    def run(self) -> RunOutcome:
        main = self.env.process(self._main())
        if self.mobility is not None:
            self.env.process(self._mobility_ticks())
        self.env.run(until=main)
        assert self.outcome is not None
        return self.outcome

    # ------------------------------------------------------------------ rounds
    def _prepare(self):
        """What happens once before the first evaluation (nothing here; the emulator protocol
        sends the emulator, the zeroth-order one the candidate seeds). A SimPy generator."""
        return
        yield  # pragma: no cover

    def _main(self):
        sc = self.scenario
        yield from self._prepare()
        initial = yield from self._evaluate(0)
        accuracy, rounds_done, reason = initial, 0, "round_limit"
        for r in range(1, sc.training.rounds + 1):
            if sc.stop.horizon_s is not None and self.env.now >= sc.stop.horizon_s:
                reason = "horizon"
                break
            online = self._online(r)
            if not online:
                reason = "no_device_available"
                break
            devices = self._runnable(r, self._select(r, online))
            if not devices:
                reason = "no_device_fits_memory"
                break
            self.recorder.emit("round_start", t_s=self.env.now, node=self._edge_name, round=r)
            results = yield from self._round(r, devices)
            if results:
                yield from self._aggregate(r, results)
            accuracy = yield from self._close_round(r)
            rounds_done = r
            if sc.stop.target_accuracy is not None and accuracy >= sc.stop.target_accuracy:
                reason = "target_accuracy"
                break
        self.outcome = RunOutcome(reason, rounds_done, initial, accuracy)

    def _close_round(self, r: int):
        """Evaluate the global model, log ``round_end`` and report progress; returns the
        accuracy."""
        accuracy = yield from self._evaluate(r)
        self.recorder.emit("round_end", t_s=self.env.now, node=self._edge_name, round=r, accuracy=accuracy)
        if self.on_round is not None:
            self.on_round(r, accuracy, self.env.now)
        return accuracy

    def _round(self, r: int, devices: list[Device]):
        """Broadcast, local work and uploads of one round; returns the results to aggregate,
        in device order. Without a deadline or over-selection the round waits for every
        device; otherwise it closes at the deadline (after at least ``min_results``
        arrivals) or once K updates have arrived, and the devices still busy are late."""
        tr = self.scenario.training
        t_start = self.env.now
        download_s = self._broadcast(r, devices)
        shares = self._uplink_shares(devices, download_s)
        arrived: list[tuple[Device, PendingJob]] = []
        procs = {d.index: self.env.process(self._device_round(r, d, download_s[d.index], shares[d.index], arrived))
                 for d in devices}
        keep = self._keep_count(len(devices))
        if tr.deadline_s is None and keep >= len(devices):
            yield simpy.AllOf(self.env, list(procs.values()))
        else:
            yield from self._wait_for_close(r, t_start, procs, arrived, keep)
        self._idle_until_close(r, arrived)
        arrived_ids = {d.index for d, _ in arrived[:keep]}
        for d, job in arrived[keep:]:   # over-selected: arrived after the first K
            self._late(r, d, job)
        kept = sorted(((d, job) for d, job in arrived if d.index in arrived_ids), key=lambda dj: dj[0].index)
        for d, job in kept:
            self._last_round[d.index] = r
        results = [job.result for _, job in kept]
        for res in results:
            self._last_loss[res.device_id] = res.loss
        return results

    def _keep_count(self, selected: int) -> int:
        """K: how many updates the round keeps (all unless over-selected)."""
        k = self.scenario.training.devices_per_round
        if self.scenario.training.over_selection > 1.0 and k is not None:
            return min(k, selected)
        return selected

    def _wait_for_close(self, r, t_start, procs, arrived, keep):
        """Wait until K updates arrived, every device is done, or the deadline passed with at
        least ``min_results`` arrivals; then the devices still busy are interrupted (late)."""
        tr = self.scenario.training
        deadline = None if tr.deadline_s is None else self.env.timeout(max(t_start + tr.deadline_s - self.env.now, 0.0))
        need = min(tr.min_results or 0, len(procs))
        while True:
            alive = [p for p in procs.values() if p.is_alive]
            if len(arrived) >= keep or not alive:
                break
            if deadline is not None and deadline.processed and len(arrived) >= need:
                break
            waits = [simpy.AnyOf(self.env, alive)]
            if deadline is not None and not deadline.processed:
                waits.append(deadline)
            yield simpy.AnyOf(self.env, waits)
        interrupted = [p for p in procs.values() if p.is_alive]
        for p in interrupted:
            p.interrupt("round closed")
        if interrupted:   # let them record update_late and cancel their jobs before any value is read
            yield simpy.AllOf(self.env, interrupted)

    def _device_round(self, r: int, device: Device, download_s: float, share: float, arrived: list):
        """Download the global adapter, run the local steps, upload over the FDMA share; on
        arrival append (device, job) to ``arrived``. A device that goes offline first, or is
        still busy when the round closes, loses its update."""
        g = device.group
        t_off = self.availability.offline_at(device.index, self.env.now, r)
        job: Optional[PendingJob] = None
        try:
            server_name = self.network.servers[device.server].name
            size_bytes = self._download_bytes(device)
            dl = min(download_s, max(t_off - self.env.now, 0.0))
            self._phase_rows[device.index] = self.recorder.emit(
                "downlink", t_s=self.env.now, duration_s=dl, node=device.name, peer=server_name, round=r,
                bytes=size_bytes, energy_j=energy_j(g.rx_power_w, dl), **self._tags(device))
            if not (yield from self._until(download_s, t_off)):
                return self._dropped(r, device, job)
            job = self._submit(device, r)
            if not (yield from self._local_steps(device, r, job, t_off)):
                return self._dropped(r, device, job)
            ok = yield from self._upload(r, device, job, share, t_off)
            if ok is False:
                return self._dropped(r, device, job)
            self._phase_rows.pop(device.index, None)
            arrived.append((device, job))
            return job
        except simpy.Interrupt:   # the round closed: the device stops what it was doing
            self._stop_phase(device.index)
            self._late(r, device, job)
            return None

    def _submit(self, device: Device, job_round: int, base=None) -> PendingJob:
        """Submit the device's local job (``job_round``: its round, or its job count in the
        asynchronous protocols) from ``base`` (default: the global state now)."""
        tr = self.scenario.training
        return self.engine.submit(LocalJob(device.index, job_round, tr.local_steps, tr.batch_size,
                                           prox_mu=self.aggregator.local_prox_mu), base=base)

    def _local_steps(self, device: Device, r: int, job: PendingJob, t_off: float):
        """Log the ``compute`` event of ``job`` (its loss filled in once it has run) and wait
        for it; False if the device goes offline first."""
        t_compute, e_compute = self._compute(device, job.cost.flops)
        row = self._log_compute("compute", device, r, t_compute, e_compute, t_off, flops=job.cost.flops,
                                memory_bytes=job.cost.peak_memory_bytes)
        job.when_done(lambda res: self.recorder.fill(row, loss=res.loss))
        return (yield from self._until(t_compute, t_off))

    def _log_compute(self, kind: str, device: Device, r: int, t: float, e: float, t_off: float, **fields) -> int:
        """Log a device's compute phase of ``t`` [s] and ``e`` [J] starting now as the phase in
        progress, cut at ``t_off`` if the device goes offline first (energy in proportion);
        returns its row. The caller waits with :meth:`_until`."""
        t_eff = min(t, max(t_off - self.env.now, 0.0))
        row = self.recorder.emit(kind, t_s=self.env.now, duration_s=t_eff, node=device.name, round=r,
                                 energy_j=e * (t_eff / t if t > 0 else 1.0), **fields, **self._tags(device))
        self._phase_rows[device.index] = row
        return row

    def _multicast_once(self, kind: str, size_bytes: int):
        """Send ``size_bytes`` once to every device, before the first round: each server
        multicasts with rateless coding (a device decodes at its own per-block rate; a
        ``downlink`` event of round 0 each, the server's event ``kind``) and the run goes on
        when the last device has decoded it, whatever the devices' availability."""
        bandwidth_hz = self.scenario.channel.downlink_bandwidth_hz
        t0, longest_all = self.env.now, 0.0
        for server in self.network.servers:
            members = [d for d in self.network.devices if d.server == server.index]
            if not members:
                continue
            times = [d.downlink.transfer_duration_s(8 * size_bytes, t0, bandwidth_hz) for d in members]
            for d, t in zip(members, times):
                self.recorder.emit("downlink", t_s=t0, duration_s=t, node=d.name, peer=server.name, round=0,
                                   bytes=size_bytes, energy_j=energy_j(d.group.rx_power_w, t), **self._tags(d))
            self.recorder.emit(kind, t_s=t0, duration_s=max(times), node=server.name, round=0, bytes=size_bytes,
                               energy_j=energy_j(server.spec.tx_power_w, max(times)))
            longest_all = max(longest_all, max(times))
        yield self.env.timeout(longest_all)

    def _stop_phase(self, device_index: int) -> None:
        """Cut the device's transfer or compute in progress at the current time."""
        row = self._phase_rows.pop(device_index, None)
        if row is not None:
            self.recorder.cut(row, self.env.now)

    def _until(self, duration_s: float, t_off: float):
        """Wait ``duration_s`` unless the device goes offline first (returns False then)."""
        if self.env.now + duration_s <= t_off:
            yield self.env.timeout(duration_s)
            return True
        yield self.env.timeout(max(t_off - self.env.now, 0.0))
        return False

    def _compute(self, device: Device, flops: float) -> tuple[float, float]:
        """(time [s], energy [J]) of a local job of ``flops``: throughput or DVFS model, times
        the device's straggler factor for this job (energy scales with the time)."""
        t, e = compute_time_energy(device.group, flops)
        factor = self._straggler_factor(device)
        t, e = t * factor, e * factor
        self._last_compute_s[device.index] = t
        return t, e

    def _straggler_factor(self, device: Device) -> float:
        """The straggler factor of the device's next job (1 without jitter); counts the job."""
        factor = 1.0
        if self.jitter.sigma > 0:
            factor = float(self.jitter.factor(device.index, int(self._jobs_started[device.index])))
        self._jobs_started[device.index] += 1
        return factor

    def _dropped(self, r: int, device: Device, job: Optional[PendingJob]):
        """The device went offline before its upload ended: its update is lost."""
        self.counters["dropped_updates"] += 1
        self.recorder.emit("update_dropped", t_s=self.env.now, node=device.name, round=r, **self._tags(device))
        if job is not None:
            job.cancel()
        return None

    def _late(self, r: int, device: Device, job: Optional[PendingJob]) -> None:
        """The round closed before this device's update counted: it is discarded."""
        self.counters["late_updates"] += 1
        self.recorder.emit("update_late", t_s=self.env.now, node=device.name, round=r, **self._tags(device))
        if job is not None:
            job.cancel()

    def _idle_until_close(self, r: int, arrived: list) -> None:
        """Devices that delivered wait for the round to close at ``idle_power_w``."""
        for device, job in arrived:
            p = device.group.idle_power_w
            if p > 0:
                t0 = self._upload_end_s.get(device.index, self.env.now)
                self.recorder.emit("idle", t_s=t0, duration_s=self.env.now - t0, node=device.name, round=r,
                                   energy_j=energy_j(p, self.env.now - t0), **self._tags(device))

    # ------------------------------------------------------------ selection
    def _online(self, r: int) -> list[Device]:
        """Devices online at the round start."""
        if self.scenario.dynamics.availability.model == "always":
            return list(self.network.devices)
        mask = self.availability.online_mask(self.env.now, r)
        return [d for d in self.network.devices if mask[d.index]]

    def _select(self, r: int, online: list[Device]) -> list[Device]:
        k = self.scenario.training.devices_per_round
        if k is None:
            return online
        over = self.scenario.training.over_selection
        k = min(math.ceil(over * k - 1e-9), len(online)) if over > 1.0 else k
        chosen = self.selection.select([d.index for d in online], k, self._selection_context(r))
        return [self.network.devices[i] for i in chosen]

    def _selection_context(self, r: int) -> SelectionContext:
        if self._mean_snr_db is None:
            bw = self.scenario.channel.uplink_bandwidth_hz
            self._mean_snr_db = np.array([d.uplink.mean_snr_db(bw) for d in self.network.devices])
        return SelectionContext(round=r, now_s=self.env.now, rng=self._select_rng,
                                mean_uplink_snr_db=self._mean_snr_db, compute_flops_per_s=self._compute_speed,
                                last_round=self._last_round, last_loss=self._last_loss,
                                num_examples=self._num_examples)

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

    def _uplink_shares(self, devices: list[Device], download_s: Optional[dict[int, float]] = None) -> dict[int, float]:
        """FDMA shares per device (``strategies.bandwidth``), within each edge server's band."""
        ch = self.scenario.channel
        payload_bits = 8.0 * self.update_bytes()
        shares: dict[int, float] = {}
        for server in self.network.servers:
            members = [d for d in devices if d.server == server.index]
            if not members:
                continue
            ctx = BandwidthContext(
                weights=np.array([self._uplink_weights[d.index] for d in members]),
                payload_bits=np.full(len(members), payload_bits),
                mean_snr_over_band=np.array([10.0 ** (d.uplink.mean_snr_db(ch.uplink_bandwidth_hz) / 10.0)
                                             for d in members]) if self._needs_snr() else np.ones(len(members)),
                bandwidth_hz=ch.uplink_bandwidth_hz,
                ready_s=None if download_s is None else np.array(
                    [download_s[d.index] + self._last_compute_s.get(d.index, 0.0) for d in members]),
            )
            for d, s in zip(members, self.bandwidth.shares([d.index for d in members], ctx)):
                shares[d.index] = float(s)
        return shares

    # the upload of a device starts after its download and compute; the compute time of its
    # job is not known when the band is split at the round start, so the allocation uses the
    # device's previous compute time (0 before its first job), a documented estimate
    def _needs_snr(self) -> bool:
        return self.scenario.strategies.bandwidth.name not in ("equal", "proportional")

    # ------------------------------------------------------------- transfers
    def update_bytes(self) -> int:
        """Uplink payload of one update [bytes]: the adapter, or its compressed form
        (ceil(payload bits / 8), the payload of q = adapter_bytes / 4 float32 values)."""
        if self.scenario.strategies.compression.name == "none":
            return self.trainer.adapter_bytes()
        return math.ceil(self.compressor.payload_bits(self.trainer.adapter_bytes() // 4) / 8)

    def _broadcast(self, r: int, devices: list[Device]) -> dict[int, float]:
        """Each server multicasts the adapter to its devices with rateless (fountain) coding:
        a device decodes once the bits it has accumulated at its own per-block rate reach the
        payload, so each device has its own download time; the server transmits until its last
        device has decoded. Returns device index -> download time [s]."""
        ch = self.scenario.channel
        t0 = self.env.now
        download_s: dict[int, float] = {}
        for server in self.network.servers:
            members = [d for d in devices if d.server == server.index]
            if not members:
                continue
            sizes = {d.index: self._download_bytes(d) for d in members}
            for d in members:
                download_s[d.index] = d.downlink.transfer_duration_s(8 * sizes[d.index], t0, ch.downlink_bandwidth_hz)
            longest = max(download_s[d.index] for d in members)
            self.recorder.emit("broadcast", t_s=t0, duration_s=longest, node=server.name, round=r,
                               bytes=max(sizes.values()), energy_j=energy_j(server.spec.tx_power_w, longest))
        return download_s

    def _download_bytes(self, device: Device) -> int:
        """What ``device`` must receive at a round start [bytes]: the global adapter."""
        return self.trainer.adapter_bytes()

    def _upload(self, r: int, device: Device, job: PendingJob, share: float, t_off: float = math.inf):
        """Upload the update over the device's FDMA share (overridden by AirComp uplinks);
        returns False if the device went offline before the upload ended."""
        size_bytes = self.update_bytes()
        t_up = device.uplink.transfer_duration_s(8 * size_bytes, self.env.now,
                                                 share * self.scenario.channel.uplink_bandwidth_hz)
        t_eff = min(t_up, max(t_off - self.env.now, 0.0))
        self._phase_rows[device.index] = self.recorder.emit(
            "uplink", t_s=self.env.now, duration_s=t_eff, node=device.name,
            peer=self.network.servers[device.server].name, round=r, bytes=size_bytes,
            energy_j=energy_j(device.group.tx_power_w, t_eff), **self._tags(device))
        ok = yield from self._until(t_up, t_off)
        if ok:
            self._upload_end_s[device.index] = self.env.now
        return ok

    # ------------------------------------------------------------ edge work
    def _edge_time_s(self, flops: float) -> float:
        return compute_time_s(flops, self.network.servers[0].spec.compute_flops_per_s)

    def _aggregate(self, r: int, results: list[LocalResult], staleness: Optional[np.ndarray] = None,
                   weights: Optional[np.ndarray] = None):
        """global <- global + server_step(sum_k w_k decode(update_k)) (FedAvg: the weighted
        mean of the updates, on the trainer's tensors); w from the aggregation strategy unless
        given."""
        if weights is None:
            n = np.array([res.num_examples for res in results], dtype=np.float64)
            tau = np.zeros(len(results)) if staleness is None else np.asarray(staleness, dtype=np.float64)
            weights = self.aggregator.weights(n, tau)
        self._apply(results, weights)
        # A weighted sum of K updates of n values costs 2 K n FLOPs (n = bytes / 4 for float32).
        flops = 2.0 * len(results) * self.trainer.adapter_bytes() / 4.0
        duration = self._edge_time_s(flops)
        self.recorder.emit("aggregate", t_s=self.env.now, duration_s=duration, node=self._edge_name, round=r, flops=flops)
        self.counters["server_steps"] += 1
        yield self.env.timeout(duration)

    def _apply(self, results: list[LocalResult], weights: np.ndarray) -> None:
        """Add the weighted updates to the global state: on the trainer's tensors, or through
        flat vectors when updates are compressed or the server has its own optimizer."""
        if not self._flat_aggregation:
            self.trainer.aggregate(results, [float(w) for w in weights])
            return
        delta = None
        for res, w in zip(results, weights):
            decoded, _ = self.compressor.compress(res.device_id, self.trainer.flatten_update(res), self._compress_rng)
            delta = w * decoded if delta is None else delta + w * decoded
        self.trainer.aggregate_flat(self.aggregator.server_step(delta))

    def _evaluate(self, r: int):
        ev = self.last_evaluation = self.trainer.evaluate()
        duration = self._edge_time_s(ev.flops)
        self.recorder.emit("evaluate", t_s=self.env.now, duration_s=duration, node=self._edge_name, round=r,
                           flops=ev.flops, loss=ev.loss, accuracy=ev.accuracy)
        yield self.env.timeout(duration)
        return ev.accuracy

    # ------------------------------------------------------------- mobility
    def _mobility_ticks(self):
        """Every ``dynamics.mobility.tick_s``: move the devices, recompute their large-scale
        gains and the D2D graph, and hand over where another server is stronger by the
        hysteresis margin."""
        spec = self.scenario.dynamics.mobility
        servers = self.network.servers
        tx_dbm = np.array([10.0 * math.log10(s.spec.tx_power_w * 1e3) for s in servers])
        current = np.array([d.server for d in self.network.devices])
        while True:
            yield self.env.timeout(spec.tick_s)
            positions = self.mobility.advance(self.env.now)
            gains = self.network.large_scale_gains(positions)
            with np.errstate(divide="ignore"):
                rx_dbm = tx_dbm[None, :] + 10.0 * np.log10(gains)
            new, handed = associate(rx_dbm, current, spec.handover_hysteresis_db)
            for i in np.flatnonzero(handed):
                dev = self.network.devices[int(i)]
                self.counters["handovers"] += 1
                self.recorder.emit("handover", t_s=self.env.now, node=dev.name, peer=servers[int(new[i])].name,
                                   round=0, group=dev.group.name, server=servers[int(current[i])].name)
            self.network.move(positions, new, gains)
            current = np.asarray(new)
            self._mean_snr_db = None


def deadline_error(scenario: "Scenario", min_job_flops: float) -> Optional[str]:
    """Why ``training.deadline_s`` is shorter than any possible round, or None: the fastest
    device's fastest possible local job (``min_job_flops``: every batch as short as the shortest
    text), with the straggler factor at its 1e-9 quantile exp(-6 sigma - sigma^2 / 2), would
    not end before it, so every update would be discarded."""
    tr = scenario.training
    if tr.deadline_s is None or tr.mode != "synchronous":
        return None
    fastest = min(compute_time_energy(g, min_job_flops)[0] for g in scenario.devices)
    stragglers = scenario.dynamics.stragglers
    sigma = stragglers.jitter_sigma if stragglers.jitter == "lognormal" else 0.0
    fastest *= math.exp(-6.0 * sigma - 0.5 * sigma * sigma)
    if tr.deadline_s >= fastest:
        return None
    return (f"training.deadline_s={tr.deadline_s} is shorter than any possible round: the fastest device needs at "
            f"least {fastest:.4g} s for its {tr.local_steps} local steps ({min_job_flops:.3g} FLOPs), before any "
            "download or upload; allowed: a larger deadline (or null)")


def trainer_examples(trainer: Trainer, device_id: int) -> int:
    """A device's local data size, as the trainer holds it."""
    return int(trainer.device_num_examples(device_id))
