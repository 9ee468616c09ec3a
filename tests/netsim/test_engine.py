"""The engine: cost at submission, values when first needed, every pending job in one pass."""
import math

import pytest

from netsim import FakeTrainer, LocalJob, Scenario
from netsim.engine import Engine
from netsim.protocols import make_simulation


class CountingTrainer(FakeTrainer):
    """FakeTrainer that records every execute() call (the jobs of each pass)."""

    def __init__(self, scenario, seed):
        super().__init__(scenario, seed)
        self.calls = []

    def execute(self, plans):
        self.calls.append([(p.job.round, p.job.device_id) for p in plans])
        return super().execute(plans)


def fake(**sections):
    return Scenario.model_validate({"trainer": "fake", **sections})


def test_cost_now_values_later_all_pending_in_one_pass():
    sc = fake(devices=[{"count": 6}])
    trainer = CountingTrainer(sc, 0)
    engine = Engine(trainer)
    jobs = [engine.submit(LocalJob(d, 1, 5, 8)) for d in (4, 1, 3)]
    assert [j.cost.flops for j in jobs] == [5 * sc.fake.step_flops] * 3
    assert trainer.calls == [] and not any(j.done for j in jobs)
    got = []
    jobs[0].when_done(lambda res: got.append(res.device_id))
    assert jobs[2].result.device_id == 3   # reading one value runs every pending job
    assert trainer.calls == [[(1, 1), (1, 3), (1, 4)]]   # in (round, device) order
    assert all(j.done for j in jobs) and got == [4]
    assert engine.stats() == {"passes": 1, "jobs_run": 3, "jobs_cancelled": 0, "mean_jobs_per_pass": 3.0,
                              "largest_pass": 3}


def test_cancelled_jobs_never_run_and_bases_are_kept():
    sc = fake(devices=[{"count": 4}])
    trainer = CountingTrainer(sc, 0)
    engine = Engine(trainer)
    a = engine.submit(LocalJob(0, 1, 5, 8))
    trainer.progress = 0.5                      # the global state moves on
    b = engine.submit(LocalJob(1, 1, 5, 8))
    c = engine.submit(LocalJob(2, 1, 5, 8))
    c.cancel()
    with pytest.raises(RuntimeError, match="cancelled"):
        c.result
    assert a.base == 0.0 and b.base == 0.5
    # each job trains from its own base: the fake loss is log(C) (1 - base)
    assert a.result.loss == pytest.approx(math.log(5))
    assert b.result.loss == pytest.approx(0.5 * math.log(5))
    assert trainer.calls == [[(1, 0), (1, 1)]]
    assert engine.stats()["jobs_cancelled"] == 1


def test_synchronous_round_is_one_pass_per_round():
    sc = fake(devices=[{"count": 12}], training={"rounds": 4, "devices_per_round": 5})
    trainer = CountingTrainer(sc, 3)
    sim = make_simulation(sc, 3, trainer)
    sim.run()
    assert [len(c) for c in trainer.calls] == [5, 5, 5, 5]
    assert all(c == sorted(c) for c in trainer.calls)
    # the compute events got their losses once the round's pass ran
    ev = sim.recorder.to_frame()
    assert ev.loc[ev["kind"] == "compute", "loss"].notna().all()


def test_local_train_is_plan_then_execute():
    sc = fake(devices=[{"count": 3}])
    t1, t2 = FakeTrainer(sc, 1), FakeTrainer(sc, 1)
    jobs = [LocalJob(d, 1, 4, 8) for d in range(3)]
    engine = Engine(t2)
    pending = [engine.submit(j) for j in jobs]
    assert t1.local_train(jobs) == [p.result for p in pending]
