"""Scenario files -> validated :class:`netsim.scenario.Scenario`, with clear errors.

Every user mistake becomes a :class:`ScenarioError` whose message names the file, the field
path, the bad value and what is allowed. The CLI prints it and exits with code 2.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from pydantic import BaseModel, ValidationError

from netsim.scenario import Scenario


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``3.5e9`` / ``-20e6`` as floats (YAML 1.2 style; PyYAML's
    YAML 1.1 resolver would read them as strings)."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Yaml12Loader)


class ScenarioError(Exception):
    """A scenario file or override is invalid. ``str(err)`` is the user-facing message."""


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _model_at(loc: Sequence[Any]) -> Optional[type[BaseModel]]:
    """The pydantic model class that holds the field at ``loc`` (for listing allowed keys)."""
    model: Any = Scenario
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        nxt = None
        for c in candidates:
            for cc in [c, *getattr(c, "__args__", ())]:
                if isinstance(cc, type) and issubclass(cc, BaseModel):
                    nxt = cc
        if nxt is None:
            return None
        model = nxt
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid scenario {source}:"]
    for e in err.errors():
        loc = [p for p in e["loc"]]
        path = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            model = _model_at(loc)
            allowed = ", ".join(sorted(model.model_fields)) if model is not None else "see `deftsim schema`"
            lines.append(f"  {path}: unknown field (value {_short(e.get('input'))}); allowed fields here: {allowed}")
        elif e["type"] == "missing":
            lines.append(f"  {path}: required field is missing")
        elif e["type"] == "value_error":
            # Our own cross-field checks: the message names the fields and values itself.
            prefix = "" if not loc else f"{path}: "
            lines.append(f"  {prefix}{e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {path} = {_short(e.get('input'))}: {e['msg']}")
    lines.append("Run `deftsim schema` for every field, its type and its default.")
    return "\n".join(lines)


def read_scenario_dict(path: Path) -> dict:
    """Parse a YAML (or JSON) scenario file into a dict, with clear errors."""
    if not path.exists():
        raise ScenarioError(f"scenario file {str(path)!r} does not exist")
    if path.is_dir():
        raise ScenarioError(f"scenario path {str(path)!r} is a folder; expected a YAML file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ScenarioError(f"scenario file {str(path)!r} is not UTF-8 text (byte {exc.start}): "
                            "expected a YAML file") from None
    if "\x00" in text:
        raise ScenarioError(f"scenario file {str(path)!r} contains NUL bytes: expected a YAML text file")
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ScenarioError(f"scenario file {str(path)!r} is not valid YAML{where}: {problem}") from None
    if data is None:
        raise ScenarioError(f"scenario file {str(path)!r} is empty: expected a mapping of sections "
                            "(devices, channel, model, peft, data, training, ...)")
    if not isinstance(data, dict):
        raise ScenarioError(f"scenario file {str(path)!r} must hold a mapping of sections at the top level, "
                            f"got a {type(data).__name__} ({_short(data)})")
    return data


def apply_override(data: dict, assignment: str) -> None:
    """Apply ``key.path=value`` (value parsed as YAML) to a raw scenario dict in place."""
    if "=" not in assignment:
        raise ScenarioError(f"--set {assignment!r}: expected key.path=value (e.g. training.rounds=5)")
    key, _, text = assignment.partition("=")
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts):
        raise ScenarioError(f"--set {assignment!r}: empty key path")
    try:
        value = parse_yaml(text)
    except yaml.YAMLError:
        value = text
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ScenarioError(f"--set {assignment!r}: {'.'.join(parts[:i])} is a list of {len(node)}; "
                                    f"index {part!r} is not in 0..{len(node) - 1}")
            idx = int(part)
            if last:
                node[idx] = value
            else:
                node = node[idx]
            continue
        if not isinstance(node, dict):
            raise ScenarioError(f"--set {assignment!r}: {'.'.join(parts[:i])} is not a section")
        if last:
            node[part] = value
        else:
            if part not in node or node[part] is None:
                default = _default_for(parts[: i + 1])
                node[part] = default
            node = node[part]


def _default_for(parts: list[str]) -> Any:
    """The default value (as plain data) of a section, so overrides can reach into sections a
    file leaves out."""
    current: Any = Scenario().model_dump(mode="json")
    for p in parts:
        if isinstance(current, list) and p.isdigit() and int(p) < len(current):
            current = current[int(p)]
        elif isinstance(current, dict) and p in current:
            current = current[p]
        else:
            return {}
    return current if isinstance(current, (dict, list)) else {}


def load_scenario(path: str | Path, overrides: Sequence[str] = (), seed: Optional[int] = None) -> Scenario:
    """Read, override and validate a scenario file; raise :class:`ScenarioError` on bad input."""
    path = Path(path)
    data = read_scenario_dict(path)
    for assignment in overrides:
        apply_override(data, assignment)
    if seed is not None:
        data["seed"] = seed
    try:
        return Scenario.model_validate(data)
    except ValidationError as err:
        raise ScenarioError(format_validation_error(err, f"file {str(path)!r}")) from None
