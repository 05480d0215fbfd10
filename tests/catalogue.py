"""The variant catalogue shared by the CPU tests (and, later, the GPU tier).

A variant is a recipe: ``make_buffers(B, H, L, S, device)`` draws the tensors its mods close
over (fresh random data every call), and ``build(buffers)`` returns ``(score_mod, mask_mod)``
closing over exactly those tensors. Building the same variant over float64 copies of the
buffers gives the float64 oracle, with gradients for every learnable buffer.
"""

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass(frozen=True)
class Variant:
    name: str
    build: Callable  # buffers -> (score_mod | None, mask_mod | None)
    make_buffers: Callable = field(default=lambda B, H, L, S, device: {})
    learnable: tuple = ()  # names of buffers that get gradients


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _document_ids(length, device):
    """Random document boundaries: ids 0,0,0,1,1,2,... over ``length`` tokens."""
    starts = torch.rand(length, device=device) < 0.08
    starts[0] = False
    return torch.cumsum(starts.int(), 0).to(torch.int32)


def _noop(buffers):
    return None, None


def _causal_variant(buffers):
    return None, _causal


def _sliding_window(buffers, window=24):
    def sliding(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)

    return None, sliding


def _prefix_lm(buffers, prefix=40):
    def prefix_lm(b, h, q_idx, kv_idx):
        return (kv_idx < prefix) | (q_idx >= kv_idx)

    return None, prefix_lm


def _document(buffers):
    q_doc, kv_doc = buffers["q_doc"], buffers["kv_doc"]

    def document_causal(b, h, q_idx, kv_idx):
        return (q_doc[q_idx] == kv_doc[kv_idx]) & (q_idx >= kv_idx)

    return None, document_causal


def _document_buffers(B, H, L, S, device):
    ids = _document_ids(max(L, S), device)
    return {"q_doc": ids[:L].clone(), "kv_doc": ids[:S].clone()}


def _dilated(buffers, dilation=3):
    def dilated(b, h, q_idx, kv_idx):
        return ((q_idx - kv_idx) % dilation == 0) & (q_idx >= kv_idx)

    return None, dilated


def _global_local(buffers, num_global=8, window=16):
    def global_local(b, h, q_idx, kv_idx):
        local = (q_idx - kv_idx).abs() <= window
        return local | (kv_idx < num_global) | (q_idx < num_global)

    return None, global_local


def _alibi(buffers):
    slopes = buffers["slopes"]

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    return alibi, _causal


def _alibi_buffers(B, H, L, S, device):
    return {"slopes": torch.rand(H, device=device) * 0.25}


def _softcap(buffers, cap=4.0):
    def softcap(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    return softcap, None


def _relative_position(buffers):
    table = buffers["table"]
    offset = table.numel() // 2

    def relative(score, b, h, q_idx, kv_idx):
        return score + table[q_idx - kv_idx + offset]

    return relative, None


def _relative_buffers(B, H, L, S, device):
    return {"table": torch.randn(2 * max(L, S) + 1, device=device) * 0.5}


def _head_batch_bias(buffers):
    bias = buffers["bias_bh"]

    def head_batch(score, b, h, q_idx, kv_idx):
        return score * (1.0 + 0.1 * h) + bias[b, h]

    return head_batch, None


def _head_batch_buffers(B, H, L, S, device):
    return {"bias_bh": torch.randn(B, H, device=device)}


def _learnable_bias(buffers):
    bias = buffers["bias"]

    def full_bias(score, b, h, q_idx, kv_idx):
        return score + bias[b, h, q_idx, kv_idx]

    return full_bias, _causal


def _learnable_bias_buffers(B, H, L, S, device):
    return {"bias": torch.randn(B, H, L, S, device=device) * 0.5}


def _constant_index(buffers):
    """Captured tensors read at constant positions too: ``table[h, 1]``, ``table[0, 2]``,
    ``window[0]`` (Inductor turns the constants into 0-d index tensors)."""
    table, window = buffers["head_table"], buffers["window"]

    def constant_index(score, b, h, q_idx, kv_idx):
        return score + table[h, 1] - 0.05 * table[0, 2] * (q_idx - kv_idx).abs()

    def within_window(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= window[0]

    return constant_index, within_window


def _constant_index_buffers(B, H, L, S, device):
    return {"head_table": torch.randn(H, 3, device=device) * 0.5,
            "window": torch.tensor([17], dtype=torch.int32, device=device)}


def _softcap_document(buffers):
    score_mod, _ = _softcap(buffers)
    _, mask_mod = _document(buffers)
    return score_mod, mask_mod


CATALOGUE = [
    Variant("noop", _noop),
    Variant("causal", _causal_variant),
    Variant("sliding_window", _sliding_window),
    Variant("prefix_lm", _prefix_lm),
    Variant("document", _document, _document_buffers),
    Variant("dilated", _dilated),
    Variant("global_local", _global_local),
    Variant("alibi", _alibi, _alibi_buffers, learnable=("slopes",)),
    Variant("softcap", _softcap),
    Variant("relative_position", _relative_position, _relative_buffers, learnable=("table",)),
    Variant("head_batch_bias", _head_batch_bias, _head_batch_buffers, learnable=("bias_bh",)),
    Variant("learnable_bias", _learnable_bias, _learnable_bias_buffers, learnable=("bias",)),
    Variant("softcap_document", _softcap_document, _document_buffers),
    Variant("constant_index", _constant_index, _constant_index_buffers, learnable=("head_table",)),
]
BY_NAME = {v.name: v for v in CATALOGUE}
