"""Figures (matplotlib, Agg backend: no screen needed)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .metrics import accuracy_curve


def plot_accuracy_vs_time(events: pd.DataFrame, path: Path, title: str = "", chance: float | None = None) -> Path:
    """Test accuracy of the global model against simulated time, written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = accuracy_curve(events)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(curve["t_s"], curve["accuracy"], marker="o", ms=3, label="global model (test)")
    if chance is not None:
        ax.axhline(chance, color="grey", ls="--", lw=1, label="chance")
    ax.set_xlabel("simulated time [s]")
    ax.set_ylabel("test accuracy [-]")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)
    return Path(path)
