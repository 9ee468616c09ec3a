"""Separate topology and training seeds, and the group / server columns of the event log (torch-free)."""
import numpy as np
import pandas as pd
import pytest

from netsim import COLUMNS, FakeTrainer, Network
from netsim.protocols import make_simulation
from netsim.protocols.lola import compare
from netsim.network import child_rng
from netsim.protocols.neural_aircomp import NeuralConnectionSimulation
from netsim.scenario import Scenario

DEVICE_KINDS = {"downlink", "compute", "uplink", "memory_exceeded", "not_scheduled"}


def scenario(uplink="ofdma", **over):
    base = {"name": "seeds", "trainer": "fake",
            "devices": [{"name": "phone", "count": 5},
                        {"name": "tablet", "count": 4, "compute_flops_per_s": 3e12,
                         "placement": {"around_server": 1}}],
            "edge_servers": [{"name": "north"}, {"name": "south", "position_m": [400.0, 0.0]}],
            "channel": {"uplink_access": uplink, "pathloss": {"shadowing_std_db": 4.0}},
            "training": {"rounds": 6, "devices_per_round": 4}, "fake": {"adapter_bytes": 40_000}}
    base.update(over)
    return Scenario.model_validate(base)


def run(sc, seed):
    sim = make_simulation(sc, seed, FakeTrainer(sc, seed))
    sim.run()
    return sim, sim.recorder.to_frame()


def selected(frame):
    comp = frame[frame["kind"] == "compute"]
    return [tuple(sorted(comp[comp["round"] == r]["node"])) for r in sorted(comp["round"].unique())]


def positions(sim):
    return [d.position_m for d in sim.network.devices]


@pytest.mark.parametrize("uplink", ["ofdma", "aircomp"])
def test_null_seeds_are_the_run_seed_bit_for_bit(uplink):
    """topology_seed = training_seed = null draws exactly what the run seed drew before the two
    seeds existed: the network of Network(scenario, seed), the selection stream child_rng(seed,
    0, 4), the fake trainer's stream; so the log equals the one with both seeds set to the run seed."""
    sc = scenario(uplink)
    sim, frame = run(sc, 7)
    assert sim.network_seed == 7 and sim.train_seed == 7
    ref_net = Network(sc, 7)
    assert positions(sim) == [d.position_m for d in ref_net.devices]
    assert [d.uplink.large_scale_gain for d in sim.network.devices] == [d.uplink.large_scale_gain for d in ref_net.devices]
    explicit = sc.model_copy(update={"topology_seed": 7, "training_seed": 7})
    _, frame2 = run(explicit, 7)
    pd.testing.assert_frame_equal(frame, frame2)
    # the selection is the old stream's: the first round's draw from child_rng(7, 0, 4)
    first = sorted(int(i) for i in child_rng(7, 0, 4).choice(9, size=4, replace=False))
    assert selected(frame)[0] == tuple(sorted(f"dev{i}" for i in first))


@pytest.mark.parametrize("uplink", ["ofdma", "aircomp"])
def test_fixed_topology_varying_training_seed(uplink):
    a_sim, a = run(scenario(uplink, topology_seed=3, training_seed=10), 0)
    b_sim, b = run(scenario(uplink, topology_seed=3, training_seed=11), 0)
    c_sim, c = run(scenario(uplink, topology_seed=3, training_seed=10), 99)   # run seed no longer matters
    assert positions(a_sim) == positions(b_sim) == positions(c_sim)
    assert [d.uplink.large_scale_gain for d in a_sim.network.devices] == \
           [d.uplink.large_scale_gain for d in b_sim.network.devices]
    assert selected(a) != selected(b)
    pd.testing.assert_frame_equal(a, c)


@pytest.mark.parametrize("uplink", ["ofdma", "aircomp"])
def test_fixed_training_seed_varying_topology(uplink):
    a_sim, a = run(scenario(uplink, topology_seed=3, training_seed=10), 0)
    b_sim, b = run(scenario(uplink, topology_seed=4, training_seed=10), 0)
    assert positions(a_sim) != positions(b_sim)
    assert selected(a) == selected(b)
    # the fake trainer's noise is training-side too: with exact (OFDMA) aggregation the same
    # losses in the same order; over the air the channel's distortion of the aggregate differs
    loss_a, loss_b = (f[f["kind"] == "compute"]["loss"].to_numpy() for f in (a, b))
    if uplink == "ofdma":
        np.testing.assert_array_equal(loss_a, loss_b)
    else:
        np.testing.assert_array_equal(loss_a[:4], loss_b[:4])   # round 1: before any aggregation
    # while the radio times differ
    assert not np.array_equal(a[a["kind"] == "downlink"]["duration_s"].to_numpy(),
                              b[b["kind"] == "downlink"]["duration_s"].to_numpy())


def lola_scenario(**over):
    base = {"trainer": "fake", "experiment": "lola_compare",
            "devices": [{"count": 5}, {"name": "wearable", "count": 4, "compute_flops_per_s": 2e11}],
            "channel": {"pathloss": {"shadowing_std_db": 4.0}}, "d2d": {"kind": "none"},
            "lola": {"rounds": 3, "num_blocks": 3, "algorithms": ["random", "crunch"]}}
    base.update(over)
    return Scenario.model_validate(base)


def test_lola_compare_follows_the_two_seeds():
    runs = {}
    for topo in (1, 2):
        for train in range(6):
            summary, events, net = compare(lola_scenario(topology_seed=topo, training_seed=train))
            runs[topo, train] = (summary, events, [d.position_m for d in net.devices])
    # topology fixed: same drop, same CRUNCH; the random baseline's matching follows the training seed
    assert all(runs[1, t][2] == runs[1, 0][2] for t in range(6))
    assert len({tuple(runs[1, t][0]["allocations"]["crunch"]["device_of_block"]) for t in range(6)}) == 1
    assert len({tuple(runs[1, t][0]["allocations"]["random"]["device_of_block"]) for t in range(6)}) > 1
    # training fixed: another drop, the same random draws
    assert runs[2, 0][2] != runs[1, 0][2]
    summary, events, _ = compare(lola_scenario(seed=4))
    summary2, events2, _ = compare(lola_scenario(seed=4, topology_seed=4, training_seed=4))
    pd.testing.assert_frame_equal(events, events2)


# ------------------------------------------------------------------ group / server columns
def check_columns(frame, names_to_group_server):
    assert list(frame.columns[: len(COLUMNS)]) == COLUMNS
    for col in ("group", "server"):
        assert str(frame[col].dtype) == "string"
        assert not frame[col].isna().any()
    mine = frame["node"].isin(list(names_to_group_server))
    assert mine.any()
    for _, row in frame[mine].iterrows():
        assert (row["group"], row["server"]) == names_to_group_server[row["node"]], row.to_dict()
    others = frame[~mine]
    assert (others["group"] == "").all() and (others["server"] == "").all()
    assert not others["kind"].isin(DEVICE_KINDS - {"compute"}).any()


def device_map(network):
    return {d.name: (d.group.name, network.servers[d.server].name) for d in network.devices}


@pytest.mark.parametrize("uplink", ["ofdma", "aircomp"])
def test_event_log_has_group_and_server_of_every_device_event(uplink, tmp_path):
    extra = {"aircomp": {"interior_radius_m": 120.0}} if uplink == "aircomp" else {}
    sim, frame = run(scenario(uplink, **extra), 0)
    check_columns(frame, device_map(sim.network))
    assert set(frame["server"]) == {"", "north", "south"} and set(frame["group"]) == {"", "phone", "tablet"}
    path = tmp_path / "events.parquet"
    frame.to_parquet(path)
    back = pd.read_parquet(path)
    assert back["group"].tolist() == frame["group"].tolist()
    assert back["server"].tolist() == frame["server"].tolist()


def test_memory_exceeded_events_carry_group_and_server():
    sc = scenario(devices=[{"name": "tiny", "count": 2, "memory_bytes": 1e6}, {"name": "big", "count": 2}],
                  edge_servers=[{"name": "e"}], training={"rounds": 2})
    sim, frame = run(sc, 0)
    mem = frame[frame["kind"] == "memory_exceeded"]
    assert len(mem) == 4 and set(mem["group"]) == {"tiny"} and set(mem["server"]) == {"e"}


def test_lola_events_have_group_and_server():
    sc = lola_scenario(lola={"rounds": 2, "num_blocks": 3, "algorithms": ["crunch", "offloading"]})
    _, events, net = compare(sc)
    dev = events[events["node"].str.startswith("dev")]
    assert len(dev) > 0
    for _, row in dev.iterrows():
        d = net.devices[int(row["node"][3:])]
        assert (row["group"], row["server"]) == (d.group.name, "edge0")
    assert (events[~events["node"].str.startswith("dev")]["group"] == "").all()


class SplitStub:
    """A deterministic stand-in for the split model (torch-free)."""

    num_devices = 3
    feature_values_per_device = 128
    device_forward_flops, device_backward_flops, edge_flops = 1e9, 1e6, 1e7

    def __init__(self):
        self.rng = np.random.default_rng(5)

    def train_step(self, connect):
        f = self.rng.standard_normal((3, 128))
        if connect is not None:
            connect(f, np.full(3, 1 / 3))
        return 1.0

    def evaluate(self, connect):
        return 0.5, 1.0


@pytest.mark.parametrize("uplink", ["aircomp", "digital"])
def test_neural_connection_events_and_seeds(uplink):
    sc = Scenario.model_validate({"trainer": "fake", "devices": [{"name": "cam", "count": 3}],
                                  "channel": {"pathloss": {"shadowing_std_db": 4.0}}})
    sim = NeuralConnectionSimulation(sc, 0, SplitStub(), uplink)
    sim.run(4, 2)
    frame = sim.recorder.to_frame()
    check_columns(frame, device_map(sim.network))
    # the per-device downlink lasts that device's own decode time; the broadcast the longest
    down = frame[frame["kind"] == "downlink"]
    bc = frame[frame["kind"] == "broadcast"]
    for r in bc["round"]:
        mine = down[down["round"] == r]["duration_s"]
        assert bc[bc["round"] == r]["duration_s"].iloc[0] == mine.max()
    assert down["duration_s"].nunique() > 1
    # network follows topology_seed
    other = NeuralConnectionSimulation(sc.model_copy(update={"topology_seed": 5}), 0, SplitStub(), uplink)
    same = NeuralConnectionSimulation(sc.model_copy(update={"topology_seed": 0, "training_seed": 9}), 0, SplitStub(), uplink)
    assert positions(other) != positions(sim) and positions(same) == positions(sim)
