"""Real cooperative block fine-tuning (fomo/block_training.py, lola.train_rounds)."""
import json

import pytest

torch = pytest.importorskip("torch")

from netsim.scenario import Scenario  # noqa: E402


def tiny(**lola):
    return Scenario.model_validate({
        "name": "bt", "seed": 0, "experiment": "lola_compare", "trainer": "real", "d2d": {"kind": "none"},
        "devices": [{"name": "fast", "count": 2, "compute_flops_per_s": 3e12},
                    {"name": "slow", "count": 2, "compute_flops_per_s": 5e11}],
        "edge_servers": [{"name": "edge0", "compute_flops_per_s": 1e13}],
        "channel": {"uplink_bandwidth_hz": 5e6},
        "data": {"max_test_examples": 64},
        "training": {"batch_size": 4, "learning_rate": 5e-3},
        "model": {"max_length_tokens": 16},
        "peft": {"rank": 4},
        "lola": {"num_blocks": 3, "rounds": 3, "steps_per_round": 3, "profile": "analytic",
                 "jbba_iterations": 5, **lola}})


@pytest.fixture(scope="module")
def trainer():
    from fomo.block_training import BlockTrainer

    return BlockTrainer(tiny(), 0)


def test_only_assigned_block_and_head_change(trainer):
    g0 = trainer.global_state()
    update, loss = trainer.train_block(device_id=1, block=1, round_=1, steps=2, batch_size=4)
    assert loss == loss  # not nan
    assert set(update) == set(trainer.block_params[1]) | set(trainer.head_params)
    assert all(float(update[n].abs().sum()) > 0 for n in trainer.block_params[1] if "lora_B" in n)
    # the global state is untouched by a local job
    assert all(torch.equal(g0[n], t) for n, t in trainer.global_state().items())
    trainer.merge({1: update})
    g1 = trainer.global_state()
    for b, names in enumerate(trainer.block_params):
        changed = any(not torch.equal(g0[n], g1[n]) for n in names)
        assert changed == (b == 1), f"block {b}"
    assert all(not torch.equal(g0[n], g1[n]) for n in trainer.head_params)
    # deepest block: LoRA B of layer 0 gets a gradient, so backward reached depth 0
    upd2, _ = trainer.train_block(device_id=0, block=2, round_=2, steps=1, batch_size=4)
    assert any(float(upd2[n].abs().sum()) > 0 for n in trainer.block_params[2] if "layer.0." in n)


def test_deterministic():
    from fomo.block_training import BlockTrainer

    a, b = BlockTrainer(tiny(), 0), BlockTrainer(tiny(), 0)
    ua, _ = a.train_block(2, 0, 1, 2, 4)
    ub, _ = b.train_block(2, 0, 1, 2, 4)
    assert all(torch.equal(ua[n], ub[n]) for n in ua)
    first = ua
    ua, _ = a.train_all([0, 1], 1, 1, 4)
    ub, _ = b.train_all([0, 1], 1, 1, 4)
    assert all(torch.equal(ua[n], ub[n]) for n in ua)
    # reset() = a fresh trainer: same update for the same first job
    a.merge({0: ua})
    a.reset()
    uc, _ = a.train_block(2, 0, 1, 2, 4)
    assert all(torch.equal(uc[n], first[n]) for n in uc)


def test_pruned_last_block_matches_the_whole_model(trainer):
    """execution.prune_last_block (default) in block training: the same updates and accuracy as
    the whole model, to float32 rounding."""
    from fomo.block_training import BlockTrainer

    assert trainer._pruned_block is not None
    plain = tiny()
    whole = BlockTrainer(plain.model_copy(update={"execution": plain.execution.model_copy(
        update={"prune_last_block": False})}), 0)
    fast = BlockTrainer(tiny(), 0)
    assert whole._pruned_block is None
    for block in (0, 2):   # the output-side block (holds the pruned layer) and the deepest
        ua, _ = whole.train_block(1, block, 1, 2, 4)
        ub, _ = fast.train_block(1, block, 1, 2, 4)
        assert max(float((ua[n] - ub[n]).abs().max()) for n in ua) <= 1e-4
    assert whole.evaluate() == fast.evaluate()


def test_experiment_accuracy_vs_time(tmp_path):
    from deftsim.experiments.lola_compare import run_lola_compare

    sc = tiny(algorithms=["crunch", "offloading"], train_rounds=3, train_algorithms=["crunch", "offloading"])
    res = run_lola_compare(sc)
    s = res.summary
    assert set(s["accuracy_vs_time"]) == {"crunch", "offloading"}
    for name, curve in s["accuracy_vs_time"].items():
        assert len(curve) == 4 and curve[0][0] == 0.0
        times = [t for t, _ in curve]
        assert times == sorted(times) and times[-1] > 0
        assert s["final_accuracy"][name] == curve[-1][1]
        assert curve[-1][1] > curve[0][1], (name, curve)
    json.dumps(s)
    path = res.figures["lola_accuracy_vs_time.png"](tmp_path / "a.png")
    assert path.stat().st_size > 1000


def test_train_rounds_default_off_and_fake_skips():
    from deftsim.experiments.lola_compare import run_lola_compare

    assert tiny().lola.train_rounds == 0
    sc = tiny(train_rounds=2).model_copy(update={"trainer": "fake"})
    s = run_lola_compare(sc).summary
    assert "accuracy_vs_time" not in s and "accuracy_vs_time_skipped" in s
