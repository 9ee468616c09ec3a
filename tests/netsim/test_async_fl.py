"""Asynchronous (FedBuff / FedAsync) and semi-synchronous rounds, checked against direct
computations from the event log and against queueing identities."""
import numpy as np
import pytest

from netsim import FakeTrainer, Scenario
from netsim.protocols import make_simulation


def async_scenario(**training):
    return Scenario.model_validate({
        "trainer": "fake", "devices": [{"count": 24, "compute_flops_per_s": 1e12},
                                       {"name": "slow", "count": 12, "compute_flops_per_s": 2.5e11}],
        "channel": {"fading": "rayleigh"},
        "training": {"mode": "asynchronous", "rounds": 60, "local_steps": 5, **training},
        "strategies": {"aggregation": {"name": "fedbuff", "params": {"buffer_size": 4, "staleness": "polynomial"}}},
        "async_fl": {"concurrency": 8},
        "dynamics": {"stragglers": {"jitter": "lognormal", "jitter_sigma": 0.6}},
    })


def run(sc, seed=0):
    sim = make_simulation(sc, seed, FakeTrainer(sc, seed))
    out = sim.run()
    return sim, out, sim.recorder.to_frame()


def test_staleness_is_the_number_of_server_steps_during_the_job():
    sim, out, ev = run(async_scenario())
    assert out.rounds_completed == 60
    steps_done = np.sort((ev.loc[ev.kind == "aggregate", "t_s"] + ev.loc[ev.kind == "aggregate", "duration_s"]).to_numpy())
    downloads = ev[ev.kind == "downlink"].set_index(["node", "round"])
    up = ev[(ev.kind == "uplink") & (ev.staleness >= 0)]
    assert len(up) > 100
    for _, row in up.iterrows():
        t_download = downloads.loc[(row.node, row["round"]), "t_s"]
        t_arrival = row.t_s + row.duration_s
        # the version a device trains on is the number of server steps completed when it
        # started downloading; staleness = steps completed while it trained and uploaded
        # (a step completes when its aggregation ends: the version is bumped then)
        v_start = np.searchsorted(steps_done, t_download, side="right")
        v_end = np.searchsorted(steps_done, t_arrival, side="right")
        assert row.model_version == v_start == row["round"]
        assert row.staleness == v_end - v_start
    # the aggregated updates' staleness is what the simulation reports
    assert sim.dynamics_summary()["stale_updates_mean"] == pytest.approx(np.mean(sim.staleness))
    assert 0 < np.mean(sim.staleness) < 8


def test_littles_law_on_the_device_pipeline():
    """L = lambda W: the time-average number of devices in the download-train-upload pipeline
    equals the job throughput times the mean sojourn, and the edge keeps it at the
    concurrency C (all devices always available), up to the last jobs cut by the stop."""
    sim, _, ev = run(async_scenario(rounds=120))
    c = sim.scenario.async_fl.concurrency
    start = ev[ev.kind == "downlink"].set_index(["node", "round"])["t_s"]
    up = ev[ev.kind == "uplink"].set_index(["node", "round"])
    end = up["t_s"] + up["duration_s"]
    sojourn = (end - start.reindex(end.index)).to_numpy()
    t0 = start.min()
    horizon = ev.loc[ev.kind == "aggregate", "t_s"].max()
    done = end.to_numpy() <= horizon
    lam = done.sum() / (horizon - t0)
    w = sojourn[done].mean()
    # occupancy by a sweep over the job intervals, clipped to [t0, horizon]
    times = np.concatenate([start.reindex(end.index).to_numpy(), end.to_numpy()])
    steps = np.concatenate([np.ones(len(end)), -np.ones(len(end))])
    order = np.argsort(times, kind="stable")
    t, n = np.clip(times[order], t0, horizon), np.cumsum(steps[order])
    occupancy = np.sum(n[:-1] * np.diff(t)) / (horizon - t0)
    cut = sojourn.max() * c / (horizon - t0)     # jobs straddling the end of the window
    assert lam * w == pytest.approx(occupancy, abs=cut)
    assert occupancy == pytest.approx(c, abs=cut + 0.05 * c)


def test_async_run_batches_its_jobs():
    sim, _, _ = run(async_scenario())
    stats = sim.engine.stats()
    assert stats["jobs_run"] >= 60 * 4
    assert stats["mean_jobs_per_pass"] > 2.0     # jobs in flight at a server step run together


def test_fedasync_is_buffer_one_and_max_staleness_discards():
    sc = async_scenario()
    sc = Scenario.model_validate(sc.model_dump(mode="json") | {
        "strategies": {"aggregation": {"name": "fedbuff", "params": {"buffer_size": 1, "server_lr": 0.6}}},
        "async_fl": {"concurrency": 8, "max_staleness": 2}})
    sim, out, ev = run(sc)
    assert out.rounds_completed == 60
    assert (ev.kind == "aggregate").sum() == 60
    stale = ev[ev.kind == "update_stale"]
    assert len(stale) == sim.counters["stale_updates"] > 0
    assert max(sim.staleness) <= 2


def test_semi_synchronous_steps_on_the_period():
    sc = Scenario.model_validate({
        "trainer": "fake", "devices": [{"count": 16}],
        "training": {"mode": "semi_synchronous", "rounds": 10, "local_steps": 5},
        "async_fl": {"concurrency": 6, "period_s": 0.5}})
    sim, out, ev = run(sc)
    agg = ev[ev.kind == "aggregate"]
    assert out.rounds_completed == 10 and len(agg) == 10
    # each step starts at a period boundary after the previous step's aggregation and evaluation
    gaps = np.diff(agg.t_s.to_numpy())
    assert np.all(gaps >= 0.5 - 1e-12)
    assert sim.engine.stats()["mean_jobs_per_pass"] > 1.0


def test_same_seed_same_log():
    a = run(async_scenario(), seed=4)[2]
    b = run(async_scenario(), seed=4)[2]
    assert a.equals(b)


def test_async_with_churn_drops_updates_and_waits_for_devices():
    sc = Scenario.model_validate(async_scenario().model_dump(mode="json") | {
        "dynamics": {"availability": {"model": "markov", "mean_on_s": 0.2, "mean_off_s": 0.6, "start": "on"}}})
    sim, out, ev = run(sc)
    assert out.rounds_completed == 60
    dropped = ev[ev.kind == "update_dropped"]
    assert len(dropped) == sim.counters["dropped_updates"] > 0
    # every job starts on a device that is online then
    for _, row in ev[ev.kind == "downlink"].head(200).iterrows():
        assert sim.availability.online(int(row.node[3:]), row.t_s)


def test_bernoulli_availability_needs_rounds():
    with pytest.raises(ValueError, match="bernoulli draws availability per synchronous round"):
        Scenario.model_validate(async_scenario().model_dump(mode="json") | {
            "dynamics": {"availability": {"model": "bernoulli", "p_available": 0.5}}})


def test_jobs_in_flight_stop_with_the_run():
    sim, _, ev = run(async_scenario())
    end = (ev.t_s + ev.duration_s)[ev.kind == "evaluate"].max()
    assert ((ev.t_s + ev.duration_s) <= end + 1e-12).all()
