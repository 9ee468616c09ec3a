"""Experiments: what ``deftsim run`` does with a scenario, chosen by ``scenario.experiment``.

One module per experiment, each registering its function with :func:`base.register`:

=====================  ==========================================================
``fedavg``             federated PEFT with FedAvg (``fedavg.py``)
``aircomp_vs_ofdma``   FedAvg over OFDMA vs over the air at several K (``aircomp_vs_ofdma.py``)
``lola_compare``       LoLa block-allocation algorithms on one network (``lola_compare.py``)
``neural_aircomp``     split fine-tuning with a neural connection over the air (``neural_aircomp.py``)
``federated_deft``     federated LoRA vs emulator, split and zeroth-order fine-tuning (``federated_deft.py``)
``prompt_service``     fine-tuning requests served at the edge, with a library of prompts (``prompt_service.py``)
``d2d_prompt_transfer``  devices fetch a tuned prompt from a D2D neighbour, then tune (``d2d_prompt_transfer.py``)
=====================  ==========================================================

An experiment is a function ``(scenario, on_round) -> ExperimentResult``; the runner writes
its events, summary, topology and figures atomically. To add one: write a module here whose
function is decorated with ``@register("name")``, import it below, and add the name to
``Scenario.experiment``'s allowed values.
"""
from __future__ import annotations

from dataclasses import dataclass

from netsim.scenario import Scenario

from . import (aircomp_vs_ofdma, d2d_prompt_transfer, federated_deft, fedavg, lola_compare,  # noqa: F401
               neural_aircomp, prompt_service)
from .base import EXPERIMENTS, Experiment, ExperimentResult, register

__all__ = ["EXPERIMENTS", "Experiment", "ExperimentResult", "PlannedWork", "get_experiment", "planned_work",
           "progress_total", "register"]


def progress_total(scenario: Scenario) -> Optional[int]:
    """How many times the experiment calls ``on_round`` (for a progress bar); None if unknown."""
    if scenario.experiment == "fedavg":
        return scenario.training.rounds
    if scenario.experiment == "aircomp_vs_ofdma":
        return scenario.training.rounds * 2 * len(set(scenario.aircomp.device_counts))
    if scenario.experiment == "federated_deft":
        from netsim.federated_deft import variant_scenario

        return sum(variant_scenario(scenario, v).training.rounds for v in scenario.federated_deft.variants)
    if scenario.experiment == "prompt_service":
        return len(scenario.prompt_service.variants)
    if scenario.experiment == "d2d_prompt_transfer":
        return len(scenario.d2d_prompt_transfer.variants)
    return None


@dataclass(frozen=True)
class PlannedWork:
    """What a run will compute for real (``deftsim run --dry-run``): upper bounds, since a run
    may stop early (``stop.target_accuracy``, ``stop.horizon_s``)."""

    device_steps: Optional[int]   # optimizer steps of the real model (one device's batch each); None: unknown
    evaluations: int    # test-set evaluations
    detail: str         # how the numbers are made up


def _evaluations_every(steps: int, every: int) -> int:
    """Evaluations of a run of ``steps`` steps evaluated at 0, every ``every`` steps and at the end."""
    return 1 + steps // every + (1 if steps % every else 0)


def planned_work(scenario: Scenario) -> PlannedWork:
    """Count the real work of ``scenario`` without running it (the fake trainer's steps are
    counted too: they are what its timeline simulates)."""
    t, n = scenario.training, scenario.num_devices
    if scenario.experiment == "fedavg" and t.mode == "asynchronous":
        k = int(scenario.strategies.aggregation.params_model().buffer_size)
        c = scenario.async_fl.concurrency
        return PlannedWork((t.rounds * k + c) * t.local_steps, t.rounds // scenario.async_fl.eval_every_steps + 2,
                           f"{t.rounds} server steps x {k} buffered updates (+ {c} jobs in flight at the end) x "
                           f"{t.local_steps} local steps; discarded and cancelled jobs are never trained")
    if scenario.experiment == "fedavg" and t.mode == "semi_synchronous":
        c, period = scenario.async_fl.concurrency, scenario.async_fl.period_s
        return PlannedWork(None, t.rounds // scenario.async_fl.eval_every_steps + 2,
                           f"not known before the run: {c} devices train continuously for {t.rounds} periods of "
                           f"{period} s; as many jobs as finish in that time, x {t.local_steps} local steps")
    if scenario.experiment == "fedavg":
        k = t.devices_per_round or n
        return PlannedWork(t.rounds * k * t.local_steps, t.rounds + 1,
                           f"{t.rounds} rounds x {k} devices x {t.local_steps} local steps; "
                           f"an evaluation before round 1 and after every round")
    if scenario.experiment == "aircomp_vs_ofdma":
        ks = sorted(set(scenario.aircomp.device_counts))
        steps = 2 * t.rounds * t.local_steps * sum(ks)
        return PlannedWork(steps, 2 * len(ks) * (t.rounds + 1),
                           f"2 uplinks x K in {ks} x {t.rounds} rounds x K devices x {t.local_steps} local steps")
    if scenario.experiment == "lola_compare":
        from netsim.protocols.lola import LolaSpec

        lola = scenario.lola or LolaSpec()
        trained = [a for a in lola.train_algorithms if a in lola.algorithms]
        if lola.train_rounds == 0 or scenario.trainer != "real" or not trained:
            return PlannedWork(0, 0, f"latency only: {len(lola.algorithms)} allocation algorithms x {lola.rounds} "
                                     "simulated rounds, no real training (lola.train_rounds: 0 or trainer: fake)")
        rounds = min(lola.train_rounds, lola.rounds)
        per_round = [n if a == "offloading" else lola.num_blocks for a in trained]
        return PlannedWork(rounds * lola.steps_per_round * sum(per_round), len(trained) * (rounds + 1),
                           f"{rounds} rounds x {lola.steps_per_round} steps x (blocks or, for offloading, "
                           f"at most {n} devices) for {trained}")
    if scenario.experiment == "federated_deft":
        from netsim.federated_deft import variant_scenario

        k = t.devices_per_round or n
        parts = [(v, variant_scenario(scenario, v).training) for v in scenario.federated_deft.variants]
        return PlannedWork(sum(vt.rounds * k * vt.local_steps for _, vt in parts),
                           sum(vt.rounds + 1 for _, vt in parts),
                           " + ".join(f"{v}: {vt.rounds} rounds x {k} devices x {vt.local_steps} local steps"
                                      for v, vt in parts)
                           + "; an evaluation before round 1 and after every round, per variant")
    if scenario.experiment == "neural_aircomp":
        from .neural_aircomp import variants

        spec, v = scenario.neural_aircomp, len(variants(scenario))
        return PlannedWork(v * spec.steps * n, v * _evaluations_every(spec.steps, spec.eval_every_steps),
                           f"{v} variants x {spec.steps} steps x {n} devices (each runs its segment)")
    if scenario.experiment == "prompt_service":
        spec = scenario.prompt_service
        lib = len(spec.library.tasks) * spec.library.steps
        per_variant = spec.max_requests * spec.max_steps
        probes = -(-spec.ensemble.probe_examples // scenario.training.batch_size)
        evaluations = len(spec.library.tasks) + len(spec.variants) * spec.max_requests * (
            2 + probes + -(-spec.max_steps // spec.eval_every_steps))
        return PlannedWork(lib + len(spec.variants) * per_variant, evaluations,
                           f"library: {len(spec.library.tasks)} tasks x {spec.library.steps} steps; then at most "
                           f"{spec.max_requests} requests x {spec.max_steps} tuning steps x {len(spec.variants)} "
                           f"variants (a request stops at its target; arrivals in [0, {spec.horizon_s:g}) s)")
    if scenario.experiment == "d2d_prompt_transfer":
        spec = scenario.d2d_prompt_transfer
        v = len(spec.variants)
        warm = sum(spec.warmup_steps for name in spec.variants if spec.warms_up(name))
        sources = len(spec.tasks) * spec.source_steps
        pairs = len(spec.tasks) * len(set(spec.target_tasks or spec.tasks))   # each prompt on each new task
        evaluations = len(spec.tasks) + pairs + spec.targets * sum(
            3 + -(-spec.max_steps // spec.eval_every_steps) for _ in spec.variants)
        return PlannedWork(sources + spec.targets * (v * spec.max_steps + warm), evaluations,
                           f"source prompts: {len(spec.tasks)} tasks x {spec.source_steps} steps; then {spec.targets} "
                           f"targets x {v} variants x at most {spec.max_steps} tuning steps"
                           + (f" (+ {warm} warm-up steps per target for the prompt embedding)" if warm else "")
                           + "; a target stops at its target")
    raise ValueError(f"experiment={scenario.experiment!r} has no work count")


def get_experiment(name: str) -> Experiment:
    try:
        return EXPERIMENTS[name]
    except KeyError:
        raise ValueError(f"experiment={name!r} is not registered; known: {sorted(EXPERIMENTS)} "
                         "(register it in deftsim/experiments/)") from None
