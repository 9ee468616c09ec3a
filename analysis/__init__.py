"""analysis: results folders -> pandas DataFrames, headline metrics and plots.

Reads only files (``events.parquet``, ``summary.json``, ``scenario.json``); never runs the
simulator, so old runs stay readable.
"""
from .load import load_events, load_run, load_runs
from .metrics import energy_per_device_j, round_breakdown, summarize, time_to_accuracy_s

__all__ = ["energy_per_device_j", "load_events", "load_run", "load_runs", "round_breakdown", "summarize",
           "time_to_accuracy_s"]
