"""The ``deftsim`` command line.

    deftsim run SCENARIO.yaml --out DIR [--seed N] [--set key.path=value ...]
    deftsim validate SCENARIO.yaml [--set ...]
    deftsim schema

Exit codes: 0 success, 2 invalid input (message on stderr, no traceback), 1 internal error.
"""
from __future__ import annotations

import json
import sys
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
        return scenario
    except ScenarioError as err:
        _fail(str(err))
    except ValueError as err:
        _fail(f"invalid scenario file {path!r}: {err}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="deftsim")
def main() -> None:
    """deftsim: device-edge fine-tuning of foundation models on a simulated 6G network."""


@main.command()
@click.argument("scenario_file", metavar="SCENARIO.yaml")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="results folder")
@click.option("--seed", type=int, default=None, help="run seed (overrides the file's seed)")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="override a field (repeatable)")
@click.option("--quiet", is_flag=True, help="no progress bar or summary table")
def run(scenario_file: str, out_dir: str, seed: Optional[int], overrides: tuple[str, ...], quiet: bool) -> None:
    """Run one scenario and write DIR/events.parquet, summary.json, scenario.json and a plot."""
    from .report import print_summary
    from .runner import run_scenario

    scenario = _load(scenario_file, overrides, seed)
    if seed is not None and seed < 0:
        _fail(f"--seed {seed}: must be >= 0")
    bar = None
    if not quiet:
        from tqdm import tqdm

        bar = tqdm(total=scenario.training.rounds, desc=f"{scenario.name}", unit="round", file=sys.stderr,
                   dynamic_ncols=True)

    def on_round(r: int, acc: float, t_s: float) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(acc=f"{acc:.3f}", sim_t=f"{t_s:.2f}s")

    try:
        summary = run_scenario(scenario, out_dir, on_round=on_round)
    except ScenarioError as err:
        _fail(str(err))
    finally:
        if bar is not None:
            bar.close()
    if not quiet:
        print_summary(summary, out_dir)


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


if __name__ == "__main__":  # pragma: no cover
    main()
