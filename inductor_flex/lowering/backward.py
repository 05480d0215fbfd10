"""Lowering of the backward operator: the query-chunked decomposition, on every device.

The fused Triton backward template replaces it on GPUs in the backward milestone.
"""


def lower_backward(query, key, value, out, lse, grad_out, grad_lse, score_graph, joint_graph, block_mask,
                   scale, kernel_options, score_mod_buffers, mask_mod_buffers):
    from .decomposed import lower_backward_decomposed

    return lower_backward_decomposed(query, key, value, out, lse, grad_out, grad_lse, score_graph,
                                     joint_graph, block_mask, scale, kernel_options, score_mod_buffers,
                                     mask_mod_buffers)
