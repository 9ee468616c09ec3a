"""docs/extending.md states what the code does: the example in full, its entry point, every
built-in strategy, and the error messages it quotes."""
import re
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from deftsim.config import format_validation_error
from netsim.strategies import KINDS, StrategiesSpec, available

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "extending.md").read_text(encoding="utf-8")
EXAMPLE = ROOT / "examples" / "channel_aware_selection"


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC, re.S)


def test_the_example_is_shown_in_full_and_short():
    module = (EXAMPLE / "nearest_first.py").read_text(encoding="utf-8")
    assert module in code_blocks("python")
    assert len(module.strip().splitlines()) <= 25
    entry = '"selection.nearest_first" = "nearest_first:NearestFirst"'
    assert entry in (EXAMPLE / "pyproject.toml").read_text(encoding="utf-8")
    assert any(entry in block for block in code_blocks("toml"))
    assert "pip install -e examples/channel_aware_selection" in DOC
    assert "strategies: {selection: {name: nearest_first}}" in DOC


def test_every_built_in_strategy_is_documented():
    for kind in KINDS:
        for name in available(kind, entry_points=False):
            assert f"| `{name}`" in DOC, f"docs/extending.md does not list the {kind} strategy {name!r}"


def test_the_yaml_section_shown_is_the_default():
    block = next(b for b in code_blocks("yaml") if b.startswith("strategies:\n"))
    import yaml

    assert StrategiesSpec.model_validate(yaml.safe_load(block)["strategies"]) == StrategiesSpec()


class Wrapper(BaseModel):
    strategies: StrategiesSpec = StrategiesSpec()


@pytest.mark.parametrize("section", [
    {"selection": {"name": "power_of_choice", "params": {"d": 0}}},
    {"selection": {"name": "power_of_choice", "params": {"dd": 3}}},
    {"bandwidth": {"name": "fastest"}},
])
def test_quoted_error_messages(section):
    with pytest.raises(ValidationError) as info:
        Wrapper.model_validate({"strategies": section})
    line = format_validation_error(info.value, "s.yaml").splitlines()[1].strip()
    assert line in DOC
