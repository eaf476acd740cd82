"""The ``torch`` backend's fast CPU ops: the reference's math (esosae.sae.reference), fewer FLOPs.

Same signatures and outputs as ``reference.encode`` / ``decode`` / ``orth_penalty``; every
output and gradient matches the float64 reference (tests/test_torch_ops.py). What changes
is the work, at d = 576, m = 4608, B = 1024 and L0 ≈ 32 (density 0.7%):

- Encoder forward: one GEMM, then the bias and the threshold in place (f = a·1[a > θ],
  the reference's formula, so NaN propagates as there) and, while the density of f is at
  most ``SPARSE_MAX_DENSITY``, the firing pattern: the active (row, feature) pairs, kept
  as an ``Active`` on f.
- Decoder with an ``Active``: x̂ = f W_dec + b is a weighted sum of L0 rows of W_dec per
  token (``embedding_bag``), and its backward touches active pairs only:
  grad_W_dec = fᵀ G by features (``embedding_bag`` in column order) and grad_f on the
  active pairs only (a sampled dense-dense product), instead of three dense GEMMs.
- Encoder backward on active pairs: grad_a = (grad_f + grad_row_l1)·1[a > θ] is non-zero
  only there, so grad_W_enc = (x − b_dec)ᵀ grad_a and grad_b_enc = Σ_b grad_a are
  per-feature gathers, and grad_b_dec = −W_enc Σ_b grad_a is a matrix-vector product (the
  dense path uses it too: the reference's autograd spends a GEMM on grad_x for b_dec).
- Orthogonality: W_dec1 W_dec2ᵀ one block of rows at a time (the m1×m2 matrix is never
  built), penalty and both gradients in that one pass, and the backward products restricted
  to the pairs past the margin (few: |c| > ρ is rare), so the exact penalty costs about one
  GEMM instead of three.
- Threads: the large GEMMs use every intra-op thread; index bookkeeping and full
  reductions run on one (``serial``); the large passes whose results do not depend on the
  thread count (elementwise passes over (B, m), gathers, per-row sums, fused Adam) use
  every thread while no other process waits for a core and one otherwise (``wide``); the
  penalty's small tile-row GEMMs run one thread each, two tile rows at a time when the
  cores are free (a helper thread).
- Memory: freed blocks stay in the heap for the next step (``keep_freed_memory``).

grad_f with an ``Active``: the decoder returns the gradient of f on the active pairs only
(a sparse COO tensor). That is exact for the training step because f's sole producer,
this encoder, reads grad_f only on those pairs (grad_a = grad_f·1[a > θ]); the decoder
checks that f is that encoder's unmodified output (its grad_fn and version) and otherwise
returns the full dense grad_f. ``f.grad`` under ``retain_grad`` shows the partial tensor.

Dense fallback: at high density (e.g. a ReLU SAE at initialization, ~50% of features on)
gathers cost more than GEMMs, so the ops use dense GEMMs with the same formulas; their
forward is then the reference's bit for bit (same GEMMs, same order of additions). Other
dtypes than float32/float64, non-CPU tensors, negative θ and empty shapes go to the
reference. Host syncs (counting active pairs) are free on the CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from esosae.sae import reference
from esosae.sae.reference import ORTH_TILE, _acc_dtype, tile_grid

SPARSE_MAX_DENSITY = 0.1
"""Largest density nnz(f)/(B·m) at which the encoder and decoder use active pairs. Measured
at d = 576, m = 4,608, B = 1,024 (encode + decode, forward and backward, 2 loaded cores):
pairs 0.50 s against dense 1.13 s at 3%, 0.78 s against 1.29 s at 8%, 1.01 s against 1.27 s
at 12%; dense GEMMs gain more than gathers on an idle machine, hence a margin below that."""
ORTH_SPARSE_MAX_DENSITY = 0.05
"""Largest fraction of pairs past the margin at which the penalty's gradients use them sparsely."""
ORTH_ROWS = 256
"""Rows of W_dec1 per block of the exact orthogonality penalty: a (256, m2) block at a time."""
ORTH_BATCH = 1 << 21
"""Values of c (W_dec1 W_dec2ᵀ on the pairs summed) held at once: the blocks of a batch are
computed into one buffer and its elementwise work (margin, sum, pairs past it) runs once."""

SERIAL = True
"""Run everything but the GEMMs on one intra-op thread (see ``serial``), except ``wide`` work
while the cores are free."""
WIDE = True
"""Let the thread-count-independent large passes use every intra-op thread while other
processes leave the cores free (see ``wide``)."""

KEEP_FREED_MEMORY = True
"""On glibc, keep freed blocks below 256 MB in the heap for reuse (``keep_freed_memory``)."""

_DTYPES = (torch.float32, torch.float64)


@contextlib.contextmanager
def serial():
    """One intra-op thread inside (when ``SERIAL``), the caller's count restored after.

    The non-GEMM work here is index bookkeeping on ~nnz elements (just above PyTorch's
    parallel grain of 32,768), gathers, and memory-bound passes. Split over OpenMP threads
    each op ends in a barrier; on a shared machine, where a thread is often descheduled,
    those barriers cost up to a scheduler time slice per op (measured on the 2-core
    machine under load: a 35,828-element argsort 0.7 ms on one thread, 370 ms on two).
    GEMMs keep all threads: they have the work to amortize a barrier.
    """
    n = torch.get_num_threads()
    if not SERIAL or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _running() -> int | None:
    """Threads running or ready to run on the whole machine now (/proc/loadavg), or None off Linux."""
    try:
        with open("/proc/loadavg") as fh:
            return int(fh.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None


class _Cores:
    """Whether this process's intra-op threads had the CPUs to themselves at the last look.

    A look, taken right after a GEMM on every intra-op thread (their workers still spin
    then), counts the threads running or ready to run machine-wide: no more than our
    intra-op threads means that no other process was waiting for a core. Measured on the
    2-core machine: 2 at every look alone, 3–5 beside one busy process."""

    def __init__(self) -> None:
        self.free = False

    def look(self) -> bool:
        running = _running()
        self.free = running is not None and running <= torch.get_num_threads()
        return self.free


CORES = _Cores()


@contextlib.contextmanager
def wide():
    """Every intra-op thread while ``WIDE`` and the cores were free at the last look
    (``CORES``, looked at by each encoder call); one thread (``serial``) otherwise.

    For large passes only, and only those whose result does not depend on the number of
    threads: elementwise ops, gathers and copies, reductions along a dimension (ATen splits
    their outputs over threads, never one output's sum; full reductions such as ``dot``
    or ``sum()`` stay in ``serial``), fused Adam. The choice depends on timing, so it must
    never change a number (tests/test_torch_ops.py checks it bit for bit). On a free
    machine the second core then takes half of those passes (the single-layer step at
    L0 ≈ 32: 62 -> 49 ms beside SAELens's step); under load they stay on one thread,
    where a parallel region waits on a descheduled thread (an 18 MB add_: 0.7 ms on one
    thread, 5 ms on two with another job on the second core).
    """
    if WIDE and CORES.free:
        yield
    else:
        with serial():
            yield


_kept = False


def keep_freed_memory() -> None:
    """Once per process, on glibc: serve allocations below 256 MB from the heap and keep up to
    1 GB of freed heap instead of returning it to the system (``mallopt`` M_MMAP_THRESHOLD,
    M_TRIM_THRESHOLD; PyTorch's CPU performance guide recommends such an allocator policy).

    A training step allocates its large temporaries afresh (the (B, m) pre-activations and
    mask, gradients, transposes: ~100 MB at d = 576, m = 4,608, B = 1,024). With glibc's
    defaults each comes from a new ``mmap`` whose every page faults on first write; kept
    in the heap they are reused from step to step. Measured: allocating and filling 57 MB
    10.5 ms with the defaults, 2.5 ms with this policy; the single-layer step beside
    SAELens's 58 -> 55 ms. The process's memory stays at its peak instead of shrinking
    between steps. Changes no number. Called by the first CPU encoder call."""
    global _kept
    if _kept or not KEEP_FREED_MEMORY:
        return
    _kept = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: its allocator's own policy stays
        pass


def _fast(*ts: torch.Tensor) -> bool:
    """The fast path runs on CPU float32/float64 tensors of one dtype with no empty dimension."""
    t0 = ts[0]
    return all(t.device.type == "cpu" and t.dtype == t0.dtype and t.numel() > 0 for t in ts) and t0.dtype in _DTYPES


def _flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Ascending flat positions of the True entries of a bool tensor: ``mask.view(-1).nonzero()``.

    A sparse mask is scanned 8 flags at a time as int64 words; only the few non-zero words
    are then looked at flag by flag (about half the time of ``nonzero`` at 1% density)."""
    flat = mask.reshape(-1)
    if flat.numel() % 8 or flat.storage_offset() % 8:
        return flat.nonzero().view(-1)
    words = flat.view(torch.int64).nonzero().view(-1)  # (n_words,) words with a set flag
    k = flat.view(-1, 8).index_select(0, words).nonzero()  # (nnz, 2): (which word, which flag)
    return words[k[:, 0]].mul_(8).add_(k[:, 1])


def _bag_sum(index: torch.Tensor, table: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[k] = Σ_{i in bag k} weights[i] · table[index[i]]; bag k spans index[offsets[k]:offsets[k+1]]."""
    return F.embedding_bag(index, table, offsets, mode="sum", per_sample_weights=weights)


class Active:
    """The firing pattern of one encoder call: the pairs (row b, feature j) where a > θ.

    rows, cols (nnz,) int64 in row-major order; ``indices`` (2, nnz) holds both; ``vals``
    are f on the pairs; ``offsets`` (B,) where each row's pairs start. The column-major
    order (``csc``) is built once on first use and shared by both backward passes.
    ``version`` is the version of the f this pattern belongs to.
    """

    __slots__ = ("shape", "indices", "rows", "cols", "vals", "offsets", "version", "_csc")

    def __init__(self, indices: torch.Tensor, vals: torch.Tensor, shape: tuple[int, int]):
        B, _ = shape
        self.shape = shape
        self.indices = indices  # (2, nnz)
        self.rows, self.cols = indices[0], indices[1]
        self.vals = vals  # (nnz,)
        counts = torch.bincount(self.rows, minlength=B)  # (B,)
        self.offsets = torch.cumsum(counts, 0) - counts  # (B,) start of each row's pairs
        self.version = -1
        self._csc = None

    @classmethod
    def of_mask(cls, mask: torch.Tensor, f: torch.Tensor) -> Active:
        """The pairs where the (B, m) bool ``mask`` is set, with f's values there."""
        return cls.of_flat(_flat_nonzero(mask), f)

    @classmethod
    def of_flat(cls, flat: torch.Tensor, f: torch.Tensor) -> Active:
        """The pairs at the ascending flat positions ``flat`` of the (B, m) f, with f's values there."""
        B, m = f.shape
        rows = torch.div(flat, m, rounding_mode="floor")
        idx = torch.stack([rows, flat - rows * m])  # (2, nnz)
        return cls(idx, f.reshape(-1).index_select(0, flat), (B, m))

    @property
    def nnz(self) -> int:
        return self.rows.numel()

    def csc(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(perm, rows in column order, offsets (m,) of each feature's pairs in that order)."""
        if self._csc is None:
            keys = self.cols.int() if self.shape[1] <= 2**31 - 1 else self.cols  # int32 sorts in half the time
            perm = torch.argsort(keys, stable=True)  # rows stay ascending within a feature
            counts = torch.bincount(self.cols, minlength=self.shape[1])  # (m,)
            self._csc = (perm, self.rows[perm], torch.cumsum(counts, 0) - counts)
        return self._csc

    def row_gather(self, table: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(B, n): out[b] = Σ_{pairs (b, j)} weights · table[j], i.e. S @ table for the sparse S."""
        return _bag_sum(self.cols, table, self.offsets, weights)

    def col_gather(self, table: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(m, n): out[j] = Σ_{pairs (b, j)} weights · table[b], i.e. Sᵀ @ table."""
        perm, rows_c, offsets_c = self.csc()
        return _bag_sum(rows_c, table, offsets_c, weights[perm])

    def sampled_dot(self, G: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """(nnz,): ⟨G[b], W[j]⟩ for each pair, i.e. (G Wᵀ) sampled on the pattern."""
        crow = torch.cat([self.offsets, self.offsets.new_tensor([self.nnz])])
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the op is exact
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(crow, self.cols, self.vals, self.shape)
            return torch.sparse.sampled_addmm(pattern, G, W.T, beta=0.0).values()

    def values_of(self, grad: torch.Tensor | None) -> torch.Tensor:
        """A (B, m) gradient on the pairs: the decoder's sparse one directly, any other gathered."""
        if grad is None:
            return torch.zeros_like(self.vals)
        if grad.layout == torch.sparse_coo:
            if grad._nnz() == self.nnz and grad._indices().data_ptr() == self.indices.data_ptr():
                return grad._values()
            grad = grad.to_dense()
        return grad[self.rows, self.cols]


def attached(f: torch.Tensor) -> Active | None:
    """The Active of an encoder output f, if f is still unmodified since the encoder wrote it."""
    act = getattr(f, "_esosae_active", None)
    return act if act is not None and act.version == f._version else None


# -- encoder ---------------------------------------------------------------------------


class _Encode(torch.autograd.Function):
    """f = a·1[a > θ], a = (x − b_dec) W_enc + b_enc; row_l1 = Σ_j f; fire = Σ_b 1[a > θ].

    Backward, with grad_a = (grad_f + grad_row_l1)·1[a > θ]:
        grad_W_enc = (x − b_dec)ᵀ grad_a     grad_b_enc = Σ_b grad_a
        grad_x = grad_a W_encᵀ               grad_b_dec = −Σ_b grad_x = −W_enc Σ_b grad_a
    On active pairs when f is sparse; θ gets no gradient (as in the reference).
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, theta, box):
        with serial():
            xc = x - b_dec  # (B, d)
        a = xc @ W_enc  # (B, m)
        CORES.look()  # are other processes waiting for a core? (~15 µs)
        with wide():
            a.add_(b_enc)  # the reference's rounding (addmm would round differently)
            on = torch.gt(a, theta, out=torch.empty_like(a))  # (B, m) 1[a > θ] as 1.0 / 0.0
            f = a.mul_(on)  # in place: f = a·1[a > θ], the reference's product (NaN·0 is NaN there too)
            row_l1 = f.sum(-1, dtype=_acc_dtype(f))  # (B,) one row per thread: the same sums on any count
            fire = on.sum(0).to(torch.int32)  # (m,) exact: integer partial sums of at most B ones
        B, m = f.shape
        nnz = int(fire.sum(dtype=torch.int64))  # host sync: picks the path (free on the CPU)
        if nnz <= SPARSE_MAX_DENSITY * B * m:
            with wide():  # nonzero writes its indices in order on any thread count
                flat = _flat_nonzero(on.bool())  # (nnz,) row-major positions of the active pairs
            with serial():
                act = Active.of_flat(flat, f)
            ctx.save_for_backward(xc, W_enc)
        else:
            act = None
            ctx.save_for_backward(xc, W_enc, on)
        ctx.act = box[0] = act
        ctx.mark_non_differentiable(fire)
        return f, row_l1, fire

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_f, grad_l1, _grad_fire):
        need_x, need_W, need_b, need_bd = ctx.needs_input_grad[:4]
        xc, W_enc = ctx.saved_tensors[:2]
        act = ctx.act
        grad_x = grad_W = grad_b = grad_bd = None
        if act is not None:  # grad_a on the active pairs only
            with serial():
                ga = act.values_of(grad_f)  # (nnz,)
                if grad_l1 is not None:
                    ga = ga + grad_l1[act.rows].to(ga.dtype)
                if need_b or need_bd:
                    grad_b = torch.zeros(act.shape[1], dtype=ga.dtype).index_add_(0, act.cols, ga)  # (m,)
                if need_W or need_x:
                    act.csc()
            with wide():
                if need_W:  # a view: autograd copies it into W_enc's layout (none if W_enc is stored as W_encᵀ)
                    grad_W = act.col_gather(xc, ga).T  # (d, m)
                if need_x:
                    grad_x = act.row_gather(W_enc.T.contiguous(), ga)  # (B, d)
        else:
            on = ctx.saved_tensors[2]  # (B, m) 1[a > θ] as 1.0 / 0.0
            with wide():  # elementwise, and a sum over rows (one column per thread)
                if grad_f is None:
                    ga = torch.zeros_like(on)
                    if grad_l1 is not None:
                        ga += grad_l1.to(ga.dtype)[:, None]
                elif grad_l1 is not None:
                    ga = grad_f + grad_l1.to(grad_f.dtype)[:, None]  # one pass: no clone first
                else:
                    ga = grad_f.clone()
                ga.mul_(on)  # (B, m)
                if need_b or need_bd:
                    grad_b = ga.sum(0)
            if need_W:
                grad_W = xc.T @ ga  # (d, m)
            if need_x:
                grad_x = ga @ W_enc.T  # (B, d)
        if need_bd:
            with serial():
                grad_bd = -grad_x.sum(0) if grad_x is not None else -(W_enc @ grad_b)  # (d,)
        return grad_x, grad_W, grad_b if need_b else None, grad_bd, None, None


def encode(
    x: torch.Tensor,  # (B, d)
    W_enc: torch.Tensor,  # (d, m)
    b_enc: torch.Tensor,  # (m,)
    b_dec: torch.Tensor,  # (d,)
    theta: torch.Tensor,  # (m,) θ ≥ 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``reference.encode``: (f, row_l1, fire_count); f carries its firing pattern when sparse."""
    if not _fast(x, W_enc, b_enc, b_dec) or theta.device.type != "cpu" or bool((theta < 0).any()):
        return reference.encode(x, W_enc, b_enc, b_dec, theta)
    keep_freed_memory()
    box: list[Active | None] = [None]
    f, row_l1, fire = _Encode.apply(x, W_enc, b_enc, b_dec, theta.detach(), box)
    act = box[0]
    if act is not None:
        act.version = f._version
        f._esosae_active = act
    return f, row_l1, fire


def encode_learned(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
                   theta: torch.Tensor, eps: float, l0: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``reference.encode_learned``, dense: θ's gradient needs every pre-activation within ε/2
    of θ, including the ones below it that the sparse encoder drops."""
    return reference.encode_learned(x, W_enc, b_enc, b_dec, theta, eps, l0)


# -- decoder ---------------------------------------------------------------------------


class _Decode(torch.autograd.Function):
    """x̂ = f W_dec + bias, sq_err = ‖target − x̂‖² per row.

    Backward, with G = grad_x̂ − 2·grad_sq·(target − x̂):
        grad_f = G W_decᵀ      grad_W_dec = fᵀ G      grad_bias = Σ_b G
        grad_target = 2·grad_sq·(target − x̂)
    With an Active, f W_dec and fᵀ G run over its pairs, and grad_f (when ``partial``) is
    G W_decᵀ on the pairs only, as a sparse COO tensor (see the module doc).
    """

    @staticmethod
    def forward(ctx, f, W_dec, bias, target, act, partial):
        if act is not None:
            with wide():
                x_hat = act.row_gather(W_dec, act.vals)  # (B, d)
        else:
            x_hat = f @ W_dec  # (B, d)
        with serial():
            x_hat.add_(bias)  # rounded as the reference rounds it
            diff = target - x_hat  # (B, d)
            sq_err = diff.to(_acc_dtype(diff)).square().sum(-1)  # (B,)
        ctx.act, ctx.partial = act, partial
        ctx.save_for_backward(W_dec, diff, f if act is None else None)
        return x_hat, sq_err

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_xh, grad_sq):
        need_f, need_W, need_bias, need_t = ctx.needs_input_grad[:4]
        W_dec, diff, f = ctx.saved_tensors
        act = ctx.act
        with serial():
            G, grad_t = grad_xh, None  # G: (B, d) gradient of x̂ along all paths
            if grad_sq is not None:
                two_g_diff = diff * (2 * grad_sq.to(diff.dtype))[:, None]  # ∂L/∂target
                G = -two_g_diff if G is None else G - two_g_diff
                grad_t = two_g_diff if need_t else None
            if G is None:
                G = torch.zeros_like(diff)
            grad_bias = G.sum(0) if need_bias else None
        grad_f = grad_W = None
        if act is not None:
            with serial():
                if need_W:
                    act.csc()
            with wide():
                if need_f and ctx.partial:
                    grad_f = torch.sparse_coo_tensor(act.indices, act.sampled_dot(G, W_dec), act.shape,
                                                     is_coalesced=True)
                if need_W:
                    grad_W = act.col_gather(G, act.vals)  # (m, d)
        elif need_W:
            grad_W = f.T @ G  # (m, d)
        if need_f and grad_f is None:
            grad_f = G @ W_dec.T  # (B, m)
        return grad_f, grad_W, grad_bias, grad_t, None, None


def decode(
    f: torch.Tensor,  # (B, m)
    W_dec: torch.Tensor,  # (m, d)
    bias: torch.Tensor,  # (d,)
    target: torch.Tensor,  # (B, d)
) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.decode``: (x̂, per-row squared error), over f's active pairs when sparse."""
    if not _fast(f, W_dec, bias, target):
        return reference.decode(f, W_dec, bias, target)
    act = attached(f)
    # grad_f on the pairs suffices when f's grad goes straight to the encoder that made act
    # (a custom Function's grad_fn is its ctx, which holds act; no reference cycle).
    partial = act is not None and getattr(f.grad_fn, "act", None) is act
    if act is None:  # f from elsewhere (TopK, a leaf): its own pattern when sparse; dense grad_f
        with serial():
            nnz = int(torch.count_nonzero(f))  # host sync (free on the CPU)
            if nnz <= SPARSE_MAX_DENSITY * f.numel():
                act = Active.of_mask(f != 0, f.detach())
    return _Decode.apply(f, W_dec, bias, target, act, partial)


# -- orthogonality ---------------------------------------------------------------------


def _orth_blocks(m1: int, m2: int, tiles: torch.Tensor | None):
    """(r0, r1, cols) blocks that cover the pairs to sum: rows r0:r1 of W_dec1 against the
    columns ``cols`` of W_dec2 (None: all), ascending in rows and, within a block, in columns.
    All pairs: ORTH_ROWS-row bands. Tiles: one block per tile row, holding its selected
    tiles' columns (duplicates counted once, as the reference's mask counts them)."""
    if tiles is None:
        return [(r0, min(r0 + ORTH_ROWS, m1), None) for r0 in range(0, m1, ORTH_ROWS)]
    _, n2 = tile_grid(m1, m2)
    flat = torch.unique(tiles[:, 0].long() * n2 + tiles[:, 1].long())  # (n,) sorted, row-major
    ti, tj = flat // n2, flat % n2  # (n,) tile row and column
    row_of_block, tiles_per_block = torch.unique_consecutive(ti, return_counts=True)
    cols = (tj[:, None] * ORTH_TILE + torch.arange(ORTH_TILE)).view(-1)  # (n·TILE,) ascending per tile row
    inside = cols < m2  # a last partial tile column holds fewer than TILE columns
    cols_per_block = inside.view(-1, ORTH_TILE).sum(1).split(tiles_per_block.tolist())
    sizes = [int(c.sum()) for c in cols_per_block]
    return [(i * ORTH_TILE, min((i + 1) * ORTH_TILE, m1), c)
            for i, c in zip(row_of_block.tolist(), cols[inside].split(sizes))]


def _orth_batches(blocks, m2: int):
    """Consecutive blocks grouped so that a group's c holds at most ORTH_BATCH values (a
    block larger than that is a group of its own)."""
    batch, held = [], 0
    for block in blocks:
        r0, r1, cols = block
        n = (r1 - r0) * (m2 if cols is None else cols.numel())
        if batch and held + n > ORTH_BATCH:
            yield batch
            batch, held = [], 0
        batch.append(block)
        held += n
    if batch:
        yield batch


def _starts(sizes: list[int]) -> list[int]:
    """Offsets of consecutive pieces of the given sizes."""
    out, at = [], 0
    for n in sizes:
        out.append(at)
        at += n
    return out


def _orth_pairs(k: torch.Tensor, batch, widths: list[int], sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows of W_dec1, rows of W_dec2) of the positions k in a batch's concatenated c."""
    starts = torch.tensor(_starts(sizes))  # (n_blocks,)
    b = torch.searchsorted(starts, k, right=True) - 1  # (nnz,) block of each position
    local = k - starts[b]
    w = torch.tensor(widths)[b]
    i = torch.div(local, w, rounding_mode="floor")
    j = local - i * w  # column index within the block
    rows = torch.tensor([r0 for r0, _, _ in batch])[b] + i
    if batch[0][2] is None:  # all pairs: a block's columns are all of W_dec2
        return rows, j
    cols = torch.cat([c for _, _, c in batch])
    return rows, cols.index_select(0, torch.tensor(_starts(widths))[b] + j)


_helper: ThreadPoolExecutor | None = None


def _forget_helper() -> None:
    """In a forked child: the parent's helper thread does not exist there; start a new one."""
    global _helper
    _helper = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_helper)


def _one_thread() -> None:
    torch.set_num_threads(1)


def _tile_rows(W1: torch.Tensor, W2: torch.Tensor, pieces: list, two: bool) -> None:
    """out = W1[r0:r1] W2[cols]ᵀ for each (r0, r1, cols, out), every product on one intra-op
    thread; with ``two``, a helper thread takes tile rows too (as many as it gets to first:
    the rows differ in width). Each product is the same call on either thread, so the
    numbers do not depend on which thread made them. Torch releases the GIL inside both."""
    global _helper

    def run(piece) -> None:
        r0, r1, cols, out = piece
        W2b = W2.index_select(0, cols)  # (s, d): a row copy
        torch.mm(W1[r0:r1], W2b.T, out=out)  # (r, s)

    if not two or len(pieces) < 2:
        for piece in pieces:
            run(piece)
        return
    if _helper is None:
        _helper = ThreadPoolExecutor(1, thread_name_prefix="esosae-orth", initializer=_one_thread)
    todo = iter(pieces)
    lock = threading.Lock()

    def drain() -> None:
        with torch.no_grad():  # grad mode is per thread: the helper's is on
            while True:
                with lock:
                    piece = next(todo, None)
                if piece is None:
                    return
                run(piece)

    other = _helper.submit(drain)
    drain()
    other.result()


class _Orth(torch.autograd.Function):
    """L = scale · Σ max(0, |c_ij| − ρ)², c = W1 W2ᵀ, over all pairs or the selected tiles;
    with G = scale · 2·sign(c)·max(0, |c| − ρ):  ∂L/∂W1 = G W2,  ∂L/∂W2 = Gᵀ W1.

    The forward builds c block by block (never whole) and takes both gradients in the
    same pass (they are the size of the weights), so the backward only scales them by
    grad_out. G is zero inside the margin; while few pairs are past it (|c| > ρ is rare
    for near-orthogonal rows: ~2% at d = 576, ρ = 0.1) the pairs of all blocks are
    collected and the two gradient products run once over them (row/column gathers);
    a block with many such pairs (e.g. ρ = 0) uses its two dense GEMMs instead.
    """

    @staticmethod
    def forward(ctx, W1, W2, margin, tiles, want):
        m1, m2 = W1.shape[0], W2.shape[0]
        scale = 1.0 / (m1 * m2)
        if tiles is not None:
            n1, n2 = tile_grid(m1, m2)
            scale *= (n1 * n2) / tiles.shape[0]  # unbiased: the reference's count, duplicates included
        total = torch.zeros((), dtype=_acc_dtype(W1))
        g1 = g2 = None  # allocated by the first dense batch, or by the sparse products
        found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (rows, cols, ∂L/∂c)
        for batch in _orth_batches(_orth_blocks(m1, m2, tiles), m2):
            # c of every block of the batch, one after the other in one buffer, so that the
            # elementwise work is a few passes over the batch instead of a few per block
            widths = [m2 if cols is None else cols.numel() for _, _, cols in batch]
            sizes = [(r1 - r0) * w for (r0, r1, _), w in zip(batch, widths)]
            c = torch.empty(sum(sizes), dtype=W1.dtype)  # (Σ r·s,)
            pieces = [(r0, r1, cols, c[start:start + n].view(r1 - r0, w))
                      for (r0, r1, cols), w, start, n in zip(batch, widths, _starts(sizes), sizes)]
            if tiles is None:  # bands against all of W_dec2: GEMMs large enough for every thread
                for r0, r1, _, out in pieces:
                    torch.mm(W1[r0:r1], W2.T, out=out)  # (r, m2)
            else:  # a tile row's GEMM is too small to split: one thread each, two tile rows at once if free
                two = WIDE and CORES.free and torch.get_num_threads() > 1
                with serial():
                    _tile_rows(W1, W2, pieces, two)
            with wide():
                e = c.abs().sub_(margin).clamp_min_(0)  # max(0, |c| − ρ)
            with serial():
                total += torch.dot(e, e)  # a full reduction: its rounding depends on the threads
                if not want:
                    continue
                nnz = int(torch.count_nonzero(e))  # host sync (free on the CPU)
                if nnz <= ORTH_SPARSE_MAX_DENSITY * e.numel():
                    k = e.nonzero().view(-1)  # (nnz,) ascending: by block, row-major within each
                    vals = torch.copysign(e.index_select(0, k), c.index_select(0, k)).mul_(2 * scale)
                    found.append((*_orth_pairs(k, batch, widths, sizes), vals))
                    continue
                g = torch.copysign(e, c, out=e).mul_(2 * scale)  # (Σ r·s,) ∂L/∂c
            if g1 is None:
                g1, g2 = torch.zeros_like(W1), torch.zeros_like(W2)
            for (r0, r1, cols), w, start, n in zip(batch, widths, _starts(sizes), sizes):
                gb = g[start:start + n].view(r1 - r0, w)
                with serial():
                    W2b = W2 if cols is None else W2.index_select(0, cols)
                with serial() if cols is not None else contextlib.nullcontext():
                    d1, d2 = gb @ W2b, gb.T @ W1[r0:r1]
                with serial():
                    g1[r0:r1] += d1
                    if cols is None:
                        g2 += d2
                    else:
                        g2.index_add_(0, cols, d2)
        if found:
            with serial():  # blocks ascend in rows, so the concatenation is row-major
                rows, cols, vals = (torch.cat(t) for t in zip(*found))
                act = Active(torch.stack([rows, cols]), vals, (m1, m2))
                act.csc()
            with wide():
                s1, s2 = act.row_gather(W2, vals), act.col_gather(W1, vals)  # (m1, d), (m2, d)
                g1, g2 = (s1, s2) if g1 is None else (g1.add_(s1), g2.add_(s2))
        if want and g1 is None:  # no pair past the margin
            g1, g2 = torch.zeros_like(W1), torch.zeros_like(W2)
        ctx.save_for_backward(g1, g2)
        return total * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        g1, g2 = ctx.saved_tensors
        need1, need2 = ctx.needs_input_grad[:2]
        with wide():
            return (g1 * grad_out if need1 else None, g2 * grad_out if need2 else None, None, None, None)


def orth_penalty(
    W_dec1: torch.Tensor,  # (m1, d)
    W_dec2: torch.Tensor,  # (m2, d)
    margin: float,  # ρ
    tiles: torch.Tensor | None = None,  # (n_sel, 2) tile indices, or None for all
) -> torch.Tensor:
    """``reference.orth_penalty``, block by block (see ``_Orth``)."""
    if not _fast(W_dec1, W_dec2) or (tiles is not None and tiles.device.type != "cpu"):
        return reference.orth_penalty(W_dec1, W_dec2, margin, tiles)
    want = torch.is_grad_enabled() and (W_dec1.requires_grad or W_dec2.requires_grad)
    return _Orth.apply(W_dec1, W_dec2, float(margin), tiles, want)


__all__ = ["Active", "attached", "decode", "encode", "orth_penalty", "serial", "wide", "SPARSE_MAX_DENSITY"]
