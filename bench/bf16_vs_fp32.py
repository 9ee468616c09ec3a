"""bf16 against float32 (``execution.precision``): step speed on the host, and the quickstart's accuracy.

1. Step speed. Four trainers from one scenario and seed (LoRA r=8 on query/value of
   all-MiniLM-L6-v2, BBC News, ``--batch`` examples of up to ``--tokens`` tokens, one AdamW step
   per device): sequential fp32, sequential bf16, batched fp32 and batched bf16 (``--k``
   devices in one pass). Each gets the same ``local_train`` call of ``--k`` devices, the order
   rotated every repeat; the speed-up is min(fp32) / min(bf16) over the repeats (the minimum is
   the estimate least disturbed by other processes), on the wall clock and on this process's
   CPU-time clock (``time.process_time``, which other processes' load disturbs less: they take
   cores, not this process's instructions). The first call's losses give the bf16
   loss gap, against the tolerance 5 x 2 x 2^-8 derived in tests/fomo/test_execution.py.
2. Accuracy. ``deftsim run scenarios/quickstart.yaml`` with ``execution.precision`` fp32 and
   bf16 (``stop.target_accuracy`` off, so both runs train every round of the scenario), one
   pair per ``--seeds`` entry; final and best accuracy of each, and whether the two runs'
   simulated timelines agree (simulated time, FLOPs, bytes sent, device energy: they must).

    python bench/bf16_vs_fp32.py [--quick] [--k 16] [--batch 4] [--tokens 32] [--repeats 5]
                                 [--seeds 0] [--skip-quickstart] [--device cpu|cuda]

``--quick``: 2 repeats and no quickstart runs. Ends with one line
``RESULT bf16_speedup_sequential=... bf16_speedup_sequential_cpu_time=... bf16_speedup_batched_k16=...
ms_step_sequential_fp32=...
... first_step_loss_rel_gap=... quickstart_final_accuracy_fp32=... quickstart_final_accuracy_bf16=...
quickstart_accuracy_gap=... same_timeline=1``.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (ROOT, load_average, loss_rel_diff, min_of_alternating_clocks, result_line, set_threads,
                     small_scenario)

BF16_LOSS_RTOL = 5 * 2 * 2.0**-8
TIMELINE_KEYS = ("sim_time_s", "total_flops", "total_bytes_sent", "total_device_energy_j", "num_events",
                 "rounds_completed")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx512_bf16", "amx_bf16", "avx512f")
    return ",".join(f for f in wanted if f" {f}" in flags) or "none of avx512f/avx512_bf16/amx_bf16"


def step_speed(args: argparse.Namespace, threads: int) -> dict[str, object]:
    from fomo import build_trainer
    from netsim.interfaces import LocalJob

    base = dict(devices=max(args.k, 2), batch_size=args.batch, tokens=args.tokens)
    trainers = {}
    for strategy in ("sequential", "batched"):
        for precision in ("fp32", "bf16"):
            execution = {"strategy": strategy, "precision": precision, "device": args.device,
                         "max_devices_per_pass": args.k}
            trainers[(strategy, precision)] = build_trainer(small_scenario(**base, execution=execution), seed=0)
    assert trainers[("batched", "fp32")].strategy == "batched"
    device = str(trainers[("batched", "fp32")].placement.device)

    def jobs() -> list:
        return [LocalJob(d, 1, 1, args.batch) for d in range(args.k)]

    first = {key: t.local_train(jobs()) for key, t in trainers.items()}   # warm-up, profiles; compared
    runs = {f"{s}_{p}": (lambda t=t: t.local_train(jobs())) for (s, p), t in trainers.items()}
    load_before = load_average()
    clocks = min_of_alternating_clocks(runs, args.repeats)
    out: dict[str, object] = {}
    print(f"step speed: {args.k} devices x 1 AdamW step of {args.batch} x {args.tokens} tokens, device={device}, "
          f"threads={threads}, min of {args.repeats} rotated repeats (load before {load_before}, after "
          f"{load_average()})")
    for strategy in ("sequential", "batched"):
        key = "sequential" if strategy == "sequential" else f"batched_k{args.k}"
        for clock, suffix in (("wall", ""), ("cpu", "_cpu_time")):
            fp32_s, bf16_s = clocks[clock][f"{strategy}_fp32"], clocks[clock][f"{strategy}_bf16"]
            out[f"bf16_speedup_{key}{suffix}"] = fp32_s / bf16_s
            out[f"ms_step_{strategy}_fp32{suffix}"] = 1000 * fp32_s / args.k
            out[f"ms_step_{strategy}_bf16{suffix}"] = 1000 * bf16_s / args.k
            print(f"  {strategy:10s} ({clock} clock): ms per device step fp32 {1000 * fp32_s / args.k:7.1f}, "
                  f"bf16 {1000 * bf16_s / args.k:7.1f} -> bf16 speed-up {fp32_s / bf16_s:.2f}x")
    gap = max(loss_rel_diff(first[(s, "fp32")], first[(s, "bf16")]) for s in ("sequential", "batched"))
    costs_equal = all([(r.flops, r.peak_memory_bytes, r.update_bytes) for r in first[(s, "fp32")]]
                      == [(r.flops, r.peak_memory_bytes, r.update_bytes) for r in first[(s, "bf16")]]
                      for s in ("sequential", "batched"))
    print(f"  first-step losses: bf16 vs fp32 {gap:.2g} relative (tolerance {BF16_LOSS_RTOL:.3g}); "
          f"FLOPs/memory/bytes {'identical' if costs_equal else 'DIFFERENT (a bug)'}")
    out["first_step_loss_rel_gap"] = gap
    out["same_costs"] = int(costs_equal)
    out["device"] = device
    return out


def quickstart(precision: str, seed: int, folder: Path, threads: int) -> tuple[dict, float]:
    """summary.json of one ``deftsim run`` of the quickstart, and its wall seconds."""
    cmd = [sys.executable, "-m", "deftsim", "run", str(ROOT / "scenarios" / "quickstart.yaml"), "--out", str(folder),
           "--quiet", "--seed", str(seed), "--threads", str(threads),
           "--set", f"execution.precision={precision}", "--set", "stop.target_accuracy=null"]
    print("  $ " + " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"deftsim run failed ({res.returncode}): {res.stderr[-2000:]}")
    return json.loads((folder / "summary.json").read_text()), wall


def accuracy_gap(args: argparse.Namespace, threads: int) -> dict[str, object]:
    out: dict[str, object] = {}
    finals = {"fp32": [], "bf16": []}
    same = True
    with tempfile.TemporaryDirectory(prefix="bf16_vs_fp32_") as tmp:
        for seed in args.seeds:
            summaries = {}
            for precision in ("fp32", "bf16"):
                summaries[precision], wall = quickstart(precision, seed, Path(tmp) / f"{precision}_s{seed}", threads)
                s = summaries[precision]
                finals[precision].append(s["final_accuracy"])
                print(f"  seed {seed} {precision}: final accuracy {s['final_accuracy']:.4f}, best "
                      f"{s['best_accuracy']:.4f}, {s['rounds_completed']} rounds, simulated {s['sim_time_s']:.3f} s "
                      f"(wall {wall:.0f} s)")
            same &= all(summaries["fp32"][k] == summaries["bf16"][k] for k in TIMELINE_KEYS)
    for precision, values in finals.items():
        out[f"quickstart_final_accuracy_{precision}"] = sum(values) / len(values)
    out["quickstart_accuracy_gap"] = out["quickstart_final_accuracy_bf16"] - out["quickstart_final_accuracy_fp32"]
    out["quickstart_seeds"] = len(args.seeds)
    out["same_timeline"] = int(same)
    print(f"  mean final accuracy over seeds {args.seeds}: fp32 {out['quickstart_final_accuracy_fp32']:.4f}, "
          f"bf16 {out['quickstart_final_accuracy_bf16']:.4f} (gap {out['quickstart_accuracy_gap']:+.4f}); "
          f"simulated timelines {'identical' if same else 'DIFFERENT (a bug)'}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 repeats, no quickstart runs")
    ap.add_argument("--k", type=int, default=16, help="devices per call (batched: in one pass)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per trainer (default 5; quick 2)")
    ap.add_argument("--seeds", default="0", help="comma-separated run seeds of the quickstart pairs")
    ap.add_argument("--skip-quickstart", action="store_true")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="execution.device of the step trainers")
    args = ap.parse_args()
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    threads = set_threads()
    print(f"host: {cpu_name()} ({cpu_flags()}), {threads} torch threads")
    out = step_speed(args, threads)
    if not (args.quick or args.skip_quickstart):
        out.update(accuracy_gap(args, threads))
    out["threads"] = threads
    print(result_line(**out))


if __name__ == "__main__":
    main()
