"""Network-only speed: deftsim's FedAvg loop (fake trainer, no torch) vs. a bare SimPy loop.

1. Overhead ratio: wall time per event of deftsim's protocol (channel maths, fading over
   coherence blocks, recording) against a bare SimPy loop that schedules the same number of
   timeouts from the same number of processes, measured side by side in this process.
2. Large population: 10,000 devices for 100 rounds, 1,000 devices per round (10 %
   participation, the usual cross-device FL setting) and, for reference, fewer rounds with
   all 10,000 devices every round.

    python bench/network_only.py [--quick]

Ends with one line ``RESULT key=value ...``.
"""
from __future__ import annotations

import argparse
import time

import simpy

from netsim import FakeTrainer, FedAvgSimulation, Scenario


def scenario(devices: int, rounds: int, per_round: int) -> Scenario:
    return Scenario.model_validate({
        "name": "bench", "trainer": "fake", "d2d": {"kind": "none"},
        "devices": [{"count": devices, "placement": {"max_distance_m": 250}}],
        "channel": {"uplink_bandwidth_hz": 100e6, "downlink_bandwidth_hz": 100e6},
        "training": {"rounds": rounds, "devices_per_round": per_round},
    })


def run_deftsim(sc: Scenario) -> tuple[float, int]:
    t0 = time.perf_counter()
    sim = FedAvgSimulation(sc, 0, FakeTrainer(sc, 0))
    sim.run()
    events = len(sim.recorder.rows)
    return time.perf_counter() - t0, events


def run_bare_simpy(rounds: int, per_round: int) -> float:
    """Same shape of timeline: per round, per_round processes of 3 timeouts each, joined."""
    t0 = time.perf_counter()
    env = simpy.Environment()

    def device(env, k):
        yield env.timeout(0.01 + k * 1e-6)
        yield env.timeout(0.02)
        yield env.timeout(0.03)

    def main(env):
        for _ in range(rounds):
            yield simpy.AllOf(env, [env.process(device(env, k)) for k in range(per_round)])
            yield env.timeout(0.001)

    env.process(main(env))
    env.run()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rounds = 20 if args.quick else 100
    # 1. overhead ratio, interleaved repeats, best of 3
    sc = scenario(2000, rounds, 200)
    d_best, b_best, n_events = float("inf"), float("inf"), 0
    for _ in range(3):
        d, n_events = run_deftsim(sc)
        b = run_bare_simpy(rounds, 200)
        d_best, b_best = min(d_best, d), min(b_best, b)
    print(f"deftsim: {n_events} events in {d_best:.3f} s ({n_events / d_best:,.0f} events/s); "
          f"bare SimPy with the same timeouts: {b_best:.3f} s")
    # 2. large population
    big, big_events = run_deftsim(scenario(10_000, rounds, 1000))
    print(f"10,000 devices x {rounds} rounds, 1,000 per round: {big:.1f} s wall, {big_events:,} events")
    all_rounds = 2 if args.quick else 10
    full, full_events = run_deftsim(scenario(10_000, all_rounds, 10_000))
    print(f"10,000 devices x {all_rounds} rounds, all devices every round: {full:.1f} s wall, {full_events:,} events")
    print(f"RESULT events_per_s={n_events / d_best:.0f} overhead_vs_bare_simpy={d_best / b_best:.2f} "
          f"wall_10k_dev_{rounds}_rounds_s={big:.1f} wall_10k_all_per_round_{all_rounds}_rounds_s={full:.1f}")


if __name__ == "__main__":
    main()
