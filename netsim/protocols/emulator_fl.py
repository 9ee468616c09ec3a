"""Federated fine-tuning on an Offsite-Tuning emulator: the edge sends a compressed copy of
the model once, the devices train the adapter on it in FedAvg rounds, the edge plugs the
aggregated adapter into the full model.

Offsite-Tuning (Xiao, Lin and Han 2023): the bottom and top ``emulator.adapter_layers`` blocks
stay whole and carry the trainable PEFT tensors (and the head); the middle blocks are
compressed by uniform layer drop to ``emulator.emulator_layers`` of them (the first and last
middle blocks always kept), optionally with 8-bit weights, optionally distilled at the edge
(``fomo.emulator``). The timeline:

1. (optional) distillation at the edge: counted FLOPs / edge FLOP/s (``distill`` event);
2. every edge server multicasts the emulator to its devices once, with rateless coding (each
   device decodes at its own per-block rate; ``emulator_download`` events, ``bytes`` = the
   emulator's tensors at their stored precision);
3. FedAvg rounds exactly as :mod:`netsim.protocols.fedavg`, on the emulator: the payload each
   way is the adapter (the PEFT tensors of the adapter blocks + the head), the local steps'
   FLOPs and memory are the emulator's;
4. every evaluation is of the plug-in (full model + aggregated adapter) at the edge; the
   emulator's own accuracy is logged beside it (``evaluate_emulator``, an instrument that
   takes no simulated time).
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from ..federated_deft import OptimizerOverride
from ..spec_base import Int, PositiveFloat
from .fedavg import FedAvgSimulation


class EmulatorSpec(OptimizerOverride):
    """Variant ``emulator`` of experiment ``federated_deft`` (Offsite-Tuning)."""

    adapter_layers: Int = Field(1, ge=1, le=1024, description="blocks kept whole and trained at the bottom and at "
                                "the top (a >= 1 on each side)")
    emulator_layers: Int = Field(2, ge=1, le=1024, description="middle blocks the emulator keeps (uniform layer drop; "
                                 "at most the model's depth - 2 adapter_layers)")
    quantize_bits: Optional[Literal[8]] = Field(None, description="8: the kept middle blocks' weight matrices in 8 "
                                                "bits (symmetric, per tensor); null: float32")
    distill_steps: Int = Field(0, ge=0, le=1_000_000, description="distillation steps at the edge before the download "
                               "(0: none)")
    distill_batch_size: Int = Field(8, ge=1, le=65_536)
    distill_learning_rate: PositiveFloat = Field(1e-4, le=1.0)
    distill_texts: Int = Field(256, ge=1, le=10_000_000, description="unlabelled texts the edge distils on (taken "
                               "from the training split; a stand-in for the edge's own public text)")


class EmulatorFedAvgSimulation(FedAvgSimulation):
    """FedAvg rounds on an Offsite-Tuning emulator, after a one-off download of it.

    The trainer must provide ``emulator_download_bytes()``, ``evaluate_emulator()`` and
    ``distill_edge_flops`` besides the :class:`~netsim.interfaces.Trainer` methods (the real
    one: ``fomo.emulator_trainer.EmulatorTrainer``). Every device receives the emulator,
    whatever its availability (it is sent once, before the first round); the first round starts
    when the last device has decoded it."""

    def _prepare(self):
        """Distillation at the edge (if any), then the emulator's multicast."""
        flops = float(getattr(self.trainer, "distill_edge_flops", 0.0) or 0.0)
        if flops > 0:
            duration = self._edge_time_s(flops)
            self.recorder.emit("distill", t_s=self.env.now, duration_s=duration, node=self._edge_name, round=0,
                               flops=flops)
            yield self.env.timeout(duration)
        yield from self._multicast_once("emulator_broadcast", int(self.trainer.emulator_download_bytes()))

    def _evaluate(self, r: int):
        """The plug-in's accuracy (the full model with the aggregated adapter; what the run
        reports), then the emulator's own, logged as ``evaluate_emulator`` (no simulated time)."""
        accuracy = yield from super()._evaluate(r)
        ev = self.trainer.evaluate_emulator()
        self.recorder.emit("evaluate_emulator", t_s=self.env.now, node=self._edge_name, round=r, flops=ev.flops,
                           loss=ev.loss, accuracy=ev.accuracy)
        return accuracy
