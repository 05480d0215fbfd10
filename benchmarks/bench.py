"""Benchmark inductor_flex against torch's compiled flex_attention and SDPA, in one process.

Same inputs for every implementation; medians from triton.testing.do_bench; a fresh Dynamo
cache per case (torch's flex silently falls back to an unfused path once its recompile limit
is hit, which would look like a 200x slowdown). Writes a CSV, a PNG plot and the table in
docs/benchmarks.md with the device and the date.

    python benchmarks/bench.py [--quick] [--out DIR] [--markdown docs/benchmarks.md]
"""

import argparse
import csv
import datetime
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention import flex_attention as torch_flex

import inductor_flex


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    heads: int
    seq: int
    head_dim: int
    mask: str  # noop | causal | sliding | document
    score: str = "none"  # none | alibi | softcap
    block_size: int = 128
    fast_math: bool = False  # ours only: kernel_options={"FAST_MATH": True}

    @property
    def attended_fraction(self) -> float:
        if self.mask == "noop":
            return 1.0
        if self.mask == "causal":
            return 0.5
        if self.mask == "sliding":
            window = min(1024, self.seq)
            return (window * self.seq - window * window / 2) / (self.seq * self.seq)
        return 0.5 / 8  # document: about 8 documents, causal inside each

    def forward_flops(self) -> float:
        return 4 * self.batch * self.heads * self.seq * self.seq * self.head_dim * self.attended_fraction


def cases(quick: bool):
    """B·S = 16k and H·D = 2048 for the dense shapes; the variants at B2 H16 S8192 D128."""
    dense = [
        Case(f"{mask} D{d} S{s}", 16384 // s, 2048 // d, s, d, mask)
        for mask in ("noop", "causal")
        for d in (64, 128)
        for s in (2048, 8192)
    ]
    variants = [
        Case("sliding window 1024", 2, 16, 8192, 128, "sliding"),
        Case("document+causal", 2, 16, 8192, 128, "document"),
        Case("alibi+causal", 2, 16, 8192, 128, "causal", "alibi"),
        Case("softcap+causal", 2, 16, 8192, 128, "causal", "softcap"),
        Case("softcap+causal FAST_MATH", 2, 16, 8192, 128, "causal", "softcap", fast_math=True),
    ]
    small_blocks = [Case(f"causal D128 S8192 block {b}", 2, 16, 8192, 128, "causal", block_size=b) for b in (32, 48, 64)]
    if quick:
        return [dense[1], *variants[2:]]
    return dense + variants + small_blocks


def make_mods(case: Case, device):
    slopes = torch.exp2(-torch.arange(1, case.heads + 1, device=device, dtype=torch.float32) * 8 / case.heads)
    doc_ids = torch.div(torch.arange(case.seq, device=device), case.seq // 8, rounding_mode="floor")

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def sliding(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < 1024)

    def document(b, h, q_idx, kv_idx):
        return (doc_ids[q_idx] == doc_ids[kv_idx]) & (q_idx >= kv_idx)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    def softcap(score, b, h, q_idx, kv_idx):
        return 30.0 * torch.tanh(score / 30.0)

    masks = {"noop": None, "causal": causal, "sliding": sliding, "document": document}
    scores = {"none": None, "alibi": alibi, "softcap": softcap}
    return scores[case.score], masks[case.mask]


def bench_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def run_case(case: Case, device, dtype):
    torch._dynamo.reset()
    shape = (case.batch, case.heads, case.seq, case.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    score_mod, mask_mod = make_mods(case, device)
    row = {"case": case.name, "tflop_fwd": case.forward_flops() / 1e12}

    ours_mask = (inductor_flex.create_block_mask(mask_mod, None, None, case.seq, case.seq, device=device,
                                                 BLOCK_SIZE=case.block_size) if mask_mod else None)
    options = {"FAST_MATH": True} if case.fast_math else None
    compiled = torch.compile(inductor_flex.flex_attention)

    def ours(q, k, v, score_mod, block_mask):
        return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, kernel_options=options)

    start = time.perf_counter()
    ours(q, k, v, score_mod=score_mod, block_mask=ours_mask)
    torch.cuda.synchronize()
    row["ours_compile_s"] = time.perf_counter() - start
    row["ours_ms"] = bench_ms(lambda: ours(q, k, v, score_mod=score_mod, block_mask=ours_mask))

    torch._dynamo.reset()
    torch_block = case.block_size if case.block_size >= 128 else 128  # torch's template needs >= 64-ish blocks
    theirs_mask = (torch_flex.create_block_mask(mask_mod, None, None, case.seq, case.seq, device=device,
                                                BLOCK_SIZE=torch_block) if mask_mod else None)
    theirs = torch.compile(torch_flex.flex_attention)
    start = time.perf_counter()
    theirs(q, k, v, score_mod=score_mod, block_mask=theirs_mask)
    torch.cuda.synchronize()
    row["torch_compile_s"] = time.perf_counter() - start
    row["torch_flex_ms"] = bench_ms(lambda: theirs(q, k, v, score_mod=score_mod, block_mask=theirs_mask))

    if case.score == "none" and case.mask in ("noop", "causal"):
        for backend, label in ((SDPBackend.FLASH_ATTENTION, "sdpa_flash_ms"), (SDPBackend.CUDNN_ATTENTION, "sdpa_cudnn_ms")):
            try:
                with sdpa_kernel(backend):
                    row[label] = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=case.mask == "causal"))
            except RuntimeError:
                row[label] = float("nan")

    reference = theirs(q, k, v, score_mod=score_mod, block_mask=theirs_mask).float()
    mine = ours(q, k, v, score_mod, ours_mask).float()
    row["max_diff_vs_torch"] = (mine - reference).abs().max().item()
    return row


def tflops(row, key):
    return row["tflop_fwd"] / (row[key] / 1e3) if key in row and not math.isnan(row[key]) else float("nan")


def write_outputs(rows, out_dir: Path, markdown: Path, device_name: str):
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = sorted({k for row in rows for k in row}, key=lambda k: (k != "case", k))
    with open(out_dir / "forward.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)

    date = datetime.date.today().isoformat()
    lines = [
        "# Benchmarks",
        "",
        f"Measured on {device_name}, torch {torch.__version__}, {date}; bf16, random data, "
        "medians of `triton.testing.do_bench`, all implementations in one process on the same inputs.",
        "FLOPs: 4·B·H·L·S·D × attended fraction. Ratio = our TFLOP/s ÷ torch's compiled flex_attention.",
        "",
        "## Forward",
        "",
        "| case | ours TFLOP/s | torch flex TFLOP/s | ratio | SDPA flash | SDPA cuDNN | compile s (ours / torch) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ours, theirs = tflops(row, "ours_ms"), tflops(row, "torch_flex_ms")
        flash, cudnn = tflops(row, "sdpa_flash_ms"), tflops(row, "sdpa_cudnn_ms")
        fmt = lambda x: "–" if math.isnan(x) else f"{x:.0f}"
        lines.append(
            f"| {row['case']} | {fmt(ours)} | {fmt(theirs)} | {ours / theirs:.2f}× | {fmt(flash)} | {fmt(cudnn)} | "
            f"{row['ours_compile_s']:.1f} / {row['torch_compile_s']:.1f} |"
        )
    markdown.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    names = [row["case"] for row in rows]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.5))
    positions = range(len(rows))
    ax.barh([p + 0.2 for p in positions], [tflops(r, "ours_ms") for r in rows], height=0.4, label="inductor_flex")
    ax.barh([p - 0.2 for p in positions], [tflops(r, "torch_flex_ms") for r in rows], height=0.4, label="torch flex")
    ax.set_yticks(list(positions), names)
    ax.set_xlabel("forward TFLOP/s")
    ax.set_title(f"{device_name}, {date}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "forward.png", dpi=100)


# ---------------------------------------------------------------- forward + backward (--backward)


def run_backward_case(case: Case, device, dtype):
    """Forward + backward of ours and of torch's compiled flex on the same inputs and output
    gradient: median milliseconds and peak memory of one training step of attention."""
    torch._dynamo.reset()
    shape = (case.batch, case.heads, case.seq, case.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(shape, device=device, dtype=dtype)
    score_mod, mask_mod = make_mods(case, device)
    # fwd+bwd = 3.5 x forward FLOPs (backward 2.5x), torch's convention.
    row = {"case": case.name, "tflop_fwd_bwd": 3.5 * case.forward_flops() / 1e12}

    def timed(prefix, attention, block_mask, options):
        def step():
            out = attention(q, k, v, score_mod=score_mod, block_mask=block_mask, **options)
            torch.autograd.grad(out, (q, k, v), grad_out)

        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        row[f"{prefix}_compile_s"] = time.perf_counter() - start
        row[f"{prefix}_ms"] = bench_ms(step)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        row[f"{prefix}_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20

    ours_mask = (inductor_flex.create_block_mask(mask_mod, None, None, case.seq, case.seq, device=device,
                                                 BLOCK_SIZE=case.block_size) if mask_mod else None)
    options = {"kernel_options": {"FAST_MATH": True}} if case.fast_math else {}
    timed("ours", torch.compile(inductor_flex.flex_attention), ours_mask, options)
    ours_grads = torch.autograd.grad(
        torch.compile(inductor_flex.flex_attention)(q, k, v, score_mod=score_mod, block_mask=ours_mask, **options),
        (q, k, v), grad_out)

    torch._dynamo.reset()
    torch_block = case.block_size if case.block_size >= 128 else 128
    theirs_mask = (torch_flex.create_block_mask(mask_mod, None, None, case.seq, case.seq, device=device,
                                                BLOCK_SIZE=torch_block) if mask_mod else None)
    theirs = torch.compile(torch_flex.flex_attention)
    timed("torch_flex", theirs, theirs_mask, {})
    their_grads = torch.autograd.grad(theirs(q, k, v, score_mod=score_mod, block_mask=theirs_mask), (q, k, v), grad_out)
    row["max_grad_diff_vs_torch"] = max((a.float() - b.float()).abs().max().item()
                                        for a, b in zip(ours_grads, their_grads))
    return row


def write_backward_outputs(rows, out_dir: Path, device_name: str):
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = sorted({k for row in rows for k in row}, key=lambda k: (k != "case", k))
    with open(out_dir / "backward.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "## Forward + backward",
        "",
        f"Measured on {device_name}, torch {torch.__version__}, {datetime.date.today().isoformat()}; bf16. "
        "FLOPs: 3.5 x forward (backward = 2.5 x). Peak: memory allocated above the inputs during one step.",
        "",
        "| case | ours TFLOP/s | torch flex TFLOP/s | ratio | peak MiB (ours / torch) | max grad diff | compile s (ours / torch) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ours = row["tflop_fwd_bwd"] / (row["ours_ms"] / 1e3)
        theirs = row["tflop_fwd_bwd"] / (row["torch_flex_ms"] / 1e3)
        lines.append(
            f"| {row['case']} | {ours:.0f} | {theirs:.0f} | {ours / theirs:.2f}x | "
            f"{row['ours_peak_mib']:.0f} / {row['torch_flex_peak_mib']:.0f} | {row['max_grad_diff_vs_torch']:.2e} | "
            f"{row['ours_compile_s']:.1f} / {row['torch_flex_compile_s']:.1f} |"
        )
    (out_dir / "backward.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three cases only")
    parser.add_argument("--only", default="", help="run the cases whose name contains this text")
    parser.add_argument("--out", type=Path, default=Path("benchmark_results"))
    parser.add_argument("--markdown", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--backward", action="store_true",
                        help="forward + backward instead (writes OUT/backward.csv and OUT/backward.md)")
    parser.add_argument("--decode", action="store_true",
                        help="decode rows (Lq 1, long KV) in GB/s instead (writes OUT/decode.csv and OUT/decode.md)")
    parser.add_argument("--decode-threshold", action="store_true",
                        help="decode kernel vs forward template over Lq 1..128 (writes OUT/decode_threshold.*)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("the benchmark needs a CUDA GPU")
    device = torch.device("cuda")
    torch._dynamo.config.cache_size_limit = 64
    if args.decode or args.decode_threshold:
        import bench_decode  # benchmarks/bench_decode.py, beside this script

        if args.decode:
            bench_decode.run_decode(args.out, torch.cuda.get_device_name(), args.only)
        if args.decode_threshold:
            bench_decode.run_threshold(args.out, torch.cuda.get_device_name())
        return
    all_cases = [c for c in cases(args.quick) if args.only in c.name]
    # One throw-away compile of each, so no measured cold compile pays for first-use imports.
    warm = torch.randn(1, 1, 128, 64, device=device, dtype=torch.bfloat16)
    torch.compile(inductor_flex.flex_attention)(warm, warm, warm)
    torch.compile(torch_flex.flex_attention)(warm, warm, warm)
    rows = []
    for number, case in enumerate(all_cases, 1):
        print(f"[{number}/{len(all_cases)}] {case.name} ...", flush=True)
        if args.backward:
            rows.append(run_backward_case(case, device, torch.bfloat16))
        else:
            rows.append(run_case(case, device, torch.bfloat16))
    if args.backward:
        write_backward_outputs(rows, args.out, torch.cuda.get_device_name())
        return
    write_outputs(rows, args.out, args.markdown, torch.cuda.get_device_name())


if __name__ == "__main__":
    main()
