"""Experiment ``lola_compare``: per-round latency of every LoLa block-allocation algorithm.

The depth cost profile is measured on the real model (``fomo.depth_profile``) when
``lola.profile`` is ``measured``, or ``auto`` with ``trainer: real``; otherwise the analytic
formula of ``netsim.lola.profile`` is used (no torch). Then ``netsim.protocols.lola.compare``
runs each algorithm's rounds on its own SimPy timeline over the same devices and channels.

Writes (besides the runner's files): ``summary.json`` with ``mean_round_latency_s:
{algorithm: seconds}``, the allocations and the profile; ``events.parquet`` with an extra
``algorithm`` column; ``lola_latency.png`` (bar chart); ``depth_profile.png``/``.csv`` (``analysis.depth``).
With ``lola.train_rounds > 0`` and ``trainer: real``, also real block fine-tuning of
``lola.train_algorithms`` (``fomo.block_training``): ``accuracy_vs_time: {algorithm: [[t_s,
accuracy], ...]}`` and ``final_accuracy`` in the summary, ``lola_accuracy_vs_time.png``.
"""
from __future__ import annotations

import time
from pathlib import Path

from netsim.protocols.lola import LolaSpec, compare, default_profile
from netsim.scenario import Scenario

from ..config import ScenarioError
from .base import ExperimentResult, register


def _profile(scenario: Scenario):
    lola = scenario.lola
    use_measured = lola.profile == "measured" or (lola.profile == "auto" and scenario.trainer == "real")
    if not use_measured:
        return default_profile(scenario)
    from fomo.depth_profile import scenario_depth_profile

    try:
        return scenario_depth_profile(scenario)
    except (ValueError, OSError) as err:
        raise ScenarioError(f"cannot measure the depth profile for scenario {scenario.name!r}: {err}") from None


def plot_latency(summary: dict, path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat = summary["mean_round_latency_s"]
    names = list(lat)
    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=120)
    bars = ax.bar(names, [lat[n] * 1e3 for n in names],
                  color=["tab:red" if n in ("crunch", "jbba") else "tab:grey" for n in names])
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_ylabel("mean per-round latency [ms]")
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)
    return path


@register("lola_compare")
def run_lola_compare(scenario: Scenario, on_round=None):
    from netsim.lola.allocation import InfeasibleError

    from ..build import topology_record

    if scenario.lola is None:
        scenario = scenario.model_copy(update={"lola": LolaSpec()})
    t0 = time.perf_counter()
    profile = _profile(scenario)
    t1 = time.perf_counter()
    if profile.num_blocks != scenario.lola.num_blocks:
        raise ScenarioError(f"lola.num_blocks={scenario.lola.num_blocks} but the model has only "
                            f"{profile.num_blocks} layers")
    try:
        summary, events, network = compare(scenario, profile)
    except InfeasibleError as err:
        raise ScenarioError(f"scenario {scenario.name!r}: {err} (raise devices.*.memory_bytes or lower "
                            "lola.num_blocks)") from None
    title = f"{scenario.name} (seed {scenario.seed}, N={profile.num_blocks}, K={len(network.devices)})"
    figures = {"lola_latency.png": lambda p: plot_latency(summary, p, title)}
    from analysis.depth import plot_profile, profile_table  # depth profile table and plot

    figures["depth_profile.png"] = lambda p: plot_profile(profile, p)
    figures["depth_profile.csv"] = lambda p: profile_table(profile).to_csv(p, index=False)
    timings = {"profile_wall_s": t1 - t0, "simulation_wall_s": time.perf_counter() - t1}
    if scenario.lola.train_rounds > 0 and scenario.trainer != "real":
        summary["accuracy_vs_time_skipped"] = "lola.train_rounds > 0 needs trainer: real (trainer is fake)"
    elif scenario.lola.train_rounds > 0:  # real block fine-tuning: accuracy vs. simulated time
        from fomo.block_training import accuracy_vs_time, plot_accuracy_vs_time

        from ..build import trainer_errors

        t2 = time.perf_counter()
        train_rounds = min(scenario.lola.train_rounds, scenario.lola.rounds)  # simulated rounds give the times
        with trainer_errors(scenario):
            curves, final = accuracy_vs_time(scenario, summary, events, network, scenario.lola.train_algorithms,
                                             train_rounds)
        summary["train_rounds"] = train_rounds
        summary["accuracy_vs_time"] = curves
        summary["final_accuracy"] = final
        figures["lola_accuracy_vs_time.png"] = lambda p: plot_accuracy_vs_time(curves, p, title)
        timings["training_wall_s"] = time.perf_counter() - t2
    return ExperimentResult(events, summary, topology_record(network), figures, timings)
