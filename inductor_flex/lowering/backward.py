"""Lowering of the backward operator: the fused Triton template, or the chunked decomposition.

Chosen like the forward (``forward.py``): ``backward_refusals`` lists every reason the fused
backward template cannot run; with ``BACKEND="TRITON"`` (``bwd_BACKEND`` for this direction
only) a refusal is an error carrying those reasons, with the default ``"AUTO"`` the
query-chunked decomposition runs instead and says so in a warning, once per set of reasons.
On a device for which Inductor generates C++ (the CPU) the decomposition is the design, not a
fallback, and nothing is warned.
"""

from ..kernel_options import options_for
from .forward import explain_decomposition, template_refusals


def _graph_module(subgraph):
    return getattr(subgraph, "graph_module", subgraph)


def backward_refusals(query, value, block_mask, joint_graph, score_mod_buffers):
    """(reasons the fused backward template cannot run these inputs, the captured-grad plan)."""
    reasons = template_refusals(query, value)
    if block_mask[6] is None or block_mask[7] is None:
        reasons.append("the BlockMask has no Q-direction block lists (it was built with compute_q_blocks=False)")
    if query.get_dtype() != value.get_dtype():
        reasons.append(f"mixed dtypes {query.get_dtype()}/{value.get_dtype()}")
    plan = None
    if not reasons:
        from .triton_backward import plan_captured_grads

        plan, plan_reasons = plan_captured_grads(_graph_module(joint_graph), score_mod_buffers)
        reasons += plan_reasons
    return reasons, plan


def lower_backward(query, key, value, out, lse, grad_out, grad_lse, score_graph, joint_graph, block_mask,
                   scale, kernel_options, score_mod_buffers, mask_mod_buffers):
    backend = options_for(kernel_options, "bwd").get("BACKEND", "AUTO")
    args = (query, key, value, out, lse, grad_out, grad_lse, score_graph, joint_graph, block_mask, scale,
            kernel_options, score_mod_buffers, mask_mod_buffers)
    reasons, plan = ([], None) if backend == "DECOMPOSED" else backward_refusals(
        query, value, block_mask, joint_graph, score_mod_buffers)
    if backend != "DECOMPOSED" and not reasons:
        from .triton_backward import lower_backward_triton

        return lower_backward_triton(*args, plan)
    explain_decomposition(backend, reasons, query.get_device(), "backward", "bwd_BACKEND",
                          forced_error="BACKEND='TRITON' cannot run the backward here")
    from .decomposed import lower_backward_decomposed

    return lower_backward_decomposed(*args)
