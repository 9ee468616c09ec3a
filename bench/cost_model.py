"""Counting the costs of paper-scale architectures without weights (fomo.cost_model).

For each architecture a fresh interpreter builds the weightless model with LoRA (rank 8,
peft's default targets for the model type), counts one training step of 8 x 128 tokens and
reports its wall time and its peak resident memory (torch and transformers included). The
baseline, in the same way, is the trained model's own architecture (all-MiniLM-L6-v2), and
every figure is also printed as a ratio against it. The counted costs (FLOPs, memory of the job,
payload) are printed too: they are the same on every machine.

    python bench/cost_model.py [--arch llama-2-7b t5-xxl ...] [--batch 8] [--tokens 128]

Ends with ``RESULT count_s_llama_2_7b=... peak_rss_gb_llama_2_7b=... count_s_ratio_llama_2_7b=...``
(one triple per architecture).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

from _common import ROOT, result_line

CHILD = textwrap.dedent("""
    import json, resource, sys, time, warnings
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    from fomo.cost_model import CostModel
    from netsim.scenario import PeftSpec
    imported = time.perf_counter()
    name, batch, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    cost = CostModel(name, PeftSpec(), 5)
    built = time.perf_counter()
    summary = cost.summary(batch, tokens)
    done = time.perf_counter()
    try:   # the new program's own high-water mark (ru_maxrss also counts the parent's pages before exec)
        peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"build_s": built - imported, "count_s": done - built, "total_s": done - imported,
                      "peak_rss_bytes": peak,
                      **summary.to_dict()}))
""")


def measure(name: str, batch: int, tokens: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, name, str(batch), str(tokens)], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="+", default=["roberta-large", "llama-1b", "llama-2-7b", "t5-xxl"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    base = measure("minilm-l6", args.batch, args.tokens)
    print(f"{'architecture':<14} {'params':>8} {'build+count s':>14} {'x base':>7} {'peak RSS GB':>12} "
          f"{'x base':>7} {'TFLOP/step':>11} {'job GB':>8} {'payload MB':>11}")
    results = {}
    for name in ["minilm-l6", *args.arch]:
        m = base if name == "minilm-l6" else measure(name, args.batch, args.tokens)
        print(f"{name:<14} {m['parameters'] / 1e9:>7.3g}B {m['total_s']:>14.2f} {m['total_s'] / base['total_s']:>7.2f} "
              f"{m['peak_rss_bytes'] / 1e9:>12.3f} {m['peak_rss_bytes'] / base['peak_rss_bytes']:>7.2f} "
              f"{m['flops_per_step'] / 1e12:>11.4g} {m['peak_memory_bytes'] / 1e9:>8.3g} {m['payload_bytes'] / 1e6:>11.4g}")
        key = name.replace("-", "_")
        results[f"count_s_{key}"] = float(m["total_s"])
        results[f"peak_rss_gb_{key}"] = float(m["peak_rss_bytes"] / 1e9)
        results[f"count_s_ratio_{key}"] = float(m["total_s"] / base["total_s"])
    print(result_line(**results))


if __name__ == "__main__":
    main()
