"""Peak memory (RSS) of the real trainer for 10, 100 and 1000 simulated devices.

For each population size N a fresh Python process builds the real trainer (all-MiniLM-L6-v2,
BBC News split IID over N devices, LoRA r=8) and runs one FedAvg round of the real steps with
``--active`` devices (default: all N; one local step of 4 examples x 32 tokens each, batched
execution, 16 devices per pass), aggregates and evaluates. It reports the resident set size
after construction and the peak (``ru_maxrss``) over the whole process.

There is one frozen model whatever N is; a device's state is a slice of the data partition
plus, once it has trained, its batch-sampling generator; its PEFT tensors and optimizer state
exist only during its pass, and its update (one adapter-sized tensor set) until aggregation.
``kb_per_added_device`` is (peak at the largest N - peak at the second largest) / added
devices (both rounds run full passes, so the activations are the same): with every device
active it is dominated by the round's updates (adapter bytes each, held until aggregation);
``kb_per_idle_device`` is (RSS after construction at the largest N - at the smallest) / added
devices: the cost of a device that does not train.
For reference, a simulator that keeps one model copy per client needs N x the weights.

    python bench/memory_per_device.py [--quick] [--sizes 10,100,1000] [--active N]

Ends with ``RESULT peak_rss_mb_n10=... peak_rss_mb_n100=... peak_rss_mb_n1000=...
kb_per_added_device=... kb_per_idle_device=...``.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from _common import result_line

HERE = Path(__file__).resolve().parent


def rss_bytes() -> int:
    """Current resident set size [bytes] (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize()


def child(n: int, active: int, batch: int) -> dict:
    """Build the trainer for ``n`` devices and run one round with ``active`` of them."""
    from _common import set_threads, small_scenario

    set_threads()
    from fomo import build_trainer
    from netsim.interfaces import LocalJob

    t0 = time.perf_counter()
    scenario = small_scenario(n, batch_size=batch, execution={"strategy": "batched", "max_devices_per_pass": 16})
    trainer = build_trainer(scenario, seed=0)
    built_rss = rss_bytes()
    build_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    results = trainer.local_train([LocalJob(d, 1, 1, batch) for d in range(active)])
    total = sum(r.num_examples for r in results)
    trainer.aggregate(results, [r.num_examples / total for r in results])
    del results
    ev = trainer.evaluate()
    return {
        "n": n, "active": active, "built_rss": built_rss,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "build_s": build_s, "round_s": time.perf_counter() - t1, "accuracy": ev.accuracy,
        "adapter_bytes": trainer.adapter_bytes(), "weights_bytes": trainer._weights_bytes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="at most 100 active devices per round")
    ap.add_argument("--sizes", default="10,100,1000")
    ap.add_argument("--active", type=int, default=None, help="devices per round (default: all; quick: <= 100)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.active, args.batch)))
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for n in sizes:
        active = min(n, args.active or (100 if args.quick else n))
        out = subprocess.run(
            [sys.executable, str(HERE / "memory_per_device.py"), "--child", str(n), "--active", str(active),
             "--batch", str(args.batch)],
            capture_output=True, text=True, check=False,
        )
        if out.returncode != 0:
            sys.stderr.write(out.stderr)
            raise SystemExit(f"child for N={n} failed")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"N={n:5d} ({active} active): RSS after construction {row['built_rss'] / 2**20:7.1f} MB, "
              f"peak {row['peak_rss'] / 2**20:7.1f} MB (build {row['build_s']:.1f} s, round {row['round_s']:.1f} s; "
              f"one model copy per client would hold {n * row['weights_bytes'] / 2**30:.1f} GB of weights)")
    first, last = rows[0], rows[-1]
    before = rows[-2] if len(rows) > 1 else first
    values: dict[str, object] = {f"peak_rss_mb_n{r['n']}": r["peak_rss"] / 2**20 for r in rows}
    values["kb_per_added_device"] = (last["peak_rss"] - before["peak_rss"]) / max(last["n"] - before["n"], 1) / 1024
    values["kb_per_idle_device"] = (last["built_rss"] - first["built_rss"]) / max(last["n"] - first["n"], 1) / 1024
    values["adapter_kb"] = first["adapter_bytes"] / 1024
    values["active_max"] = last["active"]
    print(result_line(**values))


if __name__ == "__main__":
    main()
