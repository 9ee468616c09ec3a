"""Cooperative (LoLa) fine-tuning vs computation offloading: the claims of docs/lola.md,
"Cooperative fine-tuning vs offloading", checked on the shipped scenarios (torch-free, fast).

- scenarios/lola_compare.yaml (the default): offloading is about 8x faster than crunch;
- scenarios/lola_coop_wins.yaml: crunch and jbba are faster than offloading;
- the latency formulas the doc states (without fading they are exact);
- the crossover points the doc's table reports along edge speed and raw-sample size.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from deftsim.config import load_scenario
from netsim.protocols.lola import compare, default_profile

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"
LATENCY_ONLY = ["trainer=fake", "lola.train_rounds=0"]


def mean_latency_s(path: Path, overrides=(), algorithms=("crunch", "jbba", "offloading")) -> dict[str, float]:
    alg = "[" + ",".join(algorithms) + "]"
    scenario = load_scenario(path, [*LATENCY_ONLY, f"lola.algorithms={alg}", *overrides])
    summary, _, _ = compare(scenario)
    return summary["mean_round_latency_s"]


def test_default_lola_scenario_offloading_is_about_8x_faster():
    lat = mean_latency_s(SCENARIOS / "lola_compare.yaml")
    ratio = lat["crunch"] / lat["offloading"]
    assert lat["offloading"] < lat["jbba"] and 7.0 < ratio < 10.0, lat


def test_coop_wins_scenario_cooperative_beats_offloading():
    lat = mean_latency_s(SCENARIOS / "lola_coop_wins.yaml")
    assert lat["crunch"] < lat["offloading"] / 2 and lat["jbba"] < lat["offloading"] / 1.5, lat


def _rate_bps(snr_hz: float, bandwidth_hz: float) -> float:
    """R = b log2(1 + gamma / b) [bit/s] with gamma the mean SNR over 1 Hz."""
    return bandwidth_hz * math.log2(1.0 + snr_hz / bandwidth_hz)


@pytest.mark.parametrize("overrides", [
    ["edge_servers.0.compute_flops_per_s=1.0e12", "lola.offload_bytes_per_sample=2048"],
    ["edge_servers.0.compute_flops_per_s=1.0e13", "lola.num_blocks=6"],
])
def test_latency_formulas_hold_exactly_without_fading(overrides):
    """Without fading every round is the same, and the simulated round latencies equal

    cooperative: T = max_n [steps F_n / f_k(n) + S_n / R_k(n)(b_k(n))]
    offloading:  u_k = 8 steps batch s / R_k(B/N) for the N devices of best mean SNR,
                 FIFO at the edge: c_1 = u_(1) + e, c_i = max(c_(i-1), u_(i)) + e, T = c_N,
                 e = steps F_(N-1) / f_edge (full-depth step)."""
    from netsim.network import Network
    from netsim.protocols.lola import snr_hz

    scenario = load_scenario(SCENARIOS / "lola_compare.yaml",
                             [*LATENCY_ONLY, "channel.fading=none", "lola.rounds=3",
                              "lola.algorithms=[crunch,jbba,offloading]", *overrides])
    summary, _, _ = compare(scenario)
    lola = scenario.lola
    network = Network(scenario, scenario.seed)
    profile = default_profile(scenario)
    flops = profile.step_flops() * lola.steps_per_round
    index = {d.name: k for k, d in enumerate(network.devices)}
    gamma = np.array([snr_hz(d.uplink) for d in network.devices])

    for alg in ("crunch", "jbba"):
        info = summary["allocations"][alg]
        times = []
        for n, name in enumerate(info["device_of_block"]):
            dev = network.devices[index[name]]
            rate = _rate_bps(gamma[index[name]], info["bandwidth_hz"][name])
            times.append(flops[n] / dev.group.compute_flops_per_s + 8.0 * profile.trainable_bytes[n] / rate)
        assert summary["mean_round_latency_s"][alg] == pytest.approx(max(times), rel=1e-9)

    n_blk = lola.num_blocks
    per_sample = lola.offload_bytes_per_sample or 4 * scenario.model.max_length_tokens
    bits = 8.0 * lola.steps_per_round * scenario.training.batch_size * per_sample
    chosen = np.argsort(-gamma, kind="stable")[:n_blk]
    uploads = sorted(bits / _rate_bps(gamma[k], lola.total_bandwidth_hz / n_blk) for k in chosen)
    edge_s = float(flops[-1]) / scenario.edge_servers[0].compute_flops_per_s
    done = 0.0
    for u in uploads:
        done = max(done, u) + edge_s
    assert summary["mean_round_latency_s"]["offloading"] == pytest.approx(done, rel=1e-9)
    assert uploads[-1] + edge_s <= done <= uploads[-1] + n_blk * edge_s + 1e-15


@pytest.mark.parametrize("edge_flops, bytes_per_sample, coop_wins", [
    (1.0e12, 128, True),     # 32-token texts: the crossover lies between 1 and 2 TFLOP/s of edge
    (2.0e12, 128, False),
    (1.0e13, 4096, False),   # a 10 TFLOP/s edge: the crossover lies between 4 and 8 kB per sample
    (1.0e13, 8192, True),
])
def test_crossover_points_of_the_doc_table(edge_flops, bytes_per_sample, coop_wins):
    lat = mean_latency_s(SCENARIOS / "lola_compare.yaml",
                         ["lola.rounds=20", f"edge_servers.0.compute_flops_per_s={edge_flops}",
                          f"lola.offload_bytes_per_sample={bytes_per_sample}"], algorithms=("crunch", "offloading"))
    assert (lat["crunch"] < lat["offloading"]) is coop_wins, lat
