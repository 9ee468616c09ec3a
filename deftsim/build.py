"""What an experiment builds from a scenario besides its simulation: the trainer (real or
fake) and the topology record written to ``topology.json``.

Shared by the runner and every experiment (``deftsim.experiments``); it imports neither, so
there is no import circle. The real trainer (torch) is imported only when a scenario asks
for it.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from netsim.fake_trainer import FakeTrainer
from netsim.network import Network
from netsim.scenario import Scenario

from .config import ScenarioError


@contextlib.contextmanager
def trainer_errors(scenario: Scenario) -> Iterator[None]:
    """Errors in the scenario's model or data found while building a real trainer (ValueError
    or OSError from fomo) become :class:`ScenarioError` (exit code 2, no traceback)."""
    try:
        yield
    except (ValueError, OSError) as err:
        raise ScenarioError(f"cannot build the trainer for scenario {scenario.name!r}: {err}") from None


def make_trainer(scenario: Scenario, seed: int, variant: str = "lora"):
    """The trainer a scenario asks for (``variant``: a ``federated_deft`` variant's real
    trainer); the real one is imported only when needed. Errors in the scenario found while
    building it become :class:`ScenarioError`."""
    seed = scenario.train_seed(seed)  # training_seed, else the run seed
    if scenario.trainer == "fake":
        if variant != "lora":
            raise ScenarioError(f"scenario {scenario.name!r}: the {variant} variant needs trainer: real (the fake "
                                "trainer has no emulator, split model or seed pools)")
        return FakeTrainer(scenario, seed)
    from fomo import build_trainer

    with trainer_errors(scenario):
        return build_trainer(scenario, seed, variant)


def topology_record(network: Network) -> dict:
    ch = network.scenario.channel
    return {
        "servers": [{"name": s.name, "position_m": list(s.position_m)} for s in network.servers],
        "devices": [{"name": d.name, "group": d.group.name, "position_m": list(d.position_m),
                     "server": network.servers[d.server].name,
                     "uplink_mean_snr_db_full_band": d.uplink.mean_snr_db(ch.uplink_bandwidth_hz),
                     "downlink_mean_snr_db": d.downlink.mean_snr_db(ch.downlink_bandwidth_hz)}
                    for d in network.devices],
        "d2d": {"kind": network.scenario.d2d.kind, "num_edges": network.d2d.number_of_edges(),
                "edges": [{"a": f"dev{i}", "b": f"dev{j}", "distance_m": a["distance_m"],
                           "mean_snr_db": a["mean_snr_db"]} for i, j, a in network.d2d.edges(data=True)]},
    }
