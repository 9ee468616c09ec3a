"""The D2D prompt transfer part of the report (analysis/d2d.py): rows from summary.json,
Spearman's rank correlation against hand values, the figures, and malformed summaries."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from analysis.d2d import (fig_gain_vs_similarity, fig_time_to_target_cdf, similarity_rows, spearman,
                          target_rows)
from analysis.figures import FigureWriter
from analysis.files import ReportError


def _summary(times):
    return {"experiment": "d2d_prompt_transfer",
            "variants": {"scratch": {"targets": [{"device": 3, "task": "t/a", "reached_s": None, "start_metric": 0.3,
                                                  "final_metric": 0.4}]},
                         "similarity": {"targets": [{"device": 3, "task": "t/a", "source_task": "t/a",
                                                     "source_hops": 1, "reached_s": t, "energy_to_target_j": 2.0}
                                                    for t in times]}},
            "similarity_gain": {"spearman": 1.0, "pairs": [
                {"target": 3, "target_task": "t/a", "source": j, "source_task": "t/a" if j < 2 else "t/b",
                 "hops": 1, "similarity": 0.1 * j, "gain": 0.05 * j} for j in range(4)]}}


def _runs(n=1):
    return pd.DataFrame({"run_id": [f"r{i}" for i in range(n)], "point": list(range(n)), "seed": [0] * n,
                         "status": ["ok"] * n, "d2d.k": [1 + 2 * i for i in range(n)]})


def test_target_rows_hold_every_variant_and_target_with_never_as_nan():
    rows = target_rows({"r0": _summary([0.5, 1.5])}, _runs(), ["d2d.k"])
    assert list(rows["variant"]) == ["scratch", "similarity", "similarity"]
    assert math.isnan(rows["time_to_target_s"].iloc[0])
    assert list(rows["time_to_target_s"].iloc[1:]) == [0.5, 1.5]
    assert (rows["d2d.k"] == 1).all() and rows["source_hops"].iloc[1] == 1.0


def test_similarity_rows_mark_same_task_pairs():
    rows = similarity_rows({"r0": _summary([0.5])}, _runs(), ["d2d.k"])
    assert list(rows["same_task"]) == [True, True, False, False]
    assert list(rows["similarity"]) == pytest.approx([0.0, 0.1, 0.2, 0.3])


@pytest.mark.parametrize("x, y, rho", [
    ([1, 2, 3, 4], [10, 20, 30, 40], 1.0),
    ([1, 2, 3, 4], [4, 3, 2, 1], -1.0),
    ([1, 2, 3, 4, 5], [2, 1, 4, 3, 5], 0.8),          # 1 - 6 sum d^2 / (n (n^2 - 1)) = 1 - 6 * 4 / 120
    ([1, 2, 2, 3], [1, 2, 3, 4], 0.9486832980505138),  # ties share rank 2.5: Pearson of the ranks
])
def test_spearman_against_hand_values(x, y, rho):
    assert spearman(x, y) == pytest.approx(rho, rel=1e-12)


def test_spearman_is_undefined_for_too_few_or_constant_values():
    assert math.isnan(spearman([1, 2], [1, 2]))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert spearman([1, 2, float("nan"), 3], [1, 2, 5, 3]) == pytest.approx(1.0)


def test_figures_are_written(tmp_path):
    summaries = {"r0": _summary([0.5, 1.5]), "r1": _summary([0.2, None])}
    fw = FigureWriter(tmp_path, ("png",))
    png = fig_time_to_target_cdf(target_rows(summaries, _runs(2), ["d2d.k"]), lambda p: f"P{p}", fw)
    assert png[:4] == b"\x89PNG" and (tmp_path / "time_to_target_cdf.png").exists()
    png = fig_gain_vs_similarity(similarity_rows(summaries, _runs(2), ["d2d.k"]), lambda p: f"P{p}", fw)
    assert png[:4] == b"\x89PNG" and (tmp_path / "gain_vs_similarity.png").exists()


@pytest.mark.parametrize("bad, words", [
    ({"variants": []}, "'variants' must be a mapping"),
    ({"variants": {"x": 3}}, "variants.x must be a mapping"),
    ({"variants": {"x": {"targets": 5}}}, "variants.x.targets must be a list"),
])
def test_malformed_summaries_are_report_errors(bad, words):
    with pytest.raises(ReportError, match=words.replace(".", r"\.").replace("'", "'")):
        target_rows({"r0": {**_summary([1.0]), **bad}}, _runs(), [])


def test_malformed_pairs_are_report_errors():
    with pytest.raises(ReportError, match="similarity_gain"):
        similarity_rows({"r0": {**_summary([1.0]), "similarity_gain": {"pairs": "x"}}}, _runs(), [])


def test_ecdf_steps_count_never_as_below_one():
    from analysis.d2d import ecdf_steps

    x, y = ecdf_steps([2.0, float("nan"), 0.5, float("inf")])
    assert list(x) == [0.0, 0.5, 2.0] and list(y) == [0.0, 0.25, 0.5]
