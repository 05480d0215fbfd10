"""flex_attention inside the machinery models use: torch.autocast and activation checkpointing,
eager and compiled on CPU, against the same calls made plainly (and the float64 oracle)."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import oracle
from inductor_flex import flex_attention

MODES = ["eager", "inductor"]


@pytest.mark.parametrize("mode", MODES)
def test_autocast_casts_query_key_value_first(mode):
    """Found by a probe of model integration: under torch.autocast, torch's flex attention casts
    q, k, v to autocast's dtype (mixed q/k/v dtypes included); ours ignored autocast, and its
    eager path let autocast lower the precision of its own float32 softmax. Now a call under
    autocast is a call on the cast tensors, forward and backward: bit for bit eagerly; compiled,
    Inductor may keep a fused cast's extra precision, so there the oracle's rule applies."""
    B, H, L, D = 2, 2, 75, 16
    leaves = [torch.randn(B, H, L, D, requires_grad=True) for _ in range(3)]
    slopes = torch.rand(H)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    attend = oracle.MODES[mode]
    mixed = [leaves[0].to(torch.bfloat16), leaves[1], leaves[2]]  # e.g. q from a bf16 projection
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(*mixed, score_mod=alibi)
    assert out.dtype == torch.bfloat16
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)

    def cast_run(dtype):  # eager, on q, k, v cast to bf16 first
        cast = [t.detach().to(torch.bfloat16).to(dtype).requires_grad_() for t in leaves]
        result = flex_attention(*cast, score_mod=alibi)
        return result, torch.autograd.grad(result, cast, grad_out.to(dtype))

    (expected, expected_grads), (gold, gold_grads) = cast_run(torch.bfloat16), cast_run(torch.float64)
    for name, grad in zip("qkv", grads):
        assert grad.dtype == torch.float32, f"d{name} keeps its leaf's dtype"
    if mode == "eager":
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        for name, grad, want in zip("qkv", grads, expected_grads):
            torch.testing.assert_close(grad, want.float(), rtol=0, atol=0, msg=f"d{name}")
    else:
        oracle.assert_within("out", out, gold, expected, accumulated_terms=L)
        for name, grad, want, golden in zip("qkv", grads, expected_grads, gold_grads):
            oracle.assert_within(f"d{name}", grad.to(torch.bfloat16), golden, want, accumulated_terms=L)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_activation_checkpointing_with_a_learnable_captured_tensor(mode, use_reentrant):
    """Found by a probe of model integration: eager, non-reentrant checkpointing around a
    score_mod with a learnable tensor failed in backward (the joint graph's trace unpacked its
    saved tensors through the checkpoint's hooks, re-running the function under FX tracing).
    Checkpointed gradients equal the plain call's."""
    leaves = [torch.randn(2, 2, 70, 16, requires_grad=True) for _ in range(3)]
    slopes = (torch.rand(2) + 0.1).requires_grad_()

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    attend = oracle.MODES[mode]

    def attention(q, k, v):
        return attend(q, k, v, score_mod=alibi)

    grad_out = torch.randn(2, 2, 70, 16)

    def gradients(run):  # .backward(), not autograd.grad: reentrant checkpointing refuses .grad()
        run().backward(grad_out)
        grads = [t.grad for t in (*leaves, slopes)]
        for t in (*leaves, slopes):
            t.grad = None
        return grads

    plain = gradients(lambda: attention(*leaves))
    grads = gradients(lambda: checkpoint(attention, *leaves, use_reentrant=use_reentrant))
    for name, grad, want in zip(("q", "k", "v", "slopes"), grads, plain):
        torch.testing.assert_close(grad, want, rtol=1e-6, atol=1e-6, msg=f"d{name}")


class _BiasedAttention(torch.nn.Module):
    """A score_mod reading a buffer and a parameter, and a causal block mask made in forward."""

    def __init__(self, heads=2, length=96):
        super().__init__()
        self.register_buffer("slopes", torch.rand(heads))
        self.table = torch.nn.Parameter(torch.randn(heads, 2 * length))
        self.length = length

    def forward(self, q, k, v):
        from inductor_flex import create_block_mask

        slopes, table, offset = self.slopes, self.table, self.length

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + slopes[h] * (kv_idx - q_idx) + table[h, q_idx - kv_idx + offset]

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        mask = create_block_mask(causal, None, None, q.size(-2), k.size(-2), device=q.device, BLOCK_SIZE=32)
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=mask)


@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
def test_export_of_a_module_with_captured_buffers(strict):
    """Found by a probe of model integration: non-strict torch.export (the default) baked the
    score_mod's buffer into the graph as a fake constant (the program returned a FakeTensor, or
    crashed on a parameter). The capture now runs as torch's operators do inside an export."""
    module = _BiasedAttention()
    example = [torch.randn(1, 2, 96, 16) for _ in range(3)]
    program = torch.export.export(module, tuple(example), strict=strict)
    with torch.no_grad():
        for inputs in (example, [torch.randn(1, 2, 96, 16) for _ in range(3)]):
            out = program.module()(*inputs)
            assert type(out) is torch.Tensor
            torch.testing.assert_close(out, module(*inputs), rtol=1e-6, atol=1e-6)
