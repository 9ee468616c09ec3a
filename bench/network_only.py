"""Network-only speed: deftsim's FedAvg loop (fake trainer, no torch) vs. a bare SimPy loop.

1. Overhead ratio: wall time per event of deftsim's protocol (channel maths, fading over
   coherence blocks, recording) against a bare SimPy loop that schedules the same number of
   timeouts from the same number of processes, measured side by side in this process.
2. Large population: 10,000 devices for 100 rounds, 1,000 devices per round (10 %
   participation, the usual cross-device FL setting) and, for reference, fewer rounds with
   all 10,000 devices every round.
3. Dynamics at scale: 100,000 devices for 10 rounds, 1,000 per round, with availability (the
   on/off Markov chain, mean on 600 s / off 200 s, stationary start) and mobility (random
   waypoint, 0.5-1.5 m/s, positions, gains and server association updated every 1 s tick)
   on: the mobility tick moves every device, so its cost grows with the population, not with
   the devices per round.

Wall times include building the network (positions, links, per-device streams), as a user
waits for it; the events/s count the rows of the event log over the whole wall time.

    python bench/network_only.py [--quick]

``--quick``: 20 rounds instead of 100 (parts 1 and 2), 2 rounds instead of 10 (part 3).

Ends with one line ``RESULT key=value ...``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Optional

import simpy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_average  # noqa: E402

from netsim import FakeTrainer, FedAvgSimulation, Scenario  # noqa: E402

DYNAMICS: dict[str, Any] = {
    "availability": {"model": "markov", "mean_on_s": 600.0, "mean_off_s": 200.0},
    "mobility": {"model": "random_waypoint", "tick_s": 1.0, "v_min_mps": 0.5, "v_max_mps": 1.5},
}
"""Part 3's dynamics section: device churn and movement on."""


def scenario(devices: int, rounds: int, per_round: int, dynamics: Optional[dict] = None) -> Scenario:
    spec: dict[str, Any] = {
        "name": "bench", "trainer": "fake", "d2d": {"kind": "none"},
        "devices": [{"count": devices, "placement": {"max_distance_m": 250}}],
        "channel": {"uplink_bandwidth_hz": 100e6, "downlink_bandwidth_hz": 100e6},
        "training": {"rounds": rounds, "devices_per_round": per_round},
    }
    if dynamics:
        spec["dynamics"] = dynamics
    return Scenario.model_validate(spec)


def run_deftsim(sc: Scenario) -> tuple[float, int]:
    wall, events, _ = run_deftsim_counted(sc)
    return wall, events


def run_deftsim_counted(sc: Scenario) -> tuple[float, int, dict]:
    """(wall seconds including the network build, event-log rows, the run's counters:
    dropped updates, handovers, ...) of one FedAvg run with the fake trainer."""
    t0 = time.perf_counter()
    sim = FedAvgSimulation(sc, 0, FakeTrainer(sc, 0))
    sim.run()
    events = len(sim.recorder.rows)
    return time.perf_counter() - t0, events, dict(sim.counters)


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
    print(f"load average before: {load_average()}")
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
    print(f"10,000 devices x {rounds} rounds, 1,000 per round: {big:.1f} s wall, {big_events:,} events "
          f"({big_events / big:,.0f} events/s)")
    all_rounds = 2 if args.quick else 10
    full, full_events = run_deftsim(scenario(10_000, all_rounds, 10_000))
    print(f"10,000 devices x {all_rounds} rounds, all devices every round: {full:.1f} s wall, {full_events:,} events "
          f"({full_events / full:,.0f} events/s)")
    # 3. 100,000 devices with availability and mobility
    dyn_rounds = 2 if args.quick else 10
    huge, huge_events, counters = run_deftsim_counted(scenario(100_000, dyn_rounds, 1000, DYNAMICS))
    print(f"100,000 devices x {dyn_rounds} rounds, 1,000 per round, markov availability + random waypoint "
          f"(1 s tick): {huge:.1f} s wall, {huge_events:,} events ({huge_events / huge:,.0f} events/s); "
          f"{counters.get('dropped_updates', 0)} updates dropped (device went off), "
          f"{counters.get('handovers', 0)} handovers")
    print(f"load average after: {load_average()}")
    print(f"RESULT events_per_s={n_events / d_best:.0f} overhead_vs_bare_simpy={d_best / b_best:.2f} "
          f"wall_10k_dev_{rounds}_rounds_s={big:.1f} wall_10k_all_per_round_{all_rounds}_rounds_s={full:.1f} "
          f"wall_100k_dev_{dyn_rounds}_rounds_dynamics_s={huge:.1f} "
          f"events_per_s_100k_dynamics={huge_events / huge:.0f}")


if __name__ == "__main__":
    main()
