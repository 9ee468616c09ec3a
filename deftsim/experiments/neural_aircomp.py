"""Experiment ``neural_aircomp``: split fine-tuning with a neural connection received over the
air (AirComp, at each ``neural_aircomp.receive_snr_db``) vs. digitally (OFDMA, noiseless).

K = the scenario's device count; model fomo/neural_connection.py, timeline
netsim/protocols/neural_aircomp.py, docs/aircomp.md. Every variant starts from the same parameters, draws
the same batches and sees the same devices, channels and noise draws (same seed); only the
connection differs. The frozen encoder runs once for all variants.

``summary.json``::

    experiment: "neural_aircomp", num_devices: K, combine, feature_values_per_step: B d
    variants: [names]       # "digital", "aircomp_links" (real link noise), "aircomp_snr_<x>dB"
    final_accuracy: {variant: acc}
    sim_time_s: {variant: simulated time of all steps}
    uplink_latency_s: {variant: mean per-step uplink time}
    runs: {variant: {initial_accuracy, final_accuracy, best_accuracy, sim_time_s, steps,
                     receive_snr_db, mean uplink/downlink/compute time per step, and for AirComp
                     mean truncation ratio, receive SNR, MSE (measured, closed form), NMSE}}
    chance_accuracy, step_flops: {device_forward, device_backward, edge}

``events.parquet``: every variant's events with a ``variant`` column. Figure
``neural_accuracy_vs_time.png`` (test accuracy vs. simulated time per variant).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from netsim.protocols.neural_aircomp import NeuralConnectionSimulation, channel_summary
from netsim.network import Network
from netsim.scenario import Scenario

from .base import ExperimentResult, register


def variant_name(uplink: str, snr: Optional[float]) -> str:
    if uplink == "digital":
        return "digital"
    if snr is None:
        return "aircomp_links"
    if math.isinf(snr):
        return "aircomp_noiseless"
    return f"aircomp_snr_{snr:g}dB"


def variants(scenario: Scenario) -> list[tuple[str, Optional[float]]]:
    out: list[tuple[str, Optional[float]]] = [("aircomp", s) for s in scenario.neural_aircomp.receive_snr_db]
    if scenario.neural_aircomp.include_digital:
        out.insert(0, ("digital", None))
    return out


@register("neural_aircomp")
def run_neural_aircomp(scenario: Scenario, on_round=None):
    from fomo.neural_connection import NeuralConnectionTrainer, prepare_split_data

    from ..build import topology_record, trainer_errors

    spec = scenario.neural_aircomp
    t0 = time.perf_counter()
    with trainer_errors(scenario):
        data = prepare_split_data(scenario, scenario.train_seed())
    setup_s = time.perf_counter() - t0
    network = Network(scenario, scenario.network_seed())
    frames, runs, acc, sim_time, uplink = [], {}, {}, {}, {}
    flops = None
    for up, snr in variants(scenario):
        name = variant_name(up, snr)
        model = NeuralConnectionTrainer(data, scenario, scenario.train_seed())
        flops = {"device_forward": model.device_forward_flops, "device_backward": model.device_backward_flops,
                 "edge": model.edge_flops}
        sim = NeuralConnectionSimulation(scenario, scenario.seed, model, up, snr, network=network)
        res = sim.run(spec.steps, spec.eval_every_steps)
        ev = sim.recorder.to_frame()
        evals = ev[ev["kind"] == "evaluate"]
        per_step = {kind: float(ev[ev["kind"] == kind].groupby("round")["duration_s"].max().mean())
                    for kind in ("uplink", "downlink", "edge_compute")}
        comp = ev[ev["kind"] == "compute"].groupby("round")["duration_s"].max()
        run = {"uplink": up, "receive_snr_db": snr, "initial_accuracy": res.initial_accuracy,
               "final_accuracy": res.final_accuracy, "best_accuracy": float(evals["accuracy"].max()),
               "sim_time_s": res.sim_time_s, "steps": res.steps,
               "mean_uplink_s": per_step["uplink"], "mean_downlink_broadcast_s": per_step["downlink"],
               "mean_edge_compute_s": per_step["edge_compute"],
               "mean_device_compute_s": float(comp.sum() / max(res.steps, 1)),
               "uplink_energy_j": float(ev[ev["kind"] == "uplink"]["energy_j"].sum())}
        if up == "aircomp":
            run["aircomp"] = channel_summary(res.channel_log)
        runs[name], acc[name], sim_time[name], uplink[name] = run, res.final_accuracy, res.sim_time_s, per_step["uplink"]
        frames.append(ev.assign(variant=name))
        if on_round is not None:
            on_round(res.steps, res.final_accuracy, res.sim_time_s)
    events = pd.concat(frames, ignore_index=True)
    summary = {
        "experiment": "neural_aircomp",
        "num_devices": data.num_devices,
        "combine": spec.combine,
        "segment_tokens": spec.segment_tokens,
        "feature_dim": spec.feature_dim,
        "feature_values_per_step": scenario.training.batch_size * spec.feature_dim,
        "num_train_examples": int(data.train_emb.shape[0]),
        "num_test_examples": int(data.test_emb.shape[0]),
        "chance_accuracy": float(np.bincount(data.test_labels.numpy()).max() / len(data.test_labels)),
        "variants": list(runs),
        "final_accuracy": acc,
        "sim_time_s": sim_time,
        "uplink_latency_s": uplink,
        "step_flops": flops,
        "runs": runs,
    }
    title = f"{scenario.name} (K={data.num_devices}, seed {scenario.seed})"
    figures = {"neural_accuracy_vs_time.png": lambda p: plot_accuracy(events, p, title)}
    return ExperimentResult(events, summary, topology_record(network), figures,
                            {"setup_wall_s": setup_s, "simulation_wall_s": time.perf_counter() - t0 - setup_s})


def plot_accuracy(events: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ev = events[events["kind"] == "evaluate"]
    for name, grp in ev.groupby("variant", sort=False):
        style = "--" if name == "digital" else "-"
        axes[0].plot(grp["t_s"], grp["accuracy"], style, marker=".", label=name)
        axes[1].plot(grp["round"], grp["accuracy"], style, marker=".", label=name)
    axes[0].set_xlabel("simulated time [s]")
    axes[1].set_xlabel("training step")
    for ax in axes:
        ax.set_ylabel("test accuracy")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
