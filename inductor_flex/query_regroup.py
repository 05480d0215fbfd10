"""Small query blocks regrouped into kernel-sized ones, so they run at full tile speed.

The fused templates give each program the query rows of one sparse Q block (one block list
serves the whole tile), so a BlockMask with Q blocks of 16, 32 or 48 rows runs 16-48-row
tiles, a fraction of the tensor cores' speed (H200, causal D128 S8192: Q/KV blocks of 32 at
0.40x torch's speed with blocks of 128, 48 at 0.72x). Under torch.compile such a mask is
replaced, before the operator, by an equivalent one whose Q blocks have REGROUPED_ROWS rows:

- a regrouped block is *full* where every fine block it covers is full, listed nowhere where
  every one is absent, and *partial* otherwise;
- its mask_mod reads a table of the fine blocks' kinds ([B, H, rows, cols] int8: 0 absent,
  1 partial, 2 full) and answers what the fine mask answers: full -> attended, partial -> the
  user's mask_mod, absent -> masked.

Every position is therefore attended exactly as before, hand-made masks included (the table is
the fine mask's own semantics); the partial regrouped blocks pay one table read per score. The
KV direction is left alone: the templates already gather small KV blocks into full-width tiles.
"""

from typing import Optional

import torch

from .block_mask import BlockMask, _dense_to_ordered, _ordered_to_dense

# Rows of a regrouped query block: the forward's tile height (BLOCK_M 128, or 64 twice).
REGROUPED_ROWS = 128

# Regrouping divides the programs of the grid by the regrouping factor: it only runs when the
# regrouped grid still fills about one wave of SMs (H100/H200: 132). Off GPU (Triton's
# interpreter) the same rule with a stand-in of 8 SMs, so small tests keep the fine path.
MIN_REGROUPED_PROGRAMS_ON_GPU = 128
MIN_REGROUPED_PROGRAMS_OFF_GPU = 8
# The regrouped lists are rebuilt at every call by some fifty small eager ops (a few hundred µs
# of host time, hidden only behind enough GPU work): on a GPU, only for at least this many
# scores B·H·Lq·Lkv (2^29 at D128: 275 GFLOP, ~0.7 ms of unmasked attention on an H100).
MIN_REGROUPED_SCORES_ON_GPU = 1 << 29

ABSENT, PARTIAL, FULL = 0, 1, 2


def should_regroup(block_mask: BlockMask, query: torch.Tensor) -> bool:
    """Regroup for the fused templates when the Q blocks are not a multiple of 64 rows (the
    smallest full-speed tile), shapes are static, the query is longer than the decode kernel's
    (which does not tile by Q block), enough programs remain to fill the GPU and there is
    enough work to hide the rebuilding of the lists."""
    # Imported here: the lowering package pulls in Inductor, which `import inductor_flex` must not.
    from .lowering.forward import DECODE_MAX_QUERY_LEN, runs_triton

    if not runs_triton(query.device):
        return False
    q_block = block_mask.BLOCK_SIZE[0]
    sizes = (*query.shape, *block_mask.kv_indices.shape, *block_mask.BLOCK_SIZE, *block_mask.seq_lengths)
    if not all(isinstance(size, int) for size in sizes):
        return False
    if q_block % 64 == 0 or query.size(-2) <= DECODE_MAX_QUERY_LEN:
        return False
    batch, heads, q_len = query.shape[:3]
    regrouped_programs = batch * heads * -(-q_len // REGROUPED_ROWS)
    if query.device.type == "cpu":
        return regrouped_programs >= MIN_REGROUPED_PROGRAMS_OFF_GPU
    scores = batch * heads * q_len * block_mask.seq_lengths[1]
    return regrouped_programs >= MIN_REGROUPED_PROGRAMS_ON_GPU and scores >= MIN_REGROUPED_SCORES_ON_GPU


def fine_block_kinds(kv_num_blocks, kv_indices, full_kv_num_blocks=None, full_kv_indices=None) -> torch.Tensor:
    """int8 [B, H, rows, cols]: FULL, PARTIAL or ABSENT for every block of a mask's KV lists
    (a block listed as both is full, as in the reference: full blocks never consult mask_mod)."""
    num_cols = kv_indices.size(-1)
    kinds = _ordered_to_dense(kv_num_blocks, kv_indices, num_cols).to(torch.int8)
    if full_kv_num_blocks is not None:
        full = _ordered_to_dense(full_kv_num_blocks, full_kv_indices, num_cols)
        kinds = torch.where(full, FULL, kinds).to(torch.int8)
    return kinds


def covered_fine_rows(q_len: int, fine_rows: int, device) -> torch.Tensor:
    """long [regrouped blocks, slots]: the fine Q blocks each regrouped block overlaps (inside
    q_len), the last one repeated to fill the slots (a repeat changes no min or max)."""
    regrouped = -(-q_len // REGROUPED_ROWS)
    slots = -(-(REGROUPED_ROWS - 1) // fine_rows) + 1
    first_row = torch.arange(regrouped, device=device) * REGROUPED_ROWS
    last_row = torch.clamp(first_row + REGROUPED_ROWS, max=q_len) - 1
    first, last = first_row // fine_rows, last_row // fine_rows
    return torch.minimum(first[:, None] + torch.arange(slots, device=device), last[:, None])


def mask_mod_from_kinds(mask_mod, kinds: torch.Tensor, fine_rows: int, kv_block: int):
    """The fine mask's answer for any position, from its kinds table and its mask_mod."""
    per_batch, per_head = kinds.size(0) > 1, kinds.size(1) > 1

    def fine_block_mask_mod(b, h, q_idx, kv_idx):
        kind = kinds[b if per_batch else 0, h if per_head else 0, q_idx // fine_rows, kv_idx // kv_block]
        return (kind == FULL) | ((kind == PARTIAL) & mask_mod(b, h, q_idx, kv_idx))

    return fine_block_mask_mod


@torch.library.custom_op("inductor_flex::regroup_query_blocks", mutates_args=())
def regrouped_block_lists(
    kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, full_kv_num_blocks: Optional[torch.Tensor],
    full_kv_indices: Optional[torch.Tensor], q_len: int, fine_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """The fine kinds table and the eight block lists of the regrouped mask (kv, full kv, q,
    full q; each a count and an index list; the full ones list nothing without full blocks).

    An operator of its own, so a compiled graph calls this eager code (Inductor runs it as an
    extern kernel) instead of generating kernels for it: generating its stable argsorts cost
    20-30 s of compile on the H200. The price is host time at every call (see
    MIN_REGROUPED_SCORES_ON_GPU).
    """
    kinds = fine_block_kinds(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)
    per_regrouped = kinds[:, :, covered_fine_rows(q_len, fine_rows, kinds.device)]
    any_listed = per_regrouped.amax(dim=-2) > ABSENT
    all_full = per_regrouped.amin(dim=-2) == FULL
    partial = any_listed & ~all_full
    return (kinds, *_dense_to_ordered(partial), *_dense_to_ordered(all_full),
            *_dense_to_ordered(partial.transpose(-2, -1)), *_dense_to_ordered(all_full.transpose(-2, -1)))


@regrouped_block_lists.register_fake
def _regrouped_block_lists_shapes(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, q_len, fine_rows):
    *batch_heads, rows, cols = kv_indices.shape
    regrouped = -(-q_len // REGROUPED_ROWS)

    def new(*shape, dtype=torch.int32):
        return kv_indices.new_empty(*batch_heads, *shape, dtype=dtype)

    def kv_lists():
        return new(regrouped), new(regrouped, cols)

    def q_lists():
        return new(cols), new(cols, regrouped)

    return (new(rows, cols, dtype=torch.int8), *kv_lists(), *kv_lists(), *q_lists(), *q_lists())


def regroup_query_blocks(block_mask: BlockMask) -> BlockMask:
    """The same mask with Q blocks of REGROUPED_ROWS rows (see the module docstring)."""
    q_len, _ = block_mask.seq_lengths
    fine_rows, kv_block = block_mask.BLOCK_SIZE
    kinds, *lists = regrouped_block_lists(block_mask.kv_num_blocks, block_mask.kv_indices,
                                          block_mask.full_kv_num_blocks, block_mask.full_kv_indices, q_len, fine_rows)
    kv_num, kv_indices, full_kv_num, full_kv_indices, q_num, q_indices, full_q_num, full_q_indices = lists
    if block_mask.full_kv_num_blocks is None:
        full_kv_num = full_kv_indices = full_q_num = full_q_indices = None
    return BlockMask(
        block_mask.seq_lengths, kv_num, kv_indices, full_kv_num, full_kv_indices, q_num, q_indices, full_q_num,
        full_q_indices, BLOCK_SIZE=(REGROUPED_ROWS, kv_block),
        mask_mod=mask_mod_from_kinds(block_mask.mask_mod, kinds, fine_rows, kv_block),
    )
