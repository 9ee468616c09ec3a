"""FedAvg with the uplink aggregation done over the air (``channel.uplink_access: aircomp``).

Same rounds as :class:`netsim.protocols.fedavg.FedAvgSimulation` (selection, memory check, multicast,
real local steps), except the upload + aggregation:

1. no per-device FDMA upload: a device that has finished its local steps waits;
2. when the last device of the round has finished, the scheduled devices (all, or those within
   ``aircomp.interior_radius_m`` of their server) transmit their flattened updates at once over
   M OFDM sub-carriers with truncated channel inversion (:func:`netsim.aircomp.over_the_air_sum`):
   ceil(q / M) OFDM symbols, whatever the device count; fading is the devices' own uplink block
   fading at that simulated time;
3. the edge applies the received, noisy and truncated estimate of sum_k w_k x_k
   (w_k = n_k / sum over scheduled devices) to the global state: the distortion reaches the real
   tensors (``trainer.aggregate_flat``).

With several edge servers each aggregates its own devices on its own band at the same time and
the estimates, weighted by each server's share of the data, are added (ideal backhaul, as in
FedAvg); the logged MSE / NMSE are those of that applied aggregate against the exact weighted
sum over every scheduled device (:func:`applied_aggregate_error`).

The trainer must offer ``flatten_update(result) -> np.ndarray`` and ``aggregate_flat(vector)``
(``FakeTrainer`` and ``fomo.PeftTrainer`` do). Each round's statistics (truncation ratio,
receive SNR, measured and theoretical MSE, air time) are kept in ``self.aircomp_log``.

Events: one ``uplink`` per scheduled device (duration = air time, realised transmit energy),
``not_scheduled`` for a device outside the interior radius, then ``aggregate`` at the edge.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Literal, Optional

import numpy as np
from pydantic import Field, field_validator, model_validator

from ..aircomp import AirCompStats, over_the_air_sum, truncation_mse, truncation_probability
from ..budgets import compute_time_s
from ..channel import noise_power_w
from .fedavg import FedAvgSimulation, RoundCallback
from ..interfaces import LocalResult, Trainer
from ..network import Device, child_rng
from ..spec_base import Bool, Float, Int, NonNegFloat, PositiveFloat, Spec

if TYPE_CHECKING:  # netsim.scenario imports AirCompSpec: no import of it at run time
    from ..scenario import Scenario


class AirCompSpec(Spec):
    """Broadband analog aggregation (``channel.uplink_access: aircomp``; netsim/aircomp.py).

    Truncated channel inversion: a device sends on a sub-carrier only if its small-scale gain
    |h|^2 >= ``truncation_threshold``; every device arrives with the same receive power rho0, the
    largest every scheduled device's budget allows given its own symbol power c_k (``average``:
    rho0 E1(g_th) c_k / g_k <= P_k/M in expectation over the fading, BAA; ``peak``:
    rho0 max_j u_kj^2 / (g_k g_th) <= P_k/M on every symbol). ``interior_radius_m`` schedules only devices within
    that distance of their server (cell-interior scheduling)."""

    num_subcarriers: Optional[Int] = Field(
        None, ge=1, le=1_000_000, description="M sub-carriers (null: floor(uplink_bandwidth_hz / subcarrier_spacing_hz))"
    )
    subcarrier_spacing_hz: PositiveFloat = Field(15e3, ge=1, le=1e10)
    cyclic_prefix_fraction: NonNegFloat = Field(0.07, le=10, description="CP length / useful symbol length")
    truncation_threshold: PositiveFloat = Field(0.1, ge=1e-12, le=50, description="g_th on |h|^2 (Rayleigh, mean 1)")
    power_policy: Literal["average", "peak"] = "average"
    interior_radius_m: Optional[PositiveFloat] = Field(
        None, le=1e7, description="schedule only devices within this distance of their server (null: all)"
    )
    debias: Bool = Field(
        False, description="divide the received aggregate by exp(-g_th), the expected share of entries sent "
        "(unbiased); false: BAA's estimator, truncated entries count as zeros (shrinks the update)",
    )
    receive_snr_db: Optional[Float] = Field(
        None, allow_inf_nan=True, description="null: the real receiver noise N0 NF Delta_f; a number: emulate that receive SNR "
        "rho0/sigma^2 [dB] whatever the links (.inf: noise off), to sweep accuracy against SNR",
    )
    device_counts: list[Annotated[Int, Field(ge=1, le=1_000_000)]] = Field(
        default_factory=lambda: [5, 10, 20], min_length=1,
        description="experiment aircomp_vs_ofdma: devices per round K compared",
    )

    @field_validator("receive_snr_db", mode="before")
    @classmethod
    def _inf_as_text(cls, value):
        """``"inf"`` (how strict JSON files such as scenario.json write +infinity) means .inf."""
        return float("inf") if isinstance(value, str) and value.strip().lower() in ("inf", "+inf", ".inf") else value

    @model_validator(mode="after")
    def _snr_is_a_level(self):
        snr = self.receive_snr_db
        if snr is not None and not (-300.0 <= snr <= 300.0 or snr == float("inf")):
            raise ValueError(f"receive_snr_db={snr}: must be a number of dB in [-300, 300], .inf (noise off) "
                             "or null (real noise)")
        return self


def num_subcarriers(scenario: "Scenario") -> int:
    """M: ``aircomp.num_subcarriers`` or floor(uplink_bandwidth_hz / subcarrier_spacing_hz)."""
    ac = scenario.aircomp
    if ac.num_subcarriers is not None:
        return int(ac.num_subcarriers)
    return max(int(scenario.channel.uplink_bandwidth_hz // ac.subcarrier_spacing_hz), 1)


class AirCompFedAvgSimulation(FedAvgSimulation):
    """FedAvg whose aggregation is broadband analog over-the-air computation."""

    def __init__(self, scenario: Scenario, seed: int, trainer: Trainer, on_round: Optional[RoundCallback] = None):
        super().__init__(scenario, seed, trainer, on_round)
        for method in ("flatten_update", "aggregate_flat"):
            if not callable(getattr(trainer, method, None)):
                raise TypeError(f"uplink_access=aircomp needs a trainer with {method}(); "
                                f"{type(trainer).__name__} has none")
        self.num_subcarriers = num_subcarriers(scenario)
        self.noise_w = noise_power_w(scenario.channel, scenario.aircomp.subcarrier_spacing_hz)
        self._noise_rng = child_rng(self.network_seed, 0, 6)   # receiver noise of the over-the-air slots (a channel draw)
        self.aircomp_log: list[dict] = []

    def scheduled(self, device: Device) -> bool:
        """Cell-interior scheduling: within ``aircomp.interior_radius_m`` of its server."""
        radius = self.scenario.aircomp.interior_radius_m
        if radius is None:
            return True
        sx, sy = self.network.servers[device.server].position_m
        return math.hypot(device.position_m[0] - sx, device.position_m[1] - sy) <= radius

    # ------------------------------------------------------------------ hooks
    def _upload(self, r: int, device: Device, job, share: float, t_off: float = math.inf):
        """No individual upload: everyone transmits together in :meth:`_aggregate`."""
        return True
        yield  # pragma: no cover  (makes this a generator)

    def _aggregate(self, r: int, results: list[LocalResult]):
        ac = self.scenario.aircomp
        by_index = {d.index: d for d in self.network.devices}
        t0 = self.env.now
        chosen = []
        for res in results:
            dev = by_index[res.device_id]
            if self.scheduled(dev):
                chosen.append((dev, res))
            else:
                self.recorder.emit("not_scheduled", t_s=t0, node=dev.name, round=r, **self._tags(dev))
        if not chosen:
            self.aircomp_log.append({"round": r, "scheduled": 0, "selected": len(results)})
            return
        total = float(sum(res.num_examples for _, res in chosen))
        estimate = None
        latency, per_server, server_weights, all_x, all_w = 0.0, [], [], [], []
        for server in self.network.servers:
            members = [(d, res) for d, res in chosen if d.server == server.index]
            if not members:
                continue
            w = np.array([res.num_examples / total for _, res in members])
            x = np.stack([self.trainer.flatten_update(res) for _, res in members])
            est, st = over_the_air_sum(
                x, w / w.sum(), [d.uplink for d, _ in members], num_subcarriers=self.num_subcarriers,
                subcarrier_spacing_hz=ac.subcarrier_spacing_hz, noise_w_per_subcarrier=self.noise_w,
                truncation_threshold=ac.truncation_threshold, power_policy=ac.power_policy, start_s=t0,
                coherence_time_s=self.scenario.channel.coherence_time_s,
                cyclic_prefix_fraction=ac.cyclic_prefix_fraction, rng=self._noise_rng,
                receive_snr_db=ac.receive_snr_db, debias=ac.debias)
            est = est * w.sum()
            estimate = est if estimate is None else estimate + est
            latency = max(latency, st.latency_s)
            per_server.append(st)
            server_weights.append(float(w.sum()))
            all_x.append(x)
            all_w.append(w)
            for (d, res), e in zip(members, st.tx_energy_j):
                self.recorder.emit("uplink", t_s=t0, duration_s=st.latency_s, node=d.name, peer=server.name,
                                   round=r, bytes=res.update_bytes, energy_j=e, **self._tags(d))
        yield self.env.timeout(latency)
        self.trainer.aggregate_flat(estimate)
        self.counters["server_steps"] += 1
        q = int(estimate.size)
        flops = 2.0 * q   # the channel did the sum; the edge scales and adds to the global state
        duration = compute_time_s(flops, self.network.servers[0].spec.compute_flops_per_s)
        self.recorder.emit("aggregate", t_s=self.env.now, duration_s=duration, node=self._edge_name, round=r,
                           flops=flops)
        k_all = sum(st.num_devices for st in per_server)
        quality = applied_aggregate_error(estimate, np.concatenate(all_x), np.concatenate(all_w), per_server,
                                          server_weights, ac.truncation_threshold, ac.debias)
        self.aircomp_log.append({
            "round": r, "selected": len(results), "scheduled": k_all, "num_values": q,
            "latency_s": latency, "num_symbols": max(st.num_symbols for st in per_server),
            "truncation_ratio": float(np.average([st.truncation_ratio for st in per_server],
                                                 weights=[st.num_devices for st in per_server])),
            "receive_snr_db": float(min(st.receive_snr_db for st in per_server)),
            **quality,
        })
        yield self.env.timeout(duration)


def applied_aggregate_error(estimate: np.ndarray, updates: np.ndarray, weights: np.ndarray,
                            per_server: list[AirCompStats], server_weights: list[float], g_th: float,
                            debias: bool) -> dict:
    """MSE, closed-form MSE and NMSE of the aggregate the edge actually applies.

    With S servers, server s estimates sum_{k in s} a_k x_k (a_k = w_k / W_s, W_s = sum_{k in s} w_k)
    and the applied aggregate is sum_s W_s xhat_s, whose target is sum_k w_k x_k over every
    scheduled device. Measured: mse = (1/q) sum_j (applied_j - target_j)^2, nmse = mse /
    ((1/q) sum_j target_j^2). Closed form: the devices' truncations and the servers' noises are
    independent, so the truncation term is that of all scheduled devices with their global
    weights w_k (:func:`netsim.aircomp.truncation_mse`) and the noise terms add with weight
    W_s^2: E[mse] = truncation_mse(x, w) + sum_s W_s^2 noise_mse_s. One server: W = 1, the
    slot's own statistics."""
    target = weights @ updates
    mse = float(np.mean((estimate - target) ** 2))
    signal = float(np.mean(target**2))
    p = np.full(len(weights), truncation_probability(g_th))
    theory = truncation_mse(updates, weights, p, debias) + sum(
        w_s**2 * st.noise_mse for w_s, st in zip(server_weights, per_server))
    return {"mse": mse, "mse_theory": float(theory), "nmse": mse / signal if signal > 0 else float("nan"),
            "signal_power": signal}


def aircomp_summary(log: list[dict]) -> dict:
    """Means over rounds of the over-the-air statistics (empty dict without rounds)."""
    rows = [row for row in log if row.get("scheduled", 0) > 0]
    if not rows:
        return {"rounds_aggregated": 0}
    keys = ("latency_s", "truncation_ratio", "receive_snr_db", "mse", "mse_theory", "nmse", "scheduled")
    out = {f"mean_{k}": float(np.mean([row[k] for row in rows])) for k in keys}
    out["rounds_aggregated"] = len(rows)
    out["num_values"] = int(rows[0]["num_values"])
    return out
