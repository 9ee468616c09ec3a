"""Sidelink (D2D) traffic against theory: hop time = bits / rate over the blocks it spans,
store-and-forward multi-hop time, routing, Metropolis gossip, the source-ranking rule."""
import itertools
import math

import networkx as nx
import numpy as np
import pytest

from netsim.channel import BlockFading, Link
from netsim.network import Network
from netsim.scenario import ChannelSpec, Scenario
from netsim.sidelink import (
    expected_hop_s, gossip_error_bound, gossip_step, hop_duration_s, metropolis_weights, rank_sources, route,
    task_similarity, transfer,
)

B = 5e6  # D2D bandwidth [Hz]


def d2d_network(fading="none", count=6, k=2, seed=0):
    sc = Scenario.model_validate({"trainer": "fake", "devices": [{"count": count}],
                                  "channel": {"fading": fading, "rate_mode": "shannon"},
                                  "d2d": {"kind": "knn", "k": k, "bandwidth_hz": B}})
    return Network(sc, seed)


def noise_w(bandwidth_hz, psd_dbm_per_hz=-174.0, nf_db=7.0):
    return 10 ** ((psd_dbm_per_hz - 30) / 10) * 10 ** (nf_db / 10) * bandwidth_hz


# ------------------------------------------------------------------ one hop
def test_hop_without_fading_is_bits_over_shannon_rate_of_the_hand_computed_snr():
    net = d2d_network("none")
    a, b = sorted(net.d2d.edges)[0]
    (xa, ya), (xb, yb) = net.d2d.nodes[a]["pos_m"], net.d2d.nodes[b]["pos_m"]
    d = math.hypot(xa - xb, ya - yb)  # both antennas at 1.5 m: 3D distance = 2D distance
    assert net.d2d.edges[a, b]["distance_m"] == pytest.approx(d, rel=1e-12)
    # TR 38.901 UMi-Street Canyon NLOS (default), f_c = 3.5 GHz, h_UT = 1.5 m
    los = 32.4 + 21 * math.log10(d) + 20 * math.log10(3.5)
    nlos = 35.3 * math.log10(d) + 22.4 + 21.3 * math.log10(3.5)
    snr = 0.2 * 10 ** (-max(los, nlos) / 10) / noise_w(B)
    link = net.d2d.edges[a, b]["link"]
    assert link.snr(0, B) == pytest.approx(snr, rel=1e-9)
    assert net.d2d.edges[a, b]["mean_snr_db"] == pytest.approx(10 * math.log10(snr), rel=1e-9)
    size = 8e6
    want = size / (B * math.log2(1 + snr))
    assert hop_duration_s(net.d2d, a, b, size, 3.21, B) == pytest.approx(want, rel=1e-9)
    assert hop_duration_s(net.d2d, b, a, size, 0.0, B) == pytest.approx(want, rel=1e-9)
    # without fading the routing estimate is exact
    assert expected_hop_s(net.d2d, a, b, size, B) == pytest.approx(want, rel=1e-9)


def test_hop_over_rayleigh_fading_spans_blocks_at_each_blocks_rate():
    net = d2d_network("rayleigh")
    a, b = sorted(net.d2d.edges)[0]
    link = net.d2d.edges[a, b]["link"]
    tc = 0.01
    start = 0.0123  # inside block 1: 7.7 ms left in it
    r = [link.rate_bps(blk, B) for blk in (1, 2, 3, 4)]
    assert len(set(r)) == 4  # the blocks really differ
    # a payload that fills the rest of block 1, blocks 2 and 3, and 40 % of block 4
    size = r[0] * 0.0077 + r[1] * tc + r[2] * tc + r[3] * 0.4 * tc
    assert hop_duration_s(net.d2d, a, b, size, start, B) == pytest.approx(0.0077 + 2 * tc + 0.004, rel=1e-9)
    # fading changes the time: not what the mean SNR says
    assert hop_duration_s(net.d2d, a, b, size, start, B) != pytest.approx(
        expected_hop_s(net.d2d, a, b, size, B), rel=1e-3)


def test_each_direction_sends_at_its_senders_power_over_one_shared_fading():
    """Two groups (0.2 W and 0.05 W): on an edge between them each direction's SNR is its sender's
    power x the same gain |h_b|^2 (a reciprocal channel), so the rates differ by the power ratio
    inside log2(1 + SNR), and the radiated energy is the sender's power x the hop's time."""
    sc = Scenario.model_validate({"trainer": "fake", "devices": [{"name": "hi", "count": 3, "tx_power_w": 0.2},
                                                                 {"name": "lo", "count": 3, "tx_power_w": 0.05}],
                                  "channel": {"fading": "rayleigh", "rate_mode": "shannon"},
                                  "d2d": {"kind": "knn", "k": 2, "bandwidth_hz": B}})
    net = Network(sc, 3)
    a, b = next((i, j) for i, j in sorted(net.d2d.edges) if i < 3 <= j)   # a in 'hi', b in 'lo'
    up, back = net.d2d.edges[a, b]["link"], net.d2d.edges[a, b]["link_ba"]
    for block in range(5):
        assert back.snr(block, B) == pytest.approx(up.snr(block, B) * 0.05 / 0.2, rel=1e-12)
    size = 2e6
    t_ab, t_ba = hop_duration_s(net.d2d, a, b, size, 0.0, B), hop_duration_s(net.d2d, b, a, size, 0.0, B)
    assert t_ab == up.transfer_duration_s(size, 0.0, B) and t_ba == back.transfer_duration_s(size, 0.0, B)
    assert t_ba > t_ab
    assert transfer(net.d2d, [b, a], size, 0.0, B).tx_energy_j == pytest.approx(0.05 * t_ba, rel=1e-12)


def test_hop_between_non_neighbours_is_an_error_naming_both():
    net = d2d_network("none")
    a, b = next((u, v) for u, v in itertools.combinations(sorted(net.d2d.nodes), 2) if not net.d2d.has_edge(u, v))
    with pytest.raises(ValueError, match=rf"dev{a} and dev{b} are not D2D neighbours"):
        hop_duration_s(net.d2d, a, b, 1e3, 0.0, B)
    with pytest.raises(ValueError, match=r"99.*not a device"):
        hop_duration_s(net.d2d, a, 99, 1e3, 0.0, B)


# ------------------------------------------------------------------ multi-hop
def test_multi_hop_is_store_and_forward_each_hop_from_the_previous_end():
    net = d2d_network("rayleigh", count=8, k=2, seed=0)
    lengths = dict(nx.all_pairs_shortest_path_length(net.d2d))
    _, u, v = max((d, u, v) for u in lengths for v, d in lengths[u].items())
    path = nx.shortest_path(net.d2d, u, v)
    assert len(path) >= 4
    size, start = 2e6, 0.0042
    tr = transfer(net.d2d, path, size, start, B)
    t = start
    durations = []
    for (a, b), hop in zip(zip(path, path[1:]), tr.hops):
        link = net.d2d.edges[a, b]["link"]
        d = link.transfer_duration_s(size, t, B)
        assert hop == (a, b, t, d)
        durations.append(d)
        t += d
    assert len(tr.hops) == len(path) - 1 and tr.path == path
    assert tr.total_s == pytest.approx(sum(durations), rel=1e-12)
    assert tr.end_s == pytest.approx(start + sum(durations), rel=1e-12)
    assert tr.tx_energy_j == pytest.approx(0.2 * sum(durations), rel=1e-12)
    # the start times matter: hop 2 started at the transfer's start would take another time
    a, b = path[1], path[2]
    assert net.d2d.edges[a, b]["link"].transfer_duration_s(size, start, B) != pytest.approx(durations[1], rel=1e-6)


def test_one_device_path_takes_no_time_and_bad_paths_are_errors():
    net = d2d_network("none")
    tr = transfer(net.d2d, [2], 1e6, 5.0, B)
    assert (tr.hops, tr.total_s, tr.end_s) == ([], 0.0, 5.0)
    with pytest.raises(ValueError, match="path=\\[\\]"):
        transfer(net.d2d, [], 1e6, 0.0, B)
    a, b = next((u, v) for u, v in itertools.combinations(sorted(net.d2d.nodes), 2) if not net.d2d.has_edge(u, v))
    with pytest.raises(ValueError, match=rf"dev{a} and dev{b} are not D2D neighbours"):
        transfer(net.d2d, [a, b], 1e6, 0.0, B)
    with pytest.raises(ValueError, match="size_bits"):
        transfer(net.d2d, [a], -1.0, 0.0, B)


# ------------------------------------------------------------------ routing
def _link_with_snr(snr, bandwidth_hz=B, name="sidelink"):
    """A non-fading link whose SNR over bandwidth_hz is ``snr``: P g / (N0 NF B) with P = 1 W."""
    ch = ChannelSpec(fading="none")
    return Link(snr * noise_w(bandwidth_hz), 1.0, BlockFading("none", 0.01, np.random.default_rng(0)), ch, name=name)


def _graph(edges, order=None):
    g = nx.Graph()
    g.add_nodes_from(order if order is not None else sorted({u for e in edges for u in e[:2]}))
    for u, v, snr in edges:
        g.add_edge(u, v, link=_link_with_snr(snr, name=f"sidelink dev{u}-dev{v}"))
    return g


def test_fewest_hops_and_fastest_paths_are_the_hand_checked_ones():
    # 0-1-4: two hops at SNR 1 (rate B each); 0-2-3-4: three hops at SNR 15 (rate 4B each)
    edges = [(0, 1, 1.0), (1, 4, 1.0), (0, 2, 15.0), (2, 3, 15.0), (3, 4, 15.0)]
    g = _graph(edges)
    s = 1e6
    assert expected_hop_s(g, 0, 1, s, B) == pytest.approx(s / B, rel=1e-12)
    assert expected_hop_s(g, 2, 3, s, B) == pytest.approx(s / (4 * B), rel=1e-12)
    assert route(g, 0, 4, s, B, metric="hops") == [0, 1, 4]
    fast = route(g, 0, 4, s, B)
    assert fast == [0, 2, 3, 4]  # 3 s / (4 B) < 2 s / B
    assert transfer(g, fast, s, 0.0, B).total_s == pytest.approx(3 * s / (4 * B), rel=1e-12)
    assert route(g, 4, 0, s, B) == [4, 3, 2, 0]
    assert route(g, 3, 3, s, B) == [3]


def test_ties_do_not_depend_on_the_order_the_graph_was_built_in():
    edges = [(0, 1, 3.0), (1, 3, 3.0), (0, 2, 3.0), (2, 3, 3.0)]
    for order in itertools.permutations(range(4)):
        for es in (edges, edges[::-1]):
            g = _graph(es, order=list(order))
            assert route(g, 0, 3, 1e5, B) == [0, 1, 3]
            assert route(g, 0, 3, 1e5, B, metric="hops") == [0, 1, 3]
            assert route(g, 3, 0, 1e5, B) == [3, 1, 0]


def test_fastest_route_on_a_knn_graph_beats_every_simple_path():
    net = d2d_network("rayleigh", count=7, k=2, seed=5)
    g, s = net.d2d, 4e6
    comp = sorted(nx.node_connected_component(g, 0))
    assert len(comp) >= 4
    for dst in comp[1:]:
        best = min(sum(expected_hop_s(g, a, b, s, B) for a, b in zip(p, p[1:])) for p in nx.all_simple_paths(g, 0, dst))
        got = route(g, 0, dst, s, B)
        assert got[0] == 0 and got[-1] == dst
        assert sum(expected_hop_s(g, a, b, s, B) for a, b in zip(got, got[1:])) == pytest.approx(best, rel=1e-12)
        assert len(route(g, 0, dst, s, B, metric="hops")) - 1 == nx.shortest_path_length(g, 0, dst)


def test_a_hop_limit_keeps_the_fastest_path_of_at_most_that_many_hops():
    edges = [(0, 1, 1.0), (1, 4, 1.0), (0, 2, 15.0), (2, 3, 15.0), (3, 4, 15.0)]
    g = _graph(edges)
    assert route(g, 0, 4, 1e6, B, max_hops=3) == [0, 2, 3, 4]
    assert route(g, 0, 4, 1e6, B, max_hops=2) == [0, 1, 4]     # the 3-hop path is faster, but too long
    with pytest.raises(ValueError, match=r"2 hops apart, more than max_hops=1"):
        route(g, 0, 4, 1e6, B, max_hops=1)
    with pytest.raises(ValueError, match=r"max_hops=0"):
        route(g, 0, 4, 1e6, B, max_hops=0)


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_hop_limited_route_beats_every_simple_path_within_the_limit(limit):
    net = d2d_network("rayleigh", count=8, k=2, seed=3)
    g, s = net.d2d, 4e6
    for dst in sorted(nx.node_connected_component(g, 0))[1:]:
        paths = list(nx.all_simple_paths(g, 0, dst, cutoff=limit))
        if not paths:
            continue
        best = min(sum(expected_hop_s(g, a, b, s, B) for a, b in zip(p, p[1:])) for p in paths)
        got = route(g, 0, dst, s, B, max_hops=limit)
        assert len(got) - 1 <= limit
        assert sum(expected_hop_s(g, a, b, s, B) for a, b in zip(got, got[1:])) == pytest.approx(best, rel=1e-12)


def test_no_path_is_an_error_naming_both_devices():
    g = _graph([(0, 1, 1.0), (2, 3, 1.0)])
    with pytest.raises(ValueError, match=r"no D2D path from dev0 to dev3.*2 components"):
        route(g, 0, 3, 1e6, B)
    dead = _graph([(0, 1, 1.0), (1, 2, 0.0)])
    with pytest.raises(ValueError, match=r"no D2D path from dev0 to dev2.*expected rate is 0"):
        route(dead, 0, 2, 1e6, B, metric="hops")
    with pytest.raises(ValueError, match=r"metric='fastest'.*expected_time"):
        route(g, 0, 1, 1e6, B, metric="fastest")


# ------------------------------------------------------------------ gossip
def _random_graph(seed, n=12, p=0.3):
    return nx.gnp_random_graph(n, p, seed=seed)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metropolis_weights_are_symmetric_and_doubly_stochastic(seed):
    g = _random_graph(seed)
    w = metropolis_weights(g)
    assert np.array_equal(w, w.T)
    assert np.abs(w.sum(axis=0) - 1).max() < 1e-12 and np.abs(w.sum(axis=1) - 1).max() < 1e-12
    for i, j in itertools.product(range(12), repeat=2):
        if i != j:
            want = 1 / (1 + max(g.degree(i), g.degree(j))) if g.has_edge(i, j) else 0.0
            assert w[i, j] == want
    assert (np.diag(w) > 0).all()


def test_gossip_on_a_cycle_contracts_at_the_theoretical_rate():
    # C_6 with Metropolis weights: W = (I + A)/3, eigenvalues 1/3 + (2/3) cos(2 pi k / 6): lambda = 2/3
    g = nx.cycle_graph(6)
    w = metropolis_weights(g)
    assert gossip_error_bound(w) == pytest.approx(2 / 3, abs=1e-12)
    assert gossip_error_bound(w, steps=4) == pytest.approx((2 / 3) ** 4, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_gossip_keeps_the_average_and_shrinks_the_error_within_lambda_to_the_t(seed):
    g = _random_graph(seed, p=0.35)
    assert nx.is_connected(g)
    w = metropolis_weights(g)
    lam = gossip_error_bound(w)
    assert 0 < lam < 1
    x = np.random.default_rng(seed).normal(3.0, 2.0, size=(12, 5))
    mean = x.mean(axis=0)
    e0 = np.linalg.norm(x - mean)
    for t in range(1, 31):
        x = gossip_step(x, w)
        assert np.abs(x.mean(axis=0) - mean).max() <= 1e-12 * np.abs(mean).max()
        assert np.linalg.norm(x - mean) <= lam**t * e0 + 1e-12
    assert np.linalg.norm(x - mean) < 0.1 * e0


def test_an_isolated_device_keeps_its_value():
    g = nx.path_graph(4)
    g.add_node(4)
    w = metropolis_weights(g)
    assert w[4].tolist() == [0, 0, 0, 0, 1]
    x = np.arange(5.0)
    for _ in range(10):
        x = gossip_step(x, w)
    assert x[4] == 4.0
    assert x[:4] == pytest.approx(np.full(4, 1.5), abs=0.2)  # the rest mixes towards its own mean
    assert gossip_error_bound(w) == pytest.approx(1.0, abs=1e-12)  # disconnected: no contraction
    with pytest.raises(ValueError, match=r"values has shape \(4,\).*N = 5"):
        gossip_step(np.zeros(4), w)


# ------------------------------------------------------------------ choosing a source
def test_task_similarity_of_parallel_orthogonal_and_opposite_vectors():
    assert task_similarity([1.0, 2.0, -1.0], [3.0, 6.0, -3.0]) == pytest.approx(1.0, abs=1e-15)
    assert task_similarity([1.0, 0.0, 2.0], [0.0, 5.0, 0.0]) == 0.0
    assert task_similarity([1.0, 1.0], [-2.0, -2.0]) == pytest.approx(-1.0, abs=1e-15)
    assert task_similarity([1.0, 0.0], [1.0, 1.0]) == pytest.approx(1 / math.sqrt(2), rel=1e-15)
    with pytest.raises(ValueError, match="zero vector"):
        task_similarity([0.0, 0.0], [1.0, 2.0])
    with pytest.raises(ValueError, match=r"shapes \(2,\) and \(3,\)"):
        task_similarity([1.0, 0.0], [1.0, 0.0, 0.0])


def test_rank_sources_trades_similarity_against_fetch_time():
    own = np.array([1.0, 0.0])
    cands = {7: (np.array([2.0, 0.0]), 10.0),   # similarity 1, slow: 1 - 0.05 * 10 = 0.5
             3: (np.array([1.0, 1.0]), 1.0),    # 1/sqrt(2) - 0.05 = 0.657
             5: (np.array([0.0, 4.0]), 0.0)}    # 0
    ranked = rank_sources(own, cands, cost_weight_per_s=0.05)
    assert [n for n, _ in ranked] == [3, 7, 5]
    assert [s for _, s in ranked] == pytest.approx([1 / math.sqrt(2) - 0.05, 0.5, 0.0], abs=1e-15)
    # with free fetches the most similar wins
    assert [n for n, _ in rank_sources(own, cands, 0.0)] == [7, 3, 5]


def test_rank_sources_breaks_ties_by_device_index():
    own = [1.0, 1.0]
    cands = {9: ([1.0, 0.0], 2.0), 4: ([0.0, 1.0], 2.0), 6: ([1.0, 1.0], 40.0)}
    ranked = rank_sources(own, cands, 0.01)  # 9 and 4: 1/sqrt(2) - 0.02 = 0.687 each; 6: 1 - 0.4
    assert [n for n, _ in ranked] == [4, 9, 6]
    with pytest.raises(ValueError, match=r"dev4.*fetch_time_s=-1"):
        rank_sources(own, {4: ([1.0, 0.0], -1.0)}, 0.01)
    with pytest.raises(ValueError, match="cost_weight_per_s"):
        rank_sources(own, cands, -0.1)
