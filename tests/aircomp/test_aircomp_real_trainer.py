"""PeftTrainer's flat-update hooks (real model, slow): flatten + aggregate_flat of the exact
weighted sum equals aggregate(); a short FedAvg-over-AirComp run changes the real tensors."""
import numpy as np
import pytest
import torch

from netsim.protocols.aircomp_fedavg import AirCompFedAvgSimulation
from netsim.interfaces import LocalJob
from netsim.scenario import Scenario

pytestmark = pytest.mark.slow


def small():
    return Scenario.model_validate({
        "name": "ac-real", "devices": [{"count": 3}], "model": {"max_length_tokens": 16},
        "peft": {"layers": [5]}, "data": {"max_test_examples": 32},
        "channel": {"uplink_access": "aircomp"},
        "training": {"rounds": 1, "batch_size": 2, "local_steps": 1, "learning_rate": 1e-3}})


def test_flat_hooks_match_aggregate_and_aircomp_round_runs():
    from fomo import build_trainer

    sc = small()
    trainer = build_trainer(sc, 0)
    before = trainer.global_state()
    results = trainer.local_train([LocalJob(d, 1, 1, 2) for d in range(3)])
    w = [0.2, 0.3, 0.5]
    flat = np.stack([trainer.flatten_update(r) for r in results])
    assert flat.shape == (3, trainer.adapter_bytes() // 4)
    trainer.aggregate(results, w)
    expected = trainer.global_state()
    trainer.aggregate_flat(-(np.asarray(w) @ flat))      # undo, through the flat path
    for name, t in before.items():
        torch.testing.assert_close(trainer.global_state()[name], t, rtol=0, atol=1e-7)
    trainer.aggregate_flat(np.asarray(w) @ flat)
    for name, t in expected.items():
        torch.testing.assert_close(trainer.global_state()[name], t, rtol=0, atol=1e-7)
    with pytest.raises(ValueError):
        trainer.aggregate_flat(np.zeros(5))

    before = trainer.global_state()
    sim = AirCompFedAvgSimulation(sc, 0, trainer)
    sim.run()
    row = sim.aircomp_log[0]
    assert row["scheduled"] == 3 and row["num_values"] == trainer.adapter_bytes() // 4
    assert row["mse"] == pytest.approx(row["mse_theory"], rel=0.5)
    after = trainer.global_state()
    assert any(not torch.equal(before[n], after[n]) for n in before)
