"""Reports of every experiment: lola_compare, aircomp_vs_ofdma (fake trainer, seconds) and, with
the real model (slow), neural_aircomp and lola_compare with block fine-tuning; figures in every
format; the same target accuracy in analysis.load_sweep and the report."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from analysis import build_report, load_sweep, load_variants, time_to_accuracy_s
from analysis.metrics import accuracy_curve

ROOT = Path(__file__).resolve().parents[2]


def _png(path: Path) -> bytes:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 5000, path
    return data


def test_lola_compare_run(cli, results, tmp_path):
    res = cli("report", results["lola"], "--out", tmp_path / "rep")
    assert res.returncode == 0, res.stderr
    rep = tmp_path / "rep"
    summary = json.loads((results["lola"] / "summary.json").read_text())
    variants = pd.read_parquet(rep / "variants.parquet")
    assert list(variants["variant"]) == list(summary["mean_round_latency_s"])
    for _, row in variants.iterrows():
        assert row["mean_round_latency_s"] == summary["mean_round_latency_s"][row["variant"]]
        assert row["p95_round_latency_s"] == summary["allocations"][row["variant"]]["p95_round_latency_s"]
    page = (rep / "report.html").read_text()
    assert "lola_compare" in page and "Metrics per variant" in page
    assert "No accuracy curves" in page and not (rep / "variant_accuracy_vs_time.png").exists()  # fake: none
    _png(rep / "variants.png")


def test_aircomp_vs_ofdma_run_in_every_format(cli, results, tmp_path):
    rep = tmp_path / "rep"
    path = build_report(results["cmp"], rep, formats=("png", "pdf", "svg"))
    assert path == rep / "report.html"
    summary = json.loads((results["cmp"] / "summary.json").read_text())
    table = pd.read_parquet(rep / "variants.parquet")
    assert sorted(table["variant"]) == ["aircomp K=2", "aircomp K=4", "ofdma K=2", "ofdma K=4"]
    events = pd.read_parquet(results["cmp"] / "events.parquet")
    target = float(table["target_accuracy_used"].iloc[0]) if "target_accuracy_used" in table else None
    target = load_variants(results["cmp"])["target_accuracy_used"].iloc[0] if target is None else target
    for _, row in table.iterrows():
        run = summary["runs"][row["uplink"]][str(int(row["device_count"]))]
        assert row["final_accuracy"] == run["final_accuracy"]
        assert row["total_device_energy_j"] == run["total_device_energy_j"]
        assert row["aggregation_latency_s"] == summary["aggregation_latency_s"][row["uplink"]][
            str(int(row["device_count"]))]
        assert math.isnan(row["aircomp.mean_nmse"]) == (row["uplink"] == "ofdma")
        mine = events[(events["uplink_access"] == row["uplink"]) & (events["device_count"] == row["device_count"])]
        expected = time_to_accuracy_s(mine, target)
        assert (math.isnan(row["time_to_target_s"]) if expected is None else row["time_to_target_s"] == expected)
    for stem in ("variants", "variant_accuracy_vs_time"):
        _png(rep / f"{stem}.png")
        assert (rep / f"{stem}.pdf").read_bytes().startswith(b"%PDF")
        assert b"<svg" in (rep / f"{stem}.svg").read_bytes()[:2000]
    # same data, same files (fixed metadata)
    again = tmp_path / "again"
    build_report(results["cmp"], again, formats=("pdf", "svg"))
    for name in ("variants.pdf", "variants.svg"):
        assert (again / name).read_bytes() == (rep / name).read_bytes(), name
    assert not (again / "variants.png").exists()   # only the formats asked for (the HTML embeds PNG)


def test_sweep_of_lola_compare(cli, tmp_path):
    """A sweep of a multi-variant experiment: per swept field a figure with a line per algorithm."""
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "lola_edge", "scenario": str(ROOT / "scenarios" / "lola_compare.yaml"), "seeds": 2,
        "set": {"trainer": "fake", "lola.rounds": 3, "lola.train_rounds": 0},
        "vary": {"grid": {"edge_servers.0.compute_flops_per_s": [1.0e12, 1.0e14]}}}))
    res = cli("sweep", tmp_path / "sweep.yaml", "--out", tmp_path / "out", "--workers", 2, "--quiet")
    assert res.returncode == 0, res.stderr
    res = cli("report", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    rep = tmp_path / "out" / "report"
    _png(rep / "variants_vs_00_edge_servers_0_compute_flops_per_s.png")
    points = pd.read_parquet(rep / "variant_points.parquet")
    assert len(points) == 2 * 7 and (points["runs_ok"] == 2).all()
    assert points["mean_round_latency_s_ci_low"].isna().all()         # 2 seeds: no CI ...
    assert (points["mean_round_latency_s_min"] <= points["mean_round_latency_s_max"]).all()  # ... the range
    off = points[points["variant"] == "offloading"].sort_values("edge_servers.0.compute_flops_per_s")
    assert off["mean_round_latency_s_mean"].iloc[0] > off["mean_round_latency_s_mean"].iloc[1]  # faster edge
    table = load_variants(tmp_path / "out")
    assert len(table) == 4 * 7


def test_load_sweep_and_report_use_one_target(cli, results, tmp_path):
    res = cli("report", results["sweep"], "--out", tmp_path / "rep")
    assert res.returncode == 0, res.stderr
    report_runs = pd.read_parquet(tmp_path / "rep" / "runs.parquet").set_index("run_id")
    runs = load_sweep(results["sweep"]).set_index("run_id")
    assert runs["target_accuracy_used"].nunique() == 1
    target = runs["target_accuracy_used"].iloc[0]
    assert f"target accuracy <b>{target:g}</b>" in (tmp_path / "rep" / "report.html").read_text()
    pd.testing.assert_series_equal(runs["time_to_target_s"], report_runs.loc[runs.index, "time_to_target_s"])
    pd.testing.assert_series_equal(runs["energy_to_target_j"], report_runs.loc[runs.index, "energy_to_target_j"])
    given = load_sweep(results["sweep"], target=0.3)
    assert (given["target_accuracy_used"] == 0.3).all()


def test_event_log_with_group_and_server_columns(results, copy_of, tmp_path):
    """Extra string columns in the event log (device group, serving edge server) change nothing."""
    folder = copy_of(results["run"])
    events = pd.read_parquet(folder / "events.parquet")
    events["group"] = np.where(events["node"].str.startswith("dev"), "phone", "")
    events["server"] = "edge0"
    events.to_parquet(folder / "events.parquet")
    build_report(folder, tmp_path / "a")
    build_report(results["run"], tmp_path / "b")
    a = pd.read_parquet(tmp_path / "a" / "runs.parquet")
    b = pd.read_parquet(tmp_path / "b" / "runs.parquet")
    for col in ("time_to_target_s", "energy_to_target_j", "mean_round_latency_s"):
        assert a[col].tolist() == b[col].tolist()


def test_accuracy_band_is_the_seed_mean(results, tmp_path):
    """The mean line of accuracy vs. time is the mean over seeds of each round's time and accuracy."""
    from analysis.figures import aligned_mean
    from analysis.sweep import load_sweep_events

    events = load_sweep_events(results["sweep"])
    point = events[events["point"] == 0]
    curves = [accuracy_curve(ev) for _, ev in point.groupby("run_id")]
    mean = aligned_mean(curves)
    stacked = np.array([c["accuracy"].to_numpy() for c in curves])
    np.testing.assert_allclose(mean["accuracy"], stacked.mean(axis=0), rtol=0, atol=1e-15)
    np.testing.assert_allclose(mean["low"], stacked.min(axis=0))     # 2 seeds: the band is the range
    np.testing.assert_allclose(mean["high"], stacked.max(axis=0))
    assert ((mean["low"] >= 0) & (mean["high"] <= 1)).all()


@pytest.mark.slow
def test_neural_aircomp_and_trained_lola_runs(cli, tmp_path):
    """Real model, a few seconds each: every variant's accuracy and curve are reported."""
    res = cli("run", ROOT / "scenarios" / "neural_aircomp.yaml", "--out", tmp_path / "neural", "--quiet",
              "--threads", 1, "--set", "neural_aircomp.steps=6", "--set", "neural_aircomp.eval_every_steps=3",
              "--set", "neural_aircomp.max_train_examples=48", "--set", "data.max_test_examples=32",
              "--set", "neural_aircomp.receive_snr_db=[null,0.0]", timeout=600)
    assert res.returncode == 0, res.stderr
    res = cli("report", tmp_path / "neural")
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "neural" / "summary.json").read_text())
    table = pd.read_parquet(tmp_path / "neural" / "report" / "variants.parquet")
    assert list(table["variant"]) == summary["variants"]
    assert table.set_index("variant")["final_accuracy"].to_dict() == summary["final_accuracy"]
    _png(tmp_path / "neural" / "report" / "variant_accuracy_vs_time.png")
    res = cli("run", ROOT / "scenarios" / "lola_compare.yaml", "--out", tmp_path / "lola", "--quiet", "--threads", 1,
              "--set", "lola.rounds=3", "--set", "lola.train_rounds=2", "--set", "lola.steps_per_round=1",
              "--set", "data.max_test_examples=32", timeout=600)
    assert res.returncode == 0, res.stderr
    res = cli("report", tmp_path / "lola")
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "lola" / "summary.json").read_text())
    table = pd.read_parquet(tmp_path / "lola" / "report" / "variants.parquet").set_index("variant")
    for name, acc in summary["final_accuracy"].items():
        assert table.loc[name, "final_accuracy"] == acc
    _png(tmp_path / "lola" / "report" / "variant_accuracy_vs_time.png")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian package: chromium)")
def test_experiment_reports_open_in_headless_chromium(cli, results, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    problems, counts = [], {}
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        for name in ("lola", "cmp"):
            res = cli("report", results[name], "--out", tmp_path / name)
            assert res.returncode == 0, res.stderr
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in
                    ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            page.goto((tmp_path / name / "report.html").as_uri())
            page.wait_for_load_state("load")
            images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
            assert all(done and width > 100 for done, width in images), images
            counts[name] = len(images)
            page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
            page.close()
        browser.close()
    assert problems == []
    assert counts == {"lola": 1, "cmp": 2}   # lola (fake): metrics only; cmp: metrics and accuracy vs time
