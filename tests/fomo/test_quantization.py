"""LoRA on a quantised frozen base (fomo.quantization): the int8 / nf4 codes against their
definitions and error bounds, the stored bytes, and training on the real all-MiniLM-L6-v2.

Error bounds (exact arithmetic, plus float32 rounding, u = 2^-24):

* int8, per output row r with s_r = absmax_r / 127: |w - q s_r| <= s_r / 2 = absmax_r / 254;
  computing w / s_r and q s_r in float32 adds at most 255 s_r u (|q| <= 127, two roundings).
* nf4, per block b of 64 weights: the chosen code is the nearest of the 16 values to
  w / absmax_b, so |w - code absmax_b| <= absmax_b max_gap / 2; float32 rounding of the
  division, of the midpoints and of the product adds at most 4 absmax_b u.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fomo import models, profiling
from fomo.quantization import (NF4_BLOCK, NF4_CODE, QuantizedLinear, dequantize_int8_rows, dequantize_nf4,
                               nf4_code_from_normal_quantiles, nf4_max_gap, nf4_storage, quantize_frozen_linears,
                               quantize_int8_rows, quantize_nf4, quantizable_linears)
from netsim.scenario import ModelSpec, PeftSpec

U32 = 2.0 ** -24


def weights_with_outliers(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Gaussian weights, a few large outliers, one all-zero row (exact under both codes)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[1, 3] = 2.5
    w[2, 0] = -4.0
    w[-1] = 0.0
    return w


# ------------------------------------------------------------------ int8
def test_int8_rows_meet_the_absmax_over_254_bound() -> None:
    w = weights_with_outliers(33, 100)
    codes, scales = quantize_int8_rows(w)
    assert codes.dtype == torch.int8 and codes.shape == w.shape and scales.shape == (33,)
    assert int(codes.abs().max()) == 127                     # each non-zero row's absmax hits +-127
    absmax = w.abs().amax(dim=1)
    assert torch.equal(scales, absmax / 127)
    err = (w - dequantize_int8_rows(codes, scales)).abs()
    bound = (absmax / 254 + 255 * (absmax / 127) * U32).unsqueeze(1)
    assert bool((err <= bound).all())
    # the bound is tight: for a row of uniform weights some error comes close to s/2
    row = torch.linspace(-1, 1, 10_001).unsqueeze(0)
    c, s = quantize_int8_rows(row)
    worst = float((row - dequantize_int8_rows(c, s)).abs().max())
    assert 0.99 / 254 < worst <= 1 / 254 + 255 * U32 / 127
    assert torch.equal(dequantize_int8_rows(codes, scales)[-1], torch.zeros(100))   # zero row exact


def test_int8_is_the_emulators_absmax_code_per_row() -> None:
    """The emulator's per-tensor 8-bit quantiser and the per-row int8 share one code: a single
    row quantises identically under both."""
    from fomo.emulator import quantize_symmetric

    w = weights_with_outliers(4, 50)
    for r in range(4):
        q = quantize_symmetric(w[r:r + 1])
        codes, scales = quantize_int8_rows(w[r:r + 1])
        assert torch.equal(q.codes, codes) and torch.equal(q.scale.reshape(1), scales)


# ------------------------------------------------------------------ nf4
def test_nf4_code_is_qloras_normal_quantiles() -> None:
    """The table equals its definition to float32 precision of the probabilities bitsandbytes
    builds it from: a rounding of p by 2^-24 moves Phi^-1(p) by 2^-24 / phi(Phi^-1(p)) <= 8.3e-7
    at the outermost p = 0.9677, i.e. <= 4.5e-7 after dividing by Phi^-1(0.9677) = 1.85."""
    derived = nf4_code_from_normal_quantiles()
    table = torch.tensor(NF4_CODE, dtype=torch.float64)
    assert derived.shape == (16,) and float((derived - table).abs().max()) < 5e-7
    assert NF4_CODE[0] == -1.0 and NF4_CODE[7] == 0.0 and NF4_CODE[-1] == 1.0
    assert list(NF4_CODE) == sorted(NF4_CODE)
    assert nf4_max_gap() == pytest.approx(1 - 0.6961928009986877)


@pytest.mark.parametrize("shape", [(48, 128), (7, 13)])   # whole blocks; a partial last block, odd numel
def test_nf4_meets_half_the_largest_gap_bound_and_picks_the_nearest_code(shape: tuple[int, int]) -> None:
    w = weights_with_outliers(*shape, seed=1)
    packed, absmax = quantize_nf4(w)
    numel = w.numel()
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(numel / 2)
    assert absmax.numel() == math.ceil(numel / NF4_BLOCK)
    w_hat = dequantize_nf4(packed, absmax, shape)
    flat = torch.zeros(absmax.numel() * NF4_BLOCK)
    flat[:numel] = w.reshape(-1)
    blocks = flat.reshape(-1, NF4_BLOCK)
    assert torch.equal(absmax, blocks.abs().amax(dim=1))
    block_absmax = absmax.repeat_interleave(NF4_BLOCK)[:numel].reshape(shape)
    err = (w - w_hat).abs()
    assert bool((err <= block_absmax * (nf4_max_gap() / 2 + 4 * U32)).all())
    # nearest code, by brute force (float64): no other value is closer by more than rounding
    normed = (w.double() / torch.where(block_absmax > 0, block_absmax, torch.ones_like(block_absmax)).double())
    table = torch.tensor(NF4_CODE, dtype=torch.float64)
    best = (normed.unsqueeze(-1) - table).abs().min(dim=-1).values
    chosen = (w_hat.double() / torch.where(block_absmax > 0, block_absmax, torch.ones_like(block_absmax)).double()
              - normed).abs()
    assert bool((chosen <= best + 4 * U32).all())
    ratio = w_hat.double() / torch.where(block_absmax > 0, block_absmax, torch.ones_like(block_absmax)).double()
    assert float((ratio.unsqueeze(-1) - table).abs().min(dim=-1).values.max()) <= 2 * U32   # a code value each


# ------------------------------------------------------------------ the layer
@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_quantized_linear_stores_codes_and_scales_and_computes_with_the_dequantised_weight(scheme: str) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(128, 48).requires_grad_(False)
    q = QuantizedLinear.from_linear(lin, scheme)
    n = 128 * 48
    expected = n + 4 * 48 if scheme == "int8" else nf4_storage(n)[0] + 4 * nf4_storage(n)[1]
    assert q.stored_weight_bytes() == expected
    assert profiling.weights_bytes(q) == expected + 4 * 48              # + the float32 bias
    assert not any(p.requires_grad for p in q.parameters())
    x = torch.randn(3, 5, 128, dtype=torch.float64, requires_grad=True)
    q64 = copy.deepcopy(q).double()
    y = q64(x)
    w_hat = q64.dequantize(torch.float64)
    assert torch.allclose(y, F.linear(x, w_hat, q64.bias), rtol=0, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.allclose(x.grad, g @ w_hat, rtol=0, atol=1e-12)
    # the float layer's error is bounded by the weight error: |x (W - W_hat)^T| <= |x| |W - W_hat|^T
    x32 = x.detach().float()
    gap = (lin(x32) - q(x32)).abs()
    bound = x32.abs() @ (lin.weight - q.dequantize()).abs().T
    assert bool((gap <= bound * (1 + 1e-4) + 1e-5).all())


def test_meta_device_quantisation_allocates_only_shapes() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10)).requires_grad_(False)
    names = quantize_frozen_linears(model, "nf4")
    assert names == ["0", "2"]
    layer = model[0]
    assert isinstance(layer, QuantizedLinear) and layer.codes.is_meta
    assert layer.codes.shape == (64 * 96 // 2,) and layer.scales.shape == (64 * 96 // 64,)
    assert profiling.weights_bytes(model) == (64 * 96 // 2 + 4 * 96 + 4 * 96) + (96 * 10 // 2 + 4 * 15 + 4 * 10)
    assert model(torch.empty(2, 64, device="meta")).shape == (2, 10)


def test_none_changes_nothing_and_unknown_scheme_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 4)).requires_grad_(False)
    assert quantize_frozen_linears(model, "none") == [] and type(model[0]) is nn.Linear
    with pytest.raises(ValueError, match="peft.base_quantization='int4'"):
        quantize_frozen_linears(model, "int4")


# ------------------------------------------------------------------ LoRA on the real model
@pytest.fixture(scope="module")
def base() -> nn.Module:
    torch.manual_seed(0)
    return models.load_base(ModelSpec(), 5)[1]


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tokenizer = models.load_base(ModelSpec(), 5)[0]
    enc = tokenizer(["the match ended in a draw", "shares fell sharply today", "a new phone was launched",
                     "the minister resigned"], padding="max_length", max_length=16, truncation=True,
                    return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], torch.tensor([0, 1, 2, 3])


def _lora(base: nn.Module, quant: str) -> nn.Module:
    torch.manual_seed(1)
    return models.apply_peft(copy.deepcopy(base), PeftSpec(base_quantization=quant))


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_qlora_memory_flops_activations_and_training(base: nn.Module, batch: tuple, scheme: str) -> None:
    plain, quant = _lora(base, "none"), _lora(base, scheme)
    frozen = {n: m for n, m in plain.named_modules() if n in set(quantizable_linears(plain))}
    replaced = {n: m for n, m in quant.named_modules() if isinstance(m, QuantizedLinear)}
    assert set(replaced) == set(frozen) and len(replaced) == 6 * 6 + 1          # 6 per block + the pooler
    assert all(".base_layer" in n for n in replaced if n.endswith(("query.base_layer", "value.base_layer")))
    # memory: every frozen float weight replaced by its codes + scales, the rest unchanged
    saved = sum(4 * m.weight.numel() - replaced[n].stored_weight_bytes() for n, m in frozen.items())
    assert profiling.weights_bytes(quant) == profiling.weights_bytes(plain) - saved
    per_weight = 1 if scheme == "int8" else 0.5
    assert all(replaced[n].codes.numel() * replaced[n].codes.element_size() == per_weight * m.weight.numel()
               for n, m in frozen.items())
    # the adapter and the counted step costs are LoRA's (dequantisation is element-wise, and the
    # float weight is rebuilt in the backward instead of being saved)
    trainable = dict(models.trainable_parameters(quant))
    assert set(trainable) == {n for n, _ in models.trainable_parameters(plain)}
    a = profiling.count_step_flops(plain, *batch)
    b = profiling.count_step_flops(quant, *batch)
    assert b.flops == a.flops and b.saved_activation_bytes == a.saved_activation_bytes
    # training runs and lowers the loss; the codes never change
    codes_before = {n: m.codes.clone() for n, m in replaced.items()}
    opt = torch.optim.AdamW(list(trainable.values()), lr=1e-2)
    losses = []
    for _ in range(4):
        loss = profiling.classification_loss(quant, *batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert all(torch.equal(codes_before[n], m.codes) for n, m in replaced.items())
