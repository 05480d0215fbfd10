"""Sweep kernel configurations on one GPU: the data behind the defaults in configs.py.

For each case, torch's compiled flex once, then ours under every configuration given as
kernel_options (BLOCK_M, BLOCK_N, num_warps, num_stages); prints milliseconds and the ratio.
``--dump DIR`` also writes both generated kernels of the first case (for reading their SASS).
``--backward`` times forward + backward instead, sweeping the backward's configurations
(BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, bwd_num_warps, bwd_num_stages; the forward default).

    python benchmarks/sweep.py [--only TEXT] [--dump DIR] [--backward]
"""

import argparse
import itertools
import sys
from pathlib import Path

import torch
from torch._inductor.utils import run_and_get_code
from torch.nn.attention import flex_attention as torch_flex

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import Case, bench_ms, make_mods

import inductor_flex
from inductor_flex.lowering import configs as config_tables

CASES = [
    Case("noop D128 S8192", 2, 16, 8192, 128, "noop"),
    Case("causal D128 S8192", 2, 16, 8192, 128, "causal"),
    Case("noop D64 S2048", 8, 32, 2048, 64, "noop"),
    Case("softcap+causal", 2, 16, 8192, 128, "causal", "softcap"),
    Case("causal D128 S8192 block 32", 2, 16, 8192, 128, "causal", block_size=32),
]

CONFIGS = {
    128: [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
          for (m, n, w, s) in [(128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3),
                               (128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 128, 16, 2)]],
    64: [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
         for (m, n, w, s) in [(128, 128, 4, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 4, 2), (128, 128, 8, 2),
                              (64, 128, 4, 3), (128, 64, 4, 4)]],
}


BACKWARD_CASES = [
    Case("noop D64 S8192", 2, 32, 8192, 64, "noop"),
    Case("causal D128 S8192", 2, 16, 8192, 128, "causal"),
    Case("alibi+causal", 2, 16, 8192, 128, "causal", "alibi"),
]


def _backward_options(config) -> dict:
    return dict(BLOCK_M1=config.block_m1, BLOCK_N1=config.block_n1, BLOCK_M2=config.block_m2,
                BLOCK_N2=config.block_n2, bwd_num_warps=config.num_warps, bwd_num_stages=config.num_stages)


def sweep_backward(only: str) -> list[str]:
    """fwd+bwd milliseconds of torch's compiled flex, then of ours under our default and under
    every backward autotuning candidate that fits shared memory (bf16)."""
    device, dtype = "cuda", torch.bfloat16
    lines = []
    for case in (c for c in BACKWARD_CASES if only in c.name):
        shape = (case.batch, case.heads, case.seq, case.head_dim)
        q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        grad_out = torch.randn(shape, device=device, dtype=dtype)
        score_mod, mask_mod = make_mods(case, device)

        def step(attention, block_mask, options):
            out = attention(q, k, v, score_mod=score_mod, block_mask=block_mask, **options)
            torch.autograd.grad(out, (q, k, v), grad_out)

        torch._dynamo.reset()
        theirs_mask = (torch_flex.create_block_mask(mask_mod, None, None, case.seq, case.seq, device=device)
                       if mask_mod else None)
        theirs = torch.compile(torch_flex.flex_attention)
        step(theirs, theirs_mask, {})
        torch_ms = bench_ms(lambda: step(theirs, theirs_mask, {}))
        ours_mask = (inductor_flex.create_block_mask(mask_mod, None, None, case.seq, case.seq, device=device)
                     if mask_mod else None)
        candidates = config_tables.backward_configs(torch.device(device), dtype, case.head_dim, case.head_dim,
                                                    autotune=True)
        for config in [None, *candidates]:
            torch._dynamo.reset()
            options = {"kernel_options": _backward_options(config)} if config else {}
            compiled = torch.compile(inductor_flex.flex_attention)
            label = f"{case.name:20s} {'default' if config is None else str(_backward_options(config)):100s} fwd+bwd"
            _measure(lines, label, lambda: step(compiled, ours_mask, options),
                     lambda: step(compiled, ours_mask, options), torch_ms)
    return lines


_FAILED = object()


def _measure(lines, label, first_call, timed_call, torch_ms):
    """Compile (``first_call``) and time one configuration, adding its line to ``lines``;
    returns first_call's result, or _FAILED for a config that does not compile (a result, not
    a crash)."""
    try:
        result = first_call()
        ms = bench_ms(timed_call)
    except Exception as error:
        lines.append(f"{label} failed: {str(error)[:80]}")
        return _FAILED
    line = f"{label} ours {ms:7.3f} ms  torch {torch_ms:7.3f} ms  ratio {torch_ms / ms:5.3f}"
    print(line, flush=True)
    lines.append(line)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="")
    parser.add_argument("--dump", type=Path, default=None)
    parser.add_argument("--default-only", action="store_true", help="only our default configuration")
    parser.add_argument("--backward", action="store_true", help="forward + backward, sweeping the backward")
    args = parser.parse_args(argv)
    torch._inductor.config.fx_graph_cache = False
    if args.backward:
        lines = sweep_backward(args.only)
        print("==== sweep (forward + backward)")
        print("\n".join(lines))
        return
    device, dtype = "cuda", torch.bfloat16
    lines = []
    for index, case in enumerate(c for c in CASES if args.only in c.name):
        shape = (case.batch, case.heads, case.seq, case.head_dim)
        q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
        score_mod, mask_mod = make_mods(case, device)
        torch._dynamo.reset()
        theirs_mask = (torch_flex.create_block_mask(mask_mod, None, None, case.seq, case.seq, device=device,
                                                    BLOCK_SIZE=max(case.block_size, 128)) if mask_mod else None)
        theirs = torch.compile(torch_flex.flex_attention)
        _, theirs_code = run_and_get_code(theirs, q, k, v, score_mod=score_mod, block_mask=theirs_mask)
        torch_ms = bench_ms(lambda: theirs(q, k, v, score_mod=score_mod, block_mask=theirs_mask))
        ours_mask = (inductor_flex.create_block_mask(mask_mod, None, None, case.seq, case.seq, device=device,
                                                     BLOCK_SIZE=case.block_size) if mask_mod else None)
        forms = ["default", "FAST_MATH"] if case.score == "softcap" else [None]
        configs = [{}] + CONFIGS[case.head_dim] if case.score == "none" and not args.default_only else [{}]
        for config, form in itertools.product(configs, forms):
            torch._dynamo.reset()
            options = dict(config)
            if form == "FAST_MATH":
                options["FAST_MATH"] = True
            compiled = torch.compile(inductor_flex.flex_attention)

            def call():
                return compiled(q, k, v, score_mod=score_mod, block_mask=ours_mask, kernel_options=options)

            ours_code = _measure(lines, f"{case.name:28s} {options or 'default'!s:70s} {form or '':9s}",
                                 lambda: run_and_get_code(call)[1], call, torch_ms)
            if ours_code is not _FAILED and args.dump and index == 0 and not config:
                args.dump.mkdir(parents=True, exist_ok=True)
                (args.dump / "ours.py").write_text("\n\n".join(ours_code))
                (args.dump / "torch.py").write_text("\n\n".join(theirs_code))
    print("==== sweep")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
