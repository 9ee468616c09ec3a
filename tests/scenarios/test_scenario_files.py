"""Every shipped scenario file validates; the fake-trainer ones also run (short)."""
from pathlib import Path

import pytest

from deftsim.checks import check_scenario_resources
from deftsim.config import load_scenario, read_scenario_dict
from deftsim.runner import run_scenario

SCENARIOS = sorted(p for p in (Path(__file__).resolve().parents[2] / "scenarios").glob("*.yaml")
                   if not p.name.startswith("sweep"))


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.name)
def test_scenario_file_validates(path):
    scenario = load_scenario(path)
    check_scenario_resources(scenario)
    assert scenario.name


@pytest.mark.parametrize("path", [p for p in SCENARIOS if read_scenario_dict(p).get("trainer") == "fake"],
                         ids=lambda p: p.name)
def test_fake_scenario_runs_short(path, tmp_path):
    scenario = load_scenario(path, ["training.rounds=2"])
    summary = run_scenario(scenario, tmp_path)
    import pandas as pd

    assert (tmp_path / "summary.json").exists() and summary
    assert len(pd.read_parquet(tmp_path / "events.parquet")) > 0


SWEEPS = sorted((Path(__file__).resolve().parents[2] / "scenarios").glob("sweep_*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_shipped_sweep_file_plans_only_valid_runs(path):
    from deftsim.sweep import plan_sweep

    plan = plan_sweep(path)
    assert plan.runs and all(run.valid for run in plan.runs), [run.error for run in plan.runs if not run.valid]
    assert len({run.run_id for run in plan.runs}) == len(plan.runs)
