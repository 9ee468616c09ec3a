"""The ``deftsim`` command line.

    deftsim run SCENARIO.yaml --out DIR [--seed N] [--set key.path=value ...]
    deftsim validate SCENARIO.yaml [--set ...]
    deftsim schema
    deftsim sweep SWEEP.yaml --out DIR [--backend local|dask] [--workers N] [--dry-run]
    deftsim report DIR [--out REPORT_DIR]

Exit codes: 0 success, 2 invalid input (message on stderr, no traceback), 1 internal error.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import click

from .config import ScenarioError, load_scenario

EXIT_INVALID = 2


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_INVALID)


def _semantic_checks(scenario) -> None:
    """Checks that need the data set or the model's config (no torch needed)."""
    from .checks import check_scenario_resources

    check_scenario_resources(scenario)


def _load(path: str, overrides: tuple[str, ...], seed: Optional[int]):
    try:
        scenario = load_scenario(path, overrides, seed)
        _semantic_checks(scenario)
    except ScenarioError as err:
        _fail(str(err))
    except ValueError as err:
        _fail(f"invalid scenario file {path!r}: {err}")
    _warn_settings(scenario)
    return scenario


def _warn_settings(scenario) -> None:
    """``warning: ...`` on stderr for every set field that has no effect (deftsim.checks)."""
    from .checks import settings_warnings

    for message in settings_warnings(scenario):
        click.echo(f"warning: {message}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="deftsim")
def main() -> None:
    """deftsim: device-edge fine-tuning of foundation models on a simulated 6G network."""


@main.command()
@click.argument("scenario_file", metavar="SCENARIO.yaml")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="results folder (required unless --dry-run)")
@click.option("--seed", type=int, default=None, help="run seed (overrides the file's seed)")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="override a field (repeatable)")
@click.option("--quiet", is_flag=True, help="no progress bar or summary table")
@click.option("--threads", type=int, default=None,
              help="PyTorch threads of the real trainer (default: DEFTSIM_TORCH_THREADS, else the cores this "
                   "process may use, at most 8; idle OpenMP threads sleep after a short spin). Results may differ at float "
                   "rounding between thread counts")
@click.option("--overwrite", is_flag=True, help="replace a run already in --out (files of others are kept)")
@click.option("--dry-run", is_flag=True, help="validate and print the real device steps and evaluations the run "
                                              "would do; run nothing")
def run(scenario_file: str, out_dir: Optional[str], seed: Optional[int], overrides: tuple[str, ...], quiet: bool,
        threads: Optional[int], overwrite: bool, dry_run: bool) -> None:
    """Run one scenario and write DIR/events.parquet, summary.json, scenario.json and a plot.

    DIR is checked and locked before anything runs; a DIR that already holds a run is refused
    unless --overwrite."""
    if seed is not None and seed < 0:
        _fail(f"--seed {seed}: must be >= 0")
    scenario = _load(scenario_file, overrides, seed)
    if dry_run:
        _print_work(scenario)
        return
    if out_dir is None:
        _fail("missing option --out DIR (the results folder)")
    from .report import print_summary
    from .runner import run_scenario

    thread_record = _apply_threads(scenario, threads, quiet)
    bar = None
    if not quiet:
        from tqdm import tqdm

        from .experiments import progress_total

        bar = tqdm(total=progress_total(scenario), desc=f"{scenario.name}", unit="round", file=sys.stderr,
                   dynamic_ncols=True)

    def on_round(r: int, acc: float, t_s: float) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(acc=f"{acc:.3f}", sim_t=f"{t_s:.2f}s")

    error = None
    try:
        summary = run_scenario(scenario, out_dir, on_round=on_round, overwrite=overwrite,
                               timing_extra={"threads": thread_record})
    except ScenarioError as err:
        error = str(err)
    except OSError as err:
        error = f"--out {out_dir!r}: cannot write the results ({err.strerror or err}); the folder is left as it was"
    finally:
        if bar is not None:   # closed first, so an error message gets a line of its own
            bar.close()
    if error is not None:
        _fail(error)
    if not quiet:
        print_summary(summary, out_dir)


def _apply_threads(scenario, threads: Optional[int], quiet: bool) -> dict:
    """Apply the thread policy (:mod:`deftsim.threads`) before torch is imported, say what it
    is, and return the record for timing.json. The fake trainer runs no torch: nothing to set."""
    from .threads import ThreadPolicyError, configure_threads, describe

    if scenario.trainer != "real":
        return {"torch_threads": None, "note": "trainer: fake runs no PyTorch"}
    try:
        record = configure_threads(threads)
    except ThreadPolicyError as err:
        _fail(str(err))
    if not quiet:
        click.echo(describe(record), err=True)
    return record


def _print_work(scenario) -> None:
    from .experiments import planned_work

    work = planned_work(scenario)
    click.echo(f"dry run of {scenario.name!r} (experiment {scenario.experiment}, trainer {scenario.trainer}, "
               f"{scenario.num_devices} devices): nothing was run")
    click.echo(f"  real device steps: at most {work.device_steps:,}" if work.device_steps is not None else
               "  real device steps: not known before the run")
    examples = {"prompt_service": scenario.prompt_service.test_examples,
                "d2d_prompt_transfer": scenario.d2d_prompt_transfer.test_examples}.get(
        scenario.experiment, scenario.data.max_test_examples)
    click.echo(f"  evaluations:       at most {work.evaluations:,} (of up to {examples} test examples each)")
    click.echo(f"  ({work.detail})")


@main.command()
@click.argument("scenario_file", metavar="SCENARIO.yaml")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE")
def validate(scenario_file: str, overrides: tuple[str, ...]) -> None:
    """Check a scenario file without running it."""
    scenario = _load(scenario_file, overrides, None)
    click.echo(f"ok: {scenario_file} ({scenario.num_devices} devices, trainer={scenario.trainer}, "
               f"peft={scenario.peft.method})")


@main.command()
def schema() -> None:
    """Print the JSON Schema of scenario files."""
    from netsim.scenario import Scenario

    click.echo(json.dumps(Scenario.model_json_schema(), indent=2))


@main.command()
@click.argument("sweep_file", metavar="SWEEP.yaml")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="sweep folder (required unless --dry-run)")
@click.option("--backend", type=click.Choice(["local", "dask"]), default="local", show_default=True,
              help="local: worker processes on this machine; dask: a Dask cluster (--address, or a local one)")
@click.option("--workers", type=int, default=None,
              help="parallel runs (local backend; default: one per core); with --backend dask and no "
                   "--address, the size of the local cluster started")
@click.option("--address", default=None, metavar="HOST:PORT", help="Dask scheduler address (e.g. tcp://10.0.0.5:8786)")
@click.option("--threads-per-run", type=int, default=1, show_default=True,
              help="PyTorch threads of each real-trainer run (the same on every backend, so results match)")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="fixed override for every run")
@click.option("--retry-failed", is_flag=True, help="run the failed runs of an earlier call again")
@click.option("--dry-run", is_flag=True, help="validate and print the planned runs, run nothing")
@click.option("--quiet", is_flag=True, help="no progress bar")
def sweep(sweep_file: str, out_dir: Optional[str], backend: str, workers: Optional[int], address: Optional[str],
          threads_per_run: int, overrides: tuple[str, ...], retry_failed: bool, dry_run: bool, quiet: bool) -> None:
    """Run a parameter sweep: every point of SWEEP.yaml x every seed, in parallel; resumable.

    \b
    A sweep file names a scenario file and the fields to vary:
      scenario: quickstart.yaml            # relative to the sweep file
      set: {training.rounds: 4}            # fixed for every run
      vary:
        grid: {peft.rank: [4, 16], data.dirichlet_alpha: [0.1, 1.0]}   # product
        zip:  {channel.uplink_bandwidth_hz: [5e6, 2e7], channel.downlink_bandwidth_hz: [1e7, 4e7]}
        random: {samples: 4, seed: 0, params: {training.learning_rate: {log_uniform: [1e-4, 1e-2]}}}
      seeds: 2                             # seeds 0..1 per point (or a list)

    \b
    Writes DIR/sweep.json, DIR/runs/<run_id>/ (one complete folder per run, renamed into place
    when done) and DIR/runs.parquet (one row per run). Interrupted? Run the same command again:
    finished runs are kept, the rest run. Exit codes: 0 all runs ok, 3 some runs failed (listed),
    2 invalid input, 130 interrupted.
    """
    from .sweep import SweepError, plan_sweep
    from .sweep_run import SweepInterrupted, run_sweep

    try:
        plan = plan_sweep(sweep_file, overrides)
    except (SweepError, ScenarioError) as err:
        _fail(str(err))
    _warn_sweep_settings(plan)
    if workers is not None and workers < 1:
        _fail(f"--workers {workers}: must be >= 1")
    if threads_per_run < 1:
        _fail(f"--threads-per-run {threads_per_run}: must be >= 1")
    if address and backend != "dask":
        _fail("--address needs --backend dask")
    if dry_run:
        _print_plan(plan, out_dir)
        return
    if not out_dir:
        _fail("missing option --out DIR (the sweep folder)")
    progress = None if quiet else _SweepBar(plan.name)
    try:
        result = run_sweep(plan, out_dir, backend=backend, workers=workers, address=address,
                           threads_per_run=threads_per_run, retry_failed=retry_failed, progress=progress)
    except SweepError as err:
        _fail(str(err))
    except SweepInterrupted as err:
        click.echo(f"\n{err}", err=True)
        sys.exit(130)
    ok = result.planned - len(result.failed)
    click.echo(f"sweep {plan.name}: {result.planned} runs ({plan.num_points} points x {len(plan.seeds)} seeds): "
               f"{ok} ok, {len(result.failed)} failed; {result.ran} ran now, {result.skipped} already done "
               f"({result.wall_s:.1f} s)")
    if result.failed:
        click.echo("failed runs:")
        for f in result.failed:
            values = ", ".join(f"{k}={v!r}" for k, v in f["params"].items())
            click.echo(f"  {f['run_id']}  seed={f['seed']}  {values}\n      {f['type']}: {_short_error(f['message'])}")
        click.echo(f"  (details: {out_dir}/runs/<run_id>/error.json; rerun them with --retry-failed)")
    if result.stale:
        click.echo(f"note: {len(result.stale)} folder(s) in {out_dir}/runs are from an earlier plan (the sweep or "
                   "scenario file changed since); they are kept and ignored")
    click.echo(f"results: {out_dir}/runs.parquet; report: deftsim report {out_dir}")
    if result.failed:
        sys.exit(3)


def _warn_sweep_settings(plan) -> None:
    """Warnings for settings without effect, each once over the sweep's valid runs."""
    from netsim.scenario import Scenario

    from .checks import settings_warnings

    seen: set[str] = set()
    points: set[int] = set()
    for run in plan.runs:
        if run.valid and run.point not in points:  # seeds do not change which settings matter
            points.add(run.point)
            for message in settings_warnings(Scenario.model_validate(run.scenario)):
                if message not in seen:
                    seen.add(message)
                    click.echo(f"warning: {message}", err=True)


def _short_error(message: Optional[str], limit: int = 300) -> str:
    """The informative lines of an error message, on one line."""
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    keep = [line for line in lines if not line.startswith(("invalid scenario", "Run `deftsim schema`"))]
    text = "; ".join(keep or lines)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _SweepBar:
    """tqdm bar over the runs still to do: done, running, failed, ETA."""

    def __init__(self, name: str):
        self.name = name
        self.bar = None

    def start(self, todo: int, skipped: int) -> None:
        from tqdm import tqdm

        desc = self.name + (f" ({skipped} already done)" if skipped else "")
        self.bar = tqdm(total=todo, desc=desc, unit="run", file=sys.stderr, dynamic_ncols=True)

    def update(self, done: int, running: int, failed: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix(running=running, failed=failed)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _print_plan(plan, out_dir: Optional[str]) -> None:
    from analysis.sweep import run_status

    click.echo(f"sweep {plan.name}: scenario {plan.scenario_path}; {plan.num_points} points x "
               f"{len(plan.seeds)} seeds {plan.seeds}")
    has_dir = out_dir is not None and (Path(out_dir) / "sweep.json").is_file()
    header = ["run_id", "seed", *plan.params] + (["status"] if has_dir else [])
    rows = []
    for r in plan.runs:
        row = [r.run_id, str(r.seed), *(json.dumps(r.params[p]) for p in plan.params)]
        if has_dir:
            row.append(run_status(out_dir, r.run_id) if r.valid else "invalid")
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r, row in zip(plan.runs, rows):
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if not r.valid:
            click.echo("    invalid combination (recorded as a failed run): "
                       + " ".join(r.error.splitlines()[1:2]).strip())
    click.echo(f"runs: {len(plan.runs)}")


@main.command()
@click.argument("folder", metavar="DIR")
@click.option("--out", "report_dir", type=click.Path(file_okay=False), default=None,
              help="where to write the report (default: DIR/report)")
@click.option("--target", type=float, default=None,
              help="accuracy for time-/energy-to-accuracy (default: the scenarios' stop.target_accuracy, "
                   "else 90% of the median best accuracy)")
@click.option("--format", "formats", default="png", show_default=True, metavar="png,pdf,svg",
              help="figure formats to write besides the HTML (comma-separated; the HTML embeds PNG)")
def report(folder: str, report_dir: Optional[str], target: Optional[float], formats: str) -> None:
    """Write an HTML report (plus figures and CSV/Parquet tables) of a sweep or run folder of any
    experiment."""
    from analysis.report import ReportError, build_report

    if target is not None and not 0 < target <= 1:
        _fail(f"--target {target}: must be in (0, 1]")
    try:
        path = build_report(folder, report_dir, target=target,
                            formats=[f.strip() for f in formats.split(",") if f.strip()])
    except ReportError as err:
        _fail(str(err))
    click.echo(f"report: {path}")


if __name__ == "__main__":  # pragma: no cover
    main()
