"""Regrouping small query blocks (inductor_flex/query_regroup.py) keeps every position's fate.

The regrouped mask is checked against the original through the float64 math path: outputs and
lse must be bit-identical, so a single position attended differently fails. Masks are drawn at
random (partial, full and absent blocks, hand-made lists included) with awkward sizes.
"""

import pytest
import torch

from inductor_flex import BlockMask, create_block_mask, flex_attention
from inductor_flex.api import AuxRequest
from inductor_flex.query_regroup import (REGROUPED_ROWS, fine_block_kinds, regroup_query_blocks, regrouped_block_lists,
                                         should_regroup)


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
    assert regrouped.BLOCK_SIZE == (REGROUPED_ROWS, mask.BLOCK_SIZE[1])


@pytest.mark.parametrize("block_size", [(16, 16), (32, 32), (48, 32), (24, 100), (100, 16), (17, 64), (200, 32)],
                         ids=str)
@pytest.mark.parametrize("L,S", [(300, 300), (1000, 257), (17, 90)], ids=str)
def test_hand_made_masks_attend_the_same_positions(block_size, L, S):
    mask = random_block_mask(2, 3, L, S, block_size, sliding_or_sink)
    _assert_same_attention(mask, regroup_query_blocks(mask), 2, 3, L, S)


@pytest.mark.parametrize("with_full", [True, False])
def test_broadcast_batch_and_heads(with_full):
    mask = random_block_mask(1, 1, 300, 300, (32, 32), sliding_or_sink, with_full=with_full)
    regrouped = regroup_query_blocks(mask)
    assert (regrouped.full_kv_num_blocks is None) == (not with_full)
    _assert_same_attention(mask, regrouped, 2, 2, 300, 300)


def test_created_masks_and_their_block_counts():
    """A causal mask of 32-blocks: regrouped rows list the union of their fine rows' blocks."""
    mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 300, 300, device="cpu", BLOCK_SIZE=32)
    regrouped = regroup_query_blocks(mask)
    kinds = fine_block_kinds(regrouped.kv_num_blocks, regrouped.kv_indices, regrouped.full_kv_num_blocks,
                             regrouped.full_kv_indices)[0, 0]
    # Regrouped row 0 covers fine rows 0-3: blocks 0-2 mixed (partial), block 3 partial; row 2
    # covers fine rows 8-9 (rows 256-299): blocks 0-7 full, 8-9 partial.
    assert kinds[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert kinds[2].tolist() == [2] * 8 + [1, 1]
    _assert_same_attention(mask, regrouped, 1, 1, 300, 300)


def test_when_it_applies():
    def query(B=2, H=16, L=4096):
        return torch.empty(B, H, L, 64, device="meta")

    mask32 = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 4096, 4096, device="meta", BLOCK_SIZE=32)
    mask64 = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 4096, 4096, device="meta", BLOCK_SIZE=64)
    assert should_regroup(mask32, query())
    assert not should_regroup(mask64, query())  # 64-row tiles already run at full speed
    assert not should_regroup(mask32, query(B=1, H=2))  # 64 programs: not a wave of SMs
    small = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 1024, 1024, device="meta", BLOCK_SIZE=32)
    assert not should_regroup(small, query(L=1024))  # 256 programs but 2^25 scores (4096²: 2^29)
    short = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 16, 4096, device="meta", BLOCK_SIZE=32)
    assert not should_regroup(short, query(L=16))  # the decode kernel's queries
    cpu_mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 300, 300, device="cpu", BLOCK_SIZE=32)
    assert not should_regroup(cpu_mask, torch.empty(2, 16, 300, 64))  # C++ backend: no tiles


@pytest.mark.parametrize("with_full", [True, False])
def test_the_operator_and_its_shapes_agree(with_full):
    """torch.library.opcheck: the fake (shapes under torch.compile) matches the real outputs,
    and the operator traces and runs as one node."""
    mask = random_block_mask(2, 3, 300, 200, (32, 16), sliding_or_sink, with_full=with_full)
    torch.library.opcheck(regrouped_block_lists, (mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks,
                                                  mask.full_kv_indices, 300, 32))
