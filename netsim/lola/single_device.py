"""Single-device depth-aware PEFT control (DEFT technique 1; torch-free).

A device with a memory budget M [bytes], a latency budget L [s per round] and a speed f
[FLOP/s] chooses which transformer blocks get LoRA and with which rank, from a
:class:`~netsim.lola.profile.DepthProfile` (block 0 next to the output; for a per-layer choice
use a profile with one layer per block, ``num_blocks`` = the model depth).

Rule (**output-first**, "deepest-first" in backpropagation terms): the trainable set is always
the top m blocks 0..m-1, all with the same rank r from the candidate ``ranks``; the device takes
the largest m whose cost fits both budgets, and for that m the largest r that fits. Why top
blocks: backpropagation has to run from the output down to the lowest trainable block anyway,
so adding the blocks above the lowest one costs only their small LoRA terms, while going one
block deeper costs a full layer of backward FLOPs and activations.

Cost of the top m blocks at rank r (s = r / ``profile_rank``, the rank the profile was measured
with; t = batch x seq_len tokens; P_n(r) = s x trainable_bytes[n] / ``bytes_per_value``):

- step FLOPs  = forward + backward[m-1] + sum_{n<m} 6 t P_n(r)
  (the profile's backward to block m-1's depth, plus forward 2tP, weight-gradient 2tP and
  input-gradient 2tP of every trainable LoRA block; the profiled block's own LoRA term is then
  counted twice, < 1 % for all-MiniLM-L6-v2: a conservative over-estimate);
- memory      = weights + trainable(m, r) x (1 gradient + optimizer states) + activations[m-1]
  (LoRA's own intermediate activations, t x r values per adapted matrix, are neglected);
- latency     = steps x step FLOPs / f  (+ trainable(m, r) x 8 / ``uplink_rate_bps`` when given:
  the upload of the update).

All three grow with m and with r, so the feasible set grows with the budgets and the chosen
(m, r) is monotone (lexicographically non-decreasing) in each budget.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional, Sequence

from .profile import DepthProfile


@dataclass(frozen=True)
class DeviceBudget:
    """Budgets of one device: memory [bytes], latency per round [s], speed [FLOP/s], local steps
    per round, and optionally the uplink rate [bit/s] for the update's upload time."""

    memory_bytes: float
    latency_s: float
    compute_flops_per_s: float
    steps: int = 1
    uplink_rate_bps: Optional[float] = None


@dataclass
class DeviceChoice:
    """The chosen allocation: the top ``num_blocks`` blocks at ``rank`` (``num_blocks`` = 0:
    nothing fits, ``fits`` False). ``rank_per_layer`` is ready for the scenario field
    ``peft.rank_per_layer``. Costs as in the module docstring."""

    num_blocks: int
    rank: int
    layers: list[int]
    rank_per_layer: dict[int, int]
    step_flops: float
    memory_bytes: float
    latency_s: float
    trainable_bytes: float
    fits: bool
    budget: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def top_blocks_cost(profile: DepthProfile, num_blocks: int, rank: int, *, profile_rank: int = 8,
                    steps: int = 1, compute_flops_per_s: float = 1.0, uplink_rate_bps: Optional[float] = None,
                    bytes_per_value: int = 4) -> dict:
    """Costs of training the top ``num_blocks`` blocks at LoRA ``rank``: ``step_flops``,
    ``memory_bytes``, ``trainable_bytes``, ``latency_s`` (formulas in the module docstring)."""
    if not 1 <= num_blocks <= profile.num_blocks:
        raise ValueError(f"num_blocks={num_blocks} must be in 1..{profile.num_blocks}")
    if rank < 1:
        raise ValueError(f"rank={rank} must be >= 1")
    scale = rank / profile_rank
    tokens = profile.batch_size * profile.seq_len
    trainable = scale * sum(profile.trainable_bytes[:num_blocks])
    lora_flops = 6.0 * tokens * trainable / bytes_per_value
    flops = profile.forward_flops + profile.backward_flops[num_blocks - 1] + lora_flops
    memory = (profile.weights_bytes + trainable * (1 + profile.optimizer_states)
              + profile.activation_bytes[num_blocks - 1])
    latency = steps * flops / compute_flops_per_s
    if uplink_rate_bps is not None:
        latency += trainable * 8.0 / uplink_rate_bps
    return {"step_flops": float(flops), "memory_bytes": float(memory), "trainable_bytes": float(trainable),
            "latency_s": float(latency)}


def choose_allocation(profile: DepthProfile, budget: DeviceBudget, ranks: Sequence[int] = (8,),
                      profile_rank: int = 8) -> DeviceChoice:
    """The output-first rule: the largest number of top blocks m, then the largest rank in
    ``ranks``, whose memory and latency stay within ``budget``."""
    if not ranks:
        raise ValueError("ranks: give at least one candidate LoRA rank")
    best: Optional[tuple[int, int, dict]] = None
    for m in range(1, profile.num_blocks + 1):
        for r in sorted(set(int(x) for x in ranks)):
            cost = top_blocks_cost(profile, m, r, profile_rank=profile_rank, steps=budget.steps,
                                   compute_flops_per_s=budget.compute_flops_per_s,
                                   uplink_rate_bps=budget.uplink_rate_bps)
            if cost["memory_bytes"] <= budget.memory_bytes and cost["latency_s"] <= budget.latency_s:
                if best is None or (m, r) > best[:2]:
                    best = (m, r, cost)
    if best is None:
        return DeviceChoice(0, 0, [], {}, 0.0, 0.0, 0.0, 0.0, False, asdict(budget))
    m, r, cost = best
    layers = sorted(i for blk in profile.layers[:m] for i in blk)
    return DeviceChoice(m, r, layers, {i: r for i in layers}, cost["step_flops"], cost["memory_bytes"],
                        cost["latency_s"], cost["trainable_bytes"], True, asdict(budget))


def tradeoff_table(profile: DepthProfile, budgets: Iterable[DeviceBudget], ranks: Sequence[int] = (8,),
                   profile_rank: int = 8) -> list[dict]:
    """One row per budget: the budget, the chosen blocks/layers/rank and their latency, memory
    and trainable bytes (the accuracy column is added by ``deftsim.lola_device`` when it trains)."""
    rows = []
    for b in budgets:
        c = choose_allocation(profile, b, ranks, profile_rank)
        rows.append({"memory_budget_bytes": b.memory_bytes, "latency_budget_s": b.latency_s,
                     "compute_flops_per_s": b.compute_flops_per_s, "fits": c.fits,
                     "num_blocks": c.num_blocks, "rank": c.rank, "layers": c.layers,
                     "latency_s": c.latency_s, "memory_bytes": c.memory_bytes,
                     "step_flops": c.step_flops, "trainable_bytes": c.trainable_bytes})
    return rows


__all__ = ["DeviceBudget", "DeviceChoice", "choose_allocation", "top_blocks_cost", "tradeoff_table"]
