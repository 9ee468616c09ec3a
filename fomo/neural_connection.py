"""Split fine-tuning with a neural connection between K devices and the edge.

Model (docs/aircomp.md, "Neural connection over the air"):

* **Input split.** Every example's token sequence (the text tokenized without special tokens,
  truncated to K L tokens) is cut into K consecutive segments of L =
  ``neural_aircomp.segment_tokens`` tokens; device k holds segment k of every example
  ([CLS] + segment + [SEP], padded to L + 2). Short texts give empty trailing segments.
* **Device part (lower layers).** The frozen pre-trained encoder (``model.path``, default
  all-MiniLM-L6-v2) with mean pooling over the segment's real tokens gives e_k (H values), then
  a trainable per-device projection f_k = W_k e_k + b_k (d = ``feature_dim`` values). The encoder
  is frozen (no LoRA): the devices train only their projections. Since the frozen encoder's output
  of a segment never changes, e_k is computed once per example and segment and kept (an
  execution shortcut: the timeline still charges every step the counted FLOPs of the encoder
  forward on the batch's segments).
* **Neural connection.** The edge consumes z = sum_k a_k f_k (a_k = 1, ``combine: sum``, or
  1/K, ``mean``), i.e. the linear layer W [e_1; ...; e_K] of the concatenated segment embeddings,
  computed by the channel. Over the air the edge gets sum_k a_k chi_k f_k + noise with the
  truncation mask chi and the scaled receiver noise of :func:`netsim.protocols.neural_aircomp.feature_channel`
  (applied to the real float32 feature tensors; noise is a constant for autograd, the mask
  multiplies the features, so dL/df_k = a_k chi_k dL/dz exactly for the realised channel).
  Digitally the edge computes the same expression with chi = 1 and no noise.
* **Edge part.** A trainable head: ReLU MLP d -> ``head_hidden_dim`` -> C (or linear d -> C when
  ``head_hidden_dim: 0``), cross-entropy loss. One optimizer (``training.optimizer``,
  ``training.learning_rate``) over the projections and the head.

Determinism: parameters from ``torch.manual_seed(fomo.data.torch_init_seed(seed))``, batches
from ``fomo.data.device_rng(seed, 0)``; the encoder runs without dropout.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fomo import data as fdata
from fomo import models, profiling

if TYPE_CHECKING:  # pragma: no cover
    from netsim.scenario import Scenario

ENCODE_BATCH = 64
Connect = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass
class SplitData:
    """Frozen-encoder embeddings of every example's K segments.

    train_emb, test_emb : (N, K, H) float32; train_labels, test_labels : (N,) int64;
    encoder_flops_per_segment : counted FLOPs of one segment's encoder forward (L + 2 tokens).
    """

    train_emb: torch.Tensor
    train_labels: torch.Tensor
    test_emb: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    class_names: list[str]
    encoder_flops_per_segment: float
    segment_tokens: int

    @property
    def num_devices(self) -> int:
        return int(self.train_emb.shape[1])

    @property
    def hidden_size(self) -> int:
        return int(self.train_emb.shape[2])


def segment_inputs(tokenizer, texts: list[str], num_segments: int, segment_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K, L + 2) input ids and attention masks: segment k of text i is tokens
    k L .. (k+1) L - 1 of the text (no special tokens), wrapped in [CLS] .. [SEP]."""
    from fomo.trainer import truncated_texts

    total = num_segments * segment_tokens
    ids = tokenizer(truncated_texts(tokenizer, texts, total), add_special_tokens=False, truncation=True,
                    max_length=total)["input_ids"]
    cls = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = segment_tokens + 2
    input_ids = torch.full((len(texts), num_segments, width), pad, dtype=torch.int64)
    mask = torch.zeros((len(texts), num_segments, width), dtype=torch.int64)
    for i, seq in enumerate(ids):
        for k in range(num_segments):
            chunk = [t for t in (cls, *seq[k * segment_tokens:(k + 1) * segment_tokens], sep) if t is not None]
            input_ids[i, k, :len(chunk)] = torch.tensor(chunk, dtype=torch.int64)
            mask[i, k, :len(chunk)] = 1
    return input_ids, mask


def load_encoder(scenario: "Scenario"):
    """(tokenizer, frozen encoder without dropout, eval mode) of ``model.path``."""
    from transformers import AutoModel, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = models.model_folder(scenario.model)
    models.check_checkpoint(folder)
    with models.quiet_hf(), models.checkpoint_errors(folder):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        encoder = AutoModel.from_pretrained(folder, **models.dropout_overrides(folder))
    models.zero_dropout_modules(encoder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return tokenizer, encoder


@torch.no_grad()
def mean_pooled(encoder: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens of the last hidden state: (B, H)."""
    hidden = encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def prepare_split_data(scenario: "Scenario", seed: int, num_devices: Optional[int] = None) -> SplitData:
    """Load the data, split train/test (``fomo.data`` split stream of ``seed``), keep at most
    ``neural_aircomp.max_train_examples`` / ``data.max_test_examples``, cut every example into K
    segments (K = ``num_devices`` or the scenario's device count) and run the frozen encoder once
    per segment."""
    from fomo.trainer import configure_threads

    configure_threads()
    spec = scenario.neural_aircomp
    k = int(num_devices if num_devices is not None else scenario.num_devices)
    texts, labels, class_names = fdata.load_texts(scenario.data)
    rng = fdata.split_rng(seed)
    train_idx, test_idx = fdata.split_train_test(labels, scenario.data.test_fraction, rng)
    train_idx = rng.permutation(train_idx)   # the split is ordered by class: shuffle before capping
    if spec.max_train_examples is not None:
        train_idx = train_idx[: spec.max_train_examples]
    test_idx = test_idx[: scenario.data.max_test_examples]
    tokenizer, encoder = load_encoder(scenario)
    idx = np.concatenate([train_idx, test_idx])
    ids, mask = segment_inputs(tokenizer, [texts[i] for i in idx], k, spec.segment_tokens)
    flat_ids, flat_mask = ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, mask.shape[-1])
    with profiling.flop_counter() as counter:
        mean_pooled(encoder, flat_ids[:1], flat_mask[:1])
    flops_per_segment = float(counter.get_total_flops())
    emb = torch.cat([mean_pooled(encoder, flat_ids[i:i + ENCODE_BATCH], flat_mask[i:i + ENCODE_BATCH])
                     for i in range(0, flat_ids.shape[0], ENCODE_BATCH)]).reshape(len(idx), k, -1)
    n_train = len(train_idx)
    lab = torch.from_numpy(np.asarray(labels, dtype=np.int64)[idx])
    return SplitData(emb[:n_train].contiguous(), lab[:n_train], emb[n_train:].contiguous(), lab[n_train:],
                     len(class_names), list(class_names), flops_per_segment, spec.segment_tokens)


class SplitNet(nn.Module):
    """K per-device projections H -> d and the edge head d -> C."""

    def __init__(self, num_devices: int, hidden_size: int, feature_dim: int, head_hidden_dim: int, num_classes: int):
        super().__init__()
        self.projections = nn.ModuleList(nn.Linear(hidden_size, feature_dim) for _ in range(num_devices))
        if head_hidden_dim > 0:
            self.head = nn.Sequential(nn.Linear(feature_dim, head_hidden_dim), nn.ReLU(),
                                      nn.Linear(head_hidden_dim, num_classes))
        else:
            self.head = nn.Linear(feature_dim, num_classes)

    def features(self, emb: torch.Tensor) -> torch.Tensor:
        """(K, B, d): device k's projection of its segment embedding emb[:, k]."""
        return torch.stack([p(emb[:, k]) for k, p in enumerate(self.projections)])


def connection(features: torch.Tensor, weights: torch.Tensor, connect: Optional[Connect]) -> torch.Tensor:
    """The edge's input z (B, d) from the devices' features (K, B, d).

    ``connect=None``: digital, z = sum_k a_k f_k exactly. Otherwise ``connect(x, a)`` with
    x = features as (K, B d) float64 returns (chi, noise) and z = sum_k a_k chi_k f_k + noise."""
    k, b, d = features.shape
    w = weights.view(k, 1, 1).expand(k, b, d)
    if connect is None:
        return (w * features).sum(0)
    x = features.detach().reshape(k, b * d).to(torch.float64).numpy()
    chi, noise = connect(x, weights.to(torch.float64).numpy())
    w = w * torch.from_numpy(chi.reshape(k, b, d)).to(features.dtype)
    return (w * features).sum(0) + torch.from_numpy(noise.reshape(b, d)).to(features.dtype)


class NeuralConnectionTrainer:
    """Real training of the split model (see the module docstring); one instance per variant.

    Implements :class:`netsim.protocols.neural_aircomp.SplitModel`."""

    def __init__(self, data: SplitData, scenario: "Scenario", seed: int):
        spec, tr = scenario.neural_aircomp, scenario.training
        self.data = data
        self.num_devices = data.num_devices
        self.batch_size = int(tr.batch_size)
        torch.manual_seed(fdata.torch_init_seed(seed))
        self.net = SplitNet(self.num_devices, data.hidden_size, spec.feature_dim, spec.head_hidden_dim,
                            data.num_classes)
        k = self.num_devices
        self.weights = torch.full((k,), 1.0 if spec.combine == "sum" else 1.0 / k)
        params = list(self.net.parameters())
        if tr.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(params, lr=tr.learning_rate)
        else:
            self.optimizer = torch.optim.SGD(params, lr=tr.learning_rate)
        self._rng = fdata.device_rng(seed, 0)
        self.feature_values_per_device = self.batch_size * spec.feature_dim
        self._count_flops()

    def _count_flops(self) -> None:
        """Counted FLOPs per step: device forward (encoder on B segments + projection), device
        backward (projection), edge (head forward + backward incl. dL/dz)."""
        b = self.batch_size
        emb = self.data.train_emb[:1].expand(b, -1, -1).contiguous()
        proj = self.net.projections[0]
        with profiling.flop_counter() as c_fwd:
            f = proj(emb[:, 0])
        with profiling.flop_counter() as c_bwd:
            f.sum().backward()
        z = torch.zeros(b, proj.out_features, requires_grad=True)
        with profiling.flop_counter() as c_edge:
            F.cross_entropy(self.net.head(z), torch.zeros(b, dtype=torch.int64)).backward()
        self.net.zero_grad(set_to_none=True)
        self.device_forward_flops = b * self.data.encoder_flops_per_segment + float(c_fwd.get_total_flops())
        self.device_backward_flops = float(c_bwd.get_total_flops())
        self.edge_flops = float(c_edge.get_total_flops())

    def train_step(self, connect: Optional[Connect]) -> float:
        """One step on a batch drawn uniformly (without replacement within the batch) from the
        training examples; returns the loss."""
        n = self.data.train_emb.shape[0]
        idx = torch.from_numpy(self._rng.choice(n, size=min(self.batch_size, n), replace=False))
        self.net.train()
        z = connection(self.net.features(self.data.train_emb[idx]), self.weights, connect)
        loss = F.cross_entropy(self.net.head(z), self.data.train_labels[idx])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self, connect: Optional[Connect]) -> tuple[float, float]:
        """(accuracy, mean loss) on the test examples, their features sent through ``connect``
        (one slot for the whole test set)."""
        z = connection(self.net.features(self.data.test_emb), self.weights, connect)
        logits = self.net.head(z)
        acc = float((logits.argmax(1) == self.data.test_labels).float().mean())
        return acc, float(F.cross_entropy(logits, self.data.test_labels))
