"""Every Triton template of the package on small, ragged shapes: the workload that
``scripts/memcheck.sh`` runs under ``compute-sanitizer --tool memcheck``.

Forward (partial and full blocks, sparse blocks that the tile gathers across, GQA, qk dim != v
dim, head dims that are not powers of two, lengths that are not multiples of any block),
backward (with a captured tensor's gradient), decode (split KV, GQA groups of 4 and 5) and the
paged cache (decode and prefill through the page table, page sizes 16 and 100). Each result is
checked to be finite; correctness itself is the GPU tier's job. Prints one line per case.
"""

import math
import sys

import torch

from inductor_flex import AuxRequest, PagedKVCache, create_block_mask, flex_attention

DEVICE = "cuda"


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < 70)


def compiled():
    # A fresh compile per case: no case is served by another's kernel.
    torch._dynamo.reset()
    return torch.compile(flex_attention, fullgraph=True)


def qkv(B, Hq, Hkv, L, S, E, Ev, dtype, grad=False):
    make = lambda *shape: torch.randn(*shape, device=DEVICE, dtype=dtype, requires_grad=grad)
    return make(B, Hq, L, E), make(B, Hkv, S, E), make(B, Hkv, S, Ev)


def check(name, *tensors):
    torch.cuda.synchronize()
    for t in tensors:
        if t is not None and not torch.isfinite(t.float()).all():
            raise AssertionError(f"{name}: non-finite values")
    print(f"ok  {name}", flush=True)


def forward_cases():
    for L, S, E, Ev, block, mask_mod, dtype in [
        (300, 1000, 80, 80, 128, causal, torch.bfloat16),
        (17, 300, 192, 64, 128, sliding, torch.float16),
        (1000, 17, 16, 16, 48, None, torch.float32),
        (300, 300, 64, 96, 32, causal, torch.bfloat16),
        (129, 127, 8, 8, 100, sliding, torch.float32),
    ]:
        q, k, v = qkv(2, 4, 2, L, S, E, Ev, dtype)
        mask = None if mask_mod is None else create_block_mask(
            mask_mod, None, None, L, S, device=DEVICE, BLOCK_SIZE=block)
        slopes = torch.rand(4, device=DEVICE)

        def alibi(score, b, h, q_idx, kv_idx):
            return score + slopes[h] * (kv_idx - q_idx)

        out, aux = compiled()(q, k, v, score_mod=alibi, block_mask=mask, enable_gqa=True,
                              return_aux=AuxRequest(lse=True))
        lse = aux.lse
        check(f"forward L{L} S{S} E{E} Ev{Ev} block {block} {dtype}", out, lse)


def backward_cases():
    for L, S, D, block, dtype in [(300, 1000, 80, 128, torch.bfloat16), (17, 129, 64, 48, torch.float32),
                                  (1000, 300, 128, 64, torch.float16)]:
        q, k, v = qkv(2, 4, 2, L, S, D, D, dtype, grad=True)
        mask = create_block_mask(causal if L >= S else sliding, None, None, L, S, device=DEVICE, BLOCK_SIZE=block)
        out = compiled()(q, k, v, block_mask=mask, enable_gqa=True)
        out.backward(torch.randn_like(out))
        check(f"backward L{L} S{S} D{D} block {block} {dtype}", out, q.grad, k.grad, v.grad)
    # A captured tensor's gradient (float32: the template's atomics into a [H, Lq, Lkv] bias).
    q, k, v = qkv(1, 4, 4, 67, 131, 64, 64, torch.float32, grad=True)
    bias = torch.randn(4, 67, 131, device=DEVICE, requires_grad=True)

    def add_bias(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx, kv_idx]

    out = compiled()(q, k, v, score_mod=add_bias)
    out.backward(torch.randn_like(out))
    check("backward captured bias L67 S131", out, q.grad, k.grad, v.grad, bias.grad)


def decode_cases():
    for B, Hq, Hkv, Lq, S, D in [(3, 32, 8, 1, 1000, 128), (2, 10, 2, 1, 300, 64), (2, 8, 2, 4, 17, 80),
                                 (1, 5, 1, 1, 4097, 128)]:
        q, k, v = qkv(B, Hq, Hkv, Lq, S, D, D, torch.bfloat16)
        mask = create_block_mask(sliding, None, None, Lq, S, device=DEVICE)
        out = compiled()(q, k, v, enable_gqa=True)
        out_masked = compiled()(q, k, v, block_mask=mask, enable_gqa=True)
        check(f"decode B{B} Hq{Hq} Hkv{Hkv} Lq{Lq} S{S} D{D}", out, out_masked)


def paged_cases():
    for page_size in (16, 100):
        lengths = [1, page_size - 1, page_size + 1, 700]
        pages = sum(math.ceil(n / page_size) for n in lengths) + 2
        cache = PagedKVCache(pages, page_size, len(lengths), 2, 64, dtype=torch.bfloat16, device=DEVICE)
        cache.shuffle_free_pages(seed=0)
        for slot, n in enumerate(lengths):
            cache.reserve(slot, n)
            k_new, v_new = (torch.randn(1, 2, n, 64, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
            cache.append(torch.tensor([slot], device=DEVICE), k_new, v_new)
        query = torch.randn(len(lengths), 8, 1, 64, device=DEVICE, dtype=torch.bfloat16)
        torch._dynamo.reset()
        decode = torch.compile(lambda q: cache.attention(q, cache.decode_block_mask()), fullgraph=True)
        check(f"paged decode page {page_size}", decode(query))
        longest = max(lengths)
        logical = create_block_mask(causal, 1, 1, longest, longest, device=DEVICE, BLOCK_SIZE=(128, page_size))
        prompt = torch.randn(len(lengths), 8, longest, 64, device=DEVICE, dtype=torch.bfloat16)
        slots = torch.arange(len(lengths), device=DEVICE)
        torch._dynamo.reset()
        prefill = torch.compile(lambda q: cache.attention(q, cache.convert_logical_block_mask(logical, slots)),
                                fullgraph=True)
        check(f"paged prefill page {page_size}", prefill(prompt))


def main() -> int:
    if not torch.cuda.is_available():
        print("memcheck needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    for cases in (forward_cases, backward_cases, decode_cases, paged_cases):
        cases()
    return 0


if __name__ == "__main__":
    sys.exit(main())
