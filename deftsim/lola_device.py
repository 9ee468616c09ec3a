"""Single-device accuracy/latency/memory trade-off of the output-first rule.

For each device budget, :func:`netsim.lola.single_device.choose_allocation` picks the top
blocks and LoRA rank from a per-layer depth profile (one layer per block: measured on the real
model with ``trainer: real``, else the analytic formula with ``lola.analytic``). With
``train_rounds`` > 0 and ``trainer: real`` every distinct allocation is also fine-tuned for real:
the scenario's ``fedavg`` experiment with ``peft.rank_per_layer`` set to the choice and
``training.rounds`` = ``train_rounds`` (keep the scenario small: a few devices, few local steps),
and the final test accuracy is reported.

Entry point: ``python bench/lola_single_device.py`` (writes the table, a PNG and JSON).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence

import pandas as pd

from netsim.lola.profile import DepthProfile, analytic_profile
from netsim.lola.single_device import DeviceBudget, choose_allocation
from netsim.scenario import Scenario


def per_layer_profile(scenario: Scenario, cache_dir: Optional[str | Path] = None) -> DepthProfile:
    """Depth profile with one block per transformer layer (block 0 = the top layer): measured
    when ``scenario.trainer`` is real, else analytic."""
    if scenario.trainer == "real":
        from fomo.depth_profile import measure_depth_profile
        from fomo.models import model_folder

        from .checks import model_depth

        depth = model_depth(model_folder(scenario.model))
        peft = scenario.peft.model_copy(update={"layers": None, "rank_per_layer": None})
        return measure_depth_profile(scenario.model, peft, depth, scenario.training.batch_size,
                                     scenario.model.max_length_tokens, scenario.training.optimizer,
                                     scenario.fake.num_classes, cache_dir)
    a = (scenario.lola.analytic if scenario.lola is not None else None)
    kw = {} if a is None else dict(num_layers=a.num_layers, hidden=a.hidden_size, ffn=a.ffn_size,
                                   heads=a.num_heads, vocab=a.vocab_size)
    n = kw.get("num_layers", 6)
    return analytic_profile(n, seq_len=scenario.model.max_length_tokens, batch_size=scenario.training.batch_size,
                            lora_rank=scenario.peft.rank, lora_modules_per_layer=len(scenario.peft.target_modules),
                            optimizer_states=2 if scenario.training.optimizer == "adamw" else 0, **kw)


def single_device_tradeoff(scenario: Scenario, budgets: Iterable[DeviceBudget], ranks: Sequence[int] = (8,),
                           train_rounds: int = 0, out_dir: Optional[str | Path] = None,
                           profile: Optional[DepthProfile] = None) -> pd.DataFrame:
    """One row per budget: budgets, chosen blocks/layers/rank, their step FLOPs, latency and
    memory from the profile, and ``final_accuracy`` (NaN unless trained). Allocations that repeat
    are trained once."""
    from .runner import run_scenario

    profile = profile if profile is not None else per_layer_profile(scenario)
    rows, trained = [], {}
    for i, b in enumerate(budgets):
        c = choose_allocation(profile, b, ranks, profile_rank=scenario.peft.rank)
        row = {"budget": i, "memory_budget_MB": b.memory_bytes / 1e6, "latency_budget_ms": b.latency_s * 1e3,
               "compute_TFLOP_per_s": b.compute_flops_per_s / 1e12, "fits": c.fits, "num_blocks": c.num_blocks,
               "rank": c.rank, "layers": c.layers, "step_GFLOP": c.step_flops / 1e9,
               "latency_ms": c.latency_s * 1e3, "memory_MB": c.memory_bytes / 1e6,
               "trainable_kB": c.trainable_bytes / 1e3, "final_accuracy": float("nan")}
        if c.fits and train_rounds > 0 and scenario.trainer == "real":
            key = (tuple(c.layers), c.rank)
            if key not in trained:
                sc = scenario.model_copy(deep=True)
                sc.experiment = "fedavg"
                sc.peft = sc.peft.model_copy(update={"layers": None, "rank_per_layer": dict(c.rank_per_layer)})
                sc.training = sc.training.model_copy(update={"rounds": train_rounds})
                folder = Path(out_dir) / f"train_m{c.num_blocks}_r{c.rank}" if out_dir else None
                if folder is None:
                    import tempfile
                    folder = Path(tempfile.mkdtemp(prefix="lola_device_"))
                trained[key] = run_scenario(sc, folder)["final_accuracy"]
            row["final_accuracy"] = trained[key]
        rows.append(row)
    frame = pd.DataFrame(rows)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        frame.to_csv(out / "single_device_tradeoff.csv", index=False)
        plot_tradeoff(frame, out / "single_device_tradeoff.png", title=scenario.name)
    return frame


def plot_tradeoff(frame: pd.DataFrame, path: Path, title: str = "") -> Path:
    """Chosen latency and memory per budget (bars) and, when trained, the accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6), dpi=120)
    labels = [f"{m:.0f} MB\n{lat:.0f} ms" for m, lat in zip(frame["memory_budget_MB"], frame["latency_budget_ms"])]
    x = range(len(frame))
    axes[0].bar(x, frame["latency_ms"], color="tab:blue")
    axes[0].plot(x, frame["latency_budget_ms"], "k_", markersize=20, label="budget")
    axes[0].set_ylabel("latency per round [ms]")
    axes[1].bar(x, frame["memory_MB"], color="tab:orange")
    axes[1].plot(x, frame["memory_budget_MB"], "k_", markersize=20, label="budget")
    axes[1].set_ylabel("job memory [MB]")
    axes[2].bar(x, frame["final_accuracy"].fillna(0.0), color="tab:green")
    axes[2].set_ylabel("test accuracy after training [-]")
    for ax in axes:
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set_xlabel("budget (memory, latency)")
        ax.grid(axis="y", alpha=0.3)
    for i, (m, r) in enumerate(zip(frame["num_blocks"], frame["rank"])):
        axes[0].annotate(f"{m} blk, r={r}", (i, 0), ha="center", va="bottom", fontsize=7, color="white")
    axes[0].legend(fontsize=7)
    fig.suptitle(title or "single-device output-first allocation")
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)
    return path
