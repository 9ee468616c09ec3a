"""The ``federated_deft`` section: which ways of fine-tuning without the whole model on the
device one run compares, and the scenario each of them runs (torch-free).

Four variants, run on the same devices, channels, data and seed (``deftsim.experiments.federated_deft``):

================  ===================================================================
``lora``          plain federated LoRA (or the ``peft`` section's method): the device holds the
                  whole model (``netsim.protocols.fedavg``)
``emulator``      Offsite-Tuning: the device downloads a compressed emulator once and trains the
                  adapter on it (``netsim.protocols.emulator_fl``, section ``emulator``)
``split``         gradient download, split: the device holds the embeddings (and the blocks below
                  the cut) and a soft prompt; the edge runs the rest (``netsim.protocols.split_fl``,
                  section ``split``)
``zeroth_order``  gradient download, zeroth-order: MeZO steps with FedKSeed seed pools
                  (``netsim.protocols.zeroth_order_fl``, section ``zeroth_order``)
================  ===================================================================

Each variant's section may override ``training.rounds``, ``local_steps``, ``learning_rate`` and
``optimizer``: the methods train different tensors with different estimators, so one step size
(or one number of steps) does not suit all of them; everything else is shared. Compare them on
accuracy against simulated time and energy, not per round.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Optional

from pydantic import Field, field_validator

from .spec_base import Float, Int, PositiveFloat, Spec

if TYPE_CHECKING:  # netsim.scenario imports this module: no import of it at run time
    from .scenario import Scenario

Variant = Literal["lora", "emulator", "split", "zeroth_order"]
VARIANTS: tuple[str, ...] = ("lora", "emulator", "split", "zeroth_order")


class StepOverrides(Spec):
    """The ``training`` fields a variant's section may override (null: the shared value)."""

    rounds: Optional[Int] = Field(None, ge=1, le=1_000_000, description="overrides training.rounds")
    local_steps: Optional[Int] = Field(None, ge=1, le=1_000_000, description="overrides training.local_steps")
    learning_rate: Optional[PositiveFloat] = Field(None, ge=1e-12, le=100, description="overrides "
                                                   "training.learning_rate")


class OptimizerOverride(StepOverrides):
    """:class:`StepOverrides` and ``training.optimizer``."""

    optimizer: Optional[Literal["adamw", "sgd"]] = Field(None, description="overrides training.optimizer")


class FederatedDeftSpec(Spec):
    """Experiment ``federated_deft``: the variants to run and the accuracy whose first crossing
    is reported as ``time_to_target_accuracy_s`` (null: ``stop.target_accuracy``; a variant
    that never reaches it reports null)."""

    variants: list[Variant] = Field(default_factory=lambda: list(VARIANTS), min_length=1,
                                    description="which variants to run, in this order")
    target_accuracy: Optional[Float] = Field(None, gt=0, le=1, description="reported time-to-accuracy threshold "
                                             "(null: stop.target_accuracy); it does not stop the run")

    @field_validator("variants")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"federated_deft.variants={value}: each variant at most once")
        return value


def variant_scenario(scenario: "Scenario", variant: str) -> "Scenario":
    """The scenario ``variant`` runs: ``experiment: fedavg`` and the variant's overrides of
    ``training.rounds`` / ``local_steps`` / ``learning_rate`` / ``optimizer`` (and for
    ``zeroth_order`` its ``uplink_access``); the ``lora`` variant is the scenario itself."""
    if variant not in VARIANTS:
        raise ValueError(f"federated_deft variant {variant!r}: allowed: {list(VARIANTS)}")
    data = scenario.model_dump(mode="python")
    data["experiment"] = "fedavg"
    data["name"] = f"{scenario.name}-{variant}"
    section = getattr(scenario, variant, None) if variant != "lora" else None
    if section is not None:
        for name in OptimizerOverride.model_fields:
            value = getattr(section, name, None)
            if value is not None:
                data["training"][name] = value
        access = getattr(section, "uplink_access", None)
        if access is not None:
            data["channel"]["uplink_access"] = access
    return type(scenario).model_validate(data)
