"""D2D prompt transfer runs (``experiment: d2d_prompt_transfer``) in the report: per-target
times to target as empirical CDFs, and the similarity of the task embeddings against the
gain a source prompt gives at the start.

* :func:`target_rows` -- one row per run, variant and target (``summary.json``'s
  ``variants.<v>.targets``): time to target [s] (NaN: never), energy to target [J], the chosen
  source, start and final metric;
* :func:`similarity_rows` -- one row per run and (target, candidate) pair of variant
  ``similarity`` (``similarity_gain.pairs``);
* :func:`fig_time_to_target_cdf` -- per point, the CDF over the targets of every seed of the
  time to target, a line per variant; a target that never reached it keeps its line below 1;
* :func:`fig_gain_vs_similarity` -- per point, each pair's gain against its similarity, with
  Spearman's rho of the pooled pairs.

Reads ``summary.json`` mappings only; a malformed one is a :class:`~analysis.files.ReportError`.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pandas as pd

from .figures import FigureWriter, plt
from .files import ReportError
from .variants import _num

MAX_PANELS = 12
"""Points drawn in the per-point figures (the tables hold them all)."""


def _list(value, where: str) -> list:
    if not isinstance(value, list):
        raise ReportError(f"{where} must be a list (the summary.json is not one of a complete d2d_prompt_transfer "
                          "run)")
    return value


def target_rows(summaries: dict, runs: pd.DataFrame, params: list[str]) -> pd.DataFrame:
    """One row per finished run, variant and target (see the module docstring)."""
    rows = []
    for _, run in runs[runs["status"] == "ok"].iterrows():
        summary = summaries[run["run_id"]]
        variants = summary.get("variants")
        if not isinstance(variants, dict):
            raise ReportError(f"run {run['run_id']}: summary.json 'variants' must be a mapping")
        for name, v in variants.items():
            if not isinstance(v, dict):
                raise ReportError(f"run {run['run_id']}: summary.json variants.{str(name)[:40]} must be a mapping")
            for t in _list(v.get("targets"), f"run {run['run_id']}: summary.json variants.{str(name)[:40]}.targets"):
                t = t if isinstance(t, dict) else {}
                rows.append({"run_id": run["run_id"], "point": int(run["point"]), "seed": run["seed"],
                             **{p: run[p] for p in params}, "variant": str(name), "target": t.get("device"),
                             "task": t.get("task"), "source_task": t.get("source_task"),
                             "source_hops": _num(t.get("source_hops")),
                             "time_to_target_s": _num(t.get("reached_s")),
                             "energy_to_target_j": _num(t.get("energy_to_target_j")),
                             "start_metric": _num(t.get("start_metric")), "final_metric": _num(t.get("final_metric")),
                             "d2d_bytes": _num(t.get("d2d_bytes")), "cellular_bytes": _num(t.get("cellular_bytes"))})
    return pd.DataFrame(rows)


def similarity_rows(summaries: dict, runs: pd.DataFrame, params: list[str]) -> pd.DataFrame:
    """One row per finished run and (target, candidate) pair of variant ``similarity``."""
    rows = []
    for _, run in runs[runs["status"] == "ok"].iterrows():
        sg = summaries[run["run_id"]].get("similarity_gain")
        if sg is None:
            continue
        if not isinstance(sg, dict):
            raise ReportError(f"run {run['run_id']}: summary.json 'similarity_gain' must be a mapping")
        for p in _list(sg.get("pairs"), f"run {run['run_id']}: summary.json similarity_gain.pairs"):
            p = p if isinstance(p, dict) else {}
            rows.append({"run_id": run["run_id"], "point": int(run["point"]), "seed": run["seed"],
                         **{q: run[q] for q in params}, "target": p.get("target"), "source": p.get("source"),
                         "same_task": p.get("source_task") == p.get("target_task"), "hops": _num(p.get("hops")),
                         "similarity": _num(p.get("similarity")), "gain": _num(p.get("gain"))})
    return pd.DataFrame(rows)


def spearman(x, y) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN for fewer than 3 pairs or a
    constant series."""
    x, y = pd.Series(np.asarray(x, dtype=float)), pd.Series(np.asarray(y, dtype=float))
    keep = x.notna() & y.notna()
    if keep.sum() < 3:
        return math.nan
    rx, ry = x[keep].rank(method="average").to_numpy(), y[keep].rank(method="average").to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def ecdf_steps(times) -> tuple[np.ndarray, np.ndarray]:
    """The empirical CDF of times to target as a step function from 0: x = [0, t_(1), ...,
    t_(m)] over the m finite times, y = [0, 1/n, ..., m/n] over all n (a time that is NaN or
    infinite, never reached, keeps y below 1)."""
    times = np.asarray(times, dtype=float)
    reached = np.sort(times[np.isfinite(times)])
    return np.concatenate([[0.0], reached]), np.arange(len(reached) + 1) / len(times)


def _panels(points: list):
    pyplot = plt()
    shown = points[:MAX_PANELS]
    cols = min(3, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = pyplot.subplots(rows, cols, figsize=(4.4 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.ravel()[len(shown):]:
        ax.set_visible(False)
    return fig, axes.ravel(), shown


def fig_time_to_target_cdf(targets: pd.DataFrame, label: Callable[[int], str], fw: FigureWriter) -> bytes:
    """Per point (up to :data:`MAX_PANELS`), the empirical CDF over its targets (all seeds) of
    the time to target, a step line per variant."""
    points = sorted(targets["point"].unique())
    fig, axes, shown = _panels(points)
    order = list(pd.unique(targets["variant"]))
    for ax, point in zip(axes, shown):
        sub = targets[targets["point"] == point]
        for i, variant in enumerate(order):
            times = sub.loc[sub["variant"] == variant, "time_to_target_s"].to_numpy(dtype=float)
            if not len(times):
                continue
            x, y = ecdf_steps(times)
            ax.step(x, y, where="post", color=f"C{i}", label=variant)
        ax.set_ylim(0, 1.05)
        ax.set_title(label(int(point)), fontsize=8)
        ax.set_xlabel("simulated time to target [s]")
        ax.set_ylabel("fraction of targets")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fw.save(fig, "time_to_target_cdf")


def fig_gain_vs_similarity(pairs: pd.DataFrame, label: Callable[[int], str], fw: FigureWriter) -> bytes:
    """Per point, each (target, candidate) pair's gain at the start against the similarity of
    their task embeddings (same-task pairs apart), Spearman's rho in the title."""
    points = sorted(pairs["point"].unique())
    fig, axes, shown = _panels(points)
    for ax, point in zip(axes, shown):
        sub = pairs[pairs["point"] == point]
        for same, colour, name in ((True, "C0", "same task"), (False, "C1", "other task")):
            part = sub[sub["same_task"] == same]
            if len(part):
                ax.scatter(part["similarity"], part["gain"], s=14, color=colour, label=name, alpha=0.8)
        rho = spearman(sub["similarity"], sub["gain"])
        ax.set_title(f"{label(int(point))}\nSpearman rho = {'n/a' if math.isnan(rho) else f'{rho:.2f}'} "
                     f"({len(sub)} pairs)", fontsize=8)
        ax.set_xlabel("cosine similarity of the task embeddings")
        ax.set_ylabel("gain at the start")
        ax.ticklabel_format(axis="both", useOffset=False)
        ax.locator_params(axis="x", nbins=5)
        ax.grid(alpha=0.3)
        if len(sub):
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fw.save(fig, "gain_vs_similarity")
