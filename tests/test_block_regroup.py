"""Regrouping small blocks (inductor_flex/block_regroup.py) keeps every position's fate.

The regrouped mask is checked against the original through the float64 math path: outputs and
lse must be bit-identical, so a single position attended differently fails. Masks are drawn at
random (partial, full and absent blocks, hand-made lists included) with awkward sizes.
"""

import pytest
import torch

from inductor_flex import BlockMask, and_masks, create_block_mask, flex_attention, noop_mask, or_masks
from inductor_flex._compat.pytree import tree_flatten, tree_unflatten
from inductor_flex.api import AuxRequest
from inductor_flex.block_regroup import (FULL, PARTIAL, REGROUPED_SIZE, fine_block_kinds, regroup_blocks,
                                         regrouped_block_lists, regrouped_block_size)


def _random_lists(kinds: torch.Tensor, kind: int):
    """(num_blocks, indices) listing the blocks of ``kinds`` equal to ``kind``, in a shuffled
    order (hand-made masks need not be ascending) and padded with in-range ids."""
    chosen = kinds == kind
    num_blocks = chosen.sum(-1, dtype=torch.int32)
    keys = torch.rand(kinds.shape) - chosen.float()  # chosen blocks first, each group shuffled
    return num_blocks, keys.argsort(-1).to(torch.int32)


def random_block_mask(B, H, q_len, kv_len, block_size, mask_mod, with_full=True):
    q_block, kv_block = block_size
    rows, cols = -(-q_len // q_block), -(-kv_len // kv_block)
    kinds = torch.randint(0, 3 if with_full else 2, (B, H, rows, cols))
    kinds[..., 0, :] = 0  # a row of blocks with nothing attended
    full = _random_lists(kinds, 2) if with_full else (None, None)
    return BlockMask.from_kv_blocks(*_random_lists(kinds, 1), *full, BLOCK_SIZE=block_size,
                                    mask_mod=mask_mod, seq_lengths=(q_len, kv_len))


def sliding_or_sink(b, h, q_idx, kv_idx):
    return ((q_idx - kv_idx).abs() <= 9 + h) | (kv_idx == 0)


def _outputs(mask, q, k, v):
    out, aux = flex_attention(q, k, v, block_mask=mask, return_aux=AuxRequest(lse=True))
    return out, aux.lse


def _assert_same_attention(mask, regrouped, B, H, L, S, D=8):
    q, k, v = (torch.randn(B, H, n, D, dtype=torch.float64) for n in (L, S, S))
    for a, b in zip(_outputs(mask, q, k, v), _outputs(regrouped, q, k, v)):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())


BOTH = (REGROUPED_SIZE, REGROUPED_SIZE)


def _regrouped_sizes(block_size):
    """Both directions, and each alone (the other keeps its fine blocks)."""
    q_block, kv_block = block_size
    return [BOTH, (REGROUPED_SIZE, kv_block), (q_block, REGROUPED_SIZE)]


@pytest.mark.parametrize("block_size", [(16, 16), (32, 32), (48, 32), (24, 100), (100, 16), (17, 64), (200, 32),
                                        (128, 48)], ids=str)
@pytest.mark.parametrize("L,S", [(300, 300), (1000, 257), (17, 90)], ids=str)
def test_hand_made_masks_attend_the_same_positions(block_size, L, S):
    mask = random_block_mask(2, 3, L, S, block_size, sliding_or_sink)
    for size in _regrouped_sizes(block_size):
        regrouped = regroup_blocks(mask, size)
        assert regrouped.BLOCK_SIZE == size
        _assert_same_attention(mask, regrouped, 2, 3, L, S)


@pytest.mark.parametrize("with_full", [True, False])
def test_broadcast_batch_and_heads(with_full):
    mask = random_block_mask(1, 1, 300, 300, (32, 32), sliding_or_sink, with_full=with_full)
    regrouped = regroup_blocks(mask, BOTH)
    assert (regrouped.full_kv_num_blocks is None) == (not with_full)
    _assert_same_attention(mask, regrouped, 2, 2, 300, 300)


def test_created_masks_and_their_block_counts():
    """A causal mask of 32-blocks regrouped to 128-blocks: the causal mask of 128-blocks."""
    mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 300, 300, device="cpu", BLOCK_SIZE=32)
    regrouped = regroup_blocks(mask, BOTH)
    kinds = fine_block_kinds(regrouped.kv_num_blocks, regrouped.kv_indices, regrouped.full_kv_num_blocks,
                             regrouped.full_kv_indices)[0, 0]
    assert kinds.tolist() == [[1, 0, 0], [2, 1, 0], [2, 2, 1]]
    # Rows alone: regrouped row 0 covers fine rows 0-3: blocks 0-2 mixed (partial), block 3
    # partial; row 2 covers fine rows 8-9 (rows 256-299): blocks 0-7 full, 8-9 partial.
    rows_only = regroup_blocks(mask, (REGROUPED_SIZE, 32))
    kinds = fine_block_kinds(rows_only.kv_num_blocks, rows_only.kv_indices, rows_only.full_kv_num_blocks,
                             rows_only.full_kv_indices)[0, 0]
    assert kinds[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert kinds[2].tolist() == [2] * 8 + [1, 1]
    _assert_same_attention(mask, regrouped, 1, 1, 300, 300)


def test_masks_classified_by_their_mask_mod_regroup_without_a_table():
    """A created mask's blocks follow its mask_mod, so the regrouped mask keeps the mask_mod
    itself (no per-score table read); every other mask keeps the kinds table, and the flag
    does not survive a change of the lists."""
    def window(b, h, q, kv):
        return (q - kv).abs() <= 40

    created = create_block_mask(window, None, 2, 300, 300, device="cpu", BLOCK_SIZE=48)
    assert created.blocks_follow_mask_mod
    regrouped = regroup_blocks(created, BOTH)
    assert regrouped.mask_mod is window and regrouped.blocks_follow_mask_mod
    _assert_same_attention(created, regrouped, 2, 2, 300, 300)

    moved = created.to("cpu")
    rebuilt = tree_unflatten(*tree_flatten(created))
    assert moved.blocks_follow_mask_mod and rebuilt.blocks_follow_mask_mod
    for changed in (created[:, 1:], created._adjust(200, 300), BlockMask.from_tuple(created.as_tuple()),
                    BlockMask.from_kv_blocks(created.kv_num_blocks, created.kv_indices, BLOCK_SIZE=48,
                                             mask_mod=window, seq_lengths=(300, 300))):
        assert not changed.blocks_follow_mask_mod
        assert regroup_blocks(changed, BOTH).mask_mod is not changed.mask_mod


def test_broadcast_masks_follow_a_mask_mod_only_if_it_ignores_batch_and_head():
    """A mask made with B (H) None was classified at b = 0 (h = 0): its blocks follow the
    mask_mod only when the mask_mod's answer does not depend on b (h), which a symbolic trace
    tells (and_masks' b.new_ones reads no value); otherwise the table keeps torch's meaning."""
    doc = torch.randint(0, 3, (2, 300)).sort(dim=1).values

    def per_head_window(b, h, q, kv):
        return (q - kv).abs() <= 20 * (h + 1)

    def documents(b, h, q, kv):
        return doc[b, q] == doc[b, kv]

    class CausalObject:  # a callable object: fx does not trace it, so it counts as dependent
        def __call__(self, b, h, q, kv):
            return q >= kv

    def causal(b, h, q, kv):
        return q >= kv

    cases = [(per_head_window, None, None, False), (per_head_window, None, 2, True), (documents, None, 2, False),
             (documents, 2, None, True), (and_masks(causal, documents), 2, 2, True),
             (and_masks(causal, noop_mask), None, None, True), (or_masks(causal, per_head_window), 2, None, False),
             (CausalObject(), None, None, False), (CausalObject(), 2, 2, True)]
    for mask_mod, B, H, follows in cases:
        mask = create_block_mask(mask_mod, B, H, 300, 300, device="cpu", BLOCK_SIZE=32)
        assert mask.blocks_follow_mask_mod is follows, (mask_mod, B, H)


def test_when_it_applies():
    def query(B=2, H=16, L=4096):
        return torch.empty(B, H, L, 64, device="meta")

    def causal_mask(L=4096, S=4096, block_size=32, device="meta"):
        return create_block_mask(lambda b, h, q, kv: q >= kv, None, None, L, S, device=device, BLOCK_SIZE=block_size)

    assert regrouped_block_size(causal_mask(), query()) == BOTH
    assert regrouped_block_size(causal_mask(block_size=64), query()) is None  # full-speed tiles already
    assert regrouped_block_size(causal_mask(block_size=(64, 48)), query()) == (64, REGROUPED_SIZE)
    assert regrouped_block_size(causal_mask(block_size=(48, 128)), query()) == (REGROUPED_SIZE, 128)
    # 64 programs: not a wave of SMs; the KV direction does not change the grid.
    assert regrouped_block_size(causal_mask(L=8192, S=65536), query(B=1, H=1, L=8192)) == (32, REGROUPED_SIZE)
    small = causal_mask(L=1024, S=1024)
    assert regrouped_block_size(small, query(L=1024)) is None  # 2^25 scores (4096²: 2^29)
    short = causal_mask(L=16)
    assert regrouped_block_size(short, query(L=16)) is None  # the decode kernel's queries
    cpu_mask = causal_mask(L=300, S=300, device="cpu")
    assert regrouped_block_size(cpu_mask, torch.empty(2, 16, 300, 64)) is None  # C++ backend: no tiles


def test_full_speed_blocks_add_no_size_guard():
    """Dynamo answers isinstance(size, int) with True for a symbolic size, so under dynamic
    shapes the thresholds become guards: consulted only for blocks that call for regrouping,
    a mask of 128-blocks compiles once for any length, while one of 32-blocks recompiles when
    a call crosses the work threshold."""
    from torch._dynamo.testing import CompileCounter

    def compiles(block_size):
        torch._dynamo.reset()
        mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 4096, 4096, device="meta",
                                 BLOCK_SIZE=block_size)
        counter = CompileCounter()

        @torch.compile(backend=counter, dynamic=True, fullgraph=True)
        def regrouped(q):
            return q + (0 if regrouped_block_size(mask, q) is None else 1)

        for L in (4096, 64):  # 2^29 scores, then 2^25
            regrouped(torch.empty(2, 16, L, 64, device="meta"))
        return counter.frame_count

    assert compiles(128) == 1
    assert compiles(32) == 2


def test_pages_are_not_regrouped():
    """A paged cache's physical mask keeps its pages as KV blocks (its neighbours belong to other
    sequences); its Q blocks are still regrouped."""
    from inductor_flex import PagedKVCache

    cache = PagedKVCache(600, 16, 4, 2, 64, device="meta")
    logical = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 4096, 4096, device="meta",
                                BLOCK_SIZE=(32, 16))
    physical = cache.convert_logical_block_mask(logical, torch.arange(2, device="meta"))
    assert regrouped_block_size(logical, torch.empty(2, 16, 4096, 64, device="meta")) == BOTH
    assert regrouped_block_size(physical, torch.empty(2, 16, 4096, 64, device="meta")) == (REGROUPED_SIZE, 16)


@pytest.mark.parametrize("with_full", [True, False])
def test_the_operator_and_its_shapes_agree(with_full):
    """torch.library.opcheck: the fake (shapes under torch.compile) matches the real outputs,
    and the operator traces and runs as one node."""
    mask = random_block_mask(2, 3, 300, 200, (32, 16), sliding_or_sink, with_full=with_full)
    for size in _regrouped_sizes((32, 16)):
        torch.library.opcheck(regrouped_block_lists, (mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks,
                                                      mask.full_kv_indices, 300, 200, 32, 16, *size))


def test_a_reused_mask_is_regrouped_once(monkeypatch):
    """The operator caches its lists per mask: the same tensors again are a hit (copies of the
    same lists), an in-place change or a new mask is a miss."""
    import inductor_flex.block_regroup as block_regroup

    built = []
    build = block_regroup.build_regrouped_lists
    monkeypatch.setattr(block_regroup, "build_regrouped_lists", lambda *args: built.append(1) or build(*args))
    mask = random_block_mask(2, 3, 300, 200, (32, 16), sliding_or_sink)
    args = (mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices, 300, 200, 32, 16,
            *BOTH)
    first = regrouped_block_lists(*args)
    second = regrouped_block_lists(*args)
    assert len(built) == 1
    assert all(torch.equal(a, b) and a.data_ptr() != b.data_ptr() for a, b in zip(first, second))
    second[1].fill_(0)  # the caller's copy: the cached lists are untouched
    assert torch.equal(regrouped_block_lists(*args)[1], first[1]) and len(built) == 1

    mask.kv_num_blocks.zero_()  # an in-place change: rebuilt, now with no partial blocks
    changed = regrouped_block_lists(*args)
    assert len(built) == 2 and changed[0].max() <= FULL and not (changed[0] == PARTIAL).any()
    other = random_block_mask(2, 3, 300, 200, (32, 16), sliding_or_sink)
    regrouped_block_lists(other.kv_num_blocks, other.kv_indices, other.full_kv_num_blocks, other.full_kv_indices,
                          *args[4:])
    assert len(built) == 3
