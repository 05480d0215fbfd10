"""Small sparse blocks regrouped into kernel-sized ones, so they run at full tile speed.

The fused templates give each program the query rows of one sparse Q block (one block list
serves the whole tile), so Q blocks of 16, 32 or 48 rows meant 16-48-row tiles; KV blocks that
a tile does not divide are gathered row by row into tiles, with masked columns at every block
edge (H200, causal D128 S8192: blocks of 32 at 0.40x torch's speed with blocks of 128, 48 at
0.72x). Under torch.compile such a mask is replaced, before the operator, by an equivalent one
whose blocks have REGROUPED_SIZE rows (Q) and columns (KV) in each direction whose block is
not a multiple of 64:

- a regrouped block is *full* where every fine block it covers is full, listed nowhere where
  every one is absent, and *partial* otherwise;
- its mask_mod reads a table of the fine blocks' kinds ([B, H, rows, cols] int8: 0 absent,
  1 partial, 2 full) and answers what the fine mask answers: full -> attended, partial -> the
  user's mask_mod, absent -> masked.

Every position is therefore attended exactly as before, hand-made masks included (the table is
the fine mask's own semantics); the partial regrouped blocks pay one table read per score. A
mask whose blocks create_block_mask classified by evaluating its mask_mod
(``blocks_follow_mask_mod``) needs no table: there the mask_mod already answers every position
as the blocks do, and the regrouped mask keeps it as it is. The
work is that of the same mask built with 128-blocks (torch's default, and the smallest torch
2.11 accepts on the GPU): fine blocks scattered so that few of them share a 128-block cost
more. Pages of a paged KV cache are not regrouped in the KV direction: neighbouring pages
belong to other sequences, so their tiles would be mostly masked.
"""

from typing import Optional

import torch

from .block_mask import BlockMask, _dense_to_ordered, _ordered_to_dense

# Rows/columns of a regrouped block: the forward's tile (128, or 64 twice).
REGROUPED_SIZE = 128
# Sparse blocks that are a multiple of this many positions run at full tile speed as they are.
FULL_SPEED_MULTIPLE = 64

# Regrouping the Q direction divides the programs of the grid: it only runs when the regrouped
# grid still fills about one wave of SMs (H100/H200: 132). Off GPU (Triton's interpreter) the
# same rule with a stand-in of 8 SMs, so small tests keep the fine path.
MIN_REGROUPED_PROGRAMS_ON_GPU = 128
MIN_REGROUPED_PROGRAMS_OFF_GPU = 8
# Regrouping a mask not seen before costs some fifty small eager ops (~1.2 ms of host time on
# the H200 host, hidden only behind enough GPU work): on a GPU, only for at least this many
# scores B·H·Lq·Lkv (2^29 at D128: 275 GFLOP, ~0.7 ms of unmasked attention on an H100).
# Off GPU a stand-in, so the interpreter runs both paths: small calls keep the fine blocks
# (and the KV tiles' row gathers), as every GPU call below the threshold does.
MIN_REGROUPED_SCORES_ON_GPU = 1 << 29
MIN_REGROUPED_SCORES_OFF_GPU = 1 << 15

ABSENT, PARTIAL, FULL = 0, 1, 2

# Set on a mask_mod whose KV positions are pages of a paged cache (paged.py): see above.
KV_POSITIONS_ARE_PAGES = "_inductor_flex_kv_positions_are_pages"


def regrouped_block_size(block_mask: BlockMask, query: torch.Tensor) -> Optional[tuple[int, int]]:
    """The BLOCK_SIZE to regroup ``block_mask`` to for the fused templates, or None to keep it.

    A direction is regrouped when its blocks are not a multiple of 64 (the smallest full-speed
    tile); the Q direction only while enough programs remain to fill the GPU. Nothing is
    regrouped for queries the decode kernel takes (it does not tile by Q block), off the Triton
    templates, or (on a GPU) for too little work to hide the rebuilding.

    Under dynamic shapes the size tests become guards (Dynamo answers ``isinstance(size, int)``
    with True for a symbolic size), so a call crossing a threshold recompiles; they are
    consulted only once the block sizes call for regrouping, so masks of full-speed blocks
    (the usual 128) add no guard.
    """
    # Imported here: the lowering package pulls in Inductor, which `import inductor_flex` must not.
    from .lowering.forward import DECODE_MAX_QUERY_LEN, runs_triton

    q_block, kv_block = block_mask.BLOCK_SIZE
    small_rows, small_cols = q_block % FULL_SPEED_MULTIPLE != 0, kv_block % FULL_SPEED_MULTIPLE != 0
    regroup_cols = small_cols and not getattr(block_mask.mask_mod, KV_POSITIONS_ARE_PAGES, False)
    if not (small_rows or regroup_cols) or not runs_triton(query.device):
        return None
    batch, heads, q_len = query.shape[:3]
    on_gpu = query.device.type != "cpu"
    min_scores = MIN_REGROUPED_SCORES_ON_GPU if on_gpu else MIN_REGROUPED_SCORES_OFF_GPU
    if q_len <= DECODE_MAX_QUERY_LEN or batch * heads * q_len * block_mask.seq_lengths[1] < min_scores:
        return None
    min_programs = MIN_REGROUPED_PROGRAMS_ON_GPU if on_gpu else MIN_REGROUPED_PROGRAMS_OFF_GPU
    regroup_rows = small_rows and batch * heads * -(-q_len // REGROUPED_SIZE) >= min_programs
    if not (regroup_rows or regroup_cols):
        return None
    return (REGROUPED_SIZE if regroup_rows else q_block, REGROUPED_SIZE if regroup_cols else kv_block)


def fine_block_kinds(kv_num_blocks, kv_indices, full_kv_num_blocks=None, full_kv_indices=None) -> torch.Tensor:
    """int8 [B, H, rows, cols]: FULL, PARTIAL or ABSENT for every block of a mask's KV lists
    (a block listed as both is full, as in the reference: full blocks never consult mask_mod)."""
    num_cols = kv_indices.size(-1)
    kinds = _ordered_to_dense(kv_num_blocks, kv_indices, num_cols).to(torch.int8)
    if full_kv_num_blocks is not None:
        full = _ordered_to_dense(full_kv_num_blocks, full_kv_indices, num_cols)
        kinds = torch.where(full, FULL, kinds).to(torch.int8)
    return kinds


def covered_fine_blocks(length: int, fine: int, coarse: int, device) -> torch.Tensor:
    """long [regrouped blocks, slots]: the fine blocks each coarse block overlaps (inside
    length), the last one repeated to fill the slots (a repeat changes no min or max)."""
    regrouped = -(-length // coarse)
    slots = -(-(coarse - 1) // fine) + 1
    first_position = torch.arange(regrouped, device=device) * coarse
    last_position = torch.clamp(first_position + coarse, max=length) - 1
    first, last = first_position // fine, last_position // fine
    return torch.minimum(first[:, None] + torch.arange(slots, device=device), last[:, None])


def mask_mod_from_kinds(mask_mod, kinds: torch.Tensor, fine_rows: int, fine_cols: int):
    """The fine mask's answer for any position, from its kinds table and its mask_mod."""
    per_batch, per_head = kinds.size(0) > 1, kinds.size(1) > 1

    def fine_block_mask_mod(b, h, q_idx, kv_idx):
        kind = kinds[b if per_batch else 0, h if per_head else 0, q_idx // fine_rows, kv_idx // fine_cols]
        return (kind == FULL) | ((kind == PARTIAL) & mask_mod(b, h, q_idx, kv_idx))

    return fine_block_mask_mod


# Regrouped lists of the masks seen last (see _MaskListsCache), so that a mask reused call
# after call (every layer of a model, every step of a loop) is regrouped once.
CACHED_MASKS = 8


class _MaskListsCache:
    """The operator's outputs for the last CACHED_MASKS masks, keyed by the identity and
    version of their input tensors.

    An entry holds weak references to the inputs' storages: it is valid while every storage is
    alive (so its address cannot be reused by another tensor) and the tensors' version counters
    are unchanged (every in-place write through torch bumps them). A mask rebuilt every step is
    a new storage, hence a miss. Callers get clones: Inductor may reuse an output's memory.
    """

    def __init__(self):
        self.entries = {}  # key -> (storage weak references, outputs), oldest first

    @staticmethod
    def key(tensors, sizes):
        from torch.multiprocessing.reductions import StorageWeakRef

        refs, identity = [], []
        for t in tensors:
            if t is None:
                identity.append(None)
                continue
            ref = StorageWeakRef(t.untyped_storage())
            refs.append(ref)
            identity.append((ref.cdata, t.data_ptr(), t._version, tuple(t.shape), t.stride(), t.device))
        return (tuple(identity), sizes), refs

    def get(self, key):
        entry = self.entries.pop(key, None)
        if entry is None or any(ref.expired() for ref in entry[0]):
            return None
        self.entries[key] = entry  # most recently used last
        return tuple(t.clone() for t in entry[1])

    def put(self, key, refs, outputs):
        self.entries[key] = (refs, outputs)
        while len(self.entries) > CACHED_MASKS:
            self.entries.pop(next(iter(self.entries)))


_cache = _MaskListsCache()


def build_regrouped_lists(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, q_len, kv_len,
                          fine_rows, fine_cols, rows, cols):
    """The fine kinds table and the eight block lists of the mask regrouped to (rows, cols)."""
    # flex_attention has checked that the lists cover the lengths (api._validate_block_mask).
    kinds = fine_block_kinds(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)
    row_cover = covered_fine_blocks(q_len, fine_rows, rows, kinds.device)
    col_cover = covered_fine_blocks(kv_len, fine_cols, cols, kinds.device)
    covered = kinds[:, :, row_cover][..., col_cover]  # [B, H, rows, row slots, cols, col slots]
    any_listed = covered.amax(dim=(-3, -1)) > ABSENT
    all_full = covered.amin(dim=(-3, -1)) == FULL
    partial = any_listed & ~all_full
    return (kinds, *_dense_to_ordered(partial), *_dense_to_ordered(all_full),
            *_dense_to_ordered(partial.transpose(-2, -1)), *_dense_to_ordered(all_full.transpose(-2, -1)))


# Inductor keeps CUDA graphs (mode="reduce-overhead") away from an op with this tag: the cache
# below must neither hold tensors of a graph's private memory pool nor be bypassed by a replay.
_NOT_IN_CUDA_GRAPHS = tuple(tag for tag in (getattr(torch.Tag, "cudagraph_unsafe", None),) if tag is not None)


@torch.library.custom_op("inductor_flex::regroup_blocks", mutates_args=(), tags=_NOT_IN_CUDA_GRAPHS)
def regrouped_block_lists(
    kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, full_kv_num_blocks: Optional[torch.Tensor],
    full_kv_indices: Optional[torch.Tensor], q_len: int, kv_len: int, fine_rows: int, fine_cols: int,
    rows: int, cols: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """The fine kinds table and the eight block lists of the mask regrouped to (rows, cols)
    blocks (kv, full kv, q, full q; each a count and an index list; the full ones list nothing
    without full blocks).

    An operator of its own, so a compiled graph calls this eager code (Inductor runs it as an
    extern kernel) instead of generating kernels for it: generating its stable argsorts cost
    20-30 s of compile on the H200. Building the lists costs ~1.2 ms of host time (some fifty
    small ops, H200), as long as the attention itself at B2 H16 S8192 D128; a mask seen again
    is served from _MaskListsCache instead (nine copies).
    """
    sizes = (q_len, kv_len, fine_rows, fine_cols, rows, cols)
    if kv_indices.is_cuda and torch.cuda.is_current_stream_capturing():
        # A CUDA graph captured by hand replays the kernels captured now: they must read the
        # mask's tensors, not copy the lists cached for whatever mask they held at capture.
        return build_regrouped_lists(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, *sizes)
    key, refs = _cache.key((kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices), sizes)
    cached = _cache.get(key)
    if cached is not None:
        return cached
    outputs = build_regrouped_lists(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, *sizes)
    _cache.put(key, refs, outputs)
    return tuple(t.clone() for t in outputs)


@regrouped_block_lists.register_fake
def _regrouped_block_lists_shapes(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, q_len, kv_len,
                                  fine_rows, fine_cols, rows, cols):
    *batch_heads, fine_rows_listed, fine_cols_listed = kv_indices.shape
    coarse_rows, coarse_cols = -(-q_len // rows), -(-kv_len // cols)

    def new(*shape, dtype=torch.int32):
        return kv_indices.new_empty(*batch_heads, *shape, dtype=dtype)

    def kv_lists():
        return new(coarse_rows), new(coarse_rows, coarse_cols)

    def q_lists():
        return new(coarse_cols), new(coarse_cols, coarse_rows)

    kinds = new(fine_rows_listed, fine_cols_listed, dtype=torch.int8)
    return (kinds, *kv_lists(), *kv_lists(), *q_lists(), *q_lists())


def regroup_blocks(block_mask: BlockMask, block_size: tuple[int, int]) -> BlockMask:
    """The same mask with blocks of ``block_size`` (see the module docstring)."""
    q_len, kv_len = block_mask.seq_lengths
    fine_rows, fine_cols = block_mask.BLOCK_SIZE
    kinds, *lists = regrouped_block_lists(block_mask.kv_num_blocks, block_mask.kv_indices,
                                          block_mask.full_kv_num_blocks, block_mask.full_kv_indices,
                                          q_len, kv_len, fine_rows, fine_cols, *block_size)
    kv_num, kv_indices, full_kv_num, full_kv_indices, q_num, q_indices, full_q_num, full_q_indices = lists
    if block_mask.full_kv_num_blocks is None:
        full_kv_num = full_kv_indices = full_q_num = full_q_indices = None
    # Blocks classified by the mask_mod itself: it already answers every position as the fine
    # blocks do, so the regrouped partial blocks need no table read per score (H200, causal
    # D128 S8192 blocks of 32: forward 1.47 -> 1.35 ms; 48: 1.54 -> 1.38 ms).
    if block_mask.blocks_follow_mask_mod:
        mask_mod = block_mask.mask_mod
    else:
        mask_mod = mask_mod_from_kinds(block_mask.mask_mod, kinds, fine_rows, fine_cols)
    return BlockMask(
        block_mask.seq_lengths, kv_num, kv_indices, full_kv_num, full_kv_indices, q_num, q_indices, full_q_num,
        full_q_indices, BLOCK_SIZE=block_size, mask_mod=mask_mod,
        blocks_follow_mask_mod=block_mask.blocks_follow_mask_mod,
    )
