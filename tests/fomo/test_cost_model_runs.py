"""model.cost_model on the timeline: runs whose costs come from an architecture without weights.

The trained model's own architecture as a cost model must leave the run unchanged event for
event; a paper-scale architecture must change the costs (which devices fit, compute, uploads)
and not the accuracy; LoLa's depth profile counted without weights must equal the one measured
on the real checkpoint."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from deftsim.runner import run_scenario
from fomo.depth_profile import measure_depth_profile
from netsim.scenario import ModelSpec, PeftSpec, Scenario

pytestmark = pytest.mark.slow


def _scenario(**model) -> Scenario:
    return Scenario.model_validate({
        "name": "cost_model_run", "trainer": "real",
        "devices": [{"name": "phone", "count": 2, "compute_flops_per_s": 2e12, "memory_bytes": 16e9},
                    {"name": "laptop", "count": 1, "compute_flops_per_s": 2e13, "memory_bytes": 64e9}],
        "model": {"max_length_tokens": 16, **model},
        "training": {"rounds": 2, "local_steps": 1, "batch_size": 4},
        "data": {"max_test_examples": 32}})


def test_own_architecture_as_cost_model_leaves_the_run_unchanged(tmp_path) -> None:
    plain = run_scenario(_scenario(), tmp_path / "plain")
    costed = run_scenario(_scenario(cost_model="minilm-l6"), tmp_path / "costed")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "plain" / "events.parquet"),
                                  pd.read_parquet(tmp_path / "costed" / "events.parquet"))
    assert plain["costs_from"] == "trained_model" and "cost_model" not in plain
    assert costed["costs_from"] == "cost_model"
    cm, trained = costed["cost_model"], costed["trained_model"]
    for key in ("parameters", "flops_per_step", "peak_memory_bytes", "payload_bytes"):
        assert cm[key] == trained[key] == plain["trained_model"][key]


def test_eleven_billion_cost_model_drives_costs_not_accuracy(tmp_path) -> None:
    """T5-XXL's float32 weights (44 GB) do not fit the 16 GB phones: they sit out and only the
    laptop trains, with T5-XXL's step FLOPs and upload size; the accuracy is MiniLM's, trained by
    the laptop alone (the same as a MiniLM-costed run where only the laptop fits)."""
    summary = run_scenario(_scenario(cost_model="t5-xxl"), tmp_path / "t5")
    events = pd.read_parquet(tmp_path / "t5" / "events.parquet")
    assert summary["memory_exceeded_devices"] == ["dev0", "dev1"]
    cm = summary["cost_model"]
    assert cm["name"] == "t5-xxl" and cm["parameters"] == 11_003_736_064
    assert cm["peak_memory_bytes"] > 44e9 > 16e9
    assert summary["trained_model"]["parameters"] == 22_715_141
    uploads = events[events["kind"] == "uplink"]
    assert set(uploads["node"]) == {"dev2"} and (uploads["bytes"] == cm["payload_bytes"]).all()
    compute = events[events["kind"] == "compute"]
    # one local step per job: its FLOPs are one T5-XXL step of the batch's (shorter or equal) shape
    assert (compute["flops"] <= cm["flops_per_step"]).all() and (compute["flops"] > 0.25 * cm["flops_per_step"]).all()
    assert (compute["duration_s"] == compute["flops"] / 2e13).all()
    # the same devices costed as MiniLM, the phones too small for MiniLM (91 MB of weights alone): the laptop trains
    # the same batches, so every evaluation's accuracy is the same; only the timeline differs
    small = _scenario().model_dump()
    small["devices"][0]["memory_bytes"] = 9e7
    minilm = run_scenario(Scenario.model_validate(small), tmp_path / "minilm")
    assert minilm["memory_exceeded_devices"] == ["dev0", "dev1"]
    accuracy = [pd.read_parquet(tmp_path / d / "events.parquet").query("kind == 'evaluate'")["accuracy"].tolist()
                for d in ("t5", "minilm")]
    assert accuracy[0] == accuracy[1]
    assert summary["sim_time_s"] > 10 * minilm["sim_time_s"]


def test_weightless_depth_profile_equals_the_measured_one() -> None:
    """LoLa's per-block profile of all-MiniLM-L6-v2 counted without weights equals the one
    counted on the real checkpoint, block for block, to the last unit."""
    peft = PeftSpec()
    real = measure_depth_profile(ModelSpec(), peft, 3, 4, 16)
    weightless = measure_depth_profile(ModelSpec(cost_model="minilm-l6"), peft, 3, 4, 16)
    assert weightless.source == "cost_model:minilm-l6" and real.source == "measured"
    for field in ("forward_flops", "backward_flops", "activation_bytes", "trainable_bytes", "weights_bytes",
                  "layers"):
        assert getattr(weightless, field) == getattr(real, field), field


def test_a_decoder_trained_small_and_costed_as_llama_2_7b(tmp_path) -> None:
    """Causal-LM fine-tuning of a tiny random decoder with Llama-2-7B's costs: every step,
    memory and upload is Llama-2-7B's (the classification default targets mapped to q_proj and
    v_proj); with the trained decoder's own config as the cost model the costs are its own."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fomo import build_trainer, checkpoint
    from fomo.cost_model import CostModel

    gguf = Path(checkpoint.default_decoder_path())
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")

    def trainer(cost_model):
        return build_trainer(Scenario.model_validate({
            "model": {"path": str(tmp_path / "tiny"), "objective": "causal_lm", "max_length_tokens": 24,
                      "cost_model": cost_model},
            "devices": [{"count": 2}], "data": {"max_test_examples": 8}, "training": {"batch_size": 4}}), 0)

    own, big = trainer(str(tmp_path / "tiny")), trainer("llama-2-7b")
    examples = own._train_examples[:4]
    batch = own._tokens.batch(examples)
    assert own._step_profile(examples) == own._count(*batch)            # its own config: its own costs
    assert own.adapter_bytes() == own.cost_model.payload_bytes
    llama = CostModel("llama-2-7b", PeftSpec(), 2, objective="causal_lm")
    assert big._step_profile(examples) == llama.profile(*big._shape(batch[0], batch[1]))
    assert big.adapter_bytes() == llama.payload_bytes == 4 * 32 * 2 * (2 * 4096 * 8)
    assert big.job_memory_bytes(4) > 26e9
    report = big.cost_report(4)
    assert report["costs_from"] == "cost_model" and report["cost_model"]["name"] == "llama-2-7b"
    assert report["trained_model"]["parameters"] < 1e8
