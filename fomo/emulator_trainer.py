"""The real trainer of federated fine-tuning on an Offsite-Tuning emulator.

:class:`EmulatorTrainer` is a :class:`fomo.trainer.PeftTrainer` whose devices train a
compressed copy of the model (Offsite-Tuning, Xiao, Lin and Han 2023; :mod:`fomo.emulator`):

* the edge holds the **full model** (:attr:`EmulatorTrainer.full_model`: the checkpoint
  wrapped with the ``peft`` section's method);
* it builds the **emulator** from it (``emulator.adapter_layers`` bottom and top blocks whole,
  ``emulator.emulator_layers`` middle blocks kept by uniform layer drop), optionally distils
  the kept middle blocks towards all the original ones on ``emulator.distill_texts`` training
  texts (their labels unused; edge FLOPs counted, :attr:`EmulatorTrainer.distill_edge_flops`),
  then optionally quantises them to 8 bits (``emulator.quantize_bits``), in that order
  (Offsite-Tuning distils, then quantises);
* devices plan, run and upload exactly as with :class:`~fomo.trainer.PeftTrainer`, on the
  emulator: batches, FLOPs, saved activations, optimizer, FedProx, the batched strategy and the
  host tricks (activation cache, pruned last block) are the parent's, applied to the emulator.
  The PEFT state (the trainable tensors: PEFT tensors of the adapter blocks + head) is keyed
  by the emulator's names; :meth:`~fomo.emulator.Emulator.full_name` maps them to the full
  model's (emulator block j = original block ``kept_layers[j]``);
* :meth:`EmulatorTrainer.evaluate` is the **plug-in**: the global PEFT state copied into the
  full model by name, and the full model evaluated on the test set;
  :meth:`EmulatorTrainer.evaluate_emulator` evaluates the emulator itself.

Device memory model. A device stores what it downloaded: weights = the emulator's tensors at
their stored precision (:attr:`~fomo.emulator.Emulator.download_bytes`: with
``quantize_bits: 8`` the middle blocks' weight matrices at 1 byte per weight + a float32 scale
per tensor, everything else float32). This assumes a weight-only int8 kernel that dequantises
tiles on the fly (as torch's ``_weight_int8pack_mm`` does); the host computes with the
dequantised float32 values, which are the same numbers. Job memory = those weights + the
trainable tensors x (1 gradient + optimizer states) + one step's saved activations
(:func:`fomo.profiling.job_memory_bytes`), activations measured on the emulator.

PEFT placement. Only tensors of the adapter blocks (and the head) are trained: PEFT tensors
that ``peft.layers`` puts on middle blocks are frozen in the emulator and keep their initial
values in the full model (LoRA's B = 0: no effect), but are downloaded. Set ``peft.layers`` to
the adapter blocks to ship none.

Host memory: the emulator shares the full model's frozen tensors (``share_frozen``), so the
host holds one copy of them; the kept middle blocks get their own copies only when
distillation or quantisation writes them.

Determinism: the emulator is a copy (no random draw), so the PEFT initialisation is the
one :class:`~fomo.trainer.PeftTrainer` draws for the same seed; distillation runs under
``torch.random.fork_rng`` and takes its texts in order, so it leaves torch's global RNG as it
was. With every middle block kept and no distillation or quantisation, the emulator is the
full model block for block, computing with the same frozen tensors, and training and
evaluation equal :class:`PeftTrainer`'s bit for bit.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from fomo import emulator as femulator
from fomo import models, profiling
from fomo.trainer import PeftTrainer
from netsim.interfaces import EvalResult

if TYPE_CHECKING:  # pragma: no cover
    from netsim.scenario import Scenario

FIELD_PREFIX = "emulator."
"""Prefix of the scenario fields named in error messages."""


def _num_parameters(model: torch.nn.Module) -> int:
    """Parameter elements of ``model``, tied tensors once."""
    return int(sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()))


class EmulatorTrainer(PeftTrainer):
    """Federated PEFT on an Offsite-Tuning emulator, evaluated by plug-in into the full model.

    Parameters
    ----------
    scenario : netsim.scenario.Scenario
        As :class:`~fomo.trainer.PeftTrainer`, plus the ``emulator`` section
        (:class:`netsim.protocols.emulator_fl.EmulatorSpec`): ``adapter_layers``,
        ``emulator_layers``, ``quantize_bits``, ``distill_steps``, ``distill_batch_size``,
        ``distill_learning_rate``, ``distill_texts``. The section's ``local_steps``,
        ``learning_rate`` and ``optimizer`` overrides are expected in ``scenario.training``
        already (the experiment applies them).
    seed : int
        Run seed (as :class:`~fomo.trainer.PeftTrainer`).

    Attributes
    ----------
    full_model : the edge's full PEFT model (the plug-in target)
    emulator : fomo.emulator.Emulator, whose ``model`` is :attr:`model` (what devices train)
    distill_edge_flops : float
        Counted FLOPs of the distillation at the edge [FLOP] (0.0 without distillation).
    distill_losses : tuple[float, ...]
        Normalised MSE of each distillation step, before its update (empty without).

    Raises
    ------
    ValueError
        Naming the ``emulator.*`` field, its value and what is allowed (e.g. more emulator
        layers than the model has middle blocks).
    """

    def __init__(self, scenario: "Scenario", seed: int) -> None:
        self.distill_edge_flops: float = 0.0
        self.distill_losses: tuple[float, ...] = ()
        self._full_eval_flops: dict[tuple[int, int], float] = {}
        super().__init__(scenario, seed)

    # ---------------------------------------------------------------- construction hooks
    def _training_model(self, scenario: "Scenario", base: torch.nn.Module) -> torch.nn.Module:
        """The full PEFT model (kept as :attr:`full_model`) and its emulator, unquantised
        (quantisation follows the optional distillation, see :meth:`_configure_execution`);
        returns the emulator's model."""
        spec = scenario.emulator
        self.full_model = models.apply_peft(base, scenario.peft)   # train mode, as PeftTrainer's model
        self.emulator = femulator.build_emulator(
            self.full_model, int(spec.adapter_layers), int(spec.emulator_layers), None, prefix=FIELD_PREFIX,
            share_frozen=True,
        )
        self.full_model.eval()   # the edge only evaluates it
        return self.emulator.model

    def _configure_execution(self, scenario: "Scenario") -> None:
        """Distil and quantise the emulator (``emulator`` section), then choose the execution
        strategy as the parent does. Running here, after the texts are tokenized and before
        any cache or profile exists, means the activation cache, the pruned-block probe and
        every step profile see the final emulator. Only frozen middle weights change (the
        middle blocks first get their own copies, see :func:`fomo.emulator.own_middle`; the
        full model is never written), so the global PEFT state and the adapter bytes are
        unaffected; the weights' storage addresses (excluded from saved activations) are
        looked up again and the device weights are set to the download."""
        spec = scenario.emulator
        if spec.distill_steps > 0:
            self._distill(int(spec.distill_steps), int(spec.distill_batch_size),
                          float(spec.distill_learning_rate), int(spec.distill_texts))
        if spec.quantize_bits is not None:
            femulator.quantize_emulator(self.emulator, int(spec.quantize_bits))
        self._weights_bytes = self.emulator.download_bytes
        self._weight_ptrs = profiling.storage_ptrs(self.model)   # the middle may own new copies
        super()._configure_execution(scenario)

    def _distill(self, steps: int, batch_size: int, learning_rate: float, num_texts: int) -> None:
        """Offsite-Tuning distillation (:func:`fomo.emulator.distill`) on the first
        ``num_texts`` training texts (all of them if fewer), cut to their longest length."""
        examples = self._train_examples[:num_texts]
        input_ids, mask, _ = self._tokens.batch(examples)
        teacher = femulator.teacher_blocks(self.full_model, self.emulator)
        with torch.random.fork_rng(devices=[]):
            result = femulator.distill(self.emulator, teacher, input_ids, mask, steps,
                                       batch_size, learning_rate)
        self.distill_edge_flops = result.edge_flops
        self.distill_losses = result.losses

    # ---------------------------------------------------------------- sizes
    def emulator_download_bytes(self) -> int:
        """What the edge sends each device once: the emulator's tensors at their stored
        precision (after quantisation) [bytes]."""
        return self.emulator.download_bytes

    def full_parameters(self) -> int:
        """Parameter elements of the full PEFT model (tied tensors once)."""
        return _num_parameters(self.full_model)

    def emulator_parameters(self) -> int:
        """Parameter elements of the emulator (tied tensors once)."""
        return self.emulator.num_parameters

    def plug_in_state(self) -> dict[str, torch.Tensor]:
        """The current global PEFT state under the full model's names (copies)."""
        return {self.emulator.full_name(n): t.clone() for n, t in self._global.items()}

    # ---------------------------------------------------------------- evaluation
    def evaluate(self) -> EvalResult:
        """Accuracy and mean cross-entropy of the plug-in, the full model with the global PEFT
        state copied in by name, on the first ``data.max_test_examples`` test examples
        (batches of 64 as :meth:`PeftTrainer.evaluate`; the full model's forward FLOPs counted
        once per shape). The full model runs whole: no activation cache or pruned block."""
        femulator.load_adapter_state(
            self.full_model, {self.emulator.full_name(n): t for n, t in self._global.items()}
        )
        return self._evaluate_with(self.full_model, self._full_forward)

    def evaluate_emulator(self) -> EvalResult:
        """The emulator's own accuracy and loss with the global PEFT state
        (:meth:`PeftTrainer.evaluate` on the emulator, its FLOPs the emulator's)."""
        return super().evaluate()

    def _full_forward(self, input_ids: torch.Tensor, mask: torch.Tensor,
                      examples: np.ndarray) -> tuple[torch.Tensor, float]:
        """Logits of the full model and its counted forward FLOPs on a batch of this shape
        (counted once per shape)."""
        shape = (int(input_ids.shape[0]), int(input_ids.shape[1]))
        if shape not in self._full_eval_flops:
            self._full_eval_flops[shape] = profiling.counted_forward(self.full_model, input_ids, mask)[1]
        return profiling.classification_logits(self.full_model, input_ids, mask), self._full_eval_flops[shape]

    # ---------------------------------------------------------------- comparison figures
    def full_step_flops(self, examples: np.ndarray) -> float:
        """Counted FLOPs of one training step (forward + backward) of the *full* model on a
        batch of ``examples`` (what a device would count without the emulator) [FLOP]; the
        model is unchanged."""
        input_ids, mask, labels = self._tokens.batch(np.asarray(examples, dtype=np.int64))
        return profiling.count_step_flops(self.full_model, input_ids, mask, labels).flops
