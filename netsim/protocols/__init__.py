"""The protocols: SimPy processes that move the work of federated fine-tuning over the
network, one module each, registered by name in :data:`PROTOCOLS`.

- ``fedavg``: synchronous federated PEFT with FedAvg over OFDMA (digital) uplinks;
- ``aircomp_fedavg``: the same with the uplink aggregated over the air (broadband analog
  aggregation; ``channel.uplink_access: aircomp``);
- ``async_fl``: asynchronous (FedAsync / FedBuff) and semi-synchronous rounds
  (``training.mode``);
- ``neural_aircomp``: split fine-tuning whose edge layer consumes the over-the-air sum of the
  devices' features;
- ``lola``: LoLa cooperative fine-tuning, one simulated run per block-allocation algorithm;
- ``emulator_fl``: FedAvg of the adapter on an Offsite-Tuning emulator, after its one-off
  download;
- ``split_fl``: SplitFed: every local step a round trip through a shared, batching edge;
- ``zeroth_order_fl``: FedKSeed: MeZO steps whose rounds exchange K scalars per device;
- ``hierarchical_fl``: FedAvg through D2D clusters: heads sum their members' updates received
  over sidelinks and upload one partial sum each (``training.topology: hierarchical``);
- ``gossip_fl``: decentralised FL: local steps, then Metropolis averaging with the D2D
  neighbours over sidelinks, no server aggregation (``training.topology: gossip``).

The federated ones (all but ``neural_aircomp`` and ``lola``) share :class:`~netsim.protocols.fedavg.FedAvgSimulation`'s
constructor and run their local training through :mod:`netsim.engine`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from .aircomp_fedavg import AirCompFedAvgSimulation
from .async_fl import AsyncFLSimulation
from .emulator_fl import EmulatorFedAvgSimulation
from .fedavg import FedAvgSimulation, RoundCallback
from .gossip_fl import GossipFLSimulation
from .hierarchical_fl import HierarchicalFLSimulation
from .split_fl import SplitFedSimulation
from .zeroth_order_fl import ZerothOrderAirCompSimulation, ZerothOrderSimulation

if TYPE_CHECKING:
    from ..interfaces import Trainer
    from ..scenario import Scenario

PROTOCOLS: dict[str, type[FedAvgSimulation]] = {
    "fedavg": FedAvgSimulation,
    "aircomp_fedavg": AirCompFedAvgSimulation,
    "async_fl": AsyncFLSimulation,
    "emulator_fl": EmulatorFedAvgSimulation,
    "split_fl": SplitFedSimulation,
    "zeroth_order_fl": ZerothOrderSimulation,
    "hierarchical_fl": HierarchicalFLSimulation,
    "gossip_fl": GossipFLSimulation,
}
"""The federated protocols by name."""


def protocol_name(scenario: "Scenario") -> str:
    """The federated protocol a scenario runs: ``training.topology`` hierarchical is
    ``hierarchical_fl``, gossip ``gossip_fl``; else ``training.mode`` other than synchronous is
    ``async_fl``; otherwise ``channel.uplink_access`` says ``fedavg`` or ``aircomp_fedavg``."""
    topology = scenario.training.topology
    if topology != "star":
        return {"hierarchical": "hierarchical_fl", "gossip": "gossip_fl"}[topology]
    if scenario.training.mode != "synchronous":
        return "async_fl"
    return "aircomp_fedavg" if scenario.channel.uplink_access == "aircomp" else "fedavg"


def make_simulation(scenario: "Scenario", seed: int, trainer: "Trainer",
                    on_round: Optional[RoundCallback] = None) -> FedAvgSimulation:
    """The federated simulation of the scenario (:func:`protocol_name`)."""
    return PROTOCOLS[protocol_name(scenario)](scenario, seed, trainer, on_round)


def deft_simulation(variant: str, scenario: "Scenario", seed: int, trainer: "Trainer",
                    on_round: Optional[RoundCallback] = None) -> FedAvgSimulation:
    """The simulation of one ``federated_deft`` variant on its scenario
    (:func:`netsim.federated_deft.variant_scenario`): ``lora`` the scenario's own federated
    protocol, ``emulator`` / ``split`` / ``zeroth_order`` their protocols (zeroth-order over the
    air when the variant's ``channel.uplink_access`` is ``aircomp``)."""
    if variant == "lora":
        return make_simulation(scenario, seed, trainer, on_round)
    if variant == "zeroth_order" and scenario.channel.uplink_access == "aircomp":
        return ZerothOrderAirCompSimulation(scenario, seed, trainer, on_round)
    cls = {"emulator": EmulatorFedAvgSimulation, "split": SplitFedSimulation,
           "zeroth_order": ZerothOrderSimulation}.get(variant)
    if cls is None:
        raise ValueError(f"federated_deft variant {variant!r}: allowed: lora, emulator, split, zeroth_order")
    return cls(scenario, seed, trainer, on_round)
