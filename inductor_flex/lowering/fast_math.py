"""Rewrites of score_mod graphs that make them cheaper inside the fused kernel.

Only applied for float16/bfloat16 inputs. Today: ``tanh``, which libdevice computes exactly at
the price of soft-capping costing twice a plain causal attention, becomes

- by default ``2·sigmoid(2x) − 1``: the hardware exponential, error a few float32 ulps (absolute);
- with ``kernel_options={"FAST_MATH": True}`` on NVIDIA GPUs, the one-instruction hardware
  ``tanh.approx.f32`` (our operator ``inductor_flex::tanh_approx``, lowered to inline PTX): faster
  still, but with ~5e-4 relative error, visible in the float32 lse though not in a bf16 output.
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


def _replace_tanh(graph, node, hardware_tanh: bool):
    (x,) = node.args
    with graph.inserting_before(node):
        if hardware_tanh:
            new_nodes = [graph.call_function(tanh_approx_op()[0], (x,))]
        else:
            doubled = graph.call_function(aten.mul.Tensor, (x, 2.0))
            sigmoid = graph.call_function(aten.sigmoid.default, (doubled,))
            scaled = graph.call_function(aten.mul.Tensor, (sigmoid, 2.0))
            new_nodes = [doubled, sigmoid, scaled, graph.call_function(aten.sub.Tensor, (scaled, 1.0))]
    for new in new_nodes:
        new.meta = dict(node.meta)
    node.replace_all_uses_with(new_nodes[-1])
    graph.erase_node(node)


def rewrite_for_speed(graph_module: torch.fx.GraphModule, device: torch.device,
                      fast_math: bool = False) -> torch.fx.GraphModule:
    """A copy of ``graph_module`` with the rewrites applied (the original is left untouched)."""
    def tanh_nodes(graph):
        return [n for n in graph.nodes if n.op == "call_function" and n.target is aten.tanh.default]

    if not tanh_nodes(graph_module.graph):
        return graph_module
    hardware_tanh = fast_math and device.type == "cuda" and torch.version.cuda is not None
    rewritten = copy.deepcopy(graph_module)
    for node in tanh_nodes(rewritten.graph):
        _replace_tanh(rewritten.graph, node, hardware_tanh)
    rewritten.recompile()
    return rewritten
