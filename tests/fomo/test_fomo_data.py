"""fomo.data: loading, split and partition (numpy only, fast)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fomo import data as fdata
from netsim.scenario import Scenario


def _rng(seed: int = 0) -> np.random.Generator:
    return fdata.split_rng(seed)


def _assert_disjoint_cover(parts: list[np.ndarray], total: int) -> None:
    merged = np.concatenate(parts)
    assert len(merged) == len(np.unique(merged)), "device index sets overlap"
    assert np.array_equal(np.sort(merged), np.arange(total)), "partition does not cover the set"


def test_import_fomo_and_data_do_not_import_torch() -> None:
    code = "import sys, fomo, fomo.data; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_bbc_news_loads_five_topics_without_duplicates() -> None:
    texts, labels, class_names = fdata.load_bbc_news()
    assert class_names == sorted(class_names) and len(class_names) == 5
    assert len(texts) > 2000 and len(texts) == len(labels)
    assert len(set(texts)) == len(texts)
    assert set(np.unique(labels).tolist()) == set(range(5))
    assert labels.dtype == np.int64


def test_split_is_disjoint_stratified_and_seeded() -> None:
    _, labels, _ = fdata.load_bbc_news()
    train, test = fdata.split_train_test(labels, 0.2, _rng(0))
    assert len(np.intersect1d(train, test)) == 0
    assert len(train) + len(test) == len(labels)
    for cls in range(5):
        share = np.mean(labels[test] == cls) / np.mean(labels == cls)
        assert 0.9 < share < 1.1
    train2, test2 = fdata.split_train_test(labels, 0.2, _rng(0))
    assert np.array_equal(test, test2) and np.array_equal(train, train2)
    _, test3 = fdata.split_train_test(labels, 0.2, _rng(1))
    assert not np.array_equal(test, test3)


def test_iid_partition_is_disjoint_and_balanced() -> None:
    labels = np.arange(103) % 5
    parts = fdata.partition(labels, 4, "iid", 0.5, 8, _rng())
    _assert_disjoint_cover(parts, 103)
    assert sorted(len(p) for p in parts) == [25, 26, 26, 26]


def test_dirichlet_partition_is_disjoint_with_minimum() -> None:
    _, labels, _ = fdata.load_bbc_news()
    parts = fdata.partition(labels, 10, "dirichlet", 0.3, 20, _rng())
    _assert_disjoint_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= 20
    # skewed: some device's label histogram is far from uniform
    shares = [np.bincount(labels[p], minlength=5).max() / len(p) for p in parts]
    assert max(shares) > 0.4


def test_too_many_devices_raises_naming_min_examples() -> None:
    labels = np.arange(100) % 5
    with pytest.raises(ValueError, match="min_examples_per_device") as info:
        fdata.partition(labels, 20, "iid", 0.5, 8, _rng())
    assert "20 devices" in str(info.value) and "only 100" in str(info.value)


def test_impossible_dirichlet_raises_naming_alpha() -> None:
    labels = np.arange(100) % 5
    with pytest.raises(ValueError, match="dirichlet_alpha"):
        fdata.partition(labels, 10, "dirichlet", 0.01, 10, _rng())


def test_check_data_fits_on_scenarios() -> None:
    assert fdata.check_data_fits(Scenario.model_validate({"devices": [{"count": 10}]})) == 5  # BBC topics
    crowded = Scenario.model_validate(
        {"devices": [{"count": 300}], "data": {"min_examples_per_device": 8}}
    )
    with pytest.raises(ValueError, match="min_examples_per_device"):
        fdata.check_data_fits(crowded)


def test_csv_with_string_labels(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("body,topic\nhello world,b\nfoo bar,a\nbaz,b\n,a\n")
    scenario = Scenario.model_validate(
        {"data": {"dataset": "csv", "path": str(path), "text_column": "body", "label_column": "topic"}}
    )
    texts, labels, class_names = fdata.load_texts(scenario.data)
    assert texts == ["hello world", "foo bar", "baz"]  # the row without text is dropped
    assert class_names == ["a", "b"] and labels.tolist() == [1, 0, 1]


def test_csv_missing_column_names_it(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,label\nx,1\ny,2\n")
    scenario = Scenario.model_validate(
        {"data": {"dataset": "csv", "path": str(path), "label_column": "topic"}}
    )
    with pytest.raises(ValueError, match="data.label_column='topic'"):
        fdata.load_texts(scenario.data)


def test_csv_errors_name_the_file_and_never_quote_it(tmp_path: Path) -> None:
    secret = "SECRET-CONTENT-1c9e"
    cases = {
        "empty": (b"", "is empty"),
        "binary": (b"\x00\x01" + secret.encode(), "binary file"),
        "latin1": (f"text,label\ncaf\xe9 {secret},a\nb,b\n".encode("latin-1"), "not UTF-8 text (byte 14)"),
        "header_only": (b"text,label\n", "no row with both a text"),
        "empty_texts": (b"text,label\n,a\n,b\n", "no row with both a text"),
        "no_column": (f"{secret},label\nx,a\ny,b\n".encode(), "data.text_column='text': no such column"),
        "one_class": (b"text,label\nx,a\ny,a\n", "1 distinct value"),
        "quote": (f'text,label\n"{secret},a\n'.encode(), "not a well-formed CSV"),
        "wide_row": (f"text,label\n{secret},a,b\ny,b\n".encode(), "more fields than the header"),
        "wide_later_row": (f"text,label\nx,a\n{secret},b,c\n".encode(), "Expected 2 fields in line 3, saw 3"),
    }
    for name, (content, fragment) in cases.items():
        path = tmp_path / f"{name}.csv"
        path.write_bytes(content)
        with pytest.raises(ValueError) as err:
            fdata.load_csv(str(path), "text", "label")
        message = str(err.value)
        assert fragment in message and f"{name}.csv" in message and secret not in message, (name, message)


def test_csv_text_length_limit(tmp_path: Path) -> None:
    """A text of exactly MAX_TEXT_CHARS is accepted, one more character is refused (naming the row)."""
    limit = fdata.MAX_TEXT_CHARS
    path = tmp_path / "long.csv"
    path.write_text(f"text,label\nshort,a\n{'x' * limit},b\n")
    texts, _, _ = fdata.load_csv(str(path), "text", "label")
    assert len(texts[1]) == limit
    path.write_text(f"text,label\nshort,a\n{'x' * (limit + 1)},b\n")
    with pytest.raises(ValueError, match=f"data row 2 has a text of {limit + 1:,} characters"):
        fdata.load_csv(str(path), "text", "label")


def test_csv_with_quoted_commas_and_utf8_loads(tmp_path: Path) -> None:
    path = tmp_path / "ok.csv"
    path.write_text('text,label\n"one, two",a\ncafé,b\n', encoding="utf-8")
    texts, labels, names = fdata.load_csv(str(path), "text", "label")
    assert texts == ["one, two", "café"] and labels.tolist() == [0, 1] and names == ["a", "b"]


def test_seed_streams_are_distinct() -> None:
    assert fdata.torch_init_seed(0) != fdata.torch_init_seed(1)
    a = fdata.device_rng(0, 0).integers(1 << 30, size=4)
    b = fdata.device_rng(0, 1).integers(1 << 30, size=4)
    c = fdata.split_rng(0).integers(1 << 30, size=4)
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
