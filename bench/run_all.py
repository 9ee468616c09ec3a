"""Run every benchmark under bench/ and collect their ``RESULT`` lines.

Each benchmark runs as its own Python process (so one's memory or threads cannot affect the
next), in this order: network_only, split_edge_queue, engine_overhead, quickstart_overhead, contention,
batched_vs_sequential, activation_cache, prompt_library, memory_per_device, overhead_vs_bare_torch,
flower_vs_deftsim. ``--quick`` runs them at reduced size (under 10 minutes on a quiet 2-core
CPU); without it, at full size.
A benchmark that fails or is missing is reported and the others still run.

    python bench/run_all.py --quick [--only batched_vs_sequential,activation_cache] [--out results.txt]

Prints every benchmark's ``RESULT`` line prefixed with its name, and ends with
``RESULT benchmarks=N failed=F wall_s=...``.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (quick arguments, full arguments)
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "network_only": (["--quick"], []),
    "split_edge_queue": (["--quick"], []),
    "engine_overhead": (["--quick"], []),
    "quickstart_overhead": (["--rounds", "2"], []),
    "contention": (["--quick"], []),
    "batched_vs_sequential": (["--quick"], []),
    "activation_cache": (["--quick"], []),
    "prompt_library": (["--quick"], []),
    "memory_per_device": (["--quick"], []),
    "overhead_vs_bare_torch": (["--quick"], []),
    "flower_vs_deftsim": (["--quick"], []),
    "peft_methods": (["--quick"], []),
    "cost_model": (["--arch", "llama-2-7b", "t5-xxl"], []),
    "bf16_vs_fp32": (["--quick"], []),
}


def last_result(text: str) -> str | None:
    lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
    return lines[-1] if lines else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced sizes (< 10 minutes)")
    ap.add_argument("--only", default=None, help="comma-separated benchmark names")
    ap.add_argument("--out", default=None, help="also append the RESULT lines to this file")
    ap.add_argument("--verbose", action="store_true", help="show each benchmark's full output")
    args = ap.parse_args()
    names = list(BENCHMARKS) if args.only is None else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; known: {list(BENCHMARKS)}")

    t_all = time.perf_counter()
    lines: list[str] = []
    failed = 0
    for name in names:
        script = HERE / f"{name}.py"
        quick_args, full_args = BENCHMARKS[name]
        cmd = [sys.executable, str(script), *(quick_args if args.quick else full_args)]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        if not script.is_file():
            line = f"{name}: MISSING ({script} does not exist)"
            failed += 1
        else:
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent, check=False)
            wall = time.perf_counter() - t0
            output = proc.stdout + proc.stderr
            if args.verbose:
                print(output)
            result = last_result(proc.stdout)
            if proc.returncode != 0 or result is None:
                failed += 1
                tail = "\n".join(output.strip().splitlines()[-15:])
                line = f"{name}: FAILED (exit {proc.returncode}, {wall:.0f} s)\n{tail}"
            else:
                line = f"{name}: {result}  ({wall:.0f} s)"
        print(line, flush=True)
        lines.append(line)
    total = time.perf_counter() - t_all
    summary = f"RESULT benchmarks={len(names)} failed={failed} wall_s={total:.0f} quick={int(args.quick)}"
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines + [summary]) + "\n")
    print(summary)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
