"""``deftsim report DIR``: a self-contained HTML report of a sweep or of one run folder, of any
experiment.

Writes into ``DIR/report/`` (or ``report_dir``); every figure in each requested format
(``formats``: png, pdf, svg; the HTML embeds the PNG).

FedAvg runs and sweeps (``experiment: fedavg``):

=========================  ===========================================================
``report.html``            one file, figures embedded (opens offline, no external resource)
``accuracy_vs_time``       test accuracy against simulated time: per point the mean over
                           seeds (line) with a band (95 % CI with 3 or more seeds, else the
                           seeds' min-max), each seed's curve faint
``to_accuracy_<field>``    time- and energy-to-accuracy against each swept field (numbers on a
                           numeric axis, categories such as ``peft.method`` as categories;
                           numbers with a null, e.g. no deadline, as categories in order with
                           ``(unset)`` last)
``dynamics_<field>``       (sweeps where updates are dropped, late or stale, or devices hand
                           over) those counts and the mean staleness against each swept field;
                           the runs and points tables then carry them too
``latency_breakdown``      mean round latency per point, split into downlink / compute /
                           uplink / waiting / edge (see :func:`analysis.metrics.latency_breakdown`)
``latency_per_round``      the same split round by round (first seed of each point)
``pareto``                 points on the accuracy / delay / energy Pareto front
``aircomp``                (runs with ``channel.uplink_access: aircomp``) final accuracy and
                           aggregation NMSE against the measured receive SNR
``runs.csv|parquet``       one row per run: swept fields, headline metrics, error if failed
``points.csv|parquet``     one row per point: mean, min, max and (3 or more seeds) 95 % CI
``round_breakdown.csv|parquet``  one row per run and round: the latency split
``pareto.csv|parquet``     per-point objectives and whether the point is on the front
``aircomp_points.csv|parquet``  per point: receive SNR, NMSE, truncation ratio, accuracy
=========================  ===========================================================

Experiments with several variants per run (``lola_compare``, ``aircomp_vs_ofdma``,
``neural_aircomp``; :mod:`analysis.variants`): ``variants`` (each metric per variant, mean over
seeds), ``variants_vs_<field>`` (sweeps: each metric against each swept field, a line per
variant), ``variant_accuracy_vs_time`` (where the runs hold accuracy curves), and the tables
``runs``, ``variants`` (one row per run and variant) and ``variant_points`` (per point and
variant: mean and spread over seeds).

Intervals: a Student-t 95 % CI needs 3 or more seeds (with 2 its half-width is 12.7 standard
errors); with 2 the report shows the seeds' range, with 1 the value. Intervals are clipped to the
metric's range (accuracies and shares to [0, 1], times and energies to >= 0).

Reads files only; never runs the simulator. Every unreadable or malformed file, and a report
folder that cannot be written, is a :class:`ReportError` naming the file.
"""
from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from .figures import (FigureWriter, aligned_mean, category_text, check_formats, colors, is_numeric, mean_band, plt,
                      spread_errorbar, spread_note)
from .files import ReportError, check_numbers, prepare_out_dir, read_events, read_json, write_bytes_atomic
from .labels import axis_label, field_label, short_label, unit_of
from .load import flatten_summary
from .metrics import (LATENCY_PARTS, accuracy_curve, choose_target as _choose_target, latency_breakdown, run_target,
                      metric_bounds, pareto_mask, seed_spread, spread_text)
from .sweep import RUNS_DIR, add_target_metrics, collect_runs, load_plan
from .variants import VIEWS, ExperimentView, variant_curves, variant_rows, variant_target_metrics

__all__ = ["ReportError", "axis_label", "build_report", "choose_target", "load_report_data", "load_variants",
           "unit_of"]

MAX_LEGEND_POINTS = 12
MAX_ROUND_PANELS = 12
MAX_GROUP_LINES = 6
MAX_BAND_POINTS = 12      # points drawn with a mean band in accuracy-vs-time (more: means only)
MAX_VARIANT_LINES = 12
MAX_DODGED_POINTS = 4     # points drawn side by side in a variant bar chart (more: pooled)
PART_COLORS = {"downlink_s": "#4c78a8", "compute_s": "#f58518", "uplink_s": "#54a24b", "waiting_s": "#bab0ac",
               "edge_s": "#b279a2"}
PART_LABELS = {"downlink_s": "downlink", "compute_s": "compute", "uplink_s": "uplink",
               "waiting_s": "waiting for stragglers", "edge_s": "edge aggregate + evaluate"}
RUN_METRICS = ["final_accuracy", "best_accuracy", "rounds_completed", "sim_time_s", "time_to_target_s",
               "energy_to_target_j", "total_device_energy_j", "mean_device_energy_j", "mean_round_latency_s",
               "compute_share", "communication_share", "stop_reason"]
POINT_METRICS = ["final_accuracy", "sim_time_s", "time_to_target_s", "energy_to_target_j",
                 "total_device_energy_j", "mean_round_latency_s"]
DYNAMICS_METRICS = ["dropped_updates", "late_updates", "stale_updates", "stale_updates_mean", "handovers"]
"""Summary keys of the protocols' faults, staleness and mobility (docs/async.md, docs/dynamics.md):
shown in the runs and points tables of the runs where they apply (:func:`dynamics_metrics`)."""
STALE = ["accuracy_vs_time", "to_accuracy_*", "dynamics_*", "latency_breakdown", "latency_per_round", "pareto", "aircomp",
         "variants", "variants_vs_*", "variant_accuracy_vs_time", "time_to_target_cdf", "gain_vs_similarity"]
"""Figure stems of an earlier report, removed before writing a new one."""
DYNAMICS_NOTE = ("dropped_updates: updates lost because the device went offline before its upload ended; "
                 "late_updates: updates still in progress when the round closed (deadline or over-selection); "
                 "stale_updates: asynchronous updates discarded as older than async_fl.max_staleness; "
                 "stale_updates_mean: mean staleness (server steps between the version an update was trained on "
                 "and its arrival) of the aggregated updates; handovers: changes of a device's edge server.")
NO_CURVES = {"lola_compare": "lola_compare fine-tunes for real only with lola.train_rounds > 0 and trainer: real; "
                              "these runs simulate the rounds' latency alone"}
SEED_NOTE = ("With 3 or more seeds per point, spreads are 95% Student-t confidence intervals of the mean "
             "(clipped to the metric's range: accuracies and shares to [0, 1], times and energies to 0 or more); "
             "with 2 seeds the report shows the seeds' range instead (a t-interval of 2 values is 12.7 "
             "standard errors wide), with 1 seed the value alone.")


# ------------------------------------------------------------------------------ loading
@dataclass
class ReportData:
    title: str
    kind: str  # "sweep" or "run"
    root: Path
    params: list[str]
    random_params: set[str]
    runs: pd.DataFrame  # one row per run (all statuses)
    zip_groups: list[list[str]] = field(default_factory=list)  # fields varied together
    events: dict[str, pd.DataFrame] = field(default_factory=dict)  # run_id -> events (ok runs)
    scenarios: dict[str, dict] = field(default_factory=dict)  # run_id -> resolved scenario
    summaries: dict[str, dict] = field(default_factory=dict)  # run_id -> summary.json (ok runs)
    description: str = ""
    experiment: str = "fedavg"


def _experiment(runs: pd.DataFrame, where: str) -> str:
    """The one experiment of the finished runs (``fedavg`` when the summaries name none)."""
    ok = runs[runs["status"] == "ok"] if "status" in runs else runs
    names = {e if isinstance(e, str) else "fedavg" for e in ok.get("experiment", pd.Series(dtype=object))}
    names = names or {"fedavg"}
    if len(names) > 1:
        raise ReportError(f"{where}: the runs mix experiments ({', '.join(sorted(names))}); a report compares runs "
                          "of one experiment")
    name = names.pop()
    if name != "fedavg" and name not in VIEWS:
        raise ReportError(f"{where}: experiment {name[:40]!r} is not one the report knows (fedavg, "
                          + ", ".join(VIEWS) + ")")
    return name


FEDAVG_REQUIRED = ("best_accuracy", "final_accuracy")
FEDAVG_OPTIONAL = ("chance_accuracy", "sim_time_s", "total_device_energy_j", "mean_device_energy_j",
                   "rounds_completed", "compute_share", "communication_share")


def _read_ok_run(data: ReportData, run_id: str, run_dir: Path) -> None:
    if data.experiment == "fedavg":
        summary = read_json(run_dir / "summary.json", what="run summary")
        check_numbers(summary, run_dir / "summary.json", FEDAVG_REQUIRED, FEDAVG_OPTIONAL)
    data.events[run_id] = read_events(run_dir)
    scenario_file = run_dir / "scenario.json"
    resolved = read_json(scenario_file, what="resolved scenario") if scenario_file.exists() else {}
    scenario = resolved.get("scenario", {})
    data.scenarios[run_id] = scenario if isinstance(scenario, dict) else {}
    if data.experiment != "fedavg":
        data.summaries[run_id] = read_json(run_dir / "summary.json", what="run summary")


def load_report_data(folder: str | Path) -> ReportData:
    """Everything the report reads from a sweep or run folder (:class:`ReportError` if a file is
    missing, unreadable or malformed)."""
    root = Path(folder)
    if (root / "sweep.json").is_file():
        plan = load_plan(root)
        runs = collect_runs(root, strict=True)
        spec = plan.get("sweep") if isinstance(plan.get("sweep"), dict) else {}
        vary = spec.get("vary") if isinstance(spec.get("vary"), dict) else {}
        random_spec = vary.get("random") if isinstance(vary.get("random"), dict) else {}
        random_params = set(random_spec.get("params") or {})
        zips = vary.get("zip") or []
        zips = [zips] if isinstance(zips, dict) else [z for z in zips if isinstance(z, dict)]
        data = ReportData(str(plan["name"]), "sweep", root, list(plan["params"]), random_params, runs,
                          zip_groups=[sorted((p for p in g if p in plan["params"]), key=plan["params"].index)
                                      for g in zips if len(g) > 1],
                          description=str(spec.get("description") or ""),
                          experiment=_experiment(runs, repr(str(root))))
        for run_id, status in zip(runs["run_id"], runs["status"]):
            if status == "ok":
                _read_ok_run(data, run_id, root / RUNS_DIR / run_id)
        return data
    if (root / "summary.json").exists() or (root / "events.parquet").exists():
        summary = read_json(root / "summary.json", what="run summary")
        scenario_file = root / "scenario.json"
        resolved = read_json(scenario_file, what="resolved scenario") if scenario_file.exists() else {}
        row = {"run_id": root.resolve().name or "run", "point": 0, "seed": resolved.get("seed"), "status": "ok"}
        row.update(flatten_summary(summary))
        runs = pd.DataFrame([row])
        scenario = resolved.get("scenario") if isinstance(resolved.get("scenario"), dict) else {}
        data = ReportData(str(scenario.get("name", root.resolve().name)), "run", root, [], set(), runs,
                          experiment=_experiment(runs, repr(str(root))))
        _read_ok_run(data, row["run_id"], root)
        return data
    if not root.exists():
        raise ReportError(f"{str(root)!r} does not exist")
    raise ReportError(f"{str(root)!r} is neither a sweep folder (sweep.json) nor a run folder "
                      "(summary.json + events.parquet)")


def _stop_targets(data: ReportData) -> list:
    return [run_target(s) for s in data.scenarios.values()]


def choose_target(data: ReportData, target: Optional[float]) -> tuple[float, str]:
    """The accuracy for time-/energy-to-accuracy of a FedAvg report and where it comes from
    (:func:`analysis.metrics.choose_target`, as :func:`analysis.load_sweep` uses it)."""
    best = data.runs.loc[data.runs["status"] == "ok", "best_accuracy"].astype(float)
    return _choose_target(best, _stop_targets(data), target)


# ------------------------------------------------------------------------------ tables
def _derive(data: ReportData, target: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-run metrics that depend on the target, and the per-round latency split."""
    runs = add_target_metrics(data.runs, data.events, target)
    lat, frames = [], []
    for run_id, point, seed in zip(runs["run_id"], runs["point"], runs["seed"]):
        ev = data.events.get(run_id)
        if ev is None:
            lat.append(math.nan)
            continue
        lb = latency_breakdown(ev)
        lat.append(float(lb["latency_s"].mean()) if len(lb) else math.nan)
        frames.append(lb.assign(run_id=run_id, point=point, seed=seed))
    runs["mean_round_latency_s"] = lat
    breakdown = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["run_id", "point", "seed", "round", "latency_s", *LATENCY_PARTS, "devices"])
    breakdown = breakdown[["run_id", "point", "seed"] + [c for c in breakdown.columns
                                                         if c not in ("run_id", "point", "seed")]]
    return runs, breakdown


def _fmt_value(v) -> str:
    if isinstance(v, (float, np.floating)) and not math.isnan(v):
        return f"{float(v):.4g}"
    return category_text(v)


def point_label(values: dict, params: list[str]) -> str:
    return ", ".join(f"{p.split('.')[-1]}={_fmt_value(values.get(p))}" for p in params) or "(scenario)"


def _spread_columns(row: dict, prefix: str, values: Sequence[float], metric: str) -> str:
    """Add ``<prefix>_mean/_n/_min/_max/_ci_low/_ci_high/_spread`` to ``row``; return the kind."""
    s = seed_spread(values, bounds=metric_bounds(metric))
    ci = s["kind"] == "ci"
    row.update({f"{prefix}_mean": s["mean"], f"{prefix}_n": s["n"], f"{prefix}_min": s["min"],
                f"{prefix}_max": s["max"], f"{prefix}_ci_low": s["low"] if ci else math.nan,
                f"{prefix}_ci_high": s["high"] if ci else math.nan, f"{prefix}_spread": spread_text(s)})
    return s["kind"]


def dynamics_metrics(runs: pd.DataFrame) -> list[str]:
    """The :data:`DYNAMICS_METRICS` that apply to ``runs``: in their summaries and non-zero in at
    least one finished run (a sweep without availability, deadline, staleness or mobility shows
    none of them; one that drops updates at some points shows ``dropped_updates`` everywhere)."""
    ok = runs[runs["status"] == "ok"] if "status" in runs else runs.iloc[0:0]
    out = []
    for m in DYNAMICS_METRICS:
        if m in ok:
            values = pd.to_numeric(ok[m], errors="coerce")
            if (values.fillna(0.0) != 0.0).any():
                out.append(m)
    return out


def _points(runs: pd.DataFrame, params: list[str], extra: Sequence[str] = ()) -> pd.DataFrame:
    """One row per point: the swept values and, per metric of :data:`POINT_METRICS` and
    ``extra``, the mean and spread over its finished seeds."""
    rows = []
    for point, group in runs.groupby("point", sort=True):
        first = group.iloc[0]
        row: dict[str, Any] = {"point": int(point)}
        row.update({p: first[p] for p in params})
        ok = group[group["status"] == "ok"]
        row["label"] = f"P{int(point)}: " + point_label({p: first[p] for p in params}, params)
        row["runs"] = int(len(group))
        row["runs_ok"] = int(len(ok))
        row["target_reached"] = int(ok["target_reached"].sum()) if len(ok) and "target_reached" in ok else 0
        for m in [*POINT_METRICS, *extra]:
            values = pd.to_numeric(ok[m], errors="coerce").astype(float) if m in ok else pd.Series(dtype=float)
            _spread_columns(row, m, values.tolist(), m)
        rows.append(row)
    return pd.DataFrame(rows)


def _pareto(points: pd.DataFrame) -> pd.DataFrame:
    cols = ["point", "label", "final_accuracy_mean", "sim_time_s_mean", "total_device_energy_j_mean"]
    front = points[cols].copy()
    front["on_front"] = pareto_mask(front, maximize=["final_accuracy_mean"],
                                    minimize=["sim_time_s_mean", "total_device_energy_j_mean"])
    return front


# ----------------------------------------------------------------------------- figures
def _suptitle(fig, text: str, fontsize: float = 9) -> None:
    """A figure title wrapped to the figure's width (about 13 characters per inch at 9 pt)."""
    import textwrap

    width = int(fig.get_size_inches()[0] * 13 * 9 / fontsize)
    fig.suptitle(textwrap.fill(text, width=max(width, 40)), fontsize=fontsize)


def _caption_label(runs: pd.DataFrame, param: str) -> str:
    """A swept field's name for a caption: with its unit if numeric, without if categorical."""
    values = list(pd.unique(runs.loc[runs["status"] == "ok", param])) if param in runs else []
    return field_label(param) if is_numeric(values) else short_label(param)


def _param_axis(values: list) -> tuple[bool, list, dict]:
    """(numeric, ordered values, value -> x position) of a swept field's values: numbers at their
    value, categories (text, booleans, lists) at 0, 1, 2, ... in sorted order."""
    if is_numeric(values):
        order = sorted(values)
        return True, order, {v: float(v) for v in order}
    unset = [v for v in values if _is_unset(v)]
    numbers = [v for v in values if not _is_unset(v)]
    if unset and is_numeric(numbers):
        # numbers and null (e.g. training.deadline_s: [0.3, 0.5, null]): the numbers in order, then
        # "(unset)", evenly spaced as categories
        order = sorted(numbers) + unset[:1]
        return False, order, {category_text(v): float(i) for i, v in enumerate(order)}
    order = sorted(values, key=category_text)
    return False, order, {category_text(v): float(i) for i, v in enumerate(order)}


def _is_unset(v) -> bool:
    """A swept null (None, or NaN once it sits in a float column)."""
    return v is None or (isinstance(v, (float, np.floating)) and math.isnan(v))


def _at(frame: pd.DataFrame, column: str, value, numeric: bool) -> pd.DataFrame:
    if numeric:
        return frame[frame[column] == value]
    return frame[frame[column].map(category_text) == category_text(value)]


def _values_along(sub: pd.DataFrame, param: str, order: list, xpos: dict, numeric: bool, dodge: float,
                  metric: str) -> tuple[list[float], list[list[float]]]:
    """For each value of ``param`` in ``order`` that ``sub`` has: its x position (shifted by
    ``dodge`` for side-by-side categories) and the runs' values of ``metric`` there."""
    xs, values = [], []
    for value in order:
        at = _at(sub, param, value, numeric)
        if not at.empty:
            xs.append((xpos[value] if numeric else xpos[category_text(value)]) + dodge)
            values.append(at[metric].astype(float).tolist())
    return xs, values


def _style_param_axis(ax, param: str, numeric: bool, order: list, random: bool, partners: tuple = ()) -> None:
    label = field_label(param) if numeric else short_label(param)
    ax.set_xlabel(label + ("\n(zipped with " + ", ".join(short_label(p) for p in partners) + ")" if partners else ""))
    if numeric:
        positive = [v for v in order if v > 0]
        if len(positive) == len(order) and len(order) > 1 and max(order) / min(order) >= 20:
            ax.set_xscale("log")
        if len(order) <= 8 and not random:
            ax.set_xticks([float(v) for v in order], [f"{v:g}" for v in order])
            ax.minorticks_off()
    else:
        ax.set_xticks([float(i) for i in range(len(order))], [category_text(v)[:24] for v in order],
                      rotation=20 if len(order) > 3 else 0)
        ax.set_xlim(-0.6, len(order) - 0.4)


def fig_accuracy(data: ReportData, runs: pd.DataFrame, points: pd.DataFrame, target: float,
                 fw: FigureWriter) -> bytes:
    """Accuracy vs. simulated time: per point the mean over seeds with a band, seeds faint."""
    pyplot = plt()
    longest = max((len(str(v)) for v in points["label"]), default=0) if len(points) <= MAX_LEGEND_POINTS else 8
    fig, ax = pyplot.subplots(figsize=(min(7.5 + 0.055 * max(longest - 30, 0), 12), 4.5))
    ok = runs[runs["status"] == "ok"]
    point_ids = sorted(points["point"])
    palette = dict(zip(point_ids, colors(len(point_ids))))
    labels = dict(zip(points["point"], points["label"]))
    band = len(point_ids) <= MAX_BAND_POINTS
    for point in point_ids:
        curves = [accuracy_curve(data.events[r]) for r in ok.loc[ok["point"] == point, "run_id"]]
        if not curves:
            continue
        label = None
        if len(point_ids) <= 2 * MAX_LEGEND_POINTS:
            label = labels[point] if len(point_ids) <= MAX_LEGEND_POINTS else f"P{point}"
            if len(curves) > 1:
                label += f" (mean of {len(curves)})"
        if band:
            mean_band(ax, curves, palette[point], label)
        else:
            mean = aligned_mean(curves)
            ax.plot(mean["t_s"], mean["accuracy"], color=palette[point], lw=1.2, label=label)
    chance = ok["chance_accuracy"].astype(float).median() if "chance_accuracy" in ok else None
    if chance is not None and np.isfinite(chance):
        ax.axhline(chance, color="grey", ls="--", lw=1, label="chance")
    ax.axhline(target, color="black", ls=":", lw=1, label=f"target {target:g}")
    ax.set_xlabel("simulated time [s]")
    ax.set_ylabel("test accuracy [-]")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    seeds = ok.groupby("point").size()
    what = "mean over seeds per point, band: " + spread_note(
        {("ci" if n >= 3 else "range" if n == 2 else "single") for n in seeds}) if seeds.max() > 1 else "one run per point"
    ax.set_title(f"Test accuracy of the global model\n({what})", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False,
              ncol=2 if len(point_ids) > MAX_LEGEND_POINTS else 1)
    fig.tight_layout()
    return fw.save(fig, "accuracy_vs_time")


def fig_to_accuracy(param: str, params: list[str], runs: pd.DataFrame, target: float, random: bool,
                    fw: FigureWriter, stem: str, partners: tuple[str, ...] = ()) -> tuple[bytes, set]:
    """Time- and energy-to-accuracy against one swept field (and the fields zipped with it),
    mean over seeds with error bars (:func:`analysis.figures.spread_errorbar`); one line per
    combination of the other fields if they are few. A categorical field (text, booleans) is
    drawn as categories: markers side by side, no lines between them."""
    pyplot = plt()
    ok = runs[runs["status"] == "ok"].copy()
    others = [p for p in params if p != param and p not in partners]
    combos = ok[others].astype(str).agg(" ".join, axis=1) if others else pd.Series("", index=ok.index)
    n_combos = combos.nunique()
    grouped = bool(others) and not random and 1 < n_combos <= MAX_GROUP_LINES
    numeric, order, xpos = _param_axis(list(pd.unique(ok[param])))
    fig, axes = pyplot.subplots(1, 2, figsize=(10, 4.6 if grouped else 4))

    def order_key(key):
        first = ok[combos == key].iloc[0]
        return tuple((0, float(first[p]), "") if is_numeric([first[p]]) else (1, 0.0, category_text(first[p]))
                     for p in others)

    groups = ([(key, ok[combos == key]) for key in sorted(combos.unique(), key=order_key)] if grouped
              else [("", ok)])
    palette = colors(max(len(groups), 1))
    width = 0.6 / max(len(groups), 1)
    kinds: set = set()
    for gi, (key, sub) in enumerate(groups):
        label = None
        if grouped:
            first = sub.iloc[0]
            label = point_label({p: first[p] for p in others}, others)
        dodge = 0.0 if numeric else (gi - (len(groups) - 1) / 2) * width
        for ax, metric in zip(axes, ["time_to_target_s", "energy_to_target_j"]):
            xs, values = _values_along(sub, param, order, xpos, numeric, dodge, metric)
            drawn = spread_errorbar(ax, xs, values, metric, palette[gi], label, connect=numeric and not random)
            kinds |= {d["kind"] for d in drawn}
    for ax in axes:
        if not ax.has_data():
            ax.text(0.5, 0.5, f"no run reached accuracy {target:g}", ha="center", va="center",
                    transform=ax.transAxes, color="#555555")
    pretty = {"time_to_target_s": f"simulated time to accuracy {target:g} [s]",
              "energy_to_target_j": f"device energy to accuracy {target:g} [J]"}
    for ax, metric in zip(axes, ["time_to_target_s", "energy_to_target_j"]):
        _style_param_axis(ax, param, numeric, order, random, partners)
        ax.set_ylabel(pretty[metric])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    bottom = 0.0
    if grouped:
        handles, labels = axes[0].get_legend_handles_labels() or axes[1].get_legend_handles_labels()
        if not labels:
            handles, labels = axes[1].get_legend_handles_labels()
        ncol = min(len(labels), 3)
        fig.legend(handles, labels, loc="lower center", ncol=max(ncol, 1), fontsize=7, frameon=False,
                   title="other swept fields", title_fontsize=7)
        bottom = 0.03 + 0.045 * math.ceil(len(labels) / max(ncol, 1))
    spread = "seeds" if (grouped or not others) else "seeds and the other swept fields"
    _suptitle(fig, f"{short_label(param)}: mean over {spread}; bars: {spread_note(kinds)} "
                 "(hollow: not every run reached the target)", fontsize=8)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return fw.save(fig, stem), kinds


def fig_dynamics(param: str, runs: pd.DataFrame, metrics: Sequence[str], random: bool, fw: FigureWriter,
                 stem: str, partners: tuple[str, ...] = ()) -> tuple[bytes, set]:
    """The faults, staleness and handover counts (:func:`dynamics_metrics`) against one swept
    field, one panel per metric: mean over the runs at each value (seeds and the other swept
    fields) with error bars (:func:`analysis.figures.spread_errorbar`)."""
    pyplot = plt()
    ok = runs[runs["status"] == "ok"].copy()
    for m in metrics:
        ok[m] = pd.to_numeric(ok[m], errors="coerce")
    numeric, order, xpos = _param_axis(list(pd.unique(ok[param])))
    fig, axes = pyplot.subplots(1, len(metrics), figsize=(3.6 * len(metrics) + 0.6, 3.6), squeeze=False)
    kinds: set = set()
    for ax, metric in zip(axes[0], metrics):
        xs, values = _values_along(ok, param, order, xpos, numeric, 0.0, metric)
        kinds |= {d["kind"] for d in spread_errorbar(ax, xs, values, metric, colors(1)[0], None,
                                                     connect=numeric and not random)}
        _style_param_axis(ax, param, numeric, order, random, partners)
        ax.set_ylabel(field_label(metric))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    _suptitle(fig, f"{short_label(param)}: mean over runs; bars: {spread_note(kinds)}", fontsize=8)
    fig.tight_layout()
    return fw.save(fig, stem), kinds


AIRCOMP_METRICS = ["aircomp.mean_receive_snr_db", "aircomp.mean_nmse", "aircomp.mean_truncation_ratio",
                   "aircomp.mean_mse", "aircomp.mean_mse_theory"]
AIRCOMP_LABELLED = ("aircomp.truncation_threshold",)   # written next to each marker, not a line each
AIRCOMP_X = ("aircomp.receive_snr_db",)                 # what moves along a line


def has_aircomp(runs: pd.DataFrame) -> bool:
    """True if some finished run aggregated over the air (``summary.json`` has ``aircomp``)."""
    col = "aircomp.mean_receive_snr_db"
    return col in runs and bool(runs.loc[runs["status"] == "ok", col].notna().any())


def aircomp_points(runs: pd.DataFrame, params: list[str]) -> pd.DataFrame:
    """Per point: the swept fields, the mean over seeds of the over-the-air statistics and the
    final accuracy with its spread (95 % CI clipped to [0, 1] with 3 or more seeds)."""
    ok = runs[(runs["status"] == "ok") & runs["aircomp.mean_receive_snr_db"].notna()]
    rows = []
    for point, group in ok.groupby("point", sort=True):
        row: dict[str, Any] = {"point": int(point), **{p: group.iloc[0][p] for p in params}, "runs_ok": len(group)}
        for m in AIRCOMP_METRICS:
            if m in group:
                row[m] = float(group[m].astype(float).mean())
        _spread_columns(row, "final_accuracy", group["final_accuracy"].astype(float).tolist(), "final_accuracy")
        rows.append(row)
    return pd.DataFrame(rows)


def fig_aircomp(table: pd.DataFrame, params: list[str], fw: FigureWriter) -> bytes:
    """Final accuracy and aggregation NMSE against the measured receive SNR, one line per
    combination of the swept fields other than the SNR and the truncation threshold (the
    threshold is written next to each marker)."""
    pyplot = plt()
    snr = "aircomp.mean_receive_snr_db"
    line_fields = [p for p in params if p not in AIRCOMP_X + AIRCOMP_LABELLED]
    labelled = [p for p in params if p in AIRCOMP_LABELLED]
    keys = table[line_fields].astype(str).agg(" ".join, axis=1) if line_fields else pd.Series("", index=table.index)
    fig, axes = pyplot.subplots(1, 2, figsize=(10, 4))
    palette = colors(max(keys.nunique(), 1))
    kinds = set()
    for gi, key in enumerate(pd.unique(keys)):
        sub = table[keys == key].sort_values(snr)
        first = sub.iloc[0]
        label = point_label({p: first[p] for p in line_fields}, line_fields) if line_fields else None
        x = sub[snr].to_numpy(dtype=float)
        acc = sub["final_accuracy_mean"].to_numpy(dtype=float)
        ci = sub["final_accuracy_ci_low"].notna().to_numpy()
        low = np.where(ci, sub["final_accuracy_ci_low"], sub["final_accuracy_min"]).astype(float)
        high = np.where(ci, sub["final_accuracy_ci_high"], sub["final_accuracy_max"]).astype(float)
        kinds |= {"ci" if c else ("range" if n == 2 else "single") for c, n in zip(ci, sub["runs_ok"])}
        err = [np.nan_to_num(np.maximum(acc - low, 0)), np.nan_to_num(np.maximum(high - acc, 0))]
        color = palette[gi]
        axes[0].errorbar(x, acc, yerr=err, color=color, marker="o", capsize=3, lw=1.2, label=label)
        axes[1].plot(x, sub["aircomp.mean_nmse"].to_numpy(dtype=float), color=color, marker="o", label=label)
        for _, row in sub.iterrows():
            if labelled and np.isfinite(row[snr]):
                text = ", ".join(f"{row[p]:g}" for p in labelled)
                axes[0].annotate(text, (row[snr], row["final_accuracy_mean"]), fontsize=6,
                                 xytext=(3, 3), textcoords="offset points", color=color)
    axes[0].set_ylabel("final test accuracy [-]")
    axes[0].set_ylim(0.0, 1.02)
    axes[1].set_ylabel("aggregation NMSE, mean over rounds [-]")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("receive SNR rho0 / sigma^2, mean over rounds [dB]")
        ax.grid(alpha=0.3)
    if line_fields:
        axes[1].legend(fontsize=7, loc="best")
    marks = f"; numbers at the markers: {', '.join(short_label(p) for p in labelled)}" if labelled else ""
    _suptitle(fig, f"Over-the-air aggregation: mean over seeds (error bars: {spread_note(kinds)}{marks})", fontsize=9)
    fig.tight_layout()
    return fw.save(fig, "aircomp")


def fig_latency_points(points: pd.DataFrame, breakdown: pd.DataFrame, fw: FigureWriter) -> bytes:
    pyplot = plt()
    mean = breakdown.groupby("point")[list(LATENCY_PARTS)].mean().reindex(points["point"]).fillna(0.0)
    width = max(8.0, 0.45 * len(points) + 3)
    fig, ax = pyplot.subplots(figsize=(min(width, 24), 4.5))
    x = np.arange(len(points))
    bottom = np.zeros(len(points))
    for part in LATENCY_PARTS:
        ax.bar(x, mean[part].to_numpy(), bottom=bottom, color=PART_COLORS[part], label=PART_LABELS[part])
        bottom += mean[part].to_numpy()
    ax.set_xticks(x, [f"P{p}" for p in points["point"]], rotation=60 if len(points) > 12 else 0)
    ax.set_xlabel("point (see the points table)")
    ax.set_ylabel("mean round latency [s]")
    ax.set_title("Round latency as the average participating device spends it\n(mean over rounds and seeds)",
                 fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    return fw.save(fig, "latency_breakdown")


def fig_latency_rounds(points: pd.DataFrame, runs: pd.DataFrame, breakdown: pd.DataFrame, fw: FigureWriter) -> bytes:
    pyplot = plt()
    from matplotlib.ticker import MaxNLocator

    shown = []
    for _, p in points.iterrows():
        ok = runs[(runs["point"] == p["point"]) & (runs["status"] == "ok")].sort_values("seed")
        if len(ok):
            shown.append((p, ok.iloc[0]))
        if len(shown) == MAX_ROUND_PANELS:
            break
    cols = min(3, len(shown))
    rows = math.ceil(len(shown) / cols)
    height = 3.0 * rows + 0.35
    fig, axes = pyplot.subplots(rows, cols, figsize=(4.2 * cols, height), squeeze=False, sharey=True)
    for ax, (p, run) in zip(axes.flat, shown):
        b = breakdown[breakdown["run_id"] == run["run_id"]]
        bottom = np.zeros(len(b))
        for part in LATENCY_PARTS:
            ax.bar(b["round"], b[part].to_numpy(), bottom=bottom, color=PART_COLORS[part], label=PART_LABELS[part],
                   width=0.85)
            bottom += b[part].to_numpy()
        ax.set_title(f"{p['label']} (seed {run['seed']})"[:70], fontsize=7)
        ax.set_xlabel("round [-]")
        ax.set_ylabel("round latency [s]")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(shown):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.3 / height, 1, 1))
    return fw.save(fig, "latency_per_round")


def fig_pareto(front: pd.DataFrame, fw: FigureWriter) -> bytes:
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 3, figsize=(13, 4))
    on = front["on_front"].to_numpy()
    acc, delay, energy = (front[c].to_numpy(dtype=float) for c in
                          ["final_accuracy_mean", "sim_time_s_mean", "total_device_energy_j_mean"])
    pairs = [(delay, acc, "simulated run time (delay) [s]", "final test accuracy [-]"),
             (energy, acc, "total device energy [J]", "final test accuracy [-]")]
    for ax, (x, y, xl, yl) in zip(axes[:2], pairs):
        ax.scatter(x[~on], y[~on], color="#bbbbbb", s=20, label="dominated")
        ax.scatter(x[on], y[on], color="#d62728", s=36, edgecolors="black", zorder=3, label="Pareto front")
        for k, (xi, yi, p) in enumerate(zip(x[on], y[on], front["point"][on])):
            ax.annotate(f"P{p}", (xi, yi), fontsize=7, xytext=(4, 4 - 9 * (k % 3)), textcoords="offset points")
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    sc = axes[2].scatter(delay, energy, c=acc, cmap="viridis", s=[46 if o else 20 for o in on],
                         edgecolors=["black" if o else "none" for o in on])
    for k, (xi, yi, p) in enumerate(zip(delay[on], energy[on], front["point"][on])):
        axes[2].annotate(f"P{p}", (xi, yi), fontsize=7, xytext=(4, 4 - 9 * (k % 3)), textcoords="offset points")
    fig.colorbar(sc, ax=axes[2], label="final test accuracy [-]")
    axes[2].set_xlabel("simulated run time (delay) [s]")
    axes[2].set_ylabel("total device energy [J]")
    axes[2].grid(alpha=0.3)
    _suptitle(fig, "Accuracy vs. delay vs. energy, mean over seeds per point; outlined/red: not dominated in all three",
                 fontsize=9)
    fig.tight_layout()
    return fw.save(fig, "pareto")


# ------------------------------------------------------------------- multi-variant experiments
def variant_tables(data: ReportData, target: Optional[float]) -> tuple[pd.DataFrame, dict, float, str]:
    """(one row per finished run and variant, (run_id, variant) -> accuracy curve, target,
    where the target comes from). The target is chosen by
    :func:`analysis.metrics.choose_target` over every variant's best accuracy."""
    rows, curves, events_of = [], {}, {}
    ok = data.runs[data.runs["status"] == "ok"]
    for _, run in ok.iterrows():
        run_id = run["run_id"]
        where = repr(str(data.root / RUNS_DIR / run_id / "summary.json")) if data.kind == "sweep" else \
            repr(str(data.root / "summary.json"))
        summary = data.summaries[run_id]
        per = variant_curves(summary, data.events[run_id])
        for v in variant_rows(summary, where):
            row = {"run_id": run_id, "point": int(run["point"]), "seed": run["seed"],
                   **{p: run[p] for p in data.params}, **v}
            rows.append(row)
            if v["variant"] in per:
                curves[(run_id, v["variant"])], events_of[(run_id, v["variant"])] = per[v["variant"]]
    table = pd.DataFrame(rows)
    bests = [float(c["accuracy"].max()) for c in curves.values() if len(c)]
    if not bests:
        chosen, source = (float(target), "given with --target") if target is not None else (math.nan, "")
    else:
        chosen, source = _choose_target(bests, _stop_targets(data), target)
    extra = []
    for _, row in table.iterrows():
        key = (row["run_id"], row["variant"])
        if key in curves and np.isfinite(chosen):
            extra.append(variant_target_metrics(curves[key], events_of[key], chosen))
        else:
            extra.append({"time_to_target_s": math.nan, "energy_to_target_j": math.nan, "target_reached": False})
    if len(table):
        table = pd.concat([table, pd.DataFrame(extra, index=table.index)], axis=1)
    return table, curves, chosen, source


def load_variants(folder: str | Path, target: Optional[float] = None) -> pd.DataFrame:
    """One row per finished run and variant of a run or sweep folder of a multi-variant
    experiment (``lola_compare``, ``aircomp_vs_ofdma``, ``neural_aircomp``): the swept fields, the
    variant's metrics (:mod:`analysis.variants`) and time-/energy-to-accuracy at the target the
    report uses (column ``target_accuracy_used``)."""
    data = load_report_data(folder)
    if data.experiment == "fedavg":
        raise ReportError(f"{str(data.root)!r}: FedAvg runs have one variant; use analysis.load_sweep")
    table, _, chosen, _ = variant_tables(data, target)
    return table.assign(target_accuracy_used=chosen)


def _variant_order(table: pd.DataFrame) -> list[str]:
    return list(pd.unique(table["variant"]))


def variant_points(table: pd.DataFrame, view: ExperimentView, params: list[str]) -> pd.DataFrame:
    """Per point and variant: the swept fields, the variant's series/axis and, per metric, the
    mean, min, max, n and (3 or more seeds) the clipped 95 % CI over seeds."""
    rows = []
    order = {v: i for i, v in enumerate(_variant_order(table))}
    for (point, variant), group in table.groupby(["point", "variant"], sort=False):
        first = group.iloc[0]
        row: dict[str, Any] = {"point": int(point), **{p: first[p] for p in params}, "variant": variant}
        for c in (view.series, view.axis):
            if c and c in group and c != "variant":
                row[c] = first[c]
        row["runs_ok"] = int(len(group))
        for m in view.metrics:
            if m in group:
                _spread_columns(row, m, group[m].astype(float).tolist(), m)
        rows.append(row)
    out = pd.DataFrame(rows)
    if len(out):
        out = out.sort_values(["point", "variant"], key=lambda s: s.map(order) if s.name == "variant" else s,
                              kind="stable").reset_index(drop=True)
    return out


def _drawn_metrics(table: pd.DataFrame, view: ExperimentView) -> list[str]:
    return [m for m in view.metrics if m in table and table[m].astype(float).notna().any()]


def _metric_axes(n: int, width: float = 4.4, height: float = 3.4):
    pyplot = plt()
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = pyplot.subplots(rows, cols, figsize=(width * cols, height * rows + 0.5), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)[:n]


def _style_metric(ax, metric: str, target: float) -> None:
    label = field_label(metric)
    if metric in ("time_to_target_s", "energy_to_target_j") and np.isfinite(target):
        label = label.replace("the target accuracy", f"accuracy {target:g}")
    ax.set_ylabel(label, fontsize=8)
    low, high = metric_bounds(metric)
    if metric.endswith("nmse"):
        positive = [v for line in ax.get_lines() for v in np.asarray(line.get_ydata(), dtype=float)
                    if np.isfinite(v) and v > 0]
        if positive and max(positive) / min(positive) > 30:
            ax.set_yscale("log")
        elif low is not None:
            ax.set_ylim(bottom=low)
    elif low is not None:
        ax.set_ylim(bottom=low)
    if high is not None and high == 1.0:
        ax.set_ylim(0.0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_axisbelow(True)


def _point_text(sub: pd.DataFrame, point, varied: list[str]) -> str:
    """``P3 (rank=8, method=lora)``: a point and the values of the fields that vary in the sweep."""
    return f"P{point}" + (f" ({point_label(sub.iloc[0].to_dict(), varied)})" if varied and len(sub) else "")


def fig_variants(table: pd.DataFrame, view: ExperimentView, params: list[str], target: float,
                 fw: FigureWriter) -> tuple[bytes, set, bool]:
    """Each metric per variant, mean over seeds with error bars. With an inner axis
    (``aircomp_vs_ofdma``: K) a line per series along it; otherwise the variants are categories
    (bars). Up to :data:`MAX_DODGED_POINTS` points side by side; more are pooled. Returns the
    PNG, the error-bar kinds drawn and whether points were pooled."""
    metrics = _drawn_metrics(table, view)
    fig, axes = _metric_axes(len(metrics))
    point_ids = sorted(pd.unique(table["point"]))
    pooled = len(point_ids) > MAX_DODGED_POINTS
    groups = [(None, table)] if pooled or len(point_ids) == 1 else [(p, table[table["point"] == p])
                                                                    for p in point_ids]
    kinds: set = set()
    variants = _variant_order(table)
    varied = [p for p in params if table[p].astype(str).nunique() > 1]
    for ax, metric in zip(axes, metrics):
        if view.axis:
            series = list(pd.unique(table[view.series]))
            palette = colors(len(series) * len(groups))
            for gi, (point, sub) in enumerate(groups):
                for si, name in enumerate(series):
                    s = sub[sub[view.series] == name]
                    xs = sorted(pd.unique(s[view.axis].astype(float)))
                    vals = [s.loc[s[view.axis].astype(float) == x, metric].astype(float).tolist() for x in xs]
                    label = name if point is None else f"{_point_text(sub, point, varied)}: {name}"
                    drawn = spread_errorbar(ax, xs, vals, metric, palette[gi * len(series) + si], label,
                                            ls="--" if si else "-")
                    kinds |= {d["kind"] for d in drawn}
            ax.set_xlabel(field_label(view.axis if view.axis != "device_count" else "training.devices_per_round")
                          .replace("devices per round", "devices per round K"), fontsize=8)
            ks = sorted(pd.unique(table[view.axis].astype(float)))
            if len(ks) > 1 and ks[0] > 0 and ks[-1] / ks[0] >= 20:
                ax.set_xscale("log")
            if len(ks) <= 8:
                ax.set_xticks(ks, [f"{k:g}" for k in ks])
                ax.minorticks_off()
        else:
            palette = colors(len(groups))
            width = 0.8 / len(groups)
            for gi, (point, sub) in enumerate(groups):
                xs, means, lo, hi = [], [], [], []
                for vi, v in enumerate(variants):
                    s = seed_spread(sub.loc[sub["variant"] == v, metric].astype(float).tolist(),
                                    bounds=metric_bounds(metric))
                    if s["n"] == 0:
                        continue
                    kinds.add(s["kind"])
                    xs.append(vi + (gi - (len(groups) - 1) / 2) * width)
                    means.append(s["mean"])
                    lo.append(max(s["mean"] - s["low"], 0) if np.isfinite(s["low"]) else 0.0)
                    hi.append(max(s["high"] - s["mean"], 0) if np.isfinite(s["high"]) else 0.0)
                if xs:
                    bars = ax.bar(xs, means, width=width * 0.92, color=palette[gi],
                                  yerr=[lo, hi] if any(lo) or any(hi) else None, capsize=2,
                                  label=None if point is None else _point_text(sub, point, varied),
                                  error_kw={"lw": 0.8})
                    if len(groups) == 1:
                        ax.bar_label(bars, fmt="%.3g", fontsize=6, padding=2)
            missing = [vi for vi, v in enumerate(variants) if table.loc[table["variant"] == v, metric].isna().all()]
            for vi in missing:
                ax.text(vi, 0, "n/a", ha="center", va="bottom", fontsize=7, color="#777777")
            ax.set_xticks(range(len(variants)), [v[:18] for v in variants], rotation=35, ha="right", fontsize=7)
            ax.margins(y=0.12)
            ax.set_xlim(-0.6, len(variants) - 0.4)
        _style_metric(ax, metric, target)
    bottom = 0.0
    if axes and (view.axis or len(groups) > 1):
        handles, labels = axes[0].get_legend_handles_labels()
        ncol = max(min(len(labels), 3), 1)
        fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
        bottom = (0.25 + 0.18 * math.ceil(len(labels) / ncol)) / fig.get_size_inches()[1]
    what = "pooled over all points and seeds" if pooled else ("per point, " if len(groups) > 1 else "") + "mean over seeds"
    _suptitle(fig, f"Each {view.variant_name}: {what}; error bars: {spread_note(kinds)}", fontsize=9)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return fw.save(fig, "variants"), kinds, pooled


def fig_variants_vs_field(table: pd.DataFrame, view: ExperimentView, param: str, params: list[str], target: float,
                          random: bool, fw: FigureWriter, stem: str, partners: tuple[str, ...] = ()
                          ) -> tuple[bytes, set]:
    """Each metric against one swept field (and the fields zipped with it), a line per variant
    and, if they are few (at most :data:`MAX_GROUP_LINES`), per combination of the other swept
    fields (else mean over seeds and the other fields); a categorical field is drawn as
    categories (markers side by side)."""
    metrics = _drawn_metrics(table, view)
    fig, axes = _metric_axes(len(metrics))
    numeric, order, xpos = _param_axis(list(pd.unique(table[param])))
    variants = _variant_order(table)[:MAX_VARIANT_LINES]
    others = [p for p in params if p != param and p not in partners and table[p].astype(str).nunique() > 1]
    combos = table[others].astype(str).agg(" ".join, axis=1) if others else pd.Series("", index=table.index)
    grouped = bool(others) and not random and 1 < combos.nunique() <= MAX_GROUP_LINES
    keys = list(pd.unique(combos)) if grouped else [None]
    lines = [(v, k) for v in variants for k in keys][:MAX_VARIANT_LINES]
    palette = colors(len(lines))
    width = 0.7 / max(len(lines), 1)
    kinds: set = set()
    for ax, metric in zip(axes, metrics):
        for li, (v, key) in enumerate(lines):
            sub = table[(table["variant"] == v) & ((combos == key) if key is not None else True)]
            if sub.empty:
                continue
            label = v if key is None else (f"{v}: " if len(variants) > 1 else "") + point_label(
                sub.iloc[0].to_dict(), others)
            dodge = 0.0 if numeric else (li - (len(lines) - 1) / 2) * width
            xs, vals = _values_along(sub, param, order, xpos, numeric, dodge, metric)
            drawn = spread_errorbar(ax, xs, vals, metric, palette[li], label, connect=numeric and not random)
            kinds |= {d["kind"] for d in drawn}
        _style_param_axis(ax, param, numeric, order, random, partners)
        _style_metric(ax, metric, target)
    handles, labels = axes[0].get_legend_handles_labels() if axes else ([], [])
    ncol = max(min(len(labels), 6 if not grouped else 3), 1)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    spread = "seeds" + (" and the other swept fields" if others and not grouped else "")
    more = f" (first {MAX_VARIANT_LINES} variants)" if len(_variant_order(table)) > MAX_VARIANT_LINES else ""
    _suptitle(fig, f"{short_label(param)}: mean over {spread}{more}; error bars: {spread_note(kinds)}", fontsize=9)
    fig.tight_layout(rect=(0, (0.25 + 0.18 * math.ceil(len(labels) / ncol)) / fig.get_size_inches()[1], 1, 1))
    return fw.save(fig, stem), kinds


def fig_variant_accuracy(table: pd.DataFrame, curves: dict, view: ExperimentView, params: list[str], target: float,
                         chance: Optional[float], fw: FigureWriter) -> bytes:
    """Accuracy vs. simulated time, a panel per point (first :data:`MAX_ROUND_PANELS`), a line per
    variant: the mean over seeds with a band (2 or more seeds), each seed faint."""
    pyplot = plt()
    point_ids = [p for p in sorted(pd.unique(table["point"]))
                 if any((r, v) in curves for r, v in zip(table.loc[table["point"] == p, "run_id"],
                                                         table.loc[table["point"] == p, "variant"]))]
    shown = point_ids[:MAX_ROUND_PANELS]
    cols = min(2, len(shown)) if len(shown) > 1 else 1
    rows = math.ceil(len(shown) / cols)
    size = (8.0, 4.6) if len(shown) == 1 else (6.0 * cols, 3.6 * rows + 0.6)
    fig, axes = pyplot.subplots(rows, cols, figsize=size, squeeze=False)
    variants = [v for v in _variant_order(table) if any(k[1] == v for k in curves)]
    palette = dict(zip(variants, colors(len(variants))))
    varied = [p for p in params if p in table and table[p].astype(str).nunique() > 1]
    for ax, point in zip(axes.flat, shown):
        sub = table[table["point"] == point]
        for v in variants:
            keys = [(r, v) for r in sub.loc[sub["variant"] == v, "run_id"] if (r, v) in curves]
            mean_band(ax, [curves[k] for k in keys], palette[v], v)
        if chance is not None and np.isfinite(chance):
            ax.axhline(chance, color="grey", ls="--", lw=1)
        if np.isfinite(target):
            ax.axhline(target, color="black", ls=":", lw=1)
        ax.set_xlabel("simulated time [s]")
        ax.set_ylabel("test accuracy [-]")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        if len(shown) > 1:
            ax.set_title(_point_text(sub, point, varied), fontsize=8)
    for ax in list(axes.flat)[len(shown):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    lines = (["dashed: chance"] if chance is not None and np.isfinite(chance) else []) + (
        [f"dotted: target {target:g}"] if np.isfinite(target) else [])
    extra = f" ({', '.join(lines)})" if lines else ""
    seeds = table.groupby(["point", "variant"]).size()
    band = ("; band: " + spread_note({("ci" if n >= 3 else "range" if n == 2 else "single") for n in seeds})
            if seeds.max() > 1 else "")
    what = "mean over seeds" if seeds.max() > 1 else "one run"
    _suptitle(fig, f"Test accuracy per {view.variant_name}: {what}{band}{extra}", fontsize=9)
    if len(shown) == 1:
        axes.flat[0].legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        fig.tight_layout()
    else:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fw.save(fig, "variant_accuracy_vs_time")


# ------------------------------------------------------------------------------ HTML
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;
color:#222;padding:0 16px;line-height:1.4}
h1{font-size:1.6em;margin-bottom:4px}h2{margin-top:36px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#555}.note{color:#555;font-size:.9em;max-width:900px}
table{border-collapse:collapse;font-size:12px;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:right;white-space:nowrap}
th{background:#f3f3f3;position:sticky;top:0;cursor:pointer;user-select:none}
th.sorted-asc::after{content:" \\25B2"}th.sorted-desc::after{content:" \\25BC"}
td.text{text-align:left}tr.failed td{background:#fdecea}tr.front td{background:#eaf6ea}
.scroll{max-height:520px;overflow:auto;border:1px solid #eee}
figure{margin:12px 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.9em}
code{background:#f3f3f3;padding:1px 4px;border-radius:3px}
"""

SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  var heads = table.querySelectorAll('th');
  heads.forEach(function (th, col) {
    th.addEventListener('click', function () {
      var asc = !th.classList.contains('sorted-asc');
      heads.forEach(function (h) { h.classList.remove('sorted-asc', 'sorted-desc'); });
      th.classList.add(asc ? 'sorted-asc' : 'sorted-desc');
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col].getAttribute('data-v'), y = b.cells[col].getAttribute('data-v');
        var nx = parseFloat(x), ny = parseFloat(y);
        var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : String(x).localeCompare(String(y));
        return asc ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def _fmt(v) -> tuple[str, str, bool]:
    """(shown text, sort key, is text)."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–", "", False
    if isinstance(v, (bool, np.bool_)):
        return ("yes" if v else "no"), str(int(v)), True
    if isinstance(v, (int, np.integer)):
        return str(int(v)), str(int(v)), False
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.4g}", repr(float(v)), False
    text = str(v)
    return text, text, True


def html_table(frame: pd.DataFrame, row_class=None, max_text: int = 160) -> str:
    cols = list(frame.columns)
    out = ['<div class="scroll"><table class="sortable"><thead><tr>']
    out += [f"<th>{html.escape(str(c))}</th>" for c in cols]
    out.append("</tr></thead><tbody>")
    for i, (_, row) in enumerate(frame.iterrows()):
        cls = row_class(row) if row_class else ""
        out.append(f'<tr class="{cls}">' if cls else "<tr>")
        for c in cols:
            shown, key, is_text = _fmt(row[c])
            title = ""
            if len(shown) > max_text:
                title = f' title="{html.escape(shown)}"'
                shown = shown[:max_text - 1] + "…"
            out.append(f'<td data-v="{html.escape(key)}"{title}{" class=text" if is_text else ""}>'
                       f"{html.escape(shown)}</td>")
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _figure(png: bytes, alt: str, caption: str, name: str) -> str:
    data = base64.b64encode(png).decode()
    return (f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)} (<code>{html.escape(name)}</code>)</figcaption></figure>")


def _write_table(frame: pd.DataFrame, out: Path, name: str) -> None:
    """``out/<name>.csv`` and ``.parquet`` (lists and mappings as JSON text; mixed columns as text)."""
    import json

    flat = frame.copy()
    for c in flat.columns:
        if flat[c].dtype == object:
            flat[c] = flat[c].map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v)
            if flat[c].map(type).nunique() > 1:  # mixed types: store as text
                flat[c] = flat[c].map(lambda v: None if v is None else str(v))
    write_bytes_atomic(out / f"{name}.csv", flat.to_csv(index=False).encode("utf-8"))
    buf = io.BytesIO()
    flat.to_parquet(buf, index=False)
    write_bytes_atomic(out / f"{name}.parquet", buf.getvalue())


def _names(stem: str, fw: FigureWriter) -> str:
    return ", ".join(f"{stem}.{f}" for f in fw.formats)


def _spread_table(frame: pd.DataFrame, keys: list[str], metrics: list[str]) -> pd.DataFrame:
    """The HTML view of a points table: the key columns, then per metric its mean and its spread
    over seeds as text (a CI only with 3 or more seeds); with one seed everywhere, the values."""
    cols = {k: frame[k] for k in keys if k in frame}
    single = all(frame[f"{m}_n"].max() <= 1 for m in metrics if f"{m}_n" in frame and len(frame))
    for m in metrics:
        if f"{m}_mean" in frame:
            if single:
                cols[m] = frame[f"{m}_mean"]
                continue
            cols[f"{m} (mean)"] = frame[f"{m}_mean"]
            cols[f"{m} over seeds"] = frame[f"{m}_spread"]
    return pd.DataFrame(cols)


def _header(data: ReportData, runs: pd.DataFrame, n_points: int, ok_count: int) -> str:
    esc = html.escape
    seeds = sorted({int(s) for s in runs["seed"].dropna() if isinstance(s, (int, np.integer, float, np.floating))
                    and not isinstance(s, (bool, np.bool_)) and float(s).is_integer()})
    failed = int((runs["status"] == "failed").sum())
    pending = int((runs["status"] == "pending").sum())
    what = "" if data.experiment == "fedavg" else f" of experiment <code>{esc(data.experiment)}</code>"
    out = (f"<h1>{esc(data.title)}</h1><p class=meta>{esc(data.kind)} folder{what} <code>{esc(str(data.root))}</code>: "
           f"{len(runs)} run(s), {n_points} point(s) x seeds {esc(str(seeds))}; {ok_count} ok, "
           f"{failed} failed, {pending} not run yet.</p>")
    if data.description:
        out += f"<p>{esc(data.description)}</p>"
    if data.params:
        out += "<p>Swept fields: " + ", ".join(f"<code>{esc(p)}</code> ({esc(short_label(p))})"
                                               for p in data.params) + ".</p>"
    per_point = runs[runs["status"] == "ok"].groupby("point").size()
    if data.kind == "run":
        out += "<p class=note>One run, one seed: the tables show its values, with no spread over seeds.</p>"
    elif len(per_point) and per_point.min() < 3:
        out += (f"<p class=note><b>Fewer than 3 seeds</b> at {int((per_point < 3).sum())} of {len(per_point)} "
                "point(s): no confidence interval is shown there, only the number of seeds and their range "
                "(2 seeds) or the value (1 seed).</p>")
    return out


def _runs_sections(data: ReportData, runs: pd.DataFrame, columns: list[str]) -> list[str]:
    table = runs[[c for c in columns if c in runs] + (["error_type", "error_message"] if "error_type" in runs else [])]
    out = ["<h2>Runs</h2>" + html_table(table, lambda r: "failed" if r["status"] == "failed" else "")]
    failed = runs[runs["status"] == "failed"]
    if len(failed):
        fcols = [c for c in ["run_id", "seed", *data.params, "error_type", "error_message"] if c in failed]
        out.append(f"<h2>Failed runs ({len(failed)})</h2><p class=note>Each failed run's folder holds "
                   "<code>error.json</code> with the traceback.</p>" + html_table(failed[fcols], max_text=400))
    return out


def _fedavg_sections(data: ReportData, out: Path, fw: FigureWriter, target: Optional[float], ok_count: int
                     ) -> list[str]:
    target, target_source = choose_target(data, target)
    runs, breakdown = _derive(data, target)
    dynamics = dynamics_metrics(runs)
    points = _points(runs, data.params, dynamics)
    front = _pareto(points)
    _write_table(runs, out, "runs")
    _write_table(points, out, "points")
    _write_table(breakdown, out, "round_breakdown")
    _write_table(front, out, "pareto")
    esc = html.escape
    sections = [_header(data, runs, len(points), ok_count)
                + f"<p class=note>Time- and energy-to-accuracy use the target accuracy <b>{target:g}</b> "
                  f"({esc(target_source)}). Energy is the sum over devices of compute, transmit and receive "
                  "energy; all times are simulated, never host time. Tables can be sorted by clicking a "
                  "column; the same tables are in the report folder as CSV and Parquet. "
                  f"{esc(SEED_NOTE)}</p>"]
    sections += _runs_sections(data, runs, ["run_id", "point", "seed", "status", *data.params, *RUN_METRICS,
                                            *dynamics])
    sections.append("<h2>Points (mean and spread over seeds)</h2>" + html_table(
        _spread_table(points, ["point", *data.params, "runs", "runs_ok", "target_reached"],
                      [*POINT_METRICS, *dynamics])))
    if dynamics:
        sections.append("<p class=note>" + esc(DYNAMICS_NOTE) + "</p>")
    png = fig_accuracy(data, runs, points, target, fw)
    sections.append("<h2>Accuracy vs. simulated time</h2>" + _figure(
        png, "test accuracy against simulated time",
        "Test accuracy of the global model after each round against simulated time: per point the mean over "
        "seeds of each round's time and accuracy (line) with a band over seeds (95% CI clipped to [0, 1] with "
        "3 or more seeds, else min-max); each seed's curve is drawn faint.", _names("accuracy_vs_time", fw)))
    param_figs = []
    followers = {p for g in data.zip_groups for p in g[1:]}  # drawn on the first field's figure
    for i, p in enumerate(data.params):
        if p in followers:
            continue
        partners = next((tuple(g[1:]) for g in data.zip_groups if g[0] == p), ())
        stem = f"to_accuracy_{i:02d}_{p.replace('.', '_')}"
        png, kinds = fig_to_accuracy(p, data.params, runs, target, p in data.random_params, fw, stem, partners)
        param_figs.append(_figure(png, f"time and energy to accuracy against {p}",
                                  f"Time and device energy to reach accuracy {target:g} against {_caption_label(runs, p)}: "
                                  f"mean over runs that reached it; error bars: {spread_note(kinds)}.",
                                  _names(stem, fw)))
    if param_figs:
        sections.append("<h2>Time and energy to accuracy against each swept field</h2>" + "".join(param_figs))
    dyn_figs = []
    for i, p in enumerate(data.params if dynamics and data.kind == "sweep" else []):
        if p in followers:
            continue
        partners = next((tuple(g[1:]) for g in data.zip_groups if g[0] == p), ())
        stem = f"dynamics_{i:02d}_{p.replace('.', '_')}"
        png, kinds = fig_dynamics(p, runs, dynamics, p in data.random_params, fw, stem, partners)
        dyn_figs.append(_figure(png, f"lost, late and stale updates and handovers against {p}",
                                f"{', '.join(dynamics)} per run against {_caption_label(runs, p)}: mean over "
                                f"runs; error bars: {spread_note(kinds)}.", _names(stem, fw)))
    if dyn_figs:
        sections.append("<h2>Faults, staleness and handovers against each swept field</h2>" + "".join(dyn_figs))
    png = fig_latency_points(points, breakdown, fw)
    latency = _figure(png, "mean round latency breakdown per point",
                      "Mean round latency per point, split as the average participating device spends it: "
                      "receiving the global adapter, computing, uploading, waiting for the slowest device, "
                      "and the edge's aggregation and evaluation.", _names("latency_breakdown", fw))
    png = fig_latency_rounds(points, runs, breakdown, fw)
    latency += _figure(png, "round latency breakdown per round",
                       "The same split round by round, for the first seed of each point"
                       + (f" (first {MAX_ROUND_PANELS} points)" if len(points) > MAX_ROUND_PANELS else "")
                       + ".", _names("latency_per_round", fw))
    sections.append("<h2>Latency breakdown</h2>" + latency)
    if has_aircomp(runs):
        table = aircomp_points(runs, data.params)
        _write_table(table, out, "aircomp_points")
        png = fig_aircomp(table, data.params, fw)
        sections.append("<h2>Over-the-air aggregation</h2>" + _figure(
            png, "accuracy and NMSE against receive SNR",
            "Final accuracy (left) and normalised MSE of the over-the-air aggregate (right) against the measured "
            "receive SNR of the slots, per point (mean over seeds); a swept truncation threshold is written next "
            "to its marker.", _names("aircomp", fw))
            + html_table(table.drop(columns=[c for c in table.columns if c.startswith("final_accuracy_")
                                             and not c.endswith(("_mean", "_spread"))]))
            + "<p class=note>Receive SNR = rho0 / sigma^2 of the AirComp slot; NMSE = mean squared "
            "error of the received aggregate over the mean square of the exact weighted sum; "
            "truncation ratio = share of (device, value) entries not sent (docs/aircomp.md).</p>")
    if len(points) >= 2:
        png = fig_pareto(front, fw)
        members = front[front["on_front"]]
        sections.append("<h2>Pareto front: accuracy vs. delay vs. energy</h2>" + _figure(
            png, "Pareto front of accuracy, delay and energy",
            "Each point's mean final accuracy (higher is better), simulated run time and total device energy "
            "(lower is better); a point is on the front if no other point is at least as good in all three and "
            "better in one.", _names("pareto", fw))
            + html_table(front, lambda r: "front" if r["on_front"] else "")
            + f"<p class=note>{len(members)} of {len(front)} points are on the front.</p>")
    return sections


def _experiment_sections(data: ReportData, out: Path, fw: FigureWriter, target: Optional[float], ok_count: int
                         ) -> list[str]:
    view = VIEWS[data.experiment]
    table, curves, chosen, source = variant_tables(data, target)
    vpoints = variant_points(table, view, data.params)
    runs = data.runs
    _write_table(runs, out, "runs")
    _write_table(table, out, "variants")
    _write_table(vpoints, out, "variant_points")
    esc = html.escape
    n_points = int(runs["point"].nunique())
    note = (f"Time- and energy-to-accuracy use the target accuracy <b>{chosen:g}</b> ({esc(source)}). "
            if np.isfinite(chosen) else "No run holds an accuracy curve, so there is no time-to-accuracy. ")
    sections = [_header(data, runs, n_points, ok_count)
                + f"<p class=note>Experiment <code>{esc(view.experiment)}</code> compares several variants "
                  f"({esc(view.variant_name)}) inside each run, on the same seed. {note}All times are simulated, "
                  f"never host time. {esc(SEED_NOTE)}</p>"]
    skipped = {s.get("accuracy_vs_time_skipped") for s in data.summaries.values()} - {None}
    if not curves:
        why = "; ".join(sorted(map(str, skipped))) if skipped else NO_CURVES.get(view.experiment, "none recorded")
        sections[0] += f"<p class=note>No accuracy curves: {esc(why)}.</p>"
    sections += _runs_sections(data, runs, ["run_id", "point", "seed", "status", *data.params, "run_dir"])
    keys = ["point", *data.params, "variant"] + [
        c for c in (view.series, view.axis) if c and c != "variant" and c in vpoints
        and not (vpoints[c].astype(str) == vpoints["variant"].astype(str)).all()] + ["runs_ok"]
    sections.append(f"<h2>Variants (mean and spread over seeds)</h2>"
                    + html_table(_spread_table(vpoints, keys, list(view.metrics))))
    png, kinds, pooled = fig_variants(table, view, data.params, chosen, fw)
    sections.append("<h2>Metrics per variant</h2>" + _figure(
        png, f"metrics per {view.variant_name}",
        f"Each metric per {view.variant_name}: mean over seeds"
        + (" and over all points" if pooled else "") + f"; error bars: {spread_note(kinds)}.",
        _names("variants", fw)))
    figs = []
    followers = {p for g in data.zip_groups for p in g[1:]}  # drawn on the first field's figure
    for i, p in enumerate(data.params):
        if runs[p].nunique() < 2 or p in followers:
            continue
        partners = next((tuple(g[1:]) for g in data.zip_groups if g[0] == p), ())
        stem = f"variants_vs_{i:02d}_{p.replace('.', '_')}"
        png, kinds = fig_variants_vs_field(table, view, p, data.params, chosen, p in data.random_params, fw, stem,
                                           partners)
        figs.append(_figure(png, f"metrics per variant against {p}",
                            f"Each metric against {_caption_label(runs, p)}, a line per variant and, when they are "
                            "few, per combination of the other swept fields; error bars: "
                            f"{spread_note(kinds)}.", _names(stem, fw)))
    if figs:
        sections.append("<h2>Metrics per variant against each swept field</h2>" + "".join(figs))
    if data.experiment == "d2d_prompt_transfer":
        sections += _d2d_sections(data, out, fw)
    if curves:
        chances = [float(s["chance_accuracy"]) for s in data.summaries.values()
                   if isinstance(s.get("chance_accuracy"), (int, float)) and not isinstance(s["chance_accuracy"], bool)]
        chance = float(np.median(chances)) if chances else math.nan
        png = fig_variant_accuracy(table, curves, view, data.params, chosen, chance if np.isfinite(chance) else None, fw)
        sections.append("<h2>Accuracy vs. simulated time per variant</h2>" + _figure(
            png, "test accuracy against simulated time per variant",
            f"Test accuracy against simulated time for each {view.variant_name} that has an accuracy curve: "
            "with several seeds the mean over seeds of each evaluation's time and accuracy and a band over seeds.",
            _names("variant_accuracy_vs_time", fw)))
    return sections


def _d2d_sections(data: ReportData, out: Path, fw: FigureWriter) -> list[str]:
    """D2D prompt transfer: per-target time-to-target CDFs and gain against similarity
    (:mod:`analysis.d2d`), with their tables ``d2d_targets`` and ``d2d_similarity``."""
    from . import d2d

    runs = data.runs

    def label(point: int) -> str:
        first = runs[runs["point"] == point].iloc[0]
        return f"P{point}: " + point_label({p: first[p] for p in data.params}, data.params) if data.params \
            else f"P{point}"

    sections = []
    targets = d2d.target_rows(data.summaries, runs, data.params)
    if len(targets):
        _write_table(targets, out, "d2d_targets")
        png = d2d.fig_time_to_target_cdf(targets, label, fw)
        sections.append("<h2>Time to target per target (CDF)</h2>" + _figure(
            png, "time-to-target CDF per variant",
            "Per point, the fraction of targets (all seeds pooled) at their target accuracy against simulated time "
            "since they got the new task, a line per variant; a line that stays below 1 has targets that never got "
            f"there. Up to {d2d.MAX_PANELS} points are drawn; the table d2d_targets holds every target.",
            _names("time_to_target_cdf", fw)))
    pairs = d2d.similarity_rows(data.summaries, runs, data.params)
    if len(pairs):
        _write_table(pairs, out, "d2d_similarity")
        png = d2d.fig_gain_vs_similarity(pairs, label, fw)
        sections.append("<h2>Gain against task similarity</h2>" + _figure(
            png, "gain at the start against the similarity of the task embeddings",
            "Per point, every (target, candidate source) pair of variant similarity: the candidate prompt's metric "
            "on the target's test set minus the initial prompt's, against the cosine similarity of their task "
            "embeddings; Spearman's rank correlation of the pooled pairs in each title.",
            _names("gain_vs_similarity", fw)))
    return sections


def build_report(folder: str | Path, report_dir: Optional[str | Path] = None, target: Optional[float] = None,
                 formats: Sequence[str] = ("png",)) -> Path:
    """Write the report of a sweep or run folder of any experiment; return the path of
    ``report.html``.

    ``report_dir``: where (default ``folder/report``); ``target``: the accuracy for time- and
    energy-to-accuracy (default :func:`analysis.metrics.choose_target`); ``formats``: figure
    formats written, any of ``png``, ``pdf``, ``svg`` (the HTML always embeds PNG). Raises
    :class:`ReportError` for a folder that is not a results folder, holds an unreadable or
    malformed file, has no finished run, or a report folder that cannot be written."""
    formats = check_formats([formats] if isinstance(formats, str) else formats)
    if target is not None and not (isinstance(target, (int, float)) and 0 < float(target) <= 1):
        raise ReportError(f"target accuracy {target!r}: must be in (0, 1]")
    data = load_report_data(folder)
    ok_count = int((data.runs["status"] == "ok").sum())
    if ok_count == 0:
        raise ReportError(f"{str(data.root)!r}: no finished run yet (run `deftsim sweep` first)")
    out = prepare_out_dir(Path(report_dir) if report_dir is not None else data.root / "report")
    fw = FigureWriter(out, formats)
    fw.remove_stale(STALE)
    for name in ("aircomp_points", "variants", "variant_points", "points", "round_breakdown", "pareto"):
        for ext in ("csv", "parquet"):
            (out / f"{name}.{ext}").unlink(missing_ok=True)
    if data.experiment == "fedavg":
        sections = _fedavg_sections(data, out, fw, target, ok_count)
    else:
        sections = _experiment_sections(data, out, fw, target, ok_count)
    esc = html.escape
    page = (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{esc(data.title)}: deftsim report</title>"
            f"<meta name=viewport content='width=device-width,initial-scale=1'><style>{CSS}</style></head><body>"
            + "".join(sections)
            + f"<p class=note>Written by <code>deftsim report</code>.</p><script>{SORT_JS}</script></body></html>")
    path = out / "report.html"
    write_bytes_atomic(path, page.encode("utf-8"))
    return path
