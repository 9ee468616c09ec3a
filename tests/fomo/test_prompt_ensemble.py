"""fomo.prompt_ensemble: Hedge / exponentiated-gradient regret against theory (numpy), the
batched library forward against per-entry forwards on the real all-MiniLM-L6-v2 with prompt
tuning, mixed prompts, and bad input."""
from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch

from fomo import prompt_ensemble as pe


# ------------------------------------------------------------------ Hedge against its bounds
def play(hedge: pe.Hedge, losses: np.ndarray) -> None:
    hedge.update_many(losses)


def greedy_adversary(hedge: pe.Hedge, horizon: int) -> None:
    """Loss 1 to the entry with the largest weight (lowest index on ties), 0 to the others: the
    forecaster pays at least 1/P every round."""
    for _ in range(horizon):
        loss = np.zeros(hedge.num_entries)
        loss[int(np.argmax(hedge.weights))] = 1.0
        hedge.update(loss)


def alternating(num_entries: int, horizon: int) -> np.ndarray:
    """(1/2, 0, ...), then entries 0 and 1 take turns losing 1: the leader always loses next."""
    losses = np.zeros((horizon, num_entries))
    losses[0, 0] = 0.5
    for t in range(1, horizon):
        losses[t, t % 2] = 1.0
    return losses


HORIZONS = (1, 7, 100, 1000)
ENTRIES = (2, 3, 10, 50)


@pytest.mark.parametrize("num_entries", ENTRIES)
@pytest.mark.parametrize("horizon", HORIZONS)
def test_hedge_regret_below_its_bound(num_entries: int, horizon: int) -> None:
    rng = np.random.default_rng([14, num_entries, horizon])
    sequences = {
        "uniform": rng.uniform(size=(horizon, num_entries)),
        "bernoulli": (rng.uniform(size=(horizon, num_entries)) < rng.uniform(size=num_entries)).astype(float),
        "alternating": alternating(num_entries, horizon),
    }
    for name, losses in sequences.items():
        for hedge in (pe.Hedge(num_entries, horizon=horizon), pe.Hedge(num_entries)):
            play(hedge, losses)
            assert hedge.t == horizon
            best = float(losses.sum(axis=0).min())
            assert hedge.regret() == pytest.approx(hedge.forecaster_loss - best, abs=1e-9)
            assert hedge.regret() <= hedge.regret_bound(), (name, hedge.eta, hedge.regret(), hedge.regret_bound())
    fixed, anytime = pe.Hedge(num_entries, horizon=horizon), pe.Hedge(num_entries)
    greedy_adversary(fixed, horizon)
    greedy_adversary(anytime, horizon)
    for hedge in (fixed, anytime):
        assert hedge.forecaster_loss >= horizon / num_entries - 1e-9   # the adversary bites
        assert hedge.regret() <= hedge.regret_bound()
    assert fixed.regret_bound() == pytest.approx(math.sqrt(horizon * math.log(num_entries) / 2), rel=1e-12)


def test_adversaries_use_a_real_share_of_the_bound() -> None:
    """The bound is not vacuous for these sequences: the greedy adversary against 2 entries
    costs the forecaster about T/2 while the best entry loses about T/2 too, and the alternating
    sequence makes the regret grow like sqrt(T)."""
    regrets = {}
    for horizon in (100, 10_000):
        hedge = pe.Hedge(2, horizon=horizon)
        play(hedge, alternating(2, horizon))
        regrets[horizon] = hedge.regret()
        assert 0.1 * hedge.regret_bound() < hedge.regret() <= hedge.regret_bound()
    assert 5 < regrets[10_000] / regrets[100] < 15           # ~ sqrt(100) = 10


def test_fixed_eta_is_the_multiplicative_update() -> None:
    rng = np.random.default_rng(7)
    losses = rng.uniform(size=(50, 4))
    hedge = pe.Hedge(4, eta=0.3)
    w = np.full(4, 0.25)
    for loss in losses:
        np.testing.assert_allclose(hedge.update(loss), w, rtol=1e-12)
        w = w * np.exp(-0.3 * loss)
        w /= w.sum()
    np.testing.assert_allclose(hedge.weights, w, rtol=1e-12)
    assert hedge.regret_bound() == pytest.approx(math.log(4) / 0.3 + 0.3 * 50 / 8)


@pytest.mark.parametrize("anytime", [False, True])
def test_hedge_concentrates_on_the_best_entry(anytime: bool) -> None:
    """Bernoulli losses of mean 0.3 (entry 2) and 0.5 (the others), T = 2000: the cumulative-loss
    gap is 400 +- 30 (one standard error), so even at 5 sigma (gap 250) the weight off entry 2 is
    below 4 exp(-eta 250) < 1e-5."""
    horizon, means = 2000, np.array([0.5, 0.5, 0.3, 0.5, 0.5])
    rng = np.random.default_rng(2006)
    losses = (rng.uniform(size=(horizon, 5)) < means).astype(float)
    hedge = pe.Hedge(5) if anytime else pe.Hedge(5, horizon=horizon)
    used = hedge.update_many(losses)
    assert used.shape == (horizon, 5)
    assert hedge.weights[2] > 1 - 1e-5
    assert used[-1, 2] > used[horizon // 10, 2] > used[0, 2] == pytest.approx(0.2)


# ------------------------------------------------------------------ exponentiated gradient
def random_predictions(rng: np.random.Generator, entries: int, examples: int, classes: int,
                       sharpness: float = 2.0) -> np.ndarray:
    logits = sharpness * rng.normal(size=(entries, examples, classes))
    p = np.exp(logits - logits.max(axis=2, keepdims=True))
    return p / p.sum(axis=2, keepdims=True)


@pytest.mark.parametrize("entries,horizon", [(2, 50), (2, 2000), (5, 500)])
def test_exponentiated_gradient_regret_below_its_bound(entries: int, horizon: int) -> None:
    """Against the best fixed mixture (a grid of the simplex for 2 entries, the vertices and the
    uniform mixture for 5: any comparator's regret is bounded, so a coarse one is too)."""
    rng = np.random.default_rng([1997, entries, horizon])
    preds = random_predictions(rng, entries, horizon, 3)
    labels = rng.integers(0, 3, size=horizon)
    eg = pe.ExponentiatedGradient(entries, 3, horizon=horizon, smoothing=0.1)
    eg.update_many(preds, labels)
    picked = preds[:, np.arange(horizon), labels].T
    if entries == 2:
        comparators = [np.array([a, 1 - a]) for a in np.linspace(0, 1, 201)]
    else:
        comparators = list(np.eye(entries)) + [np.full(entries, 1 / entries)]
    best = min(eg.loss_of(u, picked) for u in comparators)
    assert eg.mixture_loss - best <= eg.regret_bound()
    assert eg.regret_bound() == pytest.approx(math.sqrt(horizon * math.log(entries) / 2) / eg.floor, rel=1e-12)


def test_exponentiated_gradient_moves_weight_to_the_informative_entry() -> None:
    """Entry 0 gives the true class probability 0.9, entry 1 is uniform: the mixture's log loss
    falls towards entry 0, so its weight grows (monotonically: every gradient favours it, as
q_0 > q_1 on every example)."""
    horizon, classes = 300, 3
    rng = np.random.default_rng(3)
    labels = rng.integers(0, classes, size=horizon)
    good = np.full((horizon, classes), 0.05)
    good[np.arange(horizon), labels] = 0.9
    preds = np.stack([good, np.full((horizon, classes), 1 / classes)])
    eg = pe.ExponentiatedGradient(2, classes, eta=0.5)
    used = eg.update_many(preds, labels)
    steps = np.diff(used[:, 0])
    assert np.all(steps >= 0) and np.all(steps[:10] > 0) and eg.weights[0] > 0.99   # it saturates at 1


# ------------------------------------------------------------------ losses and mixtures
def test_losses_mixture_and_accuracy_by_hand() -> None:
    preds = np.array([[[0.7, 0.3], [0.6, 0.4], [0.2, 0.8]],       # entry 0
                      [[0.4, 0.6], [0.1, 0.9], [0.5, 0.5]]])      # entry 1
    labels = np.array([0, 1, 1])
    np.testing.assert_array_equal(pe.entry_losses(preds, labels), [[0, 1], [1, 0], [0, 1]])
    cap = math.log(10)
    log = pe.entry_losses(preds, labels, "log", max_log_loss=cap)
    np.testing.assert_allclose(log[:, 0], -np.log([0.7, 0.4, 0.8]) / cap)
    assert log.min() >= 0 and log.max() <= 1
    np.testing.assert_allclose(pe.mixture([0.5, 0.5], preds), [[0.55, 0.45], [0.35, 0.65], [0.35, 0.65]])
    assert pe.ensemble_accuracy([1, 0], preds, labels) == pytest.approx(2 / 3)
    assert pe.ensemble_accuracy([0, 1], preds, labels) == pytest.approx(1 / 3)  # the 0.5/0.5 tie goes to class 0
    assert pe.ensemble_accuracy([0.5, 0.5], preds, labels) == 1.0
    assert pe.ensemble_accuracy([1, 0], preds, labels, balanced=True) == pytest.approx((1 + 0.5) / 2)
    np.testing.assert_allclose(pe.entry_accuracies(preds, labels), [2 / 3, 1 / 3])
    capped = pe.entry_losses(np.array([[[1.0, 0.0]]]), [1], "log")
    assert capped[0, 0] == 1.0


def test_prequential_predicts_before_it_learns() -> None:
    rng = np.random.default_rng(11)
    preds = random_predictions(rng, 3, 40, 4)
    labels = rng.integers(0, 4, size=40)
    hedge = pe.Hedge(3, horizon=80)
    first = pe.prequential(hedge, preds[:, :20], labels[:20])
    second = pe.prequential(hedge, preds[:, 20:], labels[20:])
    np.testing.assert_allclose(first.weights[0], np.full(3, 1 / 3))
    assert hedge.t == 40
    for trace, offset in ((first, 0), (second, 20)):
        for j in range(20):
            expected = pe.ensemble_accuracy(trace.weights[j], preds[:, offset + j:offset + j + 1],
                                            labels[offset + j:offset + j + 1])
            assert trace.correct[j] == bool(expected)
    assert first.accuracy_after()[-1] == pytest.approx(first.correct.mean())


# ------------------------------------------------------------------ mixed prompt
def random_states(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"prompt": torch.randn(4, 8, generator=gen), "head.weight": torch.randn(3, 8, generator=gen),
             "head.bias": torch.randn(3, generator=gen)} for _ in range(count)]


def test_mixed_prompt_one_hot_is_exact_and_uniform_is_the_mean() -> None:
    states = random_states(3)
    for k in range(3):
        mixed = pe.mixed_prompt(states, np.eye(3)[k])
        assert all(torch.equal(mixed[n], states[k][n]) and mixed[n].dtype == torch.float32 for n in states[k])
    uniform = pe.mixed_prompt(states, np.full(3, 1 / 3))
    for name in states[0]:
        mean64 = torch.stack([st[name].double() for st in states]).mean(dim=0)
        # a float64 sum of 3 terms rounds within 3 * 2^-53 of it; the cast to float32 within 2^-24
        torch.testing.assert_close(uniform[name].double(), mean64, rtol=2.0 ** -23, atol=2.0 ** -40)
    mixed = pe.mixed_prompt(states, [0.25, 0.75, 0.0])
    torch.testing.assert_close(mixed["prompt"], 0.25 * states[0]["prompt"] + 0.75 * states[1]["prompt"])


def test_the_numpy_part_does_not_import_torch() -> None:
    code = ("import sys, fomo.prompt_ensemble as pe; pe.Hedge(3).update([0, 1, 0.5]); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("call,match", [
    (lambda: pe.mixed_prompt([], []), "no entries"),
    (lambda: pe.mixed_prompt(random_states(2), [0.5, 0.6]), "sum to 1"),
    (lambda: pe.mixed_prompt(random_states(2), [1.5, -0.5]), "must be >= 0"),
    (lambda: pe.mixed_prompt(random_states(2), [1.0]), "1 entries but the library has 2"),
    (lambda: pe.mixed_prompt(random_states(2), [np.nan, 1.0]), "finite"),
    (lambda: pe.mixed_prompt([random_states(1)[0], {**random_states(1)[0], "prompt": torch.zeros(5, 8)}],
                             [0.5, 0.5]), r"entry 1: tensor 'prompt' has shape \(5, 8\)"),
    (lambda: pe.mixed_prompt([random_states(1)[0], {"prompt": torch.zeros(4, 8)}], [0.5, 0.5]),
     r"entry 1 .*missing \['head.bias', 'head.weight'\]"),
    (lambda: pe.Hedge(3, eta=0.0), "eta=0.0 must be a finite number > 0"),
    (lambda: pe.Hedge(3, eta=-1.0), "eta=-1.0"),
    (lambda: pe.Hedge(0), "at least 1 entry"),
    (lambda: pe.Hedge(3, eta=0.1, horizon=10), "not both"),
    (lambda: pe.Hedge(3, horizon=0), "horizon=0"),
    (lambda: pe.Hedge(3).update([0.5, 0.5]), r"shape \(3,\)"),
    (lambda: pe.Hedge(2).update([0.5, 1.5]), r"\[0, 1\]"),
    (lambda: pe.ExponentiatedGradient(2, 3, eta=0.0), "eta=0.0"),
    (lambda: pe.ExponentiatedGradient(2, 3), "exactly one of eta and horizon"),
    (lambda: pe.ExponentiatedGradient(2, 3, eta=1.0, smoothing=0.0), "smoothing"),
    (lambda: pe.ensemble_accuracy([0.5, 0.5], np.full((3, 2, 2), 0.5), [0, 1]), "3 entries|2 entries"),
    (lambda: pe.ensemble_accuracy([1.0], np.full((1, 2, 2), 0.5), [0, 1, 1]), "vector of 2 class indices"),
    (lambda: pe.ensemble_accuracy([1.0], np.full((1, 2, 2), 0.5), [0, 2]), r"labels must lie in 0\.\.1"),
    (lambda: pe.ensemble_accuracy([1.0], np.ones((1, 2, 2)), [0, 1]), "probabilities, not logits"),
    (lambda: pe.ensemble_accuracy([1.0], np.ones((2, 2)), [0, 1]), r"shape \(entries P"),
    (lambda: pe.entry_losses(np.full((1, 2, 2), 0.5), [0, 1], "hinge"), "kind='hinge'"),
    (lambda: pe.entry_losses(np.full((1, 2, 2), 0.5), [0, 1], "log", max_log_loss=0), "max_log_loss=0"),
    (lambda: pe.prequential(pe.Hedge(3), np.full((2, 2, 2), 0.5), [0, 1]), "3 entries but predictions 2"),
])
def test_bad_input_names_what_is_wrong(call: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------ the real library forward
BATCH, TOKENS, ENTRIES_REAL = 4, 16, 3


@pytest.fixture(scope="module")
def library() -> tuple[Any, list[dict[str, torch.Tensor]], torch.Tensor, torch.Tensor, np.ndarray]:
    """A small prompt-tuning trainer on BBC News and 3 entries: its initial state and that state
    after one AdamW step (lr 1e-2) on device 0's and on device 1's data."""
    from fomo import build_trainer
    from netsim.interfaces import LocalJob
    from netsim.scenario import Scenario

    scenario = Scenario.model_validate({
        "name": "prompt-library", "devices": [{"count": 2}],
        "model": {"max_length_tokens": TOKENS}, "data": {"max_test_examples": 8},
        "peft": {"method": "prompt_tuning", "num_virtual_tokens": 4},
        "training": {"batch_size": BATCH, "local_steps": 1, "learning_rate": 1e-2},
    })
    trainer = build_trainer(scenario, seed=0)
    start = trainer.global_state()
    results = trainer.local_train([LocalJob(device_id=d, round=1, steps=1, batch_size=BATCH) for d in (0, 1)])
    states = [start] + [{n: start[n] + r.update[n] for n in start} for r in results]
    input_ids, mask, labels = trainer._tokens.batch(trainer._test_examples[:BATCH])
    assert tuple(input_ids.shape) == (BATCH, TOKENS)
    return trainer, states, input_ids, mask, labels.numpy()


def separate_logits(model: torch.nn.Module, state: dict[str, torch.Tensor], input_ids: torch.Tensor,
                    mask: torch.Tensor) -> tuple[torch.Tensor, float]:
    """One entry alone: its tensors loaded into the model, one counted forward in eval mode."""
    from fomo import profiling

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)
        model.eval()
        try:
            return profiling.counted_forward(model, input_ids, mask)
        finally:
            model.train()


@pytest.mark.slow
def test_library_forward_equals_separate_forwards(library: Any) -> None:
    trainer, states, input_ids, mask, labels = library
    model = trainer.model
    assert any("prompt" in n for n in states[0]) and any("classifier" in n for n in states[0])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    # float32: the counted FLOPs are P times one entry's, the values agree to float32 rounding
    logits, flops = pe.library_logits(trainer, states, input_ids, mask)
    assert model.training and all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    probs, flops_p = pe.library_predictions(trainer, states, input_ids, mask)
    assert probs.shape == (ENTRIES_REAL, BATCH, trainer.num_classes) and probs.dtype == np.float64
    assert flops_p == flops
    trace = pe.prequential(pe.Hedge(ENTRIES_REAL, horizon=BATCH), probs, labels)
    assert trace.weights.shape == (BATCH, ENTRIES_REAL) and trace.correct.shape == (BATCH,)
    chunked, chunked_flops = pe.library_logits(trainer, states, input_ids, mask, max_entries_per_pass=2)
    assert chunked_flops == flops
    separate = [separate_logits(model, st, input_ids, mask) for st in states]
    assert flops == sum(f for _, f in separate) == ENTRIES_REAL * separate[0][1] > 0
    reference = torch.stack([lg for lg, _ in separate])
    assert float((reference[1] - reference[0]).abs().max()) > 1e-3        # the entries differ
    scale = float(reference.abs().max())
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-4 * scale)
    torch.testing.assert_close(chunked, reference, rtol=0, atol=1e-4 * scale)

    # float64: the same maths, so equal to float64 rounding (far below 1e-9 of the logits' scale)
    model.double()
    states64 = [{n: t.double() for n, t in st.items()} for st in states]
    ids_mask = (input_ids, mask)
    logits64, _ = pe.library_logits(model, states64, *ids_mask)
    reference64 = torch.stack([separate_logits(model, st, *ids_mask)[0] for st in states64])
    assert logits64.dtype == torch.float64
    torch.testing.assert_close(logits64, reference64, rtol=0, atol=1e-9 * float(reference64.abs().max()))
    probs64, _ = pe.library_predictions(model, states64, *ids_mask)
    np.testing.assert_allclose(probs64, torch.softmax(reference64, -1).numpy(), rtol=0, atol=1e-9)
    # a float32 entry against the float64 model is a clear error
    with pytest.raises(ValueError, match="entry 0: tensor .* torch.float32, expected .* torch.float64"):
        pe.library_logits(model, states, *ids_mask)
    with pytest.raises(ValueError, match="no entries"):
        pe.library_logits(model, [], *ids_mask)
    with pytest.raises(ValueError, match="max_entries_per_pass=0"):
        pe.library_logits(model, states64, *ids_mask, max_entries_per_pass=0)
