"""Flower client side of bench/flower_vs_deftsim.py (imported inside Flower's Ray workers).

One process-wide cache per worker holds the model and the tokenized data (loaded once per
worker, as a well-written Flower app does); each client is a device of the deftsim scenario:
same data partition, same batch-sampling stream, a fresh AdamW per round, E local steps.
"""
from __future__ import annotations

from typing import Any

_CACHE: dict[str, Any] = {}


def _setup(spec: dict, threads: int) -> dict[str, Any]:
    """Model, tokenized data and partition of the scenario ``spec`` (once per process)."""
    if "spec" in _CACHE and _CACHE["spec"] == spec:
        return _CACHE
    import torch

    from fomo import data as fdata
    from fomo import models
    from fomo.trainer import tokenize_all
    from netsim.scenario import Scenario

    torch.set_num_threads(threads)
    scenario = Scenario.model_validate(spec)
    texts, labels, classes = fdata.load_texts(scenario.data)
    train_idx, _, parts = fdata.split_and_partition(labels, scenario.data, scenario.num_devices, scenario.seed)
    torch.manual_seed(fdata.torch_init_seed(scenario.seed))
    tokenizer, base = models.load_base(scenario.model, len(classes))
    model = models.apply_peft(base, scenario.peft)
    _CACHE.update(
        spec=spec, scenario=scenario, model=model,
        tokens=tokenize_all(tokenizer, texts, labels, scenario.model.max_length_tokens),
        device_examples=[train_idx[p] for p in parts],
        params=[p for _, p in models.trainable_parameters(model)],
    )
    return _CACHE


def make_client(partition_id: int, spec: dict, threads: int) -> Any:
    """A Flower ``NumPyClient`` for device ``partition_id``."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from flwr.client import NumPyClient

    from fomo import data as fdata

    class LoraClient(NumPyClient):
        def fit(self, parameters: list, config: dict) -> tuple[list, int, dict]:
            c = _setup(spec, threads)
            sc = c["scenario"]
            steps, batch = sc.training.local_steps, sc.training.batch_size
            with torch.no_grad():
                for p, value in zip(c["params"], parameters):
                    p.copy_(torch.from_numpy(np.asarray(value)))
            own = c["device_examples"][partition_id]
            rng = fdata.device_rng(sc.seed, partition_id)
            for _ in range((int(config["round"]) - 1) * steps):  # the stream of earlier rounds
                fdata.sample_batch(rng, own, batch)
            optimizer = torch.optim.AdamW(c["params"], lr=sc.training.learning_rate)
            losses = []
            for _ in range(steps):
                examples = fdata.sample_batch(rng, own, batch)
                ids, mask, labels = c["tokens"].batch(examples)
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(c["model"](input_ids=ids, attention_mask=mask).logits, labels)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
            return ([p.detach().numpy().copy() for p in c["params"]], len(own),
                    {"loss": float(np.mean(losses))})

    return LoraClient().to_client()
