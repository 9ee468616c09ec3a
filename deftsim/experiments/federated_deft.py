"""Experiment ``federated_deft``: fine-tuning without the whole model on the device, against
plain federated LoRA, on the same devices, channels, data and seed.

Variants (``federated_deft.variants``; :mod:`netsim.federated_deft`):

* ``lora``: federated LoRA on the whole model (:mod:`netsim.protocols.fedavg`);
* ``emulator``: Offsite-Tuning, the adapter trained on a downloaded emulator and plugged into
  the full model at the edge (:mod:`netsim.protocols.emulator_fl`, :mod:`fomo.emulator_trainer`);
* ``split``: SplitFed with a soft prompt on the device and the rest at the edge, every step a
  round trip (:mod:`netsim.protocols.split_fl`, :mod:`fomo.split_trainer`);
* ``zeroth_order``: MeZO steps with FedKSeed's shared seeds (:mod:`netsim.protocols.zeroth_order_fl`,
  :mod:`fomo.zo_trainer`).

``summary.json``::

    variants: {name: {final_accuracy, best_accuracy, initial_accuracy, time_to_target_accuracy_s,
                      energy_to_target_accuracy_j, uplink_bytes, downlink_bytes, device_flops_per_step,
                      peak_device_memory_bytes, energy_per_device_j, sim_time_s, rounds_completed,
                      stop_reason, local_steps, learning_rate, device_steps, ...}}
    target_accuracy, variant_order

``uplink_bytes`` / ``downlink_bytes``: everything the devices sent / received over the run (one-off
downloads of an emulator or the candidate seeds included); ``device_flops_per_step``: counted device
FLOPs over the local steps the devices ran; ``peak_device_memory_bytes``: the trainer's job memory at
the worst-case length ``model.max_length_tokens``; ``energy_per_device_j``: mean over devices.
Extras: ``emulator`` (download bytes, kept blocks, parameters, final accuracy of the emulator
itself), ``split`` (per edge server: requests, passes, mean batch size, utilisation, queueing
delay), ``zeroth_order`` (K, payload per round).

``events.parquet`` holds every variant's events with a ``variant`` column.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import pandas as pd

from netsim.federated_deft import variant_scenario
from netsim.protocols import deft_simulation
from netsim.scenario import Scenario

from .. import build
from ..config import ScenarioError
from .base import ExperimentResult, register
from .fedavg import final_balanced_accuracy

LABELS = {"lora": "LoRA (whole model)", "emulator": "emulator (Offsite-Tuning)", "split": "split (SplitFed)",
          "zeroth_order": "zeroth-order (FedKSeed)"}


def target_of(scenario: Scenario) -> Optional[float]:
    """The reported time-to-accuracy threshold: ``federated_deft.target_accuracy``, else
    ``stop.target_accuracy``."""
    t = scenario.federated_deft.target_accuracy
    return t if t is not None else scenario.stop.target_accuracy


def device_steps(events: pd.DataFrame, local_steps: int) -> int:
    """Local steps the devices started: jobs (distinct device and round of a ``compute`` or
    ``edge_wait`` event) x E."""
    work = events[events["kind"].isin(["compute", "edge_wait"]) & (events["round"] > 0)]
    return int(len(work[["node", "round"]].drop_duplicates())) * int(local_steps)


def variant_metrics(events: pd.DataFrame, run_summary: dict, trainer, scenario: Scenario,
                    target: Optional[float]) -> dict:
    """The per-variant metrics of ``summary.json`` from the variant's events and trainer."""
    from analysis.metrics import energy_to_accuracy_j, time_to_accuracy_s

    devices = set(run_summary["energy_per_device_j"])
    own = events[events["node"].isin(devices)]
    steps = device_steps(events, scenario.training.local_steps)
    device_flops = float(own.loc[own["kind"] == "compute", "flops"].sum())
    out = {name: run_summary[name] for name in (
        "final_accuracy", "best_accuracy", "initial_accuracy", "rounds_completed", "stop_reason", "sim_time_s",
        "total_device_energy_j")}
    out.update({
        "time_to_target_accuracy_s": None if target is None else time_to_accuracy_s(events, target),
        "energy_to_target_accuracy_j": None if target is None else energy_to_accuracy_j(events, target),
        "uplink_bytes": int(own.loc[own["kind"] == "uplink", "bytes"].sum()),
        "downlink_bytes": int(own.loc[own["kind"] == "downlink", "bytes"].sum()),
        "device_steps": steps,
        "device_flops_per_step": device_flops / steps if steps else 0.0,
        "peak_device_memory_bytes": int(trainer.job_memory_bytes(scenario.training.batch_size)),
        "energy_per_device_j": run_summary["mean_device_energy_j"],
        "local_steps": scenario.training.local_steps,
        "learning_rate": scenario.training.learning_rate,
        "optimizer": scenario.training.optimizer,
        "round_payload_bytes": int(trainer.adapter_bytes()),
    })
    return out


def _extras(variant: str, sim, trainer, events: pd.DataFrame, scenario: Scenario) -> dict:
    """What only one variant has."""
    if variant == "emulator":
        emu = events[events["kind"] == "evaluate_emulator"]
        return {"emulator": {
            "download_bytes": int(trainer.emulator_download_bytes()),
            "kept_layers": [int(i) for i in trainer.emulator.kept_layers],
            "parameters": int(trainer.emulator_parameters()),
            "full_parameters": int(trainer.full_parameters()),
            "distill_edge_flops": float(trainer.distill_edge_flops),
            "final_emulator_accuracy": float(emu["accuracy"].iloc[-1]) if len(emu) else math.nan,
        }}
    if variant == "split":
        return {"split": {"cut_layer": scenario.split.cut_layer, "edges": sim.edge_summary()}}
    if variant == "zeroth_order":
        return {"zeroth_order": {"candidate_seeds": scenario.zeroth_order.candidate_seeds,
                                 "uplink_access": scenario.channel.uplink_access,
                                 "payload_bytes_per_round": int(trainer.adapter_bytes())}}
    return {}


@register("federated_deft")
def federated_deft(scenario: Scenario, on_round=None) -> ExperimentResult:
    """Run every variant of ``federated_deft.variants`` and compare them."""
    from analysis.metrics import summarize

    t0 = time.perf_counter()
    target = target_of(scenario)
    frames, variants, topology, timing = [], {}, None, {}
    for variant in scenario.federated_deft.variants:
        started = time.perf_counter()
        sc = variant_scenario(scenario, variant)
        trainer = build.make_trainer(sc, sc.seed, variant)
        try:
            sim = deft_simulation(variant, sc, sc.seed, trainer, on_round=on_round)
        except ValueError as err:
            raise ScenarioError(f"scenario {scenario.name!r}, variant {variant}: {err}") from None
        outcome = sim.run()
        events = sim.recorder.to_frame()
        run = summarize(events, num_classes=trainer.num_classes, stop_reason=outcome.stop_reason,
                        target_accuracy=target, devices=[d.name for d in sim.network.devices])
        metrics = variant_metrics(events, run, trainer, sc, target)
        metrics.update(_extras(variant, sim, trainer, events, sc))
        metrics["final_balanced_accuracy"] = final_balanced_accuracy(sim)
        metrics["engine"] = sim.engine.stats()
        variants[variant] = metrics
        frames.append(events.assign(variant=variant))
        if topology is None:
            topology = build.topology_record(sim.network)
        timing[f"{variant}_wall_s"] = time.perf_counter() - started
    events = pd.concat(frames, ignore_index=True)
    events["variant"] = events["variant"].astype("string")
    summary = {"experiment": "federated_deft", "variant_order": list(variants), "target_accuracy": target,
               "variants": variants}
    title = f"{scenario.name} (seed {scenario.seed})"
    figures = {"accuracy_vs_time.png": lambda p: plot_accuracy(events, p, title, target),
               "costs.png": lambda p: plot_costs(summary, p, title)}
    return ExperimentResult(events, summary, topology, figures,
                            {"simulation_wall_s": time.perf_counter() - t0, **timing})


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(events: pd.DataFrame, path: Path, title: str, target: Optional[float]) -> None:
    """Test accuracy (of the full model; for the emulator, of the plug-in) against simulated
    time, one line per variant; the emulator's own accuracy dotted."""
    from analysis.metrics import accuracy_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for i, (variant, ev) in enumerate(events.groupby("variant", sort=False)):
        curve = accuracy_curve(ev)
        ax.plot(curve["t_s"], curve["accuracy"], marker=".", color=f"C{i}", label=LABELS.get(variant, variant))
        emu = ev[ev["kind"] == "evaluate_emulator"]
        if len(emu):
            ax.plot(emu["t_s"], emu["accuracy"], linestyle=":", color=f"C{i}", label="  the emulator itself")
    if target is not None:
        ax.axhline(target, color="grey", linewidth=0.8, linestyle="--", label=f"target {target:g}")
    ax.set_xlabel("simulated time [s]")
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


COST_PANELS = (("peak_device_memory_bytes", "peak device memory [MB]", 1e-6, False),
               ("uplink_bytes", "uplink, all devices [MB] (log)", 1e-6, True),
               ("downlink_bytes", "downlink, all devices [MB] (log)", 1e-6, True),
               ("energy_per_device_j", "energy per device [J]", 1.0, False),
               ("device_flops_per_step", "device GFLOP per local step", 1e-9, False))
"""(metric, panel title, scale, log axis): bytes differ by orders of magnitude between variants."""


def plot_costs(summary: dict, path: Path, title: str) -> None:
    """One bar per variant in each panel: memory, bytes up and down (log axes), energy, device
    FLOPs per step."""
    plt = _pyplot()
    names = summary["variant_order"]
    fig, axes = plt.subplots(1, len(COST_PANELS), figsize=(3.0 * len(COST_PANELS), 3.4))
    for ax, (metric, label, scale, log) in zip(axes, COST_PANELS):
        values = [summary["variants"][n][metric] * scale for n in names]
        ax.bar(range(len(names)), values, color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(label, fontsize=9)
        if log and all(v > 0 for v in values):
            ax.set_yscale("log")
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
