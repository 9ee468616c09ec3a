"""Experiments: what ``deftsim run`` does with a scenario, chosen by ``scenario.experiment``.

An experiment is a function ``(scenario, on_round) -> ExperimentResult``; the runner writes
its events, summary, topology and figures atomically. To add one: write the function, add its
name to ``Scenario.experiment``'s allowed values, and register it in ``EXPERIMENTS`` below.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pandas as pd

from netsim.fedavg import FedAvgSimulation
from netsim.scenario import Scenario


@dataclass
class ExperimentResult:
    events: pd.DataFrame
    summary: dict
    topology: Optional[dict] = None
    figures: dict[str, Callable[[Path], object]] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)


Experiment = Callable[[Scenario, Optional[Callable]], ExperimentResult]


def fedavg(scenario: Scenario, on_round=None) -> ExperimentResult:
    """Federated fine-tuning with FedAvg of the PEFT parameters (``netsim.fedavg``)."""
    from analysis.metrics import summarize
    from analysis.plot import plot_accuracy_vs_time

    from .runner import make_trainer, topology_record

    t0 = time.perf_counter()
    trainer = make_trainer(scenario, scenario.seed)
    setup_s = time.perf_counter() - t0
    sim = FedAvgSimulation(scenario, scenario.seed, trainer, on_round=on_round)
    outcome = sim.run()
    events = sim.recorder.to_frame()
    summary = summarize(events, num_classes=trainer.num_classes, stop_reason=outcome.stop_reason,
                        target_accuracy=scenario.stop.target_accuracy)
    title = f"{scenario.name} (seed {scenario.seed})"
    figures = {"accuracy_vs_time.png": lambda p: plot_accuracy_vs_time(events, p, title=title,
                                                                      chance=summary["chance_accuracy"])}
    return ExperimentResult(events, summary, topology_record(sim.network), figures,
                            {"setup_wall_s": setup_s, "simulation_wall_s": time.perf_counter() - t0 - setup_s})


EXPERIMENTS: dict[str, Experiment] = {
    "fedavg": fedavg,
}


def get_experiment(name: str) -> Experiment:
    try:
        return EXPERIMENTS[name]
    except KeyError:
        raise ValueError(f"experiment={name!r} is not registered; known: {sorted(EXPERIMENTS)} "
                         "(register it in deftsim/experiments.py)") from None
