"""Wireless channel maths: path loss, Rayleigh block fading, noise, Shannon rate, fixed-rate
outage.

All quantities are linear unless the name ends in ``_db`` / ``_dbm``.

References
----------
3GPP TR 38.901 v17, Table 7.4.1-1 (UMi-Street Canyon, UMa path loss).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import numpy as np

if TYPE_CHECKING:  # annotations only: netsim.scenario may import modules that import this one
    from .scenario import ChannelSpec, PathLossSpec

BOLTZMANN_NOISE_DBM_PER_HZ = -174.0


def db_to_linear(x_db: float) -> float:
    return 10.0 ** (x_db / 10.0)


def pathloss_db(spec: PathLossSpec, distance_3d_m: float, carrier_hz: float, ut_height_m: float = 1.5) -> float:
    """Large-scale path loss [dB] (without shadowing).

    UMi-Street Canyon (TR 38.901):

    .. math::
        PL_{LOS} = 32.4 + 21\\log_{10} d_{3D} + 20\\log_{10} f_c
        PL'_{NLOS} = 35.3\\log_{10} d_{3D} + 22.4 + 21.3\\log_{10} f_c - 0.3(h_{UT}-1.5)
        PL_{NLOS} = \\max(PL_{LOS}, PL'_{NLOS})

    UMa: LOS 28.0 + 22 log10 d + 20 log10 f_c; NLOS' 13.54 + 39.08 log10 d + 20 log10 f_c
    - 0.6 (h_UT - 1.5). ``log_distance``: ref_loss_db + 10 n log10(d). d_3D [m] (clamped to
    >= 1 m), f_c [GHz].
    """
    d = max(distance_3d_m, 1.0)
    fc_ghz = carrier_hz / 1e9
    if spec.model == "log_distance":
        return spec.ref_loss_db + 10.0 * spec.exponent * math.log10(d)
    if spec.model.startswith("umi"):
        los = 32.4 + 21.0 * math.log10(d) + 20.0 * math.log10(fc_ghz)
        if spec.model == "umi_los":
            return los
        nlos = 35.3 * math.log10(d) + 22.4 + 21.3 * math.log10(fc_ghz) - 0.3 * (ut_height_m - 1.5)
        return max(los, nlos)
    los = 28.0 + 22.0 * math.log10(d) + 20.0 * math.log10(fc_ghz)
    if spec.model == "uma_los":
        return los
    nlos = 13.54 + 39.08 * math.log10(d) + 20.0 * math.log10(fc_ghz) - 0.6 * (ut_height_m - 1.5)
    return max(los, nlos)


def noise_power_w(spec: ChannelSpec, bandwidth_hz: float) -> float:
    """Receiver noise power N0 * NF * B [W], N0 from ``noise_psd_dbm_per_hz``."""
    n0_w_per_hz = db_to_linear(spec.noise_psd_dbm_per_hz - 30.0)
    return n0_w_per_hz * db_to_linear(spec.noise_figure_db) * bandwidth_hz


def shannon_rate_bps(bandwidth_hz: float, snr: float) -> float:
    """Shannon capacity B log2(1 + SNR) [bit/s]."""
    return bandwidth_hz * math.log2(1.0 + snr)


def outage_threshold_snr(spectral_efficiency_bps_per_hz: float) -> float:
    """Least SNR at which a fixed-rate code of R bit/s/Hz is decodable: 2^R - 1 (linear), the
    SNR at which the Shannon capacity B log2(1 + SNR) equals R B."""
    return 2.0 ** spectral_efficiency_bps_per_hz - 1.0


def outage_probability(mean_snr: float, threshold_snr: float) -> float:
    """P(SNR < threshold) of a Rayleigh block-fading link with mean SNR ``mean_snr`` (linear).

    The SNR of a block is mean_snr |h|^2 with |h|^2 ~ Exp(1), so

    .. math::
        P_{out} = P(\\bar\\gamma |h|^2 < \\gamma_{th}) = 1 - e^{-\\gamma_{th} / \\bar\\gamma}

    (computed as -expm1(-threshold / mean) for accuracy at small ratios). A mean SNR of 0 is
    always in outage (1.0) unless the threshold is 0 too.
    """
    if not (mean_snr >= 0 and threshold_snr >= 0):
        raise ValueError(f"outage_probability: mean_snr={mean_snr!r}, threshold_snr={threshold_snr!r}; "
                         "allowed: numbers >= 0")
    if threshold_snr == 0:
        return 0.0
    if mean_snr == 0:
        return 1.0
    return -math.expm1(-threshold_snr / mean_snr)


_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """SplitMix64 finaliser (Steele, Lea, Flood 2014): a bijective 64-bit mixer whose outputs
    pass BigCrush; used as a counter-based random number generator."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


_U64 = np.uint64


def splitmix64_array(x: np.ndarray) -> np.ndarray:
    """:func:`splitmix64` on a uint64 array (wrap-around arithmetic, same outputs)."""
    x = x + _U64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


class BlockFading:
    """Small-scale fading of one link, constant within a coherence block and independent across
    blocks (block fading).

    Rayleigh: h ~ CN(0, 1), so the power gain |h|^2 ~ Exp(1) with mean 1. Block b covers
    simulated time [b T_c, (b+1) T_c). The gain of block b is a pure function of the link's key
    (drawn once from the link's own generator) and b, through a counter-based generator:
    u_b = (SplitMix64(key XOR SplitMix64(b)) + 1/2) 2^-64 in (0, 1), |h_b|^2 = -ln u_b.
    So it does not depend on the order in which blocks are queried, and a link costs O(1)
    memory however long the run.
    """

    def __init__(self, kind: str, coherence_time_s: float, rng: np.random.Generator):
        self.kind = kind
        self.coherence_time_s = coherence_time_s
        self._key = int(rng.integers(0, 2**63, dtype=np.int64))
        self._last_block = -1
        self._last_gain = 1.0

    def power_gain(self, block: int) -> float:
        """|h|^2 of coherence block ``block`` (1.0 for ``none``)."""
        if self.kind == "none":
            return 1.0
        if block != self._last_block:
            u = ((splitmix64(self._key ^ splitmix64(block)) >> 11) + 0.5) * 2.0**-53
            self._last_block, self._last_gain = block, -math.log(u)
        return self._last_gain

    def power_gains(self, first_block: int, count: int) -> np.ndarray:
        """|h|^2 of blocks first_block .. first_block + count - 1 (same values as
        :meth:`power_gain`, computed in one vectorised pass)."""
        if self.kind == "none":
            return np.ones(count)
        blocks = np.arange(first_block, first_block + count, dtype=np.uint64)
        h = splitmix64_array(_U64(self._key) ^ splitmix64_array(blocks))
        u = ((h >> _U64(11)).astype(np.float64) + 0.5) * 2.0**-53
        return -np.log(u)


class Link:
    """A point-to-point radio link: large-scale gain (path loss and shadowing, fixed) times
    block fading.

    Parameters
    ----------
    large_scale_gain : float
        10^(-(PL + shadowing)/10), linear.
    tx_power_w : float
        Transmit power [W].
    fading : BlockFading
    channel : ChannelSpec
        For the noise PSD and noise figure, and the rate mode: ``shannon`` (a block carries
        B log2(1 + SNR_b)) or ``fixed`` (a block carries R B when SNR_b >= 2^R - 1 and nothing
        otherwise, an outage; R = ``fixed_spectral_efficiency_bps_per_hz``).
    name : str
        What the link is (e.g. ``uplink dev3->edge0``), for error messages.
    """

    def __init__(self, large_scale_gain: float, tx_power_w: float, fading: BlockFading, channel: ChannelSpec,
                 name: str = "link"):
        self.large_scale_gain = large_scale_gain
        self.tx_power_w = tx_power_w
        self.fading = fading
        self.name = name
        self._noise_w_per_hz = noise_power_w(channel, 1.0)
        self.fixed_rate = channel.rate_mode == "fixed"
        self.spectral_efficiency_bps_per_hz = channel.fixed_spectral_efficiency_bps_per_hz if self.fixed_rate else None
        self.threshold_snr = outage_threshold_snr(channel.fixed_spectral_efficiency_bps_per_hz) if self.fixed_rate else None

    def snr(self, block: int, bandwidth_hz: float) -> float:
        """Received SNR P g |h_b|^2 / (N0 NF B) in coherence block ``block``."""
        gain = self.large_scale_gain * self.fading.power_gain(block)
        return self.tx_power_w * gain / (self._noise_w_per_hz * bandwidth_hz)

    def rate_bps(self, block: int, bandwidth_hz: float) -> float:
        """Rate of coherence block ``block`` [bit/s]: B log2(1 + SNR_b) (``shannon``), or R B if
        SNR_b >= 2^R - 1 and 0 otherwise (``fixed``)."""
        snr = self.snr(block, bandwidth_hz)
        if self.fixed_rate:
            return self.spectral_efficiency_bps_per_hz * bandwidth_hz if snr >= self.threshold_snr else 0.0
        return shannon_rate_bps(bandwidth_hz, snr)

    def rates_bps(self, first_block: int, count: int, bandwidth_hz: float) -> np.ndarray:
        """Rates of ``count`` consecutive coherence blocks [bit/s] (vectorised, same values as
        :meth:`rate_bps`)."""
        snr = self.tx_power_w * self.large_scale_gain * self.fading.power_gains(first_block, count) / (
            self._noise_w_per_hz * bandwidth_hz)
        if self.fixed_rate:
            return np.where(snr >= self.threshold_snr, self.spectral_efficiency_bps_per_hz * bandwidth_hz, 0.0)
        return bandwidth_hz * np.log2(1.0 + snr)

    def outage_probability(self, bandwidth_hz: float) -> float:
        """P(a coherence block delivers nothing) over ``bandwidth_hz``: 0 in ``shannon`` mode;
        in ``fixed`` mode 1 - exp(-(2^R - 1) / mean SNR) for Rayleigh fading, and 0 or 1 (SNR
        above or below the threshold) without fading."""
        if not self.fixed_rate:
            return 0.0
        mean_snr = self.tx_power_w * self.large_scale_gain / (self._noise_w_per_hz * bandwidth_hz)
        if not mean_snr >= 0:
            return math.nan
        if self.fading.kind == "none":
            return 0.0 if mean_snr >= self.threshold_snr else 1.0
        return outage_probability(mean_snr, self.threshold_snr)

    def transfer_duration_s(self, size_bits: float, start_s: float, bandwidth_hz: float) -> float:
        """Time to send ``size_bits`` over this link from ``start_s`` [s] (see
        :func:`transfer_duration_s`). Raises ValueError naming the link when the bandwidth is
        not a finite number > 0 or the transfer cannot finish (rate 0, NaN, or more than
        :data:`MAX_TRANSFER_BLOCKS` coherence blocks)."""
        if not (math.isfinite(bandwidth_hz) and bandwidth_hz > 0):
            raise ValueError(f"{self.name}: bandwidth_hz={bandwidth_hz!r} for size_bits={size_bits!r}; "
                             "allowed: a finite number > 0")
        if self.fixed_rate:
            return self._fixed_rate_transfer_duration_s(size_bits, start_s, bandwidth_hz)
        with np.errstate(all="ignore"):
            mean_snr = self.tx_power_w * self.large_scale_gain / (self._noise_w_per_hz * bandwidth_hz)
            mean_rate = float(bandwidth_hz * np.log2(1.0 + mean_snr))
        return transfer_duration_s(size_bits, start_s, self.fading.coherence_time_s,
                                   lambda b: self.rate_bps(b, bandwidth_hz),
                                   lambda b, n: self.rates_bps(b, n, bandwidth_hz),
                                   link_name=self.name, mean_rate_bps=mean_rate,
                                   constant_rate=self.fading.kind == "none")

    def _fixed_rate_transfer_duration_s(self, size_bits: float, start_s: float, bandwidth_hz: float) -> float:
        """Fixed-rate transfer: only blocks out of outage carry R B bit/s. The mean rate is
        exactly R B (1 - P_out), so the up-front bound on the number of blocks is
        size_bits / (R B T_c (1 - P_out)); a link whose success probability makes that exceed
        :data:`MAX_TRANSFER_BLOCKS` is an error that names the outage probability."""
        rate_ok = self.spectral_efficiency_bps_per_hz * bandwidth_hz
        with np.errstate(all="ignore"):
            p_out = self.outage_probability(bandwidth_hz)
            mean_rate = rate_ok * (1.0 - p_out)
        tc = self.fading.coherence_time_s
        if size_bits > 0 and math.isfinite(size_bits) and math.isfinite(tc) and tc > 0 and not (
                mean_rate * tc * MAX_TRANSFER_BLOCKS >= size_bits):
            mean_snr_db = self.mean_snr_db(bandwidth_hz)
            threshold_db = 10.0 * math.log10(self.threshold_snr)
            raise ValueError(
                f"{self.name}: cannot send size_bits={size_bits!r} at the fixed rate "
                f"{self.spectral_efficiency_bps_per_hz} bit/s/Hz x {bandwidth_hz} Hz: mean SNR {mean_snr_db:.1f} dB "
                f"against the decoding threshold 2^R - 1 = {threshold_db:.1f} dB gives an outage probability "
                f"{p_out!r} per coherence block, so the transfer would need more than {MAX_TRANSFER_BLOCKS} coherence "
                f"blocks of {tc} s; lower channel.fixed_spectral_efficiency_bps_per_hz or check the bandwidths, "
                "powers, noise PSD and positions of the scenario")
        return transfer_duration_s(size_bits, start_s, tc,
                                   lambda b: self.rate_bps(b, bandwidth_hz),
                                   lambda b, n: self.rates_bps(b, n, bandwidth_hz),
                                   link_name=self.name, mean_rate_bps=mean_rate,
                                   constant_rate=self.fading.kind == "none")

    def mean_snr_db(self, bandwidth_hz: float) -> float:
        """SNR with the fading averaged out (E|h|^2 = 1) [dB]; -inf for a zero SNR, NaN for a
        NaN one (callers that need a rate get a clear error from :meth:`transfer_duration_s`)."""
        snr = self.tx_power_w * self.large_scale_gain / (self._noise_w_per_hz * bandwidth_hz)
        if not snr > 0:
            return -math.inf if snr == 0 else math.nan
        return 10.0 * math.log10(snr)


MAX_TRANSFER_BLOCKS = 1 << 26
"""Most coherence blocks one transfer may span (about 67 million: 7.8 days at T_c = 10 ms);
a transfer that needs more is an error (an absurd rate), never a loop without end."""


def _rate_error(link_name: str, size_bits: float, rate, block: int, why: str) -> ValueError:
    return ValueError(f"{link_name}: cannot send size_bits={size_bits!r}: rate {rate!r} bit/s in coherence "
                      f"block {block} {why}; check the bandwidths, powers, noise PSD and positions of the scenario")


def _check_rate(rate: float, link_name: str, size_bits: float, block: int) -> float:
    """A block's rate must be a finite number >= 0 (0: a deep fade, that block sends nothing)."""
    if not (rate >= 0.0 and math.isfinite(rate)):
        raise _rate_error(link_name, size_bits, rate, block, "(allowed: a finite number >= 0)")
    return rate


def transfer_duration_s(size_bits: float, start_s: float, coherence_time_s: float, rate_of_block,
                        rates_of_blocks=None, scalar_blocks: int = 16, *, link_name: str = "link",
                        mean_rate_bps: Optional[float] = None, constant_rate: bool = False,
                        max_blocks: int = MAX_TRANSFER_BLOCKS) -> float:
    """Time to send ``size_bits`` starting at ``start_s`` over a block-fading channel [s].

    The part of the payload sent in coherence block b goes at that block's rate R_b:

    .. math::
        S = \\sum_b R_b \\, \\tau_b, \\qquad T = \\sum_b \\tau_b

    where tau_b is the time spent in block b (T_c, or less in the first and last block). With
    a constant rate R this is S / R.

    ``rate_of_block(b)`` gives R_b [bit/s]. For long transfers, ``rates_of_blocks(b, n)``
    (optional) gives the rates of n consecutive blocks as an array: after ``scalar_blocks``
    blocks walked one by one, the rest is walked in growing vectorised chunks.

    Bounded: a NaN, infinite or negative rate raises ValueError naming ``link_name``,
    ``size_bits`` and the rate; so does a transfer that needs more than ``max_blocks`` coherence
    blocks (checked up front from ``mean_rate_bps``, the rate at the mean SNR, an upper bound
    of the mean rate by Jensen's inequality; exactly for ``constant_rate`` links; and by
    counting the blocks walked otherwise). A block of rate 0 (a deep fade) sends nothing.
    """
    if not (math.isfinite(size_bits) and size_bits >= 0):
        raise ValueError(f"{link_name}: size_bits={size_bits!r}; allowed: a finite number >= 0")
    if not math.isfinite(start_s):
        raise ValueError(f"{link_name}: start_s={start_s!r} for size_bits={size_bits!r}; allowed: a finite time")
    if not (math.isfinite(coherence_time_s) and coherence_time_s > 0):
        raise ValueError(f"{link_name}: coherence_time_s={coherence_time_s!r}; allowed: a finite number > 0")
    if size_bits <= 0:
        return 0.0
    if mean_rate_bps is not None:
        if not (mean_rate_bps >= 0 and math.isfinite(mean_rate_bps)) or (constant_rate and mean_rate_bps == 0):
            raise _rate_error(link_name, size_bits, mean_rate_bps, 0, "(allowed: a finite number > 0)")
        if not mean_rate_bps * coherence_time_s * max_blocks >= size_bits:
            raise _rate_error(link_name, size_bits, mean_rate_bps, 0,
                              f"at the mean SNR would need more than {max_blocks} coherence blocks of "
                              f"{coherence_time_s} s")
    remaining = float(size_bits)
    t = float(start_s)
    block = int(math.floor(t / coherence_time_s + 1e-9))
    first_block = block
    rate = math.nan
    for _ in range(min(scalar_blocks, max_blocks) if rates_of_blocks is not None else max_blocks):
        rate = _check_rate(rate_of_block(block), link_name, size_bits, block)
        block_end = (block + 1) * coherence_time_s
        available_s = max(block_end - t, 0.0)
        if rate * available_s >= remaining:
            return t + remaining / rate - start_s
        remaining -= rate * available_s
        t = block_end
        block += 1
    if rates_of_blocks is None:
        raise _rate_error(link_name, size_bits, rate, block, f"leaves the transfer unfinished after {max_blocks} "
                          "coherence blocks")
    chunk = 64
    while True:
        if block - first_block >= max_blocks:
            raise _rate_error(link_name, size_bits, rate, block, "leaves the transfer unfinished "
                              f"after {max_blocks} coherence blocks")
        rates = np.asarray(rates_of_blocks(block, chunk), dtype=np.float64)
        bad = ~(np.isfinite(rates) & (rates >= 0.0))
        if bad.any():
            i = int(np.argmax(bad))
            raise _rate_error(link_name, size_bits, float(rates[i]), block + i, "(allowed: a finite number >= 0)")
        rate = float(rates[-1])
        sent = np.cumsum(rates * coherence_time_s)
        if sent[-1] >= remaining:
            i = int(np.searchsorted(sent, remaining))
            before_bits = float(sent[i - 1]) if i > 0 else 0.0
            return t + i * coherence_time_s + (remaining - before_bits) / float(rates[i]) - start_s
        remaining -= float(sent[-1])
        t += chunk * coherence_time_s
        block += chunk
        chunk = min(chunk * 4, 1 << 16)
