"""Selection strategies: exact equivalence of `uniform` with the protocol's draws, top-k rules
against brute force, and sampling frequencies against their probabilities (5 sigma)."""
import math
from itertools import combinations

import numpy as np
import pytest

from netsim.network import child_rng
from netsim.strategies import SelectionContext, SelectionStrategy, StrategiesSpec, StrategyError, get


def context(n, rng, round=5, snr_db=None, flops=None, last_round=None, last_loss=None):
    return SelectionContext(
        round=round, now_s=12.5, rng=rng,
        mean_uplink_snr_db=np.zeros(n) if snr_db is None else np.asarray(snr_db, dtype=float),
        compute_flops_per_s=np.ones(n) if flops is None else np.asarray(flops, dtype=float),
        last_round=np.full(n, -1) if last_round is None else np.asarray(last_round),
        last_loss=np.full(n, np.nan) if last_loss is None else np.asarray(last_loss, dtype=float),
        num_examples=np.full(n, 10))


@pytest.mark.parametrize("seed", [0, 1, 7, 123])
def test_uniform_is_the_protocols_draw_bit_for_bit(seed):
    n = 23
    candidates = [0, 2, 3, 5, 8, 9, 11, 14, 15, 16, 20, 22]
    strategy = get("selection", "uniform")()
    mine, ref = child_rng(seed, 0, 4), child_rng(seed, 0, 4)
    for r, k in enumerate([1, 3, 5, 11, 4, 4], start=1):
        got = strategy.select(candidates, k, context(n, mine, round=r))
        want = sorted(candidates[int(i)] for i in ref.choice(len(candidates), size=k, replace=False))
        assert got == want
    # same state afterwards: the next draws agree too
    assert mine.integers(0, 2**62) == ref.integers(0, 2**62)


def test_all_candidates_when_k_covers_them_and_no_draw():
    rng = np.random.default_rng(3)
    state = rng.bit_generator.state
    for name in ("uniform", "channel_aware", "compute_aware", "power_of_choice", "age_based"):
        s = get("selection", name)()
        assert s.select([6, 1, 4], 3, context(8, rng)) == [1, 4, 6]
        assert s.select([6, 1, 4], 10, context(8, rng)) == [1, 4, 6]
        assert s.select([6, 1, 4], 0, context(8, rng)) == []
    assert rng.bit_generator.state == state


def test_bad_inputs_are_clear_errors():
    s = get("selection", "uniform")()
    ctx = context(5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="k=-1"):
        s.select([0, 1], -1, ctx)
    with pytest.raises(ValueError, match="repeat"):
        s.select([0, 1, 1], 1, ctx)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        s.select([0, 5], 1, ctx)
    with pytest.raises(ValueError, match="num_examples has 4 entries"):
        SelectionContext(round=1, now_s=0.0, rng=np.random.default_rng(0), mean_uplink_snr_db=np.zeros(5),
                         compute_flops_per_s=np.ones(5), last_round=np.zeros(5), last_loss=np.zeros(5),
                         num_examples=np.ones(4))

    class Bad(SelectionStrategy):
        def choose(self, candidates, k, ctx):
            return candidates[:1]

    with pytest.raises(StrategyError, match="expected 3 distinct devices"):
        Bad().select([0, 1, 2, 3], 3, ctx)


def test_channel_aware_top_k_matches_brute_force():
    rng = np.random.default_rng(11)
    n = 12
    snr = rng.normal(10, 8, n)
    snr[3] = -np.inf
    snr[7] = np.nan
    candidates = [0, 1, 3, 4, 5, 7, 8, 10, 11]
    s = get("selection", "channel_aware")()
    for k in range(1, len(candidates) - 1):   # (the last two, -inf and NaN, tie)
        best = max(combinations(candidates, k), key=lambda c: sum(np.nan_to_num(snr[list(c)], nan=-1e9, neginf=-1e9)))
        assert s.select(candidates, k, context(n, rng, snr_db=snr)) == sorted(best)


def test_channel_aware_softmax_probabilities():
    """k = 1: P(i) = exp(x_i/T) / sum_j exp(x_j/T). k = 2: successive sampling,
    P({i, j}) = p_i p_j / (1 - p_i) + p_j p_i / (1 - p_j)."""
    snr = np.array([0.0, 3.0, 6.0, -np.inf, 10.0])
    temp = 4.0
    s = get("selection", "channel_aware")(get("selection", "channel_aware").Params(softmax_temperature_db=temp))
    w = np.exp(np.where(np.isinf(snr), -np.inf, snr) / temp)
    p = w / w.sum()
    rng = np.random.default_rng(2024)
    draws = 12_000
    ones = np.zeros(5)
    pairs = {}
    for _ in range(draws):
        ones[s.select(range(5), 1, context(5, rng, snr_db=snr))[0]] += 1
        pair = tuple(s.select(range(5), 2, context(5, rng, snr_db=snr)))
        pairs[pair] = pairs.get(pair, 0) + 1
    sigma = np.sqrt(p * (1 - p) / draws)
    assert np.all(np.abs(ones / draws - p) <= 5 * sigma + 1e-12)
    assert ones[3] == 0
    for i, j in combinations(range(5), 2):
        pij = p[i] * p[j] / (1 - p[i]) + p[j] * p[i] / (1 - p[j])
        f = pairs.get((i, j), 0) / draws
        assert abs(f - pij) <= 5 * math.sqrt(pij * (1 - pij) / draws) + 1e-12, (i, j)


def test_compute_aware_top_k_and_random_ties():
    n = 10
    flops = np.array([1, 5, 3, 5, 2, 9, 9, 9, 0.5, 4], dtype=float)
    s = get("selection", "compute_aware")()
    rng = np.random.default_rng(5)
    assert s.select(range(n), 3, context(n, rng, flops=flops)) == [5, 6, 7]
    assert s.select([0, 2, 4, 8, 9], 2, context(n, rng, flops=flops)) == [2, 9]
    # 1 and 3 tie for the 4th place: each wins it half of the time
    draws = 4000
    wins = sum(1 in s.select(range(n), 4, context(n, rng, flops=flops)) for _ in range(draws))
    assert abs(wins / draws - 0.5) <= 5 * math.sqrt(0.25 / draws)


def test_power_of_choice_keeps_highest_losses_of_a_uniform_draw():
    n = 15
    loss = np.linspace(0.1, 1.5, n)
    loss[4] = np.nan
    cls = get("selection", "power_of_choice")
    candidates = list(range(n))
    # d = n: the k highest losses, the unknown one first
    s = cls(cls.Params(d=n))
    assert s.select(candidates, 3, context(n, np.random.default_rng(0), last_loss=loss)) == [4, 13, 14]
    # d < n: replay the draw
    s = cls(cls.Params(d=6))
    for seed in range(20):
        got = s.select(candidates, 2, context(n, np.random.default_rng(seed), last_loss=loss))
        drawn = np.random.default_rng(seed).choice(n, size=6, replace=False)
        key = np.where(np.isnan(loss[drawn]), np.inf, loss[drawn])
        assert got == sorted(int(c) for c in drawn[np.argsort(-key, kind="stable")[:2]])
    # k = 1: the device of highest loss is chosen iff it is among the d drawn: P = d / n
    s = cls(cls.Params(d=5))
    loss = np.linspace(0.1, 1.5, n)
    rng = np.random.default_rng(99)
    draws = 4000
    hits = sum(s.select(candidates, 1, context(n, rng, last_loss=loss)) == [n - 1] for _ in range(draws))
    p = 5 / n
    assert abs(hits / draws - p) <= 5 * math.sqrt(p * (1 - p) / draws)


def test_power_of_choice_needs_d_at_least_k():
    cls = get("selection", "power_of_choice")
    s = cls(cls.Params(d=2))
    with pytest.raises(ValueError, match="d=2 < k=3"):
        s.select(range(10), 3, context(10, np.random.default_rng(0)))
    spec = StrategiesSpec.model_validate({"selection": {"name": "power_of_choice", "params": {"d": 2}}})
    with pytest.raises(ValueError, match=r"strategies.selection.params.d=2 must be >= training.devices_per_round=3"):
        spec.check_selection(3, 10)
    spec.check_selection(2, 10)
    spec.check_selection(None, 10)
    spec.check_selection(10, 10)


def test_age_based_oldest_first_with_random_ties():
    n = 8
    last = np.array([4, -1, 2, 2, 4, 3, 0, 2])
    s = get("selection", "age_based")()
    rng = np.random.default_rng(8)
    assert s.select(range(n), 2, context(n, rng, round=5, last_round=last)) == [1, 6]
    # ages 3 for devices 2, 3, 7: the third slot goes to each with probability 1/3
    draws = 3000
    counts = np.zeros(n)
    for _ in range(draws):
        for d in s.select(range(n), 3, context(n, rng, round=5, last_round=last)):
            counts[d] += 1
    assert counts[1] == counts[6] == draws
    for d in (2, 3, 7):
        assert abs(counts[d] / draws - 1 / 3) <= 5 * math.sqrt((2 / 9) / draws)
    assert counts[0] == counts[4] == counts[5] == 0
