"""Execution strategies of the real trainer: batched multi-device steps, the frozen-prefix
activation cache and the pruned last block must give the one-device-at-a-time, uncached,
whole-model results and the same simulated timeline (slow: real all-MiniLM-L6-v2).

Two kinds of claim, checked differently so that the tests hold on any x86-64 or ARM CPU:

* **Costs** (FLOPs, memory, upload bytes, example counts; in a whole run the event log's
  times and energies, which follow from them) are counts and profiles, not sums of floats
  whose order a BLAS library chooses. They are asserted bitwise, in float32 as deftsim runs.
* **Values** (losses, gradients, updates, evaluation) are "the same maths" computed with other
  matrix shapes, so another CPU's kernels sum them in another order. They are asserted in
  float64 (the trainers converted by :func:`as_float64`) against the tolerances derived
  below; float32 losses are also checked, to a float32 tolerance. Float32 *updates* are not
  compared: AdamW turns a rounding flip of a near-zero gradient into a difference of order
  ``lr`` (see ``ADAMW_ATOL_PER_LR_STEP``), so they carry no information about correctness.

Tolerances. Summing n products in any order (any BLAS, thread count or blocking; an FMA only
lowers the error) returns the exact sum of the products each perturbed by a relative error of
at most ``gamma_n = n u / (1 - n u)`` (the backward error of a dot product), u the unit
roundoff. The longest reduction in all-MiniLM-L6-v2 has n = 1536 terms (the feed-forward
output layer), so gamma_n = 1.7e-13 in float64 (u = 2**-53) and 9.2e-5 in float32
(u = 2**-24). Element-wise kernels (exp, erf, rsqrt) of different libraries differ by a few u,
far less. How far such errors move a loss, gradient or update is the network's conditioning:
:func:`test_tolerances_cover_rounding_and_are_tight` measures it by multiplying every frozen
weight by (1 + e), |e| <= 100 gamma_n (100 times the worst case of any summation order), and
checks that every tolerance below still holds, and that float32 rounding (a float32 run
against the float64 run) exceeds each of them, so the tolerances are also tight.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fomo import batched as fbatched
from fomo import build_trainer, models
from fomo.trainer import PeftTrainer
from netsim.protocols.fedavg import FedAvgSimulation
from netsim.interfaces import LocalJob, LocalResult
from netsim.scenario import Scenario

pytestmark = pytest.mark.slow

GAMMA_N_F64 = 1536 * 2.0**-53 / (1 - 1536 * 2.0**-53)
"""Backward error bound of a 1536-term float64 dot product in any summation order (1.7e-13)."""

LOSS_RTOL = 1e-10
"""float64 losses, relative. Measured effect of the 100 gamma_n weight perturbation
(AMD EPYC Zen 4): 2.4e-12, so 40x margin; float32 rounding gives about 4e-8 (400x over)."""

GRAD_RTOL = 1e-8
"""float64 gradients and SGD updates (an SGD update is -lr times the sum of the step gradients,
linear in them), as max |difference| over max |reference| across a device's tensors.
Measured for the 100 gamma_n perturbation: 1.6e-10 (60x margin); float32 rounding: 3e-7 to
9e-6 (30x over or more)."""

ADAMW_ATOL_PER_LR_STEP = 1e-4
"""float64 AdamW updates: max |difference| <= ADAMW_ATOL_PER_LR_STEP * lr * steps. An AdamW step
moves a coordinate by lr * m / (sqrt(v) + eps); g -> g / (|g| + eps) has slope up to
1 / eps = 1e8, so a gradient discrepancy d moves the update by up to lr * d / eps: near-zero
gradients amplify rounding (float32: up to 0.1 lr measured, which is why float32 updates are
not compared). Measured for the 100 gamma_n perturbation: 2.2e-6 lr over 2 steps (90x
margin); float32 rounding: 0.04 to 0.1 lr (200x over)."""

F32_LOSS_RTOL = 1e-4
"""float32 losses, relative. Rounding errors of mixed sign grow like sqrt(n) u = 2.4e-6 for
n = 1536, times the forward's conditioning (about 5: the loss/weight-perturbation ratio
measured above), 1.2e-5; 1e-4 leaves 8x. Measured: 4e-8 to 8e-8 between a float32 and a
float64 run."""


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


def as_float64(trainer: PeftTrainer) -> PeftTrainer:
    """The trainer with its model and global PEFT state in float64 (for "same maths" checks;
    build it and convert it before any training or evaluation). Reported memory stays that of
    the float32 model: float64 trainers are only compared with each other, on values."""
    trainer.model.double()
    trainer._trainable = models.trainable_parameters(trainer.model)
    trainer._global = {n: t.double() for n, t in trainer._global.items()}
    return trainer


def build64(sc: Scenario, seed: int = 0) -> PeftTrainer:
    return as_float64(build_trainer(sc, seed))


def fresh_streams(*trainers: PeftTrainer) -> None:
    """Restart the devices' batch-sampling streams (they depend only on seed and device), so
    the same jobs draw the same batches again."""
    for trainer in trainers:
        trainer._device_rngs.clear()


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` within the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------ value comparisons
def rel_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max |a - b| over max |a|, across all tensors of one device (0 if both are zero)."""
    diff = max(float((a[n] - b[n]).abs().max()) for n in a)
    scale = max(float(a[n].abs().max()) for n in a)
    return diff / scale if scale > 0 else diff


def sgd_gap(a: list[LocalResult], b: list[LocalResult]) -> float:
    """Worst device's relative update gap (compare with GRAD_RTOL)."""
    return max(rel_gap(x.update, y.update) for x, y in zip(a, b))


def adamw_gap(a: list[LocalResult], b: list[LocalResult], lr: float, steps: int) -> float:
    """Worst max |update difference| in units of lr * steps (compare with
    ADAMW_ATOL_PER_LR_STEP)."""
    diff = max(float((x.update[n] - y.update[n]).abs().max()) for x, y in zip(a, b) for n in x.update)
    return diff / (lr * steps)


def loss_gap(a: list[LocalResult], b: list[LocalResult]) -> float:
    """Worst relative loss difference."""
    return max(abs(x.loss - y.loss) / abs(x.loss) for x, y in zip(a, b))


def assert_same_values(a: list[LocalResult], b: list[LocalResult], optimizer: str, lr: float,
                       steps: int = 2) -> None:
    """float64 results of the same jobs (at most ``steps`` local steps each) agree within the
    derived tolerances."""
    assert [r.device_id for r in a] == [r.device_id for r in b]
    assert loss_gap(a, b) <= LOSS_RTOL
    if optimizer == "sgd":
        assert sgd_gap(a, b) <= GRAD_RTOL
    else:
        assert adamw_gap(a, b, lr, steps) <= ADAMW_ATOL_PER_LR_STEP
    assert any(float(t.abs().max()) > 0 for r in a for t in r.update.values())  # training moved


def assert_same_costs(a: list[LocalResult], b: list[LocalResult]) -> None:
    """Same devices, FLOPs, memory, upload size and example counts (bitwise: the simulated
    timeline cannot change), and float32 losses within F32_LOSS_RTOL."""
    assert [r.device_id for r in a] == [r.device_id for r in b]
    assert [r.flops for r in a] == [r.flops for r in b]
    assert [r.peak_memory_bytes for r in a] == [r.peak_memory_bytes for r in b]
    assert [r.update_bytes for r in a] == [r.update_bytes for r in b]
    assert [r.num_examples for r in a] == [r.num_examples for r in b]
    assert loss_gap(a, b) <= F32_LOSS_RTOL


def assert_same_evaluation(trainers: tuple[PeftTrainer, PeftTrainer], rtol: float) -> None:
    ea, eb = (t.evaluate() for t in trainers)
    assert (ea.flops, ea.num_examples) == (eb.flops, eb.num_examples)
    # a prediction changes only where an example's top-two logit margin is below the rounding
    # gap (relative 1e-10 in float64): the accuracies are equal
    assert abs(ea.loss - eb.loss) <= rtol * abs(ea.loss) and ea.accuracy == eb.accuracy


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def sequential() -> PeftTrainer:
    return build_trainer(scenario(), seed=0)


@pytest.fixture(scope="module")
def batched() -> PeftTrainer:
    trainer = build_trainer(scenario(execution={"strategy": "batched", "max_devices_per_pass": 2}), seed=0)
    assert trainer.strategy == "batched" and not trainer.execution_notes
    return trainer


@pytest.fixture(scope="module")
def sequential64() -> PeftTrainer:
    return build64(scenario())


@pytest.fixture(scope="module")
def batched64() -> PeftTrainer:
    return build64(scenario(execution={"strategy": "batched", "max_devices_per_pass": 2}))


# ------------------------------------------------------------------ tests
def test_per_device_gradients_equal_one_device_at_a_time(sequential64: PeftTrainer) -> None:
    """One forward/backward over 3 devices' rows gives each device the gradient it gets alone
    (float64, GRAD_RTOL)."""
    t = sequential64
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
        got = {name: stack.tensors[name].grad[d] for name in alone[d]}
        assert all(got[n].shape == g.shape for n, g in alone[d].items())
        assert rel_gap(alone[d], got) <= GRAD_RTOL, d
    # device 0's gradient is not device 1's: the comparison can tell devices apart
    assert rel_gap(alone[0], alone[1]) > 1e-3
    assert any(float(g.abs().max()) > 0 for g in alone[0].values())
    # the model's own parameters are untouched and hold no gradient
    assert all(p.grad is None for _, p in t._trainable)


def test_batched_updates_equal_sequential(sequential: PeftTrainer, batched: PeftTrainer,
                                          sequential64: PeftTrainer, batched64: PeftTrainer) -> None:
    # mixed step counts: grouped by (steps, batch), passes of 2 devices, results in job order
    work = jobs(1, [2, 1, 2, 2, 1])
    before = batched.global_state()
    a, b = sequential.local_train(work), batched.local_train(work)
    assert_same_costs(a, b)
    # nothing writes the global state during local training (bitwise on any machine)
    assert all(torch.equal(before[n], t) for n, t in batched.global_state().items())
    a64, b64 = sequential64.local_train(work), batched64.local_train(work)
    assert_same_values(a64, b64, "adamw", 1e-3)
    total = sum(r.num_examples for r in a64)
    for trainer, results in ((sequential64, a64), (batched64, b64)):
        trainer.aggregate(results, [r.num_examples / total for r in results])
    assert_same_evaluation((sequential64, batched64), LOSS_RTOL)


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
    plain, fast = scenario(**sections), scenario(**sections, execution={"strategy": "batched"})
    a_tr, b_tr = build_trainer(plain, seed=1), build_trainer(fast, seed=1)
    lengths = {int(a_tr._tokens.lengths_tokens[i]) for i in range(60)}
    assert len(lengths) > 3
    work = jobs(1, [2, 2, 2, 2])
    assert_same_costs(a_tr.local_train(work), b_tr.local_train(work))
    assert_same_values(build64(plain, 1).local_train(work), build64(fast, 1).local_train(work), "sgd", 0.05)


def test_batched_prompt_tuning_equals_sequential() -> None:
    """Per-device soft prompts in one batch: the same costs, losses and updates as one device
    at a time, with AdamW and mixed step counts."""
    sections: dict[str, Any] = {"peft": {"method": "prompt_tuning", "num_virtual_tokens": 4},
                                "training": {"learning_rate": 1e-2}}
    plain, fast = scenario(**sections), scenario(**sections, execution={"strategy": "batched"})
    a_tr, b_tr = build_trainer(plain, seed=0), build_trainer(fast, seed=0)
    assert b_tr.strategy == "batched" and not b_tr.execution_notes
    work = jobs(1, [2, 1, 2, 2, 1])
    a = a_tr.local_train(work)
    assert_same_costs(a, b_tr.local_train(work))
    assert any("prompt_encoder" in n and float(t.abs().max()) > 0 for n, t in a[0].update.items())
    assert "get_prompt" not in vars(b_tr.model)  # the per-pass patch is removed
    a64_tr, b64_tr = build64(plain), build64(fast)
    assert_same_values(a64_tr.local_train(work), b64_tr.local_train(work), "adamw", 1e-2)
    assert "get_prompt" not in vars(b64_tr.model)


def test_batched_falls_back_for_dropout() -> None:
    with pytest.warns(RuntimeWarning, match="dropout"):
        dropout = build_trainer(scenario(peft={"dropout": 0.1}, execution={"strategy": "batched"}), seed=0)
    assert dropout.strategy == "sequential" and "dropout" in dropout.execution_notes[0]
    (result,) = dropout.local_train(jobs(1, [1]))
    assert result.flops > 0


def test_activation_cache_is_exact_bounded_and_counts_full_flops() -> None:
    top2 = {"layers": [4, 5]}
    plain = build_trainer(scenario(peft=top2), seed=0)
    row_bytes = 16 * 384 * 4  # one 16-token example of hidden size 384, float32
    cached = build_trainer(scenario(peft=top2, execution={"activation_cache_bytes": 6 * row_bytes}), seed=0)
    both_sc = scenario(peft=top2, execution={"activation_cache_bytes": 10_000_000, "strategy": "batched"})
    both = build_trainer(both_sc, seed=0)
    cache = cached.activation_cache
    assert cache is not None and cache.prefix.first_trainable == 4 and not cached.execution_notes
    work = jobs(1, [2, 2, 2])
    a, b, c = plain.local_train(work), cached.local_train(work), both.local_train(work)
    assert_same_costs(a, b)
    assert_same_costs(a, c)
    # bounded: 6 rows at most, least recently used evicted
    assert cache.misses > 6 and len(cache) <= 6 and cache.bytes_used <= 6 * row_bytes
    # evaluation: the first call counts the full forward, the second fills the cache, the
    # third is served from it (float32 here: the same counted FLOPs, losses within F32_LOSS_RTOL)
    for _ in range(3):
        ea, ec = plain.evaluate(), both.evaluate()
        assert ea.flops == ec.flops and abs(ea.loss - ec.loss) <= F32_LOSS_RTOL * ea.loss
    assert both.activation_cache.hits >= 32
    # values, float64: cached and cached + batched against the plain trainer
    plain64, both64 = build64(scenario(peft=top2)), build64(both_sc)
    a64, c64 = plain64.local_train(work), both64.local_train(work)
    assert_same_values(a64, c64, "adamw", 1e-3)
    for _ in range(2):  # fill, then from the cache
        assert_same_evaluation((plain64, both64), LOSS_RTOL)
    assert both64.activation_cache.hits >= 32


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


LOSS_COL, ACC_COL = 10, 11  # event-log columns: t_s ... energy_j come before them


def test_timeline_is_the_same_for_every_strategy() -> None:
    """The whole event log of a float32 FedAvg run: times, FLOPs, memory and energy bitwise;
    losses within F32_LOSS_RTOL; accuracies within one of the 32 test examples (in float32 a
    prediction whose top-two logit margin is below about 1e-5 may flip on another CPU)."""
    top2: dict[str, Any] = {"peft": {"layers": [4, 5]}, "training": {"local_steps": 1}}
    reference = _event_rows(scenario(**top2, execution={"prune_last_block": False}))
    fast = _event_rows(scenario(**top2, execution={"strategy": "batched", "activation_cache_bytes": 10**7}))
    assert len(reference) == len(fast) > 10
    for r, f in zip(reference, fast):
        assert r[:LOSS_COL] == f[:LOSS_COL]  # t_s ... energy_j: exactly equal
        assert (np.isnan(r[LOSS_COL]) and np.isnan(f[LOSS_COL])) or \
            abs(r[LOSS_COL] - f[LOSS_COL]) <= F32_LOSS_RTOL * abs(r[LOSS_COL])
        assert (np.isnan(r[ACC_COL]) and np.isnan(f[ACC_COL])) or abs(r[ACC_COL] - f[ACC_COL]) <= 1 / 32 + 1e-12


_DETERMINISM_SCRIPT = """
import hashlib, json, sys, torch
torch.set_num_threads(int(sys.argv[2]))
from fomo import build_trainer
from netsim.protocols.fedavg import FedAvgSimulation
from netsim.scenario import Scenario
sc = Scenario.model_validate(json.loads(sys.argv[1]))
sim = FedAvgSimulation(sc, 0, build_trainer(sc, 0))
sim.run()
print(hashlib.sha256(repr(sim.recorder.rows).encode()).hexdigest(), len(sim.recorder.rows))
"""


def test_same_machine_same_threads_is_bitwise_across_processes() -> None:
    """Two processes on one machine with the same thread count: the event log of a batched,
    cached, pruned run is bit for bit the same (repr of a float is exact), losses included."""
    spec = scenario(peft={"layers": [4, 5]}, training={"local_steps": 1, "rounds": 1},
                    execution={"strategy": "batched", "activation_cache_bytes": 10**7}).model_dump(mode="json")
    root = Path(__file__).resolve().parents[2]
    runs = [subprocess.run([sys.executable, "-c", _DETERMINISM_SCRIPT, json.dumps(spec), "2"], cwd=root,
                           capture_output=True, text=True, timeout=600, check=False) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    digests = [r.stdout.split()[-2:] for r in runs]
    assert digests[0] == digests[1] and int(digests[0][1]) > 5
    assert len(digests[0][0]) == len(hashlib.sha256().hexdigest())


def with_optimizer(trainer: PeftTrainer, optimizer: str, lr: float) -> PeftTrainer:
    """The trainer's next local jobs use this optimizer and learning rate (its global state
    is untouched, the devices' batch streams restart)."""
    trainer._optimizer_name, trainer._learning_rate = optimizer, lr
    fresh_streams(trainer)
    return trainer


def test_tolerances_cover_rounding_and_are_tight() -> None:
    """The tolerances hold under real changes of summation order (torch threads 1 vs 2, other
    batch splits) and under a perturbation 100x the worst case of any summation order, and
    float32 rounding exceeds them (so they would catch an error that small)."""
    work = jobs(3, [2, 2, 2, 2])
    ref, fast, moved = build64(scenario()), build64(scenario(execution={"strategy": "batched"})), build64(scenario())
    single = build_trainer(scenario(), seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every frozen weight times (1 + e), |e| <= 100 gamma_n
        for _, p in moved.model.named_parameters():
            if not p.requires_grad:
                p.mul_(1 + 100 * GAMMA_N_F64 * (2 * torch.rand(p.shape, generator=gen, dtype=p.dtype) - 1))
    for optimizer, lr in (("adamw", 1e-3), ("sgd", 0.05)):
        reference = with_optimizer(ref, optimizer, lr).local_train(work)
        # another thread count and other batch splits (passes of 2 + 2 and of 3 + 1 devices)
        for threads, per_pass in ((1, 2), (2, 3)):
            with_optimizer(fast, optimizer, lr)._max_devices_per_pass = per_pass
            with torch_threads(threads):
                assert_same_values(reference, fast.local_train(work), optimizer, lr)
        perturbed = with_optimizer(moved, optimizer, lr).local_train(work)
        assert loss_gap(reference, perturbed) > 0  # the perturbation did change the numbers
        assert_same_values(reference, perturbed, optimizer, lr)
        # float32 rounding alone breaks the float64 tolerances
        f32 = with_optimizer(single, optimizer, lr).local_train(work)
        f32 = [dataclasses.replace(r, update={n: t.double() for n, t in r.update.items()}) for r in f32]
        assert loss_gap(reference, f32) > 10 * LOSS_RTOL
        if optimizer == "sgd":
            assert sgd_gap(reference, f32) > 10 * GRAD_RTOL
        else:
            assert adamw_gap(reference, f32, lr, 2) > 10 * ADAMW_ATOL_PER_LR_STEP


def test_float32_costs_hold_under_another_thread_count_and_split(sequential: PeftTrainer) -> None:
    """float32, as deftsim runs: with 1 instead of 2 torch threads and other batch splits the
    costs are bitwise the same and the losses within F32_LOSS_RTOL, whatever the bits of the
    updates do."""
    work = jobs(4, [2, 2, 2, 2, 2])
    reference = with_optimizer(sequential, "adamw", 1e-3).local_train(work)
    other = build_trainer(scenario(execution={"strategy": "batched"}), 0)
    for threads, per_pass in ((1, 2), (2, 3)):
        with_optimizer(other, "adamw", 1e-3)._max_devices_per_pass = per_pass
        with torch_threads(threads):
            assert_same_costs(reference, other.local_train(work))
    fresh_streams(sequential)


def test_pruned_last_block_equals_the_whole_model() -> None:
    """Position 0 only in the last block: the logits, gradients, updates and evaluation of the
    whole model (float64); padded batches included."""
    whole = build64(scenario(execution={"prune_last_block": False}))
    pruned_tr = build64(scenario())
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
    assert float((la - lb).abs().max()) <= LOSS_RTOL * float(la.abs().max())
    assert rel_gap(ga, gb) <= GRAD_RTOL
    assert "forward" not in vars(pruned_tr.pruned_block)  # the patch is removed after the step
    # local training (AdamW) and evaluation: the same values within the float64 tolerances
    work = jobs(1, [2, 1, 2])
    assert_same_values(whole.local_train(work), pruned_tr.local_train(work), "adamw", 1e-3)
    assert_same_evaluation((whole, pruned_tr), LOSS_RTOL)
    # (the float32 costs with and without pruning: test_timeline_is_the_same_for_every_strategy)


def test_pruned_batched_prompt_tuning_matches_the_whole_model() -> None:
    """With prompt tuning the head reads the first virtual token; batched + pruned matches the
    sequential whole model (SGD, float64 values; float32 costs)."""
    sections: dict[str, Any] = {"peft": {"method": "prompt_tuning", "num_virtual_tokens": 4},
                                "training": {"learning_rate": 1e-2, "optimizer": "sgd"}}
    whole_sc = scenario(**sections, execution={"prune_last_block": False})
    fast_sc = scenario(**sections, execution={"strategy": "batched"})
    whole, fast = build64(whole_sc), build64(fast_sc)
    assert fast.pruned_block is not None and fast.strategy == "batched"
    work = jobs(1, [2, 2, 2])
    assert_same_values(whole.local_train(work), fast.local_train(work), "sgd", 1e-2)
    assert_same_costs(build_trainer(whole_sc, 0).local_train(work), build_trainer(fast_sc, 0).local_train(work))


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
