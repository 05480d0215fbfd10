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

import contextlib
import math
import numbers
import warnings
from typing import NamedTuple

import torch

from ._compat.dynamo import (compiler_stance, disable_cache_limit, export_compilation_env, is_dynamo_supported,
                             mark_static)
from .block_mask import BlockMask, _sliced_mask_mod_unavailable, full_block_mask, padding_as_block_zero
from .block_regroup import regroup_blocks, regrouped_block_size
from .compile_check import warn_if_uncompiled
from .kernel_options import validate_kernel_options
from .mods import MASK_MOD_ARITY, SCORE_MOD_ARITY, check_mod_arity, identity_score_mod
from .ops import flex_attention_op
from .reference import working_dtype


class AuxRequest(NamedTuple):
    """Which auxiliary outputs to return beside the attention output."""

    lse: bool = False
    max_scores: bool = False


class AuxOutput(NamedTuple):
    """Auxiliary outputs; a field is None unless it was requested."""

    lse: torch.Tensor | None = None
    max_scores: torch.Tensor | None = None


def _autocast(query, key, value):
    """q, k, v in autocast's dtype when torch.autocast is on for their device, as torch's flex
    attention casts them (floating tensors on that device, float64 excepted)."""
    tensors = (query, key, value)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return tensors  # _validate_tensors names the wrong argument
    device_type = query.device.type
    # A literal list, not torch.amp.is_autocast_available: Dynamo would put that call in the graph.
    if device_type not in ("cpu", "cuda", "xpu") or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if t.is_floating_point() and t.device.type == device_type and t.dtype != torch.float64 else t
        for t in tensors
    )


def _validate_tensors(query, key, value, enable_gqa):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}; pass a (B, H, L, E) tensor")
        if t.is_nested:
            raise ValueError(f"{name} is a nested tensor; pad it into a dense (B, H, L, E) tensor")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D (batch, heads, sequence, head_dim), got shape {tuple(t.shape)}; "
                "add missing dims with unsqueeze (e.g. x.unsqueeze(1) for a single head)"
            )
        if not t.is_floating_point():
            raise TypeError(
                f"{name} must be a floating-point tensor, got dtype {t.dtype}; convert it with "
                ".to(torch.bfloat16), .half() or .float()"
            )
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
            "sequence length (only their last dim may differ); pass the key and value of the same tokens"
        )
    if query.size(-1) != key.size(-1):
        raise ValueError(
            f"query and key must have the same head dim (E), got {query.size(-1)} and {key.size(-1)}; "
            "project them to one head dim (only value's may differ)"
        )
    if query.size(-1) == 0:
        raise ValueError(
            "query and key have head dim E=0: a score is a dot product over E, so there is nothing "
            "to attend with; give them a head dim E >= 1"
        )
    batch_q, batch_kv = query.size(0), key.size(0)
    if batch_kv not in (batch_q, 1):
        raise ValueError(
            f"key/value batch size {batch_kv} must equal the query batch size {batch_q} (or be 1 to "
            "broadcast over it)"
        )
    heads_q, heads_kv = query.size(1), key.size(1)
    if heads_kv == 0 and heads_q != 0:
        raise ValueError(
            f"key/value have 0 heads but query has {heads_q}; give key/value at least one head"
        )
    if not enable_gqa and heads_q != heads_kv:
        raise ValueError(
            f"query has {heads_q} heads but key/value have {heads_kv}; pass enable_gqa=True for "
            "grouped-query attention"
        )
    if enable_gqa and heads_kv != 0 and heads_q % heads_kv != 0:
        raise ValueError(
            f"with enable_gqa=True the number of query heads ({heads_q}) must be a multiple of the "
            f"number of key/value heads ({heads_kv}); repeat key/value heads "
            "(e.g. key.repeat_interleave(n, dim=1)) or change the head counts"
        )


def _validate_scale(scale, head_dim):
    """The softmax scale: ``1/sqrt(head_dim)`` for None, else a finite real number as a float."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    # Real numbers (numpy scalars included) convert exactly; a tensor would need a device sync.
    is_number = isinstance(scale, (int, float)) or (
        isinstance(scale, numbers.Real) and not isinstance(scale, torch.Tensor)
    )
    if isinstance(scale, bool) or not is_number:
        raise TypeError(
            f"scale must be a Python float or None, got {type(scale).__name__}; pass a number "
            "(for a 0-d tensor: scale.item())"
        )
    scale = float(scale)
    # Not math.isfinite: a scale Dynamo made symbolic (it changed between calls) compares, but
    # math.isfinite of it is a graph break.
    if scale != scale or abs(scale) == math.inf:
        raise ValueError(f"scale must be finite, got {scale}; pass a finite float (or None for 1/sqrt(head_dim))")
    return scale


def _from_torch_block_mask(block_mask):
    """torch's BlockMask as ours (the same fields, the same meaning), so that a mask built with
    torch's create_block_mask keeps working after switching flex_attention's import; anything
    else is returned as it is."""
    import torch.nn.attention.flex_attention as torch_flex  # public; imported only when needed

    if isinstance(block_mask, BlockMask) or not isinstance(block_mask, torch_flex.BlockMask):
        return block_mask
    lists = []
    for direction in ("kv", "full_kv", "q", "full_q"):  # torch lets padding slots hold anything
        num_blocks, indices = getattr(block_mask, f"{direction}_num_blocks"), getattr(block_mask, f"{direction}_indices")
        lists += [num_blocks, padding_as_block_zero(num_blocks, indices)]
    return BlockMask(block_mask.seq_lengths, *lists, BLOCK_SIZE=block_mask.BLOCK_SIZE, mask_mod=block_mask.mask_mod)


def _with_q_blocks(block_mask: BlockMask) -> BlockMask:
    """``block_mask`` with its Q-direction lists, derived from the KV ones where it has none
    (``from_kv_blocks(..., compute_q_blocks=False)``): the backward walks them."""
    if block_mask.q_indices is not None:
        return block_mask
    return BlockMask.from_kv_blocks(
        block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks,
        block_mask.full_kv_indices, BLOCK_SIZE=block_mask.BLOCK_SIZE, mask_mod=block_mask.mask_mod,
        seq_lengths=block_mask.seq_lengths,
    )


def _validate_block_mask(block_mask, query, key):
    if not isinstance(block_mask, BlockMask):
        raise TypeError(
            f"block_mask must be an inductor_flex.BlockMask (from create_block_mask), got "
            f"{type(block_mask).__name__}"
        )
    # Only tensors read here before are read (kv_num_blocks, q_indices): the order in which a
    # compiled graph first reads its inputs is their order in the graph.
    if block_mask.kv_num_blocks.dim() != 3:
        raise ValueError(
            f"block_mask must have [B, H, rows, cols] block lists, got kv_num_blocks of shape "
            f"{tuple(block_mask.kv_num_blocks.shape)}; build it with "
            "create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN) (B or H None for 1), or give "
            "BlockMask.from_kv_blocks 4-D kv_indices"
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
    q_block, kv_block = block_mask.BLOCK_SIZE
    # Columns from q_indices where it exists (see above); a mask without Q lists gets them later.
    rows = block_mask.kv_num_blocks.size(-1)
    cols = block_mask.q_indices.size(-2) if block_mask.q_indices is not None else block_mask.kv_indices.size(-1)
    if rows * q_block < q_len or cols * kv_block < kv_len:
        raise ValueError(
            f"block_mask's lists cover {rows}x{cols} blocks of {q_block}x{kv_block}, fewer than its "
            f"lengths {q_len}/{kv_len} need; give BlockMask.from_kv_blocks one row per query block and "
            "one column per key block (or seq_lengths that match them)"
        )
    if block_mask.mask_mod is _sliced_mask_mod_unavailable:
        raise ValueError(
            "block_mask was sliced along its query blocks (or with a tensor), which drops its mask_mod; "
            "assign one for the slice: `sliced.mask_mod = my_mask_mod_for_the_slice`"
        )


def _validate_return_aux(return_aux) -> AuxRequest | None:
    """``return_aux`` as our AuxRequest: torch's own AuxRequest is taken too, so code that still
    imports it from torch keeps working after switching flex_attention's import."""
    if return_aux is None or isinstance(return_aux, AuxRequest):
        return return_aux
    import torch.nn.attention.flex_attention as torch_flex  # public; imported only when needed

    torch_request = getattr(torch_flex, "AuxRequest", None)
    if torch_request is not None and isinstance(return_aux, torch_request):
        return AuxRequest(lse=bool(return_aux.lse), max_scores=bool(return_aux.max_scores))
    raise TypeError(
        f"return_aux must be an AuxRequest or None, got {type(return_aux).__module__}."
        f"{type(return_aux).__qualname__}; pass e.g. return_aux=AuxRequest(lse=True)"
    )


def _is_empty(query, key, value) -> bool:
    """No score to compute: an empty batch, no heads, no queries or no keys (static under Dynamo:
    sizes 0 and 1 are always specialised)."""
    return query.size(0) == 0 or query.size(1) == 0 or query.size(2) == 0 or key.size(2) == 0


def _attention_without_scores(query, key, value):
    """What attention gives when nothing is scored, as torch's SDPA: rows with no key attended
    are 0 (lse and max -inf); meta tensors get the shapes only.

    Written with zero-size slices of the inputs, so autograd gives q, k and v gradients (zero
    or empty, never NaN) like any other call.
    """
    anchor = sum(t.narrow(-1, 0, 0).sum() for t in (query, key, value))
    batch, heads, q_len = query.shape[:3]
    stats_dtype = working_dtype(query.dtype)
    out = query.new_zeros(batch, heads, q_len, value.size(-1)) + anchor
    lse = query.new_full((batch, heads, q_len), -math.inf, dtype=stats_dtype) + anchor.to(stats_dtype)
    max_scores = query.new_full((batch, heads, q_len), -math.inf, dtype=stats_dtype)
    return out, lse, max_scores


def _results(out, lse, max_scores, return_aux, return_lse):
    if return_aux is not None:
        return out, AuxOutput(
            lse=lse if return_aux.lse else None,
            max_scores=max_scores if return_aux.max_scores else None,
        )
    if return_lse:
        return out, lse
    return out


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


def _operator_for_this_call():
    """The eager path, or under a (non-strict) torch.export the same capture in the environment
    torch's own operators use there: a plain torch.compile is skipped inside an export, and the
    operator would be traced with score_mod's closure tensors baked in as fake constants."""
    if not (torch.compiler.is_exporting() and export_compilation_env is not None):
        return _eager_operator()

    def in_export(*args):
        with export_compilation_env() as backend:
            backend = backend or "eager"  # the eager backend with export's modes, or plain eager
            return torch.compile(_call_operator, backend=backend, fullgraph=True, dynamic=False)(*args)

    return in_export


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
    query, key, value = _autocast(query, key, value)
    _validate_tensors(query, key, value, enable_gqa)
    if score_mod is None:
        score_mod = identity_score_mod
    check_mod_arity(score_mod, SCORE_MOD_ARITY, "score_mod")
    if kernel_options is not None and not isinstance(kernel_options, dict):
        raise TypeError(
            f"kernel_options must be a dict or None, got {type(kernel_options).__name__}; "
            "pass e.g. kernel_options={'BLOCK_M': 64}"
        )
    validate_kernel_options(kernel_options or {})
    return_aux = _validate_return_aux(return_aux)
    options = dict(kernel_options or {})
    if block_mask is None:
        block_mask = full_block_mask(query.size(-2), key.size(-2), device=query.device)
        # We built it: every row lists blocks 0, 1, 2, ... so kernels need not load the list.
        options.setdefault("BLOCKS_ARE_CONTIGUOUS", True)
    block_mask = _from_torch_block_mask(block_mask)
    _validate_block_mask(block_mask, query, key)
    block_mask = _with_q_blocks(block_mask)
    check_mod_arity(block_mask.mask_mod, MASK_MOD_ARITY, "mask_mod")
    scale = _validate_scale(scale, query.size(-1))
    if return_lse and return_aux is not None:
        raise ValueError("pass either return_lse=True or return_aux=AuxRequest(...), not both")
    if return_lse and not torch.compiler.is_dynamo_compiling():
        # Not under Dynamo: it cannot trace warnings.warn, and fullgraph=True would fail on it.
        warnings.warn(
            "return_lse is deprecated; use return_aux=AuxRequest(lse=True)", FutureWarning, stacklevel=2
        )
    if _is_empty(query, key, value) or query.device.type == "meta":
        return _results(*_attention_without_scores(query, key, value), return_aux, return_lse)
    regrouped_size = regrouped_block_size(block_mask, query) if torch.compiler.is_dynamo_compiling() else None
    if regrouped_size is not None:
        # Small blocks would give the fused kernels small or gathered tiles (block_regroup.py).
        block_mask = regroup_blocks(block_mask, regrouped_size)
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
        # Not what a torch.compile user asked for (recompile limit), or unfused on a GPU: say so.
        warn_if_uncompiled(query.device)
        # The capture below is what gives closure tensors their gradients, so it must run
        # whatever the user's compiler stance ("force_eager" would skip it silently, a
        # "fail_on_recompile" would fail on a new score_mod); and each new score_mod is a new
        # capture, so the cache limit must not turn them into uncaptured runs either.
        stance = contextlib.nullcontext() if compiler_stance() == "default" else torch.compiler.set_stance("default")
        with stance, disable_cache_limit():
            out, lse, max_scores = _operator_for_this_call()(*args)
    return _results(out, lse, max_scores, return_aux, return_lse)
