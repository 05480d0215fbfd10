"""Decode checks shared by the interpreter and GPU tiers: one compiled call vs the float64 oracle,
and masks shaped like decoding (the few query tokens sit at the end of the KV sequence)."""

import math

import pytest
import torch

import oracle
from catalogue import Variant
from inductor_flex import AuxRequest, create_block_mask, flex_attention
from inductor_flex.block_mask import full_block_mask
from inductor_flex.lowering import triton_decode
from inductor_flex.reference import attention_reference


def _offset(buffers):
    return buffers["offset"]


def _decode_causal(buffers):
    offset = _offset(buffers)

    def decode_causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset

    return None, decode_causal


def _decode_sliding(buffers, window=50):
    offset = _offset(buffers)

    def decode_sliding(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx + offset) & (q_idx + offset - kv_idx < window)

    return None, decode_sliding


def _ragged_lengths(buffers):
    """Each sequence of the batch has its own cache length (captured tensor indexed by b);
    heads add an ALiBi bias (indexed by h) on top."""
    lengths, slopes = buffers["lengths"], buffers["slopes"]

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - lengths[b])

    def ragged(b, h, q_idx, kv_idx):
        return kv_idx < lengths[b]

    return alibi, ragged


def _offset_buffers(B, H, L, S, device):
    return {"offset": S - L}


def _ragged_buffers(B, H, L, S, device):
    lengths = torch.randint(0, S + 1, (B,), device=device, dtype=torch.int32)
    lengths[0] = S  # one full-length sequence; the others may be short or empty
    return {"lengths": lengths, "slopes": torch.rand(H, device=device) * 0.25}


DECODE_VARIANTS = [
    Variant("decode_causal", _decode_causal, _offset_buffers),
    Variant("decode_sliding", _decode_sliding, _offset_buffers),
    Variant("ragged_lengths", _ragged_lengths, _ragged_buffers),
]


@pytest.fixture
def decode_runs(monkeypatch):
    """Counts calls of the decode lowering, to prove the decode kernel ran."""
    calls = []
    original = triton_decode.lower_decode_triton

    def counting(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(triton_decode, "lower_decode_triton", counting)
    return calls


def check_decode(variant, *, B=1, Hq=2, Hkv=1, Lq=1, S=40, E=16, Ev=None, block_size=16, dtype=torch.float32,
                 shared_mask=False, kernel_options=None, device="cpu"):
    """Our compiled call vs the float64 reference: out, lse and max_scores, with the oracle's rule
    (error at most 2× the same-dtype reference's, no NaN).

    ``shared_mask``: the BlockMask has one batch and one head (packed GQA tiles); otherwise it
    has one per (batch, query head), so heads of a group may have their own block lists.
    """
    Ev = Ev or E
    buffers = variant.make_buffers(B, Hq, Lq, S, device)
    score_mod, mask_mod = variant.build(buffers)
    q = torch.randn(B, Hq, Lq, E, dtype=dtype, device=device)
    k = torch.randn(B, Hkv, S, E, dtype=dtype, device=device)
    v = torch.randn(B, Hkv, S, Ev, dtype=dtype, device=device)
    mask_b, mask_h = (None, None) if shared_mask else (B, Hq)
    block_mask = (create_block_mask(mask_mod, mask_b, mask_h, Lq, S, device=device, BLOCK_SIZE=block_size)
                  if mask_mod else None)
    compiled = torch.compile(flex_attention, fullgraph=True)
    out, aux = compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=Hq != Hkv,
                        kernel_options=kernel_options, return_aux=AuxRequest(lse=True, max_scores=True))

    fields = (block_mask or full_block_mask(Lq, S, device=device)).as_tuple()
    scale = 1.0 / math.sqrt(E)

    def reference(cast):
        tensors = {name: (t.to(cast) if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
                   for name, t in buffers.items()}
        ref_score, ref_mask = variant.build(tensors)
        ref_fields = fields[:-1] + (ref_mask or fields[-1],)
        return attention_reference(q.to(cast), k.to(cast), v.to(cast),
                                   ref_score or (lambda s, b, h, m, n: s), ref_fields, scale)

    gold, same = reference(torch.float64), reference(dtype)
    # The split-KV kernel normalises each split's partial result and merges them by their lse:
    # one more rounded term per split (up to one per KV block) than a single pass, which the
    # oracle's round-off floor counts (without it, float32 ragged_lengths once gave 4.2e-6 against
    # an eager error of 1.5e-6).
    splits = max(1, math.ceil(S / (block_size if isinstance(block_size, int) else block_size[1])))
    oracle.assert_within(f"{variant.name} out", out, gold[0], same[0], terms_per_element=splits, accumulated_terms=S)
    oracle.assert_within(f"{variant.name} lse", aux.lse, gold[1], same[1], terms_per_element=splits)
    oracle.assert_within(f"{variant.name} max", aux.max_scores, gold[2], same[2])
    return out, aux
