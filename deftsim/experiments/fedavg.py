"""Experiment ``fedavg`` (the default): federated PEFT fine-tuning with FedAvg, over OFDMA or,
with ``channel.uplink_access: aircomp``, over the air (``netsim.protocols.fedavg``,
``netsim.protocols.aircomp_fedavg``), or asynchronously with ``training.mode``
(``netsim.protocols.async_fl``), or over the D2D graph with ``training.topology``
(``netsim.protocols.hierarchical_fl``, ``netsim.protocols.gossip_fl``: their D2D traffic,
clusters and consensus come into the summary through ``dynamics_summary``)."""
from __future__ import annotations

import math
import time

from netsim.protocols import make_simulation, protocol_name
from netsim.protocols.aircomp_fedavg import AirCompFedAvgSimulation, aircomp_summary
from netsim.scenario import Scenario

from .. import build
from ..config import ScenarioError
from .base import ExperimentResult, register


@register("fedavg")
def fedavg(scenario: Scenario, on_round=None) -> ExperimentResult:
    """Federated fine-tuning with FedAvg of the PEFT parameters (``netsim.protocols.fedavg``)."""
    from analysis.metrics import summarize
    from analysis.plot import plot_accuracy_vs_time

    t0 = time.perf_counter()
    trainer = build.make_trainer(scenario, scenario.seed)
    setup_s = time.perf_counter() - t0
    try:   # settings found impossible when the network is built (a trace, a deadline)
        sim = make_simulation(scenario, scenario.seed, trainer, on_round=on_round)
    except ValueError as err:
        raise ScenarioError(f"scenario {scenario.name!r}: {err}") from None
    outcome = sim.run()
    events = sim.recorder.to_frame()
    summary = summarize(events, num_classes=trainer.num_classes, stop_reason=outcome.stop_reason,
                        target_accuracy=scenario.stop.target_accuracy,
                        devices=[d.name for d in sim.network.devices])
    summary["protocol"] = protocol_name(scenario)
    summary["topology"] = scenario.training.topology
    summary["final_balanced_accuracy"] = final_balanced_accuracy(sim)
    summary.update(sim.dynamics_summary())
    if hasattr(trainer, "cost_report"):   # the real trainer: which model's costs drove the timeline
        summary.update(trainer.cost_report(scenario.training.batch_size))
    if scenario.model.objective == "causal_lm" and sim.last_evaluation is not None:
        summary["final_test_nll"] = float(sim.last_evaluation.loss)      # mean next-token NLL [nats]
        summary["final_perplexity"] = math.exp(sim.last_evaluation.loss)
    if isinstance(sim, AirCompFedAvgSimulation):
        summary["aircomp"] = aircomp_summary(sim.aircomp_log)
    title = f"{scenario.name} (seed {scenario.seed})"
    figures = {"accuracy_vs_time.png": lambda p: plot_accuracy_vs_time(events, p, title=title,
                                                                      chance=summary["chance_accuracy"])}
    return ExperimentResult(events, summary, build.topology_record(sim.network), figures,
                            {"setup_wall_s": setup_s, "simulation_wall_s": time.perf_counter() - t0 - setup_s})


def final_balanced_accuracy(sim) -> float | None:
    """The last evaluation's balanced accuracy (mean per-class recall), None where the trainer
    does not compute it."""
    ev = sim.last_evaluation
    value = getattr(ev, "balanced_accuracy", float("nan")) if ev is not None else float("nan")
    return None if value != value else float(value)
