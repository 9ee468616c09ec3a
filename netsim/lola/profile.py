"""Depth cost profile of a transformer split into N PEFT parameter blocks (torch-free).

Block n = 0 holds the layers next to the output, block N-1 the layers next to the embeddings.
Training block n alone needs the forward pass over the whole model and a backward pass from the
output down to the lowest layer of block n, and autograd keeps activations only for the layers
at or above that layer. So backward FLOPs and activation memory grow with n (the monotone
depth-cost property CRUNCH exploits).

The measured profile of the real model is built by :func:`fomo.depth_profile.measure_depth_profile`;
:func:`analytic_profile` is the documented formula used when torch is not wanted.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class DepthProfile:
    """Per-step costs of training each block (one optimizer step on a batch of
    ``batch_size`` x ``seq_len`` tokens).

    Attributes (lists have one entry per block, index 0 = next to the output)
    ----------
    forward_flops : float            forward pass of the whole model [FLOP]
    backward_flops : list[float]     backward pass down to the block's depth [FLOP]
    activation_bytes : list[float]   activations saved for that backward [bytes]
    trainable_bytes : list[float]    the block's PEFT parameters [bytes] (the upload)
    weights_bytes : float            all frozen + trainable weights held by a device [bytes]
    layers : list[list[int]]         transformer layer indices of each block
    optimizer_states : int           optimizer tensors per trainable parameter (AdamW: 2)
    source : str                     "measured", "analytic" or "cost_model:<architecture>"
    """

    forward_flops: float
    backward_flops: list[float]
    activation_bytes: list[float]
    trainable_bytes: list[float]
    weights_bytes: float
    layers: list[list[int]]
    batch_size: int
    seq_len: int
    optimizer_states: int = 2
    source: str = "analytic"

    @property
    def num_blocks(self) -> int:
        return len(self.backward_flops)

    def step_flops(self) -> np.ndarray:
        """Forward + backward FLOPs of one step, per block."""
        return self.forward_flops + np.asarray(self.backward_flops, dtype=float)

    def memory_bytes(self) -> np.ndarray:
        """Job memory per block: weights + trainable x (1 gradient + optimizer states) +
        saved activations (the rule of ``fomo.profiling.job_memory_bytes``)."""
        tb = np.asarray(self.trainable_bytes, dtype=float)
        return self.weights_bytes + tb * (1 + self.optimizer_states) + np.asarray(self.activation_bytes, dtype=float)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DepthProfile":
        return cls(**d)


def split_layers(num_layers: int, num_blocks: int) -> list[list[int]]:
    """Consecutive layer ranges, block 0 = the top (output side) layers; sizes differ by at most
    one, the larger blocks at the top."""
    if not 1 <= num_blocks <= num_layers:
        raise ValueError(f"num_blocks={num_blocks} must be between 1 and the number of layers ({num_layers})")
    top_down = list(range(num_layers - 1, -1, -1))
    chunks = np.array_split(np.array(top_down), num_blocks)
    return [sorted(int(i) for i in c) for c in chunks]


def analytic_profile(num_blocks: int, *, num_layers: int = 6, hidden: int = 384, ffn: int = 1536,
                     heads: int = 12, vocab: int = 30522, seq_len: int = 32, batch_size: int = 8,
                     lora_rank: int = 8, lora_modules_per_layer: int = 2, bytes_per_value: int = 4,
                     optimizer_states: int = 2) -> DepthProfile:
    """Formula profile of a BERT-style encoder with LoRA (defaults: all-MiniLM-L6-v2, batch 8,
    32 tokens, rank 8 on query and value).

    With t = batch x seq_len tokens, d = hidden, f = ffn:

    - forward FLOPs per layer  F = 2 t (4 d^2 + 2 d f) + 4 batch seq_len^2 d (QK^T and AV);
      whole forward = L F (embeddings and head neglected);
    - backward to block n, whose lowest layer is l_n layers below the output:
      l_n F (input gradients through every layer on the path, ~ one forward each) +
      the LoRA weight gradients 2 t |P_n| ... counted as 2 x 2 t r d per adapted matrix;
    - activations saved per layer (Korthikanti et al. 2022, scaled from 2-byte values):
      A = seq_len batch d (34 + 5 heads seq_len / d) bytes_per_value / 2; block n keeps l_n A;
    - trainable bytes of block n: (layers in block) x modules x 2 r d x bytes_per_value;
    - weights: L (4 d^2 + 2 d f) + vocab d parameters, x bytes_per_value.
    """
    layers = split_layers(num_layers, num_blocks)
    t = batch_size * seq_len
    d, f = hidden, ffn
    per_layer_fwd = 2.0 * t * (4 * d * d + 2 * d * f) + 4.0 * batch_size * seq_len**2 * d
    per_layer_act = seq_len * batch_size * d * (34.0 + 5.0 * heads * seq_len / d) * bytes_per_value / 2.0
    lora_params_per_layer = lora_modules_per_layer * 2 * lora_rank * d
    backward, act, trainable = [], [], []
    for blk in layers:
        depth = num_layers - min(blk)  # layers from the output down to the block's lowest layer
        params = len(blk) * lora_params_per_layer
        backward.append(depth * per_layer_fwd + 4.0 * t * lora_rank * d * lora_modules_per_layer * len(blk))
        act.append(depth * per_layer_act)
        trainable.append(float(params * bytes_per_value))
    weights = (num_layers * (4 * d * d + 2 * d * f) + vocab * d) * bytes_per_value
    return DepthProfile(forward_flops=num_layers * per_layer_fwd, backward_flops=backward,
                        activation_bytes=act, trainable_bytes=trainable, weights_bytes=float(weights),
                        layers=layers, batch_size=batch_size, seq_len=seq_len,
                        optimizer_states=optimizer_states, source="analytic")
