"""Scenario checks that need files (data set, model config) but not torch.

Run by ``deftsim validate`` and before ``deftsim run``; each raises ``ValueError`` with a
message naming the field, the value and what is allowed.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from fomo.checkpoint import default_model_path
from netsim.scenario import Scenario


def model_depth(model_dir: str) -> int:
    """Number of transformer blocks from the checkpoint's config.json."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in cfg:
            return int(cfg[key])
    raise ValueError(f"model.path={model_dir!r}: config.json names no layer count (num_hidden_layers)")


def check_rank_per_layer(rank_per_layer, depth: int) -> None:
    """``peft.rank_per_layer`` against the model depth: a list needs exactly one rank per block,
    a mapping only indices 0..depth-1."""
    if rank_per_layer is None:
        return
    if isinstance(rank_per_layer, list):
        if len(rank_per_layer) != depth:
            raise ValueError(f"peft.rank_per_layer={rank_per_layer}: {len(rank_per_layer)} entries but the model has "
                             f"{depth} blocks; give one rank per block (0 = not trainable) or a mapping "
                             "{block index: rank}")
        return
    bad = sorted(i for i in rank_per_layer if i >= depth)
    if bad:
        raise ValueError(f"peft.rank_per_layer={rank_per_layer}: block(s) {bad} do not exist; the model has "
                         f"{depth} blocks, allowed indices 0..{depth - 1}")


def check_scenario_resources(scenario: Scenario) -> None:
    if scenario.trainer != "real":
        return
    model_dir = scenario.model.path or default_model_path()
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"model.path={model_dir!r} has no config.json")
    depth = model_depth(model_dir)
    bad = [layer for layer in (scenario.peft.layers or []) if layer >= depth]
    if bad:
        raise ValueError(f"peft.layers={scenario.peft.layers}: block(s) {bad} do not exist; the model has "
                         f"{depth} blocks, allowed indices 0..{depth - 1}")
    check_rank_per_layer(scenario.peft.rank_per_layer, depth)
    from fomo.data import check_data_fits

    check_data_fits(scenario)
