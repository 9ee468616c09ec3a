"""Strict JSON for every file deftsim writes.

JSON has no NaN or infinity, and ``json.dumps`` would write the non-standard tokens ``NaN`` and
``Infinity`` that many readers (browsers, ``jq``, other languages) refuse. Two conventions:

- **metrics** (``summary.json``, ``timing.json``, ...): a non-finite number is written as
  ``null`` (unknown or unbounded: e.g. the receive SNR of a noiseless link);
- **scenario values** (``scenario.json``, ``params.json``, ``sweep.json``): ``+inf`` / ``-inf``
  are written as the strings ``"inf"`` / ``"-inf"``, which the one field that allows them
  (``aircomp.receive_snr_db``) reads back; NaN is never a valid scenario value.
"""
from __future__ import annotations

import json
import math
from typing import Any, Literal

import numpy as np

NonFinite = Literal["null", "string"]


def finite_json_value(obj: Any, nonfinite: NonFinite = "null") -> Any:
    """``obj`` with every non-finite float replaced (recursively through dicts, lists and
    tuples); numpy scalars become Python numbers."""
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        if nonfinite == "string" and not math.isnan(obj):
            return "inf" if obj > 0 else "-inf"
        return None
    if isinstance(obj, dict):
        return {k: finite_json_value(v, nonfinite) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json_value(v, nonfinite) for v in obj]
    return obj


def dumps_strict(obj: Any, nonfinite: NonFinite = "null", **kwargs) -> str:
    """``json.dumps`` that never writes NaN/Infinity (see the module docstring)."""
    kwargs.setdefault("indent", 2)
    kwargs.setdefault("sort_keys", True)
    return json.dumps(finite_json_value(obj, nonfinite), allow_nan=False, **kwargs)
