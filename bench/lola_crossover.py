"""Markdown tables of the LoLa crossover sweeps: where cooperative block fine-tuning (crunch,
jbba) beats computation offloading on mean per-round latency, and where it does not.

    deftsim sweep scenarios/sweep_lola_crossover.yaml --out /tmp/lola_x
    deftsim sweep scenarios/sweep_lola_long_text.yaml --out /tmp/lola_lt
    python bench/lola_crossover.py /tmp/lola_x /tmp/lola_lt

Reads each sweep folder's ``runs.parquet`` (one row per run, the swept fields and the
``mean_round_latency_s.<algorithm>`` of every run's summary.json) and prints, per sweep, one
table per (devices K, blocks N) with one row per value of the swept size field and one column
per edge speed. A cell is ``offloading / crunch`` latency in ms; **bold** when cooperative
fine-tuning (crunch) is faster. Ends with ``RESULT runs=R coop_wins=W offloading_wins=L``.
The sweeps use the fake trainer (analytic depth profile): simulated time only, no training, so
the tables are the same on any machine up to float rounding.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

EDGE = "edge_servers.0.compute_flops_per_s"
SIZE_FIELDS = ("lola.offload_bytes_per_sample", "model.max_length_tokens")  # the row field of a sweep


def load_runs(folder: Path) -> pd.DataFrame:
    """One row per successful run with the columns K, N, edge_tflops, offloading_ms, crunch_ms,
    jbba_ms and the sweep's size field (``row``, with its name in ``row_field``)."""
    path = folder / "runs.parquet"
    if not path.is_file():
        raise SystemExit(f"{path}: no runs.parquet (run `deftsim sweep ... --out {folder}` first)")
    runs = pd.read_parquet(path)
    runs = runs[runs["status"] == "ok"]
    row_field = next((f for f in SIZE_FIELDS if f in runs.columns), None)
    if row_field is None or EDGE not in runs.columns:
        raise SystemExit(f"{path}: expected the swept fields {EDGE} and one of {SIZE_FIELDS}")
    out = pd.DataFrame({
        "K": runs["num_devices"].astype(int),
        "N": runs["num_blocks"].astype(int),
        "edge_tflops": runs[EDGE] / 1e12,
        "row": runs[row_field],
        **{f"{a}_ms": runs[f"mean_round_latency_s.{a}"] * 1e3 for a in ("offloading", "crunch", "jbba")},
    })
    out.attrs["row_field"] = row_field
    return out


def cell(off_ms: float, crunch_ms: float) -> str:
    text = f"{off_ms:.0f} / {crunch_ms:.0f}"
    return f"**{text}**" if crunch_ms < off_ms else text


def tables(runs: pd.DataFrame) -> str:
    """The markdown tables of one sweep (see the module docstring)."""
    row_field = runs.attrs["row_field"]
    edges = sorted(runs["edge_tflops"].unique())
    parts = []
    for (k, n), group in runs.groupby(["K", "N"], sort=True):
        jbba = group["jbba_ms"].unique()
        note = f" (jbba: {jbba[0]:.0f} ms)" if len(jbba) == 1 else ""
        lines = [f"K = {k} devices, N = {n} blocks{note}", "",
                 f"| {row_field} \\ edge TFLOP/s | " + " | ".join(f"{e:g}" for e in edges) + " |",
                 "|---|" + "---|" * len(edges)]
        for value, row in group.groupby("row", sort=True):
            by_edge = row.set_index("edge_tflops")
            cells = [cell(by_edge.at[e, "offloading_ms"], by_edge.at[e, "crunch_ms"]) if e in by_edge.index else "-"
                     for e in edges]
            lines.append(f"| {value:g} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="sweep folders (deftsim sweep --out)")
    args = ap.parse_args(argv)
    total = wins = 0
    for folder in args.folders:
        runs = load_runs(folder)
        print(f"## {folder}\n\ncell: offloading / crunch mean round latency [ms]; bold: crunch faster\n")
        print(tables(runs) + "\n")
        total += len(runs)
        wins += int((runs["crunch_ms"] < runs["offloading_ms"]).sum())
    print(f"RESULT runs={total} coop_wins={wins} offloading_wins={total - wins}")


if __name__ == "__main__":
    main(sys.argv[1:])
