"""Offsite-Tuning emulator (fomo.emulator): which blocks it keeps, what it weighs, how it
computes, its 8-bit quantisation, the plug-in of its trained tensors into the full model and
its distillation at the edge (loss, updated tensors, counted FLOPs).

The layer-choice and bad-settings tests need no model; the others run the real
all-MiniLM-L6-v2 (slow marker). Sizes are checked against the architecture's own counts:
hidden h = 384, feed-forward f = 1536, vocabulary 30522, 512 positions, 2 token types,
6 blocks, LoRA r = 8 on query and value, a 5-class head.
"""
from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from fomo import emulator as E
from fomo import models
from netsim.scenario import ModelSpec, PeftSpec

slow = pytest.mark.slow

H, F_, VOCAB, POS, TYPES, N_CLASSES, RANK = 384, 1536, 30522, 512, 2, 5, 8
U32 = 2.0**-24
"""Unit roundoff of float32."""

EMBEDDINGS = (VOCAB + POS + TYPES) * H + 2 * H          # word + position + type tables, LayerNorm
BLOCK_MATRICES = 4 * H * H + H * F_ + F_ * H            # q, k, v, attention output, FFN in, FFN out
BLOCK_VECTORS = 4 * H + F_ + H + 2 * (2 * H)            # their biases + two LayerNorms
BLOCK = BLOCK_MATRICES + BLOCK_VECTORS
POOLER = H * H + H
HEAD = H * N_CLASSES + N_CLASSES
LORA_PER_BLOCK = 2 * (2 * RANK * H)                     # A (r x h) and B (h x r) on query and value
BUFFER_BYTES = 2 * POS * 8                              # position_ids and token_type_ids, int64


# --------------------------------------------------------------------------------------------
# Layer choice (no model)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k, middle", [(1, [2]), (2, [1, 4]), (3, [1, 3, 4]), (4, [1, 2, 3, 4])])
def test_six_blocks_adapter_one(k: int, middle: list[int]) -> None:
    # middle blocks L1..L4 (M = 4); stride 3/(k-1): k=3 -> 0, 1.5 -> 2 (tie to even), 3
    assert E.emulator_layer_indices(6, 1, k) == ([0], middle, [5])


def test_offsite_tuning_layouts() -> None:
    # OPT-1.3B: 24 blocks, 2 + 8 + 2; middle stride 19/7
    assert E.emulator_layer_indices(24, 2, 8) == (
        [0, 1], [2, 5, 7, 10, 13, 16, 18, 21], [22, 23])
    # GPT2-XL: 48 blocks, 2 + 16 + 2; middle stride 43/15
    assert E.emulator_layer_indices(48, 2, 16) == (
        [0, 1], [2, 5, 8, 11, 13, 16, 19, 22, 25, 28, 31, 34, 36, 39, 42, 45], [46, 47])


def test_uniform_drop_ties_centre_and_invariants() -> None:
    assert E.uniform_drop(6, 5) == [0, 1, 2, 4, 5]     # 0, 1.25, 2.5 -> 2 (even), 3.75, 5
    assert E.uniform_drop(4, 1) == [1]                 # even M: the lower centre block
    assert E.uniform_drop(5, 1) == [2]
    for m in range(1, 50):
        for k in range(1, m + 1):
            kept = E.uniform_drop(m, k)
            assert len(kept) == k and kept == sorted(set(kept)), (m, k, kept)
            assert 0 <= kept[0] and kept[-1] <= m - 1
            if k >= 2:
                assert kept[0] == 0 and kept[-1] == m - 1, (m, k, kept)
        assert E.uniform_drop(m, m) == list(range(m))


def test_bad_settings_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"^adapter_layers=0: must be >= 1"):
        E.emulator_layer_indices(6, 0, 1)
    with pytest.raises(ValueError, match=r"adapter_layers=3: .*no middle block.*6 blocks.*1\.\.2"):
        E.emulator_layer_indices(6, 3, 1)
    with pytest.raises(ValueError, match=r"emulator_layers=5 but the model has 4 middle blocks "
                                         r"\(6 blocks, adapter_layers=1 each side\)"):
        E.emulator_layer_indices(6, 1, 5)
    with pytest.raises(ValueError, match=r"^emulator\.emulator_layers=0 .*allowed: 1\.\.4"):
        E.emulator_layer_indices(6, 1, 0, prefix="emulator.")
    with pytest.raises(ValueError, match=r"^emulator\.quantize_bits=4: allowed values are \[8\]"):
        E.build_emulator(nn.Linear(2, 2), 1, 1, quantize_bits=4, prefix="emulator.")
    with pytest.raises(ValueError, match=r"transformer blocks were not found"):
        E.build_emulator(nn.Linear(2, 2), 1, 1)


# --------------------------------------------------------------------------------------------
# Quantisation (no model)
# --------------------------------------------------------------------------------------------
def _check_quantisation_error(w: torch.Tensor, q: E.QuantizedTensor) -> float:
    """Assert the error bound and return max |w - q s| / s.

    In exact arithmetic |w - q s| <= s / 2. Here w / s is rounded to float32 before round():
    fl(w / s) = (w / s)(1 + d), |d| <= u, |w / s| <= 127 (1 + u), so |q - w / s| <= 1/2 + 128 u
    and, with q s computed exactly in float64 (an 8-bit integer times a float32), |w - q s| <=
    s (1/2 + 128 u). The float32 dequantised value fl(q s) adds |q s| u <= 128 s u."""
    s = float(q.scale)
    assert abs(s - float(w.abs().max()) / 127) <= s * U32  # s = fl32(max|w| / 127)
    assert int(q.codes.abs().max()) == 127 and q.codes.dtype == torch.int8
    exact = q.codes.double() * s
    err64 = (w.double() - exact).abs().max().item()
    assert err64 <= s * (0.5 + 128 * U32)
    err32 = (w.double() - q.dequantize().double()).abs().max().item()
    assert err32 <= s * (0.5 + 256 * U32)
    return err64 / s


def test_quantisation_error_random_and_zero() -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(256, 257, generator=g) * 0.05
    q = E.quantize_symmetric(w)
    ratio = _check_quantisation_error(w, q)
    assert ratio > 0.49  # 65,792 uniform-ish rounding errors: the s/2 bound is attained
    assert q.stored_bytes == w.numel() + 4
    zero = E.quantize_symmetric(torch.zeros(3, 4))
    assert float(zero.scale) == 0.0 and torch.equal(zero.dequantize(), torch.zeros(3, 4))


# --------------------------------------------------------------------------------------------
# Real model
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base() -> nn.Module:
    torch.manual_seed(0)
    _, model = models.load_base(ModelSpec(), num_labels=N_CLASSES)
    return model.eval()


def _peft(base: nn.Module, **peft: Any) -> nn.Module:
    return models.apply_peft(copy.deepcopy(base), PeftSpec(**peft)).eval()


@pytest.fixture(scope="module")
def lora_edges(base: nn.Module) -> nn.Module:
    """LoRA r=8 on query/value of the adapter blocks L0 and L5, plus the head."""
    torch.manual_seed(1)
    return _peft(base, rank=RANK, layers=[0, 5])


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1000, 20000, (3, 16), generator=g)
    ids[:, 0] = 101  # [CLS]
    mask = torch.ones_like(ids)
    mask[2, 10:] = 0
    return ids, mask


def _logits(model: nn.Module) -> torch.Tensor:
    ids, mask = _batch()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@slow
def test_emulator_layout_sizes_and_bytes(lora_edges: nn.Module) -> None:
    emu = E.build_emulator(lora_edges, adapter_layers=1, emulator_layers=2)
    assert emu.kept_layers == (0, 1, 4, 5) and emu.middle == (1, 4)
    assert emu.model.config.num_hidden_layers == 4 and lora_edges.config.num_hidden_layers == 6
    assert len(emu.model.get_submodule(emu.block_list_name)) == 4
    assert len(lora_edges.get_submodule(emu.block_list_name)) == 6  # the original is untouched
    for j, block in enumerate(emu.model.get_submodule(emu.block_list_name)):  # cache index = position
        assert {m.layer_idx for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)} == {j}
    assert lora_edges.get_submodule(emu.block_list_name)[4].attention.self.layer_idx == 4
    # PEFT keeps the original head and a trainable copy (modules_to_save): 2 x HEAD
    expected = EMBEDDINGS + 4 * BLOCK + POOLER + 2 * HEAD + 2 * LORA_PER_BLOCK
    assert emu.num_parameters == expected == 19_192_714
    tensor_bytes = sum(t.numel() * t.element_size()
                       for t in [*emu.model.parameters(), *emu.model.buffers()])
    assert emu.download_bytes == tensor_bytes == 4 * expected + BUFFER_BYTES
    # each emulator block is the original block kept_layers[j], weight for weight
    full = dict(lora_edges.named_parameters())
    for name, p in emu.model.named_parameters():
        assert torch.equal(p, full[emu.full_name(name)]), name
    # trainable: LoRA of emulator blocks 0 and 3 (= L0 and L5) and the head; middle frozen
    trainable = [n for n, p in emu.model.named_parameters() if p.requires_grad]
    assert sum(p.numel() for p in emu.model.parameters() if p.requires_grad) == 2 * LORA_PER_BLOCK + HEAD
    assert {emu.full_name(n).split("layer.")[1].split(".")[0] for n in trainable if "lora_" in n} == {"0", "5"}


@slow
def test_quantised_middle_blocks(lora_edges: nn.Module) -> None:
    plain = E.build_emulator(lora_edges, 1, 2)
    emu = E.build_emulator(lora_edges, 1, 2, quantize_bits=8)
    mid = [f"{emu.block_list_name}.{j}." for j in (1, 2)]
    # the 6 weight matrices of each middle block, nothing else
    assert len(emu.quantized) == 12 and all(any(n.startswith(m) for m in mid) for n in emu.quantized)
    assert sum(q.codes.numel() for q in emu.quantized.values()) == 2 * BLOCK_MATRICES
    middle_fp32 = 2 * BLOCK * 4
    middle_int8 = 2 * (BLOCK_MATRICES * 1 + BLOCK_VECTORS * 4) + 12 * E.SCALE_BYTES
    assert plain.download_bytes - emu.download_bytes == middle_fp32 - middle_int8
    assert middle_fp32 / middle_int8 > 3.95  # weights 4x; biases/LayerNorm stay float32
    params = dict(emu.model.named_parameters())
    original = dict(lora_edges.named_parameters())
    for name, q in emu.quantized.items():
        assert torch.equal(params[name], q.dequantize()), name  # computes with w_hat = q s
        ratio = _check_quantisation_error(original[emu.full_name(name)].detach(), q)
        assert ratio > 0.45, name  # the bound is attained on real weights: it is tight
    for name, p in params.items():  # everything else is bit-identical to the original
        if name not in emu.quantized:
            assert torch.equal(p, original[emu.full_name(name)]), name
    assert not torch.equal(_logits(emu.model), _logits(plain.model))


@slow
def test_forward_differs_and_all_blocks_is_the_model(lora_edges: nn.Module) -> None:
    full = _logits(lora_edges)
    emu = E.build_emulator(lora_edges, 1, 2)
    dropped = _logits(emu.model)
    assert dropped.shape == full.shape and torch.isfinite(dropped).all()
    assert (dropped - full).abs().max() > 1e-3  # two blocks fewer: a different function
    # k = M keeps every block: same modules, same inputs, same kernels -> bitwise equal here
    whole = E.build_emulator(lora_edges, 1, 4)
    assert whole.kept_layers == tuple(range(6))
    assert torch.equal(_logits(whole.model), full)
    # a training step reaches only the trainable tensors
    emu.model.train()
    ids, mask = _batch()
    loss = nn.functional.cross_entropy(emu.model(input_ids=ids, attention_mask=mask).logits,
                                       torch.tensor([0, 1, 2]))
    loss.backward()
    for name, p in emu.model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    assert any(float(p.grad.abs().max()) > 0 for p in emu.model.parameters() if p.grad is not None)


def _perturb_trainable(emu: E.Emulator, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in emu.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g))


@slow
@pytest.mark.parametrize("lora_layers", [[0, 5], None])
def test_plug_in_by_name(base: nn.Module, lora_layers: Any) -> None:
    torch.manual_seed(2)
    full = _peft(base, rank=RANK, layers=lora_layers)
    emu = E.build_emulator(full, 1, 2)
    _perturb_trainable(emu, seed=7)
    before = {n: t.detach().clone() for n, t in full.state_dict().items()}
    written = E.plug_in(full, emu)
    trained = {emu.full_name(n): p for n, p in emu.model.named_parameters() if p.requires_grad}
    # LoRA of L0 and L5 (emulator blocks 0 and 3) and the head, whatever the PEFT put elsewhere
    assert set(written) == set(trained) and len(written) == 4 * 2 + 2
    assert any(".layer.5." in n for n in written) and not any(".layer.3." in n for n in written)
    after = full.state_dict()
    for name, tensor in after.items():
        if name in trained:
            assert torch.equal(tensor, trained[name]) and not torch.equal(tensor, before[name]), name
        else:
            assert torch.equal(tensor, before[name]), name


@slow
def test_plug_in_mismatch_raises_and_copies_nothing(base: nn.Module, lora_edges: nn.Module) -> None:
    emu = E.build_emulator(lora_edges, 1, 2)
    _perturb_trainable(emu, seed=8)
    torch.manual_seed(3)
    other_rank = _peft(base, rank=4, layers=[0, 5])
    before = {n: t.detach().clone() for n, t in other_rank.state_dict().items()}
    with pytest.raises(ValueError, match=r"plug-in: shapes differ .*lora_A"):
        E.plug_in(other_rank, emu)
    assert all(torch.equal(t, before[n]) for n, t in other_rank.state_dict().items())
    with pytest.raises(ValueError, match=r"plug-in: 10 trainable tensor\(s\) have no counterpart"):
        E.plug_in(base, emu)  # the plain model has no PEFT tensors and other names


# --------------------------------------------------------------------------------------------
# Distillation
# --------------------------------------------------------------------------------------------
def _tiny_bert(num_layers: int) -> nn.Module:
    """A randomly initialised 2-head BERT classifier (no checkpoint), for layout checks."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(4)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=num_layers, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)
    return BertForSequenceClassification(config).eval()


def test_tiny_model_layout_and_distill_errors() -> None:
    model = _tiny_bert(7)
    emu = E.build_emulator(model, adapter_layers=2, emulator_layers=2)
    assert emu.kept_layers == (0, 1, 2, 4, 5, 6) and emu.block_list_name == "bert.encoder.layer"
    ids = torch.randint(0, 50, (3, 8))
    assert emu.model(input_ids=ids).logits.shape == (3, 2)
    with pytest.raises(ValueError, match=r"distill: the full model has 6 blocks, the emulator was built "
                                         r"from a model of 7"):
        E.teacher_blocks(_tiny_bert(6), emu)
    teacher = E.teacher_blocks(model, emu)
    assert len(teacher) == 3
    with pytest.raises(ValueError, match=r"batch_size=0 \(>= 1\)"):
        E.distill(emu, teacher, ids, torch.ones_like(ids), steps=1, batch_size=0)
    with pytest.raises(ValueError, match=r"input_ids \(3, 8\) and attention_mask \(3, 7\)"):
        E.distill(emu, teacher, ids, torch.ones(3, 7, dtype=torch.long), steps=1)
    E.quantize_emulator(emu)
    with pytest.raises(ValueError, match=r"distill: the emulator is quantised"):
        E.distill(emu, teacher, ids, torch.ones_like(ids), steps=1)
    with pytest.raises(ValueError, match=r"quantised already"):
        E.quantize_emulator(emu)


@slow
def test_distill_loss_updates_and_flops(lora_edges: nn.Module) -> None:
    from transformers import AutoTokenizer

    from fomo.data import load_bbc_news

    tokenizer = AutoTokenizer.from_pretrained(models.default_model_path())
    texts = load_bbc_news()[0][-2:]  # edge-held public text
    B, T, steps = 2, 16, 3
    enc = tokenizer(texts, truncation=True, max_length=T, padding="max_length", return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    mask[1, 12:] = 0  # a padded row: padding positions are left out of the loss
    emu = E.build_emulator(lora_edges, 1, 2)
    # reference loss of step 1, computed independently in float64 from output_hidden_states:
    # teacher = the full model's L4 output (hidden_states[5]), student = the emulator's
    # (hidden_states[3]); both start from the same L0 output
    with torch.no_grad():
        t = lora_edges(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[5].double()
        s = emu.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[3].double()
    m = mask.double()[..., None]
    reference = float(((t - s) ** 2 * m).sum() / (t**2 * m).sum())
    before = {n: p.detach().clone() for n, p in emu.model.named_parameters()}
    flags = {n: p.requires_grad for n, p in emu.model.named_parameters()}

    result = E.distill(emu, E.teacher_blocks(lora_edges, emu), ids, mask, steps=steps, batch_size=B)

    # float32 loss = ratio of two sums of n positive terms: each within gamma_n = n u / (1 - n u)
    # relative in any order, plus a few u for the difference and squares
    n = int(mask.sum()) * H
    rtol = 2 * n * U32 / (1 - n * U32) + 4 * U32
    assert len(result.losses) == steps
    assert result.losses[0] == pytest.approx(reference, rel=rtol) and 0 < reference < 1
    assert result.losses[-1] < 0.9 * result.losses[0]  # same batch each step (n = B rows): it learns
    student = {n for n, _ in E.student_parameters(emu)}
    assert len(student) == 2 * 16  # 6 linear layers (weight, bias) + 2 LayerNorms (weight, bias)
    for name, p in emu.model.named_parameters():
        assert p.requires_grad == flags[name] and p.grad is None, name
        assert torch.equal(p, before[name]) != (name in student), name
    # counted FLOPs = the formula of DistillResult.edge_flops: bottom, 2 student and 4 teacher
    # blocks forward (+ LoRA of L0: 2 modules x 2 B T 2 h r), 2 student blocks backward
    L = 4 * H * H + 2 * H * F_
    forward = 7 * (2 * B * T * L + 4 * B * T * T * H) + 2 * 2 * B * T * 2 * H * RANK
    backward = 2 * (2 * 2 * B * T * L + 10 * B * T * T * H) - 2 * B * T * 3 * H * H
    assert result.edge_flops == steps * (forward + backward)
