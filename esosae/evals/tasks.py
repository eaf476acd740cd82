"""Labelled text sets for sparse probing, and the balanced binary tasks made from them.

A dataset is a list of rows (text, label fields, split). Each of its tasks is binary:
one positive class of one label field against a set of negative classes (one-vs-rest for
multi-class sets, as SAEBench does). Sampling, per split, follows SAEBench's
``prepare_probe_data``: take up to half the split's size of positives, draw
``ceil(n_pos / n_neg_classes)`` texts from each negative class, keep as many negatives as
positives (and as many positives as negatives when negatives run short), so every task is
balanced 50/50. All tasks of a dataset draw from one seeded order of its rows, so they
share most texts and the language model runs over each text once.

Splits: a file may be all ``train`` or all ``test``; otherwise a row's ``split`` field
decides (``train``/``test``; other values such as ``dev`` are not used); rows without one
are split at random (seeded) in the ratio ``train_size : test_size``.

Built-in datasets (files in ``<data dir>/probing/``, see ../shared/data/SOURCES.md):

| name | file(s) | tasks |
|---|---|---|
| ag_news | ag_news_trainsplit_8k_desc_only (train), ag_news_test (test; the title is cut so both splits are descriptions) | World, Sports, Business, Sci/Tech, one-vs-rest |
| sst2 | sst2_sentences (its train / test splits) | positive vs negative |
| amazon_sentiment | amazon_reviews_software_video_4k | positive (4-5★) vs negative (1-2★) |
| amazon_category | amazon_reviews_software_video_4k | video vs software |
| amazon_stars | amazon_review_full_sample_1k | 5★ vs 1★ (SAEBench's 1-and-5 sentiment) |
| uci_sentiment | uci_sentiment_labelled_sentences_3k | positive vs negative |
| bias_in_bios_gender | bias_in_bios_sample | female vs male |
| bias_in_bios_accountant | bias_in_bios_sample | accountant vs the 27 other professions pooled (10 bios each: too few for their own tasks) |
| code_language | code_snippets_{c,cpp,go,java,javascript,php,python,rust} | each language vs the other seven |
| europarl_language | europarl_langid_rahimi_part1 + part2 | en, fr, de, es, nl one-vs-rest (SAEBench's five; the other 16 languages are not used) |

Other names: a local ``.jsonl`` file (fields ``text``, ``label``, optional ``split``;
one-vs-rest over its labels, a single task when there are two), or ``hub:NAME[:LABEL[:TEXT]]``,
a Hugging Face dataset with train/test splits (columns ``label`` and ``text`` by default).
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from esosae.data.hub import hub_unavailable
from esosae.data.text import data_dir
from esosae.errors import UserError
from esosae.run import manifest

MIN_PER_CLASS = 2
"""A task needs at least this many texts of each class in each split."""


class ProbingDataError(UserError):
    """A probing dataset that cannot be read or made into tasks; the message names it."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    column: str
    """The label field whose classes the task separates."""
    positive: str
    negatives: tuple[str, ...] | None = None
    """Negative classes; None means every other class of the field."""


@dataclass(frozen=True)
class FileSpec:
    path: str
    """Relative to ``<data dir>/probing/``, or absolute."""
    split: str | None = None
    """'train' or 'test' for the whole file; None: each row's split field, else random."""
    strip_title: bool = False
    """Cut a leading copy of the row's ``title`` field from its text (AG News test rows)."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    files: tuple[FileSpec, ...]
    tasks: tuple[TaskSpec, ...] = ()
    """Empty: one-vs-rest over the field ``label`` (one task when it has two classes)."""
    hub: str | None = None
    hub_label: str = "label"
    hub_text: str = "text"


def _one_vs_rest(column: str, classes: dict[str, str]) -> tuple[TaskSpec, ...]:
    """classes: label value → task name."""
    return tuple(TaskSpec(name, column, value, tuple(v for v in classes if v != value))
                 for value, name in classes.items())


CODE_LANGUAGES = ("c", "cpp", "go", "java", "javascript", "php", "python", "rust")
BUILTIN: dict[str, DatasetSpec] = {
    "ag_news": DatasetSpec("ag_news", (FileSpec("ag_news_trainsplit_8k_desc_only.jsonl", "train"),
                                       FileSpec("ag_news_test.jsonl", "test", strip_title=True)),
                           _one_vs_rest("label", {"0": "World", "1": "Sports", "2": "Business", "3": "Sci/Tech"})),
    "sst2": DatasetSpec("sst2", (FileSpec("sst2_sentences.jsonl"),), (TaskSpec("positive", "label", "1", ("0",)),)),
    "amazon_sentiment": DatasetSpec("amazon_sentiment", (FileSpec("amazon_reviews_software_video_4k.jsonl"),),
                                    (TaskSpec("positive", "label", "1", ("0",)),)),
    "amazon_category": DatasetSpec("amazon_category", (FileSpec("amazon_reviews_software_video_4k.jsonl"),),
                                   (TaskSpec("video", "category", "video", ("software",)),)),
    "amazon_stars": DatasetSpec("amazon_stars", (FileSpec("amazon_review_full_sample_1k.jsonl"),),
                                (TaskSpec("5 stars", "stars", "5", ("1",)),)),
    "uci_sentiment": DatasetSpec("uci_sentiment", (FileSpec("uci_sentiment_labelled_sentences_3k.jsonl"),),
                                 (TaskSpec("positive", "label", "1", ("0",)),)),
    "bias_in_bios_gender": DatasetSpec("bias_in_bios_gender", (FileSpec("bias_in_bios_sample.jsonl"),),
                                       (TaskSpec("female", "gender", "Female", ("Male",)),)),
    "bias_in_bios_accountant": DatasetSpec("bias_in_bios_accountant", (FileSpec("bias_in_bios_sample.jsonl"),),
                                           (TaskSpec("accountant", "profession", "accountant"),)),
    "code_language": DatasetSpec("code_language",
                                 tuple(FileSpec(f"code_snippets_{lang}.jsonl") for lang in CODE_LANGUAGES),
                                 _one_vs_rest("label", {lang: lang for lang in CODE_LANGUAGES})),
    "europarl_language": DatasetSpec("europarl_language", (FileSpec("europarl_langid_rahimi_part1.jsonl"),
                                                           FileSpec("europarl_langid_rahimi_part2.jsonl")),
                                     _one_vs_rest("label", {lang: lang for lang in ("en", "fr", "de", "es", "nl")})),
}


# -- resolving names and reading rows ----------------------------------------------------


@dataclass
class Rows:
    """A dataset's rows: texts, label fields as strings, and a split per row."""

    texts: list[str] = field(default_factory=list)
    labels: list[dict[str, str]] = field(default_factory=list)
    split: list[str | None] = field(default_factory=list)


def resolve(name: str) -> DatasetSpec:
    """A ``--datasets`` entry → its spec; unknown names and an offline hub raise ProbingDataError."""
    if name in BUILTIN:
        return BUILTIN[name]
    if name.startswith("hub:"):
        hub, label, text = (name[4:].split(":") + ["label", "text"])[:3]
        reason = hub_unavailable()
        if reason is not None:
            raise ProbingDataError(f"probing dataset {name!r} needs the Hugging Face hub, which is unavailable "
                                   f"({reason}); use the built-in datasets or a local .jsonl file")
        return DatasetSpec(name, (), hub=hub, hub_label=label, hub_text=text)
    path = Path(name).expanduser()
    if path.suffix == ".jsonl" and path.is_file():
        return DatasetSpec(path.stem, (FileSpec(str(path.resolve())),))
    raise ProbingDataError(f"unknown probing dataset {name!r}: use one of {', '.join(BUILTIN)}, "
                           "an existing .jsonl file, or hub:NAME[:LABEL[:TEXT]]")


def _file_path(spec: FileSpec) -> Path:
    path = Path(spec.path)
    if path.is_absolute():
        return path
    root = data_dir()
    if root is None:
        raise ProbingDataError(f"probing file {spec.path} needs the data dir: set ESOSAE_DATA_DIR")
    return root / "probing" / spec.path


def describe(spec: DatasetSpec) -> dict[str, Any]:
    """What the rows are, for the activation cache's key: a changed file changes this."""
    if spec.hub is not None:
        return {"name": spec.name, "hub": spec.hub, "label": spec.hub_label, "text": spec.hub_text}
    files = []
    for f in spec.files:
        path = _file_path(f)
        if not path.is_file():
            raise ProbingDataError(f"probing file {path} does not exist; check the data dir (ESOSAE_DATA_DIR)")
        files.append(manifest.file_identity(path))
    return {"name": spec.name, "files": files}


def _columns(spec: DatasetSpec) -> set[str]:
    return {t.column for t in spec.tasks} or {"label"}


def read_rows(spec: DatasetSpec) -> Rows:
    """Every row of the dataset; a malformed line raises ProbingDataError naming file and line."""
    if spec.hub is not None:
        return _hub_rows(spec)
    rows = Rows()
    columns = _columns(spec)
    for f in spec.files:
        path = _file_path(f)
        try:
            lines = path.read_text(encoding="utf-8").split("\n")  # JSON Lines: only \n ends a row (not U+2028, U+0085)
        except (OSError, UnicodeDecodeError) as e:
            raise ProbingDataError(f"probing file {path} cannot be read as UTF-8 text ({e})") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ProbingDataError(f"probing file {path} line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ProbingDataError(f"probing file {path} line {n}: needs a JSON object with a string 'text'")
            missing = sorted(c for c in columns if c not in row)
            if missing:
                raise ProbingDataError(f"probing file {path} line {n}: no field {', '.join(map(repr, missing))}")
            text, title = row["text"], str(row.get("title", "")).strip()
            if f.strip_title and title and text.startswith(title):
                text = text[len(title):]
            if not text.strip():
                continue  # nothing to pool over
            rows.texts.append(text.strip())
            rows.labels.append({c: str(row[c]) for c in columns})
            rows.split.append(f.split or row.get("split"))
    if not rows.texts:
        raise ProbingDataError(f"probing dataset {spec.name!r} has no rows with text")
    return rows


def _hub_rows(spec: DatasetSpec) -> Rows:
    from datasets import load_dataset

    try:
        ds = load_dataset(spec.hub)
    except Exception as e:  # datasets raises many types for an unknown or unreadable dataset
        raise ProbingDataError(f"probing dataset {spec.hub!r} cannot be loaded: {str(e).splitlines()[0]}") from None
    rows = Rows()
    for split in ("train", "test"):
        if split not in ds:
            continue
        part = ds[split]
        missing = [c for c in (spec.hub_label, spec.hub_text) if c not in part.column_names]
        if missing:
            raise ProbingDataError(f"probing dataset {spec.hub!r} has no column {', '.join(missing)} "
                                   f"(columns: {', '.join(part.column_names)}); use hub:NAME:LABEL:TEXT")
        for text, label in zip(part[spec.hub_text], part[spec.hub_label]):
            if isinstance(text, str) and text.strip():
                rows.texts.append(text.strip())
                rows.labels.append({"label": str(label)})
                rows.split.append(split if {"train", "test"} <= set(ds) else None)
    return rows


# -- tasks -------------------------------------------------------------------------------


@dataclass
class Task:
    """One balanced binary task; indices point into its dataset's ``texts``."""

    name: str
    train: np.ndarray
    """(n_train,) int64 text indices."""
    train_y: np.ndarray
    """(n_train,) int64, 1 = positive."""
    test: np.ndarray
    test_y: np.ndarray


@dataclass
class ProbeDataset:
    name: str
    source: dict[str, Any]
    """``describe(spec)``: the files or hub name the rows came from."""
    texts: list[str]
    tasks: list[Task]


def _task_specs(spec: DatasetSpec, rows: Rows) -> tuple[TaskSpec, ...]:
    if spec.tasks:
        return spec.tasks
    classes = sorted({lab["label"] for lab in rows.labels})
    if len(classes) < 2:
        raise ProbingDataError(f"probing dataset {spec.name!r}: every row has label {classes[0]!r}; "
                               "a probing task needs at least two classes")
    if len(classes) == 2:
        return (TaskSpec(classes[1], "label", classes[1], (classes[0],)),)
    return _one_vs_rest("label", {c: c for c in classes})


def _assign_splits(rows: Rows, spec_name: str, train_size: int, test_size: int, seed: int) -> np.ndarray:
    """(n_rows,) 0 = train, 1 = test, -1 = unused."""
    rng = np.random.default_rng([seed, zlib.crc32(spec_name.encode())])
    random_test = rng.random(len(rows.texts)) < test_size / (train_size + test_size)  # (n_rows,)
    out = np.full(len(rows.texts), -1)
    for i, s in enumerate(rows.split):
        if s is None:
            out[i] = int(random_test[i])
        elif s in ("train", "test"):
            out[i] = int(s == "test")
    return out


def _sample(order: np.ndarray, labels: np.ndarray, spec: TaskSpec, classes: list[str], half: int,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """SAEBench's balanced sampling within one split; ``order`` holds the split's rows in the
    shared row order, ``labels`` (n_rows,) the task field's class of every row."""
    negatives = spec.negatives if spec.negatives is not None else tuple(c for c in classes if c != spec.positive)
    pos = order[labels[order] == spec.positive][:half]
    per_class = math.ceil(len(pos) / len(negatives))
    neg = rng.permutation(np.concatenate([order[labels[order] == c][:per_class] for c in negatives]))
    n = min(len(pos), len(neg))
    return np.concatenate([pos[:n], neg[:n]]), np.repeat([1, 0], n)


def build(spec: DatasetSpec, train_size: int, test_size: int, seed: int) -> ProbeDataset:
    """Read the rows and draw every task's balanced train and test texts."""
    source = describe(spec)
    rows = read_rows(spec)
    specs = _task_specs(spec, rows)
    split = _assign_splits(rows, spec.name, train_size, test_size, seed)
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode()), 1])
    order = rng.permutation(len(rows.texts))  # one row order shared by every task
    drawn = []
    for t in specs:
        labels = np.array([lab[t.column] for lab in rows.labels])  # (n_rows,)
        classes = sorted(set(labels.tolist()))
        wanted = [t.positive, *(t.negatives or ())]
        absent = [c for c in wanted if c not in classes]
        if absent or len(classes) < 2:
            raise ProbingDataError(f"probing dataset {spec.name!r}, task {t.name!r}: field {t.column!r} has "
                                   f"classes {', '.join(classes[:8])}; "
                                   + (f"{', '.join(absent)} missing" if absent else "a task needs two"))
        parts = []
        for s, size in ((0, train_size), (1, test_size)):
            idx, y = _sample(order[split[order] == s], labels, t, classes, size // 2, rng)
            if len(idx) < 2 * MIN_PER_CLASS:
                raise ProbingDataError(
                    f"probing dataset {spec.name!r}, task {t.name!r}: only {len(idx) // 2} "
                    f"{('train', 'test')[s]} texts per class (need >= {MIN_PER_CLASS}); add rows or splits")
            parts.append((idx, y))
        drawn.append((t.name, parts))
    used = np.unique(np.concatenate([idx for _, parts in drawn for idx, _ in parts]))  # (n_texts,) sorted
    where = np.full(len(rows.texts), -1)
    where[used] = np.arange(len(used))
    tasks = [Task(name, where[tr], ytr, where[te], yte) for name, ((tr, ytr), (te, yte)) in drawn]
    return ProbeDataset(spec.name, source, [rows.texts[i] for i in used], tasks)
