"""analysis: results folders -> pandas DataFrames, headline metrics and plots.

Reads only files (``events.parquet``, ``summary.json``, ``scenario.json``, a sweep's
``sweep.json``/``runs.parquet``); never runs the simulator, so old runs stay readable.
"""
from .load import load_events, load_run, load_runs
from .metrics import (energy_per_device_j, energy_to_accuracy_j, latency_breakdown, mean_ci, pareto_mask,
                      round_breakdown, summarize, time_to_accuracy_s)
from .report import build_report
from .sweep import load_sweep, load_sweep_events

__all__ = ["build_report", "energy_per_device_j", "energy_to_accuracy_j", "latency_breakdown", "load_events",
           "load_run", "load_runs", "load_sweep", "load_sweep_events", "mean_ci", "pareto_mask", "round_breakdown",
           "summarize", "time_to_accuracy_s"]
