"""Split fine-tuning's timeline at scale (torch-free): the edge's queue and what the per-step
round trips cost the simulator.

Every local step of the split protocol is five timed phases (device forward, uplink, the edge's
pass, downlink, device backward), against one compute phase per round in FedAvg. This script
runs the split protocol (``netsim.protocols.split_fl``) with a stand-in trainer whose per-step
costs are all-MiniLM-L6-v2's at cut 1, batch 8 x 32 tokens, 8 prompt tokens (counted by
``fomo.split_trainer``: device 1.152 + 1.182 GFLOP, edge 11.67 GFLOP, 491,840 B up and
491,520 B down), for N devices per round on a 1e14 and a 1e12 FLOP/s edge, with and without
batching, and reports:

1. the edge's load per point: utilisation, mean and p95 queueing delay, mean batch size, and
   the round's simulated duration;
2. the simulator's cost: wall time per logged event of the split protocol against FedAvg's
   on the same network and devices (same process, alternating, best of 3), as a ratio.

    python bench/split_edge_queue.py [--quick]

``--quick``: N up to 200 instead of 2,000. Ends with one line ``RESULT key=value ...``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_average  # noqa: E402

from netsim import FakeTrainer, FedAvgSimulation, Scenario  # noqa: E402
from netsim.interfaces import PlannedJob, RoundTripCost, SplitJobCost  # noqa: E402
from netsim.protocols.split_fl import SplitFedSimulation  # noqa: E402

STEP = RoundTripCost(device_forward_flops=1.152e9, uplink_bytes=491_840, edge_flops=1.167e10,
                     downlink_bytes=491_520, device_backward_flops=1.182e9)
"""One split step of all-MiniLM-L6-v2 at cut 1, batch 8 x 32 tokens, 8 prompt tokens."""

PROMPT_BYTES = 12_288
"""The 8 x 384 float32 prompt, sent each way once a round."""


class SplitCosts(FakeTrainer):
    """FakeTrainer whose plans carry the split step's round trips (values: the fake's)."""

    def adapter_bytes(self) -> int:
        return PROMPT_BYTES

    def plan(self, job, base):
        cost = SplitJobCost(flops=job.steps * (STEP.device_forward_flops + STEP.device_backward_flops),
                            peak_memory_bytes=60_256_768, update_bytes=PROMPT_BYTES,
                            num_examples=self.device_num_examples(job.device_id), steps=(STEP,) * job.steps)
        return PlannedJob(job, float(base), cost)


def scenario(devices: int, edge_flops_per_s: float, max_batch: int) -> Scenario:
    spec: dict[str, Any] = {
        "name": "bench", "trainer": "fake", "d2d": {"kind": "none"},
        "devices": [{"count": devices, "compute_flops_per_s": 1e12, "placement": {"max_distance_m": 250}}],
        "edge_servers": [{"compute_flops_per_s": edge_flops_per_s}],
        "channel": {"uplink_bandwidth_hz": 100e6, "downlink_bandwidth_hz": 100e6},
        "training": {"rounds": 1, "local_steps": 5},
        "fake": {"step_flops": STEP.device_forward_flops + STEP.device_backward_flops,
                 "adapter_bytes": PROMPT_BYTES},
        "split": {"edge_max_batch": max_batch, "edge_batch_overhead_s": 1e-3},
    }
    return Scenario.model_validate(spec)


def run(cls, trainer_cls, sc: Scenario):
    t0 = time.perf_counter()
    sim = cls(sc, 0, trainer_cls(sc, 0))
    sim.run()
    wall = time.perf_counter() - t0
    return sim, wall, len(sim.recorder.rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    counts = [10, 50, 200] if args.quick else [10, 100, 500, 2000]
    print(f"load average at start: {load_average()}")
    print(f"{'N':>6} {'edge FLOP/s':>11} {'batch':>5} {'util':>6} {'mean wait':>10} {'p95 wait':>9} "
          f"{'batch size':>10} {'round':>9} {'events':>8} {'events/s':>9}")
    results: dict[str, float] = {}
    for n in counts:
        for edge, batch in ((1e14, 1), (1e12, 1), (1e12, 8)):
            sim, wall, events = run(SplitFedSimulation, SplitCosts, scenario(n, edge, batch))
            e = sim.edge_summary()["edge0"]
            print(f"{n:>6} {edge:>11.0e} {batch:>5} {e['utilisation']:>6.3f} {1e3 * e['mean_queue_delay_s']:>8.2f}ms "
                  f"{1e3 * e['p95_queue_delay_s']:>7.2f}ms {e['mean_batch_size']:>10.2f} {sim.env.now:>8.2f}s "
                  f"{events:>8} {events / wall:>9.0f}")
            if edge == 1e12:
                results[f"util_N{n}_b{batch}"] = e["utilisation"]
                results[f"wait_ms_N{n}_b{batch}"] = 1e3 * e["mean_queue_delay_s"]
    # simulator cost per event: split vs FedAvg, same devices, alternating, best of 3
    n = counts[-1]
    best = {"split": float("inf"), "fedavg": float("inf")}
    for _ in range(3):
        for name, cls, trainer in (("split", SplitFedSimulation, SplitCosts), ("fedavg", FedAvgSimulation, FakeTrainer)):
            _, wall, events = run(cls, trainer, scenario(n, 1e14, 1))
            best[name] = min(best[name], wall / events)
    ratio = best["split"] / best["fedavg"]
    print(f"wall per event at N={n}: split {1e6 * best['split']:.1f} us, FedAvg {1e6 * best['fedavg']:.1f} us "
          f"(split / FedAvg = {ratio:.2f})")
    print("RESULT " + " ".join([f"split_over_fedavg_per_event={ratio:.3f}"]
                               + [f"{k}={v:.4g}" for k, v in results.items()]))


if __name__ == "__main__":
    main()
