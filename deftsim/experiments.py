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

from netsim.aircomp_fedavg import AirCompFedAvgSimulation, aircomp_summary, make_simulation
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
    sim = make_simulation(scenario, scenario.seed, trainer, on_round=on_round)
    outcome = sim.run()
    events = sim.recorder.to_frame()
    summary = summarize(events, num_classes=trainer.num_classes, stop_reason=outcome.stop_reason,
                        target_accuracy=scenario.stop.target_accuracy,
                        devices=[d.name for d in sim.network.devices])
    if isinstance(sim, AirCompFedAvgSimulation):
        summary["aircomp"] = aircomp_summary(sim.aircomp_log)
    title = f"{scenario.name} (seed {scenario.seed})"
    figures = {"accuracy_vs_time.png": lambda p: plot_accuracy_vs_time(events, p, title=title,
                                                                      chance=summary["chance_accuracy"])}
    return ExperimentResult(events, summary, topology_record(sim.network), figures,
                            {"setup_wall_s": setup_s, "simulation_wall_s": time.perf_counter() - t0 - setup_s})


def aircomp_vs_ofdma(scenario: Scenario, on_round=None) -> ExperimentResult:
    """FedAvg with OFDMA vs. over-the-air (AirComp) aggregation at several device counts K
    (``aircomp.device_counts``, used as ``training.devices_per_round``), same seed everywhere.
    Implemented in :mod:`deftsim.aircomp_experiment`."""
    from .aircomp_experiment import run_aircomp_vs_ofdma

    return run_aircomp_vs_ofdma(scenario, on_round)


def lola_compare(scenario: Scenario, on_round=None) -> ExperimentResult:
    """LoLa cooperative fine-tuning: every block-allocation algorithm of ``scenario.lola`` on
    the same devices, channels and seed (``netsim.lola``; deftsim/lola_experiment.py)."""
    from .lola_experiment import run_lola_compare

    return run_lola_compare(scenario, on_round)


def neural_aircomp(scenario: Scenario, on_round=None) -> ExperimentResult:
    """Split fine-tuning with a neural connection: the edge consumes the over-the-air sum/mean of
    the devices' features (AirComp at several receive SNRs) vs. a digital OFDMA connection
    (deftsim/neural_experiment.py, docs/aircomp.md)."""
    from .neural_experiment import run_neural_aircomp

    return run_neural_aircomp(scenario, on_round)


EXPERIMENTS: dict[str, Experiment] = {
    "fedavg": fedavg,
    "aircomp_vs_ofdma": aircomp_vs_ofdma,
    "lola_compare": lola_compare,
    "neural_aircomp": neural_aircomp,
}


def progress_total(scenario: Scenario) -> Optional[int]:
    """How many times the experiment calls ``on_round`` (for a progress bar); None if unknown."""
    if scenario.experiment == "fedavg":
        return scenario.training.rounds
    if scenario.experiment == "aircomp_vs_ofdma":
        return scenario.training.rounds * 2 * len(set(scenario.aircomp.device_counts))
    return None


@dataclass(frozen=True)
class PlannedWork:
    """What a run will compute for real (``deftsim run --dry-run``): upper bounds, since a run
    may stop early (``stop.target_accuracy``, ``stop.horizon_s``)."""

    device_steps: int   # optimizer steps of the real model (one device's batch each)
    evaluations: int    # test-set evaluations
    detail: str         # how the numbers are made up


def _evaluations_every(steps: int, every: int) -> int:
    """Evaluations of a run of ``steps`` steps evaluated at 0, every ``every`` steps and at the end."""
    return 1 + steps // every + (1 if steps % every else 0)


def planned_work(scenario: Scenario) -> PlannedWork:
    """Count the real work of ``scenario`` without running it (the fake trainer's steps are
    counted too: they are what its timeline simulates)."""
    t, n = scenario.training, scenario.num_devices
    if scenario.experiment == "fedavg":
        k = t.devices_per_round or n
        return PlannedWork(t.rounds * k * t.local_steps, t.rounds + 1,
                           f"{t.rounds} rounds x {k} devices x {t.local_steps} local steps; "
                           f"an evaluation before round 1 and after every round")
    if scenario.experiment == "aircomp_vs_ofdma":
        ks = sorted(set(scenario.aircomp.device_counts))
        steps = 2 * t.rounds * t.local_steps * sum(ks)
        return PlannedWork(steps, 2 * len(ks) * (t.rounds + 1),
                           f"2 uplinks x K in {ks} x {t.rounds} rounds x K devices x {t.local_steps} local steps")
    if scenario.experiment == "lola_compare":
        from netsim.scenario import LolaSpec

        lola = scenario.lola or LolaSpec()
        trained = [a for a in lola.train_algorithms if a in lola.algorithms]
        if lola.train_rounds == 0 or scenario.trainer != "real" or not trained:
            return PlannedWork(0, 0, f"latency only: {len(lola.algorithms)} allocation algorithms x {lola.rounds} "
                                     "simulated rounds, no real training (lola.train_rounds: 0 or trainer: fake)")
        rounds = min(lola.train_rounds, lola.rounds)
        per_round = [n if a == "offloading" else lola.num_blocks for a in trained]
        return PlannedWork(rounds * lola.steps_per_round * sum(per_round), len(trained) * (rounds + 1),
                           f"{rounds} rounds x {lola.steps_per_round} steps x (blocks or, for offloading, "
                           f"at most {n} devices) for {trained}")
    if scenario.experiment == "neural_aircomp":
        from .neural_experiment import variants

        spec, v = scenario.neural_aircomp, len(variants(scenario))
        return PlannedWork(v * spec.steps * n, v * _evaluations_every(spec.steps, spec.eval_every_steps),
                           f"{v} variants x {spec.steps} steps x {n} devices (each runs its segment)")
    raise ValueError(f"experiment={scenario.experiment!r} has no work count")


def get_experiment(name: str) -> Experiment:
    try:
        return EXPERIMENTS[name]
    except KeyError:
        raise ValueError(f"experiment={name!r} is not registered; known: {sorted(EXPERIMENTS)} "
                         "(register it in deftsim/experiments.py)") from None
