"""Streamed activations (``--activations stream``): the language model runs beside the
trainer, in a producer thread on the trainer's device, and no activation touches the disk.

The text is the same seeded stream of contexts as the cache's (esosae/data/text.py):

- Held-out: the stream's first whole contexts while fewer than ``eval_tokens`` text rows
  precede them (the cache's rule, so the evaluations re-derive the same contexts), computed
  once when the source opens: fixed for the run and for every resume.
- Window k: the text rows of the next contexts [c_k, c_{k+1}), taken ``harvest_batch`` per
  forward until at least W = ``buffer_tokens`` rows are in, then put in the order of a
  permutation drawn from generator("stream", data_seed, k). The training rows are the
  windows one after another; global batch t is rows [t·B, (t+1)·B), shard r on rank r.
  When the text runs out it is read again from its start (held-out contexts skipped).
- Memory: the window being read and the window being filled, 2 · W · d · 2 bytes per hook
  (rows are stored in ``cache_dtype``, as in the cache): 302 MB at W = 2¹⁷, d = 576.
- Data position: (k, R_k, c_k), the window, its first training row and its first
  training context, recorded in every checkpoint (``position``) with the contexts per
  forward that bound the windows. A resume (``seek``) skips
  c_k contexts by tokenizing them only, recomputes window k from the same forward batches
  (the same rows, bit for bit) and reads on from row t·B − R_k: nothing is lost or repeated.
- Several hooks: one forward to the deepest hook fills every hook's window; each hook's
  source reads the same windows, and a window is dropped once every reader has passed it.

Under torchrun every rank runs its own producer over the same text and keeps its shard,
so a step is the same for any number of ranks and a checkpoint resumes with any count.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from esosae.config import TrainConfig
from esosae.data import text
from esosae.data.models import (
    LoadedModel,
    check_hook,
    hooks_activations,
    load_model,
    note,
)
from esosae.data.sources import expected_norm_scale, generator, shard_rows
from esosae.errors import UserError

STORAGE = {"float16": torch.float16, "bfloat16": torch.bfloat16}
AHEAD = 1
"""Windows the producer fills ahead of the slowest reader (memory: 1 + AHEAD windows)."""


class StreamError(UserError):
    """Streamed activations that cannot be produced; the message says what to change."""


@dataclass(frozen=True)
class Position:
    """Where window ``window`` starts: its first global training row and training context."""

    window: int
    row: int
    context: int


@dataclass
class Window:
    """One filled window: every hook's rows, and how many rows and contexts it holds."""

    start: Position
    rows: dict[str, torch.Tensor]
    """{hook: (n, d)} in the storage dtype, already shuffled."""
    n: int
    contexts: int

    @property
    def end(self) -> Position:
        return Position(self.start.window + 1, self.start.row + self.n, self.start.context + self.contexts)


def _heldout(cfg: TrainConfig, model: LoadedModel, sources: list[text.TextSource],
             hooks: list[str]) -> tuple[dict[str, torch.Tensor], int]:
    """The held-out rows {hook: (eval_tokens, d)} and the number of held-out contexts."""
    d_cfg = cfg.data
    stream = text.contexts(sources, model.tokenizer, model.bos_id, d_cfg.context_size, d_cfg.data_seed)
    contexts, n = [], 0
    for batch in text.batches(stream, d_cfg.harvest_batch):  # (b, T + 1)
        for row in batch:
            if n >= d_cfg.eval_tokens:
                break
            contexts.append(row)
            n += int(model.keep(row).sum())
        if n >= d_cfg.eval_tokens:
            break
    if n < d_cfg.eval_tokens:
        raise StreamError(f"--dataset {d_cfg.dataset!r} holds {n:,} tokens, fewer than --eval-tokens "
                          f"{d_cfg.eval_tokens:,} held out plus any to train on: lower it or add text")
    tokens = torch.stack(contexts)  # (n_held, T + 1)
    held: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    for i in range(0, len(tokens), d_cfg.harvest_batch):
        part = tokens[i:i + d_cfg.harvest_batch]
        keep = model.keep(part).to(model.device)
        for h, acts in hooks_activations(model, part, hooks).items():
            held[h].append(acts[keep].to(STORAGE[d_cfg.cache_dtype]).float())
    return {h: torch.cat(rows)[:d_cfg.eval_tokens] for h, rows in held.items()}, len(contexts)


class Producer:
    """The thread that runs the language model and the windows it has filled."""

    def __init__(self, cfg: TrainConfig, model: LoadedModel, sources: list[text.TextSource],
                 hooks: list[str], held_contexts: int):
        self.cfg, self.model, self.sources, self.hooks = cfg, model, sources, hooks
        self.held_contexts = held_contexts
        self.cond = threading.Condition()
        self.windows: dict[int, Window] = {}
        self.reading: dict[str, int] = {}  # hook → the window its source reads
        self.starts: dict[str, Position] = {}
        self.closed: set[str] = set()
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    # -- the readers' side --

    def register(self, hook: str, start: Position) -> None:
        """A source's first read; the thread starts once every hook's source has registered,
        at the earliest of their positions."""
        with self.cond:
            self.starts[hook], self.reading[hook] = start, start.window
            self._start_when_all_in()

    def _start_when_all_in(self) -> None:
        if (self.thread is None and self.starts and not self._stopping()
                and len(self.starts.keys() | self.closed) == len(self.hooks)):
            first = min(self.starts.values(), key=lambda p: p.window)
            self.thread = threading.Thread(target=self._produce, args=(first,), daemon=True,
                                           name="esosae-stream")
            self.thread.start()

    def window(self, hook: str, k: int) -> Window:
        """Window k, once filled; windows before k are released for ``hook``."""
        with self.cond:
            self.reading[hook] = k
            self.cond.notify_all()
            self.cond.wait_for(lambda: k in self.windows or self.error is not None or hook in self.closed)
            if self.error is not None:
                raise self.error
            if hook in self.closed:
                raise RuntimeError(f"the stream of {hook} was closed while being read")
            return self.windows[k]

    def close(self, hook: str) -> None:
        """``hook``'s source reads no more; once no source reads, the thread stops (within one
        forward) and is waited for, so no forward runs on after training."""
        with self.cond:
            self.closed.add(hook)
            self.reading.pop(hook, None)
            self._start_when_all_in()
            self.cond.notify_all()
            thread = self.thread if self._stopping() else None
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    # -- the thread --

    def _stopping(self) -> bool:
        return len(self.closed) == len(self.hooks)

    def _training_contexts(self) -> Iterator[torch.Tensor]:
        """Training contexts (T + 1,), after the held-out ones, pass after pass."""
        d = self.cfg.data
        for n_pass in itertools.count(1):
            stream = text.contexts(self.sources, self.model.tokenizer, self.model.bos_id, d.context_size,
                                   d.data_seed)
            rows = itertools.islice(itertools.chain.from_iterable(text.batches(stream, d.harvest_batch)),
                                    self.held_contexts, None)
            n = 0
            for row in rows:
                n += 1
                yield row
            if n == 0:
                raise StreamError(f"--dataset {d.dataset!r} holds no text beyond the held-out "
                                  f"--eval-tokens {d.eval_tokens:,}: lower it or add text")
            note(f"streamed text ran out after {n:,} training contexts; reading it again (pass {n_pass + 1})")

    def _fill(self, start: Position, contexts: Iterator[torch.Tensor]) -> Window | None:
        """Window ``start.window`` from the next contexts; None when every reader has closed."""
        d = self.cfg.data
        parts: dict[str, list[torch.Tensor]] = {h: [] for h in self.hooks}
        n = used = 0
        while n < d.buffer_tokens:
            if self._stopping():
                return None
            tokens = torch.stack(list(itertools.islice(contexts, d.harvest_batch)))  # (b, T + 1)
            keep = self.model.keep(tokens).to(self.model.device)  # (b, T + 1)
            for h, acts in hooks_activations(self.model, tokens, self.hooks).items():  # (b, T + 1, d)
                rows = acts[keep].to(STORAGE[d.cache_dtype])  # (n_b, d)
                if not torch.isfinite(rows).all():  # sync point (producer thread only)
                    raise StreamError(f"activations at {h} overflow {d.cache_dtype}; use --cache-dtype bfloat16")
                parts[h].append(rows)
            n, used = n + int(keep.sum()), used + len(tokens)
        order = torch.randperm(n, generator=generator("stream", d.data_seed, start.window))  # (n,)
        order = order.to(self.model.device)
        return Window(start, {h: torch.cat(p)[order] for h, p in parts.items()}, n, used)

    def _produce(self, first: Position) -> None:
        side = torch.cuda.Stream(self.model.device) if self.model.device.type == "cuda" else None
        try:
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                self._produce_from(first, side)
        except BaseException as e:  # noqa: BLE001 - handed to the readers, which raise it in the trainer
            with self.cond:
                self.error = e
                self.cond.notify_all()

    def _produce_from(self, first: Position, side: torch.cuda.Stream | None) -> None:
        """Fill windows from ``first`` on (on CUDA in the stream ``side``, beside the trainer's)."""
        note(f"streaming {', '.join(self.hooks)}: filling window {first.window} "
             f"({self.cfg.data.buffer_tokens:,} tokens) before the first step")
        contexts = self._training_contexts()
        for _ in itertools.islice(contexts, first.context):  # tokenizing only: no forward
            pass
        pos = first
        while True:
            with self.cond:
                self.cond.wait_for(lambda k=pos.window: self._stopping() or k <= min(self.reading.values()) + AHEAD)
                if self._stopping():
                    return
                for k in [k for k in self.windows if k < min(self.reading.values())]:
                    del self.windows[k]
            window = self._fill(pos, contexts)
            if window is None:
                return
            if side is not None:
                side.synchronize()  # sync point (producer thread only): the window is whole before readers see it
            with self.cond:
                self.windows[pos.window] = window
                self.cond.notify_all()
            pos = window.end


class StreamSource:
    """One hook's view of a Producer: the trainer's ActivationSource in stream mode.

    Read in order of steps (a resumed run ``seek``s first); the held-out rows, the scale s
    (from them: E‖s·x‖² = d) and the initial sample need no forward beyond the held-out set.
    """

    def __init__(self, producer: Producer, hook: str, heldout: torch.Tensor, info: dict[str, Any]):
        self.producer, self.hook, self._heldout, self._info = producer, hook, heldout, info
        self.d = int(heldout.shape[1])
        self.start = Position(0, 0, 0)
        self.current: Window | None = None

    def seek(self, position: dict[str, int]) -> None:
        """Start reading at a checkpoint's data position (before the first batch). The
        windows' bounds depend on the contexts per forward, so that must not have changed."""
        batch = self.producer.cfg.data.harvest_batch
        if position["harvest_batch"] != batch:
            raise StreamError(f"the checkpoint's stream was read {position['harvest_batch']} contexts per "
                              f"forward and this run reads {batch}: set harvest_batch back to "
                              f"{position['harvest_batch']} in config.json to resume exactly")
        self.start = Position(position["window"], position["row"], position["context"])

    def batch(self, step: int, batch_size: int, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
        if self.current is None:
            self.producer.register(self.hook, self.start)
            self.current = self._read(self.start.window)
        lo, hi = step * batch_size, (step + 1) * batch_size
        if lo < self.current.start.row:
            raise RuntimeError(f"stream read out of order: step {step} is before the current window")
        parts, p = [], lo
        while p < hi:
            while p >= self.current.start.row + self.current.n:
                self.current = self._read(self.current.start.window + 1)
            a = p - self.current.start.row
            b = min(hi - self.current.start.row, self.current.n)
            parts.append(self.current.rows[self.hook][a:b])
            p += b - a
        return shard_rows(torch.cat(parts), shard).float()  # (B / world, d)

    def _read(self, k: int) -> Window:
        window = self.producer.window(self.hook, k)
        rows = window.rows[self.hook]
        if rows.is_cuda:  # filled in the producer's stream, read in this one: not freed before these reads
            rows.record_stream(torch.cuda.current_stream(rows.device))
        return window

    def position(self, step: int, batch_size: int) -> dict[str, int]:
        """The data position after ``step`` steps, for the checkpoint."""
        row, w = step * batch_size, self.current
        pos = self.start if w is None else w.end if row >= w.start.row + w.n else w.start
        return {**asdict(pos), "harvest_batch": self.producer.cfg.data.harvest_batch}

    def close(self) -> None:
        self.producer.close(self.hook)

    def init_sample(self, batch_size: int) -> torch.Tensor:
        return self._heldout[:batch_size]

    def heldout(self) -> torch.Tensor:
        return self._heldout

    def norm_scale(self) -> float:
        return expected_norm_scale(self._heldout)

    def describe(self) -> dict[str, Any]:
        return {"kind": "lm_stream", "d": self.d, **self._info}


def open_streams(cfg: TrainConfig, device: torch.device | str = "cpu",
                 model: LoadedModel | None = None) -> dict[str, StreamSource]:
    """A StreamSource per hook of ``cfg.model.hooks``, sharing one producer (not yet started)."""
    sources = text.parse_sources(cfg.data.dataset)
    hooks = cfg.model.hooks
    model = model or load_model(cfg.model, device)
    for h in hooks:
        check_hook(model, h)
    held, held_contexts = _heldout(cfg, model, sources, hooks)
    producer = Producer(cfg, model, sources, hooks, held_contexts)
    info = {"model": cfg.model.model, "dataset": cfg.data.dataset, "context_size": cfg.data.context_size,
            "heldout_rows": cfg.data.eval_tokens, "buffer_tokens": cfg.data.buffer_tokens}
    return {h: StreamSource(producer, h, held[h], {"hook": h, **info}) for h in hooks}
