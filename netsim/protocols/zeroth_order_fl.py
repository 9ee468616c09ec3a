"""Federated zeroth-order fine-tuning with shared candidate seeds (FedKSeed over MeZO).

Every local step is a MeZO step (Malladi et al. 2023): two forward passes at theta +- eps z,
z ~ N(0, I) regenerated from a seed, and theta <- theta - lr g z with the projected gradient
g = (L+ - L-) / (2 eps). FedKSeed (Qin et al. 2024) draws every step's seed from K candidate
seeds that the edge shares once, so a device's round is summarised by K scalars (the sum of
the projected gradients of the steps that drew each seed) and every device rebuilds the new
global model by replaying the K aggregated scalars (``fomo.zo_trainer``). The timeline:

1. the edge sends the K candidate seeds once (4 K bytes, ``seed_broadcast``);
2. FedAvg rounds (:mod:`netsim.protocols.fedavg`) whose payload each way is the dense vector of
   K float32 scalars; a device that missed server steps since its last download receives
   their scalars too: min(4 K x missed steps, the whole PEFT state) bytes (nothing before the
   first aggregation: every device starts from the shared initial state);
3. before its steps a device replays the pools it downloaded, and after each aggregation the
   edge replays the new pool (``replay`` events: a multiply-add per trainable value per
   scalar, ``trainer.replay_flops``; the Gaussian draws are not counted);
4. with ``zeroth_order.uplink_access: aircomp`` the K scalars go up over the air
   (:mod:`netsim.protocols.aircomp_fedavg`: the edge receives their weighted sum directly).

A step costs two forward passes and the memory of inference: no gradient, no optimizer
state, no saved activations.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Optional

import numpy as np
from pydantic import Field

from ..dynamics import compute_time_energy
from ..federated_deft import StepOverrides
from ..network import Device
from ..spec_base import Int, NonNegFloat, PositiveFloat
from .aircomp_fedavg import AirCompFedAvgSimulation
from .fedavg import FedAvgSimulation

if TYPE_CHECKING:  # netsim.scenario imports ZerothOrderSpec: no import of it at run time
    from ..engine import PendingJob


class ZerothOrderSpec(StepOverrides):
    """Variant ``zeroth_order`` of experiment ``federated_deft`` (MeZO steps, FedKSeed seeds);
    its ``learning_rate`` is the plain SGD step of the zeroth-order update."""

    candidate_seeds: Int = Field(1024, ge=1, le=2**24, description="K shared candidate seeds (FedKSeed)")
    eps: PositiveFloat = Field(1e-3, le=1.0, description="SPSA perturbation scale epsilon")
    weight_decay: NonNegFloat = Field(0.0, le=1.0)
    uplink_access: Optional[Literal["ofdma", "aircomp"]] = Field(
        None, description="how the K accumulated scalars go up (null: channel.uplink_access)")


class _SeedPools:
    """What FedKSeed adds to a FedAvg protocol: the one-off seed broadcast and catch-up
    downloads (mixed into the OFDMA and the over-the-air protocol)."""

    def _prepare(self):
        k = self.scenario.zeroth_order.candidate_seeds
        size_bytes = 4 * k   # K uint32 seeds
        self._synced = np.zeros(len(self.network.devices), dtype=np.int64)
        self._missed_at_submit: dict[int, int] = {}
        yield from self._multicast_once("seed_broadcast", size_bytes)

    def _download_bytes(self, device: Device) -> int:
        """The K aggregated scalars of every server step the device has not replayed yet,
        capped by the whole PEFT state (``trainer.trainable_bytes()``)."""
        missed = self._missed(device)
        per_step = self.trainer.adapter_bytes()
        whole = getattr(self.trainer, "trainable_bytes", None)
        cap = int(whole()) if callable(whole) else per_step * missed
        return min(per_step * missed, cap)

    def _missed(self, device: Device) -> int:
        """Server steps since the device last synchronised."""
        return int(self.counters["server_steps"]) - int(self._synced[device.index])

    def _submit(self, device: Device, job_round: int, base=None) -> "PendingJob":
        self._missed_at_submit[device.index] = self._missed(device)
        self._synced[device.index] = int(self.counters["server_steps"])
        return super()._submit(device, job_round, base)

    def _replay_flops(self, server_steps: int) -> float:
        """Replaying ``server_steps`` aggregated pools of K scalars (every entry counted: an
        over-the-air pool is dense; a digital one has at most min(K, devices x E) nonzero
        entries, so this is its upper bound) [FLOP]."""
        replay = getattr(self.trainer, "replay_flops", None)
        k = self.scenario.zeroth_order.candidate_seeds
        return float(replay(k * server_steps)) if callable(replay) and server_steps > 0 else 0.0

    def _local_steps(self, device: Device, r: int, job: "PendingJob", t_off: float):
        """The device first replays the pools it downloaded (``replay``, element-wise FLOPs /
        its speed), then runs its MeZO steps."""
        flops = self._replay_flops(self._missed_at_submit.pop(device.index, 0))
        if flops > 0:
            t, e = compute_time_energy(device.group, flops)
            self._log_compute("replay", device, r, t, e, t_off, flops=flops)
            if not (yield from self._until(t, t_off)):
                return False
        return (yield from super()._local_steps(device, r, job, t_off))

    def _aggregate(self, r: int, results, *args, **kwargs):
        """FedAvg of the pools (or their over-the-air sum), then the edge replays the new pool
        into its copy of the model (``replay``)."""
        before = int(self.counters["server_steps"])
        yield from super()._aggregate(r, results, *args, **kwargs)
        if int(self.counters["server_steps"]) == before:   # nothing was aggregated (no device scheduled)
            return
        flops = self._replay_flops(1)
        duration = self._edge_time_s(flops)
        self.recorder.emit("replay", t_s=self.env.now, duration_s=duration, node=self._edge_name, round=r, flops=flops)
        yield self.env.timeout(duration)


class ZerothOrderSimulation(_SeedPools, FedAvgSimulation):
    """FedKSeed rounds with OFDMA uplinks (see the module docstring)."""


class ZerothOrderAirCompSimulation(_SeedPools, AirCompFedAvgSimulation):
    """FedKSeed rounds whose K scalars are aggregated over the air."""
