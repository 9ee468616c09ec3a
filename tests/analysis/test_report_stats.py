"""Spreads over seeds, clipping to a metric's range, the one target-accuracy rule, axis labels,
categorical fields and the per-device energy order."""
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.figures import category_text, check_formats, is_numeric
from analysis.files import ReportError
from analysis.labels import field_label, short_label, unit_of
from analysis.metrics import (choose_target, energy_per_device_j, mean_ci, metric_bounds, natural_key, seed_spread,
                              spread_text, summarize)


def test_seed_spread_needs_three_seeds_for_a_ci():
    one, two, three = seed_spread([0.4]), seed_spread([0.1, 0.9]), seed_spread([0.5, 0.6, 0.7])
    assert one["kind"] == "single" and math.isnan(one["low"]) and spread_text(one) == "n=1 (one seed)"
    # two seeds: the range, never mean -+ 12.7 standard errors
    assert two["kind"] == "range" and (two["low"], two["high"]) == (0.1, 0.9)
    assert spread_text(two).startswith("n=2 (too few seeds for a CI): range [0.1, 0.9]")
    half = stats.t.ppf(0.975, 2) * np.std([0.5, 0.6, 0.7], ddof=1) / math.sqrt(3)
    assert three["kind"] == "ci" and three["high"] - three["mean"] == pytest.approx(half, rel=1e-12)
    assert seed_spread([None, math.nan])["kind"] == "none"


def test_intervals_are_clipped_to_the_metric_range():
    # accuracies near 1 with a wide spread: the t-interval would pass 1
    m, lo, hi, n = mean_ci([0.99, 1.0, 0.6], bounds=(0.0, 1.0))
    unclipped = mean_ci([0.99, 1.0, 0.6])
    assert n == 3 and unclipped[2] > 1.0 and hi == 1.0 and lo == unclipped[1]
    s = seed_spread([0.0, 0.01, 0.4], bounds=metric_bounds("final_accuracy"))
    assert s["low"] == 0.0
    assert metric_bounds("final_accuracy") == (0.0, 1.0)
    assert metric_bounds("compute_share") == (0.0, 1.0)
    assert metric_bounds("aircomp.mean_truncation_ratio") == (0.0, 1.0)
    assert metric_bounds("time_to_target_s") == (0.0, None)
    assert metric_bounds("energy_to_target_j") == (0.0, None)
    assert metric_bounds("latency_ratio_ofdma_over_aircomp") == (0.0, None)
    assert metric_bounds("aircomp.mean_receive_snr_db") == (None, None)


def test_choose_target_is_one_rule():
    assert choose_target([0.5, 0.9], [None, None], 0.7) == (0.7, "given with --target")
    assert choose_target([0.5, 0.9], [0.8, 0.8])[0] == 0.8                   # common and reached
    value, source = choose_target([0.5, 0.6], [0.8, 0.8])                     # common, never reached
    assert value == math.floor(0.9 * 0.55 * 100) / 100 and "no run reached" in source
    assert choose_target([0.5, 0.7, 0.9], [0.6, None])[0] == 0.63            # 90 % of the median 0.7
    with pytest.raises(ValueError):
        choose_target([], [])


def test_axis_labels_have_human_names_and_units():
    assert field_label("devices.0.tx_power_w") == "device tx power, group 0 [W]"
    assert field_label("devices.2.compute_flops_per_s") == "device compute speed, group 2 [FLOP/s]"
    assert field_label("channel.uplink_bandwidth_hz") == "uplink bandwidth [Hz]"
    assert field_label("channel.noise_psd_dbm_per_hz") == "noise PSD [dBm/Hz]"
    assert field_label("aircomp.receive_snr_db") == "AirComp receive SNR [dB]"
    assert field_label("devices.0.placement.max_distance_m") == "device max distance to the edge, group 0 [m]"
    assert field_label("devices.1.memory_bytes") == "device memory, group 1 [bytes]"
    assert field_label("edge_servers.0.compute_flops_per_s") == "edge server compute speed, server 0 [FLOP/s]"
    assert field_label("lola.steps_per_round") == "LoLa steps per round [-]"
    assert field_label("training.devices_per_round") == "devices per round [-]"
    assert field_label("devices.0.count") == "number of devices, group 0 [-]"
    assert short_label("peft.rank") == "LoRA rank" and short_label("peft.method") == "PEFT method"
    assert field_label("coherence_time_s").endswith("[s]") and unit_of("x.energy_j") == "J"
    for path in ["channel.pathloss.shadowing_std_db", "fake.step_flops", "lola.total_bandwidth_hz"]:
        assert "_" not in field_label(path).split("[")[0], field_label(path)


def test_categorical_values():
    assert is_numeric([1, 2.5]) and not is_numeric([True, False]) and not is_numeric(["lora", "prompt_tuning"])
    assert not is_numeric([1.0, math.nan]) and not is_numeric([])
    assert category_text(True) == "true" and category_text(None) == "(unset)"
    assert check_formats(["PNG", "pdf", "svg", "png"]) == ("png", "pdf", "svg")
    with pytest.raises(ReportError):
        check_formats(["jpeg"])


def test_energy_of_every_device_in_natural_order():
    names = [f"dev{i}" for i in (10, 2, 0, 1)]
    events = pd.DataFrame({"t_s": 0.0, "duration_s": 1.0, "kind": "compute", "node": names,
                           "energy_j": [1.0, 2.0, 3.0, 4.0], "round": 1, "accuracy": math.nan})
    every = [f"dev{i}" for i in range(12)]
    energy = energy_per_device_j(events, every)
    assert list(energy.index) == every                       # dev2 before dev10; dev3 etc. with 0 J
    assert energy["dev10"] == 1.0 and energy["dev3"] == 0.0 and energy.sum() == 10.0
    assert list(energy_per_device_j(events).index) == ["dev0", "dev1", "dev2", "dev10"]
    assert sorted(["dev10", "dev9", "edge0", "dev1"], key=natural_key) == ["dev1", "dev9", "dev10", "edge0"]
    evaluate = pd.DataFrame({"t_s": [0.0, 1.0], "duration_s": 0.0, "kind": "evaluate", "node": "edge0",
                             "energy_j": 0.0, "round": [0, 1], "accuracy": [0.2, 0.5], "flops": 0.0, "bytes": 0})
    s = summarize(pd.concat([events.assign(flops=0.0, bytes=0), evaluate], ignore_index=True), num_classes=5,
                  stop_reason="x", target_accuracy=None, devices=every)
    assert list(s["energy_per_device_j"]) == every
    assert s["mean_device_energy_j"] == pytest.approx(10.0 / 12)
