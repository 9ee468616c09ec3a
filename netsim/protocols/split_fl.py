"""Split federated fine-tuning with gradient download (SplitFed), on one SimPy timeline.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from ..spec_base import Bool, Int, NonNegFloat, PositiveFloat, Spec


class SplitSpec(Spec):
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
    local_steps: Optional[Int] = Field(None, ge=1, le=1_000_000, description="overrides training.local_steps")
    learning_rate: Optional[PositiveFloat] = Field(None, ge=1e-12, le=100, description="overrides "
                                                   "training.learning_rate")
    optimizer: Optional[Literal["adamw", "sgd"]] = Field(None, description="overrides training.optimizer")

    @model_validator(mode="after")
    def _prompt_only_needs_cut_0(self) -> "SplitSpec":
        if self.prompt_only_gradient and self.cut_layer != 0:
            raise ValueError(f"split.prompt_only_gradient=true needs split.cut_layer=0 (got {self.cut_layer}): only "
                             "then is the prompt an input of the edge part")
        return self
