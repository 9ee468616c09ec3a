"""The network: devices, edge servers, their radio links and the device-to-device graph.

Built once per run from a :class:`~netsim.scenario.Scenario` and a seed. Every random quantity
comes from its own generator, derived from the run seed and a fixed key, so adding a device
does not change the draws of another entity's link:

=============================  ===========================
what                           ``SeedSequence`` spawn key
=============================  ===========================
device positions (group g)     (0, 0, g)
shadowing of uplink of dev i   (0, 1, i)
fading of uplink of device i   (0, 2, i)
fading of downlink of dev i    (0, 3, i)
device selection per round     (0, 4)
sidelink (i, j) fading         (0, 5, i, j)
service arrivals of class k    (40, k)   (netsim.service)
service request attributes     (41, k)   (netsim.service)
=============================  ===========================

Other modules name their own streams beside their code (``grep -rn SPAWN_KEY``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from typing import TYPE_CHECKING

from .channel import BlockFading, Link, db_to_linear, pathloss_db

if TYPE_CHECKING:  # netsim.scenario imports protocol sections that import this module
    from .scenario import DeviceGroup, EdgeServerSpec, PathLossSpec, Scenario


def child_rng(seed: int, *key: int) -> np.random.Generator:
    """Independent generator for one entity: ``SeedSequence(seed, spawn_key=key)``."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=tuple(key)))


@dataclass
class EdgeServer:
    index: int
    spec: EdgeServerSpec

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def position_m(self) -> tuple[float, float]:
        return self.spec.position_m


@dataclass
class Device:
    """A phone-class device: its hardware profile, position and links to its edge server."""

    index: int
    group: DeviceGroup
    position_m: tuple[float, float]
    server: int
    uplink: Link = field(repr=False)
    downlink: Link = field(repr=False)
    shadowing_db: float = 0.0

    @property
    def name(self) -> str:
        return f"dev{self.index}"


def drop_positions(group: DeviceGroup, centre: tuple[float, float], rng: np.random.Generator) -> list[tuple[float, float]]:
    """Uniform drop in the annulus [min_distance_m, max_distance_m] around ``centre``."""
    p = group.placement
    u = rng.random(group.count)
    r = np.sqrt(u * (p.max_distance_m**2 - p.min_distance_m**2) + p.min_distance_m**2)
    phi = rng.random(group.count) * 2.0 * math.pi
    return [(centre[0] + float(ri * math.cos(a)), centre[1] + float(ri * math.sin(a))) for ri, a in zip(r, phi)]


def distance_3d_m(a: tuple[float, float], b: tuple[float, float], height_a_m: float, height_b_m: float) -> float:
    return math.sqrt((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2 + (height_a_m - height_b_m) ** 2)


class Network:
    """Devices and edge servers with their links; the D2D graph as ``self.d2d`` (networkx)."""

    def __init__(self, scenario: Scenario, seed: int):
        self.scenario = scenario
        self.seed = seed
        ch = scenario.channel
        self.servers = [EdgeServer(i, s) for i, s in enumerate(scenario.edge_servers)]
        self.devices: list[Device] = []
        for g_index, group in enumerate(scenario.devices):
            server = self.servers[group.placement.around_server]
            positions = drop_positions(group, server.position_m, child_rng(seed, 0, 0, g_index))
            for pos in positions:
                i = len(self.devices)
                d = distance_3d_m(pos, server.position_m, group.antenna_height_m, server.spec.antenna_height_m)
                shadow_db = child_rng(seed, 0, 1, i).normal(0.0, ch.pathloss.shadowing_std_db) if ch.pathloss.shadowing_std_db > 0 else 0.0
                gain = db_to_linear(-(pathloss_db(ch.pathloss, d, ch.carrier_hz, group.antenna_height_m) + shadow_db))
                up = Link(gain, group.tx_power_w, BlockFading(ch.fading, ch.coherence_time_s, child_rng(seed, 0, 2, i)), ch,
                          name=f"uplink dev{i}->{server.name}")
                down = Link(gain, server.spec.tx_power_w, BlockFading(ch.fading, ch.coherence_time_s, child_rng(seed, 0, 3, i)),
                            ch, name=f"downlink {server.name}->dev{i}")
                self.devices.append(Device(i, group, pos, server.index, up, down, float(shadow_db)))
        self.d2d = build_d2d_graph(scenario, self.devices, seed)

    # ------------------------------------------------------------ mobility
    def large_scale_gains(self, positions_m: np.ndarray) -> np.ndarray:
        """Linear large-scale gains (path loss and the device's shadowing) of every device at
        ``positions_m`` (N, 2) to every server: an (N, S) array. A device keeps its shadowing
        draw wherever it goes (one log-normal draw per device, a simplification)."""
        ch = self.scenario.channel
        heights, shadow = self._heights_and_shadowing()
        gains = np.empty((len(self.devices), len(self.servers)))
        for s, server in enumerate(self.servers):
            dx = positions_m[:, 0] - server.position_m[0]
            dy = positions_m[:, 1] - server.position_m[1]
            d3 = np.sqrt(dx * dx + dy * dy + (heights - server.spec.antenna_height_m) ** 2)
            loss = pathloss_db_array(ch.pathloss, d3, ch.carrier_hz, heights)
            gains[:, s] = 10.0 ** (-(loss + shadow) / 10.0)
        return gains

    def _heights_and_shadowing(self) -> tuple[np.ndarray, np.ndarray]:
        """Antenna heights [m] and shadowing draws [dB] of the devices, as arrays: fixed for the
        life of the network (a device keeps its group and its draw), so gathered once."""
        cached = getattr(self, "_static_arrays", None)
        if cached is None or len(cached[0]) != len(self.devices):
            cached = (np.array([d.group.antenna_height_m for d in self.devices], dtype=np.float64),
                      np.array([d.shadowing_db for d in self.devices], dtype=np.float64))
            self._static_arrays = cached
        return cached

    def move(self, positions_m: np.ndarray, servers: np.ndarray, gains: np.ndarray) -> None:
        """Put every device at its new position, associated with ``servers[i]``, with the
        large-scale gains ``gains`` (N, S) of :meth:`large_scale_gains`; block fading goes on
        (each link keeps its own fading stream). The D2D graph is rebuilt from the new
        positions (its sidelinks' fading streams are keyed by the device pair).

        One pass of plain attribute stores per device (the values are gathered with numpy
        first); only the devices whose server changes get the re-association work."""
        servers = np.asarray(servers).astype(np.int64, copy=False)
        positions_m = np.asarray(positions_m, dtype=np.float64)
        n = len(self.devices)
        own = gains[np.arange(n), servers].tolist()     # gain to the associated server, as floats
        # flat lists only: a nested tolist() would make N short-lived lists that the cyclic
        # garbage collector promotes and then scans in full collections (tuples of floats it
        # untracks), several times slower than the stores themselves at N = 100,000
        xy = zip(positions_m[:, 0].tolist(), positions_m[:, 1].tolist())
        for dev, pos, gain in zip(self.devices, xy, own):
            dev.position_m = pos
            dev.uplink.large_scale_gain = gain
            dev.downlink.large_scale_gain = gain
        previous = getattr(self, "_association", None)   # only move() re-associates devices
        if previous is None or len(previous) != n:
            previous = np.fromiter((d.server for d in self.devices), dtype=np.int64, count=n)
        for i in np.flatnonzero(servers != previous).tolist():
            dev, server = self.devices[i], self.servers[int(servers[i])]
            dev.server = server.index
            dev.downlink.tx_power_w = server.spec.tx_power_w
            dev.uplink.name = f"uplink dev{dev.index}->{server.name}"
            dev.downlink.name = f"downlink {server.name}->dev{dev.index}"
        self._association = servers.copy()
        if self.scenario.d2d.kind != "none":
            self.d2d = build_d2d_graph(self.scenario, self.devices, self.seed)

    def uplink_weights(self) -> list[float]:
        shares = self.scenario.channel.uplink_shares
        return [1.0] * len(self.devices) if shares == "equal" else list(shares)


def pathloss_db_array(spec: "PathLossSpec", distance_3d_m: np.ndarray, carrier_hz: float,
                      ut_height_m: np.ndarray) -> np.ndarray:
    """:func:`netsim.channel.pathloss_db` over arrays of distances and device heights [dB]."""
    d = np.log10(np.maximum(distance_3d_m, 1.0))
    fc = math.log10(carrier_hz / 1e9)
    if spec.model == "log_distance":
        return spec.ref_loss_db + 10.0 * spec.exponent * d
    if spec.model.startswith("umi"):
        los = 32.4 + 21.0 * d + 20.0 * fc
        if spec.model == "umi_los":
            return los
        return np.maximum(los, 35.3 * d + 22.4 + 21.3 * fc - 0.3 * (ut_height_m - 1.5))
    los = 28.0 + 22.0 * d + 20.0 * fc
    if spec.model == "uma_los":
        return los
    return np.maximum(los, 13.54 + 39.08 * d + 20.0 * fc - 0.6 * (ut_height_m - 1.5))


def build_d2d_graph(scenario: Scenario, devices: list[Device], seed: int) -> nx.Graph:
    """Device-to-device graph. Nodes are device indices (attribute ``pos_m``); every edge (i, j),
    i < j, has ``distance_m``, the sidelink :class:`Link` from i to j (``link``, i's transmit
    power) and from j to i (``link_ba``, j's transmit power) sharing one Rayleigh block fading
    (a reciprocal, time-division channel), and ``mean_snr_db`` of i -> j over
    ``d2d.bandwidth_hz``."""
    spec = scenario.d2d
    ch = scenario.channel
    graph = nx.Graph()
    for dev in devices:
        graph.add_node(dev.index, pos_m=dev.position_m)
    if spec.kind == "none" or len(devices) < 2:
        return graph
    pos = np.array([d.position_m for d in devices])
    pairs: set[tuple[int, int]] = set()
    if spec.kind == "distance":
        for i in range(len(devices)):
            dist = np.hypot(*(pos[i + 1 :] - pos[i]).T)
            for j in np.nonzero(dist <= spec.threshold_m)[0]:
                pairs.add((i, i + 1 + int(j)))
    else:
        for i in range(len(devices)):
            dist = np.hypot(*(pos - pos[i]).T)
            dist[i] = np.inf
            for j in np.argsort(dist, kind="stable")[: spec.k]:
                pairs.add((min(i, int(j)), max(i, int(j))))
    for i, j in sorted(pairs):
        a, b = devices[i], devices[j]
        d = distance_3d_m(a.position_m, b.position_m, a.group.antenna_height_m, b.group.antenna_height_m)
        gain = db_to_linear(-pathloss_db(ch.pathloss, d, ch.carrier_hz, a.group.antenna_height_m))
        fading = BlockFading(ch.fading, ch.coherence_time_s, child_rng(seed, 0, 5, i, j))
        link = Link(gain, a.group.tx_power_w, fading, ch, name=f"sidelink dev{i}->dev{j}")
        back = Link(gain, b.group.tx_power_w, fading, ch, name=f"sidelink dev{j}->dev{i}")
        graph.add_edge(i, j, distance_m=d, link=link, link_ba=back, mean_snr_db=link.mean_snr_db(spec.bandwidth_hz))
    return graph
