"""Console summary table of one run."""
from __future__ import annotations

import click


def _fmt_s(x) -> str:
    return "never" if x is None else f"{x:.3f} s"


def _files(out_dir: str) -> str:
    """The results folder and what it holds (figures included), for the last console line."""
    from pathlib import Path

    names = sorted(p.name for p in Path(out_dir).iterdir() if p.is_file() and not p.name.startswith("."))
    return f"\n  results: {out_dir}/ ({', '.join(names)})"


def print_comparison(summary: dict, out_dir: str) -> None:
    """Console table of an uplink comparison (experiment ``aircomp_vs_ofdma``)."""
    lat, acc = summary["aggregation_latency_s"], summary["final_accuracy"]
    energy, nmse = summary.get("total_device_energy_j"), summary.get("aircomp_nmse")
    click.echo("")
    click.echo(f"  {'K':>5}  {'OFDMA air time':>15}  {'AirComp air time':>16}  {'ratio':>7}  "
               f"{'acc OFDMA':>9}  {'acc AirComp':>11}  {'energy OFDMA':>12}  {'energy AirComp':>14}  "
               f"{'AirComp NMSE':>12}")
    for k in summary["device_counts"]:
        key = str(k)
        extra = (f"  {energy['ofdma'][key]:>10.2f} J  {energy['aircomp'][key]:>12.2f} J  {nmse[key]:>12.4f}"
                 if energy and nmse else "")
        click.echo(f"  {k:>5}  {1e3 * lat['ofdma'][key]:>12.2f} ms  {1e3 * lat['aircomp'][key]:>13.2f} ms  "
                   f"{lat['ofdma'][key] / lat['aircomp'][key]:>7.1f}  {acc['ofdma'][key]:>9.3f}  "
                   f"{acc['aircomp'][key]:>11.3f}" + extra)
    click.echo("  (air time: mean per round to collect every update; energy: all devices, whole run)")
    click.echo(_files(out_dir))


def print_lola(summary: dict, out_dir: str) -> None:
    """Console table of experiment ``lola_compare``: mean per-round latency per algorithm."""
    lat = summary["mean_round_latency_s"]
    acc = summary.get("final_accuracy") if isinstance(summary.get("final_accuracy"), dict) else {}
    best = min(lat.values())
    click.echo("")
    click.echo(f"  {'algorithm':<16} {'mean round latency':>19}  {'vs best':>8}" + (f"  {'final acc':>9}" if acc else ""))
    for name, value in lat.items():
        trained = (f"  {acc[name]:>9.3f}" if name in acc else f"  {'-':>9}") if acc else ""
        click.echo(f"  {name:<16} {1e3 * value:>16.2f} ms  {value / best:>7.2f}x" + trained)
    if acc:
        click.echo(f"  (final acc: after {summary.get('train_rounds', '?')} rounds of real block fine-tuning)")
    click.echo(_files(out_dir))


def print_neural(summary: dict, out_dir: str) -> None:
    """Console table of experiment ``neural_aircomp``: accuracy, simulated time and uplink time
    per step of every connection variant."""
    click.echo("")
    click.echo(f"  {'variant':<22} {'final acc':>9}  {'sim time':>10}  {'uplink/step':>12}")
    for name in summary["variants"]:
        click.echo(f"  {name:<22} {summary['final_accuracy'][name]:>9.3f}  {summary['sim_time_s'][name]:>9.3f}s  "
                   f"{1e3 * summary['uplink_latency_s'][name]:>9.3f} ms")
    click.echo(_files(out_dir))


def print_deft(summary: dict, out_dir: str) -> None:
    """Console table of experiment ``federated_deft``: accuracy, time to target and the device's
    costs per variant."""
    target = summary.get("target_accuracy")
    click.echo("")
    click.echo(f"  {'variant':<13} {'final acc':>9}  {'time to ' + (f'{target:g}' if target else 'target'):>12}  "
               f"{'memory':>9}  {'uplink':>9}  {'downlink':>9}  {'GFLOP/step':>10}  {'energy/dev':>10}")
    for name in summary["variant_order"]:
        v = summary["variants"][name]
        t = v.get("time_to_target_accuracy_s")
        click.echo(f"  {name:<13} {v['final_accuracy']:>9.3f}  {'never' if t is None else f'{t:.2f} s':>12}  "
                   f"{v['peak_device_memory_bytes'] / 1e6:>6.1f} MB  {v['uplink_bytes'] / 1e6:>6.2f} MB  "
                   f"{v['downlink_bytes'] / 1e6:>6.2f} MB  {v['device_flops_per_step'] / 1e9:>10.3f}  "
                   f"{v['energy_per_device_j']:>8.2f} J")
    click.echo("  (uplink/downlink: all devices, whole run; memory: one device's job at the longest text)")
    click.echo(_files(out_dir))


def print_service(summary: dict, out_dir: str) -> None:
    """Console tables of experiment ``prompt_service``: the queue of each variant, then accuracy
    and time to target."""
    def seconds(t):
        return "never" if t is None else f"{t:.3f} s"

    click.echo("")
    click.echo(f"  {'variant':<12} {'arrived':>7} {'admitted':>8} {'completed':>9} {'met dl':>6}  {'mean wait':>10}  "
               f"{'mean sojourn':>12}  {'utilisation':>11}")
    for name in summary["variant_order"]:
        v = summary["variants"][name]
        r = v["requests"]
        click.echo(f"  {name:<12} {r['arrived']:>7} {r['admitted']:>8} {r['completed']:>9} {r['met_deadline']:>6}  "
                   f"{v['mean_wait_s']:>8.3f} s  {v['mean_sojourn_s']:>10.3f} s  {v['utilisation']:>11.3f}")
    click.echo("")
    click.echo(f"  {'variant':<12} {'first answer':>12} {'final acc':>9} {'reached':>7}  {'to target':>10}  "
               f"{'in service':>10}  {'examples':>8}  {'steps':>5}")
    for name in summary["variant_order"]:
        v = summary["variants"][name]
        examples = v.get("examples_to_target")
        click.echo(f"  {name:<12} {_num(v['initial_accuracy']):>12} {_num(v['final_accuracy']):>9} "
                   f"{_num(v['target_hit_ratio'], '.0%'):>7}  {seconds(v['time_to_target_accuracy_s']):>10}  "
                   f"{seconds(v['service_time_to_target_s']):>10}  "
                   f"{'never' if examples is None else f'{examples:.0f}':>8}  {_num(v['tuning_steps_per_request'], '.1f'):>5}")
    click.echo(f"  (means over the served requests; times to target are medians from arrival and from service start; "
               f"top-level queue metrics: {summary.get('served_with')})")
    click.echo(_files(out_dir))


def print_d2d(summary: dict, out_dir: str) -> None:
    """Console table of experiment ``d2d_prompt_transfer``: per variant, time and energy to
    target, the choice's quality and the bytes it moved."""
    def seconds(t):
        return "never" if t is None else f"{t:.3f} s"

    click.echo("")
    click.echo(f"  {'variant':<16} {'reached':>7}  {'median to target':>16}  {'energy':>9}  {'start':>5}  {'final':>5}  "
               f"{'negative':>8}  {'regret':>6}  {'D2D bytes':>9}  {'cell bytes':>10}")
    for name in summary["variant_order"]:
        v = summary["variants"][name]
        energy = v["median_energy_to_target_j"]
        click.echo(f"  {name:<16} {_num(v['target_hit_ratio'], '.0%'):>7}  {seconds(v['median_time_to_target_s']):>16}  "
                   f"{'never' if energy is None else f'{energy:.3f} J':>9}  {_num(v['mean_start_metric'], '.2f'):>5}  "
                   f"{_num(v['mean_final_metric'], '.2f'):>5}  {_num(v['negative_transfer_rate'], '.0%'):>8}  "
                   f"{_num(v['regret_start'], '.3f'):>6}  {v['d2d_bytes']:>9,}  {v['cellular_bytes']:>10,}")
    sg = summary.get("similarity_gain") or {}
    rho = sg.get("spearman")
    click.echo(f"  ({len(summary['targets'])} targets; {summary['target_metric'].replace('_', ' ')} target "
               f"{summary['target_accuracy']}; start/final: mean metric when tuning starts and at the end; negative: "
               f"later than scratch; Spearman(similarity, gain) = {_num(rho, '.2f')} over {len(sg.get('pairs', []))} "
               f"pairs)")
    click.echo(_files(out_dir))


def _num(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


PRINTERS = {"aircomp_vs_ofdma": print_comparison, "lola_compare": print_lola, "neural_aircomp": print_neural,
            "federated_deft": print_deft, "prompt_service": print_service, "d2d_prompt_transfer": print_d2d}
"""Experiment name -> console printer; experiments not listed (``fedavg``) use :func:`print_fedavg`."""


def print_summary(summary: dict, out_dir: str) -> None:
    """Console summary of a run, by the experiment named in ``summary.json`` (``fedavg`` if none)."""
    PRINTERS.get(summary.get("experiment", "fedavg"), print_fedavg)(summary, out_dir)


def _dynamics_rows(summary: dict) -> list[tuple[str, str]]:
    """Console rows of the protocols' faults, staleness, handovers and batching, where they
    apply (a key missing from an older summary.json, or zero, is left out)."""
    rows = []
    lost = [summary.get(k, 0) or 0 for k in ("dropped_updates", "late_updates", "stale_updates")]
    if any(lost):
        rows.append(("updates lost: offline / late / stale", " / ".join(str(int(n)) for n in lost)))
    if summary.get("protocol") == "async_fl":
        rows.append(("server steps; mean staleness of their updates",
                     f"{summary.get('server_steps', 0)}; {summary.get('stale_updates_mean', 0.0):.2f} steps"))
    if summary.get("handovers"):
        rows.append(("handovers between edge servers", str(int(summary["handovers"]))))
    engine = summary.get("engine") or {}
    if engine.get("passes"):
        rows.append(("local jobs per batched pass: mean / largest",
                     f"{engine['mean_jobs_per_pass']:.2f} / {engine['largest_pass']} ({engine['jobs_run']} jobs run, "
                     f"{engine['jobs_cancelled']} cancelled)"))
    return rows


def _cost_rows(summary: dict) -> list[tuple[str, str]]:
    """Which model's counted costs drove the timeline (``model.cost_model``), one line per model."""
    if summary.get("costs_from") != "cost_model":
        return []
    rows = []
    for key, label in (("cost_model", "timeline costs from"), ("trained_model", "accuracy from (trained)")):
        c = summary[key]
        rows.append((label, f"{c['name']}: {c['parameters'] / 1e9:.3g} B parameters, {c['flops_per_step'] / 1e12:.3g} TFLOP "
                            f"and {c['peak_memory_bytes'] / 1e9:.3g} GB per step, {c['payload_bytes'] / 1e6:.3g} MB payload"))
    return rows


def print_fedavg(summary: dict, out_dir: str) -> None:
    """Console table of a FedAvg run."""
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
    air = summary.get("aircomp")
    if air and air.get("rounds_aggregated"):
        rows.append(("over-the-air: receive SNR / NMSE / truncated",
                     f"{air['mean_receive_snr_db']:.1f} dB / {air['mean_nmse']:.4f} / "
                     f"{100 * air['mean_truncation_ratio']:.1f}% (means over rounds)"))
    rows += _dynamics_rows(summary)
    rows += _cost_rows(summary)
    if summary["memory_exceeded_devices"]:
        rows.append(("devices that could not hold the job", ", ".join(summary["memory_exceeded_devices"])))
    width = max(len(k) for k, _ in rows)
    click.echo("")
    for k, v in rows:
        click.echo(f"  {k:<{width}}  {v}")
    click.echo(_files(out_dir))
