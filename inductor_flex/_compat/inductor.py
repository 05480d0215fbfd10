"""Private Inductor pieces: lowering registration, IR, templates and autotuning."""

import inspect

from torch._inductor import config as inductor_config
from torch._inductor import ir
from torch._inductor.lowering import empty_strided, make_pointwise, register_lowering
from torch._inductor.select_algorithm import TritonTemplate, autotune_select_algorithm, realize_inputs
from torch._inductor.virtualized import V, ops

__all__ = [
    "V",
    "TritonTemplate",
    "autotune_select_algorithm",
    "empty_strided",
    "inductor_config",
    "ir",
    "realize_inputs",
    "register_lowering",
]

from torch._inductor.ir import FixedLayout
from torch._inductor.kernel.flex.common import (
    build_subgraph_buffer,
    create_placeholder,
    freeze_irnodes,
    zeros_and_scatter_lowering,
)
from torch._inductor.select_algorithm import SymbolicGridFn, TritonTemplateKernel

# torch 2.13's template hook `modification(...)` types the index inputs with `input_dtypes=`;
# torch 2.11 has no such keyword and would take it as one more fixed input.
MODIFICATION_TAKES_INPUT_DTYPES = "input_dtypes" in inspect.signature(TritonTemplateKernel.modification).parameters


def select_algorithm(name, choices, input_nodes, layout, **kwargs):
    """autotune_select_algorithm returning the output node on both torch versions.

    torch 2.11 returns the node; torch 2.13 returns (node, choice).
    """
    result = autotune_select_algorithm(name, choices, input_nodes, layout, **kwargs)
    return result[0] if isinstance(result, tuple) else result


__all__ += [
    "FixedLayout",
    "MODIFICATION_TAKES_INPUT_DTYPES",
    "SymbolicGridFn",
    "build_subgraph_buffer",
    "create_placeholder",
    "freeze_irnodes",
    "select_algorithm",
    "zeros_and_scatter_lowering",
]

# ---------------------------------------------------------------- inlining an FX graph into V.graph

from torch._inductor.decomposition import select_decomp_table


def inline_graph_module(graph_module, args):
    """Lower every node of ``graph_module`` into the graph Inductor is lowering now (``V.graph``),
    placeholder ``i`` standing for ``args[i]`` (IR nodes, scalars or None); returns the value of
    its output node with the same structure.

    torch 2.13 has ``torch._inductor.lowering.process_subgraph_nodes`` for this; it is not known
    to exist in torch 2.11 and it rejects ``get_attr`` nodes, so this is our own equivalent over
    ``GraphLowering.run_node`` (present in both). Tensor constants the graph holds (``get_attr``)
    become IR constants the way ``GraphLowering.get_attr`` makes them.
    """
    import torch

    graph = V.graph
    placeholders = iter(args)
    output = None
    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            graph.env[node] = next(placeholders)
        elif node.op == "get_attr":
            value = graph_module
            for part in node.target.split("."):
                value = getattr(value, part)
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"cannot inline get_attr {node.target!r} of type {type(value).__name__}")
            if value.dim() == 0:
                graph.env[node] = ir.Constant(value=value.item(), dtype=value.dtype, device=value.device)
            else:
                graph.env[node] = graph.add_tensor_constant(value.detach().clone(), node.target.replace(".", "_"))
        elif node.op == "output":
            output_args, _ = graph.fetch_args_kwargs_from_env(node)
            output = output_args[0]
        else:
            graph.env[node] = graph.run_node(node)
    return output


import contextlib

import torch as _torch


@contextlib.contextmanager
def vmap_fallback_disabled():
    """Make vmap raise on an op without a batching rule instead of running it once per element
    (which, while tracing, would unroll one node per grid point). No-op where torch lacks the
    switch."""
    functorch = getattr(_torch._C, "_functorch", None)
    if not (hasattr(functorch, "_set_vmap_fallback_enabled") and hasattr(functorch, "_is_vmap_fallback_enabled")):
        yield
        return
    previous = functorch._is_vmap_fallback_enabled()
    functorch._set_vmap_fallback_enabled(False)
    try:
        yield
    finally:
        functorch._set_vmap_fallback_enabled(previous)


__all__ += ["inline_graph_module", "select_decomp_table", "vmap_fallback_disabled"]


def concrete_sizes(exprs) -> list[int]:
    """Example integer values for (possibly symbolic) sizes: `optimization_hints` in torch 2.13,
    `size_hints` before."""
    sizevars = V.graph.sizevars
    hints = getattr(sizevars, "optimization_hints", None) or sizevars.size_hints
    return [int(x) for x in hints(exprs)]


__all__ += ["concrete_sizes", "make_pointwise", "ops"]


def symint_for(expr):
    """A SymInt of the compiling graph's ShapeEnv standing for the sympy size ``expr`` (its
    hint the example value), for tracing code that must stay symbolic in that graph's sizes."""
    hint = concrete_sizes([expr])[0]
    return V.graph.sizevars.shape_env.create_symintnode(expr, hint=hint)


def guard_true(condition) -> None:
    """Guard the compiled graph on a sympy ``condition`` over its sizes (a call breaking it
    recompiles); the condition must hold at the example sizes."""
    if not V.graph.sizevars.shape_env.evaluate_expr(condition):
        raise AssertionError(f"inductor_flex: guard {condition} is false at the example sizes")


__all__ += ["guard_true", "symint_for"]


def loaded_positions(length, device):
    """``arange(length)`` (int64) as a realized buffer that consumers load from memory.

    Inductor inlines a computed buffer that reads nothing (an ``arange``) into its consumers
    (``ComputedBuffer.make_loader``), turning it back into index arithmetic; a buffer marked
    mutated is exempt, which is all the mark does here (the buffer has no other users)."""
    node = ir.Pointwise.create(device=device, dtype=_torch.int64,
                               inner_fn=lambda index: ops.index_expr(index[0], _torch.int64), ranges=[length])
    node.realize()
    V.graph.mark_buffer_mutated(node.get_name())
    return node


__all__ += ["loaded_positions"]
