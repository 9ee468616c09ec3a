"""Decentralised (gossip) federated fine-tuning over the D2D graph (``training.topology:
gossip``): not available yet; the scenario section is defined so that settings are validated."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..spec_base import Spec

if TYPE_CHECKING:  # netsim.scenario imports GossipSpec: no import of it at run time
    from ..scenario import Scenario


class GossipSpec(Spec):
    """``training.topology: gossip``: devices average their adapters with their D2D neighbours,
    no server aggregates."""

    def check(self, scenario: "Scenario") -> None:
        """What the topology needs of the other sections (ValueError naming the fields)."""
        raise ValueError("training.topology=gossip is not available in this version; allowed: 'star'")
