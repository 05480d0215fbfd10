"""The ``kernel_options`` a caller may pass to ``flex_attention``: names, meanings, validation.

Validated eagerly in ``flex_attention()`` so a typo fails at the call with the reason, not
deep inside a compile. Keys may carry a ``fwd_`` or ``bwd_`` prefix to apply to one direction.
"""

import difflib
from typing import TypedDict

import torch

BACKENDS = ("AUTO", "TRITON", "DECOMPOSED")

# name -> (kind, meaning)
KNOWN_OPTIONS = {
    "BLOCK_M": ("tile", "query rows per program"),
    "BLOCK_N": ("tile", "key/value columns per inner step"),
    "BLOCK_M1": ("tile", "backward: query rows per dK/dV step"),
    "BLOCK_N1": ("tile", "backward: key/value rows per dK/dV program"),
    "BLOCK_M2": ("tile", "backward: query rows per dQ program"),
    "BLOCK_N2": ("tile", "backward: key/value rows per dQ step"),
    "num_warps": ("warps", "warps per program: 1, 2, 4, 8 or 16"),
    "num_stages": ("stages", "software-pipelining depth (>= 1)"),
    "PRESCALE_QK": ("bool", "scale q once instead of every score tile"),
    "ROWS_GUARANTEED_SAFE": ("bool", "promise every query row attends at least one key (skips a guard)"),
    "BLOCKS_ARE_CONTIGUOUS": ("bool", "promise each row's block list is first, first+1, ... (skips index loads)"),
    "FAST_MATH": ("bool", "hardware tanh (tanh.approx) in fp16/bf16 score_mods: faster, ~5e-4 relative error there"),
    "DETERMINISTIC": ("bool", "backward: bit-identical gradients run to run"),
    "BACKEND": ("backend", "AUTO (default), TRITON (fused template, error if it cannot run) or DECOMPOSED"),
    "OUTPUT_LOGSUMEXP": ("bool", "accepted for torch compatibility; the lse is always produced"),
    "OUTPUT_MAX": ("bool", "accepted for torch compatibility; max scores are always produced"),
    "FORCE_USE_FLEX_ATTENTION": ("bool", "use the forward template even for short queries (no decode kernel)"),
    "USE_TMA": ("bool", "accepted for torch compatibility; ignored"),
    "WRITE_DQ": ("bool", "accepted for torch compatibility; ignored"),
    "kpack": ("int", "ROCm tuning knob, accepted for torch compatibility; ignored"),
    "matrix_instr_nonkdim": ("int", "ROCm tuning knob, accepted for torch compatibility; ignored"),
    "waves_per_eu": ("int", "ROCm tuning knob, accepted for torch compatibility; ignored"),
}

_KIND_TYPES = {"tile": int, "warps": int, "stages": int, "int": int, "bool": bool, "backend": str}

# The keys above as a TypedDict (all optional), named as torch names its own: for annotations.
FlexKernelOptions = TypedDict(
    "FlexKernelOptions",
    {name: _KIND_TYPES[kind] for name, (kind, _meaning) in KNOWN_OPTIONS.items()},
    total=False,
)

# torch's BACKEND values that inductor_flex has no separate kernel for, and what to pass instead.
TORCH_ONLY_BACKENDS = {
    "TRITON_DECODE": "pass 'TRITON': it runs the decode kernel for short queries by itself",
    "FLASH": "pass 'TRITON' (inductor_flex has no FlashAttention/cute-dsl kernel)",
}


def _strip_direction(name: str) -> str:
    for prefix in ("fwd_", "bwd_"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_kernel_options(options: dict) -> None:
    """Raise ValueError/TypeError naming the bad option and what would be accepted."""
    for name, value in options.items():
        if not isinstance(name, str):
            raise TypeError(f"kernel_options keys must be strings, got {name!r}; e.g. {{'BLOCK_M': 64}}")
        base = _strip_direction(name)
        if base not in KNOWN_OPTIONS:
            by_case = {known.lower(): known for known in KNOWN_OPTIONS}
            if base.lower() in by_case:
                close = [by_case[base.lower()]]
            elif torch.compiler.is_dynamo_compiling():
                close = []  # Dynamo cannot trace difflib: the list of known options must do
            else:
                close = difflib.get_close_matches(base, KNOWN_OPTIONS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            known = ", ".join(sorted(KNOWN_OPTIONS))
            raise ValueError(
                f"unknown kernel option {name!r}; {hint}known options (optionally fwd_/bwd_ prefixed): {known}"
            )
        kind, meaning = KNOWN_OPTIONS[base]
        if kind == "tile":
            if not _is_int(value) or value < 16 or value & (value - 1):
                raise ValueError(
                    f"kernel option {name}={value!r} must be a power of two >= 16 ({meaning}), e.g. 64"
                )
        elif kind == "warps":
            if not _is_int(value) or value not in (1, 2, 4, 8, 16):
                raise ValueError(f"kernel option {name}={value!r} must be one of 1, 2, 4, 8, 16 (an int)")
        elif kind == "stages":
            if not _is_int(value) or value < 1:
                raise ValueError(f"kernel option {name}={value!r} must be an int >= 1, e.g. 3")
        elif kind == "int":
            if not _is_int(value):
                raise TypeError(f"kernel option {name}={value!r} must be an int ({meaning})")
        elif kind == "bool":
            if not isinstance(value, bool):
                raise TypeError(f"kernel option {name}={value!r} must be True or False ({meaning})")
        elif kind == "backend" and value in TORCH_ONLY_BACKENDS:
            raise ValueError(
                f"kernel option {name}={value!r} is torch's, not a backend of inductor_flex: "
                + TORCH_ONLY_BACKENDS[value]
            )
        elif kind == "backend" and value not in BACKENDS:
            raise ValueError(
                f"kernel option {name}={value!r} is not a backend of inductor_flex; choose one of {BACKENDS}"
            )


def options_for(options: dict, direction: str) -> dict:
    """The options that apply to one direction ("fwd" or "bwd"), prefixes removed; prefixed wins."""
    other = "bwd_" if direction == "fwd" else "fwd_"
    plain = {k: v for k, v in options.items() if not k.startswith(("fwd_", "bwd_"))}
    plain.update({k[4:]: v for k, v in options.items() if k.startswith(direction + "_")})
    return {k: v for k, v in plain.items() if not k.startswith(other)}
