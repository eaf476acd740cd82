"""Text sources through ``datasets``, their weighted mixture, and fixed-length contexts.

``--dataset`` is a comma list ``NAME[:WEIGHT]`` (weight 1 when omitted). A NAME is
- ``wikitext`` or ``pile``: the local copies under the data dir when they are there
  (WikiText-103 valid + test, one WikiText family so no article appears twice; the Pile
  samples), otherwise the hub datasets ``Salesforce/wikitext`` (wikitext-103-raw-v1) and
  ``monology/pile-uncopyrighted``;
- a local file or folder: ``.txt`` (rows are lines, line breaks kept, read as one running
  text), ``.jsonl``/``.json`` (one document per line, a ``text`` field) or ``.parquet``
  (a ``text`` column); a folder contributes every such file under it, in sorted order;
- anything else: a hub dataset, streamed (split ``train``, column ``text``).
The data dir is ``$ESOSAE_DATA_DIR``, else ``<repo>/../shared/data`` when it exists.

Contexts: each source becomes one token stream (lines concatenated as they are,
documents joined by BOS), cut into ``context_size`` tokens, each prefixed with BOS:
rows of ``context_size + 1`` ids. Sources are interleaved context by context with
probabilities ∝ weight, stopping when the first one runs out (no text is read twice),
after each passed through a shuffle buffer of ``SHUFFLE_CONTEXTS`` contexts, so that a
batch mixes many documents.
Everything is a pure function of the seed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from esosae.data.hub import hub_unavailable
from esosae.errors import UserError
from esosae.run import manifest

FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SHUFFLE_CONTEXTS = 1024
MAP_ROWS = 256
"""Rows tokenized together; each batch drops its last partial context (< context_size tokens)."""


@dataclass(frozen=True)
class Alias:
    local: tuple[str, ...]
    """Files relative to the data dir."""
    hub: str
    hub_config: str | None
    lines: bool


ALIASES = {
    "wikitext": Alias(("text/wikitext103_tokens_valid.txt", "text/wikitext103_tokens_test.txt"),
                      "Salesforce/wikitext", "wikitext-103-raw-v1", lines=True),
    "pile": Alias(("text/pile_pearl_1k.jsonl", "text/pile_hf_dummy_3docs.jsonl"),
                  "monology/pile-uncopyrighted", None, lines=False),
}


class DataError(UserError):
    """A text source that cannot be read; the message names it and what to do."""


@dataclass(frozen=True)
class TextSource:
    """One resolved entry of ``--dataset``: local files, or one hub dataset."""

    name: str
    weight: float
    files: tuple[Path, ...] = ()
    hub: str | None = None
    hub_config: str | None = None
    lines: bool = False
    """The hub rows are lines of one running text (joined as is), not documents (joined by
    BOS); for local files the suffix decides: ``.txt`` rows are lines."""

    def describe(self) -> dict[str, Any]:
        """What the text is, for the activation cache's metadata: a changed file changes this."""
        d: dict[str, Any] = {"name": self.name, "weight": self.weight}
        if self.hub:
            d["hub"], d["config"] = self.hub, self.hub_config
        else:
            d["files"] = [manifest.file_identity(f) for f in self.files]
        return d


def data_dir() -> Path | None:
    """``$ESOSAE_DATA_DIR``, else ``<repo>/../shared/data`` if it exists, else None."""
    env = os.environ.get("ESOSAE_DATA_DIR")
    if env:
        return Path(env).expanduser()
    default = Path(__file__).resolve().parents[3] / "shared" / "data"  # the repo sits beside shared/
    return default if default.is_dir() else None


def _local_files(path: Path, name: str) -> tuple[Path, ...]:
    if path.is_file():
        if path.suffix not in FORMATS:
            raise DataError(f"dataset {name!r}: unsupported file type {path.suffix!r}; use "
                            f"{', '.join(FORMATS)}")
        files: tuple[Path, ...] = (path,)
    else:
        files = tuple(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FORMATS))
    if not files:
        raise DataError(f"dataset folder {name!r} holds no {', '.join(FORMATS)} files")
    for f in files:
        _check_text_file(f, name)
    return files


def _check_text_file(path: Path, name: str) -> None:
    """A .txt, .jsonl or .json file must be non-empty UTF-8 text (no NUL bytes), and JSON
    Lines must hold objects with a ``text`` field; found here, before anything is written or
    loaded, rather than as a traceback in the middle of the harvest. Reads the whole file:
    text datasets given as local files are megabytes, read again by the harvest anyway."""
    if path.suffix == ".parquet":
        return
    what = f"dataset {name!r}: {path.name}"
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{what} cannot be read ({e.strerror or e})") from None
    if not raw.strip():
        raise DataError(f"{what} is empty; pass a file with text in it")
    if b"\0" in raw:
        raise DataError(f"{what} is not a text file (it holds NUL bytes); pass UTF-8 text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{what} is not UTF-8 (byte {e.start}); convert it, e.g. iconv -t UTF-8") from None
    if path.suffix == ".jsonl":
        first = next(line for line in text.split("\n") if line.strip())
        try:
            row = json.loads(first)
        except json.JSONDecodeError as e:
            raise DataError(f"{what} is not valid JSON Lines (first row: {e.msg})") from None
        if not isinstance(row, dict) or "text" not in row:
            raise DataError(f"{what}: rows must be JSON objects with a 'text' field")


def _hub_check(name: str, why_not_local: str) -> None:
    reason = hub_unavailable()
    if reason is not None:
        raise DataError(f"dataset {name!r} {why_not_local} and the Hugging Face hub is unavailable "
                        f"({reason}); pass a local .txt/.jsonl/.parquet file or folder")


def resolve(name: str, weight: float) -> TextSource:
    """One NAME of ``--dataset`` → a TextSource; missing files and an offline hub raise DataError."""
    alias = ALIASES.get(name)
    if alias is not None:
        root = data_dir()
        if root is not None and all((root / f).is_file() for f in alias.local):
            return TextSource(name, weight, files=tuple((root / f).resolve() for f in alias.local))
        where = f"{root}" if root is not None else "no data dir (set ESOSAE_DATA_DIR)"
        _hub_check(name, f"has no local copy ({where} lacks {', '.join(alias.local)})")
        return TextSource(name, weight, hub=alias.hub, hub_config=alias.hub_config, lines=alias.lines)
    path = Path(name).expanduser()
    if path.exists():
        files = tuple(f.resolve() for f in _local_files(path, name))
        return TextSource(name, weight, files=files)
    if path.suffix in FORMATS or name.startswith((".", "/", "~")):
        raise DataError(f"dataset file {name!r} does not exist")
    _hub_check(name, "is not a local file or folder")
    return TextSource(name, weight, hub=name)


def parse_sources(spec: str) -> list[TextSource]:
    """``"wikitext:1,pile:1"`` → resolved sources; raises DataError naming the bad entry."""
    sources = []
    for entry in (e.strip() for e in spec.split(",")):
        name, weight = entry, 1.0
        head, sep, tail = entry.rpartition(":")
        if sep and head:
            try:
                name, weight = head, float(tail)
            except ValueError:
                pass  # a ':' inside a name (a path), not a weight
        if not name:
            raise DataError(f"--dataset {spec!r} has an empty entry")
        if not weight > 0:
            raise DataError(f"--dataset entry {entry!r}: the weight must be > 0")
        sources.append(resolve(name, weight))
    return sources


def texts(source: TextSource) -> list[tuple[Any, bool]]:
    """The source's files (or hub dataset) as streaming datasets with one column, ``text``,
    each with whether its rows are lines of one running text."""
    from datasets import load_dataset

    try:
        if source.hub is not None:
            parts = [(load_dataset(source.hub, source.hub_config, split="train", streaming=True), source.lines)]
        else:
            parts = [(load_dataset(FORMATS[f.suffix], data_files=[str(f)], split="train", streaming=True,
                                   **({"keep_linebreaks": True} if f.suffix == ".txt" else {})), f.suffix == ".txt")
                     for f in source.files]
    except Exception as e:  # datasets raises many types for an unreadable or unknown dataset
        raise DataError(f"dataset {source.name!r} cannot be read: {str(e).splitlines()[0]}") from None
    for part, _ in parts:
        if part.column_names is not None and "text" not in part.column_names:
            raise DataError(f"dataset {source.name!r} has no 'text' field (fields: {', '.join(part.column_names)})")
    return [(part.select_columns(["text"]), lines) for part, lines in parts]


def _packer(tokenizer: Any, bos_id: int, context_size: int, lines: bool) -> Callable[[dict], dict]:
    """A batched map: rows of text → contexts [BOS, t_1 … t_context_size], the partial tail
    dropped. A closure, not fn_kwargs: datasets deep-copies fn_kwargs (a tokenizer copy costs
    0.4 s, several per stream) but never a function."""

    def pack(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        stream: list[int] = []
        for ids in tokenizer(batch["text"], add_special_tokens=False)["input_ids"]:
            if ids and stream and not lines:
                stream.append(bos_id)  # document separator (a special position: never trained on)
            stream.extend(ids)
        n = len(stream) // context_size
        return {"input_ids": [[bos_id] + stream[i * context_size:(i + 1) * context_size] for i in range(n)]}

    return pack


def source_contexts(source: TextSource, tokenizer: Any, bos_id: int, context_size: int) -> Any:
    """One source as a streaming dataset of contexts (column ``input_ids``, context_size + 1 ids)."""
    from datasets import concatenate_datasets

    parts = [part.map(_packer(tokenizer, bos_id, context_size, lines), batched=True, batch_size=MAP_ROWS,
                      remove_columns=["text"])
             for part, lines in texts(source)]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def contexts(sources: list[TextSource], tokenizer: Any, bos_id: int, context_size: int, seed: int) -> Any:
    """The weighted, shuffled mixture of the sources' contexts; an empty source raises DataError."""
    from datasets import interleave_datasets

    parts = [source_contexts(s, tokenizer, bos_id, context_size) for s in sources]
    for source, part in zip(sources, parts):
        if next(iter(part.take(1)), None) is None:
            raise DataError(f"dataset {source.name!r} holds less than one context of text "
                            f"({context_size} tokens); is it empty?")
    # Shuffle each source before mixing: shuffling the interleaved stream instead makes
    # datasets stop it early (seen with datasets 5.2: 4,145 of 5,281 contexts).
    parts = [p.shuffle(seed=seed, buffer_size=SHUFFLE_CONTEXTS) for p in parts]
    if len(parts) == 1:
        return parts[0]
    total = sum(s.weight for s in sources)
    return interleave_datasets(parts, probabilities=[s.weight / total for s in sources], seed=seed,
                               stopping_strategy="first_exhausted")


def batches(stream: Any, batch: int) -> Iterator[torch.Tensor]:
    """Contexts in batches (≤ batch, context_size + 1) of int64 ids."""
    for rows in stream.iter(batch_size=batch):
        yield torch.tensor(rows["input_ids"], dtype=torch.long)
