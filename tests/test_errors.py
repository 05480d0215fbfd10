"""Bad input gets a clear ValueError/TypeError naming the fix: never a crash or a wrong answer."""

import pytest
import torch

from inductor_flex import AuxRequest, create_block_mask, flex_attention


def _qkv(B=2, Hq=4, Hkv=4, L=32, S=32, E=16, Ev=16, dtype=torch.float32):
    return (
        torch.randn(B, Hq, L, E, dtype=dtype),
        torch.randn(B, Hkv, S, E, dtype=dtype),
        torch.randn(B, Hkv, S, Ev, dtype=dtype),
    )


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@pytest.mark.parametrize(
    "make, error, fix",
    [
        (lambda: (torch.randn(4, 32, 16), *_qkv()[1:]), ValueError, "unsqueeze"),
        (lambda: (_qkv()[0], torch.randn(2, 4, 32, 16, 1), _qkv()[2]), ValueError, "4-D"),
        (lambda: ([[1.0]], *_qkv()[1:]), TypeError, "torch.Tensor"),
        (lambda: (*_qkv()[:2], torch.randn(3, 4, 32, 16)), ValueError, "must agree"),
        (lambda: (_qkv(B=3)[0], *_qkv(B=2)[1:]), ValueError, "batch size"),
        (lambda: (_qkv(E=16)[0], *_qkv(E=32)[1:]), ValueError, "head dim"),
        (lambda: (_qkv()[0], *_qkv(dtype=torch.float64)[1:]), TypeError, ".to(query.dtype)"),
        (lambda: (_qkv()[0].int(), *_qkv()[1:]), TypeError, "floating-point"),
        (lambda: (_qkv(Hq=4)[0], *_qkv(Hkv=2)[1:]), ValueError, "enable_gqa=True"),
    ],
    ids=["rank3", "rank5", "not_tensor", "kv_mismatch", "batch", "head_dim", "dtype_mix", "int_dtype", "gqa"],
)
def test_bad_tensors(make, error, fix):
    with pytest.raises(error, match=fix.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
        flex_attention(*make())


def test_gqa_heads_not_divisible():
    q, _, _ = _qkv(Hq=6)
    _, k, v = _qkv(Hkv=4)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        flex_attention(q, k, v, enable_gqa=True)


def test_block_mask_for_other_lengths():
    q, k, v = _qkv(L=64, S=64)
    small = create_block_mask(_causal, None, None, 32, 32, device="cpu")
    with pytest.raises(ValueError, match="create a new block mask"):
        flex_attention(q, k, v, block_mask=small)
    large = create_block_mask(_causal, None, None, 128, 128, device="cpu")
    with pytest.raises(ValueError, match=r"_adjust\(64, 64\)"):
        flex_attention(q, k, v, block_mask=large)


def test_block_mask_batch_heads_do_not_broadcast():
    q, k, v = _qkv(B=2, Hq=4, Hkv=4)
    mask = create_block_mask(_causal, 3, 4, 32, 32, device="cpu")
    with pytest.raises(ValueError, match="do not broadcast"):
        flex_attention(q, k, v, block_mask=mask)


def test_block_mask_not_a_block_mask():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="create_block_mask"):
        flex_attention(q, k, v, block_mask=torch.ones(32, 32, dtype=torch.bool))


def test_score_mod_wrong_arity():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"score_mod\(score, b, h, q_idx, kv_idx\)"):
        flex_attention(q, k, v, score_mod=lambda score, b, h: score)


def test_mask_mod_wrong_arity():
    with pytest.raises(TypeError, match=r"mask_mod\(b, h, q_idx, kv_idx\)"):
        create_block_mask(lambda b, h, q_idx: q_idx > 0, 1, 1, 32, 32, device="cpu")


def test_score_mod_returning_int():
    q, k, v = _qkv()
    with pytest.raises(Exception, match="floating-point"):
        flex_attention(q, k, v, score_mod=lambda s, b, h, q_idx, kv_idx: q_idx - kv_idx)


def test_mask_mod_returning_float():
    with pytest.raises(TypeError, match="bool"):
        create_block_mask(lambda b, h, q_idx, kv_idx: (q_idx - kv_idx).float(), 1, 1, 32, 32, device="cpu")


def test_scale_must_be_a_number():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="scale"):
        flex_attention(q, k, v, scale=torch.tensor(0.5))


def test_return_lse_and_return_aux_together():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="either return_lse"):
        flex_attention(q, k, v, return_lse=True, return_aux=AuxRequest(lse=True))


def test_kernel_options_must_be_a_dict():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="kernel_options"):
        flex_attention(q, k, v, kernel_options=[("BLOCK_M", 64)])


def test_mask_mod_buffer_requiring_grad():
    q, k, v = (t.requires_grad_() for t in _qkv())
    threshold = torch.tensor(3.0, requires_grad=True)

    def learnable_mask(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx) < threshold

    mask = create_block_mask(learnable_mask, None, None, 32, 32, device="cpu")
    with pytest.raises(Exception, match="detach"):
        flex_attention(q, k, v, block_mask=mask)


def test_double_backward_is_refused():
    q, k, v = (t.requires_grad_() for t in _qkv())
    out = flex_attention(q, k, v)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), q, create_graph=True)


def test_graph_break_inside_score_mod_is_an_error():
    q, k, v = _qkv()

    def chatty(score, b, h, q_idx, kv_idx):
        print("tracing")  # a graph break: no silent eager run allowed
        return score

    with pytest.raises(Exception, match="must be traceable"):
        flex_attention(q, k, v, score_mod=chatty)
    with pytest.raises(Exception, match="must be traceable"):
        torch.compile(flex_attention)(q, k, v, score_mod=chatty)


@pytest.mark.parametrize(
    "options, error, fix",
    [
        ({"BLOCK_Q": 64}, ValueError, "unknown kernel option 'BLOCK_Q'"),
        ({"BLOCK_M": 48}, ValueError, "power of two >= 16"),
        ({"fwd_BLOCK_N": 8}, ValueError, "power of two >= 16"),
        ({"num_warps": 3}, ValueError, "one of 1, 2, 4, 8, 16"),
        ({"num_stages": 0}, ValueError, "int >= 1"),
        ({"PRESCALE_QK": 1}, TypeError, "True or False"),
        ({"BACKEND": "FLASH"}, ValueError, "not a backend of inductor_flex"),
    ],
    ids=["unknown", "block_m", "fwd_block_n", "warps", "stages", "bool", "backend"],
)
def test_bad_kernel_options(options, error, fix):
    q, k, v = _qkv()
    with pytest.raises(error, match=fix):
        flex_attention(q, k, v, kernel_options=options)


def test_unknown_kernel_option_under_fullgraph_names_it():
    """The close-match hint uses difflib, which Dynamo cannot trace: under fullgraph the error
    used to be Dynamo's "Failed to trace builtin operator", without our message."""
    q, k, v = _qkv()
    with pytest.raises(Exception, match="unknown kernel option 'BLOK_M'; known options"):
        torch.compile(flex_attention, fullgraph=True)(q, k, v, kernel_options={"BLOK_M": 64})


def test_forced_template_that_cannot_run_says_why():
    q, k, v = _qkv(dtype=torch.float64)
    with pytest.raises(Exception, match="BACKEND='TRITON' cannot run here.*float64"):
        torch.compile(flex_attention, fullgraph=True)(q, k, v, kernel_options={"BACKEND": "TRITON"})


# ---------------------------------------------------------------------------------------------
# The inventory: every input the public API rejects, one row each. docs/bad_inputs.md has one
# table row per entry (same id, exception and message fragment), checked below both ways, so
# the document cannot drift from the code.
# ---------------------------------------------------------------------------------------------

import pathlib
import re
from dataclasses import dataclass
from typing import Callable

from inductor_flex import BlockMask, PagedKVCache, and_masks, create_mask, merge_attention_states, or_masks

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "bad_inputs.md"
GPU = (pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))


@dataclass(frozen=True)
class Bad:
    id: str
    call: Callable  # call(attend): attend is flex_attention, or its compiled form for `compiled` rows
    error: type
    fix: str  # must appear in the message (and in the document's row)
    compiled: str = ""  # "same": same exception under torch.compile; "wrapped": message only
    marks: tuple = ()


def _mask(mask_mod=_causal, B=None, H=None, L=32, S=32, **kwargs):
    return create_block_mask(mask_mod, B, H, L, S, device="cpu", **kwargs)


def _with_mask_mod(mask_mod):
    mask = _mask()
    mask.mask_mod = mask_mod
    return mask


def _lists(rows=2, cols=2, num=1, index=0, dtype=torch.int32):
    return torch.full((1, 1, rows), num, dtype=dtype), torch.full((1, 1, rows, cols), index, dtype=dtype)


def _cache(**kwargs):
    options = dict(n_pages=4, page_size=16, max_batch_size=2, num_kv_heads=2, head_dim=8, device="cpu")
    return PagedKVCache(**{**options, **kwargs})


def _reserved_cache(**kwargs):
    cache = _cache(**kwargs)
    cache.reserve(0, 20)
    return cache


def _kv_new(*shape, **kwargs):
    return torch.zeros(*shape, **kwargs), torch.zeros(*shape)


def _learnable_mask_mod():
    threshold = torch.tensor(3.0, requires_grad=True)
    return lambda b, h, q_idx, kv_idx: (q_idx - kv_idx) < threshold


def _graph_break(score, b, h, q_idx, kv_idx):
    print("tracing")
    return score


def _double_backward(attend):
    q, k, v = (t.requires_grad_() for t in _qkv())
    torch.autograd.grad(attend(q, k, v).sum(), q, create_graph=True)


def _data_dependent(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx if q_idx > 3 else q_idx < kv_idx


def _cuda_qkv():
    return tuple(t.cuda() for t in _qkv())


def _bias_on(device):
    bias = torch.zeros(4, device=device)

    def per_head_bias(score, b, h, q_idx, kv_idx):
        return score + bias[h]

    return per_head_bias


BAD_INPUTS = [
    # flex_attention: query, key, value
    Bad("qkv-not-tensor", lambda f: f([[1.0]], *_qkv()[1:]), TypeError, "pass a (B, H, L, E) tensor"),
    Bad("qkv-nested", lambda f: f(torch.nested.nested_tensor([torch.randn(4, 3, 16), torch.randn(4, 5, 16)]),
                                  *_qkv()[1:]), ValueError, "pad it into a dense (B, H, L, E) tensor"),
    Bad("qkv-ndim", lambda f: f(torch.randn(4, 32, 16), *_qkv()[1:]), ValueError,
        "add missing dims with unsqueeze", compiled="wrapped"),
    Bad("qkv-int-dtype", lambda f: f(*(t.int() for t in _qkv())), TypeError, "convert it with .to(torch.bfloat16)"),
    Bad("qkv-dtype-mismatch", lambda f: f(_qkv()[0], *_qkv(dtype=torch.float64)[1:]), TypeError,
        "convert them with .to(query.dtype)"),
    Bad("qkv-device-mismatch", lambda f: f(_qkv()[0].cuda(), *_qkv()[1:]), ValueError,
        "move them with .to(query.device)", marks=GPU),
    Bad("kv-shape-mismatch", lambda f: f(*_qkv()[:2], torch.randn(2, 4, 31, 16)), ValueError,
        "pass the key and value of the same tokens"),
    Bad("qk-head-dim-mismatch", lambda f: f(_qkv(E=16)[0], *_qkv(E=32)[1:]), ValueError,
        "project them to one head dim"),
    Bad("head-dim-zero", lambda f: f(*_qkv(E=0)), ValueError, "give them a head dim E >= 1"),
    Bad("batch-mismatch", lambda f: f(_qkv(B=3)[0], *_qkv(B=2)[1:]), ValueError, "(or be 1 to broadcast over it)"),
    Bad("kv-heads-zero", lambda f: f(*_qkv(Hkv=0), enable_gqa=True), ValueError, "give key/value at least one head"),
    Bad("heads-differ", lambda f: f(_qkv(Hq=4)[0], *_qkv(Hkv=2)[1:]), ValueError, "pass enable_gqa=True"),
    Bad("gqa-not-divisible", lambda f: f(_qkv(Hq=6)[0], *_qkv(Hkv=4)[1:], enable_gqa=True), ValueError,
        "repeat key/value heads"),
    # flex_attention: score_mod
    Bad("score-mod-not-callable", lambda f: f(*_qkv(), score_mod=3), TypeError,
        "pass a function `score_mod(score, b, h, q_idx, kv_idx)`"),
    Bad("score-mod-arity", lambda f: f(*_qkv(), score_mod=lambda score, b, h: score), TypeError,
        "define it as `score_mod(score, b, h, q_idx, kv_idx)`", compiled="same"),
    Bad("score-mod-int", lambda f: f(*_qkv(), score_mod=lambda s, b, h, q_idx, kv_idx: q_idx - kv_idx), TypeError,
        "return an expression of `score` (e.g. `score + bias[h]`)", compiled="same"),
    Bad("score-mod-bool", lambda f: f(*_qkv(), score_mod=lambda s, b, h, q_idx, kv_idx: s > 0), TypeError,
        "returned dtype torch.bool; return an expression of `score`"),
    Bad("score-mod-shape", lambda f: f(*_qkv(), score_mod=lambda s, b, h, q_idx, kv_idx: s.expand(2)), ValueError,
        "reduce it to one element", compiled="same"),
    Bad("score-mod-not-tensor", lambda f: f(*_qkv(), score_mod=lambda s, b, h, q_idx, kv_idx: None), TypeError,
        "returned a NoneType; return an expression of `score`"),
    Bad("score-mod-python-number", lambda f: f(*_qkv(), score_mod=lambda s, b, h, q_idx, kv_idx: 1.0), TypeError,
        "must return a tensor, not a Python number"),
    Bad("mod-graph-break", lambda f: f(*_qkv(), score_mod=_graph_break), TypeError,
        "Use torch.where(cond, a, b) for branches", compiled="same"),
    # flex_attention: block_mask
    Bad("block-mask-type", lambda f: f(*_qkv(), block_mask=torch.ones(32, 32, dtype=torch.bool)), TypeError,
        "(from create_block_mask)"),
    Bad("block-mask-too-short", lambda f: f(*_qkv(L=64, S=64), block_mask=_mask()), ValueError,
        "create a new block mask for these lengths"),
    Bad("block-mask-too-long", lambda f: f(*_qkv(L=64, S=64), block_mask=_mask(L=128, S=128)), ValueError,
        "block_mask._adjust(64, 64)"),
    Bad("block-mask-broadcast", lambda f: f(*_qkv(), block_mask=_mask(B=3, H=4)), ValueError,
        "create it with B=2 (or None) and H=4 (or None)"),
    Bad("block-mask-device", lambda f: f(*_qkv(), block_mask=create_block_mask(_causal, 1, 1, 32, 32, device="meta")),
        ValueError, "use block_mask.to('cpu')"),
    Bad("block-mask-device-cuda", lambda f: f(*_cuda_qkv(), block_mask=_mask()), ValueError,
        "use block_mask.to('cuda:0')", marks=GPU),
    Bad("block-mask-not-4d", lambda f: f(*_qkv(), block_mask=BlockMask.from_kv_blocks(
        torch.ones(1, 2, dtype=torch.int32), torch.zeros(1, 2, 2, dtype=torch.int32), BLOCK_SIZE=16)),
        ValueError, "give BlockMask.from_kv_blocks 4-D kv_indices"),
    Bad("block-mask-too-few-blocks", lambda f: f(*_qkv(L=64, S=64), block_mask=BlockMask.from_kv_blocks(
        *_lists(1, 1), BLOCK_SIZE=16, seq_lengths=(64, 64))), ValueError, "one row per query block"),
    Bad("block-mask-sliced", lambda f: f(*_qkv(B=1), block_mask=_mask(B=2)[torch.tensor([0])]), ValueError,
        "assign one for the slice"),
    Bad("mask-mod-arity-assigned", lambda f: f(*_qkv(), block_mask=_with_mask_mod(lambda b, h, q_idx: q_idx > 0)),
        TypeError, "define it as `mask_mod(b, h, q_idx, kv_idx)`", compiled="same"),
    Bad("mask-mod-float-assigned", lambda f: f(*_qkv(), block_mask=_with_mask_mod(
        lambda b, h, q_idx, kv_idx: (q_idx - kv_idx).float())), TypeError, "cast with `.bool()`", compiled="same"),
    Bad("mask-mod-buffer-requires-grad", lambda f: f(*_qkv(), block_mask=_mask(_learnable_mask_mod())), ValueError,
        "detach it (`t.detach()`)", compiled="same"),
    Bad("captured-tensor-device", lambda f: f(*_qkv(), score_mod=_bias_on("meta")), ValueError,
        "move it with .to(query.device)", compiled="same"),
    # flex_attention: other arguments
    Bad("scale-type", lambda f: f(*_qkv(), scale=torch.tensor(0.5)), TypeError, "(for a 0-d tensor: scale.item())"),
    Bad("scale-not-finite", lambda f: f(*_qkv(), scale=float("nan")), ValueError, "pass a finite float"),
    Bad("return-lse-and-aux", lambda f: f(*_qkv(), return_lse=True, return_aux=AuxRequest(lse=True)), ValueError,
        "pass either return_lse=True or return_aux=AuxRequest(...), not both"),
    Bad("return-aux-type", lambda f: f(*_qkv(), return_aux=True), TypeError,
        "pass e.g. return_aux=AuxRequest(lse=True)"),
    Bad("kernel-options-type", lambda f: f(*_qkv(), kernel_options=[("BLOCK_M", 64)]), TypeError,
        "pass e.g. kernel_options={'BLOCK_M': 64}"),
    Bad("kernel-option-key-type", lambda f: f(*_qkv(), kernel_options={1: 2}), TypeError,
        "must be strings, got 1; e.g. {'BLOCK_M': 64}"),
    Bad("kernel-option-unknown", lambda f: f(*_qkv(), kernel_options={"block_m": 64}), ValueError,
        "did you mean 'BLOCK_M'?"),
    Bad("kernel-option-tile", lambda f: f(*_qkv(), kernel_options={"fwd_BLOCK_N": 48}), ValueError,
        "must be a power of two >= 16"),
    Bad("kernel-option-warps", lambda f: f(*_qkv(), kernel_options={"num_warps": 3}), ValueError,
        "must be one of 1, 2, 4, 8, 16"),
    Bad("kernel-option-stages", lambda f: f(*_qkv(), kernel_options={"num_stages": 0}), ValueError,
        "must be an int >= 1"),
    Bad("kernel-option-bool", lambda f: f(*_qkv(), kernel_options={"PRESCALE_QK": 1}), TypeError,
        "must be True or False"),
    Bad("kernel-option-int", lambda f: f(*_qkv(), kernel_options={"kpack": 2.0}), TypeError, "must be an int"),
    Bad("kernel-option-backend", lambda f: f(*_qkv(), kernel_options={"BACKEND": "CUDNN"}), ValueError,
        "choose one of ('AUTO', 'TRITON', 'DECOMPOSED')"),
    Bad("kernel-option-torch-backend", lambda f: f(*_qkv(), kernel_options={"BACKEND": "TRITON_DECODE"}), ValueError,
        "runs the decode kernel for short queries by itself"),
    Bad("backend-triton-cannot-run", lambda f: torch.compile(flex_attention, fullgraph=True)(
        *_qkv(dtype=torch.float64), kernel_options={"BACKEND": "TRITON"}), RuntimeError,
        "BACKEND='TRITON' cannot run here"),
    Bad("double-backward", _double_backward, NotImplementedError, "call backward without create_graph=True"),
    Bad("score-mod-captured-both-ways", lambda f: _backward_of_both_ways_read(), NotImplementedError,
        "read it one way only"),
    # create_block_mask, create_mask, and_masks, or_masks
    Bad("mask-mod-not-callable", lambda f: _mask(3), TypeError, "pass a function `mask_mod(b, h, q_idx, kv_idx)`"),
    Bad("mask-mod-arity", lambda f: _mask(lambda b, h, q_idx: q_idx > 0), TypeError,
        "define it as `mask_mod(b, h, q_idx, kv_idx)`"),
    Bad("mask-mod-float", lambda f: _mask(lambda b, h, q_idx, kv_idx: (q_idx - kv_idx).float()), TypeError,
        "return a comparison (e.g. `q_idx >= kv_idx`) or cast with `.bool()`"),
    Bad("mask-mod-shape", lambda f: _mask(lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx).expand(2)), ValueError,
        "reduce it to one element"),
    Bad("mask-mod-not-tensor", lambda f: _mask(lambda b, h, q_idx, kv_idx: True), TypeError,
        "return a comparison of the index tensors"),
    Bad("mask-mod-data-dependent", lambda f: _mask(_data_dependent), TypeError,
        "use torch.where(cond, a, b) instead of Python if/while"),
    Bad("mask-size", lambda f: _mask(L=0), ValueError, "pass a Python int >= 1"),
    Bad("mask-block-size", lambda f: _mask(BLOCK_SIZE=(64, 0)), ValueError,
        "e.g. BLOCK_SIZE=128 or BLOCK_SIZE=(64, 32)"),
    Bad("mask-device", lambda f: create_block_mask(_causal, 1, 1, 32, 32, device="gpu0"), ValueError,
        "pass e.g. device='cuda', 'cpu' or query.device"),
    Bad("mask-dq-write-order", lambda f: _mask(compute_dq_write_order=True), ValueError, "drop the argument"),
    Bad("mask-dq-kv-order", lambda f: _mask(dq_kv_order="yes"), ValueError, "pass True or False"),
    Bad("create-mask-score-mod-int", lambda f: create_mask(lambda s, b, h, q_idx, kv_idx: q_idx - kv_idx, 1, 1, 8, 8,
                                                           device="cpu"), TypeError,
        "returned dtype torch.int64; return an expression of `score`"),
    Bad("combinator-not-callable", lambda f: and_masks(_causal, 3), TypeError,
        "pass functions `mask_mod(b, h, q_idx, kv_idx)`"),
    Bad("combinator-arity", lambda f: or_masks(lambda b, h: b > 0), TypeError,
        "define it as `mask_mod(b, h, q_idx, kv_idx)`"),
    # BlockMask
    Bad("block-mask-lists-pairs", lambda f: BlockMask((32, 32), *_lists(), torch.ones(1, 1, 2), None,
                                                      None, None, None, None), ValueError,
        "must be given together or both be None"),
    Bad("block-mask-dq-order-type", lambda f: BlockMask((32, 32), *_lists(), None, None, None, None, None, None,
                                                        dq_write_order=[0, 1]), TypeError,
        "it is unused: pass None"),
    Bad("from-kv-blocks-not-tensor", lambda f: BlockMask.from_kv_blocks([1, 1], _lists()[1]), TypeError,
        "kv_num_blocks must be a tensor"),
    Bad("from-kv-blocks-dtype", lambda f: BlockMask.from_kv_blocks(*_lists(dtype=torch.float32)), ValueError,
        "convert with `.to(torch.int32)`"),
    Bad("from-kv-blocks-ndim", lambda f: BlockMask.from_kv_blocks(torch.ones(2, dtype=torch.int32),
                                                                  torch.zeros(2, dtype=torch.int32)), ValueError,
        "(usually [B, H, num_q_blocks, num_kv_blocks])"),
    Bad("from-kv-blocks-count-shape", lambda f: BlockMask.from_kv_blocks(torch.ones(1, 1, 3, dtype=torch.int32),
                                                                         _lists()[1]), ValueError,
        "without its last dimension"),
    Bad("from-kv-blocks-full-pair", lambda f: BlockMask.from_kv_blocks(*_lists(), _lists()[0]), ValueError,
        "full_kv_num_blocks and full_kv_indices must be given together"),
    Bad("from-kv-blocks-full-shape", lambda f: BlockMask.from_kv_blocks(*_lists(), *_lists(cols=3)), ValueError,
        "full_kv_indices must have the shape of kv_indices"),
    Bad("from-kv-blocks-index-range", lambda f: BlockMask.from_kv_blocks(*_lists(index=5)), ValueError,
        "list only existing blocks"),
    Bad("from-kv-blocks-count-range", lambda f: BlockMask.from_kv_blocks(*_lists(num=3)), ValueError,
        "a row lists at most every block once"),
    Bad("from-tuple-length", lambda f: BlockMask.from_tuple((32, 32)), ValueError,
        "expects the 13 fields of as_tuple()"),
    Bad("block-mask-index-none", lambda f: _mask()[None], IndexError, "takes ints, slices or tensors"),
    Bad("block-mask-index-range", lambda f: _mask()[3], IndexError, "is out of range for a BlockMask dimension"),
    Bad("block-mask-index-count", lambda f: _mask()[0, 0, 0, 0], IndexError, "takes at most 3 indices"),
    Bad("block-mask-adjust-grow", lambda f: _mask(BLOCK_SIZE=16)._adjust(64, 64), ValueError,
        "build a new mask with create_block_mask"),
    Bad("block-mask-to-string", lambda f: _mask().to_string(grid_size=0), ValueError,
        "e.g. to_string(grid_size=(20, 40))"),
    Bad("sliced-mask-mod-called", lambda f: create_mask(_mask(B=2, BLOCK_SIZE=16)[:, :, :1].mask_mod, 1, 1, 4, 4,
                                                        device="cpu"), RuntimeError, "Assign one that does"),
    # merge_attention_states
    Bad("merge-not-sequences", lambda f: merge_attention_states(torch.zeros(2, 3, 4), torch.zeros(2, 3)), TypeError,
        "use list(x.unbind(0)) to split a stacked tensor"),
    Bad("merge-no-state", lambda f: merge_attention_states([], []), ValueError, "needs at least one state"),
    Bad("merge-count", lambda f: merge_attention_states([torch.zeros(3, 4)], []), ValueError,
        "pass one lse per output"),
    Bad("merge-not-tensor", lambda f: merge_attention_states([1], [2]), TypeError, "outputs and lses must be tensors"),
    Bad("merge-dtype", lambda f: merge_attention_states([torch.zeros(3, 4, dtype=torch.int32)], [torch.zeros(3)]),
        TypeError, "outputs and lses must be floating point"),
    Bad("merge-0d", lambda f: merge_attention_states([torch.zeros(())], [torch.zeros(())]), ValueError,
        "pass [..., L, Ev] outputs"),
    Bad("merge-lse-shape", lambda f: merge_attention_states([torch.zeros(3, 4)], [torch.zeros(4)]), ValueError,
        "lse must have the output's shape without its last (value) dim"),
    Bad("merge-device", lambda f: merge_attention_states([torch.zeros(3, 4), torch.zeros(3, 4, device="meta")],
                                                          [torch.zeros(3), torch.zeros(3, device="meta")]),
        ValueError, "move them to one device with .to(device)"),
    Bad("merge-broadcast", lambda f: merge_attention_states([torch.zeros(3, 4), torch.zeros(2, 4)],
                                                             [torch.zeros(3), torch.zeros(2)]), ValueError,
        "give them the same value dim and batch/head/query dims that are equal or 1"),
    # PagedKVCache
    Bad("paged-size", lambda f: _cache(n_pages=0), ValueError, "pass an int >= 1"),
    Bad("paged-dtype", lambda f: _cache(dtype=torch.int32), TypeError, "e.g. dtype=torch.bfloat16"),
    Bad("paged-device", lambda f: _cache(device="gpu0"), ValueError, "pass e.g. device='cuda', 'cpu' or query.device"),
    Bad("paged-slot-type", lambda f: _cache().reserve(torch.tensor(0), 8), TypeError,
        "batch_idx must be a Python int (a slot) for reserve/erase"),
    Bad("paged-slot-range", lambda f: _cache().erase(2), ValueError, "is outside [0, max_batch_size=2)"),
    Bad("paged-num-tokens", lambda f: _cache().reserve(0, -1), ValueError, "num_tokens must be a non-negative int"),
    Bad("paged-reserve-too-long", lambda f: _cache(max_pages_per_sequence=2).reserve(0, 40), ValueError,
        "make the cache with a larger max_pages_per_sequence"),
    Bad("paged-out-of-pages", lambda f: (_reserved_cache(n_pages=2).reserve(1, 20)), RuntimeError,
        "erase() finished sequences or make the cache with a larger n_pages"),
    Bad("paged-batch-idx-type", lambda f: _reserved_cache().append([0], *_kv_new(1, 2, 1, 8)), TypeError,
        "e.g. torch.tensor([0, 3], device='cpu')"),
    Bad("paged-batch-idx-dtype", lambda f: _reserved_cache().append(torch.tensor([0.0]), *_kv_new(1, 2, 1, 8)),
        ValueError, "batch_idx must be a 1-D integer tensor of slots"),
    Bad("paged-batch-idx-device", lambda f: _reserved_cache().append(torch.tensor([0], device="meta"),
                                                                      *_kv_new(1, 2, 1, 8)), ValueError,
        "use batch_idx.to('cpu')"),
    Bad("paged-new-ndim", lambda f: _reserved_cache().append(torch.tensor([0]), *_kv_new(2, 1, 8)), ValueError,
        "must be a 4-D tensor [N, Hkv, T, D]"),
    Bad("paged-new-shape", lambda f: _reserved_cache().append(torch.tensor([0]), *_kv_new(1, 3, 1, 8)), ValueError,
        "([len(batch_idx), num_kv_heads, num_tokens, head_dim])"),
    Bad("paged-new-dtype", lambda f: _reserved_cache().append(torch.tensor([0]), *_kv_new(1, 2, 1, 8,
                                                                                         dtype=torch.float64)),
        TypeError, "convert with k_new.to(torch.float32, 'cpu')"),
    Bad("paged-new-requires-grad", lambda f: _reserved_cache().append(torch.tensor([0]), *_kv_new(
        1, 2, 1, 8, requires_grad=True)), ValueError, "pass k_new.detach()"),
    Bad("paged-append-layers", lambda f: _reserved_cache(num_layers=2).append(torch.tensor([0]), *_kv_new(1, 2, 1, 8)),
        ValueError, "then cache.write(rows, k, v, layer) per layer"),
    Bad("paged-layer", lambda f: _reserved_cache().write(torch.zeros(1, 1, dtype=torch.long), *_kv_new(1, 2, 1, 8),
                                                         layer=1), ValueError,
        "layer must be an int in [0, num_layers=1)"),
    Bad("paged-num-new", lambda f: _reserved_cache().extend(torch.tensor([0]), 2, num_new=torch.tensor([1, 1])),
        ValueError, "num_new must be an integer tensor of shape (1,)"),
    Bad("paged-convert-type", lambda f: _cache().convert_logical_block_mask("causal"), TypeError,
        "block_mask must be an inductor_flex.BlockMask"),
    Bad("paged-convert-block-size", lambda f: _cache().convert_logical_block_mask(_mask(L=16, S=64, BLOCK_SIZE=32)),
        ValueError, "create it with BLOCK_SIZE=(32, 16)"),
    Bad("paged-convert-too-long", lambda f: _cache().convert_logical_block_mask(_mask(L=16, S=80, BLOCK_SIZE=16)),
        ValueError, "make the cache with a larger max_pages_per_sequence, or the mask for a shorter KV_LEN"),
    Bad("paged-convert-ndim", lambda f: _cache().convert_logical_block_mask(BlockMask.from_kv_blocks(
        torch.ones(1, 1, dtype=torch.int32), torch.zeros(1, 1, 4, dtype=torch.int32), BLOCK_SIZE=16)), ValueError,
        "must have 4-D kv_indices"),
    Bad("paged-convert-device", lambda f: _cache().convert_logical_block_mask(create_block_mask(
        _causal, 1, 1, 16, 64, device="meta", BLOCK_SIZE=16)), ValueError, "use block_mask.to('cpu')"),
    Bad("paged-convert-batch", lambda f: _cache().convert_logical_block_mask(_mask(B=3, L=16, S=64, BLOCK_SIZE=16),
                                                                             torch.tensor([0, 1])), ValueError,
        "give one mask batch per slot (or a batch of 1, used for all)"),
    Bad("paged-decode-q-len", lambda f: _cache().decode_block_mask(q_len=0), ValueError,
        "q_len must be a positive int, got 0; pass an int >= 1"),
    Bad("paged-mod-arity", lambda f: _cache().get_score_mod(lambda score, b: score), TypeError,
        "define it as `score_mod(score, b, h, q_idx, kv_idx)`"),
    Bad("paged-attention-mask", lambda f: _cache().attention(torch.randn(1, 2, 1, 8), _mask(L=1, S=64)), ValueError,
        "from convert_logical_block_mask or decode_block_mask"),
    Bad("paged-attention-batch", lambda f: _reserved_cache().attention(
        torch.randn(2, 2, 1, 8), _reserved_cache().decode_block_mask(torch.tensor([0]))), ValueError,
        "make it with one slot per query"),
    Bad("paged-dropped-tokens", lambda f: _dropped_tokens(), RuntimeError, "reserve() enough before appending"),
]


def _backward_of_both_ways_read():
    weights = torch.randn(4, requires_grad=True)

    def both_ways(score, b, h, q_idx, kv_idx):
        return score + weights[h] + weights.sum()

    flex_attention(*_qkv(), score_mod=both_ways).sum().backward()


def _dropped_tokens():
    cache = _reserved_cache()
    cache.append(torch.tensor([0]), *_kv_new(1, 2, 40, 8))
    cache.check_no_dropped_tokens()


def _params(rows):
    return [pytest.param(row, id=row.id, marks=row.marks) for row in rows]


@pytest.mark.parametrize("row", _params(BAD_INPUTS))
def test_bad_input_is_rejected_naming_the_fix(row):
    with pytest.raises(row.error) as info:
        row.call(flex_attention)
    assert row.fix in str(info.value), f"{row.id}: the message does not say {row.fix!r}:\n{info.value}"


@pytest.mark.parametrize("row", _params([row for row in BAD_INPUTS if row.compiled]))
def test_bad_input_under_torch_compile(row):
    """Under torch.compile(fullgraph=True) the same message arrives; capture errors (the mods)
    keep their exception type, argument validation arrives wrapped by Dynamo."""
    error = row.error if row.compiled == "same" else Exception
    with pytest.raises(error) as info:
        row.call(torch.compile(flex_attention, fullgraph=True))
    assert row.fix in str(info.value), f"{row.id}: the message does not say {row.fix!r}:\n{info.value}"


def _document_rows():
    """{id: row text} of the inventory tables in docs/bad_inputs.md (rows starting with `| `id` |`)."""
    rows = {}
    for line in DOC.read_text().splitlines():
        match = re.match(r"\|\s*`([a-z0-9-]+)`\s*\|", line)
        if match:
            assert match.group(1) not in rows, f"docs/bad_inputs.md lists {match.group(1)} twice"
            rows[match.group(1)] = line
    return rows


def test_document_lists_exactly_the_tested_rows():
    documented, tested = set(_document_rows()), {row.id for row in BAD_INPUTS}
    assert not tested - documented, f"rows missing from docs/bad_inputs.md: {sorted(tested - documented)}"
    assert not documented - tested, f"rows of docs/bad_inputs.md without a test: {sorted(documented - tested)}"


@pytest.mark.parametrize("row", BAD_INPUTS, ids=lambda row: row.id)
def test_document_row_matches_the_test(row):
    line = _document_rows()[row.id]
    assert f"`{row.error.__name__}`" in line, f"{row.id}: docs/bad_inputs.md should name {row.error.__name__}"
    assert row.fix in line, f"{row.id}: docs/bad_inputs.md should quote {row.fix!r}"
