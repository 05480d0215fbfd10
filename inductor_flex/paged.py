"""Paged KV cache: fixed-size pages shared by every sequence, attended through the page table.

Layout
------
Each layer stores its keys and values in one tensor, ``[1, Hkv, (n_pages + 1) * page_size,
D]``: page ``p`` holds rows ``[p * page_size, (p + 1) * page_size)``. Batch 1 broadcasts over
the queries' batch in ``flex_attention``. The extra last page is the *sink*: no sequence owns
it, writes that do not fit a sequence's reserved capacity land there, and no mask lists it.

Sequence slot ``s`` owns the pages ``page_table[s, 0 : capacity[s] // page_size]``, in logical
order: its token ``t`` is row ``page_table[s, t // page_size] * page_size + t % page_size``.

Attention reads pages through the page table inside the kernel, with no gather of K/V: a
*physical* ``BlockMask`` has ``KV_BLOCK_SIZE = page_size`` and lists, for every query-block
row, the physical page ids ``page_table[slot, logical_block]`` of the logical blocks to visit.
Kernels already walk a mask's block lists, so a page is one sparse KV block. Its mask_mod and
the score_mod wrapper translate a physical position back to the logical one
(``page_logical[page] * page_size + offset``), so user mods see logical positions; the
mask_mod also masks pages the sequence does not own and positions at or past its length.

Host and device
---------------
Page allocation (``reserve``, ``erase``) is host bookkeeping: a free-page list and each slot's
pages as Python ints, mirrored to the device with non-blocking copies, so it never waits on
the device. Everything on the token path (``append``, ``extend``, ``write``, building physical
masks) is device-side index math: no ``.item()``, ``.tolist()``, boolean indexing or other
host sync, so it can run inside CUDA graphs and ``torch.compile(fullgraph=True)``.

Capacity is reserved ahead (``reserve``): appending past a slot's capacity never touches
other sequences' pages. The tokens that do not fit are written to the sink page, the length
stops at the capacity, and ``dropped_tokens[slot]`` counts them; ``check_no_dropped_tokens()``
raises if any were (it reads the device, so call it where a sync is acceptable).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from .api import flex_attention
from .block_mask import DEFAULT_BLOCK_SIZE, BlockMask, _as_device, _dense_to_ordered, _ordered_to_dense, noop_mask
from .block_regroup import KV_POSITIONS_ARE_PAGES
from .mods import MASK_MOD_ARITY, SCORE_MOD_ARITY, check_mod_arity

__all__ = ["PagedKVCache"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}; pass an int >= 1.")


class PagedKVCache:
    """A pool of ``n_pages`` pages of ``page_size`` tokens, shared by up to ``max_batch_size``
    sequences, with K/V storage for ``num_layers`` layers (see the module docstring).

    Args:
        n_pages: pages in the pool (one more, the sink, is allocated beside them).
        page_size: tokens per page; any positive int (16, 48, 100, 128, ...).
        max_batch_size: number of sequence slots; a slot is an index in ``[0, max_batch_size)``.
        num_kv_heads, head_dim: the K storage is ``[1, num_kv_heads, physical_len, head_dim]``.
        v_head_dim: head dim of V (default ``head_dim``).
        num_layers: K/V storage tensors kept, ``keys[layer]`` and ``values[layer]``.
        dtype, device: of the storage and of the device-side page table.
        max_pages_per_sequence: longest sequence in pages (default ``n_pages``). Physical block
            masks have this many columns, so a bound close to the real longest sequence keeps
            per-step mask building small.

    Attributes (device tensors, read-only for the user):
        page_table: ``[max_batch_size, max_pages_per_sequence]`` int32, physical page of each
            logical block of each slot, -1 where none is reserved.
        lengths: ``[max_batch_size]`` int32, tokens appended to each slot.
        capacity: ``[max_batch_size]`` int32, tokens each slot's reserved pages hold.
        dropped_tokens: ``[max_batch_size]`` int32, tokens appended past the capacity (lost).
        page_owner / page_logical: ``[n_pages + 1]`` int32, owning slot and logical block of
            each physical page, -1 for free pages and the sink.
    """

    def __init__(
        self,
        n_pages: int,
        page_size: int,
        max_batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        v_head_dim: int | None = None,
        num_layers: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        max_pages_per_sequence: int | None = None,
    ) -> None:
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        max_pages_per_sequence = n_pages if max_pages_per_sequence is None else max_pages_per_sequence
        for name, value in (("n_pages", n_pages), ("page_size", page_size), ("max_batch_size", max_batch_size),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim), ("v_head_dim", v_head_dim),
                            ("num_layers", num_layers), ("max_pages_per_sequence", max_pages_per_sequence)):
            _check_positive_int(name, value)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}; e.g. dtype=torch.bfloat16.")
        device = _as_device(device)
        # The device as tensors report it ("cuda:0", not "cuda"), so device checks compare equal.
        device = torch.empty(0, device=device).device

        self.n_pages = n_pages
        self.page_size = page_size
        self.max_batch_size = max_batch_size
        self.max_pages_per_sequence = max_pages_per_sequence
        self.num_kv_heads = num_kv_heads
        self.device = device
        self.dtype = dtype
        self.sink_page = n_pages
        self.physical_len = (n_pages + 1) * page_size

        def int32_full(*shape, value):
            return torch.full(shape, value, dtype=torch.int32, device=device)

        self.page_table = int32_full(max_batch_size, max_pages_per_sequence, value=-1)
        self.lengths = int32_full(max_batch_size, value=0)
        self.capacity = int32_full(max_batch_size, value=0)
        self.dropped_tokens = int32_full(max_batch_size, value=0)
        self.page_owner = int32_full(n_pages + 1, value=-1)
        self.page_logical = int32_full(n_pages + 1, value=-1)
        # Zeros, not empty: a kernel multiplies masked positions' values by a probability of 0,
        # and uninitialised memory may hold NaN bit patterns (0 · NaN = NaN).
        self.keys = [torch.zeros(1, num_kv_heads, self.physical_len, head_dim, dtype=dtype, device=device)
                     for _ in range(num_layers)]
        self.values = [torch.zeros(1, num_kv_heads, self.physical_len, v_head_dim, dtype=dtype, device=device)
                       for _ in range(num_layers)]

        # Host bookkeeping: free pages (taken from the end) and each slot's pages in logical order.
        self._free_pages = list(range(n_pages - 1, -1, -1))
        self._slot_pages: list[list[int]] = [[] for _ in range(max_batch_size)]

    # --- host side: allocation -------------------------------------------------------------

    @property
    def num_free_pages(self) -> int:
        return len(self._free_pages)

    def reserved_tokens(self, batch_idx: int) -> int:
        """Tokens slot ``batch_idx`` can hold (host-side, no sync)."""
        return len(self._slot_pages[self._check_slot(batch_idx)]) * self.page_size

    def shuffle_free_pages(self, seed: int | None = None) -> None:
        """Hand out free pages in random order (e.g. to benchmark a fragmented pool)."""
        random.Random(seed).shuffle(self._free_pages)

    def reserve(self, batch_idx: int, num_tokens: int) -> None:
        """Make slot ``batch_idx`` able to hold at least ``num_tokens`` tokens in total.

        Allocates whole pages from the free list; never shrinks. Host-side: no device sync.
        Reserve ahead of appending (e.g. prompt length + the most tokens to generate).
        """
        slot = self._check_slot(batch_idx)
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
            raise ValueError(f"num_tokens must be a non-negative int, got {num_tokens!r}.")
        owned = self._slot_pages[slot]
        wanted = _cdiv(num_tokens, self.page_size)
        if wanted > self.max_pages_per_sequence:
            raise ValueError(
                f"reserving {num_tokens} tokens needs {wanted} pages, more than "
                f"max_pages_per_sequence={self.max_pages_per_sequence}; make the cache with a larger "
                "max_pages_per_sequence (or a larger page_size)."
            )
        new_count = wanted - len(owned)
        if new_count <= 0:
            return
        if new_count > len(self._free_pages):
            raise RuntimeError(
                f"out of pages: slot {slot} needs {new_count} more pages but only "
                f"{len(self._free_pages)} are free; erase() finished sequences or make the cache "
                "with a larger n_pages."
            )
        new_pages = [self._free_pages.pop() for _ in range(new_count)]
        first_block = len(owned)
        owned.extend(new_pages)
        pages = self._upload(new_pages)
        logical_blocks = torch.arange(first_block, first_block + new_count, dtype=torch.int32, device=self.device)
        self.page_table[slot, first_block:first_block + new_count] = pages
        self.page_owner.index_fill_(0, pages.long(), slot)
        self.page_logical.index_copy_(0, pages.long(), logical_blocks)
        # fill_ of a view takes the value as a kernel argument; `t[i] = n` copies a host scalar,
        # which CUDA's sync-debug mode reports as a synchronizing copy.
        self.capacity[slot].fill_(len(owned) * self.page_size)

    def erase(self, batch_idx: int) -> None:
        """Free slot ``batch_idx``: its pages return to the pool, its length becomes 0."""
        slot = self._check_slot(batch_idx)
        pages = self._slot_pages[slot]
        if pages:
            uploaded = self._upload(pages).long()
            self.page_owner.index_fill_(0, uploaded, -1)
            self.page_logical.index_fill_(0, uploaded, -1)
            # Reversed, so the next reserve takes them back in the same order.
            self._free_pages.extend(reversed(pages))
        self._slot_pages[slot] = []
        for table, value in ((self.page_table, -1), (self.lengths, 0), (self.capacity, 0), (self.dropped_tokens, 0)):
            table[slot].fill_(value)

    def _upload(self, pages: list[int]) -> torch.Tensor:
        """Host page ids as a device int32 tensor, without waiting on the device."""
        host = torch.tensor(pages, dtype=torch.int32)
        if self.device.type == "cuda":
            return host.pin_memory().to(self.device, non_blocking=True)
        return host.to(self.device)

    def _check_slot(self, batch_idx) -> int:
        if isinstance(batch_idx, bool) or not isinstance(batch_idx, int):
            raise TypeError(
                f"batch_idx must be a Python int (a slot) for reserve/erase, got {type(batch_idx).__name__}; "
                "allocation is host bookkeeping and reading a device tensor would wait on the device."
            )
        if not 0 <= batch_idx < self.max_batch_size:
            raise ValueError(f"batch_idx {batch_idx} is outside [0, max_batch_size={self.max_batch_size}).")
        return batch_idx

    def _check_layer(self, layer) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(self.keys):
            raise ValueError(f"layer must be an int in [0, num_layers={len(self.keys)}), got {layer!r}.")

    def check_no_dropped_tokens(self) -> None:
        """Raise if any append went past a slot's reserved capacity. Reads the device (syncs)."""
        dropped = self.dropped_tokens.cpu()
        if bool(dropped.any()):
            slots = [i for i, n in enumerate(dropped.tolist()) if n]
            raise RuntimeError(
                f"tokens were appended past the reserved capacity of slots {slots} "
                f"({[int(dropped[s]) for s in slots]} tokens dropped); reserve() enough before appending."
            )

    # --- device side: the token path (no host sync) ------------------------------------------

    def _slots(self, batch_idx, default_count: int) -> torch.Tensor:
        """``batch_idx`` validated from its metadata only, as int64 slots; arange if None."""
        if batch_idx is None:
            return torch.arange(default_count, device=self.device)
        if not isinstance(batch_idx, torch.Tensor):
            raise TypeError(
                f"batch_idx must be a 1-D integer tensor of slots on {self.device}, got "
                f"{type(batch_idx).__name__}; e.g. torch.tensor([0, 3], device={str(self.device)!r})."
            )
        if batch_idx.dim() != 1 or batch_idx.is_floating_point() or batch_idx.dtype == torch.bool:
            raise ValueError(
                f"batch_idx must be a 1-D integer tensor of slots, got shape {tuple(batch_idx.shape)} "
                f"and dtype {batch_idx.dtype}."
            )
        if batch_idx.device != self.device:
            raise ValueError(f"batch_idx is on {batch_idx.device}, the cache on {self.device}; use batch_idx.to({str(self.device)!r}).")
        return batch_idx.long()

    def extend(self, batch_idx: torch.Tensor, num_tokens: int, num_new: torch.Tensor | None = None) -> torch.Tensor:
        """Advance the lengths of slots ``batch_idx`` and return where the new tokens go.

        Slot ``batch_idx[i]`` grows by ``num_new[i]`` tokens (default ``num_tokens``, at most
        ``num_tokens``), capped at its capacity. Returns the physical rows ``[N, num_tokens]``
        (int64) to pass to :meth:`write` for every layer; rows of tokens not kept (past
        ``num_new`` or past the capacity) point into the sink page. Slots must be distinct.
        No host sync.
        """
        slots = self._slots(batch_idx, 0)
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
            raise ValueError(f"num_tokens must be a non-negative int, got {num_tokens!r}.")
        start = self.lengths[slots].long()
        step = torch.arange(num_tokens, device=self.device)
        position = start.unsqueeze(1) + step  # [N, T], logical positions of the new tokens
        wanted = step < num_tokens
        if num_new is not None:
            if not isinstance(num_new, torch.Tensor) or num_new.shape != slots.shape or num_new.device != self.device:
                raise ValueError(
                    f"num_new must be an integer tensor of shape {tuple(slots.shape)} on {self.device} "
                    "(tokens to keep per slot), or None."
                )
            wanted = step < num_new.long().unsqueeze(1)
        fits = position < self.capacity[slots].long().unsqueeze(1)
        kept = wanted & fits
        block = torch.clamp(position // self.page_size, max=self.max_pages_per_sequence - 1)
        offset = position % self.page_size
        page = self.page_table[slots.unsqueeze(1), block].long()
        page = torch.where(kept, page, self.sink_page)
        self.lengths.index_put_((slots,), (start + kept.sum(1)).to(torch.int32))
        lost = (wanted & ~fits).sum(1).to(torch.int32)
        self.dropped_tokens.index_put_((slots,), self.dropped_tokens[slots] + lost)
        return page * self.page_size + offset

    def write(self, rows: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, layer: int = 0) -> None:
        """Store ``k_new``/``v_new`` ``[N, Hkv, T, D]`` at the rows :meth:`extend` returned. No sync."""
        self._check_layer(layer)
        key_store, value_store = self.keys[layer], self.values[layer]
        for name, new, store in (("k_new", k_new, key_store), ("v_new", v_new, value_store)):
            if not isinstance(new, torch.Tensor) or new.dim() != 4:
                raise ValueError(f"{name} must be a 4-D tensor [N, Hkv, T, D].")
            expected = (rows.size(0), store.size(1), rows.size(1), store.size(3))
            if tuple(new.shape) != expected:
                raise ValueError(
                    f"{name} has shape {tuple(new.shape)}, expected {expected} "
                    "([len(batch_idx), num_kv_heads, num_tokens, head_dim])."
                )
            if new.dtype != store.dtype or new.device != store.device:
                raise TypeError(
                    f"{name} is {new.dtype} on {new.device}, the cache stores {store.dtype} on "
                    f"{store.device}; convert with {name}.to({store.dtype}, {str(store.device)!r})."
                )
            if new.requires_grad:
                raise ValueError(
                    f"{name} requires grad; the cache stores values for inference and gradients do "
                    f"not flow into it: pass {name}.detach()."
                )
        flat_rows = rows.reshape(-1)
        for new, store in ((k_new, key_store), (v_new, value_store)):
            heads, dim = new.size(1), new.size(3)
            store[0].index_copy_(1, flat_rows, new.transpose(0, 1).reshape(heads, -1, dim))

    def append(self, batch_idx: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
               num_new: torch.Tensor | None = None) -> torch.Tensor:
        """Append ``k_new``/``v_new`` ``[N, Hkv, T, D]`` to slots ``batch_idx`` ([N], distinct)
        and advance their lengths: :meth:`extend` then :meth:`write` to layer 0. No host sync.

        A decode step is ``T = 1``. ``num_new`` ([N], optional) keeps only the first
        ``num_new[i]`` tokens of row ``i`` (padded batches). With several layers, call
        ``rows = extend(...)`` once a step and ``write(rows, k, v, layer)`` per layer.
        """
        if len(self.keys) != 1:
            raise ValueError(
                f"append() writes one layer but this cache has {len(self.keys)}; call "
                "rows = cache.extend(batch_idx, num_tokens) once, then cache.write(rows, k, v, layer) per layer."
            )
        if not isinstance(k_new, torch.Tensor) or k_new.dim() != 4:
            raise ValueError("k_new must be a 4-D tensor [N, Hkv, T, D].")
        rows = self.extend(batch_idx, k_new.size(2), num_new)
        self.write(rows, k_new, v_new, layer=0)
        return rows

    # --- attention: physical block masks and mods ------------------------------------------------

    def convert_logical_block_mask(self, block_mask: BlockMask, batch_idx: torch.Tensor | None = None) -> BlockMask:
        """The physical BlockMask of a logical one, for attention over this cache's storage.

        ``block_mask`` is made over the logical K/V of the sequences, ``[B, H, Q_LEN, KV_LEN]``
        with ``KV_BLOCK_SIZE = page_size`` (any Q block size, kept) and ``KV_LEN`` at most
        ``max_pages_per_sequence * page_size``. Batch ``b`` of it is slot ``batch_idx[b]``
        (default ``b``); a mask of batch 1 is used for every slot of ``batch_idx``.

        Blocks listed are mapped through the page table; blocks at or past a sequence's
        length (as it is now) are dropped, and full blocks reaching past it become partial,
        so the result alone masks everything the sequence does not hold. The mask_mod sees
        logical positions. O(B · H · rows · n_pages) device work (physical block rows are as
        wide as the pool), no host sync. A physical mask describes the cache when it was
        made: make a new one after append or erase.
        """
        if not isinstance(block_mask, BlockMask):
            raise TypeError(f"block_mask must be an inductor_flex.BlockMask, got {type(block_mask).__name__}.")
        q_block, kv_block = block_mask.BLOCK_SIZE
        q_len, kv_len = block_mask.seq_lengths
        if kv_block != self.page_size:
            raise ValueError(
                f"the logical block mask has KV_BLOCK_SIZE={kv_block} but the pages hold {self.page_size} "
                f"tokens; create it with BLOCK_SIZE=({q_block}, {self.page_size})."
            )
        if kv_len > self.max_pages_per_sequence * self.page_size:
            raise ValueError(
                f"the logical block mask has KV_LEN={kv_len}, longer than a sequence of this cache can be "
                f"({self.max_pages_per_sequence} pages of {self.page_size}); make the cache with a larger "
                "max_pages_per_sequence, or the mask for a shorter KV_LEN."
            )
        if block_mask.kv_indices.dim() != 4:
            raise ValueError(f"the logical block mask must have 4-D kv_indices [B, H, rows, blocks], got {tuple(block_mask.kv_indices.shape)}; make it with create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN).")
        if block_mask.kv_indices.device != self.device:
            raise ValueError(f"the logical block mask is on {block_mask.kv_indices.device}, the cache on {self.device}; use block_mask.to({str(self.device)!r}).")
        mask_batch, heads, rows, blocks = block_mask.kv_indices.shape
        slots = self._slots(batch_idx, mask_batch)
        count = slots.size(0)
        if mask_batch not in (1, count):
            raise ValueError(
                f"the logical block mask has batch {mask_batch} but batch_idx lists {count} slots; "
                "give one mask batch per slot (or a batch of 1, used for all)."
            )
        shape = (count, heads, rows, blocks)
        partial = _ordered_to_dense(block_mask.kv_num_blocks, block_mask.kv_indices, blocks).expand(shape)
        full = None
        if block_mask.full_kv_num_blocks is not None:
            full = _ordered_to_dense(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, blocks).expand(shape)
        limit = torch.clamp(self.lengths[slots], max=kv_len)
        reaches, whole = self._blocks_within(limit, blocks)
        if full is not None:
            partial = partial | (full & ~whole)
            full = full & whole
        partial = partial & reaches
        return self._physical_block_mask(partial, full, slots, limit, q_len, q_block, block_mask.mask_mod)

    def decode_block_mask(self, batch_idx: torch.Tensor | None = None, q_len: int = 1,
                          mask_mod: Callable | None = None, q_block_size: int = DEFAULT_BLOCK_SIZE) -> BlockMask:
        """Physical BlockMask where query ``b`` sees every token slot ``batch_idx[b]`` holds.

        The decode step's mask, made without any logical mask: with ``mask_mod`` None, the
        pages a sequence fills are full blocks and its last, partly filled page is partial. A
        ``mask_mod`` (logical positions) is applied to every page; for a block-sparse mask
        (e.g. a sliding window) convert a logical one instead, so pages are skipped.
        ``batch_idx`` defaults to every slot. O(B · (max_pages_per_sequence + n_pages))
        device work, fixed shapes (no recompile as sequences grow), no host sync.
        """
        _check_positive_int("q_len", q_len)
        _check_positive_int("q_block_size", q_block_size)
        if mask_mod is not None:
            check_mod_arity(mask_mod, MASK_MOD_ARITY, "mask_mod")
        slots = self._slots(batch_idx, self.max_batch_size)
        limit = self.lengths[slots]
        rows = _cdiv(q_len, q_block_size)
        # Every row lists the same pages, a prefix of the slot's page table (in logical order),
        # so the lists are built directly: no compaction, a handful of kernels a step.
        table = self.page_table[slots]
        if mask_mod is None:
            full_count = limit // self.page_size
            last_page = torch.gather(table, 1, torch.clamp(full_count, max=self.max_pages_per_sequence - 1).long().unsqueeze(1))
            partial_count = (limit % self.page_size != 0).to(torch.int32)
            full = self._decode_lists(table, full_count, rows)
            partial = self._decode_lists(last_page, partial_count, rows)
        else:
            partial = self._decode_lists(table, (limit + self.page_size - 1) // self.page_size, rows)
            full = (None, None, None, None)
        kv_num, kv_pages, q_num, q_rows = partial
        full_num, full_pages, full_q_num, full_q_rows = full
        return BlockMask(
            (q_len, self.physical_len),
            kv_num, kv_pages, full_num, full_pages, q_num, q_rows, full_q_num, full_q_rows,
            BLOCK_SIZE=(q_block_size, self.page_size),
            mask_mod=self._physical_mask_mod(mask_mod or noop_mask, slots, limit),
        )

    def get_mask_mod(self, mask_mod: Callable | None = None, batch_idx: torch.Tensor | None = None) -> Callable:
        """mask_mod over physical positions, for query batch ``b`` = slot ``batch_idx[b]``.

        Calls ``mask_mod`` (logical positions; None allows all) and masks positions of pages
        the slot does not own and positions at or past its length when this is called.
        The masks of :meth:`convert_logical_block_mask` carry one already.
        """
        if mask_mod is not None:
            check_mod_arity(mask_mod, MASK_MOD_ARITY, "mask_mod")
        slots = self._slots(batch_idx, self.max_batch_size)
        return self._physical_mask_mod(mask_mod or noop_mask, slots, self.lengths[slots])

    def get_score_mod(self, score_mod: Callable | None = None) -> Callable:
        """score_mod over physical positions: ``score_mod`` called with the logical kv_idx.

        Pass it to ``flex_attention`` with a physical block mask (which does the masking).
        Kernels evaluate score_mod on whole tiles, masked positions included; those are
        given an in-range kv_idx (positions past the owning sequence's length its last
        token, pages no sequence owns 0), so a score_mod indexing a tensor by kv_idx never
        reads out of bounds. ``b``, ``h``, ``q_idx`` pass unchanged. None gives the identity.
        """
        if score_mod is None:
            return lambda score, b, h, q_idx, kv_idx: score
        check_mod_arity(score_mod, SCORE_MOD_ARITY, "score_mod")
        page_size, page_logical, page_owner, lengths = self.page_size, self.page_logical, self.page_owner, self.lengths

        def paged_score_mod(score, b, h, q_idx, kv_idx):
            page = kv_idx // page_size
            logical = page_logical[page] * page_size + (kv_idx - page * page_size)
            # The owner's length (a free page's owner -1 reads slot 0's, then clamps to 0).
            held = lengths[torch.clamp(page_owner[page], min=0)]
            logical = torch.clamp(torch.minimum(logical, held - 1), min=0)
            return score_mod(score, b, h, q_idx, logical)

        paged_score_mod.__name__ = f"paged_{getattr(score_mod, '__name__', 'score_mod')}"
        return paged_score_mod

    def attention(self, query: torch.Tensor, block_mask: BlockMask, score_mod: Callable | None = None,
                  layer: int = 0, **kwargs):
        """``flex_attention`` of ``query`` over layer ``layer`` of the cache.

        ``block_mask`` must be physical (:meth:`convert_logical_block_mask`,
        :meth:`decode_block_mask`); ``score_mod`` sees logical positions. GQA is enabled when
        the head counts differ; other keyword arguments go to ``flex_attention``.
        """
        if not isinstance(block_mask, BlockMask) or block_mask.seq_lengths[1] != self.physical_len:
            raise ValueError(
                "block_mask must be a physical block mask of this cache (from convert_logical_block_mask "
                "or decode_block_mask): attention over the page pool without one would mix sequences."
            )
        if block_mask.kv_num_blocks.size(0) != query.size(0):
            raise ValueError(
                f"the physical block mask covers {block_mask.kv_num_blocks.size(0)} sequences but the query "
                f"batch is {query.size(0)}; a physical mask cannot broadcast over sequences: make it with "
                "one slot per query (batch_idx with one entry per query batch)."
            )
        self._check_layer(layer)
        kwargs.setdefault("enable_gqa", query.size(1) != self.num_kv_heads)
        return flex_attention(query, self.keys[layer], self.values[layer],
                              score_mod=self.get_score_mod(score_mod), block_mask=block_mask, **kwargs)

    # --- helpers ------------------------------------------------------------------------------

    def _blocks_within(self, limit: torch.Tensor, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bool [N, 1, 1, blocks]: block holds some / only positions below ``limit[n]``."""
        start = torch.arange(blocks, device=self.device) * self.page_size
        limit = limit.long().view(-1, 1, 1, 1)
        return start < limit, start + self.page_size <= limit

    def _decode_lists(self, pages: torch.Tensor, count: torch.Tensor, rows: int) -> tuple:
        """Block lists (kv num, kv indices, q num, q indices) of ``rows`` query-block rows that
        all list the first ``count[n]`` entries of ``pages[n]`` ([N, width] page ids)."""
        n, width = pages.shape
        num_physical = self.n_pages + 1
        listed = torch.arange(width, device=self.device) < count.unsqueeze(1)
        kv_pages = torch.cat([torch.where(listed, pages, self.sink_page),
                              pages.new_full((n, num_physical - width), self.sink_page)], dim=1)
        kv_pages = kv_pages.to(torch.int32).view(n, 1, 1, num_physical).expand(n, 1, rows, num_physical)
        kv_num = count.to(torch.int32).view(n, 1, 1).expand(n, 1, rows)
        # Transposed: a listed page is seen by every row, the others by none.
        seen = torch.zeros(n, num_physical + 1, dtype=torch.int32, device=self.device)
        seen.scatter_(1, torch.where(listed, pages, num_physical).long(), rows)
        q_num = seen[:, :num_physical].view(n, 1, num_physical)
        q_rows = torch.arange(rows, dtype=torch.int32, device=self.device).expand(n, 1, num_physical, rows)
        return kv_num.contiguous(), kv_pages.contiguous(), q_num.contiguous(), q_rows.contiguous()

    def _physical_block_mask(self, partial, full, slots, limit, q_len, q_block, mask_mod) -> BlockMask:
        """BlockMask over the storage from logical block maps [N, H, rows, blocks]."""
        count, heads, rows, blocks = partial.shape
        table = self.page_table[slots, :blocks].view(count, 1, 1, blocks).expand(count, heads, rows, blocks)
        num_physical = self.n_pages + 1

        def kv_lists(dense):
            num, order = _dense_to_ordered(dense)
            pages = torch.gather(table, -1, order.long())
            pages = torch.where(pages >= 0, pages, self.sink_page)
            # Rows are as wide as there are physical blocks (what consumers of a BlockMask
            # assume); entries past the listed ones hold the sink page, a valid block id.
            padding = pages.new_full((count, heads, rows, num_physical - blocks), self.sink_page)
            return num, torch.cat([pages, padding], dim=-1).to(torch.int32)

        def q_lists(num, pages):
            physical = _ordered_to_dense(num, pages, num_physical)  # [N, H, rows, pages]
            if rows == 1:  # one row: a page is listed in it or not; no ordering to compute
                q_num = physical[:, :, 0].to(torch.int32)
                return q_num, torch.zeros(count, heads, num_physical, 1, dtype=torch.int32, device=self.device)
            return _dense_to_ordered(physical.transpose(-1, -2))

        kv_num, kv_pages = kv_lists(partial)
        lists = [kv_num, kv_pages, None, None]
        q_side = [*q_lists(kv_num, kv_pages), None, None]
        if full is not None:
            full_num, full_pages = kv_lists(full)
            lists[2:] = [full_num, full_pages]
            q_side[2:] = q_lists(full_num, full_pages)
        return BlockMask(
            (q_len, self.physical_len),
            *lists,
            *q_side,
            BLOCK_SIZE=(q_block, self.page_size),
            mask_mod=self._physical_mask_mod(mask_mod, slots, limit),
        )

    def _physical_mask_mod(self, mask_mod: Callable, slots: torch.Tensor, limit: torch.Tensor) -> Callable:
        """``mask_mod`` over physical positions for query batch b = slot ``slots[b]``, allowing
        only the slot's own pages below ``limit[b]`` (its length, or the logical KV_LEN)."""
        page_size, page_owner, page_logical = self.page_size, self.page_owner, self.page_logical
        user_mask = mask_mod is not noop_mask

        def paged_mask_mod(b, h, q_idx, kv_idx):
            page = kv_idx // page_size
            logical = page_logical[page] * page_size + (kv_idx - page * page_size)
            held = (page_owner[page] == slots[b]) & (logical < limit[b])
            if not user_mask:
                return held
            # Positions not held get kv_idx 0, so a mask_mod indexing by kv_idx stays in bounds.
            return held & mask_mod(b, h, q_idx, torch.where(held, logical, 0))

        paged_mask_mod.__name__ = f"paged_{getattr(mask_mod, '__name__', 'mask_mod')}"
        setattr(paged_mask_mod, KV_POSITIONS_ARE_PAGES, True)  # pages are never regrouped into tiles
        return paged_mask_mod
