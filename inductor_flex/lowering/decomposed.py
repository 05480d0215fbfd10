"""The query-chunked decomposition of attention, compiled by Inductor (the CPU path).

Used for the forward where Inductor generates C++ (``forward.py`` chooses) and for the backward
where the fused backward template refuses.

How it works
------------
1. A plain-torch function does the attention of ``reference.py`` a chunk of query rows at a
   time: ``q·kᵀ`` and ``P·v`` as ``bmm``; score_mod, mask_mod and the block-sparsity test
   evaluated over the chunk's ``[B, H, rows, S]`` grid by vmapping the operator's score/mask
   graphs (the backward vmaps the joint graph, as ``attention_backward_reference`` does);
   softmax in the working dtype (float32, float64 for float64 inputs).
2. It is traced with ``make_fx`` on fake tensors shaped like the IR inputs, with Inductor's
   decomposition table, into an FX graph of aten ops. The fakes live in the fake mode of the
   graph being compiled and carry its symbolic sizes (SymInts of its ShapeEnv), so a size the
   math reads becomes a ``sym_size`` node that lowers back to the graph's own expression.
   ``flex_lib.zeros_and_scatter`` (how the joint graph returns the gradient of an indexed
   captured tensor; under vmap it already covers every position of the chunk) is decomposed
   into ``zeros().index_put(accumulate=True)``.
3. That graph's nodes are lowered one by one into the graph Inductor is compiling
   (``_compat.inline_graph_module``), exactly as if they had been in the user's graph: the
   ``bmm``s become extern kernels and the score_mod / mask / softmax / joint-graph pointwise
   work and reductions are fused into generated C++ kernels. No eager call survives.

Chunks and memory
-----------------
A chunk holds a few ``[B, Hq, rows, S]`` tensors (scores, probabilities; the backward also dP
and dS), never the full ``[B, H, L, S]`` score matrix, and Inductor's buffer reuse gives each
chunk the buffers of the one before. The chunks are unrolled in the traced graph, so their
number is bounded by ``MAX_CHUNKS``; each chunk compiles its own C++ kernels (about a second a
kernel on 2 cores), so compile time grows with their number.

- Static sizes: ``rows = max(CHUNK_ELEMENTS // (B·Hq·S), ceil(L / MAX_CHUNKS), 1)`` rows a
  chunk (``chunk_ranges``), the last chunk shorter: one chunk holds at most
  ``max(CHUNK_ELEMENTS, B·Hq·S·ceil(L / MAX_CHUNKS))`` scores, 16 MiB of float32 until ``L·S``
  outgrows ``MAX_CHUNKS·CHUNK_ELEMENTS / (B·Hq)``, then 1/16 of the full matrix.
- Symbolic sizes (``torch.compile(dynamic=True)``, ``mark_dynamic``): the graph must serve
  every length without a recompile, so the number of chunks ``N`` is fixed at compile time and
  the chunk length is symbolic: ``rows = ceil(L / N)``. The query rows (and, in the backward,
  grad_out / grad_lse rows) are zero-padded to ``N·rows`` (fewer than N extra rows); padded rows
  are masked out entirely (their mods see ``q_idx = 0``, a valid index) and cut from the
  results. ``N`` (``chunk_count``) is the smallest power of two for which one chunk of the
  sizes at compile time holds at most ``CHUNK_ELEMENTS`` scores, at most ``MAX_CHUNKS``. Below
  ``MAX_CHUNKS`` the graph is guarded on ``B·Hq·L·S <= N·CHUNK_ELEMENTS``, which keeps every
  chunk it runs within the same 16 MiB: a call that outgrows it recompiles once into the next
  power of two (at most log2(MAX_CHUNKS) = 4 such recompiles as sizes grow, none as they
  shrink or vary below the bound); at ``MAX_CHUNKS`` there is no guard and a chunk is 1/16 of
  the full matrix, as with static sizes.

Everything else stays symbolic. Specialised are only the block sizes (Dynamo may pass them as
SymInts; they are guarded to their values, a new block size recompiles) and, by design, heads
and head dims (``api.py`` marks them static). Captured SymInts (Dynamo lifts them with
``dynamic=True``) are traced as symbolic inputs, not specialised. The remaining guards are
inequalities that hold for every practical size: the chunk length ``ceil(L / N)`` is at least 2
(tracing the chunk views asks), and Inductor's C++ code generator, not this module, guards
each symbolic reduction on being above or below 4096 elements (it switches to a cascaded sum
there): a softmax over ``S`` keys guards ``S <= 4096`` when compiled below, so crossing 4096 keys
recompiles once.

Gradients of captured tensors: the joint graph returns them through
``flex_lib.zeros_and_scatter``; under vmap that already sums over every position of the chunk.
It is decomposed into a reduction over the grid axes the index does not depend on followed by
an atomic scatter-add (``index_put(accumulate=True)``), and the chunks' results are added. A
captured tensor read whole (``score * w``) gets one gradient per position from the vmapped joint
graph, summed here; one read both whole and indexed is refused (NotImplementedError).
Where the graph reads a buffer gradient the lowering returns an IR node (zeros if the joint
graph has none), where it does not, None.

Mods are evaluated with vmap; an operation without a batching rule would make vmap unroll one
call per grid point into the trace, so that raises NotImplementedError naming the operation.
"""

import contextlib
import copy
import functools
import math
import operator
from dataclasses import dataclass

import sympy
import torch

from .._compat.hop import FakeTensorMode, TransformGetItemToIndex, detect_fake_mode, make_fx, zeros_and_scatter_op
from .._compat.inductor import (
    V,
    concrete_sizes,
    guard_true,
    inline_graph_module,
    ir,
    loaded_positions,
    select_decomp_table,
    symint_for,
    vmap_fallback_disabled,
)
from ..kernel_options import options_for
from ..mods import evaluate_mask_mod, evaluate_score_mod, joint_outputs_per_position, vmap_over_bhqkv
from ..reference import (
    FULL_KV_INDICES,
    FULL_KV_NUM_BLOCKS,
    KV_BLOCK_SIZE,
    KV_INDICES,
    KV_NUM_BLOCKS,
    MASK_MOD,
    Q_BLOCK_SIZE,
    softmax_rows,
    working_dtype,
)

# Score elements (B·Hq·rows·S) one chunk aims at: 4M, 16 MiB in float32.
CHUNK_ELEMENTS = 1 << 22
# Most chunks unrolled into one graph (compile time grows linearly with it).
MAX_CHUNKS = 16


# ---------------------------------------------------------------- sizes and chunking


def _is_symbolic(expr) -> bool:
    return isinstance(expr, sympy.Expr) and bool(expr.free_symbols)


def _static(expr) -> int:
    """An int size; a symbolic one is specialised (and guarded) to its current value. Used only
    for the block sizes, which are Python ints in every BlockMask."""
    if isinstance(expr, sympy.Expr):
        return int(V.graph.sizevars.guard_int(expr))
    return int(expr)


def chunk_ranges(batch: int, heads: int, q_len: int, kv_len: int, chunk_elements: int | None = None,
                 max_chunks: int | None = None) -> list:
    """Static sizes: [(start, stop), ...] query-row ranges: about ``chunk_elements`` scores a
    chunk (default ``CHUNK_ELEMENTS``), at most ``max_chunks`` chunks (default ``MAX_CHUNKS``);
    all chunks the same size but the last."""
    chunk_elements = CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    max_chunks = MAX_CHUNKS if max_chunks is None else max_chunks
    if q_len <= 0:
        return []
    rows = max(1, chunk_elements // max(1, batch * heads * kv_len))
    rows = min(max(rows, -(-q_len // max_chunks)), q_len)
    return [(lo, min(lo + rows, q_len)) for lo in range(0, q_len, rows)]


def chunk_count(batch: int, heads: int, q_len: int, kv_len: int, chunk_elements: int | None = None,
                max_chunks: int | None = None) -> int:
    """Symbolic sizes: the number of chunks for a graph compiled at these (example) sizes: the
    smallest power of two keeping one chunk within ``chunk_elements`` scores, at most
    ``max_chunks``."""
    chunk_elements = CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    max_chunks = MAX_CHUNKS if max_chunks is None else max_chunks
    count = 1
    while count < max_chunks and batch * heads * q_len * kv_len > count * chunk_elements:
        count *= 2
    return count


@dataclass(frozen=True)
class _Chunking:
    """How the query rows are cut: fixed ranges (static sizes) or ``count`` chunks of a
    symbolic ``ceil(L / count)`` rows over zero-padded rows (symbolic sizes)."""

    static_ranges: tuple | None
    count: int

    def ranges(self, q_len):
        """(chunk bounds, padded length) for the traced query length (an int or a SymInt)."""
        if self.static_ranges is not None:
            return list(self.static_ranges), q_len
        rows = (q_len + (self.count - 1)) // self.count
        return [(i * rows, (i + 1) * rows) for i in range(self.count)], rows * self.count


def _chunking(batch, heads: int, q_len, kv_len) -> _Chunking:
    """The chunking for these IR sizes; symbolic sizes add the one guard that bounds memory."""
    if not any(_is_symbolic(s) for s in (batch, q_len, kv_len)):
        return _Chunking(tuple(chunk_ranges(int(batch), heads, int(q_len), int(kv_len))), 0)
    hint_batch, hint_q, hint_kv = concrete_sizes([batch, q_len, kv_len])
    count = chunk_count(hint_batch, heads, hint_q, hint_kv)
    if count < MAX_CHUNKS:
        # True at the example sizes by construction; sizes that break it recompile into more
        # chunks instead of running chunks over the memory budget.
        total = sympy.sympify(batch) * heads * sympy.sympify(q_len) * sympy.sympify(kv_len)
        guard_true(sympy.Le(total, count * CHUNK_ELEMENTS))
    return _Chunking(None, count)


# ---------------------------------------------------------------- the traced math


_TENSOR = object()  # a buffer slot filled by a traced tensor input
_SYMBOL = object()  # a buffer slot filled by a traced symbolic int (a captured SymInt)


class _Problem:
    """What one call fixes at compile time: heads, block sizes, mods, chunking, broadcasting.
    Sizes that may be symbolic are read from the traced tensors instead."""

    def __init__(self, query, key, block_mask, scale, score_graph, buffer_slots, n_score_buffers, has_full):
        batch, q_heads, q_len, _ = query
        kv_batch, kv_heads, kv_len, _ = key
        self.q_heads, self.kv_heads = _static(q_heads), _static(kv_heads)
        self.group = self.q_heads // self.kv_heads
        self.q_block = block_mask[Q_BLOCK_SIZE]
        self.kv_block = block_mask[KV_BLOCK_SIZE]
        self.mask_mod = block_mask[MASK_MOD]
        self.score_mod = score_graph
        self.scale = scale
        self.buffer_slots = buffer_slots  # score_mod then mask_mod buffers: _TENSOR, _SYMBOL or a constant
        self.n_score_buffers = n_score_buffers
        self.has_full = has_full
        self.broadcast_kv = kv_batch_broadcast(batch, kv_batch)
        self.chunking = _chunking(batch, self.q_heads, q_len, kv_len)


def kv_batch_broadcast(batch, kv_batch) -> bool:
    """Keys/values of batch 1 under a larger (or symbolic) query batch. The API admits a key
    batch of 1 or the query's, and Dynamo keeps a size of 1 static: two symbolic batches (a
    recompile made them dynamic) are equal, not a broadcast."""
    known = V.graph.sizevars.statically_known_true
    return known(sympy.Eq(kv_batch, 1)) and not known(sympy.Eq(batch, 1))


def _block_map(num_blocks, indices, num_kv_blocks):
    """Dense bool [B|1, H|1, nQ, nKV] map of the listed blocks (out-of-place scatter)."""
    listed = torch.arange(indices.size(-1), device=indices.device) < num_blocks.unsqueeze(-1)
    target = torch.where(listed, indices.long(), num_kv_blocks)  # unlisted -> spill column
    dense = torch.zeros(*indices.shape[:-1], num_kv_blocks + 1, dtype=torch.bool, device=indices.device)
    dense = dense.scatter(-1, target, True)
    return dense[..., :num_kv_blocks]


class _Setup:
    """What every chunk shares: sizes, working-dtype K/V laid out for bmm, index ranges, block
    maps, the chunk bounds."""

    def __init__(self, p: _Problem, query, key, value, kv_positions, sparse, mask_mod_buffers):
        self.p = p
        self.compute = working_dtype(query.dtype)
        device = query.device
        self.batch, _, self.q_len, self.qk_dim = query.shape
        self.kv_len, self.v_dim = key.size(2), value.size(-1)
        kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices = sparse
        num_kv_blocks = kv_indices.size(-1)
        self.partial_map = _block_map(kv_num_blocks, kv_indices, num_kv_blocks)
        self.full_map = (
            _block_map(full_kv_num_blocks, full_kv_indices, num_kv_blocks) if p.has_full else None
        )
        # [B·Hkv, S, X]: a broadcast key/value batch is expanded once, not per chunk.
        rows = self.batch * p.kv_heads
        self.key = key.to(self.compute).expand(self.batch, -1, -1, -1).contiguous().view(rows, self.kv_len, self.qk_dim)
        self.value = value.to(self.compute).expand(self.batch, -1, -1, -1).contiguous().view(rows, self.kv_len, self.v_dim)
        self.b = torch.arange(self.batch, device=device)
        self.h = torch.arange(p.q_heads, device=device)
        self.kv_idx = kv_positions  # arange(S), loaded from memory: see _positions
        self.kv_blocks = self.kv_idx // p.kv_block
        self.mask_mod_buffers = mask_mod_buffers
        self.ranges, self.padded_len = p.chunking.ranges(self.q_len)
        self.pads = p.chunking.static_ranges is None

    def pad_rows(self, t):
        """[B, H, L, ...] zero-padded to the chunks' padded length (symbolic chunking only)."""
        if t is None or not self.pads:
            return t
        trailing = [0, 0] * (t.dim() - 3)
        return torch.nn.functional.pad(t, trailing + [0, self.padded_len - self.q_len])

    def unpad_rows(self, t):
        """The first L rows of a padded [B, H, padded, ...] result, as a new contiguous tensor.
        (Gathered, not sliced: making a slice contiguous asks whether it already is, a guard on
        ``padded == L`` that would pin L's divisibility by the chunk count.)"""
        if not self.pads:
            return t
        return t.index_select(2, torch.arange(self.q_len, device=t.device))

    def q_rows(self, query, start, stop):
        """Query rows [start, stop) as [B·Hkv, G·rows, E] in the working dtype."""
        p = self.p
        rows = query[:, :, start:stop].to(self.compute).contiguous()
        return rows.view(self.batch * p.kv_heads, p.group * (stop - start), self.qk_dim)

    def grid(self, t, start, stop):
        """[B·Hkv, G·rows, X] -> [B, Hq, rows, X]."""
        return t.view(self.batch, self.p.q_heads, stop - start, t.size(-1))

    def flat(self, t):
        """[B, Hq, rows, X] -> [B·Hkv, G·rows, X]."""
        p = self.p
        return t.contiguous().view(self.batch * p.kv_heads, p.group * t.size(2), t.size(-1))

    def positions(self, start, stop):
        """(q_idx for the mods, rows that exist or None): padded rows read row 0."""
        positions = torch.arange(start, stop, device=self.b.device)
        if not self.pads:
            return positions, None
        valid = positions < self.q_len
        return torch.where(valid, positions, 0), valid

    def allowed(self, q_idx, valid):
        """Bool [B, Hq, rows, S]: block listed as full, or partial and mask_mod true; never a
        padded row."""
        q_blocks = q_idx // self.p.q_block
        in_partial = self.partial_map[:, :, q_blocks][:, :, :, self.kv_blocks]
        mask = evaluate_mask_mod(self.p.mask_mod, self.b, self.h, q_idx, self.kv_idx, self.mask_mod_buffers)
        allowed = in_partial & mask
        if self.full_map is not None:
            allowed = allowed | self.full_map[:, :, q_blocks][:, :, :, self.kv_blocks]
        if valid is not None:
            allowed = allowed & valid[:, None]
        return allowed

    def scores(self, q_rows, start, stop, q_idx, score_mod_buffers):
        """(raw = scale·q·kᵀ, modified = score_mod(raw)), both [B, Hq, rows, S]."""
        raw = self.grid(torch.bmm(q_rows, self.key.transpose(1, 2)), start, stop) * self.p.scale
        modified = evaluate_score_mod(self.p.score_mod, raw, self.b, self.h, q_idx, self.kv_idx, score_mod_buffers)
        return raw, modified.to(self.compute)


def _cat(chunks):
    """The chunks' rows back in one tensor (dim 2); no copy for a single chunk."""
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=2)


def _split(p: _Problem, tensors):
    """Flat traced inputs -> (sparse block tensors, score_mod buffers, mask_mod buffers);
    captured SymInts (traced inputs) and constants are put back in their places."""
    tensors = list(tensors)
    if p.has_full:
        sparse, tensors = tensors[:4], tensors[4:]
    else:
        sparse, tensors = tensors[:2] + [None, None], tensors[2:]
    tensors = iter(tensors)
    buffers = tuple(next(tensors) if c is _TENSOR or c is _SYMBOL else c for c in p.buffer_slots)
    return sparse, buffers[: p.n_score_buffers], buffers[p.n_score_buffers:]


def _forward(p: _Problem, query, key, value, kv_positions, *tensors):
    sparse, score_mod_buffers, mask_mod_buffers = _split(p, tensors)
    s = _Setup(p, query, key, value, kv_positions, sparse, mask_mod_buffers)
    padded_query = s.pad_rows(query)
    outs, lses, maxes = [], [], []
    for start, stop in s.ranges:
        q_idx, valid = s.positions(start, stop)
        _, modified = s.scores(s.q_rows(padded_query, start, stop), start, stop, q_idx, score_mod_buffers)
        masked = torch.where(s.allowed(q_idx, valid), modified, -math.inf)
        probs, lse, row_max = softmax_rows(masked)
        outs.append(s.grid(torch.bmm(s.flat(probs), s.value), start, stop))
        lses.append(lse)
        maxes.append(row_max)
    return s.unpad_rows(_cat(outs)).to(query.dtype), s.unpad_rows(_cat(lses)), s.unpad_rows(_cat(maxes))


def _backward(p: _Problem, has_grad_out, has_grad_lse, query, key, value, kv_positions, *tensors):
    grad_out = grad_lse = None
    tensors = list(tensors)
    if has_grad_out:
        grad_out = tensors.pop(0)
    if has_grad_lse:
        grad_lse = tensors.pop(0)
    sparse, score_mod_buffers, mask_mod_buffers = _split(p, tensors)
    s = _Setup(p, query, key, value, kv_positions, sparse, mask_mod_buffers)
    compute = s.compute
    padded_query, grad_out, grad_lse = s.pad_rows(query), s.pad_rows(grad_out), s.pad_rows(grad_lse)
    # An output of the joint graph is batched over the grid (out_dim 0) when it depends on a
    # grid input other than through zeros_and_scatter (which sums over the grid itself): the
    # score's gradient, or that of a captured tensor read without indexing, summed below.
    batched = joint_outputs_per_position(p.joint_graph, n_grid_inputs=6)
    joint = vmap_over_bhqkv(
        p.joint_graph,
        prefix=(0,),
        suffix=(0,) + (None,) * p.n_score_buffers,
        out_dims=[0 if b else None for b in batched],
    )
    grad_key = grad_value = None
    grad_queries = []
    buffer_grads = [None] * p.n_score_buffers
    for start, stop in s.ranges:
        q_idx, valid = s.positions(start, stop)
        q_rows = s.q_rows(padded_query, start, stop)
        raw, modified = s.scores(q_rows, start, stop, q_idx, score_mod_buffers)
        allowed = s.allowed(q_idx, valid)
        probs, _, _ = softmax_rows(torch.where(allowed, modified, -math.inf))

        d_modified = None
        if grad_out is not None:
            d_out = s.flat(grad_out[:, :, start:stop].to(compute))
            probs_flat = s.flat(probs)
            dv = torch.bmm(probs_flat.transpose(1, 2), d_out)
            grad_value = dv if grad_value is None else grad_value + dv
            d_probs = s.grid(torch.bmm(d_out, s.value.transpose(1, 2)), start, stop)
            # Σ P·dP: the exact softmax backward, as the reference (see there).
            delta = (probs * d_probs).sum(-1, keepdim=True)
            d_modified = probs * (d_probs - delta)
        if grad_lse is not None:
            d_lse = probs * grad_lse[:, :, start:stop, None].to(compute)
            d_modified = d_lse if d_modified is None else d_modified + d_lse
        if d_modified is None:
            d_modified = torch.zeros_like(probs)

        with TransformGetItemToIndex():
            d_raw, _, _, _, _, *chunk_buffer_grads = joint(
                raw, s.b, s.h, q_idx, s.kv_idx, d_modified, *score_mod_buffers
            )
        for i, g in enumerate(chunk_buffer_grads):
            if g is not None:
                if batched[5 + i]:  # one gradient per grid position: sum them
                    g = g.sum(dim=(0, 1, 2, 3), dtype=torch.promote_types(g.dtype, torch.float32))
                buffer_grads[i] = g if buffer_grads[i] is None else buffer_grads[i] + g
        if d_raw is None:  # score_mod ignores the score: q and k get no gradient through it
            d_raw = torch.zeros_like(raw)
        d_raw = s.flat(torch.where(allowed, d_raw.to(compute), 0.0) * p.scale)
        grad_queries.append(s.grid(torch.bmm(d_raw, s.key), start, stop))
        dk = torch.bmm(d_raw.transpose(1, 2), q_rows)
        grad_key = dk if grad_key is None else grad_key + dk

    def kv_grad(acc, like, dim):
        if acc is None:
            acc = torch.zeros(s.batch * p.kv_heads, s.kv_len, dim, dtype=compute, device=query.device)
        acc = acc.view(s.batch, p.kv_heads, s.kv_len, dim)
        if p.broadcast_kv:  # keys/values broadcast over the batch: grads summed over it
            acc = acc.sum(0, keepdim=True)
        return acc.to(like.dtype)

    grad_query = s.unpad_rows(_cat(grad_queries)).to(query.dtype)
    grad_key = kv_grad(grad_key, key, s.qk_dim)
    grad_value = kv_grad(grad_value, value, s.v_dim)
    if p.expected_buffer_grads is not None:
        # A gradient the graph reads is never None (zeros for a buffer that does not reach
        # the score); one it does not read is not computed.
        buffer_grads = [
            (torch.zeros_like(buf, dtype=working_dtype(buf.dtype)) if g is None else g) if expected else None
            for g, buf, expected in zip(buffer_grads, score_mod_buffers, p.expected_buffer_grads)
        ]
    buffer_grads = [
        None if g is None else g.to(buf.dtype).contiguous() for g, buf in zip(buffer_grads, score_mod_buffers)
    ]
    return grad_query, grad_key, grad_value, *buffer_grads


# ---------------------------------------------------------------- tracing and inlining


def _zeros_and_scatter(shape, indices, values, deterministic=False):
    """``flex_lib.zeros_and_scatter`` (a captured tensor's gradient) as aten ops Inductor
    compiles: a scatter-add into zeros, accumulated in at least float32.

    Under vmap, an index that does not depend on some grid axis arrives expanded along it
    (stride 0): the values are summed along every such axis first, a vectorised reduction, so
    that e.g. ``slopes[h]`` scatters H sums instead of B·H·L·S atomic adds."""
    acc = torch.promote_types(values.dtype, torch.float32)
    values = values.to(acc)
    indices = [torch.broadcast_to(i, values.shape) for i in indices]
    invariant = [
        d for d in range(values.dim())
        if values.size(d) > 1 and all(i.stride(d) == 0 for i in indices)
    ]
    if invariant:
        values = values.sum(invariant, keepdim=True)
        first = tuple(slice(0, 1) if d in invariant else slice(None) for d in range(values.dim()))
        indices = [i[first] for i in indices]
    if len(indices) == len(shape) and any(isinstance(size, int) and size == 1 for size in shape):
        # An index into a dim of size 1 can only be 0: drop it. Inductor's C++ backend cannot
        # compile a scatter-add whose whole index is constant (a one-element table).
        kept = [d for d, size in enumerate(shape) if not (isinstance(size, int) and size == 1)]
        if not kept:
            return values.sum().reshape(shape)
        inner = _zeros_and_scatter([shape[d] for d in kept], [indices[d] for d in kept], values, deterministic)
        return inner.reshape(shape)
    zeros = torch.zeros(shape, dtype=acc, device=values.device)
    if deterministic and len(indices) == zeros.dim() and all(i is not None for i in indices):
        # One flat index per value (negative indices wrap, as in indexing).
        flat_index = sum(torch.remainder(i, size).expand(values.shape) * stride
                         for i, size, stride in zip(indices, zeros.shape, zeros.stride()))
        flat = _deterministic_scatter_add()(zeros.reshape(-1), flat_index.reshape(-1), values.reshape(-1))
        return flat.view(shape)
    return torch.index_put(zeros, indices, values, accumulate=True)


@functools.cache
def _decompositions(deterministic: bool = False):
    table = dict(select_decomp_table())
    table[zeros_and_scatter_op()] = functools.partial(
        _zeros_and_scatter, deterministic=deterministic)
    return table


@functools.cache
def _deterministic_scatter_add():
    """A scatter-add into zeros whose result does not depend on thread timing: torch's own
    index_put run under deterministic algorithms (serial on CPU, sorted on CUDA). Compiled,
    a scatter-add with repeated indices becomes atomics (CPU and GPU) whose order varies, so
    DETERMINISTIC keeps this as an opaque call. Registered on first use."""

    @torch.library.custom_op("inductor_flex::deterministic_scatter_add", mutates_args=())
    def scatter_add(zeros: torch.Tensor, flat_index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        with deterministic_algorithms(True):
            return zeros.index_put((flat_index,), values, accumulate=True)

    @scatter_add.register_fake
    def _(zeros, flat_index, values):
        return torch.empty_like(zeros)

    return scatter_add


def _symbolic_size(expr):
    """An IR size as the traced code sees it: an int, or a SymInt of the graph's ShapeEnv."""
    if _is_symbolic(expr):
        return symint_for(expr)
    return int(expr)


def _fake_input(node, mode):
    """A contiguous fake tensor with the IR node's (possibly symbolic) size, dtype and device;
    a captured symbolic int (a sympy expression) becomes a SymInt."""
    if isinstance(node, sympy.Expr):
        return _symbolic_size(node)
    with mode:
        return torch.empty([_symbolic_size(s) for s in node.get_size()], dtype=node.get_dtype(),
                           device=node.get_device())


def _trace_mode():
    """The fake mode of the graph being compiled: its ShapeEnv owns the graph's size symbols."""
    mode = detect_fake_mode()
    if mode is None or mode.shape_env is not V.graph.sizevars.shape_env:
        mode = FakeTensorMode(shape_env=V.graph.sizevars.shape_env, allow_non_fake_inputs=False)
    return mode


def _trace_and_inline(fn, ir_inputs, deterministic=False):
    """Trace ``fn`` over fakes of ``ir_inputs`` into aten ops and lower them into V.graph."""
    mode = _trace_mode()
    fakes = [_fake_input(node, mode) for node in ir_inputs]
    try:
        with vmap_fallback_disabled():
            graph_module = make_fx(fn, decomposition_table=_decompositions(deterministic), tracing_mode="fake")(*fakes)
    except RuntimeError as error:
        if "vmap fallback" not in str(error):
            raise
        raise NotImplementedError(
            f"inductor_flex: a score_mod/mask_mod operation has no vmap batching rule ({error}); the "
            "query-chunked decomposition evaluates the mods with vmap and cannot compile it. Rewrite "
            "the mod with other operations."
        ) from error
    return inline_graph_module(graph_module, ir_inputs)


def _graph_module(subgraph):
    """The mod's FX graph, made fit for vmap under fake tracing. A copy is rewritten: the
    subgraph is shared with the rest of the graph.

    - ``prims.convert_element_type`` (which the graphs hold after AOT decomposition) has no
      batching rule, and vmap's per-element fallback would unroll one op per grid point into
      the trace; it becomes ``aten._to_copy``.
    - ``aten.index`` with a constant 0-d index (``bias[h, 0]`` gives ``index(bias, [h,
      full([], 0)])``) trips an internal assert of functorch under fake tracing (torch 2.13);
      the constant becomes an ``aten.select`` first: ``index(select(bias, 1, 0), [h])``.
    """
    graph_module = subgraph.graph_module if isinstance(subgraph, ir.Subgraph) else subgraph
    convert = torch.ops.prims.convert_element_type.default
    if not any(_needs_rewrite(node, convert) for node in graph_module.graph.nodes):
        return graph_module
    graph = copy.deepcopy(graph_module.graph)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is convert:
            source, dtype = node.args
            node.target = torch.ops.aten._to_copy.default
            node.args = (source,)
            node.kwargs = {"dtype": dtype}
        elif _constant_index_positions(node):
            _select_constant_indices(graph, node)
    graph.eliminate_dead_code()
    return torch.fx.GraphModule(graph_module, graph)


def _needs_rewrite(node, convert) -> bool:
    return (node.op == "call_function" and node.target is convert) or bool(_constant_index_positions(node))


def _constant_int(node):
    """The value of a node that makes a constant 0-d integer tensor, else None."""
    if (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is torch.ops.aten.full.default
            and list(node.args[0]) == [] and isinstance(node.args[1], int) and not isinstance(node.args[1], bool)):
        return node.args[1]
    return None


def _constant_index_positions(node) -> list:
    """Positions of constant 0-d indices in an ``aten.index`` whose indices are all tensors."""
    if node.op != "call_function" or node.target is not torch.ops.aten.index.Tensor:
        return []
    indices = node.args[1]
    if any(index is None for index in indices):
        return []
    return [dim for dim, index in enumerate(indices) if _constant_int(index) is not None]


def _select_constant_indices(graph, node):
    source, indices = node.args
    constant_dims = _constant_index_positions(node)
    with graph.inserting_before(node):
        selected = source
        for dim in reversed(constant_dims):  # from the last, so earlier dims keep their position
            selected = graph.call_function(torch.ops.aten.select.int, (selected, dim, _constant_int(indices[dim])))
        rest = [index for dim, index in enumerate(indices) if dim not in constant_dims]
        replacement = graph.call_function(torch.ops.aten.index.Tensor, (selected, rest)) if rest else selected
    node.replace_all_uses_with(replacement)
    graph.erase_node(node)


def _is_tensor(x):
    return isinstance(x, ir.IRNode)


def _problem(query, key, value, score_graph, block_mask, scale, score_mod_buffers, mask_mod_buffers):
    has_full = block_mask[FULL_KV_NUM_BLOCKS] is not None
    static_mask = list(block_mask)
    static_mask[Q_BLOCK_SIZE] = _static(block_mask[Q_BLOCK_SIZE])
    static_mask[KV_BLOCK_SIZE] = _static(block_mask[KV_BLOCK_SIZE])
    static_mask[MASK_MOD] = _graph_module(block_mask[MASK_MOD])
    slots = []
    for b in (*score_mod_buffers, *mask_mod_buffers):
        if _is_tensor(b):
            slots.append(_TENSOR)
        elif _is_symbolic(b):
            slots.append(_SYMBOL)
        elif isinstance(b, sympy.Expr):
            slots.append(int(b) if b.is_integer else float(b))
        elif isinstance(b, (int, float, bool)):
            slots.append(b)
        else:
            raise NotImplementedError(f"inductor_flex: cannot lower a captured value of type {type(b).__name__}")
    return _Problem(query.get_size(), key.get_size(), static_mask, float(scale), _graph_module(score_graph),
                    slots, len(score_mod_buffers), has_full)


def _positions(length, device):
    """``arange(length)`` (int64) as a realized buffer the kernels load.

    The key positions reach the traced math as data, not as an ``arange`` Inductor would fold
    into its index expressions: a pointwise kernel indexed by ``kv_idx // c`` (the block
    lookup, or a mod's own ``kv_idx // 64``) for an integer c > 8 triggers the C++ backend's
    loop split (``CppScheduling.try_loop_split``, torch 2.11 to 2.13), which cuts the key loop
    into ``(S // c, c)`` without checking that c divides S and silently skips the remainder
    (all of it when S < c). Loaded positions leave no such division in any index expression.
    """
    return loaded_positions(length, device)


def _tensor_inputs(block_mask, score_mod_buffers, mask_mod_buffers):
    """The traced inputs after q, k, v (and grads): block lists, captured tensors and captured
    symbolic ints, in ``_split``'s order."""
    sparse = [block_mask[KV_NUM_BLOCKS], block_mask[KV_INDICES]]
    if block_mask[FULL_KV_NUM_BLOCKS] is not None:
        sparse += [block_mask[FULL_KV_NUM_BLOCKS], block_mask[FULL_KV_INDICES]]
    captured = [b for b in (*score_mod_buffers, *mask_mod_buffers) if _is_tensor(b) or _is_symbolic(b)]
    return [*sparse, *captured]


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """torch's deterministic-algorithms switch on for what is lowered inside (a no-op if off)."""
    if not enabled or torch.are_deterministic_algorithms_enabled():
        yield
        return
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


def lower_forward_decomposed(query, key, value, score_graph, block_mask, scale, kernel_options,
                             score_mod_buffers, mask_mod_buffers):
    """IR ``(out, lse, max_scores)`` of the forward operator, as the chunked decomposition."""
    p = _problem(query, key, value, score_graph, block_mask, scale, score_mod_buffers, mask_mod_buffers)
    inputs = [query, key, value, _positions(key.get_size()[2], query.get_device()),
              *_tensor_inputs(block_mask, score_mod_buffers, mask_mod_buffers)]
    out, lse, row_max = _trace_and_inline(functools.partial(_forward, p), inputs)
    return out, lse, row_max


def lower_backward_decomposed(query, key, value, out, lse, grad_out, grad_lse, score_graph, joint_graph,
                              block_mask, scale, kernel_options, score_mod_buffers, mask_mod_buffers):
    """IR ``(grad_query, grad_key, grad_value, buffer_grads)`` of the backward operator.

    ``buffer_grads`` has one entry per score_mod buffer: an IR node for each gradient the graph
    reads (``node[3][i]``, zeros if the joint graph gives None for it), else None.
    """
    p = _problem(query, key, value, score_graph, block_mask, scale, score_mod_buffers, mask_mod_buffers)
    p.joint_graph = _graph_module(joint_graph)
    p.expected_buffer_grads = _expected_buffer_grads(len(score_mod_buffers))
    grads = [g for g in (grad_out, grad_lse) if g is not None]
    inputs = [query, key, value, _positions(key.get_size()[2], query.get_device()), *grads,
              *_tensor_inputs(block_mask, score_mod_buffers, mask_mod_buffers)]
    fn = functools.partial(_backward, p, grad_out is not None, grad_lse is not None)
    deterministic = bool(options_for(kernel_options, "bwd").get("DETERMINISTIC", False))
    grad_query, grad_key, grad_value, *buffer_grads = _trace_and_inline(fn, inputs, deterministic)
    return grad_query, grad_key, grad_value, tuple(buffer_grads)


def _expected_buffer_grads(n_score_buffers):
    """Which buffer gradients the graph reads (``node[3][i]``), from the users of the node being
    lowered; None when unknown. (The node's fake value is no guide: in the backward graph the
    buffers no longer require grad, so it says None for all of them.)"""
    node = V.graph.current_node
    if node is None:
        return None
    used = [False] * n_score_buffers
    for user in node.users:
        if user.op != "call_function" or user.target is not operator.getitem:
            return None
        if user.args[1] != 3:
            continue
        for inner in user.users:
            if inner.op != "call_function" or inner.target is not operator.getitem:
                return None
            used[inner.args[1]] = True
    return used
