"""scenarios/sweep_service_load.yaml: it plans what it says (both classes' arrival rates x 1, 4,
16, 64 on one slot with K = 4 and deadline admission, scratch and ensemble), every point
validates against the installed tasks, and (torch-free, a stand-in model with the real
model's per-step FLOPs) the load does what the sweep is for: sojourn grows with the arrival
rate and the busiest point turns requests away."""
import math
import sys
from pathlib import Path

import pytest

from deftsim.checks import check_scenario_resources
from deftsim.sweep import plan_sweep
from netsim import Scenario
from netsim.protocols.prompt_service import PromptServiceSimulation, build_seed_library

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "netsim"))
from fake_service_tuner import FakeServiceTuner  # noqa: E402

SWEEP = Path(__file__).resolve().parents[2] / "scenarios" / "sweep_service_load.yaml"
RATE0 = "prompt_service.user_classes.0.rate_per_s"
RATE1 = "prompt_service.user_classes.1.rate_per_s"

# all-MiniLM-L6-v2 with an 8-token soft prompt: one AdamW step on 8 tweets (~30 tokens) counts
# about 17.6 GFLOP, one forward about a third of it; at the 32-token limit about 22 GFLOP
STEP_FLOPS, FORWARD_FLOPS, WORST_STEP_FLOPS = 17.6e9, 5.9e9, 22.0e9


class MiniLMSizedTuner(FakeServiceTuner):
    """The stand-in model of tests/netsim with the real model's step and forward FLOPs."""

    def step_flops(self, task, examples):
        return STEP_FLOPS * len(examples) / 8

    def forward_flops(self, task, examples):
        return FORWARD_FLOPS * len(examples) / 8

    def library_probabilities(self, states, task, examples):
        probs, _ = super().library_probabilities(states, task, examples)
        return probs, len(states) * self.forward_flops(task, examples)

    def worst_step_flops(self, batch_size):
        return WORST_STEP_FLOPS * batch_size / 8

    def worst_forward_flops(self, batch_size):
        return WORST_STEP_FLOPS / 3 * batch_size / 8


@pytest.fixture(scope="module")
def plan():
    return plan_sweep(SWEEP)


def test_sweep_plans_the_arrival_rates_on_a_bounded_deadline_aware_edge(plan):
    assert plan.params == [RATE0, RATE1]
    assert all(run.valid for run in plan.runs), [run.error for run in plan.runs if not run.valid]
    rates = sorted((r.params[RATE0], r.params[RATE1]) for r in plan.runs)
    assert rates == [(0.3, 0.2), (1.2, 0.8), (4.8, 3.2), (19.2, 12.8)]
    for run in plan.runs:
        ps = run.scenario["prompt_service"]
        assert run.scenario["experiment"] == "prompt_service"
        assert ps["variants"] == ["scratch", "ensemble"] and ps["slots"] == 1 and ps["capacity"] == 4
        assert ps["admission"] == "deadline_feasible" and ps["max_steps"] <= 20


def test_every_planned_run_validates_against_its_tasks(plan):
    for run in plan.runs:
        check_scenario_resources(Scenario.model_validate(run.scenario))


def queue(run, variant: str) -> dict:
    sc = Scenario.model_validate(run.scenario)
    spec = sc.prompt_service
    tuner = MiniLMSizedTuner(spec.all_tasks(), n_test=50, fresh_skill=0.0, gain=2.0)   # ~12 steps to target
    library = build_seed_library(tuner, spec, run.seed, sc.training.batch_size)
    sim = PromptServiceSimulation(sc, run.seed, tuner, variant, library)
    sim.run()
    return sim.summary()


@pytest.mark.parametrize("variant", ["scratch", "ensemble"])
def test_sojourn_grows_with_load_and_the_busiest_point_turns_requests_away(plan, variant):
    runs = sorted(plan.runs, key=lambda r: r.params[RATE0])
    loads = [queue(r, variant) for r in runs]
    sojourn = [q["mean_sojourn_s"] for q in loads]
    assert all(q["arrived"] == 8 for q in loads)          # max_requests, at every rate
    # the same exponential draws scaled by 1 / rate (common random numbers): more load, more waiting
    assert sojourn[-1] > 2 * sojourn[0], sojourn
    assert loads[0]["acceptance_ratio"] == 1.0
    assert loads[-1]["acceptance_ratio"] < 1.0, loads[-1]
    for q in loads:   # Little over the whole run (empty at 0 and at T): int N dt = sum of sojourns
        assert math.isclose(q["mean_in_system"] * q["horizon_s"], q["admitted"] * q["mean_sojourn_s"], rel_tol=1e-9)
