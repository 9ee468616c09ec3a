"""Exact costs of any architecture from its config alone: the module graph without weights.

``model.cost_model`` names an architecture (a folder with a ``config.json``, or a reference
architecture shipped in ``fomo/architectures/<name>.json``). Its transformers module graph is
built on torch's ``meta`` device (nothing allocated), wrapped with the scenario's PEFT method by
the same code as the trained model (:func:`fomo.models.apply_peft`), and every parameter and
buffer is then replaced by a *fake* CPU tensor of the same shape and dtype
(``torch._subclasses.fake_tensor.FakeTensorMode``: tensors with shapes, dtypes and storages but
no data). A training step run under that mode executes the real transformers forward and the
real autograd backward, op for op, with no arithmetic, so:

- FLOPs are counted by the same ``FlopCounterMode`` as the trained model
  (:func:`fomo.profiling.flop_counter`);
- saved activations are measured by the same saved-tensor hooks
  (:class:`fomo.profiling.SavedTensorMeter`, storages told apart by identity);
- parameter, buffer and payload bytes are ``numel x element_size`` of the (fake) tensors.

One detail makes the counts equal to the materialised model's exactly: under fake tensors
``scaled_dot_product_attention`` takes its decomposed math path, while a real CPU tensor takes
the fused flash kernel (whose backward recomputes the attention matrix, so its FLOPs differ).
:class:`HostAttention` therefore asks torch which kernel the host would pick for tensors of the
same head shape, dtype and mask, and calls that kernel.

Token ids and labels are placeholders: costs depend on shapes only. The batch shape (examples,
tokens) is the trained model's, so the cost model assumes the same token counts as the trained
model's tokenizer gives.

Cost of a 7 B architecture: the graph is built in about a second and costs well under 1 GB of
host memory (bench/cost_model.py prints the figures).
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.overrides import TorchFunctionMode

from . import profiling
from .models import apply_peft, quiet_hf, tensor_bytes, trainable_parameters, zero_dropout_modules
from .profiling import StepProfile

if TYPE_CHECKING:  # pragma: no cover
    from netsim.scenario import PeftSpec, Scenario
    from transformers import PretrainedConfig

ARCHITECTURES_DIR = Path(__file__).resolve().parent / "architectures"


# --------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------
def reference_architectures() -> list[str]:
    """Names of the reference architectures shipped with fomo (``fomo/architectures/*.json``)."""
    return sorted(p.stem for p in ARCHITECTURES_DIR.glob("*.json"))


def architecture_config(name_or_folder: str, num_labels: int = 2) -> "PretrainedConfig":
    """The transformers config of a reference architecture or of a folder's ``config.json``,
    with every dropout probability set to 0 (as the trained model: :func:`fomo.models.load_base`)
    and ``num_labels`` classes. Raises ValueError naming ``model.cost_model`` if neither exists
    or transformers cannot read it."""
    from transformers import AutoConfig

    path = ARCHITECTURES_DIR / f"{name_or_folder}.json"
    if not path.is_file():
        path = Path(name_or_folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"model.cost_model={name_or_folder!r} is neither a folder with a config.json nor a "
                         f"reference architecture (allowed: {', '.join(reference_architectures())})")
    try:
        raw = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_comment")}
        model_type = raw.pop("model_type")
        config = AutoConfig.for_model(model_type, **raw)
    except (KeyError, ValueError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"model.cost_model={name_or_folder!r}: {path} is not a transformers config "
                         f"({type(err).__name__}: {str(err)[:200]})") from None
    for key, value in config.to_dict().items():
        if "dropout" in key and isinstance(value, float):
            setattr(config, key, 0.0)
    config.num_labels = int(num_labels)
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = getattr(config, "eos_token_id", None) or 0
    return config


SEQ2SEQ_TARGET_TOKENS = 2
"""Decoder tokens of an encoder-decoder's classification target: the label word and EOS (T5's
text-to-text classification; its sequence-classification head checks token values, which a
weightless model has not)."""


def is_encoder_decoder(config: "PretrainedConfig") -> bool:
    return bool(getattr(config, "is_encoder_decoder", False))


def model_class(config: "PretrainedConfig", objective: str) -> Any:
    """The transformers auto class of the objective: sequence classification (text-to-text
    generation of the label for an encoder-decoder, see :data:`SEQ2SEQ_TARGET_TOKENS`), or a
    causal LM (an encoder-decoder is refused for ``causal_lm``)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    if objective == "classification":
        return AutoModelForSeq2SeqLM if is_encoder_decoder(config) else AutoModelForSequenceClassification
    if objective == "causal_lm":
        if is_encoder_decoder(config):
            raise ValueError(f"model.cost_model: {config.model_type} is an encoder-decoder; model.objective=causal_lm "
                             "needs a decoder (allowed cost models for causal_lm: decoder architectures such as "
                             "llama-2-7b, llama-1b)")
        return AutoModelForCausalLM
    raise ValueError(f"model.objective={objective!r} (allowed: classification, causal_lm)")


# --------------------------------------------------------------------------------------------
# Weightless models
# --------------------------------------------------------------------------------------------
def to_fake(model: nn.Module, mode: FakeTensorMode, dtype: torch.dtype) -> nn.Module:
    """Replace every parameter and buffer of a meta-device ``model`` by a fake CPU tensor of the
    same shape (floating ones in ``dtype``), keeping ``requires_grad`` and keeping tied tensors
    tied (one fake tensor per original tensor)."""
    fakes: dict[int, torch.Tensor] = {}

    def fake_of(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in fakes:
            kind = dtype if t.is_floating_point() else t.dtype
            with mode:
                fakes[id(t)] = torch.zeros(t.shape, dtype=kind, device="cpu")
        return fakes[id(t)]

    prompt_tokens = getattr(model, "prompt_tokens", None)   # peft's virtual-token ids: a plain attribute
    if isinstance(prompt_tokens, dict):
        for key, ids in prompt_tokens.items():
            prompt_tokens[key] = torch.arange(ids.numel(), dtype=ids.dtype)   # small and real, as peft makes it
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in fakes:
                    fakes[id(p)] = nn.Parameter(fake_of(p), requires_grad=p.requires_grad)
                module._parameters[name] = fakes[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = fake_of(b)
    return model


class HostAttention(TorchFunctionMode):
    """Route ``scaled_dot_product_attention`` on fake tensors to the kernel a real CPU tensor of
    the same head shape, dtype and mask would take (the fused CPU flash kernel for the usual
    shapes), so that FLOPs and saved tensors equal the materialised model's. The choice is asked
    of torch (``torch._fused_sdp_choice``) on tiny real tensors: it depends on dtypes, head
    dimension, mask and dropout, not on the sequence length or batch size."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        dropout_p = args[4] if len(args) > 4 else kwargs.get("dropout_p", 0.0)
        is_causal = args[5] if len(args) > 5 else kwargs.get("is_causal", False)
        scale = kwargs.get("scale")
        enable_gqa = kwargs.get("enable_gqa", False)
        if self._host_choice(q, k, v, mask, dropout_p, is_causal, enable_gqa) != 1:  # 1: SDPBackend.FLASH_ATTENTION
            return func(*args, **kwargs)
        if mask is not None and mask.dtype == torch.bool:  # as the CPU kernel's caller converts it
            mask = torch.where(mask, 0.0, float("-inf")).to(q.dtype)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, float(dropout_p), bool(is_causal), attn_mask=mask, scale=scale)[0]

    @staticmethod
    def _host_choice(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                     dropout_p: float, is_causal: bool, enable_gqa: bool) -> int:
        with unset_fake_temporarily():
            def tiny(t: torch.Tensor) -> torch.Tensor:
                shape = [1] * (t.dim() - 2) + [2, t.shape[-1]]
                shape[-3 if t.dim() >= 3 else 0] = t.shape[-3] if t.dim() >= 3 else 1
                return torch.zeros(shape, dtype=t.dtype, requires_grad=t.requires_grad)

            small_mask = None
            if mask is not None:
                small_mask = torch.zeros([1] * (mask.dim() - 2) + [2, 2], dtype=mask.dtype)
            return int(torch._fused_sdp_choice(tiny(q), tiny(k), tiny(v), small_mask, float(dropout_p), bool(is_causal),
                                               enable_gqa=bool(enable_gqa)))


def architecture_peft(peft_spec: "PeftSpec", model: nn.Module) -> tuple["PeftSpec", Optional[str]]:
    """The scenario's PEFT settings for another architecture. Module names differ between
    architectures (BERT's ``query``/``value`` are Llama's ``q_proj``/``v_proj`` and T5's
    ``q``/``v``): when none of ``peft.target_modules`` names a module of ``model``, peft's own
    default targets for the model type are used instead. Returns (settings, note: None when
    nothing changed)."""
    from peft.utils import constants

    from .models import matches_target

    targets = list(peft_spec.target_modules)
    if peft_spec.method not in ("lora", "ia3") or "all-linear" in targets:
        return peft_spec, None
    names = [n for n, _ in model.named_modules()]
    if any(matches_target(n, t) for n in names for t in targets):
        return peft_spec, None
    model_type = model.config.model_type
    table = (constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING if peft_spec.method == "lora"
             else constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING)
    defaults = table.get(model_type)
    if defaults is None:
        raise ValueError(f"model.cost_model: peft.target_modules={targets} name no module of the {model_type} "
                         "architecture, and peft has no default targets for it; use target_modules both have, "
                         "e.g. all-linear")
    update: dict[str, Any] = {"target_modules": list(defaults)}
    if peft_spec.method == "ia3":
        update["feedforward_modules"] = list(
            constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type, []))
    note = (f"peft.target_modules={targets} are not modules of the {model_type} cost model: counted with peft's "
            f"defaults for {model_type}, {list(defaults)}")
    return peft_spec.model_copy(update=update), note


def wrap_peft(model: nn.Module, peft_spec: "PeftSpec", objective: str) -> nn.Module:
    """The PEFT method on ``model`` as the trained model gets it (:func:`fomo.models.apply_peft`);
    a causal LM gets peft's CAUSAL_LM task type and an encoder-decoder SEQ_2_SEQ_LM (no
    classification head to train)."""
    if objective == "causal_lm":
        return apply_peft(model, peft_spec, task_type="CAUSAL_LM")
    if is_encoder_decoder(model.config):
        return apply_peft(model, peft_spec, task_type="SEQ_2_SEQ_LM")
    return apply_peft(model, peft_spec)


@contextlib.contextmanager
def host_causal_mask_rule() -> Iterator[None]:
    """transformers' decoder-mask rules as they apply to real tensors. On a real batch it drops
    the causal mask (``is_causal`` instead of a materialised mask) when no token is padded, the
    query and key lengths agree (no cache) and no sliding window cuts it, and it finds no packed
    sequences in the default position ids (0, 1, 2, ...). On fake tensors it can look at no
    value, so it keeps every mask and assumes packing; within the block both are decided from
    the shapes and from whether a padding mask is given (the cost model passes none for an
    unpadded batch, and deftsim never passes position ids)."""
    from transformers import masking_utils

    originals = masking_utils._ignore_causal_mask_sdpa, masking_utils.find_packed_sequence_indices

    def ignore_causal_mask(padding_mask: Any, q_length: int, kv_length: int, q_offset: Any, kv_offset: Any,
                           local_attention_size: Optional[int] = None) -> bool:
        if local_attention_size is not None and kv_length >= local_attention_size:
            return False
        return padding_mask is None and (q_length == 1 or kv_length == q_length)

    masking_utils._ignore_causal_mask_sdpa = ignore_causal_mask
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils._ignore_causal_mask_sdpa, masking_utils.find_packed_sequence_indices = originals


def weightless_model(config: "PretrainedConfig", objective: str, peft_spec: Optional["PeftSpec"],
                     mode: FakeTensorMode, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Optional[str]]:
    """The architecture's model for ``objective`` with the PEFT method applied (``peft_spec``,
    None: the bare model), in train mode, with fake parameters (see :func:`to_fake`). Returns
    (model, note of :func:`architecture_peft`)."""
    cls = model_class(config, objective)
    with quiet_hf(), torch.device("meta"):
        model = cls.from_config(config)
    zero_dropout_modules(model)
    note = None
    if peft_spec is not None:
        peft_spec, note = architecture_peft(peft_spec, model)
        with torch.device("meta"):
            model = wrap_peft(model, peft_spec, objective)
    model = to_fake(model, mode, dtype)
    model.train()
    return model, note


# --------------------------------------------------------------------------------------------
# The cost model
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CostSummary:
    """What ``summary.json`` reports of a cost model (all counted, none measured on a host)."""

    name: str
    parameters: int
    trainable_parameters: int
    flops_per_step: float
    peak_memory_bytes: int
    payload_bytes: int
    weights_bytes: int
    batch_size: int
    seq_len: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class CostModel:
    """Per-step costs of an architecture under the scenario's PEFT method, without weights.

    Parameters
    ----------
    name : str
        A reference architecture (:func:`reference_architectures`) or a folder with a config.json.
    peft_spec : netsim.scenario.PeftSpec
    num_labels : int
        Classes of the classification head (the trained task's).
    optimizer : str
        ``adamw`` or ``sgd`` (optimizer states per trainable parameter, for memory).
    objective : str
        ``classification`` or ``causal_lm``.
    dtype : torch.dtype
        Parameter and activation dtype (float32 unless asked otherwise).

    Attributes
    ----------
    parameters : int
        All parameters of the model with its head, without the PEFT method's [count].
    trainable_parameters : int
        Parameters the PEFT method trains (adapter + head) [count].
    weights_bytes : int
        All parameters and buffers of the wrapped model [bytes].
    payload_bytes : int
        The trainable tensors: what a device uploads per round [bytes].
    """

    def __init__(self, name: str, peft_spec: "PeftSpec", num_labels: int, optimizer: str = "adamw",
                 objective: str = "classification", dtype: torch.dtype = torch.float32) -> None:
        self.name = str(name)
        self.objective = objective
        self._optimizer = optimizer
        self._num_labels = int(num_labels)
        self.config = architecture_config(name, num_labels)
        self._mode = FakeTensorMode(allow_non_fake_inputs=True)
        base, _ = weightless_model(self.config, objective, None, self._mode, dtype)
        self.parameters = int(sum(p.numel() for p in base.parameters()))
        self.backbone_parameters = int(sum(p.numel() for p in base.base_model.parameters()))
        del base
        self.model, note = weightless_model(self.config, objective, peft_spec, self._mode, dtype)
        self.notes: list[str] = [note] if note else []
        trainable = [p for _, p in trainable_parameters(self.model)]
        self.trainable_parameters = int(sum(p.numel() for p in trainable))
        self.payload_bytes = tensor_bytes(trainable)
        self.weights_bytes = profiling.weights_bytes(self.model)
        self._exclude = profiling.storage_ptrs(self.model)
        self._profiles: dict[tuple[int, int, bool], StepProfile] = {}
        self._eval_flops: dict[tuple[int, int, bool], float] = {}

    @contextlib.contextmanager
    def _counting(self) -> Iterator[None]:
        with self._mode, HostAttention(), host_causal_mask_rule():
            yield

    def _inputs(self, batch_size: int, seq_len: int, padded: bool
                ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """Placeholder (input_ids, attention_mask, labels) of the shape, as fake tensors. A batch
        without padding gets no mask: transformers drops an all-ones mask of a real batch too,
        and a fake mask's values cannot be looked at."""
        with self._mode:
            input_ids = torch.zeros((batch_size, seq_len), dtype=torch.int64)
            mask = torch.ones((batch_size, seq_len), dtype=torch.int64) if padded else None
            if self.objective == "causal_lm":
                labels = torch.zeros((batch_size, seq_len), dtype=torch.int64)
            elif is_encoder_decoder(self.config):
                labels = torch.zeros((batch_size, SEQ2SEQ_TARGET_TOKENS), dtype=torch.int64)
            else:
                labels = torch.zeros((batch_size,), dtype=torch.int64)
        return input_ids, mask, labels

    def _loss(self) -> profiling.LossFn:
        seq2seq = self.objective == "classification" and is_encoder_decoder(self.config)
        return profiling.labels_loss if seq2seq else profiling.step_loss(self.objective)

    def profile(self, batch_size: int, seq_len: int, padded: bool = True) -> StepProfile:
        """FLOPs (forward + backward) and saved-activation bytes of one training step of
        ``batch_size`` examples of ``seq_len`` tokens (``padded``: some are shorter, so the
        attention mask is applied), counted once per shape."""
        shape = (int(batch_size), int(seq_len), bool(padded))
        if shape not in self._profiles:
            with self._counting():
                ids, mask, labels = self._inputs(*shape)
                self._profiles[shape] = profiling.count_step_flops(
                    self.model, ids, mask, labels, self._exclude, loss=self._loss())
        return self._profiles[shape]

    def eval_flops(self, batch_size: int, seq_len: int, padded: bool = True) -> float:
        """Counted FLOPs of one evaluation forward pass of the shape [FLOP]."""
        shape = (int(batch_size), int(seq_len), bool(padded))
        if shape not in self._eval_flops:
            with self._counting(), torch.no_grad():
                ids, mask, labels = self._inputs(*shape)
                if is_encoder_decoder(self.config):
                    with profiling.flop_counter() as counter:
                        self.model(input_ids=ids, attention_mask=mask, labels=labels)
                    self._eval_flops[shape] = float(counter.get_total_flops())
                else:
                    self._eval_flops[shape] = profiling.counted_forward(self.model, ids, mask)[1]
        return self._eval_flops[shape]

    def job_memory_bytes(self, profile: StepProfile) -> int:
        """Peak memory of a local job with this step profile [bytes]
        (:func:`fomo.profiling.job_memory_bytes`)."""
        return profiling.job_memory_bytes(self.weights_bytes, self.payload_bytes, self._optimizer,
                                          profile.saved_activation_bytes)

    def summary(self, batch_size: int, seq_len: int, padded: bool = True) -> CostSummary:
        """The costs of one step of this shape, for ``summary.json``."""
        step = self.profile(batch_size, seq_len, padded)
        return CostSummary(name=self.name, parameters=self.parameters, trainable_parameters=self.trainable_parameters,
                           flops_per_step=step.flops, peak_memory_bytes=self.job_memory_bytes(step),
                           payload_bytes=self.payload_bytes, weights_bytes=self.weights_bytes,
                           batch_size=int(batch_size), seq_len=int(seq_len))


def scenario_cost_model(scenario: "Scenario", num_labels: int) -> Optional[CostModel]:
    """The scenario's :class:`CostModel` (``model.cost_model``), or None when it is not set."""
    if scenario.model.cost_model is None:
        return None
    return CostModel(scenario.model.cost_model, scenario.peft, num_labels, scenario.training.optimizer,
                     scenario.model.objective)

