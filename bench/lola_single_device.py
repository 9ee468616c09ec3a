"""Single-device accuracy/latency/memory trade-off of the output-first rule.

    python bench/lola_single_device.py --out runs/lola_device [--train-rounds 3] [--fake]

Per-layer depth profile of all-MiniLM-L6-v2 (measured; ``--fake``: analytic), a phone of
1 TFLOP/s doing 5 steps of batch 8 x 32 tokens per round, candidate ranks 2/4/8/16, five
(memory, latency) budgets. With ``--train-rounds R`` > 0 each distinct allocation is fine-tuned
for real (FedAvg, 2 devices, R rounds of 5 local steps, BBC News, 128 test examples).
Writes single_device_tradeoff.csv/.png and depth_profile.csv/.png in --out.
"""
from __future__ import annotations

import argparse
import time

from _common import ROOT  # noqa: F401  (puts the repo on sys.path)

from analysis.depth import plot_profile, profile_table
from deftsim.lola_device import per_layer_profile, single_device_tradeoff
from netsim.lola.single_device import DeviceBudget
from netsim.scenario import Scenario

BUDGETS = [  # (memory [bytes], latency per round [s]); steps=5, 1 TFLOP/s
    (1.00e8, 0.035), (1.10e8, 0.040), (1.20e8, 0.045), (1.30e8, 0.050), (2.00e8, 1.0)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/lola_device")
    ap.add_argument("--train-rounds", type=int, default=0)
    ap.add_argument("--fake", action="store_true", help="analytic profile, no training")
    args = ap.parse_args()
    scenario = Scenario.model_validate({
        "name": "lola_single_device", "seed": 0, "trainer": "fake" if args.fake else "real",
        "devices": [{"count": 2, "compute_flops_per_s": 1e12}], "d2d": {"kind": "none"},
        "model": {"max_length_tokens": 32},
        "peft": {"method": "lora", "rank": 8, "alpha": 16, "target_modules": ["query", "value"]},
        "data": {"partition": "iid", "max_test_examples": 128},
        "training": {"batch_size": 8, "local_steps": 5, "learning_rate": 2e-3},
    })
    t0 = time.perf_counter()
    profile = per_layer_profile(scenario)
    budgets = [DeviceBudget(m, lat, 1e12, 5) for m, lat in BUDGETS]
    table = single_device_tradeoff(scenario, budgets, (2, 4, 8, 16), train_rounds=args.train_rounds,
                                   out_dir=args.out, profile=profile)
    profile_table(profile).to_csv(f"{args.out}/depth_profile.csv", index=False)
    plot_profile(profile, f"{args.out}/depth_profile.png")
    print(profile_table(profile).round(3).to_string(index=False))
    print(table.drop(columns=["budget", "compute_TFLOP_per_s"]).round(3).to_string(index=False))
    print(f"wall {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
