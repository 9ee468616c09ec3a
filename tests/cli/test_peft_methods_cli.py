"""``deftsim validate`` / ``run`` with the PEFT methods besides LoRA and prompt tuning: every
experiment either accepts a method or refuses it before any work, exit 2, naming peft.method
(or peft.base_quantization), its value and the allowed values."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from cli_helpers import assert_exit_2, deftsim, sets

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ROOT / "scenarios"
QUICKSTART = SCENARIOS / "quickstart.yaml"

REFUSED = [
    ("lola_compare.yaml", ["peft.method=ia3"], ["peft.method='ia3'", "'lola_compare'", "['lora']"]),
    ("lola_compare.yaml", ["peft.base_quantization=nf4"],
     ["peft.base_quantization='nf4'", "'lola_compare'", "allowed: 'none'"]),
    ("prompt_service.yaml", ["peft.method=bitfit"],
     ["peft.method='bitfit'", "'prompt_service'", "['lora', 'prompt_tuning']"]),
    ("d2d_prompt_transfer.yaml", ["peft.method=prefix_tuning"],
     ["peft.method='prefix_tuning'", "'d2d_prompt_transfer'", "['lora', 'prompt_tuning']"]),
    ("federated_deft.yaml", ["peft.method=ia3", "federated_deft.variants=[lora,emulator]"],
     ["peft.method='ia3'", "variant 'emulator'", "['lora', 'prompt_tuning']"]),
    ("federated_deft.yaml", ["peft.method=bitfit", "federated_deft.variants=[zeroth_order]"],
     ["peft.method='bitfit'", "variant 'zeroth_order'", "['lora', 'prompt_tuning']"]),
    ("federated_deft.yaml", ["peft.base_quantization=int8", "federated_deft.variants=[lora,split]"],
     ["peft.base_quantization='int8'", "variant 'split'", "allowed: 'none'"]),
    # the peft section itself
    ("quickstart.yaml", ["peft.method=ia3", "peft.base_quantization=nf4"],
     ["peft.base_quantization='nf4'", "LoRA only", "peft.method='ia3'", "allowed with 'ia3': 'none'"]),
    ("quickstart.yaml", ["peft.method=lora", "peft.base_quantization=int4"], ["peft.base_quantization", "int4"]),
    ("quickstart.yaml", ["peft.method=ia3", "peft.feedforward_modules=[intermediate.dense]"],
     ["peft.feedforward_modules=['intermediate.dense']", "peft.target_modules=['query', 'value']",
      "a subset of peft.target_modules"]),
    ("quickstart.yaml", ["peft.method=ia3", "peft.target_modules=[nothing_here]"],
     ["peft.target_modules=['nothing_here']", "match no layer"]),
    ("quickstart.yaml", ["peft.method=adapter"], ["peft.method", "adapter", "ia3", "prefix_tuning", "bitfit"]),
]


@pytest.mark.parametrize("name, overrides, fragments", REFUSED,
                         ids=[f"{n}:{','.join(o)}" for n, o, _ in REFUSED])
def test_validate_refuses_a_method_the_experiment_does_not_run(name: str, overrides: list[str],
                                                               fragments: list[str]) -> None:
    res = deftsim("validate", SCENARIOS / name, *sets(overrides), timeout=120)
    assert_exit_2(res, fragments, name)


ACCEPTED = [
    ("quickstart.yaml", ["peft.method=ia3", "peft.target_modules=[key,value,output.dense]",
                         "peft.feedforward_modules=[output.dense]"]),
    ("quickstart.yaml", ["peft.method=prefix_tuning", "peft.num_virtual_tokens=4"]),
    ("quickstart.yaml", ["peft.method=bitfit"]),
    ("quickstart.yaml", ["peft.base_quantization=nf4"]),
    ("aircomp_vs_ofdma.yaml", ["peft.method=bitfit"]),
    ("federated_deft.yaml", ["peft.method=ia3", "federated_deft.variants=[lora,split]"]),
    ("federated_deft.yaml", ["peft.base_quantization=int8", "federated_deft.variants=[lora]"]),
]


@pytest.mark.parametrize("name, overrides", ACCEPTED, ids=[f"{n}:{','.join(o)}" for n, o in ACCEPTED])
def test_validate_accepts_the_methods_an_experiment_runs(name: str, overrides: list[str]) -> None:
    res = deftsim("validate", SCENARIOS / name, *sets(overrides), timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ok: ")


def test_a_setting_the_method_does_not_read_is_warned_about() -> None:
    res = deftsim("validate", QUICKSTART, *sets(["peft.method=bitfit", "peft.rank=4", "peft.num_virtual_tokens=3"]),
                  timeout=120)
    assert res.returncode == 0, res.stderr
    assert "warning: peft.rank=4 has no effect: LoRA only, and peft.method is 'bitfit'" in res.stderr
    assert "warning: peft.num_virtual_tokens=3 has no effect: prefix tuning and prompt tuning only" in res.stderr


@pytest.mark.slow
@pytest.mark.parametrize("overrides, payload_bytes", [
    # prefix tuning: 2 x 6 blocks x 4 tokens x 384 x 4 bytes + the head (5 x 384 + 5) x 4 bytes
    (["peft.method=prefix_tuning", "peft.num_virtual_tokens=4"], 2 * 6 * 4 * 384 * 4 + (5 * 384 + 5) * 4),
    # LoRA r = 8 on query and value of 6 blocks: 6 x 2 x 8 x (384 + 384) x 4 bytes + the head
    (["peft.base_quantization=nf4"], 6 * 2 * 8 * 768 * 4 + (5 * 384 + 5) * 4),
], ids=["prefix_tuning", "qlora_nf4"])
def test_a_run_trains_the_method_and_uploads_its_payload(tmp_path: Path, overrides: list[str],
                                                         payload_bytes: int) -> None:
    out = tmp_path / "run"
    res = deftsim("run", QUICKSTART, "--out", out,
                  *sets(["training.rounds=1", "training.local_steps=1", *overrides]), timeout=600)
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 1
    events = pd.read_parquet(out / "events.parquet")
    uploads = events[events["kind"] == "uplink"]
    assert len(uploads) > 0 and set(uploads["bytes"].astype(int)) == {payload_bytes}
    assert bool((events[events["kind"] == "compute"]["flops"] > 0).all())
