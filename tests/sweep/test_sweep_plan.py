"""Sweep files -> planned runs; bad sweep files fail before any run starts."""
import json
import re

import pytest

from deftsim.sweep import SweepError, check_field_path, plan_sweep


def test_grid_zip_random_and_seeds_multiply(write_sweep):
    path = write_sweep({
        "vary": {
            "grid": {"training.devices_per_round": [2, 3], "channel.uplink_bandwidth_hz": [5e6, 1e7, 2e7]},
            "zip": {"training.local_steps": [1, 2], "training.batch_size": [4, 8]},
            "random": {"samples": 3, "seed": 7, "params": {
                "training.learning_rate": {"log_uniform": [1e-4, 1e-2]},
                "fake.learning_speed": {"uniform": [0.05, 0.2]},
                "training.rounds": {"integers": [2, 5]},
                "channel.fading": {"choice": ["rayleigh", "none"]}}}},
        "seeds": [3, 5]})
    plan = plan_sweep(path)
    assert plan.num_points == 2 * 3 * 2 * 3
    assert len(plan.runs) == plan.num_points * 2
    assert plan.seeds == [3, 5]
    assert plan.params == ["training.devices_per_round", "channel.uplink_bandwidth_hz", "training.local_steps",
                           "training.batch_size", "training.learning_rate", "fake.learning_speed",
                           "training.rounds", "channel.fading"]
    # zip lists move together
    assert {(r.params["training.local_steps"], r.params["training.batch_size"]) for r in plan.runs} == {(1, 4), (2, 8)}
    for r in plan.runs:
        assert 1e-4 <= r.params["training.learning_rate"] <= 1e-2
        assert 2 <= r.params["training.rounds"] <= 5 and isinstance(r.params["training.rounds"], int)
        assert r.scenario["seed"] == r.seed
        assert r.scenario["training"]["rounds"] == r.params["training.rounds"]
        assert re.fullmatch(rf"p{r.point:04d}-s{r.seed}-[0-9a-f]{{8}}", r.run_id)
    assert len({r.run_id for r in plan.runs}) == len(plan.runs)
    # the random samples and the ids are reproducible
    again = plan_sweep(path)
    assert [r.run_id for r in again.runs] == [r.run_id for r in plan.runs]


def test_seed_forms_and_set(write_sweep):
    plan = plan_sweep(write_sweep({"set": {"training.rounds": 2}, "vary": {"grid": {"peft.rank": [4, 8]}}}))
    assert plan.seeds == [0]  # the scenario's own seed
    assert all(r.scenario["training"]["rounds"] == 2 for r in plan.runs)
    plan = plan_sweep(write_sweep({"seeds": 3}))  # no vary: one point
    assert plan.num_points == 1 and [r.seed for r in plan.runs] == [0, 1, 2]
    plan = plan_sweep(write_sweep({"seeds": 2}), overrides=["training.rounds=3"])
    assert all(r.scenario["training"]["rounds"] == 3 for r in plan.runs)


def test_field_paths():
    for ok in ["training.rounds", "devices.0.count", "devices.3.placement.max_distance_m", "peft.layers",
               "channel.pathloss.model", "stop.target_accuracy", "channel.uplink_shares"]:
        check_field_path(ok)
    for bad, fragment in [("training.roundz", "training has no field 'roundz'"), ("chanel.fading", "no field 'chanel'"),
                          ("training.rounds.x", "is a value"), ("devices.count", "expected an index"),
                          ("training..rounds", "not a field path")]:
        with pytest.raises(ValueError, match=re.escape(fragment)):
            check_field_path(bad)


def test_invalid_combination_is_planned_as_failed_run(write_sweep):
    # 8 devices per round is fine with 8 devices, not with 6: only that combination is invalid
    plan = plan_sweep(write_sweep({"vary": {"grid": {"devices.0.count": [6, 8],
                                                     "training.devices_per_round": [3, 8]}}}))
    invalid = [r for r in plan.runs if not r.valid]
    assert [(r.params["devices.0.count"], r.params["training.devices_per_round"]) for r in invalid] == [(6, 8)]
    assert "devices_per_round=8 exceeds the number of devices (6)" in invalid[0].error


BAD_SWEEPS = {
    "unknown field path": ({"vary": {"grid": {"training.roundz": [1, 2]}}},
                           ["vary", "'training.roundz'", "training has no field 'roundz'", "rounds"]),
    "unknown set path": ({"set": {"chanel.fading": "none"}}, ["set", "no field 'chanel'"]),
    "empty grid": ({"vary": {"grid": {}}}, ["vary.grid is empty"]),
    "empty list": ({"vary": {"grid": {"peft.rank": []}}}, ["vary.grid.peft.rank is an empty list"]),
    "grid value not a list": ({"vary": {"grid": {"peft.rank": 4}}}, ["vary.grid.peft.rank", "valid list"]),
    "wrong value type": ({"vary": {"grid": {"training.rounds": [2, "many"]}}},
                         ["training.rounds=\"many\"", "invalid in all", "valid integer"]),
    "out of range everywhere": ({"vary": {"grid": {"training.rounds": [0, 2]}}},
                                ["training.rounds=0", "greater than or equal to 1"]),
    "unequal zip": ({"vary": {"zip": {"peft.rank": [4, 8], "peft.alpha": [8]}}},
                    ["vary.zip", "equal lengths", "peft.rank: 2", "peft.alpha: 1"]),
    "field twice": ({"set": {"peft.rank": 4}, "vary": {"grid": {"peft.rank": [4, 8]}}},
                    ["'peft.rank'", "both set and vary.grid"]),
    "unknown top-level key": ({"vary": {"gird": {"peft.rank": [4]}}}, ["vary.gird", "unknown field", "grid"]),
    "seeds wrong type": ({"seeds": "two"}, ["seeds='two'", "a count"]),
    "seeds bool": ({"seeds": True}, ["seeds=True"]),
    "list index out of range": ({"vary": {"grid": {"devices.3.count": [1, 2]}}},
                                ["'devices.3.count'", "devices is a list of 1", "0..0"]),
    "seeds zero": ({"seeds": 0}, ["seeds=0"]),
    "unknown distribution": ({"vary": {"random": {"samples": 2, "params": {"peft.rank": {"gauss": [1, 2]}}}}},
                             ["vary.random.params.peft.rank", "uniform, log_uniform, integers, choice"]),
    "bad log_uniform": ({"vary": {"random": {"samples": 2, "params": {"training.learning_rate":
                                                                     {"log_uniform": [0, 1]}}}}},
                        ["log_uniform needs low > 0"]),
    "zero samples": ({"vary": {"random": {"samples": 0, "params": {"peft.rank": {"choice": [4]}}}}},
                     ["vary.random.samples"]),
    "seed varied as a field": ({"vary": {"grid": {"seed": [1, 2]}}}, ["top-level 'seeds'"]),
    "bad base scenario via set": ({"set": {"training.devices_per_round": 50}}, ["base scenario is invalid",
                                                                                 "devices_per_round=50"]),
}


@pytest.mark.parametrize("case", sorted(BAD_SWEEPS))
def test_bad_sweep_file_raises(case, write_sweep):
    sweep, fragments = BAD_SWEEPS[case]
    with pytest.raises(SweepError) as err:
        plan_sweep(write_sweep(sweep))
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_bad_sweep_files_from_cli_exit_2_before_running(write_sweep, tmp_path, deftsim):
    for case in ["unknown field path", "empty grid", "wrong value type"]:
        path = write_sweep(BAD_SWEEPS[case][0], name=f"bad_{len(case)}.yaml")
        res = deftsim("sweep", path, "--out", tmp_path / "out")
        assert res.returncode == 2, res.stderr
        assert "Traceback" not in res.stderr and str(path) in res.stderr
        assert not (tmp_path / "out").exists()  # nothing started
    res = deftsim("sweep", tmp_path / "missing.yaml", "--out", tmp_path / "out")
    assert res.returncode == 2 and "does not exist" in res.stderr
    (tmp_path / "bad.yaml").write_text("scenario: nope.yaml\n")
    res = deftsim("sweep", tmp_path / "bad.yaml", "--dry-run")
    assert res.returncode == 2 and "scenario 'nope.yaml' not found" in res.stderr


def test_dry_run_prints_plan(write_sweep, tmp_path, deftsim):
    path = write_sweep({"vary": {"grid": {"devices.0.count": [6, 8], "training.devices_per_round": [3, 8]}},
                        "seeds": 2})
    res = deftsim("sweep", path, "--dry-run")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[-1] == "runs: 8"
    assert "devices.0.count" in lines[1] and "training.devices_per_round" in lines[1]
    assert sum("invalid combination" in line for line in lines) == 2  # (6, 8) x 2 seeds
    assert not (tmp_path / "out").exists()


def test_a_sweep_can_hold_the_drop_and_vary_the_training_seed(write_sweep):
    """topology_seed fixed, training_seed varied: every run has the same network seed."""
    from deftsim.sweep import plan_sweep
    from netsim.scenario import Scenario

    plan = plan_sweep(write_sweep({"set": {"topology_seed": 11}, "vary": {"grid": {"training_seed": [0, 1, 2]}}}))
    scenarios = [Scenario.model_validate(r.scenario) for r in plan.runs]
    assert [s.network_seed() for s in scenarios] == [11, 11, 11]
    assert [s.train_seed() for s in scenarios] == [0, 1, 2]
