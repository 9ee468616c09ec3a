"""analysis: results folders -> pandas DataFrames, headline metrics and plots.

Reads only files (``events.parquet``, ``summary.json``, ``scenario.json``, a sweep's
``sweep.json``/``runs.parquet``); never runs the simulator, so old runs stay readable. A missing,
truncated or malformed file is a :class:`ReportError` naming it.
"""
from .files import ReportError
from .labels import field_label
from .load import load_events, load_run, load_runs
from .metrics import (choose_target, energy_per_device_j, energy_to_accuracy_j, latency_breakdown, mean_ci,
                      pareto_mask, round_breakdown, seed_spread, summarize, time_to_accuracy_s)
from .report import build_report, load_variants
from .sweep import load_sweep, load_sweep_events

__all__ = ["ReportError", "build_report", "choose_target", "energy_per_device_j", "energy_to_accuracy_j",
           "field_label", "latency_breakdown", "load_events", "load_run", "load_runs", "load_sweep",
           "load_sweep_events", "load_variants", "mean_ci", "pareto_mask", "round_breakdown", "seed_spread",
           "summarize", "time_to_accuracy_s"]
