"""``execution.device: cuda``: the sequential and batched paths on a GPU give the CPU results
within the tolerances that tests/fomo/test_fomo_execution.py derives from the summation error
(values compared in float64, where another device's summation order moves a loss by at most
gamma_n = 1.7e-13 relative per reduction, times the network's conditioning; float32 losses to
F32_LOSS_RTOL), and the costs that drive the simulated timeline are bit for bit the CPU's
(profiled on a float32 CPU replica). Skipped without a CUDA GPU (marker ``gpu``)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the shared helpers of tests/fomo

from test_execution import BF16_LOSS_RTOL  # noqa: E402
from test_fomo_execution import (LOSS_RTOL, _event_rows, as_float64,  # noqa: E402
                                 assert_same_costs, assert_same_values, jobs, loss_gap, scenario)

from fomo import build_trainer  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

LR = 1e-3   # scenario()'s learning rate


def cuda(**execution) -> dict:
    return {"execution": {"device": "cuda", **execution}}


@pytest.mark.parametrize("strategy", ["sequential", "batched"])
def test_cuda_values_equal_cpu_in_float64(strategy: str) -> None:
    cpu = as_float64(build_trainer(scenario(execution={"strategy": strategy, "max_devices_per_pass": 3}), 0))
    gpu = as_float64(build_trainer(scenario(**cuda(strategy=strategy, max_devices_per_pass=3)), 0))
    assert gpu.placement.device.type == "cuda" and next(gpu.model.parameters()).is_cuda
    assert gpu.strategy == strategy
    a, b = cpu.local_train(jobs(0, [2, 2, 2])), gpu.local_train(jobs(0, [2, 2, 2]))
    assert_same_values(a, b, "adamw", LR, steps=2)
    assert all(t.device.type == "cpu" for r in b for t in r.update.values())
    for t, results in ((cpu, a), (gpu, b)):
        t.aggregate(results, [1 / 3] * 3)
    ea, eb = cpu.evaluate(), gpu.evaluate()
    assert ea.flops == eb.flops and ea.accuracy == eb.accuracy
    assert abs(ea.loss - eb.loss) <= LOSS_RTOL * abs(ea.loss)


@pytest.mark.parametrize("strategy", ["sequential", "batched"])
def test_cuda_float32_costs_bitwise_losses_within_float32(strategy: str) -> None:
    cpu = build_trainer(scenario(execution={"strategy": strategy}), 0)
    gpu = build_trainer(scenario(**cuda(strategy=strategy)), 0)
    assert_same_costs(cpu.local_train(jobs(0, [2, 2, 2])), gpu.local_train(jobs(0, [2, 2, 2])))
    assert cpu.job_memory_bytes(2) == gpu.job_memory_bytes(2)


def test_cuda_bf16_runs_within_bfloat16_rounding() -> None:
    cpu = build_trainer(scenario(execution={"strategy": "batched"}), 0)
    gpu = build_trainer(scenario(**cuda(strategy="batched", precision="bf16")), 0)
    a, b = cpu.local_train(jobs(0, [1, 1, 1])), gpu.local_train(jobs(0, [1, 1, 1]))
    assert loss_gap(a, b) <= BF16_LOSS_RTOL
    assert [r.flops for r in a] == [r.flops for r in b]
    assert [r.peak_memory_bytes for r in a] == [r.peak_memory_bytes for r in b]


def test_cuda_run_has_the_cpu_timeline() -> None:
    spec = dict(peft={"layers": [4, 5]}, training={"local_steps": 1, "rounds": 1})
    reference = _event_rows(scenario(**spec))
    on_gpu = _event_rows(scenario(**spec, **cuda(strategy="batched", activation_cache_bytes=10**7)))
    assert len(reference) == len(on_gpu) > 5
    for r, g in zip(reference, on_gpu):
        assert r[:10] == g[:10]   # t_s ... energy_j
    assert torch.cuda.is_available()
