"""Lowering of the forward operator: the fused template, or the chunked decomposition.

The choice explains itself: ``template_refusals`` lists every reason the fused template cannot
run. With ``BACKEND="TRITON"`` a refusal is an error carrying those reasons; with the default
``"AUTO"`` the decomposition (compiled by Inductor, memory O(chunk × S)) runs instead and says
so in a warning, once per reason: never a silent slow path.
"""

import warnings

import torch

from .._compat.inductor import inductor_config
from ..kernel_options import options_for

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256

# Query lengths up to this (static) run the decode kernel (lowering/triton_decode.py) instead of
# the forward template; kernel_options FORCE_USE_FLEX_ATTENTION=True keeps the forward template.
# Measured (H200, bf16, B8 Hq32 Hkv8 D128, Lkv 8k; docs/benchmarks.md): the decode kernel takes
# 0.52-0.56x the forward template's time up to Lq 32 and 1.10x at 64; 16 is what the GPU tier covers.
DECODE_MAX_QUERY_LEN = 16


def runs_triton(device) -> bool:
    """Does Inductor generate Triton for this device (GPUs, or CPU with cpu_backend="triton")?"""
    return device.type != "cpu" or inductor_config.cpu_backend == "triton"


def template_refusals(query, value) -> list[str]:
    """Why the fused Triton forward template cannot run these inputs (empty: it can)."""
    reasons = []
    if not runs_triton(query.get_device()):
        reasons.append(f"Inductor generates C++, not Triton, for {query.get_device().type} tensors")
    if query.get_dtype() not in SUPPORTED_DTYPES:
        reasons.append(f"dtype {query.get_dtype()} (the template runs float16, bfloat16 and float32)")
    qk_dim, v_dim = query.get_size()[-1], value.get_size()[-1]
    if qk_dim > MAX_HEAD_DIM or v_dim > MAX_HEAD_DIM:
        reasons.append(f"head dims {qk_dim}/{v_dim} above {MAX_HEAD_DIM} (the tiles would not fit in shared memory)")
    return reasons


_warned = set()


def explain_decomposition(backend, reasons, device, direction: str, option: str, forced_error: str) -> None:
    """Before the decomposition replaces a refused template: a forced TRITON raises the reasons;
    AUTO on a GPU warns once per set of reasons. On a C++ device the decomposition is the
    design, not a fallback: nothing to say."""
    if backend == "TRITON":
        raise NotImplementedError(f"inductor_flex: {forced_error}: " + "; ".join(reasons))
    gpu_reasons = reasons if runs_triton(device) else []
    if gpu_reasons and (direction, tuple(gpu_reasons)) not in _warned:
        _warned.add((direction, tuple(gpu_reasons)))
        warnings.warn(
            f"inductor_flex: the fused {direction} kernel cannot run (" + "; ".join(gpu_reasons) + "); using the "
            "query-chunked decomposition compiled by Inductor instead, which is slower. Pass "
            f"kernel_options={{'{option}': 'DECOMPOSED'}} to choose it explicitly.",
            stacklevel=3,
        )


def lower_forward(query, key, value, score_graph, block_mask, scale, kernel_options,
                  score_mod_buffers, mask_mod_buffers):
    backend = options_for(kernel_options, "fwd").get("BACKEND", "AUTO")
    reasons = template_refusals(query, value) if backend != "DECOMPOSED" else []
    args = (query, key, value, score_graph, block_mask, scale, kernel_options, score_mod_buffers, mask_mod_buffers)
    if backend != "DECOMPOSED" and not reasons:
        from .triton_decode import decode_refusals, lower_decode_triton

        if not decode_refusals(query, value, block_mask, kernel_options, DECODE_MAX_QUERY_LEN):
            return lower_decode_triton(*args)
        from .triton_forward import lower_forward_triton

        return lower_forward_triton(*args)
    explain_decomposition(backend, reasons, query.get_device(), "forward", "BACKEND",
                          forced_error="BACKEND='TRITON' cannot run here")
    from .decomposed import lower_forward_decomposed

    return lower_forward_decomposed(*args)
