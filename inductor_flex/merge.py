"""Merging partial attention states: the primitive of shared-prefix (cascade) decoding.

Attention over keys K = K₁ ∪ K₂ ∪ … can be computed piece by piece: each piece i gives its
normalised output ``out_i`` and its natural-log ``lse_i``, and

    lse = log Σ_i exp(lse_i),        out = Σ_i exp(lse_i − lse) · out_i

is exactly the attention over all of K. A batch of sequences that share a prompt prefix attends
the prefix once (one KV cache, broadcast over the batch) and its own suffix separately, then
merges the two states. ``flex_attention(..., return_aux=AuxRequest(lse=True))`` returns such a
state; the decode kernel merges its KV splits the same way.
"""

from collections.abc import Sequence

import torch


def _check_states(outputs, lses):
    if isinstance(outputs, torch.Tensor) or isinstance(lses, torch.Tensor):
        raise TypeError("merge_attention_states takes sequences of tensors: pass [out_1, out_2, ...] and "
                        "[lse_1, lse_2, ...] (use list(x.unbind(0)) to split a stacked tensor)")
    outputs, lses = list(outputs), list(lses)
    if not outputs:
        raise ValueError("merge_attention_states needs at least one state")
    if len(outputs) != len(lses):
        raise ValueError(f"got {len(outputs)} outputs but {len(lses)} lses: pass one lse per output")
    for i, (out, lse) in enumerate(zip(outputs, lses)):
        if not isinstance(out, torch.Tensor) or not isinstance(lse, torch.Tensor):
            raise TypeError(f"state {i}: outputs and lses must be tensors, got "
                            f"{type(out).__name__} and {type(lse).__name__}")
        if not out.is_floating_point() or not lse.is_floating_point():
            raise TypeError(f"state {i}: outputs and lses must be floating point, got {out.dtype} and {lse.dtype}")
        if out.dim() < 1:
            raise ValueError(f"state {i}: outputs must have a last (value) dim, got a 0-d tensor; pass [..., L, Ev] outputs")
        if tuple(out.shape[:-1]) != tuple(lse.shape):
            raise ValueError(
                f"state {i}: lse must have the output's shape without its last (value) dim: output "
                f"{tuple(out.shape)} needs lse {tuple(out.shape[:-1])}, got {tuple(lse.shape)}"
            )
        if out.device != outputs[0].device or lse.device != outputs[0].device:
            raise ValueError(f"state {i} is on {out.device}/{lse.device} but state 0 on {outputs[0].device}; "
                             f"move them to one device with .to(device)")
    try:
        shape = torch.broadcast_shapes(*(out.shape for out in outputs))
    except RuntimeError:
        shapes = ", ".join(str(tuple(out.shape)) for out in outputs)
        raise ValueError(f"the states' shapes {shapes} do not broadcast together: give them the same value dim "
                         f"and batch/head/query dims that are equal or 1") from None
    return outputs, lses, shape


def merge_attention_states(outputs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]):
    """Merge attention states computed over disjoint sets of keys into the state over their union.

    Args:
        outputs: ``N >= 1`` tensors ``[..., L, Ev]``, each the (normalised) attention output over
            one set of keys, e.g. ``[B, H, L, Ev]``.
        lses: ``N`` tensors ``[..., L]``, the natural-log sum of exp of the scores of each set
            (``AuxOutput.lse``); ``-inf`` marks a row that attended nothing in that set (its
            output is ignored).

    The states broadcast against each other like torch tensors (a shared prefix computed for
    batch 1 merges into every sequence of the batch). The merge is exact, accumulated in
    float32 (float64 if any input is float64).

    Returns:
        ``(out, lse)``: ``out`` in the outputs' promoted dtype, ``lse`` in the accumulation dtype.
        A row empty in every state gets output 0 and lse ``-inf``, never NaN.
    """
    outputs, lses, shape = _check_states(outputs, lses)
    any_double = any(t.dtype == torch.float64 for t in (*outputs, *lses))
    accumulate = torch.float64 if any_double else torch.float32
    out_dtype = outputs[0].dtype
    for out in outputs[1:]:
        out_dtype = torch.promote_types(out_dtype, out.dtype)

    stacked_lse = torch.stack([lse.to(accumulate).expand(shape[:-1]) for lse in lses])
    top = stacked_lse.amax(dim=0)
    shift = torch.where(top == float("-inf"), torch.zeros_like(top), top)
    weights = torch.exp(stacked_lse - shift)  # an empty state (-inf) weighs exactly 0
    total = weights.sum(dim=0)
    lse = shift + torch.log(total)  # log 0 = -inf: the row was empty everywhere
    # 0 · NaN would still be NaN: drop what an empty state holds, whatever it is.
    merged = sum(torch.where(w.unsqueeze(-1) > 0, w.unsqueeze(-1) * out.to(accumulate), 0.0)
                 for w, out in zip(weights, outputs))
    out = merged / torch.where(total == 0, torch.ones_like(total), total).unsqueeze(-1)
    return out.to(out_dtype), lse
