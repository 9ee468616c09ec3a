"""Plug-in strategies: device selection, bandwidth allocation, server aggregation and update
compression, each a small class registered by name (:mod:`netsim.strategies.registry`) and
chosen in the scenario's ``strategies`` section::

    strategies:
      selection:   {name: uniform, params: {}}
      bandwidth:   {name: proportional, params: {}}
      aggregation: {name: fedavg, params: {}}
      compression: {name: none, params: {}}

Outside packages add strategies through the entry-point group ``deftsim.strategies``
(``docs/extending.md``). Everything works on numpy float64 vectors; nothing here imports
torch or :mod:`netsim.scenario` (which imports this package).
"""
from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from ..spec_base import Spec
from . import aggregation, bandwidth, compression, selection  # noqa: F401 (registers the built-ins)
from .aggregation import Aggregator, staleness_weight
from .bandwidth import BandwidthContext, BandwidthStrategy
from .compression import Compressor
from .registry import (ENTRY_POINT_GROUP, KINDS, Strategy, StrategyError, available, get, invalidate_entry_points,
                       register)
from .selection import SelectionContext, SelectionStrategy

MAX_PARAMS = 64
"""Most entries of one ``params`` mapping (a strategy's parameters are a handful of numbers)."""


class StrategyChoice(Spec):
    """One strategy: its registered ``name`` and its ``params`` (validated against the
    strategy's ``Params`` model, so an error names the parameter)."""

    kind: ClassVar[str] = ""

    name: str = Field(..., min_length=1, max_length=64, description="registered strategy name")
    params: dict[str, Any] = Field(default_factory=dict, validate_default=True,
                                   description="the strategy's parameters")

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        get(cls.kind, name)   # StrategyError (a ValueError) lists the available names
        return name

    @field_validator("params")
    @classmethod
    def _valid_params(cls, params: dict, info: ValidationInfo) -> dict:
        name = info.data.get("name")
        if name is None:          # the name was invalid: already reported
            return params
        if len(params) > MAX_PARAMS:
            raise ValueError(f"{len(params)} parameters; allowed: at most {MAX_PARAMS}")
        model = get(cls.kind, name).Params
        try:
            model.model_validate(params)
        except ValidationError as err:
            raise _param_errors(err, cls.kind, name, model) from None
        return params

    def params_model(self):
        """The validated ``Params`` instance of the chosen strategy."""
        return get(self.kind, self.name).Params.model_validate(self.params)

    def build(self):
        """A fresh instance of the chosen strategy (one per run: it may keep state)."""
        cls = get(self.kind, self.name)
        return cls(cls.Params.model_validate(self.params))


def _param_errors(err: ValidationError, kind: str, name: str, model) -> ValidationError:
    """The Params errors, with an unknown parameter reported as such (listing the allowed
    ones); pydantic prefixes the locations with the path of ``params``."""
    if not any(e["type"] == "extra_forbidden" for e in err.errors()):
        return err
    allowed = ", ".join(sorted(model.model_fields)) or "none"
    details = []
    for e in err.errors():
        if e["type"] == "extra_forbidden":
            error = PydanticCustomError(
                "unknown_parameter", f"unknown parameter of {kind} strategy '{name}'; allowed parameters: {allowed}")
        else:
            error = PydanticCustomError(e["type"], e["msg"])
        details.append(InitErrorDetails(type=error, loc=e["loc"], input=e.get("input")))
    return ValidationError.from_exception_data(model.__name__, details)


class SelectionChoice(StrategyChoice):
    kind: ClassVar[str] = "selection"
    name: str = Field("uniform", min_length=1, max_length=64, description="selection strategy")


class BandwidthChoice(StrategyChoice):
    kind: ClassVar[str] = "bandwidth"
    name: str = Field("proportional", min_length=1, max_length=64, description="bandwidth allocation strategy "
                      "(proportional: shares ~ channel.uplink_shares, equal shares unless that lists weights)")


class AggregationChoice(StrategyChoice):
    kind: ClassVar[str] = "aggregation"
    name: str = Field("fedavg", min_length=1, max_length=64, description="server aggregation strategy")


class CompressionChoice(StrategyChoice):
    kind: ClassVar[str] = "compression"
    name: str = Field("none", min_length=1, max_length=64, description="update compression strategy")


class StrategiesSpec(Spec):
    """The scenario's ``strategies`` section: one strategy of each kind, by registered name."""

    selection: SelectionChoice = SelectionChoice()
    bandwidth: BandwidthChoice = BandwidthChoice()
    aggregation: AggregationChoice = AggregationChoice()
    compression: CompressionChoice = CompressionChoice()

    def check_selection(self, devices_per_round, num_devices: int) -> None:
        """Cross-check with the training section: raises ValueError (naming the parameter)
        when the selection strategy cannot pick ``devices_per_round`` of ``num_devices``."""
        strategy = self.selection.build()
        check = getattr(strategy, "check_k", None)
        if check is not None:
            check(devices_per_round, num_devices)


def build(spec: StrategiesSpec, kind: str):
    """A fresh instance of the ``kind`` strategy of ``spec``: ``cls(params_model)``."""
    if kind not in KINDS:
        raise StrategyError(f"unknown strategy kind {kind!r}; allowed: {', '.join(KINDS)}")
    return getattr(spec, kind).build()


__all__ = [
    "AggregationChoice", "Aggregator", "BandwidthChoice", "BandwidthContext", "BandwidthStrategy", "CompressionChoice",
    "Compressor", "ENTRY_POINT_GROUP", "KINDS", "SelectionChoice", "SelectionContext", "SelectionStrategy",
    "Strategy", "StrategiesSpec", "StrategyChoice", "StrategyError", "available", "build", "get",
    "invalidate_entry_points", "register", "staleness_weight",
]
