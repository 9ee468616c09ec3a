"""Sweep files -> a validated plan of runs (no run is started here).

A sweep file sits next to a scenario file and says which scenario fields to vary::

    name: rank_x_alpha
    scenario: quickstart.yaml          # relative to this file
    set:                               # fixed overrides for every run (like --set)
      training.rounds: 6
    vary:
      grid:                            # Cartesian product of the lists
        peft.rank: [2, 8, 32]
        data.dirichlet_alpha: [0.1, 1.0, 10.0]
      zip:                             # lists of equal length, varied together
        channel.uplink_bandwidth_hz: [5.0e6, 10.0e6]
        channel.downlink_bandwidth_hz: [10.0e6, 20.0e6]
      random:                          # seeded random samples
        samples: 8
        seed: 0
        params:
          training.learning_rate: {log_uniform: [1.0e-4, 1.0e-2]}
          training.local_steps: {integers: [1, 10]}     # inclusive
          data.partition: {choice: [iid, dirichlet]}
          channel.pathloss.shadowing_std_db: {uniform: [0.0, 8.0]}
    seeds: 2                           # seeds 0 and 1 for every point (or a list: [3, 7])

The points are the product of the parts that are present (grid x each zip group x random
samples); every point runs once per seed. ``zip`` may also be a list of such mappings (several
groups). A field path is the same ``key.path`` as ``deftsim run --set`` (list entries by index:
``devices.0.count``).

Errors caught before any run starts (:class:`SweepError`, exit code 2): unknown keys in the
sweep file, field paths that are not scenario fields, empty lists, zip lists of unequal length,
a field varied twice, wrong types, and any swept value that is invalid in *every* run it
appears in. A combination of values that is invalid only together (e.g. more devices per round
than devices) becomes a failed run, recorded with its error; the other runs go on.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator

from netsim.scenario import Scenario

from .config import (FILE_PATH_FIELDS, ScenarioError, absolute_path, apply_override, format_validation_error,
                     read_scenario_dict, resolve_file_paths)


class SweepError(Exception):
    """A sweep file is invalid. ``str(err)`` is the user-facing message."""


# ------------------------------------------------------------------------------ the file
class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


Distribution = dict[Literal["uniform", "log_uniform", "integers", "choice"], list[Any]]


class RandomSpec(_Spec):
    """``samples`` random points drawn with ``numpy.random.default_rng(seed)``, parameter by
    parameter in file order."""

    samples: Annotated[int, Strict()] = Field(ge=1, le=100_000)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    params: dict[str, Distribution] = Field(min_length=1)

    @field_validator("params")
    @classmethod
    def _one_distribution_each(cls, params: dict[str, Distribution]) -> dict[str, Distribution]:
        for path, dist in params.items():
            if len(dist) != 1:
                raise ValueError(f"{path}: give exactly one of uniform, log_uniform, integers, choice "
                                 f"(got {sorted(dist) or 'none'})")
            (kind, args), = dist.items()
            if kind == "choice":
                if not args:
                    raise ValueError(f"{path}: choice needs at least one value")
                continue
            if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
                raise ValueError(f"{path}: {kind} needs [low, high] as two numbers, got {args!r}")
            low, high = args
            if not (math.isfinite(low) and math.isfinite(high)) or max(abs(low), abs(high)) > 1e300:
                raise ValueError(f"{path}: {kind} needs finite bounds, got {args!r}")
            if not low <= high:
                raise ValueError(f"{path}: {kind} [low, high] needs low <= high, got {args!r}")
            if kind == "log_uniform" and low <= 0:
                raise ValueError(f"{path}: log_uniform needs low > 0, got {args!r}")
            if kind == "integers" and not all(isinstance(a, int) for a in args):
                raise ValueError(f"{path}: integers needs two integers, got {args!r}")
        return params


class VarySpec(_Spec):
    grid: Optional[dict[str, list[Any]]] = None
    zip: Optional[Union[dict[str, list[Any]], list[dict[str, list[Any]]]]] = None
    random: Optional[RandomSpec] = None

    def zip_groups(self) -> list[dict[str, list[Any]]]:
        if self.zip is None:
            return []
        return [self.zip] if isinstance(self.zip, dict) else list(self.zip)


class SweepSpec(_Spec):
    name: Optional[str] = None
    description: str = ""
    scenario: str = Field(description="scenario file, relative to the sweep file")
    set: dict[str, Any] = Field(default_factory=dict, description="fixed overrides for every run")
    vary: VarySpec = VarySpec()
    seeds: Union[int, list[int], None] = Field(
        None, description="N (seeds 0..N-1), a list of seeds, or null (the scenario's own seed)")

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds_form(cls, seeds):
        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)
        if seeds is None or is_int(seeds) or (isinstance(seeds, list) and all(is_int(s) for s in seeds)):
            return seeds
        raise ValueError(f"seeds={seeds!r}: give a count (e.g. 2: seeds 0 and 1) or a list of integer seeds "
                         "(e.g. [0, 7])")

    @field_validator("seeds")
    @classmethod
    def _seeds_ok(cls, seeds):
        if isinstance(seeds, int) and seeds < 1:
            raise ValueError(f"seeds={seeds}: give a count >= 1 or a list of seeds")
        if isinstance(seeds, list):
            if not seeds:
                raise ValueError("seeds is an empty list")
            if any(s < 0 for s in seeds):
                raise ValueError(f"seeds={seeds}: seeds must be >= 0")
            if len(set(seeds)) != len(seeds):
                raise ValueError(f"seeds={seeds}: seeds repeat")
        return seeds

    @model_validator(mode="after")
    def _parts_ok(self) -> "SweepSpec":
        v = self.vary
        if v.grid is not None:
            if not v.grid:
                raise ValueError("vary.grid is empty: give at least one field path with a list of values")
            for path, values in v.grid.items():
                if not values:
                    raise ValueError(f"vary.grid.{path} is an empty list: give at least one value")
        for i, group in enumerate(v.zip_groups()):
            where = "vary.zip" if isinstance(v.zip, dict) else f"vary.zip.{i}"
            if not group:
                raise ValueError(f"{where} is empty: give field paths with lists of equal length")
            lengths = {p: len(vals) for p, vals in group.items()}
            if any(n == 0 for n in lengths.values()):
                raise ValueError(f"{where}: empty list(s) {[p for p, n in lengths.items() if n == 0]}")
            if len(set(lengths.values())) > 1:
                raise ValueError(f"{where}: lists must have equal lengths, got "
                                 + ", ".join(f"{p}: {n}" for p, n in lengths.items()))
        seen: dict[str, str] = {p: "set" for p in self.set}
        for part, paths in [("vary.grid", list(v.grid or {}))] + [
                ("vary.zip", list(g)) for g in v.zip_groups()] + [
                ("vary.random.params", list(v.random.params) if v.random else [])]:
            for p in paths:
                if p == "seed":
                    raise ValueError(f"{part}: vary the run seed with the top-level 'seeds', not the field 'seed'")
                if p in seen:
                    raise ValueError(f"field {p!r} appears in both {seen[p]} and {part}: give it in one place")
                seen[p] = part
        return self


def _format_sweep_error(err: ValidationError, source: str) -> str:
    allowed = {
        (): sorted(SweepSpec.model_fields), ("vary",): sorted(VarySpec.model_fields),
        ("vary", "random"): sorted(RandomSpec.model_fields),
    }
    lines = [f"invalid sweep file {source}:"]
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            names = allowed.get(tuple(p for p in loc[:-1] if not isinstance(p, int)))
            hint = f"; allowed here: {', '.join(names)}" if names else ""
            lines.append(f"  {path}: unknown field{hint}")
        elif e["type"] == "missing":
            lines.append(f"  {path}: required field is missing")
        elif e["type"] in ("value_error", "assertion_error"):
            prefix = f"{path}: " if loc else ""
            lines.append(f"  {prefix}{e['msg'].removeprefix('Value error, ')}")
        elif e["type"] == "literal_error" and "random" in loc:
            lines.append(f"  {path}: unknown distribution; allowed: uniform, log_uniform, integers, choice")
        else:
            text = repr(e.get("input"))
            text = text if len(text) <= 80 else text[:77] + "..."
            lines.append(f"  {path} = {text}: {e['msg']}")
    lines.append("A sweep file has: scenario, set, vary (grid / zip / random), seeds; see `deftsim sweep --help`.")
    return "\n".join(lines)


# ------------------------------------------------------------------------ field paths
def _unwrap(annotation: Any) -> list[Any]:
    """The concrete types inside Optional/Union/Annotated."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        out = []
        for a in typing.get_args(annotation):
            out.extend(_unwrap(a))
        return out
    return [annotation]


def check_field_path(path: str) -> None:
    """Raise ValueError unless ``path`` names a scenario field (``training.rounds``,
    ``devices.0.count``, ``peft.layers``)."""
    parts = path.split(".")
    if not path or any(not p for p in parts):
        raise ValueError(f"{path!r} is not a field path (expected key.path, e.g. training.rounds)")
    kinds: list[Any] = [Scenario]
    for i, part in enumerate(parts):
        where = ".".join(parts[:i]) or "the scenario"
        models = [k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)]
        lists = [k for k in kinds if typing.get_origin(k) is list]
        if part.isdigit() and lists:
            kinds = [t for k in lists for t in _unwrap(typing.get_args(k)[0])]
            continue
        if models:
            fields = {name: f for m in models for name, f in m.model_fields.items()}
            if part not in fields:
                raise ValueError(f"{path!r}: {where} has no field {part!r}; its fields are: "
                                 f"{', '.join(sorted(fields))}")
            kinds = _unwrap(fields[part].annotation)
            continue
        if lists:
            raise ValueError(f"{path!r}: {where} is a list; expected an index, got {part!r}")
        raise ValueError(f"{path!r}: {where} is a value, not a section; it has no field {part!r}")


# ------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class PlannedRun:
    """One run of a sweep: a point (set of swept values) and a seed."""

    run_id: str
    point: int
    seed: int
    params: dict[str, Any]
    scenario: Optional[dict]  # the fully resolved scenario (None if the combination is invalid)
    error: Optional[str] = None  # why the combination is invalid (a failed run, never started)

    @property
    def valid(self) -> bool:
        return self.error is None


@dataclass
class SweepPlan:
    name: str
    sweep_path: Path
    scenario_path: Path
    spec: SweepSpec
    params: list[str]  # swept field paths, in file order
    seeds: list[int]
    runs: list[PlannedRun] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)  # extra --set from the command line

    @property
    def num_points(self) -> int:
        return len({r.point for r in self.runs})

    def to_json(self) -> dict:
        """What ``sweep.json`` holds (read by :mod:`analysis.sweep`)."""
        return {
            "name": self.name,
            "sweep_file": str(self.sweep_path),
            "scenario_file": str(self.scenario_path),
            "sweep": self.spec.model_dump(mode="json"),
            "cli_overrides": list(self.overrides),
            "params": list(self.params),
            "seeds": list(self.seeds),
            "num_points": self.num_points,
            "runs": [{"run_id": r.run_id, "point": r.point, "seed": r.seed, "params": r.params,
                      "valid": r.valid} for r in self.runs],
        }


def _sample(rng: np.random.Generator, kind: str, args: list) -> Any:
    if kind == "uniform":
        return float(rng.uniform(args[0], args[1]))
    if kind == "log_uniform":
        return float(math.exp(rng.uniform(math.log(args[0]), math.log(args[1]))))
    if kind == "integers":
        return int(rng.integers(args[0], args[1], endpoint=True))
    return args[int(rng.integers(len(args)))]


MAX_PLANNED_RUNS = 10_000  # planning validates and holds every run's scenario (~0.5 ms, ~30 kB each)


def count_points(vary: VarySpec) -> int:
    """How many points :func:`expand_points` will give, from the factors alone (nothing is
    expanded): the product of the grid's list lengths, each zip group's length and the number
    of random samples."""
    count = 1
    for values in (vary.grid or {}).values():
        count *= len(values)
    for group in vary.zip_groups():
        count *= len(next(iter(group.values())))
    if vary.random is not None:
        count *= vary.random.samples
    return count


def expand_points(vary: VarySpec) -> list[dict[str, Any]]:
    """Every point of the sweep as {field path: value}, in a fixed order."""
    parts: list[list[dict[str, Any]]] = []
    if vary.grid:
        keys = list(vary.grid)
        parts.append([dict(zip(keys, combo)) for combo in itertools.product(*(vary.grid[k] for k in keys))])
    for group in vary.zip_groups():
        keys = list(group)
        parts.append([dict(zip(keys, values)) for values in zip(*(group[k] for k in keys))])
    if vary.random is not None:
        rng = np.random.default_rng(vary.random.seed)
        samples = []
        for _ in range(vary.random.samples):
            samples.append({p: _sample(rng, *next(iter(d.items()))) for p, d in vary.random.params.items()})
        parts.append(samples)
    points = []
    for combo in itertools.product(*parts):
        merged: dict[str, Any] = {}
        for piece in combo:
            merged.update(piece)
        points.append(merged)
    return points


def scenario_hash(resolved: dict) -> str:
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:8]


def _override(path: str, value: Any) -> str:
    return f"{path}={json.dumps(value)}"


def _resolve(base: dict, assignments: Sequence[str], source: str) -> dict:
    """Apply overrides to a copy of ``base`` and validate; ScenarioError on bad input."""
    data = json.loads(json.dumps(base))
    for a in assignments:
        apply_override(data, a)
    resolve_file_paths(data, os.getcwd())  # what is still relative came from --set
    try:
        return Scenario.model_validate(data).model_dump(mode="json")
    except ValidationError as err:
        raise ScenarioError(format_validation_error(err, source)) from None


def _resolve_swept_paths(vary: "VarySpec", sweep_dir: Path) -> None:
    """Swept file paths (``data.path`` / ``model.path`` values) are relative to the sweep file."""
    def fix(values: list) -> list:
        return [absolute_path(v, sweep_dir) if isinstance(v, str) and v else v for v in values]
    for group in [vary.grid or {}, *vary.zip_groups()]:
        for p in group:
            if p in FILE_PATH_FIELDS:
                group[p] = fix(group[p])
    if vary.random is not None:
        for p, dist in vary.random.params.items():
            if p in FILE_PATH_FIELDS and "choice" in dist:
                dist["choice"] = fix(dist["choice"])


def plan_sweep(path: str | Path, overrides: Sequence[str] = ()) -> SweepPlan:
    """Read and validate a sweep file and plan its runs. Raise :class:`SweepError` (bad sweep
    file) or :class:`ScenarioError` (bad scenario file); start nothing."""
    path = Path(path)
    try:
        raw = read_scenario_dict(path)  # same YAML reading and errors as scenario files
    except ScenarioError as err:
        raise SweepError(str(err).replace("scenario file", "sweep file", 1)) from None
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as err:
        raise SweepError(_format_sweep_error(err, repr(str(path)))) from None
    scenario_path = (path.parent / spec.scenario) if not Path(spec.scenario).is_absolute() else Path(spec.scenario)
    if not scenario_path.is_file():
        raise SweepError(f"sweep file {str(path)!r}: scenario {spec.scenario!r} not found "
                         f"(looked for {str(scenario_path)!r}; the path is relative to the sweep file)")
    base = resolve_file_paths(read_scenario_dict(scenario_path), scenario_path.parent)
    spec.set.update({p: absolute_path(v, path.parent) for p, v in spec.set.items()
                     if p in FILE_PATH_FIELDS and isinstance(v, str) and v})
    _resolve_swept_paths(spec.vary, path.parent)
    vary = spec.vary
    params = list(vary.grid or {}) + [p for g in vary.zip_groups() for p in g] + list(
        vary.random.params if vary.random else {})
    first_values = {**spec.set, **{p: v[0] for p, v in (vary.grid or {}).items()},
                    **{p: v[0] for g in vary.zip_groups() for p, v in g.items()}}
    for where, paths in [("set", list(spec.set)), ("vary", params)]:
        for p in paths:
            try:
                check_field_path(p)
                if p in first_values:  # list indices must exist in the scenario
                    apply_override(json.loads(json.dumps(base)), _override(p, first_values[p]))
            except ScenarioError as err:
                reason = str(err).split(": ", 1)[-1]
                raise SweepError(f"sweep file {str(path)!r}: {where}: {p!r}: {reason}") from None
            except ValueError as err:
                raise SweepError(f"sweep file {str(path)!r}: {where}: {err}") from None
    fixed = [_override(p, v) for p, v in spec.set.items()] + list(overrides)
    try:
        base_resolved = _resolve(base, fixed, f"file {str(scenario_path)!r} with the sweep's set/--set")
    except ScenarioError as err:
        raise SweepError(f"sweep file {str(path)!r}: the base scenario is invalid:\n{err}") from None
    num_seeds = 1 if spec.seeds is None else spec.seeds if isinstance(spec.seeds, int) else len(spec.seeds)
    num_points = count_points(vary)
    planned = num_points * num_seeds
    if planned > MAX_PLANNED_RUNS:
        raise SweepError(f"sweep file {str(path)!r} plans {planned:,} runs ({num_points:,} points x "
                         f"{num_seeds:,} seeds); at most {MAX_PLANNED_RUNS:,} runs per sweep file are allowed: "
                         "split it into several sweeps or use vary.random with fewer samples")
    if spec.seeds is None:
        seeds = [int(base_resolved["seed"])]
    elif isinstance(spec.seeds, int):
        seeds = list(range(spec.seeds))
    else:
        seeds = list(spec.seeds)
    points = expand_points(vary)
    runs: list[PlannedRun] = []
    for point, values in enumerate(points):
        assignments = fixed + [_override(p, v) for p, v in values.items()]
        for seed in seeds:
            label = f"point {point} (" + ", ".join(f"{p}={v!r}" for p, v in values.items()) + f"), seed {seed}"
            try:
                resolved = _resolve(base, assignments + [f"seed={seed}"], label)
            except ScenarioError as err:
                runs.append(PlannedRun(f"p{point:04d}-s{seed}-invalid", point, seed, values, None, str(err)))
                continue
            run_id = f"p{point:04d}-s{seed}-{scenario_hash(resolved)}"
            runs.append(PlannedRun(run_id, point, seed, values, resolved))
    _reject_always_invalid(path, runs, params)
    name = spec.name or path.stem
    return SweepPlan(name, path, scenario_path, spec, params, seeds, runs, list(overrides))


def _reject_always_invalid(path: Path, runs: list[PlannedRun], params: list[str]) -> None:
    """A swept value that is invalid in every run it appears in is a mistake in the sweep file."""
    if all(not r.valid for r in runs):
        first = runs[0].error if runs else "no runs"
        raise SweepError(f"sweep file {str(path)!r}: every planned run is invalid; the first:\n{first}")
    bad = []
    for p in params:
        by_value: dict[str, list[PlannedRun]] = {}
        for r in runs:
            by_value.setdefault(json.dumps(r.params[p], sort_keys=True), []).append(r)
        for value, group in by_value.items():
            if all(not r.valid for r in group):
                bad.append(f"  {p}={value}: invalid in all {len(group)} run(s) it appears in; e.g.\n"
                           + "\n".join("    " + line for line in (group[0].error or "").splitlines()))
    if bad:
        raise SweepError(f"sweep file {str(path)!r}: swept value(s) that no run can use:\n" + "\n".join(bad))
