"""Asynchronous and semi-synchronous federated fine-tuning (FedAsync, FedBuff, periodic
aggregation) on the SimPy timeline, with real local training at event boundaries.

``training.mode: asynchronous`` (FedBuff, Nguyen et al. 2022; FedAsync, Xie, Koyejo & Gupta
2019, is the case buffer_size = 1):

1. ``async_fl.concurrency`` devices train at any time. Whenever a slot is free the edge
   selects an idle, online device (``strategies.selection``) and sends it the current global
   adapter, version v, over a unicast downlink of ``channel.downlink_bandwidth_hz /
   concurrency`` (one of C equal FDMA slots);
2. the device trains E real local steps *from version v* (its job is submitted to
   :mod:`netsim.engine` with that snapshot as its base, however many server steps happen
   meanwhile) and uploads its update over an uplink slot of ``uplink_bandwidth_hz /
   concurrency``;
3. on arrival the update's staleness is tau = v_now - v. Updates staler than
   ``async_fl.max_staleness`` are discarded (``update_stale``); the others are buffered. Once
   K = ``buffer_size`` updates are buffered the server steps (``strategies.aggregation:
   fedbuff``): x <- x + eta_g sum_k s(tau_k) / K delta_k, with s the staleness weighting
   (constant, polynomial (1 + tau)^-a, or hinge), and the version becomes v + 1;
4. the server evaluates every ``async_fl.eval_every_steps`` steps.

``training.mode: semi_synchronous``: devices train as above, but the server steps every
``async_fl.period_s`` on whatever arrived in the period, w_k = n_k s(tau_k) / sum_j n_j s(tau_j)
(s = 1 unless the aggregation is fedbuff, whose staleness weighting applies); a period
without arrivals is skipped.

Stopping: ``training.rounds`` counts server steps; ``stop.target_accuracy`` and
``stop.horizon_s`` as in FedAvg. A device that goes offline mid-job loses it
(``update_dropped``). Every ``uplink`` event carries the version the update was trained on
(``model_version``) and its staleness. The values of all jobs in flight are computed together
whenever the server first needs one of them, so an asynchronous run still batches: see
``engine.stats()`` (``mean_jobs_per_pass``).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import numpy as np
import simpy
from pydantic import Field

from ..budgets import energy_j, fits_in_memory
from ..network import Device
from ..spec_base import Int, PositiveFloat, Spec
from .fedavg import FedAvgSimulation, RunOutcome

if TYPE_CHECKING:
    from ..engine import PendingJob


class AsyncFLSpec(Spec):
    """The asynchronous protocols' section (``training.mode`` asynchronous or
    semi_synchronous)."""

    concurrency: Int = Field(10, ge=1, le=1_000_000, description="devices training at the same time (C)")
    period_s: Optional[PositiveFloat] = Field(
        None, le=1e12, description="semi_synchronous: the server aggregates every period_s [s]")
    max_staleness: Optional[Int] = Field(
        None, ge=0, le=1_000_000, description="updates more than this many versions old are discarded (null: none)")
    eval_every_steps: Int = Field(1, ge=1, le=1_000_000, description="evaluate every this many server steps")


class AsyncFLSimulation(FedAvgSimulation):
    """FedAsync / FedBuff / semi-synchronous FL; same constructor as
    :class:`~netsim.protocols.fedavg.FedAvgSimulation`. ``self.version`` is the number of
    server steps taken; ``self.staleness`` lists the staleness of every aggregated update."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        sc = self.scenario
        self.spec = sc.async_fl
        self.semi_sync = sc.training.mode == "semi_synchronous"
        self.version = 0
        self.staleness: list[int] = []
        self._buffer: list[tuple[Device, "PendingJob", int]] = []
        self._buffer_full: Optional[simpy.Event] = None
        self._busy = np.zeros(len(self.network.devices), dtype=bool)
        self._device_jobs = np.zeros(len(self.network.devices), dtype=np.int64)
        self._waking = False
        need = self.trainer.job_memory_bytes(sc.training.batch_size)
        self._fits = np.array([fits_in_memory(need, d.group.memory_bytes) for d in self.network.devices])
        self._job_memory_bytes = need

    @property
    def buffer_size(self) -> int:
        """K: updates per server step (asynchronous mode)."""
        return int(getattr(self.aggregator.params, "buffer_size", 1))

    # ------------------------------------------------------------------ main loop
    def _main(self):
        sc = self.scenario
        initial = yield from self._evaluate(0)
        accuracy, reason = initial, "round_limit"
        for d in self.network.devices:
            if not self._fits[d.index]:
                self.recorder.emit("memory_exceeded", t_s=self.env.now, node=d.name, round=0,
                                   memory_bytes=self._job_memory_bytes, **self._tags(d))
        if not self._fits.any():
            self.outcome = self._outcome("no_device_fits_memory", initial, accuracy)
            return
        self._fill_slots()
        while self.version < sc.training.rounds:
            if sc.stop.horizon_s is not None and self.env.now >= sc.stop.horizon_s:
                reason = "horizon"
                break
            batch = yield from self._next_batch()
            if batch is None:
                reason = "horizon" if sc.stop.horizon_s is not None else "no_device_available"
                break
            if not batch:
                continue
            step = self.version + 1
            results = [job.result for _, job, _ in batch]
            tau = np.array([self.version - v for _, _, v in batch], dtype=np.float64)
            self.staleness.extend(int(t) for t in tau)
            for (d, _, _), res in zip(batch, results):
                self._last_round[d.index] = step
                self._last_loss[d.index] = res.loss
            yield from self._server_step(step, results, tau)
            self.version = step
            if step % self.spec.eval_every_steps == 0 or step == sc.training.rounds:
                accuracy = yield from self._close_round(step)
                if sc.stop.target_accuracy is not None and accuracy >= sc.stop.target_accuracy:
                    reason = "target_accuracy"
                    break
        for device in np.flatnonzero(self._busy):   # jobs in flight when the run ends stop with it
            self._stop_phase(int(device))
        self.outcome = self._outcome(reason, initial, accuracy)

    def _outcome(self, reason: str, initial: float, accuracy: float) -> RunOutcome:
        return RunOutcome(reason, self.version, initial, accuracy)

    def _next_batch(self):
        """Wait for the next server step's updates: K buffered updates (asynchronous) or the
        end of the period (semi-synchronous). None: nothing can ever arrive."""
        if self.semi_sync:
            yield self.env.timeout(self.spec.period_s)
            batch, self._buffer = self._buffer, []
            if not batch and not self._busy.any() and not self._waking:
                return None
            return batch
        k = self.buffer_size
        while len(self._buffer) < k:
            if not self._busy.any() and not self._waking:
                return None
            self._buffer_full = self.env.event()
            yield self._buffer_full
        batch, self._buffer = self._buffer[:k], self._buffer[k:]
        return batch

    def _server_step(self, step: int, results, tau: np.ndarray):
        """Asynchronous: the aggregation strategy's weights (FedBuff: s(tau_k) / K);
        semi-synchronous: w_k = n_k s(tau_k) / sum_j n_j s(tau_j) over the period's arrivals."""
        weights = None
        if self.semi_sync:
            w = np.array([res.num_examples for res in results], dtype=np.float64) * self._staleness_weights(tau)
            weights = w / w.sum()
        yield from self._aggregate(step, results, tau, weights)

    def _staleness_weights(self, tau: np.ndarray) -> np.ndarray:
        weigh = getattr(self.aggregator, "staleness_weight", None)
        return np.ones_like(tau) if weigh is None else np.asarray(weigh(tau), dtype=np.float64)

    # ------------------------------------------------------------------ devices
    def _fill_slots(self) -> None:
        """Start idle, online, fitting devices until ``concurrency`` are busy; if none is
        online, wake up when the first idle one comes online."""
        free = self.spec.concurrency - int(self._busy.sum())
        if free <= 0:
            return
        round_ = self.version + 1
        online = self.availability.online_mask(self.env.now, round_)
        idle = np.flatnonzero(online & self._fits & ~self._busy)
        if idle.size == 0:
            self._wake_when_online()
            return
        chosen = self.selection.select([int(i) for i in idle], min(free, idle.size),
                                       self._selection_context(round_))
        for i in chosen:
            self._busy[i] = True
            self.env.process(self._device_job(self.network.devices[i]))

    def _wake_when_online(self) -> None:
        """Schedule :meth:`_fill_slots` at the first time an idle fitting device is online."""
        if self._waking:
            return
        candidates = np.flatnonzero(self._fits & ~self._busy)
        t_next = min((self.availability.online_at(int(i), self.env.now) for i in candidates), default=math.inf)
        if not math.isfinite(t_next):
            return
        self._waking = True

        def wake():
            yield self.env.timeout(max(t_next - self.env.now, 0.0))
            self._waking = False
            self._fill_slots()
            self._notify()
        self.env.process(wake())

    def _device_job(self, device: Device):
        """Download version v, train from it, upload; buffer the update with its staleness."""
        sc = self.scenario
        g = device.group
        version, base = self.version, self.engine.snapshot()
        self._device_jobs[device.index] += 1
        job_round = int(self._device_jobs[device.index])
        t_off = self.availability.offline_at(device.index, self.env.now, version + 1)
        server = self.network.servers[device.server]
        c = self.spec.concurrency
        size_bytes = self.trainer.adapter_bytes()
        job = None
        try:
            dl = device.downlink.transfer_duration_s(8 * size_bytes, self.env.now, sc.channel.downlink_bandwidth_hz / c)
            dl_eff = min(dl, max(t_off - self.env.now, 0.0))
            self._phase_rows[device.index] = self.recorder.emit(
                "downlink", t_s=self.env.now, duration_s=dl_eff, node=device.name, peer=server.name, round=version,
                bytes=size_bytes, energy_j=energy_j(g.rx_power_w, dl_eff), **self._tags(device))
            if not (yield from self._until(dl, t_off)):
                return self._dropped(version, device, job)
            job = self._submit(device, job_round, base)
            if not (yield from self._local_steps(device, version, job, t_off)):
                return self._dropped(version, device, job)
            up_bytes = self.update_bytes()
            server = self.network.servers[device.server]   # it may have handed over meanwhile
            t_up = device.uplink.transfer_duration_s(8 * up_bytes, self.env.now, sc.channel.uplink_bandwidth_hz / c)
            up_eff = min(t_up, max(t_off - self.env.now, 0.0))
            row_up = self.recorder.emit("uplink", t_s=self.env.now, duration_s=up_eff, node=device.name,
                                        peer=server.name, round=version, bytes=up_bytes,
                                        energy_j=energy_j(g.tx_power_w, up_eff), **self._tags(device))
            self._phase_rows[device.index] = row_up
            if not (yield from self._until(t_up, t_off)):
                return self._dropped(version, device, job)
            self._phase_rows.pop(device.index, None)
            tau = self.version - version
            self.recorder.tag(row_up, model_version=version, staleness=tau)
            if self.spec.max_staleness is not None and tau > self.spec.max_staleness:
                self.counters["stale_updates"] += 1
                self.recorder.emit("update_stale", t_s=self.env.now, node=device.name, round=version,
                                   **self._tags(device))
                job.cancel()
            else:
                self._buffer.append((device, job, version))
        finally:
            self._busy[device.index] = False
            if self.outcome is None:
                self._fill_slots()
                self._notify()

    def _notify(self) -> None:
        """Wake the server loop when the buffer is full or nothing is in flight any more."""
        ev = self._buffer_full
        if ev is not None and not ev.triggered and (
                len(self._buffer) >= self.buffer_size or (not self._busy.any() and not self._waking)):
            ev.succeed()
