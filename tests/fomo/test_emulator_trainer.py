"""fomo.emulator_trainer.EmulatorTrainer on the real all-MiniLM-L6-v2 checkpoint (slow).

Devices train an Offsite-Tuning emulator; the edge evaluates the plug-in (full model + the
aggregated adapter). Checked: with every middle block kept it is PeftTrainer bit for bit; with
a real layer drop its layout, bytes, FLOPs (against the BERT block formulas) and memory; the
plug-in evaluation against a hand-made one; distillation and 8-bit quantisation at the edge;
the batched strategy and FedProx on the emulator; bad settings.

Architecture constants (all-MiniLM-L6-v2, BBC News' 5 classes, LoRA r = 8 on query and value
of every block, PEFT's trainable head copy): hidden h = 384, feed-forward f = 1536.
"""
from __future__ import annotations

import copy
import re
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fomo import emulator as E
from fomo import models, profiling
from fomo.emulator_trainer import EmulatorTrainer
from fomo.trainer import EVAL_BATCH_SIZE, PeftTrainer
from netsim.interfaces import LocalJob
from netsim.scenario import Scenario

pytestmark = pytest.mark.slow

H, F_, VOCAB, POS, TYPES, N_CLASSES, RANK = 384, 1536, 30522, 512, 2, 5, 8
EMBEDDINGS = (VOCAB + POS + TYPES) * H + 2 * H
BLOCK_MATRICES = 4 * H * H + H * F_ + F_ * H
BLOCK_VECTORS = 4 * H + F_ + H + 2 * (2 * H)
BLOCK = BLOCK_MATRICES + BLOCK_VECTORS
POOLER = H * H + H
HEAD = H * N_CLASSES + N_CLASSES
LORA_PER_BLOCK = 2 * (2 * RANK * H)
BUFFER_BYTES = 2 * POS * 8

GRAD_RTOL = 1e-8
"""float64 SGD updates, max |difference| / max |reference| (the bound of
tests/fomo/test_fomo_execution.py: a float64 SGD update is linear in the step gradients, whose
summation-order error is 1.7e-13 relative per dot product; 1e-8 covers the network's
conditioning with a 60x margin there)."""


def scenario(**overrides: Any) -> Scenario:
    """4 devices, batch 4, 16 tokens, 1 local step, 32 test examples, emulator 1 + 2 + 1."""
    spec: dict[str, Any] = {
        "name": "emulator-small",
        "devices": [{"count": 4}],
        "model": {"max_length_tokens": 16},
        "data": {"max_test_examples": 32},
        "training": {"batch_size": 4, "local_steps": 1, "learning_rate": 1e-3},
        "emulator": {"adapter_layers": 1, "emulator_layers": 2},
    }
    for section, values in overrides.items():
        spec[section] = {**spec.get(section, {}), **values}
    return Scenario.model_validate(spec)


def jobs(round_: int, devices: range, steps: int = 2, batch: int = 4, mu: float = 0.0) -> list[LocalJob]:
    return [LocalJob(device_id=d, round=round_, steps=steps, batch_size=batch, prox_mu=mu) for d in devices]


def fedavg(trainer: PeftTrainer, results: list) -> None:
    total = sum(r.num_examples for r in results)
    trainer.aggregate(results, [r.num_examples / total for r in results])


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _rounds(trainer: PeftTrainer, evaluate: Any) -> list[Any]:
    out: list[Any] = []
    for round_ in (1, 2):
        results = trainer.local_train(jobs(round_, range(2)))
        fedavg(trainer, results)
        out.append([(r.loss, r.flops, r.peak_memory_bytes, r.update_bytes, r.update) for r in results])
        out.append(evaluate(trainer))
    return out


@pytest.fixture(scope="module")
def dropped() -> EmulatorTrainer:
    """LoRA on every block; the emulator keeps L0, L1, L4, L5."""
    return EmulatorTrainer(scenario(), seed=0)


# --------------------------------------------------------------------------------------------
def test_every_middle_block_kept_is_the_peft_trainer_bitwise() -> None:
    # LoRA on the adapter blocks only: the middle blocks (frozen in any emulator) have none
    sc = scenario(peft={"layers": [0, 5]}, emulator={"emulator_layers": 4})
    emu, plain = EmulatorTrainer(sc, seed=1), PeftTrainer(sc, seed=1)
    assert emu.emulator.kept_layers == tuple(range(6))
    assert emu.adapter_bytes() == plain.adapter_bytes()
    assert emu.job_memory_bytes(4) == plain.job_memory_bytes(4)
    assert emu.emulator_download_bytes() == 4 * emu.full_parameters() + BUFFER_BYTES
    assert _same(emu.global_state(), plain.global_state())  # same PEFT initialisation

    def evaluations(t: PeftTrainer) -> Any:
        return [(e.accuracy, e.loss, e.flops, e.num_examples) for e in
                ([t.evaluate(), t.evaluate_emulator()] if isinstance(t, EmulatorTrainer) else [t.evaluate()] * 2)]

    a, b = _rounds(emu, evaluations), _rounds(plain, evaluations)
    assert _same(a, b)
    assert any(float(u.abs().max()) > 0 for u in a[0][0][4].values())


def test_layout_bytes_and_memory(dropped: EmulatorTrainer) -> None:
    t = dropped
    assert t.emulator.kept_layers == (0, 1, 4, 5) and t.emulator.middle == (1, 4)
    assert t.model is t.emulator.model and t.full_model is not t.model
    # one host copy of the frozen tensors: the emulator computes with the full model's own
    full = dict(t.full_model.named_parameters())
    for name, p in t.model.named_parameters():
        assert (p is full[t.emulator.full_name(name)]) == (not p.requires_grad and "lora_" not in name), name
    # trainable: LoRA of emulator blocks 0 and 3 (= L0, L5) and the head copy; middle LoRA frozen
    trainable = [(n, p) for n, p in t.model.named_parameters() if p.requires_grad]
    assert [n for n, _ in trainable] == list(t.global_state())
    layers = {re.search(r"layer\.(\d+)\.", t.emulator.full_name(n)).group(1) for n, _ in trainable if "lora_" in n}
    assert layers == {"0", "5"}
    assert t.adapter_bytes() == sum(p.numel() * p.element_size() for _, p in trainable) \
        == 4 * (2 * LORA_PER_BLOCK + HEAD)
    emulator_tensors = sum(x.numel() * x.element_size() for x in [*t.model.parameters(), *t.model.buffers()])
    assert t.emulator_download_bytes() == emulator_tensors \
        == 4 * (EMBEDDINGS + 4 * BLOCK + POOLER + 2 * HEAD + 4 * LORA_PER_BLOCK) + BUFFER_BYTES
    assert t.full_parameters() == EMBEDDINGS + 6 * BLOCK + POOLER + 2 * HEAD + 6 * LORA_PER_BLOCK
    assert t.emulator_parameters() == EMBEDDINGS + 4 * BLOCK + POOLER + 2 * HEAD + 4 * LORA_PER_BLOCK
    # device memory: the downloaded weights + trainable x (grad + 2 AdamW moments) + activations
    plan = t.plan(jobs(9, range(1), steps=1)[0], t.snapshot())
    saved = t._step_profile(plan.inputs[0]).saved_activation_bytes
    assert saved > 0
    assert plan.cost.peak_memory_bytes == t.emulator_download_bytes() + 3 * t.adapter_bytes() + saved


def test_step_and_evaluation_flops_follow_the_block_formulas(dropped: EmulatorTrainer) -> None:
    t = dropped
    plan = t.plan(LocalJob(device_id=0, round=9, steps=1, batch_size=3), t.snapshot())
    examples = plan.inputs[0]
    b, s = len(examples), t._tokens.seq_len(examples)
    # full - emulator step: the 2 dropped blocks' forward (2bT(4h^2 + 2hf) + 4bT^2 h + LoRA 8bThr)
    # and backward (frozen matrices: input gradients only, 2bT(4h^2 + 2hf); attention 10bT^2 h;
    # their trainable LoRA 16bThr), and the kept middle blocks' LoRA weight gradients (8bThr
    # each), frozen in the emulator
    linear = 2 * b * s * (4 * H * H + 2 * H * F_)
    difference = 2 * (2 * linear + 14 * b * s * s * H + 24 * b * s * H * RANK) + 2 * 8 * b * s * H * RANK
    assert t.full_step_flops(examples) - plan.cost.flops == difference
    assert plan.cost.flops < t.full_step_flops(examples)
    # evaluation: the plug-in runs 2 blocks more forward than the emulator, per test batch
    expected = 0.0
    for start in range(0, len(t._test_examples), EVAL_BATCH_SIZE):
        batch = t._test_examples[start:start + EVAL_BATCH_SIZE]
        n, length = len(batch), t._tokens.seq_len(batch)
        expected += 2 * (2 * n * length * (4 * H * H + 2 * H * F_) + 4 * n * length * length * H
                         + 8 * n * length * H * RANK)
    assert t.evaluate().flops - t.evaluate_emulator().flops == expected


def _assert_same_full_model(a: EmulatorTrainer, b: EmulatorTrainer) -> None:
    pb = dict(b.full_model.named_parameters())
    for n, p in a.full_model.named_parameters():
        assert torch.equal(p, pb[n]), n


def test_distillation_lowers_the_middle_error(dropped: EmulatorTrainer) -> None:
    steps = 4
    t = EmulatorTrainer(scenario(emulator={"distill_steps": steps, "distill_texts": 8,
                                           "distill_batch_size": 4, "distill_learning_rate": 1e-4}), seed=0)
    assert dropped.distill_edge_flops == 0.0 and dropped.distill_losses == ()
    assert t.distill_edge_flops > 0 and len(t.distill_losses) == steps
    # steps 0 and 2 see the same 4 texts: the second time the error is lower
    assert t.distill_losses[2] < t.distill_losses[0] and t.distill_losses[3] < t.distill_losses[1]
    # only the kept middle blocks' base weights moved; the PEFT state and sizes are unchanged
    assert _same(t.global_state(), dropped.global_state())
    assert t.emulator_download_bytes() == dropped.emulator_download_bytes()
    assert t.job_memory_bytes(4) == dropped.job_memory_bytes(4)
    moved = {n for n, p in t.model.named_parameters()
             if not torch.equal(p, dict(dropped.model.named_parameters())[n])}
    assert moved and moved <= {n for n, _ in E.student_parameters(t.emulator)}
    _assert_same_full_model(t, dropped)  # the teacher (the edge's full model) is untouched
    assert not t.emulator.shares_middle
    # held-out texts (the test split): the distilled middle reproduces the teacher better
    ids, mask, _ = t._tokens.batch(t._test_examples[:16])

    def middle_error(trainer: EmulatorTrainer) -> float:
        with torch.no_grad():
            args, kwargs, out = E.middle_io(trainer.emulator, ids, mask)
            hidden = args[0]
            for block in E.teacher_blocks(trainer.full_model, trainer.emulator):
                hidden = block(hidden, *args[1:], **kwargs)
                hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            return float(E.normalized_mse(hidden, out, mask))

    assert middle_error(t) < middle_error(dropped)


def test_eight_bit_download_and_memory(dropped: EmulatorTrainer) -> None:
    t = EmulatorTrainer(scenario(emulator={"quantize_bits": 8}), seed=0)
    # the 6 weight matrices and 4 (frozen) LoRA matrices of each of the 2 kept middle blocks
    assert len(t.emulator.quantized) == 20
    saved = 2 * (BLOCK_MATRICES + LORA_PER_BLOCK) * (4 - 1) - 20 * E.SCALE_BYTES
    assert dropped.emulator_download_bytes() - t.emulator_download_bytes() == saved
    # the device keeps what it downloaded: job memory is smaller by exactly that
    assert dropped.job_memory_bytes(4) - t.job_memory_bytes(4) == saved
    assert t.adapter_bytes() == dropped.adapter_bytes() and _same(t.global_state(), dropped.global_state())
    assert t.evaluate_emulator().loss != dropped.evaluate_emulator().loss
    _assert_same_full_model(t, dropped)
    assert t.evaluate() == dropped.evaluate()  # the plug-in runs the unquantised full model


def _plug_in_by_hand(t: EmulatorTrainer) -> tuple[float, float]:
    """Accuracy and mean loss of a copy of the full model with the global state written in by
    name (emulator block j -> original block kept_layers[j], parsed here), same test batches."""
    full = copy.deepcopy(t.full_model).eval()
    params = dict(full.named_parameters())
    head = t.emulator.block_list_name + "."
    with torch.no_grad():
        for name, tensor in t.global_state().items():
            match = re.fullmatch(re.escape(head) + r"(\d+)\.(.*)", name)
            target = f"{head}{t.emulator.kept_layers[int(match.group(1))]}.{match.group(2)}" if match else name
            params[target].copy_(tensor)
        correct, loss = 0, 0.0
        for start in range(0, len(t._test_examples), EVAL_BATCH_SIZE):
            ids, mask, labels = t._tokens.batch(t._test_examples[start:start + EVAL_BATCH_SIZE])
            logits = full(input_ids=ids, attention_mask=mask).logits
            correct += int((logits.argmax(-1) == labels).sum())
            loss += float(F.cross_entropy(logits, labels, reduction="sum"))
    n = len(t._test_examples)
    return correct / n, loss / n


def test_plug_in_evaluation_after_a_round(dropped: EmulatorTrainer) -> None:
    t = dropped
    before, before_emu = t.evaluate(), t.evaluate_emulator()
    state = t.global_state()
    weights = {n: p.detach().clone() for n, p in t.model.state_dict().items()}
    assert t.evaluate() == before and t.evaluate_emulator() == before_emu  # deterministic
    fedavg(t, t.local_train(jobs(1, range(2), steps=2)))
    after, after_emu = t.evaluate(), t.evaluate_emulator()
    assert after.loss != before.loss and after_emu.loss != before_emu.loss
    assert after.flops == before.flops and after.num_examples == before.num_examples == 32
    accuracy, loss = _plug_in_by_hand(t)
    assert (after.accuracy, after.loss) == (accuracy, loss)  # the same computation
    # evaluation changes neither the global state nor the emulator
    new_state = t.global_state()
    assert t.evaluate() == after and _same(new_state, t.global_state())
    assert not _same(state, new_state)
    for n, w in t.model.state_dict().items():
        if n not in new_state:
            assert torch.equal(w, weights[n]), n


def test_batched_and_fedprox_on_the_emulator() -> None:
    sc = scenario(training={"optimizer": "sgd", "learning_rate": 0.05})
    seq, fast = EmulatorTrainer(sc, seed=2), EmulatorTrainer(scenario(
        training={"optimizer": "sgd", "learning_rate": 0.05}, execution={"strategy": "batched"}), seed=2)
    assert fast.strategy == "batched" and not fast.execution_notes
    for t in (seq, fast):  # float64 values: same maths, any CPU's summation order
        t.model.double()
        t._trainable = models.trainable_parameters(t.model)
        t._global = {n: x.double() for n, x in t._global.items()}
        t._weight_ptrs = profiling.storage_ptrs(t.model)  # new storages: not activations

    def run(steps: int, mu: float) -> tuple[list, list]:
        """The same first batches every time (the devices' streams restarted)."""
        work = [LocalJob(d, 1, steps if d < 2 else 1, 4, mu) for d in range(3)]
        out = []
        for t in (seq, fast):
            t._device_rngs.clear()
            out.append(t.local_train(work))
        return out[0], out[1]

    runs = {(2, 0.0): run(2, 0.0), (2, 1.0): run(2, 1.0), (1, 0.0): run(1, 0.0)}
    for a, b in runs.values():  # batched = sequential: costs exactly, values in float64
        for ra, rb in zip(a, b):
            assert (ra.flops, ra.peak_memory_bytes, ra.update_bytes) == (rb.flops, rb.peak_memory_bytes,
                                                                         rb.update_bytes)
            assert abs(ra.loss - rb.loss) <= 1e-10 * ra.loss
            scale = max(float(u.abs().max()) for u in ra.update.values())
            assert scale > 0
            assert max(float((ra.update[n] - rb.update[n]).abs().max()) for n in ra.update) <= GRAD_RTOL * scale
    # FedProx with SGD (lr, mu): step 1 has no proximal gradient (w = w_start), so a 1-step
    # update is unchanged; step 2 adds mu (w_1 - w_start), so
    # update(mu) - update(0) = -lr mu (w_1 - w_start) = -lr mu x (the 1-step update)
    lr, mu = 0.05, 1.0
    for t_index in (0, 1):
        plain, prox, one = (runs[key][t_index] for key in ((2, 0.0), (2, 1.0), (1, 0.0)))
        assert _same(prox[2].update, plain[2].update)
        for d in range(2):
            scale = max(float(u.abs().max()) for u in plain[d].update.values())
            for n, u in plain[d].update.items():
                expected = -lr * mu * one[d].update[n]
                assert float((prox[d].update[n] - u - expected).abs().max()) <= GRAD_RTOL * scale, n
            assert not _same(prox[d].update, plain[d].update)


@pytest.mark.parametrize("section, message", [
    ({"emulator_layers": 5}, r"emulator\.emulator_layers=5 but the model has 4 middle blocks "
                             r"\(6 blocks, adapter_layers=1 each side\); allowed: 1\.\.4"),
    ({"adapter_layers": 3, "emulator_layers": 1}, r"emulator\.adapter_layers=3: .*no middle block.*"
                                                  r"allowed: 1\.\.2"),
])
def test_bad_settings_name_the_field(section: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EmulatorTrainer(scenario(emulator=section), seed=0)
