"""The variant catalogue through inductor_flex, forward and backward, against the oracle."""


import pytest
import torch

from catalogue import BY_NAME, CATALOGUE
from oracle import run_variant



@pytest.mark.parametrize("mode", ["eager", "aot_eager"])
@pytest.mark.parametrize("variant", CATALOGUE, ids=lambda v: v.name)
def test_catalogue_forward_backward(variant, mode):
    run_variant(variant, mode=mode, check_torch=True)


@pytest.mark.parametrize("L,S", [(1, 1), (17, 17), (300, 300), (1, 300), (300, 17)])
@pytest.mark.parametrize("E,Ev", [(16, 16), (80, 80), (96, 64), (192, 128)])
def test_awkward_sizes(L, S, E, Ev):
    run_variant(BY_NAME["alibi"], B=1, Hq=2, Hkv=1, L=L, S=S, E=E, Ev=Ev, block_size=48)


@pytest.mark.parametrize("variant", ["document", "relative_position"], ids=str)
def test_long_sequence(variant):
    run_variant(BY_NAME[variant], B=1, Hq=2, Hkv=2, L=1000, S=1000, E=32, Ev=32, block_size=128)


@pytest.mark.parametrize("block_size", [16, 24, 48, 100, (64, 32), (32, 128)], ids=str)
def test_block_sizes(block_size):
    run_variant(BY_NAME["document"], L=150, S=130, block_size=block_size)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_dtypes(dtype):
    run_variant(BY_NAME["alibi"], dtype=dtype, L=40, S=40)


def test_gqa_group_of_three():
    run_variant(BY_NAME["head_batch_bias"], Hq=6, Hkv=2)


def test_broadcast_kv_batch():
    """Keys/values with batch 1 broadcast over the query batch; their grads sum over it."""
    import math

    from inductor_flex import flex_attention
    from inductor_flex.block_mask import full_block_mask
    from inductor_flex.reference import attention_reference

    q = torch.randn(3, 2, 20, 16, requires_grad=True)
    k = torch.randn(1, 2, 20, 16, requires_grad=True)
    v = torch.randn(1, 2, 20, 16, requires_grad=True)
    out = flex_attention(q, k, v)
    out.sum().backward()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    gold, _, _ = attention_reference(q64, k64.expand(3, -1, -1, -1), v64.expand(3, -1, -1, -1),
                                     lambda s, b, h, i, j: s, full_block_mask(20, 20, "cpu").as_tuple(),
                                     1 / math.sqrt(16))
    gold.sum().backward()
    torch.testing.assert_close(out.double(), gold, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k.grad.double(), k64.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(v.grad.double(), v64.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["eager", "aot_eager"])
def test_score_mod_reading_a_tensor_whole_or_ignoring_the_score(mode):
    """Gradients for a captured scalar read whole (score * w) and for a score_mod that ignores
    the score (only a bias per key): both are summed over every position."""
    import math

    from inductor_flex.block_mask import full_block_mask
    from inductor_flex.reference import attention_reference
    from oracle import MODES

    weight = torch.tensor(0.7, requires_grad=True)
    bias = torch.randn(24, requires_grad=True)
    q, k, v = (torch.randn(1, 2, 24, 8, requires_grad=True) for _ in range(3))
    cases = [
        (lambda s, b, h, i, j: s * weight, weight, lambda leaf: (lambda s, b, h, i, j: s * leaf)),
        (lambda s, b, h, i, j: bias[j], bias, lambda leaf: (lambda s, b, h, i, j: leaf[j])),
    ]
    for score_mod, leaf, gold_mod in cases:
        MODES[mode](q, k, v, score_mod=score_mod).sum().backward()
        leaf64 = leaf.detach().double().requires_grad_()
        q64, k64, v64 = (t.detach().double() for t in (q, k, v))
        gold, _, _ = attention_reference(q64, k64, v64, gold_mod(leaf64), full_block_mask(24, 24, "cpu").as_tuple(),
                                         1 / math.sqrt(8))
        gold.sum().backward()
        torch.testing.assert_close(leaf.grad.double(), leaf64.grad, atol=1e-4, rtol=1e-4)
        leaf.grad = None


@pytest.mark.parametrize("mode", ["eager", "aot_eager", "inductor"])
def test_learnable_tensors_read_through_chained_indexing(mode):
    """Found by a probe porting torch's tests: ``bias[q_idx][kv_idx]`` with a learnable bias gave
    a silently wrong gradient in eager mode and a LoweringException compiled. The joint graph
    now scatters each chained read's gradient once, with the indices concatenated."""
    from oracle import MODES, check_chained_reads

    check_chained_reads(MODES[mode], "cpu")


@pytest.mark.parametrize("mode", ["eager", "inductor"])
def test_a_learnable_slice_used_whole_is_refused_with_the_rewrite(mode):
    """``heads[h].sum()``: the gradient is a slice per position, which no backward sums."""
    from oracle import MODES

    heads = torch.randn(2, 24, requires_grad=True)
    q, k, v = (torch.randn(1, 2, 24, 8, requires_grad=True) for _ in range(3))
    with pytest.raises(NotImplementedError, match=r"t_sum = t.sum\(-1\)"):
        out = MODES[mode](q, k, v, score_mod=lambda s, b, h, i, j: s + heads[h].sum() * 0.1)
        out.sum().backward()
