"""The shipped dynamics scenarios (async_fedbuff, faults, mobility) show what they are built to
show: with the fake trainer (seconds) through :func:`deftsim.runner.run_scenario`, and one short
real-trainer asynchronous run through the CLI that must still batch its local jobs.

Each summary figure is checked against the event log it comes from, so a counter that is not
wired to its events fails here."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from deftsim.config import load_scenario
from deftsim.runner import run_scenario

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ROOT / "scenarios"
# trainer=fake with the real trainer's costs for these files (quickstart model: 1.1e10 FLOPs per
# local step at 32 tokens x batch 8, a 302,612-byte LoRA adapter), so the timeline matches
FAKE = ["trainer=fake", "fake.step_flops=1.1e10", "fake.adapter_bytes=302612"]
NEW_KEYS = ["protocol", "dropped_updates", "late_updates", "stale_updates", "stale_updates_mean", "handovers",
            "server_steps", "engine"]
ENGINE_KEYS = ["passes", "jobs_run", "jobs_cancelled", "mean_jobs_per_pass", "largest_pass"]


def run_fake(name: str, out: Path, *extra: str):
    scenario = load_scenario(SCENARIOS / f"{name}.yaml", [*FAKE, *extra])
    summary = run_scenario(scenario, out)
    on_disk = json.loads((out / "summary.json").read_text())
    events = pd.read_parquet(out / "events.parquet")
    return scenario, on_disk, events, summary


def count(events: pd.DataFrame, kind: str) -> int:
    return int((events["kind"] == kind).sum())


def check_common(summary: dict, events: pd.DataFrame) -> None:
    for key in NEW_KEYS:
        assert key in summary, key
    for key in ENGINE_KEYS:
        assert key in summary["engine"], key
    eng = summary["engine"]
    assert eng["passes"] >= 1 and eng["largest_pass"] >= 1
    assert eng["mean_jobs_per_pass"] == pytest.approx(eng["jobs_run"] / eng["passes"])
    assert eng["largest_pass"] >= eng["mean_jobs_per_pass"]
    assert summary["dropped_updates"] == count(events, "update_dropped")
    assert summary["late_updates"] == count(events, "update_late")
    assert summary["stale_updates"] == count(events, "update_stale")
    assert summary["handovers"] == count(events, "handover")
    assert summary["final_accuracy"] > summary["initial_accuracy"]


def test_async_fedbuff_is_stale_and_batches(tmp_path):
    scenario, s, ev, returned = run_fake("async_fedbuff", tmp_path)
    assert returned["final_accuracy"] == s["final_accuracy"]
    check_common(s, ev)
    assert scenario.training.mode == "asynchronous" and s["protocol"] == "async_fl"
    k = scenario.strategies.aggregation.params["buffer_size"]
    assert s["server_steps"] == s["rounds_completed"] == scenario.training.rounds
    # every server step aggregates K buffered updates; each arrived upload carries the version it
    # was trained on and its staleness (-1: still in flight when the run ended)
    uplinks = ev[ev["kind"] == "uplink"]
    up = uplinks[uplinks["staleness"] >= 0]
    assert (uplinks.loc[uplinks["staleness"] < 0, "staleness"] == -1).all()
    assert len(up) >= k * s["server_steps"]
    assert (up["model_version"] == up["round"]).all()
    # stale_updates_mean: mean staleness of the K x steps aggregated updates, the first ones to
    # arrive (the buffer empties in arrival order; arrival = upload start + its duration)
    arrival = up["t_s"] + up["duration_s"]
    aggregated = up.loc[arrival.sort_values(kind="stable").index].iloc[: k * s["server_steps"]]
    assert s["stale_updates_mean"] == pytest.approx(float(aggregated["staleness"].mean()))
    assert s["stale_updates_mean"] > 0
    # staleness = server version at arrival - version trained on: never above the steps so far
    assert (up["model_version"] + up["staleness"] <= s["server_steps"]).all()
    # the engine ran several jobs in one pass although devices started them at different times
    assert s["engine"]["mean_jobs_per_pass"] > 1
    assert s["engine"]["largest_pass"] <= scenario.async_fl.concurrency


def test_faults_drop_and_late_updates_but_still_trains(tmp_path):
    scenario, s, ev, _ = run_fake("faults", tmp_path)
    check_common(s, ev)
    assert scenario.training.deadline_s is not None
    assert scenario.dynamics.availability.model == "markov"
    assert scenario.dynamics.stragglers.jitter == "lognormal"
    assert s["dropped_updates"] > 0 and s["late_updates"] > 0
    assert s["rounds_completed"] == scenario.training.rounds
    # a dropped or late update is never trained: its job is cancelled
    assert s["engine"]["jobs_cancelled"] >= 1
    # every round closes by its deadline unless it waits for min_results arrivals
    ends = ev[ev["kind"] == "round_end"].sort_values("round")
    starts = ev[ev["kind"] == "downlink"].groupby("round")["t_s"].min()
    agg = ev[ev["kind"] == "aggregate"].set_index("round")["t_s"]
    late_rounds = set(ev.loc[ev["kind"] == "update_late", "round"])
    for r in late_rounds:   # a round with a late update closed at its deadline (or later, for min_results)
        assert agg[r] >= starts[r] + scenario.training.deadline_s - 1e-9 * max(1.0, agg[r])
    assert len(ends) == scenario.training.rounds


def test_faults_without_dynamics_loses_nothing(tmp_path):
    """The same file with availability always, no jitter and no deadline: every update counts."""
    _, s, ev, _ = run_fake("faults", tmp_path, "dynamics.availability.model=always",
                           "dynamics.stragglers.jitter=none", "training.deadline_s=null", "training.min_results=null")
    check_common(s, ev)
    assert s["dropped_updates"] == 0 and s["late_updates"] == 0


def test_mobility_hands_over_between_two_servers(tmp_path):
    scenario, s, ev, _ = run_fake("mobility", tmp_path)
    check_common(s, ev)
    servers = {srv.name for srv in scenario.edge_servers}
    assert len(servers) == 2
    assert scenario.dynamics.mobility.model == "random_waypoint"
    assert s["handovers"] > 0
    ho = ev[ev["kind"] == "handover"]
    assert set(ho["peer"]) <= servers
    # the simulated run spans several mobility ticks (positions change only at ticks)
    assert s["sim_time_s"] > 5 * scenario.dynamics.mobility.tick_s
    # after a handover the device's later events name its new server
    for _, h in ho.iterrows():
        later = ev[(ev["node"] == h["node"]) & (ev["t_s"] > h["t_s"]) & (ev["kind"] == "uplink")]
        nxt = ho[(ho["node"] == h["node"]) & (ho["t_s"] > h["t_s"])]
        if len(later) and (not len(nxt) or later["t_s"].iloc[0] < nxt["t_s"].iloc[0]):
            assert later["peer"].iloc[0] == h["peer"]


def test_mobility_static_has_no_handover(tmp_path):
    _, s, ev, _ = run_fake("mobility", tmp_path, "dynamics.mobility.model=none")
    check_common(s, ev)
    assert s["handovers"] == 0


@pytest.mark.parametrize("name", ["async_fedbuff", "faults", "mobility"])
def test_fake_runs_are_deterministic(name, tmp_path):
    _, _, a, _ = run_fake(name, tmp_path / "a", "training.rounds=4")
    _, _, b, _ = run_fake(name, tmp_path / "b", "training.rounds=4")
    pd.testing.assert_frame_equal(a, b)


@pytest.mark.slow
def test_async_real_trainer_still_batches(tmp_path):
    """A short asynchronous run of the real model: the jobs of devices that started at different
    simulated times still run together in one batched pass (mean jobs per pass > 1), the updates
    are stale and the model trains."""
    out = tmp_path / "async"
    res = subprocess.run([sys.executable, "-m", "deftsim", "run", str(SCENARIOS / "async_fedbuff.yaml"),
                          "--out", str(out), "--quiet", "--set", "training.rounds=4",
                          "--set", "async_fl.eval_every_steps=4", "--set", "data.max_test_examples=128"],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    ev = pd.read_parquet(out / "events.parquet")
    check_common(s, ev)
    assert s["protocol"] == "async_fl" and s["server_steps"] == 4
    assert s["engine"]["mean_jobs_per_pass"] > 1
    assert s["stale_updates_mean"] > 0
    # the loss of a job is filled in when its pass runs: one finite loss per job run, NaN for
    # jobs still in flight when the run ended (their values were never needed)
    assert int(np.isfinite(ev.loc[ev["kind"] == "compute", "loss"]).sum()) == s["engine"]["jobs_run"]


def test_shipped_dynamics_sweeps_report_figures_and_counts(tmp_path):
    """The availability and deadline sweeps with the fake trainer: ``deftsim report`` draws
    accuracy vs. time, time-to-accuracy vs. the swept field and (deadline) the lost and late
    updates vs. the deadline, and its tables carry the counts where they apply."""
    from analysis.report import DYNAMICS_METRICS

    fake = [a for s in FAKE for a in ("--set", s)]
    for name, field, counts in [("availability", "dynamics.availability.p_available", []),
                                ("deadline", "training.deadline_s", ["dropped_updates", "late_updates"])]:
        out = tmp_path / name
        res = subprocess.run([sys.executable, "-m", "deftsim", "sweep", str(SCENARIOS / f"sweep_{name}.yaml"),
                              "--out", str(out), "--quiet", "--workers", "1", *fake],
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        res = subprocess.run([sys.executable, "-m", "deftsim", "report", str(out)], capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        report = out / "report"
        stem = field.replace(".", "_")
        assert (report / "accuracy_vs_time.png").is_file()
        assert (report / f"to_accuracy_00_{stem}.png").is_file()
        runs = pd.read_csv(report / "runs.csv")
        points = pd.read_csv(report / "points.csv")
        html = (report / "report.html").read_text()
        for m in DYNAMICS_METRICS:
            applies = m in counts
            assert (f"{m}_mean" in points) == applies, m
            assert (f">{m}<" in html) == applies, m
        if counts:
            assert (report / f"dynamics_00_{stem}.png").is_file()
            # the deadline trades late updates for time: the tightest deadline has the most late ones
            late = runs.groupby(runs[field].fillna(np.inf))["late_updates"].mean()
            assert late.index.min() == 0.2 and late.loc[0.2] == late.max() > 0
            assert late.loc[np.inf] == 0   # no deadline: nothing is late
            # points.csv means are the runs' means
            for _, row in points.iterrows():
                at = runs[runs["point"] == row["point"]]
                assert row["late_updates_mean"] == pytest.approx(at["late_updates"].mean())
        else:
            assert not list(report.glob("dynamics_*.png"))
            # fewer available phones, fewer updates per round: the mean participants follow N p
            ev = {r: pd.read_parquet(out / "runs" / r / "events.parquet") for r in runs["run_id"]}
            per_round = {r: e[e["kind"] == "compute"].groupby("round").size().mean() for r, e in ev.items()}
            means = runs.assign(k=runs["run_id"].map(per_round)).groupby(field)["k"].mean()
            assert means.loc[1.0] == 8 and means.loc[0.5] < means.loc[0.8] < means.loc[1.0]


DOC = (ROOT / "docs" / "async.md").read_text(encoding="utf-8")


def states(*fragments: str) -> None:
    import re
    flat = re.sub(r"\s+", " ", DOC)
    for f in fragments:
        assert re.sub(r"\s+", " ", f) in flat, f


@pytest.mark.parametrize("kind, a, b, expected", [
    ("constant", 0.5, 4.0, lambda t: np.ones_like(t)),
    ("polynomial", 0.5, 4.0, lambda t: (1.0 + t) ** -0.5),
    ("polynomial", 2.0, 4.0, lambda t: (1.0 + t) ** -2.0),
    ("hinge", 10.0, 4.0, lambda t: np.where(t <= 4.0, 1.0, 1.0 / (10.0 * (t - 4.0) + 1.0))),
    ("hinge", 0.5, 1.0, lambda t: np.where(t <= 1.0, 1.0, 1.0 / (0.5 * (t - 1.0) + 1.0))),
])
def test_async_doc_fedbuff_weights_are_the_code(kind, a, b, expected):
    """docs/async.md: FedBuff weights s(tau_k) / K with the three staleness functions."""
    from netsim.strategies import AggregationChoice

    states("x <- x + eta_g * sum_k (s(tau_k) / K) * Delta_k", "| `polynomial` | (1 + tau)^-a",
           "1 if tau <= b, else 1 / (a (tau - b) + 1)", "**FedAsync** is the case K = 1")
    params = {"buffer_size": 3, "staleness": kind}
    params.update({"poly_a": a} if kind == "polynomial" else {"hinge_a": a, "hinge_b": b} if kind == "hinge" else {})
    agg = AggregationChoice(name="fedbuff", params=params).build()
    tau = np.array([0.0, 1.0, 2.0, 4.0, 5.0, 9.0])
    n = np.array([10.0, 1.0, 5.0, 7.0, 2.0, 3.0])   # FedBuff ignores the example counts
    np.testing.assert_allclose(agg.weights(n, tau), expected(tau) / 3, rtol=1e-15)


def test_async_doc_fedasync_steps_on_every_arrival(tmp_path):
    """buffer_size 1 (FedAsync): one server step per arrived update, each of staleness >= 0."""
    states("w_k = n_k s(tau_k) / sum_j n_j s(tau_j)", "B_down / C", "B_up / C")
    _, s, ev, _ = run_fake("async_fedbuff", tmp_path, "strategies.aggregation.params.buffer_size=1",
                           "training.rounds=10")
    up = ev[(ev["kind"] == "uplink") & (ev["staleness"] >= 0)]
    assert s["server_steps"] == 10 == count(ev, "aggregate")
    assert len(up) >= 10
    first = up.loc[(up["t_s"] + up["duration_s"]).sort_values(kind="stable").index].iloc[:10]
    assert s["stale_updates_mean"] == pytest.approx(float(first["staleness"].mean()))


def test_semi_synchronous_steps_once_per_period(tmp_path):
    """semi_synchronous: a server step at the end of each period_s with arrivals, never two within
    one period; updates still in flight at a period's end arrive stale in a later one."""
    period = 0.3
    _, s, ev, _ = run_fake("async_fedbuff", tmp_path, "training.mode=semi_synchronous",
                           f"async_fl.period_s={period}", "training.rounds=6")
    check_common(s, ev)
    agg = np.sort(ev.loc[ev["kind"] == "aggregate", "t_s"].to_numpy())
    assert len(agg) == s["server_steps"] == 6
    assert agg[0] >= period - 1e-12 and (np.diff(agg) >= period - 1e-12).all()
    assert s["stale_updates_mean"] > 0


def test_report_axis_puts_a_swept_null_after_the_numbers():
    """A deadline sweep [0.5, null, 0.2]: the report's axis reads 0.2, 0.5, (unset)."""
    from analysis.report import _param_axis, point_label

    for unset in (None, float("nan")):
        numeric, order, xpos = _param_axis([0.5, unset, 0.2])
        assert not numeric and order[:2] == [0.2, 0.5] and len(order) == 3
        assert xpos == {"0.2": 0.0, "0.5": 1.0, "(unset)": 2.0}
        assert point_label({"training.deadline_s": unset}, ["training.deadline_s"]) == "deadline_s=(unset)"
    assert _param_axis([0.5, 0.2]) == (True, [0.2, 0.5], {0.2: 0.2, 0.5: 0.5})


def test_console_summary_shows_the_dynamics_that_apply(tmp_path, capsys):
    from deftsim.report import print_fedavg

    _, s, _, _ = run_fake("faults", tmp_path / "f")
    print_fedavg(s, str(tmp_path / "f"))
    out = capsys.readouterr().out
    assert f"{s['dropped_updates']} / {s['late_updates']} / 0" in out
    assert "handovers" not in out and "staleness" not in out
    assert f"{s['engine']['jobs_cancelled']} cancelled" in out
    _, s, _, _ = run_fake("async_fedbuff", tmp_path / "a")
    print_fedavg(s, str(tmp_path / "a"))
    out = capsys.readouterr().out
    assert f"{s['stale_updates_mean']:.2f} steps" in out and "updates lost" not in out
    old = {k: v for k, v in s.items() if k not in ("protocol", "dropped_updates", "late_updates", "stale_updates",
                                                   "stale_updates_mean", "handovers", "server_steps", "engine")}
    print_fedavg(old, str(tmp_path / "a"))   # a summary.json written before these keys existed
    assert "batched pass" not in capsys.readouterr().out
