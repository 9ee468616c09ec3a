"""Measured depth cost profile of the real model, per PEFT parameter block.

The transformer's layers are split into N blocks of consecutive layers
(:func:`netsim.lola.profile.split_layers`, block 0 next to the output). For each block a fresh
copy of the base model gets LoRA (``peft.rank``, ``peft.target_modules``) on that block's layers
only, and one training step on a synthetic batch of the given shape is run under
``fomo.profiling``'s FLOP counter and saved-tensor meter:

- ``forward_flops``: counted FLOPs of the forward pass (no grad), block 0's model;
- ``backward_flops[n]``: counted FLOPs of forward + backward minus the forward: autograd runs
  backward only from the output down to the lowest layer that has trainable parameters, so it
  grows with the block's depth;
- ``activation_bytes[n]``: bytes autograd saves for that backward (frozen layers below the
  block save nothing);
- ``trainable_bytes[n]``: bytes of the block's LoRA matrices (the classification head, trained
  with every block, is not counted as part of a block);
- ``weights_bytes``: all parameters and buffers of the wrapped model.

With ``model.cost_model`` the same counts come from that architecture's module graph without
weights (:mod:`fomo.cost_model`), so LoLa can be planned for RoBERTa-large or an 11 B model
while the accuracy curve (``lola.train_rounds``) is the trained checkpoint's.

FLOPs and saved-tensor sizes depend on shapes only, so token ids are synthetic. Results are
cached per (model folder, LoRA config, number of blocks, batch shape, optimizer, labels): in
memory, and as JSON in ``cache_dir`` when one is given.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from netsim.lola.profile import DepthProfile, split_layers

from . import profiling
from .models import apply_peft, load_base, model_folder, num_hidden_layers

if TYPE_CHECKING:  # pragma: no cover
    from netsim.scenario import ModelSpec, PeftSpec

_CACHE: dict[str, DepthProfile] = {}


def _key(folder: str, peft_spec: "PeftSpec", num_blocks: int, batch_size: int, seq_len: int,
         optimizer: str, num_labels: int) -> str:
    raw = json.dumps([folder, peft_spec.rank, peft_spec.alpha, list(peft_spec.target_modules), num_blocks,
                      batch_size, seq_len, optimizer, num_labels])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _lora_bytes(model: torch.nn.Module) -> float:
    """Bytes of the trainable LoRA matrices (the head, trained with every block, is left out)."""
    return float(sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                     if p.requires_grad and "lora_" in n))


def _real_blocks(model_spec: "ModelSpec", peft_spec: "PeftSpec", num_blocks: int, batch_size: int, seq_len: int,
                 num_labels: int) -> tuple[list[list[int]], float, list[float], list[float], list[float], float]:
    """(blocks, forward FLOPs, backward FLOPs, saved bytes, LoRA bytes per block, weights bytes)
    counted on the real checkpoint with a synthetic batch."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        _, base = load_base(model_spec, num_labels)
        n_layers = num_hidden_layers(base.config)
        if n_layers is None:
            raise ValueError("depth profile: the model config does not say how many layers it has")
        blocks = split_layers(n_layers, num_blocks)
        vocab = int(getattr(base.config, "vocab_size", 1000))
        gen = torch.Generator().manual_seed(0)
        input_ids = torch.randint(min(1000, vocab - 1), vocab, (batch_size, seq_len), generator=gen)
        mask = torch.ones(batch_size, seq_len, dtype=torch.int64)
        labels = torch.randint(0, num_labels, (batch_size,), generator=gen)
        forward = None
        backward, act, trainable = [], [], []
        weights = 0
        for layers in blocks:
            spec = peft_spec.model_copy(update={"layers": layers, "rank_per_layer": None})
            model = apply_peft(copy.deepcopy(base), spec)
            if forward is None:
                with torch.no_grad():
                    _, forward = profiling.counted_forward(model, input_ids, mask)
                weights = profiling.weights_bytes(model)
            step = profiling.count_step_flops(model, input_ids, mask, labels)
            backward.append(float(step.flops - forward))
            act.append(float(step.saved_activation_bytes))
            trainable.append(_lora_bytes(model))
    return blocks, float(forward), backward, act, trainable, float(weights)


def _weightless_blocks(architecture: str, peft_spec: "PeftSpec", num_blocks: int, batch_size: int, seq_len: int,
                       optimizer: str, num_labels: int
                       ) -> tuple[list[list[int]], float, list[float], list[float], list[float], float]:
    """The same counts on an architecture without weights (``model.cost_model``,
    :mod:`fomo.cost_model`): one weightless model per block, an unpadded batch as above. For an
    encoder-decoder, block index i is peft's layer i, i.e. encoder block i and decoder block i."""
    from .cost_model import CostModel, architecture_config

    n_layers = num_hidden_layers(architecture_config(architecture, num_labels))
    if n_layers is None:
        raise ValueError(f"depth profile: the config of model.cost_model={architecture!r} does not say how many "
                         "layers it has")
    blocks = split_layers(n_layers, num_blocks)
    forward = None
    backward, act, trainable = [], [], []
    weights = 0.0
    for layers in blocks:
        spec = peft_spec.model_copy(update={"layers": layers, "rank_per_layer": None})
        cost = CostModel(architecture, spec, num_labels, optimizer)
        if forward is None:
            forward = cost.eval_flops(batch_size, seq_len, padded=False)
            weights = float(cost.weights_bytes)
        step = cost.profile(batch_size, seq_len, padded=False)
        backward.append(float(step.flops - forward))
        act.append(float(step.saved_activation_bytes))
        trainable.append(_lora_bytes(cost.model))
    return blocks, float(forward), backward, act, trainable, weights


def measure_depth_profile(model_spec: "ModelSpec", peft_spec: "PeftSpec", num_blocks: int, batch_size: int,
                          seq_len: int, optimizer: str = "adamw", num_labels: int = 5,
                          cache_dir: Optional[str | Path] = None) -> DepthProfile:
    """Depth cost profile of the scenario's model with LoRA split into ``num_blocks`` blocks
    (see the module docstring), counted on ``model.cost_model``'s architecture without weights
    when it is set. Raises ValueError if the model has fewer layers than blocks or the PEFT
    method is not LoRA."""
    if peft_spec.method != "lora":
        raise ValueError(f"depth profile: peft.method={peft_spec.method!r}; only 'lora' has per-block parameters")
    folder = model_folder(model_spec) if model_spec.cost_model is None else f"cost_model:{model_spec.cost_model}"
    key = _key(folder, peft_spec, num_blocks, batch_size, seq_len, optimizer, num_labels)
    if key in _CACHE:
        return _CACHE[key]
    path = Path(cache_dir) / f"depth_profile_{key}.json" if cache_dir is not None else None
    if path is not None and path.is_file():
        prof = DepthProfile.from_dict(json.loads(path.read_text()))
        _CACHE[key] = prof
        return prof

    if model_spec.cost_model is None:
        counts = _real_blocks(model_spec, peft_spec, num_blocks, batch_size, seq_len, num_labels)
    else:
        counts = _weightless_blocks(model_spec.cost_model, peft_spec, num_blocks, batch_size, seq_len, optimizer,
                                    num_labels)
    blocks, forward, backward, act, trainable, weights = counts
    prof = DepthProfile(forward_flops=forward, backward_flops=backward, activation_bytes=act,
                        trainable_bytes=trainable, weights_bytes=weights, layers=blocks,
                        batch_size=batch_size, seq_len=seq_len,
                        optimizer_states=profiling.optimizer_states_per_param(optimizer),
                        source="measured" if model_spec.cost_model is None else f"cost_model:{model_spec.cost_model}")
    _CACHE[key] = prof
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(prof.to_dict()))
    return prof


def scenario_depth_profile(scenario, cache_dir: Optional[str | Path] = None) -> DepthProfile:
    """:func:`measure_depth_profile` with the scenario's model, LoRA, ``lola.num_blocks``,
    batch size, ``model.max_length_tokens`` and optimizer."""
    return measure_depth_profile(scenario.model, scenario.peft, scenario.lola.num_blocks,
                                 scenario.training.batch_size, scenario.model.max_length_tokens,
                                 scenario.training.optimizer, scenario.fake.num_classes, cache_dir)
