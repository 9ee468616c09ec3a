"""What every experiment returns, and the registry that maps ``scenario.experiment`` to one."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pandas as pd

from netsim.scenario import Scenario


@dataclass
class ExperimentResult:
    """An experiment's output; the runner writes it into the results folder atomically."""

    events: pd.DataFrame
    summary: dict
    topology: Optional[dict] = None
    figures: dict[str, Callable[[Path], object]] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)


Experiment = Callable[[Scenario, Optional[Callable]], ExperimentResult]

EXPERIMENTS: dict[str, Experiment] = {}


def register(name: str) -> Callable[[Experiment], Experiment]:
    """Decorator: register an experiment function under ``name`` (a value of
    ``Scenario.experiment``)."""
    def add(function: Experiment) -> Experiment:
        if name in EXPERIMENTS:
            raise ValueError(f"experiment {name!r} is registered twice")
        EXPERIMENTS[name] = function
        return function
    return add
