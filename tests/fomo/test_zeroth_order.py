"""fomo.zeroth_order: MeZO's SPSA step against theory, seed-regenerated perturbations, the exact
restore and replay, FedKSeed's seed pools and payloads; on the real all-MiniLM-L6-v2 + LoRA
(slow): SPSA lowers the loss and its step's measured memory is below a backprop step's."""
from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

from fomo import zeroth_order as zo

U32 = 2.0**-24
"""Unit roundoff of float32 (round to nearest)."""
U64 = 2.0**-53
"""Unit roundoff of float64."""
TINY32 = 2.0**-149
"""Smallest float32 subnormal: the absolute error of an addition below the normal range."""


# --------------------------------------------------------------------------------------------
# Perturbations
# --------------------------------------------------------------------------------------------
SHAPES = [(3, 5), (7,), (2, 4, 6), (1,), (64, 33)]


def tensors_of(shapes: list[tuple[int, ...]], dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    return [torch.zeros(s, dtype=dtype) for s in shapes]


def digest(zs: list[torch.Tensor]) -> str:
    return hashlib.sha256(b"".join(z.numpy().tobytes() for z in zs)).hexdigest()


def test_perturbation_shapes_dtypes_and_standard_normal_moments() -> None:
    """Shapes and dtypes follow the tensors; over 2**17 elements the sample mean and variance are
    those of N(0, 1) within 5 standard errors (mean: 1/sqrt(n); variance: sqrt(2/n))."""
    ts = [torch.zeros(256, 256), torch.zeros(2, 64, dtype=torch.float64), torch.zeros(256, 255)]
    zs = zo.perturbation(7, ts)
    assert [(z.shape, z.dtype) for z in zs] == [(t.shape, t.dtype) for t in ts]
    x = torch.cat([z.double().flatten() for z in zs])
    n = x.numel()
    assert abs(float(x.mean())) <= 5 / math.sqrt(n)
    assert abs(float(x.var()) - 1.0) <= 5 * math.sqrt(2.0 / n)


def test_perturbation_is_regenerated_bitwise_and_leaves_the_global_rng_alone() -> None:
    ts = tensors_of(SHAPES)
    first = zo.perturbation(123456, ts)
    state = torch.get_rng_state()
    torch.manual_seed(99)
    torch.rand(17)  # move the global generator
    again = zo.perturbation(123456, ts)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    moved = torch.get_rng_state()
    zo.perturbation(5, ts)
    assert torch.equal(torch.get_rng_state(), moved), "perturbation() must not touch torch's global RNG"
    torch.set_rng_state(state)
    other = zo.perturbation(123457, ts)
    assert not torch.equal(first[0], other[0])
    # the float32 z is the rounding of the float64 draw: the same seed on float64 tensors
    wide = zo.perturbation(123456, tensors_of(SHAPES, torch.float64))
    assert all(torch.equal(a, b.to(torch.float32)) for a, b in zip(first, wide))


CHILD = """
import hashlib, sys, torch
from fomo import zeroth_order as zo
torch.manual_seed(int(sys.argv[1]))
ts = [torch.zeros(s) for s in {shapes!r}]
zs = zo.perturbation(4_000_000_000, ts)
print(hashlib.sha256(b"".join(z.numpy().tobytes() for z in zs)).hexdigest())
"""


def child_digest(env_extra: dict[str, str], global_seed: int) -> str:
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", CHILD.format(shapes=SHAPES), str(global_seed)], env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_perturbation_is_bitwise_across_processes_and_cpu_vector_levels() -> None:
    """The same seed gives the same bits in another process with another global seed, and with
    torch's CPU kernels forced to the portable scalar level (``ATEN_CPU_CAPABILITY=default``, the
    code path of CPUs without AVX2): float32 ``randn`` itself differs between those levels
    (vectorised SLEEF log/sin/cos), which is why z is drawn in float64 (module docstring)."""
    here = digest(zo.perturbation(4_000_000_000, tensors_of(SHAPES)))
    assert child_digest({}, global_seed=1) == here
    assert child_digest({"ATEN_CPU_CAPABILITY": "default"}, global_seed=2) == here


def test_seeds_are_32_bit_because_torch_keeps_only_the_low_bits() -> None:
    a = torch.randn(8, generator=torch.Generator().manual_seed(1))
    b = torch.randn(8, generator=torch.Generator().manual_seed(1 + 2**32))
    assert torch.equal(a, b)  # the collision SEED_LIMIT prevents
    assert zo.check_seed(np.int64(2**32 - 1)) == 2**32 - 1
    for bad in (-1, 2**32, 1.5, True, "3"):
        with pytest.raises(ValueError, match="seed="):
            zo.check_seed(bad)


# --------------------------------------------------------------------------------------------
# SPSA against theory
# --------------------------------------------------------------------------------------------
def quadratic(d: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A symmetric positive definite, b, theta) of f(theta) = 0.5 theta^T A theta + b^T theta."""
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(d, d))
    return m @ m.T / d + np.eye(d), rng.normal(size=d), rng.normal(size=d)


def test_spsa_projected_gradient_of_a_quadratic_is_the_directional_derivative_and_unbiased() -> None:
    """For a quadratic the central difference is exact: g = <grad f, z> up to float64 rounding
    (bound below). Hence E[g z] = E[z z^T] grad f = grad f, and Var(g z_i) = |c|^2 + c_i^2 for
    c = grad f (E[z_i^4] = 3): the mean over N seeds is within 5 standard errors
    sqrt((|c|^2 + c_i^2) / N) of c_i in every coordinate, while a factor-2 bias would not be."""
    d, n_seeds, eps = 6, 4000, 1e-3
    a, b, theta0 = quadratic(d, seed=11)
    grad = a @ theta0 + b
    theta = torch.tensor(theta0)
    at, bt = torch.tensor(a), torch.tensor(b)
    evaluated: list[np.ndarray] = []

    def f() -> float:
        evaluated.append(theta.numpy().copy())
        return float(0.5 * theta @ at @ theta + bt @ theta)

    total = np.zeros(d)
    for seed in range(n_seeds):
        evaluated.clear()
        g = zo.spsa_step(f, [theta], seed, eps, lr=0.0, exact_restore=True)
        z = zo.perturbation(seed, [theta])[0].numpy()
        # rounding: each evaluation point is off by <= u |theta +- eps z| per coordinate, moving f
        # by <= |grad f(point)| . that; f itself is a sum of <= d^2 + d products: gamma_{d^2+d+2}
        # times the sum of their magnitudes. Divided by 2 eps; times 2 for slack.
        gam = (d * d + d + 2) * U64 / (1 - (d * d + d + 2) * U64)
        err = 0.0
        for pt in evaluated:
            err += gam * (0.5 * np.abs(pt) @ np.abs(a) @ np.abs(pt) + np.abs(b) @ np.abs(pt))
            err += U64 * (np.abs(a @ pt + b) @ np.abs(pt))
        assert abs(g - grad @ z) <= 2 * err / (2 * eps), (seed, g, grad @ z)
        total += g * z
    np.testing.assert_array_equal(theta.numpy(), theta0)  # exact_restore, lr = 0: theta unchanged
    mean = total / n_seeds
    se = np.sqrt((grad @ grad + grad**2) / n_seeds)
    assert np.all(np.abs(mean - grad) <= 5 * se), (mean, grad, se)
    assert np.any(np.abs(mean / 2 - grad) > 5 * se)  # the test has the power to see a bias


def test_spsa_error_is_second_order_in_eps() -> None:
    """f = sum theta^4 / 4: (f(theta + eps z) - f(theta - eps z)) / (2 eps) = sum theta^3 z +
    eps^2 sum theta z^3 exactly, the O(eps^2) term of the central difference."""
    theta0 = np.random.default_rng(3).normal(size=5)
    theta = torch.tensor(theta0)
    for eps in (1e-1, 1e-2):
        g = zo.spsa_step(lambda: float((theta**4).sum() / 4), [theta], 77, eps, lr=0.0, exact_restore=True)
        z = zo.perturbation(77, [theta])[0].numpy()
        expected = theta0**3 @ z + eps**2 * (theta0 @ z**3)
        scale = (np.abs(theta0) + eps * np.abs(z)) ** 4
        assert abs(g - expected) <= 64 * U64 * scale.sum() / (2 * eps)
        assert abs(g - theta0**3 @ z) > 0.5 * eps**2 * abs(theta0 @ z**3)


def test_spsa_step_update_is_minus_lr_times_g_z_plus_weight_decay() -> None:
    """theta1 = theta0 (1 - lr wd) - lr g z on float64, to rounding (2 operations per element)."""
    theta0 = np.random.default_rng(4).normal(size=(4, 3))
    theta = torch.tensor(theta0)
    lr, wd = 0.05, 0.1
    g = zo.spsa_step(lambda: float((theta**2).sum()), [theta], 9, 1e-3, lr, weight_decay=wd)
    z = zo.perturbation(9, [theta])[0].numpy()
    expected = theta0 - lr * (g * z + wd * theta0)
    # the restore leaves <= u (3|theta| + 2 eps|z|)(1 + 3u); two more roundings of the update
    bound = U64 * (3 * np.abs(theta0) + 2e-3 * np.abs(z)) * 1.01 + 3 * U64 * (np.abs(expected) + lr * abs(g * z))
    assert np.all(np.abs(theta.numpy() - expected) <= bound)


def test_spsa_restore_float32_is_within_the_rounding_bound_and_exact_with_a_copy() -> None:
    """t1 = fl(theta + a), t2 = fl(t1 - 2a), t3 = fl(t2 + a): |t3 - theta| <= u (3|theta| + 2|a|)
    (1 + 3u) + 3 x smallest subnormal (module docstring), a = eps z. With |eps z| of the order of
    |theta| the bits lost rounding t1 make some coordinates inexact; ``exact_restore`` restores
    them bitwise. The loss is evaluated at fl(theta + a) and fl(t1 - 2a) (within u of theta +- a)."""
    rng = np.random.default_rng(5)
    theta0 = (rng.normal(size=(256, 256)) * np.exp(rng.normal(size=(256, 256)))).astype(np.float32)
    theta0[0, :16] = 0.0
    eps, seed = 0.5, 2024
    z = zo.perturbation(seed, [torch.zeros(256, 256)])[0].double().numpy()
    a = eps * np.float32(1.0) * z
    theta = torch.tensor(theta0)
    seen: list[np.ndarray] = []

    def f() -> float:
        seen.append(theta.double().numpy().copy())
        return float(theta.double().sum())

    zo.spsa_step(f, [theta], seed, eps, lr=0.0)
    t0 = theta0.astype(np.float64)
    # a kernel without FMA rounds a to fl(a) first (|fl(a) - a| <= u|a|), the same in all three
    assert np.all(np.abs(seen[0] - (t0 + a)) <= U32 * (np.abs(t0 + a) + np.abs(a)) * 1.01 + TINY32)
    assert np.all(np.abs(seen[1] - (t0 - a)) <= U32 * (np.abs(t0 + a) + np.abs(t0 - a) + 3 * np.abs(a)) * 1.01
                  + 2 * TINY32)
    err = np.abs(theta.double().numpy() - t0)
    assert np.all(err <= U32 * (3 * np.abs(t0) + 2 * np.abs(a)) * (1 + 4 * U32) + 3 * TINY32)
    assert np.count_nonzero(err) > 0  # float addition is not reversible: the bound is needed

    exact = torch.tensor(theta0)
    seen.clear()
    theta = exact
    zo.spsa_step(f, [exact], seed, eps, lr=0.0, exact_restore=True)
    assert np.array_equal(exact.numpy(), theta0)


def test_spsa_restores_theta_when_the_loss_raises() -> None:
    theta0 = np.random.default_rng(6).normal(size=7)
    theta = torch.tensor(theta0)
    calls = []

    def f() -> float:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return 0.0

    with pytest.raises(RuntimeError, match="boom"):
        zo.spsa_step(f, [theta], 1, 1e-2, 0.1, exact_restore=True)
    np.testing.assert_array_equal(theta.numpy(), theta0)
    with pytest.raises(ValueError, match="not finite"):
        zo.spsa_step(lambda: float("nan"), [theta], 1, 1e-2, 0.1, exact_restore=True)
    np.testing.assert_array_equal(theta.numpy(), theta0)
    for kwargs, field in (({"eps": 0.0}, "eps="), ({"lr": -1.0}, "lr="), ({"weight_decay": math.inf}, "weight_decay=")):
        args = {"eps": 1e-2, "lr": 0.1, **kwargs}
        with pytest.raises(ValueError, match=field):
            zo.spsa_step(f, [theta], 1, args["eps"], args["lr"], weight_decay=args.get("weight_decay", 0.0))


# --------------------------------------------------------------------------------------------
# FedKSeed: seeds, rounds, aggregation, replay
# --------------------------------------------------------------------------------------------
def logistic_problem(seed: int) -> tuple[list[torch.Tensor], Callable[[int], Callable[[], float]]]:
    """Float32 (weight, bias) of a 3-class softmax regression (labels from a random linear
    teacher, so learnable) and a per-step loss on its batch t (8 batches of 8 examples)."""
    rng = np.random.default_rng(seed)
    x = torch.tensor(rng.normal(size=(64, 10)), dtype=torch.float32)
    y = torch.argmax(x @ torch.tensor(rng.normal(size=(10, 3)), dtype=torch.float32), dim=1)
    params = [torch.tensor(rng.normal(size=(3, 10)) * 0.1, dtype=torch.float32), torch.zeros(3)]

    def loss_for_step(t: int) -> Callable[[], float]:
        rows = slice(8 * (t % 8), 8 * (t % 8) + 8)
        if t < 0:  # the whole data set
            rows = slice(0, 64)
        return lambda: float(torch.nn.functional.cross_entropy(x[rows] @ params[0].T + params[1], y[rows]))

    return params, loss_for_step


def test_candidate_seeds_are_distinct_32_bit_and_reproducible() -> None:
    s = zo.candidate_seeds(4096, np.random.default_rng(1))
    assert s.dtype == np.int64 and s.shape == (4096,) and len(np.unique(s)) == 4096
    assert s.min() >= 0 and s.max() < 2**32
    np.testing.assert_array_equal(s, zo.candidate_seeds(4096, np.random.default_rng(1)))
    for bad in (0, -3, 2.0, 2**24 + 1):
        with pytest.raises(ValueError, match="K="):
            zo.candidate_seeds(bad, np.random.default_rng(1))


def test_replay_of_a_device_s_steps_is_bitwise_its_parameters() -> None:
    """A device running local_zo_round with exact restoration (weight decay on) ends with the
    bits replay() rebuilds from the initial parameters and its (seed, g) steps in order; the pool
    sums each seed's g. Without exact restoration the device drifts by the restore rounding."""
    params, loss_for_step = logistic_problem(7)
    params0 = [p.clone() for p in params]
    pool_seeds = zo.candidate_seeds(16, np.random.default_rng(8))
    steps, eps, lr, wd = 60, 1e-2, 0.05, 0.01
    drawn = zo.draw_seeds(pool_seeds, steps, np.random.default_rng(9))
    assert len(np.unique(drawn)) < steps  # some seeds drawn twice: the pool sums them

    twin, twin_loss_for_step = logistic_problem(7)  # the same device, stepped by hand
    sequence = [(int(s), zo.spsa_step(twin_loss_for_step(t), twin, int(s), eps, lr, wd, exact_restore=True))
                for t, s in enumerate(drawn)]
    pool = zo.local_zo_round(loss_for_step, params, pool_seeds, steps, eps, lr, np.random.default_rng(9),
                             weight_decay=wd, exact_restore=True)
    assert all(torch.equal(p, q) for p, q in zip(params, twin))
    expected: dict[int, float] = {}
    for s, g in sequence:
        expected[s] = expected.get(s, 0.0) + g
    assert pool == expected and list(pool) == list(dict.fromkeys(s for s, _ in sequence))

    start = [p.clone() for p in params0]
    rebuilt = zo.replay(params0, sequence, lr, wd)
    assert all(torch.equal(p, q) for p, q in zip(rebuilt, params))
    assert all(torch.equal(p, q) for p, q in zip(params0, start))  # replay leaves params0 alone
    assert not torch.equal(rebuilt[0], params0[0])


def test_local_rounds_train_and_the_server_replay_rebuilds_the_average() -> None:
    """Two devices' FedKSeed rounds on a learnable convex problem lower its loss; the server's
    weighted pool replayed from the round's start has the loss of a trained model too, and
    equals theta0 - lr sum_seeds pool(seed) z(seed) (no decay) to float32 rounding."""
    params, loss_for_step = logistic_problem(12)
    params0 = [p.clone() for p in params]
    seeds = zo.candidate_seeds(64, np.random.default_rng(13))
    full = loss_for_step(-1)
    before = full()
    pools = []
    for device in range(2):
        with torch.no_grad():
            for p, q in zip(params, params0):
                p.copy_(q)
        pools.append(zo.local_zo_round(loss_for_step, params, seeds, 300, 1e-2, 0.1, np.random.default_rng(device)))
        assert full() < 0.8 * before, (device, before, full())
    total = zo.aggregate_pools(pools, [0.5, 0.5])
    rebuilt = zo.replay(params0, total, lr=0.1)
    with torch.no_grad():
        for p, q in zip(params, rebuilt):
            p.copy_(q)
    assert full() < 0.8 * before
    for i, x in enumerate(rebuilt):
        dense = params0[i].double() - 0.1 * sum(g * zo.perturbation(s, params0)[i].double() for s, g in total.items())
        mag = params0[i].double().abs() + sum(0.1 * abs(g) * zo.perturbation(s, params0)[i].double().abs()
                                              for s, g in total.items())
        assert torch.all((x.double() - dense).abs() <= 2 * len(total) * U32 * mag * 1.01)


def test_replay_of_a_pool_goes_by_ascending_seed_and_skips_zeros() -> None:
    params, _ = logistic_problem(10)
    pool = {900: 0.3, 17: -1.2, 5000: 0.0, 42: 0.7}
    assert zo.ordered_pairs(pool) == [(17, -1.2), (42, 0.7), (900, 0.3)]
    a = zo.replay(params, pool, lr=0.1, weight_decay=0.5)
    b = zo.replay(params, [(17, -1.2), (42, 0.7), (900, 0.3)], lr=0.1, weight_decay=0.5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # without weight decay the order changes only the rounding of theta - lr sum g z (3 additions,
    # each within u of its partial sum, itself <= |theta| + sum lr |g z|); with decay it is a
    # different model (theta (1 - lr wd)^3 - lr sum g_i z_i (1 - lr wd)^(n - i))
    up = zo.replay(params, [(17, -1.2), (42, 0.7), (900, 0.3)], lr=0.1)
    down = zo.replay(params, [(900, 0.3), (42, 0.7), (17, -1.2)], lr=0.1)
    zs = {s: zo.perturbation(s, params) for s in pool}
    for i, (x, y) in enumerate(zip(up, down)):
        mag = params[i].double().abs() + sum(0.1 * abs(g) * zs[s][i].double().abs() for s, g in pool.items())
        assert torch.all((x.double() - y.double()).abs() <= 2 * 3 * U32 * mag * 1.01)
    with pytest.raises(ValueError, match="seed="):
        zo.replay(params, {-1: 1.0}, lr=0.1)


def test_aggregate_pools_is_the_weighted_sum() -> None:
    pools = [{3: 1.0, 1: 2.0}, {1: -1.0, 8: 4.0}]
    total = zo.aggregate_pools(pools, [0.25, 0.75])
    assert total == {1: 0.25 * 2.0 - 0.75, 3: 0.25, 8: 3.0} and list(total) == [1, 3, 8]
    with pytest.raises(ValueError, match="2 pools but 1 weights"):
        zo.aggregate_pools(pools, [1.0])
    with pytest.raises(ValueError, match="finite"):
        zo.aggregate_pools(pools, [1.0, math.nan])


def test_payload_formulas() -> None:
    assert [zo.index_bytes(k) for k in (1, 2, 256, 257, 65536, 65537, 2**24 + 1)] == [0, 1, 1, 2, 2, 3, 4]
    assert zo.dense_payload_bytes(4096) == 4 * 4096 == 16384
    assert zo.sparse_payload_bytes(4096, 200) == 200 * (2 + 4)
    assert zo.seed_payload_bytes(4096, 200) == 1200  # FedKSeed's 200 local steps: sparse
    assert zo.seed_payload_bytes(4096, 4096) == 16384 < 18 * 1024  # dense: under 18 kB
    assert zo.seed_payload_bytes(256, 205) == zo.dense_payload_bytes(256) == 1024  # 205 * 5 = 1025 > 1024
    assert zo.seed_payload_bytes(256, 204) == 1020
    assert zo.seed_payload_bytes(1, 1) == 4  # K = 1: no index, a tie, dense
    with pytest.raises(ValueError, match="pairs_used=5"):
        zo.sparse_payload_bytes(4, 5)
    with pytest.raises(ValueError, match="K=0"):
        zo.seed_payload_bytes(0, 0)


def test_perturbation_buffer_is_measured_exactly() -> None:
    """The meter sees exactly one float64 draw + its float32 cast of the largest tensor."""
    params = [torch.zeros(300, 20), torch.zeros(50), torch.zeros(64, 64)]
    assert zo.perturbation_buffer_bytes(params) == 300 * 20 * (8 + 4)
    assert zo.measured_peak_bytes(lambda: zo.add_perturbation(params, 1, 0.1)) == 300 * 20 * 12
    assert zo.perturbation_buffer_bytes([torch.zeros(10, dtype=torch.float64)]) == 80  # no cast
    assert zo.zo_step_memory_bytes(1000, params) == 1000 + 300 * 20 * 12
    assert zo.zo_step_memory_bytes(1000, params, exact_restore=True) == 1000 + 300 * 20 * 12 + 4 * (6000 + 50 + 4096)


# --------------------------------------------------------------------------------------------
# Real model (slow)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_lora() -> Iterator[tuple[torch.nn.Module, list[torch.Tensor], tuple[torch.Tensor, ...]]]:
    """all-MiniLM-L6-v2 + LoRA (fomo.models defaults: r 8 on query/value, 5-class head) and a
    fixed batch of 4 BBC News articles of 4 topics, 16 tokens, on one torch thread."""
    from fomo import data, models
    from netsim.scenario import ModelSpec, PeftSpec

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tokenizer, base = models.load_base(ModelSpec(), num_labels=5)
        model = models.apply_peft(base, PeftSpec())
    texts, labels, _ = data.load_bbc_news()
    _, first = np.unique(labels, return_index=True)
    idx = first[:4]
    enc = tokenizer([texts[i] for i in idx], truncation=True, max_length=16, padding="max_length",
                    return_tensors="pt")
    params = [p for _, p in models.trainable_parameters(model)]
    yield model, params, (enc["input_ids"], enc["attention_mask"], torch.as_tensor(labels[idx]))
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_spsa_lowers_the_real_model_loss(real_lora) -> None:
    """200 MeZO steps (lr 5e-3, eps 1e-2) on the 75,653 LoRA + head parameters lower the loss of
    the fixed batch. Measured (AMD EPYC, one thread): 1.601 -> 1.304; asserted: a drop of at
    least 0.05, far above the rounding of a float32 loss (1e-6) yet well below the measured
    drop, so another CPU's slightly different trajectory passes too."""
    model, params, batch = real_lora
    saved = [p.detach().clone() for p in params]
    loss = zo.classification_loss_fn(model, *batch)
    before = loss()
    for seed in range(200):
        zo.spsa_step(loss, params, seed, eps=1e-2, lr=5e-3)
    after = loss()
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    assert math.isfinite(after) and after < before - 0.05, (before, after)


@pytest.mark.slow
def test_spsa_step_memory_is_inference_level_and_below_backprop(real_lora) -> None:
    """Measured on the same batch: an SPSA step saves no activations (SavedTensorMeter: 0 B) and
    its peak of live tensors is the forward's transients or the perturbation buffer, never both;
    a backprop step's peak holds at least the saved activations fomo.profiling counts, and is
    higher. The memory formulas (weights + buffers; backprop adds gradients + activations) agree."""
    from fomo import profiling

    model, params, (ids, mask, labels) = real_lora
    saved = [p.detach().clone() for p in params]
    loss = zo.classification_loss_fn(model, ids, mask, labels)
    with profiling.SavedTensorMeter(profiling.storage_ptrs(model)) as meter:
        zo.spsa_step(loss, params, 1, 1e-2, 1e-3)
    assert meter.saved_bytes == 0
    forward_peak = zo.measured_peak_bytes(loss)
    spsa_peak = zo.measured_peak_bytes(lambda: zo.spsa_step(loss, params, 2, 1e-2, 1e-3))
    buffer = zo.perturbation_buffer_bytes(params)
    assert buffer <= spsa_peak <= forward_peak + buffer

    model.train()
    profile = profiling.count_step_flops(model, ids, mask, labels)

    def backprop() -> None:
        profiling.classification_loss(model, ids, mask, labels).backward()

    backprop_peak = zo.measured_peak_bytes(backprop)
    for p, s in zip(params, saved):
        p.grad = None
        with torch.no_grad():
            p.copy_(s)
    assert profile.saved_activation_bytes > 0
    assert backprop_peak >= profile.saved_activation_bytes
    assert spsa_peak < backprop_peak
    weights = profiling.weights_bytes(model)
    trainable = sum(p.numel() * p.element_size() for p in params)
    assert zo.zo_step_memory_bytes(weights, params) < profiling.job_memory_bytes(
        weights, trainable, "sgd", profile.saved_activation_bytes)
