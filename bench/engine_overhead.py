"""Cost of training at event boundaries: the engine against bare loops, in one process.

1. ``engine_ratio``: the quickstart workload (scenarios/quickstart.yaml, real trainer,
   ``execution.strategy: batched``) run through the FedAvg protocol on the engine (SimPy timeline, channel
   maths, event log, jobs planned at their simulated start and executed when first read)
   against a bare loop that makes the same trainer calls for the same jobs and nothing else:
   per round ``plan`` the devices' jobs from the current global state, ``execute`` them in
   one call, ``aggregate`` with the FedAvg weights n_k / sum n_j, ``evaluate``. The jobs (which
   devices in which round) are read from the engine run's event log, and both runs start from
   the same trainer state, so they compute the same floats: the bench checks that the two
   final global states are bit-identical. ``engine_ratio`` = bare time / engine time (a
   throughput ratio; 1 = no overhead). ``round_sync_ratio``: the same against the old
   round-synchronous path, ``trainer.local_train(jobs)`` once per round.
   An untimed engine run first warms the caches (FLOPs per batch shape) and gives the jobs;
   then the three runs alternate (each goes first in turn) and each keeps its best of N, so
   load from other processes falls on all of them and the slowed-down repeats are discarded.
2. Mean jobs per batched pass (``engine.stats()``): the synchronous quickstart, and the
   quickstart made asynchronous (``training.mode: asynchronous``, FedBuff with buffer_size 4,
   ``async_fl.concurrency`` 8).
3. Events per second of the fake-trainer protocol loop (scenarios/network_only.yaml: rows of
   the event log / wall time of ``sim.run()``, the network built beforehand) against bare
   SimPy (one process per device of a round, each looping on ``env.timeout``; at least
   200,000 timeouts), alternating, best of 5 (3 with ``--quick``) after a warm-up.

    python bench/engine_overhead.py [--quick] [--repeats N]

``--quick`` runs 3 rounds instead of 12 (engine ratio, both batching figures, events/s).

Ends with one line ``RESULT key=value ...``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (ROOT, bare_simpy_timeouts_s, load_average, min_of_alternating_clocks,  # noqa: E402
                     result_line, set_threads, timed)

QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"
NETWORK_ONLY = ROOT / "scenarios" / "network_only.yaml"
BATCHED = ["execution.strategy=batched"]
"""The quickstart as the batched workload (its file leaves the execution strategy at the
default); the rest of ``execution`` stays as the scenario has it, for every run alike."""
MIN_BARE_TIMEOUTS = 200_000
"""The bare SimPy loop schedules at least this many timeouts (a few tenths of a second), so its
rate is measured over more than the timer's resolution."""
ASYNC_OVERRIDES = [
    "training.mode=asynchronous",
    "strategies.aggregation={name: fedbuff, params: {buffer_size: 4}}",
    "async_fl.concurrency=8",
]


class TrainerReset:
    """Puts a real trainer back in its initial state between timed runs: the initial global
    PEFT state and fresh batch-sampling generators (they are created from the seed on each
    device's first job), so every run draws the same batches and computes the same floats.
    Uses the trainer's private fields (a benchmark's liberty); the profiling caches (FLOPs per
    shape) stay warm for every run alike."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.initial = trainer.global_state()

    def __call__(self) -> None:
        t = self.trainer
        t._global = {n: x.clone() for n, x in self.initial.items()}
        t._load_state(t._global)
        t._device_rngs.clear()


def jobs_by_round(sim) -> list[tuple[int, list[int]]]:
    """(round, sorted device indices) of every round of a finished run, from its ``compute``
    events."""
    from netsim.records import COLUMNS

    kind, node, rnd = COLUMNS.index("kind"), COLUMNS.index("node"), COLUMNS.index("round")
    rounds: dict[int, list[int]] = {}
    for row in sim.recorder.rows:
        if row[kind] == "compute":
            rounds.setdefault(row[rnd], []).append(int(row[node].removeprefix("dev")))
    return [(r, sorted(devs)) for r, devs in sorted(rounds.items())]


def bare_loop(trainer, schedule, steps: int, batch_size: int, round_sync: bool) -> None:
    """The same trainer calls as a FedAvg run, without SimPy, the engine or the event log."""
    import numpy as np

    from netsim.interfaces import LocalJob

    trainer.evaluate()                      # round 0, as the protocol does
    for r, devices in schedule:
        jobs = [LocalJob(d, r, steps, batch_size) for d in devices]
        if round_sync:
            results = trainer.local_train(jobs)
        else:
            base = trainer.snapshot()
            results = trainer.execute([trainer.plan(job, base) for job in jobs])
        n = np.array([res.num_examples for res in results], dtype=np.float64)
        trainer.aggregate(results, [float(w) for w in n / n.sum()])
        trainer.evaluate()


def same_state(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def engine_vs_bare(rounds: int | None, repeats: int) -> dict:
    from deftsim.build import make_trainer
    from deftsim.config import load_scenario
    from netsim.protocols import make_simulation

    overrides = BATCHED + ([f"training.rounds={rounds}"] if rounds else [])
    sc = load_scenario(QUICKSTART, overrides)
    setup_s, trainer = timed(lambda: make_trainer(sc, sc.seed))
    reset = TrainerReset(trainer)
    tr = sc.training
    holder: dict = {}
    final: dict = {}

    def engine_run():
        reset()
        sim = make_simulation(sc, sc.seed, trainer)
        sim.run()
        holder["sim"] = sim
        final["engine"] = trainer.global_state()

    def bare_run(name: str, round_sync: bool):
        def run():
            reset()
            bare_loop(trainer, holder["schedule"], tr.local_steps, tr.batch_size, round_sync)
            final[name] = trainer.global_state()
        return run

    warm_s, _ = timed(engine_run)           # warm-up: step profiles, allocator, schedule
    holder["schedule"] = jobs_by_round(holder["sim"])
    clocks = min_of_alternating_clocks({"engine": engine_run, "bare": bare_run("bare", False),
                                        "round_sync": bare_run("round_sync", True)}, repeats)
    sim = holder["sim"]
    steps = sum(len(devs) for _, devs in holder["schedule"]) * tr.local_steps
    identical = same_state(final["engine"], final["bare"]) and same_state(final["engine"], final["round_sync"])
    return {"setup_s": setup_s, "warm_s": warm_s, "best": clocks["wall"], "cpu": clocks["cpu"], "steps": steps,
            "identical": identical, "rounds": len(holder["schedule"]), "stats": sim.engine.stats(),
            "trainer": trainer, "reset": reset, "strategy": trainer.strategy}


def async_batching(trainer, reset: TrainerReset, rounds: int | None) -> tuple[float, dict]:
    """Wall time and ``engine.stats()`` of the asynchronous quickstart (FedBuff), on the
    already-built trainer (same data split and model), put back in its initial state first."""
    from deftsim.config import load_scenario
    from netsim.protocols import make_simulation

    overrides = BATCHED + ASYNC_OVERRIDES + ([f"training.rounds={rounds}"] if rounds else [])
    sc = load_scenario(QUICKSTART, overrides)
    reset()
    sim = make_simulation(sc, sc.seed, trainer)
    wall, _ = timed(sim.run)
    return wall, sim.engine.stats()


def protocol_events_per_s(repeats: int) -> tuple[int, float, float, int]:
    """(events, best wall [s] of ``sim.run()``, best wall [s] of the bare SimPy loop, its
    timeouts) for the fake-trainer network_only scenario, the two alternating, best of
    ``repeats``. The protocol's network (positions, links, D2D graph) is built outside the
    timed part: this is the event loop's rate."""
    from deftsim.build import make_trainer
    from deftsim.config import load_scenario
    from netsim.protocols import make_simulation

    sc = load_scenario(NETWORK_ONLY)
    processes = int(sc.training.devices_per_round or sc.num_devices)
    events, each = 0, 0
    best_protocol = best_bare = float("inf")
    for rep in range(repeats + 1):          # repeat 0 is a warm-up
        for which in (("protocol", "bare") if rep % 2 == 0 else ("bare", "protocol")):
            if which == "protocol":
                sim = make_simulation(sc, sc.seed, make_trainer(sc, sc.seed))
                wall, _ = timed(sim.run)
                events = len(sim.recorder.rows)
                each = max(1, -(-max(events, MIN_BARE_TIMEOUTS) // processes))
                best_protocol = min(best_protocol, wall) if rep else best_protocol
            elif each:
                wall = bare_simpy_timeouts_s(processes, each)
                best_bare = min(best_bare, wall) if rep else best_bare
    return events, best_protocol, best_bare, processes * each


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds instead of the quickstart's 12")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats of each run (min-of-N)")
    args = ap.parse_args()
    threads = set_threads()
    rounds = 3 if args.quick else None
    repeats = max(1, args.repeats)
    t_all = time.perf_counter()
    print(f"load average before: {load_average()}; torch threads {threads}")

    r = engine_vs_bare(rounds, repeats)
    best = r["best"]
    engine_ratio = best["bare"] / best["engine"]
    round_sync_ratio = best["round_sync"] / best["engine"]
    cpu = r["cpu"]
    cpu_ratio = cpu["bare"] / cpu["engine"]
    print(f"quickstart ({r['rounds']} rounds, {r['steps']} local steps, execution {r['strategy']}; "
          f"trainer setup {r['setup_s']:.1f} s, warm-up run {r['warm_s']:.1f} s), best of {repeats}:")
    print(f"  engine (FedAvg protocol on SimPy) {best['engine']:.3f} s, bare plan+execute loop "
          f"{best['bare']:.3f} s, round-synchronous local_train loop {best['round_sync']:.3f} s")
    print(f"  engine_ratio = bare / engine = {engine_ratio:.3f} (>= 0.95 wanted); "
          f"round_sync_ratio = {round_sync_ratio:.3f}; final global states bit-identical: {r['identical']}")
    print(f"  CPU time of this process (less disturbed by load): engine {cpu['engine']:.3f} s, bare "
          f"{cpu['bare']:.3f} s, round-synchronous {cpu['round_sync']:.3f} s; bare / engine = {cpu_ratio:.3f}")
    sync = r["stats"]
    print(f"  synchronous batching: {sync['jobs_run']} jobs in {sync['passes']} passes, "
          f"{sync['mean_jobs_per_pass']:.2f} jobs per pass")

    async_wall, astats = async_batching(r["trainer"], r["reset"], rounds)
    print(f"asynchronous quickstart (FedBuff buffer_size 4, concurrency 8): {astats['jobs_run']} jobs in "
          f"{astats['passes']} passes, {astats['mean_jobs_per_pass']:.2f} jobs per pass "
          f"(largest {astats['largest_pass']}, {astats['jobs_cancelled']} cancelled), {async_wall:.2f} s wall")

    events, proto_s, bare_s, timeouts = protocol_events_per_s(3 if args.quick else 5)
    proto_eps, bare_eps = events / proto_s, timeouts / bare_s
    print(f"network_only (fake trainer): {events} events in {proto_s:.3f} s = {proto_eps:,.0f} events/s; "
          f"bare SimPy: {timeouts} timeouts in {bare_s:.3f} s = {bare_eps:,.0f} events/s; "
          f"ratio {proto_eps / bare_eps:.3f}")
    print(f"load average after: {load_average()}; bench wall {time.perf_counter() - t_all:.0f} s")
    if not r["identical"]:
        raise SystemExit("the engine and the bare loop did not compute the same global state: not the same work")
    print(result_line(engine_ratio=engine_ratio, round_sync_ratio=round_sync_ratio,
                      engine_s=best["engine"], bare_s=best["bare"], round_sync_s=best["round_sync"],
                      engine_ratio_cpu=cpu_ratio,
                      sync_jobs_per_pass=float(sync["mean_jobs_per_pass"]),
                      async_jobs_per_pass=float(astats["mean_jobs_per_pass"]),
                      protocol_events_per_s=float(round(proto_eps)), bare_simpy_events_per_s=float(round(bare_eps)),
                      events_ratio=proto_eps / bare_eps, steps=r["steps"], torch_threads=threads))


if __name__ == "__main__":
    main()
