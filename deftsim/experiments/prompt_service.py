"""Experiment ``prompt_service``: fine-tuning requests served at the edge, with the library of
tuned prompts used four ways (:mod:`netsim.protocols.prompt_service`).

The seed library is tuned once (real steps, before the service opens); then every variant of
``prompt_service.variants`` serves the same arrivals on its own timeline:

* ``scratch``: prompt tuning from the initial state;
* ``best_single``: from the library entry that scores best on the first labelled examples;
* ``oracle``: from the library entry that is best on the request's test set;
* ``ensemble``: the library's mixture answers at once, its weights are learned from the
  labelled examples as they arrive, then (optionally) tuning from the mixed prompt.

``summary.json``::

    requests: {arrived, admitted, blocked, rejected, completed, met_deadline}   (variant serve_with)
    mean_wait_s, p95_wait_s, mean_sojourn_s, utilisation, acceptance_ratio, deadline_hit_ratio,
    goodput_per_s, served_with
    variants: {name: {final_accuracy, final_balanced_accuracy, initial_accuracy,
                      time_to_target_accuracy_s, service_time_to_target_s, examples_to_target,
                      target_hit_ratio, mean_service_s, edge_flops_per_request,
                      upload_bytes_per_request, tuning_steps_per_request, library_size_end,
                      requests, mean_wait_s, mean_sojourn_s, utilisation, ..., served: [...]}}
    library: {tasks, steps, flops, entry_accuracy}, slot_flops_per_s, upload_bandwidth_hz,
    target_accuracy (per user class), variant_order

``time_to_target_accuracy_s``: median over the served requests of (first time the measured
accuracy reached the request's target - arrival) [s], a request that never reached it counting
as infinite (None when the median is); ``service_time_to_target_s`` the same from service start
(the technique without the queue); ``examples_to_target`` the median labelled examples used.

``events.parquet`` holds every variant's events with a ``variant`` column.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from netsim.network import Network
from netsim.protocols.prompt_service import PromptServiceSimulation, ServedRequest, build_seed_library
from netsim.scenario import Scenario

from .. import build
from ..config import ScenarioError
from .base import ExperimentResult, register

LABELS = {"scratch": "prompt tuning from scratch", "best_single": "best single library prompt",
          "oracle": "oracle source prompt", "ensemble": "prompt ensemble (on the fly)"}
QUEUE_FIELDS = ("mean_wait_s", "p95_wait_s", "mean_sojourn_s", "utilisation", "acceptance_ratio", "blocking_ratio",
                "deadline_hit_ratio", "throughput_per_s", "goodput_per_s", "mean_in_system", "horizon_s")
COUNT_FIELDS = ("arrived", "admitted", "blocked", "rejected", "completed", "met_deadline")


def make_tuner(scenario: Scenario, seed: int):
    """The real model of the service (``fomo.service_tuner.TaskTuner``) over the library's and
    the requests' tasks; errors in the model or the tasks become :class:`ScenarioError`."""
    from fomo.service_tuner import TaskTuner

    spec = scenario.prompt_service
    with build.trainer_errors(scenario):
        return TaskTuner(scenario, scenario.train_seed(seed), spec.all_tasks(), test_examples=spec.test_examples,
                         bytes_per_token=spec.bytes_per_token)


def _median_or_none(values: list[float]) -> Optional[float]:
    if not values:
        return None
    m = float(np.median(np.asarray(values, dtype=float)))
    return None if math.isinf(m) else m


def served_row(record) -> dict:
    """One served request, for ``summary.json`` (times [s])."""
    r: ServedRequest = record.result
    req = record.request
    return {"request_id": req.request_id, "user_class": req.user_class, "task": req.task,
            "owner_device": int(req.owner_device), "arrival_s": req.arrival_s, "start_s": record.start_s,
            "end_s": record.end_s, "target_accuracy": req.target_accuracy, "init": r.init,
            "initial_accuracy": r.curve[0].accuracy, "final_accuracy": r.final.accuracy,
            "final_balanced_accuracy": r.final.balanced_accuracy, "reached_target_s": r.reached_s,
            "examples_to_target": r.examples_to_target, "tuning_steps": r.steps, "edge_flops": r.edge_flops,
            "upload_bytes": r.upload_bytes, "library_size": r.library_size, "ensemble_weights": r.weights}


def variant_metrics(sim: PromptServiceSimulation) -> dict:
    """A variant's service and accuracy metrics (see the module docstring)."""
    queue = sim.summary()
    done = [rec for rec in sim.edge.records if rec.completed]
    results = [rec.result for rec in done]
    to_target = [math.inf if r.reached_s is None else r.reached_s - rec.request.arrival_s
                 for rec, r in zip(done, results)]
    in_service = [math.inf if r.reached_s is None else r.reached_s - r.start_s for r in results]
    examples = [math.inf if r.examples_to_target is None else r.examples_to_target for r in results]

    def mean(values):
        return float(np.mean(values)) if values else None

    return {
        "final_accuracy": mean([r.final.accuracy for r in results]),
        "final_balanced_accuracy": mean([r.final.balanced_accuracy for r in results]),
        "initial_accuracy": mean([r.curve[0].accuracy for r in results]),
        "time_to_target_accuracy_s": _median_or_none(to_target),
        "service_time_to_target_s": _median_or_none(in_service),
        "examples_to_target": _median_or_none(examples),
        "target_hit_ratio": mean([r.reached_s is not None for r in results]),
        "mean_service_s": mean([rec.service_s for rec in done]),
        "edge_flops_per_request": mean([r.edge_flops for r in results]),
        "upload_bytes_per_request": mean([r.upload_bytes for r in results]),
        "tuning_steps_per_request": mean([r.steps for r in results]),
        "library_size_end": len(sim.library),
        "requests": {k: queue[k] for k in COUNT_FIELDS},
        "rejected_by_reason": queue["rejected_by_reason"],
        **{k: queue[k] for k in QUEUE_FIELDS},
        "served": [served_row(rec) for rec in done],
    }


@register("prompt_service")
def prompt_service(scenario: Scenario, on_round=None) -> ExperimentResult:
    """Build the seed library, then serve the arrivals once per variant."""
    t0 = time.perf_counter()
    spec = scenario.prompt_service
    tuner = make_tuner(scenario, scenario.seed)
    seed = scenario.train_seed(scenario.seed)
    with build.trainer_errors(scenario):
        library = build_seed_library(tuner, spec, seed, scenario.training.batch_size)
    timing = {"library_wall_s": time.perf_counter() - t0}
    frames, variants, sims = [], {}, {}
    for i, variant in enumerate(spec.variants):
        started = time.perf_counter()
        try:
            sim = PromptServiceSimulation(scenario, scenario.seed, tuner, variant, library)
        except ValueError as err:
            raise ScenarioError(f"scenario {scenario.name!r}, variant {variant}: {err}") from None
        sim.run()
        variants[variant] = variant_metrics(sim)
        sims[variant] = sim
        frames.append(sim.recorder.to_frame().assign(variant=variant))
        timing[f"{variant}_wall_s"] = time.perf_counter() - started
        if on_round is not None:
            on_round(i + 1, variants[variant]["final_accuracy"] or 0.0, sim.env.now)
    events = pd.concat(frames, ignore_index=True)
    events["variant"] = events["variant"].astype("string")
    top = variants[spec.serve_with]
    summary = {
        "experiment": "prompt_service", "served_with": spec.serve_with, "variant_order": list(variants),
        "requests": dict(top["requests"]), **{k: top[k] for k in QUEUE_FIELDS},
        "target_accuracy": {c.name: c.target_accuracy for c in spec.user_classes},
        "slot_flops_per_s": sims[spec.serve_with].slot_flops_per_s,
        "upload_bandwidth_hz": sims[spec.serve_with].upload_bandwidth_hz,
        "job_memory_bytes": sims[spec.serve_with].memory_bytes,
        "library": {"tasks": list(spec.library.tasks), "steps": library.steps, "flops": library.flops,
                    "entry_accuracy": library.accuracies},
        "variants": variants,
    }
    title = f"{scenario.name} (seed {scenario.seed})"
    metric = spec.target_metric
    figures = {"accuracy_vs_time.png": lambda p: plot_curves(sims, p, title, "time", metric),
               "accuracy_vs_examples.png": lambda p: plot_curves(sims, p, title, "examples", metric)}
    topology = build.topology_record(Network(scenario, scenario.network_seed()))
    return ExperimentResult(events, summary, topology, figures, {"simulation_wall_s": time.perf_counter() - t0,
                                                                  **timing})


def plot_curves(sims: dict, path: Path, title: str, axis: str, metric: str = "accuracy") -> None:
    """Mean ``metric`` (``accuracy`` or ``balanced_accuracy``, the requests' target metric) of
    the served requests against time since service start, or labelled examples used, one line
    per variant (:func:`analysis.variants.mean_step_curve`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analysis.variants import mean_step_curve

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for i, (variant, sim) in enumerate(sims.items()):
        results = [rec.result for rec in sim.edge.records if rec.completed]
        per = [(np.array([m.t_s - r.start_s if axis == "time" else m.examples_seen for m in r.curve], dtype=float),
                np.array([getattr(m, metric) for m in r.curve])) for r in results]
        curve = mean_step_curve(per, 200)
        if len(curve):
            ax.step(curve["x"], curve["y"], where="post", color=f"C{i}",
                    label=f"{LABELS.get(variant, variant)} ({len(results)} requests)")
    ax.set_xlabel("simulated time since service start [s]" if axis == "time" else "labelled examples used")
    ax.set_ylabel(f"mean test {metric.replace('_', ' ')} of the served requests")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:   # no line when no request was served
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
