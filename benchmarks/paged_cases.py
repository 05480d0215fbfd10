"""Paged-decode benchmark cases: attention over a PagedKVCache vs the same K/V stored contiguously.

``paged_decode_case`` builds one case (default: B8 Hq32 Hkv8 D128 bf16), the sequences' pages
handed out in random order from the pool, so a sequence's pages are scattered; every sequence
holds ``kv_len`` tokens, the same as the contiguous K/V. ``bench.py`` can add rows from it;
run alone, this script prints paged vs contiguous times (targets: page size 16 within 10% of
contiguous, 128 within 5%).

    python benchmarks/paged_cases.py [--kv-lens 8192 32768] [--page-sizes 16 128]
"""

import argparse
from dataclasses import dataclass

import torch

from inductor_flex import PagedKVCache, flex_attention


@dataclass
class PagedDecodeCase:
    """One decode step's inputs, paged and contiguous; ``run_*`` are meant for torch.compile."""

    cache: PagedKVCache
    query: torch.Tensor  # [B, Hq, 1, D]
    key: torch.Tensor  # contiguous copy [B, Hkv, kv_len, D]
    value: torch.Tensor
    block_mask: object  # physical BlockMask of the cache: every sequence's pages, all full

    def run_paged(self):
        return flex_attention(self.query, self.cache.keys[0], self.cache.values[0],
                              block_mask=self.block_mask, enable_gqa=True)

    def run_contiguous(self):
        return flex_attention(self.query, self.key, self.value, enable_gqa=True)

    @property
    def kv_bytes(self) -> int:
        """Bytes of K and V a decode step must read (for GB/s)."""
        return 2 * self.key.numel() * self.key.element_size()


def paged_decode_case(kv_len: int, page_size: int, batch: int = 8, q_heads: int = 32, kv_heads: int = 8,
                      head_dim: int = 128, dtype=torch.bfloat16, device="cuda", seed: int = 0) -> PagedDecodeCase:
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    pages_per_sequence = -(-kv_len // page_size)
    cache = PagedKVCache(batch * pages_per_sequence, page_size, batch, kv_heads, head_dim, dtype=dtype,
                         device=device, max_pages_per_sequence=pages_per_sequence)
    cache.shuffle_free_pages(seed)
    key, value = randn(batch, kv_heads, kv_len, head_dim), randn(batch, kv_heads, kv_len, head_dim)
    for slot in range(batch):
        cache.reserve(slot, kv_len)
        cache.append(torch.tensor([slot], device=device), key[slot:slot + 1], value[slot:slot + 1])
    return PagedDecodeCase(cache, randn(batch, q_heads, 1, head_dim), key, value, cache.decode_block_mask())


def main():
    from triton.testing import do_bench

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kv-lens", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--page-sizes", type=int, nargs="+", default=[16, 128])
    args = parser.parse_args()
    print(f"{'Lkv':>6} {'page':>5} {'contiguous us':>14} {'paged us':>9} {'paged/contig':>12} {'paged GB/s':>10}")
    for kv_len in args.kv_lens:
        for page_size in args.page_sizes:
            torch._dynamo.reset()
            case = paged_decode_case(kv_len, page_size)
            paged = torch.compile(case.run_paged, fullgraph=True)
            contiguous = torch.compile(case.run_contiguous, fullgraph=True)
            torch.testing.assert_close(paged().float(), contiguous().float(), atol=2e-2, rtol=2e-2)
            t_paged = do_bench(paged, warmup=25, rep=100, return_mode="median")
            t_contiguous = do_bench(contiguous, warmup=25, rep=100, return_mode="median")
            print(f"{kv_len:>6} {page_size:>5} {t_contiguous * 1e3:>14.1f} {t_paged * 1e3:>9.1f} "
                  f"{t_paged / t_contiguous:>12.3f} {case.kv_bytes / t_paged / 1e6:>10.0f}")
            del case, paged, contiguous
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
