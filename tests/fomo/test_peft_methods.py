"""PEFT methods besides LoRA and prompt tuning on the real all-MiniLM-L6-v2 (6 blocks, hidden
h = 384, feed-forward 1536, 5 classes): IA3, prefix tuning, BitFit. Their payloads against the
formulas, what a training step changes, counted FLOPs against theory, and how the trainer's
execution paths (batched, activation cache, pruned last block) treat them."""
from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from fomo import build_trainer, models, profiling
from netsim.interfaces import LocalJob
from netsim.scenario import ModelSpec, PeftSpec, Scenario

pytestmark = pytest.mark.slow

LAYERS, HIDDEN, FFN, CLASSES = 6, 384, 1536, 5
HEAD_BYTES = 4 * (CLASSES * HIDDEN + CLASSES)
"""The classification head peft trains and ships (weight + bias, float32)."""

IA3 = PeftSpec(method="ia3", target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"])
"""peft's default IA3 modules for BERT: scale the keys, the values and the feed-forward
output layer's input (``output.dense`` also matches ``attention.output.dense``, a feedforward
module too)."""


@pytest.fixture(scope="module")
def loaded() -> tuple[Any, nn.Module]:
    torch.manual_seed(0)
    return models.load_base(ModelSpec(), CLASSES)


@pytest.fixture(scope="module")
def batch(loaded: tuple[Any, nn.Module]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    enc = loaded[0](["the match ended in a draw", "shares fell sharply today", "a new phone was launched",
                     "the minister resigned"], padding="max_length", max_length=16, truncation=True,
                    return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], torch.tensor([0, 1, 2, 3])


def wrapped(loaded: tuple[Any, nn.Module], spec: PeftSpec) -> nn.Module:
    torch.manual_seed(1)
    return models.apply_peft(copy.deepcopy(loaded[1]), spec)


def payload(model: nn.Module) -> int:
    return models.tensor_bytes([p for _, p in models.trainable_parameters(model)])


# ------------------------------------------------------------------ payloads
def test_ia3_payload_is_one_scale_per_output_or_feedforward_input(loaded: tuple) -> None:
    model = wrapped(loaded, IA3)
    # per block: key and value scale their outputs (h each), attention.output.dense its input
    # (h), output.dense its input (1536)
    assert payload(model) == 4 * LAYERS * (HIDDEN + HIDDEN + HIDDEN + FFN) + HEAD_BYTES
    block0 = sorted(tuple(p.shape) for n, p in models.trainable_parameters(model) if models.layer_index(n) == 0)
    assert block0 == [(1, HIDDEN), (1, FFN), (HIDDEN, 1), (HIDDEN, 1)]
    two = wrapped(loaded, PeftSpec(method="ia3", layers=[4, 5]))   # query and value of blocks 4 and 5
    assert payload(two) == 4 * 2 * (HIDDEN + HIDDEN) + HEAD_BYTES
    assert {models.layer_index(n) for n, _ in models.trainable_parameters(two) if "ia3_l" in n} == {4, 5}


def test_prefix_tuning_payload_is_keys_and_values_per_block(loaded: tuple) -> None:
    for tokens in (1, 8):
        model = wrapped(loaded, PeftSpec(method="prefix_tuning", num_virtual_tokens=tokens))
        assert payload(model) == 4 * 2 * LAYERS * tokens * HIDDEN + HEAD_BYTES
        (table,) = [p for n, p in models.trainable_parameters(model) if "prompt_encoder" in n]
        assert tuple(table.shape) == (tokens, 2 * LAYERS * HIDDEN)


def test_bitfit_payload_is_every_bias_and_the_head(loaded: tuple) -> None:
    model = wrapped(loaded, PeftSpec(method="bitfit"))
    base = loaded[1]
    biases = sum(p.numel() for n, p in base.named_parameters() if n.endswith(".bias"))
    # per block: q, k, v, attention output (h each), 2 LayerNorms (h each), intermediate (1536),
    # output (h); embeddings' LayerNorm, pooler (h each); the head's bias is counted with it
    per_block = 4 * HIDDEN + 2 * HIDDEN + FFN + HIDDEN
    assert biases == LAYERS * per_block + 2 * HIDDEN + CLASSES
    assert payload(model) == 4 * (biases + CLASSES * HIDDEN)
    assert model is not None and not hasattr(model, "peft_config")   # the model itself, not a PeftModel
    names = {n for n, _ in models.trainable_parameters(model)}
    assert names == {n for n, _ in base.named_parameters() if n.endswith(".bias")} | {"classifier.weight"}
    top = wrapped(loaded, PeftSpec(method="bitfit", layers=[5]))
    assert payload(top) == 4 * (per_block + CLASSES * HIDDEN + CLASSES)


def test_bitfit_has_no_peft_config_and_ia3_names_bad_targets(loaded: tuple) -> None:
    with pytest.raises(ValueError, match="peft.method='bitfit' has no peft config"):
        models.peft_config(PeftSpec(method="bitfit"))
    with pytest.raises(ValueError, match=r"peft.target_modules=\['word_embeddings'\].*cannot take IA3"):
        wrapped(loaded, PeftSpec(method="ia3", target_modules=["word_embeddings"]))
    with pytest.raises(ValueError, match=r"peft.layers=\[9\]"):
        wrapped(loaded, PeftSpec(method="bitfit", layers=[9]))


# ------------------------------------------------------------------ what a step changes
@pytest.mark.parametrize("spec", [IA3, PeftSpec(method="prefix_tuning", num_virtual_tokens=4),
                                  PeftSpec(method="bitfit"), PeftSpec(base_quantization="nf4")],
                         ids=["ia3", "prefix_tuning", "bitfit", "qlora_nf4"])
def test_one_training_step_changes_only_the_methods_parameters(loaded: tuple, batch: tuple, spec: PeftSpec) -> None:
    model = wrapped(loaded, spec)
    before = {n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items()}
    trainable = dict(models.trainable_parameters(model))
    optimizer = torch.optim.SGD(list(trainable.values()), lr=0.5)   # moves exactly the entries with a gradient
    loss = profiling.classification_loss(model, *batch)
    loss.backward()
    with_grad = {n for n, p in trainable.items() if p.grad is not None and bool(p.grad.ne(0).any())}
    optimizer.step()
    after = model.state_dict(keep_vars=True)
    changed = {n for n, t in after.items() if not torch.equal(before[n], t.detach())}
    state_name = {id(t): n for n, t in after.items()}
    assert changed == {state_name[id(p)] for n, p in trainable.items() if n in with_grad}
    # every trainable tensor gets a gradient, except LoRA's A while B = 0 (its initial value) and
    # the key biases, whose gradient is 0 in exact arithmetic (softmax ignores a shift shared by
    # a row of scores) and rounding noise in float32
    lora_a = {n for n in trainable if "lora_A" in n}
    assert not lora_a & with_grad
    assert set(trainable) - with_grad <= lora_a | {n for n in trainable if n.endswith("key.bias")}
    assert any("classifier" in n for n in with_grad)


# ------------------------------------------------------------------ forward and FLOPs against theory
def test_ia3_and_bitfit_start_as_the_base_model(loaded: tuple, batch: tuple) -> None:
    """IA3 vectors start at 1 and BitFit changes nothing before training: the logits equal the
    base model's bit for bit (x * 1.0 = x)."""
    base = loaded[1]
    with torch.no_grad():
        reference = profiling.classification_logits(base, *batch[:2])
        for spec in (IA3, PeftSpec(method="bitfit")):
            assert torch.equal(profiling.classification_logits(wrapped(loaded, spec), *batch[:2]), reference)


def test_prefix_tuning_adds_its_keys_to_every_blocks_attention(loaded: tuple, batch: tuple) -> None:
    """Forward FLOPs: each block's attention scores and weighted sum run over T + P keys, so
    prefix tuning adds 2 x 2 x B x T x P x h per block (QK^T and AV) and nothing else; every
    block's slice of the prefix table gets a gradient."""
    tokens = 4
    model = wrapped(loaded, PeftSpec(method="prefix_tuning", num_virtual_tokens=tokens))
    input_ids, mask, labels = batch
    b, t = input_ids.shape
    with torch.no_grad():
        _, base_flops = profiling.counted_forward(loaded[1], input_ids, mask)
        _, prefix_flops = profiling.counted_forward(model, input_ids, mask)
    assert prefix_flops - base_flops == LAYERS * 4 * b * t * tokens * HIDDEN
    profiling.classification_loss(model, input_ids, mask, labels).backward()
    (table,) = [p for n, p in models.trainable_parameters(model) if "prompt_encoder" in n]
    per_block = table.grad.reshape(tokens, LAYERS, 2, HIDDEN)   # peft's layout: (P, layers x {key, value} x h)
    assert bool((per_block.abs().sum(dim=(0, 3)) > 0).all())


def test_prefix_tuning_masks_padding(loaded: tuple) -> None:
    """An example alone and padded in a batch gives the same logits (float64: padding keys
    carry exactly zero attention weight; the rest differs by rounding only)."""
    tokenizer = loaded[0]
    model = wrapped(loaded, PeftSpec(method="prefix_tuning", num_virtual_tokens=4)).double()
    short, long_ = "a quiet day", "the central bank raised interest rates again this morning"
    alone = tokenizer([short], return_tensors="pt")
    both = tokenizer([short, long_], padding=True, return_tensors="pt")
    assert alone["input_ids"].shape[1] < both["input_ids"].shape[1]
    with torch.no_grad():
        a = profiling.classification_logits(model, alone["input_ids"], alone["attention_mask"])[0]
        b = profiling.classification_logits(model, both["input_ids"], both["attention_mask"])[0]
    assert torch.allclose(a, b, rtol=0, atol=1e-10)


def test_bitfit_backward_adds_block_zeros_input_gradients_to_ia3s(loaded: tuple, batch: tuple) -> None:
    """Counted step FLOPs. Both methods' forwards are the base model's (scalings and bias
    additions are element-wise, not counted) and both backpropagate input gradients through
    blocks 1..5 and the head. IA3 on key/value/output.dense needs none below block 0's keys and
    values; BitFit trains the embedding LayerNorm's bias, so block 0's query, key and value
    layers also compute their input gradients: 3 x 2 x (B T) x h^2 more."""
    b, t = batch[0].shape
    ia3 = profiling.count_step_flops(wrapped(loaded, IA3), *batch).flops
    bitfit = profiling.count_step_flops(wrapped(loaded, PeftSpec(method="bitfit")), *batch).flops
    assert bitfit - ia3 == 3 * 2 * b * t * HIDDEN * HIDDEN


@pytest.mark.parametrize("spec", [IA3, PeftSpec(method="prefix_tuning"), PeftSpec(method="bitfit"),
                                  PeftSpec(base_quantization="int8")], ids=["ia3", "prefix", "bitfit", "qlora"])
def test_every_method_applies_to_a_weightless_model(spec: PeftSpec) -> None:
    """The cost model builds the architecture on the meta device: apply_peft reads names and
    shapes only, and the payload is the materialised model's."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(models.default_model_path(), num_labels=CLASSES)
    with torch.device("meta"):
        model = models.apply_peft(AutoModelForSequenceClassification.from_config(config), spec)
    assert all(p.is_meta for p in model.parameters())
    torch.manual_seed(0)
    real = models.apply_peft(models.load_base(ModelSpec(), CLASSES)[1], spec)
    assert payload(model) == payload(real)
    assert profiling.weights_bytes(model) == profiling.weights_bytes(real)


# ------------------------------------------------------------------ the trainer's execution paths
def small_scenario(peft: dict, **execution: Any) -> Scenario:
    return Scenario.model_validate({
        "name": "methods", "devices": [{"count": 4}],
        "model": {"max_length_tokens": 16},
        "data": {"max_test_examples": 16, "partition": "iid"},
        "training": {"batch_size": 2, "local_steps": 2, "learning_rate": 1e-2, "rounds": 1, "devices_per_round": 2},
        "peft": peft, "execution": execution,
    })


NEW_METHODS = [{"method": "ia3", "target_modules": ["key", "value", "output.dense"],
                "feedforward_modules": ["output.dense"]},
               {"method": "prefix_tuning", "num_virtual_tokens": 4},
               {"method": "bitfit"}]


@pytest.mark.parametrize("peft", NEW_METHODS, ids=["ia3", "prefix_tuning", "bitfit"])
def test_batched_falls_back_with_a_note_and_the_same_results(peft: dict) -> None:
    work = [LocalJob(device_id=d, round=1, steps=s, batch_size=2) for d, s in enumerate([2, 1])]
    plain = build_trainer(small_scenario(peft, prune_last_block=False), seed=0)
    with pytest.warns(RuntimeWarning, match="execution.strategy=batched not applied"):
        asked = build_trainer(small_scenario(peft, strategy="batched", prune_last_block=False), seed=0)
    assert plain.strategy == asked.strategy == "sequential" and not plain.execution_notes
    (note,) = asked.execution_notes
    assert f"peft.method={peft['method']!r}" in note and "runs sequentially" in note
    a, b = plain.local_train(work), asked.local_train(work)
    for x, y in zip(a, b):
        assert x.flops == y.flops and x.loss == y.loss and x.update_bytes == y.update_bytes
        assert x.peak_memory_bytes == y.peak_memory_bytes
        assert set(x.update) == set(y.update) and all(torch.equal(x.update[n], y.update[n]) for n in x.update)
        assert any(float(t.abs().max()) > 0 for t in x.update.values())


def test_prefix_tuning_skips_the_activation_cache_and_the_pruned_last_block_with_notes() -> None:
    """Prefix tuning puts trainable keys and values into every block's attention: no frozen
    prefix of blocks exists, and the last block's position-0 forward would drop its prefix."""
    peft = {"method": "prefix_tuning", "num_virtual_tokens": 4}
    with pytest.warns(RuntimeWarning):
        trainer = build_trainer(small_scenario(peft, activation_cache_bytes=1_000_000, prune_last_block=True), seed=0)
    assert trainer.activation_cache is None and trainer.pruned_block is None
    notes = " | ".join(trainer.execution_notes)
    assert "activation_cache_bytes not applied" in notes and "prompt_encoder" in notes
    assert "prune_last_block not applied: prefix tuning prepends" in notes


def test_ia3_on_top_blocks_uses_the_activation_cache_exactly() -> None:
    """IA3 vectors live inside the blocks, so with peft.layers the frozen lower blocks are
    cached; the step's counted costs are those of the uncached step."""
    peft = {"method": "ia3", "layers": [4, 5]}
    work = [LocalJob(device_id=0, round=1, steps=2, batch_size=2)]
    plain = build_trainer(small_scenario(peft), seed=0)
    cached = build_trainer(small_scenario(peft, activation_cache_bytes=10_000_000), seed=0)
    assert cached.activation_cache is not None and cached.activation_cache.prefix.first_trainable == 4
    (a,), (b,) = plain.local_train(work), cached.local_train(work)
    assert a.flops == b.flops
    assert b.loss == pytest.approx(a.loss, rel=1e-4)   # float32: same maths, other matrix shapes


def _as_float64(trainer: Any) -> Any:
    """The trainer's model and global state in float64 (quantisation codes stay integers, their
    scales become float64), for "same maths" comparisons of values."""
    trainer.model.double()
    trainer._trainable = models.trainable_parameters(trainer.model)
    trainer._global = {n: t.double() for n, t in trainer._global.items()}
    return trainer


@pytest.mark.parametrize("scheme", ["nf4"])   # int8 differs only in QuantizedLinear.dequantize
def test_batched_lora_on_a_quantised_base_equals_sequential(scheme: str) -> None:
    """LoRA on a quantised base is batched (the quantised layers are frozen and shared, computing
    every row with the same dequantised weight): the same costs bit for bit, and in float64 the
    same losses (relative 1e-10) and SGD updates (1e-8 of the largest entry), the tolerances of
    tests/fomo/test_fomo_execution.py (derived there from the float64 summation-order bound)."""
    peft = {"method": "lora", "base_quantization": scheme}
    work = [LocalJob(device_id=d, round=1, steps=s, batch_size=2) for d, s in enumerate([2, 1, 2])]
    seq, bat = small_scenario(peft, strategy="sequential"), small_scenario(peft, strategy="batched")
    a_tr, b_tr = build_trainer(seq, seed=0), build_trainer(bat, seed=0)
    assert b_tr.strategy == "batched" and not any("batched" in n for n in b_tr.execution_notes)
    a, b = a_tr.local_train(work), b_tr.local_train(work)
    assert [r.flops for r in a] == [r.flops for r in b]
    assert [r.peak_memory_bytes for r in a] == [r.peak_memory_bytes for r in b]
    seq64 = Scenario.model_validate({**seq.model_dump(), "training": {**seq.training.model_dump(), "optimizer": "sgd"}})
    bat64 = Scenario.model_validate({**bat.model_dump(), "training": {**bat.training.model_dump(), "optimizer": "sgd"}})
    a64 = _as_float64(build_trainer(seq64, seed=0)).local_train(work)
    b64 = _as_float64(build_trainer(bat64, seed=0)).local_train(work)
    for x, y in zip(a64, b64):
        assert abs(x.loss - y.loss) <= 1e-10 * abs(x.loss)
        scale = max(float(t.abs().max()) for t in x.update.values())
        assert scale > 0
        assert max(float((x.update[n] - y.update[n]).abs().max()) for n in x.update) <= 1e-8 * scale
