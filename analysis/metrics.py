"""Metrics derived from an event log (never accumulated inside the simulation)."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pandas as pd

DEVICE_KINDS = ("compute", "uplink", "downlink")


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


def energy_per_device_j(events: pd.DataFrame) -> pd.Series:
    """Total energy charged to each device (sum over its events) [J]."""
    dev = events[events["node"].str.startswith("dev")]
    return dev.groupby("node", sort=False)["energy_j"].sum()


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
              memory_exceeded_devices: Optional[list] = None) -> dict:
    """Headline metrics of one run (what ``summary.json`` holds)."""
    curve = accuracy_curve(events)
    initial = float(curve["accuracy"].iloc[0])
    final = float(curve["accuracy"].iloc[-1])
    chance = 1.0 / num_classes
    energy = energy_per_device_j(events)
    dev = events[events["kind"].isin(DEVICE_KINDS)]
    seconds = dev.groupby("kind")["duration_s"].sum().reindex(list(DEVICE_KINDS), fill_value=0.0)
    busy_total = float(seconds.sum())
    comm = float(seconds["uplink"] + seconds["downlink"])
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


def mean_ci(values, confidence: float = 0.95) -> tuple[float, float, float, int]:
    """(mean, lower, upper, n) of the finite values: Student-t confidence interval of the mean
    (NaN bounds for fewer than two values)."""
    import numpy as np
    from scipy import stats

    x = np.asarray([v for v in values if v is not None], dtype=float)
    x = x[np.isfinite(x)]
    n = int(x.size)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    m = float(x.mean())
    if n < 2:
        return m, math.nan, math.nan, n
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return m, m - half, m + half, n


def pareto_mask(frame: pd.DataFrame, maximize: list[str], minimize: list[str]) -> pd.Series:
    """True for the rows no other row dominates (at least as good in every objective, better in
    one). Rows with a missing objective are never on the front."""
    import numpy as np

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
