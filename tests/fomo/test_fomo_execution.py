"""Execution strategies of the real trainer: batched multi-device steps and the frozen-prefix
activation cache must give the one-device-at-a-time, uncached results and the same simulated
timeline (slow: real all-MiniLM-L6-v2)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fomo import batched as fbatched
from fomo import build_trainer
from fomo.trainer import PeftTrainer
from netsim.fedavg import FedAvgSimulation
from netsim.interfaces import LocalJob, LocalResult
from netsim.scenario import Scenario

pytestmark = pytest.mark.slow

TOL = 1e-5


def scenario(**sections: Any) -> Scenario:
    """6 devices, batch 2, 16 tokens, 32 test examples."""
    spec: dict[str, Any] = {
        "name": "exec",
        "devices": [{"count": 6}],
        "model": {"max_length_tokens": 16},
        "data": {"max_test_examples": 32, "partition": "iid"},
        "training": {"batch_size": 2, "local_steps": 2, "learning_rate": 1e-3, "rounds": 2,
                     "devices_per_round": 3},
    }
    for section, values in sections.items():
        spec[section] = {**spec.get(section, {}), **values}
    return Scenario.model_validate(spec)


def jobs(round_: int, steps: list[int], batch: int = 2) -> list[LocalJob]:
    return [LocalJob(device_id=d, round=round_, steps=s, batch_size=batch) for d, s in enumerate(steps)]


def max_diff(a: list[LocalResult], b: list[LocalResult]) -> float:
    return max(float((x.update[n] - y.update[n]).abs().max()) for x, y in zip(a, b) for n in x.update)


def assert_same_costs(a: list[LocalResult], b: list[LocalResult]) -> None:
    """Same devices, FLOPs, memory and upload size: the simulated timeline cannot change."""
    assert [r.device_id for r in a] == [r.device_id for r in b]
    assert [r.flops for r in a] == [r.flops for r in b]
    assert [r.peak_memory_bytes for r in a] == [r.peak_memory_bytes for r in b]
    assert [r.update_bytes for r in a] == [r.update_bytes for r in b]
    assert [r.num_examples for r in a] == [r.num_examples for r in b]
    assert all(abs(x.loss - y.loss) <= TOL for x, y in zip(a, b))


@pytest.fixture(scope="module")
def sequential() -> PeftTrainer:
    return build_trainer(scenario(), seed=0)


@pytest.fixture(scope="module")
def batched() -> PeftTrainer:
    trainer = build_trainer(scenario(execution={"strategy": "batched", "max_devices_per_pass": 2}), seed=0)
    assert trainer.strategy == "batched" and not trainer.execution_notes
    return trainer


def test_per_device_gradients_equal_one_device_at_a_time(sequential: PeftTrainer) -> None:
    t = sequential
    k, b = 3, 2
    batches = [t._device_examples[d][:b] for d in range(k)]  # (no draw from the device streams)
    alone = []
    for examples in batches:
        t._load_state(t._global)
        t.model.zero_grad(set_to_none=True)
        ids, mask, labels = t._tokens.batch(examples)
        F.cross_entropy(t.model(input_ids=ids, attention_mask=mask).logits, labels).backward()
        alone.append({n: p.grad.clone() for n, p in t._trainable})
    t.model.zero_grad(set_to_none=True)

    stack = fbatched.DeviceStack(t._global, k)
    ids, mask, labels = t._tokens.batch(np.concatenate(batches))
    with fbatched.per_device_modules(t.model, stack, k * b):
        logits = t.model(input_ids=ids, attention_mask=mask).logits
    torch.stack([F.cross_entropy(lg, lb) for lg, lb in zip(logits.split(b), labels.split(b))]).sum().backward()
    for d in range(k):
        for name, grad in alone[d].items():
            got = stack.tensors[name].grad[d]
            assert got.shape == grad.shape
            assert float((got - grad).abs().max()) <= TOL, name
    assert any(float(g.abs().max()) > 0 for g in alone[0].values())
    # the model's own parameters are untouched and hold no gradient
    assert all(p.grad is None for _, p in t._trainable)


def test_batched_updates_equal_sequential(sequential: PeftTrainer, batched: PeftTrainer) -> None:
    # mixed step counts: grouped by (steps, batch), passes of 2 devices, results in job order
    work = jobs(1, [2, 1, 2, 2, 1])
    before = batched.global_state()
    a, b = sequential.local_train(work), batched.local_train(work)
    assert_same_costs(a, b)
    assert max_diff(a, b) <= TOL
    # same-length batches (BBC texts fill 16 tokens): bitwise identical
    assert all(torch.equal(x.update[n], y.update[n]) for x, y in zip(a, b) for n in x.update)
    assert all(torch.equal(before[n], t) for n, t in batched.global_state().items())
    total = sum(r.num_examples for r in a)
    for trainer, results in ((sequential, a), (batched, b)):
        trainer.aggregate(results, [r.num_examples / total for r in results])
    ea, eb = sequential.evaluate(), batched.evaluate()
    assert (ea.flops, ea.num_examples) == (eb.flops, eb.num_examples)
    assert abs(ea.loss - eb.loss) <= TOL and ea.accuracy == eb.accuracy


def test_batched_sgd_and_uneven_lengths_match(tmp_path: Path) -> None:
    """Texts of different lengths: devices' batches are padded to the longest in the pass."""
    rng = np.random.default_rng(0)
    words = ["market", "goal", "vote", "film", "chip", "rate", "team", "law", "song", "data"]
    rows = ["text,label"]
    for i in range(60):
        label = i % 2
        n = int(rng.integers(2, 6))
        rows.append(" ".join(words[label * 5 + int(rng.integers(0, 5))] for _ in range(n)) + f",c{label}")
    path = tmp_path / "short.csv"
    path.write_text("\n".join(rows) + "\n")
    sections: dict[str, Any] = {"data": {"dataset": "csv", "path": str(path), "max_test_examples": 8},
                                "training": {"optimizer": "sgd", "learning_rate": 0.05}}
    a_tr = build_trainer(scenario(**sections), seed=1)
    b_tr = build_trainer(scenario(**sections, execution={"strategy": "batched"}), seed=1)
    lengths = {int(a_tr._tokens.lengths_tokens[i]) for i in range(60)}
    assert len(lengths) > 3
    work = jobs(1, [2, 2, 2, 2])
    a, b = a_tr.local_train(work), b_tr.local_train(work)
    assert_same_costs(a, b)
    assert max_diff(a, b) <= TOL


def test_batched_prompt_tuning_equals_sequential() -> None:
    """Per-device soft prompts in one batch: the same updates (bitwise here), losses and costs as
    one device at a time, with AdamW and mixed step counts."""
    sections: dict[str, Any] = {"peft": {"method": "prompt_tuning", "num_virtual_tokens": 4},
                                "training": {"learning_rate": 1e-2}}
    a_tr = build_trainer(scenario(**sections), seed=0)
    b_tr = build_trainer(scenario(**sections, execution={"strategy": "batched"}), seed=0)
    assert b_tr.strategy == "batched" and not b_tr.execution_notes
    work = jobs(1, [2, 1, 2, 2, 1])
    a, b = a_tr.local_train(work), b_tr.local_train(work)
    assert_same_costs(a, b)
    assert max_diff(a, b) <= TOL
    assert all(torch.equal(x.update[n], y.update[n]) for x, y in zip(a, b) for n in x.update)
    assert any("prompt_encoder" in n and float(t.abs().max()) > 0 for n, t in a[0].update.items())
    assert "get_prompt" not in vars(b_tr.model)  # the per-pass patch is removed


def test_batched_falls_back_for_dropout() -> None:
    with pytest.warns(RuntimeWarning, match="dropout"):
        dropout = build_trainer(scenario(peft={"dropout": 0.1}, execution={"strategy": "batched"}), seed=0)
    assert dropout.strategy == "sequential" and "dropout" in dropout.execution_notes[0]
    (result,) = dropout.local_train(jobs(1, [1]))
    assert result.flops > 0


def test_activation_cache_is_exact_bounded_and_counts_full_flops() -> None:
    top2 = {"layers": [4, 5]}
    plain = build_trainer(scenario(peft=top2), seed=0)
    row_bytes = 16 * 384 * 4  # one 16-token example of hidden size 384
    cached = build_trainer(scenario(peft=top2, execution={"activation_cache_bytes": 6 * row_bytes}), seed=0)
    both = build_trainer(scenario(peft=top2, execution={"activation_cache_bytes": 10_000_000,
                                                        "strategy": "batched"}), seed=0)
    cache = cached.activation_cache
    assert cache is not None and cache.prefix.first_trainable == 4 and not cached.execution_notes
    work = jobs(1, [2, 2, 2])
    a, b, c = plain.local_train(work), cached.local_train(work), both.local_train(work)
    assert_same_costs(a, b)
    assert_same_costs(a, c)
    assert max_diff(a, b) <= TOL and max_diff(a, c) <= TOL
    # bounded: 6 rows at most, least recently used evicted
    assert cache.misses > 6 and len(cache) <= 6 and cache.bytes_used <= 6 * row_bytes
    # evaluation: the first call counts the full forward, the second fills the cache, the
    # third is served from it
    for _ in range(3):
        ea, ec = plain.evaluate(), both.evaluate()
        assert ea.flops == ec.flops and abs(ea.loss - ec.loss) <= TOL and ea.accuracy == ec.accuracy
    assert both.activation_cache.hits >= 32


def test_activation_cache_needs_a_frozen_prefix() -> None:
    with pytest.warns(RuntimeWarning, match="activation_cache_bytes not applied"):
        trainer = build_trainer(scenario(execution={"activation_cache_bytes": 1_000_000}), seed=0)
    assert trainer.activation_cache is None
    assert "block 0 holds trainable parameters" in trainer.execution_notes[0]


def test_device_state_is_created_only_for_active_devices(batched: PeftTrainer) -> None:
    fresh = build_trainer(scenario(), seed=0)
    assert fresh._device_rngs == {}
    fresh.local_train(jobs(1, [1, 0, 1])[::2])  # devices 0 and 2
    assert sorted(fresh._device_rngs) == [0, 2]


def _event_rows(sc: Scenario) -> list[tuple]:
    sim = FedAvgSimulation(sc, 0, build_trainer(sc, 0))
    sim.run()
    return sim.recorder.rows


def test_timeline_is_the_same_for_every_strategy() -> None:
    """The whole event log (times, FLOPs, memory, energy, losses, accuracies) of a FedAvg run."""
    top2: dict[str, Any] = {"peft": {"layers": [4, 5]}, "training": {"local_steps": 1}}
    reference = _event_rows(scenario(**top2))
    fast = _event_rows(scenario(**top2, execution={"strategy": "batched", "activation_cache_bytes": 10**7}))
    assert len(reference) == len(fast) > 10
    loss_col, acc_col = 10, 11
    for r, f in zip(reference, fast):
        assert r[:loss_col] == f[:loss_col]  # t_s ... energy_j: exactly equal
        for col in (loss_col, acc_col):
            assert (np.isnan(r[col]) and np.isnan(f[col])) or abs(r[col] - f[col]) <= TOL
