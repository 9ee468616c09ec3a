"""Experiment ``aircomp_vs_ofdma``: FedAvg with digital OFDMA uploads vs. over-the-air
aggregation (broadband analog aggregation, :mod:`netsim.protocols.aircomp_fedavg`) at several device
counts, on the same seed.

For every K in ``aircomp.device_counts`` and every uplink in (ofdma, aircomp) the scenario is run
with ``training.devices_per_round = K`` and ``channel.uplink_access`` set, a fresh trainer each
time (same population, data split, selections and initial state: only the uplink differs).

``summary.json``::

    aggregation_latency_s: {"aircomp": {K: s}, "ofdma": {K: s}}   # mean over rounds of the air
        time to collect all updates: the longest OFDMA upload of the round / the AirComp slot
    final_accuracy:        {"aircomp": {K: acc}, "ofdma": {K: acc}}
    latency_ratio_ofdma_over_aircomp: {K: ratio}
    sim_time_s, total_device_energy_j, uplink_energy_j: {"aircomp": {K: ...}, "ofdma": {K: ...}}
    aircomp_nmse, aircomp_receive_snr_db: {K: mean over rounds}
    runs: {"aircomp": {K: {...}}, "ofdma": {K: {...}}}   # sim time, energy, rounds, and for
        AirComp the mean truncation ratio, receive SNR, MSE (measured and closed form), NMSE

``events.parquet`` holds every run's events with two more columns, ``uplink_access`` and
``device_count``.
"""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from analysis.metrics import accuracy_energy_curve
from netsim.protocols import make_simulation
from netsim.protocols.aircomp_fedavg import aircomp_summary
from netsim.scenario import Scenario

from .base import ExperimentResult, register

UPLINKS = ("ofdma", "aircomp")


def aggregation_latency_s(events: pd.DataFrame) -> float:
    """Mean over rounds of the longest ``uplink`` event of the round [s]."""
    up = events[events["kind"] == "uplink"]
    if up.empty:
        return float("nan")
    return float(up.groupby("round")["duration_s"].max().mean())


def variant(scenario: Scenario, uplink: str, k: int) -> Scenario:
    data = scenario.model_dump(mode="python")
    data["experiment"] = "fedavg"
    data["channel"]["uplink_access"] = uplink
    data["training"]["devices_per_round"] = k
    data["name"] = f"{scenario.name}-{uplink}-K{k}"
    return Scenario.model_validate(data)


@register("aircomp_vs_ofdma")
def run_aircomp_vs_ofdma(scenario: Scenario, on_round=None):
    from analysis.metrics import summarize

    from ..config import ScenarioError
    from ..build import make_trainer, topology_record

    counts = sorted(set(scenario.aircomp.device_counts))
    if counts[-1] > scenario.num_devices:
        raise ScenarioError(f"aircomp.device_counts={scenario.aircomp.device_counts}: K={counts[-1]} exceeds the "
                            f"number of devices ({scenario.num_devices})")
    t0 = time.perf_counter()
    frames, runs, topology = [], {u: {} for u in UPLINKS}, None
    latency = {u: {} for u in UPLINKS}
    accuracy = {u: {} for u in UPLINKS}
    for k in counts:
        for uplink in UPLINKS:
            sc = variant(scenario, uplink, k)
            trainer = make_trainer(sc, sc.seed)
            sim = make_simulation(sc, sc.seed, trainer, on_round=on_round)
            outcome = sim.run()
            events = sim.recorder.to_frame()
            s = summarize(events, num_classes=trainer.num_classes, stop_reason=outcome.stop_reason,
                          target_accuracy=sc.stop.target_accuracy, devices=[d.name for d in sim.network.devices])
            key = str(k)
            latency[uplink][key] = aggregation_latency_s(events)
            accuracy[uplink][key] = s["final_accuracy"]
            run = {name: s[name] for name in ("rounds_completed", "stop_reason", "initial_accuracy", "final_accuracy",
                                              "best_accuracy", "sim_time_s", "time_to_final_accuracy_s",
                                              "total_device_energy_j", "mean_device_energy_j", "device_uplink_s")}
            up = events[events["kind"] == "uplink"]
            run["uplink_energy_j"] = float(up["energy_j"].sum())
            if uplink == "aircomp":
                run["aircomp"] = aircomp_summary(sim.aircomp_log)
            runs[uplink][key] = run
            frames.append(events.assign(uplink_access=uplink, device_count=k))
            if topology is None:
                topology = topology_record(sim.network)
    events = pd.concat(frames, ignore_index=True)
    def per_k(uplink: str, field: str) -> dict:
        return {key: run[field] for key, run in runs[uplink].items()}

    summary = {
        "experiment": "aircomp_vs_ofdma",
        "device_counts": counts,
        "aggregation_latency_s": latency,
        "final_accuracy": accuracy,
        "latency_ratio_ofdma_over_aircomp": {str(k): latency["ofdma"][str(k)] / latency["aircomp"][str(k)]
                                             for k in counts},
        "sim_time_s": {u: per_k(u, "sim_time_s") for u in UPLINKS},
        "total_device_energy_j": {u: per_k(u, "total_device_energy_j") for u in UPLINKS},
        "uplink_energy_j": {u: per_k(u, "uplink_energy_j") for u in UPLINKS},
        "aircomp_nmse": {key: run["aircomp"].get("mean_nmse") for key, run in runs["aircomp"].items()},
        "aircomp_receive_snr_db": {key: run["aircomp"].get("mean_receive_snr_db")
                                   for key, run in runs["aircomp"].items()},
        "runs": runs,
    }
    figures = {"latency_vs_devices.png": lambda p: plot_latency(summary, p),
               "accuracy_mse_vs_devices.png": lambda p: plot_accuracy_mse(summary, p),
               "accuracy_vs_time.png": lambda p: plot_accuracy(events, p, scenario.name),
               "accuracy_vs_energy.png": lambda p: plot_accuracy_energy(events, p, scenario.name)}
    return ExperimentResult(events, summary, topology, figures, {"simulation_wall_s": time.perf_counter() - t0})


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency(summary: dict, path: Path) -> None:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ks = summary["device_counts"]
    for uplink, marker in zip(UPLINKS, "os"):
        ax.plot(ks, [summary["aggregation_latency_s"][uplink][str(k)] * 1e3 for k in ks], marker=marker, label=uplink)
    ax.set_xlabel("devices per round K")
    ax.set_ylabel("aggregation air time per round [ms]")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def _accuracy_curves(events: pd.DataFrame, path: Path, title: str, x_label: str, curve_of) -> None:
    """Test accuracy of every (uplink, K) run against ``curve_of(run events) -> (x, accuracy)``,
    log x axis; solid AirComp, dashed OFDMA, one colour per K."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 4))
    ks = sorted(events["device_count"].unique())
    for (uplink, k), grp in events.groupby(["uplink_access", "device_count"]):
        x, acc = curve_of(grp)
        ax.plot(x, acc, marker=".", color=f"C{ks.index(k) % 10}", linestyle="-" if uplink == "aircomp" else "--",
                label=f"{uplink} K={k}")
    ax.set_xlabel(x_label)
    ax.set_ylabel("test accuracy")
    ax.set_xscale("log")
    ax.set_title(f"{title} (solid: AirComp, dashed: OFDMA)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def plot_accuracy(events: pd.DataFrame, path: Path, title: str) -> None:
    """Test accuracy after each round against simulated time."""
    def curve(run: pd.DataFrame):
        ev = run[run["kind"] == "evaluate"]
        return ev["t_s"] + ev["duration_s"], ev["accuracy"]
    _accuracy_curves(events, path, title, "simulated time [s]", curve)


def plot_accuracy_mse(summary: dict, path: Path) -> None:
    """Final accuracy of both uplinks and the AirComp NMSE against K."""
    plt = _figure()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ks = summary["device_counts"]
    for uplink, marker in zip(UPLINKS, "os"):
        ax.plot(ks, [summary["final_accuracy"][uplink][str(k)] for k in ks], marker=marker, label=uplink)
    ax.set_xlabel("devices per round K")
    ax.set_ylabel("final test accuracy")
    ax.set_xscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax2.plot(ks, [summary["aircomp_nmse"][str(k)] for k in ks], marker="s", color="C1")
    ax2.set_xlabel("devices per round K")
    ax2.set_ylabel("AirComp aggregation NMSE (mean over rounds)")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def plot_accuracy_energy(events: pd.DataFrame, path: Path, title: str) -> None:
    """Test accuracy after each round against the device energy spent so far (log axis: the
    round-0 evaluation, at zero energy, is left out)."""
    def curve(run: pd.DataFrame):
        c = accuracy_energy_curve(run)
        c = c[c["energy_j"] > 0]
        return c["energy_j"], c["accuracy"]
    _accuracy_curves(events, path, title, "device energy spent, all devices [J]", curve)
