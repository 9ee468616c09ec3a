"""``deftsim report DIR``: a self-contained HTML report of a sweep (or of one run folder).

Writes into ``DIR/report/`` (or ``out_dir``):

=========================  ===========================================================
``report.html``            one file, figures embedded (opens offline, no external resource)
``accuracy_vs_time.png``   test accuracy of every run against simulated time
``to_accuracy_<field>.png``  time- and energy-to-accuracy against each swept field: mean
                           over seeds with a 95 % Student-t confidence interval
``latency_breakdown.png``  mean round latency per point, split into downlink / compute /
                           uplink / waiting / edge (see :func:`analysis.metrics.latency_breakdown`)
``latency_per_round.png``  the same split round by round (first seed of each point)
``pareto.png``             points on the accuracy / delay / energy Pareto front
``aircomp.png``            (runs with ``channel.uplink_access: aircomp``) final accuracy and
                           aggregation NMSE against the measured receive SNR
``runs.csv|parquet``       one row per run: swept fields, headline metrics, error if failed
``points.csv|parquet``     one row per point: mean and CI over seeds of each metric
``round_breakdown.csv|parquet``  one row per run and round: the latency split
``pareto.csv|parquet``     per-point objectives and whether the point is on the front
``aircomp_points.csv|parquet``  per point: receive SNR, NMSE, truncation ratio, accuracy
=========================  ===========================================================

Reads files only; never runs the simulator.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from .metrics import (LATENCY_PARTS, accuracy_curve, energy_to_accuracy_j, latency_breakdown, mean_ci, pareto_mask,
                      time_to_accuracy_s)
from .load import flatten_summary
from .sweep import RUNS_DIR, collect_runs, load_plan

MAX_LEGEND_POINTS = 12
MAX_ROUND_PANELS = 12
MAX_GROUP_LINES = 6
UNITS = [("_flops_per_s", "FLOP/s"), ("_hz", "Hz"), ("_db", "dB"), ("_dbm_per_hz", "dBm/Hz"), ("_bytes", "bytes"),
         ("_w", "W"), ("_m", "m"), ("_s", "s"), ("_j", "J")]
PART_COLORS = {"downlink_s": "#4c78a8", "compute_s": "#f58518", "uplink_s": "#54a24b", "waiting_s": "#bab0ac",
               "edge_s": "#b279a2"}
PART_LABELS = {"downlink_s": "downlink", "compute_s": "compute", "uplink_s": "uplink",
               "waiting_s": "waiting for stragglers", "edge_s": "edge aggregate + evaluate"}
RUN_METRICS = ["final_accuracy", "best_accuracy", "rounds_completed", "sim_time_s", "time_to_target_s",
               "energy_to_target_j", "total_device_energy_j", "mean_device_energy_j", "mean_round_latency_s",
               "compute_share", "communication_share", "stop_reason"]
POINT_METRICS = ["final_accuracy", "sim_time_s", "time_to_target_s", "energy_to_target_j",
                 "total_device_energy_j", "mean_round_latency_s"]


class ReportError(Exception):
    """The folder is not a sweep or run folder, or holds no finished run."""


def unit_of(name: str) -> str:
    """Unit of a field or metric from its name's suffix (``channel.uplink_bandwidth_hz`` -> Hz)."""
    leaf = name.split(".")[-1]
    if "accuracy" in leaf and not leaf.endswith("_s") and not leaf.endswith("_j"):
        return "-"
    for suffix, unit in UNITS:
        if leaf.endswith(suffix):
            return unit
    return "-"


def axis_label(name: str) -> str:
    return f"{name} [{unit_of(name)}]"


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
    description: str = ""


def _check_experiments(runs: pd.DataFrame, where: str) -> None:
    """The report reads FedAvg runs (one accuracy curve per run); other experiments compare
    several variants inside one run and write their own figures. ``runs``: the flattened
    summaries (a FedAvg summary names no ``experiment``)."""
    if "experiment" not in runs:
        return
    for run_id, experiment in zip(runs["run_id"], runs["experiment"]):
        if isinstance(experiment, str) and experiment != "fedavg":
            raise ReportError(f"{where}, run {run_id}: a run of experiment {experiment!r}, which compares several "
                              "variants in one run and writes its own summary.json and figures into its folder; "
                              "`deftsim report` reads FedAvg runs and sweeps of them (experiment: fedavg)")


def load_report_data(folder: str | Path) -> ReportData:
    root = Path(folder)
    if (root / "sweep.json").is_file():
        plan = load_plan(root)
        runs = collect_runs(root)
        _check_experiments(runs, repr(str(root)))
        spec = plan.get("sweep", {})
        random_params = set(((spec.get("vary") or {}).get("random") or {}).get("params") or {})
        zips = (spec.get("vary") or {}).get("zip") or []
        zips = [zips] if isinstance(zips, dict) else zips
        data = ReportData(plan["name"], "sweep", root, list(plan["params"]), random_params, runs,
                          zip_groups=[sorted(g, key=plan["params"].index) for g in zips if len(g) > 1],
                          description=spec.get("description") or "")
        for run_id, status in zip(runs["run_id"], runs["status"]):
            if status == "ok":
                run_dir = root / RUNS_DIR / run_id
                data.events[run_id] = pd.read_parquet(run_dir / "events.parquet")
                data.scenarios[run_id] = json.loads((run_dir / "scenario.json").read_text()).get("scenario", {})
        return data
    if (root / "summary.json").is_file() and (root / "events.parquet").is_file():
        summary = json.loads((root / "summary.json").read_text())
        resolved = json.loads((root / "scenario.json").read_text()) if (root / "scenario.json").is_file() else {}
        row = {"run_id": root.name or "run", "point": 0, "seed": resolved.get("seed"), "status": "ok"}
        row.update(flatten_summary(summary))
        runs = pd.DataFrame([row])
        _check_experiments(runs, repr(str(root)))
        name = resolved.get("scenario", {}).get("name", root.name)
        data = ReportData(name, "run", root, [], set(), runs)
        data.events[row["run_id"]] = pd.read_parquet(root / "events.parquet")
        data.scenarios[row["run_id"]] = resolved.get("scenario", {})
        return data
    if not root.exists():
        raise ReportError(f"{str(root)!r} does not exist")
    raise ReportError(f"{str(root)!r} is neither a sweep folder (sweep.json) nor a run folder "
                      "(summary.json + events.parquet)")


def choose_target(data: ReportData, target: Optional[float]) -> tuple[float, str]:
    """The accuracy for time-/energy-to-accuracy and where it comes from."""
    if target is not None:
        return float(target), "given with --target"
    best = data.runs.loc[data.runs["status"] == "ok", "best_accuracy"].astype(float)
    value = math.floor(0.9 * float(best.median()) * 100) / 100
    targets = {(s.get("stop") or {}).get("target_accuracy") for s in data.scenarios.values()}
    if len(targets) == 1 and None not in targets:
        common = float(targets.pop())
        if (best >= common).any():
            return common, "the scenarios' stop.target_accuracy"
        return value, (f"90 % of the median best accuracy over runs: no run reached the scenarios' "
                       f"stop.target_accuracy {common:g}; set another with --target")
    return value, "90 % of the median best accuracy over runs (no common stop.target_accuracy; set --target)"


# ------------------------------------------------------------------------------ tables
def _derive(data: ReportData, target: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-run metrics that depend on the target, and the per-round latency split."""
    runs = data.runs.copy()
    tta, eta, lat = [], [], []
    frames = []
    for run_id in runs["run_id"]:
        ev = data.events.get(run_id)
        if ev is None:
            tta.append(math.nan), eta.append(math.nan), lat.append(math.nan)
            continue
        t = time_to_accuracy_s(ev, target)
        e = energy_to_accuracy_j(ev, target)
        tta.append(math.nan if t is None else t)
        eta.append(math.nan if e is None else e)
        lb = latency_breakdown(ev)
        lat.append(float(lb["latency_s"].mean()) if len(lb) else math.nan)
        row = runs.loc[runs["run_id"] == run_id].iloc[0]
        frames.append(lb.assign(run_id=run_id, point=row["point"], seed=row["seed"]))
    runs["time_to_target_s"] = tta
    runs["energy_to_target_j"] = eta
    runs["mean_round_latency_s"] = lat
    runs["target_reached"] = runs["time_to_target_s"].notna()
    breakdown = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["run_id", "point", "seed", "round", "latency_s", *LATENCY_PARTS, "devices"])
    breakdown = breakdown[["run_id", "point", "seed"] + [c for c in breakdown.columns
                                                         if c not in ("run_id", "point", "seed")]]
    return runs, breakdown


def point_label(values: dict, params: list[str]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    return ", ".join(f"{p.split('.')[-1]}={fmt(values.get(p))}" for p in params) or "(scenario)"


def _points(runs: pd.DataFrame, params: list[str]) -> pd.DataFrame:
    rows = []
    for point, group in runs.groupby("point", sort=True):
        first = group.iloc[0]
        row: dict[str, Any] = {"point": int(point)}
        row.update({p: first[p] for p in params})
        ok = group[group["status"] == "ok"]
        row["label"] = f"P{int(point)}: " + point_label({p: first[p] for p in params}, params)
        row["runs"] = int(len(group))
        row["runs_ok"] = int(len(ok))
        row["target_reached"] = int(ok["target_reached"].sum()) if len(ok) else 0
        for m in POINT_METRICS:
            values = ok[m].astype(float) if m in ok else pd.Series(dtype=float)
            mean, lo, hi, n = mean_ci(values.tolist())
            row[f"{m}_mean"], row[f"{m}_ci_low"], row[f"{m}_ci_high"], row[f"{m}_n"] = mean, lo, hi, n
        rows.append(row)
    return pd.DataFrame(rows)


def _pareto(points: pd.DataFrame) -> pd.DataFrame:
    cols = ["point", "label", "final_accuracy_mean", "sim_time_s_mean", "total_device_energy_j_mean"]
    front = points[cols].copy()
    front["on_front"] = pareto_mask(front, maximize=["final_accuracy_mean"],
                                    minimize=["sim_time_s_mean", "total_device_energy_j_mean"])
    return front


# ----------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    _plt().close(fig)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _point_colors(points: list[int]):
    plt = _plt()
    cmap = plt.get_cmap("tab10" if len(points) <= 10 else "tab20" if len(points) <= 20 else "viridis")
    n = max(len(points) - 1, 1)
    return {p: cmap(i if len(points) <= 20 else i / n) for i, p in enumerate(points)}


def fig_accuracy(data: ReportData, runs: pd.DataFrame, points: pd.DataFrame, target: float, path: Path) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ok = runs[runs["status"] == "ok"]
    colors = _point_colors(sorted(points["point"]))
    labels = dict(zip(points["point"], points["label"]))
    seen = set()
    for _, r in ok.iterrows():
        curve = accuracy_curve(data.events[r["run_id"]])
        label = None
        if r["point"] not in seen and len(points) <= 2 * MAX_LEGEND_POINTS:
            label = labels[r["point"]] if len(points) <= MAX_LEGEND_POINTS else f"P{r['point']}"
            seen.add(r["point"])
        ax.plot(curve["t_s"], curve["accuracy"], color=colors[r["point"]], lw=1.2, alpha=0.8, marker="o", ms=2,
                label=label)
    chance = ok["chance_accuracy"].astype(float).median() if "chance_accuracy" in ok else None
    if chance is not None and np.isfinite(chance):
        ax.axhline(chance, color="grey", ls="--", lw=1, label="chance")
    ax.axhline(target, color="black", ls=":", lw=1, label=f"target {target:g}")
    ax.set_xlabel("simulated time [s]")
    ax.set_ylabel("test accuracy [-]")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title("Test accuracy of the global model (one line per run, colour = point)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False,
              ncol=2 if len(points) > MAX_LEGEND_POINTS else 1)
    fig.tight_layout()
    return _save(fig, path)


def _is_numeric(values: list) -> bool:
    return all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
               and np.isfinite(v) for v in values)


def fig_to_accuracy(param: str, params: list[str], runs: pd.DataFrame, target: float, random: bool,
                    path: Path, partners: tuple[str, ...] = ()) -> bytes:
    """Time- and energy-to-accuracy against one swept field (and the fields zipped with it),
    mean and 95 % CI over seeds; one line per combination of the other fields if they are few."""
    plt = _plt()
    ok = runs[runs["status"] == "ok"].copy()
    others = [p for p in params if p != param and p not in partners]
    combos = ok[others].astype(str).agg(" ".join, axis=1) if others else pd.Series("", index=ok.index)
    n_combos = combos.nunique()
    grouped = bool(others) and not random and 1 < n_combos <= MAX_GROUP_LINES
    values = list(pd.unique(ok[param]))
    numeric = _is_numeric(values)
    if numeric:
        order = sorted(values)
        xpos = {v: float(v) for v in order}
    else:
        order = sorted(values, key=str)
        xpos = {v: float(i) for i, v in enumerate(order)}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    def order_key(key):
        first = ok[combos == key].iloc[0]
        return tuple((0, float(first[p]), "") if _is_numeric([first[p]]) else (1, 0.0, str(first[p])) for p in others)

    groups = ([(key, ok[combos == key]) for key in sorted(combos.unique(), key=order_key)] if grouped
              else [("", ok)])
    plt_colors = plt.get_cmap("tab10")
    for gi, (key, sub) in enumerate(groups):
        label = None
        if grouped:
            first = sub.iloc[0]
            label = point_label({p: first[p] for p in others}, others)
        for ax, metric in zip(axes, ["time_to_target_s", "energy_to_target_j"]):
            xs, ms, lo, hi, full = [], [], [], [], []
            for v in order:
                at = sub[sub[param].astype(str) == str(v)] if not numeric else sub[sub[param] == v]
                if at.empty:
                    continue
                m, l, h, n = mean_ci(at[metric].tolist())
                if n == 0:
                    continue
                xs.append(xpos[v]), ms.append(m), lo.append(m - l if np.isfinite(l) else 0.0)
                hi.append(h - m if np.isfinite(h) else 0.0), full.append(n == len(at))
            if not xs:
                continue
            color = plt_colors(gi % 10)
            ax.errorbar(xs, ms, yerr=[lo, hi], color=color, capsize=3, lw=1.2,
                        ls="none" if random else "-", marker=None, label=label)
            xs_a, ms_a, full_a = np.array(xs), np.array(ms), np.array(full)
            ax.scatter(xs_a[full_a], ms_a[full_a], color=color, zorder=3, s=22)
            ax.scatter(xs_a[~full_a], ms_a[~full_a], facecolors="white", edgecolors=color, zorder=3, s=22)
    for ax in axes:
        if not ax.has_data():
            ax.text(0.5, 0.5, f"no run reached accuracy {target:g}", ha="center", va="center",
                    transform=ax.transAxes, color="#555555")
    pretty = {"time_to_target_s": f"simulated time to accuracy {target:g} [s]",
              "energy_to_target_j": f"device energy to accuracy {target:g} [J]"}
    for ax, metric in zip(axes, ["time_to_target_s", "energy_to_target_j"]):
        ax.set_xlabel(axis_label(param) + ("\n(zipped with " + ", ".join(partners) + ")" if partners else ""))
        ax.set_ylabel(pretty[metric])
        ax.grid(alpha=0.3)
        if numeric:
            positive = [v for v in order if v > 0]
            if len(positive) == len(order) and max(order) / min(order) >= 20:
                ax.set_xscale("log")
            if len(order) <= 8 and not random:
                ax.set_xticks([float(v) for v in order], [f"{v:g}" for v in order])
                ax.minorticks_off()
        else:
            ax.set_xticks(list(xpos.values()), [str(v) for v in order])
    if grouped:
        axes[1].legend(fontsize=7, title="other fields", title_fontsize=7, loc="best")
    spread = "seeds" if (grouped or not others) else "seeds and the other swept fields"
    fig.suptitle(f"{param}: mean and 95% CI over {spread} (hollow: not every run reached the target)",
                 fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


AIRCOMP_METRICS = ["aircomp.mean_receive_snr_db", "aircomp.mean_nmse", "aircomp.mean_truncation_ratio",
                   "aircomp.mean_mse", "aircomp.mean_mse_theory"]
AIRCOMP_LABELLED = ("aircomp.truncation_threshold",)   # written next to each marker, not a line each
AIRCOMP_X = ("aircomp.receive_snr_db",)                 # what moves along a line


def has_aircomp(runs: pd.DataFrame) -> bool:
    """True if some finished run aggregated over the air (``summary.json`` has ``aircomp``)."""
    col = "aircomp.mean_receive_snr_db"
    return col in runs and bool(runs.loc[runs["status"] == "ok", col].notna().any())


def aircomp_points(runs: pd.DataFrame, params: list[str]) -> pd.DataFrame:
    """Per point: the swept fields and the mean over seeds of the over-the-air statistics and
    the final accuracy (with its 95 % CI)."""
    ok = runs[(runs["status"] == "ok") & runs["aircomp.mean_receive_snr_db"].notna()]
    rows = []
    for point, group in ok.groupby("point", sort=True):
        row: dict[str, Any] = {"point": int(point), **{p: group.iloc[0][p] for p in params}, "runs_ok": len(group)}
        for m in AIRCOMP_METRICS:
            if m in group:
                row[m] = float(group[m].astype(float).mean())
        acc = group["final_accuracy"].astype(float)
        mean, lo, hi, _ = mean_ci(acc.tolist())
        row["final_accuracy_mean"], row["final_accuracy_ci_low"], row["final_accuracy_ci_high"] = mean, lo, hi
        row["final_accuracy_min"], row["final_accuracy_max"] = float(acc.min()), float(acc.max())
        rows.append(row)
    return pd.DataFrame(rows)


def fig_aircomp(table: pd.DataFrame, params: list[str], path: Path) -> bytes:
    """Final accuracy and aggregation NMSE against the measured receive SNR, one line per
    combination of the swept fields other than the SNR and the truncation threshold (the
    threshold is written next to each marker)."""
    plt = _plt()
    snr = "aircomp.mean_receive_snr_db"
    line_fields = [p for p in params if p not in AIRCOMP_X + AIRCOMP_LABELLED]
    labelled = [p for p in params if p in AIRCOMP_LABELLED]
    keys = table[line_fields].astype(str).agg(" ".join, axis=1) if line_fields else pd.Series("", index=table.index)
    use_ci = bool((table["runs_ok"] >= 3).all())   # a t-interval of 2 seeds is +-12.7 sd: show the range
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colors = plt.get_cmap("tab10")
    for gi, key in enumerate(pd.unique(keys)):
        sub = table[keys == key].sort_values(snr)
        first = sub.iloc[0]
        label = point_label({p: first[p] for p in line_fields}, line_fields) if line_fields else None
        x = sub[snr].to_numpy(dtype=float)
        x = np.where(np.isfinite(x), x, np.nan)
        acc = sub["final_accuracy_mean"].to_numpy(dtype=float)
        low, high = ("ci_low", "ci_high") if use_ci else ("min", "max")
        err = [np.nan_to_num(acc - sub[f"final_accuracy_{low}"].to_numpy(dtype=float)),
               np.nan_to_num(sub[f"final_accuracy_{high}"].to_numpy(dtype=float) - acc)]
        color = colors(gi % 10)
        axes[0].errorbar(x, acc, yerr=err, color=color, marker="o", capsize=3, lw=1.2, label=label)
        axes[1].plot(x, sub["aircomp.mean_nmse"].to_numpy(dtype=float), color=color, marker="o", label=label)
        for _, row in sub.iterrows():
            if labelled and np.isfinite(row[snr]):
                text = ", ".join(f"{row[p]:g}" for p in labelled)
                axes[0].annotate(text, (row[snr], row["final_accuracy_mean"]), fontsize=6,
                                 xytext=(3, 3), textcoords="offset points", color=color)
    axes[0].set_ylabel("final test accuracy")
    axes[0].set_ylim(0.0, 1.02)   # accuracy is a fraction: clip t-intervals of few seeds
    axes[1].set_ylabel("aggregation NMSE (mean over rounds)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("receive SNR rho0 / sigma^2, mean over rounds [dB]")
        ax.grid(alpha=0.3)
    if line_fields:
        axes[1].legend(fontsize=7, loc="best")
    bars = "95% CI" if use_ci else "min and max over seeds"
    marks = f"; numbers at the markers: {', '.join(labelled)}" if labelled else ""
    fig.suptitle(f"Over-the-air aggregation: mean over seeds (error bars: {bars}{marks})", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def fig_latency_points(points: pd.DataFrame, breakdown: pd.DataFrame, path: Path) -> bytes:
    plt = _plt()
    mean = breakdown.groupby("point")[list(LATENCY_PARTS)].mean().reindex(points["point"]).fillna(0.0)
    width = max(8.0, 0.45 * len(points) + 3)
    fig, ax = plt.subplots(figsize=(min(width, 24), 4.5))
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
    return _save(fig, path)


def fig_latency_rounds(points: pd.DataFrame, runs: pd.DataFrame, breakdown: pd.DataFrame, path: Path) -> bytes:
    plt = _plt()
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
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False, sharey=True)
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
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return _save(fig, path)


def fig_pareto(front: pd.DataFrame, path: Path) -> bytes:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
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
    fig.suptitle("Accuracy vs. delay vs. energy, mean over seeds per point; outlined/red: not dominated in all three",
                 fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


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
    flat = frame.copy()
    for c in flat.columns:
        if flat[c].dtype == object:
            flat[c] = flat[c].map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v)
            if flat[c].map(type).nunique() > 1:  # mixed types: store as text
                flat[c] = flat[c].map(lambda v: None if v is None else str(v))
    flat.to_csv(out / f"{name}.csv", index=False)
    flat.to_parquet(out / f"{name}.parquet", index=False)


def build_report(folder: str | Path, out_dir: Optional[str | Path] = None, target: Optional[float] = None) -> Path:
    """Write the report of a sweep or run folder; return the path of ``report.html``."""
    data = load_report_data(folder)
    ok_count = int((data.runs["status"] == "ok").sum())
    if ok_count == 0:
        raise ReportError(f"{str(data.root)!r}: no finished run yet (run `deftsim sweep` first)")
    out = Path(out_dir) if out_dir is not None else data.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("to_accuracy_*.png")) + [out / "pareto.png", out / "aircomp.png"]:  # earlier report
        old.unlink(missing_ok=True)
    target, target_source = choose_target(data, target)
    runs, breakdown = _derive(data, target)
    points = _points(runs, data.params)
    front = _pareto(points)
    sections = []

    # -- tables
    run_cols = ["run_id", "point", "seed", "status", *data.params,
                *[m for m in RUN_METRICS if m in runs.columns]]
    table = runs[run_cols + (["error_type", "error_message"] if "error_type" in runs else [])]
    _write_table(runs, out, "runs")
    _write_table(points, out, "points")
    _write_table(breakdown, out, "round_breakdown")
    _write_table(front, out, "pareto")
    failed = runs[runs["status"] == "failed"]
    pending = runs[runs["status"] == "pending"]

    # -- figures
    figs: dict[str, str] = {}
    png = fig_accuracy(data, runs, points, target, out / "accuracy_vs_time.png")
    figs["accuracy"] = _figure(png, "test accuracy against simulated time",
                               "Test accuracy of the global model after each round against simulated time.",
                               "accuracy_vs_time.png")
    param_figs = []
    followers = {p for g in data.zip_groups for p in g[1:]}  # drawn on the first field's figure
    for i, p in enumerate(data.params):
        if p in followers:
            continue
        partners = next((tuple(g[1:]) for g in data.zip_groups if g[0] == p), ())
        name = f"to_accuracy_{i:02d}_{p.replace('.', '_')}.png"
        png = fig_to_accuracy(p, data.params, runs, target, p in data.random_params, out / name, partners)
        param_figs.append(_figure(png, f"time and energy to accuracy against {p}",
                                  f"Time and device energy to reach accuracy {target:g} against {p}: mean over "
                                  "runs that reached it, error bars a 95% Student-t confidence interval.", name))
    png = fig_latency_points(points, breakdown, out / "latency_breakdown.png")
    figs["latency"] = _figure(png, "mean round latency breakdown per point",
                              "Mean round latency per point, split as the average participating device spends it: "
                              "receiving the global adapter, computing, uploading, waiting for the slowest device, "
                              "and the edge's aggregation and evaluation.", "latency_breakdown.png")
    png = fig_latency_rounds(points, runs, breakdown, out / "latency_per_round.png")
    figs["rounds"] = _figure(png, "round latency breakdown per round",
                             "The same split round by round, for the first seed of each point"
                             + (f" (first {MAX_ROUND_PANELS} points)" if len(points) > MAX_ROUND_PANELS else "")
                             + ".", "latency_per_round.png")
    aircomp_table = None
    if has_aircomp(runs):
        aircomp_table = aircomp_points(runs, data.params)
        _write_table(aircomp_table, out, "aircomp_points")
        png = fig_aircomp(aircomp_table, data.params, out / "aircomp.png")
        figs["aircomp"] = _figure(png, "accuracy and NMSE against receive SNR",
                                  "Final accuracy (left) and normalised MSE of the over-the-air aggregate "
                                  "(right) against the measured receive SNR of the slots, per point (mean over "
                                  "seeds; error bars a 95% CI with 3 or more seeds, else the seeds' range); a "
                                  "swept truncation threshold is written next to its marker.",
                                  "aircomp.png")
    if len(points) >= 2:
        png = fig_pareto(front, out / "pareto.png")
        figs["pareto"] = _figure(png, "Pareto front of accuracy, delay and energy",
                                 "Each point's mean final accuracy (higher is better), simulated run time and "
                                 "total device energy (lower is better); a point is on the front if no other "
                                 "point is at least as good in all three and better in one.", "pareto.png")

    # -- HTML
    esc = html.escape
    n_points = len(points)
    seeds = sorted({int(s) for s in runs["seed"].dropna()})
    header = (f"<h1>{esc(data.title)}</h1><p class=meta>{esc(data.kind)} folder <code>{esc(str(data.root))}</code>: "
              f"{len(runs)} run(s), {n_points} point(s) x seeds {esc(str(seeds))}; {ok_count} ok, "
              f"{len(failed)} failed, {len(pending)} not run yet.</p>")
    if data.description:
        header += f"<p>{esc(data.description)}</p>"
    if data.params:
        header += "<p>Swept fields: " + ", ".join(f"<code>{esc(p)}</code>" for p in data.params) + ".</p>"
    header += (f"<p class=note>Time- and energy-to-accuracy use the target accuracy <b>{target:g}</b> "
               f"({esc(target_source)}). Energy is the sum over devices of compute, transmit and receive "
               "energy; all times are simulated, never host time. Tables can be sorted by clicking a "
               "column; the same tables are in the report folder as CSV and Parquet.</p>")
    sections.append(header)
    sections.append("<h2>Runs</h2>" + html_table(table, lambda r: "failed" if r["status"] == "failed" else ""))
    if len(failed):
        fcols = ["run_id", "seed", *data.params, "error_type", "error_message"]
        sections.append(f"<h2>Failed runs ({len(failed)})</h2><p class=note>Each failed run's folder holds "
                        "<code>error.json</code> with the traceback.</p>" + html_table(failed[fcols], max_text=400))
    pcols = ["point", *data.params, "runs", "runs_ok", "target_reached"] + [
        c for m in POINT_METRICS for c in (f"{m}_mean", f"{m}_ci_low", f"{m}_ci_high")]
    sections.append("<h2>Points (mean and 95% CI over seeds)</h2>" + html_table(points[pcols]))
    sections.append("<h2>Accuracy vs. simulated time</h2>" + figs["accuracy"])
    if param_figs:
        sections.append("<h2>Time and energy to accuracy against each swept field</h2>" + "".join(param_figs))
    sections.append("<h2>Latency breakdown</h2>" + figs["latency"] + figs["rounds"])
    if aircomp_table is not None:
        sections.append("<h2>Over-the-air aggregation</h2>" + figs["aircomp"] + html_table(aircomp_table)
                        + "<p class=note>Receive SNR = rho0 / sigma^2 of the AirComp slot; NMSE = mean squared "
                        "error of the received aggregate over the mean square of the exact weighted sum; "
                        "truncation ratio = share of (device, value) entries not sent (docs/aircomp.md).</p>")
    if "pareto" in figs:
        members = front[front["on_front"]]
        sections.append("<h2>Pareto front: accuracy vs. delay vs. energy</h2>" + figs["pareto"]
                        + html_table(front, lambda r: "front" if r["on_front"] else "")
                        + f"<p class=note>{len(members)} of {len(front)} points are on the front.</p>")
    page = (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{esc(data.title)}: deftsim report</title>"
            f"<meta name=viewport content='width=device-width,initial-scale=1'><style>{CSS}</style></head><body>"
            + "".join(sections)
            + f"<p class=note>Written by <code>deftsim report</code>.</p><script>{SORT_JS}</script></body></html>")
    path = out / "report.html"
    tmp = out / ".report.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
