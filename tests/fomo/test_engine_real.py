"""The engine with the real trainer: jobs from different model versions in one batched pass,
FedProx's proximal term, and an asynchronous run that still batches (slow: real
all-MiniLM-L6-v2). Values are compared in float64 with the tolerances derived in
test_fomo_execution.py; costs bitwise."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fomo import build_trainer
from netsim.engine import Engine
from netsim.interfaces import LocalJob
from netsim.protocols import make_simulation
from test_fomo_execution import assert_same_values, build64, fresh_streams, scenario

pytestmark = pytest.mark.slow


def two_versions(trainer):
    """Base v0 = the initial global state; v1 = after one aggregated round of 2 devices."""
    v0 = trainer.snapshot()
    first = trainer.local_train([LocalJob(4, 1, 2, 2), LocalJob(5, 1, 2, 2)])
    trainer.aggregate(first, [0.5, 0.5])
    return v0, trainer.snapshot()


def plans_on(trainer, bases, prox_mu=0.0):
    return [trainer.plan(LocalJob(d, 2, 2, 2, prox_mu=prox_mu), base) for d, base in enumerate(bases)]


def test_jobs_of_different_versions_batch_exactly():
    seq = build64(scenario())
    bat = build64(scenario(execution={"strategy": "batched", "max_devices_per_pass": 4}))
    assert bat.strategy == "batched"
    bases_seq, bases_bat = two_versions(seq), two_versions(bat)
    pick = [0, 1, 1, 0]   # devices 0..3 trained from v0, v1, v1, v0 in one pass
    a = seq.execute(plans_on(seq, [bases_seq[i] for i in pick]))
    b = bat.execute(plans_on(bat, [bases_bat[i] for i in pick]))
    assert_same_values(a, b, "adamw", 1e-3)
    # each update is relative to its own base: applying it to that base gives the local model,
    # which differs between versions (the comparison can tell the bases apart)
    v0, v1 = bases_seq
    assert max(float((v0[n] - v1[n]).abs().max()) for n in v0) > 1e-4
    # the global state is untouched by execute
    assert all(torch.equal(bat.snapshot()[n], bases_bat[1][n]) for n in bases_bat[1])


def test_fedprox_term_is_batched_exactly_and_pulls_towards_the_start():
    sgd = {"optimizer": "sgd", "learning_rate": 0.5}
    seq = build64(scenario(training=sgd))
    bat = build64(scenario(training=sgd, execution={"strategy": "batched", "max_devices_per_pass": 3}))
    base_s, base_b = seq.snapshot(), bat.snapshot()
    a = seq.execute(plans_on(seq, [base_s] * 3, prox_mu=2.0))
    b = bat.execute(plans_on(bat, [base_b] * 3, prox_mu=2.0))
    assert_same_values(a, b, "sgd", 0.5)
    fresh_streams(seq)
    plain = seq.execute(plans_on(seq, [base_s] * 3, prox_mu=0.0))

    def norm(r):
        return float(torch.sqrt(sum((t ** 2).sum() for t in r.update.values())))
    # same batches (fresh streams): the proximal pull makes every update shorter
    assert all(norm(p) < norm(q) for p, q in zip(a, plain))


def test_asynchronous_run_with_real_training_batches():
    sc = scenario(execution={"strategy": "batched"})
    sc = sc.model_validate(sc.model_dump(mode="json") | {
        "training": {**sc.training.model_dump(mode="json"), "mode": "asynchronous", "rounds": 4,
                     "devices_per_round": None},
        "strategies": {"aggregation": {"name": "fedbuff", "params": {"buffer_size": 2}}},
        "async_fl": {"concurrency": 4}})
    trainer = build_trainer(sc, 0)
    sim = make_simulation(sc, 0, trainer)
    out = sim.run()
    stats = sim.engine.stats()
    assert out.rounds_completed == 4
    assert stats["mean_jobs_per_pass"] > 1.0 and stats["largest_pass"] >= 3
    ev = sim.recorder.to_frame()
    assert ev.loc[ev.kind == "compute", "loss"].notna().sum() == stats["jobs_run"]
    assert np.isfinite(out.final_accuracy)
    assert (ev.loc[(ev.kind == "uplink") & (ev.staleness >= 0), "staleness"] >= 0).all()
