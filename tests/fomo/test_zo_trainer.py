"""fomo.zo_trainer.ZerothOrderTrainer (MeZO steps, FedKSeed seed pools) on the real
all-MiniLM-L6-v2 checkpoint and BBC News (slow): payload, planned cost against the counted
forward, seed streams, replay aggregation against the devices' own models, the engine path, the
SPSA direction against autograd, and memory against the backprop trainer's."""
from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from fomo import data as fdata
from fomo import profiling
from fomo import zeroth_order as zo
from fomo.trainer import PeftTrainer
from fomo.zo_trainer import ZerothOrderTrainer, shared_candidate_seeds, zo_device_rng
from netsim.engine import Engine
from netsim.interfaces import LocalJob
from netsim.protocols.zeroth_order_fl import ZerothOrderSpec
from netsim.scenario import Scenario

pytestmark = pytest.mark.slow

K = 16
"""Few candidates, so that a job of a few steps draws some seed twice (accumulation tested)."""
U32 = 2.0**-24
"""Unit roundoff of float32."""


def small_scenario(**overrides: Any) -> Scenario:
    """4 devices, batch 4, 32 tokens, 64 test examples, K = 16, eps 1e-3, lr 5e-3."""
    spec: dict[str, Any] = {
        "name": "zo-small",
        "devices": [{"count": 4}],
        "model": {"max_length_tokens": 32},
        "data": {"max_test_examples": 64},
        "training": {"batch_size": 4, "local_steps": 2, "learning_rate": 5e-3},
        "zeroth_order": {"candidate_seeds": K, "eps": 1e-3},
    }
    for section, values in overrides.items():
        spec[section] = {**spec.get(section, {}), **values}
    return Scenario.model_validate(spec)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trainer() -> ZerothOrderTrainer:
    return ZerothOrderTrainer(small_scenario(), seed=0)


@pytest.fixture(scope="module")
def exact_trainer() -> ZerothOrderTrainer:
    """Exact restore, asked to batch (which a zeroth-order trainer does not)."""
    with pytest.warns(RuntimeWarning, match="batched not applied"):
        return ZerothOrderTrainer(small_scenario(execution={"strategy": "batched"}), seed=0, exact_restore=True)


def job(device: int, round_: int = 1, steps: int = 3, batch: int = 4, mu: float = 0.0) -> LocalJob:
    return LocalJob(device_id=device, round=round_, steps=steps, batch_size=batch, prox_mu=mu)


def state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(torch.equal(a[n], b[n]) for n in a)


def restore_global(trainer: ZerothOrderTrainer, state: dict[str, torch.Tensor]) -> None:
    trainer._global = state
    trainer._load_state(state)


# --------------------------------------------------------------------------------------------
# Payload, scenario
# --------------------------------------------------------------------------------------------
def test_payload_is_4k_bytes_both_ways(trainer: ZerothOrderTrainer) -> None:
    assert trainer.adapter_bytes() == 4 * K == zo.dense_payload_bytes(K)
    assert trainer.trainable_bytes() > 100 * trainer.adapter_bytes()  # what plain FedAvg sends
    result = trainer.execute([trainer.plan(job(0, round_=90, steps=1), trainer.snapshot())])[0]
    assert result.update_bytes == 4 * K
    assert trainer.flatten_update(result).shape == (K,) and trainer.flatten_update(result).dtype == np.float64
    assert zo.dense_payload_bytes(1024) == 4096 and zo.dense_payload_bytes(4096) == 16384
    values = sum(t.numel() for t in trainer.global_state().values())
    assert trainer.replay_flops(3) == 2.0 * 3 * values  # wd = 0: one multiply-add per value and pair


def test_candidate_seeds_are_the_run_s_shared_draw(trainer: ZerothOrderTrainer) -> None:
    seeds = trainer.candidate_seeds
    assert seeds.shape == (K,) and len(set(seeds.tolist())) == K
    assert np.array_equal(seeds, shared_candidate_seeds(0, K))
    assert not np.array_equal(seeds, shared_candidate_seeds(1, K))


def test_zero_candidate_seeds_are_refused() -> None:
    for bad in (0, -3, 2**24 + 1):
        with pytest.raises(ValidationError, match="candidate_seeds"):
            ZerothOrderSpec(candidate_seeds=bad)


def test_batched_strategy_falls_back_to_sequential_with_a_note(exact_trainer: ZerothOrderTrainer) -> None:
    assert exact_trainer.strategy == "sequential"
    assert any("zeroth-order" in note for note in exact_trainer.execution_notes)


# --------------------------------------------------------------------------------------------
# Planning: cost and streams
# --------------------------------------------------------------------------------------------
def test_plan_flops_are_two_counted_forwards_per_step(trainer: ZerothOrderTrainer) -> None:
    plan = trainer.plan(job(1, round_=80, steps=3), trainer.snapshot())
    expected = 0.0
    with torch.no_grad():
        for examples in plan.inputs.batches:
            ids, mask, _ = trainer._tokens.batch(examples)
            expected += 2.0 * profiling.counted_forward(trainer.model, ids, mask)[1]
    assert expected > 0 and plan.cost.flops == expected
    assert trainer.min_job_flops(3, 4) <= plan.cost.flops


def test_batches_and_seeds_follow_the_device_streams_whatever_the_order(trainer: ZerothOrderTrainer) -> None:
    """The batches are the device's PeftTrainer batch stream; the seed indices its own seed
    stream; interleaving other devices' plans changes neither."""
    batch_rng = copy.deepcopy(trainer._device_rng(2))
    seed_rng = copy.deepcopy(trainer._seed_rng(2))
    base = trainer.snapshot()
    first = trainer.plan(job(2, 70, steps=4), base)
    trainer.plan(job(3, 70, steps=5), base)
    trainer.plan(job(0, 70, steps=2), base)
    second = trainer.plan(job(2, 71, steps=4), base)
    examples = trainer._device_examples[2]
    for plan in (first, second):
        for batch in plan.inputs.batches:
            assert np.array_equal(batch, fdata.sample_batch(batch_rng, examples, 4))
        assert np.array_equal(plan.inputs.seed_indices, seed_rng.integers(0, K, size=4))
    seeds = trainer.candidate_seeds[first.inputs.seed_indices]
    assert set(seeds.tolist()) <= set(trainer.candidate_seeds.tolist())


def test_a_device_s_first_job_uses_the_documented_spawn_keys(exact_trainer: ZerothOrderTrainer) -> None:
    """Device 3 of this trainer plans nothing else: its first batches are fomo.data's device
    stream (2, 3) and its seed indices the stream (ZO_DEVICE_SPAWN_KEY, 3), from the start."""
    plan = exact_trainer.plan(job(3, 1, steps=5), exact_trainer.snapshot())
    batch_rng = fdata.device_rng(0, 3)
    for batch in plan.inputs.batches:
        assert np.array_equal(batch, fdata.sample_batch(batch_rng, exact_trainer._device_examples[3], 4))
    assert np.array_equal(plan.inputs.seed_indices, zo_device_rng(0, 3).integers(0, K, size=5))
    assert np.array_equal(plan.inputs.seed_indices, np.random.default_rng(
        np.random.SeedSequence(0, spawn_key=(fdata.ZO_DEVICE_SPAWN_KEY, 3))).integers(0, K, size=5))


def test_results_do_not_depend_on_execution_order_or_grouping(trainer: ZerothOrderTrainer) -> None:
    base = trainer.snapshot()
    before = trainer.global_state()
    plans = [trainer.plan(job(d, 60, steps=3), base) for d in range(3)]
    together = trainer.execute(plans)
    apart = [trainer.execute([p])[0] for p in reversed(plans)][::-1]
    for a, b in zip(together, apart):
        assert a.device_id == b.device_id
        assert np.array_equal(a.update, b.update) and a.loss == b.loss
        assert np.count_nonzero(a.update) >= 1 and math.isfinite(a.loss) and a.loss > 0
        # the update holds the sum of the projected gradients at the drawn candidates only
        drawn = set(plans[a.device_id].inputs.seed_indices.tolist())
        assert set(np.flatnonzero(a.update).tolist()) <= drawn
    assert state_equal(before, trainer.global_state())  # execute leaves the global state alone
    assert trainer.model.training


def test_engine_jobs_equal_direct_execute(trainer: ZerothOrderTrainer) -> None:
    engine = Engine(trainer)
    pending = [engine.submit(job(d, 50, steps=2)) for d in (3, 1, 2)]
    results = [p.result for p in pending]  # one pass, in (round, device) order
    assert engine.passes == 1
    for p, r in zip(pending, results):
        direct = trainer.execute([p.plan])[0]
        assert r.device_id == p.job.device_id
        assert np.array_equal(r.update, direct.update) and r.loss == direct.loss
        assert r.flops == p.cost.flops == direct.flops


# --------------------------------------------------------------------------------------------
# Aggregation by replay
# --------------------------------------------------------------------------------------------
def test_one_step_one_device_aggregate_is_bitwise_its_local_model(exact_trainer: ZerothOrderTrainer) -> None:
    """One step, weight 1, wd 0, exact restore: the edge's replay applies the device's update
    with the same arithmetic, so the global model is the device's, bit for bit."""
    tr = exact_trainer
    before = tr.global_state()
    plan = tr.plan(job(0, 1, steps=1), tr.snapshot())
    result, local = tr.run_local(plan)
    tr._load_state(tr._global)
    tr.aggregate([result], [1.0])
    assert state_equal(tr.global_state(), local)
    assert not state_equal(tr.global_state(), before)
    restore_global(tr, before)


def test_aggregate_of_one_device_is_its_local_model_within_rounding(exact_trainer: ZerothOrderTrainer) -> None:
    """Several steps, some seed drawn twice: the device adds fl(-lr g_t z_t) step by step, the
    replay fl(-lr G_i z_i) seed by seed, in ascending seed order: the same exact sum rounded in
    two orders. Each of the T additions and the scaling of each term is rounded once (relative
    error u = 2**-24), so per element |device - replay| <= 2 (T + 2) u (|theta_0| +
    sum_t |lr g_t z_t|) (two recursive float32 sums of T + 1 terms, Higham's bound
    gamma_T < (T + 1) u for T u << 1, plus the rounding of each product)."""
    tr = exact_trainer
    before = tr.global_state()
    steps = 8
    plan = tr.plan(job(1, 2, steps=steps), tr.snapshot())
    assert len(set(plan.inputs.seed_indices.tolist())) < steps  # a seed accumulates twice
    result, local = tr.run_local(plan)
    tr._load_state(tr._global)
    tr.aggregate([result], [1.0])
    replayed = tr.global_state()
    # the per-step projected gradients, from the device's own trajectory replayed step by step
    names = list(before)
    params = [before[n].clone() for n in names]
    magnitude = [p.abs().double() for p in params]
    trainable = [p for _, p in tr._trainable]
    # the trainer's own loss closures (through the pruned last block, as the device ran them)
    loss_fns = [tr._loss_fn(examples, trainable, params, 0.0, []) for examples in plan.inputs.batches]
    tr._load_state(before)
    for fn, index in zip(loss_fns, plan.inputs.seed_indices):
        seed = int(tr.candidate_seeds[index])
        g = zo.spsa_step(fn, trainable, seed, tr.eps, tr.learning_rate, 0.0, exact_restore=True)
        for m, z in zip(magnitude, zo.perturbation(seed, trainable)):
            m.add_(z.double().abs(), alpha=abs(tr.learning_rate * g))
    assert state_equal({n: p.detach() for n, p in tr._trainable}, local)  # the same device trajectory
    for n, m in zip(names, magnitude):
        diff = (replayed[n].double() - local[n].double()).abs()
        assert bool((diff <= 2 * (steps + 2) * U32 * m).all()), n
    assert not state_equal(replayed, before)
    restore_global(tr, before)


def test_aggregate_of_several_is_the_replay_of_the_weighted_pool(trainer: ZerothOrderTrainer) -> None:
    before = trainer.global_state()
    base = trainer.snapshot()
    results = trainer.execute([trainer.plan(job(d, 3, steps=3), base) for d in range(3)])
    weights = [0.5, 0.3, 0.2]
    pools = [{int(trainer.candidate_seeds[i]): float(r.update[i]) for i in np.flatnonzero(r.update)}
             for r in results]
    pool = zo.aggregate_pools(pools, weights)
    names = list(before)
    expected = zo.replay([before[n] for n in names], pool, trainer.learning_rate, trainer.weight_decay)
    trainer.aggregate(results, weights)
    after = trainer.global_state()
    assert all(torch.equal(after[n], e) for n, e in zip(names, expected))
    assert state_equal({n: p.detach() for n, p in trainer._trainable}, after)  # loaded in the model
    # the over-the-air path: the edge receives sum_k w_k x_k and replays it
    restore_global(trainer, before)
    flat = np.zeros(K)
    for r, w in zip(results, weights):
        flat = flat + w * trainer.flatten_update(r)
    trainer.aggregate_flat(flat)
    assert state_equal(trainer.global_state(), after)
    restore_global(trainer, before)


def test_aggregate_is_fedavg_of_the_local_models_with_no_weight_decay(exact_trainer: ZerothOrderTrainer) -> None:
    """wd = 0: replaying sum_k w_k G_k is theta_0 - lr sum_k w_k g_k z_k, the weighted mean of
    the devices' models (one step each), up to float32 rounding: each local model is within
    2 u (|theta_0| + |lr g_k z_k|) of exact, the replay of its 3 terms within 4 u (|theta_0| +
    sum_k w_k |lr g_k z_k|), so 4 (terms + 2) u (|theta_0| + sum_k w_k |lr g_k z_k|) bounds
    the difference."""
    tr = exact_trainer
    before = tr.global_state()
    base = tr.snapshot()
    plans = [tr.plan(job(d, 4, steps=1), base) for d in range(3)]
    runs = [tr.run_local(p) for p in plans]
    tr._load_state(tr._global)
    weights = [0.25, 0.25, 0.5]
    tr.aggregate([r for r, _ in runs], weights)
    after = tr.global_state()
    trainable = [p for _, p in tr._trainable]
    names = list(before)
    magnitude = [before[n].abs().double() for n in names]
    for (result, _), w in zip(runs, weights):
        for i in np.flatnonzero(result.update):
            term = abs(w * tr.learning_rate * float(result.update[i]))
            for m, z in zip(magnitude, zo.perturbation(int(tr.candidate_seeds[i]), trainable)):
                m.add_(z.double().abs(), alpha=term)
    terms = sum(len(p.inputs.batches) for p in plans)
    for n, m in zip(names, magnitude):
        mean = before[n].double() + sum(w * (local[n].double() - before[n].double())
                                        for (_, local), w in zip(runs, weights))
        assert bool(((after[n].double() - mean).abs() <= 4 * (terms + 2) * U32 * m).all()), n
    restore_global(tr, before)


# --------------------------------------------------------------------------------------------
# Learning signal, memory
# --------------------------------------------------------------------------------------------
def test_spsa_direction_matches_autograd_on_the_real_model(trainer: ZerothOrderTrainer) -> None:
    """At eps = 1e-3 the projected gradient g of each candidate seed equals autograd's
    directional derivative grad f . z within 0.02 |grad f|: the central difference's truncation
    error is eps**2 / 6 f'''[z, z, z] (measured on AMD EPYC at eps = 1e-2: 1.2e-2 |grad f|, so
    about 1e-4 at 1e-3), and float32 rounding of the two losses adds at most 2 delta / (2 eps)
    with delta a loss error that even at a relative 1e-5 (far above a 32-token forward's)
    gives 1.6e-2 / 1.3 ~ 1.2e-2 |grad f| here. The signs therefore agree wherever
    |grad f . z| > 0.02 |grad f| (all but about 1.6 % of seeds, as grad f . z ~ N(0, |grad f|^2))."""
    tr = trainer
    examples = tr._train_examples[:8]
    ids, mask, labels = tr._tokens.batch(examples)
    params = [p for _, p in tr._trainable]
    tr.model.eval()
    try:
        loss = profiling.classification_loss(tr.model, ids, mask, labels)
        grads = torch.autograd.grad(loss, params)
    finally:
        tr.model.train()
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    assert norm > 0
    loss_fn = zo.classification_loss_fn(tr.model, ids, mask, labels)
    agree = 0
    for seed in tr.candidate_seeds:
        zs = zo.perturbation(int(seed), params)
        d = sum(float((g.double() * z.double()).sum()) for g, z in zip(grads, zs))
        plus, minus = zo.spsa_losses(loss_fn, params, int(seed), 1e-3, exact_restore=True)
        g = (plus - minus) / 2e-3
        assert abs(g - d) <= 0.02 * norm, (int(seed), g, d, norm)
        agree += (g > 0) == (d > 0)
    assert agree >= K - 1
    tr.model.train()


def test_zo_memory_is_inference_level_and_below_backprop(trainer: ZerothOrderTrainer) -> None:
    plan = trainer.plan(job(0, 40, steps=2, batch=8), trainer.snapshot())
    params = [p for _, p in trainer._trainable]
    formula = zo.zo_step_memory_bytes(profiling.weights_bytes(trainer.model), params)
    transient = plan.cost.peak_memory_bytes - formula
    assert transient > 0  # the measured forward transients
    # BBC texts fill 32 tokens: the planned batch has the full-length shape
    assert plan.cost.peak_memory_bytes == trainer.job_memory_bytes(8)
    backprop = PeftTrainer.job_memory_bytes(trainer, 8)
    assert plan.cost.peak_memory_bytes < backprop
    # the transient forward peak is below the activations a backprop step saves
    saved = trainer._step_profile(plan.inputs.batches[0]).saved_activation_bytes
    assert transient < saved
    assert trainer.job_memory_bytes(2) < trainer.job_memory_bytes(8)
