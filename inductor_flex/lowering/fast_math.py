"""Rewrites of score_mod graphs that make them cheaper inside the fused kernel.

Only applied for float16/bfloat16 inputs, whose scores are computed in float32 and rounded to
16 bits before the second matmul: these rewrites stay far below that rounding.

- Division by a constant becomes multiplication by its reciprocal (a float32 division is a
  reciprocal on the special-function unit plus a multiply; the multiply alone is enough).
- ``tanh``: libdevice's exact tanh makes soft-capping cost twice a plain causal attention,
  because the kernel is bound by the special-function unit (one exp2 per score already). By
  default it becomes ``2·sigmoid(2x) − 1``: the hardware exp2 and a reciprocal, error a few
  float32 ulps (absolute). A rational x·P(x²)/Q(x²) with one reciprocal was measured slower
  on an H100 (the multiply-adds become the bottleneck), so it is not used.
  With ``kernel_options={"FAST_MATH": True}`` on NVIDIA GPUs it becomes the one-instruction
  hardware ``tanh.approx.f32`` (our operator ``inductor_flex::tanh_approx``, inline PTX):
  faster still, but ~5e-4 relative error, visible in the float32 lse.
"""

import copy
import functools

import torch

from .._compat.inductor import make_pointwise, ops, register_lowering

aten = torch.ops.aten


@functools.cache
def tanh_approx_op():
    """Our operator for the hardware tanh: exact ``torch.tanh`` outside kernels, PTX inside."""
    library = torch.library.Library("inductor_flex", "FRAGMENT")
    library.define("tanh_approx(Tensor x) -> Tensor")
    library.impl("tanh_approx", torch.tanh, "CompositeExplicitAutograd")
    op = torch.ops.inductor_flex.tanh_approx.default

    def ptx_tanh(x):
        return ops.inline_asm_elementwise(
            x, asm="tanh.approx.f32 $0, $1;", constraints="=r,r", dtype=torch.float32, is_pure=True, pack=1
        )

    register_lowering(op, type_promotion_kind=None)(make_pointwise(ptx_tanh))
    return op, library


def _tanh_nodes(graph, x, hardware: bool):
    """The new graph node computing tanh(x): hardware tanh, or 2·sigmoid(2x) − 1."""
    call = graph.call_function
    if hardware:
        return call(tanh_approx_op()[0], (x,))
    sigmoid = call(aten.sigmoid.default, (call(aten.mul.Tensor, (x, 2.0)),))
    return call(aten.sub.Tensor, (call(aten.mul.Tensor, (sigmoid, 2.0)), 1.0))


def _replace(graph, node, build):
    """Replace ``node`` by the nodes ``build()`` inserts before it, copying its metadata."""
    before = set(graph.nodes)
    with graph.inserting_before(node):
        result = build()
    for new in set(graph.nodes) - before:
        new.meta = dict(node.meta)
    node.replace_all_uses_with(result)
    graph.erase_node(node)


def _is_division_by_constant(node) -> bool:
    return (node.op == "call_function" and node.target is aten.div.Tensor and len(node.args) == 2
            and not node.kwargs and isinstance(node.args[1], (int, float)) and node.args[1] != 0)


def rewrite_for_speed(graph_module: torch.fx.GraphModule, device: torch.device,
                      fast_math: bool = False) -> torch.fx.GraphModule:
    """A copy of ``graph_module`` with the rewrites applied (the original is left untouched)."""
    def targets(graph):
        return [n for n in graph.nodes
                if (n.op == "call_function" and n.target is aten.tanh.default) or _is_division_by_constant(n)]

    if not targets(graph_module.graph):
        return graph_module
    hardware_tanh = fast_math and device.type == "cuda" and torch.version.cuda is not None
    rewritten = copy.deepcopy(graph_module)
    graph = rewritten.graph
    for node in targets(graph):
        if node.target is aten.tanh.default:
            _replace(graph, node, lambda node=node: _tanh_nodes(graph, node.args[0], hardware_tanh))
        else:
            x, divisor = node.args
            _replace(graph, node, lambda x=x, divisor=divisor: graph.call_function(aten.mul.Tensor, (x, 1.0 / divisor)))
    rewritten.recompile()
    return rewritten
