"""Overhead against the physical limit: deftsim's whole quickstart run vs. a bare PyTorch loop.

deftsim: ``deftsim.runner.run_scenario`` on ``scenarios/quickstart.yaml`` (model and data
loading, the SimPy timeline with channels, FLOP/memory profiling, real steps, evaluation, the
results folder with events.parquet, summary, topology and the plot). Its trainer is wrapped in
a recorder that notes every ``local_train`` call (devices, steps, batch size).

Bare loop: the same model loading, data split and tokenization, then exactly the recorded
training steps (one fresh AdamW per device job, the device's own batch-sampling stream, FedAvg
weights n_k / sum n) and the same evaluations (before training and after every round), written
as a plain PyTorch loop with no simulation, profiling or recording. Its final accuracy must be
deftsim's (``same_accuracy=1``).

After an untimed one-round deftsim warm-up (imports, disk cache), timed runs alternate
(deftsim, bare, bare, deftsim, ...; the bare loop replays the jobs the last deftsim run
recorded); ``overhead_ratio`` = min(deftsim) / min(bare) over the repeats (the estimate least
disturbed by other processes).
deftsim runs with ``execution.prune_last_block: false`` here, so that both sides do the same
arithmetic and the ratio is the simulator's own cost. With ``--batched`` a third run uses
deftsim's execution tricks (``execution.strategy: batched`` and the default pruned last
block), for reference (``batched_ratio``).

    python bench/overhead_vs_bare_torch.py [--quick] [--rounds N] [--repeats R] [--batched]

Ends with ``RESULT overhead_ratio=... deftsim_s=... bare_s=... same_accuracy=1 ...``.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

from _common import ROOT, result_line, set_threads


class RecordingTrainer:
    """Forwards to the real trainer and records the jobs of every ``execute`` call (one per
    synchronous round: the engine runs a round's pending jobs together)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.rounds: list[list[tuple[int, int, int]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def execute(self, plans):  # noqa: ANN001
        self.rounds.append([(p.job.device_id, p.job.steps, p.job.batch_size) for p in plans])
        return self.inner.execute(plans)


def run_deftsim(scenario) -> tuple[float, dict, list]:  # noqa: ANN001
    """Wall time, summary and recorded jobs of one whole deftsim run."""
    import deftsim.build as build
    import deftsim.runner as runner

    original = build.make_trainer
    made: dict[str, RecordingTrainer] = {}

    def make(sc, seed):  # noqa: ANN001
        made["t"] = RecordingTrainer(original(sc, seed))
        return made["t"]

    build.make_trainer = make
    try:
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            summary = runner.run_scenario(scenario, out)
            wall = time.perf_counter() - t0
    finally:
        build.make_trainer = original
    return wall, summary, made["t"].rounds


def run_bare(scenario, rounds: list[list[tuple[int, int, int]]]) -> tuple[float, float]:  # noqa: ANN001
    """Wall time and final accuracy of the bare PyTorch loop replaying ``rounds``."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from fomo import data as fdata
    from fomo import models
    from fomo.trainer import tokenize_all

    t0 = time.perf_counter()
    seed = scenario.seed
    texts, labels, classes = fdata.load_texts(scenario.data)
    train_idx, test_idx, parts = fdata.split_and_partition(labels, scenario.data, scenario.num_devices, seed)
    device_examples = [train_idx[p] for p in parts]
    test = test_idx[: scenario.data.max_test_examples]
    torch.manual_seed(fdata.torch_init_seed(seed))
    tokenizer, base = models.load_base(scenario.model, len(classes))
    model = models.apply_peft(base, scenario.peft)
    tok = tokenize_all(tokenizer, texts, labels, scenario.model.max_length_tokens)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    global_state = {n: p.detach().clone() for n, p in params}
    rngs: dict[int, np.random.Generator] = {}
    lr = scenario.training.learning_rate

    def load(state: dict) -> None:
        with torch.no_grad():
            for n, p in params:
                p.copy_(state[n])

    def evaluate() -> float:
        load(global_state)
        model.eval()
        correct = 0
        with torch.no_grad():
            for start in range(0, len(test), 64):
                ids, mask, y = tok.batch(test[start:start + 64])
                correct += int((model(input_ids=ids, attention_mask=mask).logits.argmax(-1) == y).sum())
        model.train()
        return correct / len(test)

    accuracy = evaluate()
    for jobs in rounds:
        updates, sizes = [], []
        for device, steps, batch in jobs:
            load(global_state)
            torch.manual_seed(fdata.job_torch_seed(seed, device, 0))  # as the trainer (no dropout: unused)
            opt = (torch.optim.AdamW if scenario.training.optimizer == "adamw" else torch.optim.SGD)(
                [p for _, p in params], lr=lr)
            rng = rngs.setdefault(device, fdata.device_rng(seed, device))
            own = device_examples[device]
            for _ in range(steps):
                examples = fdata.sample_batch(rng, own, batch)
                ids, mask, y = tok.batch(examples)
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, y).backward()
                opt.step()
            updates.append({n: p.detach() - global_state[n] for n, p in params})
            sizes.append(len(own))
        total = float(sum(sizes))
        new_state = {}
        for n, t in global_state.items():
            acc = t.clone()
            for u, size in zip(updates, sizes):
                acc.add_(u[n], alpha=size / total)
            new_state[n] = acc
        global_state = new_state
        accuracy = evaluate()
    return time.perf_counter() - t0, accuracy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds, 1 repeat")
    ap.add_argument("--rounds", type=int, default=None, help="training.rounds (default: the scenario's 12)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs of each (default 2; quick 1)")
    ap.add_argument("--batched", action="store_true", help="also time deftsim with batched execution")
    args = ap.parse_args()
    rounds = args.rounds or (3 if args.quick else None)
    repeats = args.repeats or (1 if args.quick else 2)
    threads = set_threads()

    from deftsim.config import load_scenario

    overrides = [f"training.rounds={rounds}"] if rounds else []
    scenario = load_scenario(ROOT / "scenarios" / "quickstart.yaml", overrides + ["execution.prune_last_block=false"])
    run_deftsim(load_scenario(ROOT / "scenarios" / "quickstart.yaml", ["training.rounds=1"]))  # warm-up

    t_deft: list[float] = []
    t_bare: list[float] = []
    acc_deft = acc_bare = float("nan")
    recorded: list = []
    for rep in range(repeats):
        for which in (("deft", "bare") if rep % 2 == 0 else ("bare", "deft")):
            if which == "deft":
                wall, summary, recorded = run_deftsim(scenario)
                t_deft.append(wall)
                acc_deft = summary["final_accuracy"]
            else:
                wall, acc_bare = run_bare(scenario, recorded)
                t_bare.append(wall)
    steps = sum(s for jobs in recorded for _, s, _ in jobs)
    out: dict[str, Any] = {"overhead_ratio": min(t_deft) / min(t_bare), "deftsim_s": min(t_deft),
                           "bare_s": min(t_bare)}
    print(f"threads={threads} quickstart: {len(recorded)} rounds, {steps} local steps, "
          f"{len(recorded) + 1} evaluations; repeats={repeats}")
    print(f"deftsim (whole run)  {min(t_deft):7.2f} s (all: {', '.join(f'{t:.2f}' for t in t_deft)})"
          f"   final accuracy {acc_deft:.4f}")
    print(f"bare PyTorch loop    {min(t_bare):7.2f} s (all: {', '.join(f'{t:.2f}' for t in t_bare)})"
          f"   final accuracy {acc_bare:.4f}")
    if args.batched:
        batched = load_scenario(ROOT / "scenarios" / "quickstart.yaml", overrides + ["execution.strategy=batched"])
        wall, summary, _ = run_deftsim(batched)
        print(f"deftsim batched+pruned {wall:5.2f} s   final accuracy {summary['final_accuracy']:.4f}")
        out["batched_ratio"] = wall / min(t_bare)
    out["same_accuracy"] = int(acc_deft == acc_bare)
    out["final_accuracy"] = acc_deft
    out["rounds"] = len(recorded)
    print(result_line(**out))


if __name__ == "__main__":
    main()
