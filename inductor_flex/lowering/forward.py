"""Lowering of the forward operator: pick the fused template or the chunked decomposition."""

from .._compat.inductor import inductor_config


def runs_triton(device) -> bool:
    """Does Inductor generate Triton for this device (GPUs, or CPU with cpu_backend="triton")?"""
    return device.type != "cpu" or inductor_config.cpu_backend == "triton"


def lower_forward(query, key, value, score_graph, block_mask, scale, kernel_options,
                  score_mod_buffers, mask_mod_buffers):
    if runs_triton(query.get_device()):
        from .triton_forward import lower_forward_triton

        return lower_forward_triton(query, key, value, score_graph, block_mask, scale, kernel_options,
                                    score_mod_buffers, mask_mod_buffers)
    from .decomposed import lower_forward_decomposed

    return lower_forward_decomposed(query, key, value, score_graph, block_mask, scale, kernel_options,
                                    score_mod_buffers, mask_mod_buffers)
