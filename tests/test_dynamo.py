"""Capture by Dynamo: fullgraph with closures, gradients to closures without compile,
torch's own flex attention untouched in the same process, BlockMask through compiled code."""

import math

import pytest
import torch

from inductor_flex import create_block_mask, flex_attention
from inductor_flex.reference import attention_reference


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_fullgraph_closure_indexed_by_every_index(backend):
    B, H, L, S, E = 2, 3, 40, 24, 16
    bias = torch.randn(B, H, L, S, requires_grad=True)
    per_head = torch.randn(H, requires_grad=True)
    doc = torch.randint(0, 3, (S,)).sort().values

    def score_mod(score, b, h, q_idx, kv_idx):
        return score * per_head[h] + bias[b, h, q_idx, kv_idx]

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc[kv_idx] <= doc[q_idx % S]) | (kv_idx == 0)

    mask = create_block_mask(mask_mod, B, H, L, S, device="cpu", BLOCK_SIZE=(16, 8))
    q = torch.randn(B, H, L, E, requires_grad=True)
    k = torch.randn(B, H, S, E, requires_grad=True)
    v = torch.randn(B, H, S, E, requires_grad=True)
    compiled = torch.compile(flex_attention, backend=backend, fullgraph=True)
    out = compiled(q, k, v, score_mod=score_mod, block_mask=mask)
    out.sum().backward()
    assert bias.grad is not None and per_head.grad is not None

    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, bias, per_head)]
    q64, k64, v64, bias64, head64 = leaves

    def score64(score, b, h, q_idx, kv_idx):
        return score * head64[h] + bias64[b, h, q_idx, kv_idx]

    gold, _, _ = attention_reference(q64, k64, v64, score64, mask.as_tuple(), 1 / math.sqrt(E))
    gold.sum().backward()
    torch.testing.assert_close(out.double(), gold, atol=1e-5, rtol=1e-5)
    for ours, ref in zip((q, k, v, bias, per_head), leaves):
        torch.testing.assert_close(ours.grad.double(), ref.grad, atol=2e-4, rtol=2e-4)


def test_eager_call_gives_gradients_to_closures():
    slopes = torch.rand(2, requires_grad=True)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    q, k, v = (torch.randn(1, 2, 20, 8, requires_grad=True) for _ in range(3))
    flex_attention(q, k, v, score_mod=alibi).sum().backward()
    assert slopes.grad is not None and slopes.grad.abs().sum() > 0


def test_torch_flex_attention_still_works_in_same_process():
    from torch.nn.attention import flex_attention as torch_flex

    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    ours = flex_attention(q, k, v, block_mask=create_block_mask(_causal, 1, 1, 64, 64, device="cpu"))
    mask = torch_flex.create_block_mask(_causal, 1, 1, 64, 64, device="cpu")
    theirs = torch.compile(torch_flex.flex_attention, backend="aot_eager")(q, k, v, block_mask=mask)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_block_mask_created_inside_compiled_function():
    def attend(q, k, v):
        mask = create_block_mask(_causal, None, None, q.size(-2), k.size(-2), device="cpu", BLOCK_SIZE=16)
        return flex_attention(q, k, v, block_mask=mask), mask

    q, k, v = (torch.randn(1, 2, 48, 16) for _ in range(3))
    out, mask = torch.compile(attend, backend="aot_eager", fullgraph=True)(q, k, v)
    torch.testing.assert_close(out, flex_attention(q, k, v, block_mask=mask))
    assert mask.BLOCK_SIZE == (16, 16)


def test_no_recompile_for_new_data():
    calls = []

    def counting_backend(gm, inputs):
        calls.append(gm)
        return gm.forward

    slopes = torch.rand(2)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    compiled = torch.compile(flex_attention, backend=counting_backend, fullgraph=True)
    for _ in range(3):
        q, k, v = (torch.randn(1, 2, 32, 16) for _ in range(3))
        slopes.copy_(torch.rand(2))
        compiled(q, k, v, score_mod=alibi)
    assert len(calls) == 1


def test_return_lse_and_max_scores():
    from inductor_flex import AuxRequest

    q, k, v = (torch.randn(1, 2, 30, 16, dtype=torch.float64) for _ in range(3))
    out, aux = flex_attention(q, k, v, return_aux=AuxRequest(lse=True, max_scores=True))
    scores = (q @ k.transpose(-1, -2)) / 4.0
    torch.testing.assert_close(aux.lse, scores.logsumexp(-1))
    torch.testing.assert_close(aux.max_scores, scores.amax(-1))
    torch.testing.assert_close(out, scores.softmax(-1) @ v)
    only_lse = flex_attention(q, k, v, return_aux=AuxRequest(lse=True))[1]
    assert only_lse.max_scores is None
    with pytest.warns(FutureWarning):
        _, lse = flex_attention(q, k, v, return_lse=True)
    torch.testing.assert_close(lse, aux.lse)


def test_fully_masked_rows_give_zero_and_finite_grads():
    def only_even_rows(b, h, q_idx, kv_idx):
        return (q_idx % 2 == 0) & (kv_idx <= q_idx)

    mask = create_block_mask(only_even_rows, None, None, 32, 32, device="cpu", BLOCK_SIZE=8)
    q, k, v = (torch.randn(1, 2, 32, 16, requires_grad=True) for _ in range(3))
    from inductor_flex import AuxRequest

    out, aux = flex_attention(q, k, v, block_mask=mask, return_aux=AuxRequest(lse=True))
    assert torch.all(out[:, :, 1::2] == 0)
    assert torch.all(aux.lse[:, :, 1::2] == -math.inf)
    (out.sum() + torch.where(torch.isfinite(aux.lse), aux.lse, 0).sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[:, :, 1::2] == 0)


def _scaled_query(q, cap):  # the float is read outside the mods too: a SymFloat after a recompile
    return q * (1.0 / cap)


SYMBOLIC_FLOAT_CASES = {
    # softcap whose cap the compiled function also uses outside score_mod
    "float_read_outside": (
        lambda q, cap: _scaled_query(q, cap),
        lambda cap: lambda score, b, h, q_idx, kv_idx: cap * torch.tanh(score / cap),
        None,
    ),
    # a float computed from an int that becomes dynamic (window * 0.01)
    "float_from_dynamic_int": (
        lambda q, window: q * window,
        lambda window: lambda score, b, h, q_idx, kv_idx: score + window * 0.01 * (q_idx - kv_idx),
        lambda window: lambda b, h, q_idx, kv_idx: (q_idx - kv_idx).abs() <= window,
    ),
    # a float in mask_mod, read outside too
    "float_in_mask_mod": (
        lambda q, cap: _scaled_query(q, cap),
        None,
        lambda cap: lambda b, h, q_idx, kv_idx: (q_idx - kv_idx).abs() * 0.5 <= cap,
    ),
}


@pytest.mark.parametrize("case", list(SYMBOLIC_FLOAT_CASES), ids=str)
def test_symbolic_floats_are_specialised(case):
    """A Python number that Dynamo makes dynamic on a recompile (automatic dynamic) reaches a mod
    as a SymFloat. It used to fail to lower, or worse, lower with the value of the compile that
    made it dynamic: a silent wrong answer for the next value. Each value must give its own
    answer, forward and backward."""
    prepare, make_score_mod, make_mask_mod = SYMBOLIC_FLOAT_CASES[case]

    def attend(q, k, v, value):
        q = prepare(q, value)
        score_mod = make_score_mod(value) if make_score_mod else None
        mask = None
        if make_mask_mod:
            mask = create_block_mask(make_mask_mod(value), None, None, q.shape[-2], k.shape[-2],
                                     device=q.device, BLOCK_SIZE=16)
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=mask)

    compiled = torch.compile(attend, fullgraph=True)
    values = (4, 5, 7, 5) if case == "float_from_dynamic_int" else (4.0, 5.0, 7.5, 5.0)
    for value in values:
        q, k, v = (torch.randn(1, 2, 40, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
        out = compiled(*(t.float() for t in (q, k, v)), value)
        (grad_q,) = torch.autograd.grad(out.sum(), q)
        gold = attend(q, k, v, value)
        (gold_grad_q,) = torch.autograd.grad(gold.sum(), q)
        torch.testing.assert_close(out.double(), gold, atol=2e-5, rtol=2e-5, msg=f"value {value}")
        torch.testing.assert_close(grad_q, gold_grad_q, atol=1e-4, rtol=1e-4, msg=f"value {value}")


def test_zero_dim_capture_moves_to_query_device():
    """A captured 0-d CPU tensor with inputs on another device is moved there in the graph (a
    CPU scalar mixes with any device in torch; our kernels read captured tensors through
    pointers). Without a GPU the devices are swapped: a 0-d meta tensor with CPU inputs, only
    traced (the graph is not run). test_fuzz.py runs a CPU scalar with CUDA inputs on a GPU."""
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return lambda *args: (torch.zeros(1, 2, 32, 16),)

    weight = torch.tensor(0.7, device="meta")
    q, k, v = (torch.randn(1, 2, 32, 16) for _ in range(3))
    torch.compile(flex_attention, fullgraph=True, backend=keep_graph)(
        q, k, v, score_mod=lambda score, b, h, q_idx, kv_idx: score * weight)
    (move,) = [node for node in graphs[0].graph.nodes if node.target == "to"]
    assert move.args[1] == torch.device("cpu")
    (attention,) = [node for node in graphs[0].graph.nodes if "inductor_flex_attention" in str(node.target)]
    assert attention.args[7] == (move,)  # the score_mod buffers: the moved scalar


class _RelativeBias(torch.nn.Module):
    """score_mod and mask_mod as methods of a module, reading its parameter."""

    def __init__(self, heads):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.randn(heads, 16) * 0.1)

    def score_mod(self, score, b, h, q_idx, kv_idx):
        return score + self.bias[h, (q_idx - kv_idx).abs().clamp(max=15)]

    def mask_mod(self, b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def forward(self, q, k, v):
        mask = create_block_mask(self.mask_mod, None, None, q.shape[-2], k.shape[-2], device=q.device, BLOCK_SIZE=16)
        return flex_attention(q, k, v, score_mod=self.score_mod, block_mask=mask)


def test_bound_methods_as_mods():
    """self.score_mod: the capture's arity check does not count self (it used to reject it)."""
    module = _RelativeBias(2)
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    out = torch.compile(module, fullgraph=True)(q, k, v)
    out.sum().backward()
    compiled_grad = module.bias.grad.clone()
    module.bias.grad = None
    module.double()(q.double(), k.double(), v.double()).sum().backward()
    torch.testing.assert_close(out.double(), module(q.double(), k.double(), v.double()), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(compiled_grad.double(), module.bias.grad, atol=1e-4, rtol=1e-4)


def test_scale_changing_between_calls():
    """Dynamo makes a scale that changed between calls symbolic: fullgraph must still compile
    (math.isfinite of it was a graph break) and each scale give its own answer."""
    compiled = torch.compile(flex_attention, fullgraph=True)
    q, k, v = (torch.randn(1, 2, 33, 16, dtype=torch.float64) for _ in range(3))
    for scale in (0.3, -0.5, 0.0, 2.0):
        out = compiled(q.float(), k.float(), v.float(), scale=scale)
        gold = flex_attention(q, k, v, scale=scale)  # eager: the float64 reference
        torch.testing.assert_close(out.double(), gold, atol=2e-5, rtol=2e-5, msg=f"scale {scale}")


def test_scale_from_a_dynamic_size():
    """A scale computed from a size that dynamic=True makes symbolic is a symbolic float: it
    passes the scale checks and is specialised per value."""
    def attend(q, k, v):
        return flex_attention(q, k, v, scale=q.shape[-2] / (40 * math.sqrt(q.shape[-1])))

    compiled = torch.compile(attend, fullgraph=True, dynamic=True)
    for length in (40, 50, 60):
        q, k, v = (torch.randn(1, 2, length, 16, dtype=torch.float64) for _ in range(3))
        out = compiled(q.float(), k.float(), v.float())
        torch.testing.assert_close(out.double(), attend(q, k, v), atol=2e-5, rtol=2e-5, msg=f"length {length}")
