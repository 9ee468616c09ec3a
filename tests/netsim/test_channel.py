"""Channel maths against theory."""
import math

import numpy as np
import pytest

from netsim.channel import BlockFading, Link, noise_power_w, pathloss_db, shannon_rate_bps, transfer_duration_s
from netsim.scenario import ChannelSpec, PathLossSpec


def test_rayleigh_mean_power_gain_is_one():
    fading = BlockFading("rayleigh", 0.01, np.random.default_rng(1))
    n = 200_000
    gains = np.array([fading.power_gain(b) for b in range(n)])
    # |h|^2 ~ Exp(1): mean 1, std 1, so the sample mean has std 1/sqrt(n).
    assert abs(gains.mean() - 1.0) < 4.0 / math.sqrt(n)
    # and the exponential law: P(g > 1) = e^-1
    assert abs((gains > 1.0).mean() - math.exp(-1.0)) < 4.0 * math.sqrt(math.exp(-1) * (1 - math.exp(-1)) / n)


def test_vectorised_gains_equal_scalar_gains():
    fading = BlockFading("rayleigh", 0.01, np.random.default_rng(2))
    vec = fading.power_gains(100, 50)
    assert vec.tolist() == [fading.power_gain(b) for b in range(100, 150)]


def test_long_transfer_over_fading_matches_block_by_block_sum():
    ch = ChannelSpec()
    link = Link(1e-11, 0.2, BlockFading("rayleigh", 0.01, np.random.default_rng(3)), ch)
    size, start, bw = 5e6, 0.0137, 1e5
    t = link.transfer_duration_s(size, start, bw)
    # independent reference: walk block by block with the scalar rate
    left, now, b = size, start, int(start / 0.01)
    while True:
        r = link.rate_bps(b, bw)
        span = (b + 1) * 0.01 - now
        if r * span >= left:
            now += left / r
            break
        left -= r * span
        now, b = (b + 1) * 0.01, b + 1
    assert t == pytest.approx(now - start, rel=1e-9)
    assert t > 0.5  # spans many coherence blocks


def test_fading_block_does_not_depend_on_query_order():
    a = BlockFading("rayleigh", 0.01, np.random.default_rng(5))
    b = BlockFading("rayleigh", 0.01, np.random.default_rng(5))
    late = a.power_gain(500)
    early = [b.power_gain(i) for i in range(501)]
    assert early[500] == late
    assert a.power_gain(3) == early[3]


@pytest.mark.parametrize("size_bits,rate_bps", [(1e6, 1e6), (8 * 301_072, 3.7e6), (5.0, 1e9)])
def test_fixed_rate_transfer_takes_s_over_r(size_bits, rate_bps):
    for start in (0.0, 0.0123, 7.5):
        t = transfer_duration_s(size_bits, start, 0.01, lambda b: rate_bps)
        assert t == pytest.approx(size_bits / rate_bps, rel=1e-9)
        t = transfer_duration_s(size_bits, start, 0.01, lambda b: rate_bps, lambda b, n: np.full(n, rate_bps),
                                scalar_blocks=0)
        assert t == pytest.approx(size_bits / rate_bps, rel=1e-9)


def test_transfer_uses_each_blocks_rate():
    rates = {0: 1000.0, 1: 3000.0, 2: 500.0}
    # start at 0.5 of block 0 (T_c = 1 s): 500 bits in block 0, 3000 in block 1, then 250 bits at 500 bit/s
    t = transfer_duration_s(3750, 0.5, 1.0, lambda b: rates[b])
    assert t == pytest.approx(0.5 + 1.0 + 0.5)
    t = transfer_duration_s(3750, 0.5, 1.0, lambda b: rates[b],
                            lambda b, n: np.array([rates.get(b + i, 1.0) for i in range(n)]), scalar_blocks=1)
    assert t == pytest.approx(0.5 + 1.0 + 0.5)


def test_pathloss_umi_matches_38901_formula():
    spec = PathLossSpec(model="umi_los")
    assert pathloss_db(spec, 100.0, 3.5e9) == pytest.approx(32.4 + 21 * 2 + 20 * math.log10(3.5))
    nlos = PathLossSpec(model="umi_nlos")
    assert pathloss_db(nlos, 100.0, 3.5e9) == pytest.approx(35.3 * 2 + 22.4 + 21.3 * math.log10(3.5))
    # NLOS is never below LOS, and loss grows with distance
    for d in (10, 50, 200, 1000):
        assert pathloss_db(nlos, d, 3.5e9) >= pathloss_db(spec, d, 3.5e9)
        assert pathloss_db(nlos, d * 2, 3.5e9) > pathloss_db(nlos, d, 3.5e9)
    assert pathloss_db(PathLossSpec(model="log_distance", exponent=3, ref_loss_db=40), 100, 2e9) == pytest.approx(100.0)


def test_noise_and_shannon():
    ch = ChannelSpec(noise_psd_dbm_per_hz=-174, noise_figure_db=0)
    # -174 dBm/Hz over 1 MHz = -114 dBm = 10^-14.4 W
    assert noise_power_w(ch, 1e6) == pytest.approx(10 ** (-14.4), rel=1e-9)
    assert shannon_rate_bps(1e6, 1.0) == pytest.approx(1e6)
    assert shannon_rate_bps(2e6, 3.0) == pytest.approx(4e6)


def test_link_snr_scales_with_bandwidth_and_no_fading():
    ch = ChannelSpec(fading="none")
    link = Link(1e-10, 0.2, BlockFading("none", 0.01, np.random.default_rng(0)), ch)
    assert link.snr(0, 1e6) == pytest.approx(2 * link.snr(0, 2e6))
    assert 10 * math.log10(link.snr(7, 1e6)) == pytest.approx(link.mean_snr_db(1e6))


# ------------------------------------------------------------------ bounded transfers
def _link(gain=1e-11, power=0.2, kind="rayleigh", name="uplink dev7->edge0"):
    return Link(gain, power, BlockFading(kind, 0.01, np.random.default_rng(3)), ChannelSpec(fading=kind), name=name)


@pytest.mark.parametrize("bandwidth_hz", [0.0, -1.0, math.nan, math.inf])
def test_bad_bandwidth_is_an_error_naming_the_link(bandwidth_hz):
    with pytest.raises(ValueError, match=r"uplink dev7->edge0.*bandwidth_hz=.*size_bits=8000"):
        _link().transfer_duration_s(8000.0, 0.0, bandwidth_hz)


@pytest.mark.parametrize("size_bits", [math.nan, math.inf, -1.0])
def test_bad_size_is_an_error(size_bits):
    with pytest.raises(ValueError, match=r"uplink dev7->edge0: size_bits="):
        _link().transfer_duration_s(size_bits, 0.0, 1e6)


@pytest.mark.parametrize("kind", ["rayleigh", "none"])
@pytest.mark.parametrize("gain,power", [(math.nan, 0.2), (1e-300, 1e-300), (0.0, 0.2), (1e-11, math.inf)])
def test_zero_or_nan_rate_raises_at_once_instead_of_looping(kind, gain, power):
    """A zero, NaN or infinite rate (from absurd floats) is a clear error naming the link, the
    size and the rate, before any block is walked (so in bounded time, however the rate came
    about)."""
    with pytest.raises(ValueError, match=r"uplink dev7->edge0: cannot send size_bits=8000000.0: rate .* bit/s"):
        _link(gain, power, kind).transfer_duration_s(8e6, 0.0, 1e6)


def test_transfer_needing_more_than_the_block_cap_raises_naming_the_rate():
    # mean rate 1 bit/s, T_c = 10 ms: 1e3 bits need 1e5 blocks > a cap of 1e4
    with pytest.raises(ValueError, match=r"rate 1.0 bit/s .* more than 10000 coherence blocks"):
        transfer_duration_s(1e3, 0.0, 0.01, lambda b: 1.0, lambda b, n: np.ones(n), mean_rate_bps=1.0,
                            max_blocks=10_000, link_name="l")
    # without the up-front estimate the walk itself stops at the cap (scalar and vectorised)
    with pytest.raises(ValueError, match=r"rate 0.0 bit/s .*unfinished after 1000 coherence blocks"):
        transfer_duration_s(1e3, 0.0, 0.01, lambda b: 0.0, max_blocks=1000, link_name="l")
    with pytest.raises(ValueError, match=r"unfinished after 100000 coherence blocks"):
        transfer_duration_s(1e3, 0.0, 0.01, lambda b: 0.0, lambda b, n: np.zeros(n), max_blocks=100_000,
                            link_name="l")
    # under the cap it is S / R exactly
    assert transfer_duration_s(50.0, 0.0, 0.01, lambda b: 1.0, lambda b, n: np.ones(n), mean_rate_bps=1.0,
                               max_blocks=10_000) == pytest.approx(50.0)


def test_nan_rate_in_a_later_block_raises():
    rates = lambda b, n: np.where(np.arange(b, b + n) == 100, math.nan, 1e3)  # noqa: E731
    with pytest.raises(ValueError, match=r"rate nan bit/s in coherence block 100"):
        transfer_duration_s(1e6, 0.0, 0.01, lambda b: 1e3, rates, link_name="l")


def test_a_deep_fade_with_rate_zero_sends_nothing_in_that_block():
    rates = {0: 0.0, 1: 0.0, 2: 1000.0}
    assert transfer_duration_s(500.0, 0.0, 1.0, lambda b: rates[b]) == pytest.approx(2.5)


def test_network_links_are_named():
    from netsim import Network
    from netsim.scenario import Scenario

    sc = Scenario.model_validate({"trainer": "fake", "devices": [{"count": 3}], "d2d": {"kind": "knn", "k": 1}})
    net = Network(sc, 0)
    assert net.devices[2].uplink.name == "uplink dev2->edge0"
    assert net.devices[2].downlink.name == "downlink edge0->dev2"
    i, j = next(iter(net.d2d.edges))
    assert net.d2d.edges[i, j]["link"].name == f"sidelink dev{min(i, j)}->dev{max(i, j)}"
    assert net.d2d.edges[i, j]["link_ba"].name == f"sidelink dev{max(i, j)}->dev{min(i, j)}"


def test_mean_snr_of_a_dead_link_is_minus_infinity_not_a_math_error():
    assert _link(gain=0.0).mean_snr_db(1e6) == -math.inf
    assert math.isnan(_link(gain=math.nan).mean_snr_db(1e6))
