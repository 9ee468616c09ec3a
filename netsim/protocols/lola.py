"""Cooperative (LoLa) rounds on a SimPy timeline, one run per allocation algorithm (torch-free).

For every algorithm the same devices, channels and seed are rebuilt
(``Network(scenario, scenario.network_seed())``)
and ``lola.rounds`` rounds are simulated:

1. the edge starts the round (the allocation is fixed: large-scale gains do not change);
2. every involved device k trains its block n for ``lola.steps_per_round`` steps:
   compute time = steps x (forward + backward-to-depth FLOPs of block n) / f_k;
3. it uploads the block's update (``trainable_bytes`` x 8 bit) over its bandwidth b_k through
   the real uplink (``Link.transfer_duration_s``: path loss, Rayleigh block fading, Shannon);
4. the round ends when the last upload arrives (latency = slowest involved device). Edge
   aggregation and the broadcast of the new block values are neglected, as in the papers'
   system model (digest section 4.2).

Offloading: the N devices with the best mean uplink SNR each upload their round's raw samples
(``steps x batch x offload_bytes_per_sample``) over B/N; the edge (one queue, FIFO in arrival
order) fine-tunes all blocks on each device's samples: steps x (forward + backward down to the
deepest block) / edge FLOP/s per device.

Planning uses the mean channel (E|h|^2 = 1); the simulation draws the fading, so simulated and
planned latencies differ.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Optional

import numpy as np
import simpy
from pydantic import Field

from ..network import Network, child_rng
from ..records import Recorder
from ..lola.allocation import ALGORITHMS, Allocation, Instance, allocate
from ..lola.profile import DepthProfile, analytic_profile
from ..spec_base import Int, PositiveFloat, Spec

if TYPE_CHECKING:  # netsim.scenario imports LolaSpec: no import of it at run time
    import pandas as pd

    from ..scenario import Scenario


class LolaAnalyticModelSpec(Spec):
    """Dimensions of the BERT-style encoder of the analytic depth profile (used when the
    profile is not measured; defaults: all-MiniLM-L6-v2). Formulas: netsim/lola/profile.py."""

    num_layers: Int = Field(6, ge=1, le=1024)
    hidden_size: Int = Field(384, ge=1, le=1_000_000)
    ffn_size: Int = Field(1536, ge=1, le=10_000_000)
    num_heads: Int = Field(12, ge=1, le=100_000)
    vocab_size: Int = Field(30522, ge=1, le=100_000_000)


LolaAlgorithm = Literal["crunch", "jbba", "random", "greedy", "depth_unaware", "equal_bandwidth", "offloading"]


class LolaSpec(Spec):
    """LoLa cooperative fine-tuning (experiment ``lola_compare``; netsim/lola, docs/lola.md).

    The PEFT parameters (LoRA, ``peft.rank`` on ``peft.target_modules``) are split into
    ``num_blocks`` blocks of consecutive transformer layers (block 0 next to the output). Each
    round every block is trained by one device (forward + backward down to that block's
    depth, ``steps_per_round`` steps of ``training.batch_size``) which uploads the block's
    update; the round lasts until the slowest involved device is done. Every algorithm in
    ``algorithms`` is simulated on the same devices, channels and seed."""

    algorithms: list[LolaAlgorithm] = Field(
        default_factory=lambda: ["crunch", "jbba", "random", "greedy", "depth_unaware", "equal_bandwidth", "offloading"],
        min_length=1, description="allocation algorithms compared (names of netsim/lola/allocation.py)",
    )
    num_blocks: Int = Field(3, ge=1, le=1024, description="N parameter blocks (N <= number of devices)")
    rounds: Int = Field(20, ge=1, le=100_000, description="simulated rounds per algorithm")
    steps_per_round: Int = Field(1, ge=1, le=1_000_000, description="local steps per device and round")
    total_bandwidth_hz: Optional[PositiveFloat] = Field(
        None, ge=1, le=1e12, description="uplink band B shared by the involved devices (null: channel.uplink_bandwidth_hz)"
    )
    profile: Literal["auto", "measured", "analytic"] = Field(
        "auto", description="depth cost profile: measured on the real model (fomo/depth_profile.py), "
        "the analytic formula, or auto (measured if trainer is real, else analytic)",
    )
    offload_bytes_per_sample: Optional[PositiveFloat] = Field(
        None, ge=1, le=1e12, description="offloading: raw bytes a device uploads per sample (null: 4 x model.max_length_tokens)"
    )
    jbba_iterations: Int = Field(60, ge=0, le=100_000, description="dual-ascent iterations of jbba")
    train_rounds: Int = Field(
        0, ge=0, le=100_000, description="rounds of REAL cooperative block fine-tuning per algorithm of "
        "train_algorithms (fomo/block_training.py; accuracy vs. simulated time); 0 = latency only. "
        "Capped at lola.rounds; needs trainer: real (skipped with trainer: fake)",
    )
    train_algorithms: list[LolaAlgorithm] = Field(
        default_factory=lambda: ["crunch", "jbba", "offloading"],
        description="algorithms (also in lola.algorithms) fine-tuned for real when train_rounds > 0",
    )
    analytic: LolaAnalyticModelSpec = LolaAnalyticModelSpec()


_RNG_KEY_RANDOM = (1, 0)  # SeedSequence spawn key of the random baseline (netsim uses (0, ...))


def device_tags(network: Network, device) -> dict:
    """The ``group`` and ``server`` columns of a device's events."""
    return {"group": device.group.name, "server": network.servers[device.server].name}


def snr_hz(link) -> float:
    """gamma = P g / (N0 NF) [Hz]: the mean SNR over 1 Hz (SNR over b Hz is gamma / b)."""
    return 10.0 ** (link.mean_snr_db(1.0) / 10.0)


def total_bandwidth_hz(scenario: Scenario) -> float:
    lola = scenario.lola
    return lola.total_bandwidth_hz if lola.total_bandwidth_hz is not None else scenario.channel.uplink_bandwidth_hz


def build_instance(scenario: Scenario, network: Network, profile: DepthProfile) -> Instance:
    """The allocation problem of a scenario: compute times, memory feasibility, block upload
    sizes and mean channel of every (device, block) pair."""
    steps = scenario.lola.steps_per_round
    flops = profile.step_flops() * steps
    speed = np.array([d.group.compute_flops_per_s for d in network.devices])
    mem = np.array([d.group.memory_bytes for d in network.devices])
    return Instance(compute_s=flops[None, :] / speed[:, None],
                    memory_ok=profile.memory_bytes()[None, :] <= mem[:, None],
                    upload_bits=np.asarray(profile.trainable_bytes, dtype=float) * 8.0,
                    snr_hz=np.array([snr_hz(d.uplink) for d in network.devices]),
                    bandwidth_hz=total_bandwidth_hz(scenario),
                    compute_flops_per_s=speed)


def default_profile(scenario: Scenario) -> DepthProfile:
    """The analytic profile with the scenario's batch, sequence length, LoRA rank and
    ``lola.analytic`` model dimensions."""
    a = scenario.lola.analytic
    return analytic_profile(scenario.lola.num_blocks, num_layers=a.num_layers, hidden=a.hidden_size,
                            ffn=a.ffn_size, heads=a.num_heads, vocab=a.vocab_size,
                            seq_len=scenario.model.max_length_tokens, batch_size=scenario.training.batch_size,
                            lora_rank=scenario.peft.rank, lora_modules_per_layer=len(scenario.peft.target_modules),
                            optimizer_states=2 if scenario.training.optimizer == "adamw" else 0)


def _simulate_cooperative(scenario: Scenario, network: Network, inst: Instance, profile: DepthProfile,
                          alloc: Allocation, recorder: Recorder) -> list[float]:
    env = simpy.Environment()
    rounds = scenario.lola.rounds
    steps = scenario.lola.steps_per_round
    flops = profile.step_flops() * steps
    mem = profile.memory_bytes()
    edge = network.servers[0].name
    latencies: list[float] = []

    def device_job(r: int, k: int, n: int):
        dev = network.devices[k]
        comp = float(inst.compute_s[k, n])
        recorder.emit("compute", t_s=env.now, node=dev.name, round=r, duration_s=comp, flops=float(flops[n]),
                      memory_bytes=int(mem[n]), energy_j=dev.group.compute_power_w * comp, peer=f"block{n}",
                      **device_tags(network, dev))
        yield env.timeout(comp)
        bits = float(inst.upload_bits[n])
        dur = dev.uplink.transfer_duration_s(bits, env.now, float(alloc.bandwidth_hz[k]))
        recorder.emit("uplink", t_s=env.now, node=dev.name, peer=edge, round=r, duration_s=dur,
                      bytes=int(bits // 8), energy_j=dev.group.tx_power_w * dur, **device_tags(network, dev))
        yield env.timeout(dur)

    def main():
        for r in range(1, rounds + 1):
            t0 = env.now
            recorder.emit("round_start", t_s=t0, node=edge, round=r)
            jobs = [env.process(device_job(r, int(k), n)) for n, k in enumerate(alloc.device_of_block)]
            yield simpy.AllOf(env, jobs)
            recorder.emit("round_end", t_s=env.now, node=edge, round=r, duration_s=env.now - t0)
            latencies.append(env.now - t0)

    env.process(main())
    env.run()
    return latencies


def _simulate_offloading(scenario: Scenario, network: Network, inst: Instance, profile: DepthProfile,
                         recorder: Recorder) -> tuple[list[float], dict]:
    env = simpy.Environment()
    lola = scenario.lola
    n_blk = profile.num_blocks
    samples = lola.steps_per_round * scenario.training.batch_size
    per_sample = lola.offload_bytes_per_sample if lola.offload_bytes_per_sample is not None \
        else 4 * scenario.model.max_length_tokens
    bits = 8.0 * samples * per_sample
    chosen = [int(k) for k in np.argsort(-inst.snr_hz, kind="stable")[:n_blk]]
    share = inst.bandwidth_hz / n_blk
    server = network.servers[0]
    edge_flops = lola.steps_per_round * float(profile.step_flops()[-1])
    edge_s = edge_flops / server.spec.compute_flops_per_s
    queue = simpy.Resource(env, capacity=1)
    latencies: list[float] = []

    def device_job(r: int, k: int):
        dev = network.devices[k]
        dur = dev.uplink.transfer_duration_s(bits, env.now, share)
        recorder.emit("uplink", t_s=env.now, node=dev.name, peer=server.name, round=r, duration_s=dur,
                      bytes=int(bits // 8), energy_j=dev.group.tx_power_w * dur, **device_tags(network, dev))
        yield env.timeout(dur)
        with queue.request() as req:
            yield req
            recorder.emit("compute", t_s=env.now, node=server.name, peer=dev.name, round=r, duration_s=edge_s,
                          flops=edge_flops)
            yield env.timeout(edge_s)

    def main():
        for r in range(1, lola.rounds + 1):
            t0 = env.now
            recorder.emit("round_start", t_s=t0, node=server.name, round=r)
            yield simpy.AllOf(env, [env.process(device_job(r, k)) for k in chosen])
            recorder.emit("round_end", t_s=env.now, node=server.name, round=r, duration_s=env.now - t0)
            latencies.append(env.now - t0)

    env.process(main())
    env.run()
    return latencies, {"devices": [network.devices[k].name for k in chosen], "upload_bytes_per_device": bits / 8,
                       "edge_compute_s_per_device": edge_s}


def compare(scenario: Scenario, profile: Optional[DepthProfile] = None) -> tuple[dict, pd.DataFrame, Network]:
    """Run every algorithm of ``scenario.lola.algorithms`` on the same devices, channels and
    seed. The network is drawn with ``scenario.network_seed()`` (``topology_seed``, else
    ``seed``), the random baseline's matching with ``scenario.train_seed()``. Returns (summary,
    events with an ``algorithm`` column, the network)."""
    import pandas as pd  # at call time: netsim.scenario imports this module, `deftsim validate` needs no pandas

    if scenario.lola is None:  # the section's defaults
        scenario = scenario.model_copy(update={"lola": LolaSpec()})
    profile = profile if profile is not None else default_profile(scenario)
    if profile.num_blocks != scenario.lola.num_blocks:
        raise ValueError(f"profile has {profile.num_blocks} blocks, lola.num_blocks={scenario.lola.num_blocks}")
    frames = []
    mean_latency: dict[str, float] = {}
    details: dict[str, dict] = {}
    net_seed, train_seed = scenario.network_seed(), scenario.train_seed()
    network = Network(scenario, net_seed)
    inst = build_instance(scenario, network, profile)
    for name in scenario.lola.algorithms:
        network = Network(scenario, net_seed)  # fresh fading state: same channels for all
        recorder = Recorder()
        if name == "offloading":
            lat, info = _simulate_offloading(scenario, network, inst, profile, recorder)
            details[name] = info
        else:
            rng = child_rng(train_seed, *_RNG_KEY_RANDOM)
            kw = {"iterations": scenario.lola.jbba_iterations} if name == "jbba" else {}
            alloc = allocate(name, inst, rng=rng, **kw)
            lat = _simulate_cooperative(scenario, network, inst, profile, alloc, recorder)
            details[name] = {
                "planned_latency_s": alloc.planned_latency_s,
                "device_of_block": [network.devices[int(k)].name for k in alloc.device_of_block],
                "bandwidth_hz": {network.devices[int(k)].name: float(alloc.bandwidth_hz[k]) for k in alloc.device_of_block},
            }
        mean_latency[name] = float(np.mean(lat))
        details[name]["p95_round_latency_s"] = float(np.percentile(lat, 95))
        frame = recorder.to_frame()
        frame["algorithm"] = name
        frames.append(frame)
    events = pd.concat(frames, ignore_index=True)
    events["algorithm"] = events["algorithm"].astype("string")
    coop = {k: v for k, v in mean_latency.items() if k not in ("crunch", "jbba")}
    best = min(mean_latency, key=mean_latency.get)
    summary = {
        "experiment": "lola_compare",
        "mean_round_latency_s": mean_latency,
        "best_algorithm": best,
        "rounds": scenario.lola.rounds,
        "num_blocks": profile.num_blocks,
        "num_devices": len(network.devices),
        "total_bandwidth_hz": inst.bandwidth_hz,
        "profile_source": profile.source,
        "profile": {"step_flops": profile.step_flops().tolist(), "memory_bytes": profile.memory_bytes().tolist(),
                    "trainable_bytes": list(profile.trainable_bytes), "layers": profile.layers},
        "allocations": details,
    }
    for ours in ("crunch", "jbba"):
        if ours in mean_latency:
            summary[f"{ours}_latency_reduction_vs"] = {
                k: 1.0 - mean_latency[ours] / v for k, v in coop.items() if v > 0}
    return summary, events, network


__all__ = ["ALGORITHMS", "build_instance", "compare", "default_profile", "snr_hz", "total_bandwidth_hz"]
