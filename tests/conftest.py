import pytest

from netsim.scenario import Scenario


@pytest.fixture
def fake_scenario():
    """A small fake-trainer scenario (no torch)."""
    def make(**sections):
        base = {"name": "t", "trainer": "fake", "devices": [{"count": 6}],
                "training": {"rounds": 4, "devices_per_round": 3}}
        base.update(sections)
        return Scenario.model_validate(base)
    return make
