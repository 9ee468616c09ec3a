"""``execution.device`` and ``execution.precision`` of the real trainer (fomo.execution): the
device is resolved with a clear error when it cannot run, float32 on the CPU is plain float32
torch bit for bit, bf16 (autocast, float32 parameters) runs and learns within bfloat16 rounding
of float32, and the simulated timeline does not depend on the precision (slow: real
all-MiniLM-L6-v2). The checks that need a GPU are in tests/fomo/gpu/ (marker ``gpu``).

Tolerance of bf16 against float32. bfloat16 keeps 8 significant bits: one rounding has
relative error at most u = 2^-8. Under autocast every matrix product casts both factors to
bfloat16 (relative error <= u each, so <= 2u + u^2 per product term) and accumulates in float32
(backward error gamma_n = 9.2e-5 for the longest, 1536-term reduction: negligible beside 2u).
So a bf16 forward is the float32 forward of a model whose frozen weights and matrix-product
inputs are perturbed by relative errors of at most about 2u. How far such a perturbation moves
the loss is the network's conditioning, measured in tests/fomo/test_fomo_execution.py (every
frozen weight multiplied by 1 + e moves the float32 loss by about 5 e): the first step's loss
is within ``BF16_LOSS_RTOL = 5 * 2u = 0.039`` relative of float32's.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fomo import build_trainer
from fomo import execution as fexec
from fomo.trainer import PeftTrainer
from netsim.interfaces import LocalJob
from netsim.protocols.fedavg import FedAvgSimulation
from netsim.scenario import Scenario

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

BF16_U = 2.0**-8
"""Unit roundoff of bfloat16."""

LOSS_CONDITIONING = 5.0
"""Relative loss change per relative perturbation of every frozen weight (measured for
all-MiniLM-L6-v2 in tests/fomo/test_fomo_execution.py, the ratio behind F32_LOSS_RTOL)."""

BF16_LOSS_RTOL = LOSS_CONDITIONING * 2 * BF16_U
"""bf16 loss against float32, relative: 2u per product (both factors rounded) times the
conditioning (0.039)."""

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA GPU")


def scenario(**sections: Any) -> Scenario:
    """4 devices, batch 4, 16 tokens, 32 test examples, LoRA r=8 on query/value."""
    spec: dict[str, Any] = {
        "name": "precision",
        "devices": [{"count": 4}],
        "model": {"max_length_tokens": 16},
        "data": {"max_test_examples": 32, "partition": "iid"},
        "training": {"batch_size": 4, "local_steps": 1, "learning_rate": 2e-3, "rounds": 2,
                     "devices_per_round": 2},
    }
    for section, values in sections.items():
        spec[section] = {**spec.get(section, {}), **values} if isinstance(values, dict) else values
    return Scenario.model_validate(spec)


def jobs(round_: int, k: int, steps: int = 1, batch: int = 4) -> list[LocalJob]:
    return [LocalJob(device_id=d, round=round_, steps=steps, batch_size=batch) for d in range(k)]


@pytest.fixture(scope="module")
def fp32() -> PeftTrainer:
    return build_trainer(scenario(), 0)


@pytest.fixture(scope="module")
def bf16() -> PeftTrainer:
    return build_trainer(scenario(execution={"precision": "bf16"}), 0)


# ------------------------------------------------------------------ resolving the device
@no_gpu
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(ValueError) as err:
        build_trainer(scenario(execution={"device": "cuda"}), 0)
    text = str(err.value)
    assert "execution.device='cuda'" in text and "no CUDA GPU" in text
    assert "available here: cpu" in text and "auto" in text


def _cli():
    sys.path.insert(0, str(ROOT / "tests" / "cli"))
    from cli_helpers import assert_exit_2, deftsim, sets

    return assert_exit_2, deftsim, sets


CUDA_FRAGMENTS = ("execution.device='cuda'", "no CUDA GPU", "available here: cpu")


@no_gpu
def test_deftsim_run_with_cuda_and_no_gpu_exits_2(tmp_path: Path) -> None:
    assert_exit_2, deftsim, sets = _cli()
    res = deftsim("run", ROOT / "scenarios" / "quickstart.yaml", "--out", tmp_path / "out", "--quiet",
                  *sets(["execution.device=cuda"]), cwd=ROOT)
    assert_exit_2(res, CUDA_FRAGMENTS, "quickstart")
    assert not (tmp_path / "out" / "summary.json").exists()


@no_gpu
def test_deftsim_validate_with_cuda_and_no_gpu_exits_2() -> None:
    assert_exit_2, deftsim, sets = _cli()
    res = deftsim("validate", ROOT / "scenarios" / "quickstart.yaml", *sets(["execution.device=cuda"]), cwd=ROOT)
    assert_exit_2(res, CUDA_FRAGMENTS, "quickstart.yaml")


@no_gpu
def test_auto_resolves_to_the_cpu_and_says_so() -> None:
    placement = fexec.resolve(scenario(execution={"device": "auto"}).execution)
    assert placement.device == torch.device("cpu") and placement.requested_device == "auto"
    assert "auto resolved to cpu" in placement.note
    assert placement.record() == {"device": "cpu", "precision": "fp32", "note": placement.note}


def test_auto_follows_cuda_availability() -> None:
    placement = fexec.resolve(scenario(execution={"device": "auto", "precision": "bf16"}).execution)
    assert placement.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert placement.compute_dtype == torch.bfloat16


def test_trainers_without_placement_support_refuse_it() -> None:
    """A subclass that has not declared SUPPORTS_PLACEMENT gets a clear error for bf16 (its
    own code paths would silently run float32)."""

    class Other(PeftTrainer):
        pass

    with pytest.raises(ValueError, match=r"execution.precision='bf16'.*Other runs on the CPU in float32 only"):
        Other(scenario(execution={"precision": "bf16"}), 0)


# ------------------------------------------------------------------ float32 unchanged
def plain_torch_update(trainer: PeftTrainer, plan) -> tuple[dict[str, torch.Tensor], float]:
    """The job of ``plan`` written out in plain float32 torch on the trainer's own model: no
    autocast, no device moves, no execution tricks (``prune_last_block`` must be off)."""
    from fomo import data as fdata

    trainer._load_state(plan.base)
    torch.manual_seed(fdata.job_torch_seed(trainer.seed, plan.job.device_id, plan.job.round))
    params = [p for _, p in trainer._trainable]
    optimizer = torch.optim.AdamW(params, lr=trainer._learning_rate)
    losses = []
    for examples in plan.inputs:
        optimizer.zero_grad(set_to_none=True)
        input_ids, mask, labels = trainer._tokens.batch(examples)
        loss = F.cross_entropy(trainer.model(input_ids=input_ids, attention_mask=mask).logits, labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    update = {n: p.detach() - plan.base[n] for n, p in trainer._trainable}
    trainer._load_state(trainer._global)
    return update, float(torch.stack(losses).mean())


def test_float32_cpu_is_plain_float32_torch_bit_for_bit() -> None:
    """execution.device: cpu, precision: fp32 (spelled out) runs exactly the float32 steps of
    plain torch: every update bit equal, the loss equal."""
    trainer = build_trainer(scenario(execution={"device": "cpu", "precision": "fp32", "prune_last_block": False}), 0)
    assert trainer.placement.is_default
    base = trainer.snapshot()
    plans = [trainer.plan(job, base) for job in jobs(0, 2, steps=2)]
    results = trainer.execute(plans)
    for plan, result in zip(plans, results):
        update, loss = plain_torch_update(trainer, plan)
        assert result.loss == loss
        assert all(torch.equal(result.update[n], update[n]) for n in update)
        assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in result.update.values())


def test_explicit_cpu_fp32_equals_the_default_bit_for_bit(fp32: PeftTrainer) -> None:
    explicit = build_trainer(scenario(execution={"device": "cpu", "precision": "fp32"}), 0)
    fp32._device_rngs.clear()
    a, b = fp32.local_train(jobs(5, 2)), explicit.local_train(jobs(5, 2))
    assert [r.loss for r in a] == [r.loss for r in b]
    assert all(torch.equal(x.update[n], y.update[n]) for x, y in zip(a, b) for n in x.update)
    assert fp32.evaluate() == explicit.evaluate()


# ------------------------------------------------------------------ bf16
def test_bf16_first_step_within_bfloat16_rounding_of_float32(fp32: PeftTrainer, bf16: PeftTrainer) -> None:
    """Same initial state, same batches: the bf16 loss is within BF16_LOSS_RTOL of float32's,
    and differs from it (autocast is really on); updates and state stay float32 CPU tensors."""
    for t in (fp32, bf16):
        t._device_rngs.clear()
    assert all(torch.equal(fp32.snapshot()[n], bf16.snapshot()[n]) for n in fp32.snapshot())
    a, b = fp32.local_train(jobs(0, 4)), bf16.local_train(jobs(0, 4))
    gaps = [abs(x.loss - y.loss) / abs(x.loss) for x, y in zip(a, b)]
    assert max(gaps) <= BF16_LOSS_RTOL, gaps
    assert any(x.loss != y.loss for x, y in zip(a, b))
    for r in b:
        assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in r.update.values())
    assert [r.flops for r in a] == [r.flops for r in b]
    assert [r.peak_memory_bytes for r in a] == [r.peak_memory_bytes for r in b]
    assert [r.update_bytes for r in a] == [r.update_bytes for r in b]


def test_bf16_batched_matches_bf16_sequential(bf16: PeftTrainer) -> None:
    """Batched bf16 passes compute each device's products in bfloat16 like its own sequential
    steps: losses within BF16_LOSS_RTOL (the products of one device may round differently in
    a batched kernel), costs identical."""
    batched = build_trainer(scenario(execution={"precision": "bf16", "strategy": "batched"}), 0)
    assert batched.strategy == "batched"
    bf16._device_rngs.clear()
    a, b = bf16.local_train(jobs(0, 4)), batched.local_train(jobs(0, 4))
    assert max(abs(x.loss - y.loss) / abs(x.loss) for x, y in zip(a, b)) <= BF16_LOSS_RTOL
    assert [r.flops for r in a] == [r.flops for r in b]
    assert [r.peak_memory_bytes for r in a] == [r.peak_memory_bytes for r in b]


def test_bf16_learns_on_the_real_model() -> None:
    """40 AdamW steps of one device in bf16 lower the test loss and beat chance on BBC News
    (5 classes), close to what float32 reaches from the same start."""
    results = {}
    for precision in ("fp32", "bf16"):
        trainer = build_trainer(scenario(execution={"precision": precision}, data={"max_test_examples": 64}), 0)
        before = trainer.evaluate()
        for r in range(4):
            trainer.aggregate(trainer.local_train([LocalJob(0, r, 10, 8)]), [1.0])
        results[precision] = (before, trainer.evaluate())
    before, after = results["bf16"]
    assert after.loss < before.loss - 0.2
    assert after.accuracy >= 0.5          # chance: 0.2
    assert abs(after.loss - results["fp32"][1].loss) <= 0.1 * results["fp32"][1].loss


def _event_rows(sc: Scenario) -> list[tuple]:
    sim = FedAvgSimulation(sc, 0, build_trainer(sc, 0))
    sim.run()
    return sim.recorder.rows


LOSS_COL = 10  # event-log columns t_s ... energy_j come before the loss


def test_bf16_run_has_the_float32_timeline() -> None:
    """A short FedAvg run (2 devices, 2 rounds, 1 local step): every event's time, kind,
    FLOPs, memory, bytes and energy equal the float32 run's exactly; the losses differ within
    bf16 rounding."""
    spec: dict[str, Any] = dict(devices=[{"count": 2}], training={"rounds": 2, "devices_per_round": 2})
    reference = _event_rows(scenario(**spec))
    bf16_rows = _event_rows(scenario(**spec, execution={"precision": "bf16"}))
    assert len(reference) == len(bf16_rows) > 5
    for r, b in zip(reference, bf16_rows):
        assert r[:LOSS_COL] == b[:LOSS_COL]
    losses = [(r[LOSS_COL], b[LOSS_COL]) for r, b in zip(reference, bf16_rows) if not np.isnan(r[LOSS_COL])]
    assert losses and all(abs(x - y) <= BF16_LOSS_RTOL * abs(x) for x, y in losses)


# ------------------------------------------------------------------ experiments that run on the CPU only
@pytest.mark.parametrize("experiment", ["prompt_service", "d2d_prompt_transfer", "neural_aircomp", "lola_compare"])
@pytest.mark.parametrize("execution", [{"device": "cuda"}, {"precision": "bf16"}])
def test_cpu_only_experiments_refuse_cuda_and_bf16(experiment: str, execution: dict) -> None:
    from netsim.scenario import ExecutionSpec

    spec = ExecutionSpec(**execution)
    with pytest.raises(ValueError, match=rf"experiment='{experiment}' runs its model on the CPU in float32 only"):
        spec.check_experiment(experiment)
    for fine in ExecutionSpec.placement_experiments():
        spec.check_experiment(fine)
    ExecutionSpec(device="auto").check_experiment(experiment)


def test_the_off_cpu_path_profiles_a_float32_replica(fp32: PeftTrainer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The code path of a GPU placement, exercised on the CPU (the placement claims not to be on
    the CPU, so the trainer keeps a CPU replica for profiling and moves the model, a no-op
    here): costs, losses, updates and evaluation equal the default trainer's bit for bit."""
    monkeypatch.setattr(fexec.Placement, "on_cpu", property(lambda self: False))
    off = build_trainer(scenario(), 0)
    assert off._cpu_replica is not None and off._profile_model() is off._cpu_replica
    assert off._weight_ptrs == frozenset(p.untyped_storage().data_ptr() for p in
                                         list(off._cpu_replica.parameters()) + list(off._cpu_replica.buffers()))
    fp32._device_rngs.clear()
    fp32._load_state(fp32._global)
    a, b = fp32.local_train(jobs(7, 3, steps=2)), off.local_train(jobs(7, 3, steps=2))
    assert [(r.flops, r.peak_memory_bytes, r.update_bytes, r.loss) for r in a] == \
        [(r.flops, r.peak_memory_bytes, r.update_bytes, r.loss) for r in b]
    assert all(torch.equal(x.update[n], y.update[n]) for x, y in zip(a, b) for n in x.update)
    assert fp32.job_memory_bytes(4) == off.job_memory_bytes(4)
    assert fp32.evaluate() == off.evaluate()
