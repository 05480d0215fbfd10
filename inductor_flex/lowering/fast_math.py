"""Rewrites of score_mod graphs that make them cheaper inside the fused kernel.

Only applied for float16/bfloat16 inputs, whose scores are computed in float32 and rounded to
16 bits before the second matmul: these rewrites stay far below that rounding.

- Division by a constant becomes multiplication by its reciprocal (a float32 division is a
  reciprocal on the special-function unit plus a multiply; the multiply alone is enough).
- ``tanh``: libdevice's exact tanh makes soft-capping cost twice a plain causal attention,
  because the kernel is bound by the special-function unit (exp2 per score already). By
  default it becomes a rational function ``x·P(x²)/Q(x²)`` on a clamped argument, our own
  fit, evaluated with fused multiply-adds and one reciprocal: < 1e-6 absolute error.
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


# tanh(x) ≈ x·P(x²)/Q(x²) for |x| ≤ TANH_CLAMP (tanh(9) rounds to 1 in float32): coefficients
# from a relative-error (Lawson) fit in float64; evaluated in float32 the error is < 1e-6.
TANH_CLAMP = 9.0
TANH_P = (1.0, 0.12841469049453735, 0.0028610487934201956, 1.047638215823099e-05)
TANH_Q = (1.0, 0.46174609661102295, 0.0234459787607193, 0.0002260546461911872, 2.1603320021768013e-07)

# Which accurate tanh the default rewrite uses: "rational" (above) or "sigmoid" (2σ(2x) − 1,
# two special-function operations). A module constant so benchmarks can compare them.
TANH_FORM = "rational"


def _horner(graph, z, coefficients):
    """graph nodes for coefficients[0] + z·(coefficients[1] + z·(...))."""
    value = graph.call_function(aten.mul.Tensor, (z, coefficients[-1]))
    for c in reversed(coefficients[1:-1]):
        value = graph.call_function(aten.mul.Tensor, (graph.call_function(aten.add.Tensor, (value, c)), z))
    return graph.call_function(aten.add.Tensor, (value, coefficients[0]))


def _tanh_nodes(graph, x, form: str):
    """New graph nodes computing tanh(x) in the given form; the last one is the result."""
    call = graph.call_function
    if form == "hardware":
        return [call(tanh_approx_op()[0], (x,))]
    if form == "sigmoid":
        doubled = call(aten.mul.Tensor, (x, 2.0))
        sigmoid = call(aten.sigmoid.default, (doubled,))
        scaled = call(aten.mul.Tensor, (sigmoid, 2.0))
        return [call(aten.sub.Tensor, (scaled, 1.0))]
    clamped = call(aten.clamp_max.default, (call(aten.clamp_min.default, (x, -TANH_CLAMP)), TANH_CLAMP))
    z = call(aten.mul.Tensor, (clamped, clamped))
    numerator = call(aten.mul.Tensor, (clamped, _horner(graph, z, TANH_P)))
    return [call(aten.div.Tensor, (numerator, _horner(graph, z, TANH_Q)))]


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
    form = "hardware" if hardware_tanh else TANH_FORM
    rewritten = copy.deepcopy(graph_module)
    graph = rewritten.graph
    for node in targets(graph):
        if node.target is aten.tanh.default:
            _replace(graph, node, lambda node=node: _tanh_nodes(graph, node.args[0], form)[-1])
        else:
            x, divisor = node.args
            _replace(graph, node, lambda x=x, divisor=divisor: graph.call_function(aten.mul.Tensor, (x, 1.0 / divisor)))
    rewritten.recompile()
    return rewritten
