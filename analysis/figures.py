"""Drawing helpers shared by the report's figures (matplotlib, Agg backend: no screen needed).

- :class:`FigureWriter` saves a figure in every requested format (PNG, PDF, SVG) with fixed
  metadata, so the same data gives the same files, and returns the PNG bytes the HTML embeds.
- :func:`mean_band` draws the mean over seeds of accuracy curves with a band.
- :func:`spread_errorbar` draws means over seeds with error bars: a 95 % Student-t interval with
  3 or more seeds (clipped to the metric's range), the seeds' range with 2, none with 1.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from .files import ReportError, write_bytes_atomic
from .metrics import metric_bounds, seed_spread

FORMATS = ("png", "pdf", "svg")
"""Figure formats the report can write."""

_METADATA = {"png": {"Software": None}, "pdf": {"Creator": None, "Producer": None, "CreationDate": None},
             "svg": {"Creator": None, "Date": None}}


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    pyplot.rcParams["svg.hashsalt"] = "deftsim"  # stable element ids: same data, same SVG
    return pyplot


def check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    """The requested figure formats, lower-cased and deduplicated; a :class:`ReportError` for
    an unknown one or an empty list."""
    out = []
    for f in formats:
        name = str(f).strip().lower().lstrip(".")
        if name not in FORMATS:
            raise ReportError(f"figure format {str(f)[:20]!r} is not one of {', '.join(FORMATS)}")
        if name not in out:
            out.append(name)
    if not out:
        raise ReportError(f"no figure format given; choose from {', '.join(FORMATS)}")
    return tuple(out)


@dataclass
class FigureWriter:
    """Saves figures as ``<stem>.<format>`` in ``out`` for each of ``formats``."""
    out: Path
    formats: tuple[str, ...] = ("png",)
    dpi: int = 110
    written: list[str] = field(default_factory=list)

    def save(self, fig, stem: str) -> bytes:
        """Write ``fig`` in every format, close it, and return its PNG bytes (for embedding)."""
        pyplot = plt()
        png = None
        try:
            for fmt in dict.fromkeys(("png",) + self.formats):
                buf = io.BytesIO()
                fig.savefig(buf, format=fmt, dpi=self.dpi, metadata=_METADATA[fmt])
                data = buf.getvalue()
                if fmt == "png":
                    png = data
                if fmt in self.formats:
                    write_bytes_atomic(self.out / f"{stem}.{fmt}", data)
                    self.written.append(f"{stem}.{fmt}")
        finally:
            pyplot.close(fig)
        return png

    def remove_stale(self, patterns: Sequence[str]) -> None:
        """Delete figures of an earlier report (every format) matching the glob ``patterns``."""
        for pattern in patterns:
            for fmt in FORMATS:
                for old in self.out.glob(f"{pattern}.{fmt}"):
                    try:
                        old.unlink()
                    except OSError:
                        pass


def colors(n: int):
    """``n`` distinguishable colours (tab10, tab20, then viridis)."""
    pyplot = plt()
    if n <= 10:
        cmap = pyplot.get_cmap("tab10")
        return [cmap(i) for i in range(n)]
    if n <= 20:
        cmap = pyplot.get_cmap("tab20")
        return [cmap(i) for i in range(n)]
    cmap = pyplot.get_cmap("viridis")
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def aligned_mean(curves: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Mean over seeds of accuracy curves (columns ``t_s``, ``accuracy``), aligned by the
    evaluation's index (the k-th evaluation of every run: round k for FedAvg).

    Columns ``index, t_s`` (mean time of the k-th evaluation over the runs that have one),
    ``accuracy`` (their mean accuracy), ``low``/``high`` (the band: 95 % t-interval clipped to
    [0, 1] with 3 or more runs, else the runs' min and max), ``n`` (runs with a k-th evaluation)."""
    rows = []
    longest = max((len(c) for c in curves), default=0)
    for k in range(longest):
        at = [c.iloc[k] for c in curves if len(c) > k]
        acc = seed_spread([float(a["accuracy"]) for a in at], bounds=(0.0, 1.0))
        t = float(np.mean([float(a["t_s"]) for a in at]))
        low, high = (acc["low"], acc["high"]) if acc["kind"] in ("ci", "range") else (acc["mean"], acc["mean"])
        rows.append({"index": k, "t_s": t, "accuracy": acc["mean"], "low": low, "high": high, "n": acc["n"]})
    return pd.DataFrame(rows, columns=["index", "t_s", "accuracy", "low", "high", "n"])


def mean_band(ax, curves: Sequence[pd.DataFrame], color, label: Optional[str], *, seeds_lines: bool = True,
              marker: str = "o") -> None:
    """Draw each seed's curve thin and faint, the mean over seeds as a line and (2 or more seeds)
    a band between ``low`` and ``high`` of :func:`aligned_mean`."""
    curves = [c for c in curves if len(c)]
    if not curves:
        return
    if len(curves) == 1:
        c = curves[0]
        ax.plot(c["t_s"], c["accuracy"], color=color, lw=1.4, marker=marker, ms=2.5, label=label)
        return
    if seeds_lines:
        for c in curves:
            ax.plot(c["t_s"], c["accuracy"], color=color, lw=0.6, alpha=0.3)
    mean = aligned_mean(curves)
    ax.fill_between(mean["t_s"], mean["low"], mean["high"], color=color, alpha=0.18, lw=0)
    ax.plot(mean["t_s"], mean["accuracy"], color=color, lw=1.6, marker=marker, ms=2.5, label=label)


def spread_errorbar(ax, xs: Sequence[float], groups: Sequence[Sequence[float]], metric: str, color, label,
                    *, connect: bool = True, marker: str = "o", ls: str = "-") -> list[dict]:
    """Means over seeds at ``xs`` with error bars from :func:`analysis.metrics.seed_spread`
    (bounds by the metric's name); hollow markers where fewer values than the others. Returns
    the spreads drawn."""
    bounds = metric_bounds(metric)
    spreads = [seed_spread(g, bounds=bounds) for g in groups]
    keep = [i for i, s in enumerate(spreads) if s["n"] > 0]
    if not keep:
        return []
    x = np.array([xs[i] for i in keep], dtype=float)
    m = np.array([spreads[i]["mean"] for i in keep])
    lo = np.array([spreads[i]["mean"] - spreads[i]["low"] if np.isfinite(spreads[i]["low"]) else 0.0 for i in keep])
    hi = np.array([spreads[i]["high"] - spreads[i]["mean"] if np.isfinite(spreads[i]["high"]) else 0.0 for i in keep])
    yerr = [np.maximum(lo, 0), np.maximum(hi, 0)] if (lo > 0).any() or (hi > 0).any() else None
    ax.errorbar(x, m, yerr=yerr, color=color, capsize=3, lw=1.2,
                ls=ls if connect else "none", marker=None, label=label)
    full = np.array([spreads[i]["n"] == len([v for v in groups[i] if v is not None]) for i in keep])
    ax.scatter(x[full], m[full], color=color, zorder=3, s=22, marker=marker)
    ax.scatter(x[~full], m[~full], facecolors="white", edgecolors=color, zorder=3, s=22, marker=marker)
    return [spreads[i] for i in keep]


def spread_note(kinds: set) -> str:
    """Caption words for the error bars drawn (the kinds of :func:`seed_spread` met)."""
    parts = []
    if "ci" in kinds:
        parts.append("95% Student-t CI with 3 or more seeds")
    if "range" in kinds:
        parts.append("min-max range with 2 seeds (too few for a CI)")
    if "single" in kinds:
        parts.append("no bar with 1 seed")
    return "; ".join(parts) or "no values"


def is_numeric(values) -> bool:
    """True if every value is a finite int/float (not a bool, not text): drawn on a numeric axis;
    otherwise the values are categories."""
    return len(values) > 0 and all(
        isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
        and np.isfinite(v) for v in values)


def category_text(v) -> str:
    """A category's tick label (booleans as true/false, lists left as JSON text)."""
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "(unset)"
    return str(v)
