"""Bad settings of the protocols, strategies and network dynamics: exit code 2 and a message that
names the field and the value, never a traceback (``deftsim validate`` and ``deftsim run``).

``deftsim validate`` also reads an availability trace and, for the fake trainer, checks a round
deadline against the fastest possible local job; with the real trainer that check needs the
model's cost profile and happens when ``deftsim run`` builds the simulation."""
import subprocess
import sys

import pytest
import yaml

SCENARIO = {
    "name": "bad_dynamics",
    "seed": 0,
    "trainer": "fake",
    "devices": [{"name": "phone", "count": 8, "compute_flops_per_s": 1.0e12}],
    "training": {"rounds": 2, "local_steps": 2, "devices_per_round": 4},
    "fake": {"step_flops": 1.0e9, "adapter_bytes": 10_000},
}

# name -> (--set assignments, fragments the message must contain, also caught by validate)
CASES = {
    "deadline_shorter_than_any_round": (
        ["training.deadline_s=1e-9"],
        ["training.deadline_s=1e-09", "shorter than any possible round", "allowed"], True),
    "availability_zero": (
        ["dynamics.availability.model=bernoulli", "dynamics.availability.p_available=0"],
        ["dynamics.availability", "p_available=0", "availability 0", "0 < p_available <= 1"], True),
    "async_without_fedbuff": (
        ["training.mode=asynchronous"],
        ["training.mode=asynchronous", "strategies.aggregation.name", "'fedbuff'", "'fedavg'"], True),
    "async_with_bernoulli_availability": (
        ["training.mode=asynchronous", "strategies.aggregation.name=fedbuff", "dynamics.availability.model=bernoulli",
         "dynamics.availability.p_available=0.5"],
        ["dynamics.availability.model=bernoulli", "per synchronous round"], True),
    "semi_sync_without_period": (
        ["training.mode=semi_synchronous", "strategies.aggregation.name=fedbuff"],
        ["training.mode=semi_synchronous", "async_fl.period_s"], True),
    "unknown_strategy": (
        ["strategies.selection.name=fastest_first"],
        ["strategies.selection.name", "'fastest_first'", "uniform", "channel_aware"], True),
    "bad_strategy_param": (
        ["training.mode=asynchronous", "strategies.aggregation.name=fedbuff",
         "strategies.aggregation.params.buffer_size=0"],
        ["strategies.aggregation.params.buffer_size", "0", "greater than or equal to 1"], True),
    "unknown_strategy_param": (
        ["strategies.selection.name=power_of_choice", "strategies.selection.params.dd=3"],
        ["strategies.selection.params", "dd"], True),
    "v_min_above_v_max": (
        ["dynamics.mobility.model=random_waypoint", "dynamics.mobility.v_min_mps=3",
         "dynamics.mobility.v_max_mps=1"],
        ["dynamics.mobility", "v_min_mps=3.0", "v_max_mps=1.0"], True),
}


def deftsim(*args):
    return subprocess.run([sys.executable, "-m", "deftsim", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture
def scenario_file(tmp_path):
    path = tmp_path / "bad_dynamics.yaml"
    path.write_text(yaml.safe_dump(SCENARIO))
    return path


def check_exit_2(res, fragments):
    text = res.stderr + res.stdout
    assert res.returncode == 2, text
    assert "Traceback" not in text
    for fragment in fragments:
        assert fragment in res.stderr, (fragment, res.stderr)


def test_base_scenario_is_valid_and_runs(scenario_file, tmp_path):
    """The cases below fail because of their one bad setting, not because of the base file."""
    res = deftsim("run", str(scenario_file), "--out", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out" / "summary.json").is_file()


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_setting_run_exits_2(name, scenario_file, tmp_path):
    sets, fragments, _ = CASES[name]
    args = ["run", str(scenario_file), "--out", str(tmp_path / "out")]
    for s in sets:
        args += ["--set", s]
    check_exit_2(deftsim(*args), fragments)
    assert not (tmp_path / "out" / "summary.json").exists()


@pytest.mark.parametrize("name", sorted(n for n, case in CASES.items() if case[2]))
def test_bad_setting_validate_exits_2(name, scenario_file):
    sets, fragments, _ = CASES[name]
    args = ["validate", str(scenario_file)]
    for s in sets:
        args += ["--set", s]
    check_exit_2(deftsim(*args), fragments)


@pytest.mark.parametrize("device, shown", [("dev99", "'dev99'"), ("8", "'8'")])
def test_trace_naming_unknown_device_exits_2(device, shown, scenario_file, tmp_path):
    """A trace row for a device the scenario does not have (8 devices: indices 0..7, dev0..dev7)."""
    trace = tmp_path / "availability.csv"
    trace.write_text(f"device,t_on_s,t_off_s\n0,0,100\n{device},0,50\n")
    for command in (["run", str(scenario_file), "--out", str(tmp_path / "out")], ["validate", str(scenario_file)]):
        res = deftsim(*command, "--set", "dynamics.availability.model=trace",
                      "--set", f"dynamics.availability.trace_path={trace}")
        check_exit_2(res, [str(trace), "row 3", shown, "0..7"])
