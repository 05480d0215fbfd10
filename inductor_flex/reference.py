"""Math attention with score_mod, mask_mod and block sparsity: the oracle and the eager path.

Everything here is plain differentiable torch, so calling it on float64 copies of the inputs
and differentiating with autograd gives the gold values tests compare kernels against.

Memory stays O(rows_per_chunk × KV_LEN): the queries are processed a chunk of rows at a time
and the [B, H, Q, KV] score matrix never exists in full.

A position (q, kv) is attended iff its sparse block is *full*, or it is *partial* and
mask_mod(b, h, q, kv) is true; this is exactly what the kernels compute, so the reference stays
the oracle for block masks built by hand with ``BlockMask.from_kv_blocks`` too.
"""

import copy
import math

import torch

from ._compat.hop import TransformGetItemToIndex
from .mods import evaluate_mask_mod, evaluate_score_mod, joint_outputs_per_position, vmap_over_bhqkv

# Largest number of score elements one chunk may hold (≈ 32 MiB in float64).
CHUNK_ELEMENTS = 1 << 22

# Positions of the fields in BlockMask.as_tuple().
Q_LEN, KV_LEN = 0, 1
KV_NUM_BLOCKS, KV_INDICES, FULL_KV_NUM_BLOCKS, FULL_KV_INDICES = 2, 3, 4, 5
Q_BLOCK_SIZE, KV_BLOCK_SIZE, MASK_MOD = 10, 11, 12


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores and softmax statistics are kept in float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_map(num_blocks, indices, num_kv_blocks):
    """Dense [B, H, nQ, nKV] bool map of the blocks listed by (num_blocks, indices)."""
    if num_blocks is None:
        return None
    listed = torch.arange(indices.size(-1), device=indices.device) < num_blocks.unsqueeze(-1)
    dense = torch.zeros(*indices.shape[:-1], num_kv_blocks + 1, dtype=torch.bool, device=indices.device)
    # Unlisted padding entries are sent to a spill column that is dropped afterwards.
    target = torch.where(listed, indices.long(), num_kv_blocks)
    dense.scatter_(-1, target, True)
    return dense[..., :num_kv_blocks]


def allowed_positions(block_mask, partial_map, full_map, b, h, q_idx, kv_idx, mask_mod_buffers):
    """Bool [B, H, rows, KV] of attended positions for the query rows ``q_idx``."""
    q_blocks = q_idx // block_mask[Q_BLOCK_SIZE]
    kv_blocks = kv_idx // block_mask[KV_BLOCK_SIZE]
    in_partial = partial_map[:, :, q_blocks][:, :, :, kv_blocks]
    allowed = in_partial & evaluate_mask_mod(block_mask[MASK_MOD], b, h, q_idx, kv_idx, mask_mod_buffers)
    if full_map is not None:
        allowed = allowed | full_map[:, :, q_blocks][:, :, :, kv_blocks]
    return allowed


def softmax_rows(scores):
    """Softmax over the last dim with -inf for masked entries: (probs, lse, row_max).

    Rows with nothing attended give probs 0, lse -inf and max -inf, and no NaN in values or
    gradients: the shift and the divisor are made safe before use, not patched after.
    """
    row_max = scores.amax(dim=-1, keepdim=True)
    shift = torch.where(torch.isfinite(row_max), row_max, 0.0).detach()
    exp_scores = torch.exp(scores - shift)
    row_sum = exp_scores.sum(dim=-1, keepdim=True)
    empty = row_sum == 0
    probs = exp_scores / torch.where(empty, 1.0, row_sum)
    lse = torch.where(empty, -math.inf, shift + torch.log(torch.where(empty, 1.0, row_sum)))
    return probs, lse.squeeze(-1), row_max.squeeze(-1)


class _Chunks:
    """Shared set-up of the forward and backward: grouped views, block maps, index ranges."""

    def __init__(self, query, key, block_mask, rows_per_chunk):
        self.batch, self.q_heads, self.q_len, _ = query.shape
        self.kv_heads, self.kv_len = key.size(1), key.size(2)
        self.group = self.q_heads // self.kv_heads
        self.compute = working_dtype(query.dtype)
        self.block_mask = block_mask
        num_kv_blocks = block_mask[KV_INDICES].size(-1)
        self.partial_map = block_map(block_mask[KV_NUM_BLOCKS], block_mask[KV_INDICES], num_kv_blocks)
        self.full_map = block_map(block_mask[FULL_KV_NUM_BLOCKS], block_mask[FULL_KV_INDICES], num_kv_blocks)
        device = query.device
        self.b = torch.arange(self.batch, device=device)
        self.h = torch.arange(self.q_heads, device=device)
        self.kv_idx = torch.arange(self.kv_len, device=device)
        if rows_per_chunk is None:
            rows_per_chunk = max(1, CHUNK_ELEMENTS // max(1, self.batch * self.q_heads * self.kv_len))
        self.ranges = [(lo, min(lo + rows_per_chunk, self.q_len)) for lo in range(0, self.q_len, rows_per_chunk)]

    def grouped(self, t):
        """[B, Hq, rows, X] -> [B, Hkv, G, rows, X], the layout that shares a KV head."""
        return t.unflatten(1, (self.kv_heads, self.group))

    def kv(self, t):
        """[B|1, Hkv, S, X] -> [B|1, Hkv, 1, S, X] in the working dtype."""
        return t.to(self.compute).unsqueeze(2)

    def raw_scores(self, query, key_kv, start, stop):
        """scale-free q·kᵀ for rows [start, stop): [B, Hq, rows, S] in the working dtype."""
        q_rows = self.grouped(query[:, :, start:stop].to(self.compute))
        return (q_rows @ key_kv.transpose(-1, -2)).flatten(1, 2)

    def allowed(self, q_idx, mask_mod_buffers):
        return allowed_positions(
            self.block_mask, self.partial_map, self.full_map, self.b, self.h, q_idx, self.kv_idx, mask_mod_buffers
        )


def attention_reference(
    query,
    key,
    value,
    score_mod,
    block_mask: tuple,
    scale: float,
    score_mod_buffers: tuple = (),
    mask_mod_buffers: tuple = (),
    rows_per_chunk: int | None = None,
):
    """Attention over (B, Hq, L, E) queries and (B|1, Hkv, S, E|Ev) keys/values.

    Returns ``(out [B, Hq, L, Ev] in query.dtype, lse [B, Hq, L], max_scores [B, Hq, L])``;
    lse is the natural-log sum of exp of the modified scores and max_scores their maximum,
    both in the working dtype. Fully masked rows give out 0, lse -inf and max -inf, never NaN.
    """
    chunks = _Chunks(query, key, block_mask, rows_per_chunk)
    key_kv = chunks.kv(key)
    value_kv = value.unsqueeze(2)
    outs, lses, maxes = [], [], []
    for start, stop in chunks.ranges:
        q_idx = torch.arange(start, stop, device=query.device)
        scores = chunks.raw_scores(query, key_kv, start, stop) * scale
        scores = evaluate_score_mod(score_mod, scores, chunks.b, chunks.h, q_idx, chunks.kv_idx, score_mod_buffers)
        scores = torch.where(chunks.allowed(q_idx, mask_mod_buffers), scores.to(chunks.compute), -math.inf)

        probs, lse, row_max = softmax_rows(scores)

        out = chunks.grouped(probs.to(value.dtype)) @ value_kv
        outs.append(out.flatten(1, 2))
        lses.append(lse)
        maxes.append(row_max)

    out = torch.cat(outs, dim=2).to(query.dtype)
    return out, torch.cat(lses, dim=2), torch.cat(maxes, dim=2)


_NARROW_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _evaluated_in_float64(joint_graph):
    """A copy of the joint graph whose casts to a narrower float cast to float64 instead.

    Autograd rounds each position's gradient of a captured tensor to the tensor's dtype (an
    fp16 bias read by fp32 scores: one fp16 rounding per position) before our float64 sum over
    the positions; the kernels keep those terms in float32. Rounding once, at the end, keeps the
    eager gradient as exact as the sum allows.
    """
    def narrowing(node):
        return (node.op == "call_function" and node.target is torch.ops.aten._to_copy.default
                and node.kwargs.get("dtype") in _NARROW_FLOATS)

    if not any(map(narrowing, joint_graph.graph.nodes)):
        return joint_graph
    graph_module = torch.fx.GraphModule(joint_graph, copy.deepcopy(joint_graph.graph))
    for node in filter(narrowing, graph_module.graph.nodes):
        node.update_kwarg("dtype", torch.float64)
    graph_module.recompile()
    return graph_module


def attention_backward_reference(
    query,
    key,
    value,
    out,
    lse,
    grad_out,
    grad_lse,
    score_mod,
    joint_graph,
    block_mask: tuple,
    scale: float,
    score_mod_buffers: tuple = (),
    mask_mod_buffers: tuple = (),
    rows_per_chunk: int | None = None,
):
    """Gradients of :func:`attention_reference` (``out`` and ``lse`` are the forward's outputs;
    the reference recomputes what it needs from the inputs, more exactly than from them).

    The derivative of score_mod (for the scores and for every captured buffer) comes from
    ``joint_graph`` (see ``autograd.build_joint_graph``) evaluated at every position, the way
    the backward kernel uses it. Returns ``(dq, dk, dv, buffer_grads)``; dk/dv are summed over
    the query heads of a GQA group and over a broadcast key/value batch.
    """
    chunks = _Chunks(query, key, block_mask, rows_per_chunk)
    compute = chunks.compute
    key_kv, value_kv = chunks.kv(key), chunks.kv(value)
    batch = query.size(0)
    grad_key = torch.zeros(batch, *key_kv.shape[1:], dtype=compute, device=key.device)
    grad_value = torch.zeros(batch, *value_kv.shape[1:], dtype=compute, device=value.device)
    grad_query = torch.empty(query.shape, dtype=compute, device=query.device)
    buffer_grads = [None] * len(score_mod_buffers)
    joint_graph = _evaluated_in_float64(joint_graph)
    per_position = joint_outputs_per_position(joint_graph, n_grid_inputs=6)
    joint = vmap_over_bhqkv(
        joint_graph,
        prefix=(0,),
        suffix=(0,) + (None,) * len(score_mod_buffers),
        out_dims=[0 if p else None for p in per_position],
    )
    buffers64 = [b.double() if isinstance(b, torch.Tensor) and b.is_floating_point() else b for b in score_mod_buffers]
    for start, stop in chunks.ranges:
        q_idx = torch.arange(start, stop, device=query.device)
        raw = chunks.raw_scores(query, key_kv, start, stop) * scale
        modified = evaluate_score_mod(score_mod, raw, chunks.b, chunks.h, q_idx, chunks.kv_idx, score_mod_buffers)
        allowed = chunks.allowed(q_idx, mask_mod_buffers)
        # Probabilities are recomputed rather than rebuilt from the saved lse: lse rounded to
        # float32 makes rows sum to 1 ± |lse|·eps, an error captured-buffer gradients
        # multiply by the (possibly large) positions they are weighted with.
        probs, _, _ = softmax_rows(torch.where(allowed, modified.to(compute), -math.inf))

        d_out = grad_out[:, :, start:stop].to(compute) if grad_out is not None else None
        d_modified = torch.zeros_like(probs)
        if d_out is not None:
            grad_value += (chunks.grouped(probs).transpose(-1, -2) @ chunks.grouped(d_out)).sum(2, keepdim=True)
            d_probs = (chunks.grouped(d_out) @ value_kv.transpose(-1, -2)).flatten(1, 2)
            # Σ P·dP, the exact softmax backward; kernels use the cheaper Σ dO·O, equal in exact
            # arithmetic but noisier, which the captured-buffer reductions amplify.
            delta = (probs * d_probs).sum(-1, keepdim=True)
            d_modified = d_modified + probs * (d_probs - delta)
        if grad_lse is not None:
            d_modified = d_modified + probs * grad_lse[:, :, start:stop, None].to(compute)

        # The joint graph also sums each captured buffer's gradient over every position of the
        # chunk; float64 keeps that long reduction from dominating the error.
        with TransformGetItemToIndex():
            d_raw, _, _, _, _, *chunk_buffer_grads = joint(
                raw.double(), chunks.b, chunks.h, q_idx, chunks.kv_idx, d_modified.double(), *buffers64
            )
        if d_raw is None:  # score_mod ignores the score: q and k get no gradient through it
            d_raw = torch.zeros_like(raw)
        d_raw = torch.where(allowed, d_raw.to(compute), 0.0) * scale
        grad_query[:, :, start:stop] = (chunks.grouped(d_raw) @ key_kv).flatten(1, 2)
        q_rows = chunks.grouped(query[:, :, start:stop].to(compute))
        grad_key += (chunks.grouped(d_raw).transpose(-1, -2) @ q_rows).sum(2, keepdim=True)
        for i, g in enumerate(chunk_buffer_grads):
            if g is not None:
                if per_position[5 + i]:  # a tensor read whole: one gradient per position, summed
                    g = g.sum(dim=(0, 1, 2, 3))
                buffer_grads[i] = g if buffer_grads[i] is None else buffer_grads[i] + g

    grad_key, grad_value = grad_key.squeeze(2), grad_value.squeeze(2)
    if key.size(0) != batch:  # keys/values broadcast over the batch: their grads are summed
        grad_key = grad_key.sum(0, keepdim=True)
        grad_value = grad_value.sum(0, keepdim=True)
    buffer_grads = tuple(
        None if g is None else g.to(buf.dtype) for g, buf in zip(buffer_grads, score_mod_buffers)
    )
    return grad_query.to(query.dtype), grad_key.to(key.dtype), grad_value.to(value.dtype), buffer_grads
