"""End to end on the real model: the README's quickstart, determinism across processes."""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"


def deftsim_run(out, *extra):
    res = subprocess.run([sys.executable, "-m", "deftsim", "run", str(QUICKSTART), "--out", str(out), *extra],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    res = deftsim_run(out)
    return out, res


@pytest.mark.slow
def test_quickstart_trains_above_chance_and_round0(quickstart_run):
    out, res = quickstart_run
    for name in ("events.parquet", "summary.json", "scenario.json", "topology.json", "accuracy_vs_time.png"):
        assert (out / name).is_file(), name
    s = json.loads((out / "summary.json").read_text())
    assert s["final_accuracy"] > s["chance_accuracy"] + 0.3
    assert s["final_accuracy"] > s["initial_accuracy"] + 0.3
    assert s["trained_above_initial_and_chance"] is True
    assert "trained above round 0 and chance" in res.stdout
    # energy per device in the summary is the sum of that device's events' energy
    ev = pd.read_parquet(out / "events.parquet")
    for dev, joules in s["energy_per_device_j"].items():
        assert joules == pytest.approx(ev.loc[ev["node"] == dev, "energy_j"].sum())
    assert 0 < s["compute_share"] < 1 and s["compute_share"] + s["communication_share"] == pytest.approx(1)
    resolved = json.loads((out / "scenario.json").read_text())
    assert resolved["seed"] == 0 and resolved["versions"]["torch"]
    assert resolved["scenario"]["channel"]["noise_figure_db"] == 7  # defaults filled in
    assert (out / "accuracy_vs_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_same_seed_identical_different_seed_differs(quickstart_run, tmp_path):
    full, _ = quickstart_run
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    short = ["--set", "training.rounds=2", "--quiet"]
    deftsim_run(a, *short)
    deftsim_run(b, *short)
    deftsim_run(c, *short, "--seed", "1")
    assert (a / "events.parquet").read_bytes() == (b / "events.parquet").read_bytes()
    assert (a / "summary.json").read_bytes() == (b / "summary.json").read_bytes()
    ev_a, ev_c = pd.read_parquet(a / "events.parquet"), pd.read_parquet(c / "events.parquet")
    assert not ev_a.equals(ev_c)
    assert (a / "summary.json").read_bytes() != (c / "summary.json").read_bytes()
    # the first two rounds of the full run are exactly the 2-round run
    ev_full = pd.read_parquet(full / "events.parquet")
    pd.testing.assert_frame_equal(ev_full[ev_full["round"] <= 2].reset_index(drop=True), ev_a)
