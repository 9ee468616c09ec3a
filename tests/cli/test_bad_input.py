"""Every bad scenario file gives exit code 2 and a clear message, never a traceback."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BAD = Path(__file__).parent / "bad"

# file -> fragments the message must contain (field path, bad value and/or what is allowed)
EXPECTED = {
    "accuracy_as_percent.yaml": ["stop.target_accuracy", "95", "less than or equal to 1"],
    "aircomp_snr_nan.yaml": ["aircomp", "receive_snr_db=nan", ".inf (noise off) or null"],
    "bad_test_fraction.yaml": ["data.test_fraction", "1.5", "less than 1"],
    "binary_garbage.yaml": ["not UTF-8"],
    "broken_yaml.yaml": ["not valid YAML", "line"],
    "csv_without_path.yaml": ["data", "needs data.path"],
    "devices_not_a_list.yaml": ["devices", "valid list"],
    "empty.yaml": ["is empty"],
    "inverted_annulus.yaml": ["devices.0.placement", "min_distance_m=300"],
    "knn_k_too_large.yaml": ["d2d.k=10", "device count (4)"],
    "layer_out_of_range.yaml": ["peft.layers", "[10]", "0..5"],
    "lr_not_a_number.yaml": ["training.learning_rate", "'fast'", "valid number"],
    "missing_model_folder.yaml": ["model", "/nonexistent/model/folder", "does not exist"],
    "more_devices_than_data.yaml": ["5000 devices", "data.min_examples_per_device"],
    "negative_bandwidth.yaml": ["channel.uplink_bandwidth_hz", "-20000000.0", "greater than or equal to 1"],
    "negative_seed.yaml": ["seed", "-1", "greater than or equal to 0"],
    "too_many_per_round.yaml": ["training.devices_per_round=50", "(4)"],
    "top_level_list.yaml": ["mapping", "list"],
    "typo_fading.yaml": ["channel.fading", "'raleigh'", "'rayleigh'"],
    "typo_pathloss_model.yaml": ["channel.pathloss.model", "'umi'", "'umi_nlos'"],
    "typo_peft_method.yaml": ["peft.method", "'lorra'", "'lora'"],
    "unknown_nested_key.yaml": ["channel.pathloss.exponant", "unknown field", "exponent"],
    "unknown_server.yaml": ["around_server=3", "0..0"],
    "unknown_top_key.yaml": ["chanel", "unknown field", "channel"],
    "wrong_share_count.yaml": ["channel.uplink_shares", "2 weights", "4 devices"],
    "wrong_type_count.yaml": ["devices.0.count", "'four'", "valid integer"],
    "zero_dirichlet_alpha.yaml": ["data.dirichlet_alpha", "greater than or equal to 0.0001"],
    "zero_rounds.yaml": ["training.rounds", "greater than or equal to 1"],
}


def deftsim(*args):
    return subprocess.run([sys.executable, "-m", "deftsim", *args], capture_output=True, text=True, timeout=300)


def test_every_bad_file_has_an_expectation():
    assert sorted(p.name for p in BAD.glob("*.yaml")) == sorted(EXPECTED)
    assert len(EXPECTED) >= 20


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("command", ["validate", "run"])
def test_bad_file_exit_2_with_message(name, command, tmp_path):
    args = [command, str(BAD / name)] + (["--out", str(tmp_path / "out")] if command == "run" else [])
    res = deftsim(*args)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert name in res.stderr
    for fragment in EXPECTED[name]:
        assert fragment in res.stderr, (fragment, res.stderr)
    if command == "run":
        assert not (tmp_path / "out" / "summary.json").exists()


def test_missing_file_and_bad_overrides(tmp_path):
    res = deftsim("validate", str(tmp_path / "nope.yaml"))
    assert res.returncode == 2 and "does not exist" in res.stderr
    good = Path(__file__).parents[2] / "scenarios" / "network_only.yaml"
    for override, fragment in [("training.rounds=-3", "training.rounds"),
                               ("channel.no_such_field=1", "channel.no_such_field"),
                               ("training.rounds", "expected key.path=value"),
                               ("devices.9.count=3", "index '9'")]:
        res = deftsim("validate", str(good), "--set", override)
        assert res.returncode == 2, (override, res.stderr)
        assert fragment in res.stderr and "Traceback" not in res.stderr


def test_overrides_apply_and_schema_is_json():
    good = Path(__file__).parents[2] / "scenarios" / "network_only.yaml"
    res = deftsim("validate", str(good), "--set", "devices.0.count=10", "--set", "peft.method=prompt_tuning")
    assert res.returncode == 0, res.stderr
    assert "60 devices" in res.stdout and "prompt_tuning" in res.stdout
    schema = json.loads(deftsim("schema").stdout)
    assert "channel" in schema["properties"]
