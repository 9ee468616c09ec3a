"""The report's reading of experiment prompt_service (torch-free): labels of its fields and
metrics, the mean of the requests' step curves, and one row per variant from summary.json."""
import math

import numpy as np
import pandas as pd
import pytest

from analysis.labels import field_label
from analysis.variants import mean_step_curve, service_curve, variant_rows


def test_labels_of_the_service_fields_and_metrics():
    assert field_label("prompt_service.user_classes.0.rate_per_s") == "user arrival rate, class 0 [1/s]"
    assert field_label("prompt_service.user_classes.1.relative_deadline_s") == "user relative deadline, class 1 [s]"
    assert field_label("goodput_per_s") == "requests on time per second [1/s]"
    assert field_label("throughput_per_s") == "throughput [1/s]"
    assert field_label("devices.0.count") == "number of devices, group 0 [-]"   # unchanged
    assert field_label("edge_servers.0.compute_flops_per_s") == "edge server compute speed, server 0 [FLOP/s]"


def test_mean_step_curve_holds_each_value_and_averages_the_defined_ones():
    per = [(np.array([0.0, 2.0]), np.array([0.2, 0.6])),    # 0.2 on [0, 2), then 0.6
           (np.array([1.0, 4.0]), np.array([0.4, 1.0]))]    # undefined before 1, 0.4 on [1, 4), then 1.0
    curve = mean_step_curve(per, points=5)                   # x = 0, 1, 2, 3, 4
    assert curve["x"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert curve["y"].tolist() == pytest.approx([0.2, 0.3, 0.5, 0.5, 0.8], abs=1e-15)
    assert mean_step_curve([], 5).empty


def test_service_curve_measures_from_each_requests_service_start():
    rows = [  # request 0 arrives at 1 s and starts at 1.5 s; request 1 waits from 2 s to 4 s
        ("request_wait", 1.0, 0.5, 0, math.nan), ("evaluate", 1.5, 0.0, 0, 0.3), ("evaluate", 2.5, 0.0, 0, 0.7),
        ("request_wait", 2.0, 2.0, 1, math.nan), ("evaluate", 4.0, 0.0, 1, 0.5), ("evaluate", 5.0, 0.0, 1, 0.9),
        ("evaluate", 9.0, 0.0, 7, 0.1)]       # a request that never started: ignored
    events = pd.DataFrame(rows, columns=["kind", "t_s", "duration_s", "round", "accuracy"])
    curve = service_curve(events, points=3)  # 0, 0.5, 1.0 s after start
    assert curve["t_s"].tolist() == [0.0, 0.5, 1.0]
    assert curve["accuracy"].tolist() == pytest.approx([0.4, 0.4, 0.8], abs=1e-15)


def test_variant_rows_of_a_service_summary():
    variant = {"final_accuracy": 0.7, "mean_sojourn_s": 1.5, "acceptance_ratio": 0.75,
               "time_to_target_accuracy_s": None, "requests": {"arrived": 4, "admitted": 3, "completed": 3,
                                                               "met_deadline": 2}}
    summary = {"experiment": "prompt_service", "variant_order": ["ensemble", "scratch"],
               "variants": {"scratch": dict(variant, final_accuracy=0.5), "ensemble": variant}}
    rows = variant_rows(summary)
    assert [r["variant"] for r in rows] == ["ensemble", "scratch"]
    assert rows[0]["final_accuracy"] == 0.7 and rows[1]["final_accuracy"] == 0.5
    assert rows[0]["requests_admitted"] == 3 and rows[0]["requests_met_deadline"] == 2
    assert math.isnan(rows[0]["time_to_target_accuracy_s"]) and math.isnan(rows[0]["utilisation"])
