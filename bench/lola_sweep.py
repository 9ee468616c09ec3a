"""Per-round latency of every LoLa algorithm vs number of devices K, total bandwidth B and the
wearables' memory budget (latency part).

    python bench/lola_sweep.py --out runs/lola_sweep [--rounds 20] [--measured]

Base: scenarios/lola_compare.yaml (N = 3 blocks), analytic depth profile unless --measured,
same seed everywhere. One axis varies at a time (the others at the base value: K = 8 as
3 phones / 2 tablets / 3 wearables, B = 5 MHz, wearable memory 110 MB):
- K: (phones, tablets, wearables) = (1,1,1) (2,1,2) (3,2,3) (5,3,4) (6,4,6);
- B: 2, 5, 10, 20, 40 MHz (lola.total_bandwidth_hz);
- wearable memory: 100 MB (no block fits), 110 MB (block 0), 125 MB (blocks 0-1), 140 MB (all).
Writes lola_sweep.csv (axis, value, algorithm, mean_round_latency_ms; NaN = infeasible) and
lola_sweep.png (one panel per axis).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _common import ROOT

from deftsim.config import load_scenario
from netsim.lola.allocation import InfeasibleError
from netsim.protocols.lola import compare

BASE = ROOT / "scenarios" / "lola_compare.yaml"
K_COUNTS = [(1, 1, 1), (2, 1, 2), (3, 2, 3), (5, 3, 4), (6, 4, 6)]
BANDS = [2e6, 5e6, 10e6, 20e6, 40e6]
WEARABLE_MEM = [1.0e8, 1.1e8, 1.25e8, 1.4e8]


def run(overrides, measured, rounds):
    ov = [f"lola.rounds={rounds}"] + ([] if measured else ["trainer=fake"]) + list(overrides)
    scenario = load_scenario(BASE, ov)
    profile = None
    if measured:
        from deftsim.experiments.lola_compare import _profile
        profile = _profile(scenario)
    try:
        summary, _, _ = compare(scenario, profile)
        return summary["mean_round_latency_s"]
    except InfeasibleError:  # no full matching: every cooperative algorithm is infeasible
        from netsim.protocols.lola import compare as _c  # offloading alone still runs
        s2 = scenario.model_copy(update={"lola": scenario.lola.model_copy(update={"algorithms": ["offloading"]})})
        lat = _c(s2, profile)[0]["mean_round_latency_s"]
        return {a: lat.get(a, np.nan) for a in scenario.lola.algorithms}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/lola_sweep")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--measured", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = []
    for p, t, w in K_COUNTS:
        lat = run([f"devices.0.count={p}", f"devices.1.count={t}", f"devices.2.count={w}"], args.measured, args.rounds)
        rows += [("devices K", p + t + w, a, v * 1e3) for a, v in lat.items()]
    for b in BANDS:
        lat = run([f"lola.total_bandwidth_hz={b}"], args.measured, args.rounds)
        rows += [("bandwidth B [MHz]", b / 1e6, a, v * 1e3) for a, v in lat.items()]
    for m in WEARABLE_MEM:
        lat = run([f"devices.2.memory_bytes={m}"], args.measured, args.rounds)
        rows += [("wearable memory [MB]", m / 1e6, a, v * 1e3) for a, v in lat.items()]
    frame = pd.DataFrame(rows, columns=["axis", "value", "algorithm", "mean_round_latency_ms"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "lola_sweep.csv", index=False)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_names = list(dict.fromkeys(frame["axis"]))
    fig, axes = plt.subplots(1, len(axes_names), figsize=(13, 3.8), dpi=120)
    for ax, name in zip(axes, axes_names):
        sub = frame[frame["axis"] == name]
        for alg, g in sub.groupby("algorithm", sort=False):
            ax.plot(g["value"], g["mean_round_latency_ms"], "o-", label=alg,
                    lw=2.2 if alg in ("crunch", "jbba") else 1.0)
        ax.set_xlabel(name)
        ax.set_ylabel("mean per-round latency [ms]")
        if name.startswith("bandwidth"):
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"LoLa per-round latency ({'measured' if args.measured else 'analytic'} profile, "
                 f"{args.rounds} rounds, seed 0)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "lola_sweep.png", format="png", metadata={"Software": None})
    plt.close(fig)
    pd.set_option("display.width", 200)
    for name in axes_names:
        sub = frame[frame["axis"] == name]
        print(sub.pivot(index="value", columns="algorithm", values="mean_round_latency_ms")
              [list(dict.fromkeys(sub["algorithm"]))].rename_axis(name).round(1).to_string(), "\n")
    print(f"wall {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
