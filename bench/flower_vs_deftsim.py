"""deftsim vs. Flower's simulation engine on the same FedAvg-LoRA workload.

Workload (both sides): all-MiniLM-L6-v2 with LoRA r=8 on query/value + a new 5-class head,
BBC News split IID over ``--clients`` devices with deftsim's split and seed, every device
training every round (``--clients`` clients per round), ``--steps`` local AdamW steps of
``--batch`` examples x 32 tokens from the device's own batch-sampling stream, FedAvg weighted by
local data size, ``--rounds`` rounds, evaluation of the global model on the same 256 test
examples before training and after every round.

* deftsim: the whole ``deftsim run`` of that scenario (``execution.strategy: batched``), which
  also simulates the wireless network (channels, fading, OFDMA uplink, multicast downlink,
  energy), written to a results folder.
* Flower (``flwr[simulation]``, Ray backend): a ``ServerApp`` with ``FedAvg`` and server-side
  evaluation, a ``ClientApp`` whose clients train exactly like deftsim's devices; each Ray worker
  loads the model once and reuses it (``--client-cpus`` CPUs and torch threads per worker). No
  network is simulated.

The speedup is min(Flower) / min(deftsim) over ``--repeats`` alternating runs. Wall time of
both includes their setup (model loading, tokenization; Ray start-up for Flower),
after an untimed one-round deftsim warm-up (imports, disk cache) that Flower benefits from too.
Flower is an optional extra: ``pip install -e ".[bench]"``. If it cannot be imported or run,
the script says why and ends with ``RESULT flower_available=0 ...`` (deftsim still measured).

    python bench/flower_vs_deftsim.py [--quick] [--clients 32] [--rounds 3] [--steps 2] [--batch 8]

Ends with ``RESULT deftsim_speedup=... deftsim_s=... flower_s=... deftsim_accuracy=...
flower_accuracy=... accuracy_gap_points=... flower_available=1``.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

from _common import result_line, set_threads

HERE = os.path.dirname(os.path.abspath(__file__))


def scenario_spec(clients: int, rounds: int, steps: int, batch: int, seed: int) -> dict:
    return {
        "name": "flower-compare", "seed": seed,
        "devices": [{"count": clients, "placement": {"min_distance_m": 20, "max_distance_m": 200}}],
        "model": {"max_length_tokens": 32},
        "peft": {"method": "lora", "rank": 8, "alpha": 16, "target_modules": ["query", "value"]},
        "data": {"partition": "iid", "max_test_examples": 256},
        "training": {"rounds": rounds, "local_steps": steps, "batch_size": batch, "learning_rate": 5e-3,
                     "optimizer": "adamw", "devices_per_round": clients},
        "execution": {"strategy": "batched", "max_devices_per_pass": 16},
    }


def run_deftsim(spec: dict) -> tuple[float, float]:
    """Wall time and final accuracy of the whole deftsim run."""
    from deftsim.runner import run_scenario
    from netsim.scenario import Scenario

    scenario = Scenario.model_validate(spec)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        summary = run_scenario(scenario, out)
        return time.perf_counter() - t0, float(summary["final_accuracy"])


def run_flower(spec: dict, client_cpus: int) -> tuple[float, float, list]:
    """Wall time, final accuracy and accuracy per round of the Flower simulation."""
    import flwr
    from flwr.clientapp import ClientApp
    from flwr.server import ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    import numpy as np

    from fomo import build_trainer
    from netsim.scenario import Scenario

    t0 = time.perf_counter()
    # the same initial state and test set; a plain model (none of deftsim's execution tricks)
    scenario = Scenario.model_validate({**spec, "execution": {"strategy": "sequential", "prune_last_block": False}})
    evaluator = build_trainer(scenario, scenario.seed)
    names = list(evaluator.global_state())
    initial = [t.numpy().copy() for t in evaluator.global_state().values()]
    accuracy: list[tuple[int, float]] = []
    clients = scenario.num_devices

    def evaluate_fn(server_round: int, parameters: list, config: dict) -> tuple[float, dict]:
        import torch

        evaluator._global = {n: torch.from_numpy(np.asarray(p)).clone() for n, p in zip(names, parameters)}
        ev = evaluator.evaluate()
        accuracy.append((server_round, ev.accuracy))
        return ev.loss, {"accuracy": ev.accuracy}

    def server_fn(context: Any) -> Any:
        strategy = FedAvg(
            fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=clients, min_available_clients=clients,
            initial_parameters=flwr.common.ndarrays_to_parameters(initial), evaluate_fn=evaluate_fn,
            on_fit_config_fn=lambda server_round: {"round": server_round},
        )
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=scenario.training.rounds))

    bench_dir = HERE

    def client_fn(context: Any) -> Any:
        import sys

        if bench_dir not in sys.path:
            sys.path.insert(0, bench_dir)
        from _flower_client import make_client

        return make_client(int(context.node_config["partition-id"]), spec, client_cpus)

    run_simulation(
        server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
        num_supernodes=clients,
        backend_config={"client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0},
                        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}},
    )
    wall = time.perf_counter() - t0
    if len(accuracy) != scenario.training.rounds + 1:
        raise RuntimeError(f"Flower evaluated {len(accuracy)} times, expected {scenario.training.rounds + 1}")
    return wall, accuracy[-1][1], accuracy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 clients, 2 rounds, 1 step")
    ap.add_argument("--clients", type=int, default=None, help="clients = clients per round (default 32; quick 16)")
    ap.add_argument("--rounds", type=int, default=None, help="default 3; quick 2")
    ap.add_argument("--steps", type=int, default=None, help="local steps (default 2; quick 1)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--client-cpus", type=int, default=1, help="CPUs (= torch threads) per Flower worker")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    clients = args.clients or (16 if args.quick else 32)
    rounds = args.rounds or (2 if args.quick else 3)
    steps = args.steps or (1 if args.quick else 2)
    threads = set_threads()
    spec = scenario_spec(clients, rounds, steps, args.batch, seed=0)
    print(f"threads={threads}: {clients} clients per round, {rounds} rounds, {steps} local steps of "
          f"{args.batch}x32 tokens; Flower workers with {args.client_cpus} CPU(s) each")

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        import flwr  # noqa: F401
        import ray  # noqa: F401
        flower_error = ""
    except ImportError as err:
        flower_error = (f"flwr[simulation] is not importable ({err}); install the bench extra: "
                        "pip install -e \".[bench]\"")

    run_deftsim(scenario_spec(clients, 1, 1, args.batch, seed=0))  # untimed warm-up: imports, disk cache
    t_deft: list[float] = []
    t_flower: list[float] = []
    acc_deft = acc_flower = float("nan")
    for rep in range(args.repeats):
        order = ("deft", "flower") if rep % 2 == 0 else ("flower", "deft")
        for which in order:
            if which == "deft":
                wall, acc_deft = run_deftsim(spec)
                t_deft.append(wall)
                print(f"deftsim: {wall:.1f} s, final accuracy {acc_deft:.4f}")
            elif not flower_error:
                try:
                    wall, acc_flower, per_round = run_flower(spec, args.client_cpus)
                except Exception as err:  # Ray/Flower failing on this machine: report, don't crash
                    flower_error = f"Flower simulation failed: {type(err).__name__}: {err}"
                    continue
                t_flower.append(wall)
                print(f"Flower:  {wall:.1f} s, final accuracy {acc_flower:.4f} (per round {per_round})")
    out: dict[str, Any] = {}
    if flower_error:
        print(f"Flower not measured: {flower_error}")
        out.update(flower_available=0, deftsim_s=min(t_deft), deftsim_accuracy=acc_deft)
    else:
        out.update(deftsim_speedup=min(t_flower) / min(t_deft), deftsim_s=min(t_deft),
                   flower_s=min(t_flower), deftsim_accuracy=acc_deft, flower_accuracy=acc_flower,
                   accuracy_gap_points=100 * abs(acc_deft - acc_flower), flower_available=1)
    out.update(clients=clients, rounds=rounds)
    print(result_line(**out))


if __name__ == "__main__":
    main()
