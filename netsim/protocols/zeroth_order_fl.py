"""Federated zeroth-order fine-tuning with shared candidate seeds (FedKSeed over MeZO).
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from ..spec_base import Int, NonNegFloat, PositiveFloat, Spec


class ZerothOrderSpec(Spec):
    """Variant ``zeroth_order`` of experiment ``federated_deft`` (MeZO steps, FedKSeed seeds)."""

    candidate_seeds: Int = Field(1024, ge=1, le=2**24, description="K shared candidate seeds (FedKSeed)")
    eps: PositiveFloat = Field(1e-3, le=1.0, description="SPSA perturbation scale epsilon")
    weight_decay: NonNegFloat = Field(0.0, le=1.0)
    uplink_access: Optional[Literal["ofdma", "aircomp"]] = Field(
        None, description="how the K accumulated scalars go up (null: channel.uplink_access)")
    local_steps: Optional[Int] = Field(None, ge=1, le=1_000_000, description="overrides training.local_steps")
    learning_rate: Optional[PositiveFloat] = Field(None, ge=1e-12, le=100, description="overrides "
                                                   "training.learning_rate (the SGD step of the ZO update)")
