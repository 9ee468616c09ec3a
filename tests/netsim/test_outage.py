"""Fixed-rate transmission with outage (channel.rate_mode: fixed) against theory.

A block of SNR gamma_b carries R B bit/s when gamma_b >= 2^R - 1 and nothing otherwise; with
Rayleigh fading P(outage) = 1 - exp(-(2^R - 1) / mean SNR).
"""
import math

import numpy as np
import pytest

from netsim.channel import (MAX_TRANSFER_BLOCKS, BlockFading, Link, outage_probability, outage_threshold_snr,
                            shannon_rate_bps)
from netsim.scenario import ChannelSpec

BW_HZ = 1e6


def _link(mean_snr: float, *, r: float = 2.0, fading: str = "rayleigh", seed: int = 1, tc: float = 0.01,
          mode: str = "fixed") -> Link:
    """A link whose mean SNR over BW_HZ is ``mean_snr`` (linear)."""
    ch = ChannelSpec(rate_mode=mode, fixed_spectral_efficiency_bps_per_hz=r, fading=fading, coherence_time_s=tc)
    probe = Link(1.0, 1.0, BlockFading(fading, tc, np.random.default_rng(0)), ch)
    unit_snr = 10.0 ** (probe.mean_snr_db(BW_HZ) / 10.0)  # SNR of gain 1, power 1
    return Link(mean_snr / unit_snr, 1.0, BlockFading(fading, tc, np.random.default_rng(seed)), ch, name="test link")


def test_threshold_and_outage_formula():
    assert outage_threshold_snr(2.0) == 3.0
    assert outage_threshold_snr(1.0) == 1.0
    assert outage_probability(3.0, 3.0) == pytest.approx(1.0 - math.exp(-1.0), rel=1e-15)
    assert outage_probability(1e6, 1.0) == pytest.approx(1e-6, rel=1e-6)   # small-ratio accuracy (expm1)
    assert outage_probability(0.0, 1.0) == 1.0
    assert outage_probability(5.0, 0.0) == 0.0
    with pytest.raises(ValueError, match="mean_snr"):
        outage_probability(-1.0, 1.0)


@pytest.mark.parametrize("mean_snr_db", [0.0, 5.0, 10.0, 20.0])
def test_fraction_of_blocks_in_outage_matches_rayleigh(mean_snr_db):
    mean_snr = 10.0 ** (mean_snr_db / 10.0)
    link = _link(mean_snr, r=2.0)
    n = 200_000
    rates = link.rates_bps(0, n, BW_HZ)
    # every block carries either R B or nothing
    assert set(np.unique(rates).tolist()) <= {0.0, 2.0 * BW_HZ}
    p = outage_probability(mean_snr, 3.0)
    assert link.outage_probability(BW_HZ) == pytest.approx(p, rel=1e-12)
    frac = float(np.mean(rates == 0.0))
    assert abs(frac - p) <= 5.0 * math.sqrt(p * (1.0 - p) / n) + 1e-12


def test_scalar_and_vector_rates_agree_in_fixed_mode():
    link = _link(3.0, r=1.5)
    vec = link.rates_bps(40, 300, BW_HZ)
    assert vec.tolist() == [link.rate_bps(b, BW_HZ) for b in range(40, 340)]
    # the decision is made on the block's SNR against 2^R - 1
    for b in range(40, 340):
        ok = link.snr(b, BW_HZ) >= 2.0 ** 1.5 - 1.0
        assert link.rate_bps(b, BW_HZ) == (1.5 * BW_HZ if ok else 0.0)


def test_shannon_mode_is_unchanged():
    link = _link(3.0, mode="shannon")
    assert link.outage_probability(BW_HZ) == 0.0
    for b in range(20):
        assert link.rate_bps(b, BW_HZ) == shannon_rate_bps(BW_HZ, link.snr(b, BW_HZ))


def _direct_transfer_s(link: Link, size_bits: float, start_s: float, r: float) -> float:
    """Reference: count successful blocks one by one (SNR from the gains, threshold 2^R - 1)."""
    tc = link.fading.coherence_time_s
    per_s = r * BW_HZ
    block = int(math.floor(start_s / tc + 1e-9))
    t, left = start_s, size_bits
    mean_snr = 10.0 ** (link.mean_snr_db(BW_HZ) / 10.0)
    while True:
        ok = mean_snr * link.fading.power_gain(block) >= 2.0 ** r - 1.0
        span = (block + 1) * tc - t
        if ok and per_s * span >= left:
            return t + left / per_s - start_s
        if ok:
            left -= per_s * span
        t, block = (block + 1) * tc, block + 1


# sizes that do not fill a whole number of blocks (an exact fill is ill-conditioned: one ulp
# decides whether the transfer ends now or at the next successful block)
@pytest.mark.parametrize("mean_snr_db,size_bits,start_s", [(5.0, 2.011e6, 0.0), (0.0, 7.3e5, 0.0137),
                                                             (10.0, 3.3e4, 1.2345), (-3.0, 4.0033e6, 2.0)])
def test_transfer_counts_only_successful_blocks(mean_snr_db, size_bits, start_s):
    r = 2.0
    link = _link(10.0 ** (mean_snr_db / 10.0), r=r, seed=7)
    t = link.transfer_duration_s(size_bits, start_s, BW_HZ)
    assert t == pytest.approx(_direct_transfer_s(link, size_bits, start_s, r), rel=1e-9, abs=1e-12)
    # never faster than with no outage at all
    assert t >= size_bits / (r * BW_HZ) * (1 - 1e-12)


def test_transfer_from_block_start_is_whole_successful_blocks():
    """From a block boundary, k successful blocks' worth of bits ends exactly at the end of the
    k-th successful block."""
    r, tc = 2.0, 0.01
    link = _link(2.0, r=r, seed=11, tc=tc)
    ok = link.rates_bps(0, 5000, BW_HZ) > 0
    k = 300
    index_of_kth = int(np.flatnonzero(ok)[k - 1])
    t = link.transfer_duration_s(k * r * BW_HZ * tc, 0.0, BW_HZ)
    assert t == pytest.approx((index_of_kth + 1) * tc, rel=1e-9)


def test_no_fading_fixed_rate():
    above = _link(4.0, r=2.0, fading="none")   # SNR 4 >= 3: always decodable
    assert above.outage_probability(BW_HZ) == 0.0
    assert above.transfer_duration_s(1e6, 0.3, BW_HZ) == pytest.approx(1e6 / (2.0 * BW_HZ), rel=1e-12)
    below = _link(2.0, r=2.0, fading="none")   # SNR 2 < 3: every block in outage
    assert below.outage_probability(BW_HZ) == 1.0
    with pytest.raises(ValueError, match=r"test link.*outage probability 1\.0"):
        below.transfer_duration_s(1e6, 0.0, BW_HZ)


def test_hopeless_link_is_a_clear_error_not_a_long_walk():
    # mean SNR -30 dB against a threshold of 2^8 - 1 = 24 dB: P(success) = exp(-255000) = 0
    link = _link(1e-3, r=8.0)
    with pytest.raises(ValueError, match=r"test link.*fixed rate.*outage probability.*"
                                         f"{MAX_TRANSFER_BLOCKS} coherence"):
        link.transfer_duration_s(1e6, 0.0, BW_HZ)
    # a rare success (P ~ 1e-7) for a payload needing ~1e3 successful blocks: ~1e10 blocks expected
    link = _link(3.0 / (-math.log(1e-7)), r=2.0)
    assert 1.0 - link.outage_probability(BW_HZ) == pytest.approx(1e-7, rel=1e-9)
    with pytest.raises(ValueError, match="outage probability"):
        link.transfer_duration_s(1e3 * 2.0 * BW_HZ * 0.01, 0.0, BW_HZ)
    # zero bits never fail
    assert link.transfer_duration_s(0.0, 0.0, BW_HZ) == 0.0
