"""``python -m inductor_flex demo``: run the variant gallery, check it against float64, draw masks.

For every variant of ``gallery.GALLERY`` the demo builds the BlockMask, runs the compiled
``flex_attention`` forward and backward, computes the same values with the float64 reference
(differentiated by torch autograd, independently of our backward operator) and prints one
table row. A variant passes when the forward and every gradient (query, key, value and each
learnable captured tensor) are within a tolerance derived from the dtype, with no NaN.
"""

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .api import flex_attention
from .block_mask import BlockMask, create_block_mask, create_mask
from .gallery import GALLERY, Sizes, Variant
from .mods import identity_score_mod
from .reference import attention_reference

SIZES = {
    "cpu": Sizes(batch=2, heads=4, seq_len=512, head_dim=64),
    "cuda": Sizes(batch=4, heads=8, seq_len=2048, head_dim=64),
}
SMALL_SIZES = Sizes(batch=1, heads=2, seq_len=256, head_dim=16)
# torch's default tile: 4 to 16 blocks a side at the demo's sizes, enough to see in a picture.
BLOCK_SIZE = 128

DEFAULT_DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The one place that picks how flex_attention is compiled (--backend overrides it). Inductor
# on every device, through our lowerings (inductor_flex/lowering/): on CPU the query-chunked
# decomposition compiled into C++ kernels, on CUDA the fused Triton forward template (the
# backward is the decomposition on both for now). "aot_eager" (--backend aot_eager) still
# runs everything above the kernels with the dense reference as the kernel.
COMPILE_BACKEND = {"cpu": "inductor", "cuda": "inductor"}

# Allowed error, in units of the dtype's epsilon, scaled by max(1, max |reference|) so that
# large gradients (a slope's gradient sums over every position) are judged relatively.
# float32 accumulates rounding over the sequence; low-precision dtypes are dominated by the
# rounding of inputs, probabilities and outputs, a few epsilon.
TOLERANCE_IN_EPS = {torch.float32: 128, torch.bfloat16: 8, torch.float16: 8}

DEFAULT_OUT = "mask_pictures"
MAX_PICTURE_SIDE = 512
# Picture colours (RGB): the block's class, and for partial blocks whether mask_mod allows.
FULL_BLOCK = (33, 52, 128)
PARTIAL_ALLOWED = (110, 150, 230)
PARTIAL_MASKED = (222, 228, 242)
EMPTY_BLOCK = (255, 255, 255)
BLOCK_EDGE = (170, 170, 170)


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE_IN_EPS[dtype] * torch.finfo(dtype).eps


def scaled_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max |value - reference| / max(1, max |reference|); NaN if value has a NaN."""
    difference = (value.double() - reference).abs().max().item()
    return difference / max(1.0, reference.abs().max().item())


def picture_side(seq_len: int) -> int:
    """Width and height in pixels of a mask picture: one pixel per position, strided down."""
    return len(range(0, seq_len, picture_stride(seq_len)))


def picture_stride(seq_len: int) -> int:
    return -(-seq_len // MAX_PICTURE_SIDE)


@dataclass
class Result:
    """One table row; NaN marks what was not reached before an error."""

    variant: Variant
    sparsity: float = math.nan
    forward_error: float = math.nan
    gradient_error: float = math.nan
    milliseconds: float = math.nan
    passed: bool = False
    error: str = ""


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward_backward(attention, query, key, value, learnable, score_mod, block_mask, grad_out):
    out = attention(query, key, value, score_mod=score_mod, block_mask=block_mask)
    grads = torch.autograd.grad(out, (query, key, value, *learnable), grad_out)
    return out, grads


def run_variant(result: Result, sizes: Sizes, device, dtype, backend, seed: int, pictures: Path) -> None:
    """Build, run, time, check and draw ``result.variant``, filling ``result`` as it goes."""
    variant = result.variant
    generator = torch.Generator().manual_seed(seed)
    captured = {name: t.to(device) for name, t in variant.captures(sizes, generator).items()}
    learnable = [t.requires_grad_() for t in captured.values() if t.is_floating_point()]
    score_mod, mask_mod = variant.mods(sizes, captured)

    shape = (sizes.batch, sizes.heads, sizes.seq_len, sizes.head_dim)
    query, key, value, grad_out = (
        torch.randn(shape, generator=generator).to(device, dtype) for _ in range(4)
    )
    for t in (query, key, value):
        t.requires_grad_()

    block_mask = create_block_mask(
        mask_mod, sizes.batch, sizes.heads, sizes.seq_len, sizes.seq_len, device=device, BLOCK_SIZE=BLOCK_SIZE
    )
    result.sparsity = block_mask.sparsity()
    save_mask_picture(block_mask, mask_mod, pictures / f"{variant.name}.png")

    # A fresh compile per variant, so Dynamo's recompile limit is never reached across variants.
    torch.compiler.reset()
    attention = torch.compile(flex_attention, backend=backend, fullgraph=True)
    args = (attention, query, key, value, learnable, score_mod, block_mask, grad_out)
    out, grads = _forward_backward(*args)
    _synchronize(device)
    start = time.perf_counter()
    _forward_backward(*args)
    _synchronize(device)
    result.milliseconds = 1000 * (time.perf_counter() - start)

    reference_out, reference_grads = reference_forward_backward(variant, sizes, query, key, value, captured,
                                                                block_mask, grad_out)
    result.forward_error = scaled_error(out, reference_out)
    result.gradient_error = max(scaled_error(g, r) for g, r in zip(grads, reference_grads))
    limit = tolerance(dtype)
    result.passed = result.forward_error <= limit and result.gradient_error <= limit  # False for NaN


def reference_forward_backward(variant, sizes, query, key, value, captured, block_mask, grad_out):
    """Output and gradients in float64, from the reference differentiated by torch autograd."""
    inputs = [t.detach().double().requires_grad_() for t in (query, key, value)]
    captured64 = {
        name: t.detach().double().requires_grad_() if t.is_floating_point() else t for name, t in captured.items()
    }
    learnable64 = [t for t in captured64.values() if t.is_floating_point()]
    score_mod64, mask_mod64 = variant.mods(sizes, captured64)
    sparse_fields = block_mask.as_tuple()[:-1]
    out, _, _ = attention_reference(
        *inputs, score_mod64 or identity_score_mod, (*sparse_fields, mask_mod64), 1 / math.sqrt(sizes.head_dim)
    )
    grads = torch.autograd.grad(out, (*inputs, *learnable64), grad_out.double())
    return out, grads


def block_classes(block_mask: BlockMask) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool maps [nQ, nKV] of (b=0, h=0): blocks computed at all, and full blocks."""
    computed = block_mask.to_dense()[0, 0].bool()
    full = torch.zeros_like(computed)
    if block_mask.full_kv_num_blocks is not None:
        full_only = BlockMask.from_kv_blocks(
            block_mask.full_kv_num_blocks, block_mask.full_kv_indices, BLOCK_SIZE=block_mask.BLOCK_SIZE,
            seq_lengths=block_mask.seq_lengths, compute_q_blocks=False,
        )
        full = full_only.to_dense()[0, 0].bool()
    return computed, full


def save_mask_picture(block_mask: BlockMask, mask_mod, path: Path) -> None:
    """PNG of batch 0, head 0: one pixel per (q_idx, kv_idx), strided down to MAX_PICTURE_SIDE.

    Full blocks are dark, partial blocks mid blue where mask_mod allows and pale where it
    masks, skipped blocks white; grey lines mark block edges when blocks are large enough.
    """
    from PIL import Image

    q_len, kv_len = block_mask.seq_lengths
    q_block, kv_block = block_mask.BLOCK_SIZE
    stride = picture_stride(max(q_len, kv_len))
    computed, full = (m.cpu() for m in block_classes(block_mask))
    allowed = create_mask(mask_mod, 1, 1, q_len, kv_len, device=block_mask.kv_indices.device)[0, 0].cpu()
    q_pos, kv_pos = torch.arange(0, q_len, stride), torch.arange(0, kv_len, stride)
    q_blocks, kv_blocks = (q_pos // q_block)[:, None], (kv_pos // kv_block)[None, :]
    is_full = full[q_blocks, kv_blocks]
    is_partial = computed[q_blocks, kv_blocks] & ~is_full
    is_allowed = allowed[q_pos][:, kv_pos]

    # Palette indices: 0 empty, 1 full, 2 partial allowed, 3 partial masked, 4 block edge.
    pixels = torch.zeros(len(q_pos), len(kv_pos), dtype=torch.uint8)
    pixels[is_full] = 1
    pixels[is_partial & is_allowed] = 2
    pixels[is_partial & ~is_allowed] = 3
    if min(q_block, kv_block) // stride >= 8:
        pixels[(q_pos % q_block < stride), :] = 4
        pixels[:, (kv_pos % kv_block < stride)] = 4

    picture = Image.frombytes("P", (len(kv_pos), len(q_pos)), bytes(pixels.flatten().tolist()))
    palette = [EMPTY_BLOCK, FULL_BLOCK, PARTIAL_ALLOWED, PARTIAL_MASKED, BLOCK_EDGE]
    picture.putpalette([channel for colour in palette for channel in colour])
    picture.save(path, optimize=True)


def format_table(results: list[Result], dtype: torch.dtype) -> str:
    header = ("variant", "sparsity %", "fwd error", "grad error", "fwd+bwd ms", "result")
    rows = [
        (
            r.variant.name,
            f"{r.sparsity:.1f}",
            f"{r.forward_error:.2e}",
            f"{r.gradient_error:.2e}",
            f"{r.milliseconds:.1f}",
            "PASS" if r.passed else "FAIL",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in (header, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(
        f"errors: max |x - x_float64| / max(1, max |x_float64|); grad error is the worst of q, k, v and "
        f"learnable captured tensors; tolerance {tolerance(dtype):.2e} ({TOLERANCE_IN_EPS[dtype]} eps of {dtype})"
    )
    return "\n".join(lines)


def pick_device(requested: str | None) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device; use --device cpu")
    return torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))


def add_parser(subcommands) -> argparse.ArgumentParser:
    """Register the ``demo`` subcommand."""
    parser = subcommands.add_parser(
        "demo",
        help="run the variant gallery, check it against float64, save mask pictures",
        description="Run the variant gallery with the compiled flex_attention, compare forward and "
        "gradients with the float64 reference, and save a PNG of each variant's mask.",
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"folder for the mask PNGs (default ./{DEFAULT_OUT})")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="default: float32 on cpu, bfloat16 on cuda")
    default_backends = ", ".join(f"{device}: {backend}" for device, backend in COMPILE_BACKEND.items())
    parser.add_argument("--backend", help=f"torch.compile backend (default: {default_backends})")
    small = SMALL_SIZES
    parser.add_argument(
        "--small", action="store_true",
        help=f"tiny sizes B={small.batch} H={small.heads} S={small.seq_len} D={small.head_dim} for a quick check",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of inputs and captured tensors (default 0)")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 if every variant passed, 1 otherwise."""
    try:
        import PIL  # noqa: F401  (checked first: a missing Pillow should not cost a full run)
    except ImportError:
        raise SystemExit('the demo draws masks with Pillow: pip install -e ".[demo]"') from None
    device = pick_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else DEFAULT_DTYPE[device.type]
    backend = args.backend or COMPILE_BACKEND[device.type]
    sizes = SMALL_SIZES if args.small else SIZES[device.type]
    pictures = Path(args.out).resolve()
    pictures.mkdir(parents=True, exist_ok=True)

    print(
        f"inductor_flex demo on {device} ({dtype}, torch.compile backend {backend!r}); "
        f"B={sizes.batch} H={sizes.heads} S={sizes.seq_len} D={sizes.head_dim}, BLOCK_SIZE={BLOCK_SIZE}",
        flush=True,
    )
    started = time.perf_counter()
    results = []
    for variant in GALLERY:
        result = Result(variant)
        try:
            run_variant(result, sizes, device, dtype, backend, args.seed, pictures)
        except Exception as error:  # one broken variant must not hide the others' results
            message = str(error).strip().splitlines()
            result.error = f"{type(error).__name__}: {message[0] if message else ''}"
        results.append(result)
    torch.compiler.reset()

    print(format_table(results, dtype))
    for r in results:
        if r.error:
            print(f"{r.variant.name} raised {r.error}")
    print(f"{sum(r.passed for r in results)}/{len(results)} passed in {time.perf_counter() - started:.1f} s")
    print(f"mask pictures (dark: full block, blue: partial & allowed, pale: partial & masked): {pictures}")
    return 0 if all(r.passed for r in results) else 1
