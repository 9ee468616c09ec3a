"""The over-the-air feature connection against the digital sum and netsim/aircomp's closed form."""
import math

import numpy as np
import pytest

from netsim.aircomp import over_the_air_sum
from netsim.channel import noise_power_w
from netsim.network import Network
from netsim.aircomp import value_gains
from netsim.protocols.neural_aircomp import FeatureChannelConfig, aircomp_latency_s, feature_channel
from netsim.scenario import Scenario


def links(k=4, fading="rayleigh", seed=0):
    sc = Scenario.model_validate({"name": "t", "trainer": "fake", "devices": [{"count": k}],
                                  "channel": {"fading": fading, "uplink_bandwidth_hz": 10e6}})
    return sc, [d.uplink for d in Network(sc, seed).devices]


def cfg(sc, snr=None, g_th=0.1, m=666, coherence=0.01):
    return FeatureChannelConfig(num_subcarriers=m, subcarrier_spacing_hz=15e3,
                                noise_w_per_subcarrier=noise_power_w(sc.channel, 15e3), truncation_threshold=g_th,
                                power_policy="average", cyclic_prefix_fraction=0.07, coherence_time_s=coherence,
                                receive_snr_db=snr)


def features(k, q, seed=1):
    return np.random.default_rng(seed).normal(0.3, 1.0, size=(k, q))


def test_noise_off_without_truncation_is_the_digital_sum_exactly():
    torch = pytest.importorskip("torch")
    from fomo.neural_connection import connection

    sc, ls = links(fading="none")                       # |h|^2 = 1 >= g_th: nothing truncated
    f = torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(0))
    for a in (torch.full((4,), 0.25), torch.ones(4)):   # mean and sum
        ch = cfg(sc, snr=math.inf)
        connect = lambda x, w: feature_channel(x, w, ls, ch, 0.0, np.random.default_rng(0))[:2]
        air = connection(f, a, connect)
        digital = connection(f, a, None)
        assert torch.equal(air, digital)
        assert torch.equal(digital, (a.view(4, 1, 1) * f).sum(0))


def test_noise_off_with_rayleigh_is_the_truncated_sum_exactly():
    torch = pytest.importorskip("torch")
    from fomo.neural_connection import connection

    sc, ls = links()
    f = torch.randn(4, 8, 100, generator=torch.Generator().manual_seed(0))
    a = torch.full((4,), 0.25)
    ch = cfg(sc, snr=math.inf)
    chi, noise, st = feature_channel(f.reshape(4, -1).double().numpy(), a.double().numpy(), ls, ch, 0.0,
                                     np.random.default_rng(0))
    assert not noise.any() and 0.05 < st.truncation_ratio < 0.15 and st.receive_snr_db == math.inf
    air = connection(f, a, lambda x, w: (chi, noise))
    mask = torch.from_numpy(chi.reshape(4, 8, 100)).float()
    assert torch.equal(air, (a.view(4, 1, 1) * mask * f).sum(0))


@pytest.mark.parametrize("snr", [None, -10.0, 0.0, 10.0])
def test_mse_matches_closed_form(snr):
    sc, ls = links()
    x = features(4, 40_000)
    a = np.full(4, 0.25)
    mse, theory = [], []
    rng = np.random.default_rng(3)
    for t in range(4):
        _, _, st = feature_channel(x, a, ls, cfg(sc, snr=snr), 0.01 * t, rng)
        mse.append(st.mse)
        theory.append(st.mse_theory)
        if snr is not None:
            assert st.receive_snr_db == pytest.approx(snr)
    assert np.mean(mse) == pytest.approx(np.mean(theory), rel=0.05)


def test_same_estimate_as_over_the_air_sum():
    """With the links' real noise, the feature channel is netsim.aircomp.over_the_air_sum."""
    sc, ls = links()
    x = features(4, 5000)
    a = np.array([0.1, 0.2, 0.3, 0.4])
    ch = cfg(sc)
    chi, noise, st = feature_channel(x, a, ls, ch, 0.013, np.random.default_rng(7))
    est, ref = over_the_air_sum(x, a, ls, num_subcarriers=666, subcarrier_spacing_hz=15e3,
                                noise_w_per_subcarrier=ch.noise_w_per_subcarrier, truncation_threshold=0.1,
                                start_s=0.013, coherence_time_s=0.01, cyclic_prefix_fraction=0.07,
                                rng=np.random.default_rng(7))
    mine = np.sum(np.where(chi, a[:, None] * x, 0.0), axis=0) + noise
    np.testing.assert_allclose(mine, est, rtol=1e-9, atol=1e-12)
    assert st.truncation_ratio == pytest.approx(ref.truncation_ratio)
    assert st.mse_theory == pytest.approx(ref.mse_theory, rel=1e-12)
    assert st.latency_s == pytest.approx(ref.latency_s) == aircomp_latency_s(5000, 666, 15e3, 0.07)
    np.testing.assert_allclose(st.tx_energy_j, ref.tx_energy_j, rtol=1e-12)


def test_value_gains_cross_coherence_blocks():
    sc, ls = links(k=2)
    t_sym = 1.07 / 15e3
    g = value_gains(ls, 3 * 666, 666, t_sym, start_s=0.01 - 1.5 * t_sym, coherence_time_s=0.01)
    block0 = ls[0].fading.power_gains(0, 666)
    block1 = ls[0].fading.power_gains(666, 666)
    np.testing.assert_array_equal(g[0, :666], block0)        # symbols 0 and 1 start before 0.01 s
    np.testing.assert_array_equal(g[0, 666:1332], block0)
    np.testing.assert_array_equal(g[0, 1332:], block1)       # symbol 2 starts after 0.01 s


def test_feature_gradient_is_a_chi_times_broadcast():
    torch = pytest.importorskip("torch")
    from fomo.neural_connection import connection

    sc, ls = links(k=3)
    f = torch.randn(3, 4, 50, generator=torch.Generator().manual_seed(1), requires_grad=True)
    a = torch.full((3,), 1.0)                           # sum
    out = {}

    def connect(x, w):
        out["chi"], out["noise"], _ = feature_channel(x, w, ls, cfg(sc, snr=0.0), 0.0, np.random.default_rng(0))
        return out["chi"], out["noise"]

    z = connection(f, a, connect)
    g = torch.randn_like(z)
    (z * g).sum().backward()
    expected = torch.from_numpy(out["chi"].reshape(3, 4, 50)).float() * g.unsqueeze(0)
    assert torch.equal(f.grad, expected)
