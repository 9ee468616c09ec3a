"""Console summary table of one run."""
from __future__ import annotations

import click


def _fmt_s(x) -> str:
    return "never" if x is None else f"{x:.3f} s"


def print_summary(summary: dict, out_dir: str) -> None:
    energy = summary["energy_per_device_j"]
    rows = [
        ("stop reason", summary["stop_reason"]),
        ("rounds completed", str(summary["rounds_completed"])),
        ("test accuracy: chance / round 0 / final",
         f"{summary['chance_accuracy']:.3f} / {summary['initial_accuracy']:.3f} / {summary['final_accuracy']:.3f}"),
        ("trained above round 0 and chance", "yes" if summary["trained_above_initial_and_chance"] else "NO"),
        ("simulated time to final accuracy", _fmt_s(summary["time_to_final_accuracy_s"])),
        ("simulated time in all", _fmt_s(summary["sim_time_s"])),
        ("energy per device: mean / max",
         f"{summary['mean_device_energy_j']:.3f} J / {max(energy.values(), default=0.0):.3f} J"),
        ("device time computing / transmitting",
         f"{100 * summary['compute_share']:.1f}% / {100 * summary['communication_share']:.1f}%"),
    ]
    if summary.get("target_accuracy") is not None:
        rows.insert(5, (f"time to target accuracy {summary['target_accuracy']}", _fmt_s(summary["time_to_target_accuracy_s"])))
    if summary["memory_exceeded_devices"]:
        rows.append(("devices that could not hold the job", ", ".join(summary["memory_exceeded_devices"])))
    width = max(len(k) for k, _ in rows)
    click.echo("")
    for k, v in rows:
        click.echo(f"  {k:<{width}}  {v}")
    click.echo(f"\n  results: {out_dir}/ (events.parquet, summary.json, scenario.json, accuracy_vs_time.png)")
