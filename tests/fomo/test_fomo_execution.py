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
    reference = _event_rows(scenario(**top2, execution={"prune_last_block": False}))
    fast = _event_rows(scenario(**top2, execution={"strategy": "batched", "activation_cache_bytes": 10**7}))
    assert len(reference) == len(fast) > 10
    loss_col, acc_col = 10, 11
    for r, f in zip(reference, fast):
        assert r[:loss_col] == f[:loss_col]  # t_s ... energy_j: exactly equal
        for col in (loss_col, acc_col):
            assert (np.isnan(r[col]) and np.isnan(f[col])) or abs(r[col] - f[col]) <= TOL


def test_pruned_last_block_equals_the_whole_model() -> None:
    """Position 0 only in the last block: the logits, gradients, updates and evaluation of the
    whole model, with the same counted FLOPs; padded batches included."""
    whole = build_trainer(scenario(execution={"prune_last_block": False}), seed=0)
    pruned_tr = build_trainer(scenario(), seed=0)
    assert whole.pruned_block is None and pruned_tr.pruned_block is not None
    assert pruned_tr.pruned_block is pruned_tr.model.base_model.model.bert.encoder.layer[-1]
    # a padded batch, logits and gradients
    examples = pruned_tr._train_examples[:4]
    ids, mask, labels = pruned_tr._tokens.batch(examples)
    mask = mask.clone()
    mask[1, 5:] = 0
    mask[2, 9:] = 0
    grads = []
    for trainer in (whole, pruned_tr):
        trainer.model.zero_grad(set_to_none=True)
        logits = trainer._logits(ids, mask, examples)
        F.cross_entropy(logits, labels).backward()
        grads.append((logits.detach(), {n: p.grad.clone() for n, p in trainer._trainable}))
        trainer.model.zero_grad(set_to_none=True)
    (la, ga), (lb, gb) = grads
    assert float((la - lb).abs().max()) <= TOL
    assert max(float((ga[n] - gb[n]).abs().max()) for n in ga) <= TOL
    assert "forward" not in vars(pruned_tr.pruned_block)  # the patch is removed after the step
    # local training (AdamW) and evaluation: the same costs, results within rounding
    work = jobs(1, [2, 1, 2])
    a, b = whole.local_train(work), pruned_tr.local_train(work)
    assert_same_costs(a, b)
    assert max_diff(a, b) <= 10 * TOL  # AdamW amplifies rounding near eps, see fomo.batched
    ea, eb = whole.evaluate(), pruned_tr.evaluate()
    assert ea.flops == eb.flops and ea.accuracy == eb.accuracy and abs(ea.loss - eb.loss) <= TOL


def test_pruned_batched_prompt_tuning_matches_the_whole_model() -> None:
    """With prompt tuning the head reads the first virtual token; batched + pruned matches the
    sequential whole model."""
    sections: dict[str, Any] = {"peft": {"method": "prompt_tuning", "num_virtual_tokens": 4},
                                "training": {"learning_rate": 1e-2, "optimizer": "sgd"}}
    whole = build_trainer(scenario(**sections, execution={"prune_last_block": False}), seed=0)
    fast = build_trainer(scenario(**sections, execution={"strategy": "batched"}), seed=0)
    assert fast.pruned_block is not None and fast.strategy == "batched"
    work = jobs(1, [2, 2, 2])
    a, b = whole.local_train(work), fast.local_train(work)
    assert_same_costs(a, b)
    assert max_diff(a, b) <= TOL


def test_prune_is_refused_when_the_head_reads_other_positions() -> None:
    """A head that pools every position (mean pooling) must not be pruned: the probe batch
    catches it and the run says why."""
    from fomo.last_block import find_prunable_last_block

    trainer = build_trainer(scenario(execution={"prune_last_block": False}), seed=0)
    pooler = trainer.model.base_model.model.bert.pooler
    pooler.forward = lambda hidden: torch.tanh(pooler.dense(hidden.mean(dim=1)))
    ids, mask, _ = trainer._tokens.batch(trainer._train_examples[:2])
    block, reason = find_prunable_last_block(trainer.model, ids, mask)
    assert block is None and "reads more than position 0" in reason


def test_prune_is_refused_for_a_block_without_the_bert_layout() -> None:
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from fomo.last_block import find_prunable_last_block

    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=16, pad_token_id=0)
    model = GPT2ForSequenceClassification(config)
    ids = torch.ones((2, 8), dtype=torch.int64)
    block, reason = find_prunable_last_block(model, ids, torch.ones_like(ids))
    assert block is None and "BERT block layout" in reason
