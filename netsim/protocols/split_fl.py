"""Split federated fine-tuning with gradient download (SplitFed), on one SimPy timeline.

The device holds the embeddings, the blocks below ``split.cut_layer`` and a soft prompt; the
edge holds the rest of the model and (``split.train_head``) one copy of the classification
head per device (SplitFed V1, Thapa et al. 2022). A round:

1. each edge server multicasts the global prompt to its selected devices (as in FedAvg);
2. every device runs E local steps, each a round trip on the timeline:

   a. device forward below the cut: counted FLOPs / device speed (``compute`` event);
   b. upload of the cut activations (+ token mask, labels) over the device's FDMA share of
      the uplink band (``uplink``);
   c. the edge serves the request from its queue (:class:`netsim.edge_queue.EdgeBatchServer`:
      FCFS, greedy batches of at most ``split.edge_max_batch``, a pass lasting
      ``edge_batch_overhead_s`` + sum of the batch's FLOPs / edge FLOP/s); the device waits
      at ``idle_power_w`` (``edge_wait``: queueing + service);
   d. download of the gradient at the cut over an equal share of the downlink band among the
      server's devices of the round (unicast, ``downlink``);
   e. device backward into the prompt (``compute``);
3. every device uploads its prompt; the edge averages prompts and head copies with FedAvg
   weights, evaluates, and the round ends.

The same deadlines, availability, stragglers (one factor per job, applied to each of its
device phases) and mobility as :mod:`netsim.protocols.fedavg` apply. The step's values (losses,
the trained prompt and head) are computed by the trainer when the round's results are read
(:mod:`netsim.engine`); they do not depend on the queueing, because every device's edge part
is its own (frozen blocks, its own head copy).

Privacy caveat: the edge sees every step's cut activations; at ``cut_layer: 0`` they are the
token embeddings, which a nearest-neighbour search of the embedding table turns back into the
text.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import simpy
from pydantic import Field, model_validator

from ..budgets import energy_j
from ..dynamics import compute_time_energy
from ..edge_queue import EdgeBatchServer
from ..federated_deft import OptimizerOverride
from ..interfaces import Trainer
from ..network import Device
from ..spec_base import Bool, Int, NonNegFloat
from .fedavg import FedAvgSimulation, RoundCallback

if TYPE_CHECKING:  # netsim.scenario imports SplitSpec: no import of it at run time
    from ..engine import PendingJob
    from ..scenario import Scenario


class SplitSpec(OptimizerOverride):
    """Variant ``split`` of experiment ``federated_deft`` (SplitFed with a soft prompt)."""

    cut_layer: Int = Field(1, ge=0, le=1024, description="transformer blocks on the device (0: embeddings only)")
    num_virtual_tokens: Int = Field(8, ge=1, le=512, description="rows of the device's soft prompt")
    train_head: Bool = Field(True, description="the classification head trains at the edge (one copy per device, "
                             "averaged each round as the prompts are)")
    prompt_only_gradient: Bool = Field(False, description="cut_layer 0 only: upload the token embeddings and the "
                                       "prompt; the edge returns only dL/dP")
    edge_max_batch: Int = Field(8, ge=1, le=65_536, description="requests the edge serves together in one pass")
    edge_batch_overhead_s: NonNegFloat = Field(1e-3, le=1e6, description="fixed time of one edge pass (kernel "
                                               "launch, scheduling) [s]; batching amortises it")

    @model_validator(mode="after")
    def _prompt_only_needs_cut_0(self) -> "SplitSpec":
        if self.prompt_only_gradient and self.cut_layer != 0:
            raise ValueError(f"split.prompt_only_gradient=true needs split.cut_layer=0 (got {self.cut_layer}): only "
                             "then is the prompt an input of the edge part")
        return self


class SplitFedSimulation(FedAvgSimulation):
    """SplitFed rounds: every local step a round trip through a shared, batching edge.

    The trainer's plans must carry a :class:`netsim.interfaces.SplitJobCost` (the real one:
    ``fomo.split_trainer.SplitTrainer``).

    Attributes
    ----------
    edges : list[EdgeBatchServer]
        One compute queue per edge server (their ``stats`` give load and queueing delay).
    """

    def __init__(self, scenario: "Scenario", seed: int, trainer: Trainer, on_round: Optional[RoundCallback] = None):
        super().__init__(scenario, seed, trainer, on_round)
        spec = scenario.split
        self._round_now = 0
        self.edges = [EdgeBatchServer(self.env, s.spec.compute_flops_per_s, spec.edge_max_batch,
                                      spec.edge_batch_overhead_s, on_pass=self._pass_logger(s.name))
                      for s in self.network.servers]
        self._shares: dict[int, float] = {}
        self._downlink_share: dict[int, float] = {}
        self._job_factor: dict[int, float] = {}
        self._last_edge_row: dict[int, int] = {}

    def edge_summary(self) -> dict:
        """Load of every edge server's queue over the run: requests, passes, mean batch size,
        utilisation (busy time / run time), mean, 95th-percentile and largest queueing delay."""
        horizon = self.env.now
        return {s.name: edge.stats.summary(horizon) for s, edge in zip(self.network.servers, self.edges)}

    def _pass_logger(self, server_name: str):
        def log(start_s: float, duration_s: float, flops: float, batch_size: int) -> None:
            self.recorder.emit("edge_compute", t_s=start_s, duration_s=duration_s, node=server_name,
                               round=self._round_now, flops=flops)
        return log

    def _round(self, r: int, devices: list[Device]):
        self._round_now = r
        return (yield from super()._round(r, devices))

    def _uplink_shares(self, devices: list[Device], download_s=None) -> dict[int, float]:
        """FedAvg's FDMA uplink shares (kept for the activations too) and, for the gradients
        that come back, an equal share of the downlink band per device of the server."""
        shares = super()._uplink_shares(devices, download_s)
        self._shares.update(shares)
        for server in self.network.servers:
            members = [d for d in devices if d.server == server.index]
            for d in members:
                self._downlink_share[d.index] = 1.0 / len(members)
        return shares

    def _device_phase(self, device: Device, r: int, flops: float, t_off: float, job: "PendingJob"):
        """One device compute phase of ``flops`` (forward or backward below the cut), scaled
        by the job's straggler factor; False if the device went offline first."""
        if flops <= 0:
            return True
        t, e = compute_time_energy(device.group, flops)
        factor = self._job_factor[device.index]
        t, e = t * factor, e * factor
        self._log_compute("compute", device, r, t, e, t_off, flops=flops, memory_bytes=job.cost.peak_memory_bytes)
        return (yield from self._until(t, t_off))

    def _transfer(self, kind: str, device: Device, r: int, size_bytes: int, t_off: float):
        """The activations up (``uplink``, the device's FDMA share) or the gradient down
        (``downlink``, its share of the downlink band); False if the device went offline."""
        ch = self.scenario.channel
        if kind == "uplink":
            bw, power = self._shares.get(device.index, 1.0) * ch.uplink_bandwidth_hz, device.group.tx_power_w
            t = device.uplink.transfer_duration_s(8 * size_bytes, self.env.now, bw)
        else:
            bw, power = self._downlink_share.get(device.index, 1.0) * ch.downlink_bandwidth_hz, device.group.rx_power_w
            t = device.downlink.transfer_duration_s(8 * size_bytes, self.env.now, bw)
        t_eff = min(t, max(t_off - self.env.now, 0.0))
        self._phase_rows[device.index] = self.recorder.emit(
            kind, t_s=self.env.now, duration_s=t_eff, node=device.name, peer=self.network.servers[device.server].name,
            round=r, bytes=size_bytes, energy_j=energy_j(power, t_eff), **self._tags(device))
        return (yield from self._until(t, t_off))

    def _edge(self, device: Device, r: int, flops: float, t_off: float):
        """Queue the step at the device's edge and wait for its pass (``edge_wait``: queueing +
        service, at idle power; the edge computes the step's loss, so the job's mean loss is
        filled into the last one); False if the device went offline first."""
        t0 = self.env.now
        served = self.edges[device.server].request(flops)
        row = self.recorder.emit("edge_wait", t_s=t0, node=device.name, peer=self.network.servers[device.server].name,
                                 round=r, flops=flops, **self._tags(device))
        self._last_edge_row[device.index] = row
        try:
            if math.isinf(t_off):
                yield served
            else:
                yield simpy.AnyOf(self.env, [served, self.env.timeout(max(t_off - t0, 0.0))])
        finally:   # also when the round closes meanwhile (an interrupt)
            duration = self.env.now - t0
            self.recorder.finish(row, duration_s=duration, energy_j=energy_j(device.group.idle_power_w, duration))
        return served.triggered

    def _local_steps(self, device: Device, r: int, job: "PendingJob", t_off: float):
        """The job's E round trips (device forward, uplink, edge, downlink, device backward);
        False if the device goes offline first."""
        steps = getattr(job.cost, "steps", None)
        if not steps:
            raise TypeError(f"the split protocol needs plans with a SplitJobCost; {type(self.trainer).__name__} "
                            "planned a plain JobCost")
        self._job_factor[device.index] = self._straggler_factor(device)
        for rt in steps:
            for phase in (self._device_phase(device, r, rt.device_forward_flops, t_off, job),
                          self._transfer("uplink", device, r, rt.uplink_bytes, t_off),
                          self._edge(device, r, rt.edge_flops, t_off),
                          self._transfer("downlink", device, r, rt.downlink_bytes, t_off),
                          self._device_phase(device, r, rt.device_backward_flops, t_off, job)):
                if not (yield from phase):
                    return False
        row = self._last_edge_row[device.index]
        job.when_done(lambda res: self.recorder.fill(row, loss=res.loss))
        return True
