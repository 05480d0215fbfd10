"""GPU tier: the variant catalogue through our real kernels (run with `pytest -m gpu`)."""

import pytest
import torch

import oracle
from catalogue import BY_NAME, CATALOGUE

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("variant", CATALOGUE, ids=lambda v: v.name)
def test_catalogue_forward(variant, dtype):
    oracle.run_variant(variant, mode="inductor", device="cuda", dtype=dtype, backward=False,
                       B=2, Hq=4, Hkv=2, L=300, S=300, E=64, Ev=64, block_size=128)


# A representative subset (the whole catalogue's backward is in test_backward_gpu.py).
@pytest.mark.parametrize("variant", ["causal", "alibi", "document", "learnable_bias"])
def test_catalogue_forward_backward(variant):
    variant = BY_NAME[variant]
    oracle.run_variant(variant, mode="inductor", device="cuda", dtype=torch.bfloat16,
                       B=2, Hq=4, Hkv=2, L=256, S=256, E=64, Ev=64, block_size=128)


@pytest.mark.parametrize("E", [16, 64, 80, 128, 192], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("L", [1, 17, 300, 1000, 4096], ids=lambda s: f"S{s}")
def test_head_dims_and_lengths(E, L):
    oracle.run_variant(BY_NAME["alibi"], mode="inductor", device="cuda", dtype=torch.bfloat16, backward=False,
                       B=1, Hq=4, Hkv=2, L=L, S=L, E=E, Ev=E, block_size=128)


@pytest.mark.parametrize("E,Ev", [(8, 8), (4, 4), (128, 64), (96, 192)], ids=str)
def test_small_and_mixed_head_dims(E, Ev):
    oracle.run_variant(BY_NAME["document"], mode="inductor", device="cuda", dtype=torch.float16, backward=False,
                       B=1, Hq=2, Hkv=2, L=200, S=333, E=E, Ev=Ev, block_size=64)


@pytest.mark.parametrize("block_size", [16, 24, 32, 48, 100, (64, 32), (128, 16)], ids=str)
def test_any_block_size(block_size):
    oracle.run_variant(BY_NAME["sliding_window"], mode="inductor", device="cuda", dtype=torch.bfloat16,
                       backward=False, B=1, Hq=2, Hkv=1, L=1000, S=1000, E=64, Ev=64, block_size=block_size)


def test_fully_masked_rows_have_no_nan():
    from inductor_flex import AuxRequest, create_block_mask, flex_attention

    def odd_rows_masked(b, h, q_idx, kv_idx):
        return (q_idx % 2 == 0) & (kv_idx <= q_idx)

    mask = create_block_mask(odd_rows_masked, None, None, 512, 512, device="cuda", BLOCK_SIZE=64)
    q, k, v = (torch.randn(1, 2, 512, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out, aux = torch.compile(flex_attention)(q, k, v, block_mask=mask, return_aux=AuxRequest(lse=True))
    assert not out.isnan().any()
    assert torch.all(out[:, :, 1::2] == 0)
    assert torch.all(aux.lse[:, :, 1::2] == float("-inf"))


def test_max_autotune_chooses_among_candidates_and_runs_our_template():
    from torch._inductor.utils import run_and_get_code

    from inductor_flex import create_block_mask, flex_attention

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    mask = create_block_mask(causal, None, None, 1024, 1024, device="cuda")
    q, k, v = (torch.randn(2, 4, 1024, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    compiled = torch.compile(flex_attention, mode="max-autotune-no-cudagraphs", fullgraph=True)
    out, codes = run_and_get_code(compiled, q, k, v, block_mask=mask)
    assert any("attend_block_list" in code for code in codes)
    reference = flex_attention(q.double(), k.double(), v.double(), block_mask=mask)
    torch.testing.assert_close(out.double(), reference, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("variant,block_size", [("document", 32), ("relative_position", (48, 16)),
                                                ("causal", (100, 64)), ("alibi", (128, 48))], ids=str)
def test_small_blocks_regrouped(variant, block_size, dtype, monkeypatch):
    """Blocks of 16/32/48/100 run as regrouped 128-blocks (block_regroup.py; 64-multiples keep
    theirs), forward and backward: B·Hq·L/128 = 256 programs, above the GPU threshold of 128
    (the work threshold is lifted: this case is small enough to run fast)."""
    monkeypatch.setattr("inductor_flex.block_regroup.MIN_REGROUPED_SCORES_ON_GPU", 0)
    oracle.run_variant(BY_NAME[variant], mode="inductor", device="cuda", dtype=dtype,
                       B=2, Hq=16, Hkv=4, L=1000, S=1000, E=64, Ev=64, block_size=block_size)


def test_hand_made_mask_regrouped(monkeypatch):
    """A random hand-made mask (absent, partial and full blocks in shuffled lists) of 32-blocks,
    regrouped, against the float64 eager result of the original mask."""
    monkeypatch.setattr("inductor_flex.block_regroup.MIN_REGROUPED_SCORES_ON_GPU", 0)
    from inductor_flex import flex_attention
    from test_block_regroup import random_block_mask, sliding_or_sink

    B, H, L = 2, 16, 1000
    mask = random_block_mask(B, H, L, L, (32, 32), sliding_or_sink).to("cuda")
    q, k, v = (torch.randn(B, H, L, 64, device="cuda", dtype=torch.float64) for _ in range(3))
    out = torch.compile(flex_attention, fullgraph=True)(*(t.bfloat16() for t in (q, k, v)), block_mask=mask)
    gold = flex_attention(q, k, v, block_mask=mask)
    oracle.assert_within("regrouped hand-made", out, gold,
                         flex_attention(*(t.bfloat16() for t in (q, k, v)), block_mask=mask))



@pytest.mark.parametrize("fast_math", [False, True], ids=["default", "FAST_MATH"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_softcap_tanh_form(dtype, fast_math):
    """The hardware tanh only with FAST_MATH=True. By default the output, lse and gradients stay
    within twice the same-dtype eager error on scores large enough (|s| up to ~30) for a tanh
    error to show; with FAST_MATH the output and gradients do (its ~2^-11 relative error shows
    in the float32 lse: opt-in for that reason)."""
    from torch._inductor.utils import run_and_get_code

    from inductor_flex import AuxRequest, create_block_mask, flex_attention

    def softcap(score, b, h, q_idx, kv_idx):
        return 30.0 * torch.tanh(score / 30.0)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    mask = create_block_mask(causal, None, None, 1000, 1000, device="cuda")
    gold_qkv = [(torch.randn(2, 4, 1000, 64, device="cuda", dtype=torch.float64) * s).requires_grad_()
                for s in (4.0, 1.0, 1.0)]
    qkv = [t.detach().to(dtype).requires_grad_() for t in gold_qkv]
    eager_qkv = [t.detach().to(dtype).requires_grad_() for t in gold_qkv]
    compiled = torch.compile(flex_attention, fullgraph=True)
    (out, aux), codes = run_and_get_code(compiled, *qkv, score_mod=softcap, block_mask=mask,
                                         return_aux=AuxRequest(lse=True), kernel_options={"FAST_MATH": fast_math})
    assert any("tanh.approx.f32" in code for code in codes) == fast_math
    gold, gold_aux = flex_attention(*gold_qkv, score_mod=softcap, block_mask=mask, return_aux=AuxRequest(lse=True))
    eager, eager_aux = flex_attention(*eager_qkv, score_mod=softcap, block_mask=mask, return_aux=AuxRequest(lse=True))
    oracle.assert_within("out", out, gold, eager)
    if not fast_math:
        oracle.assert_within("lse", aux.lse, gold_aux.lse, eager_aux.lse)
    grad = torch.randn_like(gold)
    for result in (out, gold, eager):
        result.backward(grad.to(result.dtype))
    for name, ours, ref, base in zip("qkv", qkv, gold_qkv, eager_qkv):
        oracle.assert_within(f"d{name}", ours.grad, ref.grad, base.grad)


def test_regrouped_masks_under_cuda_graphs(monkeypatch):
    """mode="reduce-overhead": the regrouping operator is kept out of the CUDA graphs (its
    per-mask cache would hold tensors of their memory pool, and a replay would skip it), so
    each new mask of the same shape gets its own lists."""
    monkeypatch.setattr("inductor_flex.block_regroup.MIN_REGROUPED_SCORES_ON_GPU", 0)
    from inductor_flex import flex_attention
    from test_block_regroup import random_block_mask, sliding_or_sink

    B, H, L = 2, 16, 1000
    compiled = torch.compile(flex_attention, mode="reduce-overhead", fullgraph=True)
    q, k, v = (torch.randn(B, H, L, 64, device="cuda", dtype=torch.float64) for _ in range(3))
    for _ in range(4):  # warm-up, capture, then replays, each with a new mask
        mask = random_block_mask(B, H, L, L, (32, 32), sliding_or_sink).to("cuda")
        out = compiled(*(t.bfloat16() for t in (q, k, v)), block_mask=mask).clone()
        oracle.assert_within("regrouped under CUDA graphs", out, flex_attention(q, k, v, block_mask=mask),
                             flex_attention(*(t.bfloat16() for t in (q, k, v)), block_mask=mask))
    from torch._dynamo.utils import counters

    print("cudagraph skips:", dict(counters["inductor"]).get("cudagraph_skips", 0))
