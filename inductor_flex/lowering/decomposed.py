"""The query-chunked decomposition of attention, compiled by Inductor (the CPU path).

Used for the forward where Inductor generates C++ (``forward.py`` chooses) and for the backward
on every device until the fused backward template lands.

How it works
------------
1. A plain-torch function does the attention of ``reference.py`` a chunk of query rows at a
   time: ``q·kᵀ`` and ``P·v`` as ``bmm``; score_mod, mask_mod and the block-sparsity test
   evaluated over the chunk's ``[B, H, rows, S]`` grid by vmapping the operator's score/mask
   graphs (the backward vmaps the joint graph, as ``attention_backward_reference`` does);
   softmax in the working dtype (float32, float64 for float64 inputs).
2. It is traced with ``make_fx`` on fake tensors shaped like the IR inputs, with Inductor's
   decomposition table, into an FX graph of aten ops. ``flex_lib.zeros_and_scatter`` (how the
   joint graph returns the gradient of an indexed captured tensor; under vmap it already covers
   every position of the chunk) is decomposed into ``zeros().index_put(accumulate=True)``.
3. That graph's nodes are lowered one by one into the graph Inductor is compiling
   (``_compat.inline_graph_module``), exactly as if they had been in the user's graph: the
   ``bmm``s become extern kernels and the score_mod / mask / softmax / joint-graph pointwise
   work and reductions are fused into generated C++ kernels. No eager call survives.

Memory: a chunk holds a few ``[B, Hq, rows, S]`` tensors (scores, probabilities; the backward
also dP and dS), never the full ``[B, H, L, S]`` score matrix, and Inductor's buffer reuse gives
each chunk the buffers of the one before. The chunks are unrolled in the traced graph, so their
number is bounded: ``rows = max(CHUNK_ELEMENTS // (B·Hq·S), ceil(L / MAX_CHUNKS), 1)`` rows a
chunk, so one chunk holds at most ``max(CHUNK_ELEMENTS, B·Hq·S·ceil(L / MAX_CHUNKS))`` scores:
16 MiB of float32 until ``L·S`` outgrows ``MAX_CHUNKS·CHUNK_ELEMENTS / (B·Hq)``, then 1/16 of
the full matrix. Each chunk compiles its own C++ kernels (the chunk's first row is a constant
in them), so compile time grows with the number of chunks: about a second a kernel, one
kernel a chunk forward and one backward (measured on 2 cores).

Gradients of captured tensors: the joint graph returns them through
``flex_lib.zeros_and_scatter``; under vmap that already sums over every position of the chunk.
It is decomposed into a reduction over the grid axes the index does not depend on followed by
an atomic scatter-add (``index_put(accumulate=True)``), and the chunks' results are added. A
captured tensor read whole (``score * w``) gets one gradient per position from the vmapped joint
graph, summed here; one read both whole and indexed is refused (NotImplementedError).
Where the graph reads a buffer gradient the lowering returns an IR node (zeros if the joint
graph has none), where it does not, None.

Shapes: every size the decomposition needs is specialised with
``V.graph.sizevars.guard_int`` (the chunk ranges are Python ints in the traced graph), so
under ``torch.compile(dynamic=True)`` the compiled graph is guarded on these sizes and a new
size recompiles; data (block masks, captured tensors) stays dynamic. Captured SymInts are
specialised the same way.

Mods are evaluated with vmap; an operation without a batching rule would make vmap unroll one
call per grid point into the trace, so that raises NotImplementedError naming the operation.
"""

import copy
import functools
import math
import operator

import sympy
import torch

from .._compat.hop import FakeTensorMode, TransformGetItemToIndex, detect_fake_mode, make_fx
from .._compat.inductor import V, inline_graph_module, ir, select_decomp_table, vmap_fallback_disabled
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


def _static(expr) -> int:
    """An int size; a symbolic one is specialised (and guarded) to its current value."""
    if isinstance(expr, sympy.Expr):
        return int(V.graph.sizevars.guard_int(expr))
    return int(expr)


def chunk_ranges(batch: int, heads: int, q_len: int, kv_len: int, chunk_elements: int | None = None,
                 max_chunks: int | None = None) -> list:
    """[(start, stop), ...] query-row ranges: about ``chunk_elements`` scores a chunk
    (default ``CHUNK_ELEMENTS``), at most ``max_chunks`` chunks (default ``MAX_CHUNKS``); all
    chunks the same size but the last."""
    chunk_elements = CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    max_chunks = MAX_CHUNKS if max_chunks is None else max_chunks
    if q_len <= 0:
        return []
    rows = max(1, chunk_elements // max(1, batch * heads * kv_len))
    rows = min(max(rows, -(-q_len // max_chunks)), q_len)
    return [(lo, min(lo + rows, q_len)) for lo in range(0, q_len, rows)]


# ---------------------------------------------------------------- the traced math


_TENSOR = object()  # a buffer slot filled by a traced tensor input


class _Problem:
    """Static description of one call: sizes, block sizes, mods, chunking."""

    def __init__(self, query, key, value, block_mask, scale, score_graph, buffer_slots,
                 n_score_buffers, has_full):
        self.batch, self.q_heads, self.q_len, self.qk_dim = query
        self.kv_batch, self.kv_heads, self.kv_len, _ = key
        self.v_dim = value[-1]
        self.group = self.q_heads // self.kv_heads
        self.q_block = block_mask[Q_BLOCK_SIZE]
        self.kv_block = block_mask[KV_BLOCK_SIZE]
        self.mask_mod = block_mask[MASK_MOD]
        self.score_mod = score_graph
        self.scale = scale
        self.buffer_slots = buffer_slots  # score_mod then mask_mod buffers: _TENSOR or an int
        self.n_score_buffers = n_score_buffers
        self.has_full = has_full
        self.ranges = chunk_ranges(self.batch, self.q_heads, self.q_len, self.kv_len)


def _block_map(num_blocks, indices, num_kv_blocks):
    """Dense bool [B|1, H|1, nQ, nKV] map of the listed blocks (out-of-place scatter)."""
    listed = torch.arange(indices.size(-1), device=indices.device) < num_blocks.unsqueeze(-1)
    target = torch.where(listed, indices.long(), num_kv_blocks)  # unlisted -> spill column
    dense = torch.zeros(*indices.shape[:-1], num_kv_blocks + 1, dtype=torch.bool, device=indices.device)
    dense = dense.scatter(-1, target, True)
    return dense[..., :num_kv_blocks]


class _Setup:
    """What every chunk shares: working-dtype K/V laid out for bmm, index ranges, block maps."""

    def __init__(self, p: _Problem, query, key, value, sparse, mask_mod_buffers):
        self.p = p
        self.compute = working_dtype(query.dtype)
        device = query.device
        kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices = sparse
        num_kv_blocks = kv_indices.size(-1)
        self.partial_map = _block_map(kv_num_blocks, kv_indices, num_kv_blocks)
        self.full_map = (
            _block_map(full_kv_num_blocks, full_kv_indices, num_kv_blocks) if p.has_full else None
        )
        # [B·Hkv, S, X]: a broadcast key/value batch is expanded once, not per chunk.
        rows = p.batch * p.kv_heads
        self.key = key.to(self.compute).expand(p.batch, -1, -1, -1).reshape(rows, p.kv_len, p.qk_dim)
        self.value = value.to(self.compute).expand(p.batch, -1, -1, -1).reshape(rows, p.kv_len, p.v_dim)
        self.b = torch.arange(p.batch, device=device)
        self.h = torch.arange(p.q_heads, device=device)
        self.kv_idx = torch.arange(p.kv_len, device=device)
        self.kv_blocks = self.kv_idx // p.kv_block
        self.mask_mod_buffers = mask_mod_buffers

    def q_rows(self, query, start, stop):
        """Query rows [start, stop) as [B·Hkv, G·rows, E] in the working dtype."""
        p = self.p
        return query[:, :, start:stop].to(self.compute).reshape(p.batch * p.kv_heads, p.group * (stop - start), p.qk_dim)

    def grid(self, t, start, stop):
        """[B·Hkv, G·rows, X] -> [B, Hq, rows, X]."""
        return t.view(self.p.batch, self.p.q_heads, stop - start, t.size(-1))

    def flat(self, t):
        """[B, Hq, rows, X] -> [B·Hkv, G·rows, X]."""
        p = self.p
        return t.reshape(p.batch * p.kv_heads, p.group * t.size(2), t.size(-1))

    def allowed(self, q_idx):
        """Bool [B, Hq, rows, S]: block listed as full, or partial and mask_mod true."""
        q_blocks = q_idx // self.p.q_block
        in_partial = self.partial_map[:, :, q_blocks][:, :, :, self.kv_blocks]
        mask = evaluate_mask_mod(self.p.mask_mod, self.b, self.h, q_idx, self.kv_idx, self.mask_mod_buffers)
        allowed = in_partial & mask
        if self.full_map is not None:
            allowed = allowed | self.full_map[:, :, q_blocks][:, :, :, self.kv_blocks]
        return allowed

    def scores(self, q_rows, start, stop, score_mod_buffers):
        """(raw = scale·q·kᵀ, modified = score_mod(raw)), both [B, Hq, rows, S]."""
        raw = self.grid(torch.bmm(q_rows, self.key.transpose(1, 2)), start, stop) * self.p.scale
        q_idx = torch.arange(start, stop, device=raw.device)
        modified = evaluate_score_mod(self.p.score_mod, raw, self.b, self.h, q_idx, self.kv_idx, score_mod_buffers)
        return raw, modified.to(self.compute), q_idx


def _cat(chunks):
    """The chunks' rows back in one tensor (dim 2); no copy for a single chunk."""
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=2)


def _split(p: _Problem, tensors):
    """Flat traced inputs -> (sparse block tensors, score_mod buffers, mask_mod buffers);
    captured SymInts (``dynamic=True``), specialised to ints, are put back in their places."""
    tensors = list(tensors)
    if p.has_full:
        sparse, tensors = tensors[:4], tensors[4:]
    else:
        sparse, tensors = tensors[:2] + [None, None], tensors[2:]
    tensors = iter(tensors)
    buffers = tuple(next(tensors) if c is _TENSOR else c for c in p.buffer_slots)
    return sparse, buffers[: p.n_score_buffers], buffers[p.n_score_buffers:]


def _forward(p: _Problem, query, key, value, *tensors):
    sparse, score_mod_buffers, mask_mod_buffers = _split(p, tensors)
    s = _Setup(p, query, key, value, sparse, mask_mod_buffers)
    outs, lses, maxes = [], [], []
    for start, stop in p.ranges:
        _, modified, q_idx = s.scores(s.q_rows(query, start, stop), start, stop, score_mod_buffers)
        masked = torch.where(s.allowed(q_idx), modified, -math.inf)
        probs, lse, row_max = softmax_rows(masked)
        outs.append(s.grid(torch.bmm(s.flat(probs), s.value), start, stop))
        lses.append(lse)
        maxes.append(row_max)
    return _cat(outs).to(query.dtype), _cat(lses), _cat(maxes)


def _backward(p: _Problem, has_grad_out, has_grad_lse, query, key, value, *tensors):
    grad_out = grad_lse = None
    tensors = list(tensors)
    if has_grad_out:
        grad_out = tensors.pop(0)
    if has_grad_lse:
        grad_lse = tensors.pop(0)
    sparse, score_mod_buffers, mask_mod_buffers = _split(p, tensors)
    s = _Setup(p, query, key, value, sparse, mask_mod_buffers)
    compute = s.compute
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
    for start, stop in p.ranges:
        q_rows = s.q_rows(query, start, stop)
        raw, modified, q_idx = s.scores(q_rows, start, stop, score_mod_buffers)
        allowed = s.allowed(q_idx)
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
            acc = torch.zeros(p.batch * p.kv_heads, p.kv_len, dim, dtype=compute, device=query.device)
        acc = acc.view(p.batch, p.kv_heads, p.kv_len, dim)
        if p.kv_batch != p.batch:  # keys/values broadcast over the batch: grads summed over it
            acc = acc.sum(0, keepdim=True)
        return acc.to(like.dtype)

    grad_query = _cat(grad_queries).to(query.dtype)
    grad_key = kv_grad(grad_key, key, p.qk_dim)
    grad_value = kv_grad(grad_value, value, p.v_dim)
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


def _zeros_and_scatter(shape, indices, values):
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
    zeros = torch.zeros(shape, dtype=acc, device=values.device)
    return torch.index_put(zeros, indices, values, accumulate=True)


@functools.cache
def _decompositions():
    table = dict(select_decomp_table())
    table[torch.ops.flex_lib.zeros_and_scatter.default] = _zeros_and_scatter
    return table


def _sizes(node):
    return [_static(s) for s in node.get_size()]


def _fake_like(node, mode):
    """A fake tensor with the IR node's (specialised) size, dtype and device, contiguous."""
    with mode:
        return torch.empty(_sizes(node), dtype=node.get_dtype(), device=node.get_device())


def _trace_and_inline(fn, ir_inputs):
    """Trace ``fn`` over fakes of ``ir_inputs`` into aten ops and lower them into V.graph."""
    mode = detect_fake_mode() or FakeTensorMode()
    fakes = [_fake_like(node, mode) for node in ir_inputs]
    try:
        with vmap_fallback_disabled():
            graph_module = make_fx(fn, decomposition_table=_decompositions(), tracing_mode="fake")(*fakes)
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
    """The mod's FX graph, made fit for vmap: ``prims.convert_element_type`` (which the graphs
    hold after AOT decomposition) has no batching rule, and vmap's per-element fallback would
    unroll one op per grid point into the trace; it becomes ``aten._to_copy``. A copy is
    rewritten: the subgraph is shared with the rest of the graph."""
    graph_module = subgraph.graph_module if isinstance(subgraph, ir.Subgraph) else subgraph
    convert = torch.ops.prims.convert_element_type.default
    if not any(n.op == "call_function" and n.target is convert for n in graph_module.graph.nodes):
        return graph_module
    graph = copy.deepcopy(graph_module.graph)
    for node in graph.nodes:
        if node.op == "call_function" and node.target is convert:
            source, dtype = node.args
            node.target = torch.ops.aten._to_copy.default
            node.args = (source,)
            node.kwargs = {"dtype": dtype}
    return torch.fx.GraphModule(graph_module, graph)


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
        elif isinstance(b, (int, float, bool, sympy.Expr)):
            slots.append(_static(b) if isinstance(b, sympy.Expr) else b)
        else:
            raise NotImplementedError(f"inductor_flex: cannot lower a captured value of type {type(b).__name__}")
    return _Problem(_sizes(query), _sizes(key), _sizes(value), static_mask, float(scale),
                    _graph_module(score_graph), slots, len(score_mod_buffers), has_full)


def _tensor_inputs(block_mask, score_mod_buffers, mask_mod_buffers):
    sparse = [block_mask[KV_NUM_BLOCKS], block_mask[KV_INDICES]]
    if block_mask[FULL_KV_NUM_BLOCKS] is not None:
        sparse += [block_mask[FULL_KV_NUM_BLOCKS], block_mask[FULL_KV_INDICES]]
    return [*sparse, *(b for b in (*score_mod_buffers, *mask_mod_buffers) if _is_tensor(b))]


def lower_forward_decomposed(query, key, value, score_graph, block_mask, scale, kernel_options,
                             score_mod_buffers, mask_mod_buffers):
    """IR ``(out, lse, max_scores)`` of the forward operator, as the chunked decomposition."""
    p = _problem(query, key, value, score_graph, block_mask, scale, score_mod_buffers, mask_mod_buffers)
    inputs = [query, key, value, *_tensor_inputs(block_mask, score_mod_buffers, mask_mod_buffers)]
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
    inputs = [query, key, value, *grads, *_tensor_inputs(block_mask, score_mod_buffers, mask_mod_buffers)]
    fn = functools.partial(_backward, p, grad_out is not None, grad_lse is not None)
    grad_query, grad_key, grad_value, *buffer_grads = _trace_and_inline(fn, inputs)
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
