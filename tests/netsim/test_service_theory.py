"""The fine-tuning service's queueing core (netsim/service.py) against queueing theory, with
surrogate service times: M/M/1 and M/D/1 mean waits, M/M/c (Erlang C), M/M/1/K blocking,
Little's law, non-preemptive priorities (Cobham), and exact orders of the disciplines and the
admission policies on small deterministic examples.

Fixed seeds. Successive waits are correlated, so standard errors come from batch means over
runs of consecutive requests (50 batches of >= 1,000 requests, each much longer than the
queue's relaxation time); a statistical assertion allows 5 standard errors, and checks that
this tolerance is tight enough (10 %, 20 % for the slowest-mixing queues, of the theory) for
the test to be able to fail.
"""
import math
import subprocess
import sys

import numpy as np
import pytest
import simpy

from netsim.records import Recorder
from netsim.service import (DeadlineFeasible, MAX_REQUESTS, PoissonArrivals, Request, ServiceEdge, TraceArrivals,
                            UserClass, admission_policy, all_of, deadline_feasible, erlang_c, md1_mean_wait_s,
                            memory_fits, mm1_mean_wait_s, mm1k_blocking_probability, mm1k_mean_in_system,
                            mmc_mean_wait_s, priority_mean_waits_s, surrogate_service)

BATCHES = 50


def batch_se(samples) -> float:
    """Standard error of the mean of a correlated sequence from BATCHES batch means."""
    x = np.asarray(samples, dtype=float)
    x = x[: len(x) // BATCHES * BATCHES].reshape(BATCHES, -1).mean(axis=1)
    return float(x.std(ddof=1) / math.sqrt(BATCHES))


def exponential(mean_s):
    return lambda rng: float(rng.exponential(mean_s))


def run_poisson(classes, n, *, seed=0, slots=1, capacity=None, discipline="fcfs", admission=None, horizon_s=None):
    """Poisson arrivals of ``classes`` into a surrogate-service edge; run until drained (or to
    horizon_s)."""
    env = simpy.Environment()
    kwargs = {} if admission is None else {"admission": admission}
    edge = ServiceEdge(env, surrogate_service(env), slots=slots, capacity=capacity, discipline=discipline, **kwargs)
    PoissonArrivals(env, classes, seed, edge.submit, max_count=n, horizon_s=horizon_s)
    env.run(until=horizon_s)
    return edge


def run_trace(trace, **edge_kwargs):
    env = simpy.Environment()
    edge = ServiceEdge(env, surrogate_service(env), **edge_kwargs)
    TraceArrivals(env, trace, edge.submit)
    env.run()
    return edge


def column(edge, attribute, user_class=None):
    return np.array([getattr(r, attribute) for r in edge.records if getattr(r, attribute) is not None
                     and (user_class is None or r.request.user_class == user_class)])


def assert_matches(measured_samples, theory, label, max_relative_tolerance=0.1):
    mean, se = float(np.mean(measured_samples)), batch_se(measured_samples)
    assert 5 * se < max_relative_tolerance * theory, f"{label}: 5 se = {5 * se:.4g} too loose against {theory:.4g}"
    assert abs(mean - theory) < 5 * se, f"{label}: measured {mean:.4f} vs theory {theory:.4f} (se {se:.4f})"


# ----------------------------------------------------------------------------------------------
# theory formulas themselves
# ----------------------------------------------------------------------------------------------

def test_erlang_c_equals_its_closed_form():
    """C(c, a) from the Erlang B recursion against the factorial formula (Kleinrock eq. 3.40)."""
    for c in range(1, 8):
        for a in np.linspace(0.1, c - 0.1, 7):
            top = a ** c / math.factorial(c) * c / (c - a)
            closed = top / (sum(a ** k / math.factorial(k) for k in range(c)) + top)
            assert erlang_c(c, float(a)) == pytest.approx(closed, rel=1e-12)
    assert erlang_c(1, 0.7) == pytest.approx(0.7)           # M/M/1: P(wait) = rho
    assert erlang_c(2, 1.0) == pytest.approx(1.0 / 3.0)     # (1/2 * 2) / (1 + 1 + 1)
    assert mmc_mean_wait_s(1, 0.5, 1.0) == pytest.approx(mm1_mean_wait_s(0.5, 1.0))
    assert mm1k_blocking_probability(1.0, 4) == pytest.approx(0.2)
    assert mm1k_blocking_probability(0.999999, 4) == pytest.approx(0.2, rel=1e-5)
    assert mm1k_mean_in_system(0.999999, 4) == pytest.approx(2.0, rel=1e-5)
    # Cobham with one class is Pollaczek-Khinchine
    assert priority_mean_waits_s([0.6], [1.0], [1.0])[0] == pytest.approx(md1_mean_wait_s(0.6, 1.0))


# ----------------------------------------------------------------------------------------------
# single- and multi-server queues
# ----------------------------------------------------------------------------------------------

def test_mm1_mean_wait_and_sojourn():
    """M/M/1, lambda = 0.5/s, mu = 1/s: W_q = rho / (mu - lambda) = 1 s, W = 1 / (mu - lambda) = 2 s
    (Kleinrock 1975, section 3.2)."""
    lam, mu = 0.5, 1.0
    edge = run_poisson([UserClass("u", lam, work=exponential(1 / mu))], 100_000)
    assert_matches(column(edge, "wait_s"), mm1_mean_wait_s(lam, mu), "M/M/1 wait")
    assert_matches(column(edge, "sojourn_s"), 1 / (mu - lam), "M/M/1 sojourn")
    s = edge.summary()
    assert s["arrived"] == s["admitted"] == s["completed"] == 100_000 and s["in_system"] == 0
    assert s["mean_wait_s"] == pytest.approx(column(edge, "wait_s").mean(), rel=1e-12)
    # p95 of the wait: P(W_q > t) = rho exp(-(mu - lambda) t), so t_95 = ln(rho / 0.05) / (mu - lambda);
    # its standard error from the p95s of the batches
    t95 = math.log((lam / mu) / 0.05) / (mu - lam)
    batch_p95 = np.quantile(column(edge, "wait_s").reshape(BATCHES, -1), 0.95, axis=1)
    se = batch_p95.std(ddof=1) / math.sqrt(BATCHES)
    assert 5 * se < 0.1 * t95 and abs(s["p95_wait_s"] - t95) < 5 * se, (s["p95_wait_s"], t95, se)


def test_md1_mean_wait_is_pollaczek_khinchine():
    """M/D/1, lambda = 0.6/s, S = 1 s: W_q = rho / (2 mu (1 - rho)) = 0.75 s."""
    lam, mu = 0.6, 1.0
    edge = run_poisson([UserClass("u", lam, work=lambda rng: 1 / mu)], 100_000)
    assert_matches(column(edge, "wait_s"), md1_mean_wait_s(lam, mu), "M/D/1 wait")
    assert np.allclose(column(edge, "service_s"), 1.0, rtol=0, atol=1e-9)   # end - start, rounded at ~1e5 s


def test_mmc_mean_wait_is_erlang_c_and_utilisation_is_the_load():
    """M/M/3, lambda = 2.1/s, mu = 1/s (rho = 0.7): W_q = C(3, 2.1) / (3 mu - lambda); the
    busy fraction of the slots is rho (se of a compound-Poisson total: rho sqrt(2 / n))."""
    c, lam, mu, n = 3, 2.1, 1.0, 100_000
    edge = run_poisson([UserClass("u", lam, work=exponential(1 / mu))], n, slots=c)
    theory = mmc_mean_wait_s(c, lam, mu)
    assert_matches(column(edge, "wait_s"), theory, "M/M/3 wait", 0.2)
    waited = float(np.mean(column(edge, "wait_s") > 0))
    assert abs(waited - erlang_c(c, lam / mu)) < 5 * batch_se(column(edge, "wait_s") > 0)
    s = edge.summary()
    rho = lam / (c * mu)
    assert abs(s["utilisation"] - rho) < 5 * rho * math.sqrt(2 / n)
    # the event-driven busy integral is the served work (the run drained)
    assert s["utilisation"] == pytest.approx(column(edge, "service_s").sum() / (c * s["horizon_s"]), rel=1e-9)
    assert sorted(set(column(edge, "slot").tolist())) == [0, 1, 2]


def test_mm1k_blocking_and_littles_law():
    """M/M/1/K, rho = 0.9, K = 5: an arrival is blocked with P_K = (1 - rho) rho^K / (1 - rho^(K+1))
    (PASTA). Little on the run stopped at T with requests still inside: the time-average number
    in system L equals lambda_eff W up to the end effect, L T - lambda_eff W T =
    sum over open requests (T - a_i) - n_open W; and W matches L_K / (lambda (1 - P_K))."""
    lam, mu, K = 0.9, 1.0, 5
    horizon = 100_000.0
    edge = run_poisson([UserClass("u", lam, work=exponential(1 / mu))], None, capacity=K, horizon_s=horizon)
    blocked = np.array([r.outcome == "blocked" for r in edge.records], dtype=float)
    p_k = mm1k_blocking_probability(lam / mu, K)
    assert_matches(blocked, p_k, "M/M/1/K blocking")
    s = edge.summary(horizon)
    assert s["blocked"] == int(blocked.sum()) and s["blocking_ratio"] == pytest.approx(blocked.mean())
    assert s["rejected"] == 0 and s["admitted"] + s["blocked"] == s["arrived"]
    # Little's law on this sample path, with its exact end-effect bound
    open_ = [r for r in edge.records if r.outcome == "admitted" and not r.completed]
    assert s["in_system"] == len(open_) <= K
    w = s["mean_sojourn_s"]
    little = s["admitted_rate_per_s"] * w
    end_effect = (sum(horizon - r.request.arrival_s for r in open_) + len(open_) * w) / horizon
    assert abs(s["mean_in_system"] - little) <= end_effect + 1e-9 * little
    assert end_effect < 1e-3 * little
    # and against the M/M/1/K theory: W = L_K / lambda_eff
    w_theory = mm1k_mean_in_system(lam / mu, K) / (lam * (1 - p_k))
    assert_matches(column(edge, "sojourn_s"), w_theory, "M/M/1/K sojourn")


# ----------------------------------------------------------------------------------------------
# disciplines
# ----------------------------------------------------------------------------------------------

def test_priority_classes_follow_cobham():
    """Two classes, lambda = 0.35/s each, exponential S of mean 1 s, non-preemptive priority:
    W_1 = W_0 / (1 - sigma_1), W_2 = W_0 / ((1 - sigma_1)(1 - sigma_2)) with W_0 = sum lambda E[S^2] / 2
    (Cobham 1954): 1.08 s and 3.59 s, against 2.33 s for both under FCFS (same arrivals and work:
    each class's streams are its own)."""
    lam, mean_s = 0.35, 1.0
    classes = [UserClass("urgent", lam, priority=0, work=exponential(mean_s)),
               UserClass("normal", lam, priority=1, work=exponential(mean_s))]
    edge = run_poisson(classes, 100_000, discipline="priority")
    w1, w2 = priority_mean_waits_s([lam, lam], [mean_s, mean_s], [2 * mean_s ** 2] * 2)
    assert_matches(column(edge, "wait_s", "urgent"), w1, "urgent class wait")
    assert_matches(column(edge, "wait_s", "normal"), w2, "normal class wait", 0.2)
    fcfs = run_poisson(classes, 40_000, discipline="fcfs")
    for name in ("urgent", "normal"):   # FCFS ignores the class: both wait M/M/1's W_q
        assert_matches(column(fcfs, "wait_s", name), mm1_mean_wait_s(2 * lam, 1 / mean_s), f"FCFS {name}", 0.2)
    urgent, normal = column(edge, "wait_s", "urgent").mean(), column(edge, "wait_s", "normal").mean()
    assert urgent < column(fcfs, "wait_s").mean() < normal


SMALL_TRACE = [(0.0, {"user_class": "A", "work": 1.0, "priority": 5}),
               (0.25, {"user_class": "B", "work": 1.0, "priority": 2, "deadline_s": 10.0}),
               (0.5, {"user_class": "C", "work": 1.0, "priority": 0, "deadline_s": 2.5}),
               (0.75, {"user_class": "D", "work": 1.0, "priority": 1}),
               (0.875, {"user_class": "E", "work": 1.0, "priority": 0, "deadline_s": 5.0})]


@pytest.mark.parametrize("discipline,order", [
    ("fcfs", "ABCDE"),        # arrival order
    ("priority", "ACEDB"),    # by priority, ties (C, E) by arrival; A was alone and is not preempted
    ("edf", "ACEBD"),         # by deadline, none last; D (no deadline) after B (deadline 10)
])
def test_disciplines_serve_in_their_exact_order(discipline, order):
    edge = run_trace(SMALL_TRACE, discipline=discipline)
    served = sorted(edge.records, key=lambda r: r.start_s)
    assert "".join(r.request.user_class for r in served) == order
    assert [r.start_s for r in served] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert all(r.wait_s == r.start_s - r.request.arrival_s for r in served)


def test_edf_meets_a_deadline_fcfs_misses():
    met = {d: {r.request.user_class: r.met_deadline for r in run_trace(SMALL_TRACE, discipline=d).records}
           for d in ("fcfs", "edf")}
    assert met["fcfs"]["C"] is False and met["edf"]["C"] is True    # C ends at 3 s (FCFS) or 2 s (EDF); deadline 2.5 s
    assert all(met["edf"].values())
    s = run_trace(SMALL_TRACE, discipline="fcfs").summary()
    assert (s["completed"], s["met_deadline"], s["deadline_hit_ratio"]) == (5, 4, 0.8)
    assert s["goodput_per_s"] == 4 / 5.0 and s["throughput_per_s"] == 1.0


# ----------------------------------------------------------------------------------------------
# admission
# ----------------------------------------------------------------------------------------------

def test_deadline_feasible_rejects_what_cannot_be_met_and_admits_what_can():
    """One slot, A (2 s of work) in service since 0: B at 0.5 s would end at 4 s (deadline 4.5:
    admitted), C at 0.75 s at 6 s (deadline 5.5: rejected), D (1 s) at 1 s at 5 s (deadline 5: the
    boundary, admitted). Served, B and D meet their deadlines exactly as estimated."""
    trace = [(0.0, {"user_class": "A", "work": 2.0}),
             (0.5, {"user_class": "B", "work": 2.0, "deadline_s": 4.5}),
             (0.75, {"user_class": "C", "work": 2.0, "deadline_s": 5.5}),
             (1.0, {"user_class": "D", "work": 1.0, "deadline_s": 5.0})]
    edge = run_trace(trace, admission=deadline_feasible(lambda r: r.work))
    rec = {r.request.user_class: r for r in edge.records}
    assert [rec[k].outcome for k in "ABCD"] == ["admitted", "admitted", "rejected", "admitted"]
    assert rec["C"].reason == "deadline_infeasible" and rec["C"].start_s is None
    assert (rec["B"].end_s, rec["D"].end_s) == (4.0, 5.0) and rec["B"].met_deadline and rec["D"].met_deadline
    s = edge.summary()
    assert s["rejected_by_reason"] == {"deadline_infeasible": 1} and s["acceptance_ratio"] == 0.75
    assert s["deadline_hit_ratio"] == 1.0


def test_deadline_estimate_uses_the_discipline_and_all_slots():
    """Two slots busy until 2 s and 3 s, queue of one 2 s job: a 1 s request with deadline 3.5 s
    would start at 3 s under FCFS (the queued job takes the 2 s slot) and end at 4 s: rejected;
    under EDF it is ahead of the queued job (deadline 9 s), starts at 2 s, ends at 3 s: admitted."""
    trace = [(0.0, {"user_class": "X", "work": 2.0}), (0.0, {"user_class": "Y", "work": 3.0}),
             (0.5, {"user_class": "Q", "work": 2.0, "deadline_s": 9.0}),
             (1.0, {"user_class": "N", "work": 1.0, "deadline_s": 3.5})]
    outcome = {}
    for discipline in ("fcfs", "edf"):
        edge = run_trace(trace, slots=2, discipline=discipline, admission=DeadlineFeasible(lambda r: r.work))
        outcome[discipline] = {r.request.user_class: r for r in edge.records}
    assert outcome["fcfs"]["N"].outcome == "rejected"
    assert outcome["edf"]["N"].outcome == "admitted" and outcome["edf"]["N"].end_s == 3.0
    assert outcome["edf"]["Q"].met_deadline and outcome["edf"]["Q"].end_s == 5.0


def test_memory_check_and_policy_composition():
    trace = [(0.0, {"user_class": "small", "work": 1.0, "memory_bytes": 1000}),
             (0.0, {"user_class": "big", "work": 1.0, "memory_bytes": 1001}),
             (0.0, {"user_class": "late", "work": 5.0, "memory_bytes": 2000, "deadline_s": 1.0})]
    edge = run_trace(trace, slot_memory_bytes=1000,
                     admission=all_of(memory_fits, deadline_feasible(lambda r: r.work)))
    assert [(r.outcome, r.reason) for r in edge.records] == [
        ("admitted", ""), ("rejected", "memory_exceeded"), ("rejected", "memory_exceeded")]
    edge = run_trace(trace[2:], admission=all_of(deadline_feasible(lambda r: r.work), memory_fits),
                     slot_memory_bytes=1000)
    assert edge.records[0].reason == "deadline_infeasible"   # the first refusal's reason
    # the same policies by name (for a scenario section)
    for name, reasons in [("always", ["", "", ""]), ("memory_fits", ["", "memory_exceeded", "memory_exceeded"]),
                          ("deadline_feasible", ["", "", "deadline_infeasible"]),
                          ("memory_and_deadline", ["", "memory_exceeded", "memory_exceeded"])]:
        edge = run_trace(trace, slot_memory_bytes=1000, admission=admission_policy(name, lambda r: r.work))
        assert [r.reason for r in edge.records] == reasons, name
    with pytest.raises(ValueError, match=r"admission = 'fifo'; allowed: \['always', 'memory_fits'"):
        admission_policy("fifo")
    with pytest.raises(ValueError, match=r"admission = 'deadline_feasible' needs estimate_service_s"):
        admission_policy("deadline_feasible")


def test_capacity_blocks_arrivals_beyond_k():
    trace = [(0.0, {"work": 1.0}), (0.0, {"work": 1.0}), (0.0, {"work": 1.0}), (1.5, {"work": 1.0})]
    edge = run_trace(trace, slots=1, capacity=2)
    assert [r.outcome for r in edge.records] == ["admitted", "admitted", "blocked", "admitted"]
    assert edge.records[2].reason == "capacity" and edge.records[3].start_s == 2.0
    s = edge.summary(4.0)
    assert (s["blocked"], s["completed"], s["blocking_ratio"]) == (1, 3, 0.25)
    assert s["utilisation"] == 3.0 / 4.0                       # busy [0, 3] of [0, 4]
    assert s["mean_in_system"] == (2 * 1.0 + 1 * 0.5 + 2 * 0.5 + 1 * 1.0) / 4.0   # 2, 1, 2, 1 in [0, 1, 1.5, 2, 3)
    assert s["mean_wait_s"] == (0 + 1 + 0.5) / 3 and s["mean_sojourn_s"] == (1 + 2 + 1.5) / 3


# ----------------------------------------------------------------------------------------------
# arrival processes
# ----------------------------------------------------------------------------------------------

def test_poisson_arrivals_count_horizon_and_class_independence():
    """N(T) ~ Poisson(lambda T): |N - lambda T| < 5 sqrt(lambda T); arrivals in [0, T); a class's
    arrival times do not depend on the other classes (its own stream)."""
    env = simpy.Environment()
    got = []
    classes = [UserClass("a", 3.0, owner_devices=("d0", "d1", "d2"), relative_deadline_s=7.0),
               UserClass("b", 1.0, task="t")]
    PoissonArrivals(env, classes, 5, got.append, horizon_s=2000.0)
    env.run()
    times = np.array([r.arrival_s for r in got])
    assert abs(len(got) - 8000) < 5 * math.sqrt(8000) and times.max() < 2000.0
    assert [r.request_id for r in got] == list(range(len(got))) and np.all(np.diff(times) >= 0)
    a = [r for r in got if r.user_class == "a"]
    assert all(r.deadline_s == r.arrival_s + 7.0 for r in a) and {r.owner_device for r in a} == {"d0", "d1", "d2"}
    gaps = np.diff([0.0] + [r.arrival_s for r in a])
    assert abs(gaps.mean() - 1 / 3.0) < 5 * gaps.std(ddof=1) / math.sqrt(len(gaps))
    alone = []
    env2 = simpy.Environment()
    PoissonArrivals(env2, classes[:1], 5, alone.append, horizon_s=2000.0)
    env2.run()
    assert [r.arrival_s for r in alone] == [r.arrival_s for r in a]
    # max_count stops all classes together
    env3, few = simpy.Environment(), []
    PoissonArrivals(env3, classes, 5, few.append, max_count=17)
    env3.run()
    assert len(few) == 17 and [r.arrival_s for r in few] == [r.arrival_s for r in got[:17]]


def test_trace_arrivals_replay_times_and_fields():
    env, got = simpy.Environment(), []
    TraceArrivals(env, [(0.5, {"task": "bbc", "owner_device": 3, "deadline_s": 4.0, "target_accuracy": 0.8}),
                        (0.5, {}), (2.0, {"user_class": "x"})], got.append, horizon_s=1.5)
    env.run()
    assert [(r.request_id, r.arrival_s, r.user_class) for r in got] == [(0, 0.5, "trace"), (1, 0.5, "trace")]
    assert (got[0].task, got[0].owner_device, got[0].deadline_s, got[0].target_accuracy) == ("bbc", 3, 4.0, 0.8)


def test_executor_gets_the_lowest_free_slot_and_its_result_is_kept():
    """The executor is the request's service: it sees its slot (index, memory) and what it
    returns (e.g. the accuracy a fine-tuning reached) becomes the record's result."""
    env = simpy.Environment()
    seen = []

    def serve(request, slot):
        seen.append((request.request_id, slot.index, slot.memory_bytes, env.now))
        yield env.timeout(request.work)
        return {"tuned": request.task, "slot": slot.index}

    edge = ServiceEdge(env, serve, slots=2, slot_memory_bytes=4096)
    TraceArrivals(env, [(0.0, {"work": 3.0, "task": "a"}), (0.0, {"work": 1.0, "task": "b"}),
                        (0.5, {"work": 1.0, "task": "c"}), (2.5, {"work": 1.0, "task": "d"})], edge.submit)
    env.run()
    assert seen == [(0, 0, 4096, 0.0), (1, 1, 4096, 0.0), (2, 1, 4096, 1.0), (3, 1, 4096, 2.5)]
    assert [r.result for r in edge.records] == [{"tuned": t, "slot": i} for t, i in zip("abcd", (0, 1, 1, 1))]
    assert [r.end_s for r in edge.records] == [3.0, 1.0, 2.0, 3.5]


def test_event_log_rows():
    rec = Recorder()
    env = simpy.Environment()
    edge = ServiceEdge(env, surrogate_service(env), capacity=1, recorder=rec, name="edge0")
    TraceArrivals(env, [(0.0, {"work": 2.0, "owner_device": "dev1"}), (1.0, {"work": 1.0})], edge.submit)
    env.run()
    kinds = [(row[2], row[0], row[1], row[5]) for row in rec.rows]
    assert kinds == [("request_arrival", 0.0, 0.0, 0), ("request_wait", 0.0, 0.0, 0),
                     ("request_arrival", 1.0, 0.0, 1), ("request_blocked", 1.0, 0.0, 1),
                     ("request_service", 0.0, 2.0, 0)]
    assert rec.rows[0][3:5] == ("edge0", "dev1")


# ----------------------------------------------------------------------------------------------
# determinism and bad settings
# ----------------------------------------------------------------------------------------------

def _fingerprint(edge):
    return [(r.request.request_id, r.request.user_class, r.request.arrival_s, r.request.work, r.outcome, r.reason,
             r.slot, r.start_s, r.end_s) for r in edge.records]


def test_same_seed_same_metrics_bit_for_bit():
    classes = [UserClass("a", 0.6, priority=1, relative_deadline_s=4.0, work=exponential(1.0)),
               UserClass("b", 0.5, priority=0, relative_deadline_s=2.0, work=exponential(0.5))]
    kw = dict(slots=2, capacity=6, discipline="edf", admission=deadline_feasible(lambda r: r.work), horizon_s=3000.0)
    one, two, other = (run_poisson(classes, None, seed=s, **kw) for s in (11, 11, 12))
    assert _fingerprint(one) == _fingerprint(two)
    assert one.summary(3000.0) == two.summary(3000.0)
    assert _fingerprint(one) != _fingerprint(other)
    s = one.summary(3000.0)
    assert s["rejected"] > 0 and 0 < s["deadline_hit_ratio"] <= 1


@pytest.mark.parametrize("build,message", [
    (lambda env: ServiceEdge(env, surrogate_service(env), slots=0), r"slots = 0; allowed: an integer >= 1"),
    (lambda env: ServiceEdge(env, surrogate_service(env), slots=2.0), r"slots = 2.0; allowed: an integer >= 1"),
    (lambda env: ServiceEdge(env, surrogate_service(env), slots=3, capacity=2),
     r"capacity = 2 with slots = 3; allowed: .*K >= slots"),
    (lambda env: ServiceEdge(env, surrogate_service(env), discipline="lifo"),
     r"discipline = 'lifo'; allowed: \['fcfs', 'priority', 'edf'\]"),
    (lambda env: ServiceEdge(env, surrogate_service(env), slot_memory_bytes=0), r"slot_memory_bytes = 0"),
    (lambda env: UserClass("u", 0.0), r"UserClass 'u': rate_per_s = 0.0; allowed: a finite arrival rate > 0"),
    (lambda env: UserClass("u", -2.0), r"rate_per_s = -2.0"),
    (lambda env: UserClass("u", float("nan")), r"rate_per_s = nan"),
    (lambda env: UserClass("u", 1.0, relative_deadline_s=0.0), r"relative_deadline_s = 0.0"),
    (lambda env: UserClass("u", 1.0, target_accuracy=1.5), r"target_accuracy = 1.5; allowed: a number in \[0, 1\]"),
    (lambda env: PoissonArrivals(env, [UserClass("u", 1.0)], 0, print),
     r"horizon_s and max_count are both None"),
    (lambda env: PoissonArrivals(env, [UserClass("u", 1e4)], 0, print, horizon_s=1e3),
     r"rate_per_s .* would create about 1e\+07 requests; allowed: at most MAX_REQUESTS = 1000000"),
    (lambda env: PoissonArrivals(env, [UserClass("u", 1.0)], 0, print, max_count=MAX_REQUESTS + 1),
     r"max_count = 1000001; allowed: None or an integer in \[1, 1000000\]"),
    (lambda env: PoissonArrivals(env, [UserClass("u", 1.0), UserClass("u", 2.0)], 0, print, max_count=3),
     r"names \['u', 'u'\] repeat"),
    (lambda env: TraceArrivals(env, [(1.0, {}), (0.5, {})], print), r"entry 1 arrives at 0.5 s, before entry 0"),
    (lambda env: TraceArrivals(env, [(1.0, {"dedline_s": 3.0})], print), r"unknown field\(s\) \['dedline_s'\]"),
    (lambda env: TraceArrivals(env, [(2.0, {"deadline_s": 1.0})], print),
     r"entry 0: .*deadline_s = 1.0 with arrival_s = 2.0; allowed: None or a finite time >= arrival_s"),
    (lambda env: TraceArrivals(env, [(-1.0, {})], print), r"arrival_s = -1.0; allowed: a finite time >= 0"),
    (lambda env: Request(0, "u", 1.0, memory_bytes=-1), r"memory_bytes = -1; allowed: an integer >= 0"),
])
def test_bad_settings_raise_clear_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build(simpy.Environment())


def test_bad_run_time_inputs_raise_clear_errors():
    env = simpy.Environment()
    edge = ServiceEdge(env, surrogate_service(env))
    with pytest.raises(ValueError, match=r"arrival_s = 3.0 but the simulated time is 0"):
        edge.submit(Request(0, "u", 3.0, work=1.0))
    edge.submit(Request(1, "u", 0.0, work="long"))
    with pytest.raises(ValueError, match=r"request 1: work = 'long'; allowed: a finite service time >= 0 s"):
        env.run()
    env = simpy.Environment()
    edge = ServiceEdge(env, lambda request, slot: None)
    edge.submit(Request(0, "u", 0.0))
    with pytest.raises(ValueError, match=r"serve\(request 0, slot 0\) returned None; allowed: a generator"):
        env.run()
    env = simpy.Environment()
    edge = ServiceEdge(env, surrogate_service(env))
    edge.submit(Request(0, "u", 0.0, work=5.0))
    env.run(until=2.0)
    with pytest.raises(ValueError, match=r"horizon_s = 1.0 at simulated time 2.0 s"):
        edge.summary(1.0)
    with pytest.raises(ValueError, match=r"horizon_s = 9.0 at simulated time 2.0 s with 1 request\(s\) in the system"):
        edge.summary(9.0)
    assert edge.summary(2.0)["utilisation"] == 1.0


def test_service_module_imports_without_torch():
    code = ("import sys\n"
            "for name in ('torch', 'transformers', 'peft', 'fomo'):\n"
            "    sys.modules[name] = None\n"
            "import netsim.service\n"
            "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
