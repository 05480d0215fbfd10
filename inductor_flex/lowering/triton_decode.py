"""Forward lowering for short queries (decoding) onto ``templates/decode.py.jinja``.

The forward template gives each program BLOCK_M query rows of one head: with one or a few query
tokens that tile is almost empty and only batch × heads programs run, too few to read a long KV
cache at full bandwidth. The decode kernel instead packs the query heads of a GQA group times
the few tokens into one tile (K and V read once per group) and splits the KV sequence across
programs; a second kernel (``templates/decode_merge.py.jinja``) merges the splits with their
lse. Same results as the forward template: out, lse and max (natural log, float32), empty rows
out 0 and lse/max -inf.

``decode_refusals`` says why the decode kernel cannot run a call (then the forward template
runs it, which is always correct); ``lower_decode_triton`` builds the two kernels.
"""

import functools

import sympy
import torch

from .._compat.inductor import (
    FixedLayout,
    SymbolicGridFn,
    TritonTemplate,
    V,
    concrete_sizes,
    inductor_config,
    ir,
    select_algorithm,
)
from ..kernel_options import options_for
from .configs import decode_configs, decode_splits, fit_tile, sm_count
from .triton_forward import (
    _block_list_inputs,
    _known_multiple,
    _span,
    _static,
    autotune_inputs,
    contiguous_buffer,
    prepare_forward_inputs,
    template_source,
)

# Most rows one packed tile may hold (heads × tokens): the float32 accumulator of
# ROWS × head dim lives in registers.
DECODE_MAX_ROWS = 64


@SymbolicGridFn
def decode_grid(batch, q_heads, q_len, head_dim, meta, *, cdiv):
    return (meta["SPLITS"], batch, meta["HEAD_PROGRAMS"])


@SymbolicGridFn
def merge_grid(batch, q_heads, q_len, head_dim, meta, *, cdiv):
    return (batch * q_heads * q_len, 1, 1)


@functools.cache
def decode_template() -> TritonTemplate:
    return TritonTemplate(name="inductor_flex_decode", grid=decode_grid,
                          source=template_source("decode", "common"))


@functools.cache
def merge_template() -> TritonTemplate:
    return TritonTemplate(name="inductor_flex_decode_merge", grid=merge_grid,
                          source=template_source("decode_merge"))


def _static_int(expr):
    """The value of a size known at compile time without a guard, else None."""
    if isinstance(expr, int):
        return expr
    if isinstance(expr, sympy.Integer):
        return int(expr)
    return None


def packed_heads(group: int, q_len: int, one_sparse_head: bool) -> int:
    """Query heads of one GQA group to pack into a tile: all of them when the BlockMask has a
    single head (one block list serves the group) and the tile stays within DECODE_MAX_ROWS,
    else the largest divisor of the group that fits; 1 when heads may have their own lists."""
    if not one_sparse_head:
        return 1
    fitting = [d for d in range(1, group + 1) if group % d == 0 and d * q_len <= DECODE_MAX_ROWS]
    return max(fitting, default=1)


def decode_refusals(query, value, block_mask, kernel_options, max_query_len: int) -> list[str]:
    """Why the decode kernel does not run these inputs (empty: it does)."""
    options = options_for(kernel_options, "fwd")
    reasons = []
    if options.get("FORCE_USE_FLEX_ATTENTION", False):
        reasons.append("kernel option FORCE_USE_FLEX_ATTENTION")
    q_len = _static_int(query.get_size()[2])
    # The sparse block sizes are Python ints in every BlockMask; under dynamic=True Dynamo
    # makes them symbols, which the templates specialise (guarded) like this.
    sparse_q = _static(block_mask[10])
    if q_len is None:
        reasons.append("the query length is dynamic")
    elif q_len == 0 or q_len > max_query_len:
        reasons.append(f"query length {q_len} not in 1..{max_query_len}")
    elif q_len > sparse_q:
        reasons.append(f"the query length {q_len} spans more than one sparse Q block")
    elif q_len > DECODE_MAX_ROWS:
        reasons.append(f"query length {q_len} above {DECODE_MAX_ROWS} rows")
    return reasons


def lower_decode_triton(query, key, value, score_graph, block_mask, scale, kernel_options,
                        score_mod_buffers, mask_mod_buffers):
    inp = prepare_forward_inputs(query, key, value, score_graph, block_mask, kernel_options,
                                 score_mod_buffers, mask_mod_buffers)
    options, device, query = inp.options, inp.device, inp.query
    kv_num_blocks, kv_indices = inp.kv_num_blocks, inp.kv_indices
    batch, q_heads, kv_heads, kv_len = inp.batch, inp.q_heads, inp.kv_heads, inp.kv_len
    q_len, v_dim, sparse_kv = _static(inp.q_len), inp.v_dim, inp.sparse_kv
    group = q_heads // kv_heads

    one_sparse_head = V.graph.sizevars.statically_known_true(sympy.Eq(kv_num_blocks.get_size()[1], 1))
    pack = packed_heads(group, q_len, one_sparse_head)
    rows = max(16, 1 << (pack * q_len - 1).bit_length())
    head_programs = q_heads // pack
    batch_hint = concrete_sizes([batch])[0]
    kv_len_hint = concrete_sizes([kv_len])[0]
    splits = decode_splits(batch_hint * head_programs, kv_len_hint, sm_count(device))

    # Per split: float32 partial outputs, lse and max for the merge kernel. With one split the
    # kernel writes the final out (query dtype), lse and max, and no merge runs.
    stats = torch.float32
    if splits == 1:
        parts_size, parts_dtype, stats_size = [batch, q_heads, q_len, v_dim], query.get_dtype(), [batch, q_heads, q_len]
    else:
        parts_size, parts_dtype, stats_size = [batch, q_heads, splits, q_len, v_dim], stats, [batch, q_heads, splits, q_len]
    parts_layout = FixedLayout(device, parts_dtype, parts_size,
                               stride=ir.FlexibleLayout.contiguous_strides(parts_size))
    lse_parts = contiguous_buffer(stats_size, stats, device)
    max_parts = contiguous_buffer(stats_size, stats, device)

    shared = dict(
        inp.constants(scale),
        PACKED_HEADS=pack,
        HEAD_PROGRAMS=head_programs,
        QUERY_LEN=q_len,
        ROWS=rows,
        SPLITS=splits,
        # The shared partials of common.py.jinja are rendered too; they speak of BLOCK_M rows.
        BLOCK_M=rows,
        # A row may see only masked keys inside one split even when the whole row is safe.
        ROWS_GUARANTEED_SAFE=False,
    )
    qk_rounded, v_rounded = shared["QK_HEAD_DIM_ROUNDED"], shared["V_HEAD_DIM_ROUNDED"]
    kv_span = _span(kv_len, sparse_kv)

    configs = decode_configs(device, query.get_dtype(), rows, qk_rounded, v_rounded,
                             autotune=bool(inductor_config.max_autotune))
    inputs = [query, inp.key, inp.value, lse_parts, max_parts, kv_num_blocks, kv_indices,
              inp.full_kv_num_blocks, inp.full_kv_indices]
    choices, errors = [], []
    for config in configs:
        block_n = options.get("BLOCK_N") or config.block_n
        # As in the forward: tiles that do not divide the sparse block (pages of 16 ...) gather.
        gather_kv = sparse_kv % block_n != 0 and kv_span >= sparse_kv
        if kv_span < sparse_kv and "BLOCK_N" not in options:
            block_n = fit_tile(sparse_kv, config.block_n, kv_span)
        kv_tile_fits = sparse_kv % block_n == 0 or kv_span < sparse_kv
        meta = dict(
            shared,
            BLOCK_N=block_n,
            KV_TILES_PER_BLOCK=-(-kv_span // block_n),
            KV_TILE_FITS_BLOCK=kv_tile_fits,
            GATHER_KV=gather_kv,
            CHECK_COLS=gather_kv or not (sparse_kv % block_n == 0 and _known_multiple(kv_len, sparse_kv)),
        )
        error = decode_template().maybe_append_choice(
            choices=choices,
            input_nodes=inputs,
            layout=parts_layout,
            subgraphs=[inp.score_ir, inp.mask_ir],
            mutated_inputs=[lse_parts, max_parts],
            call_sizes=query.get_size(),
            num_warps=options.get("num_warps", config.num_warps),
            num_stages=options.get("num_stages", config.num_stages),
            **meta,
        )
        if error is not None:
            errors.append(str(error))
    if not choices:
        raise RuntimeError("inductor_flex: no decode kernel configuration could be generated:\n" + "\n".join(errors))

    num_blocks_gen, indices_gen = _block_list_inputs(kv_indices, device)
    kernel_inputs, input_gen_fns = autotune_inputs(
        choices, {5: num_blocks_gen, 6: indices_gen, 7: num_blocks_gen, 8: indices_gen}, first_captured=len(inputs))
    out_parts = select_algorithm("inductor_flex_decode", choices, kernel_inputs, parts_layout,
                                 input_gen_fns=input_gen_fns)
    inp.attach_subgraphs(out_parts)
    if splits == 1:
        return out_parts, lse_parts, max_parts
    return _merge_splits(query, out_parts, lse_parts, max_parts, splits, q_len, v_dim, v_rounded)


def _merge_splits(query, out_parts, lse_parts, max_parts, splits, q_len, v_dim, v_rounded):
    """The second kernel: combine the SPLITS partial results of every row."""
    device = query.get_device()
    batch, q_heads = query.get_size()[:2]
    out_size = [batch, q_heads, q_len, v_dim]
    layout = FixedLayout(device, query.get_dtype(), out_size, stride=ir.FlexibleLayout.contiguous_strides(out_size))
    lse = contiguous_buffer([batch, q_heads, q_len], torch.float32, device)
    row_max = contiguous_buffer([batch, q_heads, q_len], torch.float32, device)
    choices = []
    error = merge_template().maybe_append_choice(
        choices=choices,
        input_nodes=[out_parts, lse_parts, max_parts, lse, row_max],
        layout=layout,
        mutated_inputs=[lse, row_max],
        call_sizes=query.get_size(),
        num_warps=4 if v_rounded * splits >= 2048 else 2,
        num_stages=1,
        SPLITS=splits,
        SPLITS_ROUNDED=max(2, 1 << (splits - 1).bit_length()),
        QUERY_LEN=q_len,
        HQ=_static(q_heads),
        V_HEAD_DIM=v_dim,
        V_HEAD_DIM_ROUNDED=v_rounded,
    )
    if not choices:
        raise RuntimeError(f"inductor_flex: the decode merge kernel could not be generated: {error}")
    out = select_algorithm("inductor_flex_decode_merge", choices, [out_parts, lse_parts, max_parts, lse, row_max],
                           layout)
    return out, lse, row_max
