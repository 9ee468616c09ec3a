"""Runs of experiments that compare several variants inside one run, as tidy tables.

=====================  ==========================  ==============================================
experiment             a variant is                metrics per variant (``summary.json``)
=====================  ==========================  ==============================================
``lola_compare``       an allocation algorithm     mean / p95 / planned round latency [s]; final
                                                   accuracy and accuracy vs. time of the
                                                   algorithms trained (``lola.train_rounds > 0``)
``aircomp_vs_ofdma``   an uplink (``ofdma``,       uplink air time per round, final accuracy,
                       ``aircomp``) at K devices   simulated time, device and uplink energy, and
                       per round                   (AirComp) NMSE and receive SNR
``neural_aircomp``     a connection: ``digital``   final and best accuracy, simulated time,
                       or AirComp at an SNR        uplink time per step, NMSE, receive SNR
``federated_deft``     a way to fine-tune: lora,   final accuracy, time to target, peak device
                       emulator, split,            memory, bytes up and down, energy per device,
                       zeroth_order                device FLOPs per local step
``prompt_service``     where a request's tuning    the queue (mean sojourn and wait, acceptance,
                       starts: scratch,            deadline hits, utilisation), first and final
                       best_single, oracle,        accuracy of the served requests, median time
                       ensemble                    to target from arrival and from service start
``d2d_prompt_transfer``  where a target's prompt   median time and energy to target, hit ratio,
                       comes from: scratch,        negative-transfer rate, regret of the choice,
                       edge_library, a neighbour   start and final metric, D2D and cellular bytes
                       (random, best_link,
                       similarity, oracle)
=====================  ==========================  ==============================================

:func:`variant_rows` turns one ``summary.json`` into one row per variant; :func:`variant_curves`
gives each variant's accuracy curve (from the event log's ``uplink_access``/``device_count`` or
``variant`` columns, or from ``summary.json``'s ``accuracy_vs_time``). Reads files only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import pandas as pd

from .files import ReportError
from .metrics import accuracy_curve, energy_to_accuracy_j, time_to_accuracy_s


@dataclass(frozen=True)
class ExperimentView:
    """How the report draws one experiment's variants."""
    experiment: str
    variant_name: str        # what a variant is, for captions
    series: str              # column of the series (lines/bars) within a run
    axis: Optional[str]      # numeric column along which a series moves (None: variants are categories)
    metrics: tuple[str, ...]  # metric columns drawn, in order


VIEWS = {
    "lola_compare": ExperimentView("lola_compare", "allocation algorithm", "algorithm", None,
                                   ("mean_round_latency_s", "p95_round_latency_s", "final_accuracy",
                                    "time_to_target_s")),
    "aircomp_vs_ofdma": ExperimentView("aircomp_vs_ofdma", "uplink at K devices per round", "uplink",
                                       "device_count",
                                       ("aggregation_latency_s", "final_accuracy", "total_device_energy_j",
                                        "aircomp.mean_nmse", "time_to_target_s", "energy_to_target_j")),
    "neural_aircomp": ExperimentView("neural_aircomp", "connection (digital, or AirComp at a receive SNR)",
                                     "variant", None,
                                     ("final_accuracy", "best_accuracy", "aircomp.mean_nmse", "mean_uplink_s",
                                      "sim_time_s", "time_to_target_s")),
    "federated_deft": ExperimentView("federated_deft", "way to fine-tune (whole model, emulator, split, zeroth-order)",
                                     "variant", None,
                                     ("final_accuracy", "time_to_target_s", "peak_device_memory_bytes", "uplink_bytes",
                                      "downlink_bytes", "energy_per_device_j", "device_flops_per_step",
                                      "energy_to_target_j", "sim_time_s", "edge_utilisation",
                                      "edge_mean_queue_delay_s", "edge_mean_batch_size")),
    "prompt_service": ExperimentView("prompt_service", "start of a request's tuning (scratch, library, ensemble)",
                                     "variant", None,
                                     ("mean_sojourn_s", "acceptance_ratio", "mean_wait_s", "utilisation",
                                      "deadline_hit_ratio", "initial_accuracy", "final_accuracy",
                                      "time_to_target_accuracy_s", "service_time_to_target_s", "target_hit_ratio")),
    "d2d_prompt_transfer": ExperimentView("d2d_prompt_transfer", "source of a target's prompt (none, edge, neighbour)",
                                          "variant", None,
                                          ("median_time_to_target_s", "target_hit_ratio", "negative_transfer_rate",
                                           "regret_start", "mean_start_metric", "mean_final_metric",
                                           "median_energy_to_target_j", "d2d_bytes", "cellular_bytes",
                                           "d2d_energy_j")),
}
"""The experiments with several variants per run."""


def _num(value) -> float:
    if isinstance(value, bool) or value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _mapping(summary: dict, key: str, where: str) -> dict:
    value = summary.get(key)
    if not isinstance(value, dict):
        raise ReportError(f"{where}: '{key}' must be a mapping (the summary.json is not one of a complete "
                          f"{summary.get('experiment')} run)")
    return value


def _lola_rows(summary: dict, where: str) -> list[dict]:
    lat = _mapping(summary, "mean_round_latency_s", where)
    alloc = summary.get("allocations") if isinstance(summary.get("allocations"), dict) else {}
    acc = summary.get("final_accuracy") if isinstance(summary.get("final_accuracy"), dict) else {}
    rows = []
    for name, value in lat.items():
        a = alloc.get(name) if isinstance(alloc.get(name), dict) else {}
        rows.append({"variant": str(name), "algorithm": str(name), "mean_round_latency_s": _num(value),
                     "p95_round_latency_s": _num(a.get("p95_round_latency_s")),
                     "planned_latency_s": _num(a.get("planned_latency_s")),
                     "final_accuracy": _num(acc.get(name))})
    return rows


def _aircomp_rows(summary: dict, where: str) -> list[dict]:
    runs = _mapping(summary, "runs", where)
    lat = summary.get("aggregation_latency_s") if isinstance(summary.get("aggregation_latency_s"), dict) else {}
    rows = []
    for uplink, per_k in runs.items():
        if not isinstance(per_k, dict):
            raise ReportError(f"{where}: runs.{uplink} must be a mapping of device counts")
        for k, run in per_k.items():
            run = run if isinstance(run, dict) else {}
            air = run.get("aircomp") if isinstance(run.get("aircomp"), dict) else {}
            rows.append({"variant": f"{uplink} K={k}", "uplink": str(uplink), "device_count": _num(k),
                         "aggregation_latency_s": _num((lat.get(uplink) or {}).get(k)
                                                       if isinstance(lat.get(uplink), dict) else None),
                         **{m: _num(run.get(m)) for m in ("final_accuracy", "best_accuracy", "initial_accuracy",
                                                           "sim_time_s", "total_device_energy_j",
                                                           "uplink_energy_j", "rounds_completed")},
                         "aircomp.mean_nmse": _num(air.get("mean_nmse")),
                         "aircomp.mean_receive_snr_db": _num(air.get("mean_receive_snr_db"))})
    rows.sort(key=lambda r: (r["uplink"] != "ofdma", r["device_count"]))
    return rows


def _neural_rows(summary: dict, where: str) -> list[dict]:
    runs = _mapping(summary, "runs", where)
    listed = summary.get("variants") if isinstance(summary.get("variants"), list) else []
    names = [n for n in listed if n in runs] + [n for n in runs if n not in listed]  # the experiment's order
    rows = []
    for name in names:
        run = runs[name] if isinstance(runs[name], dict) else {}
        air = run.get("aircomp") if isinstance(run.get("aircomp"), dict) else {}
        rows.append({"variant": str(name), "uplink": str(run.get("uplink", "")),
                     "receive_snr_db": _num(run.get("receive_snr_db")),
                     **{m: _num(run.get(m)) for m in ("final_accuracy", "best_accuracy", "initial_accuracy",
                                                       "sim_time_s", "mean_uplink_s", "uplink_energy_j", "steps")},
                     "aircomp.mean_nmse": _num(air.get("mean_nmse")),
                     "aircomp.mean_receive_snr_db": _num(air.get("mean_receive_snr_db"))})
    return rows


DEFT_METRICS = ("final_accuracy", "best_accuracy", "initial_accuracy", "sim_time_s", "rounds_completed",
                "uplink_bytes", "downlink_bytes", "device_flops_per_step", "peak_device_memory_bytes",
                "energy_per_device_j", "device_steps", "local_steps", "learning_rate")


def _ordered_variants(summary: dict, where: str) -> list[tuple[str, dict]]:
    """(name, metrics) of ``summary["variants"]`` in ``variant_order`` (names it misses last)."""
    variants = _mapping(summary, "variants", where)
    order = summary.get("variant_order") if isinstance(summary.get("variant_order"), list) else []
    names = [n for n in order if n in variants] + [n for n in variants if n not in order]
    return [(str(n), variants[n] if isinstance(variants[n], dict) else {}) for n in names]


def _deft_rows(summary: dict, where: str) -> list[dict]:
    rows = []
    for name, run in _ordered_variants(summary, where):
        edges = (run.get("split") or {}).get("edges") if isinstance(run.get("split"), dict) else None
        edge = next(iter(edges.values())) if isinstance(edges, dict) and edges else {}
        edge = edge if isinstance(edge, dict) else {}
        rows.append({"variant": str(name), **{m: _num(run.get(m)) for m in DEFT_METRICS},
                     "edge_utilisation": _num(edge.get("utilisation")),
                     "edge_mean_queue_delay_s": _num(edge.get("mean_queue_delay_s")),
                     "edge_mean_batch_size": _num(edge.get("mean_batch_size"))})
    return rows


SERVICE_METRICS = ("mean_sojourn_s", "mean_wait_s", "p95_wait_s", "acceptance_ratio", "blocking_ratio",
                   "deadline_hit_ratio", "utilisation", "goodput_per_s", "throughput_per_s", "initial_accuracy",
                   "final_accuracy", "final_balanced_accuracy", "time_to_target_accuracy_s",
                   "service_time_to_target_s", "examples_to_target", "target_hit_ratio", "mean_service_s",
                   "tuning_steps_per_request", "edge_flops_per_request")


def _service_rows(summary: dict, where: str) -> list[dict]:
    rows = []
    for name, run in _ordered_variants(summary, where):
        requests = run.get("requests") if isinstance(run.get("requests"), dict) else {}
        rows.append({"variant": str(name), **{m: _num(run.get(m)) for m in SERVICE_METRICS},
                     **{f"requests_{k}": _num(requests.get(k)) for k in ("arrived", "admitted", "completed",
                                                                          "met_deadline")}})
    return rows


D2D_METRICS = ("median_time_to_target_s", "median_energy_to_target_j", "target_hit_ratio", "negative_transfer_rate",
               "regret_start", "oracle_match_rate", "mean_start_metric", "mean_final_metric", "final_accuracy",
               "d2d_bytes", "d2d_energy_j", "cellular_bytes", "cellular_energy_j", "mean_steps", "no_source_in_reach")


def _d2d_rows(summary: dict, where: str) -> list[dict]:
    return [{"variant": str(name), **{m: _num(run.get(m)) for m in D2D_METRICS}}
            for name, run in _ordered_variants(summary, where)]


_ROWS = {"lola_compare": _lola_rows, "aircomp_vs_ofdma": _aircomp_rows, "neural_aircomp": _neural_rows,
         "federated_deft": _deft_rows, "prompt_service": _service_rows, "d2d_prompt_transfer": _d2d_rows}


def variant_rows(summary: dict, where: str = "summary.json") -> list[dict]:
    """One dict per variant of a multi-variant experiment's ``summary.json`` (see the module
    table); ``where`` names the file in errors."""
    experiment = summary.get("experiment")
    if experiment not in _ROWS:
        raise ReportError(f"{where}: experiment {str(experiment)[:40]!r} has no variants to report")
    return _ROWS[experiment](summary, where)


def variant_curves(summary: dict, events: pd.DataFrame) -> dict[str, tuple[pd.DataFrame, Optional[pd.DataFrame]]]:
    """Variant -> (accuracy curve with columns ``t_s, accuracy``, the variant's events or None).

    ``aircomp_vs_ofdma``: the events of each (``uplink_access``, ``device_count``);
    ``neural_aircomp``, ``federated_deft``: of each ``variant``; ``lola_compare``: ``summary.json``'s
    ``accuracy_vs_time`` (only with ``lola.train_rounds > 0``; no events: the LoLa event log
    holds the simulated rounds, not the training)."""
    experiment = summary.get("experiment")
    out: dict[str, tuple[pd.DataFrame, Optional[pd.DataFrame]]] = {}
    if experiment == "aircomp_vs_ofdma" and {"uplink_access", "device_count"} <= set(events.columns):
        for (uplink, k), ev in events.groupby(["uplink_access", "device_count"], sort=False):
            out[f"{uplink} K={k}"] = (accuracy_curve(ev)[["t_s", "accuracy"]].reset_index(drop=True), ev)
    elif experiment in ("neural_aircomp", "federated_deft") and "variant" in events.columns:
        for name, ev in events.groupby("variant", sort=False):
            out[str(name)] = (accuracy_curve(ev)[["t_s", "accuracy"]].reset_index(drop=True), ev)
    elif experiment == "prompt_service" and "variant" in events.columns:
        for name, ev in events.groupby("variant", sort=False):
            out[str(name)] = (service_curve(ev), None)
    elif experiment == "d2d_prompt_transfer" and "variant" in events.columns:
        for name, ev in events.groupby("variant", sort=False):
            out[str(name)] = (targets_curve(ev), None)
    elif experiment == "lola_compare" and isinstance(summary.get("accuracy_vs_time"), dict):
        for name, points in summary["accuracy_vs_time"].items():
            try:
                frame = pd.DataFrame([[float(t), float(a)] for t, a in points], columns=["t_s", "accuracy"])
            except (TypeError, ValueError):
                raise ReportError(f"summary.json: accuracy_vs_time.{str(name)[:40]} must be a list of "
                                  "[t_s, accuracy] pairs") from None
            out[str(name)] = (frame, None)
    return out


def mean_step_curve(per: list, points: int = 100) -> pd.DataFrame:
    """Mean of step functions: ``per`` holds one (x, y) pair of arrays per request (x sorted);
    each holds y[i] from x[i] until its next point and its last value after, and is undefined
    before x[0]. Returns columns ``x``, ``y``: the mean over the functions defined there, on
    ``points`` values from 0 to the largest x."""
    import warnings

    import numpy as np

    if not per:
        return pd.DataFrame({"x": [], "y": []})
    grid = np.linspace(0.0, max(float(np.max(x)) for x, _ in per), points)
    rows = []
    for x, y in per:
        i = np.searchsorted(np.asarray(x, dtype=float), grid, side="right") - 1
        rows.append(np.where(i >= 0, np.asarray(y, dtype=float)[np.clip(i, 0, None)], np.nan))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # no function defined yet at small x
        mean = np.nanmean(np.vstack(rows), axis=0)
    keep = np.isfinite(mean)
    return pd.DataFrame({"x": grid[keep], "y": mean[keep]})


def service_curve(events: pd.DataFrame, points: int = 100) -> pd.DataFrame:
    """Mean accuracy of the served requests against time since their service start (columns
    ``t_s``, ``accuracy``; :func:`mean_step_curve`): each request's ``evaluate`` events
    (``round`` = request id) from its start, the end of its ``request_wait``."""
    start = events[events["kind"] == "request_wait"]
    start = dict(zip(start["round"], start["t_s"] + start["duration_s"]))
    ev = events[(events["kind"] == "evaluate") & events["round"].isin(list(start))]
    per = [(g["t_s"].to_numpy() - start[r], g["accuracy"].to_numpy()) for r, g in ev.groupby("round", sort=True)]
    curve = mean_step_curve(per, points)
    return pd.DataFrame({"t_s": curve["x"].to_numpy(), "accuracy": curve["y"].to_numpy()})


def targets_curve(events: pd.DataFrame, points: int = 100) -> pd.DataFrame:
    """Mean accuracy of the D2D transfer targets against simulated time since they got their
    task (columns ``t_s``, ``accuracy``; :func:`mean_step_curve`): each target's ``evaluate``
    events (``round`` = the target device)."""
    ev = events[events["kind"] == "evaluate"]
    per = [(g["t_s"].to_numpy(), g["accuracy"].to_numpy()) for _, g in ev.groupby("round", sort=True)]
    curve = mean_step_curve(per, points)
    return pd.DataFrame({"t_s": curve["x"].to_numpy(), "accuracy": curve["y"].to_numpy()})


def curve_time_to(curve: pd.DataFrame, target: float) -> Optional[float]:
    """First time a curve (``t_s``, ``accuracy``) reached ``target`` (None if never) [s]."""
    hit = curve[curve["accuracy"] >= target]
    return None if hit.empty else float(hit["t_s"].iloc[0])


def variant_target_metrics(curve: pd.DataFrame, events: Optional[pd.DataFrame], target: float) -> dict:
    """Time-to-target (from the curve or the events) and energy-to-target (events only)."""
    t = time_to_accuracy_s(events, target) if events is not None else curve_time_to(curve, target)
    e = energy_to_accuracy_j(events, target) if events is not None else None
    return {"time_to_target_s": math.nan if t is None else t, "energy_to_target_j": math.nan if e is None else e,
            "target_reached": t is not None}
