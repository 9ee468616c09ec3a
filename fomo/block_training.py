"""Real cooperative block fine-tuning for LoLa (accuracy vs. simulated time).

A small dedicated trainer (it does not touch :class:`fomo.trainer.PeftTrainer`, but loads the
data, the partition, the model and the LoRA exactly as it does, from the same seed streams):

- LoRA (``peft``) on every transformer layer; the layers are split into ``lola.num_blocks``
  blocks by :func:`netsim.lola.profile.split_layers` (block 0 next to the output, as in the
  depth profile and the allocation);
- :meth:`BlockTrainer.train_block`: one device trains one block. Only that block's LoRA tensors
  and the classification head have ``requires_grad``; every other LoRA tensor is frozen, so
  autograd runs the backward from the output down to the block's lowest layer only (the real
  depth-dependent backward the depth profile measures). ``steps`` AdamW/SGD steps on batches
  of the device's own data; returns {name: local - global} for the block's and the head's tensors;
- :meth:`BlockTrainer.train_all`: the edge (offloading) trains every block and the head on the
  given devices' samples, one device's batches after another (FIFO, as simulated);
- :meth:`BlockTrainer.merge`: the edge writes each block's update (from its one device) into
  the global state and averages the head updates;
- :meth:`BlockTrainer.evaluate`: accuracy on the first ``data.max_test_examples`` test examples.

Determinism: model/LoRA init from ``fomo.data.torch_init_seed``, batches from each device's
``fomo.data.device_rng`` stream (the device's own generator, persistent across rounds), no
dropout in the base model; same calls in the same order give identical numbers.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fomo import data as fdata
from fomo import models, profiling
from fomo.last_block import probe_last_block, pruned
from fomo.trainer import EVAL_BATCH_SIZE, configure_threads, tokenize_all
from netsim.lola.profile import split_layers

if TYPE_CHECKING:  # pragma: no cover
    from netsim.scenario import Scenario

HEAD = "head"
State = dict[str, torch.Tensor]


class BlockTrainer:
    """LoRA on all N blocks; per-block local training, edge merge, evaluation.

    Attributes
    ----------
    block_params : list[list[str]]   names of each block's LoRA tensors (index 0 = output side)
    head_params : list[str]          trainable tensors outside the transformer layers (the head)
    layers : list[list[int]]         transformer layers of each block
    """

    def __init__(self, scenario: "Scenario", seed: int) -> None:
        configure_threads()
        self.seed = int(seed)
        self._optimizer_name = scenario.training.optimizer
        self._lr = float(scenario.training.learning_rate)
        texts, labels, self.class_names = fdata.load_texts(scenario.data)
        train_idx, test_idx, parts = fdata.split_and_partition(labels, scenario.data, scenario.num_devices, self.seed)
        self._device_examples = [train_idx[p] for p in parts]
        self._test_examples = test_idx[: scenario.data.max_test_examples]
        self._rngs: dict[int, np.random.Generator] = {}
        torch.manual_seed(fdata.torch_init_seed(self.seed))
        tokenizer, base = models.load_base(scenario.model, len(self.class_names))
        peft_spec = scenario.peft.model_copy(update={"layers": None, "rank_per_layer": None})
        if peft_spec.method != "lora":
            raise ValueError(f"block training needs peft.method 'lora', not {peft_spec.method!r}")
        self.model = models.apply_peft(base, peft_spec)
        self.model.train()
        self._tokens = tokenize_all(tokenizer, texts, labels, int(scenario.model.max_length_tokens))
        n_layers = models.num_hidden_layers(base.config)
        if n_layers is None:
            raise ValueError("block training: the model config does not say how many layers it has")
        self.layers = split_layers(n_layers, scenario.lola.num_blocks)
        block_of_layer = {l: b for b, ls in enumerate(self.layers) for l in ls}
        self._params = dict(models.trainable_parameters(self.model))
        self.block_params: list[list[str]] = [[] for _ in self.layers]
        self.head_params: list[str] = []
        for name in self._params:
            idx = models.layer_index(name)
            if "lora_" in name and idx is not None:
                self.block_params[block_of_layer[idx]].append(name)
            else:
                self.head_params.append(name)
        self._global: State = {n: p.detach().clone() for n, p in self._params.items()}
        self._initial: State = self.global_state()
        # execution.prune_last_block, as in PeftTrainer (the LoLa timeline comes from the depth
        # profile, not from these steps)
        self._pruned_block = None
        if scenario.execution.prune_last_block:
            self._pruned_block, _ = probe_last_block(self.model, self._tokens, train_idx)

    def reset(self) -> None:
        """Back to the initial model and fresh batch streams: the same as a new trainer of the
        same scenario and seed (the frozen base weights never change), without reloading."""
        self._global = {n: t.clone() for n, t in self._initial.items()}
        self._rngs = {}
        self._load()

    # ------------------------------------------------------------------ state
    @property
    def num_blocks(self) -> int:
        return len(self.layers)

    def global_state(self) -> State:
        return {n: t.clone() for n, t in self._global.items()}

    def _load(self) -> None:
        with torch.no_grad():
            for n, p in self._params.items():
                p.copy_(self._global[n])

    def _set_trainable(self, names: Sequence[str]) -> list[torch.nn.Parameter]:
        keep = set(names)
        for n, p in self._params.items():
            p.requires_grad_(n in keep)
        return [self._params[n] for n in self._params if n in keep]

    def _optimizer(self, params):
        if self._optimizer_name == "adamw":
            return torch.optim.AdamW(params, lr=self._lr)
        return torch.optim.SGD(params, lr=self._lr)

    def _batch(self, device_id: int, batch_size: int) -> np.ndarray:
        rng = self._rngs.get(device_id)
        if rng is None:
            rng = self._rngs[device_id] = fdata.device_rng(self.seed, device_id)
        return fdata.sample_batch(rng, self._device_examples[device_id], batch_size)

    def _train(self, names: Sequence[str], batches: Sequence[np.ndarray], torch_seed: int) -> tuple[State, float]:
        """Train ``names`` from the global state on ``batches``; (update of those tensors, mean loss)."""
        self._load()
        params = self._set_trainable(names)
        torch.manual_seed(torch_seed)
        opt = self._optimizer(params)
        losses = []
        try:
            for examples in batches:
                opt.zero_grad(set_to_none=True)
                with pruned(self._pruned_block):
                    loss = profiling.classification_loss(self.model, *self._tokens.batch(examples))
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        finally:
            self._set_trainable(list(self._params))
        update = {n: self._params[n].detach() - self._global[n] for n in names}
        self._load()
        return update, float(np.mean(losses)) if losses else float("nan")

    # ------------------------------------------------------------------ rounds
    def train_block(self, device_id: int, block: int, round_: int, steps: int, batch_size: int) -> tuple[State, float]:
        """Device ``device_id`` trains block ``block`` (+ the head) for ``steps`` steps on its own
        data, from the global state. Returns ({name: local - global} of the block's LoRA
        tensors and the head, mean loss)."""
        batches = [self._batch(device_id, batch_size) for _ in range(steps)]
        names = self.block_params[block] + self.head_params
        return self._train(names, batches, fdata.job_torch_seed(self.seed, device_id, round_))

    def train_all(self, device_ids: Sequence[int], round_: int, steps: int, batch_size: int) -> tuple[State, float]:
        """Offloading: the edge trains every block and the head on the samples the devices
        uploaded this round (``steps`` batches per device, device after device, one optimizer)."""
        batches = [self._batch(k, batch_size) for k in device_ids for _ in range(steps)]
        return self._train(list(self._params), batches, fdata.job_torch_seed(self.seed, 10**6, round_))

    def merge(self, block_updates: Mapping[int, State]) -> None:
        """global <- global + each block's update (its one device); the head gets the mean of
        the head updates."""
        new = {n: t.clone() for n, t in self._global.items()}
        for block, upd in block_updates.items():
            for n in self.block_params[block]:
                new[n] += upd[n]
        if block_updates:
            for n in self.head_params:
                new[n] += torch.stack([u[n] for u in block_updates.values()]).mean(dim=0)
        self._global = new
        self._load()

    def apply_full(self, update: State) -> None:
        """global <- global + update (offloading: every tensor)."""
        self._global = {n: t + update[n] if n in update else t.clone() for n, t in self._global.items()}
        self._load()

    def evaluate(self) -> float:
        """Accuracy of the global model on the test examples."""
        self._load()
        self.model.eval()
        correct = 0
        try:
            with torch.no_grad():
                for s in range(0, len(self._test_examples), EVAL_BATCH_SIZE):
                    ids, mask, labels = self._tokens.batch(self._test_examples[s:s + EVAL_BATCH_SIZE])
                    with pruned(self._pruned_block):
                        logits = profiling.classification_logits(self.model, ids, mask)
                    correct += int((logits.argmax(dim=-1) == labels).sum())
        finally:
            self.model.train()
        return correct / len(self._test_examples)


def accuracy_vs_time(scenario: "Scenario", summary: dict, events, network, algorithms: Sequence[str],
                     rounds: int) -> tuple[dict[str, list[list[float]]], dict[str, float]]:
    """Real block fine-tuning for each algorithm of ``algorithms`` (that ``summary`` has), from
    the same initial model and batch streams (:meth:`BlockTrainer.reset`), ``rounds``
    rounds. The simulated time of round r is the end time of the algorithm's round r in
    ``events`` (its ``round_end`` rows, from :func:`netsim.protocols.lola.compare`: same seed,
    same fading); round 0 (t = 0) is the initial model. Returns
    ({algorithm: [[t_s, accuracy], ...]}, {algorithm: final accuracy})."""
    lola = scenario.lola
    index = {d.name: k for k, d in enumerate(network.devices)}
    curves: dict[str, list[list[float]]] = {}
    final: dict[str, float] = {}
    trainer = None
    for name in algorithms:
        if name not in summary["mean_round_latency_s"]:
            continue
        ends = events[(events["algorithm"] == name) & (events["kind"] == "round_end")].sort_values("round")
        t_end = ends["t_s"].to_numpy(dtype=float)
        if len(t_end) < rounds:
            raise ValueError(f"lola.train_rounds={rounds} > simulated lola.rounds={len(t_end)}")
        if trainer is None:
            trainer = BlockTrainer(scenario, scenario.train_seed())
        trainer.reset()  # every algorithm from the same initial model and batch streams
        info = summary["allocations"][name]
        curve = [[0.0, trainer.evaluate()]]
        for r in range(1, rounds + 1):
            if name == "offloading":
                update, _ = trainer.train_all([index[d] for d in info["devices"]], r, lola.steps_per_round,
                                              scenario.training.batch_size)
                trainer.apply_full(update)
            else:
                updates = {}
                for block, dev in enumerate(info["device_of_block"]):
                    updates[block], _ = trainer.train_block(index[dev], block, r, lola.steps_per_round,
                                                            scenario.training.batch_size)
                trainer.merge(updates)
            curve.append([float(t_end[r - 1]), trainer.evaluate()])
        curves[name] = curve
        final[name] = curve[-1][1]
    return curves, final


def plot_accuracy_vs_time(curves: Mapping[str, list[list[float]]], path, title: str = ""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=120)
    for name, pts in curves.items():
        a = np.asarray(pts, dtype=float)
        ax.plot(a[:, 0], a[:, 1] * 100.0, marker="o", ms=3, label=name,
                ls="--" if name == "offloading" else "-")
    ax.set_xlabel("simulated time [s]")
    ax.set_ylabel("test accuracy [%]")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)
    return path
