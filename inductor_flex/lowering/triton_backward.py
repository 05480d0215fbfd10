"""Backward lowering onto our fused Triton template (``templates/backward.py.jinja``).

One kernel computes dQ, dK and dV (see the template's "How is this kernel parallelised?").
score_mod, mask_mod and the joint graph of score_mod arrive as FX subgraphs and are inlined by
the template's ``modification`` hooks, as in the forward.

Gradients of captured tensors
-----------------------------
The joint graph returns a captured tensor's gradient as a sum of terms: one
``flex_lib.zeros_and_scatter(shape, indices, values)`` per indexed read (``bias[h]``,
``table[q_idx - kv_idx]``, any number of reads per tensor), or a per-position value for a 0-dim
tensor read whole (``score * w``). ``plan_captured_grads`` rewrites the joint graph so that each
term becomes two plain outputs, its values and its flat (int64) index, and classifies the index
by the positions it depends on. The dQ programs (each position is visited by exactly one) then
add every term of a tile into a zero-initialised buffer (``add_captured_grad`` in the template):
summed over the tile first when the index does not depend on the key and/or query position, so
``slopes[h]`` costs one atomic per tile, not one per position; with plain stores where the index
is one-to-one (``bias[b, h, q_idx, kv_idx]``).

Such a gradient sums ds over whole rows, where Σ ds nearly cancels; DELTA = rowsum(dO · O) is
that cancelling term only up to the rounding of O, which in fp16/bf16 is far above the eager
error (3× to 10⁴× on the H100). There (``ROW_DELTA_FROM_TILES``) each dQ program first streams
its KV tiles once to sum p · dp itself, less the LSE's incoming gradient (GRAD_LSE, when the LSE
was differentiated).

Determinism (kernel option ``DETERMINISTIC``): dQ, dK and dV never use atomics (each is owned by
one program; GQA heads are summed inside the dK/dV program), so only the captured-tensor
gradients could vary run to run, through the order of floating-point atomic adds. With
DETERMINISTIC they are accumulated as two int64 fixed-point sums (units of 2^-20 and 2^-52 of
the value): integer addition is associative, so every order gives the same bits, and the pair
is converted to floating point once at the end. Limits: a gradient element must stay below
2^43 in magnitude and contributions below 2^-52 are dropped, far beyond float32's accuracy for
any realistic gradient. Plain stores (one-to-one indices) are deterministic already.
"""

import copy
import functools
import hashlib
from dataclasses import dataclass

import sympy
import torch

from .._compat.hop import zeros_and_scatter_op
from .._compat.inductor import (
    FixedLayout,
    SymbolicGridFn,
    TritonTemplate,
    build_subgraph_buffer,
    create_placeholder,
    empty_strided,
    freeze_irnodes,
    inductor_config,
    ir,
    ops,
    select_algorithm,
)
from ..kernel_options import options_for
from ..mods import gradient_summands
from .configs import backward_configs, backward_launch, fit_tile
from .decomposed import _expected_buffer_grads, kv_batch_broadcast
from .triton_forward import (
    _INDEX_DTYPES,
    MODIFICATION_TAKES_INPUT_DTYPES,
    _Graph,
    _block_list_inputs,
    _known_multiple,
    _round_head_dim,
    _span,
    _static,
    autotune_inputs,
    float32_precision,
    lower_subgraphs,
    realize,
    template_source,
)

# Kinds of captured-gradient term, by what the flat index depends on (see add_captured_grad).
PER_TILE, PER_ROW, PER_COLUMN, PER_POSITION, ONE_TO_ONE = 0, 1, 2, 3, 4
_GRID_PLACEHOLDERS = ("b", "h", "m", "n")  # placeholders 1..4 of the joint graph
HIGH_UNIT, LOW_UNIT = 2.0 ** -20, 2.0 ** -52  # the fixed-point units of add_values (EXACT)
LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class CapturedTerm:
    buffer: int  # position in score_mod_buffers
    kind: int


@dataclass
class CapturedGradPlan:
    graph_module: object  # the rewritten joint graph: [grad_score, value0, index0, value1, ...]
    terms: list


def _grid_dependencies(node, placeholders) -> set:
    """Which of score, b, h, m, n, grad (placeholder positions 0..5) ``node`` depends on."""
    index_of = {p: i for i, p in enumerate(placeholders)}
    seen, stack, found = set(), [node], set()
    while stack:
        current = stack.pop()
        if current in seen or not isinstance(current, torch.fx.Node):
            continue
        seen.add(current)
        if current in index_of:
            found.add(index_of[current])
        stack.extend(current.all_input_nodes)
    return found


def _classify(indices, placeholders, single_term: bool) -> int:
    deps = set()
    for index in indices:
        deps |= _grid_dependencies(index, placeholders)
    if deps & {0, 5}:  # an index computed from the score itself: no structure to exploit
        return PER_POSITION
    if single_term and len(indices) == 4 and {placeholders.index(i) if i in placeholders else -1
                                              for i in indices} == {1, 2, 3, 4}:
        return ONE_TO_ONE
    uses_m, uses_n = 3 in deps, 4 in deps
    if not uses_m and not uses_n:
        return PER_TILE
    if not uses_n:
        return PER_ROW
    if not uses_m:
        return PER_COLUMN
    return PER_POSITION


def plan_captured_grads(joint_graph_module, score_mod_buffers):
    """Rewrite the joint graph for the template: returns (CapturedGradPlan, []) or (None, reasons)."""
    graph = copy.deepcopy(joint_graph_module.graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    outputs = list(output.args[0])
    aten, prims = torch.ops.aten, torch.ops.prims
    reasons = []
    new_outputs, terms = [], []
    with graph.inserting_before(output):
        grad_score = outputs[0]
        if grad_score is None:  # score_mod ignores the score: zero gradient for q and k
            grad_score = graph.call_function(aten.mul.Tensor, (placeholders[5], 0.0))
        new_outputs.append(grad_score)
        for i, grad in enumerate(outputs[5:][: len(score_mod_buffers)]):
            if grad is None:
                continue
            buffer = score_mod_buffers[i]
            if not isinstance(buffer, ir.IRNode):
                continue
            shape = [_static(s) for s in buffer.get_size()]
            summands = gradient_summands(grad)
            for summand in summands:
                if summand.op == "call_function" and summand.target is zeros_and_scatter_op():
                    _, indices, values = summand.args
                    if len(indices) != len(shape) or any(not isinstance(x, torch.fx.Node) for x in indices):
                        reasons.append(f"captured tensor {i} is indexed with slices or constants (index every "
                                       "dimension with tensors)")
                        continue
                    kind = _classify(list(indices), placeholders, single_term=len(summands) == 1)
                    strides = ir.FlexibleLayout.contiguous_strides(shape)
                    flat = None
                    for index, size, stride in zip(indices, shape, strides):
                        index = graph.call_function(prims.convert_element_type.default, (index, torch.int64))
                        negative = graph.call_function(aten.lt.Scalar, (index, 0))
                        wrapped = graph.call_function(aten.add.Tensor, (index, int(size)))
                        index = graph.call_function(aten.where.self, (negative, wrapped, index))
                        term = graph.call_function(aten.mul.Tensor, (index, int(stride)))
                        flat = term if flat is None else graph.call_function(aten.add.Tensor, (flat, term))
                    value = graph.call_function(prims.convert_element_type.default, (values, torch.float32))
                elif len(shape) == 0:  # a 0-dim tensor read whole: one gradient per position
                    kind = PER_TILE
                    value = graph.call_function(prims.convert_element_type.default, (summand, torch.float32))
                    flat = graph.call_function(aten.mul.Tensor, (
                        graph.call_function(prims.convert_element_type.default, (placeholders[1], torch.int64)), 0))
                else:
                    reasons.append(f"captured tensor {i} of shape {shape} is read whole (only 0-dim tensors "
                                   "may be; index it instead)")
                    continue
                terms.append(CapturedTerm(i, kind))
                new_outputs += [value, flat]
    if reasons:
        return None, reasons
    output.args = (new_outputs,)
    graph.eliminate_dead_code()
    return CapturedGradPlan(torch.fx.GraphModule(joint_graph_module, graph), terms), []


# ---------------------------------------------------------------- the template


def _modification_call(number, output_name):
    return (
        f'{{{{ modification(subgraph_number={number}, output_name="{output_name}", score="qk", b="off_z", '
        f'h="off_h", m="m", n="n", grad_score_mod="ds_mod", input_shapes={{"score": ("BLOCK_M", "BLOCK_N"), '
        f'"grad_score_mod": ("BLOCK_M", "BLOCK_N"), "m": ("BLOCK_M", "1"), "n": ("1", "BLOCK_N")}}'
        f'__INDEX_DTYPES__) | indent_except_first(2) }}}}'
    )


# With ROW_DELTA_FROM_TILES the dQ programs rebuild DELTA from their tiles, less the LSE's
# incoming gradient: the GRAD_LSE input where the LSE was differentiated, else nothing.
_GRAD_LSE_LOAD = ('load_row_stats(GRAD_LSE + off_z * {{stride("GRAD_LSE", 0)}} + off_h * {{stride("GRAD_LSE", 1)}}, '
                  'GRAD_LSE + off_z * {{stride("GRAD_LSE", 0)}} + off_h * {{stride("GRAD_LSE", 1)}}, '
                  'offs_m, {{stride("GRAD_LSE", 2)}}, {{stride("GRAD_LSE", 2)}}, row_ok, CHECK_ROWS)[0]')


@functools.cache
def backward_template(grad_buffers: int, terms: tuple, grad_lse: bool = False) -> TritonTemplate:
    """The template for ``grad_buffers`` captured-gradient buffers and these (buffer slot, kind,
    numel, exact) terms, and the GRAD_LSE input if ``grad_lse``; one TritonTemplate per distinct
    source (names must be unique)."""
    names = "".join(f', "GRAD{g}"' for g in range(grad_buffers)) + (', "GRAD_LSE"' if grad_lse else "")
    params = "".join(f", GRAD{g}" for g in range(grad_buffers))
    args = "".join(f", GRAD{g}=GRAD{g}" for g in range(grad_buffers))
    lines = []
    for t, (slot, kind, numel, exact) in enumerate(terms):
        lines.append("        " + _modification_call(3 + 2 * t, "term_values"))
        lines.append("        " + _modification_call(4 + 2 * t, "term_index"))
        lines.append(f"        add_captured_grad(GRAD{slot}, {numel}, term_values, term_index, attended, "
                     f"KIND={kind}, EXACT={exact})")
    body = "\n".join(lines)
    raw = (template_source("backward", "common")
           .replace("__GRAD_NAMES__", names).replace("__GRAD_PARAMS__", params)
           .replace("__GRAD_ARGS__", args).replace("__CAPTURED_GRADS__\n", body + "\n" if body else "")
           .replace("__GRAD_LSE__", _GRAD_LSE_LOAD if grad_lse else "0.0"))
    # The generated term code brings its own hook-argument placeholder.
    source = raw.replace("__INDEX_DTYPES__", _INDEX_DTYPES if MODIFICATION_TAKES_INPUT_DTYPES else "")
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    return TritonTemplate(name=f"inductor_flex_backward_{digest}", grid=backward_grid, source=source)


@SymbolicGridFn
def backward_grid(batch, q_len, kv_heads, kv_len, meta, *, cdiv):
    kv_programs = cdiv(kv_len, meta["SPARSE_KV_BLOCK_SIZE"]) * meta["KV_TILES_PER_BLOCK1"]
    q_programs = cdiv(q_len, meta["SPARSE_Q_BLOCK_SIZE"]) * meta["Q_TILES_PER_BLOCK"] * meta["GQA_SHARED_HEADS"]
    return (kv_programs + q_programs, batch, kv_heads)


# ---------------------------------------------------------------- IR helpers


def _zeros(size, dtype, device):
    node = ir.Pointwise.create(device=device, dtype=dtype, inner_fn=lambda index: ops.constant(0, dtype),
                               ranges=list(size))
    node.realize()
    return node


def _base2_lse(lse):
    """The forward's LSE (natural log) in base 2, and 0 for rows that attend nothing (-inf): the
    template's p = exp2(score·log2(e) − lse2) is then 0 in those rows, not NaN. Done once per
    row here rather than once per tile in the kernel's loops."""
    load = lse.make_loader()

    def base2(index):
        value = ops.to_dtype(load(index), torch.float32)
        empty = ops.eq(value, ops.constant(float("-inf"), torch.float32))
        return ops.where(empty, ops.constant(0.0, torch.float32), ops.mul(value, ops.constant(LOG2E, torch.float32)))

    return ir.Pointwise.create(device=lse.get_device(), dtype=torch.float32, inner_fn=base2, ranges=lse.get_size())


def _row_delta(out, grad_out, grad_lse):
    """DELTA = rowsum(dO * O) - grad_lse in float32: the softmax backward's row term."""
    batch, heads, q_len, v_dim = out.get_size()
    out_load, grad_load = out.make_loader(), grad_out.make_loader()

    def product(index, reduction_index):
        at = [*index, *reduction_index]
        return ops.mul(ops.to_dtype(out_load(at), torch.float32), ops.to_dtype(grad_load(at), torch.float32))

    delta = ir.Reduction.create(device=out.get_device(), dst_dtype=torch.float32, src_dtype=torch.float32,
                                inner_fn=product, ranges=[batch, heads, q_len], reduction_ranges=[v_dim],
                                reduction_type="sum")
    if grad_lse is not None:
        delta.realize()  # a reduction has no loader until it is a buffer
        delta_load, lse_load = delta.make_loader(), grad_lse.make_loader()
        delta = ir.Pointwise.create(
            device=out.get_device(), dtype=torch.float32,
            inner_fn=lambda index: ops.sub(delta_load(index), ops.to_dtype(lse_load(index), torch.float32)),
            ranges=[batch, heads, q_len])
    return delta


def _as_float32(node):
    load = node.make_loader()
    return ir.Pointwise.create(device=node.get_device(), dtype=torch.float32,
                               inner_fn=lambda index: ops.to_dtype(load(index), torch.float32),
                               ranges=node.get_size())


def _sum_over_batch(node, dtype):
    """[B, H, S, D] -> [1, H, S, D] in ``dtype`` (keys/values broadcast over the batch)."""
    batch, heads, length, dim = node.get_size()
    load = node.make_loader()
    total = ir.Reduction.create(device=node.get_device(), dst_dtype=torch.float32, src_dtype=torch.float32,
                                inner_fn=lambda index, r: ops.to_dtype(load([r[0], *index[1:]]), torch.float32),
                                ranges=[1, heads, length, dim], reduction_ranges=[batch], reduction_type="sum")
    total.realize()
    total_load = total.make_loader()
    return ir.Pointwise.create(device=node.get_device(), dtype=dtype,
                               inner_fn=lambda index: ops.to_dtype(total_load(index), dtype),
                               ranges=[1, heads, length, dim])


def _finish_captured_grad(flat, shape, dtype, exact):
    """The accumulated flat buffer as the captured tensor's gradient (its shape and dtype)."""
    load = flat.make_loader()
    strides = ir.FlexibleLayout.contiguous_strides(shape)
    numel = 1
    for s in shape:
        numel *= s

    def inner(index):
        offset = sum((i * s for i, s in zip(index, strides)), sympy.Integer(0))
        if exact:
            high = ops.to_dtype(load([offset]), torch.float64)
            low = ops.to_dtype(load([offset + numel]), torch.float64)
            value = ops.add(ops.mul(high, ops.constant(HIGH_UNIT, torch.float64)),
                            ops.mul(low, ops.constant(LOW_UNIT, torch.float64)))
        else:
            value = load([offset])
        return ops.to_dtype(value, dtype)

    return ir.Pointwise.create(device=flat.get_device(), dtype=dtype, inner_fn=inner, ranges=list(shape))


# ---------------------------------------------------------------- the lowering


def mask_always_true(mask_graph) -> bool:
    """Whether a mask_mod graph returns a constant True (``noop_mask``, what ``block_mask=None``
    means): its partial blocks are then full blocks for the purpose of masking gradients."""
    graph_module = getattr(mask_graph, "graph_module", mask_graph)
    (result,) = graph_module.graph.find_nodes(op="output")[0].args
    if result is True:
        return True
    if not isinstance(result, torch.fx.Node) or result.op != "call_function":
        return False
    aten = torch.ops.aten
    if result.target in (aten.full.default, aten.new_full.default):
        return result.args[-1] is True or result.args[-1] == 1
    return result.target in (aten.ones.default, aten.new_ones.default)


def lower_backward_triton(query, key, value, out, lse, grad_out, grad_lse, score_graph, joint_graph,
                          block_mask, scale, kernel_options, score_mod_buffers, mask_mod_buffers, plan):
    """IR ``(grad_query, grad_key, grad_value, buffer_grads)`` from the fused backward template;
    ``plan`` is ``plan_captured_grads``'s rewrite of the joint graph."""
    (_, _, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
     q_num_blocks, q_indices, full_q_num_blocks, full_q_indices, sparse_q, sparse_kv, mask_graph) = block_mask
    options = options_for(kernel_options, "bwd")
    device = query.get_device()
    deterministic = bool(options.get("DETERMINISTIC", False))

    score_ir, mask_ir = lower_subgraphs(query, score_graph, mask_graph, score_mod_buffers, mask_mod_buffers,
                                        fast_math=options.get("FAST_MATH", False))
    joint_inputs = [create_placeholder(name, dtype, device) for name, dtype in (
        ("score", query.get_dtype()), ("b", torch.int32), ("h", torch.int32), ("m", torch.int32),
        ("n", torch.int32), ("grad_score_mod", query.get_dtype()))]
    joint_ir = build_subgraph_buffer(joint_inputs + list(score_mod_buffers), _Graph(plan.graph_module))
    joint_ir = list(joint_ir) if isinstance(joint_ir, (list, tuple)) else [joint_ir]
    freeze_irnodes(joint_ir)

    batch, q_heads, q_len, qk_dim = query.get_size()
    kv_batch, kv_heads, kv_len, v_dim = value.get_size()
    if grad_out is None:  # only the lse was differentiated
        grad_out = _zeros([batch, q_heads, q_len, v_dim], query.get_dtype(), device)
    delta = _row_delta(out, grad_out, grad_lse)
    # Captured-tensor gradients sum ds over whole rows: in fp16/bf16 the rounding of O leaves
    # DELTA off by far more than the eager error, so dQ programs rebuild it from their tiles.
    row_delta_from_tiles = bool(plan.terms) and query.get_dtype() in (torch.float16, torch.bfloat16)
    grad_lse_input = None
    if row_delta_from_tiles and grad_lse is not None:
        grad_lse_input = realize([_as_float32(grad_lse)])[0]
    query, key, value, lse2, delta, grad_out = realize([query, key, value, _base2_lse(lse), delta, grad_out])
    sparse = realize([kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                      q_num_blocks, q_indices, full_q_num_blocks, full_q_indices])
    kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, q_num_blocks, q_indices, \
        full_q_num_blocks, full_q_indices = sparse
    score_mod_buffers = realize(score_mod_buffers)
    mask_mod_buffers = realize(mask_mod_buffers)
    freeze_irnodes(score_mod_buffers)
    freeze_irnodes(mask_mod_buffers)

    qk_dim, v_dim = _static(qk_dim), _static(v_dim)
    q_heads, kv_heads = _static(q_heads), _static(kv_heads)
    sparse_q, sparse_kv = _static(sparse_q), _static(sparse_kv)
    broadcast_kv = kv_batch_broadcast(batch, kv_batch)

    grad_query = empty_strided([batch, q_heads, q_len, qk_dim], None, dtype=query.get_dtype(), device=device)
    # With a broadcast key/value batch, per-batch dK/dV are summed afterwards: keep them float32.
    kv_grad_dtype = torch.float32 if broadcast_kv else key.get_dtype()
    grad_value_full = empty_strided([batch, kv_heads, kv_len, v_dim], None, dtype=kv_grad_dtype, device=device)
    dk_size = [batch, kv_heads, kv_len, qk_dim]
    dk_layout = FixedLayout(device, kv_grad_dtype, dk_size, stride=ir.FlexibleLayout.contiguous_strides(dk_size))

    has_full_blocks = full_kv_num_blocks is not None
    if not has_full_blocks:  # never read; the kernel still needs pointers
        full_kv_num_blocks, full_kv_indices = kv_num_blocks, kv_indices
        full_q_num_blocks, full_q_indices = q_num_blocks, q_indices

    # One zero-initialised accumulation buffer per captured tensor that gets a gradient.
    slots, grad_buffers, term_keys = {}, [], []
    for term in plan.terms:
        if term.buffer not in slots:
            buffer = score_mod_buffers[term.buffer]
            shape = [_static(s) for s in buffer.get_size()]
            numel = 1
            for s in shape:
                numel *= s
            kinds = [t.kind for t in plan.terms if t.buffer == term.buffer]
            exact = deterministic and kinds != [ONE_TO_ONE]
            flat = _zeros([2 * numel] if exact else [max(numel, 1)], torch.int64 if exact else torch.float32, device)
            slots[term.buffer] = (len(grad_buffers), shape, numel, exact)
            grad_buffers.append(flat)
        slot, _, numel, exact = slots[term.buffer]
        term_keys.append((slot, term.kind, numel, exact))
    template = backward_template(len(grad_buffers), tuple(term_keys), grad_lse_input is not None)

    qk_rounded, v_rounded = _round_head_dim(qk_dim), _round_head_dim(v_dim)
    shared = {
        "SPARSE_Q_BLOCK_SIZE": sparse_q,
        "SPARSE_KV_BLOCK_SIZE": sparse_kv,
        "QK_HEAD_DIM": qk_dim,
        "V_HEAD_DIM": v_dim,
        "QK_HEAD_DIM_ROUNDED": qk_rounded,
        "V_HEAD_DIM_ROUNDED": v_rounded,
        "GQA_SHARED_HEADS": q_heads // kv_heads,
        "HAS_FULL_BLOCKS": has_full_blocks,
        "HAS_CAPTURED_GRADS": bool(plan.terms),
        "ROW_DELTA_FROM_TILES": row_delta_from_tiles,
        "MASK_ALWAYS_TRUE": mask_always_true(mask_graph),
        "SM_SCALE": scale,
        "PRESCALE_QK": options.get("PRESCALE_QK", False),
        "ROWS_GUARANTEED_SAFE": options.get("ROWS_GUARANTEED_SAFE", False),
        "BLOCKS_ARE_CONTIGUOUS": options.get("BLOCKS_ARE_CONTIGUOUS", False),
        "FLOAT32_PRECISION": float32_precision(),
    }
    q_span, kv_span = _span(q_len, sparse_q), _span(kv_len, sparse_kv)

    def tiling(block, sparse_block, span, length):
        return {
            "TILES": -(-span // block),
            "FITS": sparse_block % block == 0 or span < sparse_block,
            "CHECK": not (sparse_block % block == 0 and _known_multiple(length, sparse_block)),
        }

    captured = [b for b in (*score_mod_buffers, *mask_mod_buffers) if isinstance(b, ir.IRNode)]
    configs = backward_configs(device, query.get_dtype(), qk_rounded, v_rounded,
                               autotune=bool(inductor_config.max_autotune), mods_read_tensors=bool(captured))
    inputs = [query, key, value, lse2, delta, grad_out, grad_query, grad_value_full,
              kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
              q_num_blocks, q_indices, full_q_num_blocks, full_q_indices, *grad_buffers,
              *([grad_lse_input] if grad_lse_input is not None else [])]
    choices, errors = [], []
    for config in configs:
        block_m1 = options.get("BLOCK_M1") or fit_tile(sparse_q, config.block_m1, q_span)
        block_n1 = options.get("BLOCK_N1") or fit_tile(sparse_kv, config.block_n1, kv_span)
        block_m2 = options.get("BLOCK_M2") or fit_tile(sparse_q, config.block_m2, q_span)
        block_n2 = options.get("BLOCK_N2") or fit_tile(sparse_kv, config.block_n2, kv_span)
        q1, kv1 = tiling(block_m1, sparse_q, q_span, q_len), tiling(block_n1, sparse_kv, kv_span, kv_len)
        q2, kv2 = tiling(block_m2, sparse_q, q_span, q_len), tiling(block_n2, sparse_kv, kv_span, kv_len)
        meta = dict(
            shared,
            # dQ programs: BLOCK_M query rows x BLOCK_N key tiles (the names modified_scores reads).
            BLOCK_M=block_m2, BLOCK_N=block_n2,
            Q_TILES_PER_BLOCK=q2["TILES"], KV_TILES_PER_BLOCK=kv2["TILES"],
            Q_TILE_FITS_BLOCK=q2["FITS"], KV_TILE_FITS_BLOCK=kv2["FITS"],
            CHECK_ROWS=q2["CHECK"], CHECK_COLS=kv2["CHECK"],
            # dK/dV programs: BLOCK_N1 key rows x BLOCK_M1 query tiles.
            BLOCK_M1=block_m1, BLOCK_N1=block_n1,
            Q_TILES_PER_BLOCK1=q1["TILES"], KV_TILES_PER_BLOCK1=kv1["TILES"],
            Q_TILE_FITS_BLOCK1=q1["FITS"], KV_TILE_FITS_BLOCK1=kv1["FITS"],
            CHECK_ROWS1=q1["CHECK"], CHECK_COLS1=kv1["CHECK"],
        )
        num_warps, num_stages = backward_launch(config, block_m2, block_n1, device, query.get_dtype(),
                                                qk_rounded, v_rounded)
        error = template.maybe_append_choice(
            choices=choices,
            input_nodes=inputs,
            layout=dk_layout,
            subgraphs=[score_ir, mask_ir, *joint_ir],
            mutated_inputs=[grad_query, grad_value_full, *grad_buffers],
            call_sizes=[batch, q_len, kv_heads, kv_len],
            num_warps=options.get("num_warps", num_warps),
            num_stages=options.get("num_stages", num_stages),
            **meta,
        )
        if error is not None:
            errors.append(str(error))
    if not choices:
        raise RuntimeError("inductor_flex: no backward kernel configuration could be generated:\n" + "\n".join(errors))

    kv_num_gen, kv_idx_gen = _block_list_inputs(kv_indices, device)
    q_num_gen, q_idx_gen = _block_list_inputs(q_indices, device)
    block_lists = {8: kv_num_gen, 9: kv_idx_gen, 10: kv_num_gen, 11: kv_idx_gen,
                   12: q_num_gen, 13: q_idx_gen, 14: q_num_gen, 15: q_idx_gen}
    kernel_inputs, input_gen_fns = autotune_inputs(choices, block_lists, len(inputs))
    grad_key_full = select_algorithm("inductor_flex_attention_backward", choices, kernel_inputs, dk_layout,
                                     input_gen_fns=input_gen_fns)
    grad_key_full.data.data.subgraph_inps = list(score_mod_buffers) + list(mask_mod_buffers)
    grad_key_full.data.data.subgraph_outs = [score_ir, mask_ir, *joint_ir]

    if broadcast_kv:
        grad_key = _sum_over_batch(grad_key_full, key.get_dtype())
        grad_value = _sum_over_batch(grad_value_full, value.get_dtype())
    else:
        grad_key, grad_value = grad_key_full, grad_value_full

    expected = _expected_buffer_grads(len(score_mod_buffers))
    buffer_grads = []
    for i, buffer in enumerate(score_mod_buffers):
        if i in slots:
            slot, shape, _, exact = slots[i]
            buffer_grads.append(_finish_captured_grad(grad_buffers[slot], shape, buffer.get_dtype(), exact))
        elif isinstance(buffer, ir.IRNode) and (expected is None or expected[i]) and buffer.get_dtype().is_floating_point:
            shape = [_static(s) for s in buffer.get_size()]
            buffer_grads.append(_zeros(shape, buffer.get_dtype(), device))
        else:
            buffer_grads.append(None)
    return grad_query, grad_key, grad_value, tuple(buffer_grads)
