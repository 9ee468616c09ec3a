"""fomo.split_trainer.SplitTrainer (SplitFed V1 with a soft prompt) on the real all-MiniLM-L6-v2
and BBC News (slow).

Exact comparisons (``torch.equal``, ``==``) where the same float operations run in the same
order (a job against the hand-written loop of split steps; two trainers of one seed; the engine
against direct execution) and for counts (bytes, FLOPs). The aggregate is compared with the
weighted mean computed another way: |a - b| <= 4 eps_32 max(|w|, |mean|) for a sum of three
rounded float32 terms (each rounding <= eps_32 / 2 relative).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from fomo import profiling
from fomo.split import payload_formula
from fomo.split_trainer import SplitTrainer
from netsim.engine import Engine
from netsim.interfaces import LocalJob, SplitJobCost
from netsim.scenario import Scenario

pytestmark = pytest.mark.slow

NV = 4
HIDDEN = 384
FFN = 1536
LR = 1e-2
EPS32 = float(torch.finfo(torch.float32).eps)


def split_scenario(**overrides: Any) -> Scenario:
    """4 devices, batch 4, 32 tokens, 64 test examples, cut after block 1, head at the edge."""
    spec: dict[str, Any] = {
        "name": "split-small",
        "devices": [{"count": 4}],
        "model": {"max_length_tokens": 32},
        "data": {"max_test_examples": 64},
        "training": {"batch_size": 4, "local_steps": 2, "learning_rate": LR},
        "split": {"cut_layer": 1, "num_virtual_tokens": NV, "train_head": True},
    }
    for section, values in overrides.items():
        spec[section] = {**spec.get(section, {}), **values}
    return Scenario.model_validate(spec)


def build(scenario: Scenario) -> tuple[SplitTrainer, dict]:
    trainer = SplitTrainer(scenario, seed=0)
    return trainer, trainer.snapshot()


@pytest.fixture(scope="module")
def cut1() -> tuple[SplitTrainer, dict]:
    """Cut 1, head trained at the edge, AdamW; batched asked for (it falls back)."""
    with pytest.warns(RuntimeWarning, match="execution.strategy=batched not applied"):
        return build(split_scenario(execution={"strategy": "batched"}))


@pytest.fixture(scope="module")
def cut0() -> tuple[SplitTrainer, dict]:
    """Cut 0, only dL/dP comes back, frozen head, SGD."""
    return build(split_scenario(split={"cut_layer": 0, "prompt_only_gradient": True, "train_head": False},
                                training={"optimizer": "sgd"}))


def model_state(trainer: SplitTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_global_state_is_prompt_and_head_and_only_the_prompt_travels(cut1, cut0) -> None:
    trainer, initial = cut1
    assert list(initial) == ["prompt", "model.classifier.weight", "model.classifier.bias"]
    assert initial["prompt"].shape == (NV, HIDDEN)
    assert trainer.adapter_bytes() == NV * HIDDEN * 4 == trainer.device_parameters_count() * 4
    assert trainer.strategy == "sequential"
    assert any("prune_last_block" in note for note in trainer.execution_notes)   # default on: noted
    assert list(cut0[1]) == ["prompt"]
    # device weights: embeddings (+ position/token-type tables, LayerNorm, buffers) + block 0 + P
    emb = trainer.model.base.embeddings
    block = trainer.model.blocks[0]
    want = sum(t.numel() * t.element_size()
               for t in [*emb.parameters(), *emb.buffers(), *block.parameters(), *block.buffers()])
    assert trainer.device_weights_bytes() == want + NV * HIDDEN * 4


def test_job_equals_hand_written_split_steps_bitwise(cut1) -> None:
    trainer, initial = cut1
    plan = trainer.plan(LocalJob(device_id=0, round=1, steps=3, batch_size=4), initial)
    global_before = trainer.global_state()
    [result] = trainer.execute([plan])
    assert all(torch.equal(t, global_before[n]) for n, t in model_state(trainer).items())  # global again

    sm = trainer.model
    params = {n: p for n, p in sm.named_parameters() if p.requires_grad}
    try:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(initial[name])
        device_opt = torch.optim.AdamW([sm.prompt], lr=LR)
        edge_opt = torch.optim.AdamW(list(sm.head_parameters().values()), lr=LR)
        losses = [sm.split_step(device_opt, trainer._tokens.batch(ex), edge_opt).loss for ex in plan.inputs]
        for name, p in params.items():
            assert torch.equal(p.detach() - initial[name], result.update[name]), name
            assert float(result.update[name].abs().max()) > 0, name
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(global_before[name])
    assert result.loss == float(np.mean(losses)) and math.isfinite(result.loss)
    assert result.update_bytes == trainer.adapter_bytes()
    assert result.flops == plan.cost.flops and result.peak_memory_bytes == plan.cost.peak_memory_bytes


def block_forward_flops(batch: int, seq: int) -> int:
    """Matrix-product FLOPs of one BERT block's forward: Q, K, V, O (4 x 2 S d^2), the FFN
    (2 x 2 S d d_ff) and attention (QK^T and AV: 2 x 2 S^2 d), per example."""
    return batch * (8 * seq * HIDDEN ** 2 + 4 * seq * HIDDEN * FFN + 4 * seq ** 2 * HIDDEN)


def test_round_trip_costs_follow_the_formulas_and_the_counted_split(cut1) -> None:
    trainer, initial = cut1
    plan = trainer.plan(LocalJob(device_id=1, round=1, steps=2, batch_size=4), initial)
    cost = plan.cost
    assert isinstance(cost, SplitJobCost) and len(cost.steps) == 2
    for examples, step in zip(plan.inputs, cost.steps):
        seq = trainer._tokens.seq_len(examples)
        formula = payload_formula(4, seq, NV, HIDDEN)
        assert (step.uplink_bytes, step.downlink_bytes) == (formula.uplink_bytes, formula.downlink_bytes)
        assert step.downlink_bytes == 4 * (seq + NV) * HIDDEN * 4
        counted = trainer.model.count_split_flops(trainer._tokens.batch(examples))
        assert step.device_forward_flops + step.device_backward_flops == counted.device_flops
        assert step.edge_flops == counted.edge_flops
        assert step.device_forward_flops == block_forward_flops(4, seq + NV)   # one block below the cut
        assert step.device_backward_flops > 0 and step.edge_flops > 4 * step.device_forward_flops
    assert cost.flops == sum(s.device_forward_flops + s.device_backward_flops for s in cost.steps)
    assert cost.update_bytes == NV * HIDDEN * 4
    assert cost.num_examples == trainer.device_num_examples(1)
    # BBC texts fill 32 tokens: the planned peak is the worst-case one; the device holds far less
    # than the whole model
    assert cost.peak_memory_bytes == trainer.job_memory_bytes(4)
    assert trainer.device_weights_bytes() < cost.peak_memory_bytes < profiling.weights_bytes(trainer.model)
    assert trainer.job_memory_bytes(2) < trainer.job_memory_bytes(4) < trainer.job_memory_bytes(16)
    assert trainer.edge_memory_bytes(4, 2) > trainer.edge_memory_bytes(4) > 0


def test_aggregate_is_the_weighted_mean_and_evaluation_follows(cut1) -> None:
    trainer, initial = cut1
    before = trainer.evaluate()
    assert trainer.evaluate() == before   # same state, same numbers (FLOPs cached per shape)
    assert before.flops > 0 and before.num_examples == 64
    base = trainer.snapshot()
    results = trainer.execute([trainer.plan(LocalJob(d, 2, 2, 4), base) for d in (0, 2)])
    weights = [0.25, 0.75]
    trainer.aggregate(results, weights)
    after = trainer.global_state()
    for name in base:
        trained = [base[name] + r.update[name] for r in results]
        mean = weights[0] * trained[0] + weights[1] * trained[1]
        scale = float(torch.maximum(mean.abs(), base[name].abs()).max())
        assert float((after[name] - mean).abs().max()) <= 4 * EPS32 * scale, name
        assert not torch.equal(after[name], base[name]), name
    assert all(torch.equal(t, after[n]) for n, t in model_state(trainer).items())   # the model holds it
    moved = trainer.evaluate()
    assert moved.loss != before.loss and moved.flops == before.flops


def test_same_seed_same_results_and_the_engine_equals_direct_execution(cut1) -> None:
    trainer, initial = cut1
    with pytest.warns(RuntimeWarning, match="execution.strategy=batched not applied"):
        twin, twin_initial = build(split_scenario(execution={"strategy": "batched"}))
    assert all(torch.equal(initial[n], twin_initial[n]) for n in initial)
    job = LocalJob(device_id=3, round=1, steps=2, batch_size=4)
    plan = trainer.plan(job, initial)
    [direct] = trainer.execute([plan])
    engine = Engine(twin)
    pending = engine.submit(job, base=twin_initial)
    assert pending.cost == plan.cost and not pending.done   # cost known at submission
    assert all(np.array_equal(a, b) for a, b in zip(pending.plan.inputs, plan.inputs))
    via_engine = pending.result
    assert engine.passes == 1
    assert direct.loss == via_engine.loss and direct.flops == via_engine.flops
    assert direct.peak_memory_bytes == via_engine.peak_memory_bytes
    assert all(torch.equal(direct.update[n], via_engine.update[n]) for n in direct.update)


def test_cut_0_prompt_only_downloads_dL_dP(cut0) -> None:
    trainer, initial = cut0
    plan = trainer.plan(LocalJob(device_id=0, round=1, steps=2, batch_size=4), initial)
    for examples, step in zip(plan.inputs, plan.cost.steps):
        seq = trainer._tokens.seq_len(examples)
        assert step.downlink_bytes == NV * HIDDEN * 4
        assert step.uplink_bytes == 4 * seq * HIDDEN * 4 + NV * HIDDEN * 4 + 4 * seq + 8 * 4
        assert step.device_forward_flops == step.device_backward_flops == 0   # lookup + LayerNorm only
        assert step.edge_flops == trainer.model.count_split_flops(trainer._tokens.batch(examples)).edge_flops
        assert step.edge_flops > 6 * 2 * block_forward_flops(4, seq + NV) * 0.99   # forward + backward, 6 blocks
    assert plan.cost.flops == 0
    [result] = trainer.execute([plan])
    assert list(result.update) == ["prompt"] and float(result.update["prompt"].abs().max()) > 0
    assert math.isfinite(result.loss)
    # no activations saved on the device: weights + P x (1 gradient; SGD) + the E(x) buffer
    assert trainer.job_memory_bytes(4) == (trainer.device_weights_bytes() + NV * HIDDEN * 4
                                           + 4 * 32 * HIDDEN * 4)


def test_bad_settings_are_refused(cut1) -> None:
    with pytest.raises(ValueError, match=r"split\.cut_layer=7: must be in 0\.\.6"):
        SplitTrainer(split_scenario(split={"cut_layer": 7}), seed=0)
    trainer, initial = cut1
    with pytest.raises(ValueError, match="prox_mu=0.1: FedProx is not supported"):
        trainer.plan(LocalJob(0, 1, 1, 4, prox_mu=0.1), initial)
