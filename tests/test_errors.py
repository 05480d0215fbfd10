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


def test_forced_template_that_cannot_run_says_why():
    q, k, v = _qkv(dtype=torch.float64)
    with pytest.raises(Exception, match="BACKEND='TRITON' cannot run here.*float64"):
        torch.compile(flex_attention, fullgraph=True)(q, k, v, kernel_options={"BACKEND": "TRITON"})
