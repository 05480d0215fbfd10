"""Attention variants written as score_mod / mask_mod functions: the demo's gallery.

Each variant builds its mods from the tensors they close over (``captured``) instead of
globals, so the demo can build them twice: over the run's tensors for ``flex_attention`` and
over float64 copies for the reference. Floating-point captured tensors are learnable (they
get gradients); integer ones (document ids) are data.
"""

from dataclasses import dataclass
from typing import Callable

import torch

from .block_mask import and_masks, noop_mask, or_masks


@dataclass(frozen=True)
class Sizes:
    """Problem sizes: query, key and value are all (batch, heads, seq_len, head_dim)."""

    batch: int
    heads: int
    seq_len: int
    head_dim: int


def no_captures(sizes: Sizes, generator: torch.Generator) -> dict:
    return {}


@dataclass(frozen=True)
class Variant:
    """One gallery entry.

    ``captures(sizes, generator)`` makes the tensors the mods close over (on the CPU);
    ``mods(sizes, captured)`` returns ``(score_mod or None, mask_mod)`` closing over them.
    """

    name: str
    summary: str
    mods: Callable[[Sizes, dict], tuple]
    captures: Callable[[Sizes, torch.Generator], dict] = no_captures


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding_window_size(sizes: Sizes) -> int:
    return sizes.seq_len // 2


def prefix_length(sizes: Sizes) -> int:
    # Not a multiple of the block size, so the prefix edge cuts through blocks.
    return sizes.seq_len * 3 // 8


NUM_DOCUMENTS = 4
SOFTCAP = 30.0


def full_mods(sizes, captured):
    return None, noop_mask


def causal_mods(sizes, captured):
    return None, causal


def sliding_window_mods(sizes, captured):
    window = sliding_window_size(sizes)

    def within_window(b, h, q_idx, kv_idx):
        return q_idx - kv_idx < window

    return None, and_masks(causal, within_window)


def prefix_lm_mods(sizes, captured):
    prefix = prefix_length(sizes)

    def in_prefix(b, h, q_idx, kv_idx):
        return kv_idx < prefix

    return None, or_masks(in_prefix, causal)


def random_documents(sizes: Sizes, generator: torch.Generator) -> dict:
    """document_id[b, position]: each sequence cut into NUM_DOCUMENTS random-length documents."""
    document_ids = []
    for _ in range(sizes.batch):
        cuts = torch.randperm(sizes.seq_len - 1, generator=generator)[: NUM_DOCUMENTS - 1] + 1
        starts = torch.zeros(sizes.seq_len, dtype=torch.int32)
        starts[cuts] = 1
        document_ids.append(starts.cumsum(0, dtype=torch.int32))
    return {"document_id": torch.stack(document_ids)}


def document_mods(sizes, captured):
    document_id = captured["document_id"]

    def same_document(b, h, q_idx, kv_idx):
        return document_id[b, q_idx] == document_id[b, kv_idx]

    return None, same_document


def alibi_slopes(sizes: Sizes, generator: torch.Generator) -> dict:
    """The ALiBi paper's geometric slopes 2^(-8(h+1)/H), here learnable."""
    exponents = torch.arange(1, sizes.heads + 1, dtype=torch.float32) * (-8.0 / sizes.heads)
    return {"slopes": torch.exp2(exponents)}


def alibi_mods(sizes, captured):
    slopes = captured["slopes"]

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx).abs()

    return alibi, noop_mask


def causal_alibi_mods(sizes, captured):
    slopes = captured["slopes"]

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    return alibi, causal


def softcap_mods(sizes, captured):
    def softcap(score, b, h, q_idx, kv_idx):
        return SOFTCAP * torch.tanh(score / SOFTCAP)

    return softcap, causal


def relative_position_table(sizes: Sizes, generator: torch.Generator) -> dict:
    """A learnable bias per head and relative distance q_idx - kv_idx in (-S, S)."""
    return {"bias_table": 0.1 * torch.randn(sizes.heads, 2 * sizes.seq_len - 1, generator=generator)}


def relative_position_mods(sizes, captured):
    bias_table = captured["bias_table"]
    offset = sizes.seq_len - 1

    def relative_position_bias(score, b, h, q_idx, kv_idx):
        return score + bias_table[h, q_idx - kv_idx + offset]

    return relative_position_bias, noop_mask


GALLERY = (
    Variant("full", "every position attended (noop_mask)", full_mods),
    Variant("causal", "q_idx >= kv_idx", causal_mods),
    Variant("sliding_window", "causal, at most S/2 positions back (and_masks)", sliding_window_mods),
    Variant("prefix_lm", "bidirectional prefix of 3S/8, causal after it (or_masks)", prefix_lm_mods),
    Variant("document", f"{NUM_DOCUMENTS} random-length documents per sequence", document_mods, random_documents),
    Variant("alibi", "score - slope[h]·|q_idx - kv_idx|, learnable slopes", alibi_mods, alibi_slopes),
    Variant("causal_alibi", "causal mask + score + slope[h]·(kv_idx - q_idx)", causal_alibi_mods, alibi_slopes),
    Variant("softcap", f"causal, {SOFTCAP:g}·tanh(score/{SOFTCAP:g})", softcap_mods),
    Variant("rel_pos_bias", "score + table[h, q_idx - kv_idx], learnable table", relative_position_mods,
            relative_position_table),
)
