"""Kernel configurations and the per-architecture heuristics that pick them: one file.

Constraints of every config: BLOCK_M and BLOCK_N are powers of two >= 16 (tl.dot and arange
need them), num_warps is one of 2/4/8, num_stages >= 1, and the tiles of q, k and v for
num_stages pipeline stages fit in the GPU's shared memory (``fits_shared_memory``).
"""

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class ForwardConfig:
    """One forward-kernel configuration (see the module docstring for the constraints)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# (arch, head_dim bucket, low precision?) -> default. sm90 = H100/H200, sm80 = A100.
_DEFAULT_FORWARD = {
    ("sm90", 64, True): ForwardConfig(128, 128, 4, 3),
    # 128 x 128: measured 0.98x/1.05x torch (noop D128 / causal D128 S8192, H100) against
    # 0.93x/0.98x for 128 x 64.
    ("sm90", 128, True): ForwardConfig(128, 128, 8, 3),
    ("sm90", 256, True): ForwardConfig(64, 32, 4, 3),
    ("sm90", 64, False): ForwardConfig(128, 32, 4, 3),
    ("sm90", 128, False): ForwardConfig(64, 32, 4, 3),
    ("sm90", 256, False): ForwardConfig(32, 32, 4, 2),
    ("sm80", 64, True): ForwardConfig(128, 64, 4, 3),
    ("sm80", 128, True): ForwardConfig(128, 64, 8, 3),
    ("sm80", 256, True): ForwardConfig(64, 32, 4, 3),
    ("sm80", 64, False): ForwardConfig(128, 32, 4, 3),
    ("sm80", 128, False): ForwardConfig(64, 32, 4, 3),
    ("sm80", 256, False): ForwardConfig(32, 32, 4, 2),
}

# Extra candidates tried under mode="max-autotune".
_AUTOTUNE_FORWARD = [
    ForwardConfig(128, 128, 8, 3),
    ForwardConfig(128, 64, 8, 3),
    ForwardConfig(128, 64, 4, 3),
    ForwardConfig(128, 128, 8, 2),
    ForwardConfig(64, 128, 4, 3),
    ForwardConfig(64, 64, 4, 3),
    ForwardConfig(64, 32, 4, 2),
    ForwardConfig(32, 32, 4, 2),
]

_SHARED_MEMORY_BYTES = {"sm90": 227 * 1024, "sm80": 163 * 1024, "other": 99 * 1024}


# float32 dots run on CUDA cores (no tensor-core path for IEEE float32), so every tile of a
# program lives in registers. Measured on the H200 (Triton 3.6, 2026-12-01): the float32 D128
# backward (32, 64, 64, 32) with 4 warps, about 320 and 256 registers per thread in its two
# program kinds by the estimates below, computed wrong dQ and captured-tensor gradients (once
# it faulted with "operation not supported on global/shared address space"); with 8 warps, or
# with either program kind lighter, every gradient was right. A precaution drawn from that one
# measurement, not a model of the fault: float32 configs, forward ones too, stay within it.
_FLOAT32_REGISTER_BUDGET = 256


def runnable(config, dtype, fits_shared_memory, registers_per_thread):
    """``config`` as it will run, or None: it must fit in shared memory and, in float32, in the
    register budget, with more warps (at most 8) if that is what it takes."""
    if not fits_shared_memory(config):
        return None
    if dtype != torch.float32:
        return config
    for warps in (config.num_warps, max(config.num_warps, 8)):
        candidate = replace(config, num_warps=warps)
        if registers_per_thread(candidate) <= _FLOAT32_REGISTER_BUDGET:
            return candidate
    return None


def architecture(device: torch.device) -> str:
    """sm90 / sm80 / other, from the CUDA capability (the interpreter counts as sm80)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return "sm80"
    major, _ = torch.cuda.get_device_capability(device)
    return "sm90" if major == 9 else "sm80" if major >= 8 else "other"


def _head_dim_bucket(head_dim: int) -> int:
    return 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256


def fits_shared_memory(config: ForwardConfig, qk_dim: int, v_dim: int, itemsize: int, arch: str) -> bool:
    """q tile once, k and v tiles per pipeline stage: a conservative estimate of shared memory."""
    q_tile = config.block_m * qk_dim
    kv_tiles = config.num_stages * config.block_n * (qk_dim + v_dim)
    return (q_tile + kv_tiles) * itemsize <= _SHARED_MEMORY_BYTES.get(arch, _SHARED_MEMORY_BYTES["other"])


def forward_registers_per_thread(config: ForwardConfig, qk_dim: int, v_dim: int, itemsize: int) -> float:
    """32-bit registers per thread for the live tiles: the query tile and the float32
    accumulator the program owns, the key and value tiles it streams."""
    words = itemsize / 4
    owned = config.block_m * (qk_dim * words + v_dim)
    return (owned + config.block_n * (qk_dim + v_dim) * words) / (32 * config.num_warps)


def _lighter(config: ForwardConfig) -> ForwardConfig:
    """A config needing about half the shared memory of ``config``."""
    if config.num_stages > 2:
        return ForwardConfig(config.block_m, config.block_n, config.num_warps, 2)
    return ForwardConfig(config.block_m, max(16, config.block_n // 2), config.num_warps, config.num_stages)


def forward_configs(device, dtype, qk_dim_rounded: int, v_dim_rounded: int, autotune: bool,
                    mods_read_tensors: bool = False) -> list[ForwardConfig]:
    """The default config for this GPU/dtype/head dim, plus the autotuning candidates if asked;
    configs that would not fit in shared memory (or, in float32, in the register budget even
    with 8 warps) are dropped before anything compiles.

    Mods that gather from captured tensors need layout-conversion scratch in shared memory that
    no estimate sees in advance: then a lighter config is offered beside the default, and
    Inductor keeps whichever compiles (and runs faster).
    """
    arch = architecture(device)
    low_precision = dtype in (torch.float16, torch.bfloat16)
    bucket = _head_dim_bucket(max(qk_dim_rounded, v_dim_rounded))
    default = _DEFAULT_FORWARD.get((arch, bucket, low_precision), ForwardConfig(64, 32, 4, 2))
    candidates = [default]
    if mods_read_tensors and _lighter(default) != default:
        candidates.append(_lighter(default))
    if autotune:
        candidates += [c for c in _AUTOTUNE_FORWARD if c not in candidates]
    itemsize = torch.empty((), dtype=dtype).element_size()

    def usable(config):
        return runnable(config, dtype, lambda c: fits_shared_memory(c, qk_dim_rounded, v_dim_rounded, itemsize, arch),
                        lambda c: forward_registers_per_thread(c, qk_dim_rounded, v_dim_rounded, itemsize))

    fitting = list(dict.fromkeys(c for c in map(usable, candidates) if c is not None))
    if fitting:
        return fitting
    # Shrink the default until it fits: every head dim the template accepts has one.
    config = default
    while usable(config) is None:
        if config.num_stages > 1:
            config = ForwardConfig(config.block_m, config.block_n, config.num_warps, config.num_stages - 1)
        elif config.block_n > 16:
            config = ForwardConfig(config.block_m, config.block_n // 2, config.num_warps, config.num_stages)
        elif config.block_m > 16:
            config = ForwardConfig(config.block_m // 2, config.block_n, config.num_warps, config.num_stages)
        else:
            return [config]
    return [usable(config)]


def fit_tile(sparse_block: int, preferred: int, length: int) -> int:
    """Tile (power of two, 16..preferred) to walk a sparse block of ``sparse_block`` positions.

    A tile that divides the block wastes nothing and is taken when it exists at the preferred
    size; otherwise the cost ``tiles × (tile + 32)`` (the 32 stands for the fixed cost of a
    step) balances masked-out waste against small, slow tiles.
    """
    span = min(sparse_block, max(length, 1))  # a block longer than the sequence is the sequence
    if span % preferred == 0:
        return preferred
    candidates = [t for t in (16, 32, 64, 128) if t <= preferred] or [16]
    return min(candidates, key=lambda t: (-(-span // t)) * (t + 32) - t * 1e-3)


# ---------------------------------------------------------------------------------------------
# Decode (short queries, ``templates/decode.py.jinja``): a tile of ROWS packed query rows walks
# BLOCK_N keys at a time; the KV sequence is split across programs.
#
# Constraints: block_n is a power of two >= 16, num_warps one of 2/4/8, num_stages >= 1, and the
# q tile plus num_stages k and v tiles fit in shared memory (``decode_fits_shared_memory``).
# The defaults are first guesses, to be measured (``benchmarks/bench.py --decode``).
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeConfig:
    """One decode-kernel configuration (see the section comment for the constraints)."""

    block_n: int
    num_warps: int
    num_stages: int


# (arch, head_dim bucket, low precision?) -> default. Decode is bound by reading K and V, so the
# tile over KV and the pipelining depth (bytes in flight) matter more than the math.
_DEFAULT_DECODE = {
    ("sm90", 64, True): DecodeConfig(128, 4, 3),
    ("sm90", 128, True): DecodeConfig(64, 4, 4),
    ("sm90", 256, True): DecodeConfig(32, 4, 3),
    ("sm90", 64, False): DecodeConfig(64, 4, 3),
    ("sm90", 128, False): DecodeConfig(32, 4, 3),
    ("sm90", 256, False): DecodeConfig(16, 4, 2),
    ("sm80", 64, True): DecodeConfig(64, 4, 3),
    ("sm80", 128, True): DecodeConfig(64, 4, 3),
    ("sm80", 256, True): DecodeConfig(32, 4, 2),
    ("sm80", 64, False): DecodeConfig(64, 4, 2),
    ("sm80", 128, False): DecodeConfig(32, 4, 2),
    ("sm80", 256, False): DecodeConfig(16, 4, 2),
}

# Extra candidates tried under mode="max-autotune".
_AUTOTUNE_DECODE = [
    DecodeConfig(32, 2, 3),
    DecodeConfig(64, 2, 3),
    DecodeConfig(64, 4, 3),
    DecodeConfig(64, 4, 5),
    DecodeConfig(128, 4, 2),
    DecodeConfig(128, 4, 3),
    DecodeConfig(128, 8, 3),
]

# Splitting the KV sequence: aim at DECODE_PROGRAMS_PER_SM programs per SM, but give each split
# at least DECODE_MIN_SPLIT_POSITIONS keys (the merge costs one more partial per split) and at
# most DECODE_MAX_SPLITS splits. Off GPU (Triton's interpreter) a fixed SM count stands in.
DECODE_PROGRAMS_PER_SM = 2
DECODE_MIN_SPLIT_POSITIONS = 256
DECODE_MAX_SPLITS = 64
DECODE_SM_COUNT_OFF_GPU = 8


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the GPU (a fixed stand-in off GPU)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DECODE_SM_COUNT_OFF_GPU


def decode_splits(programs_per_split: int, kv_len: int, sms: int) -> int:
    """How many ranges to cut the KV sequence into: enough programs to fill the GPU, none of
    them shorter than DECODE_MIN_SPLIT_POSITIONS keys.

    Between half and twice the wanted count, the split count whose programs fill the last
    wave of SMs best wins (ties: the one nearest the wanted count): 320 programs on 132 SMs
    leave the third wave 40% empty, 256 or 384 do not.
    """
    programs_per_split = max(programs_per_split, 1)
    wanted = -(-DECODE_PROGRAMS_PER_SM * sms // programs_per_split)
    limit = max(1, min(-(-kv_len // DECODE_MIN_SPLIT_POSITIONS), DECODE_MAX_SPLITS))
    if wanted >= limit:
        return limit

    def filled(splits: int) -> float:
        programs = splits * programs_per_split
        return programs / (-(-programs // sms) * sms)

    candidates = range(max(1, wanted // 2), min(limit, 2 * wanted) + 1)
    return max(candidates, key=lambda s: (round(filled(s), 3), -abs(s - wanted)))


def decode_fits_shared_memory(config: DecodeConfig, rows: int, qk_dim: int, v_dim: int, itemsize: int,
                              arch: str) -> bool:
    """q tile once, k and v tiles per pipeline stage: a conservative estimate of shared memory."""
    q_tile = rows * qk_dim
    kv_tiles = config.num_stages * config.block_n * (qk_dim + v_dim)
    return (q_tile + kv_tiles) * itemsize <= _SHARED_MEMORY_BYTES.get(arch, _SHARED_MEMORY_BYTES["other"])


def decode_configs(device, dtype, rows: int, qk_dim_rounded: int, v_dim_rounded: int,
                   autotune: bool) -> list[DecodeConfig]:
    """The default decode config for this GPU/dtype/head dim, plus the autotuning candidates if
    asked; configs that would not fit in shared memory are dropped (the default is shrunk,
    stages then block_n, until it fits)."""
    arch = architecture(device)
    low_precision = dtype in (torch.float16, torch.bfloat16)
    bucket = _head_dim_bucket(max(qk_dim_rounded, v_dim_rounded))
    default = _DEFAULT_DECODE.get((arch, bucket, low_precision), DecodeConfig(32, 4, 2))
    candidates = [default]
    if autotune:
        candidates += [c for c in _AUTOTUNE_DECODE if c not in candidates]
    itemsize = torch.empty((), dtype=dtype).element_size()
    fitting = [c for c in candidates
               if decode_fits_shared_memory(c, rows, qk_dim_rounded, v_dim_rounded, itemsize, arch)]
    if fitting:
        return fitting
    config = default
    while not decode_fits_shared_memory(config, rows, qk_dim_rounded, v_dim_rounded, itemsize, arch):
        if config.num_stages > 1:
            config = DecodeConfig(config.block_n, config.num_warps, config.num_stages - 1)
        elif config.block_n > 16:
            config = DecodeConfig(config.block_n // 2, config.num_warps, config.num_stages)
        else:
            break
    return [config]


# ---------------------------------------------------------------------------------------------
# Backward kernel configurations.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackwardConfig:
    """One backward-kernel configuration.

    ``block_m1`` x ``block_n1``: the query tile streamed by a dK/dV program x the key/value rows
    it owns; ``block_m2`` x ``block_n2``: the query rows a dQ program owns x the key/value tile it
    streams. All four are powers of two >= 16; num_warps is one of 2/4/8; num_stages >= 1; the
    tiles for num_stages pipeline stages fit in shared memory (``backward_fits_shared_memory``).
    """

    block_m1: int
    block_n1: int
    block_m2: int
    block_n2: int
    num_warps: int
    num_stages: int


# (arch, head_dim bucket, low precision?) -> default.
_DEFAULT_BACKWARD = {
    ("sm90", 64, True): BackwardConfig(64, 128, 128, 64, 8, 3),
    ("sm90", 128, True): BackwardConfig(64, 128, 128, 64, 8, 3),
    ("sm90", 256, True): BackwardConfig(64, 64, 64, 64, 4, 2),
    ("sm90", 64, False): BackwardConfig(32, 64, 64, 32, 4, 2),
    ("sm90", 128, False): BackwardConfig(32, 64, 64, 32, 4, 1),
    ("sm90", 256, False): BackwardConfig(16, 32, 32, 16, 4, 1),
    ("sm80", 64, True): BackwardConfig(64, 64, 64, 64, 4, 3),
    ("sm80", 128, True): BackwardConfig(64, 64, 64, 64, 4, 2),
    ("sm80", 256, True): BackwardConfig(32, 64, 64, 32, 4, 1),
    ("sm80", 64, False): BackwardConfig(32, 64, 64, 32, 4, 2),
    ("sm80", 128, False): BackwardConfig(32, 32, 32, 32, 4, 1),
    ("sm80", 256, False): BackwardConfig(16, 32, 32, 16, 4, 1),
}

# Extra candidates tried under mode="max-autotune".
_AUTOTUNE_BACKWARD = [
    BackwardConfig(64, 128, 128, 64, 8, 3),
    BackwardConfig(64, 128, 128, 64, 8, 2),
    BackwardConfig(64, 128, 128, 64, 4, 3),
    BackwardConfig(32, 128, 128, 32, 4, 3),
    BackwardConfig(64, 64, 64, 64, 4, 3),
    BackwardConfig(64, 64, 64, 64, 4, 2),
    BackwardConfig(32, 64, 64, 32, 4, 2),
    BackwardConfig(32, 32, 32, 32, 4, 1),
]


# Where small sparse blocks shrink a config's tiles (64-row query / 64-column key blocks under a
# 128-wide config), fewer pipeline stages run faster at some head dims. H200, 2026-12-02, bf16
# fwd+bwd with 64x64 tiles and 4 warps: causal D128 S8192 5.79 ms with three stages, 4.95 with
# two; sliding window D128 1.76 -> 1.46; causal D128 S2048 1.81 -> 1.52. At D64 three stay
# faster (5.61 against 6.16 ms), as they do for unshrunk 128-wide tiles at D128.
_SHRUNK_TILE_STAGES = {("sm90", 128, True): 2}


def backward_launch(config: BackwardConfig, block_m2: int, block_n1: int, device, dtype,
                    qk_dim_rounded: int, v_dim_rounded: int) -> tuple[int, int]:
    """(num_warps, num_stages) for ``config`` run with dQ row tiles of ``block_m2`` and dK/dV row
    tiles of ``block_n1`` (``fit_tile`` may shrink them below the config's to fit sparse blocks):
    the warps scale with the owned tiles (at least 4), the stages follow _SHRUNK_TILE_STAGES."""
    scale = min(block_m2 / config.block_m2, block_n1 / config.block_n1)
    num_warps = max(4, int(config.num_warps * scale))
    num_stages = config.num_stages
    if scale < 1:
        key = (architecture(device), _head_dim_bucket(max(qk_dim_rounded, v_dim_rounded)),
               dtype in (torch.float16, torch.bfloat16))
        num_stages = min(num_stages, _SHRUNK_TILE_STAGES.get(key, num_stages))
    return num_warps, num_stages


def backward_shared_memory_bytes(config: BackwardConfig, qk_dim: int, v_dim: int, itemsize: int) -> int:
    """A conservative estimate: the larger of the two program kinds of the kernel.

    dK/dV program: its K and V rows, num_stages query and dO tiles, and the pᵀ/dsᵀ tile staged
    for the matmuls. dQ program: its Q and dO rows, num_stages K and V tiles, and the ds tile.
    """
    kv_rows = config.block_n1 * (qk_dim + v_dim)
    q_tiles = config.num_stages * config.block_m1 * (qk_dim + v_dim)
    scratch1 = config.block_n1 * config.block_m1
    q_rows = config.block_m2 * (qk_dim + v_dim)
    kv_tiles = config.num_stages * config.block_n2 * (qk_dim + v_dim)
    scratch2 = config.block_m2 * config.block_n2
    return max(kv_rows + q_tiles + scratch1, q_rows + kv_tiles + scratch2) * itemsize


def backward_fits_shared_memory(config: BackwardConfig, qk_dim: int, v_dim: int, itemsize: int, arch: str) -> bool:
    limit = _SHARED_MEMORY_BYTES.get(arch, _SHARED_MEMORY_BYTES["other"])
    return backward_shared_memory_bytes(config, qk_dim, v_dim, itemsize) <= limit


def backward_registers_per_thread(config: BackwardConfig, qk_dim: int, v_dim: int, itemsize: int) -> float:
    """32-bit registers per thread for the live tiles of the heavier program kind (inputs at
    ``itemsize``, accumulators in float32): dK/dV owns K, V, dK, dV and streams Q, dO; dQ owns
    Q, dO, dQ and streams K, V."""
    words = itemsize / 4
    kv_program = config.block_n1 * (qk_dim + v_dim) * (words + 1) + config.block_m1 * (qk_dim + v_dim) * words
    q_program = config.block_m2 * ((qk_dim + v_dim) * words + qk_dim) + config.block_n2 * (qk_dim + v_dim) * words
    return max(kv_program, q_program) / (32 * config.num_warps)


def _lighter_backward(config: BackwardConfig) -> BackwardConfig:
    """A config needing about half the shared memory (and registers) of ``config``."""
    if config.num_stages > 1:
        return BackwardConfig(config.block_m1, config.block_n1, config.block_m2, config.block_n2,
                              config.num_warps, 1)
    return BackwardConfig(max(16, config.block_m1 // 2), max(16, config.block_n1 // 2),
                          max(16, config.block_m2 // 2), max(16, config.block_n2 // 2),
                          config.num_warps, config.num_stages)


def _shrink_backward(config: BackwardConfig) -> BackwardConfig | None:
    """One step smaller: stages first, then the streamed tiles, then the owned rows."""
    c = config
    if c.num_stages > 1:
        return BackwardConfig(c.block_m1, c.block_n1, c.block_m2, c.block_n2, c.num_warps, c.num_stages - 1)
    if c.block_m1 > 16 or c.block_n2 > 16:
        return BackwardConfig(max(16, c.block_m1 // 2), c.block_n1, c.block_m2, max(16, c.block_n2 // 2),
                              c.num_warps, c.num_stages)
    if c.block_n1 > 16 or c.block_m2 > 16:
        return BackwardConfig(c.block_m1, max(16, c.block_n1 // 2), max(16, c.block_m2 // 2), c.block_n2,
                              c.num_warps, c.num_stages)
    return None


def backward_configs(device, dtype, qk_dim_rounded: int, v_dim_rounded: int, autotune: bool,
                     mods_read_tensors: bool = False) -> list[BackwardConfig]:
    """The default backward config for this GPU/dtype/head dim (plus a lighter one when the mods
    gather from captured tensors, whose layout-conversion scratch no estimate sees), plus the
    autotuning candidates if asked; configs that would not fit in shared memory (or, in float32,
    in the register budget even with 8 warps) are pruned before anything compiles, and if none
    is left the default is shrunk until it fits."""
    arch = architecture(device)
    low_precision = dtype in (torch.float16, torch.bfloat16)
    bucket = _head_dim_bucket(max(qk_dim_rounded, v_dim_rounded))
    default = _DEFAULT_BACKWARD.get((arch, bucket, low_precision), BackwardConfig(32, 32, 32, 32, 4, 1))
    candidates = [default]
    if mods_read_tensors and _lighter_backward(default) != default:
        candidates.append(_lighter_backward(default))
    if autotune:
        candidates += [c for c in _AUTOTUNE_BACKWARD if c not in candidates]
    itemsize = torch.empty((), dtype=dtype).element_size()

    def usable(config):
        return runnable(config, dtype,
                        lambda c: backward_fits_shared_memory(c, qk_dim_rounded, v_dim_rounded, itemsize, arch),
                        lambda c: backward_registers_per_thread(c, qk_dim_rounded, v_dim_rounded, itemsize))

    fitting = list(dict.fromkeys(c for c in map(usable, candidates) if c is not None))
    if fitting:
        return fitting
    config = default
    while usable(config) is None:
        smaller = _shrink_backward(config)
        if smaller is None:
            return [config]
        config = smaller
    return [usable(config)]
