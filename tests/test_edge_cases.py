"""Numerical edge cases against the float64 oracle: eager and compiled on CPU, a subset on the GPU.

Fully masked rows and blocks, extreme and -inf scores, fp16 products beyond fp16's range,
the shortest sequences, lengths at block boundaries, a long decode row, non-contiguous inputs
and empty inputs. Each case checks the output, the lse and the gradients of q, k, v (and of
captured tensors) with the project's rule: error at most twice the same-dtype eager error.
"""

import math

import pytest
import torch

import oracle
from catalogue import BY_NAME, Variant
from inductor_flex import AuxRequest, create_block_mask, create_mask, flex_attention
from inductor_flex.block_mask import full_block_mask
from inductor_flex.reference import attention_reference

MODES = ["eager", "inductor"]
GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _identity(score, b, h, q_idx, kv_idx):
    return score


def check_against_oracle(q, k, v, *, mode, score_mod=None, block_mask=None, scale=None):
    """Forward (out, lse) and gradients of q, k, v through ``mode`` vs the float64 oracle.

    q, k, v may be any strided views: the oracle runs on contiguous copies. Returns
    ``(out, lse, max_scores, grads)`` of our run.
    """
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    enable_gqa = q.size(1) != k.size(1)
    out, aux = oracle.MODES[mode](*leaves, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                  enable_gqa=enable_gqa, return_aux=AuxRequest(lse=True, max_scores=True))
    grad_out = torch.randn_like(out)
    grad_lse = torch.randn_like(aux.lse, dtype=torch.float64) * 0.1

    def loss(out, lse):
        return (out.double() * grad_out.double()).sum() + (torch.where(torch.isfinite(lse), lse, 0).double()
                                                          * grad_lse).sum()

    grads = torch.autograd.grad(loss(out, aux.lse), leaves)
    fields = (block_mask or full_block_mask(q.size(-2), k.size(-2), device=q.device)).as_tuple()
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale

    def reference(dtype):
        inputs = [t.detach().contiguous().to(dtype).requires_grad_() for t in (q, k, v)]
        ref_out, ref_lse, _ = attention_reference(*inputs, score_mod or _identity, fields, scale)
        return ref_out, ref_lse, torch.autograd.grad(loss(ref_out, ref_lse), inputs)

    (gold_out, gold_lse, gold_grads), (base_out, base_lse, base_grads) = reference(torch.float64), reference(q.dtype)
    oracle.assert_within(f"{mode} out", out, gold_out, base_out)
    oracle.assert_within(f"{mode} lse", aux.lse, gold_lse, base_lse)
    for name, ours, gold, base in zip("qkv", grads, gold_grads, base_grads):
        oracle.assert_within(f"{mode} d{name}", ours, gold, base)
    return out, aux.lse, aux.max_scores, grads


# --- fully masked rows and blocks ------------------------------------------------------------


def _holes(b, h, q_idx, kv_idx):
    """Rows 0..19 attend nothing (a whole 16-block row and part of the next), nor does all of
    (batch 1, head 0); elsewhere causal with keys 16..31 (one whole block column) left out."""
    return (q_idx >= 20) & (kv_idx <= q_idx) & ((b != 1) | (h != 0)) & ((kv_idx < 16) | (kv_idx >= 32))


@pytest.mark.parametrize("mode", MODES)
def test_fully_masked_rows_and_blocks(mode):
    B, H, L, S = 2, 2, 67, 67
    mask = create_block_mask(_holes, B, H, L, S, device="cpu", BLOCK_SIZE=16)
    q, k, v = (torch.randn(B, H, n, 16) for n in (L, S, S))
    out, lse, max_scores, (dq, dk, dv) = check_against_oracle(q, k, v, mode=mode, block_mask=mask)

    empty = ~create_mask(_holes, B, H, L, S, device="cpu").any(-1)
    assert empty[:, :, :20].all() and empty[1, 0].all() and not empty.all()
    assert (out[empty] == 0).all(), "a row that attends nothing must be 0"
    assert torch.isneginf(lse[empty]).all() and torch.isneginf(max_scores[empty]).all()
    assert torch.isfinite(lse[~empty]).all()
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert (dq[empty] == 0).all()


def test_lse_of_fully_masked_rows_is_torchs():
    """torch's flex_attention (eager, CPU) gives -inf as the lse of a row that attends nothing."""
    from torch.nn.attention import flex_attention as torch_flex

    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    ours_mask = create_block_mask(_holes, 1, 2, 40, 40, device="cpu", BLOCK_SIZE=16)
    torch_mask = torch_flex.create_block_mask(_holes, 1, 2, 40, 40, device="cpu", BLOCK_SIZE=16)
    _, theirs = torch_flex.flex_attention(q, k, v, block_mask=torch_mask, return_aux=torch_flex.AuxRequest(lse=True))
    _, ours = flex_attention(q, k, v, block_mask=ours_mask, return_aux=AuxRequest(lse=True))
    assert torch.isneginf(theirs.lse[:, :, :20]).all()
    assert torch.equal(torch.isneginf(ours.lse), torch.isneginf(theirs.lse))
    torch.testing.assert_close(ours.lse[~torch.isneginf(ours.lse)], theirs.lse[~torch.isneginf(theirs.lse)])


# --- extreme scores --------------------------------------------------------------------------


def _extremes(score, b, h, q_idx, kv_idx):
    """+1e4 / -1e4 on two thirds of the positions, -inf on every fifth key and on all of row 5."""
    shifted = torch.where((q_idx + kv_idx) % 3 == 0, score + 1e4,
                          torch.where((q_idx + kv_idx) % 3 == 1, score - 1e4, score))
    return torch.where((kv_idx % 5 == 0) | (q_idx == 5), -math.inf, shifted)


@pytest.mark.parametrize("mode", MODES)
def test_score_mod_extremes(mode):
    q, k, v = (torch.randn(2, 2, 67, 16) for _ in range(3))
    out, lse, _, grads = check_against_oracle(q, k, v, mode=mode, score_mod=_extremes)
    assert (out[:, :, 5] == 0).all() and torch.isneginf(lse[:, :, 5]).all()
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("mode", MODES)
def test_fp16_products_beyond_fp16_range(mode):
    """|q·k| reaches ~2e5 (fp16 overflows at 65504) while the scaled scores stay moderate:
    the product must be formed in float32, never rounded to fp16 first."""
    q, k = (torch.randn(1, 2, 40, 16) * 100 for _ in range(2))
    v = torch.randn(1, 2, 40, 16)
    q, k, v = (t.half() for t in (q, k, v))
    assert (q.float() @ k.float().transpose(-1, -2)).abs().max() > 65504
    out, _, _, _ = check_against_oracle(q, k, v, mode=mode, scale=2e-4)
    assert torch.isfinite(out).all()


# --- short sequences and block boundaries ----------------------------------------------------


def _modes(cases, compiled):
    """(mode, *case) for every case eagerly and the ``compiled`` ones also through Inductor
    (each compile costs seconds of CPU time; eager covers the rest)."""
    return [("eager", *case) for case in cases] + [("inductor", *case) for case in compiled]


@pytest.mark.parametrize("mode,L,S", _modes([(1, 1), (1, 37), (37, 1), (5, 5)], compiled=[(1, 37), (37, 1), (5, 5)]),
                         ids=str)
def test_shortest_sequences(mode, L, S):
    """One query, one key, and a single partial block (5 positions in a 16-block)."""
    oracle.run_variant(BY_NAME["alibi"], mode=mode, B=2, Hq=2, Hkv=1, L=L, S=S, block_size=16)


BOUNDARIES = [(128, 127, 127), (128, 128, 128), (128, 129, 129), (128, 127, 129), (48, 47, 49), (48, 48, 48),
              (48, 49, 47)]


@pytest.mark.parametrize("mode,block,L,S", _modes(BOUNDARIES, compiled=[(128, 127, 129), (48, 49, 47)]), ids=str)
def test_lengths_at_block_boundaries(mode, block, L, S):
    oracle.run_variant(BY_NAME["alibi"], mode=mode, B=1, Hq=2, Hkv=1, L=L, S=S, block_size=block)


def test_long_decode_row_cpu():
    """One query over 16k keys (compiled): the decode shape, on the CPU decomposition."""
    oracle.run_variant(BY_NAME["alibi"], mode="inductor", B=1, Hq=4, Hkv=1, L=1, S=16384, E=64, Ev=64,
                       block_size=128)


# --- non-contiguous inputs -------------------------------------------------------------------


def _transposed(shape, **kw):  # a (B, L, H, E) projection viewed as (B, H, L, E)
    B, H, L, E = shape
    return torch.randn(B, L, H, E, **kw).transpose(1, 2)


def _expanded_heads(shape, **kw):  # one head broadcast to all (stride 0)
    B, H, L, E = shape
    return torch.randn(B, 1, L, E, **kw).expand(shape)


def _strided_last_dim(shape, **kw):  # every other element of a wider last dim
    return torch.randn(*shape[:3], 2 * shape[3], **kw)[..., ::2]


def _channels_last(shape, **kw):
    return torch.randn(shape, **kw).contiguous(memory_format=torch.channels_last)


def _last_dim_outermost(shape, **kw):  # the last dim has the largest stride
    B, H, L, E = shape
    return torch.randn(E, B, H, L, **kw).permute(1, 2, 3, 0)


def _offset_slice(shape, **kw):  # a slice of the last dim, at a storage offset
    return torch.randn(*shape[:3], shape[3] + 5, **kw)[..., 3:3 + shape[3]]


LAYOUTS = {
    "transposed_q_expanded_k_strided_v": (_transposed, _expanded_heads, _strided_last_dim),
    "channels_last_q_permuted_k_sliced_v": (_channels_last, _last_dim_outermost, _offset_slice),
}


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _strided_case(layout, B, Hq, Hkv, L, S, E, **kw):
    make_q, make_k, make_v = LAYOUTS[layout]
    q, k, v = make_q((B, Hq, L, E), **kw), make_k((B, Hkv, S, E), **kw), make_v((B, Hkv, S, E), **kw)
    assert not any(t.is_contiguous() for t in (q, k, v)[L == 1:])  # one query row is contiguous anyway
    return q, k, v


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_non_contiguous_inputs(mode, layout):
    q, k, v = _strided_case(layout, 2, 4, 2, 40, 33, 16)
    mask = create_block_mask(_causal, None, None, 40, 33, device="cpu", BLOCK_SIZE=16)
    check_against_oracle(q, k, v, mode=mode, block_mask=mask)


# --- empty inputs: SDPA's answer -------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B,H,L,S", [(0, 2, 8, 8), (2, 0, 8, 8), (2, 2, 0, 8), (2, 2, 8, 0)], ids=str)
def test_empty_inputs_give_sdpas_answer(mode, B, H, L, S):
    q, k, v = (torch.randn(B, H, n, 16, requires_grad=True) for n in (L, S, S))
    out, aux = oracle.MODES[mode](q, k, v, return_aux=AuxRequest(lse=True, max_scores=True))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, sdpa)
    assert aux.lse.shape == (B, H, L) and torch.isneginf(aux.lse).all() and torch.isneginf(aux.max_scores).all()
    grads = torch.autograd.grad(out.sum() + aux.lse.clamp(min=0).sum(), (q, k, v))
    sdpa_grads = torch.autograd.grad(sdpa.sum(), (q, k, v))
    for ours, theirs in zip(grads, sdpa_grads):
        torch.testing.assert_close(ours, theirs)


def test_empty_value_dim():
    q, k, v = (torch.randn(2, 2, 8, 16) for _ in range(3))
    out, aux = flex_attention(q, k, v[..., :0], return_aux=AuxRequest(lse=True))
    _, full = flex_attention(q, k, v, return_aux=AuxRequest(lse=True))
    assert out.shape == (2, 2, 8, 0)
    torch.testing.assert_close(aux.lse, full.lse)


def test_numpy_scale():
    numpy = pytest.importorskip("numpy")
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    torch.testing.assert_close(flex_attention(q, k, v, scale=numpy.float32(0.5)), flex_attention(q, k, v, scale=0.5))


def test_meta_tensors_give_shapes():
    q = torch.empty(2, 4, 8, 16, device="meta")
    kv = torch.empty(2, 2, 24, 16, device="meta")
    out, aux = flex_attention(q, kv, kv[..., :8], enable_gqa=True, return_aux=AuxRequest(lse=True))
    assert out.device.type == "meta" and out.shape == (2, 4, 8, 8) and aux.lse.shape == (2, 4, 8)


# --- the same through the GPU kernels --------------------------------------------------------


def _gpu(test):
    for mark in reversed(GPU):
        test = mark(test)
    return test


HOLES = Variant("holes", lambda buffers: (None, _holes))
EXTREMES = Variant("extremes", lambda buffers: (_extremes, None))


@_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("variant", [HOLES, EXTREMES], ids=lambda v: v.name)
@pytest.mark.parametrize("L", [67, 3], ids=lambda n: f"L{n}")  # L=3 runs the decode kernel
def test_masked_rows_and_extremes_gpu(variant, dtype, L):
    oracle.run_variant(variant, mode="inductor", B=2, Hq=2, Hkv=1, L=L, S=67, block_size=16, device="cuda",
                       dtype=dtype)


@_gpu
def test_lse_of_fully_masked_rows_is_torchs_gpu():
    from torch.nn.attention import flex_attention as torch_flex

    q, k, v = (torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ours_mask = create_block_mask(_holes, 1, 2, 64, 64, device="cuda")
    torch_mask = torch_flex.create_block_mask(_holes, 1, 2, 64, 64, device="cuda")
    _, theirs = torch.compile(torch_flex.flex_attention)(q, k, v, block_mask=torch_mask,
                                                         return_aux=torch_flex.AuxRequest(lse=True))
    _, ours = torch.compile(flex_attention)(q, k, v, block_mask=ours_mask, return_aux=AuxRequest(lse=True))
    assert torch.isneginf(ours.lse[:, :, :20]).all()
    assert torch.equal(torch.isneginf(ours.lse), torch.isneginf(theirs.lse)), "torch's convention differs"


@_gpu
@pytest.mark.parametrize("L", [40, 1], ids=lambda n: f"L{n}")
def test_fp16_products_beyond_fp16_range_gpu(L):
    q = (torch.randn(1, 2, L, 64, device="cuda") * 100).half()
    k = (torch.randn(1, 2, 200, 64, device="cuda") * 100).half()
    v = torch.randn(1, 2, 200, 64, device="cuda").half()
    assert (q.float() @ k.float().transpose(-1, -2)).abs().max() > 65504
    check_against_oracle(q, k, v, mode="inductor", scale=5e-5)


@_gpu
@pytest.mark.parametrize("block,L,S", [(128, 127, 127), (128, 128, 128), (128, 129, 129), (128, 1, 129),
                                       (48, 47, 49), (48, 49, 47), (48, 1, 1)], ids=str)
def test_lengths_at_block_boundaries_gpu(block, L, S):
    oracle.run_variant(BY_NAME["alibi"], mode="inductor", B=2, Hq=4, Hkv=2, L=L, S=S, E=64, Ev=64,
                       block_size=block, device="cuda", dtype=torch.bfloat16)


@_gpu
def test_long_decode_row_gpu():
    """One query over 128k keys: the split-KV decode kernel, bf16, GQA."""
    oracle.run_variant(BY_NAME["alibi"], mode="inductor", B=1, Hq=8, Hkv=2, L=1, S=131072, E=128, Ev=128,
                       block_size=128, device="cuda", dtype=torch.bfloat16, backward=False)


@_gpu
@pytest.mark.parametrize("L", [200, 1], ids=lambda n: f"L{n}")
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_non_contiguous_inputs_gpu(layout, L):
    q, k, v = _strided_case(layout, 2, 4, 2, L, 150, 64, device="cuda", dtype=torch.bfloat16)

    def causal_from_the_end(b, h, q_idx, kv_idx):  # the queries are the last L positions
        return q_idx + (150 - L) >= kv_idx

    mask = create_block_mask(causal_from_the_end, None, None, L, 150, device="cuda")
    check_against_oracle(q, k, v, mode="inductor", block_mask=mask)


def _scaled_masked_scores(weight, masked_value):
    """Keys past q_idx + 5 set to ``masked_value`` by the score_mod (every row keeps a key),
    then scaled by a learnable per-head weight: d(score·w)/dw there is the masked score."""
    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.where(kv_idx <= q_idx + 5, score, masked_value) * weight[h]

    return score_mod


@pytest.mark.parametrize("mode", ["eager", "inductor"])
def test_gradient_through_minus_inf_scores_scaled_by_a_learnable_tensor(mode):
    """Found by fuzzing (GPU profile, reproduced on CPU): -inf from score_mod times a learnable
    tensor. Eager autograd gives NaN there (0 × inf); positions whose score gradient is 0
    contribute nothing in our kernels, so the gradient is the one a finite stand-in (-1e30:
    exp underflows to exactly 0 in float64) gives."""
    B, H, L, S, D = 2, 4, 37, 50, 16
    q, k, v = (torch.randn(B, H, n, D, requires_grad=True) for n in (L, S, S))
    weight = (0.5 + torch.rand(H)).requires_grad_()
    attend = torch.compile(flex_attention, fullgraph=True) if mode == "inductor" else flex_attention
    out = attend(q, k, v, score_mod=_scaled_masked_scores(weight, -float("inf")))
    grads = torch.autograd.grad(out, (q, k, v, weight), torch.ones_like(out))

    gold_inputs = [t.detach().double().requires_grad_() for t in (q, k, v, weight)]
    gold_out = flex_attention(*gold_inputs[:3], score_mod=_scaled_masked_scores(gold_inputs[3], -1e30))
    gold = torch.autograd.grad(gold_out, gold_inputs, torch.ones_like(gold_out))
    torch.testing.assert_close(out.double(), gold_out, atol=1e-5, rtol=1e-5)
    for name, ours, expected in zip("qkvw", grads, gold):
        assert torch.isfinite(ours).all(), f"d{name}: not finite"
        torch.testing.assert_close(ours.double(), expected, atol=1e-4, rtol=1e-4, msg=f"d{name}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("buffer_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_narrow_learnable_tensors_with_float32_scores(mode, buffer_dtype):
    """Found by an adversarial probe (eager): a learnable per-head scale and relative-position
    table in fp16/bf16 read by float32 scores. Autograd rounds each position's gradient term to
    the table's dtype; summing those rounded terms made the eager gradient hundreds of times
    the same-dtype error. Each gradient element is now rounded once, so our error is at most
    the rounding of the exact gradient (plus float32 summation round-off)."""
    B, H, L, D = 2, 4, 150, 16
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    weight = (0.5 + torch.rand(H)).to(buffer_dtype).requires_grad_()
    table = torch.randn(32).to(buffer_dtype).requires_grad_()

    def build(weight, table):
        def score_mod(score, b, h, q_idx, kv_idx):
            return score * weight[h] + table[(q_idx - kv_idx).abs().clamp(max=31)]
        return score_mod

    attend = oracle.MODES[mode]
    out = attend(q, k, v, score_mod=build(weight, table))
    grad_out = torch.randn_like(out)
    ours = torch.autograd.grad(out, (weight, table), grad_out)

    fields = full_block_mask(L, L, device="cpu").as_tuple()
    gold_buffers = [t.detach().double().requires_grad_() for t in (weight, table)]
    gold_out = attention_reference(q.double(), k.double(), v.double(), build(*gold_buffers), fields, D ** -0.5)[0]
    gold = torch.autograd.grad(gold_out, gold_buffers, grad_out.double())
    for name, grad, expected in zip(("weight", "table"), ours, gold):
        assert grad.dtype == buffer_dtype
        # One rounding to the buffer's dtype, and float32 round-off of a sum over B·L·L terms.
        rounding = expected.abs() * torch.finfo(buffer_dtype).eps / 2
        summation = 8 * torch.finfo(torch.float32).eps * math.sqrt(B * L * L) * expected.abs().max()
        error = (grad.double() - expected).abs()
        assert torch.all(error <= rounding + summation), f"d{name}: error {error.max():.3e}"
