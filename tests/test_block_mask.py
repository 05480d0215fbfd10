"""BlockMask and the functions that build it, checked against brute-force dense evaluation."""

import itertools
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.attention.flex_attention as torch_flex

from inductor_flex import block_mask as bm_module
from inductor_flex._compat.pytree import GetAttrKey, tree_flatten, tree_flatten_with_path, tree_unflatten
from inductor_flex.block_mask import (
    BlockMask,
    and_masks,
    create_block_mask,
    create_mask,
    full_block_mask,
    noop_mask,
    or_masks,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
B, H = 2, 3
BLOCK_SIZES = [16, 24, 48, 100, 128, (64, 32), (32, 128)]
LENGTHS = [(17, 17), (256, 256), (300, 1000), (1000, 300)]


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def make_mask_mods(q_len, kv_len):
    """Named mask_mods over [B, H, q_len, kv_len], with fresh random data per call."""
    window = int(torch.randint(1, 64, ()))
    head_windows = torch.randint(1, 200, (H,))
    prefix_lengths = torch.randint(0, kv_len + 1, (B,))
    # Random document boundaries per batch, one document id per position.
    docs_q = torch.sort(torch.randint(0, 5, (B, q_len)), dim=-1).values
    docs_kv = torch.sort(torch.randint(0, 5, (B, kv_len)), dim=-1).values

    def sliding_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)

    def head_sliding_window(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= head_windows[h]

    def prefix_lm(b, h, q_idx, kv_idx):
        return (kv_idx < prefix_lengths[b]) | (q_idx >= kv_idx)

    def documents(b, h, q_idx, kv_idx):
        return docs_q[b, q_idx] == docs_kv[b, kv_idx]

    return {
        "causal": causal,
        "sliding_window": sliding_window,
        "head_sliding_window": head_sliding_window,
        "prefix_lm": prefix_lm,
        "documents": documents,
        "causal_documents": and_masks(causal, documents),
    }


MASK_NAMES = list(make_mask_mods(8, 8))


def brute_force_block_maps(mask_mod, b, h, q_len, kv_len, block_size):
    """(any, all) per block of the dense mask, over in-range positions only."""
    q_block, kv_block = (block_size, block_size) if isinstance(block_size, int) else block_size
    dense = create_mask(mask_mod, b, h, q_len, kv_len, "cpu")
    num_rows, num_cols = -(-q_len // q_block), -(-kv_len // kv_block)
    pad = (0, num_cols * kv_block - kv_len, 0, num_rows * q_block - q_len)

    def per_block(padded, reduce):
        blocks = padded.view(b, h, num_rows, q_block, num_cols, kv_block).transpose(3, 4)
        return reduce(blocks.flatten(-2), dim=-1)

    # Padding is neutral: False for "any", True for "all".
    any_map = per_block(torch.nn.functional.pad(dense, pad, value=False), torch.any)
    all_map = per_block(torch.nn.functional.pad(dense, pad, value=True), torch.all)
    return any_map, all_map


def listed_blocks(num_blocks, indices, num_cols):
    """Bool map of the blocks a (num_blocks, indices) pair lists, by explicit loops."""
    dense = torch.zeros(*indices.shape[:-1], num_cols, dtype=torch.bool)
    for pos in torch.cartesian_prod(*(torch.arange(n) for n in num_blocks.shape)).view(-1, num_blocks.dim()):
        pos = tuple(pos.tolist())
        dense[pos][indices[pos][: num_blocks[pos]].long()] = True
    return dense


def check_lists(num_blocks, indices, expected_map):
    """Listed entries are exactly the expected blocks in ascending order; padding is in range."""
    assert num_blocks.dtype == indices.dtype == torch.int32
    assert num_blocks.shape == expected_map.shape[:-1] and indices.shape == expected_map.shape
    assert torch.equal(num_blocks, expected_map.sum(-1, dtype=torch.int32))
    num_cols = expected_map.shape[-1]
    assert torch.equal(listed_blocks(num_blocks, indices, num_cols), expected_map)
    listed = torch.arange(num_cols) < num_blocks.unsqueeze(-1)
    assert bool((indices[..., 1:] > indices[..., :-1])[listed[..., 1:]].all()), "listed indices must ascend"
    assert bool(((indices >= 0) & (indices < num_cols)).all()), "padding must hold valid block ids"
    # Rows hold a permutation of the block ids: padding is the unlisted blocks.
    assert torch.equal(indices.sort(-1).values, torch.arange(num_cols, dtype=torch.int32).expand_as(indices))


def check_block_mask(mask, any_map, all_map, separate_full_blocks=True):
    partial, full = (any_map & ~all_map, all_map) if separate_full_blocks else (any_map, None)
    check_lists(mask.kv_num_blocks, mask.kv_indices, partial)
    check_lists(mask.q_num_blocks, mask.q_indices, partial.transpose(-2, -1))
    if full is None:
        assert mask.full_kv_num_blocks is None and mask.full_q_indices is None
    else:
        check_lists(mask.full_kv_num_blocks, mask.full_kv_indices, full)
        check_lists(mask.full_q_num_blocks, mask.full_q_indices, full.transpose(-2, -1))
    assert torch.equal(mask.to_dense(), any_map.to(torch.int32))


@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda x: f"{x[0]}x{x[1]}")
@pytest.mark.parametrize("block_size", BLOCK_SIZES, ids=str)
@pytest.mark.parametrize("mask_name", MASK_NAMES)
def test_create_block_mask_matches_brute_force(mask_name, block_size, lengths):
    q_len, kv_len = lengths
    mask_mod = make_mask_mods(q_len, kv_len)[mask_name]
    mask = create_block_mask(mask_mod, B, H, q_len, kv_len, device="cpu", BLOCK_SIZE=block_size)
    assert mask.shape == (B, H, q_len, kv_len)
    assert mask.BLOCK_SIZE == ((block_size,) * 2 if isinstance(block_size, int) else block_size)
    assert mask.mask_mod is mask_mod
    check_block_mask(mask, *brute_force_block_maps(mask_mod, B, H, q_len, kv_len, block_size))


@pytest.mark.parametrize("mask_name", MASK_NAMES)
def test_without_separate_full_blocks_every_block_is_partial(mask_name):
    mask_mod = make_mask_mods(300, 200)[mask_name]
    mask = create_block_mask(mask_mod, B, H, 300, 200, "cpu", BLOCK_SIZE=(32, 48), separate_full_blocks=False)
    any_map, all_map = brute_force_block_maps(mask_mod, B, H, 300, 200, (32, 48))
    check_block_mask(mask, any_map, all_map, separate_full_blocks=False)


@pytest.mark.parametrize("budget", [1, 5000, 60_000])
@pytest.mark.parametrize("mask_name", ["causal", "head_sliding_window", "documents"])
def test_small_tiles_give_the_same_mask(monkeypatch, mask_name, budget):
    # Budget 1: one block per tile; 5000: parts of a row of blocks; 60000: bands of rows.
    monkeypatch.setattr(bm_module, "CPU_TILE_ELEMENTS", budget)
    mask_mod = make_mask_mods(130, 250)[mask_name]
    mask = create_block_mask(mask_mod, B, H, 130, 250, "cpu", BLOCK_SIZE=(16, 24))
    check_block_mask(mask, *brute_force_block_maps(mask_mod, B, H, 130, 250, (16, 24)))


def test_all_and_no_positions_allowed():
    everything = create_block_mask(and_masks(), B, H, 100, 70, "cpu", BLOCK_SIZE=32)
    assert torch.equal(everything.kv_num_blocks, torch.zeros(B, H, 4, dtype=torch.int32))
    assert torch.equal(everything.full_kv_num_blocks, torch.full((B, H, 4), 3, dtype=torch.int32))
    nothing = create_block_mask(or_masks(), B, H, 100, 70, "cpu", BLOCK_SIZE=32)
    assert int(nothing.kv_num_blocks.sum()) == int(nothing.full_kv_num_blocks.sum()) == 0
    assert nothing.sparsity() == 100.0
    check_lists(nothing.kv_num_blocks, nothing.kv_indices, torch.zeros(B, H, 4, 3, dtype=torch.bool))


def test_mask_mod_index_tensors_are_never_indexed_out_of_range():
    # Ragged last blocks: a mask_mod indexing per-position data must only see in-range positions.
    per_query, per_key = torch.randint(0, 3, (37,)), torch.randint(0, 3, (53,))
    seen = []

    def same_group(b, h, q_idx, kv_idx):
        seen.append(None)
        return per_query[q_idx] == per_key[kv_idx]

    mask = create_block_mask(same_group, 1, 1, 37, 53, "cpu", BLOCK_SIZE=16)
    check_block_mask(mask, *brute_force_block_maps(same_group, 1, 1, 37, 53, 16))
    assert seen


def test_matches_torch_when_lengths_are_block_multiples():
    masks = make_mask_mods(256, 384)
    for name in ("causal", "prefix_lm", "documents", "head_sliding_window"):
        ours = create_block_mask(masks[name], B, H, 256, 384, "cpu", BLOCK_SIZE=(64, 32))
        theirs = torch_flex.create_block_mask(masks[name], B, H, 256, 384, "cpu", BLOCK_SIZE=(64, 32))
        for field, (a, b) in enumerate(zip(ours.as_tuple()[2:10], theirs.as_tuple()[2:10])):
            assert torch.equal(a, b), (name, field)


def test_ragged_blocks_can_be_full_unlike_torch():
    # torch pads the mask with False, so a ragged block is never full; here only in-range
    # positions count. Both list the same computed blocks.
    ours = create_block_mask(causal, 1, 1, 100, 100, "cpu", BLOCK_SIZE=64)
    theirs = torch_flex.create_block_mask(causal, 1, 1, 100, 100, "cpu", BLOCK_SIZE=64)
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    assert ours.full_kv_num_blocks.tolist() == [[[0, 1]]]  # block (1, 0) is full: rows 64..99
    assert theirs.full_kv_num_blocks.tolist() == [[[0, 0]]]


def test_create_block_mask_under_compile():
    masks = make_mask_mods(300, 200)

    def build(mask_mod):
        return create_block_mask(mask_mod, B, H, 300, 200, "cpu", BLOCK_SIZE=(32, 48))

    for backend in ("eager", "aot_eager"):
        for name in ("causal", "documents"):
            compiled = torch.compile(build, fullgraph=True, backend=backend)(masks[name])
            eager = build(masks[name])
            assert isinstance(compiled, BlockMask)
            for a, b in zip(compiled.as_tuple(), eager.as_tuple()):
                assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_from_kv_blocks_round_trip():
    mask_mod = make_mask_mods(300, 200)["prefix_lm"]
    mask = create_block_mask(mask_mod, B, H, 300, 200, "cpu", BLOCK_SIZE=(32, 48))
    rebuilt = BlockMask.from_kv_blocks(
        mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices,
        BLOCK_SIZE=(32, 48), mask_mod=mask_mod, seq_lengths=(300, 200),
    )
    for a, b in zip(rebuilt.as_tuple(), mask.as_tuple()):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b

    defaults = BlockMask.from_kv_blocks(
        mask.kv_num_blocks.long(), mask.kv_indices.long(), compute_q_blocks=False
    )
    assert defaults.seq_lengths == (10 * 128, 5 * 128) and defaults.BLOCK_SIZE == (128, 128)
    assert defaults.mask_mod is noop_mask
    assert defaults.kv_indices.dtype == torch.int32
    assert defaults.full_kv_num_blocks is None
    assert defaults.q_num_blocks is None and defaults.q_indices is None


def test_from_kv_blocks_transposes_hand_written_lists():
    # Row 0 lists blocks {2, 0} (unordered), row 1 lists {1}; the padding entries are ignored.
    kv_num_blocks = torch.tensor([2, 1], dtype=torch.int32)
    kv_indices = torch.tensor([[2, 0, 1], [1, 2, 0]], dtype=torch.int32)
    mask = BlockMask.from_kv_blocks(kv_num_blocks, kv_indices, BLOCK_SIZE=16)
    assert mask.shape == (32, 48)
    assert mask.q_num_blocks.tolist() == [1, 1, 1]
    assert mask.q_indices[:, 0].tolist() == [0, 1, 0]
    assert mask.to_dense().tolist() == [[1, 0, 1], [0, 1, 0]]


def test_as_tuple_order_and_from_tuple():
    mask = create_block_mask(causal, B, H, 300, 200, "cpu", BLOCK_SIZE=(32, 48))
    fields = mask.as_tuple()
    assert len(fields) == 13
    assert fields[:2] == (300, 200) and fields[10:] == (32, 48, causal)
    expected_tensors = [getattr(mask, name) for name in BlockMask.TENSOR_ATTRS]
    assert all(a is b for a, b in zip(fields[2:10], expected_tensors))
    rebuilt = BlockMask.from_tuple(fields)
    assert all(a is b for a, b in zip(rebuilt.as_tuple(), fields))


def test_pytree_round_trip_with_named_leaves():
    mask = create_block_mask(causal, B, H, 300, 200, "cpu", BLOCK_SIZE=(32, 48))
    leaves, spec = tree_flatten(mask)
    assert len(leaves) == 8 and all(isinstance(leaf, torch.Tensor) for leaf in leaves)
    rebuilt = tree_unflatten(leaves, spec)
    assert isinstance(rebuilt, BlockMask) and rebuilt.mask_mod is causal
    assert all(a is b for a, b in zip(rebuilt.as_tuple(), mask.as_tuple()))

    keyed, _ = tree_flatten_with_path(mask)
    assert [path for path, _ in keyed] == [(GetAttrKey(name),) for name in BlockMask.TENSOR_ATTRS]

    # Missing optional tensors are context, not leaves.
    partial_only = BlockMask.from_kv_blocks(mask.kv_num_blocks, mask.kv_indices, compute_q_blocks=False)
    leaves, spec = tree_flatten(partial_only)
    assert len(leaves) == 2
    rebuilt = tree_unflatten(leaves, spec)
    assert rebuilt.q_indices is None and rebuilt.full_kv_indices is None


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_block_mask_in_and_out_of_compiled_functions(backend):
    mask = create_block_mask(make_mask_mods(300, 300)["documents"], B, H, 300, 300, "cpu", BLOCK_SIZE=64)

    def crop_and_slice(m, x):
        return m._adjust(200, 256)[1, 1:], x + m.kv_num_blocks.sum()

    compiled, total = torch.compile(crop_and_slice, fullgraph=True, backend=backend)(mask, torch.zeros(()))
    expected, expected_total = crop_and_slice(mask, torch.zeros(()))
    assert isinstance(compiled, BlockMask) and compiled.seq_lengths == (200, 256)
    assert torch.equal(total, expected_total)
    for a, b in zip(compiled.as_tuple()[2:10], expected.as_tuple()[2:10]):
        assert torch.equal(a, b)
    # The remapped mask_mod of the slice also survives compilation.
    assert torch.equal(
        create_mask(compiled.mask_mod, 1, 2, 200, 256, "cpu"),
        create_mask(expected.mask_mod, 1, 2, 200, 256, "cpu"),
    )


def test_export_with_block_mask_input():
    docs = torch.sort(torch.randint(0, 4, (300,))).values

    def make_document_mask(doc_ids):
        def documents(b, h, q_idx, kv_idx):
            return doc_ids[q_idx] == doc_ids[kv_idx]

        return documents

    class UsesMask(torch.nn.Module):
        def forward(self, mask: BlockMask, x):
            allowed = create_mask(mask.mask_mod, 1, 1, 300, 300, x.device)
            return mask.kv_num_blocks.sum() + mask.full_kv_num_blocks.sum() + allowed.sum() + x

    mask = create_block_mask(make_document_mask(docs), B, H, 300, 300, "cpu", BLOCK_SIZE=64)
    x = torch.tensor(3)
    exported = torch.export.export(UsesMask(), (mask, x))
    assert torch.equal(exported.module()(mask, x), UsesMask()(mask, x))
    # A mask_mod recreated with the same captured tensor is accepted ...
    same = create_block_mask(make_document_mask(docs), B, H, 300, 300, "cpu", BLOCK_SIZE=64)
    assert torch.equal(exported.module()(same, x), UsesMask()(same, x))
    # ... one capturing another tensor is not: the exported graph baked in the first one.
    other = create_block_mask(make_document_mask(docs.clone()), B, H, 300, 300, "cpu", BLOCK_SIZE=64)
    with pytest.raises(ValueError, match="tree spec|same number and type"):
        exported.module()(other, x)


def test_strict_export_with_block_mask_input():
    class SumsBlocks(torch.nn.Module):
        def forward(self, mask: BlockMask):
            return mask.kv_num_blocks.sum() * 2 + mask.q_num_blocks.sum()

    mask = create_block_mask(causal, B, H, 300, 300, "cpu", BLOCK_SIZE=64)
    exported = torch.export.export(SumsBlocks(), (mask,), strict=True)
    assert torch.equal(exported.module()(mask), SumsBlocks()(mask))
    sliced = mask[0]
    exported_sliced = torch.export.export(SumsBlocks(), (sliced,), strict=True)
    assert torch.equal(exported_sliced.module()(sliced), SumsBlocks()(sliced))


def test_indexing_keeps_dimensions_like_torch():
    mask = create_block_mask(causal, 4, 2, 512, 512, "cpu")
    assert mask[0].kv_num_blocks.shape == (1, 2, 4) and mask[0].kv_indices.shape == (1, 2, 4, 4)
    assert mask[0, 1].kv_num_blocks.shape == (1, 1, 4)
    assert mask[0:2, 1:2].kv_indices.shape == (2, 1, 4, 4)
    by_rows = mask[0:2, 1:2, torch.tensor([1])]
    assert by_rows.kv_num_blocks.shape == (2, 1, 1) and by_rows.kv_indices.shape == (2, 1, 1, 4)
    assert mask[-1].shape == (1, 2, 512, 512)
    theirs = torch_flex.create_block_mask(causal, 4, 2, 512, 512, "cpu")
    for index in (0, (0, 1), (slice(1, 3), slice(0, 1)), (-1, -2)):
        for a, b in zip(mask[index].as_tuple()[2:10], theirs[index].as_tuple()[2:10]):
            assert torch.equal(a, b)
    with pytest.raises(IndexError):
        mask[4]
    with pytest.raises(IndexError):
        mask[0, 0, 0, 0]


@pytest.mark.parametrize("index", [1, (slice(None), 2), (0, -1), (slice(1, None), slice(0, 3, 2))], ids=str)
def test_slicing_batches_and_heads_keeps_a_correct_mask_mod(index):
    masks = make_mask_mods(100, 90)
    mask_mod = and_masks(masks["head_sliding_window"], masks["prefix_lm"])  # depends on b and h
    mask = create_block_mask(mask_mod, B, H, 100, 90, "cpu", BLOCK_SIZE=16)
    padded = (index if isinstance(index, tuple) else (index,)) + (slice(None),)
    keep_dims = tuple(slice(i % n, i % n + 1) if isinstance(i, int) else i for i, n in zip(padded, (B, H)))
    sliced = mask[index]
    b, h = sliced.kv_num_blocks.shape[:2]
    expected = create_mask(mask_mod, B, H, 100, 90, "cpu")[keep_dims]
    assert torch.equal(create_mask(sliced.mask_mod, b, h, 100, 90, "cpu"), expected)
    check_block_mask(sliced, *brute_force_block_maps(sliced.mask_mod, b, h, 100, 90, 16))


def test_slice_index_map_follows_python_slicing():
    for size in (2, 3, 5):
        bounds = (None, -7, -2, -1, 0, 1, 2, 4, 5, 9)
        for start, stop, step in itertools.product(bounds, bounds, (None, 1, 2, 3)):
            kept = list(range(size))[start:stop:step]
            if kept:
                first, stride = bm_module._slice_index_map(slice(start, stop, step), size)
                assert [first + stride * i for i in range(len(kept))] == kept, (size, start, stop, step)


def test_slicing_a_broadcast_dimension_keeps_the_mask_mod():
    mask = create_block_mask(causal, 1, 1, 64, 64, "cpu", BLOCK_SIZE=16)
    assert mask[0].mask_mod is causal and mask[:, 0].mask_mod is causal


def test_tensor_or_query_indexing_drops_the_mask_mod():
    mask = create_block_mask(causal, B, H, 64, 64, "cpu", BLOCK_SIZE=16)
    for index in (torch.tensor([1, 0]), (slice(None), slice(None), torch.tensor([2]))):
        sliced = mask[index]
        with pytest.raises(RuntimeError, match="Assign one that does"):
            create_mask(sliced.mask_mod, 1, 1, 4, 4, "cpu")


@pytest.mark.parametrize("block_size", [16, (32, 48)], ids=str)
def test_adjust_crops_to_the_upper_left_corner(block_size):
    q_block, kv_block = (block_size, block_size) if isinstance(block_size, int) else block_size
    masks = make_mask_mods(300, 300)
    for name in ("causal", "documents", "head_sliding_window"):
        mask = create_block_mask(masks[name], B, H, 300, 300, "cpu", BLOCK_SIZE=block_size)
        new_q, new_kv = 4 * q_block, 3 * kv_block  # whole blocks: cropping is exact
        cropped = mask._adjust(new_q, new_kv)
        fresh = create_block_mask(masks[name], B, H, new_q, new_kv, "cpu", BLOCK_SIZE=block_size)
        assert cropped.seq_lengths == (new_q, new_kv) and cropped.mask_mod is masks[name]
        for a, b in zip(cropped.as_tuple()[2:10], fresh.as_tuple()[2:10]):
            assert torch.equal(a, b), name
    # A ragged crop keeps the blocks' classification, which stays correct (conservative).
    ragged = create_block_mask(causal, 1, 1, 300, 300, "cpu", BLOCK_SIZE=64)._adjust(100, 130)
    assert ragged.kv_indices.shape == (1, 1, 2, 3)
    assert ragged.to_dense().tolist() == [[[[1, 0, 0], [1, 1, 0]]]]
    with pytest.raises(ValueError, match="cannot add blocks"):
        ragged._adjust(300, 300)


def test_to_device():
    mask = create_block_mask(causal, B, H, 100, 100, "cpu", BLOCK_SIZE=32)
    same = mask.to("cpu")
    assert same is not mask and same.mask_mod is causal and same.BLOCK_SIZE == mask.BLOCK_SIZE
    assert all(torch.equal(a, b) for a, b in zip(same.as_tuple()[2:10], mask.as_tuple()[2:10]))
    meta = mask.to(torch.device("meta"))
    assert all(t.device.type == "meta" for t in meta.as_tuple()[2:10])


def test_sparsity_numel_and_picture_of_a_small_causal_mask():
    mask = create_block_mask(causal, 1, 1, 64, 64, "cpu", BLOCK_SIZE=16)
    assert mask.numel() == 64 * 64
    assert mask.sparsity() == 100 * (1 - 10 / 16)  # 4 diagonal partial + 6 full of 16 blocks
    assert mask.to_string() == "(0, 0)\n░░      \n██░░    \n████░░  \n██████░░\n"
    assert mask.to_string(grid_size=2) == "(0, 0)\n░░  \n██░░\n"
    no_full = create_block_mask(causal, 1, 1, 64, 64, "cpu", BLOCK_SIZE=16, separate_full_blocks=False)
    assert no_full.to_string(grid_size=2) == "(0, 0)\n░░  \n░░░░\n"
    assert str(mask).startswith("BlockMask(shape=(1, 1, 64, 64), sparsity=37.50%,\n(0, 0)\n░░")
    assert "kv_indices=(1, 1, 4, 4)" in repr(mask) and "mask_mod=causal" in repr(mask)
    many = create_block_mask(causal, 3, 2, 64, 64, "cpu", BLOCK_SIZE=16).to_string(limit=4)
    headers = [line for line in many.splitlines() if line.startswith("(")]
    assert headers == ["(0, 0)", "(0, 1)", "(1, 0)", "(1, 1)"] and "limit=N" in many


@pytest.mark.parametrize("lengths", [(17, 300), (256, 256)], ids=str)
@pytest.mark.parametrize("block_size", [128, 48, (64, 32)], ids=str)
def test_full_block_mask(lengths, block_size):
    """Every block listed once, as a partial block with the noop mask (one list for kernels)."""
    mask = full_block_mask(*lengths, "cpu", B=2, H=3, block_size=block_size)
    any_map, _ = brute_force_block_maps(noop_mask, 2, 3, *lengths, block_size)
    check_lists(mask.kv_num_blocks, mask.kv_indices, any_map)
    check_lists(mask.q_num_blocks, mask.q_indices, any_map.transpose(-1, -2))
    assert mask.full_kv_num_blocks is None and mask.full_q_num_blocks is None
    assert mask.mask_mod is noop_mask and mask.sparsity() == 0.0


def test_create_mask_and_mask_combinators():
    def sliding(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= 2

    q, kv = torch.arange(10)[:, None], torch.arange(12)
    assert torch.equal(create_mask(causal, 2, 1, 10, 12, "cpu"), (q >= kv).expand(2, 1, 10, 12))
    near = (q - kv).abs() <= 2
    assert torch.equal(create_mask(and_masks(causal, sliding), 1, 1, 10, 12, "cpu")[0, 0], (q >= kv) & near)
    assert torch.equal(create_mask(or_masks(causal, sliding), None, None, 10, 12, "cpu")[0, 0], (q >= kv) | near)
    assert bool(create_mask(and_masks(), 1, 1, 3, 3, "cpu").all())
    assert not bool(create_mask(or_masks(), 1, 1, 3, 3, "cpu").any())
    allowed = noop_mask(torch.tensor(0), torch.tensor(0), torch.tensor(1), torch.tensor(2))
    assert allowed.dtype == torch.bool and allowed.shape == () and bool(allowed)

    def causal_score(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx >= kv_idx, score, -float("inf"))

    assert torch.equal(create_mask(causal_score, 1, 1, 10, 12, "cpu"), create_mask(causal, 1, 1, 10, 12, "cpu"))


@pytest.mark.parametrize("block_size", ["128", 0, -16, 1.5, True, (64,), (64, 0), (64, 32, 16)], ids=repr)
def test_bad_block_size(block_size):
    with pytest.raises(ValueError, match="BLOCK_SIZE must be a positive int"):
        create_block_mask(causal, 1, 1, 64, 64, "cpu", BLOCK_SIZE=block_size)
    with pytest.raises(ValueError, match="BLOCK_SIZE must be a positive int"):
        full_block_mask(64, 64, "cpu", block_size=block_size)


def test_bad_arguments():
    with pytest.raises(TypeError, match=r"mask_mod\(b, h, q_idx, kv_idx\)"):
        create_block_mask(lambda b, q_idx, kv_idx: q_idx >= kv_idx, 1, 1, 64, 64, "cpu")
    with pytest.raises(TypeError, match="must take 4"):
        create_block_mask(lambda score, b, h, q_idx, kv_idx: score, 1, 1, 64, 64, "cpu")
    with pytest.raises(TypeError, match="must be callable"):
        create_block_mask("causal", 1, 1, 64, 64, "cpu")
    with pytest.raises(TypeError, match="bool tensor"):
        create_block_mask(lambda b, h, q_idx, kv_idx: q_idx - kv_idx, 1, 1, 64, 64, "cpu")
    bad_sizes = {"Q_LEN": (1, 1, 0, 64), "KV_LEN": (1, 1, 64, -1), "B": (0, 1, 64, 64), "H": (1, 2.0, 64, 64)}
    for name, args in bad_sizes.items():
        with pytest.raises(ValueError, match=f"{name} must be a positive int"):
            create_block_mask(causal, *args, device="cpu")
    with pytest.raises(ValueError, match="needs no dQ write-order"):
        create_block_mask(causal, 1, 1, 64, 64, "cpu", compute_dq_write_order=True)
    with pytest.raises(ValueError, match="dq_kv_order must be a bool"):
        create_block_mask(causal, 1, 1, 64, 64, "cpu", dq_kv_order=None)
    with pytest.warns(DeprecationWarning, match="torch.compile"):
        create_block_mask(causal, 1, 1, 64, 64, "cpu", _compile=True)
    with pytest.raises(TypeError, match="and_masks argument 1"):
        and_masks(causal, 3)
    with pytest.raises(TypeError, match="must take 4"):
        or_masks(lambda b, h, q_idx: q_idx > 0)
    with pytest.raises(TypeError, match="must take 4"):
        create_mask(lambda q_idx, kv_idx: q_idx >= kv_idx, 1, 1, 4, 4, "cpu")


def test_bad_kv_block_lists():
    num, idx = torch.ones(1, 1, 2, dtype=torch.int32), torch.zeros(1, 1, 2, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"kv_indices must hold block indices as int32.*to\(torch\.int32\)"):
        BlockMask.from_kv_blocks(num, idx.float())
    with pytest.raises(ValueError, match="kv_num_blocks must have shape"):
        BlockMask.from_kv_blocks(num[..., :1], idx)
    with pytest.raises(ValueError, match="num_q_blocks, num_kv_blocks"):
        BlockMask.from_kv_blocks(num[0, 0, 0], idx[0, 0, 0])
    with pytest.raises(ValueError, match="given together"):
        BlockMask.from_kv_blocks(num, idx, full_kv_num_blocks=num)
    with pytest.raises(ValueError, match="full_kv_indices must have the shape"):
        BlockMask.from_kv_blocks(num, idx, num, idx[..., :2])
    with pytest.raises(TypeError, match="kv_indices must be a tensor"):
        BlockMask.from_kv_blocks(num, [[0]])
    with pytest.raises(ValueError, match="13 fields"):
        BlockMask.from_tuple((1, 2, 3))


MEMORY_SCRIPT = """
import resource, time, torch
from inductor_flex.block_mask import create_block_mask

def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx

create_block_mask(causal, 1, 1, 1024, 1024, "cpu")  # warm up allocator and vmap
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
mask = create_block_mask(causal, 1, 1, {n}, {n}, "cpu")
seconds = time.perf_counter() - start
grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
blocks = {n} // 128
assert int(mask.full_kv_num_blocks.sum()) == blocks * (blocks - 1) // 2
assert int(mask.kv_num_blocks.sum()) == blocks
print(seconds, grown_kib / 1024)
"""


def build_in_subprocess(n):
    """(seconds, peak memory growth in MiB) of a causal n × n create_block_mask on CPU."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MEMORY_SCRIPT.format(n=n))],
        capture_output=True, text=True, cwd=REPO_ROOT, check=False,
    )
    assert result.returncode == 0, result.stderr
    seconds, mib = map(float, result.stdout.split())
    return seconds, mib


def test_causal_131072_builds_within_1_gib():
    # ~17 s on 2 dedicated cores (measured), so not marked slow.
    seconds, mib = build_in_subprocess(131072)
    print(f"\ncausal 131072 x 131072: {seconds:.1f} s, peak memory growth {mib:.0f} MiB")
    assert mib < 1024


def test_causal_32768_builds_in_seconds():
    start = time.perf_counter()
    create_block_mask(causal, 1, 1, 32768, 32768, "cpu")
    seconds = time.perf_counter() - start
    print(f"\ncausal 32768 x 32768: {seconds:.2f} s")
    assert seconds < 30


def test_create_block_mask_inside_a_fullgraph_compiled_module():
    """A BlockMask built per call inside the compiled region from batch-dependent data (here
    per-sequence lengths), as a model's forward does: no graph break, same answer as eager."""
    from inductor_flex import flex_attention

    class Model(torch.nn.Module):
        def forward(self, q, k, v, lengths):
            def causal_within_length(b, h, q_idx, kv_idx):
                return (q_idx >= kv_idx) & (kv_idx < lengths[b])

            mask = create_block_mask(causal_within_length, q.size(0), None, q.size(2), k.size(2),
                                     device=q.device, BLOCK_SIZE=32)
            return flex_attention(q, k, v, block_mask=mask)

    q, k, v = (torch.randn(2, 2, 100, 16) for _ in range(3))
    lengths = torch.tensor([37, 100])
    compiled = torch.compile(Model(), fullgraph=True)(q, k, v, lengths)
    torch.testing.assert_close(compiled, Model()(q, k, v, lengths), atol=2e-5, rtol=2e-5)


def test_torch_keywords_are_accepted_and_as_tuple_unflattened():
    """torch 2.13's dQ write-order keywords are accepted (unused); as_tuple(flatten=False) keeps
    the length and block-size pairs, as torch's does."""
    mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, 1, 2, 64, 96, device="cpu", BLOCK_SIZE=32)
    order = torch.zeros(1, 2, 3, dtype=torch.int32)
    rebuilt = BlockMask(*mask.as_tuple(flatten=False)[:-1], mask_mod=mask.mask_mod, dq_write_order=order,
                        dq_kv_order_spt=True)
    assert torch.equal(rebuilt.to_dense(), mask.to_dense()) and rebuilt.BLOCK_SIZE == (32, 32)
    flat = mask.as_tuple()
    assert mask.as_tuple(flatten=False) == ((64, 96), *flat[2:10], (32, 32), mask.mask_mod)
    again = BlockMask.from_kv_blocks(mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks,
                                     mask.full_kv_indices, BLOCK_SIZE=32, dq_kv_order=order)
    assert torch.equal(again.to_dense(), mask.to_dense())


def test_mask_without_q_lists_runs_forward_and_backward():
    """from_kv_blocks(compute_q_blocks=False) (torch runs its forward): flex_attention derives
    the Q-direction lists, so the backward gets them too, eager and compiled."""
    from inductor_flex import flex_attention

    def sliding(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < 40)

    mask = create_block_mask(sliding, 1, 2, 100, 100, "cpu", BLOCK_SIZE=32)
    kv_only = BlockMask.from_kv_blocks(mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks,
                                       mask.full_kv_indices, BLOCK_SIZE=32, mask_mod=sliding,
                                       seq_lengths=(100, 100), compute_q_blocks=False)
    assert kv_only.q_indices is None
    q, k, v = (torch.randn(1, 2, 100, 16, requires_grad=True) for _ in range(3))
    expected_out = flex_attention(q, k, v, block_mask=mask)
    expected = torch.autograd.grad(expected_out.sum(), (q, k, v))
    for call in (flex_attention, torch.compile(flex_attention, fullgraph=True)):
        out = call(q, k, v, block_mask=kv_only)
        torch.testing.assert_close(out, expected_out)
        for got, want in zip(torch.autograd.grad(out.sum(), (q, k, v)), expected):
            torch.testing.assert_close(got, want)


def test_adjust_to_a_longer_length_inside_the_same_blocks():
    """Growing 100 -> 112 rows inside the last 16-block: that block was full (rows 96-99 all
    allowed) and must now let mask_mod decide rows 100-111, which it masks."""
    from inductor_flex import flex_attention

    def first_rows(b, h, q_idx, kv_idx):
        return q_idx < 100

    mask = create_block_mask(first_rows, 1, 1, 100, 64, "cpu", BLOCK_SIZE=16)
    assert int(mask.full_kv_num_blocks[0, 0, 6]) == 4  # the ragged row is full before growing
    grown = mask._adjust(112, 64)
    assert int(grown.full_kv_num_blocks[0, 0, 6]) == 0 and int(grown.kv_num_blocks[0, 0, 6]) == 4
    assert torch.equal(grown.full_kv_num_blocks[0, 0, :6], mask.full_kv_num_blocks[0, 0, :6])
    q, k, v = (torch.randn(1, 1, n, 16) for n in (112, 64, 64))
    for call in (flex_attention, torch.compile(flex_attention, fullgraph=True)):
        out = call(q, k, v, block_mask=grown)
        assert torch.equal(out[:, :, 100:], torch.zeros_like(out[:, :, 100:]))
        torch.testing.assert_close(out[:, :, :100], flex_attention(q[:, :, :100], k, v, block_mask=mask))


def test_padding_slots_may_hold_anything():
    """torch's test_from_kv_blocks pads kv_indices with -1: only a row's first num_blocks slots
    mean anything. Ours sets padding that is no block id to block 0 (kernels may prefetch a slot), for its own
    from_kv_blocks and for torch's masks alike; listed slots are still checked."""
    from inductor_flex import flex_attention

    def lists(pad):
        num = torch.tensor([[[1, 2]]], dtype=torch.int32)
        indices = torch.tensor([[[[1, pad], [0, 1]]]], dtype=torch.int32)
        full_num = torch.tensor([[[1, 0]]], dtype=torch.int32)
        full_indices = torch.tensor([[[[0, pad], [pad, pad]]]], dtype=torch.int32)
        return num, indices, full_num, full_indices

    q, k, v = (torch.randn(1, 1, 256, 16) for _ in range(3))
    gold = flex_attention(q, k, v, block_mask=BlockMask.from_kv_blocks(*lists(0)))
    for mask in (BlockMask.from_kv_blocks(*lists(-1)), torch_flex.BlockMask.from_kv_blocks(*lists(-1))):
        torch.testing.assert_close(flex_attention(q, k, v, block_mask=mask), gold, rtol=0, atol=0)
    ours = BlockMask.from_kv_blocks(*lists(-1))
    assert bool((ours.kv_indices >= 0).all()) and bool((ours.full_kv_indices >= 0).all())
    listed_wrong = lists(0)[0], torch.tensor([[[[-1, 0], [0, 1]]]], dtype=torch.int32)
    with pytest.raises(ValueError, match="list only existing blocks"):
        BlockMask.from_kv_blocks(*listed_wrong)
