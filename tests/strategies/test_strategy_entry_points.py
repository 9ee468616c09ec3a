"""Strategies from outside packages through the ``deftsim.strategies`` entry point.

The example package examples/channel_aware_selection is made discoverable without pip: a
``*.dist-info`` folder (METADATA + entry_points.txt, written from the example's own
pyproject.toml) on a temporary path added to sys.path, then the registry's entry-point cache
is invalidated."""
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from netsim.strategies import SelectionContext, StrategiesSpec, StrategyError, available, build, get, registry

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "channel_aware_selection"


def example_entry_points() -> dict[str, str]:
    """The ``[project.entry-points."deftsim.strategies"]`` table of the example's pyproject.toml."""
    text = (EXAMPLE / "pyproject.toml").read_text(encoding="utf-8")
    section = re.search(r'^\[project\.entry-points\."deftsim\.strategies"\]\n(.*?)(?=^\[|\Z)', text, re.M | re.S)
    assert section, "the example's pyproject.toml lacks the deftsim.strategies entry points"
    return dict(re.findall(r'^"([^"]+)"\s*=\s*"([^"]+)"', section.group(1), re.M))


def install_fake_distribution(root: Path, name: str, entry_points: dict[str, str]) -> None:
    info = root / f"{name}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n", encoding="utf-8")
    lines = ["[deftsim.strategies]"] + [f"{k} = {v}" for k, v in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    """A site folder on sys.path; the entry-point cache is dropped before and after."""
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.invalidate_entry_points()
    yield tmp_path
    monkeypatch.undo()
    sys.modules.pop("nearest_first", None)
    sys.modules.pop("deftsim_test_plugin", None)
    registry.invalidate_entry_points()


def test_example_package_is_discovered_and_runs_from_a_scenario(plugin_path, monkeypatch):
    eps = example_entry_points()
    assert eps == {"selection.nearest_first": "nearest_first:NearestFirst"}
    install_fake_distribution(plugin_path, "deftsim_nearest_first", eps)
    monkeypatch.syspath_prepend(str(EXAMPLE))
    registry.invalidate_entry_points()

    assert "nearest_first" in available("selection")
    cls = get("selection", "nearest_first")
    assert cls.__name__ == "NearestFirst" and cls.__module__ == "nearest_first"

    spec = StrategiesSpec.model_validate({"selection": {"name": "nearest_first", "params": {"pool_factor": 2.0}}})
    strategy = build(spec, "selection")
    n = 8
    flops = np.array([1, 9, 8, 7, 6, 5, 4, 3], dtype=float) * 1e12
    snr_db = np.array([50, 1, 2, 30, 20, 40, 10, 60], dtype=float)
    ctx = SelectionContext(round=1, now_s=0.0, rng=np.random.default_rng(0), mean_uplink_snr_db=snr_db,
                           compute_flops_per_s=flops, last_round=np.full(n, -1), last_loss=np.full(n, np.nan),
                           num_examples=np.ones(n))
    # pool: the 4 fastest (1, 2, 3, 4); of those the 2 best SNR: 3 (30 dB) and 4 (20 dB)
    assert strategy.select(range(n), 2, ctx) == [3, 4]
    with pytest.raises(ValidationError, match=r"pool_factor\n.*greater than or equal to 1"):
        StrategiesSpec.model_validate({"selection": {"name": "nearest_first", "params": {"pool_factor": 0.5}}})


def test_broken_entry_points_give_clear_errors(plugin_path):
    (plugin_path / "deftsim_test_plugin.py").write_text(
        "from netsim.strategies import SelectionStrategy\n\nNOT_A_CLASS = 3\n\n"
        "class NoParams:\n    def select(self, c, k, ctx):\n        return []\n\n"
        "class Selector(SelectionStrategy):\n    pass\n")
    install_fake_distribution(plugin_path, "deftsim_broken_plugin", {
        "selection.missing_module": "deftsim_no_such_module_4711:Thing",
        "selection.not_a_class": "deftsim_test_plugin:NOT_A_CLASS",
        "selection.no_params": "deftsim_test_plugin:NoParams",
        "compression.uniform_noise": "deftsim_test_plugin:Selector",
        "selection.uniform": "deftsim_test_plugin:NoParams",
        "nokind": "deftsim_test_plugin:NoParams",
    })
    registry.invalidate_entry_points()
    with pytest.raises(StrategyError) as info:
        get("selection", "missing_module")
    msg = str(info.value)
    assert "entry point 'selection.missing_module' = 'deftsim_no_such_module_4711:Thing'" in msg
    assert "distribution deftsim_broken_plugin" in msg and "ModuleNotFoundError" in msg
    with pytest.raises(StrategyError, match="'selection.not_a_class'.*is 3, not a class"):
        get("selection", "not_a_class")
    with pytest.raises(StrategyError, match="'selection.no_params'.*has no nested `Params` model"):
        get("selection", "no_params")
    with pytest.raises(StrategyError, match="'compression.uniform_noise'.*lacks the compression method"):
        get("compression", "uniform_noise")
    # a built-in name is never replaced; a malformed name is ignored, and both are reported
    assert get("selection", "uniform").__module__ == "netsim.strategies.selection"
    with pytest.raises(StrategyError) as info:
        get("selection", "nearest_last")
    msg = str(info.value)
    assert "ignored entry points:" in msg
    assert "'selection.uniform' = 'deftsim_test_plugin:NoParams' (distribution deftsim_broken_plugin): " \
           "selection strategy 'uniform' is built in" in msg
    assert "'nokind' = 'deftsim_test_plugin:NoParams'" in msg and "must be '<kind>.<name>'" in msg
    # the scenario section reports the broken entry point at the name field
    with pytest.raises(ValidationError) as info:
        StrategiesSpec.model_validate({"selection": {"name": "missing_module"}})
    err = info.value.errors()[0]
    assert err["loc"] == ("selection", "name") and "ModuleNotFoundError" in err["msg"]


def test_cache_is_dropped_by_invalidate(plugin_path):
    assert "late_plugin" not in available("bandwidth")
    (plugin_path / "deftsim_test_plugin.py").write_text(
        "import numpy as np\nfrom netsim.strategies import BandwidthStrategy\n\n"
        "class Late(BandwidthStrategy):\n    def shares(self, devices, ctx):\n"
        "        return np.full(len(devices), 1.0 / len(devices))\n")
    install_fake_distribution(plugin_path, "deftsim_late_plugin", {"bandwidth.late_plugin": "deftsim_test_plugin:Late"})
    assert "late_plugin" not in available("bandwidth")     # cached until invalidated
    registry.invalidate_entry_points()
    assert "late_plugin" in available("bandwidth")
    assert get("bandwidth", "late_plugin")().shares([0, 1], None).tolist() == [0.5, 0.5]


def test_scenario_accepts_the_example_strategy(plugin_path, monkeypatch):
    from netsim.scenario import Scenario

    if "strategies" not in Scenario.model_fields:
        pytest.skip("netsim.scenario.Scenario has no `strategies` section yet")
    install_fake_distribution(plugin_path, "deftsim_nearest_first", example_entry_points())
    monkeypatch.syspath_prepend(str(EXAMPLE))
    registry.invalidate_entry_points()
    sc = Scenario.model_validate({"name": "t", "trainer": "fake", "devices": [{"count": 6}],
                                  "strategies": {"selection": {"name": "nearest_first"}}})
    assert type(build(sc.strategies, "selection")).__name__ == "NearestFirst"
    with pytest.raises(ValidationError, match="unknown selection strategy 'nearest_last'"):
        Scenario.model_validate({"name": "t", "trainer": "fake", "strategies": {"selection": {"name": "nearest_last"}}})


def test_fedavg_runs_the_example_strategy_from_a_scenario(plugin_path, monkeypatch):
    """The outside strategy chooses the devices of a fake-trainer FedAvg run: each round, of the
    4 fast devices (pool = 2 x k), the 2 with the best mean uplink SNR."""
    from netsim import FakeTrainer, FedAvgSimulation
    from netsim.scenario import Scenario

    if "strategies" not in Scenario.model_fields:
        pytest.skip("netsim.scenario.Scenario has no `strategies` section yet")
    install_fake_distribution(plugin_path, "deftsim_nearest_first", example_entry_points())
    monkeypatch.syspath_prepend(str(EXAMPLE))
    registry.invalidate_entry_points()
    sc = Scenario.model_validate({
        "name": "t", "trainer": "fake",
        "devices": [{"name": "slow", "count": 4, "compute_flops_per_s": 1e11},
                    {"name": "fast", "count": 4, "compute_flops_per_s": 1e13}],
        "training": {"rounds": 3, "devices_per_round": 2},
        "strategies": {"selection": {"name": "nearest_first"}}})
    sim = FedAvgSimulation(sc, 0, FakeTrainer(sc, 0))
    sim.run()
    band = sc.channel.uplink_bandwidth_hz
    fast = [d for d in sim.network.devices if d.group.name == "fast"]
    best = sorted(d.name for d in sorted(fast, key=lambda d: -d.uplink.mean_snr_db(band))[:2])
    events = sim.recorder.to_frame()
    compute = events[events["kind"] == "compute"]
    assert sorted(compute["round"].unique()) == [1, 2, 3]
    for r, group in compute.groupby("round"):
        assert sorted(group["node"]) == best, r
