"""Paged KV cache on the GPU: our real kernels (bf16/fp16) reading pages through the page
table, against the float64 reference over each sequence's logical K/V; no host sync on the
token path (``torch.cuda.set_sync_debug_mode("error")``). Run with ``pytest -m gpu``.
"""

import pytest
import torch

from test_paged import alibi_decode_mods, causal, check_against_logical, filled_cache, window_mask

from inductor_flex import PagedKVCache, create_block_mask

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PAGE_SIZES = [16, 32, 48, 100, 128]
DTYPES = [torch.bfloat16, torch.float16]


def gpu_lengths(page_size):
    return [1, page_size - 1, page_size, page_size + 1, 1000, 3 * page_size + 5]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_decode_through_our_kernels(page_size, dtype):
    lengths = gpu_lengths(page_size)
    cache, keys, values = filled_cache(page_size, lengths, Hkv=2, D=128, dtype=dtype, device="cuda")
    query = torch.randn(len(lengths), 8, 1, 128, dtype=dtype, device="cuda")
    alibi = alibi_decode_mods(cache, 8, "cuda")

    @torch.compile(fullgraph=True)
    def decode(query):
        return cache.attention(query, cache.decode_block_mask(), score_mod=alibi)

    check_against_logical(f"decode ps{page_size}", decode(query), query, keys, values, score_mod=alibi)


@pytest.mark.parametrize("page_size", [16, 100])
def test_decode_sliding_window_converted(page_size):
    lengths = gpu_lengths(page_size)
    cache, keys, values = filled_cache(page_size, lengths, Hkv=2, D=64, dtype=torch.bfloat16, device="cuda")
    batch_idx = torch.tensor([4, 0, 5, 2], device="cuda")
    window = window_mask((cache.lengths[batch_idx] - 1).clone(), 300)
    logical = create_block_mask(window, 4, 1, 1, max(lengths), device="cuda", BLOCK_SIZE=(128, page_size))
    query = torch.randn(4, 4, 1, 64, dtype=torch.bfloat16, device="cuda")

    @torch.compile(fullgraph=True)
    def decode(query):
        return cache.attention(query, cache.convert_logical_block_mask(logical, batch_idx))

    picked = [keys[i] for i in batch_idx.tolist()], [values[i] for i in batch_idx.tolist()]
    check_against_logical("decode window", decode(query), query, *picked, mask_mod=window)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page_size,q_block", [(16, 128), (32, 64), (48, 128), (100, 128), (128, 128)])
def test_prefill_through_our_kernels(page_size, q_block, dtype):
    lengths = [1, page_size + 1, 700, 1000]
    cache, keys, values = filled_cache(page_size, lengths, Hkv=2, D=64, dtype=dtype, device="cuda", decode_tail=0)
    longest = max(lengths)
    query = torch.randn(len(lengths), 4, longest, 64, dtype=dtype, device="cuda")
    logical = create_block_mask(causal, 1, 1, longest, longest, device="cuda", BLOCK_SIZE=(q_block, page_size))
    slopes = torch.rand(4, device="cuda")

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    @torch.compile(fullgraph=True)
    def prefill(query):
        mask = cache.convert_logical_block_mask(logical, torch.arange(len(lengths), device="cuda"))
        return cache.attention(query, mask, score_mod=alibi)

    check_against_logical(f"prefill ps{page_size}", prefill(query), query, keys, values, rows=lengths,
                          score_mod=alibi, mask_mod=causal)


def test_decode_loop_compiled_no_recompile_with_erase_and_reuse():
    page_size, Hkv, D = 16, 2, 64
    cache = PagedKVCache(40, page_size, 3, Hkv, D, dtype=torch.bfloat16, device="cuda", max_pages_per_sequence=12)
    cache.shuffle_free_pages(seed=3)
    lengths = [5, 100, 31]
    keys = [torch.randn(1, Hkv, n, D, dtype=torch.bfloat16, device="cuda") for n in lengths]
    values = [torch.randn(1, Hkv, n, D, dtype=torch.bfloat16, device="cuda") for n in lengths]
    for slot, n in enumerate(lengths):
        cache.reserve(slot, n + 40)
        cache.append(torch.tensor([slot], device="cuda"), keys[slot], values[slot])
    batch_idx = torch.arange(3, device="cuda")

    @torch.compile(fullgraph=True)
    def attend(query):
        return cache.attention(query, cache.decode_block_mask(batch_idx))

    for step in range(36):
        if step == 18:
            cache.erase(1)
            cache.reserve(1, 64)
            keys[1], values[1] = keys[1][:, :, :0], values[1][:, :, :0]
        k_new, v_new = (torch.randn(3, Hkv, 1, D, dtype=torch.bfloat16, device="cuda") for _ in range(2))
        cache.append(batch_idx, k_new, v_new)
        for s in range(3):
            keys[s] = torch.cat([keys[s], k_new[s:s + 1]], dim=2)
            values[s] = torch.cat([values[s], v_new[s:s + 1]], dim=2)
        query = torch.randn(3, 8, 1, D, dtype=torch.bfloat16, device="cuda")
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            out = attend(query)
        if step % 5 == 0 or step in (18, 19, 26, 27):
            check_against_logical(f"step {step}", out, query, keys, values)
    cache.check_no_dropped_tokens()


def test_token_path_never_syncs():
    """append / extend / write / mask building run with CUDA sync debugging set to error."""
    cache, _, _ = filled_cache(48, [50, 3, 700], Hkv=2, D=64, dtype=torch.bfloat16, device="cuda", spare_pages=40)
    for slot in range(3):
        cache.reserve(slot, 800)
    logical = create_block_mask(causal, 1, 1, 64, 800, device="cuda", BLOCK_SIZE=(64, 48))
    batch_idx = torch.tensor([0, 1, 2], device="cuda")
    k_new = torch.randn(3, 2, 1, 64, dtype=torch.bfloat16, device="cuda")
    num_new = torch.tensor([2, 1, 0], device="cuda")  # made before: a copy from host memory syncs
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            cache.append(batch_idx, k_new, k_new)
        rows = cache.extend(batch_idx, 2, num_new=num_new)
        cache.write(rows, torch.cat([k_new, k_new], 2), torch.cat([k_new, k_new], 2))
        cache.decode_block_mask(batch_idx)
        cache.convert_logical_block_mask(logical, batch_idx)
        cache.get_mask_mod(causal, batch_idx)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert cache.lengths.tolist() == [55, 7, 703]


def test_reserve_and_erase_never_sync():
    """Allocation is host bookkeeping mirrored with non-blocking copies from pinned memory."""
    cache = PagedKVCache(64, 16, 4, 2, 64, dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cache.reserve(0, 100)
        cache.reserve(1, 300)
        cache.erase(0)
        cache.reserve(2, 50)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert cache.capacity.tolist() == [0, 304, 64, 0]
    assert (cache.page_owner == 1).sum() == 19 and (cache.page_owner == 2).sum() == 4


def test_benchmark_case_matches_contiguous_decode():
    """The benchmark hook's paged case computes what contiguous decode computes."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "paged_cases.py"
    spec = importlib.util.spec_from_file_location("paged_cases", path)
    paged_cases = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paged_cases)
    for page_size in (16, 128):
        case = paged_cases.paged_decode_case(kv_len=2048, page_size=page_size, batch=2)
        paged = torch.compile(case.run_paged, fullgraph=True)()
        contiguous = torch.compile(case.run_contiguous, fullgraph=True)()
        torch.testing.assert_close(paged.float(), contiguous.float(), atol=2e-2, rtol=2e-2)
