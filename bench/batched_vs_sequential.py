"""Batched vs. sequential real PEFT steps for K devices per round (same process, interleaved).

Two trainers built from the same scenario and seed, one with ``execution.strategy: sequential``
and one with ``batched``, get the same ``local_train`` calls: K devices, ``--steps`` local
AdamW steps each, ``--batch`` examples of up to ``--tokens`` tokens (LoRA r=8 on query/value of
all-MiniLM-L6-v2, BBC News). Repeats alternate which trainer goes first. The speedup is
min(sequential) / min(batched) over the repeats: the minimum is the estimate least disturbed by
other processes on the machine (medians are printed too). Every call's updates, losses, FLOPs
and memory are compared: ``max_abs_diff`` is the largest |difference| of any update tensor
(0 means bitwise identical), ``same_costs=1`` means every device reported the same FLOPs,
memory and loss.

    python bench/batched_vs_sequential.py [--quick] [--ks 1,4,16,64] [--batch 4] [--steps 1]
                                          [--method lora|prompt_tuning]

Also prints the counted FLOPs per second of both strategies against the float32 matmul peak
of this machine (one large ``torch.mm``, same process): when the batched step already runs at
the peak, ``speedup_bound_k<K>`` = peak / sequential GFLOP/s is the most any batching can gain.
The counted FLOPs are the device's whole-model step; both trainers run with the default
``execution.prune_last_block`` (the host skips about 14 % of them, see fomo/last_block.py), so
these are effective rates, and the bound is an underestimate by that much.

Ends with ``RESULT batched_speedup_k1=... gflops_sequential_k1=... gflops_batched_k1=...
speedup_bound_k1=... ... max_abs_diff=... same_costs=1 matmul_peak_gflops=...``.
"""
from __future__ import annotations

import argparse

from _common import matmul_peak_gflops, max_abs_diff, median, result_line, set_threads, small_scenario, timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="K = 1, 4, 16; 3 repeats")
    ap.add_argument("--ks", default=None, help="comma-separated device counts (default 1,4,16,64)")
    ap.add_argument("--batch", type=int, default=4, help="examples per device step")
    ap.add_argument("--tokens", type=int, default=32, help="max tokens per example")
    ap.add_argument("--steps", type=int, default=1, help="local steps per device and call")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per K and strategy (default 5; quick 3)")
    ap.add_argument("--pass-devices", type=int, default=16, help="execution.max_devices_per_pass")
    ap.add_argument("--method", default="lora", choices=["lora", "prompt_tuning"],
                    help="peft.method (LoRA r=8 on query/value, or prompt tuning with 8 virtual tokens)")
    args = ap.parse_args()
    ks = [int(k) for k in (args.ks or ("1,4,16" if args.quick else "1,4,16,64")).split(",")]
    repeats = args.repeats or (3 if args.quick else 5)
    threads = set_threads()

    from fomo import build_trainer
    from netsim.interfaces import LocalJob

    base = dict(devices=max(max(ks), 2), batch_size=args.batch, tokens=args.tokens,
                peft={"method": args.method, "num_virtual_tokens": 8})
    seq = build_trainer(small_scenario(**base, execution={"strategy": "sequential"}), seed=0)
    bat = build_trainer(small_scenario(
        **base, execution={"strategy": "batched", "max_devices_per_pass": args.pass_devices}), seed=0)
    assert bat.strategy == "batched", bat.execution_notes
    print(f"threads={threads} {args.method} batch={args.batch}x{args.tokens} tokens, steps={args.steps}, repeats={repeats}, "
          f"max_devices_per_pass={args.pass_devices}")

    round_ = 1

    def jobs(k: int) -> list:
        return [LocalJob(d, round_, args.steps, args.batch) for d in range(k)]

    seq.local_train(jobs(2))  # warm-up: profiles the step shape in both trainers (not timed)
    bat.local_train(jobs(2))
    peak = matmul_peak_gflops()
    print(f"float32 matmul peak here: {peak:.1f} GFLOP/s ({threads} threads)")

    out: dict[str, object] = {}
    worst, same_costs = 0.0, True
    for k in ks:
        t_seq: list[float] = []
        t_bat: list[float] = []
        for rep in range(repeats):
            round_ += 1
            order = [("seq", seq), ("bat", bat)] if rep % 2 == 0 else [("bat", bat), ("seq", seq)]
            got = {}
            for name, trainer in order:
                dt, got[name] = timed(lambda: trainer.local_train(jobs(k)))
                (t_seq if name == "seq" else t_bat).append(dt)
            worst = max(worst, max_abs_diff(got["seq"], got["bat"]))
            same_costs &= all(a.flops == b.flops and a.peak_memory_bytes == b.peak_memory_bytes
                              and a.loss == b.loss for a, b in zip(got["seq"], got["bat"]))
        speedup = min(t_seq) / min(t_bat)
        steps = k * args.steps
        step_flops = sum(r.flops for r in got["seq"])   # counted FLOPs of the K devices' steps
        gflops_seq, gflops_bat = step_flops / min(t_seq) / 1e9, step_flops / min(t_bat) / 1e9
        print(f"K={k:3d}: ms per device step: sequential {1000 * min(t_seq) / steps:6.1f} "
              f"(median {1000 * median(t_seq) / steps:6.1f}), batched {1000 * min(t_bat) / steps:6.1f} "
              f"(median {1000 * median(t_bat) / steps:6.1f}) -> speedup {speedup:.2f}x "
              f"(medians {median(t_seq) / median(t_bat):.2f}x)")
        print(f"        counted FLOPs per second: sequential {gflops_seq:6.1f} GFLOP/s, batched {gflops_bat:6.1f} "
              f"GFLOP/s; matmul peak {peak:6.1f} GFLOP/s -> a compute-bound batched step can reach at most "
              f"{peak / gflops_seq:.2f}x")
        out[f"batched_speedup_k{k}"] = speedup
        out[f"gflops_sequential_k{k}"] = gflops_seq
        out[f"gflops_batched_k{k}"] = gflops_bat
        out[f"speedup_bound_k{k}"] = peak / gflops_seq
    out["max_abs_diff"] = worst
    out["same_costs"] = int(same_costs)
    out["matmul_peak_gflops"] = peak
    out["method"] = args.method
    out["batch"] = args.batch
    out["tokens"] = args.tokens
    print(result_line(**out))


if __name__ == "__main__":
    main()
