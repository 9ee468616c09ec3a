"""Zeroth-order fine-tuning of PEFT parameters: MeZO's SPSA step and FedKSeed's seed federation.

MeZO (Malladi et al., "Fine-Tuning Language Models with Just Forward Passes", NeurIPS 2023)
estimates the gradient of the loss f at the trainable parameters theta from two forward passes
along a random direction z ~ N(0, I) (SPSA, Spall 1992, with a central difference):

    g = (f(theta + eps z) - f(theta - eps z)) / (2 eps)        (the *projected gradient*)
    theta <- theta - lr (g z + wd theta)

E[g z] = E[z z^T] grad f = grad f up to O(eps^2) (exactly for a quadratic f: the central
difference of a quadratic is exact). z is never stored: it is regenerated from an integer seed
for each of its four uses (+eps, -2 eps, +eps, update), one tensor at a time, so a step holds
the parameters, one perturbation tensor and the forward pass's transient activations; no
autograd graph (forward passes run under ``torch.no_grad``), no saved activations, no
gradients, no optimizer state. That is MeZO's "inference-level" memory.

FedKSeed (Qin et al., "Federated Full-Parameter Tuning of Billion-Sized Language Models with
Communication Cost under 18 Kilobytes", ICML 2024) shares K candidate seeds once. Each local
step draws its seed from the K candidates, so a device's round is summarised by K scalars (the
projected gradients accumulated per seed); the server sums them weighted by device, and every
device rebuilds the model by *replaying* the (seed, scalar) pairs: theta <- theta - lr (g z(seed)
+ wd theta) per pair. A round exchanges kilobytes whatever the model size.

Determinism of the perturbation (why float64). ``torch.Generator`` on the CPU is MT19937 seeded
with the low 32 bits of the seed (seeds s and s + 2**32 give the same stream, hence
:data:`SEED_LIMIT`); its integer stream is specified and identical on every platform. The
Gaussian transform is not always: torch's float32 ``randn`` on the CPU uses SLEEF's vectorised
log/sin/cos on AVX2/AVX-512 builds and the scalar C library elsewhere (ARM, ``ATEN_CPU_CAPABILITY
=default``), whose last bits differ, so float32 draws differ between CPUs. Its float64 ``randn``
uses the scalar C-library functions on every dispatch level, so z is drawn in float64 and
rounded (IEEE round-to-nearest-even) to the parameter's dtype. The same seed then gives the same
z bitwise in any process, on any vector-instruction level and whatever torch's global RNG state
(the global RNG is never touched). The one residual dependence is the C library's float64
log/cos/sin (glibc's are correctly rounded in practice); a last-bit difference there changes a
float32 z only when the float64 value lies within that ulp of a float32 rounding boundary
(probability about 2**-29 per element).

Restoring theta in place is not exact in floating point: t1 = fl(theta + a), t2 = fl(t1 - 2a),
t3 = fl(t2 + a) with a = eps z (the product is exact or rounded once, identically in the three
operations, and 2a is exact) gives |t3 - theta| <= u (|theta + a| + |theta - a| + |theta|) +
O(u^2) <= u (3 |theta| + 2 |a|) (1 + 3u) (u the unit roundoff, plus three times the smallest
subnormal below the normal range). Exact restoration without storing theta is impossible in
general (fl(theta + a) is not injective in theta). MeZO accepts this; so does
:func:`spsa_step` by default (``exact_restore=False``). ``exact_restore=True`` keeps a copy of
the trainable tensors (their bytes, :func:`zo_step_memory_bytes`) and restores bitwise: the
device's trajectory is then bitwise the one :func:`replay` rebuilds from its (seed, scalar) pairs.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Union

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

SEED_LIMIT = 2**32
"""Seeds are integers in [0, SEED_LIMIT): torch's CPU generator keeps only the low 32 bits."""

MAX_CANDIDATE_SEEDS = 2**24
"""Largest K accepted (the draw holds K int64 seeds and K is the dense payload's length;
FedKSeed uses K <= 4096)."""

FP32_SCALAR_BYTES = 4
"""Bytes of one projected-gradient scalar on the wire (float32)."""

LossFn = Callable[[], Union[float, torch.Tensor]]
Pairs = Union[Mapping[int, float], Iterable[tuple[int, float]]]


# --------------------------------------------------------------------------------------------
# Perturbations regenerated from a seed
# --------------------------------------------------------------------------------------------
def check_seed(seed: Any) -> int:
    """``seed`` as a Python int, or ValueError unless it is an integer in [0, 2**32)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed={seed!r}: must be an integer in [0, 2**32)")
    value = int(seed)
    if not 0 <= value < SEED_LIMIT:
        raise ValueError(f"seed={value}: must be in [0, 2**32) (torch's CPU generator keeps only the low "
                         "32 bits, so larger seeds would collide)")
    return value


def iter_perturbation(seed: int, tensors: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Yield z_i ~ N(0, I) of each tensor's shape, dtype and device, one at a time, from one
    CPU ``torch.Generator`` seeded with ``seed`` (drawn in float64, then rounded; see the module
    docstring). At most one float64 draw and one z are alive at a time while the consumer drops
    each z before asking for the next."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(check_seed(seed))
    for t in tensors:
        z = torch.randn(tuple(t.shape), generator=gen, dtype=torch.float64).to(device=t.device, dtype=t.dtype)
        yield z
        del z


def perturbation(seed: int, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """z ~ N(0, I) with the shapes of ``tensors``, regenerated bitwise from ``seed`` (all at
    once; the steps below use :func:`iter_perturbation` and never hold them all)."""
    return list(iter_perturbation(seed, tensors))


def add_perturbation(params: Sequence[torch.Tensor], seed: int, scale: float) -> None:
    """theta_i += scale * z_i(seed), in place, one z tensor alive at a time."""
    zs = iter_perturbation(seed, params)
    with torch.no_grad():
        for p in params:
            z = next(zs)
            p.add_(z, alpha=scale)
            del z


# --------------------------------------------------------------------------------------------
# MeZO step
# --------------------------------------------------------------------------------------------
def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={value!r}: must be a finite number > 0")


def _check_non_negative(name: str, value: float) -> None:
    if not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}={value!r}: must be a finite number >= 0")


def apply_zo_update(params: Sequence[torch.Tensor], seed: int, projected_grad: float, lr: float,
                    weight_decay: float = 0.0) -> None:
    """theta <- theta - lr (g z(seed) + wd theta), in place, computed as theta *= (1 - lr wd)
    (skipped when wd = 0), then theta += (-lr g) z (the same arithmetic on a device and in
    :func:`replay`, so both give the same bits). Weight decay applies to every tensor given
    (MeZO exempts biases and LayerNorms: pass them separately with wd = 0 if wanted)."""
    step = -float(lr) * float(projected_grad)
    decay = float(lr) * float(weight_decay)
    if step == 0.0 and decay == 0.0:
        return
    zs = iter_perturbation(seed, params)
    with torch.no_grad():
        for p in params:
            z = next(zs)
            if decay != 0.0:
                p.mul_(1.0 - decay)
            p.add_(z, alpha=step)
            del z


def spsa_losses(loss_fn: LossFn, params: Sequence[torch.Tensor], seed: int, eps: float,
                exact_restore: bool = False) -> tuple[float, float]:
    """(f(theta + eps z), f(theta - eps z)) with z = z(seed); theta restored afterwards (also if
    ``loss_fn`` raises): in place within the bound of the module docstring, or bitwise from a
    copy when ``exact_restore``. ``loss_fn`` runs under ``torch.no_grad`` and must evaluate the
    same batch both times with the model in eval mode (:func:`classification_loss_fn`)."""
    _check_positive("eps", eps)
    saved = [p.detach().clone() for p in params] if exact_restore else None
    offset = 0.0  # multiple of eps z currently added
    try:
        with torch.no_grad():
            add_perturbation(params, seed, eps)
            offset = 1.0
            loss_plus = float(loss_fn())
            add_perturbation(params, seed, -2.0 * eps)
            offset = -1.0
            loss_minus = float(loss_fn())
    finally:
        with torch.no_grad():
            if saved is not None:
                for p, s in zip(params, saved):
                    p.copy_(s)
            elif offset != 0.0:
                add_perturbation(params, seed, -offset * eps)
    return loss_plus, loss_minus


def spsa_step(loss_fn: LossFn, params: Sequence[torch.Tensor], seed: int, eps: float, lr: float,
              weight_decay: float = 0.0, exact_restore: bool = False) -> float:
    """One MeZO step in place: two forward passes at theta +- eps z(seed), theta restored, then
    theta <- theta - lr (g z + wd theta). Returns the projected gradient
    g = (f(theta + eps z) - f(theta - eps z)) / (2 eps) [loss units per parameter unit].

    ValueError (theta restored, not updated) if a loss is not finite."""
    _check_non_negative("lr", lr)
    _check_non_negative("weight_decay", weight_decay)
    loss_plus, loss_minus = spsa_losses(loss_fn, params, seed, eps, exact_restore)
    if not (math.isfinite(loss_plus) and math.isfinite(loss_minus)):
        raise ValueError(f"zeroth-order step with seed {seed}: loss is not finite (f(theta + eps z) = "
                         f"{loss_plus}, f(theta - eps z) = {loss_minus}); lower eps={eps} or the learning rate")
    g = (loss_plus - loss_minus) / (2.0 * eps)
    apply_zo_update(params, seed, g, lr, weight_decay)
    return g


def classification_loss_fn(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           labels: torch.Tensor) -> Callable[[], float]:
    """Loss closure of one fixed batch for :func:`spsa_step`: puts ``model`` in eval mode
    (dropout off, so both forward passes compute the same function) and returns the mean
    cross-entropy as a float, under ``torch.no_grad``."""
    from fomo.profiling import classification_loss

    def loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(classification_loss(model, input_ids, attention_mask, labels))

    return loss


# --------------------------------------------------------------------------------------------
# FedKSeed
# --------------------------------------------------------------------------------------------
def candidate_seeds(k: int, rng: np.random.Generator) -> np.ndarray:
    """K distinct candidate seeds in [0, 2**32) (int64), drawn without replacement from ``rng``;
    shared once by the server with every device."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= int(k) <= MAX_CANDIDATE_SEEDS:
        raise ValueError(f"K={k!r}: the number of candidate seeds must be an integer in [1, {MAX_CANDIDATE_SEEDS}]")
    return rng.choice(SEED_LIMIT, size=int(k), replace=False).astype(np.int64)


def draw_seed_indices(k: int, steps: int, rng: np.random.Generator) -> np.ndarray:
    """The candidate index (in [0, K)) of each local step: uniform draws with replacement, the
    draws :func:`draw_seeds` makes (``draw_seeds(pool, steps, rng) ==
    pool[draw_seed_indices(len(pool), steps, rng)]`` for generators in the same state)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"K={k!r}: the number of candidate seeds must be an integer >= 1")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"steps={steps!r}: must be an integer >= 0")
    return rng.integers(0, int(k), size=int(steps))


def draw_seeds(seeds_pool: np.ndarray, steps: int, rng: np.random.Generator) -> np.ndarray:
    """The seed of each local step: uniform draws (with replacement) from the K candidates."""
    pool = np.asarray(seeds_pool)
    if pool.ndim != 1 or pool.size == 0:
        raise ValueError(f"seeds_pool: expected a non-empty 1-D array of candidate seeds, got shape {pool.shape}")
    return pool[draw_seed_indices(pool.size, steps, rng)]


def local_zo_round(loss_fn_per_step: Callable[[int], LossFn], params: Sequence[torch.Tensor],
                   seeds_pool: np.ndarray, steps: int, eps: float, lr: float, rng: np.random.Generator,
                   weight_decay: float = 0.0, exact_restore: bool = False) -> dict[int, float]:
    """A device's FedKSeed round: ``steps`` MeZO steps applied in place to ``params``, step t
    with the seed ``draw_seeds(seeds_pool, steps, rng)[t]`` on the batch of
    ``loss_fn_per_step(t)``. Returns {seed: sum of the projected gradients of the steps that
    drew it} (keys in first-draw order; only drawn seeds appear)."""
    pool: dict[int, float] = {}
    for t, seed in enumerate(draw_seeds(seeds_pool, steps, rng)):
        s = int(seed)
        g = spsa_step(loss_fn_per_step(t), params, s, eps, lr, weight_decay, exact_restore)
        pool[s] = pool.get(s, 0.0) + g
    return pool


def aggregate_pools(pools: Sequence[Mapping[int, float]], weights: Sequence[float]) -> dict[int, float]:
    """Server aggregation sum_k w_k pool_k (float64, devices in the given order, seeds ascending
    within a device), keyed by seed in ascending order."""
    if len(pools) != len(weights):
        raise ValueError(f"aggregate_pools: {len(pools)} pools but {len(weights)} weights")
    bad = [w for w in weights if not (isinstance(w, numbers.Real) and math.isfinite(w))]
    if bad:
        raise ValueError(f"aggregate_pools: weights must be finite numbers, got {bad}")
    total: dict[int, float] = {}
    for pool, w in zip(pools, weights):
        for seed in sorted(pool):
            total[int(seed)] = total.get(int(seed), 0.0) + float(w) * float(pool[seed])
    return dict(sorted(total.items()))


def ordered_pairs(pairs: Pairs) -> list[tuple[int, float]]:
    """The (seed, scalar) pairs in replay order: a mapping (a seed pool) by ascending seed,
    zero scalars dropped (as FedKSeed: with weight decay a zero pair would still decay theta);
    any other iterable of pairs in its own order, kept whole (a device's step sequence)."""
    if isinstance(pairs, Mapping):
        return [(check_seed(s), float(g)) for s, g in sorted(pairs.items()) if float(g) != 0.0]
    return [(check_seed(s), float(g)) for s, g in pairs]


def replay(params0: Sequence[torch.Tensor], pairs: Pairs, lr: float, weight_decay: float = 0.0) -> list[torch.Tensor]:
    """Rebuild parameters from ``params0`` (not modified) by applying
    theta <- theta - lr (g z(seed) + wd theta) for each pair in :func:`ordered_pairs` order,
    with the arithmetic of :func:`apply_zo_update`. Bitwise equal to a device that started from
    ``params0`` and applied the same updates in the same order with exact restoration."""
    _check_non_negative("lr", lr)
    _check_non_negative("weight_decay", weight_decay)
    params = [p.detach().clone() for p in params0]
    for seed, g in ordered_pairs(pairs):
        apply_zo_update(params, seed, g, lr, weight_decay)
    return params


def index_bytes(k: int) -> int:
    """Bytes of a candidate-seed index: ceil(log2 K) bits rounded up to whole bytes (K = 1 needs
    none; K <= 256: 1 byte; K <= 65536: 2 bytes)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"K={k!r}: the number of candidate seeds must be an integer >= 1")
    return (int(k - 1).bit_length() + 7) // 8


def dense_payload_bytes(k: int) -> int:
    """One float32 scalar per candidate seed, in candidate order: 4 K bytes."""
    index_bytes(k)  # validates K
    return FP32_SCALAR_BYTES * int(k)


def sparse_payload_bytes(k: int, pairs_used: int) -> int:
    """The used (index, float32 scalar) pairs: pairs_used * (index_bytes(K) + 4) bytes."""
    if isinstance(pairs_used, bool) or not isinstance(pairs_used, numbers.Integral) or not 0 <= pairs_used <= k:
        raise ValueError(f"pairs_used={pairs_used!r}: must be an integer in [0, K={k}]")
    return int(pairs_used) * (index_bytes(k) + FP32_SCALAR_BYTES)


def seed_payload_bytes(k: int, pairs_used: int) -> int:
    """Bytes of one seed-pool message: the smaller of the dense (4 K) and sparse
    (pairs_used (index_bytes(K) + 4)) encodings, dense on a tie. No header is needed: a message
    of exactly 4 K bytes is dense, any other length sparse. FedKSeed's K = 4096 dense: 16,384 B."""
    return min(dense_payload_bytes(k), sparse_payload_bytes(k, pairs_used))


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------
def perturbation_buffer_bytes(params: Sequence[torch.Tensor]) -> int:
    """Peak bytes of the perturbation buffers of a step: the largest tensor's float64 draw plus
    its cast to the tensor's dtype (numel (8 + element size); a float64 tensor needs only the
    draw), one tensor at a time [bytes]."""
    return max((p.numel() * (8 + (p.element_size() if p.dtype != torch.float64 else 0)) for p in params),
               default=0)


def zo_step_memory_bytes(all_weights_bytes: int, params: Sequence[torch.Tensor], exact_restore: bool = False) -> int:
    """Memory of a zeroth-order job [bytes], the counterpart of
    :func:`fomo.profiling.job_memory_bytes` (which adds gradients, optimizer states and saved
    activations to the weights): all weights + :func:`perturbation_buffer_bytes` (+ a copy of
    the trainable tensors with ``exact_restore``); 0 saved activations, no gradient, no
    optimizer state. Like the backprop formula it leaves out the forward pass's transient
    activations, which :class:`LiveTensorMeter` measures."""
    copy = sum(p.numel() * p.element_size() for p in params) if exact_restore else 0
    return int(all_weights_bytes + perturbation_buffer_bytes(params) + copy)


class LiveTensorMeter(TorchDispatchMode):
    """Measured peak of the bytes of tensor storages allocated by torch operators inside the
    block and still alive [bytes] (``peak_bytes``), sampled after every operator.

    A storage counts when an operator returns it and it is not the storage of one of that
    operator's inputs (views and in-place results alias their input); it stops counting when
    it is freed (``StorageWeakRef.expired``, polled at each operator). Storages that existed
    before the block (weights, inputs) are not counted. Buffers that a kernel allocates and
    frees internally are invisible; so is memory outside torch tensors."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.live_bytes = 0
        self.peak_bytes = 0

    def _purge(self) -> None:
        for key in [k for k, (ref, _) in self._live.items() if ref.expired()]:
            self.live_bytes -= self._live.pop(key)[1]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        self._purge()
        for t in _tensors(out):
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if storage.nbytes() == 0 or key in inputs or key in self._live:
                continue
            self._live[key] = (StorageWeakRef(storage), int(storage.nbytes()))
            self.live_bytes += int(storage.nbytes())
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return out


def _tensors(tree: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nest of tuples, lists and dicts."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


def measured_peak_bytes(fn: Callable[[], Any]) -> int:
    """Run ``fn`` under :class:`LiveTensorMeter`; its peak of live operator-allocated bytes."""
    with LiveTensorMeter() as meter:
        fn()
    return meter.peak_bytes
