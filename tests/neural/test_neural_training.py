"""Real split fine-tuning over the neural connection: it learns, it is deterministic, and the
experiment writes its summary (tiny settings: K = 2 devices, 8-token segments)."""
import json

import numpy as np
import pytest

pytest.importorskip("torch")

from netsim.protocols.neural_aircomp import NeuralConnectionSimulation  # noqa: E402
from netsim.scenario import Scenario  # noqa: E402


def tiny(**neural):
    spec = {"segment_tokens": 6, "feature_dim": 8, "head_hidden_dim": 16, "steps": 30, "eval_every_steps": 10,
            "max_train_examples": 100, "receive_snr_db": [None, 0.0]}
    spec.update(neural)
    return Scenario.model_validate({
        "name": "tiny-neural", "seed": 0, "experiment": "neural_aircomp", "devices": [{"count": 2}],
        "channel": {"uplink_bandwidth_hz": 10e6}, "d2d": {"kind": "none"},
        "data": {"max_test_examples": 50}, "training": {"batch_size": 16, "learning_rate": 1e-2},
        "neural_aircomp": spec})


@pytest.fixture(scope="module")
def split_data():
    """Encoded once for the module; one torch thread (small ops on a shared 2-core host), the
    previous setting restored afterwards."""
    import torch

    from fomo.neural_connection import prepare_split_data

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield prepare_split_data(tiny(), 0)
    finally:
        torch.set_num_threads(threads)


def run(data, uplink, snr=None, steps=30):
    from fomo.neural_connection import NeuralConnectionTrainer

    sc = tiny()
    sim = NeuralConnectionSimulation(sc, 0, NeuralConnectionTrainer(data, sc, 0), uplink, snr)
    return sim, sim.run(steps, 10)


def test_split_data_shapes(split_data):
    assert split_data.train_emb.shape == (100, 2, 384)
    assert split_data.test_emb.shape == (50, 2, 384)
    assert len(set(split_data.train_labels.tolist())) == 5          # shuffled before the cap
    assert split_data.encoder_flops_per_segment > 0


@pytest.mark.parametrize("uplink,snr", [("digital", None), ("aircomp", None)])
def test_training_beats_chance(split_data, uplink, snr):
    chance = np.bincount(split_data.test_labels.numpy()).max() / len(split_data.test_labels)
    _, res = run(split_data, uplink, snr)
    assert res.final_accuracy > chance + 0.15, (res.final_accuracy, chance)


def test_same_seed_same_run(split_data):
    sim1, r1 = run(split_data, "aircomp", 0.0, steps=10)
    sim2, r2 = run(split_data, "aircomp", 0.0, steps=10)
    assert r1.final_accuracy == r2.final_accuracy and r1.sim_time_s == r2.sim_time_s
    assert r1.channel_log == r2.channel_log
    f1, f2 = sim1.recorder.to_frame(), sim2.recorder.to_frame()
    assert f1.equals(f2)


def test_timeline_accounting(split_data):
    sim, res = run(split_data, "digital", steps=3)
    ev = sim.recorder.to_frame()
    model = sim.model
    kinds = ev.groupby("round")["kind"].apply(list)
    assert kinds[1] == ["compute"] * 2 + ["uplink"] * 2 + ["edge_compute", "broadcast"] + ["downlink"] * 2 + ["compute"] * 2
    up = ev[(ev["kind"] == "uplink")]
    assert (up["bytes"] == 4 * model.feature_values_per_device).all()
    comp = ev[(ev["kind"] == "compute") & (ev["round"] == 1)]["flops"].tolist()
    assert comp == [model.device_forward_flops] * 2 + [model.device_backward_flops] * 2
    # the steps are back to back: sim time = sum of the per-step maxima
    uplinks = ev[ev["kind"] == "uplink"].groupby("round")["duration_s"].max().sum()
    broadcasts = ev[ev["kind"] == "broadcast"]["duration_s"].sum()
    compute = ev[ev["kind"] == "compute"].groupby(["round", "flops"])["duration_s"].max().sum()
    edge = ev[ev["kind"] == "edge_compute"]["duration_s"].sum()
    assert res.sim_time_s == pytest.approx(compute + uplinks + edge + broadcasts, rel=1e-9)
    # AirComp uplink: ceil(B d / M) OFDM symbols
    sim_a, _ = run(split_data, "aircomp", steps=1)
    assert sim_a.channel_log[0]["num_symbols"] == int(np.ceil(model.feature_values_per_device / 666))


def test_experiment_writes_summary(tmp_path, monkeypatch, split_data):
    from deftsim.report import print_neural
    from deftsim.runner import run_scenario

    monkeypatch.setattr("fomo.neural_connection.prepare_split_data", lambda sc, seed: split_data)
    summary = run_scenario(tiny(steps=5, eval_every_steps=5), tmp_path)
    assert summary["variants"] == ["digital", "aircomp_links", "aircomp_snr_0dB"]
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    for key in ("final_accuracy", "sim_time_s", "uplink_latency_s"):
        assert set(on_disk[key]) == set(summary["variants"])
    assert on_disk["uplink_latency_s"]["aircomp_links"] < on_disk["uplink_latency_s"]["digital"]
    assert (tmp_path / "neural_accuracy_vs_time.png").stat().st_size > 1000
    print_neural(on_disk, str(tmp_path))
