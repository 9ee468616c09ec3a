"""Hierarchical (cluster) federated fine-tuning over the D2D graph (``training.topology:
hierarchical``): not available yet; the scenario section is defined so that settings are
validated."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..spec_base import Spec

if TYPE_CHECKING:  # netsim.scenario imports HierarchicalSpec: no import of it at run time
    from ..scenario import Scenario


class HierarchicalSpec(Spec):
    """``training.topology: hierarchical``: cluster heads aggregate their members' updates over
    sidelinks before uploading."""

    def check(self, scenario: "Scenario") -> None:
        """What the topology needs of the other sections (ValueError naming the fields)."""
        raise ValueError("training.topology=hierarchical is not available in this version; allowed: 'star'")
