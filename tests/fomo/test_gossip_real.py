"""Gossip FL on the real trainer (slow: real all-MiniLM-L6-v2): per-device states round-trip
through float64 vectors exactly, each job trains from its device's own state, a Metropolis step
on a triangle (W = 11^T/3) gives every device the network average, and the consensus model is
what is evaluated, without touching the global state."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fomo import build_trainer
from netsim.protocols import make_simulation
from netsim.protocols.gossip_fl import GossipFLSimulation, consensus_distance
from netsim.sidelink import metropolis_weights
from netsim.scenario import Scenario

pytestmark = pytest.mark.slow

EPS32 = float(np.finfo(np.float32).eps)


def gossip_scenario():
    """3 devices all within sidelink range (a triangle), batch 2, 2 local steps, 16 tokens."""
    return Scenario.model_validate({
        "name": "gossip_real", "devices": [{"count": 3}], "model": {"max_length_tokens": 16},
        "data": {"max_test_examples": 32, "partition": "iid"},
        "training": {"batch_size": 2, "local_steps": 2, "learning_rate": 1e-3, "rounds": 2, "topology": "gossip"},
        "d2d": {"kind": "distance", "threshold_m": 1e6}, "gossip": {"steps_per_round": 1}})


def test_gossip_on_the_real_trainer():
    sc = gossip_scenario()
    trainer = build_trainer(sc, 0)
    sim = make_simulation(sc, 0, trainer)
    assert isinstance(sim, GossipFLSimulation)
    np.testing.assert_allclose(metropolis_weights(sim.network.d2d), np.full((3, 3), 1.0 / 3.0), rtol=0, atol=1e-16)

    # float32 state -> float64 vector -> float32 state is exact
    init = trainer.snapshot()
    back = trainer.state_from_vector(trainer.state_vector(init))
    assert all(torch.equal(back[n], init[n]) for n in init)

    bases, before_mix, results = {}, [], []
    submit, step = sim._submit, sim._gossip_step

    def spy_submit(device, r, base=None):
        bases[(r, device.index)] = base
        job = submit(device, r, base=base)
        job.when_done(results.append)
        return job

    def spy_step(r):
        before_mix.append(sim.x.copy())
        return (yield from step(r))
    sim._submit, sim._gossip_step = spy_submit, spy_step
    global_before = {n: t.clone() for n, t in trainer.snapshot().items()}
    eval_before = trainer.evaluate()
    sim.run()

    assert len(before_mix) == 2 and len(results) == 6
    # round 2's jobs start from the mixed states of round 1, one per device (the same average
    # for all three on a triangle, up to float32 rounding)
    for i in range(3):
        base = bases[(2, i)]
        np.testing.assert_allclose(trainer.state_vector(base), before_mix[0].mean(axis=0), rtol=0,
                                   atol=4 * EPS32 * np.abs(before_mix[0]).max())
    # x after local steps = own base + own update (trained_state), in float64 of the float32 sum
    for res in results[3:]:
        own = trainer.trained_state(bases[(2, res.device_id)], res)
        np.testing.assert_array_equal(before_mix[1][res.device_id], trainer.state_vector(own))
    # a step on the triangle is the exact average: distance ~ 0, the mean kept (float64 rounding)
    scale = np.abs(before_mix[1]).max()
    # W = 11^T/3 up to 1 ulp per entry: each mixed value is off by at most ~4 eps64 x scale
    np.testing.assert_allclose(sim.x, np.tile(before_mix[1].mean(axis=0), (3, 1)), rtol=0,
                               atol=4 * np.finfo(np.float64).eps * scale)
    assert consensus_distance(sim.x) <= 1e-14 * scale
    assert consensus_distance(before_mix[1]) > 1e-6   # the devices had drifted apart
    # the evaluation is the consensus model's, and the global state is never touched
    last = sim.recorder.to_frame().query("kind == 'evaluate'").iloc[-1]
    assert last["accuracy"] == trainer.evaluate_state(sim.consensus_state()).accuracy
    assert all(torch.equal(trainer.snapshot()[n], global_before[n]) for n in global_before)
    assert trainer.evaluate().loss == eval_before.loss
    summary = sim.dynamics_summary()
    assert summary["d2d_bytes"] == 2 * 6 * trainer.adapter_bytes()   # 2 rounds x 6 directed sidelinks
    assert summary["gossip"]["within_bound_all_rounds"]
