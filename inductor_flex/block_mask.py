"""Block-sparse attention masks: ``BlockMask`` and the functions that build them.

A ``BlockMask`` describes a [B, H, Q_LEN, KV_LEN] mask at the granularity of
(Q_BLOCK × KV_BLOCK) tiles, the unit a kernel loads. For every query-block row it lists the
KV blocks to visit, split in *partial* blocks (mask_mod must still be applied) and *full*
blocks (every in-range position is allowed, so mask_mod is skipped); blocks with no allowed
position are listed nowhere and never computed. The backward iterates the other way, so the
same information is kept transposed per KV-block column (``q_*`` tensors).

Index lists are stored like torch's: the first ``kv_num_blocks[b, h, m]`` entries of
``kv_indices[b, h, m, :]`` are valid (in increasing order, as built here); the rest of the
row holds the remaining block ids (always in range, never garbage).

Pytree: the leaves are the tensors; seq_lengths, BLOCK_SIZE and mask_mod are context. Tensors
captured by a mask_mod closure stay inside the context: torch.export bakes them in as
constants, and a later call must pass a mask_mod capturing the very same tensors.

The last block row/column may be ragged (lengths need not be multiples of the block size).
Positions past Q_LEN/KV_LEN do not exist: a ragged block is full when all its in-range
positions are allowed. Kernels bound-check those positions independently of the mask.
"""

from __future__ import annotations

import itertools
import math
import types
import warnings
from typing import Callable

import torch

from ._compat.pytree import GetAttrKey, register_pytree_node
from .mods import MASK_MOD_ARITY, SCORE_MOD_ARITY, check_mod_arity, evaluate_mask_mod
from .mods import evaluate_score_mod, positional_arity

__all__ = ["BlockMask", "and_masks", "create_block_mask", "create_mask", "noop_mask", "or_masks"]

DEFAULT_BLOCK_SIZE = 128

# Largest number of mask elements create_block_mask evaluates at once in eager mode. mask_mod
# intermediates (e.g. int64 index differences) take 8 bytes per element. On CPU, 2 Mi elements
# keep them cache-sized (~2x faster than 16 Mi on a sliding window). On GPUs the cost is the
# host-side vmap dispatch per tile (~1 ms per indexing op), so tiles are large: 64 Mi elements,
# up to ~0.5 GiB of transient intermediates (H100: causal 32k² in 8 ms, 128k² in 0.1 s).
CPU_TILE_ELEMENTS = 1 << 21
ACCELERATOR_TILE_ELEMENTS = 1 << 26
# Under torch.compile the tile loop unrolls into the graph, so tiles are made much larger:
# Inductor fuses the mask evaluation into the per-block reduction and never materialises a
# tile, whereas a non-fusing backend ("eager", "aot_eager") materialises up to this many bools.
COMPILED_TILE_ELEMENTS = 1 << 30


def noop_mask(batch, head, token_q, token_kv):
    """mask_mod that allows every position (parameter names as torch's)."""
    return batch.new_ones((), dtype=torch.bool)


def and_masks(*mask_mods: Callable) -> Callable:
    """mask_mod allowing a position iff every one of ``mask_mods`` does (all True if none)."""
    _check_all_mask_mods(mask_mods, "and_masks")

    def and_mask(b, h, q_idx, kv_idx):
        allowed = b.new_ones((), dtype=torch.bool)
        for mask_mod in mask_mods:
            allowed = allowed & mask_mod(b, h, q_idx, kv_idx)
        return allowed

    return and_mask


def or_masks(*mask_mods: Callable) -> Callable:
    """mask_mod allowing a position iff any one of ``mask_mods`` does (all False if none)."""
    _check_all_mask_mods(mask_mods, "or_masks")

    def or_mask(b, h, q_idx, kv_idx):
        allowed = b.new_zeros((), dtype=torch.bool)
        for mask_mod in mask_mods:
            allowed = allowed | mask_mod(b, h, q_idx, kv_idx)
        return allowed

    return or_mask


def _check_all_mask_mods(mask_mods, combinator: str) -> None:
    for i, mask_mod in enumerate(mask_mods):
        if not callable(mask_mod):
            raise TypeError(
                f"{combinator} argument {i} is a {type(mask_mod).__name__}, not a mask_mod; "
                "pass functions `mask_mod(b, h, q_idx, kv_idx)`."
            )
        check_mod_arity(mask_mod, MASK_MOD_ARITY, "mask_mod")


def _sliced_mask_mod_unavailable(b, h, q_idx, kv_idx):
    """Placeholder mask_mod of a BlockMask sliced in a way no index remapping can follow."""
    raise RuntimeError(
        "This BlockMask was indexed with a tensor or along its query-block dimension, so the "
        "original mask_mod no longer matches its positions and was dropped. Assign one that "
        "does: `sliced.mask_mod = my_mask_mod_for_the_slice`, derived from the original "
        "BlockMask's mask_mod (e.g. with the query offset applied)."
    )


def _reindexed_mask_mod(mask_mod: Callable, b_map: tuple[int, int], h_map: tuple[int, int]):
    """``mask_mod`` seen from a batch/head slice: index i of the slice is ``start + step * i``."""
    (b_start, b_step), (h_start, h_step) = b_map, h_map

    def sliced_mask_mod(b, h, q_idx, kv_idx):
        return mask_mod(b * b_step + b_start, h * h_step + h_start, q_idx, kv_idx)

    sliced_mask_mod.__name__ = f"sliced_{getattr(mask_mod, '__name__', 'mask_mod')}"
    return sliced_mask_mod


def _slice_index_map(index, size: int) -> tuple[int, int] | None:
    """(start, step) mapping slice positions to original ones, or None if not affine.

    A dimension of size 1 broadcasts, so mask_mod already receives the real index there and
    the map is the identity. A slice left with one entry broadcasts too: its map is constant.
    """
    if size == 1:
        return (0, 1)
    if isinstance(index, int):
        return (index % size, 0)
    if isinstance(index, slice) and (index.step is None or index.step > 0):
        # slice.indices(size), spelled out: Dynamo of torch 2.11 cannot trace that builtin.
        step = 1 if index.step is None else index.step
        start = _clamped_position(index.start, size, default=0)
        stop = _clamped_position(index.stop, size, default=size)
        return (start, 0) if -(-(stop - start) // step) == 1 else (start, step)
    return None


def _clamped_position(bound: int | None, size: int, default: int) -> int:
    if bound is None:
        return default
    return min(max(bound + size if bound < 0 else bound, 0), size)


def _keep_dim(index, size: int):
    """One BlockMask index with ints turned into length-1 slices, so no dimension is dropped."""
    if index is None or index is Ellipsis:
        raise IndexError("BlockMask indexing takes ints, slices or tensors, not None or `...`.")
    if isinstance(index, int):
        if not -size <= index < size:
            raise IndexError(f"index {index} is out of range for a BlockMask dimension of size {size}.")
        return slice(index % size, index % size + 1)
    return index


def _normalize_block_size(block_size) -> tuple[int, int]:
    """BLOCK_SIZE as a (Q_BLOCK, KV_BLOCK) pair of positive ints, or a ValueError saying how."""
    pair = (block_size, block_size) if not isinstance(block_size, (tuple, list)) else tuple(block_size)
    valid = len(pair) == 2 and all(
        isinstance(s, (int, torch.SymInt)) and not isinstance(s, bool) and s > 0 for s in pair
    )
    if not valid:
        raise ValueError(
            f"BLOCK_SIZE must be a positive int or a (Q_BLOCK_SIZE, KV_BLOCK_SIZE) pair of "
            f"positive ints, got {block_size!r}; e.g. BLOCK_SIZE=128 or BLOCK_SIZE=(64, 32)."
        )
    return pair


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)) or value < 1:
        raise ValueError(
            f"{name} must be a positive int, got {value!r}; pass a Python int >= 1 (B and H may be "
            "None for 1; empty inputs need no mask: call flex_attention with block_mask=None)."
        )


def _as_device(device) -> torch.device:
    """``device`` as a torch.device (None: CUDA when available, else CPU), or a ValueError."""
    if device is None:
        return _default_device()
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"device {device!r} is not a device ({error}); pass e.g. device='cuda', 'cpu' or "
            "query.device."
        ) from None


def _ordered_to_dense(num_blocks: torch.Tensor, indices: torch.Tensor, num_cols: int) -> torch.Tensor:
    """Bool map [..., rows, num_cols] of the blocks listed by (num_blocks, indices)."""
    slots = torch.arange(indices.shape[-1], device=indices.device)
    listed = slots < num_blocks.unsqueeze(-1)
    # Padding entries go to a spill column that is dropped afterwards.
    cols = torch.where(listed, indices.long(), num_cols)
    dense = torch.zeros(*indices.shape[:-1], num_cols + 1, dtype=torch.bool, device=indices.device)
    dense.scatter_(-1, cols, True)
    return dense[..., :num_cols]


def _dense_to_ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_blocks, indices) of a block map: listed blocks first, then the others, each ascending."""
    as_int = dense.to(torch.int32)
    num_blocks = as_int.sum(-1, dtype=torch.int32)
    indices = torch.argsort(as_int, dim=-1, descending=True, stable=True).to(torch.int32)
    return num_blocks.contiguous(), indices.contiguous()


def _check_dq_order_fields(write_order, write_order_full, kv_order, kv_order_spt) -> None:
    for name, value in (("dq_write_order", write_order), ("dq_write_order_full", write_order_full),
                        ("dq_kv_order", kv_order)):
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor or None, got {type(value).__name__} (it is unused: pass None).")
    if kv_order_spt is not None and not isinstance(kv_order_spt, bool):
        raise TypeError(f"dq_kv_order_spt must be a bool or None, got {type(kv_order_spt).__name__} "
                        "(it is unused: pass None).")


def _check_block_list(name: str, num_blocks, indices) -> None:
    for tensor_name, tensor in ((f"{name}_num_blocks", num_blocks), (f"{name}_indices", indices)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{tensor_name} must be a tensor, got {type(tensor).__name__}.")
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            raise ValueError(
                f"{tensor_name} must hold block indices as int32, got {tensor.dtype}; "
                "convert with `.to(torch.int32)`."
            )
    if indices.dim() < 2:
        raise ValueError(
            f"{name}_indices must have shape [..., num_q_blocks, num_kv_blocks] (usually "
            f"[B, H, num_q_blocks, num_kv_blocks]), got {tuple(indices.shape)}."
        )
    if num_blocks.shape != indices.shape[:-1]:
        raise ValueError(
            f"{name}_num_blocks must have shape {tuple(indices.shape[:-1])} (the shape of "
            f"{name}_indices without its last dimension), got {tuple(num_blocks.shape)}."
        )


def padding_as_block_zero(num_blocks: torch.Tensor | None, indices: torch.Tensor | None):
    """``indices`` with every slot past a row's count that holds no block id set to block 0.

    Only the first ``num_blocks`` entries of a row mean anything, and torch pads the rest with
    anything (-1 in its own tests); kernels may still read a padding slot (prefetching the next
    block), so padding must be a block id that exists. Padding that already is one (the
    unlisted blocks, as create_block_mask leaves them) is kept.
    """
    if indices is None or num_blocks is None:
        return indices
    cols = indices.shape[-1]
    slots = torch.arange(cols, device=indices.device, dtype=num_blocks.dtype)
    keep = (slots < num_blocks.unsqueeze(-1)) | ((indices >= 0) & (indices < cols))
    return torch.where(keep, indices, torch.zeros_like(indices))


def _check_block_values(name: str, num_blocks: torch.Tensor, indices: torch.Tensor) -> None:
    """Counts in [0, cols] and every index entry a block id in [0, cols) (padding, set to 0 by
    ``padding_as_block_zero`` first, passes).

    Kernels trust these values: out of range they read out of bounds (an illegal memory access
    on a GPU). Checked for CPU tensors outside torch.compile only; elsewhere reading the values
    would wait on the device, so build hand-made masks on the CPU and move them with .to().
    """
    if num_blocks.device.type != "cpu" or torch.compiler.is_compiling() or indices.numel() == 0:
        return
    cols = indices.shape[-1]
    if bool((num_blocks < 0).any()) or bool((num_blocks > cols).any()):
        raise ValueError(
            f"{name}_num_blocks holds counts from {int(num_blocks.min())} to {int(num_blocks.max())}, "
            f"outside [0, {cols}] (the number of block columns); a row lists at most every block once."
        )
    if bool((indices < 0).any()) or bool((indices >= cols).any()):
        raise ValueError(
            f"{name}_indices holds block ids from {int(indices.min())} to {int(indices.max())}, outside "
            f"[0, {cols}) among the blocks its rows list; list only existing blocks."
        )


class BlockMask:
    """Block-sparse mask over [B, H, Q_LEN, KV_LEN]; see the module docstring for the format.

    Build one with ``create_block_mask`` (from a mask_mod) or ``BlockMask.from_kv_blocks``
    (from KV block lists). It is a pytree node whose leaves are its tensors, so it can cross
    ``torch.compile`` and ``torch.export`` boundaries.
    """

    # Tensor attributes in pytree-leaf order; the first two are always present.
    TENSOR_ATTRS = (
        "kv_num_blocks",
        "kv_indices",
        "full_kv_num_blocks",
        "full_kv_indices",
        "q_num_blocks",
        "q_indices",
        "full_q_num_blocks",
        "full_q_indices",
    )

    def __init__(
        self,
        seq_lengths: tuple[int, int],
        kv_num_blocks: torch.Tensor,
        kv_indices: torch.Tensor,
        full_kv_num_blocks: torch.Tensor | None,
        full_kv_indices: torch.Tensor | None,
        q_num_blocks: torch.Tensor | None,
        q_indices: torch.Tensor | None,
        full_q_num_blocks: torch.Tensor | None,
        full_q_indices: torch.Tensor | None,
        BLOCK_SIZE: int | tuple[int, int] = (DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_SIZE),
        mask_mod: Callable | None = noop_mask,
        *,
        dq_write_order: torch.Tensor | None = None,
        dq_write_order_full: torch.Tensor | None = None,
        dq_kv_order: torch.Tensor | None = None,
        dq_kv_order_spt: bool | None = None,
        blocks_follow_mask_mod: bool = False,
    ) -> None:
        # The dq_* keywords are torch 2.13's write order for its dQ kernel: accepted so code
        # written for torch runs, unused (our backward computes dQ per query block, no order).
        _check_dq_order_fields(dq_write_order, dq_write_order_full, dq_kv_order, dq_kv_order_spt)
        # Tensors are not inspected here: pytree machinery rebuilds masks with placeholder leaves.
        for name, num, idx in (
            ("full_kv", full_kv_num_blocks, full_kv_indices),
            ("q", q_num_blocks, q_indices),
            ("full_q", full_q_num_blocks, full_q_indices),
        ):
            if (num is None) != (idx is None):
                raise ValueError(
                    f"{name}_num_blocks and {name}_indices must be given together or both be None."
                )
        self.seq_lengths = tuple(seq_lengths)
        self.kv_num_blocks = kv_num_blocks
        self.kv_indices = kv_indices
        self.full_kv_num_blocks = full_kv_num_blocks
        self.full_kv_indices = full_kv_indices
        self.q_num_blocks = q_num_blocks
        self.q_indices = q_indices
        self.full_q_num_blocks = full_q_num_blocks
        self.full_q_indices = full_q_indices
        self.BLOCK_SIZE = _normalize_block_size(BLOCK_SIZE)
        self.mask_mod = noop_mask if mask_mod is None else mask_mod
        # True only where create_block_mask classified the blocks by evaluating this mask_mod,
        # for every batch and head it answers differently: then mask_mod alone answers every
        # position exactly as the blocks do (full blocks all True, absent ones all False),
        # which block_regroup.py uses. Any other construction (hand-made lists, slicing,
        # _adjust, from_tuple) leaves it False.
        self.blocks_follow_mask_mod = blocks_follow_mask_mod

    @classmethod
    def from_kv_blocks(
        cls,
        kv_num_blocks: torch.Tensor,
        kv_indices: torch.Tensor,
        full_kv_num_blocks: torch.Tensor | None = None,
        full_kv_indices: torch.Tensor | None = None,
        BLOCK_SIZE: int | tuple[int, int] = DEFAULT_BLOCK_SIZE,
        mask_mod: Callable | None = None,
        seq_lengths: tuple[int, int] | None = None,
        compute_q_blocks: bool = True,
        *,
        dq_write_order: torch.Tensor | None = None,
        dq_write_order_full: torch.Tensor | None = None,
        dq_kv_order: torch.Tensor | None = None,
    ) -> BlockMask:
        """BlockMask from KV block lists; the Q-direction lists are derived from them.

        Integer index tensors of another dtype are converted to int32. ``seq_lengths``
        defaults to whole blocks: (num_q_blocks * Q_BLOCK, num_kv_blocks * KV_BLOCK).
        The ``dq_*`` keywords (torch 2.13) are accepted and unused, as in ``__init__``.
        """
        _check_dq_order_fields(dq_write_order, dq_write_order_full, dq_kv_order, None)
        _check_block_list("kv", kv_num_blocks, kv_indices)
        if (full_kv_num_blocks is None) != (full_kv_indices is None):
            raise ValueError("full_kv_num_blocks and full_kv_indices must be given together or both be None.")
        if full_kv_num_blocks is not None:
            _check_block_list("full_kv", full_kv_num_blocks, full_kv_indices)
            if full_kv_indices.shape != kv_indices.shape:
                raise ValueError(
                    f"full_kv_indices must have the shape of kv_indices {tuple(kv_indices.shape)}, "
                    f"got {tuple(full_kv_indices.shape)}."
                )
            full_kv_num_blocks = full_kv_num_blocks.to(torch.int32)
            full_kv_indices = full_kv_indices.to(torch.int32)
        kv_num_blocks, kv_indices = kv_num_blocks.to(torch.int32), kv_indices.to(torch.int32)
        kv_indices = padding_as_block_zero(kv_num_blocks, kv_indices)
        full_kv_indices = padding_as_block_zero(full_kv_num_blocks, full_kv_indices)
        _check_block_values("kv", kv_num_blocks, kv_indices)
        if full_kv_num_blocks is not None:
            _check_block_values("full_kv", full_kv_num_blocks, full_kv_indices)
        q_block, kv_block = _normalize_block_size(BLOCK_SIZE)
        if seq_lengths is None:
            seq_lengths = (kv_indices.shape[-2] * q_block, kv_indices.shape[-1] * kv_block)

        q_num_blocks = q_indices = full_q_num_blocks = full_q_indices = None
        if compute_q_blocks:
            num_kv_cols = kv_indices.shape[-1]
            partial = _ordered_to_dense(kv_num_blocks, kv_indices, num_kv_cols)
            q_num_blocks, q_indices = _dense_to_ordered(partial.transpose(-2, -1))
            if full_kv_num_blocks is not None:
                full = _ordered_to_dense(full_kv_num_blocks, full_kv_indices, num_kv_cols)
                full_q_num_blocks, full_q_indices = _dense_to_ordered(full.transpose(-2, -1))
        return cls(
            seq_lengths,
            kv_num_blocks,
            kv_indices,
            full_kv_num_blocks,
            full_kv_indices,
            q_num_blocks,
            q_indices,
            full_q_num_blocks,
            full_q_indices,
            BLOCK_SIZE=(q_block, kv_block),
            mask_mod=mask_mod,
        )

    @classmethod
    def _from_block_maps(cls, partial, full, seq_lengths, block_size, mask_mod) -> BlockMask:
        """BlockMask from bool block maps [B, H, nQ, nKV] (``full`` may be None)."""
        kv_num_blocks, kv_indices = _dense_to_ordered(partial)
        q_num_blocks, q_indices = _dense_to_ordered(partial.transpose(-2, -1))
        full_lists = (None, None, None, None)
        if full is not None:
            full_lists = (*_dense_to_ordered(full), *_dense_to_ordered(full.transpose(-2, -1)))
        full_kv_num_blocks, full_kv_indices, full_q_num_blocks, full_q_indices = full_lists
        return cls(
            seq_lengths,
            kv_num_blocks,
            kv_indices,
            full_kv_num_blocks,
            full_kv_indices,
            q_num_blocks,
            q_indices,
            full_q_num_blocks,
            full_q_indices,
            BLOCK_SIZE=block_size,
            mask_mod=mask_mod,
        )

    def as_tuple(self, flatten: bool = True) -> tuple:
        """The 13 fields in the order the attention operators take them; with
        ``flatten=False`` the lengths and the block size stay pairs (11 fields)."""
        if not flatten:
            return (self.seq_lengths, *self.as_tuple()[2:10], self.BLOCK_SIZE, self.mask_mod)
        return (
            *self.seq_lengths,
            self.kv_num_blocks,
            self.kv_indices,
            self.full_kv_num_blocks,
            self.full_kv_indices,
            self.q_num_blocks,
            self.q_indices,
            self.full_q_num_blocks,
            self.full_q_indices,
            *self.BLOCK_SIZE,
            self.mask_mod,
        )

    @classmethod
    def from_tuple(cls, fields: tuple) -> BlockMask:
        """Inverse of ``as_tuple``."""
        if len(fields) != 13:
            raise ValueError(f"BlockMask.from_tuple expects the 13 fields of as_tuple(), got {len(fields)}.")
        q_len, kv_len, *tensors, q_block, kv_block, mask_mod = fields
        return cls((q_len, kv_len), *tensors, BLOCK_SIZE=(q_block, kv_block), mask_mod=mask_mod)

    @property
    def shape(self) -> tuple:
        """(*batch_dims, Q_LEN, KV_LEN), usually (B, H, Q_LEN, KV_LEN)."""
        return (*self.kv_indices.shape[:-2], *self.seq_lengths)

    def numel(self) -> int:
        """Number of positions the mask covers, sparsity not accounted for."""
        return math.prod(self.shape)

    def sparsity(self) -> float:
        """Percentage of blocks skipped (neither partial nor full)."""
        computed = self.kv_num_blocks.sum()
        if self.full_kv_num_blocks is not None:
            computed = computed + self.full_kv_num_blocks.sum()
        total = self.kv_indices.numel()
        return 100.0 * (1.0 - computed.item() / total) if total else 0.0

    def to_dense(self) -> torch.Tensor:
        """Block-level int32 map [..., nQ, nKV]: 1 where a block is partial or full."""
        num_cols = self.kv_indices.shape[-1]
        dense = _ordered_to_dense(self.kv_num_blocks, self.kv_indices, num_cols)
        if self.full_kv_num_blocks is not None:
            dense = dense | _ordered_to_dense(self.full_kv_num_blocks, self.full_kv_indices, num_cols)
        return dense.to(torch.int32)

    def to_string(self, grid_size: int | tuple[int, int] = (20, 20), limit: int = 4) -> str:
        """ASCII picture per (batch, head): '█' full blocks, '░' partial or mixed, ' ' skipped.

        Each character pair summarises a group of blocks so the picture fits ``grid_size``
        (rows, cols); ``grid_size=-1`` draws every block. At most ``limit`` pictures.
        """
        sizes = (grid_size,) if grid_size == -1 or isinstance(grid_size, int) else tuple(grid_size)
        if grid_size != -1 and not (
            len(sizes) in (1, 2) and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes)
        ):
            raise ValueError(
                f"grid_size must be a positive int, a (rows, cols) pair of positive ints or -1 (every "
                f"block), got {grid_size!r}; e.g. to_string(grid_size=(20, 40))."
            )
        computed = self.to_dense()
        full = torch.zeros_like(computed)
        if self.full_kv_num_blocks is not None:
            full = _ordered_to_dense(self.full_kv_num_blocks, self.full_kv_indices, computed.shape[-1])
        *batch_dims, num_rows, num_cols = computed.shape
        if grid_size == -1:
            max_rows, max_cols = num_rows, num_cols
        elif isinstance(grid_size, int):
            max_rows = max_cols = grid_size
        else:
            max_rows, max_cols = grid_size
        row_step = max(1, -(-num_rows // max_rows))
        col_step = max(1, -(-num_cols // max_cols))

        def cell(batch_index, r, c) -> str:
            group = (*batch_index, slice(r, r + row_step), slice(c, c + col_step))
            if bool(full[group].all()):
                return "█"
            return "░" if bool(computed[group].any()) else " "

        pictures = []
        for count, batch_index in enumerate(itertools.product(*(range(n) for n in batch_dims))):
            if count == limit:
                pictures.append(
                    "...\nTo print more, call BlockMask.to_string(limit=N), or index the mask "
                    "(block_mask[b, h]) to pick one batch and head."
                )
                break
            lines = [f"{batch_index}"]
            for r in range(0, num_rows, row_step):
                lines.append("".join(2 * cell(batch_index, r, c) for c in range(0, num_cols, col_step)))
            pictures.append("\n".join(lines) + "\n")
        return "\n".join(pictures)

    def __str__(self) -> str:
        picture = self.to_string().strip()
        return f"BlockMask(shape={self.shape}, sparsity={self.sparsity():.2f}%,\n{picture}\n)"

    def __repr__(self) -> str:
        fields = ",\n".join(
            f"    {name}={None if getattr(self, name) is None else tuple(getattr(self, name).shape)}"
            for name in self.TENSOR_ATTRS
        )
        mask_mod_name = getattr(self.mask_mod, "__name__", repr(self.mask_mod))
        return (
            f"BlockMask(\n{fields},\n    BLOCK_SIZE={self.BLOCK_SIZE},\n    shape={self.shape},\n"
            f"    sparsity={self.sparsity():.2f}%,\n    mask_mod={mask_mod_name}\n)"
        )

    def to(self, device: torch.device | str) -> BlockMask:
        """A copy with every tensor on ``device``."""
        tensors = [None if t is None else t.to(device) for t in self._tensors()]
        return BlockMask(self.seq_lengths, *tensors, BLOCK_SIZE=self.BLOCK_SIZE, mask_mod=self.mask_mod,
                         blocks_follow_mask_mod=self.blocks_follow_mask_mod)

    def __getitem__(self, index) -> BlockMask:
        """Select batches, heads and (third index) query-block rows, like torch's BlockMask.

        An int index keeps its dimension (size 1), as in torch 2.13. Unlike torch, which always
        drops mask_mod, a selection of batches/heads by ints and slices keeps a mask_mod that
        maps the slice's indices back to the original ones, so the slice stays correct. Tensor
        indices and any query-block selection leave a mask_mod that raises and says to
        assign one (query positions are renumbered, only the caller knows the offset).
        """
        index = index if isinstance(index, tuple) else (index,)
        leading_dims = self.kv_num_blocks.dim()
        if len(index) > min(3, leading_dims):
            raise IndexError(
                f"BlockMask indexing takes at most {min(3, leading_dims)} indices "
                f"(batch, head, query block), got {len(index)}."
            )
        index = tuple(_keep_dim(i, n) for i, n in zip(index, self.kv_num_blocks.shape))

        kv_lists = [t if t is None else t[index] for t in self._tensors()[:4]]
        sliced = BlockMask.from_kv_blocks(
            *kv_lists,
            BLOCK_SIZE=self.BLOCK_SIZE,
            seq_lengths=self.seq_lengths,
            compute_q_blocks=self.q_indices is not None,
        )
        sliced.mask_mod = self._sliced_mask_mod(index)
        return sliced

    def _sliced_mask_mod(self, index: tuple) -> Callable:
        batch_head = (*index, slice(None), slice(None))[:2]
        query_index = index[2] if len(index) > 2 else slice(None)
        maps = [_slice_index_map(i, n) for i, n in zip(batch_head, self.kv_num_blocks.shape[:2])]
        if query_index != slice(None) or None in maps or self.kv_num_blocks.dim() < 3:
            return _sliced_mask_mod_unavailable
        if maps == [(0, 1), (0, 1)]:
            return self.mask_mod
        return _reindexed_mask_mod(self.mask_mod, *maps)

    def _adjust(self, new_q_len: int, new_kv_len: int) -> BlockMask:
        """The mask cropped to its upper-left [new_q_len, new_kv_len] corner, or grown inside
        the blocks it has.

        Blocks cut by the new edge keep their classification: a full block stays full (its
        remaining positions are all allowed); a partial one stays partial (conservative). A
        length grown inside a ragged block adds positions that no classification saw: full
        blocks reaching past the old length become partial, so mask_mod decides there.
        """
        q_block, kv_block = self.BLOCK_SIZE
        num_rows, num_cols = self.kv_indices.shape[-2:]
        new_rows, new_cols = -(-new_q_len // q_block), -(-new_kv_len // kv_block)
        if new_rows > num_rows or new_cols > num_cols:
            raise ValueError(
                f"_adjust cannot add blocks: the mask covers {num_rows}×{num_cols} blocks of "
                f"{self.BLOCK_SIZE}, too few for lengths ({new_q_len}, {new_kv_len}); build a "
                "new mask with create_block_mask for the longer sequences."
            )

        def crop(num_blocks, indices):
            if num_blocks is None:
                return None
            return _ordered_to_dense(num_blocks, indices, num_cols)[..., :new_rows, :new_cols]

        partial = crop(self.kv_num_blocks, self.kv_indices)
        full = crop(self.full_kv_num_blocks, self.full_kv_indices)
        old_q_len, old_kv_len = self.seq_lengths
        if full is not None and (new_q_len > old_q_len or new_kv_len > old_kv_len):
            block_ends = torch.arange(1, max(new_rows, new_cols) + 1, device=full.device)
            rows_past = (block_ends[:new_rows] * q_block > old_q_len) & (new_q_len > old_q_len)
            cols_past = (block_ends[:new_cols] * kv_block > old_kv_len) & (new_kv_len > old_kv_len)
            unseen = rows_past[:, None] | cols_past[None, :]
            partial, full = partial | (full & unseen), full & ~unseen
        return BlockMask.from_kv_blocks(
            *_dense_to_ordered(partial),
            *(_dense_to_ordered(full) if full is not None else (None, None)),
            BLOCK_SIZE=self.BLOCK_SIZE,
            mask_mod=self.mask_mod,
            seq_lengths=(new_q_len, new_kv_len),
            compute_q_blocks=self.q_indices is not None,
        )

    def _tensors(self) -> list:
        return [getattr(self, name) for name in self.TENSOR_ATTRS]


# --- pytree registration: leaves are the present tensors, everything else is context. ---


class _MaskModKey:
    """A mask_mod in a pytree context, equal to another one that computes the same thing.

    torch.export checks that a call's inputs have the tree spec they were traced with.
    Comparing mask_mods by identity would reject one recreated per call (a closure built in
    ``forward``, or by slicing). Two functions match when they share code, globals, defaults
    and closure contents; captured tensors must be the very same objects, because a traced
    graph has baked in the tensor it saw.
    """

    __slots__ = ("mask_mod",)

    def __init__(self, mask_mod: Callable) -> None:
        self.mask_mod = mask_mod

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _MaskModKey) and _same_value(self.mask_mod, other.mask_mod, set())

    def __hash__(self) -> int:
        fn = self.mask_mod
        return hash(fn.__code__) if isinstance(fn, types.FunctionType) else hash(type(fn))

    def __repr__(self) -> str:
        return f"mask_mod={getattr(self.mask_mod, '__qualname__', self.mask_mod)!r}"


_EMPTY_CELL = object()


def _cell_contents(fn: types.FunctionType) -> list:
    contents = []
    for cell in fn.__closure__ or ():
        try:
            contents.append(cell.cell_contents)
        except ValueError:  # a cell whose variable is not assigned yet
            contents.append(_EMPTY_CELL)
    return contents


def _same_value(a, b, in_progress: set) -> bool:
    """Whether ``a`` and ``b`` are interchangeable as (parts of) a mask_mod."""
    if a is b:
        return True
    if isinstance(a, types.FunctionType) and isinstance(b, types.FunctionType):
        if (id(a), id(b)) in in_progress:  # a recursive closure, already being compared
            return True
        in_progress.add((id(a), id(b)))
        return (
            a.__code__ == b.__code__
            and a.__globals__ is b.__globals__
            and _same_values(a.__defaults__ or (), b.__defaults__ or (), in_progress)
            and _same_values(_cell_contents(a), _cell_contents(b), in_progress)
        )
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    if isinstance(a, (tuple, list)) and type(a) is type(b):
        return _same_values(a, b, in_progress)
    try:
        return bool(a == b)
    except Exception:  # an == that cannot answer means "not known to be the same"
        return False


def _same_values(a, b, in_progress: set) -> bool:
    return len(a) == len(b) and all(_same_value(x, y, in_progress) for x, y in zip(a, b))


def _flatten_with_keys(mask: BlockMask):
    present = [name for name in BlockMask.TENSOR_ATTRS if getattr(mask, name) is not None]
    missing = tuple(name for name in BlockMask.TENSOR_ATTRS if getattr(mask, name) is None)
    keyed_leaves = [(GetAttrKey(name), getattr(mask, name)) for name in present]
    context = (mask.seq_lengths, mask.BLOCK_SIZE, _MaskModKey(mask.mask_mod), missing, mask.blocks_follow_mask_mod)
    return keyed_leaves, context


def _flatten(mask: BlockMask):
    keyed_leaves, context = _flatten_with_keys(mask)
    return [leaf for _, leaf in keyed_leaves], context


def _unflatten(leaves, context) -> BlockMask:
    seq_lengths, block_size, mask_mod_key, missing, blocks_follow_mask_mod = context
    leaves = iter(leaves)
    tensors = [None if name in missing else next(leaves) for name in BlockMask.TENSOR_ATTRS]
    return BlockMask(seq_lengths, *tensors, BLOCK_SIZE=block_size, mask_mod=mask_mod_key.mask_mod,
                     blocks_follow_mask_mod=blocks_follow_mask_mod)


register_pytree_node(
    BlockMask,
    _flatten,
    _unflatten,
    flatten_with_keys_fn=_flatten_with_keys,
    serialized_type_name="inductor_flex.BlockMask",
)


# --- building masks from mask_mods ---


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _tile_extent(per_block: int, num_rows: int, num_cols: int, budget: int) -> tuple[int, int]:
    """(rows, cols) of blocks per tile so a tile holds at most ``budget`` elements.

    Whole rows of blocks are preferred (one contiguous band); a tile is never smaller than
    one block, whatever the budget.
    """
    blocks = max(1, budget // per_block)
    if blocks >= num_cols:
        return min(num_rows, blocks // num_cols), num_cols
    return 1, blocks


def _any_all_per_block(allowed: torch.Tensor, q_block: int, kv_block: int, eager: bool):
    """Per-block (any, all) of a bool tile [B', H', rows*Q_BLOCK, cols*KV_BLOCK].

    In eager mode, dimensions broadcast by the mask_mod (stride 0) hold equal values, so they
    are first narrowed to size 1: reducing them is free, and the result broadcasts back on
    assignment. (Under compile, strides are not the ones that will run; Inductor fuses anyway.)
    """
    if eager:
        for dim in range(4):
            if allowed.stride(dim) == 0 and allowed.size(dim) > 1:
                allowed = allowed.narrow(dim, 0, 1)
    b, h, q, kv = allowed.shape
    q_block, kv_block = min(q_block, q), min(kv_block, kv)
    blocks = allowed.reshape(b, h, q // q_block, q_block, kv // kv_block, kv_block)
    if eager:
        # Eager CPU reductions of uint8 vectorise, of bool not (~4x); Inductor rejects the view.
        blocks = blocks.view(torch.uint8)
    return blocks.amax(dim=(3, 5)).bool(), blocks.amin(dim=(3, 5)).bool()


def _block_any_all(mask_mod, B, H, Q_LEN, KV_LEN, q_block, kv_block, device):
    """Bool maps [B, H, nQ, nKV]: does each block allow any / all of its in-range positions.

    The mask is evaluated one tile at a time, never as a whole. Indices past Q_LEN/KV_LEN
    are clamped to the last valid one: those padding positions repeat a real position's
    value, which leaves any/all of a ragged block unchanged and keeps mask_mods that index
    tensors by position in bounds.
    """
    num_rows, num_cols = -(-Q_LEN // q_block), -(-KV_LEN // kv_block)
    b = torch.arange(B, device=device)
    h = torch.arange(H, device=device)
    compiling = torch.compiler.is_compiling()
    if compiling:
        budget = COMPILED_TILE_ELEMENTS
    else:
        budget = CPU_TILE_ELEMENTS if device.type == "cpu" else ACCELERATOR_TILE_ELEMENTS
        # A mask_mod that ignores b or h returns a tensor broadcast along it (vmap expands
        # unbatched outputs); evaluate it for one batch/head only. Exact, since broadcasting
        # is structural, not data-dependent.
        probe = evaluate_mask_mod(mask_mod, b, h, b.new_zeros(1), b.new_zeros(1))
        if B > 1 and probe.stride(0) == 0:
            b = b[:1]
        if H > 1 and probe.stride(1) == 0:
            h = h[:1]
    rows, cols = _tile_extent(b.numel() * h.numel() * q_block * kv_block, num_rows, num_cols, budget)

    any_map = torch.empty(B, H, num_rows, num_cols, dtype=torch.bool, device=device)
    all_map = torch.empty_like(any_map)
    for r0 in range(0, num_rows, rows):
        r1 = min(r0 + rows, num_rows)
        q_idx = torch.arange(r0 * q_block, r1 * q_block, device=device).clamp_(max=Q_LEN - 1)
        for c0 in range(0, num_cols, cols):
            c1 = min(c0 + cols, num_cols)
            kv_idx = torch.arange(c0 * kv_block, c1 * kv_block, device=device).clamp_(max=KV_LEN - 1)
            allowed = evaluate_mask_mod(mask_mod, b, h, q_idx, kv_idx)
            tile_any, tile_all = _any_all_per_block(allowed, q_block, kv_block, not compiling)
            any_map[:, :, r0:r1, c0:c1] = tile_any
            all_map[:, :, r0:r1, c0:c1] = tile_all
    return any_map, all_map


def create_block_mask(
    mask_mod: Callable,
    B: int | None,
    H: int | None,
    Q_LEN: int,
    KV_LEN: int,
    device: torch.device | str | None = None,
    BLOCK_SIZE: int | tuple[int, int] = DEFAULT_BLOCK_SIZE,
    _compile: bool = False,
    separate_full_blocks: bool = True,
    compute_dq_write_order: bool = False,
    dq_kv_order: bool = True,
) -> BlockMask:
    """BlockMask of ``mask_mod(b, h, q_idx, kv_idx)`` over [B, H, Q_LEN, KV_LEN].

    Same signature as torch's. The dense mask is never built: mask_mod is evaluated a tile
    at a time (a few Mi positions) and each tile reduced to per-block any/all bits, so
    memory stays O(blocks) and 128k × 128k masks build on a CPU. Under ``torch.compile``
    the loop unrolls, so far fewer, larger tiles are used (Inductor fuses them away). No
    step waits on the device. To rebuild a mask every training step on a GPU, compile it:
    ``torch.compile(create_block_mask)`` (eager mode pays host-side vmap dispatch per tile).

    ``B``/``H`` None mean 1 (broadcast over batches/heads). ``device`` None means CUDA when
    available, else CPU. ``separate_full_blocks=False`` lists every non-empty block as
    partial. ``_compile`` is deprecated and ignored (wrap the call in torch.compile instead).
    ``dq_kv_order`` is accepted for compatibility and unused.
    """
    check_mod_arity(mask_mod, MASK_MOD_ARITY, "mask_mod")
    B = 1 if B is None else B
    H = 1 if H is None else H
    for name, value in (("B", B), ("H", H), ("Q_LEN", Q_LEN), ("KV_LEN", KV_LEN)):
        _check_positive_int(name, value)
    q_block, kv_block = _normalize_block_size(BLOCK_SIZE)
    if compute_dq_write_order:
        raise ValueError(
            "compute_dq_write_order=True is not supported: inductor_flex's deterministic "
            "backward needs no dQ write-order metadata; drop the argument."
        )
    if not isinstance(dq_kv_order, bool):
        raise ValueError(
            f"dq_kv_order must be a bool, got {type(dq_kv_order).__name__}; pass True or False (it is unused)."
        )
    if _compile:
        warnings.warn(
            "create_block_mask(_compile=True) is deprecated and ignored; to compile mask "
            "creation, call torch.compile(create_block_mask)(...) instead.",
            DeprecationWarning,
            stacklevel=2,
        )
    device = _as_device(device)

    any_map, all_map = _block_any_all(mask_mod, B, H, Q_LEN, KV_LEN, q_block, kv_block, device)
    if separate_full_blocks:
        partial, full = any_map & ~all_map, all_map
    else:
        partial, full = any_map, None
    mask = BlockMask._from_block_maps(partial, full, (Q_LEN, KV_LEN), (q_block, kv_block), mask_mod)
    # A mask of one batch (head) was classified at b = 0 (h = 0) only: the blocks follow the
    # mask_mod everywhere only if its answer does not depend on b (h).
    reads_batch, reads_head = _reads_batch_and_head(mask_mod)
    mask.blocks_follow_mask_mod = (B > 1 or not reads_batch) and (H > 1 or not reads_head)
    return mask


# Tensor methods that read only their tensor's dtype and device (``b.new_ones(())`` in and_masks).
_VALUE_FREE_METHODS = frozenset({"new_ones", "new_zeros", "new_full", "new_empty"})


def _reads_batch_and_head(mask_mod: Callable) -> tuple[bool, bool]:
    """Whether mask_mod's answer may depend on its b and on its h argument, from a symbolic
    trace; True for both when that cannot be told (control flow on values, under Dynamo)."""
    if torch.compiler.is_dynamo_compiling():
        return True, True
    try:
        graph = torch.fx.symbolic_trace(mask_mod).graph
    except Exception:  # any mask_mod fx cannot trace is simply not inspected
        return True, True
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    if len(placeholders) != MASK_MOD_ARITY:
        return True, True

    def reads(argument):
        return any(not (user.op == "call_method" and user.target in _VALUE_FREE_METHODS and user.args[0] is argument)
                   for user in argument.users)

    return reads(placeholders[0]), reads(placeholders[1])


def full_block_mask(
    q_len: int, kv_len: int, device, B: int = 1, H: int = 1, block_size=DEFAULT_BLOCK_SIZE
) -> BlockMask:
    """What ``block_mask=None`` means: every block listed once, with the noop mask_mod.

    The blocks are listed as partial, not full, so kernels walk a single block list (one loop
    instead of an empty partial loop followed by a full one); the noop mask costs nothing once
    inlined. O(number of blocks).
    """
    q_block, kv_block = _normalize_block_size(block_size)
    num_rows, num_cols = -(-q_len // q_block), -(-kv_len // kv_block)

    def every_block(rows: int, cols: int):
        num_blocks = torch.full((B, H, rows), cols, dtype=torch.int32, device=device)
        indices = torch.arange(cols, dtype=torch.int32, device=device).expand(B, H, rows, cols).contiguous()
        return num_blocks, indices

    return BlockMask(
        (q_len, kv_len),
        *every_block(num_rows, num_cols),
        None,
        None,
        *every_block(num_cols, num_rows),
        None,
        None,
        BLOCK_SIZE=(q_block, kv_block),
        mask_mod=noop_mask,
    )


def create_mask(
    mod_fn: Callable,
    B: int | None,
    H: int | None,
    Q_LEN: int,
    KV_LEN: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Dense bool mask [B, H, Q_LEN, KV_LEN] of a mask_mod, or of a score_mod (like torch).

    For a score_mod the mask is where the modified score of a zero input is not -inf.
    Materialises the whole mask: meant for tests and small sizes.
    """
    is_score_mod = callable(mod_fn) and positional_arity(mod_fn) == SCORE_MOD_ARITY
    if not is_score_mod:
        check_mod_arity(mod_fn, MASK_MOD_ARITY, "mask_mod")
    B = 1 if B is None else B
    H = 1 if H is None else H
    for name, value in (("B", B), ("H", H), ("Q_LEN", Q_LEN), ("KV_LEN", KV_LEN)):
        _check_positive_int(name, value)
    device = _as_device(device)
    b, h = torch.arange(B, device=device), torch.arange(H, device=device)
    q_idx, kv_idx = torch.arange(Q_LEN, device=device), torch.arange(KV_LEN, device=device)
    if is_score_mod:
        scores = torch.zeros(B, H, Q_LEN, KV_LEN, device=device)
        return ~torch.isneginf(evaluate_score_mod(mod_fn, scores, b, h, q_idx, kv_idx))
    return evaluate_mask_mod(mod_fn, b, h, q_idx, kv_idx)
