"""Batched vs. sequential real PEFT steps for K devices per round (same process, interleaved).

Two trainers built from the same scenario and seed, one with ``execution.strategy: sequential``
and one with ``batched``, get the same ``local_train`` calls: K devices, ``--steps`` local
AdamW steps each, ``--batch`` examples of up to ``--tokens`` tokens (LoRA r=8 on query/value of
all-MiniLM-L6-v2, BBC News). Repeats alternate which trainer goes first. The speedup is
min(sequential) / min(batched) over the repeats: the minimum is the estimate least disturbed by
other processes on the machine (medians are printed too). Every call's results are compared,
in two separate verdicts:

* ``same_costs=1``: every device reported the same FLOPs, peak memory, upload bytes and example
  count, which is all the simulated timeline is made of. These must be identical on any
  machine; 0 would be a bug.
* values: ``max_loss_rel_diff`` (largest relative difference of a device's mean loss),
  ``update_rel_l2`` (|u_seq - u_bat|_2 / |u_seq|_2 over all update tensors) and
  ``max_abs_diff`` (largest |difference| of any update coordinate; 0 means bitwise
  identical, which holds on some CPUs and not on others: the kernels of each CPU family sum
  in their own order). ``values_within_tol=1`` when the losses agree within 1e-4 relative and
  the updates within 1e-2 relative L2 (see ``bench/_common.py`` for why).

    python bench/batched_vs_sequential.py [--quick] [--ks 1,4,16,64] [--batch 4] [--steps 1]
                                          [--method lora|prompt_tuning]
                                          [--device cpu|cuda|auto] [--precision fp32|bf16]

``--device`` / ``--precision`` set ``execution.device`` / ``execution.precision`` of both
trainers (fomo/execution.py; docs/gpu_precision.md), so the speedup is batched against
sequential on the same device and precision, in the same process. On a GPU the peak below is
that of one large float32 ``torch.mm`` on the GPU; with bf16 (on either device), of one large
bfloat16 ``torch.mm``.

Also prints the counted FLOPs per second of both strategies against the float32 matmul peak
of the host (one large ``torch.mm``, same process): when the batched step already runs at
the peak, ``speedup_bound_k<K>`` = peak / sequential GFLOP/s is the most any batching can gain.
The counted FLOPs are the device's whole-model step; both trainers run with the default
``execution.prune_last_block`` (the host skips about 14 % of them, see fomo/last_block.py), so
these are effective rates, and the bound is an underestimate by that much.

Ends with ``RESULT batched_speedup_k1=... gflops_sequential_k1=... gflops_batched_k1=...
speedup_bound_k1=... ... same_costs=1 values_within_tol=1 max_loss_rel_diff=... update_rel_l2=...
max_abs_diff=... matmul_peak_gflops=... device=... precision=...``. With bf16 the values
verdict uses the bfloat16 loss tolerance (5 x 2 x 2^-8 relative, tests/fomo/test_execution.py)
and no update tolerance (AdamW amplifies bf16 rounding of near-zero gradients to order lr).
"""
from __future__ import annotations

import argparse

import time

from _common import (F32_LOSS_RTOL, F32_UPDATE_REL_L2_TOL, loss_rel_diff, matmul_peak_gflops, max_abs_diff, median,
                     result_line, same_costs, set_threads, small_scenario, timed, update_rel_l2)

BF16_LOSS_RTOL = 5 * 2 * 2.0**-8
"""bf16 losses of two strategies: 2u per product (both factors rounded to bfloat16) times a
forward conditioning of about 5 (tests/fomo/test_execution.py)."""


def device_matmul_peak_gflops(device: str, precision: str, seconds: float = 1.0) -> float:
    """Best GFLOP/s of one large ``torch.mm`` (4096 x 384 @ 384 x 1536) on ``device`` (the CPU
    or a CUDA GPU, synchronised timings), in float32 or bfloat16."""
    import torch

    def sync() -> None:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(4096, 384, device=device, dtype=dtype)
    b = torch.randn(384, 1536, device=device, dtype=dtype)
    flops = 2.0 * 4096 * 384 * 1536
    torch.mm(a, b)
    sync()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = max(best, flops / (time.perf_counter() - t0) / 1e9)
    return best


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
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="execution.device of both trainers")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="execution.precision of both trainers")
    args = ap.parse_args()
    ks = [int(k) for k in (args.ks or ("1,4,16" if args.quick else "1,4,16,64")).split(",")]
    repeats = args.repeats or (3 if args.quick else 5)
    threads = set_threads()

    from fomo import build_trainer
    from netsim.interfaces import LocalJob

    base = dict(devices=max(max(ks), 2), batch_size=args.batch, tokens=args.tokens,
                peft={"method": args.method, "num_virtual_tokens": 8})
    placement = {"device": args.device, "precision": args.precision}
    seq = build_trainer(small_scenario(**base, execution={"strategy": "sequential", **placement}), seed=0)
    bat = build_trainer(small_scenario(
        **base, execution={"strategy": "batched", "max_devices_per_pass": args.pass_devices, **placement}), seed=0)
    assert bat.strategy == "batched", bat.execution_notes
    device = str(bat.placement.device)
    print(f"threads={threads} {args.method} batch={args.batch}x{args.tokens} tokens, steps={args.steps}, repeats={repeats}, "
          f"max_devices_per_pass={args.pass_devices}, device={device} ({bat.placement.note}), precision={args.precision}")

    round_ = 1

    def jobs(k: int) -> list:
        return [LocalJob(d, round_, args.steps, args.batch) for d in range(k)]

    seq.local_train(jobs(2))  # warm-up: profiles the step shape in both trainers (not timed)
    bat.local_train(jobs(2))
    if bat.placement.on_cpu and args.precision == "fp32":
        peak = matmul_peak_gflops()
        print(f"float32 matmul peak: {peak:.1f} GFLOP/s ({threads} threads)")
    else:
        peak = device_matmul_peak_gflops(device, args.precision)
        print(f"{'bfloat16' if args.precision == 'bf16' else 'float32'} matmul peak on {device}: {peak:.1f} GFLOP/s")

    out: dict[str, object] = {}
    worst, loss_gap, l2_gap, costs_equal = 0.0, 0.0, 0.0, True
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
            loss_gap = max(loss_gap, loss_rel_diff(got["seq"], got["bat"]))
            l2_gap = max(l2_gap, update_rel_l2(got["seq"], got["bat"]))
            costs_equal &= same_costs(got["seq"], got["bat"])
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
    loss_tol, l2_tol = (BF16_LOSS_RTOL, float("inf")) if args.precision == "bf16" else (F32_LOSS_RTOL, F32_UPDATE_REL_L2_TOL)
    within = loss_gap <= loss_tol and l2_gap <= l2_tol
    print(f"costs (FLOPs, memory, bytes, examples): {'identical' if costs_equal else 'DIFFERENT (a bug)'}; "
          f"values: losses {loss_gap:.2g} relative (tolerance {loss_tol:g}), updates {l2_gap:.2g} "
          f"relative L2 (tolerance {l2_tol:g}), max |update diff| {worst:.2g}"
          f" -> {'within' if within else 'OUTSIDE'} tolerance")
    out["same_costs"] = int(costs_equal)
    out["values_within_tol"] = int(within)
    out["max_loss_rel_diff"] = loss_gap
    out["update_rel_l2"] = l2_gap
    out["max_abs_diff"] = worst
    out["matmul_peak_gflops"] = peak
    out["method"] = args.method
    out["batch"] = args.batch
    out["tokens"] = args.tokens
    out["device"] = device
    out["precision"] = args.precision
    print(result_line(**out))


if __name__ == "__main__":
    main()
