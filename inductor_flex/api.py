"""``flex_attention()``: validate inputs (each error names the fix), then call the operator.

Same name and signature as ``torch.nn.attention.flex_attention.flex_attention`` (torch 2.13),
so switching is a one-line import change.

Two paths reach the forward operator:
- under ``torch.compile`` the operator is called directly and Dynamo captures the mods
  (``dynamo.py``);
- called eagerly, the call still goes through ``torch.compile(backend="eager",
  fullgraph=True)``: only Dynamo lifts the tensors a mod closes over into explicit inputs,
  and without that they would silently get no gradient.
"""

import math
import warnings
from typing import NamedTuple

import torch

from ._compat.dynamo import disable_cache_limit, is_dynamo_supported, mark_static
from .block_mask import BlockMask, full_block_mask
from .kernel_options import validate_kernel_options
from .mods import MASK_MOD_ARITY, SCORE_MOD_ARITY, check_mod_arity, identity_score_mod
from .ops import flex_attention_op


class AuxRequest(NamedTuple):
    """Which auxiliary outputs to return beside the attention output."""

    lse: bool = False
    max_scores: bool = False


class AuxOutput(NamedTuple):
    """Auxiliary outputs; a field is None unless it was requested."""

    lse: torch.Tensor | None = None
    max_scores: torch.Tensor | None = None


def _validate_tensors(query, key, value, enable_gqa):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.is_nested:
            raise ValueError(f"{name} is a nested tensor; pad it into a dense (B, H, L, E) tensor")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D (batch, heads, sequence, head_dim), got shape {tuple(t.shape)}; "
                "add missing dims with unsqueeze (e.g. x.unsqueeze(1) for a single head)"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            f"query, key and value must share one dtype, got {query.dtype}, {key.dtype}, {value.dtype}; "
            "convert them with .to(query.dtype)"
        )
    if not (query.device == key.device == value.device):
        raise ValueError(
            f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}; "
            "move them with .to(query.device)"
        )
    if key.shape[:3] != value.shape[:3]:
        raise ValueError(
            f"key {tuple(key.shape)} and value {tuple(value.shape)} must agree on batch, heads and "
            "sequence length (only their last dim may differ)"
        )
    if query.size(-1) != key.size(-1):
        raise ValueError(
            f"query and key must have the same head dim (E), got {query.size(-1)} and {key.size(-1)}"
        )
    batch_q, batch_kv = query.size(0), key.size(0)
    if batch_kv not in (batch_q, 1):
        raise ValueError(
            f"key/value batch size {batch_kv} must equal the query batch size {batch_q} (or be 1 to "
            "broadcast over it)"
        )
    heads_q, heads_kv = query.size(1), key.size(1)
    if not enable_gqa and heads_q != heads_kv:
        raise ValueError(
            f"query has {heads_q} heads but key/value have {heads_kv}; pass enable_gqa=True for "
            "grouped-query attention"
        )
    if enable_gqa and (heads_kv == 0 or heads_q % heads_kv != 0):
        raise ValueError(
            f"with enable_gqa=True the number of query heads ({heads_q}) must be a multiple of the "
            f"number of key/value heads ({heads_kv})"
        )


def _validate_block_mask(block_mask, query, key):
    if not isinstance(block_mask, BlockMask):
        raise TypeError(
            f"block_mask must be an inductor_flex.BlockMask (from create_block_mask), got "
            f"{type(block_mask).__name__}"
        )
    q_len, kv_len = query.size(-2), key.size(-2)
    mask_q_len, mask_kv_len = block_mask.seq_lengths
    if (q_len, kv_len) != (mask_q_len, mask_kv_len):
        hint = (
            "create a new block mask for these lengths"
            if q_len > mask_q_len or kv_len > mask_kv_len
            else "create a new block mask for these lengths, or crop this one with "
            f"block_mask._adjust({q_len}, {kv_len}) if its mask_mod allows"
        )
        raise ValueError(
            f"block_mask was created for Q_LEN={mask_q_len}, KV_LEN={mask_kv_len} but query/key have "
            f"lengths {q_len}/{kv_len}; {hint}"
        )
    mask_batch, mask_heads = block_mask.kv_num_blocks.shape[:2]
    if mask_batch not in (1, query.size(0)) or mask_heads not in (1, query.size(1)):
        raise ValueError(
            f"block_mask has batch {mask_batch} and heads {mask_heads}, which do not broadcast to the "
            f"query's batch {query.size(0)} and heads {query.size(1)}; create it with B={query.size(0)} "
            f"(or None) and H={query.size(1)} (or None)"
        )
    if block_mask.kv_num_blocks.device != query.device:
        raise ValueError(
            f"block_mask is on {block_mask.kv_num_blocks.device} but query is on {query.device}; "
            f"use block_mask.to({str(query.device)!r})"
        )
    if block_mask.q_indices is None:
        raise ValueError(
            "block_mask has no Q-direction block lists (q_indices); build it with "
            "BlockMask.from_kv_blocks(..., compute_q_blocks=True) or create_block_mask"
        )


def _call_operator(query, key, value, score_mod, block_mask, scale, kernel_options):
    # Dynamo needs a Python function with __code__ to trace; the operator object has none.
    return flex_attention_op(query, key, value, score_mod, block_mask, scale, kernel_options)


_eager_entry = None


def _eager_operator():
    """The eager path: the operator under torch.compile(backend="eager"), made on first use."""
    global _eager_entry
    if _eager_entry is None:
        # Static shapes: a new shape is a cheap re-trace, and nothing symbolic reaches the reference.
        _eager_entry = torch.compile(_call_operator, backend="eager", fullgraph=True, dynamic=False)
    return _eager_entry


def flex_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod=None,
    block_mask: BlockMask | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    kernel_options: dict | None = None,
    *,
    return_aux: AuxRequest | None = None,
):
    """Scaled dot-product attention with a user ``score_mod`` and a block-sparse ``block_mask``.

    Args:
        query: (B, Hq, L, E). key: (B or 1, Hkv, S, E). value: (B or 1, Hkv, S, Ev).
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score``; identity if None.
        block_mask: from :func:`create_block_mask`; every position attended if None.
        scale: multiplies q·kᵀ before score_mod; ``1/sqrt(E)`` if None.
        enable_gqa: allow Hq to be a multiple of Hkv (grouped-query attention).
        return_lse: deprecated, use ``return_aux=AuxRequest(lse=True)``.
        kernel_options: options for the fused kernels (block sizes, warps, ...).
        return_aux: which of lse (natural log) / max_scores to return in an :class:`AuxOutput`.

    Returns:
        ``out`` (B, Hq, L, Ev); ``(out, AuxOutput)`` when ``return_aux`` is given;
        ``(out, lse)`` when ``return_lse=True``.
    """
    _validate_tensors(query, key, value, enable_gqa)
    # Under Dynamo the mods' signatures cannot be inspected; a wrong arity fails its capture.
    checking_arity = not torch.compiler.is_dynamo_compiling()
    if score_mod is None:
        score_mod = identity_score_mod
    if checking_arity:
        check_mod_arity(score_mod, SCORE_MOD_ARITY, "score_mod")
    if kernel_options is not None and not isinstance(kernel_options, dict):
        raise TypeError(f"kernel_options must be a dict or None, got {type(kernel_options).__name__}")
    validate_kernel_options(kernel_options or {})
    options = dict(kernel_options or {})
    if block_mask is None:
        block_mask = full_block_mask(query.size(-2), key.size(-2), device=query.device)
        # We built it: every row lists blocks 0, 1, 2, ... so kernels need not load the list.
        options.setdefault("BLOCKS_ARE_CONTIGUOUS", True)
    _validate_block_mask(block_mask, query, key)
    if checking_arity:
        check_mod_arity(block_mask.mask_mod, MASK_MOD_ARITY, "mask_mod")
    if scale is None:
        scale = 1.0 / math.sqrt(query.size(-1))
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float or None, got {type(scale).__name__}")
    if return_lse and return_aux is not None:
        raise ValueError("pass either return_lse=True or return_aux=AuxRequest(...), not both")
    if return_lse:
        warnings.warn(
            "return_lse is deprecated; use return_aux=AuxRequest(lse=True)", FutureWarning, stacklevel=2
        )
    args = (query, key, value, score_mod, block_mask.as_tuple(), float(scale), options)

    if torch.compiler.is_dynamo_compiling():
        # Heads and head dims pick the kernel; keep them static under dynamic shapes.
        for t in (query, key, value):
            mark_static(t, -3)
            mark_static(t, -1)
        out, lse, max_scores = flex_attention_op(*args)
    else:
        if not is_dynamo_supported():
            raise RuntimeError("inductor_flex needs torch.compile (Dynamo), which this Python does not support")
        # Each new score_mod is a new compile; the cache limit must not turn them into eager runs.
        with disable_cache_limit():
            out, lse, max_scores = _eager_operator()(*args)

    if return_aux is not None:
        return out, AuxOutput(
            lse=lse if return_aux.lse else None,
            max_scores=max_scores if return_aux.max_scores else None,
        )
    if return_lse:
        return out, lse
    return out
