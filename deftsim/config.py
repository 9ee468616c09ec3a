"""Scenario files -> validated :class:`netsim.scenario.Scenario`, with clear errors.

Every user mistake becomes a :class:`ScenarioError` whose message names the file, the field
path, the bad value and what is allowed. The CLI prints it and exits with code 2.
"""
from __future__ import annotations

import os
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


# Limits that no sane scenario or sweep file reaches, so that hostile files are refused in
# bounded time and memory (a "billion laughs" alias bomb, a document nested thousands deep).
MAX_FILE_BYTES = 64 * 2**20
MAX_NESTING_DEPTH = 64
MAX_EXPANDED_VALUES = 1_000_000


class YamlLimitError(yaml.YAMLError):
    """A YAML document exceeds one of the limits above; ``problem`` says which."""

    def __init__(self, problem: str, mark=None):
        super().__init__(problem)
        self.problem = problem
        self.problem_mark = mark


class _BoundedLoader(_Yaml12Loader):
    """The YAML 1.2-style loader with three guards: nesting depth (the composer recurses once
    per level), duplicate keys (an error, not "the last wins"), and the size of the document
    once aliases are expanded (checked on the node graph before anything is constructed)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_NESTING_DEPTH:
                raise YamlLimitError(f"is nested deeper than {MAX_NESTING_DEPTH} levels", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # the base class reports unhashable keys
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {_short(key, 40)} (first at line {seen[key] + 1}): "
                        "give each key once", key_node.start_mark)
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root) -> int:
    """Number of values the document holds once every alias is expanded (memoised on the node
    graph, so an alias bomb costs as many steps as it has nodes). Raises YamlLimitError above
    MAX_EXPANDED_VALUES or for a recursive alias."""
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()

    def size(node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in in_progress:
            raise YamlLimitError("holds a recursive alias (an alias inside the node it names)", node.start_mark)
        in_progress.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        in_progress.discard(key)
        if total > MAX_EXPANDED_VALUES:
            raise YamlLimitError(f"expands to more than {MAX_EXPANDED_VALUES:,} values once its aliases "
                                 "(*name) are expanded", node.start_mark)
        sizes[key] = total
        return total

    return size(root)


def parse_yaml(text: str):
    """Parse one YAML document with bounded depth, alias expansion and no duplicate keys.
    Raises ``yaml.YAMLError`` (``YamlLimitError`` for the limits)."""
    if len(text) > MAX_FILE_BYTES:
        raise YamlLimitError(f"is larger than {MAX_FILE_BYTES // 2**20} MiB")
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


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
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ScenarioError(f"scenario file {str(path)!r} is {size / 2**20:.0f} MiB; files larger than "
                                f"{MAX_FILE_BYTES // 2**20} MiB are refused")
        raw = path.read_bytes()
    except OSError as exc:
        raise ScenarioError(f"cannot read scenario file {str(path)!r}: {exc.strerror or exc}") from None
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
        if isinstance(exc, YamlLimitError):
            raise ScenarioError(f"scenario file {str(path)!r} is refused{where}: it {problem}") from None
        raise ScenarioError(f"scenario file {str(path)!r} is not valid YAML{where}: {problem}") from None
    if data is None:
        raise ScenarioError(f"scenario file {str(path)!r} is empty: expected a mapping of sections "
                            "(devices, channel, model, peft, data, training, ...)")
    if not isinstance(data, dict):
        raise ScenarioError(f"scenario file {str(path)!r} must hold a mapping of sections at the top level, "
                            f"got a {type(data).__name__}")
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
    except YamlLimitError as exc:
        raise ScenarioError(f"--set {key.strip()}: the value {exc.problem}") from None
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


# Fields that name files: a relative path in a file is relative to that file's folder; a
# relative path given on the command line (--set) is relative to the current folder.
FILE_PATH_FIELDS = ("data.path", "model.path", "dynamics.availability.trace_path")


def resolve_file_paths(data: dict, base_dir: str | Path) -> dict:
    """Make the file paths of a raw scenario dict (:data:`FILE_PATH_FIELDS`) absolute,
    relative ones against ``base_dir``; ``~`` is expanded. In place; returns ``data``."""
    for dotted in FILE_PATH_FIELDS:
        *sections, key = dotted.split(".")
        node = data
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(key), str) and node[key]:
            node[key] = absolute_path(node[key], base_dir)
    return data


def absolute_path(value: str, base_dir: str | Path) -> str:
    """``value`` as an absolute, normalised path (relative ones against ``base_dir``)."""
    expanded = os.path.expanduser(value)
    return os.path.normpath(os.path.join(os.path.abspath(base_dir), expanded))


def load_scenario(path: str | Path, overrides: Sequence[str] = (), seed: Optional[int] = None) -> Scenario:
    """Read, override and validate a scenario file; raise :class:`ScenarioError` on bad input.

    Relative ``data.path`` / ``model.path`` / ``dynamics.availability.trace_path`` in the file
    are relative to the file's folder; in
    ``overrides`` they are relative to the current folder."""
    path = Path(path)
    data = resolve_file_paths(read_scenario_dict(path), path.parent)
    for assignment in overrides:
        apply_override(data, assignment)
    resolve_file_paths(data, os.getcwd())
    if seed is not None:
        data["seed"] = seed
    try:
        return Scenario.model_validate(data)
    except ValidationError as err:
        raise ScenarioError(format_validation_error(err, f"file {str(path)!r}")) from None
