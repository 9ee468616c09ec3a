"""fomo.cost_model: costs of an architecture counted on its module graph without weights.

The counts must equal those of the materialised model exactly (same ops, same saved tensors),
the parameter counts must be the published ones, and a 7 B architecture must cost well under
1 GB of host memory to count."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from fomo import cost_model as fcost
from fomo import models, profiling
from netsim.scenario import REFERENCE_ARCHITECTURES, ModelSpec, PeftSpec, Scenario

NUM_LABELS = 5


def _real_minilm(peft_spec: PeftSpec):
    torch.manual_seed(0)
    _, base = models.load_base(ModelSpec(), NUM_LABELS)
    return models.apply_peft(base, peft_spec)


def _batch(batch_size: int, seq_len: int, padded: bool, vocab: int = 1000, causal: bool = False):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (batch_size, seq_len), generator=gen)
    mask = torch.ones(batch_size, seq_len, dtype=torch.int64)
    if padded:
        mask[0, seq_len // 2:] = 0
    labels = (ids.clone() if causal else torch.randint(0, NUM_LABELS, (batch_size,), generator=gen))
    return ids, mask, labels


def test_reference_architectures_are_the_scenarios_names() -> None:
    assert fcost.reference_architectures() == sorted(REFERENCE_ARCHITECTURES)


@pytest.mark.parametrize("peft_spec", [
    PeftSpec(),
    PeftSpec(rank=4, target_modules=["query", "key", "value", "dense"], layers=[4, 5]),
    PeftSpec(method="prompt_tuning", num_virtual_tokens=4),
    PeftSpec(method="ia3", target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]),
    PeftSpec(method="prefix_tuning", num_virtual_tokens=4),
    PeftSpec(method="bitfit"),
    PeftSpec(base_quantization="nf4"),
], ids=["lora", "lora-top-blocks", "prompt-tuning", "ia3", "prefix-tuning", "bitfit", "lora-nf4"])
def test_counts_equal_the_materialised_model_exactly(peft_spec: PeftSpec) -> None:
    """minilm-l6 is the trained model's own architecture: FLOPs, saved bytes, weights and payload
    of the weightless graph equal the real model's, padded batch or not, to the last unit."""
    real = _real_minilm(peft_spec)
    cost = fcost.CostModel("minilm-l6", peft_spec, NUM_LABELS)
    assert cost.weights_bytes == profiling.weights_bytes(real)
    assert cost.payload_bytes == models.tensor_bytes([p for _, p in models.trainable_parameters(real)])
    for batch_size, seq_len in [(8, 32), (3, 17)]:
        for padded in (False, True):
            ids, mask, labels = _batch(batch_size, seq_len, padded)
            assert cost.profile(batch_size, seq_len, padded) == profiling.count_step_flops(real, ids, mask, labels)
            with torch.no_grad():
                assert cost.eval_flops(batch_size, seq_len, padded) == profiling.counted_forward(real, ids, mask)[1]


def _tiny_configs() -> dict[str, dict]:
    return {
        "llama-gqa": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
                      "max_position_embeddings": 128, "pad_token_id": 0, "tie_word_embeddings": False},
        "roberta": {"model_type": "roberta", "hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "intermediate_size": 64, "vocab_size": 300, "max_position_embeddings": 130, "pad_token_id": 1,
                    "type_vocab_size": 1},
        "t5": {"model_type": "t5", "d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 2, "num_decoder_layers": 2,
               "num_heads": 4, "vocab_size": 300, "feed_forward_proj": "gated-gelu", "decoder_start_token_id": 0},
    }


@pytest.mark.parametrize("name", list(_tiny_configs()))
@pytest.mark.parametrize("objective", ["classification", "causal_lm"])
def test_folder_architectures_equal_their_materialised_models(tmp_path, name: str, objective: str) -> None:
    """Any folder with a config.json: a tiny Llama (grouped-query attention, causal), RoBERTa and
    T5 (text-to-text classification) built with random weights count exactly like their
    weightless graphs."""
    config = _tiny_configs()[name]
    if objective == "causal_lm" and name != "llama-gqa":
        if name == "t5":
            (tmp_path / "config.json").write_text(json.dumps(config))
            with pytest.raises(ValueError, match="encoder-decoder"):
                fcost.CostModel(str(tmp_path), PeftSpec(), NUM_LABELS, objective="causal_lm")
        return
    (tmp_path / "config.json").write_text(json.dumps(config))
    peft_spec = PeftSpec(target_modules=["all-linear"], rank=2) if name != "roberta" else PeftSpec(rank=2)
    cost = fcost.CostModel(str(tmp_path), peft_spec, NUM_LABELS, objective=objective)
    hf_config = fcost.architecture_config(str(tmp_path), NUM_LABELS)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real = fcost.model_class(hf_config, objective).from_config(hf_config)
        real = fcost.wrap_peft(real, fcost.architecture_peft(peft_spec, real)[0], objective)
    real.train()
    assert cost.weights_bytes == profiling.weights_bytes(real)
    assert cost.payload_bytes == models.tensor_bytes([p for _, p in models.trainable_parameters(real)])
    assert cost.parameters == sum(p.numel() for n, p in real.named_parameters()
                                  if "lora_" not in n and "modules_to_save" not in n)
    seq2seq = fcost.is_encoder_decoder(hf_config)
    loss = profiling.labels_loss if seq2seq else profiling.step_loss(objective)
    for padded in (False, True):
        ids, mask, labels = _batch(4, 12, padded, vocab=300, causal=objective == "causal_lm")
        if seq2seq:
            labels = ids[:, :fcost.SEQ2SEQ_TARGET_TOKENS].clone()
        expected = profiling.count_step_flops(real, ids, mask if padded else None, labels, loss=loss)
        assert cost.profile(4, 12, padded) == expected


# Published parameter counts (the released checkpoints' backbones; see each config's _comment).
KNOWN_BACKBONE = {
    "bert-base": 109_482_240,          # bert-base-uncased BertModel
    "minilm-l6": 22_713_216,           # all-MiniLM-L6-v2 BertModel
}
KNOWN_CAUSAL_LM = {
    "llama-2-7b": 6_738_415_616,       # Llama-2-7b-hf LlamaForCausalLM
    "llama-1b": 1_235_814_400,         # Llama-3.2-1B (tied input and output embeddings)
}


@pytest.mark.parametrize("name", sorted(KNOWN_BACKBONE))
def test_encoder_parameter_counts_are_the_published_ones(name: str) -> None:
    cost = fcost.CostModel(name, PeftSpec(), NUM_LABELS)
    assert cost.backbone_parameters == KNOWN_BACKBONE[name]
    hidden = cost.config.hidden_size
    assert cost.parameters == KNOWN_BACKBONE[name] + hidden * NUM_LABELS + NUM_LABELS  # + linear head


@pytest.mark.parametrize("name", sorted(KNOWN_CAUSAL_LM))
def test_decoder_parameter_counts_are_the_published_ones(name: str) -> None:
    cost = fcost.CostModel(name, PeftSpec(), NUM_LABELS, objective="causal_lm")
    assert cost.parameters == KNOWN_CAUSAL_LM[name]
    assert cost.notes and "q_proj" in cost.notes[0]          # BERT's query/value mapped to Llama's names


def test_roberta_large_and_t5_xxl_match_their_formulas() -> None:
    """RoBERTa-large: 355,359,744 with its pooler (the published count); sequence classification
    drops the pooler (1024 x 1024 + 1024) and adds a dense + out_proj head. T5 v1.1 XXL: the
    closed-form count of its blocks, with the output head tied to the embedding as transformers
    builds T5 (the released checkpoint's untied head adds one more 32128 x 4096 matrix,
    11,135,332,352 in all)."""
    roberta = fcost.CostModel("roberta-large", PeftSpec(), NUM_LABELS)
    h = 1024
    assert roberta.parameters == 355_359_744 - (h * h + h) + (h * h + h) + (h * NUM_LABELS + NUM_LABELS)
    t5 = fcost.CostModel("t5-xxl", PeftSpec(), NUM_LABELS)
    d, ff, vocab, layers, inner = 4096, 10240, 32128, 24, 64 * 64
    attention = 4 * d * inner
    mlp = 2 * d * ff + ff * d                            # gated GELU: wi_0, wi_1, wo
    encoder = layers * (attention + mlp + 2 * d) + d     # + layer norms, final norm
    decoder = layers * (2 * attention + mlp + 3 * d) + d
    relative_bias = 2 * 32 * 64                          # one table per stack
    assert t5.parameters == vocab * d + encoder + decoder + relative_bias
    assert t5.parameters + vocab * d == 11_135_332_352
    assert t5.notes and "['q', 'v']" in t5.notes[0]


def test_payload_equals_the_lora_formula_on_a_7b_architecture() -> None:
    """LoRA rank r on q_proj and v_proj of every Llama-2-7B block: 2 matrices x (d x r + r x d)
    per block, float32, plus the d x classes score head."""
    r, d, blocks = 8, 4096, 32
    cost = fcost.CostModel("llama-2-7b", PeftSpec(rank=r), NUM_LABELS)
    assert cost.payload_bytes == 4 * (blocks * 2 * (d * r + r * d) + d * NUM_LABELS)


def test_bf16_cost_model_halves_the_weights_and_keeps_the_flops() -> None:
    f32 = fcost.CostModel("bert-base", PeftSpec(), NUM_LABELS)
    bf16 = fcost.CostModel("bert-base", PeftSpec(), NUM_LABELS, dtype=torch.bfloat16)
    assert bf16.profile(4, 64).flops == f32.profile(4, 64).flops
    int_buffers = sum(b.numel() * b.element_size() for b in f32.model.buffers() if not b.is_floating_point())
    assert bf16.weights_bytes - int_buffers == (f32.weights_bytes - int_buffers) // 2


def test_counting_a_7b_architecture_allocates_no_weights() -> None:
    """A fresh interpreter counts one LoRA step of Llama-2-7B (26 GB of float32 weights) with a
    peak resident size under 1 GiB, torch and transformers included. The peak is the kernel's
    high-water mark of the new program (VmHWM), not ru_maxrss, which on Linux also counts the
    parent's pages the child shared between fork and exec."""
    script = textwrap.dedent("""
        import resource, warnings
        warnings.simplefilter("ignore")
        from fomo.cost_model import CostModel
        from netsim.scenario import PeftSpec
        cost = CostModel("llama-2-7b", PeftSpec(), 5)
        step = cost.profile(8, 128)
        try:
            peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        except OSError:   # no /proc: ru_maxrss (kB on Linux)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(cost.weights_bytes, step.flops, peak)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=True)
    weights_bytes, flops, peak_rss_bytes = (float(x) for x in out.stdout.split())
    assert weights_bytes > 26e9 and flops > 2.6e13
    assert peak_rss_bytes < 2 ** 30


def test_unknown_architecture_is_refused_with_the_allowed_names(tmp_path) -> None:
    with pytest.raises(ValueError, match="model.cost_model='gpt-9'.*allowed: bert-base"):
        fcost.architecture_config("gpt-9")
    (tmp_path / "config.json").write_text('{"model_type": "no-such-model"}')
    with pytest.raises(ValueError, match="is not a transformers config"):
        fcost.architecture_config(str(tmp_path))
    with pytest.raises(ValueError, match="model.cost_model='gpt-9'"):
        Scenario(model={"cost_model": "gpt-9"})


@pytest.mark.parametrize("sections, fragment", [
    ({"experiment": "prompt_service"}, "applies to experiment fedavg or lola_compare"),
    ({"channel": {"uplink_access": "aircomp"}}, "needs channel.uplink_access=ofdma"),
    ({"trainer": "fake"}, "needs trainer: real"),
])
def test_cost_model_is_refused_where_it_does_not_apply(sections: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        Scenario(model={"cost_model": "t5-xxl"}, **sections)
