"""Experiment ``d2d_prompt_transfer``: targets that get a new task fetch a tuned prompt from a
device within D2D reach (or from the edge), then tune (:mod:`netsim.protocols.d2d_prompt_transfer`).

The source prompts are tuned once (real steps, before the run); then every variant of
``d2d_prompt_transfer.variants`` runs the same targets on its own timeline:

* ``scratch``: prompt tuning from the initial prompt;
* ``edge_library``: after a warm-up, the edge's most similar prompt, over the cellular downlink;
* ``random_neighbour``, ``best_link``, ``similarity``, ``oracle``: a source within reach, chosen
  at random, by the fastest expected fetch, by task similarity minus fetch cost (SPoT over the
  sidelinks), or by its prompt's measured metric on the target's test set (an upper bound).

``summary.json``::

    d2d_bytes, d2d_energy_j          of variant `headline` (similarity when it ran)
    variants: {name: {median_time_to_target_s, median_energy_to_target_j, target_hit_ratio,
                      negative_transfer_rate, regret_start, oracle_match_rate,
                      mean_start_metric, mean_final_metric, final_accuracy, d2d_bytes,
                      d2d_energy_j, cellular_bytes, cellular_energy_j, mean_steps,
                      time_to_target_s: [per target], targets: [per-target rows]}}
    similarity_gain: {spearman, pairs: [{target, source, similarity, gain}]}
    graph: {devices, edges, mean_degree, components}, sources: {task: count},
    source_prompts: {steps, flops, own_accuracy}, adapter_bytes, embedding_bytes,
    target_accuracy, target_metric, variant_order

Times are simulated seconds from the moment the targets get their task; a target that never
reached ``target_accuracy`` counts as infinitely late in the medians (None when the median is).
``negative_transfer_rate``: the fraction of targets that reached the target later than
``scratch`` did for the same target (never counting as infinitely late; when neither reached
it, a lower final metric), None without a scratch variant. ``regret_start``: the mean over
targets of (best candidate's metric - chosen source's metric) on the target's test set before
any tuning; ``similarity_gain``: Spearman's rank correlation, over every (target, candidate)
pair of variant ``similarity``, between the cosine similarity of the task embeddings and the
gain at the start (the candidate prompt's metric minus the initial prompt's).

``events.parquet`` holds every variant's events with a ``variant`` column.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import networkx as nx
import numpy as np
import pandas as pd

from netsim.network import Network
from netsim.protocols.d2d_prompt_transfer import (FETCHES_FROM_DEVICE, D2DTransferSimulation, TargetResult,
                                                  build_source_prompts, no_sidelink_error)
from netsim.scenario import Scenario

from .. import build
from ..config import ScenarioError
from .base import ExperimentResult, register

LABELS = {"scratch": "prompt tuning from scratch", "edge_library": "edge library (cellular)",
          "random_neighbour": "random neighbour", "best_link": "fastest sidelink",
          "similarity": "similarity - cost (SPoT over D2D)", "oracle": "oracle source"}


def make_tuner(scenario: Scenario, seed: int):
    """The real model over the zones' and the targets' tasks (``fomo.service_tuner.TaskTuner``)."""
    from fomo.service_tuner import TaskTuner

    spec = scenario.d2d_prompt_transfer
    with build.trainer_errors(scenario):
        return TaskTuner(scenario, scenario.train_seed(seed), spec.all_tasks(), test_examples=spec.test_examples)


def _median_or_none(values: list[float]) -> Optional[float]:
    if not values:
        return None
    m = float(np.median(np.asarray(values, dtype=float)))
    return None if math.isinf(m) else m


def _mean(values) -> Optional[float]:
    values = list(values)
    return float(np.mean(values)) if values else None


def _metric(m, name: str) -> float:
    return m.balanced_accuracy if name == "balanced_accuracy" else m.accuracy


def negative_transfer(result: TargetResult, scratch: TargetResult, metric: str) -> bool:
    """True when ``result`` did worse than ``scratch`` for the same target: it reached the
    target later (never = infinitely late) or, neither reaching it, ended lower."""
    t = math.inf if result.reached_s is None else result.reached_s
    t0 = math.inf if scratch.reached_s is None else scratch.reached_s
    if math.isinf(t) and math.isinf(t0):
        return _metric(result.final, metric) < _metric(scratch.final, metric)
    return t > t0


def target_row(r: TargetResult, metric: str) -> dict:
    """One target, for ``summary.json`` (times [s], energies [J], sizes [bytes])."""
    return {"device": r.device, "task": r.task, "zone": r.zone, "init": r.init, "source_device": r.source_device,
            "source_task": r.source_task, "source_hops": r.source_hops, "candidates": len(r.candidates),
            "discovery_end_s": r.discovery_end_s, "fetch_start_s": r.fetch_start_s, "fetch_end_s": r.fetch_end_s,
            "reached_s": r.reached_s, "energy_to_target_j": r.energy_to_target_j,
            "start_metric": _metric(r.start, metric), "final_metric": _metric(r.final, metric),
            "final_accuracy": r.final.accuracy, "steps": r.steps, "compute_flops": r.compute_flops,
            "compute_energy_j": r.compute_energy_j, "d2d_bytes": r.d2d_bytes, "d2d_energy_j": r.d2d_energy_j,
            "cellular_bytes": r.cellular_bytes, "cellular_energy_j": r.cellular_energy_j}


def variant_metrics(sim: D2DTransferSimulation, scratch: Optional[dict[int, TargetResult]]) -> dict:
    """A variant's metrics (see the module docstring)."""
    metric = sim.spec.target_metric
    results = [sim.results[k] for k in sim.assignment.targets]
    times = [math.inf if r.reached_s is None else r.reached_s for r in results]
    energies = [math.inf if r.energy_to_target_j is None else r.energy_to_target_j for r in results]
    chosen = [r for r in results if r.source_device is not None and r.candidates]
    best = {r.device: max(_metric(c, metric) for c in r.candidates) for r in chosen}
    picked = {r.device: _metric(next(c for c in r.candidates if c.device == r.source_device), metric) for r in chosen}
    negative = None
    if scratch is not None and sim.variant != "scratch":
        negative = _mean(negative_transfer(r, scratch[r.device], metric) for r in results)
    return {
        "median_time_to_target_s": _median_or_none(times),
        "median_energy_to_target_j": _median_or_none(energies),
        "target_hit_ratio": _mean(r.reached_s is not None for r in results),
        "negative_transfer_rate": negative,
        "regret_start": _mean(best[k] - picked[k] for k in best) if sim.variant in FETCHES_FROM_DEVICE else None,
        "oracle_match_rate": _mean(picked[k] >= best[k] for k in best) if sim.variant in FETCHES_FROM_DEVICE else None,
        "mean_start_metric": _mean(_metric(r.start, metric) for r in results),
        "mean_final_metric": _mean(_metric(r.final, metric) for r in results),
        "final_accuracy": _mean(r.final.accuracy for r in results),
        "d2d_bytes": int(sum(r.d2d_bytes for r in results)),
        "d2d_energy_j": float(sum(r.d2d_energy_j for r in results)),
        "cellular_bytes": int(sum(r.cellular_bytes for r in results)),
        "cellular_energy_j": float(sum(r.cellular_energy_j for r in results)),
        "mean_steps": _mean(r.steps for r in results),
        "no_source_in_reach": int(sum(1 for r in results if sim.variant in FETCHES_FROM_DEVICE and not r.candidates)),
        "time_to_target_s": [None if math.isinf(t) else t for t in times],
        "targets": [target_row(r, metric) for r in results],
    }


def similarity_gain(sim: D2DTransferSimulation) -> dict:
    """Every (target, candidate) pair of the similarity variant: the embeddings' cosine and the
    gain at the start; their Spearman correlation."""
    metric = sim.spec.target_metric
    pairs = []
    for k in sim.assignment.targets:
        r = sim.results[k]
        fresh = _metric(r.curve[0], metric)
        for c in r.candidates:
            if c.similarity is not None:
                pairs.append({"target": k, "target_task": r.task, "source": c.device, "source_task": c.task,
                              "hops": c.hops, "similarity": c.similarity, "gain": _metric(c, metric) - fresh})
    from analysis.d2d import spearman

    rho = spearman([p["similarity"] for p in pairs], [p["gain"] for p in pairs])
    return {"spearman": None if math.isnan(rho) else rho, "pairs": pairs}


def graph_stats(graph: nx.Graph) -> dict:
    n = graph.number_of_nodes()
    return {"devices": n, "edges": graph.number_of_edges(),
            "mean_degree": 2.0 * graph.number_of_edges() / n if n else 0.0,
            "components": nx.number_connected_components(graph) if n else 0}


@register("d2d_prompt_transfer")
def d2d_prompt_transfer(scenario: Scenario, on_round=None) -> ExperimentResult:
    """Tune the source prompts, then run the targets once per variant."""
    t0 = time.perf_counter()
    spec = scenario.d2d_prompt_transfer
    network = Network(scenario, scenario.network_seed(scenario.seed))
    error = no_sidelink_error(scenario, network)
    if error:   # refuse before any real work
        raise ScenarioError(f"scenario {scenario.name!r}: {error}")
    tuner = make_tuner(scenario, scenario.seed)
    seed = scenario.train_seed(scenario.seed)
    with build.trainer_errors(scenario):
        sources = build_source_prompts(tuner, spec, seed, scenario.training.batch_size)
    timing = {"source_prompts_wall_s": time.perf_counter() - t0}
    frames, variants, sims = [], {}, {}
    for i, variant in enumerate(spec.variants):
        started = time.perf_counter()
        try:
            sim = D2DTransferSimulation(scenario, scenario.seed, tuner, variant, sources)
            sim.run()
        except ValueError as err:
            raise ScenarioError(f"scenario {scenario.name!r}, variant {variant}: {err}") from None
        sims[variant] = sim
        frames.append(sim.recorder.to_frame().assign(variant=variant))
        timing[f"{variant}_wall_s"] = time.perf_counter() - started
        if on_round is not None:
            on_round(i + 1, 0.0, sim.env.now)
    scratch = sims["scratch"].results if "scratch" in sims else None
    for variant, sim in sims.items():
        variants[variant] = variant_metrics(sim, scratch)
    events = pd.concat(frames, ignore_index=True)
    events["variant"] = events["variant"].astype("string")
    headline = "similarity" if "similarity" in variants else next(
        (v for v in spec.variants if v in FETCHES_FROM_DEVICE), spec.variants[0])
    any_sim = next(iter(sims.values()))
    assignment = any_sim.assignment   # the same drop, targets and tasks in every variant
    summary = {
        "experiment": "d2d_prompt_transfer", "headline": headline, "variant_order": list(variants),
        "d2d_bytes": variants[headline]["d2d_bytes"], "d2d_energy_j": variants[headline]["d2d_energy_j"],
        "target_accuracy": spec.target_accuracy, "target_metric": spec.target_metric,
        "targets": [{"device": k, "task": assignment.target_task[k], "zone": assignment.zone[k]}
                    for k in assignment.targets],
        "sources": dict(sorted(Counter(assignment.source_task.values()).items())),
        "graph": graph_stats(network.d2d),
        "adapter_bytes": any_sim.adapter_bytes, "embedding_bytes": any_sim.embedding_bytes,
        "source_prompts": {"tasks": list(spec.tasks), "steps": sources.steps, "flops": sources.flops,
                           "own_accuracy": sources.own_accuracy},
        "similarity_gain": similarity_gain(sims["similarity"]) if "similarity" in sims else None,
        "variants": variants,
    }
    title = f"{scenario.name} (seed {scenario.seed})"
    figures = {"time_to_target_cdf.png": lambda p: plot_cdf(summary, p, title),
               "accuracy_vs_time.png": lambda p: plot_curves(sims, p, title, spec.target_metric)}
    if summary["similarity_gain"] is not None:
        figures["gain_vs_similarity.png"] = lambda p: plot_gain(summary, p, title)
    return ExperimentResult(events, summary, build.topology_record(network), figures,
                            {"simulation_wall_s": time.perf_counter() - t0, **timing})


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, ax, path: Path, title: str) -> None:
    """Title, grid, a legend when there are lines, and the PNG at ``path``."""
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    _pyplot().close(fig)


def plot_cdf(summary: dict, path: Path, title: str) -> None:
    """Empirical CDF over the targets of the time-to-target, one step line per variant (a
    target that never reached it keeps the curve below 1)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    from analysis.d2d import ecdf_steps

    for i, (variant, m) in enumerate(summary["variants"].items()):
        times = m["time_to_target_s"]
        if not len(times):
            continue
        x, y = ecdf_steps([math.inf if t is None else t for t in times])
        ax.step(x, y, where="post", color=f"C{i}", label=f"{LABELS.get(variant, variant)}")
    ax.set_xlabel("simulated time to target since the new task [s]")
    ax.set_ylabel("fraction of targets at target")
    ax.set_ylim(0, 1.05)
    _save(fig, ax, path, title)


def plot_gain(summary: dict, path: Path, title: str) -> None:
    """Each (target, candidate) pair: similarity of the task embeddings against the gain at
    the start, with Spearman's rho in the legend."""
    plt = _pyplot()
    sg = summary["similarity_gain"]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    pairs = sg["pairs"]
    tasks = sorted({p["source_task"] == p["target_task"] for p in pairs})
    for same in tasks:
        sel = [p for p in pairs if (p["source_task"] == p["target_task"]) == same]
        ax.scatter([p["similarity"] for p in sel], [p["gain"] for p in sel], s=18,
                   label="same task" if same else "other task")
    rho = sg["spearman"]
    ax.set_xlabel("cosine similarity of the task embeddings")
    ax.set_ylabel(f"gain at the start ({summary['target_metric'].replace('_', ' ')})")
    _save(fig, ax, path, f"{title}; Spearman rho = {'n/a' if rho is None else f'{rho:.2f}'}")


def plot_curves(sims: dict, path: Path, title: str, metric: str) -> None:
    """Mean ``metric`` of the targets against simulated time, one line per variant
    (:func:`analysis.variants.mean_step_curve`)."""
    from analysis.variants import mean_step_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for i, (variant, sim) in enumerate(sims.items()):
        per = [(np.array([m.t_s for m in r.curve], dtype=float), np.array([_metric(m, metric) for m in r.curve]))
               for r in sim.results.values()]
        curve = mean_step_curve(per, 200)
        if len(curve):
            ax.step(curve["x"], curve["y"], where="post", color=f"C{i}", label=LABELS.get(variant, variant))
    ax.set_xlabel("simulated time since the new task [s]")
    ax.set_ylabel(f"mean test {metric.replace('_', ' ')} of the targets")
    _save(fig, ax, path, title)
