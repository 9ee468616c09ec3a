"""Depth cost profiles (analytic, measured) and the lola_compare experiment."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from pydantic import ValidationError

from netsim.lola.profile import analytic_profile, split_layers
from netsim.protocols.lola import build_instance, compare
from netsim.network import Network
from netsim.scenario import Scenario

NAMES = ["crunch", "jbba", "random", "greedy", "depth_unaware", "equal_bandwidth", "offloading"]


def lola_scenario(**lola):
    return Scenario.model_validate({
        "name": "lola_t", "trainer": "fake", "experiment": "lola_compare", "d2d": {"kind": "none"},
        "devices": [{"name": "fast", "count": 2, "compute_flops_per_s": 3e12},
                    {"name": "slow", "count": 3, "compute_flops_per_s": 5e11},
                    {"name": "tiny", "count": 2, "compute_flops_per_s": 2e11, "memory_bytes": 1.1e8}],
        "channel": {"uplink_bandwidth_hz": 5e6},
        "lola": {"num_blocks": 3, "rounds": 5, "jbba_iterations": 10, **lola}})


def assert_monotone(profile):
    assert np.all(np.diff(profile.backward_flops) > 0)
    assert np.all(np.diff(profile.activation_bytes) > 0)
    assert np.all(np.diff(profile.memory_bytes()) > 0)
    assert np.all(np.asarray(profile.trainable_bytes) > 0)


def test_split_layers_top_first():
    assert split_layers(6, 3) == [[4, 5], [2, 3], [0, 1]]
    assert split_layers(5, 2) == [[2, 3, 4], [0, 1]]
    with pytest.raises(ValueError):
        split_layers(2, 3)


def test_analytic_profile_grows_with_depth():
    for n in (2, 3, 6):
        assert_monotone(analytic_profile(n))


def test_measured_profile_grows_with_depth():
    pytest.importorskip("torch")
    from fomo.depth_profile import measure_depth_profile

    sc = Scenario.model_validate({"peft": {"rank": 4}})
    prof = measure_depth_profile(sc.model, sc.peft, 3, batch_size=2, seq_len=8)
    assert prof.source == "measured" and prof.layers == [[4, 5], [2, 3], [0, 1]]
    assert_monotone(prof)
    assert prof.forward_flops > 0
    # cached: same object for the same model and shape
    assert measure_depth_profile(sc.model, sc.peft, 3, batch_size=2, seq_len=8) is prof
    # deeper blocks backprop through more layers: equal-size blocks add the same FLOPs per step
    steps = np.diff(prof.backward_flops)
    assert steps[1] == pytest.approx(steps[0], rel=0.05)


def test_scenario_validation():
    with pytest.raises(ValidationError, match="num_blocks"):
        lola_scenario(num_blocks=9)
    with pytest.raises(ValidationError):
        lola_scenario(algorithms=["crunch", "nope"])
    with pytest.raises(ValidationError):
        lola_scenario(bandwidth=1.0)  # extra=forbid


def test_compare_runs_every_algorithm_on_the_same_network():
    sc = lola_scenario()
    summary, events, network = compare(sc)
    lat = summary["mean_round_latency_s"]
    assert list(lat) == NAMES
    assert all(v > 0 for v in lat.values())
    assert set(events["algorithm"].unique()) == set(NAMES)
    assert (events[events.kind == "round_end"].groupby("algorithm").size() == 5).all()
    # the optimal planners are not beaten (in plan) by the fixed-bandwidth baselines
    plan = {k: v["planned_latency_s"] for k, v in summary["allocations"].items() if "planned_latency_s" in v}
    assert plan["jbba"] <= plan["crunch"] * (1 + 1e-9)
    for base in ("random", "greedy", "depth_unaware", "equal_bandwidth"):
        assert plan["crunch"] <= plan[base] * (1 + 1e-9)
    # tiny devices (1.1e8 bytes) cannot hold the deepest block of the analytic profile
    inst = build_instance(sc, Network(sc, sc.seed), analytic_profile(3))
    assert not inst.memory_ok[5:, 2].any()
    # deterministic
    summary2, _, _ = compare(sc)
    assert summary2["mean_round_latency_s"] == lat


def test_deftsim_run_writes_the_contract(tmp_path):
    out = tmp_path / "run"
    sc = tmp_path / "lola.yaml"
    sc.write_text(textwrap.dedent("""
        name: lola_cli
        experiment: lola_compare
        trainer: fake
        devices: [{count: 4}, {count: 2, compute_flops_per_s: 3.0e12}]
        d2d: {kind: none}
        lola: {num_blocks: 3, rounds: 3, jbba_iterations: 5}
    """))
    res = subprocess.run([sys.executable, "-m", "deftsim", "run", str(sc), "--out", str(out), "--quiet"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["mean_round_latency_s"]) == set(NAMES)
    assert (out / "lola_latency.png").is_file() and (out / "events.parquet").is_file()


def test_lola_is_torch_free():
    code = textwrap.dedent("""
        import sys
        for name in ("torch", "transformers", "peft", "fomo"):
            sys.modules[name] = None
        from netsim.scenario import Scenario
        from netsim.protocols.lola import compare
        sc = Scenario.model_validate({"trainer": "fake", "experiment": "lola_compare", "devices": [{"count": 4}],
                                      "lola": {"num_blocks": 2, "rounds": 2, "jbba_iterations": 3}})
        s, _, _ = compare(sc)
        assert len(s["mean_round_latency_s"]) == 7
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
