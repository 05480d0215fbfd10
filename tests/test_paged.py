"""Paged KV cache (``inductor_flex/paged.py``), CPU tier.

Every attention result is compared with the float64 reference of attention over each
sequence's *logical* (contiguous) K/V, with the same mods seeing logical positions; the
same-dtype eager reference sets the error budget (``oracle.assert_within``).
"""

import contextlib
import math
from pathlib import Path

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from oracle import assert_within
from triton_on_cpu import interpreter_requested, run_pytest_in_interpreter, triton_on_cpu

from inductor_flex import PagedKVCache, create_block_mask, flex_attention, noop_mask
from inductor_flex.block_mask import _ordered_to_dense, full_block_mask
from inductor_flex.reference import attention_reference

PAGE_SIZES = [16, 32, 48, 100, 128]


# --- helpers, shared with test_paged_gpu.py -------------------------------------------------


def lengths_for(page_size):
    """Very different lengths: 1, page boundary ± 1, several pages and a ragged end."""
    return [1, page_size - 1, page_size, page_size + 1, 3 * page_size + 5]


def filled_cache(page_size, lengths, *, Hkv=2, D=16, dtype=torch.float32, device="cpu", spare_pages=3,
                 decode_tail=2, num_layers=1):
    """A cache holding random sequences of ``lengths`` in shuffled pages, and their logical K/V.

    Each sequence is appended as a prefill chunk and then ``decode_tail`` single tokens (one
    append per step for the whole batch), so both append paths write what is read back.
    """
    pages = sum(math.ceil(n / page_size) for n in lengths) + spare_pages
    cache = PagedKVCache(pages, page_size, len(lengths), Hkv, D, dtype=dtype, device=device,
                         num_layers=num_layers)
    cache.shuffle_free_pages(seed=int(torch.randint(0, 2**31, ()).item()))
    keys = [torch.randn(1, Hkv, n, D, dtype=dtype, device=device) for n in lengths]
    values = [torch.randn(1, Hkv, n, D, dtype=dtype, device=device) for n in lengths]
    for slot, n in enumerate(lengths):
        cache.reserve(slot, n)
        prefill = max(0, n - decode_tail)
        if prefill:
            cache.append(torch.tensor([slot], device=device), keys[slot][:, :, :prefill], values[slot][:, :, :prefill])
    for step in range(decode_tail):
        batch = [s for s, n in enumerate(lengths) if n - decode_tail + step >= 0]
        pos = [lengths[s] - decode_tail + step for s in batch]
        k_new = torch.cat([keys[s][:, :, p:p + 1] for s, p in zip(batch, pos)])
        v_new = torch.cat([values[s][:, :, p:p + 1] for s, p in zip(batch, pos)])
        cache.append(torch.tensor(batch, device=device), k_new, v_new)
    assert cache.lengths.tolist() == list(lengths)
    return cache, keys, values


def logical_reference(query, keys, values, *, score_mod=None, mask_mod=None, q_block=128, dtype=None):
    """Per sequence b: attention of query[b] over its logical K/V, mods seeing batch index b.

    Returns a list of outputs [1, Hq, Lq, D] computed in ``dtype`` (default: the inputs').
    """
    outs = []
    scale = 1.0 / math.sqrt(query.size(-1))
    for b, (k, v) in enumerate(zip(keys, values)):
        q_b = query[b:b + 1]
        dtype_b = dtype or q_b.dtype
        q_b, k, v = q_b.to(dtype_b), k.to(dtype_b), v.to(dtype_b)
        lq, lkv = q_b.size(2), k.size(2)

        def score_b(s, bb, h, qi, kv, b=b):
            return s if score_mod is None else score_mod(s, bb + b, h, qi, kv)

        if mask_mod is None:
            fields = full_block_mask(lq, lkv, device=q_b.device).as_tuple()
        else:
            def mask_b(bb, h, qi, kv, b=b):
                return mask_mod(bb + b, h, qi, kv)

            fields = create_block_mask(mask_b, 1, 1, lq, lkv, device=q_b.device, BLOCK_SIZE=(q_block, 16)).as_tuple()
        k, v = (t.repeat_interleave(q_b.size(1) // t.size(1), dim=1) for t in (k, v))
        out, _, _ = attention_reference(q_b, k, v, score_b, fields, scale)
        outs.append(out)
    return outs


def check_against_logical(name, out, query, keys, values, rows=None, **mods):
    """``out`` [B, Hq, Lq, D] vs the float64 logical reference, within 2x the same-dtype error.

    ``rows[b]``: how many query rows of sequence b to compare (padded prefill batches). Each
    output sums its sequence's keys in a float32 accumulator, in another order than the logical
    reference (page by page): that round-off is allowed for, as in the oracle's checks (a CPU
    run drew 1.1e-6 against an eager error of 2.3e-7 over 305 keys in float32).
    """
    gold = logical_reference(query, keys, values, dtype=torch.float64, **mods)
    same_dtype = logical_reference(query, keys, values, **mods)
    for b in range(query.size(0)):
        n = query.size(2) if rows is None else rows[b]
        assert_within(f"{name} sequence {b}", out[b:b + 1, :, :n], gold[b][:, :, :n], same_dtype[b][:, :, :n],
                      accumulated_terms=keys[b].size(2))


def alibi_decode_mods(cache, Hq, device):
    """score_mod: ALiBi with captured slopes and captured query positions (the decode token's
    logical position), plus a captured per-position bias indexed by the logical kv_idx."""
    slopes = torch.exp2(-torch.arange(1, Hq + 1, dtype=torch.float32, device=device) * 8 / Hq)
    query_position = (cache.lengths - 1).clone()
    position_bias = torch.randn(cache.max_pages_per_sequence * cache.page_size, device=device)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - query_position[b]) + position_bias[kv_idx]

    return alibi


def window_mask(query_position, window):
    def sliding_window(b, h, q_idx, kv_idx):
        return query_position[b] - kv_idx < window

    return sliding_window


@contextlib.contextmanager
def host_reads_forbidden():
    """Fail on the Tensor methods that read device values to the host."""
    def forbidden(self, *args, **kwargs):
        raise AssertionError("host read of a tensor value on the token path")

    names = ["item", "tolist", "__bool__", "__int__", "__index__", "nonzero", "cpu", "numpy"]
    saved = {name: getattr(torch.Tensor, name) for name in names}
    try:
        for name in names:
            setattr(torch.Tensor, name, forbidden)
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


# --- decode --------------------------------------------------------------------------------


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_decode_matches_logical_attention(page_size):
    lengths = lengths_for(page_size)
    cache, keys, values = filled_cache(page_size, lengths)
    query = torch.randn(len(lengths), 4, 1, 16)
    alibi = alibi_decode_mods(cache, 4, "cpu")
    out = cache.attention(query, cache.decode_block_mask(), score_mod=alibi)
    check_against_logical(f"decode ps{page_size}", out, query, keys, values, score_mod=alibi)


@pytest.mark.parametrize("page_size", [16, 100])
def test_decode_with_mask_mod_and_subset_of_slots(page_size):
    """A logical mask_mod (sliding window on the decode token's position) over the slots
    [3, 0, 4] in that order: query b belongs to slot batch_idx[b]."""
    lengths = lengths_for(page_size)
    cache, keys, values = filled_cache(page_size, lengths)
    batch_idx = torch.tensor([3, 0, 4])
    query = torch.randn(3, 4, 1, 16)
    window = window_mask((cache.lengths[batch_idx] - 1).clone(), page_size + 3)
    mask = cache.decode_block_mask(batch_idx, mask_mod=window)
    out = flex_attention(query, cache.keys[0], cache.values[0], block_mask=mask, enable_gqa=True)
    picked = [keys[i] for i in batch_idx.tolist()], [values[i] for i in batch_idx.tolist()]
    check_against_logical("decode window", out, query, *picked, mask_mod=window)

    # The same window, as a converted logical block mask: pages out of the window are skipped.
    logical = create_block_mask(window, 3, 1, 1, max(lengths), device="cpu", BLOCK_SIZE=(16, page_size))
    converted = cache.convert_logical_block_mask(logical, batch_idx)
    assert converted.kv_num_blocks.sum() + converted.full_kv_num_blocks.sum() < mask.kv_num_blocks.sum()
    out = cache.attention(query, converted)
    check_against_logical("decode window converted", out, query, *picked, mask_mod=window)


def test_decode_loop_grows_one_token_with_erase_and_reuse():
    """Three sequences grow a token a step across page boundaries; one finishes, its pages go
    back to the pool and a new sequence reuses them; attention stays right at every step."""
    page_size, Hkv, D = 16, 2, 16
    cache = PagedKVCache(9, page_size, 3, Hkv, D, device="cpu", max_pages_per_sequence=4)
    cache.shuffle_free_pages(seed=7)
    keys = [torch.empty(1, Hkv, 0, D) for _ in range(3)]
    values = [torch.empty(1, Hkv, 0, D) for _ in range(3)]
    for slot, capacity in enumerate([40, 33, 20]):
        cache.reserve(slot, capacity)
    assert cache.num_free_pages == 9 - 3 - 3 - 2
    batch_idx = torch.arange(3)
    for step in range(34):
        if step == 20:  # sequence 2 is done: its 2 pages are reused by a new one in slot 2
            cache.erase(2)
            assert cache.num_free_pages == 3 and cache.lengths[2] == 0
            cache.reserve(2, 48)
            assert cache.num_free_pages == 0
            keys[2], values[2] = keys[2][:, :, :0], values[2][:, :, :0]
        k_new, v_new = torch.randn(3, Hkv, 1, D), torch.randn(3, Hkv, 1, D)
        cache.append(batch_idx, k_new, v_new)
        for s in range(3):
            keys[s] = torch.cat([keys[s], k_new[s:s + 1]], dim=2)
            values[s] = torch.cat([values[s], v_new[s:s + 1]], dim=2)
        if step in (0, 14, 15, 16, 20, 21, 31, 32, 33):
            query = torch.randn(3, 4, 1, D)
            out = cache.attention(query, cache.decode_block_mask(batch_idx))
            check_against_logical(f"step {step}", out, query, keys, values)
    cache.check_no_dropped_tokens()


# --- prefill -------------------------------------------------------------------------------


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@pytest.mark.parametrize("page_size,q_block", [(16, 32), (48, 128), (100, 64), (128, 128)])
def test_prefill_padded_batch_through_converted_mask(page_size, q_block):
    """A batch of prompts of different lengths, padded to the longest; one causal logical mask
    (batch 1) converted for every slot: each sequence is cut at its own length."""
    lengths = [1, page_size + 1, 2 * page_size - 1, 150]
    cache, keys, values = filled_cache(page_size, lengths, decode_tail=0)
    longest = max(lengths)
    query = torch.randn(len(lengths), 4, longest, 16)
    logical = create_block_mask(causal, 1, 1, longest, longest, device="cpu", BLOCK_SIZE=(q_block, page_size))
    mask = cache.convert_logical_block_mask(logical, torch.arange(len(lengths)))
    assert mask.BLOCK_SIZE == (q_block, page_size) and mask.seq_lengths == (longest, cache.physical_len)
    slopes = torch.rand(4)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    out = cache.attention(query, mask, score_mod=alibi)
    check_against_logical(f"prefill ps{page_size}", out, query, keys, values, rows=lengths,
                          score_mod=alibi, mask_mod=causal)


def test_convert_keeps_full_blocks_only_where_whole():
    """Full logical blocks stay full only if every position is below the length; the block
    lists of the physical mask are the page table's pages."""
    page_size = 16
    cache, _, _ = filled_cache(page_size, [40], decode_tail=0, spare_pages=2)
    logical = create_block_mask(noop_mask, 1, 1, 1, 4 * page_size, device="cpu", BLOCK_SIZE=(128, page_size))
    assert logical.full_kv_num_blocks.flatten().tolist() == [4]
    mask = cache.convert_logical_block_mask(logical)
    pages = cache.page_table[0]
    assert mask.full_kv_num_blocks.flatten().tolist() == [2]
    assert mask.full_kv_indices[0, 0, 0, :2].tolist() == pages[:2].tolist()
    assert mask.kv_num_blocks.flatten().tolist() == [1]
    assert mask.kv_indices[0, 0, 0, 0] == pages[2]
    assert mask.kv_indices.shape[-1] == cache.n_pages + 1  # one column per physical block
    # Q-direction lists are the transpose: each listed page is seen by the one query row.
    assert mask.q_num_blocks[0, 0, pages[2]] == 1 and mask.full_q_num_blocks[0, 0, pages[:2].long()].tolist() == [1, 1]
    assert int(mask.q_num_blocks.sum()) == 1 and int(mask.full_q_num_blocks.sum()) == 2


@pytest.mark.parametrize("q_len,q_block,with_mask_mod", [(1, 128, False), (5, 2, False), (3, 16, True)])
def test_decode_block_mask_equals_converted_noop_mask(q_len, q_block, with_mask_mod):
    """decode_block_mask builds its lists directly; they (and their Q-direction transposes)
    are those of converting the logical all-allowed mask over each sequence."""
    page_size = 16
    lengths = lengths_for(page_size)
    cache, _, _ = filled_cache(page_size, lengths)
    mask_mod = causal if with_mask_mod else None
    direct = cache.decode_block_mask(q_len=q_len, q_block_size=q_block, mask_mod=mask_mod)
    logical = create_block_mask(noop_mask, len(lengths), 1, q_len, max(lengths), device="cpu",
                                BLOCK_SIZE=(q_block, page_size), separate_full_blocks=not with_mask_mod)
    converted = cache.convert_logical_block_mask(logical)
    assert direct.seq_lengths == converted.seq_lengths and direct.BLOCK_SIZE == converted.BLOCK_SIZE
    for num, idx in [("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices"),
                     ("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")]:
        a, b = getattr(direct, num), getattr(converted, num)
        assert (a is None) == (b is None), num
        if a is not None:
            assert torch.equal(a, b), num
            cols = getattr(direct, idx).size(-1)
            assert torch.equal(_ordered_to_dense(a, getattr(direct, idx), cols),
                               _ordered_to_dense(b, getattr(converted, idx), cols)), idx


# --- append --------------------------------------------------------------------------------


def test_append_past_capacity_goes_to_the_sink_and_is_flagged():
    page_size = 16
    cache, keys, values = filled_cache(page_size, [20, 7], decode_tail=0, spare_pages=0)
    others = cache.keys[0][:, :, :cache.n_pages * page_size].clone()
    slot1_rows = (cache.page_table[1, 0] * page_size + torch.arange(page_size)).long()
    k_new, v_new = torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16)
    cache.append(torch.tensor([1]), k_new, v_new)
    assert cache.lengths.tolist() == [20, 16] and cache.dropped_tokens.tolist() == [0, 21]
    # Only slot 1's own page changed; nothing else in the pool did.
    changed = (cache.keys[0][:, :, :cache.n_pages * page_size] != others).any(dim=(0, 1, 3)).nonzero().flatten()
    assert set(changed.tolist()) <= set(slot1_rows.tolist())
    assert torch.equal(cache.keys[0][0, :, slot1_rows[7:]], k_new[0, :, :9])
    with pytest.raises(RuntimeError, match=r"past the reserved capacity of slots \[1\]"):
        cache.check_no_dropped_tokens()
    query = torch.randn(2, 4, 1, 16)
    out = cache.attention(query, cache.decode_block_mask())
    keys[1] = torch.cat([keys[1], k_new[:, :, :9]], dim=2)
    values[1] = torch.cat([values[1], v_new[:, :, :9]], dim=2)
    check_against_logical("after overflow", out, query, keys, values)


def test_append_padded_batch_keeps_num_new_tokens():
    cache = PagedKVCache(8, 32, 3, 2, 16, device="cpu")
    for slot in range(3):
        cache.reserve(slot, 64)
    k_new, v_new = torch.randn(3, 2, 5, 16), torch.randn(3, 2, 5, 16)
    rows = cache.append(torch.tensor([0, 1, 2]), k_new, v_new, num_new=torch.tensor([5, 0, 2]))
    assert cache.lengths.tolist() == [5, 0, 2] and cache.dropped_tokens.tolist() == [0, 0, 0]
    sink_rows = range(cache.sink_page * 32, cache.physical_len)
    assert all(r in sink_rows for r in rows[1].tolist() + rows[2, 2:].tolist())
    assert torch.equal(cache.keys[0][0, :, rows[2, :2]], k_new[2, :, :2])


def test_multi_layer_extend_then_write():
    cache = PagedKVCache(4, 16, 2, 2, 16, device="cpu", num_layers=2)
    cache.reserve(0, 10)
    cache.reserve(1, 10)
    with pytest.raises(ValueError, match="extend"):
        cache.append(torch.tensor([0]), torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
    rows = cache.extend(torch.tensor([1, 0]), 3)
    layer_keys = [torch.randn(2, 2, 3, 16) for _ in range(2)]
    for layer, k in enumerate(layer_keys):
        cache.write(rows, k, k, layer)
    assert cache.lengths.tolist() == [3, 3]
    for layer, k in enumerate(layer_keys):
        assert torch.equal(cache.keys[layer][0, :, rows[0]], k[0])


def test_token_path_reads_nothing_back_to_the_host():
    """append, decode_block_mask, convert_logical_block_mask and the mods never read a tensor
    value on the host (the GPU tier checks the same with torch.cuda.set_sync_debug_mode)."""
    cache, _, _ = filled_cache(48, [50, 3], decode_tail=0)
    logical = create_block_mask(causal, 1, 1, 50, 50, device="cpu", BLOCK_SIZE=(64, 48))
    batch_idx, k_new = torch.tensor([0, 1]), torch.randn(2, 2, 1, 16)
    with host_reads_forbidden():
        cache.append(batch_idx, k_new, k_new)
        cache.decode_block_mask(batch_idx)
        cache.convert_logical_block_mask(logical, batch_idx)
        cache.get_mask_mod(causal, batch_idx)
        cache.get_score_mod(lambda s, b, h, q, kv: s + kv)
    assert cache.lengths.tolist() == [51, 4]


# --- torch.compile -------------------------------------------------------------------------


def test_compiled_decode_step_fullgraph_no_recompile_as_sequences_grow():
    """One decode step (append, physical mask, attention with a captured-tensor score_mod) under
    torch.compile(fullgraph=True) with Inductor on CPU: no graph break (so no host read), no
    recompile while lengths cross page boundaries, and the same results as eager."""
    page_size, lengths = 48, [1, 47, 95]
    cache, keys, values = filled_cache(page_size, lengths, spare_pages=4, decode_tail=0)
    for slot in range(3):
        cache.reserve(slot, lengths[slot] + 4)
    slopes = torch.rand(4)
    batch_idx = torch.arange(3)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * kv_idx

    def decode_step(query, k_new, v_new):
        cache.append(batch_idx, k_new, v_new)
        return cache.attention(query, cache.decode_block_mask(batch_idx), score_mod=alibi)

    compiled = torch.compile(decode_step, fullgraph=True)
    for step in range(3):
        query, k_new, v_new = torch.randn(3, 4, 1, 16), torch.randn(3, 2, 1, 16), torch.randn(3, 2, 1, 16)
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            out = compiled(query, k_new, v_new)
        for s in range(3):
            keys[s] = torch.cat([keys[s], k_new[s:s + 1]], dim=2)
            values[s] = torch.cat([values[s], v_new[s:s + 1]], dim=2)
        check_against_logical(f"compiled step {step}", out, query, keys, values, score_mod=alibi)
    assert cache.lengths.tolist() == [n + 3 for n in lengths]


def test_compiled_prefill_converts_inside_the_graph():
    page_size = 100
    lengths = [130, 7]
    cache, keys, values = filled_cache(page_size, lengths, decode_tail=0)
    query = torch.randn(2, 4, 130, 16)
    logical = create_block_mask(causal, 1, 1, 130, 130, device="cpu", BLOCK_SIZE=(64, page_size))
    bias = torch.randn(4, 130)

    def biased(score, b, h, q_idx, kv_idx):
        return score + bias[h, kv_idx]

    @torch.compile(fullgraph=True)
    def prefill(query, logical):
        return cache.attention(query, cache.convert_logical_block_mask(logical, torch.arange(2)), score_mod=biased)

    out = prefill(query, logical)
    check_against_logical("compiled prefill", out, query, keys, values, rows=lengths,
                          score_mod=biased, mask_mod=causal)


# --- our Triton kernels, run by Triton's interpreter -------------------------------------------


def test_paged_attention_through_triton_interpreter():
    """Runs the ``interpreted`` tests below in a TRITON_INTERPRET=1 subprocess (it must be set
    before triton is imported): the real kernels reading pages through the page table."""
    result, output = run_pytest_in_interpreter(str(Path(__file__).resolve()), "-k", "interpreted", timeout=900)
    tail = output[-6000:]
    assert result.returncode == 0, tail
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1], tail


@pytest.mark.skipif(not interpreter_requested(), reason="run by test_paged_attention_through_triton_interpreter")
@pytest.mark.parametrize("page_size", [16, 48])
def test_interpreted_decode_and_prefill(page_size, monkeypatch):
    from inductor_flex.lowering import triton_forward

    # One forward config, so nothing is autotuned: what is under test is the kernels' reading
    # of pages, not Inductor's benchmarking of candidate configs (the GPU tier covers that).
    configs = triton_forward.forward_configs
    monkeypatch.setattr(triton_forward, "forward_configs", lambda *a, **k: configs(*a, **k)[:1])
    lengths = [1, page_size + 1, 2 * page_size + 5]
    with triton_on_cpu():
        cache, keys, values = filled_cache(page_size, lengths)
        alibi = alibi_decode_mods(cache, 4, "cpu")
        query = torch.randn(3, 4, 1, 16)
        decode = torch.compile(lambda q: cache.attention(q, cache.decode_block_mask(), score_mod=alibi), fullgraph=True)
        check_against_logical("interpreted decode", decode(query), query, keys, values, score_mod=alibi)

        longest = max(lengths)
        query = torch.randn(3, 4, longest, 16)
        logical = create_block_mask(causal, 1, 1, longest, longest, device="cpu", BLOCK_SIZE=(32, page_size))
        slopes = torch.rand(4)

        def alibi_prefill(score, b, h, q_idx, kv_idx):
            return score + slopes[h] * (kv_idx - q_idx)

        prefill = torch.compile(lambda q: cache.attention(
            q, cache.convert_logical_block_mask(logical, torch.arange(3)), score_mod=alibi_prefill), fullgraph=True)
        out, codes = run_and_get_code(prefill, query)
        check_against_logical("interpreted prefill", out, query, keys, values, rows=lengths,
                              score_mod=alibi_prefill, mask_mod=causal)
        # 32-row Q blocks are regrouped (block_regroup.py); pages are never regrouped.
        kernel = next(code for code in codes if "SPARSE_KV_BLOCK_SIZE" in code)
        assert f"SPARSE_KV_BLOCK_SIZE : tl.constexpr = {page_size}" in kernel
        assert "SPARSE_Q_BLOCK_SIZE : tl.constexpr = 128" in kernel


@pytest.mark.skipif(not interpreter_requested(), reason="run by test_paged_attention_through_triton_interpreter")
def test_interpreted_prefill_autotuned():
    """As above with the forward's candidate configs benchmarked, the physical mask (and the
    tensors its mask_mod captures) computed inside the compiled graph."""
    page_size, lengths = 16, [1, 17, 37]
    with triton_on_cpu():
        cache, keys, values = filled_cache(page_size, lengths)
        slopes = torch.rand(4)

        def alibi(score, b, h, q_idx, kv_idx):
            return score + slopes[h] * kv_idx

        query = torch.randn(3, 4, 37, 16)
        logical = create_block_mask(causal, 1, 1, 37, 37, device="cpu", BLOCK_SIZE=(32, page_size))
        prefill = torch.compile(lambda q: cache.attention(
            q, cache.convert_logical_block_mask(logical, torch.arange(3)), score_mod=alibi), fullgraph=True)
        check_against_logical("autotuned prefill", prefill(query), query, keys, values, rows=lengths,
                              score_mod=alibi, mask_mod=causal)


# --- bad input -----------------------------------------------------------------------------


def test_bad_input_names_the_fix():
    cache = PagedKVCache(4, 16, 2, 2, 16, device="cpu", max_pages_per_sequence=3)
    with pytest.raises(TypeError, match="Python int"):
        cache.reserve(torch.tensor(0), 10)
    with pytest.raises(ValueError, match="max_pages_per_sequence"):
        cache.reserve(0, 49)
    cache.reserve(0, 48)
    with pytest.raises(RuntimeError, match="out of pages"):
        cache.reserve(1, 32)
    with pytest.raises(ValueError, match="max_batch_size"):
        cache.erase(2)
    with pytest.raises(TypeError, match="float32"):
        cache.append(torch.tensor([0]), torch.randn(1, 2, 1, 16, dtype=torch.float64), torch.randn(1, 2, 1, 16))
    with pytest.raises(ValueError, match="num_kv_heads"):
        cache.append(torch.tensor([0]), torch.randn(1, 3, 1, 16), torch.randn(1, 3, 1, 16))
    with pytest.raises(ValueError, match="detach"):
        cache.append(torch.tensor([0]), torch.randn(1, 2, 1, 16, requires_grad=True), torch.randn(1, 2, 1, 16))
    with pytest.raises(TypeError, match="1-D integer tensor"):
        cache.append([0], torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
    with pytest.raises(ValueError, match=r"BLOCK_SIZE=\(128, 16\)"):
        cache.convert_logical_block_mask(create_block_mask(causal, 1, 1, 32, 32, device="cpu"))
    with pytest.raises(ValueError, match="longer than a sequence"):
        cache.convert_logical_block_mask(create_block_mask(causal, 1, 1, 64, 64, device="cpu", BLOCK_SIZE=16))
    with pytest.raises(ValueError, match="one mask batch per slot"):
        cache.convert_logical_block_mask(create_block_mask(causal, 2, 1, 32, 32, device="cpu", BLOCK_SIZE=16),
                                         torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="physical block mask"):
        cache.attention(torch.randn(1, 2, 1, 16), create_block_mask(causal, 1, 1, 1, 16, device="cpu", BLOCK_SIZE=16))
    with pytest.raises(ValueError, match="cannot broadcast over sequences"):
        cache.attention(torch.randn(2, 2, 1, 16), cache.decode_block_mask(torch.tensor([0])))
    with pytest.raises(ValueError, match="page_size must be a positive int"):
        PagedKVCache(4, 0, 2, 2, 16, device="cpu")
