"""``torch.compile(flex_attention)`` with the default Inductor backend on CPU.

Inductor generates C++ for CPU tensors, so both operators lower to the query-chunked
decomposition (``inductor_flex/lowering/decomposed.py``): bmm extern kernels plus generated C++
kernels fusing score_mod, mask and softmax. These tests check it against the float64 oracle
(forward and backward, captured-tensor gradients included), that what runs is generated code
and no eager fallback, and that no full [B, H, L, S] score matrix is ever allocated.
"""

import math
import re
import warnings

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from catalogue import BY_NAME
from oracle import check_captures_computed_in_the_graph, run_variant

import inductor_flex.lowering.decomposed as decomposed
from inductor_flex import create_block_mask, flex_attention
from inductor_flex.block_mask import full_block_mask
from inductor_flex.reference import attention_reference


def _buffer_sizes(code):
    """The shapes of every buffer the generated wrapper allocates."""
    return [tuple(int(s) for s in re.findall(r"\d+", shape))
            for shape in re.findall(r"empty_strided_cpu\(\((.*?)\)", code)]


@pytest.fixture(autouse=True)
def uncached_compiles():
    """Every compile runs our lowering: Inductor's FX-graph and AOT caches do not key on
    out-of-tree lowering code, so a cache hit could replay a graph lowered by older code."""
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False), warnings.catch_warnings():
        # float64 (and other inputs the GPU template refuses) are announced as a slower path.
        warnings.filterwarnings("ignore", message="inductor_flex: the fused forward kernel cannot run")
        yield


# (variant, run_variant keyword arguments): each compiles once, forward and backward; together
# they cover every mod kind of the catalogue's families, GQA, Lq != Lkv, S=1, S=17 and 300,
# head dims 16 and 80, block sizes 16, 48 and (64, 32), float32, bfloat16 and float64.
CASES = [
    ("noop", dict(B=1, Hq=2, Hkv=2, L=17, S=1)),
    ("causal", dict(L=67, S=45, block_size=(64, 32))),
    ("softcap_document", dict(B=1, Hq=2, Hkv=1, L=300, S=300, dtype=torch.bfloat16)),
    ("learnable_bias", dict(L=40, S=33, dtype=torch.float64)),
    # constant indices into captured tensors, a learnable one included (functorch asserted on
    # them in the decomposition's fake tracing)
    ("constant_index", dict(B=1, L=50, S=45)),
]


@pytest.mark.parametrize("name,kwargs", CASES, ids=[name for name, _ in CASES])
def test_compiled_matches_oracle(name, kwargs):
    run_variant(BY_NAME[name], mode="inductor", **kwargs)


def test_several_chunks_gqa_alibi(monkeypatch):
    """Chunks forced small: two per call, the second shorter; GQA, Lq != Lkv, head dim 80,
    block size 48; the slopes' gradient (summed per head) accumulated over the chunks. In
    neither graph does a buffer of scores ([..., S] last) hold more than one chunk's rows."""
    B, Hq, L, S = 2, 4, 67, 61
    monkeypatch.setattr(decomposed, "CHUNK_ELEMENTS", B * Hq * S * 40)  # 40 rows a chunk
    assert decomposed.chunk_ranges(B, Hq, L, S) == [(0, 40), (40, 67)]
    _, codes = run_and_get_code(run_variant, BY_NAME["alibi"], B=B, Hq=Hq, Hkv=2, L=L, S=S, E=80, Ev=80,
                                block_size=48, mode="inductor")
    assert len(codes) == 2  # forward and backward
    for code in codes:
        score_buffers = [shape for shape in _buffer_sizes(code) if shape[-1] == S]
        assert score_buffers and max(math.prod(shape) for shape in score_buffers) == B * Hq * 40 * S


def test_chunk_count_is_bounded():
    ranges = decomposed.chunk_ranges(1, 1, 1 << 20, 1 << 20)
    assert len(ranges) <= decomposed.MAX_CHUNKS
    assert ranges[0] == (0, (1 << 20) // decomposed.MAX_CHUNKS) and ranges[-1][1] == 1 << 20
    small = decomposed.chunk_ranges(2, 4, 300, 300)
    assert small == [(0, 300)]
    rows = decomposed.chunk_ranges(1, 1, 4096, 4096)
    assert all(b - a == 1024 for a, b in rows) and len(rows) == 4
    assert decomposed.chunk_ranges(1, 1, 0, 16) == []


def test_generated_code_is_compiled_and_chunked():
    """B=1, H=1, L=S=4096: generated C++ kernels and bmm extern calls, no operator fallback or
    eager reference in the output code, and no buffer of 4096×4096 scores: four chunks of
    1024 rows that reuse one buffer. (The backward's buffers: ``test_several_chunks_ragged``.)"""
    B, H, L, D = 1, 1, 4096, 32
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, B, H, L, L, device="cpu")
    compiled = torch.compile(flex_attention, fullgraph=True)
    out, (code,) = run_and_get_code(compiled, q, k, v, block_mask=block_mask)

    assert "cpp_fused" in code and code.count("extern_kernels.bmm") == 8  # q·kᵀ and P·v, 4 chunks
    assert "inductor_flex_attention(" not in code and "higher_order" not in code
    assert "attention_reference" not in code and "fallback" not in code.lower()
    assert "empty_strided_cpu((1, 1, 4096, 4096)" not in code
    largest = max(math.prod(s) for s in _buffer_sizes(code))
    assert largest == 1024 * 4096, f"largest buffer {largest} elements"

    q64, k64, v64 = (t.double() for t in (q, k, v))
    gold, _, _ = attention_reference(q64, k64, v64, lambda s, b, h, i, j: s, block_mask.as_tuple(),
                                     1 / math.sqrt(D))
    torch.testing.assert_close(out.double(), gold, atol=2e-5, rtol=1e-4)


def test_dynamic_shapes_specialise_and_stay_correct():
    """dynamic=True: the decomposition specialises the sizes it chunks by (guarded), so each new
    length recompiles (here forward and backward, then a forward-only call) and is exact."""
    compiled = torch.compile(flex_attention, fullgraph=True, dynamic=True)
    slopes = torch.rand(2, requires_grad=True)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    for length, backward in ((24, True), (40, False)):
        q, k, v = (torch.randn(1, 2, length, 16, requires_grad=backward) for _ in range(3))
        out = compiled(q, k, v, score_mod=alibi)
        expected = flex_attention(q, k, v, score_mod=alibi)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        if backward:
            grads = torch.autograd.grad(out.sum(), (q, k, v, slopes))
            expected_grads = torch.autograd.grad(expected.sum(), (q, k, v, slopes))
            for got, want in zip(grads, expected_grads):
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_broadcast_kv_batch_and_grad_lse():
    """Keys/values of batch 1 broadcast over the query batch (their grads are summed over it),
    with a loss reading the output and the lse."""
    from inductor_flex import AuxRequest

    q = torch.randn(3, 2, 20, 16, requires_grad=True)
    k = torch.randn(1, 2, 20, 16, requires_grad=True)
    v = torch.randn(1, 2, 20, 16, requires_grad=True)
    out, aux = torch.compile(flex_attention, fullgraph=True)(q, k, v, return_aux=AuxRequest(lse=True))
    assert out.is_contiguous() and aux.lse.is_contiguous() and aux.lse.dtype == torch.float32
    (out.sum() + aux.lse.sum()).backward()
    assert k.grad.shape == k.shape and k.grad.is_contiguous() and v.grad.shape == v.shape
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    gold, gold_lse, _ = attention_reference(q64, k64.expand(3, -1, -1, -1), v64.expand(3, -1, -1, -1),
                                            lambda s, b, h, i, j: s, full_block_mask(20, 20, "cpu").as_tuple(),
                                            1 / math.sqrt(16))
    (gold.sum() + gold_lse.sum()).backward()
    torch.testing.assert_close(out.double(), gold, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux.lse.double(), gold_lse, atol=1e-5, rtol=1e-5)
    for ours, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        torch.testing.assert_close(ours.double(), want, atol=1e-4, rtol=1e-4)


def test_lse_only_loss_and_score_mod_ignoring_the_score():
    """No gradient reaches the output (only the lse is used) and score_mod ignores the score
    (the joint graph gives no score gradient): q and k get zeros, v nothing, the captured
    tensor its gradient. Gold: the float64 reference differentiated by plain autograd."""
    from inductor_flex import AuxRequest

    def build(bias):
        def replace(score, b, h, q_idx, kv_idx):
            return bias[h] * (kv_idx - q_idx) * 0.1
        return replace

    bias = torch.randn(2, requires_grad=True)
    q, k, v = (torch.randn(1, 2, 24, 16, requires_grad=True) for _ in range(3))
    _, aux = torch.compile(flex_attention, fullgraph=True)(q, k, v, score_mod=build(bias),
                                                           return_aux=AuxRequest(lse=True))
    d_q, d_k, d_v, d_bias = torch.autograd.grad(aux.lse.sum(), (q, k, v, bias), allow_unused=True)

    bias64 = bias.detach().double().requires_grad_()
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    _, gold_lse, _ = attention_reference(q64, k64, v64, build(bias64), full_block_mask(24, 24, "cpu").as_tuple(),
                                         1 / math.sqrt(16))
    (gold_d_bias,) = torch.autograd.grad(gold_lse.sum(), bias64)
    torch.testing.assert_close(aux.lse.double(), gold_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d_bias.double(), gold_d_bias, atol=1e-4, rtol=1e-4)
    for grad in (d_q, d_k, d_v):
        assert grad is None or not grad.abs().any()


def test_captured_tensors_computed_in_the_graph_get_gradients():
    """``slopes = raw * raw / 2`` inside the compiled function, then captured: the gradient reaches
    ``raw`` (it was silently None: the compiled backward dropped it)."""
    check_captures_computed_in_the_graph("cpu", torch.float32)


def test_captured_tensor_read_whole():
    """A captured tensor read whole (not indexed by b/h/q_idx/kv_idx) gets the sum of its
    per-position gradients; one read both whole and indexed is refused with the reason."""
    def build(w, t):
        return lambda score, b, h, q_idx, kv_idx: score * w + (t * t).sum() * score * 0.1

    w, t = torch.tensor(0.7, requires_grad=True), torch.randn(4, requires_grad=True)
    q, k, v = (torch.randn(1, 2, 24, 16, requires_grad=True) for _ in range(3))
    compiled = torch.compile(flex_attention, fullgraph=True)
    out = compiled(q, k, v, score_mod=build(w, t))
    got = torch.autograd.grad(out.sum(), (q, w, t))

    q64, k64, v64, w64, t64 = (x.detach().double().requires_grad_() for x in (q, k, v, w, t))
    gold, _, _ = attention_reference(q64, k64, v64, build(w64, t64), full_block_mask(24, 24, "cpu").as_tuple(),
                                     1 / math.sqrt(16))
    want = torch.autograd.grad(gold.sum(), (q64, w64, t64))
    torch.testing.assert_close(out.double(), gold, atol=1e-5, rtol=1e-5)
    for g, g64 in zip(got, want):
        torch.testing.assert_close(g.double(), g64, atol=1e-4, rtol=1e-4)

    def mixed(score, b, h, q_idx, kv_idx):
        return score + t.sum() + t[h] * q_idx

    torch._dynamo.reset()
    with pytest.raises(Exception, match="both indexed"):
        out = compiled(q, k, v, score_mod=mixed)
        torch.autograd.grad(out.sum(), t)


def test_deterministic_option_gives_identical_captured_gradients():
    """kernel_options DETERMINISTIC on CPU: the table's gradient is a scatter-add with repeated
    indices, compiled to atomics by default; the option keeps a serial scatter, so runs agree
    bit for bit (and with the default up to rounding)."""
    B, H, S, D = 2, 4, 256, 16
    table = torch.randn(2 * S - 1, requires_grad=True)

    def relative_position(score, b, h, q_idx, kv_idx):
        return score + table[kv_idx - q_idx + S - 1]

    q, k, v = (torch.randn(B, H, S, D, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(B, H, S, D)

    def table_grad(options):
        torch._dynamo.reset()
        out = torch.compile(flex_attention, fullgraph=True)(q, k, v, score_mod=relative_position,
                                                           kernel_options=options)
        (grad,) = torch.autograd.grad(out, (table,), grad_out)
        return grad

    first = table_grad({"DETERMINISTIC": True})
    for _ in range(2):
        assert torch.equal(first, table_grad({"DETERMINISTIC": True})), "DETERMINISTIC gradients differ between runs"
    torch.testing.assert_close(first, table_grad(None), rtol=1e-4, atol=1e-4)
