"""Cost of ``kernel_options={"DETERMINISTIC": True}``: forward + backward with gradients of
captured tensors (ALiBi slopes, read per head; a relative-position table, read per key offset),
default atomics against the deterministic fixed-point sums, same process, same inputs.

float32 by default (with TF32 matmuls), the dtype of the earlier measurements; ``--dtype
bfloat16`` runs the half-precision path (its dQ programs' row pass included). Prints a markdown
table; also checks that the deterministic gradients are bit-identical across two runs.
Usage: python benchmarks/bench_deterministic.py [--dtype float32|bfloat16]
"""

import argparse

import torch
from triton.testing import do_bench

import inductor_flex

# TF32 matmuls (what float32 training uses): with IEEE float32 the four compiles and timings at
# S 2048 did not finish in 200 s on the H200 (2026-12-01; the backward alone took 25 ms a call).
B, H, S, D = 2, 16, 2048, 64


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def make_case(name, device):
    slopes = torch.rand(H, device=device, requires_grad=True)
    table = torch.randn(2 * S - 1, device=device, requires_grad=True)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    def relative_position(score, b, h, q_idx, kv_idx):
        return score + table[kv_idx - q_idx + S - 1]

    return {"alibi slopes": (alibi, slopes), "relative-position table": (relative_position, table)}[name]


def main(device="cuda", dtype=torch.float32):
    device = torch.device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    mask = inductor_flex.create_block_mask(causal, None, None, S, S, device=device)
    rows = []
    for name in ("alibi slopes", "relative-position table"):
        score_mod, captured = make_case(name, device)
        q, k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        grad_out = torch.randn(B, H, S, D, device=device, dtype=dtype)
        times, grads = {}, {}
        for label, options in (("default", None), ("deterministic", {"DETERMINISTIC": True})):
            print(f"{name}: {label} ...", flush=True)
            torch._dynamo.reset()
            attention = torch.compile(inductor_flex.flex_attention)

            def step():
                out = attention(q, k, v, score_mod=score_mod, block_mask=mask, kernel_options=options)
                return torch.autograd.grad(out, (q, k, v, captured), grad_out)

            step()
            times[label] = do_bench(step, warmup=10, rep=50, return_mode="median")
            grads[label] = (step(), step())
        first, second = grads["deterministic"]
        identical = all(torch.equal(a, b) for a, b in zip(first, second))
        rows.append((name, times["default"], times["deterministic"], identical))
        print(f"{name}: default {times['default']:.2f} ms, deterministic {times['deterministic']:.2f} ms, "
              f"bit-identical {identical}", flush=True)
    print(f"## DETERMINISTIC cost ({torch.cuda.get_device_name() if device.type == 'cuda' else device}, torch {torch.__version__}, "
          f"{'float32 with TF32 matmuls' if dtype == torch.float32 else str(dtype)[6:]}, "
          f"B{B} H{H} S{S} D{D} causal)\n")
    print("| captured gradient | default ms | deterministic ms | cost | bit-identical runs |")
    print("|---|---|---|---|---|")
    for name, default, deterministic, identical in rows:
        print(f"| {name} | {default:.2f} | {deterministic:.2f} | {deterministic / default - 1:+.1%} | {identical} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    main(dtype=getattr(torch, parser.parse_args().dtype))
