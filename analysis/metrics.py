"""Metrics derived from an event log (never accumulated inside the simulation)."""
from __future__ import annotations

import math
import re
from typing import Iterable, Optional, Sequence

import numpy as np
import pandas as pd

DEVICE_KINDS = ("compute", "uplink", "downlink")
D2D_KINDS = ("d2d_transfer", "d2d_receive")
"""Device time on sidelinks (sending, receiving): counted in ``device_d2d_s`` and the
communication share, not in the per-round breakdowns (whose D2D time falls in ``waiting``)."""


def accuracy_curve(events: pd.DataFrame) -> pd.DataFrame:
    """Test accuracy after each evaluation: columns round, t_s (end of evaluation), accuracy."""
    ev = events[events["kind"] == "evaluate"]
    return pd.DataFrame({"round": ev["round"].to_numpy(), "t_s": (ev["t_s"] + ev["duration_s"]).to_numpy(),
                         "accuracy": ev["accuracy"].to_numpy()})


def time_to_accuracy_s(events: pd.DataFrame, target: float) -> Optional[float]:
    """Simulated time when test accuracy first reached ``target`` (None if never) [s]."""
    curve = accuracy_curve(events)
    hit = curve[curve["accuracy"] >= target]
    return None if hit.empty else float(hit["t_s"].iloc[0])


def accuracy_energy_curve(events: pd.DataFrame) -> pd.DataFrame:
    """Test accuracy after each evaluation against the total device energy of the events that
    ended by then: columns ``round, energy_j, accuracy`` (one run's events)."""
    curve = accuracy_curve(events)
    dev = events[events["node"].str.startswith("dev")]
    ends = (dev["t_s"] + dev["duration_s"]).to_numpy()
    order = np.argsort(ends, kind="stable")
    ends = ends[order]
    spent = np.concatenate([[0.0], np.cumsum(dev["energy_j"].fillna(0.0).to_numpy()[order])])
    idx = np.searchsorted(ends, curve["t_s"].to_numpy() + 1e-12, side="right")
    return pd.DataFrame({"round": curve["round"], "energy_j": spent[idx], "accuracy": curve["accuracy"]})


def natural_key(name: str) -> tuple:
    """Sort key that orders embedded numbers by value: ``dev2`` before ``dev10``."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", str(name)) if part)


def energy_per_device_j(events: pd.DataFrame, devices: Optional[Sequence[str]] = None) -> pd.Series:
    """Total energy charged to each device (sum over its events) [J], in natural order of the
    names (``dev0, dev1, ..., dev10``). ``devices``: every device of the run, so that a device
    with no event (never selected) is listed with 0 J; devices with events but not in
    ``devices`` are kept too."""
    dev = events[events["node"].astype(str).str.startswith("dev")]
    sums = dev.groupby("node", sort=False)["energy_j"].sum()
    names = set(sums.index) | set(devices or ())
    order = sorted(names, key=natural_key)
    return sums.reindex(order, fill_value=0.0).astype(float).rename_axis("node")


def round_breakdown(events: pd.DataFrame) -> pd.DataFrame:
    """Per round: round latency and, on the critical path, the longest downlink, compute and
    uplink; plus device-seconds spent computing and transmitting."""
    starts = events[events["kind"] == "round_start"].set_index("round")["t_s"]
    ends = events[events["kind"] == "round_end"].set_index("round")["t_s"]
    dev = events[events["kind"].isin(DEVICE_KINDS)]
    busy = dev.pivot_table(index="round", columns="kind", values="duration_s", aggfunc="sum").reindex(
        columns=list(DEVICE_KINDS), fill_value=0.0).fillna(0.0)
    longest = dev.pivot_table(index="round", columns="kind", values="duration_s", aggfunc="max").reindex(
        columns=list(DEVICE_KINDS), fill_value=0.0).fillna(0.0)
    out = pd.DataFrame({"latency_s": ends - starts})
    for k in DEVICE_KINDS:
        out[f"{k}_device_s"] = busy[k]
        out[f"{k}_max_s"] = longest[k]
    return out.reset_index()


def summarize(events: pd.DataFrame, *, num_classes: int, stop_reason: str, target_accuracy: Optional[float],
              memory_exceeded_devices: Optional[list] = None, devices: Optional[Sequence[str]] = None) -> dict:
    """Headline metrics of one run (what ``summary.json`` holds).

    ``energy_per_device_j`` lists every device in natural order (``dev0, dev1, ..., dev10``):
    those in ``devices`` (every device of the run; a device never selected has 0 J) and every
    device with an event. ``mean_device_energy_j`` is the mean over that same list."""
    curve = accuracy_curve(events)
    initial = float(curve["accuracy"].iloc[0])
    final = float(curve["accuracy"].iloc[-1])
    chance = 1.0 / num_classes
    energy = energy_per_device_j(events, devices)
    dev = events[events["kind"].isin(DEVICE_KINDS)]
    seconds = dev.groupby("kind")["duration_s"].sum().reindex(list(DEVICE_KINDS), fill_value=0.0)
    d2d_s = float(events.loc[events["kind"].isin(D2D_KINDS), "duration_s"].sum())
    busy_total = float(seconds.sum()) + d2d_s
    comm = float(seconds["uplink"] + seconds["downlink"]) + d2d_s
    exceeded = sorted(set(events.loc[events["kind"] == "memory_exceeded", "node"].tolist()))
    summary = {
        "rounds_completed": int(curve["round"].iloc[-1]),
        "stop_reason": stop_reason,
        "chance_accuracy": chance,
        "initial_accuracy": initial,
        "final_accuracy": final,
        "best_accuracy": float(curve["accuracy"].max()),
        "accuracy_gain_over_initial": final - initial,
        "accuracy_gain_over_chance": final - chance,
        "trained_above_initial_and_chance": bool(final > initial and final > chance),
        "sim_time_s": float((events["t_s"] + events["duration_s"]).max()),
        "time_to_final_accuracy_s": time_to_accuracy_s(events, final),
        "target_accuracy": target_accuracy,
        "time_to_target_accuracy_s": None if target_accuracy is None else time_to_accuracy_s(events, target_accuracy),
        "total_device_energy_j": float(energy.sum()),
        "mean_device_energy_j": float(energy.mean()) if len(energy) else 0.0,
        "energy_per_device_j": {k: float(v) for k, v in energy.items()},
        "device_compute_s": float(seconds["compute"]),
        "device_uplink_s": float(seconds["uplink"]),
        "device_downlink_s": float(seconds["downlink"]),
        "device_d2d_s": d2d_s,
        "compute_share": float(seconds["compute"]) / busy_total if busy_total > 0 else math.nan,
        "communication_share": comm / busy_total if busy_total > 0 else math.nan,
        "total_flops": float(events["flops"].sum()),
        "total_bytes_sent": int(events.loc[events["kind"].isin(["broadcast", "uplink"]), "bytes"].sum()),
        "memory_exceeded_devices": exceeded,
        "num_events": int(len(events)),
    }
    return summary


def energy_to_accuracy_j(events: pd.DataFrame, target: float) -> Optional[float]:
    """Total device energy spent until test accuracy first reached ``target`` (None if never)
    [J]: the energy of every device event that ended by then."""
    t_hit = time_to_accuracy_s(events, target)
    if t_hit is None:
        return None
    dev = events[events["node"].str.startswith("dev")]
    done = dev[dev["t_s"] + dev["duration_s"] <= t_hit + 1e-12]
    return float(done["energy_j"].sum())


LATENCY_PARTS = ("downlink_s", "compute_s", "uplink_s", "waiting_s", "edge_s")


def latency_breakdown(events: pd.DataFrame) -> pd.DataFrame:
    """Where a round's latency goes, seen from the average participating device.

    One row per round: ``latency_s`` (round start to round end) and its split, averaged over the
    devices that took part: ``downlink_s`` (receiving the global adapter), ``compute_s`` (local
    steps), ``uplink_s`` (sending the update), ``waiting_s`` (idle until the last upload of the
    round arrives: waiting for stragglers) and ``edge_s`` (aggregation and evaluation at the
    edge). The five parts add up to ``latency_s``; ``devices`` is the number of participants.
    """
    starts = events[events["kind"] == "round_start"].set_index("round")["t_s"]
    ends = events[events["kind"] == "round_end"].set_index("round")["t_s"]
    rounds = starts.index.intersection(ends.index)
    latency = (ends - starts).loc[rounds]
    edge = events[events["kind"].isin(["aggregate", "evaluate"]) & events["round"].isin(rounds)]
    edge_s = edge.groupby("round")["duration_s"].sum().reindex(rounds, fill_value=0.0)
    dev = events[events["kind"].isin(DEVICE_KINDS) & events["round"].isin(rounds)]
    per_device = dev.pivot_table(index=["round", "node"], columns="kind", values="duration_s",
                                 aggfunc="sum").reindex(columns=list(DEVICE_KINDS), fill_value=0.0).fillna(0.0)
    mean = per_device.groupby(level="round").mean().reindex(rounds).fillna(0.0)
    count = per_device.groupby(level="round").size().reindex(rounds, fill_value=0)
    out = pd.DataFrame({"round": rounds.to_numpy(), "latency_s": latency.to_numpy(),
                        "downlink_s": mean["downlink"].to_numpy(), "compute_s": mean["compute"].to_numpy(),
                        "uplink_s": mean["uplink"].to_numpy(), "edge_s": edge_s.to_numpy(),
                        "devices": count.to_numpy()})
    busy = out["downlink_s"] + out["compute_s"] + out["uplink_s"]
    out["waiting_s"] = (out["latency_s"] - out["edge_s"] - busy).clip(lower=0.0)
    return out[["round", "latency_s", *LATENCY_PARTS, "devices"]]


MIN_CI_SAMPLES = 3
"""Fewest values for a Student-t interval: with 2 values the 95 % half-width is 12.7 standard
errors (t_{0.975,1} = 12.706), wider than any range the values could span, so the report shows the
range (min, max) instead."""


def mean_ci(values, confidence: float = 0.95, *, min_n: int = 2,
            bounds: tuple[Optional[float], Optional[float]] = (None, None)) -> tuple[float, float, float, int]:
    """(mean, lower, upper, n) of the finite values: Student-t confidence interval of the mean,
    mean -+ t_{(1+confidence)/2, n-1} s / sqrt(n) with s the sample standard deviation.

    NaN bounds for fewer than ``min_n`` values (at least 2: one value has no spread). ``bounds``
    (low, high) clips the interval to the metric's possible range (``(0, 1)`` for an
    accuracy or a share, ``(0, None)`` for times and energies): the mean of values inside the
    range lies in it, and so does the true mean."""
    from scipy import stats

    x = np.asarray([v for v in values if v is not None], dtype=float)
    x = x[np.isfinite(x)]
    n = int(x.size)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    m = float(x.mean())
    if n < max(2, min_n):
        return m, math.nan, math.nan, n
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    low, high = m - half, m + half
    if bounds[0] is not None:
        low = max(low, float(bounds[0]))
    if bounds[1] is not None:
        high = min(high, float(bounds[1]))
    return m, low, high, n


def seed_spread(values, *, bounds: tuple[Optional[float], Optional[float]] = (None, None),
                confidence: float = 0.95) -> dict:
    """What the report shows of a metric over seeds: ``mean``, ``n``, ``min``, ``max`` and either
    a Student-t interval (``kind = "ci"``, :data:`MIN_CI_SAMPLES` or more values, clipped to
    ``bounds``) or the range of the values (``kind = "range"``, 2 values), or nothing (``kind =
    "single"``/``"none"``, 1 or 0 values). ``low``/``high`` are the bounds drawn as error bars."""
    x = np.asarray([v for v in values if v is not None], dtype=float)
    x = x[np.isfinite(x)]
    n = int(x.size)
    if n == 0:
        return {"mean": math.nan, "n": 0, "min": math.nan, "max": math.nan, "low": math.nan, "high": math.nan,
                "kind": "none"}
    out = {"mean": float(x.mean()), "n": n, "min": float(x.min()), "max": float(x.max())}
    if n >= MIN_CI_SAMPLES:
        _, low, high, _ = mean_ci(x.tolist(), confidence, min_n=MIN_CI_SAMPLES, bounds=bounds)
        return {**out, "low": low, "high": high, "kind": "ci"}
    if n == 2:
        return {**out, "low": out["min"], "high": out["max"], "kind": "range"}
    return {**out, "low": math.nan, "high": math.nan, "kind": "single"}


def spread_text(spread: dict, digits: int = 4) -> str:
    """One table cell: ``95% CI [a, b] (n=5)``, ``n=2: range [a, b]``, ``n=1`` or ``-``."""
    f = f"{{:.{digits}g}}"
    if spread["kind"] == "ci":
        return f"95% CI [{f.format(spread['low'])}, {f.format(spread['high'])}] (n={spread['n']})"
    if spread["kind"] == "range":
        return f"n=2 (too few seeds for a CI): range [{f.format(spread['min'])}, {f.format(spread['max'])}]"
    if spread["kind"] == "single":
        return "n=1 (one seed)"
    return "–"


BOUNDED = {"accuracy": (0.0, 1.0), "share": (0.0, 1.0), "ratio": (0.0, 1.0), "nmse": (0.0, None),
           "_s": (0.0, None), "_j": (0.0, None), "_bytes": (0.0, None), "_hz": (0.0, None)}


def metric_bounds(name: str) -> tuple[Optional[float], Optional[float]]:
    """Possible range of a metric from its name: accuracies, shares and ratios in [0, 1]; times
    (``_s``), energies (``_j``), NMSE, sizes and bandwidths >= 0; anything else unbounded. A
    ratio of two times (``latency_ratio_...``) is only >= 0."""
    leaf = name.split(".")[-1]
    if "accuracy" in leaf and not leaf.endswith(("_s", "_j")):
        return 0.0, 1.0
    if leaf.endswith("_share") or leaf.endswith("truncation_ratio") or leaf in ("compute_share", "communication_share"):
        return 0.0, 1.0
    if leaf.startswith("latency_ratio") or "nmse" in leaf or "mse" in leaf:
        return 0.0, None
    if leaf.endswith("utilisation"):
        return 0.0, 1.0
    if leaf.endswith(("batch_size", "_flops_per_step")):
        return 0.0, None
    if leaf.endswith("_updates") or leaf in ("handovers", "stale_updates_mean", "server_steps"):
        return 0.0, None   # counts, and a mean of staleness counts
    for suffix in ("_s", "_j", "_bytes", "_hz", "_w"):
        if leaf.endswith(suffix):
            return 0.0, None
    return None, None


def run_target(scenario: dict) -> Optional[float]:
    """The target accuracy a resolved scenario (``scenario.json``'s ``scenario``) names:
    ``federated_deft.target_accuracy`` for that experiment, else ``stop.target_accuracy``."""
    deft = scenario.get("federated_deft") if scenario.get("experiment") == "federated_deft" else None
    if isinstance(deft, dict) and deft.get("target_accuracy") is not None:
        return deft["target_accuracy"]
    stop = scenario.get("stop")
    return stop.get("target_accuracy") if isinstance(stop, dict) else None


def choose_target(best_accuracies: Iterable[float], stop_targets: Iterable[Optional[float]],
                  given: Optional[float] = None) -> tuple[float, str]:
    """The accuracy for time- and energy-to-accuracy, and where it comes from: the one function
    :func:`analysis.load_sweep` and ``deftsim report`` both call.

    ``given`` if set; else the runs' common ``stop.target_accuracy`` if every run has the same one
    and some run reached it; else 90 % of the median best accuracy over runs (rounded down to
    0.01)."""
    if given is not None:
        return float(given), "given with --target"
    best = np.asarray([b for b in best_accuracies if b is not None], dtype=float)
    best = best[np.isfinite(best)]
    if best.size == 0:
        raise ValueError("no finished run with an accuracy to choose a target accuracy from")
    value = math.floor(0.9 * float(np.median(best)) * 100) / 100
    targets = set(stop_targets)
    if len(targets) == 1 and None not in targets:
        common = float(targets.pop())
        if (best >= common).any():
            return common, "the scenarios' target accuracy"
        return value, (f"90 % of the median best accuracy over runs: no run reached the scenarios' "
                       f"stop.target_accuracy {common:g}; set another with --target")
    return value, "90 % of the median best accuracy over runs (no common stop.target_accuracy; set --target)"


def pareto_mask(frame: pd.DataFrame, maximize: list[str], minimize: list[str]) -> pd.Series:
    """True for the rows no other row dominates (at least as good in every objective, better in
    one). Rows with a missing objective are never on the front."""

    cols = list(maximize) + list(minimize)
    values = np.array(frame[cols].astype(float).to_numpy(), dtype=float, copy=True)
    values[:, :len(maximize)] *= -1.0  # everything minimised
    ok = np.isfinite(values).all(axis=1)
    mask = np.zeros(len(frame), dtype=bool)
    for i in np.flatnonzero(ok):
        others = values[ok]
        dominated = ((others <= values[i]).all(axis=1) & (others < values[i]).any(axis=1)).any()
        mask[i] = not dominated
    return pd.Series(mask, index=frame.index)
