"""Forward lowering onto our fused Triton template (``templates/forward.py.jinja``).

score_mod and mask_mod arrive as FX subgraphs; they are lowered to Inductor IR with
placeholders for (score, b, h, m, n) and inlined into the template by its ``modification``
hooks, with the tensors they captured passed as extra kernel inputs.
"""

import functools
from dataclasses import dataclass
from pathlib import Path

import sympy
import torch

from .._compat.inductor import (
    MODIFICATION_TAKES_INPUT_DTYPES,
    FixedLayout,
    SymbolicGridFn,
    TritonTemplate,
    V,
    build_subgraph_buffer,
    concrete_sizes,
    create_placeholder,
    empty_strided,
    freeze_irnodes,
    inductor_config,
    ir,
    realize_inputs,
    select_algorithm,
)
from ..kernel_options import options_for
from .configs import fit_tile, forward_configs
from .fast_math import rewrite_for_speed

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
_INDEX_DTYPES = ', input_dtypes={"b": "index", "h": "index", "m": "index", "n": "index"}'


@functools.cache
def template_source(*names: str) -> str:
    """The template files concatenated, with the torch-version-dependent hook arguments filled."""
    source = "".join((TEMPLATES / f"{name}.py.jinja").read_text() for name in names)
    return source.replace("__INDEX_DTYPES__", _INDEX_DTYPES if MODIFICATION_TAKES_INPUT_DTYPES else "")


@SymbolicGridFn
def forward_grid(batch, q_heads, q_len, head_dim, meta, *, cdiv):
    return (cdiv(q_len, meta["SPARSE_Q_BLOCK_SIZE"]) * meta["Q_TILES_PER_BLOCK"], batch, q_heads)


@functools.cache
def forward_template() -> TritonTemplate:
    return TritonTemplate(name="inductor_flex_forward", grid=forward_grid,
                          source=template_source("forward", "common"))


def _static(expr) -> int:
    return V.graph.sizevars.guard_int(expr) if isinstance(expr, sympy.Expr) else int(expr)


def _known_multiple(length, block: int) -> bool:
    return V.graph.sizevars.statically_known_true(sympy.Eq(sympy.Mod(length, block), 0))


def _span(length, sparse_block: int) -> int:
    """Positions one sparse block can cover: the block, or the whole sequence if shorter.

    A dynamic length known to be shorter (e.g. a query length under the decode guard) gives
    its upper bound, not its value: specialising a size here, after Dynamo, is a guard that
    Inductor's graph cache drops (the symbol vanishes from the graph's inputs), so the kernel
    of one length was served for another. Tiles sized for the bound cover any shorter length.
    """
    if V.graph.sizevars.statically_known_true(sympy.Lt(length, sparse_block)):
        if isinstance(length, sympy.Expr) and length.free_symbols:
            return int(V.graph.sizevars.shape_env.bound_sympy(length).upper)
        return int(length)
    return sparse_block


def _round_head_dim(dim: int) -> int:
    return max(16, 1 << (dim - 1).bit_length())


def float32_precision() -> str:
    """'ieee' unless the user allowed TF32 matmuls globally."""
    return "'tf32'" if torch.backends.cuda.matmul.allow_tf32 else "'ieee'"


class _Graph:
    """Stands in for an ``ir.Subgraph``: all the subgraph builder reads is ``graph_module``."""

    def __init__(self, graph_module):
        self.graph_module = graph_module


def lower_subgraphs(query, score_graph, mask_graph, score_mod_buffers, mask_mod_buffers, fast_math=False):
    """score_mod and mask_mod as IR to inline (placeholders: score, b, h, m, n)."""
    device = query.get_device()
    if query.get_dtype() in (torch.float16, torch.bfloat16):
        score_graph = _Graph(rewrite_for_speed(score_graph.graph_module, device, fast_math))
    index_inputs = [create_placeholder(name, torch.int32, device) for name in ("b", "h", "m", "n")]
    score_inputs = [create_placeholder("score", query.get_dtype(), device), *index_inputs]
    score_ir = build_subgraph_buffer(score_inputs + list(score_mod_buffers), score_graph)
    mask_inputs = [create_placeholder(name, torch.int32, device) for name in ("b", "h", "m", "n")]
    mask_ir = build_subgraph_buffer(mask_inputs + list(mask_mod_buffers), mask_graph)
    freeze_irnodes(score_ir)
    freeze_irnodes(mask_ir)
    return score_ir, mask_ir


def realize(nodes):
    """Realize IR inputs; SymInts lifted by Dynamo (sympy expressions) and None pass through."""
    return [realize_inputs(n) if n is not None and not isinstance(n, sympy.Expr) else n for n in nodes]


def _block_list_inputs(reference_indices, device):
    """Autotuning benchmarks on made-up inputs: give block lists that are valid (every block
    listed, indices in range) and integer captured tensors that are safe indices (zeros)."""
    def num_blocks(node):
        sizes = concrete_sizes(node.get_size())
        listed = concrete_sizes(reference_indices.get_size())[-1]
        return torch.full(sizes, listed, dtype=torch.int32, device=device)

    def indices(node):
        sizes = concrete_sizes(node.get_size())
        return torch.arange(sizes[-1], dtype=torch.int32, device=device).expand(sizes).contiguous()

    return num_blocks, indices


def contiguous_buffer(size, dtype, device):
    """An output buffer with contiguous strides, fixed: kernels that index it as contiguous
    (the lse and max rows) must not get a buffer Inductor pads on GPUs."""
    return empty_strided(size, ir.FlexibleLayout.contiguous_strides(size), dtype=dtype, device=device)


def _zeros_like_node(node):
    sizes = concrete_sizes(node.get_size())
    return torch.zeros(sizes, dtype=node.get_dtype(), device=node.get_device())


def autotune_inputs(choices, fixed_generators: dict, first_captured: int):
    """The kernel's own arguments, in its order, and generators for autotuning inputs.

    The template takes the tensors captured by the mods in the order the inlined mods first
    read them, duplicates removed and inlined constants left out: not the order the lowering
    collected them in. Benchmarking the choices must use exactly these arguments. Integer
    captured tensors are index tables: made-up values would index out of range, so zeros.
    """
    kernel_inputs = list(choices[0].input_nodes)
    generators = dict(fixed_generators)
    for position, node in enumerate(kernel_inputs[first_captured:], start=first_captured):
        if not node.get_dtype().is_floating_point:
            generators[position] = _zeros_like_node
    return kernel_inputs, generators


@dataclass
class ForwardInputs:
    """The forward operator's inputs as the templates need them: realized IR, the mods as IR
    to inline, static sizes, and the kernel options of the forward direction."""

    options: dict
    device: torch.device
    score_ir: object
    mask_ir: object
    query: object
    key: object
    value: object
    kv_num_blocks: object
    kv_indices: object
    full_kv_num_blocks: object  # the partial lists again when the mask has no full blocks
    full_kv_indices: object
    has_full_blocks: bool
    score_mod_buffers: list
    mask_mod_buffers: list
    batch: object
    q_len: object
    kv_len: object
    q_heads: int
    kv_heads: int
    qk_dim: int
    v_dim: int
    sparse_q: int
    sparse_kv: int

    @property
    def captured(self) -> list:
        return [b for b in (*self.score_mod_buffers, *self.mask_mod_buffers) if isinstance(b, ir.IRNode)]

    def attach_subgraphs(self, out) -> None:
        """Inductor finds the symbols a template uses through these (dynamic shapes in captures)."""
        out.data.data.subgraph_inps = list(self.score_mod_buffers) + list(self.mask_mod_buffers)
        out.data.data.subgraph_outs = [*(self.score_ir if isinstance(self.score_ir, list) else [self.score_ir]),
                                       *(self.mask_ir if isinstance(self.mask_ir, list) else [self.mask_ir])]

    def constants(self, scale) -> dict:
        """Template constants shared by the forward and decode kernels."""
        return {
            "SPARSE_Q_BLOCK_SIZE": self.sparse_q,
            "SPARSE_KV_BLOCK_SIZE": self.sparse_kv,
            "QK_HEAD_DIM": self.qk_dim,
            "V_HEAD_DIM": self.v_dim,
            "QK_HEAD_DIM_ROUNDED": _round_head_dim(self.qk_dim),
            "V_HEAD_DIM_ROUNDED": _round_head_dim(self.v_dim),
            "GQA_SHARED_HEADS": self.q_heads // self.kv_heads,
            "HAS_FULL_BLOCKS": self.has_full_blocks,
            "SM_SCALE": scale,
            "PRESCALE_QK": self.options.get("PRESCALE_QK", False),
            "ROWS_GUARANTEED_SAFE": self.options.get("ROWS_GUARANTEED_SAFE", False),
            "BLOCKS_ARE_CONTIGUOUS": self.options.get("BLOCKS_ARE_CONTIGUOUS", False),
            "FLOAT32_PRECISION": float32_precision(),
        }


def prepare_forward_inputs(query, key, value, score_graph, block_mask, kernel_options,
                           score_mod_buffers, mask_mod_buffers) -> ForwardInputs:
    (_, _, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
     _, _, _, _, sparse_q, sparse_kv, mask_graph) = block_mask
    options = options_for(kernel_options, "fwd")
    score_ir, mask_ir = lower_subgraphs(query, score_graph, mask_graph, score_mod_buffers, mask_mod_buffers,
                                        fast_math=options.get("FAST_MATH", False))
    query, key, value, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices = realize(
        [query, key, value, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices]
    )
    score_mod_buffers = realize(score_mod_buffers)
    mask_mod_buffers = realize(mask_mod_buffers)
    freeze_irnodes(score_mod_buffers)
    freeze_irnodes(mask_mod_buffers)
    has_full_blocks = full_kv_num_blocks is not None
    if not has_full_blocks:  # the kernel never reads them; it still needs pointers
        full_kv_num_blocks, full_kv_indices = kv_num_blocks, kv_indices

    batch, q_heads, q_len, qk_dim = query.get_size()
    _, kv_heads, kv_len, v_dim = value.get_size()
    return ForwardInputs(
        options=options, device=query.get_device(), score_ir=score_ir, mask_ir=mask_ir,
        query=query, key=key, value=value, kv_num_blocks=kv_num_blocks, kv_indices=kv_indices,
        full_kv_num_blocks=full_kv_num_blocks, full_kv_indices=full_kv_indices, has_full_blocks=has_full_blocks,
        score_mod_buffers=score_mod_buffers, mask_mod_buffers=mask_mod_buffers,
        batch=batch, q_len=q_len, kv_len=kv_len, q_heads=_static(q_heads), kv_heads=_static(kv_heads),
        qk_dim=_static(qk_dim), v_dim=_static(v_dim), sparse_q=_static(sparse_q), sparse_kv=_static(sparse_kv),
    )


def lower_forward_triton(query, key, value, score_graph, block_mask, scale, kernel_options,
                         score_mod_buffers, mask_mod_buffers):
    inp = prepare_forward_inputs(query, key, value, score_graph, block_mask, kernel_options,
                                 score_mod_buffers, mask_mod_buffers)
    options, device, query = inp.options, inp.device, inp.query
    batch, q_heads, q_len, kv_len, v_dim = inp.batch, inp.q_heads, inp.q_len, inp.kv_len, inp.v_dim
    sparse_q, sparse_kv = inp.sparse_q, inp.sparse_kv

    layout = FixedLayout(device, query.get_dtype(), [batch, q_heads, q_len, v_dim],
                         stride=ir.FlexibleLayout.contiguous_strides([batch, q_heads, q_len, v_dim]))
    stats_dtype = torch.float32
    lse = contiguous_buffer([batch, q_heads, q_len], stats_dtype, device)
    row_max = contiguous_buffer([batch, q_heads, q_len], stats_dtype, device)

    shared = inp.constants(scale)
    qk_rounded, v_rounded = shared["QK_HEAD_DIM_ROUNDED"], shared["V_HEAD_DIM_ROUNDED"]
    q_span, kv_span = _span(q_len, sparse_q), _span(kv_len, sparse_kv)

    configs = forward_configs(device, query.get_dtype(), qk_rounded, v_rounded,
                              autotune=bool(inductor_config.max_autotune), mods_read_tensors=bool(inp.captured))
    choices, errors = [], []
    for config in configs:
        block_m = options.get("BLOCK_M") or fit_tile(sparse_q, config.block_m, q_span)
        block_n = options.get("BLOCK_N") or config.block_n
        if sparse_kv < block_n and "BLOCK_N" not in options:
            # Sparse KV blocks smaller than the tile: 64-wide tiles (gathering across blocks
            # of 16/32/48) measured faster than 128-wide ones (H200: block 64 ran at 0.77x
            # torch with 128, 1.05x with 64 on the H100; blocks 32/48 0.37x/0.56x vs 0.41x/0.70x).
            block_n = min(block_n, 64)
        # A tile that does not divide the KV sparse block gathers rows across blocks (full
        # width for blocks of 16 or 48); a sequence shorter than its block gets a fitted tile.
        gather_kv = sparse_kv % block_n != 0 and kv_span >= sparse_kv
        if kv_span < sparse_kv and "BLOCK_N" not in options:
            block_n = fit_tile(sparse_kv, config.block_n, kv_span)
        q_tile_fits = sparse_q % block_m == 0 or q_span < sparse_q
        kv_tile_fits = sparse_kv % block_n == 0 or kv_span < sparse_kv
        meta = dict(
            shared,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            Q_TILES_PER_BLOCK=-(-q_span // block_m),
            KV_TILES_PER_BLOCK=-(-kv_span // block_n),
            Q_TILE_FITS_BLOCK=q_tile_fits,
            KV_TILE_FITS_BLOCK=kv_tile_fits,
            CHECK_ROWS=not (sparse_q % block_m == 0 and _known_multiple(q_len, sparse_q)),
            GATHER_KV=gather_kv,
            CHECK_COLS=gather_kv or not (sparse_kv % block_n == 0 and _known_multiple(kv_len, sparse_kv)),
        )
        error = forward_template().maybe_append_choice(
            choices=choices,
            input_nodes=[query, inp.key, inp.value, lse, row_max, inp.kv_num_blocks, inp.kv_indices,
                         inp.full_kv_num_blocks, inp.full_kv_indices],
            layout=layout,
            subgraphs=[inp.score_ir, inp.mask_ir],
            mutated_inputs=[lse, row_max],
            call_sizes=query.get_size(),
            # A tile shrunk to fit a small sparse block needs fewer warps.
            num_warps=options.get("num_warps", max(4, config.num_warps * block_m // config.block_m)),
            num_stages=options.get("num_stages", config.num_stages),
            **meta,
        )
        if error is not None:
            errors.append(str(error))
    if not choices:
        raise RuntimeError("inductor_flex: no forward kernel configuration could be generated:\n" + "\n".join(errors))

    num_blocks_gen, indices_gen = _block_list_inputs(inp.kv_indices, device)
    kernel_inputs, input_gen_fns = autotune_inputs(
        choices, {5: num_blocks_gen, 6: indices_gen, 7: num_blocks_gen, 8: indices_gen}, first_captured=9)
    out = select_algorithm("inductor_flex_attention", choices, kernel_inputs, layout, input_gen_fns=input_gen_fns)
    inp.attach_subgraphs(out)
    return out, lse, row_max
