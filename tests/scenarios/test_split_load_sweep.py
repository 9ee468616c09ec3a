"""scenarios/sweep_split_load.yaml: it plans what it says (split only, every device in every
round, 2..16 devices x edge speed x batching), and (torch-free, a stand-in trainer with the
real trainer's per-step sizes) its small-edge points do load the edge: the queueing delay grows
with the number of devices and batching serves several requests per pass."""
from pathlib import Path

import pytest

from deftsim.checks import check_scenario_resources
from deftsim.sweep import plan_sweep
from netsim import FakeTrainer, Scenario
from netsim.federated_deft import variant_scenario
from netsim.interfaces import PlannedJob, RoundTripCost, SplitJobCost
from netsim.protocols.split_fl import SplitFedSimulation

SWEEP = Path(__file__).resolve().parents[2] / "scenarios" / "sweep_split_load.yaml"
EDGE = "edge_servers.0.compute_flops_per_s"
BATCH = "split.edge_max_batch"


@pytest.fixture(scope="module")
def plan():
    return plan_sweep(SWEEP)


def test_sweep_plans_devices_x_edge_speed_x_batching(plan):
    assert plan.params == [EDGE, BATCH, "devices.0.count", "devices.1.count"]
    assert all(run.valid for run in plan.runs), [run.error for run in plan.runs if not run.valid]
    grid = {(r.params[EDGE], r.params[BATCH], r.params["devices.0.count"] + r.params["devices.1.count"])
            for r in plan.runs}
    assert grid == {(f, b, n) for f in (1e11, 1e12, 1e14) for b in (1, 8) for n in (2, 4, 8, 16)}
    assert len(plan.runs) == len(grid)          # one seed per point
    for run in plan.runs:
        sc = run.scenario
        assert sc["experiment"] == "federated_deft" and sc["federated_deft"]["variants"] == ["split"]
        assert sc["training"]["devices_per_round"] is None          # every device, every round
        assert sc["devices"][0]["count"] == sc["devices"][1]["count"]  # equal halves of the two groups
        assert sc["training"]["rounds"] * sc["training"]["local_steps"] <= 6   # a short sweep


def test_every_planned_run_validates_against_its_files(plan):
    for run in plan.runs:
        check_scenario_resources(Scenario.model_validate(run.scenario))


# The real trainer's per-step sizes at this sweep's shapes (batch B = 8, L = 32 tokens, P = 8
# prompt rows, hidden d = 384, cut after block 1 of 6): activations up and the gradient down are
# B (L + P) d float32 values (+ mask and labels up); the edge runs 5 frozen blocks forward and
# backward to the cut, ~4 x 12 d^2 FLOPs per token and block (attention scores aside).
B, TOKENS, HIDDEN, EDGE_BLOCKS = 8, 32 + 8, 384, 5
STEP = RoundTripCost(device_forward_flops=2 * 12 * HIDDEN**2 * B * TOKENS,
                     uplink_bytes=4 * B * TOKENS * HIDDEN + B * (TOKENS + 1),
                     edge_flops=4 * 12 * HIDDEN**2 * EDGE_BLOCKS * B * TOKENS,
                     downlink_bytes=4 * B * TOKENS * HIDDEN,
                     device_backward_flops=2 * 12 * HIDDEN**2 * B * TOKENS)


class StandInSplitTrainer(FakeTrainer):
    """Plans a :class:`SplitJobCost` of identical round trips (``STEP``); no torch."""

    def plan(self, job, base):
        cost = SplitJobCost(flops=job.steps * (STEP.device_forward_flops + STEP.device_backward_flops),
                            peak_memory_bytes=6 * 10**7, update_bytes=4 * 8 * HIDDEN,
                            num_examples=self.device_num_examples(job.device_id), steps=(STEP,) * job.steps)
        return PlannedJob(job, float(base), cost)


def edge_load(run) -> dict:
    sc = variant_scenario(Scenario.model_validate(run.scenario), "split")
    sim = SplitFedSimulation(sc, run.seed, StandInSplitTrainer(sc, run.seed))
    sim.run()
    return sim.edge_summary()["edge0"]


def test_the_small_edge_queues_more_with_more_devices_and_batching_engages(plan):
    small = min(r.params[EDGE] for r in plan.runs)
    loads = {(r.params[BATCH], r.params["devices.0.count"] * 2): edge_load(r)
             for r in plan.runs if r.params[EDGE] == small}
    one = [loads[(1, n)] for n in (2, 4, 8, 16)]
    delays = [e["mean_queue_delay_s"] for e in one]
    assert all(a < b for a, b in zip(delays, delays[1:])), delays
    assert one[-1]["utilisation"] > 0.2                  # a loaded edge, not the idle large one
    assert all(e["mean_batch_size"] == 1.0 for e in one)  # max batch 1: one request per pass
    batched = loads[(8, 16)]
    assert batched["requests"] == one[-1]["requests"]
    assert batched["mean_batch_size"] > 1.0 and batched["mean_queue_delay_s"] < one[-1]["mean_queue_delay_s"]


def test_the_large_edge_is_almost_idle(plan):
    largest = max(plan.runs, key=lambda r: (r.params[EDGE], r.params["devices.0.count"], -r.params[BATCH]))
    assert edge_load(largest)["utilisation"] < 0.02
