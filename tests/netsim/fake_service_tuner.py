"""A deterministic, torch-free stand-in for ``fomo.service_tuner.TaskTuner`` (the
:class:`netsim.protocols.prompt_service.ServiceTuner` protocol), for tests of the service
protocol whose expected values are computed by hand.

Model
-----
Two classes (C = 2). Examples are integer ids e in [0, POOL); the label of e is e mod 2, its
length is L(e) = 4 + (e mod 5) tokens. Task t's test set is examples i = 0 .. N-1 (N =
``n_test``) with labels i mod 2.

A state is a float array of shape (3, T) (T tasks): row 0 the *test skill* k_t, row 1 the
*train skill* s_t, row 2 the *confidence* c_t in (0.5, 1). On task t a state

* predicts test example i right iff i < floor(k_t), so its test accuracy is floor(k_t) / N;
* predicts a training example e right iff (e mod N) < floor(s_t);
* puts probability c_t on the class it predicts and 1 - c_t on the other.

So the uniform mixture of states with a common confidence gets test example i right iff most
states do (the median skill), and the mixture sum_j w_j p_j gets it right iff
sum_j w_j (c_j if right_j else 1 - c_j) > 1/2.

A tuning step on task t raises k_t and s_t by ``gain`` (capped at N). Costs:
step FLOPs = STEP_FLOPS_PER_TOKEN x sum L(e), one forward = FORWARD_FLOPS_PER_TOKEN x sum L(e),
worst cases at L = MAX_TOKENS; uploaded bytes = bytes_per_token x sum L(e) + 1 per label.

The online ensemble is exact Hedge with a fixed learning rate ``eta``: after cumulative
per-entry losses L_j, w_j = exp(-eta L_j) / sum_i exp(-eta L_i) (zero-one loss: argmax !=
label; log loss: -ln p[label] / -ln(1 - C_MAX) in [0, 1]; balanced_error: one round per
batch, 1 - the entry's balanced accuracy on it).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

POOL = 10_000
MAX_TOKENS = 8
STEP_FLOPS_PER_TOKEN = 6.0e6
FORWARD_FLOPS_PER_TOKEN = 2.0e6
C_MAX = 0.99


def lengths_tokens(examples) -> np.ndarray:
    """L(e) = 4 + (e mod 5) tokens."""
    return 4 + np.asarray(examples, dtype=np.int64) % 5


def make_state(tasks: Sequence[str], test_skill: dict, train_skill: dict | None = None,
               confidence: dict | None = None, default_skill: float = 50.0,
               default_confidence: float = 0.7) -> np.ndarray:
    """A (3, T) state from per-task dictionaries (missing tasks: the defaults; train skill
    defaults to the test skill)."""
    train_skill, confidence = dict(train_skill or {}), dict(confidence or {})
    state = np.empty((3, len(tasks)))
    for t, task in enumerate(tasks):
        state[0, t] = test_skill.get(task, default_skill)
        state[1, t] = train_skill.get(task, state[0, t])
        state[2, t] = confidence.get(task, default_confidence)
    return state


class FakeJob:
    """A tuning job: a copy of its initial state; each step raises the task's skills by gain."""

    def __init__(self, tuner: "FakeServiceTuner", task: str, init: np.ndarray):
        self.tuner, self.task, self.t = tuner, task, tuner.task_index(task)
        self.init = np.array(init, dtype=float, copy=True)
        self._state = self.init.copy()
        self.batches: list[tuple[int, ...]] = []

    def step(self, examples: np.ndarray) -> float:
        n = self.tuner.n_test
        self._state[0, self.t] = min(n, self._state[0, self.t] + self.tuner.gain)
        self._state[1, self.t] = min(n, self._state[1, self.t] + self.tuner.gain)
        self.batches.append(tuple(int(e) for e in examples))
        self.tuner.steps_taken += 1
        return 1.0 - self._state[0, self.t] / n

    def state(self) -> np.ndarray:
        return self._state.copy()


class FakeHedge:
    """Exact Hedge with a fixed learning rate over ``num_entries`` experts."""

    def __init__(self, num_entries: int, eta: float, loss: str):
        if loss not in ("zero_one", "log", "balanced_error"):
            raise ValueError(f"loss={loss!r}")
        self.eta, self.loss = float(eta), loss
        self.cumulative = np.zeros(int(num_entries))

    @property
    def weights(self) -> np.ndarray:
        z = -self.eta * (self.cumulative - self.cumulative.min())
        w = np.exp(z)
        return w / w.sum()

    def observe(self, probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
        probabilities = np.asarray(probabilities, dtype=float)
        labels = np.asarray(labels)
        mixture = np.einsum("p,pbc->bc", self.weights, probabilities)
        correct = mixture.argmax(axis=1) == labels
        picked = probabilities[:, np.arange(len(labels)), labels]          # (P, B)
        if self.loss == "balanced_error":   # one round per batch: 1 - each entry's balanced accuracy
            predicted = probabilities.argmax(axis=2)
            recalls = [(predicted[:, labels == c] == c).mean(axis=1) for c in np.unique(labels)]
            self.cumulative += 1.0 - np.mean(recalls, axis=0)
            return correct
        if self.loss == "zero_one":
            losses = (probabilities.argmax(axis=2) != labels[None, :]).astype(float)
        else:
            losses = -np.log(picked) / -math.log(1.0 - C_MAX)
        self.cumulative += losses.sum(axis=1)
        return correct


class FakeServiceTuner:
    """See the module docstring. ``tasks``: the task names it knows (``family/name``)."""

    num_classes = 2

    def __init__(self, tasks: Sequence[str], *, n_test: int = 100, gain: float = 3.0, fresh_skill: float = 50.0,
                 fresh_confidence: float = 0.7, bytes_per_token: int = 2, eta: float = 0.05,
                 memory_per_example_bytes: int = 1000):
        self.tasks = list(tasks)
        self.n_test, self.gain, self.eta = int(n_test), float(gain), float(eta)
        self.bytes_per_token = int(bytes_per_token)
        self.memory_per_example_bytes = int(memory_per_example_bytes)
        self._fresh = make_state(self.tasks, {}, default_skill=fresh_skill, default_confidence=fresh_confidence)
        self.jobs: list[FakeJob] = []
        self.steps_taken = 0
        self.ensembles: list[FakeHedge] = []

    def task_index(self, task: str) -> int:
        return self.tasks.index(task)

    # ---------------------------------------------------------------- examples and labels
    def draw_examples(self, task: str, count: int, rng: np.random.Generator) -> np.ndarray:
        self.task_index(task)
        return rng.choice(POOL, size=int(count), replace=False)

    def labels(self, task: str, examples: np.ndarray) -> np.ndarray:
        return np.asarray(examples, dtype=np.int64) % 2

    def test_labels(self, task: str) -> np.ndarray:
        return np.arange(self.n_test) % 2

    # ---------------------------------------------------------------- states
    def fresh_state(self) -> np.ndarray:
        return self._fresh.copy()

    def start_job(self, task: str, init: np.ndarray) -> FakeJob:
        job = FakeJob(self, task, init)
        self.jobs.append(job)
        return job

    def _probabilities(self, state: np.ndarray, t: int, right: np.ndarray, labels: np.ndarray) -> np.ndarray:
        c = state[2, t]
        predicted = np.where(right, labels, 1 - labels)
        p = np.full((len(labels), 2), 1.0 - c)
        p[np.arange(len(labels)), predicted] = c
        return p

    def test_probabilities(self, states: Sequence[np.ndarray], task: str) -> np.ndarray:
        t, i = self.task_index(task), np.arange(self.n_test)
        return np.stack([self._probabilities(s, t, i < math.floor(s[0, t]), i % 2) for s in states])

    def library_probabilities(self, states: Sequence[np.ndarray], task: str,
                              examples: np.ndarray) -> tuple[np.ndarray, float]:
        t, e = self.task_index(task), np.asarray(examples, dtype=np.int64)
        probs = np.stack([self._probabilities(s, t, (e % self.n_test) < math.floor(s[1, t]), e % 2) for s in states])
        return probs, len(states) * self.forward_flops(task, examples)

    def mixed_state(self, states: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
        return np.einsum("p,pij->ij", np.asarray(weights, dtype=float), np.stack(states))

    def online_ensemble(self, learner: str, num_entries: int, horizon: int, loss: str) -> FakeHedge:
        if learner != "hedge":
            raise ValueError(f"the fake tuner implements learner 'hedge' only, not {learner!r}")
        hedge = FakeHedge(num_entries, self.eta, loss)
        self.ensembles.append(hedge)
        return hedge

    # ---------------------------------------------------------------- costs
    def step_flops(self, task: str, examples: np.ndarray) -> float:
        return STEP_FLOPS_PER_TOKEN * float(lengths_tokens(examples).sum())

    def forward_flops(self, task: str, examples: np.ndarray) -> float:
        return FORWARD_FLOPS_PER_TOKEN * float(lengths_tokens(examples).sum())

    def worst_step_flops(self, batch_size: int) -> float:
        return STEP_FLOPS_PER_TOKEN * MAX_TOKENS * batch_size

    def worst_forward_flops(self, batch_size: int) -> float:
        return FORWARD_FLOPS_PER_TOKEN * MAX_TOKENS * batch_size

    def example_bytes(self, task: str, examples: np.ndarray) -> int:
        return int(lengths_tokens(examples).sum()) * self.bytes_per_token + len(examples)

    def job_memory_bytes(self, batch_size: int) -> int:
        return self.memory_per_example_bytes * int(batch_size) + 10_000

    # ---------------------------------------------------------------- D2D prompt transfer
    adapter_size_bytes = 16_908

    def adapter_bytes(self) -> int:
        """The size of one state [bytes] (all-MiniLM-L6-v2's 8-token prompt and 3-class head)."""
        return self.adapter_size_bytes

    def task_embedding(self, state: np.ndarray) -> np.ndarray:
        """e = the state's test skills above the fresh state's, plus 1 (T values, never zero):
        a state tuned on task t alone points along t."""
        return np.asarray(state[0], dtype=float) - self._fresh[0] + 1.0

    def text_embedding(self, task: str, examples: np.ndarray) -> tuple[np.ndarray, float]:
        """Centroid of the texts: 1 + 4 on the task's own coordinate (T values), whatever the
        examples; its cost one forward pass over them."""
        e = np.ones(len(self.tasks))
        e[self.task_index(task)] += 4.0
        return e, self.forward_flops(task, examples)
