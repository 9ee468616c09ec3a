"""Single-device output-first control (netsim.lola.single_device), the trade-off table
(deftsim.lola_device, analytic part) and the depth profile table/plot (analysis.depth)."""
import itertools
import subprocess
import sys

import numpy as np
import pytest

from netsim.lola.profile import analytic_profile
from netsim.lola.single_device import DeviceBudget, choose_allocation, top_blocks_cost

PROFILE = analytic_profile(6)  # one layer per block, block 0 = layer 5
RANKS = (2, 4, 8, 16)


def test_costs_grow_with_blocks_and_rank():
    costs = np.array([[list(top_blocks_cost(PROFILE, m, r, compute_flops_per_s=1e12).values()) for r in RANKS]
                      for m in range(1, 7)])
    assert np.all(np.diff(costs, axis=0) > 0) and np.all(np.diff(costs, axis=1) > 0)


def test_budget_respected_and_rule():
    budget = DeviceBudget(memory_bytes=1.25e8, latency_s=0.05, compute_flops_per_s=1e12, steps=5)
    c = choose_allocation(PROFILE, budget, RANKS)
    assert c.fits and c.memory_bytes <= budget.memory_bytes and c.latency_s <= budget.latency_s
    # output-first: the top m layers, all at the chosen rank
    assert c.layers == list(range(6 - c.num_blocks, 6)) and set(c.rank_per_layer.values()) == {c.rank}
    # maximal: one block more (smallest rank) or a larger rank does not fit
    if c.num_blocks < 6:
        more = top_blocks_cost(PROFILE, c.num_blocks + 1, min(RANKS), steps=5, compute_flops_per_s=1e12)
        assert more["memory_bytes"] > budget.memory_bytes or more["latency_s"] > budget.latency_s
    for r in RANKS:
        if r > c.rank:
            up = top_blocks_cost(PROFILE, c.num_blocks, r, steps=5, compute_flops_per_s=1e12)
            assert up["memory_bytes"] > budget.memory_bytes or up["latency_s"] > budget.latency_s


def test_nothing_fits():
    c = choose_allocation(PROFILE, DeviceBudget(memory_bytes=1e6, latency_s=1.0, compute_flops_per_s=1e12))
    assert not c.fits and c.num_blocks == 0 and c.rank_per_layer == {}


@pytest.mark.parametrize("uplink", [None, 1e6])
def test_monotone_in_budget(uplink):
    mems = np.linspace(0.9e8, 1.5e8, 13)
    lats = np.linspace(0.02, 0.08, 13)
    for f in (5e11, 2e12):
        chosen = {(m, l): choose_allocation(PROFILE, DeviceBudget(m, l, f, 5, uplink), RANKS)
                  for m, l in itertools.product(mems, lats)}
        for (m, l), c in chosen.items():
            if c.fits:
                assert c.memory_bytes <= m and c.latency_s <= l
            for m2, l2 in itertools.product(mems, lats):
                if m2 >= m and l2 >= l:
                    c2 = chosen[(m2, l2)]
                    assert (c2.num_blocks, c2.rank) >= (c.num_blocks, c.rank)


def test_tradeoff_table_analytic(tmp_path):
    from deftsim.lola_device import single_device_tradeoff
    from netsim.scenario import Scenario

    scenario = Scenario.model_validate({"name": "dev", "trainer": "fake"})
    budgets = [DeviceBudget(1.0e8, 0.04, 1e12, 5), DeviceBudget(1.2e8, 0.05, 1e12, 5), DeviceBudget(2e8, 1.0, 1e12, 5)]
    t = single_device_tradeoff(scenario, budgets, RANKS, out_dir=tmp_path)
    assert list(t["num_blocks"]) == sorted(t["num_blocks"]) and t["num_blocks"].iloc[-1] == 6
    assert (t["latency_ms"] <= t["latency_budget_ms"] + 1e-9).all() and (t["memory_MB"] <= t["memory_budget_MB"]).all()
    assert (tmp_path / "single_device_tradeoff.png").stat().st_size > 0
    assert (tmp_path / "single_device_tradeoff.csv").exists()


def test_depth_table_and_plot(tmp_path):
    from analysis.depth import plot_profile, profile_table

    prof = analytic_profile(3)
    t = profile_table(prof.to_dict())
    assert list(t["layers"]) == ["4-5", "2-3", "0-1"] and list(t["depth_layers"]) == [2, 4, 6]
    for col in ("backward_GFLOP", "step_GFLOP", "activation_MB", "memory_MB"):
        assert np.all(np.diff(t[col]) > 0), col
    assert t["step_GFLOP"].iloc[0] == pytest.approx(prof.step_flops()[0] / 1e9)
    png = plot_profile(prof, tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_single_device_is_torch_free():
    code = ("import sys; import netsim.lola.single_device, analysis.depth; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
