"""Small results folders made with the torch-free fake trainer (seconds), for the report tests."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TINY = {
    "name": "tiny", "seed": 0, "trainer": "fake",
    "devices": [{"name": "phone", "count": 12, "placement": {"max_distance_m": 150}}],
    "channel": {"uplink_bandwidth_hz": 10.0e6},
    "d2d": {"kind": "none"},
    "training": {"rounds": 4, "local_steps": 2, "devices_per_round": 3},
    "fake": {"learning_speed": 0.1},
}


def deftsim(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "deftsim", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="session")
def cli():
    return deftsim


@pytest.fixture(scope="session")
def results(tmp_path_factory):
    """Folders made once per session: ``run`` (FedAvg), ``lola`` (lola_compare, fake trainer),
    ``cmp`` (aircomp_vs_ofdma, fake trainer, K = 2, 4) and ``sweep`` (FedAvg, 2 points x 2 seeds)."""
    root = tmp_path_factory.mktemp("results")
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    out = {}
    res = deftsim("run", root / "tiny.yaml", "--out", root / "run", "--quiet")
    assert res.returncode == 0, res.stderr
    out["run"] = root / "run"
    res = deftsim("run", ROOT / "scenarios" / "lola_compare.yaml", "--out", root / "lola", "--quiet",
                  "--set", "trainer=fake", "--set", "lola.rounds=4", "--set", "lola.train_rounds=0")
    assert res.returncode == 0, res.stderr
    out["lola"] = root / "lola"
    res = deftsim("run", ROOT / "scenarios" / "aircomp_vs_ofdma.yaml", "--out", root / "cmp", "--quiet",
                  "--set", "trainer=fake", "--set", "training.rounds=3", "--set", "aircomp.device_counts=[2,4]",
                  "--set", "devices.0.count=8")
    assert res.returncode == 0, res.stderr
    out["cmp"] = root / "cmp"
    (root / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "two_by_two", "scenario": "tiny.yaml", "seeds": 2,
        "vary": {"grid": {"devices.0.tx_power_w": [0.1, 0.4]}}}))
    res = deftsim("sweep", root / "sweep.yaml", "--out", root / "sweep", "--workers", 2, "--quiet")
    assert res.returncode == 0, res.stderr
    out["sweep"] = root / "sweep"
    return out


@pytest.fixture
def copy_of(tmp_path):
    """copy_of(folder) -> a fresh copy of a results folder under tmp_path (to corrupt)."""
    def copy(folder: Path) -> Path:
        dest = tmp_path / folder.name
        shutil.copytree(folder, dest)
        return dest
    return copy
