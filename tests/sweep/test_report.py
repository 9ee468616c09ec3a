"""`deftsim report`: HTML + PNG + CSV/Parquet of a sweep or a run; opened in headless Chromium."""
import base64
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from analysis.metrics import accuracy_energy_curve, energy_to_accuracy_j, latency_breakdown, mean_ci, pareto_mask
from analysis.report import unit_of

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "deftsim", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, tiny_scenario):
    """A finished sweep: 3 x 2 grid x 2 seeds; 7 devices per round of 6 devices is invalid (2 failed runs)."""
    root = tmp_path_factory.mktemp("report")
    (root / "tiny.yaml").write_text(yaml.safe_dump(tiny_scenario))
    (root / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "report_test", "description": "devices per round x bandwidth", "scenario": "tiny.yaml",
        "vary": {"grid": {"training.devices_per_round": [2, 4, 7], "devices.0.count": [6, 8]}},
        "seeds": 2}, sort_keys=False))
    res = _cli("sweep", root / "sweep.yaml", "--out", root / "out", "--workers", 2, "--quiet")
    assert res.returncode == 3, res.stderr  # devices_per_round=7 > 6 devices: failed runs
    return root / "out"


def test_report_files(sweep_dir):
    res = _cli("report", sweep_dir)
    assert res.returncode == 0, res.stderr
    rep = sweep_dir / "report"
    page = (rep / "report.html").read_text()
    for name in ["accuracy_vs_time.png", "latency_breakdown.png", "latency_per_round.png", "pareto.png",
                 "to_accuracy_00_training_devices_per_round.png", "to_accuracy_01_devices_0_count.png"]:
        png = (rep / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000, name
        assert base64.b64encode(png).decode() in page, name  # embedded: the page is self-contained
    assert not re.search(r"""(src|href)=["']?(https?:|//|[a-z_]+\.png)""", page)  # no external resource
    runs = pd.read_parquet(rep / "runs.parquet")
    assert len(runs) == 12 and list(runs["status"]).count("failed") == 2
    assert {"training.devices_per_round", "devices.0.count", "final_accuracy",
            "time_to_target_s", "energy_to_target_j", "mean_round_latency_s"} <= set(runs.columns)
    assert len(pd.read_csv(rep / "runs.csv")) == 12
    points = pd.read_parquet(rep / "points.parquet")
    assert len(points) == 6 and {"time_to_target_s_mean", "time_to_target_s_ci_low",
                                 "energy_to_target_j_ci_high"} <= set(points.columns)
    ok = points[(points["runs_ok"] == 2) & (points["time_to_target_s_n"] == 2)]
    assert len(ok)
    # two seeds: no Student-t interval (it would be 12.7 standard errors wide), the range instead
    assert ok["time_to_target_s_ci_low"].isna().all() and ok["time_to_target_s_ci_high"].isna().all()
    assert (ok["time_to_target_s_min"] <= ok["time_to_target_s_mean"]).all()
    assert (ok["time_to_target_s_mean"] <= ok["time_to_target_s_max"]).all()
    assert ok["time_to_target_s_spread"].str.startswith("n=2 (too few seeds for a CI): range [").all()
    assert "Fewer than 3 seeds" in page
    rb = pd.read_parquet(rep / "round_breakdown.parquet")
    parts = rb[["downlink_s", "compute_s", "uplink_s", "waiting_s", "edge_s"]].sum(axis=1)
    assert np.allclose(parts, rb["latency_s"])
    front = pd.read_parquet(rep / "pareto.parquet")
    assert front["on_front"].any() and len(front) == 6
    assert "Failed runs (2)" in page and "exceeds the number of devices" in page
    assert "Pareto front" in page and "target accuracy" in page
    # explicit target and output folder
    res = _cli("report", sweep_dir, "--out", sweep_dir / "rep2", "--target", "0.5")
    assert res.returncode == 0 and "target accuracy <b>0.5</b>" in (sweep_dir / "rep2" / "report.html").read_text()


def test_report_of_one_run_and_bad_folders(sweep_dir, tmp_path):
    run_dir = next(p for p in (sweep_dir / "runs").iterdir() if (p / "summary.json").is_file())
    res = _cli("report", run_dir, "--out", tmp_path / "one")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "one" / "accuracy_vs_time.png").is_file()
    res = _cli("report", tmp_path / "nope")
    assert res.returncode == 2 and "does not exist" in res.stderr
    res = _cli("report", tmp_path)
    assert res.returncode == 2 and "neither a sweep folder" in res.stderr
    res = _cli("report", sweep_dir, "--target", "95")
    assert res.returncode == 2 and "--target" in res.stderr


def test_units_and_metrics():
    assert unit_of("channel.uplink_bandwidth_hz") == "Hz"
    assert unit_of("devices.0.compute_flops_per_s") == "FLOP/s"
    assert unit_of("training.devices_per_round") == "-"
    assert unit_of("time_to_target_s") == "s" and unit_of("energy_to_target_j") == "J"
    m, lo, hi, n = mean_ci([1.0, 2.0, 3.0])
    assert (m, n) == (2.0, 3) and math.isclose(hi - m, 4.302652729911275 / math.sqrt(3), rel_tol=1e-9)
    assert math.isnan(mean_ci([1.0])[1]) and mean_ci([None, math.nan])[3] == 0
    frame = pd.DataFrame({"acc": [0.9, 0.8, 0.9, 0.7], "t": [10.0, 5.0, 12.0, 6.0], "e": [1.0, 1.0, 1.0, 2.0]})
    assert list(pareto_mask(frame, ["acc"], ["t", "e"])) == [True, True, False, False]


def test_latency_breakdown_and_energy_to_accuracy(sweep_dir):
    run_dir = next(p for p in (sweep_dir / "runs").iterdir() if (p / "summary.json").is_file())
    events = pd.read_parquet(run_dir / "events.parquet")
    lb = latency_breakdown(events)
    starts = events[events["kind"] == "round_start"]["t_s"].to_numpy()
    ends = events[events["kind"] == "round_end"]["t_s"].to_numpy()
    assert np.allclose(lb["latency_s"], ends - starts)
    assert (lb[["downlink_s", "compute_s", "uplink_s", "waiting_s", "edge_s"]] >= 0).all().all()
    assert (lb["devices"] > 0).all()
    final = events[events["kind"] == "evaluate"]["accuracy"].iloc[-1]
    dev = events[events["node"].str.startswith("dev")]
    assert math.isclose(energy_to_accuracy_j(events, final), dev["energy_j"].sum(), rel_tol=1e-12) or \
        energy_to_accuracy_j(events, final) <= dev["energy_j"].sum()
    assert energy_to_accuracy_j(events, 1.0) is None
    # the accuracy-energy curve agrees with energy-to-accuracy at each evaluation's accuracy
    curve = accuracy_energy_curve(events)
    assert curve["energy_j"].is_monotonic_increasing and curve["energy_j"].iloc[0] == 0.0
    for _, row in curve.iterrows():
        first_hit = curve[curve["accuracy"] >= row["accuracy"]].iloc[0]
        assert energy_to_accuracy_j(events, row["accuracy"]) == pytest.approx(first_hit["energy_j"], rel=1e-12)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian package: chromium)")
def test_report_opens_in_headless_chromium(sweep_dir, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    res = _cli("report", sweep_dir, "--out", tmp_path / "rep")
    assert res.returncode == 0, res.stderr
    problems = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in
                ("error", "warning") else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
        page.goto((tmp_path / "rep" / "report.html").as_uri())
        page.wait_for_load_state("load")
        images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
        assert len(images) == 6 and all(done and width > 100 for done, width in images), images
        # click a column header: the table sorts (descending seed puts seed 1 first)
        table = page.locator("table.sortable").first
        seed_col = [t.strip() for t in table.locator("th").all_inner_texts()].index("seed") + 1
        table.locator(f"th:nth-child({seed_col})").click()
        table.locator(f"th:nth-child({seed_col})").click()
        first = table.locator(f"tbody tr:first-child td:nth-child({seed_col})").inner_text()
        assert first == "1"
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert problems == []
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_aircomp_section(tmp_path, tiny_scenario):
    """A sweep over AirComp settings gets the over-the-air section: figure, per-point table, and
    the nested summary metrics as dotted columns of runs.parquet."""
    from analysis import load_sweep

    scenario = {**tiny_scenario, "channel": {**tiny_scenario["channel"], "uplink_access": "aircomp"},
                "training": {**tiny_scenario["training"], "rounds": 3}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(scenario))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "scenario": "tiny.yaml", "seeds": 2,
        "vary": {"grid": {"aircomp.receive_snr_db": [-10.0, 10.0], "aircomp.truncation_threshold": [0.1, 1.0]}}}))
    res = _cli("sweep", tmp_path / "sweep.yaml", "--out", tmp_path / "out", "--workers", 2, "--quiet")
    assert res.returncode == 0, res.stderr
    runs = load_sweep(tmp_path / "out")
    np.testing.assert_allclose(runs["aircomp.mean_receive_snr_db"], runs["aircomp.receive_snr_db"])
    res = _cli("report", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    rep = tmp_path / "out" / "report"
    assert (rep / "aircomp.png").stat().st_size > 5000
    table = pd.read_csv(rep / "aircomp_points.csv")
    assert len(table) == 4 and (table["runs_ok"] == 2).all()
    assert "Over-the-air aggregation" in (rep / "report.html").read_text()
    # higher g_th truncates more; higher SNR means lower NMSE at equal g_th
    hi = table[table["aircomp.truncation_threshold"] == 1.0]["aircomp.mean_truncation_ratio"]
    lo = table[table["aircomp.truncation_threshold"] == 0.1]["aircomp.mean_truncation_ratio"]
    assert hi.min() > lo.max()
    for _, grp in table.groupby("aircomp.truncation_threshold"):
        grp = grp.sort_values("aircomp.receive_snr_db")
        assert grp["aircomp.mean_nmse"].iloc[0] > grp["aircomp.mean_nmse"].iloc[1]
