"""The registry and the scenario section: names, kinds, errors that name the field."""
import numpy as np
import pytest
from pydantic import BaseModel, ValidationError

from deftsim.config import format_validation_error
from netsim.strategies import (KINDS, SelectionStrategy, StrategiesSpec, StrategyError, available, build, get,
                               register, registry)

BUILT_IN = {
    "selection": ["age_based", "channel_aware", "compute_aware", "power_of_choice", "uniform"],
    "bandwidth": ["equal", "min_max_latency", "proportional"],
    "aggregation": ["fedadam", "fedavg", "fedbuff", "fedprox", "fedyogi"],
    "compression": ["none", "qsgd", "topk"],
}


class Wrapper(BaseModel):
    """Stands in for the scenario: the section sits at ``strategies``."""
    strategies: StrategiesSpec = StrategiesSpec()


def errors_of(section: dict) -> str:
    with pytest.raises(ValidationError) as info:
        Wrapper.model_validate({"strategies": section})
    return format_validation_error(info.value, "s.yaml")


def test_built_ins_are_registered_with_their_interfaces():
    for kind in KINDS:
        assert available(kind, entry_points=False) == BUILT_IN[kind]
        assert set(BUILT_IN[kind]) <= set(available(kind))
        for name in BUILT_IN[kind]:
            cls = get(kind, name)
            assert (cls.strategy_kind, cls.strategy_name) == (kind, name)
            for method in registry.REQUIRED_METHODS[kind]:
                assert callable(getattr(cls, method))


def test_unknown_names_and_kinds():
    with pytest.raises(ValueError, match="unknown selection strategy 'best'; available: age_based, channel_aware"):
        get("selection", "best")
    with pytest.raises(StrategyError, match="unknown strategy kind 'routing'; allowed: selection, bandwidth"):
        get("routing", "x")
    with pytest.raises(StrategyError, match="unknown strategy kind"):
        available("routing")


def test_register_checks_names_interfaces_and_duplicates():
    with pytest.raises(StrategyError, match="'Bad-Name'"):
        register("selection", "Bad-Name")
    with pytest.raises(StrategyError, match="lacks the compression method"):
        @register("compression", "nothing_here")
        class NoMethod(SelectionStrategy):
            pass
    with pytest.raises(StrategyError, match="already registered by netsim.strategies.selection.Uniform"):
        @register("selection", "uniform")
        class Other(SelectionStrategy):
            def choose(self, candidates, k, ctx):
                return candidates[:k]

    try:
        @register("selection", "lowest_index_test")
        class Lowest(SelectionStrategy):
            def choose(self, candidates, k, ctx):
                return np.sort(candidates)[:k]

        assert get("selection", "lowest_index_test") is Lowest
        spec = StrategiesSpec.model_validate({"selection": {"name": "lowest_index_test"}})
        assert type(build(spec, "selection")) is Lowest
    finally:
        registry._builtin["selection"].pop("lowest_index_test", None)
    assert "lowest_index_test" not in available("selection")


def test_default_section_and_round_trip():
    spec = StrategiesSpec()
    assert {k: getattr(spec, k).name for k in KINDS} == {
        "selection": "uniform", "bandwidth": "proportional", "aggregation": "fedavg", "compression": "none"}
    dumped = spec.model_dump()
    assert dumped["selection"] == {"name": "uniform", "params": {}}
    assert StrategiesSpec.model_validate(dumped) == spec
    yaml_like = {"selection": {"name": "channel_aware", "params": {"softmax_temperature_db": 3.0}},
                 "compression": {"name": "qsgd", "params": {"bits": 4}}}
    spec = StrategiesSpec.model_validate(yaml_like)
    assert build(spec, "selection").params.softmax_temperature_db == 3.0
    assert build(spec, "compression").levels == 15
    assert spec.compression.params_model().bits == 4
    with pytest.raises(StrategyError, match="unknown strategy kind 'routing'"):
        build(spec, "routing")


def test_build_gives_fresh_instances():
    spec = StrategiesSpec.model_validate({"aggregation": {"name": "fedadam"}})
    a, b = build(spec, "aggregation"), build(spec, "aggregation")
    a.server_step(np.ones(3))
    assert a.m is not None and b.m is None


def test_errors_name_the_field_value_and_what_is_allowed():
    msg = errors_of({"selection": {"name": "power_of_choice", "params": {"d": 0}}})
    assert "strategies.selection.params.d = 0: Input should be greater than or equal to 1" in msg
    msg = errors_of({"selection": {"name": "power_of_choice", "params": {"dd": 3}}})
    assert ("strategies.selection.params.dd = 3: unknown parameter of selection strategy 'power_of_choice'; "
            "allowed parameters: d") in msg
    msg = errors_of({"bandwidth": {"name": "fastest"}})
    assert ("strategies.bandwidth.name: unknown bandwidth strategy 'fastest'; available: equal, min_max_latency, "
            "proportional") in msg
    msg = errors_of({"aggregation": {"name": "fedbuff", "params": {"staleness": "linear", "buffer_size": 2.5}}})
    assert "strategies.aggregation.params.staleness = 'linear': Input should be 'constant', 'polynomial' or 'hinge'" \
        in msg
    assert "strategies.aggregation.params.buffer_size = 2.5" in msg
    msg = errors_of({"compression": {"name": "qsgd", "params": {"bits": True}}})
    assert "strategies.compression.params.bits = True: Input should be a valid integer" in msg
    msg = errors_of({"compression": {"name": "topk", "params": ["fraction"]}})
    assert "strategies.compression.params = ['fraction']: Input should be a valid dictionary" in msg
    msg = errors_of({"selection": {"nam": "uniform"}})
    assert "strategies.selection.nam: unknown field" in msg
    msg = errors_of({"routing": {"name": "x"}})
    assert "strategies.routing: unknown field" in msg
    msg = errors_of({"selection": {"name": "uniform", "params": {f"p{i}": 1 for i in range(100)}}})
    assert "strategies.selection.params: 100 parameters; allowed: at most 64" in msg
