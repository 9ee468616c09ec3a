"""Depth cost profile as a table and a figure.

``profile_table(profile)`` returns one row per PEFT block (block 0 next to the output) with the
layers, forward/backward/step FLOPs, saved activations, trainable bytes and job memory, in the
units named by the column; ``plot_profile(profile, path)`` draws step GFLOP and job memory
against the block depth (PNG, matplotlib Agg). Accepts a
:class:`netsim.lola.profile.DepthProfile` or its ``to_dict()``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import pandas as pd

from netsim.lola.profile import DepthProfile


def _as_profile(profile: Union[DepthProfile, dict]) -> DepthProfile:
    return profile if isinstance(profile, DepthProfile) else DepthProfile.from_dict(profile)


def profile_table(profile: Union[DepthProfile, dict]) -> pd.DataFrame:
    """Columns: block, layers, depth_layers (layers from the output down to the block's lowest
    layer), forward_GFLOP, backward_GFLOP, step_GFLOP, activation_MB, trainable_kB, memory_MB,
    plus the profile source and batch shape."""
    p = _as_profile(profile)
    top = max(max(b) for b in p.layers) + 1
    return pd.DataFrame({
        "block": np.arange(p.num_blocks),
        "layers": ["-".join(str(i) for i in (min(b), max(b))) if len(b) > 1 else str(b[0]) for b in p.layers],
        "depth_layers": [top - min(b) for b in p.layers],
        "forward_GFLOP": p.forward_flops / 1e9,
        "backward_GFLOP": np.asarray(p.backward_flops) / 1e9,
        "step_GFLOP": p.step_flops() / 1e9,
        "activation_MB": np.asarray(p.activation_bytes) / 1e6,
        "trainable_kB": np.asarray(p.trainable_bytes) / 1e3,
        "memory_MB": p.memory_bytes() / 1e6,
        "source": p.source,
        "batch": p.batch_size,
        "seq_len": p.seq_len,
    })


def plot_profile(profile: Union[DepthProfile, dict], path: Union[str, Path], title: str = "") -> Path:
    """Step FLOPs (forward + backward to the block's depth) and job memory per block vs the
    depth of the block's lowest layer below the output; writes a PNG and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = profile_table(profile)
    fig, ax = plt.subplots(figsize=(6.0, 3.8), dpi=120)
    x = t["depth_layers"]
    ax.plot(x, t["step_GFLOP"], "o-", color="tab:blue", label="step FLOPs (fwd + bwd)")
    ax.plot(x, t["backward_GFLOP"], "s--", color="tab:cyan", label="backward FLOPs")
    ax.set_xlabel("depth of the trained block: layers from the output down [-]")
    ax.set_ylabel("FLOPs per step [GFLOP]")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(x, t["memory_MB"], "^-", color="tab:orange", label="job memory")
    ax2.set_ylabel("job memory [MB]")
    for i, row in t.iterrows():
        ax.annotate(f"blk {row['block']} (L{row['layers']})", (row["depth_layers"], row["step_GFLOP"]),
                    textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="lower right")
    ax.set_title(title or f"depth cost profile ({t['source'][0]}, batch {t['batch'][0]} x {t['seq_len'][0]} tokens)",
                 fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)
    return path


__all__ = ["plot_profile", "profile_table"]
