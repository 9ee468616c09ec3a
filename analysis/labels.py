"""Human names and units for scenario field paths and metrics, for axis labels and captions.

``field_label("devices.0.tx_power_w")`` -> ``"device tx power, group 0 [W]"``. The unit comes from
the name's suffix (:data:`UNITS`: ``_w`` -> W, ``_hz`` -> Hz, ``_s`` -> s, ``_bytes`` -> bytes,
``_db`` -> dB, ``_m`` -> m, ``_flops_per_s`` -> FLOP/s, ...); the name from a few hand-written
names (:data:`NAMES`) or else the field's words with the unit suffix removed, prefixed by the
section (``aircomp.`` -> "AirComp", ``lola.`` -> "LoLa"). A list index in the path names the
device group or edge server.
"""
from __future__ import annotations

import re

UNITS = [("_flops_per_s", "FLOP/s"), ("_per_s", "1/s"), ("_dbm_per_hz", "dBm/Hz"), ("_mps", "m/s"), ("_bps", "bit/s"), ("_hz", "Hz"),
         ("_db", "dB"), ("_bytes", "bytes"), ("_flops", "FLOP"), ("_w", "W"), ("_m", "m"), ("_s", "s"),
         ("_j", "J")]
"""(name suffix, unit), longest suffixes first."""

NAMES = {
    "seed": "seed",
    "topology_seed": "topology seed",
    "training_seed": "training seed",
    "trainer": "trainer",
    "experiment": "experiment",
    "training.devices_per_round": "devices per round",
    "training.local_steps": "local steps per round",
    "training.rounds": "rounds",
    "training.batch_size": "batch size",
    "training.learning_rate": "learning rate",
    "training.optimizer": "optimizer",
    "peft.method": "PEFT method",
    "peft.rank": "LoRA rank",
    "peft.alpha": "LoRA alpha",
    "peft.dropout": "LoRA dropout",
    "peft.target_modules": "PEFT target modules",
    "peft.layers": "PEFT layers",
    "peft.num_virtual_tokens": "prompt length (virtual tokens)",
    "channel.uplink_access": "uplink access",
    "channel.fading": "fading",
    "channel.pathloss.model": "path-loss model",
    "channel.pathloss.exponent": "path-loss exponent",
    "data.partition": "data partition",
    "data.dirichlet_alpha": "Dirichlet alpha (non-IID)",
    "d2d.kind": "D2D graph",
    "d2d.k": "D2D neighbours k",
    "aircomp.truncation_threshold": "AirComp truncation threshold g_th",
    "aircomp.power_policy": "AirComp power policy",
    "aircomp.receive_snr_db": "AirComp receive SNR [dB]",
    "lola.num_blocks": "LoLa blocks N",
    "fake.learning_speed": "fake trainer learning speed",
    "fake.step_flops": "fake trainer FLOPs per step [FLOP]",
    "fake.adapter_bytes": "fake trainer adapter size [bytes]",
    "lola.offload_bytes_per_sample": "LoLa raw-sample size offloaded [bytes]",
    "channel.pathloss.shadowing_std_db": "shadowing standard deviation [dB]",
    "count": "number of devices",
    "placement.max_distance_m": "max distance to the edge [m]",
    "placement.min_distance_m": "min distance to the edge [m]",
    "compute_flops_per_s": "compute speed [FLOP/s]",
    "training.mode": "protocol mode",
    "training.deadline_s": "round deadline [s]",
    "training.min_results": "least updates per round",
    "training.over_selection": "over-selection factor",
    "dynamics.availability.model": "availability model",
    "dynamics.availability.p_available": "P(device available in a round)",
    "dynamics.availability.mean_on_s": "mean on time [s]",
    "dynamics.availability.mean_off_s": "mean off time [s]",
    "dynamics.stragglers.jitter_sigma": "compute jitter sigma (log-normal)",
    "dynamics.mobility.model": "mobility model",
    "dynamics.mobility.v_max_mps": "largest speed [m/s]",
    "dynamics.mobility.v_min_mps": "least speed [m/s]",
    "dynamics.mobility.tick_s": "mobility tick [s]",
    "dynamics.mobility.handover_hysteresis_db": "handover hysteresis [dB]",
    "async_fl.concurrency": "devices training at once",
    "async_fl.period_s": "aggregation period [s]",
    "async_fl.max_staleness": "largest staleness kept",
    "strategies.aggregation.params.buffer_size": "FedBuff buffer size K",
    "strategies.aggregation.params.poly_a": "staleness exponent a",
    "strategies.selection.name": "selection strategy",
    "strategies.aggregation.name": "aggregation strategy",
    "strategies.bandwidth.name": "bandwidth allocation",
    "strategies.compression.name": "update compression",
    "prompt_service.slots": "compute slots of the edge",
    "prompt_service.capacity": "requests the edge holds (K)",
    "prompt_service.max_steps": "tuning steps per request, at most",
    "prompt_service.examples_per_request": "labelled examples per request",
    "prompt_service.discipline": "queue discipline",
    "prompt_service.admission": "admission policy",
    "rate_per_s": "arrival rate",
}
"""Hand-written names, by full path or by the path inside a device group / edge server. A name
that already holds its unit in brackets is used as it stands."""

SECTIONS = {"aircomp": "AirComp", "lola": "LoLa", "neural_aircomp": "neural AirComp", "peft": "PEFT",
            "fake": "fake trainer", "d2d": "D2D", "data": "data", "model": "model", "stop": "stop",
            "channel": "", "training": "", "execution": "execution", "pathloss": "path loss",
            "placement": "", "analytic": "analytic model"}
"""Section prefixes of field paths; an empty one is left out (``channel.uplink_bandwidth_hz`` ->
"uplink bandwidth [Hz]")."""

LISTS = {"devices": ("device", "group"), "edge_servers": ("edge server", "server"),
         "prompt_service.user_classes": ("user", "class")}
"""List sections: (what the leaf belongs to, what the index names)."""

WORDS = {"snr": "SNR", "psd": "PSD", "nmse": "NMSE", "mse": "MSE", "d2d": "D2D", "tx": "tx", "rx": "rx",
         "ofdma": "OFDMA", "aircomp": "AirComp", "lola": "LoLa", "peft": "PEFT", "lora": "LoRA", "num": "number of",
         "jbba": "JBBA"}

METRICS = {
    "final_accuracy": "final test accuracy [-]",
    "best_accuracy": "best test accuracy [-]",
    "initial_accuracy": "initial test accuracy [-]",
    "accuracy": "test accuracy [-]",
    "sim_time_s": "simulated run time [s]",
    "time_to_target_s": "simulated time to the target accuracy [s]",
    "energy_to_target_j": "device energy to the target accuracy [J]",
    "total_device_energy_j": "total device energy [J]",
    "mean_device_energy_j": "mean energy per device [J]",
    "uplink_energy_j": "uplink energy [J]",
    "mean_round_latency_s": "mean round latency [s]",
    "p95_round_latency_s": "95th-percentile round latency [s]",
    "planned_latency_s": "planned round latency [s]",
    "aggregation_latency_s": "uplink air time per round [s]",
    "mean_uplink_s": "uplink time per step [s]",
    "aircomp.mean_nmse": "aggregation NMSE [-]",
    "aircomp.mean_receive_snr_db": "receive SNR [dB]",
    "aircomp.mean_truncation_ratio": "truncated share of entries [-]",
    "compute_share": "share of device time computing [-]",
    "communication_share": "share of device time transmitting [-]",
    "rounds_completed": "rounds completed [-]",
    "dropped_updates": "updates lost offline [-]",
    "late_updates": "late updates [-]",
    "stale_updates": "updates discarded as stale [-]",
    "stale_updates_mean": "mean staleness [server steps]",
    "handovers": "handovers [-]",
    "mean_sojourn_s": "mean sojourn (arrival to answer) [s]",
    "mean_wait_s": "mean wait for a slot [s]",
    "p95_wait_s": "95th-percentile wait for a slot [s]",
    "acceptance_ratio": "requests admitted [-]",
    "deadline_hit_ratio": "completed requests on time [-]",
    "utilisation": "slot utilisation [-]",
    "target_hit_ratio": "served requests that met their target [-]",
    "time_to_target_accuracy_s": "median time to target from arrival [s]",
    "service_time_to_target_s": "median time to target in service [s]",
    "goodput_per_s": "requests on time per second [1/s]",
}
"""Names of the report's metrics (columns of ``runs.parquet`` and ``variants.parquet``)."""


def unit_of(name: str) -> str:
    """Unit of a field or metric from its name's suffix (``channel.uplink_bandwidth_hz`` -> Hz);
    ``-`` for dimensionless names (accuracies, ratios, counts)."""
    leaf = name.split(".")[-1]
    if "accuracy" in leaf and not leaf.endswith("_s") and not leaf.endswith("_j"):
        return "-"
    for suffix, unit in UNITS:
        if leaf.endswith(suffix):
            return unit
    return "-"


def _strip_unit(leaf: str) -> str:
    for suffix, _ in UNITS:
        if leaf.endswith(suffix) and len(leaf) > len(suffix):
            return leaf[: -len(suffix)]
    return leaf


def _words(leaf: str) -> str:
    return " ".join(WORDS.get(w, w) for w in _strip_unit(leaf).split("_") if w)


def _with_unit(name: str, leaf: str) -> str:
    return name if re.search(r"\[[^\]]*\]$", name) else f"{name} [{unit_of(leaf)}]"


def field_label(path: str) -> str:
    """Axis label of a scenario field path or metric name, with its unit in brackets:
    ``devices.0.tx_power_w`` -> ``device tx power, group 0 [W]``,
    ``channel.uplink_bandwidth_hz`` -> ``uplink bandwidth [Hz]``,
    ``training.devices_per_round`` -> ``devices per round [-]``."""
    if path in METRICS:
        return METRICS[path]
    if path in NAMES:
        return _with_unit(NAMES[path], path)
    parts = path.split(".")
    if len(parts) >= 4 and ".".join(parts[:2]) in LISTS and parts[2].isdigit():   # a list inside a section
        parts = [".".join(parts[:2]), *parts[2:]]
    if len(parts) >= 3 and parts[0] in LISTS and parts[1].isdigit():
        owner, index_name = LISTS[parts[0]]
        inner = ".".join(parts[2:])
        leaf = parts[-1]
        if inner in NAMES:
            name = NAMES[inner]
            unit = re.search(r"\s*(\[[^\]]*\])$", name)
            base = name[: unit.start()] if unit else name
            tail = unit.group(1) if unit else f"[{unit_of(leaf)}]"
            prefix = "" if owner.split()[0] in base or base.startswith("number of") else f"{owner} "
            return f"{prefix}{base}, {index_name} {parts[1]} {tail}"
        middle = [SECTIONS.get(p, _words(p)) for p in parts[2:-1]]
        words = " ".join(w for w in [owner, *middle, _words(leaf)] if w)
        return f"{words}, {index_name} {parts[1]} [{unit_of(leaf)}]"
    section = [SECTIONS.get(p, _words(p)) for p in parts[:-1]]
    words = " ".join(w for w in [*section, _words(parts[-1])] if w)
    return f"{words} [{unit_of(parts[-1])}]"


def axis_label(name: str) -> str:
    """Alias of :func:`field_label` (the report's axis labels)."""
    return field_label(name)


def short_label(path: str) -> str:
    """A field's name without its unit, for legends and point labels (``LoRA rank``)."""
    return re.sub(r"\s*\[[^\]]*\]$", "", field_label(path))
