"""On-the-fly prompt-ensemble tuning: a library of tuned PEFT states answers a new task at once,
and its ensemble weights are learned online from the task's labelled examples, forward passes
only.

The edge keeps a *library* of P tuned PEFT states (for prompt tuning: a soft prompt and a
classification head; every entry of one shape, all for one base model and one label set). For a
new request:

1. :func:`library_predictions` runs all P entries on a batch in one batched forward
   (:class:`fomo.batched.DeviceStack` over the P states, the batch repeated P times, entry-major),
   without gradients, and returns the (P, B, C) class probabilities and the counted forward FLOPs.
   The batched forward has the maths of P separate forwards (tested in float64) and counts the
   same FLOPs: batching saves host time, not simulated edge compute.
2. :class:`Hedge` (exponential weights over the P entries with a bounded loss per entry and
   example, :func:`entry_losses`) or :class:`ExponentiatedGradient` (on the mixture's log loss)
   learns the ensemble weights as labelled examples arrive; the ensemble predicts the weighted
   mixture of the entries' probabilities (:func:`mixture`, :func:`ensemble_accuracy`);
   :func:`prequential` scores each example with the weights learned before it, then updates
   (accuracy against labelled examples seen).
3. :func:`mixed_prompt` averages the library's PEFT tensors with the learned weights, to
   initialise a short tuning.

Regret bounds (losses l_{t,i} in [0, 1], P entries, T examples; Cesa-Bianchi and Lugosi,
*Prediction, Learning, and Games*, 2006):

* fixed learning rate eta: sum_t <w_t, l_t> - min_i sum_t l_{t,i} <= ln P / eta + eta T / 8
  (Thm 2.2); with the horizon known, eta = sqrt(8 ln P / T) gives sqrt(T ln P / 2);
* anytime, eta_t = sqrt(8 ln P / t): regret <= 2 sqrt(T ln P / 2) + sqrt(ln P / 8) for every T
  (Thm 2.3).

Exponentiated gradient (Kivinen and Warmuth, Inf. Comput. 1997) on the mixture's log loss
f_t(w) = -ln sum_i w_i q_{t,i}(y_t), with the entries' probabilities smoothed to
q = (1 - gamma) p + gamma / C >= r = gamma / C: the gradient's coordinates lie in [-1/r, 0], and
since f_t is convex, Hoeffding's lemma as in Thm 2.2 gives, against every fixed mixture u,
sum_t f_t(w_t) - sum_t f_t(u) <= ln P / eta + eta T / (8 r^2); eta = r sqrt(8 ln P / T) gives
(1 / r) sqrt(T ln P / 2) (Helmbold, Schapire, Singer and Warmuth, Math. Finance 1998, Thm 1).

The numpy part (losses, learners, mixtures, accuracies) does not import torch; torch is imported
only by :func:`library_logits`, :func:`library_predictions` and :func:`mixed_prompt`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from fomo.tasks import balanced_accuracy

if TYPE_CHECKING:  # pragma: no cover
    import torch

LOSS_KINDS = ("zero_one", "log")
"""Bounded per-entry losses for :class:`Hedge` (see :func:`entry_losses`)."""

WEIGHT_SUM_ATOL = 1e-9
"""Ensemble weights must sum to 1 within this (float64 rounding of a sum of P <= 1e6 terms in
[0, 1] is below P * 2^-53 ~ 1e-10)."""


# --------------------------------------------------------------------------------------------
# Input checks (ValueError naming what is wrong)
# --------------------------------------------------------------------------------------------
def check_weights(weights: Any, num_entries: Optional[int] = None, what: str = "weights") -> np.ndarray:
    """``weights`` as a float64 (P,) array: finite, >= 0, summing to 1 within
    :data:`WEIGHT_SUM_ATOL`, and of length ``num_entries`` if given. ValueError otherwise."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"{what} must be a non-empty 1-D vector (one weight per library entry), got shape {w.shape}")
    if num_entries is not None and w.size != num_entries:
        raise ValueError(f"{what} has {w.size} entries but the library has {num_entries}")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{what} must be finite, got {w.tolist()}")
    if np.any(w < 0):
        raise ValueError(f"{what} must be >= 0, got negative weight(s) at entries {np.flatnonzero(w < 0).tolist()}")
    total = float(w.sum())
    if abs(total - 1.0) > WEIGHT_SUM_ATOL:
        raise ValueError(f"{what} must sum to 1 (a probability vector over the library), got sum {total!r}")
    return w


def check_predictions(predictions: Any, what: str = "predictions") -> np.ndarray:
    """``predictions`` as a float64 (P, B, C) array of probabilities (finite, >= 0, each row
    summing to 1 within 1e-6: float32 softmax outputs pass). ValueError otherwise."""
    p = np.asarray(predictions, dtype=np.float64)
    if p.ndim != 3 or 0 in p.shape:
        raise ValueError(f"{what} must have shape (entries P, examples B, classes C) with P, B, C >= 1, "
                         f"got shape {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError(f"{what} must be finite probabilities >= 0")
    worst = float(np.max(np.abs(p.sum(axis=2) - 1.0)))
    if worst > 1e-6:
        raise ValueError(f"{what} rows must sum to 1 over the classes (probabilities, not logits): "
                         f"off by up to {worst:.3g}")
    return p


def check_labels(labels: Any, num_examples: int, num_classes: int) -> np.ndarray:
    """``labels`` as an int64 (B,) array of class indices in 0..C-1. ValueError otherwise."""
    y = np.asarray(labels)
    if y.ndim != 1 or y.size != num_examples:
        raise ValueError(f"labels must be a vector of {num_examples} class indices (one per example), "
                         f"got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got values in {int(y.min())}..{int(y.max())}")
    return y


def _check_positive(value: float, what: str) -> float:
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{what}={value!r} must be a finite number > 0")
    return v


# --------------------------------------------------------------------------------------------
# Losses, mixtures, accuracies (numpy)
# --------------------------------------------------------------------------------------------
def entry_losses(predictions: Any, labels: Any, kind: str = "zero_one", max_log_loss: float = math.log(1e4)) -> np.ndarray:
    """Per-example, per-entry losses in [0, 1] for :class:`Hedge`, shape (B, P).

    ``zero_one``: l_{t,i} = 1[argmax_c p_{i,t}(c) != y_t] (ties go to the lowest class index, as
    ``argmax`` does). ``log``: l_{t,i} = min(-ln p_{i,t}(y_t), L_max) / L_max with
    ``L_max = max_log_loss`` [nats] (default ln 1e4: probabilities below 1e-4 all cost 1)."""
    p = check_predictions(predictions)
    y = check_labels(labels, p.shape[1], p.shape[2])
    if kind == "zero_one":
        return (p.argmax(axis=2) != y[None, :]).T.astype(np.float64)
    if kind == "log":
        cap = _check_positive(max_log_loss, "max_log_loss")
        picked = p[:, np.arange(p.shape[1]), y]                      # (P, B)
        with np.errstate(divide="ignore"):
            nats = -np.log(picked)
        return (np.minimum(nats, cap) / cap).T
    raise ValueError(f"kind={kind!r}: allowed: {', '.join(LOSS_KINDS)}")


def mixture(weights: Any, predictions: Any) -> np.ndarray:
    """The ensemble's class probabilities sum_i w_i p_i, shape (B, C)."""
    p = check_predictions(predictions)
    w = check_weights(weights, p.shape[0])
    return np.tensordot(w, p, axes=(0, 0))


def ensemble_accuracy(weights: Any, predictions: Any, labels: Any, balanced: bool = False) -> float:
    """Accuracy (or balanced accuracy, :func:`fomo.tasks.balanced_accuracy`) of the weighted
    mixture's argmax against ``labels``."""
    mixed = mixture(weights, predictions)
    y = check_labels(labels, mixed.shape[0], mixed.shape[1])
    guess = mixed.argmax(axis=1)
    if balanced:
        return balanced_accuracy(y, guess, mixed.shape[1])
    return float(np.mean(guess == y))


def entry_accuracies(predictions: Any, labels: Any) -> np.ndarray:
    """Accuracy of each library entry alone, shape (P,) (the best single entry is its argmax)."""
    return 1.0 - entry_losses(predictions, labels, "zero_one").mean(axis=0)


# --------------------------------------------------------------------------------------------
# Online learners
# --------------------------------------------------------------------------------------------
def hedge_learning_rate(num_entries: int, horizon: int) -> float:
    """eta = sqrt(8 ln P / T), the rate minimising ln P / eta + eta T / 8 (Cesa-Bianchi and
    Lugosi 2006, Thm 2.2)."""
    if int(num_entries) < 2:
        raise ValueError(f"num_entries={num_entries}: a learning rate needs at least 2 entries")
    if int(horizon) < 1:
        raise ValueError(f"horizon={horizon} must be >= 1 example")
    return math.sqrt(8.0 * math.log(num_entries) / horizon)


class Hedge:
    """Exponentially weighted average forecaster over P library entries (Hedge; Littlestone and
    Warmuth 1994, Freund and Schapire 1997), for losses in [0, 1].

    w_{t,i} = exp(-eta_t L_{t-1,i}) / sum_j exp(-eta_t L_{t-1,j}), L_{t-1,i} = sum_{s<t} l_{s,i}.
    With a fixed eta this is w_{t+1,i} proportional to w_{t,i} exp(-eta l_{t,i}).

    Learning rate (exactly one of ``eta`` and ``horizon``, or neither):

    * ``eta``: fixed; regret <= ln P / eta + eta T / 8 after T examples (Thm 2.2);
    * ``horizon`` T: eta = sqrt(8 ln P / T); regret <= sqrt(T ln P / 2) over those T examples;
    * neither: anytime, eta_t = sqrt(8 ln P / t); regret <= 2 sqrt(t ln P / 2) + sqrt(ln P / 8)
      after every t (Thm 2.3).

    Attributes
    ----------
    num_entries : P
    t : examples seen
    cumulative_losses : (P,) sum of each entry's losses so far
    forecaster_loss : sum_t <w_t, l_t>, the ensemble's expected loss so far
    """

    def __init__(self, num_entries: int, eta: Optional[float] = None, horizon: Optional[int] = None) -> None:
        if int(num_entries) < 1:
            raise ValueError(f"num_entries={num_entries}: the library needs at least 1 entry")
        if eta is not None and horizon is not None:
            raise ValueError("give eta or horizon, not both (horizon sets eta = sqrt(8 ln P / horizon))")
        self.num_entries = int(num_entries)
        self.eta: Optional[float] = None if eta is None else _check_positive(eta, "eta")
        self.horizon: Optional[int] = None
        if horizon is not None:
            if int(horizon) < 1:
                raise ValueError(f"horizon={horizon} must be >= 1 example")
            self.horizon = int(horizon)
            self.eta = hedge_learning_rate(self.num_entries, self.horizon) if self.num_entries > 1 else 1.0
        self.t = 0
        self.cumulative_losses = np.zeros(self.num_entries)
        self.forecaster_loss = 0.0

    def learning_rate(self) -> float:
        """eta of the next example: fixed, or sqrt(8 ln P / (t + 1)) (anytime)."""
        if self.eta is not None:
            return self.eta
        return math.sqrt(8.0 * math.log(max(self.num_entries, 2)) / (self.t + 1))

    @property
    def weights(self) -> np.ndarray:
        """w_{t+1}: the weights for the next example, (P,), summing to 1."""
        z = -self.learning_rate() * (self.cumulative_losses - self.cumulative_losses.min())
        w = np.exp(z)
        return w / w.sum()

    def update(self, losses: Any) -> np.ndarray:
        """Observe one example's losses l_t (P,) in [0, 1]; returns the weights that were used."""
        l = np.asarray(losses, dtype=np.float64)
        if l.shape != (self.num_entries,):
            raise ValueError(f"losses must have shape ({self.num_entries},) (one per entry), got {l.shape}")
        if not np.all(np.isfinite(l)) or l.min() < 0 or l.max() > 1:
            raise ValueError("Hedge losses must lie in [0, 1] (use entry_losses: 0-1 or clipped, scaled log loss)")
        w = self.weights
        self.forecaster_loss += float(w @ l)
        self.cumulative_losses += l
        self.t += 1
        return w

    def update_many(self, losses: Any) -> np.ndarray:
        """Observe examples one after another, losses (B, P); returns the (B, P) weights used."""
        l = np.asarray(losses, dtype=np.float64)
        if l.ndim != 2:
            raise ValueError(f"losses must have shape (examples, {self.num_entries}), got {l.shape}")
        return np.array([self.update(row) for row in l]).reshape(l.shape)

    def regret(self) -> float:
        """sum_t <w_t, l_t> - min_i sum_t l_{t,i}."""
        return self.forecaster_loss - float(self.cumulative_losses.min()) if self.t else 0.0

    def regret_bound(self) -> float:
        """The bound on :meth:`regret` after the examples seen so far (see the class docstring)."""
        if self.num_entries == 1 or self.t == 0:
            return 0.0
        log_p = math.log(self.num_entries)
        if self.eta is None:
            return 2.0 * math.sqrt(self.t * log_p / 2.0) + math.sqrt(log_p / 8.0)
        return log_p / self.eta + self.eta * self.t / 8.0


class ExponentiatedGradient:
    """Exponentiated gradient (Kivinen and Warmuth 1997) on the mixture's log loss.

    f_t(w) = -ln sum_i w_i q_{t,i}, q_{t,i} = (1 - gamma) p_{t,i}(y_t) + gamma / C;
    g_{t,i} = -q_{t,i} / (w_t . q_t); w_{t+1,i} proportional to w_{t,i} exp(-eta g_{t,i}).
    With r = gamma / C the gradient lies in [-1/r, 0]; against every fixed mixture u,
    sum_t f_t(w_t) - f_t(u) <= ln P / eta + eta T / (8 r^2), and with ``horizon`` T,
    eta = r sqrt(8 ln P / T) gives (1 / r) sqrt(T ln P / 2) (module docstring).

    Parameters
    ----------
    num_entries : P
    num_classes : C
    eta, horizon : fixed rate, or the horizon that sets it (exactly one)
    smoothing : gamma in (0, 1]
    """

    def __init__(self, num_entries: int, num_classes: int, eta: Optional[float] = None,
                 horizon: Optional[int] = None, smoothing: float = 0.1) -> None:
        if int(num_entries) < 1:
            raise ValueError(f"num_entries={num_entries}: the library needs at least 1 entry")
        if int(num_classes) < 2:
            raise ValueError(f"num_classes={num_classes} must be >= 2")
        gamma = float(smoothing)
        if not (0.0 < gamma <= 1.0):
            raise ValueError(f"smoothing={smoothing!r} must lie in (0, 1]")
        if (eta is None) == (horizon is None):
            raise ValueError("give exactly one of eta and horizon (horizon sets eta = r sqrt(8 ln P / horizon))")
        self.num_entries, self.num_classes, self.smoothing = int(num_entries), int(num_classes), gamma
        self.floor = gamma / self.num_classes
        if horizon is not None:
            if int(horizon) < 1:
                raise ValueError(f"horizon={horizon} must be >= 1 example")
            self.eta = self.floor * math.sqrt(8.0 * math.log(max(self.num_entries, 2)) / int(horizon))
        else:
            self.eta = _check_positive(eta, "eta")
        self.log_weights = np.zeros(self.num_entries)
        self.t = 0
        self.mixture_loss = 0.0

    @property
    def weights(self) -> np.ndarray:
        """w_{t+1}, (P,), summing to 1."""
        w = np.exp(self.log_weights - self.log_weights.max())
        return w / w.sum()

    def smoothed(self, label_probabilities: Any) -> np.ndarray:
        """q = (1 - gamma) p + gamma / C of the entries' probabilities of the true class."""
        return (1.0 - self.smoothing) * np.asarray(label_probabilities, dtype=np.float64) + self.floor

    def update(self, label_probabilities: Any) -> np.ndarray:
        """Observe one example: p_{t,i}(y_t) for every entry (P,); returns the weights used."""
        p = np.asarray(label_probabilities, dtype=np.float64)
        if p.shape != (self.num_entries,):
            raise ValueError(f"label_probabilities must have shape ({self.num_entries},), got {p.shape}")
        if not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1:
            raise ValueError("label_probabilities must lie in [0, 1]")
        w = self.weights
        q = self.smoothed(p)
        mixed = float(w @ q)
        self.mixture_loss += -math.log(mixed)
        self.log_weights += self.eta * q / mixed          # -eta * gradient
        self.log_weights -= self.log_weights.max()
        self.t += 1
        return w

    def update_many(self, predictions: Any, labels: Any) -> np.ndarray:
        """Observe a batch one example after another: predictions (P, B, C), labels (B,);
        returns the (B, P) weights used."""
        p = check_predictions(predictions)
        y = check_labels(labels, p.shape[1], p.shape[2])
        picked = p[:, np.arange(p.shape[1]), y].T                       # (B, P)
        return np.array([self.update(row) for row in picked]).reshape(picked.shape)

    def loss_of(self, weights: Any, label_probabilities: Any) -> float:
        """sum_t f_t(u) of a fixed mixture u over examples with label probabilities (T, P)."""
        u = check_weights(weights, self.num_entries)
        q = self.smoothed(label_probabilities)
        return float(-np.log(q @ u).sum())

    def regret_bound(self) -> float:
        """ln P / eta + eta t / (8 r^2) after the examples seen so far."""
        if self.num_entries == 1 or self.t == 0:
            return 0.0
        return math.log(self.num_entries) / self.eta + self.eta * self.t / (8.0 * self.floor ** 2)


@dataclass(frozen=True)
class PrequentialTrace:
    """Test-then-train record of an online ensemble over T examples.

    Attributes
    ----------
    weights : (T, P) the weights each example was predicted with (learned from the ones before)
    correct : (T,) bool, whether the mixture's argmax was right
    """

    weights: np.ndarray
    correct: np.ndarray

    def accuracy_after(self) -> np.ndarray:
        """Running accuracy after 1..T labelled examples, (T,)."""
        return np.cumsum(self.correct) / np.arange(1, len(self.correct) + 1)


def prequential(learner: Any, predictions: Any, labels: Any, loss: str = "zero_one",
                max_log_loss: float = math.log(1e4)) -> PrequentialTrace:
    """Predict each example of a batch (P, B, C) with the learner's current weights, then update
    on its label (:class:`Hedge` with :func:`entry_losses` of kind ``loss``, or
    :class:`ExponentiatedGradient`); the learner keeps its state for the next batch."""
    p = check_predictions(predictions)
    y = check_labels(labels, p.shape[1], p.shape[2])
    if isinstance(learner, Hedge):
        if learner.num_entries != p.shape[0]:
            raise ValueError(f"the learner has {learner.num_entries} entries but predictions {p.shape[0]}")
        used = learner.update_many(entry_losses(p, y, loss, max_log_loss))
    elif isinstance(learner, ExponentiatedGradient):
        if learner.num_entries != p.shape[0]:
            raise ValueError(f"the learner has {learner.num_entries} entries but predictions {p.shape[0]}")
        used = learner.update_many(p, y)
    else:
        raise ValueError(f"learner must be a Hedge or an ExponentiatedGradient, got {type(learner).__name__}")
    mixed = np.einsum("bp,pbc->bc", used, p)
    return PrequentialTrace(weights=used, correct=mixed.argmax(axis=1) == y)


# --------------------------------------------------------------------------------------------
# The library on the model (torch)
# --------------------------------------------------------------------------------------------
def check_states(states: Sequence[dict], reference: Optional[dict] = None) -> list[str]:
    """The tensor names of a library of PEFT states: non-empty, every entry with the same names,
    shapes and dtypes (those of ``reference``, e.g. the model's trainable parameters, if given).
    ValueError naming the entry and the tensor otherwise."""
    if not isinstance(states, (list, tuple)) or len(states) == 0:
        raise ValueError("the library has no entries: give at least one PEFT state (dict name -> tensor)")
    first = reference if reference is not None else states[0]
    names = list(first)
    if not names:
        raise ValueError("the PEFT state has no tensors")
    for i, st in enumerate(states):
        if not isinstance(st, dict):
            raise ValueError(f"library entry {i} is a {type(st).__name__}, not a dict name -> tensor")
        if set(st) != set(names):
            missing, extra = sorted(set(names) - set(st)), sorted(set(st) - set(names))
            raise ValueError(f"library entry {i} has other tensors than the model's PEFT state: "
                             f"missing {missing}, unexpected {extra}")
        for name in names:
            if tuple(st[name].shape) != tuple(first[name].shape) or st[name].dtype != first[name].dtype:
                raise ValueError(f"library entry {i}: tensor {name!r} has shape {tuple(st[name].shape)} "
                                 f"{st[name].dtype}, expected {tuple(first[name].shape)} {first[name].dtype}")
    return names


def _model_of(trainer_or_model: Any) -> "torch.nn.Module":
    return getattr(trainer_or_model, "model", trainer_or_model)


def library_logits(trainer_or_model: Any, states: Sequence[dict], input_ids: "torch.Tensor",
                   mask: "torch.Tensor", max_entries_per_pass: Optional[int] = None) -> tuple["torch.Tensor", float]:
    """Logits (P, B, C) of every library entry on one batch, and the counted forward FLOPs.

    The P states run as one batched forward (:func:`fomo.batched.per_device_modules` with a
    :class:`fomo.batched.DeviceStack` over them): the batch is repeated P times entry-major, the
    frozen base runs once over the P x B rows, and each entry's soft prompt and head act on its
    own rows. No gradients; the model is in eval mode meanwhile and its own parameters are not
    read or changed. ``max_entries_per_pass`` bounds the rows of one pass (memory grows with
    P x B); None runs all P in one pass. FLOPs are counted by :func:`fomo.profiling.flop_counter`
    (matrix products and attention) and equal P times one entry's forward.

    The trainer's activation cache and pruned last block are not used (the plain model runs)."""
    import torch

    from fomo import batched as fbatched
    from fomo import profiling

    model = _model_of(trainer_or_model)
    owners = fbatched.owner_modules(model)
    for name, (module, local) in owners.items():
        if type(module) not in (torch.nn.Linear, torch.nn.Embedding):
            raise ValueError(f"library forward needs PEFT tensors in nn.Linear or nn.Embedding modules (prompt "
                             f"tuning, LoRA); {sorted(local.values())} live in a {type(module).__name__}")
    reference = {n: p for n, p in model.named_parameters() if p.requires_grad}
    check_states(states, reference)
    if input_ids.dim() != 2 or tuple(mask.shape) != tuple(input_ids.shape) or input_ids.shape[0] < 1:
        raise ValueError(f"input_ids and mask must both have shape (batch >= 1, seq_len), got "
                         f"{tuple(input_ids.shape)} and {tuple(mask.shape)}")
    chunk = len(states) if max_entries_per_pass is None else int(max_entries_per_pass)
    if chunk < 1:
        raise ValueError(f"max_entries_per_pass={max_entries_per_pass} must be >= 1 (or None)")
    batch = int(input_ids.shape[0])
    was_training = model.training
    model.eval()
    parts, flops = [], 0.0
    try:
        with torch.no_grad():
            for start in range(0, len(states), chunk):
                group = list(states[start:start + chunk])
                stack = fbatched.DeviceStack.from_states(group)
                rows = len(group) * batch
                ids, msk = input_ids.repeat(len(group), 1), mask.repeat(len(group), 1)
                with profiling.flop_counter() as counter:
                    with fbatched.per_device_modules(model, stack, rows):
                        logits = profiling.classification_logits(model, ids, msk)
                flops += float(counter.get_total_flops())
                parts.append(logits.reshape(len(group), batch, -1))
    finally:
        model.train(was_training)
    return torch.cat(parts), flops


def library_predictions(trainer_or_model: Any, states: Sequence[dict], input_ids: "torch.Tensor",
                        mask: "torch.Tensor", max_entries_per_pass: Optional[int] = None) -> tuple[np.ndarray, float]:
    """Class probabilities (P, B, C) as a float64 numpy array (softmax of
    :func:`library_logits`, computed in the model's dtype) and the counted forward FLOPs [FLOP]."""
    import torch

    logits, flops = library_logits(trainer_or_model, states, input_ids, mask, max_entries_per_pass)
    return torch.softmax(logits, dim=-1).double().numpy(), flops


def mixed_prompt(states: Sequence[dict], weights: Any) -> dict:
    """sum_i w_i state_i for every PEFT tensor (soft prompt and head), computed in float64 and
    returned in the states' dtype: a starting point for a short tuning (a parameter average,
    not the mixture of predictions). One-hot weights return that entry exactly."""
    import torch

    names = check_states(states)
    w = check_weights(weights, len(states))
    mixed = {}
    for name in names:
        stacked = torch.stack([st[name].detach().to(torch.float64) for st in states])
        coeff = torch.from_numpy(w).reshape(-1, *([1] * (stacked.dim() - 1)))
        mixed[name] = (coeff * stacked).sum(dim=0).to(states[0][name].dtype)
    return mixed
