"""Neural connection over the air: the channel and the SimPy timeline (torch-free).

Multi-device split fine-tuning (docs/aircomp.md, "Neural connection over the air"). K devices
each hold one segment of every example and compute a feature vector of ``d`` values per
example; the edge's next layer consumes

.. math::
    z = \\sum_k a_k f_k \\quad (a_k = 1: \\text{sum}, \\ a_k = 1/K: \\text{mean})

received either

* **over the air** (``aircomp``): the q = B d feature values of a batch go up in one analog
  slot of ceil(q / M) OFDM symbols with truncated channel inversion, exactly the model of
  :mod:`netsim.aircomp` (same sub-carrier fading draws of the devices' own uplinks, same
  common receive power rho0, the largest every device's power budget allows given its own
  symbol power, same estimator, same radiated-energy accounting). The edge gets

  .. math::
      \\hat z_j = \\sum_k a_k \\chi_{kj} f_{kj} + \\frac{s}{K\\sqrt{\\rho_0}} n_j, \\quad
      n_j \\sim N(0, \\sigma^2/2)

  (chi_kj = 0 where device k's sub-carrier is truncated, s the RMS of K a_k f_k); the noise
  power sigma^2 is the real receiver noise N0 NF Delta_f (``receive_snr_db: null``), or set so
  that rho0 / sigma^2 equals a given receive SNR, or 0 (``receive_snr_db: inf``: noise off).
  :func:`feature_channel` returns chi and the scaled noise so that the model applies them to its
  real tensors (:mod:`fomo.neural_connection`); the gradient of the loss w.r.t. z is exact for
  the realised channel (device k multiplies the broadcast dL/dz by a_k chi_k, known to it since
  it inverts its own channel);
* **digitally** (``digital``): every device uploads its B d float32 values (32 bits each) over
  an equal OFDMA share B_ul / K at its Shannon rate (block fading, :meth:`Link.transfer_duration_s`),
  the edge adds them exactly (no distortion); the slowest device decides.

Timeline of one training step (one SimPy process, all devices in parallel):

1. device forward: counted FLOPs of the frozen encoder on the device's segment + its
   projection, / the device's FLOP/s (the step waits for the slowest device);
2. uplink: the AirComp slot, or the OFDMA uploads;
3. edge compute: counted FLOPs of the head forward + backward (incl. dL/dz), / edge FLOP/s;
4. downlink broadcast of dL/dz (B d float32 values; the same vector serves every device)
   over the full downlink band with rateless coding: each device decodes at its own per-block
   rate (its ``downlink`` event lasts its own decode time, rx energy = rx power x that time);
   the broadcast, and the step, go on until the last device has decoded it;
5. device backward: counted FLOPs of the projection's backward, / the device's FLOP/s.

Evaluation (test accuracy through the same connection) is an instrument: it takes no simulated
time. Random streams (receiver noise is a channel draw, so it follows the network seed
``scenario.network_seed(seed)``): training slots ``child_rng(network_seed, 0, 7)``, evaluation
slots ``child_rng(network_seed, 0, 8)`` (the same draws for every SNR: common random numbers).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Callable, Literal, Optional, Protocol, Sequence

import numpy as np
import simpy
from pydantic import Field

from ..aircomp import (AirCompStats, aircomp_latency_s, aircomp_symbols, expected_mse, noise_for_snr, noise_mse,
                      ofdm_symbol_s, radiated_energy_j, receive_power, snr_db, symbol_power, truncation_probability,
                      value_gains)
from ..budgets import compute_time_s, energy_j
from ..channel import Link, noise_power_w
from ..network import Network, child_rng
from ..records import Recorder
from ..spec_base import Bool, Float, Int, Spec

if TYPE_CHECKING:  # netsim.scenario imports NeuralAirCompSpec: no import of it at run time
    from ..scenario import Scenario

BITS_PER_VALUE = 32
NOISE_SPAWN_KEY = (0, 7)
EVAL_NOISE_SPAWN_KEY = (0, 8)


# ---------------------------------------------------------------------------- scenario section
class NeuralAirCompSpec(Spec):
    """Experiment ``neural_aircomp``: split fine-tuning with a neural connection over the air
    (fomo/neural_connection.py, netsim/protocols/neural_aircomp.py, docs/aircomp.md).

    Every example's tokens are cut into K = number of devices segments of ``segment_tokens``;
    device k runs the frozen encoder on segment k and a trainable projection to ``feature_dim``
    values; the edge's head (MLP with ``head_hidden_dim`` hidden units, 0: linear) consumes the
    sum or mean of the K feature vectors, received over the air (AirComp, the ``aircomp``
    section's radio settings, at each receive SNR of ``receive_snr_db``) or digitally (OFDMA,
    noiseless). Batch size, learning rate and optimizer come from ``training``."""

    segment_tokens: Int = Field(32, ge=1, le=510, description="tokens per device segment L (without [CLS]/[SEP])")
    feature_dim: Int = Field(64, ge=1, le=65536, description="feature values d per example and device")
    head_hidden_dim: Int = Field(64, ge=0, le=65536, description="hidden units of the edge MLP (0: linear head)")
    combine: Literal["sum", "mean"] = Field("mean", description="the edge consumes sum_k f_k or (1/K) sum_k f_k")
    steps: Int = Field(200, ge=1, le=1_000_000, description="training steps per variant")
    eval_every_steps: Int = Field(25, ge=1, le=1_000_000, description="test accuracy every this many steps (and at the end)")
    receive_snr_db: list[Optional[Annotated[Float, Field(ge=-300, le=300)]]] = Field(
        default_factory=lambda: [None, -10.0, 0.0, 10.0], min_length=1,
        description="AirComp variants: receive SNR rho0/sigma^2 [dB]; null: the real noise N0 NF Delta_f of the links",
    )
    include_digital: Bool = Field(True, description="also run the noiseless digital (OFDMA) connection")
    max_train_examples: Optional[Int] = Field(
        None, ge=1, le=100_000_000, description="use at most this many training examples (null: all); test: data.max_test_examples"
    )


# ---------------------------------------------------------------------------- channel
@dataclass(frozen=True)
class FeatureChannelConfig:
    """Radio settings of the over-the-air feature slot.

    receive_snr_db : None -> noise sigma^2 = ``noise_w_per_subcarrier`` (real links);
        a number -> sigma^2 = rho0 / 10^(snr/10); ``math.inf`` -> no receiver noise.
    """

    num_subcarriers: int
    subcarrier_spacing_hz: float
    noise_w_per_subcarrier: float
    truncation_threshold: float
    power_policy: str = "average"
    cyclic_prefix_fraction: float = 0.0
    coherence_time_s: Optional[float] = None
    receive_snr_db: Optional[float] = None


def feature_channel(features: np.ndarray, weights: np.ndarray, links: Sequence[Link], cfg: FeatureChannelConfig,
                    start_s: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, AirCompStats]:
    """One over-the-air slot carrying K feature vectors.

    Parameters
    ----------
    features : (K, q) the devices' feature values (one row per device).
    weights : (K,) a_k (1 for a sum, 1/K for a mean).

    Returns (chi, noise, stats): chi (K, q) bool, True where device k's value reached the edge;
    noise (q,) the scaled receiver noise s n / (K sqrt(rho0)) of the estimate, so that the edge's
    estimate is ``sum_k a_k chi_k x_k + noise``; stats with the measured and closed-form MSE
    (:func:`netsim.aircomp.expected_mse`).
    """
    x = np.asarray(features, dtype=np.float64)
    k, q = x.shape
    if k != len(links):
        raise ValueError(f"{k} feature rows but {len(links)} links")
    a = np.asarray(weights, dtype=np.float64)
    m = int(cfg.num_subcarriers)
    powers = np.array([l.tx_power_w for l in links], dtype=float)
    g = np.array([l.large_scale_gain for l in links], dtype=float)
    scale = float(np.sqrt(np.mean((k * a[:, None] * x) ** 2))) or 1.0
    symbols = k * a[:, None] * x / scale           # u_kj, what device k modulates
    c = symbol_power(symbols, cfg.power_policy)
    rho0 = receive_power(cfg.power_policy, cfg.truncation_threshold, powers / m, g, c)
    noise_w = noise_for_snr(rho0, cfg.noise_w_per_subcarrier, cfg.receive_snr_db)
    t_sym = ofdm_symbol_s(cfg.subcarrier_spacing_hz, cfg.cyclic_prefix_fraction)
    h2 = value_gains(links, q, m, t_sym, start_s, cfg.coherence_time_s)
    chi = h2 >= cfg.truncation_threshold
    n_r = rng.standard_normal(q)          # drawn even when noise is off: same stream for every SNR
    noise = n_r * (math.sqrt(noise_w / 2.0) * scale / (k * math.sqrt(rho0)))
    exact = np.sum(a[:, None] * x, axis=0)
    estimate = np.sum(np.where(chi, a[:, None] * x, 0.0), axis=0) + noise
    energy = radiated_energy_j(rho0, g, h2, chi, symbols, t_sym)
    p_trunc = np.full(k, truncation_probability(cfg.truncation_threshold))
    stats = AirCompStats(
        num_devices=k, num_values=q, num_symbols=aircomp_symbols(q, m),
        latency_s=aircomp_latency_s(q, m, cfg.subcarrier_spacing_hz, cfg.cyclic_prefix_fraction), rho0_w=rho0,
        noise_w=noise_w, receive_snr_db=snr_db(rho0, noise_w),
        truncation_ratio=float(1.0 - chi.mean()), mse=float(np.mean((estimate - exact) ** 2)),
        mse_theory=expected_mse(x, a, p_trunc, scale, noise_w, rho0), signal_power=float(np.mean(exact**2)),
        tx_energy_j=[float(e) for e in energy], noise_mse=noise_mse(scale, noise_w, k, rho0),
        symbol_power=[float(v) for v in c])
    return chi, noise, stats


def ofdma_upload_s(links: Sequence[Link], bits_per_device: float, start_s: float, bandwidth_hz: float) -> list[float]:
    """Each device's time to send ``bits_per_device`` over an equal share B / K from ``start_s``
    at its per-block Shannon rate [s]."""
    share = bandwidth_hz / len(links)
    return [link.transfer_duration_s(bits_per_device, start_s, share) for link in links]


def decode_times_s(downlinks: Sequence[Link], bits: float, start_s: float, bandwidth_hz: float) -> list[float]:
    """Each device's time to decode a broadcast of ``bits`` over the full band: rateless coding,
    the device accumulates the payload at its own per-block Shannon rate [s]."""
    return [link.transfer_duration_s(bits, start_s, bandwidth_hz) for link in downlinks]


def broadcast_s(downlinks: Sequence[Link], bits: float, start_s: float, bandwidth_hz: float) -> float:
    """Downlink broadcast of ``bits`` over the full band: done when the last device has
    decoded it (:func:`decode_times_s`) [s]."""
    return max(decode_times_s(downlinks, bits, start_s, bandwidth_hz))


# ---------------------------------------------------------------------------- simulation
class SplitModel(Protocol):
    """What the simulation needs from the split model (``fomo.neural_connection.NeuralConnectionTrainer``)."""

    num_devices: int
    feature_values_per_device: int          # B d values per step
    device_forward_flops: float             # per device and step
    device_backward_flops: float
    edge_flops: float                       # head forward + backward per step

    def train_step(self, connect: Optional[Callable]) -> float: ...

    def evaluate(self, connect: Optional[Callable]) -> tuple[float, float]: ...


@dataclass
class NeuralRun:
    """Outcome of one variant: final / initial accuracy, simulated time, per-step channel log."""

    uplink: str
    receive_snr_db: Optional[float]
    initial_accuracy: float
    final_accuracy: float
    sim_time_s: float
    steps: int
    channel_log: list[dict]


class NeuralConnectionSimulation:
    """Split fine-tuning with an over-the-air (``uplink='aircomp'``) or digital (``'digital'``)
    neural connection, on one SimPy timeline (module docstring)."""

    def __init__(self, scenario: Scenario, seed: int, model: SplitModel, uplink: str,
                 receive_snr_db: Optional[float] = None, network: Optional[Network] = None):
        if uplink not in ("aircomp", "digital"):
            raise ValueError(f"uplink {uplink!r}: expected 'aircomp' or 'digital'")
        self.scenario, self.seed, self.model, self.uplink = scenario, seed, model, uplink
        self.network_seed = scenario.network_seed(seed)
        self.network = network if network is not None else Network(scenario, self.network_seed)
        self.devices = self.network.devices[: model.num_devices]
        if len(self.devices) != model.num_devices:
            raise ValueError(f"the model has {model.num_devices} device parts but the scenario {len(self.devices)} devices")
        ac, ch = scenario.aircomp, scenario.channel
        m = ac.num_subcarriers or max(int(ch.uplink_bandwidth_hz // ac.subcarrier_spacing_hz), 1)
        self.channel_cfg = FeatureChannelConfig(
            num_subcarriers=m, subcarrier_spacing_hz=ac.subcarrier_spacing_hz,
            noise_w_per_subcarrier=noise_power_w(ch, ac.subcarrier_spacing_hz),
            truncation_threshold=ac.truncation_threshold, power_policy=ac.power_policy,
            cyclic_prefix_fraction=ac.cyclic_prefix_fraction, coherence_time_s=ch.coherence_time_s,
            receive_snr_db=receive_snr_db)
        self.receive_snr_db = receive_snr_db
        self.env = simpy.Environment()
        self.recorder = Recorder()
        self._noise_rng = child_rng(self.network_seed, *NOISE_SPAWN_KEY)   # receiver noise: a channel draw
        self._eval_rng = child_rng(self.network_seed, *EVAL_NOISE_SPAWN_KEY)
        self.channel_log: list[dict] = []
        self._edge = self.network.servers[0]

    def _tags(self, device) -> dict:
        """The ``group`` and ``server`` columns of a device's events."""
        return {"group": device.group.name, "server": self.network.servers[device.server].name}

    # ------------------------------------------------------------------ connections
    def _connect(self, rng: np.random.Generator, log: Optional[list]) -> Optional[Callable]:
        if self.uplink == "digital":
            return None
        links = [d.uplink for d in self.devices]

        def connect(features: np.ndarray, weights: np.ndarray):
            chi, noise, st = feature_channel(features, weights, links, self.channel_cfg, self.env.now, rng)
            if log is not None:
                log.append(st)
            return chi, noise
        return connect

    # ------------------------------------------------------------------ timeline
    def _evaluate(self, step: int) -> float:
        acc, loss = self.model.evaluate(self._connect(self._eval_rng, None))
        self.recorder.emit("evaluate", t_s=self.env.now, node=self._edge.name, round=step, accuracy=acc, loss=loss)
        return acc

    def _emit_compute(self, step: int, flops: float) -> float:
        longest = 0.0
        for d in self.devices:
            dur = compute_time_s(flops, d.group.compute_flops_per_s)
            self.recorder.emit("compute", t_s=self.env.now, duration_s=dur, node=d.name, round=step, flops=flops,
                               energy_j=energy_j(d.group.compute_power_w, dur), **self._tags(d))
            longest = max(longest, dur)
        return longest

    def _step(self, step: int):
        m, sc = self.model, self.scenario
        yield self.env.timeout(self._emit_compute(step, m.device_forward_flops))
        t_up = self.env.now
        stats: list[AirCompStats] = []
        loss = m.train_step(self._connect(self._noise_rng, stats))
        values = m.feature_values_per_device
        bits = BITS_PER_VALUE * values
        if self.uplink == "aircomp":
            st = stats[0]
            up = st.latency_s
            for d, e in zip(self.devices, st.tx_energy_j):
                self.recorder.emit("uplink", t_s=t_up, duration_s=up, node=d.name, peer=self._edge.name, round=step,
                                   bytes=0, energy_j=e, **self._tags(d))
            self.channel_log.append({"step": step, "latency_s": up, "num_symbols": st.num_symbols,
                                     "truncation_ratio": st.truncation_ratio, "receive_snr_db": st.receive_snr_db,
                                     "mse": st.mse, "mse_theory": st.mse_theory, "nmse": st.nmse})
        else:
            durs = ofdma_upload_s([d.uplink for d in self.devices], bits, t_up, sc.channel.uplink_bandwidth_hz)
            for d, dur in zip(self.devices, durs):
                self.recorder.emit("uplink", t_s=t_up, duration_s=dur, node=d.name, peer=self._edge.name, round=step,
                                   bytes=bits // 8, energy_j=energy_j(d.group.tx_power_w, dur), **self._tags(d))
            up = max(durs)
            self.channel_log.append({"step": step, "latency_s": up})
        yield self.env.timeout(up)
        edge_s = compute_time_s(m.edge_flops, self._edge.spec.compute_flops_per_s)
        self.recorder.emit("edge_compute", t_s=self.env.now, duration_s=edge_s, node=self._edge.name, round=step,
                           flops=m.edge_flops, loss=loss)
        yield self.env.timeout(edge_s)
        t_down = self.env.now
        decode = decode_times_s([d.downlink for d in self.devices], bits, t_down, sc.channel.downlink_bandwidth_hz)
        down = max(decode)
        self.recorder.emit("broadcast", t_s=t_down, duration_s=down, node=self._edge.name, round=step, bytes=bits // 8,
                           energy_j=energy_j(self._edge.spec.tx_power_w, down))
        for d, own in zip(self.devices, decode):
            self.recorder.emit("downlink", t_s=t_down, duration_s=own, node=d.name, peer=self._edge.name, round=step,
                               bytes=bits // 8, energy_j=energy_j(d.group.rx_power_w, own), **self._tags(d))
        yield self.env.timeout(down)
        yield self.env.timeout(self._emit_compute(step, m.device_backward_flops))

    def _process(self, steps: int, eval_every: int):
        self._initial = self._evaluate(0)
        self._final = self._initial
        for step in range(1, steps + 1):
            yield from self._step(step)
            if step % eval_every == 0 or step == steps:
                self._final = self._evaluate(step)

    def run(self, steps: int, eval_every: int) -> NeuralRun:
        self.env.process(self._process(steps, eval_every))
        self.env.run()
        return NeuralRun(self.uplink, self.receive_snr_db, self._initial, self._final, float(self.env.now), steps,
                         self.channel_log)


def channel_summary(log: list[dict]) -> dict:
    """Means over steps of the per-step channel statistics."""
    if not log:
        return {}
    keys = [k for k in log[0] if k != "step"]
    return {f"mean_{k}": float(np.mean([row[k] for row in log])) for k in keys}
