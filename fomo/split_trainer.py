"""The real trainer of split federated fine-tuning with gradient download (SplitFed V1).

:class:`SplitTrainer` is a :class:`fomo.trainer.PeftTrainer` whose model is a
:class:`fomo.split.SplitModel`: the checkpoint cut after block ``split.cut_layer``, a soft
prompt P (``split.num_virtual_tokens`` x hidden) inserted after ``[CLS]``. The ``peft`` section
is ignored.

Who holds what (Thapa et al. 2022, SplitFed V1):

* the **device** holds the embedding layer, the blocks below the cut and P, the only tensor it
  trains; P is what the edge broadcasts and the device uploads each round
  (:meth:`SplitTrainer.adapter_bytes`);
* the **edge** holds the blocks above the cut, the pooler and the classification head. With
  ``split.train_head`` the head trains at the edge, one copy per device (SplitFed V1's
  server-side model per client), and the copies are FedAvg-ed together with the prompts at the
  round end. The global state is therefore {P, head}; a job's update is trained minus base for
  both, so :meth:`PeftTrainer.aggregate` averages them by name.

A local step is one round trip (:meth:`fomo.split.SplitModel.split_step`): device forward,
uplink of the cut activations, edge forward + loss + backward (and the head's optimizer step),
downlink of the gradient at the cut, device backward and the prompt's optimizer step. The
device and the edge each get a fresh optimizer per job (``training.optimizer`` and
``training.learning_rate``): the device's over P, the edge's over the device's head copy.

Costs (known at planning; shapes only, profiled once per (batch, seq_len) and cached):

* every step's :class:`netsim.interfaces.RoundTripCost`: the device forward and backward FLOPs,
  the edge FLOPs (counted by :func:`fomo.profiling.flop_counter`), the measured uplink and
  downlink bytes (equal to :func:`fomo.split.payload_formula`);
* ``JobCost.flops`` = the device's FLOPs of all steps (forward + backward); the edge's are only
  in the steps;
* device memory [bytes] (the rule of :func:`fomo.profiling.job_memory_bytes`, for the device
  part)::

      device weights (embeddings + blocks below the cut + P)
      + P x (1 gradient + optimizer states: 2 for AdamW, 0 for SGD)
      + saved activations of the device forward (measured, for the device backward)
      + the cut tensor: h (B, T + n_v, d) until it is sent, then dL/dh of the same size
        (prompt-only: E(x) (B, T, d), then dL/dP)

  The edge's memory for one request (:meth:`SplitTrainer.edge_memory_bytes`) is the edge
  weights + one head copy x (1 + gradient + optimizer states) + the edge forward's saved
  activations + the received cut tensor.

Counted figures (all-MiniLM-L6-v2, batch 8 x 32 tokens, n_v = 8, AdamW; counts, not timings):
cut 1: device 1.15 + 1.18 GFLOP (forward + backward), edge 11.67 GFLOP, 491,840 B up and
491,520 B down per step; device memory 60.3 MB (of which the embedding tables are 46.9 MB)
against 118.2 MB for a local job of the ``peft`` defaults' LoRA on the whole model. cut 0 with
``prompt_only_gradient``: device 0 FLOP, edge 14.0 GFLOP, 405,824 B up, 12,288 B down, device
memory 48.1 MB.

Evaluation runs at the edge on the whole prompted split model (device part then edge part, no
gradient) with the same test batches as :meth:`PeftTrainer.evaluate`.

Execution: sequential only. ``execution.strategy: batched`` falls back (its batched pass stacks
per-device LoRA tensors, and a split step is a round trip of two optimizers whose edge part
holds one head per device; nothing of it is stacked here), as do the activation cache (the
prompt enters before the first block, so no block's output is frozen) and the pruned last block
(the split model's edge part runs its own blocks); each fallback is an execution note and a
RuntimeWarning (the pruned block, on by default, is a note only), and results are unaffected.

FedProx (a job with ``prox_mu > 0``) is refused: the proximal term would need the prompt's
gradient before the optimizer step inside the round trip.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from fomo import data as fdata
from fomo import models, profiling
from fomo.split import SplitModel, SplitStepProfile
from fomo.trainer import PeftState, PeftTrainer, local_result
from netsim.interfaces import LocalJob, LocalResult, PlannedJob, RoundTripCost, SplitJobCost

if TYPE_CHECKING:  # pragma: no cover
    from netsim.scenario import Scenario


@dataclass(frozen=True)
class SplitShapeCost:
    """Cost of one split step of one (batch_size, seq_len) shape.

    Attributes
    ----------
    round_trip : FLOPs and bytes of the step's round trip
    device_activation_bytes : the device's saved activations + its cut tensor [bytes]
    edge_activation_bytes : the edge's saved activations + the received cut tensor [bytes]
    """

    round_trip: RoundTripCost
    device_activation_bytes: int
    edge_activation_bytes: int

    @property
    def device_flops(self) -> float:
        """The device's forward + backward [FLOP]."""
        return self.round_trip.device_forward_flops + self.round_trip.device_backward_flops


def shape_cost(profile: SplitStepProfile) -> SplitShapeCost:
    """A step's cost from its profile (:meth:`fomo.split.SplitModel.profile_step`)."""
    flops, payload = profile.flops, profile.payload
    trip = RoundTripCost(
        device_forward_flops=flops.device_forward_flops,
        uplink_bytes=payload.uplink_bytes,
        edge_flops=flops.edge_flops,
        downlink_bytes=payload.downlink_bytes,
        device_backward_flops=flops.device_backward_flops,
    )
    return SplitShapeCost(trip, profile.device_saved_bytes + payload.activations_bytes,
                          profile.edge_saved_bytes + payload.activations_bytes)


class SplitTrainer(PeftTrainer):
    """Real SplitFed V1 trainer (see the module docstring).

    Parameters
    ----------
    scenario : netsim.scenario.Scenario
        Uses ``model``, ``data``, ``training``, ``split`` (``cut_layer``, ``num_virtual_tokens``,
        ``train_head``, ``prompt_only_gradient``), ``execution`` and ``num_devices``; the
        ``peft`` section is ignored.
    seed : int
        Run seed: data split/partition, batch sampling, head initialisation and the prompt's
        initial tokens (spawn key ``fomo.data.SPLIT_PROMPT_SPAWN_KEY``).

    Attributes
    ----------
    model : fomo.split.SplitModel
        Holds the global state (P and the head) outside :meth:`execute`.
    """

    model: SplitModel

    def __init__(self, scenario: "Scenario", seed: int) -> None:
        super().__init__(scenario, seed)
        self._device_state_bytes = models.tensor_bytes(list(self.model.device_parameters()))
        self._head_bytes = models.tensor_bytes(list(self.model.head_parameters().values()))
        self._device_weights_bytes = self.model.device_weights_bytes()
        self._edge_weights_bytes = self._weights_bytes - self._device_weights_bytes
        self._split_costs: dict[tuple[int, int], SplitShapeCost] = {}

    # ---------------------------------------------------------------- construction
    def _training_model(self, scenario: "Scenario", base: torch.nn.Module) -> SplitModel:
        """The split model of ``scenario.split`` on ``base`` (the ``peft`` section is ignored)."""
        spec = scenario.split
        depth = models.num_hidden_layers(base.config)
        if depth is not None and not 0 <= spec.cut_layer <= depth:
            raise ValueError(f"split.cut_layer={spec.cut_layer}: must be in 0..{depth} (the checkpoint has "
                             f"{depth} transformer blocks)")
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(fdata.SPLIT_PROMPT_SPAWN_KEY,)))
        return SplitModel(base, spec.cut_layer, spec.num_virtual_tokens, rng, train_head=spec.train_head,
                          grad_of_prompt_only=spec.prompt_only_gradient)

    def _configure_execution(self, scenario: "Scenario") -> None:
        """Sequential execution; the asked-for host tricks that do not apply become notes."""
        spec = scenario.execution
        self.strategy = "sequential"
        self.activation_cache = None
        self.pruned_block = None
        self.execution_notes = []
        if spec.strategy == "batched":
            self.execution_notes.append(
                "execution.strategy=batched not applied: the split trainer runs its jobs one after another (the "
                "batched pass stacks per-device LoRA tensors; a split step is a round trip with a device optimizer "
                "over the prompt and an edge optimizer over the device's head copy)")
        if spec.activation_cache_bytes > 0:
            self.execution_notes.append(
                "execution.activation_cache_bytes not applied: the soft prompt enters before the first block, so no "
                "block's output is frozen")
        for note in self.execution_notes:
            warnings.warn(note, RuntimeWarning, stacklevel=4)
        if spec.prune_last_block:   # on by default: noted, not warned about
            self.execution_notes.append(
                "execution.prune_last_block not applied: the split model's edge part runs its blocks itself")

    # ---------------------------------------------------------------- sizes
    def adapter_bytes(self) -> int:
        """Bytes of the device-held trainable tensors (the soft prompt): what the edge broadcasts
        and each device uploads per round [bytes]."""
        return self._device_state_bytes

    def device_parameters_count(self) -> int:
        """Trainable values on the device (the prompt: n_v x hidden)."""
        return int(sum(p.numel() for p in self.model.device_parameters()))

    def device_weights_bytes(self) -> int:
        """What the device stores: embeddings, blocks below the cut and P [bytes]."""
        return self._device_weights_bytes

    def job_memory_bytes(self, batch_size: int) -> int:
        """The device's peak memory in a job of this batch size at the worst-case length
        ``model.max_length_tokens`` (see the module docstring) [bytes]."""
        return self._device_memory(self._worst_case_cost(batch_size).device_activation_bytes)

    def edge_memory_bytes(self, batch_size: int, concurrent_requests: int = 1) -> int:
        """The edge's memory serving ``concurrent_requests`` steps of this batch size at the
        worst-case length: edge weights + per request (one head copy x (1 + gradient +
        optimizer states) + saved activations + the received cut tensor) [bytes]."""
        per_head = self._head_bytes * (2 + profiling.optimizer_states_per_param(self._optimizer_name))
        activations = self._worst_case_cost(batch_size).edge_activation_bytes
        return int(self._edge_weights_bytes + int(concurrent_requests) * (per_head + activations))

    def min_job_flops(self, steps: int, batch_size: int) -> float:
        """Fewest device FLOPs a job of ``steps`` x ``batch_size`` can count (every batch as
        short as the shortest training text) [FLOP]."""
        shortest = self._train_examples[int(np.argmin(self._tokens.lengths_tokens[self._train_examples]))]
        return steps * self._shape_cost(np.full(int(batch_size), shortest)).device_flops

    def step_cost(self, batch_size: int, seq_len_tokens: int) -> RoundTripCost:
        """The round trip of one step of this shape (profiled on training examples padded or
        cut to ``seq_len_tokens``, cached)."""
        shape = (int(batch_size), int(seq_len_tokens))
        if shape not in self._split_costs:
            examples = np.resize(self._train_examples, shape[0])
            input_ids, mask, labels = self._full_length_batch(examples)
            batch = (input_ids[:, :shape[1]], mask[:, :shape[1]], labels)
            self._split_costs[shape] = shape_cost(self.model.profile_step(batch, self._weight_ptrs))
        return self._split_costs[shape].round_trip

    # ---------------------------------------------------------------- training
    def plan(self, job: LocalJob, base: PeftState) -> PlannedJob:
        """Draw the job's batches from the device's generator (the stream of
        :meth:`PeftTrainer.plan`) and count every step's round trip and the device's peak."""
        if job.prox_mu > 0:
            raise ValueError(f"prox_mu={job.prox_mu}: FedProx is not supported by the split variant (the proximal "
                             "term would need the prompt's gradient inside the round trip); use mu = 0")
        batches = [self._sample_batch(job.device_id, job.batch_size) for _ in range(job.steps)]
        costs = [self._shape_cost(examples) for examples in batches]
        activations = max((c.device_activation_bytes for c in costs), default=0)
        cost = SplitJobCost(
            flops=float(sum(c.device_flops for c in costs)),
            peak_memory_bytes=self._device_memory(activations),
            update_bytes=self._device_state_bytes,
            num_examples=self.device_num_examples(job.device_id),
            steps=tuple(c.round_trip for c in costs),
        )
        return PlannedJob(job, base, cost, batches)

    def execute(self, plans: Sequence[PlannedJob]) -> list[LocalResult]:
        """Run planned jobs one after another, each from its own base; results in plan order.
        The model holds the global state again afterwards."""
        results = [self._run_job(plan) for plan in plans]
        self._load_state(self._global)
        return results

    def _run_job(self, plan: PlannedJob) -> LocalResult:
        """One device's split job: fresh device and edge optimizers, one round trip per batch;
        the update is trained minus base of P and the device's head copy."""
        job = plan.job
        self._load_state(plan.base)
        torch.manual_seed(fdata.job_torch_seed(self.seed, job.device_id, job.round))
        device_optimizer = self._make_optimizer(list(self.model.device_parameters()))
        head = list(self.model.head_parameters().values())
        edge_optimizer = self._make_optimizer(head) if head else None
        losses = [self.model.split_step(device_optimizer, self._tokens.batch(examples), edge_optimizer).loss
                  for examples in plan.inputs]
        update = {n: p.detach() - plan.base[n] for n, p in self._trainable}
        return local_result(plan, update, float(np.mean(losses)) if losses else float("nan"))

    def _eval_forward(self, input_ids: torch.Tensor, mask: torch.Tensor,
                      examples: np.ndarray) -> tuple[torch.Tensor, float]:
        """Logits of the whole prompted split model (the edge evaluates: it holds both parts)
        and their forward FLOPs, counted once per shape; used by :meth:`PeftTrainer.evaluate`."""
        shape = (int(input_ids.shape[0]), int(input_ids.shape[1]))
        if shape not in self._eval_flops:
            with profiling.flop_counter() as counter:
                self.model.logits(input_ids, mask)
            self._eval_flops[shape] = float(counter.get_total_flops())
        return self.model.logits(input_ids, mask), self._eval_flops[shape]

    # ---------------------------------------------------------------- internals
    def _shape_cost(self, examples: np.ndarray) -> SplitShapeCost:
        """Cost of a step on ``examples`` (dynamic padding: their longest length), cached per
        shape."""
        shape = (len(examples), self._tokens.seq_len(examples))
        cost = self._split_costs.get(shape)
        if cost is None:
            profile = self.model.profile_step(self._tokens.batch(examples), self._weight_ptrs)
            cost = self._split_costs[shape] = shape_cost(profile)
        return cost

    def _worst_case_cost(self, batch_size: int) -> SplitShapeCost:
        """Cost of a step of ``batch_size`` examples padded to ``model.max_length_tokens``."""
        self.step_cost(batch_size, self._max_length_tokens)
        return self._split_costs[(int(batch_size), self._max_length_tokens)]

    def _device_memory(self, activation_bytes: int) -> int:
        """Device weights + P x (1 gradient + optimizer states) + activations [bytes]."""
        return profiling.job_memory_bytes(self._device_weights_bytes, self._device_state_bytes,
                                          self._optimizer_name, activation_bytes)
