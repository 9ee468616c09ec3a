"""Frozen-prefix activation cache: step time with LoRA on the top 2 of 6 blocks, cached vs. not.

Two trainers built from the same scenario and seed (all-MiniLM-L6-v2, BBC News, LoRA r=8 on
query/value of blocks 4 and 5 only, sequential strategy) differ only in
``execution.activation_cache_bytes`` (0 vs. 512 MB). The cache is first filled with the
benchmark devices' examples (a one-time cost, reported), then both get the same
``local_train`` calls, alternating which goes first; the step speedup is min(uncached) /
min(cached) over the repeats (the estimate least disturbed by other processes; medians are
printed too). Evaluation of the global model (256 test examples) is timed the same way.
The FLOPs, memory, upload bytes and example counts each device reports, and the evaluation's
FLOPs, must be identical on any machine (``same_costs=1``): the simulated device has no cache.
The values are compared separately: ``values_within_tol=1`` when the losses agree within 1e-4
relative and the updates within 1e-2 relative L2 (``max_loss_rel_diff``, ``update_rel_l2``;
``max_abs_diff`` is the largest |difference| of any update coordinate, 0 when bitwise equal,
which depends on the CPU's kernels; see bench/_common.py).

    python bench/activation_cache.py [--quick] [--devices 8] [--batch 8] [--steps 2]

Ends with ``RESULT cache_step_speedup=... eval_speedup=... same_costs=1 values_within_tol=1 ...``.
"""
from __future__ import annotations

import argparse

import numpy as np

from _common import (F32_LOSS_RTOL, F32_UPDATE_REL_L2_TOL, loss_rel_diff, max_abs_diff, median, result_line,
                     same_costs, set_threads, small_scenario, timed, update_rel_l2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 devices, 3 repeats")
    ap.add_argument("--devices", type=int, default=None, help="devices per round (default 8; quick 4)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None, help="default 5; quick 3")
    args = ap.parse_args()
    k = args.devices or (4 if args.quick else 8)
    repeats = args.repeats or (3 if args.quick else 5)
    threads = set_threads()

    from fomo import build_trainer
    from netsim.interfaces import LocalJob

    common = dict(devices=max(k, 8), batch_size=args.batch, tokens=args.tokens,
                  peft={"layers": [4, 5]}, data={"max_test_examples": 256})
    plain = build_trainer(small_scenario(**common), seed=0)
    cached = build_trainer(small_scenario(**common, execution={"activation_cache_bytes": 512 * 2**20}), seed=0)
    cache = cached.activation_cache
    assert cache is not None, cached.execution_notes
    print(f"threads={threads} LoRA on blocks 4,5 of 6; {k} devices x {args.steps} steps x "
          f"{args.batch}x{args.tokens} tokens per round; repeats={repeats}")

    # one-time cost: the frozen prefix of every example the devices (and the test set) hold
    examples = np.concatenate([cached._device_examples[d] for d in range(k)] + [cached._test_examples])
    fill_s, _ = timed(lambda: cache.rows(examples))
    print(f"cache fill: {len(examples)} examples in {fill_s:.2f} s, {cache.bytes_used / 2**20:.1f} MB")

    round_ = 0

    def jobs() -> list:
        return [LocalJob(d, round_, args.steps, args.batch) for d in range(k)]

    round_ += 1  # warm-up: profiles the shapes in both trainers
    plain.local_train(jobs())
    cached.local_train(jobs())
    plain.evaluate()
    cached.evaluate()

    hits_before, misses_before = cache.hits, cache.misses  # hit rate of the timed calls only
    t_plain: list[float] = []
    t_cached: list[float] = []
    e_plain: list[float] = []
    e_cached: list[float] = []
    worst, loss_gap, l2_gap, costs_equal = 0.0, 0.0, 0.0, True
    for rep in range(repeats):
        round_ += 1
        order = [("plain", plain), ("cached", cached)]
        if rep % 2:
            order.reverse()
        got = {}
        for name, trainer in order:
            dt, got[name] = timed(lambda: trainer.local_train(jobs()))
            (t_plain if name == "plain" else t_cached).append(dt)
            de, ev = timed(trainer.evaluate)
            (e_plain if name == "plain" else e_cached).append(de)
            got[name + "_eval"] = ev
        worst = max(worst, max_abs_diff(got["plain"], got["cached"]))
        loss_gap = max(loss_gap, loss_rel_diff(got["plain"], got["cached"]),
                       abs(got["plain_eval"].loss - got["cached_eval"].loss) / got["plain_eval"].loss)
        l2_gap = max(l2_gap, update_rel_l2(got["plain"], got["cached"]))
        costs_equal &= same_costs(got["plain"], got["cached"])
        costs_equal &= got["plain_eval"].flops == got["cached_eval"].flops
    steps = k * args.steps
    speedup = min(t_plain) / min(t_cached)
    eval_speedup = min(e_plain) / min(e_cached)
    print(f"local steps: uncached {1000 * min(t_plain) / steps:.1f} ms/step (median "
          f"{1000 * median(t_plain) / steps:.1f}), cached {1000 * min(t_cached) / steps:.1f} ms/step (median "
          f"{1000 * median(t_cached) / steps:.1f}) -> {speedup:.2f}x (medians {median(t_plain) / median(t_cached):.2f}x)")
    print(f"evaluation:  uncached {min(e_plain):.2f} s, cached {min(e_cached):.2f} s -> {eval_speedup:.2f}x "
          f"(medians {median(e_plain) / median(e_cached):.2f}x)")
    hits = cache.hits - hits_before
    lookups = hits + cache.misses - misses_before
    within = loss_gap <= F32_LOSS_RTOL and l2_gap <= F32_UPDATE_REL_L2_TOL
    print(f"costs (FLOPs, memory, bytes, examples): {'identical' if costs_equal else 'DIFFERENT (a bug)'}; "
          f"values: losses {loss_gap:.2g} relative (tolerance {F32_LOSS_RTOL:g}), updates {l2_gap:.2g} "
          f"relative L2 (tolerance {F32_UPDATE_REL_L2_TOL:g}) -> {'within' if within else 'OUTSIDE'} tolerance")
    print(result_line(cache_step_speedup=speedup, eval_speedup=eval_speedup, same_costs=int(costs_equal),
                      values_within_tol=int(within), max_loss_rel_diff=loss_gap, update_rel_l2=l2_gap,
                      max_abs_diff=worst, hit_rate=hits / max(lookups, 1), fill_s=fill_s))


if __name__ == "__main__":
    main()
