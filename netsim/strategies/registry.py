"""Registry of strategy classes by kind and name, extended by Python entry points.

Built-in strategies register themselves with :func:`register` when their module is imported.
Packages outside deftsim add strategies through the entry-point group ``deftsim.strategies``:
an entry point named ``"<kind>.<name>"`` (e.g. ``selection.nearest_first``) whose value points at
a class (``"module:Class"``). The entry points are discovered on the first lookup (their names
only); a class is imported when it is first asked for by :func:`get`.

A strategy class has a nested ``Params`` model (a :class:`netsim.spec_base.Spec`), validated
from the scenario's ``params`` mapping, and the methods of its kind (see ``docs/extending.md``).
The registry holds classes only, never run state.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import metadata
from typing import Optional

from pydantic import BaseModel

from ..spec_base import Spec

KINDS = ("selection", "bandwidth", "aggregation", "compression")
"""The strategy kinds, in the order of the scenario's ``strategies`` section."""

ENTRY_POINT_GROUP = "deftsim.strategies"

REQUIRED_METHODS = {
    "selection": ("select",),
    "bandwidth": ("shares",),
    "aggregation": ("weights", "server_step"),
    "compression": ("compress",),
}
"""The methods the protocols call on an instance of each kind."""

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
NAME_RULE = "a lower-case name of letters, digits and '_', starting with a letter, at most 64 characters"


class StrategyError(ValueError):
    """A strategy that cannot be found, loaded or used (an unknown name, a broken entry point)."""


class Strategy:
    """Base of every strategy class: holds its validated parameters.

    Subclasses override the nested ``Params`` model with their own fields (each with a range);
    ``cls(params)`` builds an instance (``cls()``: the defaults). An instance lives for one run
    and may keep state (server optimiser moments, error-feedback residuals)."""

    strategy_kind: str = ""
    strategy_name: str = ""

    class Params(Spec):
        """No parameters."""

    def __init__(self, params: Optional[BaseModel] = None):
        if params is None:
            params = self.Params()
        elif not isinstance(params, self.Params):
            params = self.Params.model_validate(params.model_dump() if isinstance(params, BaseModel) else params)
        self.params = params

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params!r})"


@dataclass
class _EntryPoint:
    kind: str
    name: str
    entry_point: metadata.EntryPoint
    distribution: str
    loaded: Optional[type] = None


_builtin: dict[str, dict[str, type]] = {kind: {} for kind in KINDS}
_entry_points: Optional[dict[str, dict[str, _EntryPoint]]] = None
_ignored: list[str] = []   # entry points that could not be registered, with the reason


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise StrategyError(f"unknown strategy kind {kind!r}; allowed: {', '.join(KINDS)}")


def _interface_problem(kind: str, cls) -> Optional[str]:
    """Why ``cls`` cannot serve as a strategy of ``kind`` (None when it can)."""
    if not isinstance(cls, type):
        return f"is {cls!r}, not a class"
    params = getattr(cls, "Params", None)
    if not (isinstance(params, type) and issubclass(params, BaseModel)):
        return "has no nested `Params` model (a netsim.spec_base.Spec subclass; subclass the kind's base class " \
               "to get an empty one)"
    missing = [m for m in REQUIRED_METHODS[kind] if not callable(getattr(cls, m, None))]
    if missing:
        return f"lacks the {kind} method(s) {', '.join(missing)}"
    return None


def register(kind: str, name: str):
    """Class decorator: register ``cls`` as the ``kind`` strategy ``name``.

    Sets ``cls.strategy_kind`` and ``cls.strategy_name``. Registering another class under a
    name already taken is an error (the same class again is allowed: module reloads)."""
    _check_kind(kind)
    if not isinstance(name, str) or not _NAME.match(name):
        raise StrategyError(f"strategy name {name!r} of kind {kind!r}: allowed: {NAME_RULE}")

    def decorate(cls):
        problem = _interface_problem(kind, cls)
        if problem is not None:
            raise StrategyError(f"{kind} strategy {name!r}: {getattr(cls, '__qualname__', cls)} {problem}")
        old = _builtin[kind].get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise StrategyError(f"{kind} strategy {name!r} is already registered by {old.__module__}."
                                f"{old.__qualname__}")
        cls.strategy_kind, cls.strategy_name = kind, name
        _builtin[kind][name] = cls
        return cls

    return decorate


def invalidate_entry_points() -> None:
    """Forget the discovered entry points (and the classes loaded from them): the next lookup
    scans ``importlib.metadata`` again (after a package was installed, or in tests)."""
    global _entry_points
    _entry_points = None
    _ignored.clear()


def _discover() -> dict[str, dict[str, _EntryPoint]]:
    """Entry points of group ``deftsim.strategies`` by kind and name (names only; nothing is
    imported). Entry points with a malformed name, or clashing with a built-in or with one of
    another distribution, are left out and listed in the error of an unknown name."""
    global _entry_points
    if _entry_points is not None:
        return _entry_points
    found: dict[str, dict[str, _EntryPoint]] = {kind: {} for kind in KINDS}
    _ignored.clear()
    try:
        eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception as exc:  # a corrupt installed distribution must not break every scenario
        _ignored.append(f"(cannot read the installed entry points: {type(exc).__name__}: {exc})")
        eps = []
    for ep in eps:
        dist = getattr(getattr(ep, "dist", None), "name", None) or "?"
        kind, dot, name = ep.name.partition(".")
        where = f"entry point {ep.name!r} = {ep.value!r} (distribution {dist})"
        if not dot or kind not in KINDS or not _NAME.match(name):
            _ignored.append(f"{where}: its name must be '<kind>.<name>' with kind one of {', '.join(KINDS)} "
                            f"and name {NAME_RULE}")
            continue
        if name in _builtin[kind]:
            _ignored.append(f"{where}: {kind} strategy {name!r} is built in")
            continue
        other = found[kind].get(name)
        if other is not None:
            if other.entry_point.value != ep.value:
                _ignored.append(f"{where}: {ep.name!r} is also {other.entry_point.value!r} (distribution "
                                f"{other.distribution}); the first one found is used")
            continue
        found[kind][name] = _EntryPoint(kind, name, ep, dist)
    _entry_points = found
    return found


def _load(item: _EntryPoint) -> type:
    if item.loaded is not None:
        return item.loaded
    ep = item.entry_point
    where = f"entry point {ep.name!r} = {ep.value!r} of group {ENTRY_POINT_GROUP!r} (distribution {item.distribution})"
    try:
        cls = ep.load()
    except Exception as exc:
        raise StrategyError(f"{where} cannot be loaded: {type(exc).__name__}: {exc}") from None
    problem = _interface_problem(item.kind, cls)
    if problem is not None:
        raise StrategyError(f"{where}: {ep.value} {problem}")
    item.loaded = cls
    return cls


def available(kind: str, entry_points: bool = True) -> list[str]:
    """Names of the ``kind`` strategies, sorted: the built-in ones and (``entry_points``) those
    of the discovered entry points (not yet imported)."""
    _check_kind(kind)
    names = set(_builtin[kind])
    if entry_points:
        names |= set(_discover()[kind])
    return sorted(names)


def get(kind: str, name: str) -> type:
    """The class of the ``kind`` strategy ``name``.

    Raises :class:`StrategyError` (a ValueError) for an unknown name, listing the available
    names of that kind, and for an entry point that cannot be imported or is not a strategy
    class, naming the entry point."""
    _check_kind(kind)
    cls = _builtin[kind].get(name)
    if cls is not None:
        return cls
    item = _discover()[kind].get(name) if isinstance(name, str) else None
    if item is None:
        msg = f"unknown {kind} strategy {name!r}; available: {', '.join(available(kind))}"
        if _ignored:
            msg += "; ignored entry points: " + "; ".join(_ignored)
        raise StrategyError(msg)
    return _load(item)
