"""Decode benchmark (short queries over a long KV cache), run by ``bench.py --decode`` or
``bench.py --decode-threshold``.

``--decode``: B8 Hq32 Hkv8 D128 bf16, one query token, KV 8k and 32k, plus batch 1 and batch 64:
our compiled flex_attention (the decode kernel) vs torch's compiled flex_attention vs SDPA
flash. Reported as GB/s of K and V read: bytes of K and V (the Hkv heads, read once) / time.
SDPA flash gets the GQA shape through ``enable_gqa=True`` where this torch supports it with the
flash backend; otherwise K and V are repeated to Hq heads outside the timed region, and the
``sdpa_gqa`` column says "repeated" (it then reads Hq/Hkv times more bytes than reported).

``--decode-threshold``: the query lengths 1..128 at KV 8k, our decode kernel (the threshold
raised for the sweep) vs our forward template (FORCE_USE_FLEX_ATTENTION), to measure
``lowering.forward.DECODE_MAX_QUERY_LEN``.
"""

import csv
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention import flex_attention as torch_flex

import inductor_flex


@dataclass(frozen=True)
class DecodeCase:
    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int = 128

    @property
    def name(self) -> str:
        return (f"decode B{self.batch} Hq{self.q_heads} Hkv{self.kv_heads} Lq{self.q_len} "
                f"Lkv{self.kv_len // 1024}k D{self.head_dim}")

    def kv_bytes(self, itemsize: int) -> int:
        return 2 * self.batch * self.kv_heads * self.kv_len * self.head_dim * itemsize


DECODE_CASES = [
    DecodeCase(8, 32, 8, 1, 8192),
    DecodeCase(8, 32, 8, 1, 32768),
    DecodeCase(1, 32, 8, 1, 8192),
    DecodeCase(1, 32, 8, 1, 32768),
    DecodeCase(64, 32, 8, 1, 8192),
    DecodeCase(64, 32, 8, 1, 32768),
]
THRESHOLD_Q_LENS = [1, 2, 4, 8, 16, 32, 64, 128]


def _bench_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _inputs(case: DecodeCase, device, dtype):
    q = torch.randn(case.batch, case.q_heads, case.q_len, case.head_dim, device=device, dtype=dtype)
    k, v = (torch.randn(case.batch, case.kv_heads, case.kv_len, case.head_dim, device=device, dtype=dtype)
            for _ in range(2))
    return q, k, v


def _time_compiled(fn, *args, **kwargs):
    """(compile seconds, median ms) of a compiled callable."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - start
    return compile_s, _bench_ms(lambda: fn(*args, **kwargs)), result


def _uses_decode_kernel(q, k, v, options=None) -> bool:
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    compiled = torch.compile(inductor_flex.flex_attention)
    _, codes = run_and_get_code(compiled, q, k, v, enable_gqa=True, kernel_options=options)
    return any("attend_step_range" in code for code in codes)


def run_decode_case(case: DecodeCase, device, dtype):
    q, k, v = _inputs(case, device, dtype)
    gqa = case.q_heads != case.kv_heads
    row = {"case": case.name, "kv_gbytes": case.kv_bytes(q.element_size()) / 1e9}

    torch._dynamo.reset()
    ours = torch.compile(inductor_flex.flex_attention)
    row["ours_compile_s"], row["ours_ms"], mine = _time_compiled(ours, q, k, v, enable_gqa=gqa)

    # torch's own decode template does not compile on every torch/shape (torch 2.11 raised
    # "Ternary expression ... int64 and int32" here): record the failure, then time torch's
    # forward template on the same inputs so the row still compares against torch.
    for label, options in (("torch_flex", None), ("torch_flex_forward", {"FORCE_USE_FLEX_ATTENTION": True})):
        torch._dynamo.reset()
        theirs = torch.compile(torch_flex.flex_attention)
        try:
            row[f"{label}_compile_s"], row[f"{label}_ms"], reference = _time_compiled(
                theirs, q, k, v, enable_gqa=gqa, kernel_options=options)
        except Exception as error:
            row[f"{label}_ms"], row[f"{label}_error"] = float("nan"), str(error).splitlines()[0][:200]
            print(f"  torch's flex ({label}) failed: {row[f'{label}_error']}", flush=True)
            continue
        row[f"max_diff_vs_{label}"] = (mine.float() - reference.float()).abs().max().item()

    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
            row["sdpa_flash_ms"] = _bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa))
        row["sdpa_gqa"] = "enable_gqa"
    except (RuntimeError, TypeError):
        group = case.q_heads // case.kv_heads
        k_rep, v_rep = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # outside the timing
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                row["sdpa_flash_ms"] = _bench_ms(lambda: F.scaled_dot_product_attention(q, k_rep, v_rep))
            row["sdpa_gqa"] = "repeated"
        except RuntimeError:
            row["sdpa_flash_ms"], row["sdpa_gqa"] = float("nan"), "unsupported"
        del k_rep, v_rep
    return row


def run_threshold_case(q_len: int, device, dtype, kv_len=8192):
    """Our decode kernel vs our forward template at one query length."""
    from inductor_flex.lowering import forward, triton_decode

    case = DecodeCase(8, 32, 8, q_len, kv_len)
    q, k, v = _inputs(case, device, dtype)
    row = {"case": case.name, "q_len": q_len, "kv_gbytes": case.kv_bytes(q.element_size()) / 1e9}
    saved = forward.DECODE_MAX_QUERY_LEN, triton_decode.DECODE_MAX_ROWS
    # The sweep lifts the threshold (and the tile's row limit) so that every length can run the
    # decode kernel; the FX-graph cache is off since it would not see the patched constants.
    forward.DECODE_MAX_QUERY_LEN, triton_decode.DECODE_MAX_ROWS = max(THRESHOLD_Q_LENS), max(THRESHOLD_Q_LENS)
    try:
        with torch._inductor.config.patch(fx_graph_cache=False):
            for label, options in (("decode", None), ("forward", {"FORCE_USE_FLEX_ATTENTION": True})):
                torch._dynamo.reset()
                compiled = torch.compile(inductor_flex.flex_attention)
                try:
                    _, row[f"{label}_ms"], _ = _time_compiled(compiled, q, k, v, enable_gqa=True,
                                                              kernel_options=options)
                except Exception as error:  # a length the kernel cannot compile: record, go on
                    row[f"{label}_ms"], row[f"{label}_error"] = float("nan"), str(error).splitlines()[0][:200]
            row["decode_kernel_ran"] = _uses_decode_kernel(q, k, v)
    finally:
        forward.DECODE_MAX_QUERY_LEN, triton_decode.DECODE_MAX_ROWS = saved
    return row


def gbps(row, key) -> float:
    ms = row.get(key, float("nan"))
    return row["kv_gbytes"] / (ms / 1e3) if ms == ms else float("nan")


def _write(rows, out_dir: Path, name: str, table: list[str]):
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = sorted({k for row in rows for k in row}, key=lambda k: (k != "case", k))
    with open(out_dir / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / f"{name}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


def run_decode(out_dir: Path, device_name: str, only: str = ""):
    device, dtype = torch.device("cuda"), torch.bfloat16
    rows = []
    cases = [c for c in DECODE_CASES if only in c.name]
    for number, case in enumerate(cases, 1):
        print(f"[{number}/{len(cases)}] {case.name} ...", flush=True)
        rows.append(run_decode_case(case, device, dtype))
    fmt = lambda x: "–" if x != x else f"{x:.0f}"
    table = [
        f"## Decode ({device_name}, torch {torch.__version__}, bf16): GB/s of K and V read",
        "",
        "| case | ours us | ours GB/s | torch flex GB/s | torch flex forward-template GB/s | SDPA flash GB/s "
        "| ours / torch | ours / flash | flash GQA |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ratio = lambda a, b: "–" if a != a or b != b else f"{a / b:.2f}×"
    for row in rows:
        ours, theirs, flash = gbps(row, "ours_ms"), gbps(row, "torch_flex_ms"), gbps(row, "sdpa_flash_ms")
        forced = gbps(row, "torch_flex_forward_ms")
        # torch's decode failed: compare with the best torch kernel that ran.
        best_torch = theirs if theirs == theirs else forced
        table.append(f"| {row['case']} | {row['ours_ms'] * 1e3:.1f} | {fmt(ours)} | "
                     f"{fmt(theirs) if theirs == theirs else 'failed'} | {fmt(forced)} | {fmt(flash)} | "
                     f"{ratio(ours, best_torch)} | {ratio(ours, flash)} | {row.get('sdpa_gqa', '')} |")
    _write(rows, out_dir, "decode", table)


def run_threshold(out_dir: Path, device_name: str):
    device, dtype = torch.device("cuda"), torch.bfloat16
    rows = []
    for q_len in THRESHOLD_Q_LENS:
        print(f"threshold sweep: Lq {q_len} ...", flush=True)
        rows.append(run_threshold_case(q_len, device, dtype))
    table = [
        f"## Decode threshold sweep ({device_name}, torch {torch.__version__}, bf16, B8 Hq32 Hkv8 D128 Lkv 8k)",
        "",
        "| Lq | decode kernel us | forward template us | decode / forward time | decode kernel ran |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        table.append(f"| {row['q_len']} | {row['decode_ms'] * 1e3:.1f} | {row['forward_ms'] * 1e3:.1f} | "
                     f"{row['decode_ms'] / row['forward_ms']:.2f} | {row['decode_kernel_ran']} |")
    table.append("")
    table.append("Set DECODE_MAX_QUERY_LEN (inductor_flex/lowering/forward.py) to the largest Lq whose ratio is < 1.")
    _write(rows, out_dir, "decode_threshold", table)
