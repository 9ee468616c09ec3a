"""Broadband analog aggregation (netsim.aircomp) against its closed forms."""
import math

import numpy as np
import pytest

from netsim.aircomp import (aircomp_latency_s, expected_mse, ofdm_symbol_s, ofdma_latency_s,
                            over_the_air_sum, receive_power, truncation_probability)
from netsim.channel import BlockFading, Link
from netsim.network import child_rng
from netsim.scenario import ChannelSpec

SPACING = 15e3
T_SYM = ofdm_symbol_s(SPACING)


def links(k, gains=None, power=0.2, seed=0):
    gains = [1e-10] * k if gains is None else gains
    return [Link(g, power, BlockFading("rayleigh", 0.01, child_rng(seed, 7, i)), ChannelSpec())
            for i, g in enumerate(gains)]


def air(x, ls, g_th, noise_w, policy="average", weights=None, seed=0, start_s=0.0, debias=False):
    # a new coherence block every symbol: independent fading for every entry
    return over_the_air_sum(x, weights, ls, num_subcarriers=64, subcarrier_spacing_hz=SPACING,
                            noise_w_per_subcarrier=noise_w, truncation_threshold=g_th, power_policy=policy,
                            start_s=start_s, coherence_time_s=T_SYM, rng=np.random.default_rng(seed),
                            debias=debias)


@pytest.mark.parametrize("g_th,noise_w,policy", [
    (1e-4, 1e-15, "average"),   # noise dominated: MSE = s^2 sigma^2 / (2 K^2 rho0)
    (0.3, 1e-18, "average"),    # truncation dominated
    (0.1, 3e-16, "peak"),       # both
])
def test_measured_mse_matches_closed_form(g_th, noise_w, policy):
    rng = np.random.default_rng(1)
    k, q = 6, 64 * 400
    x = rng.normal(0.0, 1.0, (k, q)) + 0.5
    w = rng.random(k)
    w /= w.sum()
    ls = links(k, gains=list(10 ** rng.uniform(-10, -9, k)))
    measured, theory = [], []
    for trial in range(4):
        est, st = air(x, ls, g_th, noise_w, policy, weights=w, seed=trial, start_s=trial * 1.0)
        assert st.mse == pytest.approx(np.mean((est - w @ x) ** 2))
        measured.append(st.mse)
        theory.append(st.mse_theory)
    assert np.mean(measured) == pytest.approx(np.mean(theory), rel=0.05)


@pytest.mark.parametrize("g_th,noise_w", [(0.5, 1e-18), (0.1, 3e-16), (1.0, 1e-15)])
def test_debiased_estimate_is_unbiased_and_matches_closed_form(g_th, noise_w):
    """debias=True divides by 1 - p = exp(-g_th): the mean error over many entries is ~0 (the
    BAA estimate is shrunk by 1 - p), and the MSE follows sum a^2 x^2 p/(1-p) + noise/(1-p)^2."""
    rng = np.random.default_rng(2)
    k, q = 6, 64 * 400
    x = rng.normal(0.0, 1.0, (k, q)) + 1.0
    ls = links(k, gains=list(10 ** rng.uniform(-10, -9, k)))
    exact = x.mean(axis=0)
    est, st = air(x, ls, g_th, noise_w, debias=True)
    biased, _ = air(x, ls, g_th, noise_w, debias=False)
    keep = math.exp(-g_th)
    assert np.mean(est) / np.mean(exact) == pytest.approx(1.0, abs=0.02)
    assert np.mean(biased) / np.mean(exact) == pytest.approx(keep, abs=0.02)
    np.testing.assert_allclose(est * keep, biased, rtol=1e-12, atol=1e-15)   # same draws, rescaled
    measured, theory = [], []
    for trial in range(4):
        est, st = air(x, ls, g_th, noise_w, weights=None, seed=trial, start_s=trial * 1.0, debias=True)
        measured.append(st.mse)
        theory.append(st.mse_theory)
    assert np.mean(measured) == pytest.approx(np.mean(theory), rel=0.05)


def test_noise_term_and_receive_snr():
    ls = links(4)
    x = np.ones((4, 64 * 100))
    _, st = air(x, ls, 1e-3, 1e-15)
    rho0 = receive_power("average", 1e-3, np.full(4, 0.2 / 64), np.full(4, 1e-10))
    assert st.rho0_w == pytest.approx(rho0)
    assert st.receive_snr_db == pytest.approx(10 * math.log10(rho0 / 1e-15))
    # s = 1 for all-ones updates; truncation term ~ (p)^2 tiny at g_th = 1e-3
    noise_mse = 1e-15 / (2 * 16 * rho0)
    assert expected_mse(x, np.full(4, 0.25), np.zeros(4), 1.0, 1e-15, rho0) == pytest.approx(noise_mse)


def test_noiseless_no_truncation_is_exact():
    ls = links(3)
    x = np.random.default_rng(0).normal(size=(3, 1000))
    est, st = air(x, ls, 1e-12, 1e-40)
    np.testing.assert_allclose(est, x.mean(axis=0), atol=1e-9)
    assert st.truncation_ratio == 0.0


@pytest.mark.parametrize("g_th", [0.05, 0.2, 1.0])
def test_truncation_ratio_matches_rayleigh(g_th):
    k, q = 5, 64 * 500
    _, st = air(np.ones((k, q)), links(k), g_th, 1e-18)
    assert st.truncation_ratio == pytest.approx(truncation_probability(g_th), abs=0.01)


@pytest.mark.parametrize("g_mean", [1e-10, 3e-9])
def test_received_gain_truncation_vs_one_minus_exp(g_mean):
    """Truncating on the received gain g |h|^2 >= g_th: P = 1 - exp(-g_th / g_mean)."""
    link = links(1, gains=[g_mean])[0]
    gains = link.large_scale_gain * link.fading.power_gains(0, 200_000)
    for ratio in (0.1, 0.5, 2.0):
        g_th = ratio * g_mean
        assert np.mean(gains < g_th) == pytest.approx(1 - math.exp(-g_th / g_mean), abs=0.005)


def test_power_budget_is_respected():
    """average policy: realised mean power per sub-carrier of the weakest device ~ P/M;
    peak policy: never above P/M on any entry (energy / time <= P)."""
    k, q = 4, 64 * 2000
    gains = [1e-10, 3e-10, 1e-9, 5e-9]
    ls = links(k, gains=gains, power=0.2)
    _, st = air(np.ones((k, q)), ls, 0.2, 1e-18, "average")
    mean_power = np.array(st.tx_energy_j) / st.latency_s          # W over the whole band
    assert mean_power[0] == pytest.approx(0.2, rel=0.05)           # weakest device sets rho0
    assert np.all(mean_power <= 0.2 * 1.05)
    _, st = air(np.ones((k, q)), ls, 0.2, 1e-18, "peak")
    assert np.all(np.array(st.tx_energy_j) / st.latency_s <= 0.2 + 1e-12)


def test_latency_formula():
    assert aircomp_latency_s(1000, 100, 15e3) == pytest.approx(10 / 15e3)
    assert aircomp_latency_s(1001, 100, 15e3, 0.07) == pytest.approx(11 * 1.07 / 15e3)


def test_latency_ratio_grows_linearly_with_devices():
    q, m, bw = 75_000, 666, 666 * 15e3
    t_air = aircomp_latency_s(q, m, 15e3)
    ks = np.array([5, 10, 20, 50, 100])
    # fixed per-device SNR: exactly linear
    ratio = np.array([ofdma_latency_s(q, 32, bw, [100.0] * k) / t_air for k in ks])
    np.testing.assert_allclose(ratio / ks, ratio[0] / ks[0], rtol=1e-12)
    # power-limited devices (SNR grows as the share shrinks): still nearly linear
    snr_full = 10.0   # P g / (N0 B) over the full band
    ratio = np.array([ofdma_latency_s(q, 32, bw, [snr_full * k] * k) / t_air for k in ks])
    slope, intercept = np.polyfit(ks, ratio, 1)
    fit = slope * ks + intercept
    r2 = 1 - np.sum((ratio - fit) ** 2) / np.sum((ratio - ratio.mean()) ** 2)
    assert np.all(np.diff(ratio) > 0) and r2 > 0.99
    # AirComp air time does not depend on K at all
    assert len({aircomp_latency_s(q, m, 15e3) for _ in ks}) == 1
