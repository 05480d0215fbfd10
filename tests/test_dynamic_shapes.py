"""``torch.compile(dynamic=True)``: one compile serves every sequence length and batch size.

Each test compiles once, then runs at least ten (batch, length) combinations with Dynamo's
``error_on_recompile`` set (and a frame counter as a second witness), forward and backward,
against the float64 oracle. Block masks are rebuilt every call from per-batch data (document
ids, sequence lengths) that the mask_mod captures.

Two Dynamo rules shape the sizes used here (they hold for any torch.compile user):
- duck sizing: sizes that are equal at the first compile share one symbol, and a later call
  where they differ recompiles once; so the first call's batch, lengths and block counts are
  all distinct from each other and from the (static) head counts and head dims;
- 0/1 specialisation: a size of 1 is static, so every length spans at least two blocks (a
  length inside one block would make the block count 1).

CPU runs the query-chunked decomposition (``lowering/decomposed.py``); the gpu-marked tests
run the Triton forward, backward and decode kernels.
"""

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import oracle
from catalogue import Variant
from decode_cases import _ragged_lengths as ragged_lengths_mods
from decode_cases import decode_runs  # noqa: F401 (fixture)
from inductor_flex import create_block_mask, flex_attention
from inductor_flex.lowering import decomposed

CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                        reason="needs a CUDA GPU")])


@pytest.fixture(autouse=True)
def uncached_compiles():
    """Every compile runs our lowering (Inductor's caches do not key on out-of-tree code)."""
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield


def _alibi_documents(buffers):
    """ALiBi slopes per head (learnable) and causal attention within per-batch documents."""
    slopes, doc = buffers["slopes"], buffers["doc"]

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    def same_document(b, h, q_idx, kv_idx):
        return (doc[b, q_idx] == doc[b, kv_idx]) & (q_idx >= kv_idx)

    return alibi, same_document


def _alibi_documents_buffers(B, H, L, S, device):
    starts = torch.rand(B, max(L, S), device=device) < 0.05
    starts[:, 0] = False
    return {"slopes": torch.rand(H, device=device), "doc": torch.cumsum(starts.int(), 1).to(torch.int32)}


ALIBI_DOCUMENTS = Variant("alibi_documents", _alibi_documents, _alibi_documents_buffers, learnable=("slopes",))


def _sweep(sizes, call):
    """``call(B, L)`` for every size: the first compiles, none of the others may recompile."""
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(flex_attention, backend=counter, dynamic=True, fullgraph=True)
    (B, L), rest = sizes[0], sizes[1:]
    call(compiled, B, L)
    assert counter.frame_count == 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        for B, L in rest:
            call(compiled, B, L)
    assert counter.frame_count == 1, f"{counter.frame_count} compiles for {len(sizes)} sizes"


# Self-attention, (B, L): the first is the largest problem (it sets the memory bound, below).
# Inductor's C++ code generator picks a reduction strategy by size (above 4096 elements, a
# cascaded sum) and guards on that choice; the slopes' gradient sums B·ceil(L/2)·L terms a
# chunk, so every size here keeps that above 4096, and the softmax's L below it.
SELF_ATTENTION_SIZES = [(5, 110), (3, 70), (2, 97), (4, 45), (3, 128), (6, 41), (2, 67), (5, 77), (3, 57),
                        (4, 88), (6, 38)]


def test_lengths_and_batches_without_recompiles_cpu(monkeypatch):
    """GQA, a learnable captured tensor, per-batch documents; the chunk budget is set so the
    graph runs two chunks of ceil(L/2) rows (odd lengths pad one row), which the first, largest
    problem just fills: every later call stays within the graph's memory guard."""
    B, L = SELF_ATTENTION_SIZES[0]
    monkeypatch.setattr(decomposed, "CHUNK_ELEMENTS", B * 4 * L * L // 2)

    def call(compiled, B, L):
        oracle.check_call(compiled, ALIBI_DOCUMENTS, B=B, Hq=4, Hkv=2, L=L, S=L, E=16, dtype=torch.float32,
                       device="cpu", block_size=16)

    _sweep(SELF_ATTENTION_SIZES, call)


def test_chunk_count_is_a_power_of_two_within_the_budget():
    assert decomposed.chunk_count(2, 4, 100, 100, chunk_elements=80_000) == 1
    assert decomposed.chunk_count(2, 4, 101, 100, chunk_elements=80_000) == 2
    assert decomposed.chunk_count(2, 4, 300, 100, chunk_elements=80_000) == 4
    assert decomposed.chunk_count(1, 1, 1 << 20, 1 << 20) == decomposed.MAX_CHUNKS


def test_outgrowing_the_memory_bound_recompiles_once_into_more_chunks(monkeypatch):
    """Below MAX_CHUNKS a graph is guarded on B·H·L·S <= chunks·CHUNK_ELEMENTS: a larger call
    recompiles (into 2 chunks here), smaller and in-between calls reuse a graph."""
    monkeypatch.setattr(decomposed, "CHUNK_ELEMENTS", 3 * 2 * 40 * 40)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(flex_attention, backend=counter, dynamic=True, fullgraph=True)
    for (L, compiles) in ((40, 1), (55, 2), (50, 2), (33, 2)):
        q, k, v = (torch.randn(3, 2, L, 16, dtype=torch.float64) for _ in range(3))
        mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, L, L, device="cpu",
                                 BLOCK_SIZE=16)
        out = compiled(q, k, v, block_mask=mask)
        torch.testing.assert_close(out, flex_attention(q, k, v, block_mask=mask))
        assert counter.frame_count == compiles, (L, counter.frame_count)


def test_keys_fewer_than_one_block_with_an_indexed_mask():
    """Regression: with symbolic sizes Inductor's C++ backend split the key loop of a kernel
    indexed by ``kv_idx // 128`` into (S // 128, 128) whatever S, skipping every key when
    S < 128 (``decomposed._positions`` explains the fix). The mask reads a captured tensor at
    both q_idx and kv_idx, the pattern that produced such a kernel."""
    B, H, L = 2, 1, 32
    q, k, v = (torch.randn(B, H, L, 16, dtype=torch.float64) for _ in range(3))
    ids = torch.randint(0, 3, (L,)).sort().values

    def same_document(b, h, q_idx, kv_idx):
        return ids[q_idx] == ids[kv_idx]

    mask = create_block_mask(same_document, None, None, L, L, device="cpu")
    out = torch.compile(flex_attention, dynamic=True, fullgraph=True)(q, k, v, block_mask=mask)
    torch.testing.assert_close(out, flex_attention(q, k, v, block_mask=mask))


class _Attention(torch.nn.Module):
    """A transformer attention block: projections around flex_attention, a sliding window
    whose width arrives as a Python int (a SymInt under dynamic=True, captured by score_mod)."""

    def __init__(self, dim=32, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x, block_mask, window: int):
        B, L, _ = x.shape
        q = self.q(x).view(B, L, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(B, L, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)

        def near(score, b, h, q_idx, kv_idx):
            return torch.where(q_idx - kv_idx <= window, score, score - 2.0)

        y = flex_attention(q, k, v, score_mod=near, block_mask=block_mask, enable_gqa=True)
        return self.out(y.transpose(1, 2).reshape(B, L, -1))


def _padding_mask(lengths, L, device):
    """Causal attention over each sequence's first lengths[b] tokens (batch-dependent data)."""

    def within_length(b, h, q_idx, kv_idx):
        return (kv_idx < lengths[b]) & (q_idx >= kv_idx)

    return create_block_mask(within_length, lengths.numel(), None, L, L, device=device, BLOCK_SIZE=16)


MODULE_SIZES = [(3, 50), (5, 37), (2, 90), (4, 64), (6, 23), (2, 45), (3, 81), (5, 58), (4, 33), (2, 72)]


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_compiled_module_with_per_batch_lengths(device):
    """A compiled module, fresh per-batch lengths and window each call: no recompile; output
    and every parameter gradient within 2x the float32 eager error of the float64 module."""
    module = _Attention().to(device)
    gold_module, base_module = copy.deepcopy(module).double(), copy.deepcopy(module)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(module, backend=counter, dynamic=True, fullgraph=True)

    for i, (B, L) in enumerate(MODULE_SIZES):
        x = torch.randn(B, L, 32, device=device)
        lengths = torch.randint(L // 2, L + 1, (B,), device=device)
        mask, window = _padding_mask(lengths, L, device), 5 + i
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            out = compiled(x, mask, window)
        gold, base = gold_module(x.double(), mask, window), base_module(x, mask, window)
        oracle.assert_within(f"out B={B} L={L}", out, gold, base)
        grad_out = torch.randn_like(out)
        for model in (module, gold_module, base_module):
            model.zero_grad()
        out.backward(grad_out)
        gold.backward(grad_out.double())
        base.backward(grad_out)
        named = zip(module.named_parameters(), gold_module.parameters(), base_module.parameters())
        for (name, param), gold_param, base_param in named:
            oracle.assert_within(f"d{name} B={B} L={L}", param.grad, gold_param.grad, base_param.grad,
                                 terms_per_element=B * L)
    assert counter.frame_count == 1


# ---------------------------------------------------------------- GPU: Triton kernels

GPU_SIZES = [(5, 1100), (3, 700), (2, 1970), (4, 333), (3, 1280), (6, 415), (2, 640), (5, 777), (3, 470),
             (4, 888), (2, 257)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lengths_and_batches_without_recompiles_gpu(dtype):
    """The fused forward and backward templates under dynamic shapes, the slopes' gradient
    included (in bf16 through the dQ programs' row pass)."""
    def call(compiled, B, L):
        oracle.check_call(compiled, ALIBI_DOCUMENTS, B=B, Hq=8, Hkv=2, L=L, S=L, E=64, dtype=dtype, device="cuda",
                       block_size=128)

    _sweep(GPU_SIZES, call)


def _ragged_buffers(B, H, L, S, device):
    lengths = torch.randint(1, S + 1, (B,), device=device, dtype=torch.int32)
    return {"lengths": lengths, "slopes": torch.rand(H, device=device) * 0.25}


# decode_cases' ragged-length ALiBi mods, every sequence at least one token long.
RAGGED = Variant("ragged_alibi", ragged_lengths_mods, _ragged_buffers)

DECODE_SIZES = [(5, 3100), (3, 700), (2, 1970), (4, 333), (3, 5280), (6, 415), (2, 640), (5, 777), (3, 4470),
                (4, 888), (2, 2570)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_kv_lengths_without_recompiles_gpu(decode_runs):
    """One query token (a static size of 1), GQA group 4, per-batch cache lengths: the split-KV
    decode kernel serves every cache length and batch size from one compile."""

    def call(compiled, B, S):
        oracle.check_call(compiled, RAGGED, B=B, Hq=8, Hkv=2, L=1, S=S, E=64, dtype=torch.bfloat16,
                       device="cuda", block_size=128, backward=False)

    _sweep(DECODE_SIZES, call)
    assert decode_runs, "the decode kernel did not run"
