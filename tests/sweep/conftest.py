"""Helpers for sweep tests: tiny fake-trainer scenarios and sweep files written to tmp_path."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

TINY_SCENARIO = {
    "name": "tiny", "seed": 0, "trainer": "fake",
    "devices": [{"name": "phone", "count": 6, "placement": {"max_distance_m": 150}}],
    "channel": {"uplink_bandwidth_hz": 10.0e6},
    "d2d": {"kind": "none"},
    "training": {"rounds": 6, "local_steps": 3, "devices_per_round": 3},
    "fake": {"learning_speed": 0.1},
}


@pytest.fixture(scope="session")
def tiny_scenario():
    return dict(TINY_SCENARIO)


@pytest.fixture
def write_sweep(tmp_path):
    """write_sweep(sweep_dict, scenario=TINY_SCENARIO, name="sweep.yaml") -> path of the sweep file."""
    def write(sweep: dict, scenario: dict | None = None, name: str = "sweep.yaml") -> Path:
        (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(scenario or TINY_SCENARIO))
        path = tmp_path / name
        path.write_text(yaml.safe_dump({"scenario": "tiny.yaml", **sweep}, sort_keys=False))
        return path
    return write


def _deftsim(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "deftsim", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture
def deftsim():
    """deftsim(*args, env=None, timeout=300) -> CompletedProcess of ``python -m deftsim ...``."""
    return _deftsim
