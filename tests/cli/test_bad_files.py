"""Broken model folders and data files give exit code 2 and a message naming the file and the
field, never a traceback; `validate` checks peft.target_modules against the checkpoint; settings
that have no effect are reported by deftsim.checks.settings_warnings.

Every broken input is built under tmp_path: the real all-MiniLM-L6-v2 folder linked file by file
with one file replaced, small CSV files, and a one-block GPT-2 saved from a random init.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from deftsim.checks import settings_warnings
from deftsim.config import load_scenario
from fomo.checkpoint import default_model_path
from netsim.scenario import Scenario

ROOT = Path(__file__).parents[2]
TIMEOUT_S = 120  # generous for a loaded 2-core machine; not a timing assertion
SECRET = "SECRET-CONTENT-7f3a"  # written into broken files; no message may quote it


def deftsim(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deftsim", *args], capture_output=True, text=True,
                          timeout=TIMEOUT_S, cwd=ROOT)


def good_csv(path: Path, rows: int = 24) -> Path:
    lines = ["text,label"] + [f"{'good' if i % 2 else 'bad'} news item {i},{'pos' if i % 2 else 'neg'}"
                              for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def model_copy(tmp_path: Path, name: str = "model") -> Path:
    """The real checkpoint folder, each file linked (replace a link to break that file)."""
    src = Path(default_model_path())
    dst = tmp_path / name
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file():
            os.symlink(f, dst / f.name)
    return dst


def replace(folder: Path, name: str, content: bytes | str | None) -> None:
    """Replace (or, with None, delete) one file of a linked model folder."""
    path = folder / name
    if path.exists() or path.is_symlink():
        path.unlink()
    if content is not None:
        path.write_bytes(content.encode() if isinstance(content, str) else content)


def scenario_file(tmp_path: Path, model: Path | None = None, data: Path | None = None, **sections) -> Path:
    """A small real-trainer scenario (2 devices, 1 round of 1 step) as a YAML (JSON) file."""
    body = {"name": "bad", "trainer": "real", "devices": [{"count": 2}],
            "model": {"max_length_tokens": 16, **({"path": str(model)} if model else {})},
            "data": {"dataset": "csv", "path": str(data or good_csv(tmp_path / "good.csv")),
                     "min_examples_per_device": 2, "max_test_examples": 8},
            "training": {"rounds": 1, "local_steps": 1, "batch_size": 2}}
    for key, value in sections.items():
        body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "scenario.yaml"
    path.write_text(json.dumps(body))
    return path


def assert_clean_exit_2(res: subprocess.CompletedProcess, *fragments: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr + res.stdout, res.stderr[-2000:]
    assert SECRET not in res.stderr + res.stdout
    for fragment in fragments:
        assert fragment in res.stderr, (fragment, res.stderr)


# --------------------------------------------------------------------------------------------
# Model folder
# --------------------------------------------------------------------------------------------
def _config() -> dict:
    return json.loads((Path(default_model_path()) / "config.json").read_text())


def _weights() -> bytes:
    return (Path(default_model_path()) / "model.safetensors").read_bytes()


BROKEN_MODELS = {
    # case: (file, new content or None to delete, fragments of the message)
    "truncated_weights": ("model.safetensors", lambda: _weights()[:1_000_000], ["model.safetensors", "truncated"]),
    "weights_header_cut": ("model.safetensors", lambda: _weights()[:100], ["model.safetensors", "header length"]),
    "weights_garbage": ("model.safetensors", lambda: (SECRET * 100).encode(), ["model.safetensors"]),
    "weights_trailing_bytes": ("model.safetensors", lambda: _weights() + b"\0" * 16,
                               ["model.safetensors", "not fully covered"]),
    "weights_missing": ("model.safetensors", lambda: None, ["model.safetensors", "missing"]),
    "config_not_json": ("config.json", lambda: "{" + SECRET, ["config.json", "not valid JSON", "line 1"]),
    "config_binary": ("config.json", lambda: b"\xff\xfe\x00" + SECRET.encode(), ["config.json", "not UTF-8"]),
    "config_a_list": ("config.json", lambda: json.dumps([SECRET]), ["config.json", "JSON list", "object"]),
    "config_deep": ("config.json", lambda: "[" * 100_000 + "]" * 100_000, ["config.json"]),
    "config_no_layers": ("config.json", lambda: json.dumps({k: v for k, v in _config().items()
                                                            if k != "num_hidden_layers"}),
                         ["config.json", "num_hidden_layers"]),
    "config_no_model_type": ("config.json", lambda: json.dumps({k: v for k, v in _config().items()
                                                                if k != "model_type"}),
                             ["config.json", "model_type"]),
    "layers_word": ("config.json", lambda: json.dumps({**_config(), "num_hidden_layers": "six"}),
                    ["config.json", "num_hidden_layers='six'", "integer in 1..1,024"]),
    "layers_float": ("config.json", lambda: json.dumps({**_config(), "num_hidden_layers": 1e9}),
                     ["config.json", "num_hidden_layers=1000000000.0", "integer"]),
    "layers_huge": ("config.json", lambda: json.dumps({**_config(), "num_hidden_layers": 10**9}),
                    ["config.json", "num_hidden_layers=1000000000", "1..1,024"]),
    "layers_negative": ("config.json", lambda: json.dumps({**_config(), "num_hidden_layers": -1}),
                        ["config.json", "num_hidden_layers=-1"]),
    "layers_bool": ("config.json", lambda: json.dumps({**_config(), "num_hidden_layers": True}),
                    ["config.json", "num_hidden_layers=True"]),
    "layers_beyond_weights": ("config.json", lambda: json.dumps({**_config(), "num_hidden_layers": 12}),
                              ["config.json", "12 transformer blocks", "model.safetensors holds 6"]),
    "hidden_size_mismatch": ("config.json", lambda: json.dumps({**_config(), "hidden_size": 100_000}),
                             ["config.json", "hidden_size=100,000", "384"]),
    "tokenizer_missing": (None, None, ["has no tokenizer", "tokenizer.json", "vocab.txt"]),
    "tokenizer_truncated": ("tokenizer.json", lambda: (Path(default_model_path()) / "tokenizer.json")
                            .read_bytes()[:5000], ["tokenizer.json", "not valid JSON"]),
}


def _break(tmp_path: Path, case: str) -> Path:
    folder = model_copy(tmp_path)
    name, content, _ = BROKEN_MODELS[case]
    if case == "tokenizer_missing":
        for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
            replace(folder, f, None)
    else:
        replace(folder, name, content())
    return folder


@pytest.mark.parametrize("case", sorted(BROKEN_MODELS))
def test_broken_model_folder_validate_exit_2(case, tmp_path):
    folder = _break(tmp_path, case)
    res = deftsim("validate", str(scenario_file(tmp_path, model=folder)))
    assert_clean_exit_2(res, "model.path", str(folder), *BROKEN_MODELS[case][2])


@pytest.mark.parametrize("case", ["truncated_weights", "layers_word", "tokenizer_missing"])
def test_broken_model_folder_run_exit_2(case, tmp_path):
    folder = _break(tmp_path, case)
    out = tmp_path / "out"
    res = deftsim("run", str(scenario_file(tmp_path, model=folder)), "--out", str(out), "--quiet", "--threads", "1")
    assert_clean_exit_2(res, "model.path", *BROKEN_MODELS[case][2])
    assert not (out / "summary.json").exists()


@pytest.mark.parametrize("name,content,fragment", [
    ("config.json", lambda: json.dumps({**_config(), "model_type": "no_such_architecture"}), "config.json"),
    ("tokenizer.json", lambda: json.dumps({"note": SECRET}), "model.path"),
])
def test_what_only_transformers_finds_is_exit_2_at_run(name, content, fragment, tmp_path):
    """Broken in a way only transformers can tell (an unknown architecture, a tokenizer.json that
    is a JSON object but no tokenizer): validate passes the folder, run stops with exit 2."""
    folder = model_copy(tmp_path)
    replace(folder, name, content())
    scenario = scenario_file(tmp_path, model=folder)
    assert deftsim("validate", str(scenario)).returncode == 0
    res = deftsim("run", str(scenario), "--out", str(tmp_path / "out"), "--quiet", "--threads", "1")
    assert_clean_exit_2(res, "model.path", "cannot load the checkpoint", fragment)


def test_saved_head_must_fit_the_classes(tmp_path, tiny_gpt2):
    """The GPT-2 checkpoint holds a 2-output head (score.weight); data with 3 classes is refused."""
    csv = tmp_path / "three.csv"
    csv.write_text("text,label\n" + "\n".join(f"item {i},{'abc'[i % 3]}" for i in range(30)) + "\n")
    res = deftsim("validate", str(scenario_file(tmp_path, model=tiny_gpt2, data=csv,
                                                peft={"target_modules": ["c_attn"]})))
    assert_clean_exit_2(res, "score.weight", "2 outputs", "3 classes")


def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_safetensors_header_check_agrees_with_the_library(tmp_path):
    """fomo.checkpoint.safetensors_header reads what safetensors writes, refuses what the
    library refuses (cut data, trailing bytes), and checks sizes against shape x dtype."""
    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from fomo.checkpoint import safetensors_header

    path = tmp_path / "model.safetensors"
    save_file({"enc.0.w.weight": np.zeros((3, 5), np.float32), "enc.0.b": np.zeros(7, np.float16)}, str(path))
    assert safetensors_header(path, tmp_path) == {"enc.0.w.weight": (3, 5), "enc.0.b": (7,)}
    whole = path.read_bytes()
    for broken, fragment in [(whole[:-1], "truncated"), (whole + b"\0", "not fully covered"),
                             (whole[:6], "shorter than the 8-byte header length")]:
        path.write_bytes(broken)
        with pytest.raises(ValueError, match=fragment):
            safetensors_header(path, tmp_path)
        with pytest.raises(Exception):  # the library refuses the same file
            with safe_open(str(path), framework="numpy") as fh:
                list(fh.keys())
    entry = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}  # 2 x 3 x 4 bytes = 24, not 20
    path.write_bytes(_safetensors_bytes({"w": entry}, b"\0" * 20))
    with pytest.raises(ValueError, match="has 20 bytes of data but its shape \\[2, 3\\] needs 24"):
        safetensors_header(path, tmp_path)
    path.write_bytes(_safetensors_bytes({"w": {"dtype": "F32", "shape": "x", "data_offsets": [0, 4]}}, b"\0" * 4))
    with pytest.raises(ValueError, match="corrupt header entry"):
        safetensors_header(path, tmp_path)


def test_config_against_weights_allows_shared_blocks_and_factorised_embeddings(tmp_path):
    """ALBERT stores num_hidden_groups blocks for num_hidden_layers and embeds at embedding_size:
    check_checkpoint accepts that, and refuses the same config without those fields."""
    import numpy as np
    from safetensors.numpy import save_file

    from fomo.checkpoint import check_checkpoint

    save_file({"embeddings.word_embeddings.weight": np.zeros((50, 8), np.float32),
               "encoder.albert_layer_groups.0.albert_layers.0.ffn.weight": np.zeros((64, 16), np.float32)},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    config = {"model_type": "albert", "num_hidden_layers": 12, "num_hidden_groups": 1, "hidden_size": 16,
              "embedding_size": 8, "vocab_size": 50}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert check_checkpoint(tmp_path).depth == 12
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "num_hidden_groups"}))
    with pytest.raises(ValueError, match="says 12 transformer blocks but model.safetensors holds 1"):
        check_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "embedding_size"}))
    with pytest.raises(ValueError, match="hidden_size=16 but the word embedding in model.safetensors is 50 x 8"):
        check_checkpoint(tmp_path)


@pytest.mark.parametrize("files,ok", [
    ({"tokenizer_config.json": '{"tokenizer_class": "BertTokenizer"}'}, False),  # no vocabulary
    ({"special_tokens_map.json": "{}"}, False),
    ({"vocab.json": "{}"}, False),  # BPE needs merges.txt too
    ({"vocab.json": "{}", "merges.txt": "#version: 0.2\n"}, True),
    ({"vocab.txt": "[UNK]\n"}, True),
    ({"spm.model": ""}, True),  # SentencePiece (DeBERTa-v3 name)
    ({"tokenizer_config.json": '{"tokenizer_class": "ByT5Tokenizer"}'}, True),  # bytes: no vocabulary file
])
def test_tokenizer_files(files, ok, tmp_path):
    from fomo.checkpoint import check_tokenizer_files

    for name, text in files.items():
        (tmp_path / name).write_text(text)
    if ok:
        check_tokenizer_files(tmp_path)
    else:
        with pytest.raises(ValueError, match="has no tokenizer"):
            check_tokenizer_files(tmp_path)


# --------------------------------------------------------------------------------------------
# Data file
# --------------------------------------------------------------------------------------------
BROKEN_CSVS = {
    "empty": (b"", ["is empty"]),
    "blank_lines": (b"\n\n  \n", ["is empty"]),
    "header_only": (b"text,label\n", ["no row with both a text"]),
    "binary": (bytes(range(256)) * 64, ["binary file"]),
    "latin1": (("text,label\ncaf\xe9 " + SECRET + ",a\nb,b\n").encode("latin-1"), ["not UTF-8"]),
    "no_text_column": (f"body,label\n{SECRET},a\nb,b\n".encode(), ["data.text_column='text'", "no such column",
                                                                    "2 column(s)"]),
    "no_label_column": (f"text,topic\n{SECRET},a\nb,b\n".encode(), ["data.label_column='label'", "no such column"]),
    "one_class": (b"text,label\nx,a\ny,a\nz,a\n", ["data.label_column='label'", "1 distinct value"]),
    "empty_texts": (b"text,label\n,a\n,b\n,a\n", ["no row with both a text"]),
    "unclosed_quote": (f'text,label\n"{SECRET},a\nb,b\n'.encode(), ["not a well-formed CSV"]),
    "row_wider_than_header": (f"text,label\n{SECRET},a,extra\nb,b\n".encode(), ["not a well-formed CSV"]),
    "huge_row": (b"text,label\n" + b"x" * 2_000_000 + b",a\ny,b\n", ["data.text_column='text'", "2,000,000",
                                                                      "at most 1,000,000"]),
}


@pytest.mark.parametrize("case", sorted(BROKEN_CSVS))
def test_broken_csv_validate_exit_2(case, tmp_path):
    content, fragments = BROKEN_CSVS[case]
    csv = tmp_path / f"{case}.csv"
    csv.write_bytes(content)
    res = deftsim("validate", str(scenario_file(tmp_path, data=csv)))
    assert_clean_exit_2(res, f"{case}.csv", *fragments)


def test_broken_csv_run_exit_2(tmp_path):
    csv = tmp_path / "binary.csv"
    csv.write_bytes(bytes(range(256)) * 64)
    res = deftsim("run", str(scenario_file(tmp_path, data=csv)), "--out", str(tmp_path / "out"), "--quiet",
                  "--threads", "1")
    assert_clean_exit_2(res, "binary.csv", "data.path")


# --------------------------------------------------------------------------------------------
# peft.target_modules against the checkpoint
# --------------------------------------------------------------------------------------------
def test_target_module_typo_lists_minilm_modules(tmp_path):
    res = deftsim("validate", str(scenario_file(tmp_path, peft={"target_modules": ["qurey", "value"]})))
    assert_clean_exit_2(res, "peft.target_modules", "['qurey']", "model.safetensors")
    listing = res.stderr.split("end in:", 1)[1]
    for module in ("query", "key", "value", "dense", "word_embeddings"):
        assert module in listing
    assert "LayerNorm" not in listing  # 1-D weights: not a layer LoRA adapts


@pytest.mark.parametrize("targets", [["query"], ["attention.self.query", "value"], ["all-linear"],
                                     ["bert.encoder.layer.0.attention.self.key"]])
def test_valid_targets_pass(targets, tmp_path):
    res = deftsim("validate", str(scenario_file(tmp_path, peft={"target_modules": targets})))
    assert res.returncode == 0, res.stderr


def _build_tiny_gpt2(folder: Path) -> None:
    """One-block GPT-2 (n_embd 32) with a byte-level tokenizer (256 byte symbols, no merges) and
    a 2-class head, saved with save_pretrained: no download."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>").save_pretrained(folder)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=len(vocab), num_labels=2,
                        bos_token_id=len(vocab) - 1, eos_token_id=len(vocab) - 1)
    GPT2ForSequenceClassification(config).save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gpt2")
    _build_tiny_gpt2(folder)
    return folder


def test_gpt2_default_targets_name_its_conv1d_modules(tmp_path, tiny_gpt2):
    res = deftsim("validate", str(scenario_file(tmp_path, model=tiny_gpt2)))  # default: query, value
    assert_clean_exit_2(res, "peft.target_modules", "['query', 'value']", "Conv1D")
    listing = res.stderr.split("end in:", 1)[1]
    for module in ("c_attn", "c_fc", "c_proj", "score", "wte"):
        assert module in listing


def test_gpt2_conv1d_target_validates_and_runs(tmp_path, tiny_gpt2):
    scenario = scenario_file(tmp_path, model=tiny_gpt2, peft={"target_modules": ["c_attn"], "rank": 2})
    assert deftsim("validate", str(scenario)).returncode == 0
    out = tmp_path / "out"
    res = deftsim("run", str(scenario), "--out", str(out), "--quiet", "--threads", "1")
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 1 and summary["chance_accuracy"] == 0.5


def test_runtime_target_check_names_module_types(tiny_gpt2):
    """fomo.models.check_target_modules (the trainer's own check) lists each adaptable module with
    its type, so GPT-2's Conv1D layers are not reported as missing linear layers."""
    from fomo.models import check_target_modules, load_base
    from netsim.scenario import ModelSpec

    _, model = load_base(ModelSpec(path=str(tiny_gpt2)), 2)
    check_target_modules(model, ["c_attn", "all-linear"])
    with pytest.raises(ValueError) as err:
        check_target_modules(model, ["query", "ln_1"])
    message = str(err.value)
    assert "['query'] not found" in message and "['ln_1 (LayerNorm)'] cannot take LoRA" in message
    assert "c_attn (Conv1D)" in message and "score (Linear)" in message and "wte (Embedding)" in message


# --------------------------------------------------------------------------------------------
# Settings without effect
# --------------------------------------------------------------------------------------------
WARNINGS = [
    # scenario sections, fragments of one expected message
    ({"peft": {"method": "prompt_tuning", "rank": 4}}, ["peft.rank=4", "LoRA only", "'prompt_tuning'"]),
    ({"peft": {"method": "prompt_tuning", "alpha": 32}}, ["peft.alpha=32.0", "LoRA only"]),
    ({"peft": {"method": "prompt_tuning", "target_modules": ["key"]}}, ["peft.target_modules=['key']"]),
    ({"peft": {"method": "prompt_tuning", "layers": [5]}}, ["peft.layers=[5]"]),
    ({"peft": {"num_virtual_tokens": 20}}, ["peft.num_virtual_tokens=20", "prompt tuning only", "'lora'"]),
    ({"data": {"dirichlet_alpha": 0.1}}, ["data.dirichlet_alpha=0.1", "'dirichlet'", "'iid'"]),
    ({"data": {"path": "/some/where.csv"}}, ["data.path='/some/where.csv'", "'csv' only", "'bbc_news'"]),
    ({"fake": {"step_flops": 1e9}}, ["fake.step_flops=1000000000.0", "trainer is 'real'"]),
    ({"trainer": "fake", "execution": {"strategy": "batched"}}, ["execution.strategy='batched'", "'fake'"]),
    ({"trainer": "fake", "data": {"partition": "dirichlet"}}, ["data.partition='dirichlet'", "no data set"]),
    ({"lola": {"num_blocks": 2}}, ["lola={'num_blocks': 2}", "'lola_compare' only", "'fedavg'"]),
    ({"aircomp": {"num_subcarriers": 64}}, ["aircomp.num_subcarriers=64", "'ofdma'", "'fedavg'"]),
    ({"neural_aircomp": {"steps": 5}}, ["neural_aircomp={'steps': 5}", "'neural_aircomp' only"]),
    ({"experiment": "neural_aircomp", "peft": {"rank": 4}}, ["peft.rank=4", "trains its own projections"]),
    ({"channel": {"uplink_access": "aircomp"}, "aircomp": {"device_counts": [3]}},
     ["aircomp.device_counts=[3]", "'aircomp_vs_ofdma' only"]),
    ({"channel": {"pathloss": {"exponent": 3.5}}}, ["channel.pathloss.exponent=3.5", "log_distance only"]),
    ({"d2d": {"kind": "knn", "threshold_m": 50.0}}, ["d2d.threshold_m=50.0", "'distance' only"]),
    ({"execution": {"max_devices_per_pass": 4}}, ["execution.max_devices_per_pass=4", "'sequential'"]),
    ({"experiment": "lola_compare", "lola": {"train_algorithms": ["crunch"]}},
     ["lola.train_algorithms=['crunch']", "train_rounds is 0"]),
]


@pytest.mark.parametrize("sections,fragments", WARNINGS)
def test_settings_without_effect_warn(sections, fragments):
    messages = settings_warnings(Scenario.model_validate(sections))
    assert any(all(f in m for f in fragments) for m in messages), messages
    assert all("has no effect" in m for m in messages)


@pytest.mark.parametrize("sections", [
    {},
    {"peft": {"method": "prompt_tuning", "num_virtual_tokens": 16}},
    {"peft": {"rank": 4, "alpha": 8, "target_modules": ["query", "key", "value"]}},
    {"data": {"partition": "dirichlet", "dirichlet_alpha": 0.1}},
    {"channel": {"uplink_access": "aircomp"}, "aircomp": {"num_subcarriers": 64}},
    {"experiment": "aircomp_vs_ofdma", "aircomp": {"device_counts": [2, 4]}},
    {"trainer": "fake", "fake": {"step_flops": 1e9}},
    {"experiment": "lola_compare", "lola": {"num_blocks": 2}},
    {"peft": {"method": "prompt_tuning", "rank": 8}},  # the default value: nothing changed
])
def test_effective_settings_do_not_warn(sections):
    assert settings_warnings(Scenario.model_validate(sections)) == []


def test_shipped_scenarios_do_not_warn():
    files = [p for p in sorted((ROOT / "scenarios").glob("*.yaml")) if not p.name.startswith("sweep_")]
    assert len(files) >= 5
    for path in files:
        assert settings_warnings(load_scenario(path)) == [], path.name


def test_override_into_a_missing_section_sets_only_that_field(tmp_path):
    """--set peft.method=... on a file without a peft section copies the section's defaults; those
    copies are not settings the user made."""
    path = tmp_path / "s.yaml"
    path.write_text("trainer: fake\nexperiment: lola_compare\n")
    assert settings_warnings(load_scenario(path, ["peft.method=prompt_tuning"])) == []
    assert any("peft.rank=4" in m for m in settings_warnings(
        load_scenario(path, ["peft.method=prompt_tuning", "peft.rank=4"])))
