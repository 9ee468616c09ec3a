"""fomo.profiling: FLOP counts against theory, saved-activation bytes, memory formula."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fomo import profiling


def test_linear_flops_match_2mnk() -> None:
    m, k, n = 7, 33, 19
    layer = nn.Linear(k, n)
    x = torch.randn(m, k)
    with torch.no_grad(), profiling.flop_counter() as counter:
        layer(x)
    assert counter.get_total_flops() == 2 * m * n * k


def test_linear_backward_flops() -> None:
    """Backward of y = x W^T with both x and W requiring grad: two more products of 2mnk."""
    m, k, n = 5, 16, 12
    layer = nn.Linear(k, n, bias=False)
    x = torch.randn(m, k, requires_grad=True)
    with profiling.flop_counter() as counter:
        layer(x).sum().backward()
    assert counter.get_total_flops() == 3 * 2 * m * n * k


def test_cpu_attention_flops_are_counted() -> None:
    b, h, s, d = 2, 3, 10, 8
    q = torch.randn(b, h, s, d)
    with torch.no_grad(), profiling.flop_counter() as counter:
        F.scaled_dot_product_attention(q, q, q)
    assert counter.get_total_flops() == 2 * (2 * b * h * s * s * d)


def test_saved_tensor_meter_counts_distinct_storages_and_skips_weights() -> None:
    layer = nn.Linear(4, 4, bias=False)
    x = torch.randn(3, 4, requires_grad=True)
    with profiling.SavedTensorMeter(profiling.storage_ptrs(layer)) as meter:
        y = torch.tanh(layer(x))  # saves x (3x4) for mm; weight excluded; tanh saves its output
        z = y * y  # saves y twice (same storage, counted once)
    assert meter.saved_bytes == (3 * 4 + 3 * 4) * 4
    z.sum().backward()


def test_job_memory_formula() -> None:
    assert profiling.job_memory_bytes(1000, 10, "adamw", 5) == 1000 + 10 * 3 + 5
    assert profiling.job_memory_bytes(1000, 10, "sgd", 5) == 1000 + 10 + 5
