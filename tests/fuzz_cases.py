"""Random flex_attention cases for property-based fuzzing: hypothesis strategies and the runner.

A *structure* is what one compiled graph is specialised on: the composition of mods, dtype,
heads, head dims, block size, scale, aux outputs, which captured tensors get gradients. A
*case* is one call under a structure: one of the structure's few shapes and fresh random data
(seeded by hypothesis, so a failure replays). One hypothesis example is one structure and its
cases, so a compiled graph serves several cases (Dynamo's cache, automatic dynamic shapes)
and compile time stays a fraction of the run.

Every case runs ``torch.compile(flex_attention, fullgraph=True)`` forward and backward (q, k,
v and every captured tensor that requires grad) and is checked against the float64 oracle of
``oracle.py``: error at most 2x the same-dtype reference's, no NaN, and rows with nothing
attended give a zero output and finite gradients.
"""

import math
import time
import warnings
from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st

import oracle
from catalogue import BY_NAME, Variant
from inductor_flex import AuxRequest, and_masks, create_block_mask, flex_attention, noop_mask, or_masks
from inductor_flex.block_mask import full_block_mask
from inductor_flex.reference import attention_reference


# ------------------------------------------------------------------ pieces beyond the catalogue
# Mods reading b and h (the catalogue's masks read neither), a score_mod that masks by -inf,
# captured tensors indexed by kv_idx, by h, by a bucket of the distance, or read whole, and
# floor divisions of the indices (Inductor's C++ loop split mishandles those).

def _head_window(buffers):
    def head_window(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= 8 * (h + 1)

    return None, head_window


def _batch_prefix(buffers):
    def batch_prefix(b, h, q_idx, kv_idx):
        return kv_idx <= 16 * b + q_idx // 2

    return None, batch_prefix


def _score_mask(buffers):
    # Rows q_idx < 3 have every score -inf: fully masked by the score_mod, not the mask_mod.
    def score_mask(score, b, h, q_idx, kv_idx):
        return torch.where(kv_idx <= q_idx - 3, score, -float("inf"))

    return score_mask, None


def _chunked_causal(buffers, chunk=32):
    def chunked_causal(b, h, q_idx, kv_idx):
        return q_idx // chunk >= kv_idx // chunk

    return None, chunked_causal


def _bucket_bias(buffers, bucket=16):
    table = buffers["buckets"]

    def bucket_bias(score, b, h, q_idx, kv_idx):
        return score + table[h, (q_idx - kv_idx).abs() // bucket]

    return bucket_bias, None


def _bucket_buffers(B, H, L, S, device, bucket=16):
    # Sequences shorter than a bucket give a table of one bucket (test_one_bucket_table_gradient).
    return {"buckets": torch.randn(H, max(L, S) // bucket + 1, device=device) * 0.5}


def _kv_bias(buffers):
    bias = buffers["kv_bias"]

    def kv_bias(score, b, h, q_idx, kv_idx):
        return score + bias[kv_idx]

    return kv_bias, None


def _head_scale(buffers):
    head_scale = buffers["head_scale"]

    def per_head_scale(score, b, h, q_idx, kv_idx):
        return score * head_scale[h]

    return per_head_scale, None


def _scalar_weight(buffers):
    weight = buffers["weight"]

    def weighted(score, b, h, q_idx, kv_idx):
        return score * weight

    return weighted, None


FUZZ_PIECES = {
    v.name: v
    for v in (
        Variant("head_window", _head_window),
        Variant("batch_prefix", _batch_prefix),
        Variant("score_mask", _score_mask),
        Variant("chunked_causal", _chunked_causal),
        Variant("bucket_bias", _bucket_bias, _bucket_buffers, learnable=("buckets",)),
        Variant("kv_bias", _kv_bias, lambda B, H, L, S, device: {"kv_bias": torch.randn(S, device=device) * 0.5},
                learnable=("kv_bias",)),
        Variant("head_scale", _head_scale,
                lambda B, H, L, S, device: {"head_scale": 0.5 + torch.rand(H, device=device)},
                learnable=("head_scale",)),
        Variant("scalar_weight", _scalar_weight,
                lambda B, H, L, S, device: {"weight": 0.5 + torch.rand((), device=device)}, learnable=("weight",)),
    )
}
PIECES = {**BY_NAME, **FUZZ_PIECES}
MASK_PIECES = ("causal", "sliding_window", "prefix_lm", "document", "dilated", "global_local", "head_window",
               "batch_prefix", "chunked_causal")
SCORE_PIECES = ("alibi", "softcap", "relative_position", "head_batch_bias", "learnable_bias", "score_mask", "kv_bias",
                "head_scale", "scalar_weight", "bucket_bias")


# ------------------------------------------------------------------ one structure, built
def _mask_leaves(spec):
    """The leaf names of a mask tree, depth first (their buffers are named by this order)."""
    if spec is None:
        return []
    if isinstance(spec, str):
        return [spec]
    return [leaf for child in spec[1] for leaf in _mask_leaves(child)]


def _slot(buffers, prefix):
    return {name[len(prefix):]: t for name, t in buffers.items() if name.startswith(prefix)}


def _build_mask(spec, buffers, leaf_counter):
    if isinstance(spec, str):
        slot = next(leaf_counter)
        return PIECES[spec].build(_slot(buffers, f"m{slot}."))[1]
    combine = and_masks if spec[0] == "and" else or_masks
    return combine(*(_build_mask(child, buffers, leaf_counter) for child in spec[1]))


def _compose(score_mods):
    if len(score_mods) == 1:
        return score_mods[0]

    def composed(score, b, h, q_idx, kv_idx):
        for score_mod in score_mods:
            score = score_mod(score, b, h, q_idx, kv_idx)
        return score

    return composed


def _describe_mask(spec):
    if spec is None or isinstance(spec, str):
        return str(spec)
    return f"{spec[0]}(" + ", ".join(_describe_mask(child) for child in spec[1]) + ")"


@dataclass(frozen=True)
class Structure:
    """What one compiled graph is specialised on (everything but the shape and the data)."""

    device: str
    dtype: torch.dtype
    Hq: int
    Hkv: int
    E: int
    Ev: int
    mask: object  # None, a piece name, or ("and" | "or", (children...))
    score: tuple  # score pieces applied in order
    grads_for_captures: tuple  # per score piece: its learnable buffers require grad
    block_size: object  # int or (q_block, kv_block)
    use_block_mask: bool  # without a mask: pass None, or a BlockMask of noop_mask
    mask_per_batch: bool  # create_block_mask with B (else None: broadcast)
    mask_per_head: bool
    enable_gqa: bool
    broadcast_kv_batch: bool  # key/value batch 1
    scale: float | None
    aux: str  # "none" | "return_lse" | "lse" | "lse_max"
    # score_mod's captured tensors computed inside the compiled function (``t * 1``) rather than
    # passed in: autograd must carry their gradients back through the graph to the leaves.
    captures_in_graph: bool = False

    def __str__(self):
        return (f"{self.device} {str(self.dtype)[6:]} Hq={self.Hq} Hkv={self.Hkv} E={self.E} Ev={self.Ev} "
                f"mask={_describe_mask(self.mask)} score={'+'.join(self.score) or None} "
                f"grads={self.grads_for_captures} block={self.block_size} block_mask={self.use_block_mask} "
                f"mask_bh=({self.mask_per_batch}, {self.mask_per_head}) gqa={self.enable_gqa} "
                f"kv_batch1={self.broadcast_kv_batch} scale={self.scale} aux={self.aux} "
                f"captures_in_graph={self.captures_in_graph}")

    def variant(self) -> Variant:
        """The composed mods as a catalogue Variant, so oracle.py's reference runs them."""
        leaves = _mask_leaves(self.mask)

        def make_buffers(B, H, L, S, device):
            buffers = {}
            for prefix, names in (("m", leaves), ("s", self.score)):
                for slot, name in enumerate(names):
                    for key, t in PIECES[name].make_buffers(B, H, L, S, device).items():
                        buffers[f"{prefix}{slot}.{key}"] = t
            return buffers

        def build(buffers):
            score_mods = [PIECES[name].build(_slot(buffers, f"s{slot}."))[0] for slot, name in enumerate(self.score)]
            mask_mod = _build_mask(self.mask, buffers, iter(range(len(leaves)))) if self.mask is not None else None
            return (_compose(score_mods) if score_mods else None), mask_mod

        learnable = tuple(
            f"s{slot}.{key}"
            for slot, (name, wanted) in enumerate(zip(self.score, self.grads_for_captures))
            if wanted for key in PIECES[name].learnable
        )
        return Variant(str(self), build, make_buffers, learnable)


@dataclass(frozen=True)
class Shape:
    B: int
    Lq: int
    Lkv: int


@dataclass(frozen=True)
class Profile:
    """How wide the draws are, and how many cases share one structure (one compile)."""

    device: str
    dtypes: tuple
    max_len: int
    shapes_per_structure: int
    cases_per_structure: int
    mask_pieces: tuple = MASK_PIECES
    score_pieces: tuple = SCORE_PIECES


CPU_PROFILE = Profile("cpu", (torch.float32, torch.bfloat16, torch.float16), max_len=300,
                      shapes_per_structure=2, cases_per_structure=2)
GPU_PROFILE = Profile("cuda", (torch.float32, torch.float16, torch.bfloat16), max_len=512,
                      shapes_per_structure=3, cases_per_structure=40)
# Our Triton templates on CPU tensors, run by Triton's interpreter: short sequences (it is
# slow); float32 and float16 (its numpy emulation of bfloat16 is not faithful; float16 covers
# the half-precision paths, such as the row pass of captured-tensor gradients: 200 cases passed
# on 2026-12-02); no softcap (tanh is absent there); no 0-d captured tensor (Inductor passes a
# 0-d CPU tensor to a Triton kernel as a Python scalar, which a GPU run never sees).
INTERPRETER_PROFILE = Profile(
    "cpu", (torch.float32, torch.float16), max_len=48, shapes_per_structure=1, cases_per_structure=1,
    score_pieces=tuple(name for name in SCORE_PIECES if name not in ("softcap", "scalar_weight")))

HEAD_DIMS = (4, 8, 16, 24, 32, 64, 80)
BLOCK_SIZES = (16, 32, 48, 64, 100, 128)


# ------------------------------------------------------------------ strategies
def mask_trees(pieces):
    """A mask piece, or and_masks / or_masks of up to three, nested."""
    return st.recursive(
        st.sampled_from(pieces),
        lambda children: st.tuples(st.sampled_from(("and", "or")),
                                   st.lists(children, min_size=1, max_size=3).map(tuple)),
        max_leaves=3,
    )


@st.composite
def structures(draw, profile: Profile):
    Hkv = draw(st.integers(1, 3))
    group = draw(st.integers(1, 4))
    mask = draw(st.none() | mask_trees(profile.mask_pieces))
    score = tuple(draw(st.lists(st.sampled_from(profile.score_pieces), max_size=2)))
    one_block = st.sampled_from(BLOCK_SIZES)
    block_size = draw(one_block | st.tuples(one_block, one_block))
    E = draw(st.sampled_from(HEAD_DIMS))
    # A scale within [1/4, 2] of the default. Far larger ones make scores of |s| ~ 40 in float32,
    # where any backward recomputing p = exp(s - lse) from the forward's lse (ours, torch's)
    # is 2-4x less accurate than the reference's softmax: the oracle's 2x rule does not hold.
    scale = draw(st.none() | st.floats(0.25, 2.0).map(lambda factor: factor / math.sqrt(E)))
    return Structure(
        device=profile.device,
        dtype=draw(st.sampled_from(profile.dtypes)),
        Hq=Hkv * group,
        Hkv=Hkv,
        E=E,
        Ev=draw(st.sampled_from(HEAD_DIMS)),
        mask=mask,
        score=score,
        grads_for_captures=tuple(draw(st.booleans()) or draw(st.booleans()) for _ in score),  # mostly True
        block_size=block_size,
        use_block_mask=mask is not None or draw(st.booleans()),
        mask_per_batch=draw(st.booleans()),
        mask_per_head=draw(st.booleans()),
        enable_gqa=group > 1 or draw(st.booleans()),
        broadcast_kv_batch=draw(st.integers(0, 3)) == 0,
        scale=scale,
        aux=draw(st.sampled_from(("none", "return_lse", "lse", "lse_max"))),
        captures_in_graph=bool(score) and draw(st.integers(0, 3)) == 0,
    )


def lengths(profile: Profile, block_size):
    """Any length up to max_len, or one at a sparse-block or kernel-tile boundary, ±1."""
    blocks = block_size if isinstance(block_size, tuple) else (block_size,)
    edges = sorted({n * b + d for b in (*blocks, 16, 64, 128) for n in (1, 2) for d in (-1, 0, 1)})
    edges = [n for n in edges if 1 <= n <= profile.max_len]
    return st.sampled_from(edges) | st.integers(1, profile.max_len) | st.integers(1, 8)


@st.composite
def fuzz_examples(draw, profile: Profile):
    """One structure, a few shapes, and its cases: (structure, [(shape, data seed), ...])."""
    structure = draw(structures(profile))
    shape = st.builds(Shape, st.integers(1, 3), lengths(profile, structure.block_size),
                      lengths(profile, structure.block_size))
    shapes = draw(st.lists(shape, min_size=1, max_size=profile.shapes_per_structure, unique=True))
    cases = draw(st.lists(st.tuples(st.sampled_from(shapes), st.integers(0, 2**31 - 1)),
                          min_size=profile.cases_per_structure, max_size=profile.cases_per_structure))
    return structure, cases


# ------------------------------------------------------------------ the runner
@dataclass
class FuzzStats:
    """Counters printed at the end of a run (to tune a profile's size to its time budget)."""

    structures: int = 0
    cases: int = 0
    seconds: float = 0.0
    names: dict = field(default_factory=dict)

    def summary(self):
        return (f"{self.structures} structures, {self.cases} cases in {self.seconds:.1f} s "
                f"({self.seconds / max(self.cases, 1):.2f} s a case)")


def compiled_flex(structure: Structure | None = None):
    """flex_attention compiled; with ``captures_in_graph``, a compiled function that takes the
    captured tensors as arguments and builds score_mod inside from copies made there."""
    if structure is None or not structure.captures_in_graph:
        return torch.compile(flex_attention, fullgraph=True)
    variant = structure.variant()

    def attention(q, k, v, buffers, **kwargs):
        derived = {name: t * 1 if t.is_floating_point() else t for name, t in buffers.items()}
        return flex_attention(q, k, v, score_mod=variant.build(derived)[0], **kwargs)

    return torch.compile(attention, fullgraph=True)


def run_example(structure: Structure, cases, stats: FuzzStats | None = None):
    """Every case of one structure through one compiled callable; a fresh Dynamo state first,
    so what earlier structures made dynamic (automatic dynamic shapes) does not leak in."""
    torch._dynamo.reset()
    compiled = compiled_flex(structure)
    started = time.perf_counter()
    for shape, data_seed in cases:
        run_case(structure, shape, data_seed, compiled)
    if stats is not None:
        stats.structures += 1
        stats.cases += len(cases)
        stats.seconds += time.perf_counter() - started


def _call(compiled, structure, q, k, v, score_mod, buffers, block_mask):
    kwargs = dict(block_mask=block_mask, scale=structure.scale, enable_gqa=structure.enable_gqa)
    if structure.captures_in_graph:
        kwargs["buffers"] = buffers
    else:
        kwargs["score_mod"] = score_mod
    if structure.aux == "none":
        return compiled(q, k, v, **kwargs), None, None
    if structure.aux == "return_lse":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            out, lse = compiled(q, k, v, return_lse=True, **kwargs)
        return out, lse, None
    out, aux = compiled(q, k, v, return_aux=AuxRequest(lse=True, max_scores=structure.aux == "lse_max"), **kwargs)
    return out, aux.lse, aux.max_scores


def run_case(structure: Structure, shape: Shape, data_seed: int, compiled=None):
    """One call, forward and backward, checked against the float64 oracle."""
    s, (B, Lq, Lkv) = structure, (shape.B, shape.Lq, shape.Lkv)
    device = s.device
    torch.manual_seed(data_seed)
    variant = s.variant()
    buffers = variant.make_buffers(B, s.Hq, Lq, Lkv, device)
    for name in variant.learnable:
        buffers[name].requires_grad_(True)
    kv_batch = 1 if s.broadcast_kv_batch else B
    inputs = {
        "q": torch.randn(B, s.Hq, Lq, s.E, device=device, dtype=s.dtype, requires_grad=True),
        "k": torch.randn(kv_batch, s.Hkv, Lkv, s.E, device=device, dtype=s.dtype, requires_grad=True),
        "v": torch.randn(kv_batch, s.Hkv, Lkv, s.Ev, device=device, dtype=s.dtype, requires_grad=True),
    }
    score_mod, mask_mod = variant.build(buffers)
    block_mask = None
    if s.use_block_mask:
        block_mask = create_block_mask(mask_mod or noop_mask, B if s.mask_per_batch else None,
                                       s.Hq if s.mask_per_head else None, Lq, Lkv, device=device,
                                       BLOCK_SIZE=s.block_size)
    fields = (block_mask or full_block_mask(Lq, Lkv, device=device)).as_tuple()
    scale = 1.0 / math.sqrt(s.E) if s.scale is None else s.scale

    out, lse, max_scores = _call(compiled or compiled_flex(s), s, inputs["q"], inputs["k"], inputs["v"],
                                 score_mod, buffers, block_mask)
    grad_out = torch.randn_like(out)
    grad_lse = torch.zeros(B, s.Hq, Lq, device=device, dtype=torch.float64)
    loss = (out.double() * grad_out.double()).sum()
    if lse is not None:
        grad_lse = torch.randn_like(grad_lse) * 0.1
        loss = loss + (torch.where(torch.isfinite(lse), lse, 0).double() * grad_lse).sum()
    differentiable = {n: t for n, t in (*inputs.items(), *buffers.items()) if t.requires_grad}
    ours = dict(zip(differentiable, torch.autograd.grad(loss, list(differentiable.values()))))

    (gold_out, gold_lse, gold_grads), (base_out, base_lse, base_grads) = oracle.gold_and_baseline(
        variant, inputs, buffers, fields, scale, grad_out, grad_lse)
    label = f"[{s}] B={B} Lq={Lq} Lkv={Lkv} seed={data_seed}"
    oracle.assert_within(f"{label} out", out, gold_out, base_out)
    if lse is not None:
        oracle.assert_within(f"{label} lse", lse, gold_lse, base_lse)
    gold_max = _reference_max(oracle._gold_copies, variant, inputs, buffers, fields, scale)
    if max_scores is not None:
        base_max = _reference_max(oracle._same_dtype_copies, variant, inputs, buffers, fields, scale)
        oracle.assert_within(f"{label} max_scores", max_scores, gold_max, base_max)

    empty_rows = gold_lse == -math.inf
    if empty_rows.any():
        assert torch.all(out.detach()[empty_rows] == 0), f"{label}: fully masked rows have a nonzero output"
    # How many products each gradient element sums (the helper's round-off floor grows with its
    # square root): dQ sums over the keys, dK and dV over the query rows of every head of the
    # group and every batch sharing the key, a captured tensor over the positions reading it.
    positions = B * s.Hq * Lq * Lkv
    summed = {"q": Lkv, "k": Lq * (s.Hq // s.Hkv) * (B // kv_batch)}
    summed["v"] = summed["k"]
    # Every row attending at most one key (lse == max in float64: Lkv = 1, or as narrow a mask):
    # the softmax gradient dS = P·(dP - Σ P·dP) is exactly zero in the reference, but kernels
    # take Σ dO·O for Σ P·dP (flash-style, equal in exact arithmetic) and leave its round-off,
    # of the size of the cancelled terms rather than of the (small or zero) gold gradient the
    # helper's floor scales with. There the floor is set to that size (via terms_per_element).
    one_key_rows = bool(((gold_lse == gold_max) | empty_rows).all())
    cancelled_ds = (grad_out.abs() * out.detach().abs()).double().sum(-1).max().item()
    q_or_k = max(inputs["q"].detach().abs().max().item(), inputs["k"].detach().abs().max().item())
    # A captured tensor's gradient sums dS over the positions reading it. Where those cover whole
    # rows (a table read at one bucket by every position, a per-head bias), Σ_j dS_ij is exactly
    # zero in the reference, but a flash-style backward (ours, torch's) gets it as the rounding
    # difference between Σ P·dP and the Σ dO·O it takes for it: O rounded to its dtype and
    # accumulated over Lkv keys in float32, each term's round-off of random sign, per row; the
    # rows' errors add with random signs too.
    # A row's error reaches an element of the buffer weighted by how much the row reads it:
    # W_row = d lse_row / d element (1 for a whole row reading one bucket, up to |kv_idx - q_idx|
    # for alibi slopes, which makes long query rows dominate), so the element's error is about
    # sqrt(Σ_rows (|dO·O|_row W_row)²) units of round-off.
    row_terms = (grad_out.double() * out.detach().double()).norm(dim=-1)
    round_off_unit = _sum_round_off_unit(out.dtype, Lkv)
    sensitivity = _row_sensitivity(variant, inputs, buffers, fields, scale, row_terms, data_seed)
    # The backward rebuilds P = exp(s - lse) from the forward's float32 lse (ours, torch's),
    # where the reference keeps its softmax: the exponent carries about two float32 units of
    # |lse| (the stored lse, its log2 form, the product with the score), a relative error of P
    # shared by a row's terms, so of each gradient element (the reference's is one unit of P).
    finite_lse = gold_lse[torch.isfinite(gold_lse)]
    lse_round_off = 2 * torch.finfo(torch.float32).eps * (finite_lse.abs().max().item() if finite_lse.numel() else 0.0)
    # Some rows (not all) attending a single key: there dS is exactly zero in the reference,
    # while the kernel's dS is the difference of two sums of the same Ev products dO·v, Σ dO·O
    # (Inductor's reduction) and dP (the kernel's dot), in different orders: about sqrt(Ev)
    # float32 units of their norm (|dO·O|_row), times |q| or |k| · scale in dK or dQ. A key's
    # dK gathers it from every such row of its heads (and batches, under a broadcast key batch).
    one_key_allowance = {}
    single = (gold_lse == gold_max) & torch.isfinite(gold_lse)
    if single.any() and not one_key_rows:
        per_row = row_terms[single].max().item() * q_or_k * scale * _sum_round_off_unit(out.dtype, s.Ev)
        sharing = single.reshape(B, s.Hkv, s.Hq // s.Hkv, Lq).sum((2, 3))
        sharing = sharing.sum(0) if kv_batch == 1 else sharing
        one_key_allowance = {"q": per_row, "k": per_row * math.sqrt(sharing.max().item())}
    for name, grad in ours.items():
        assert torch.isfinite(grad).all(), f"{label} d{name}: not finite"
        finite_gold = gold_grads[name][torch.isfinite(gold_grads[name])]  # NaN: see oracle.assert_within
        gold_magnitude = finite_gold.abs().max().item() if finite_gold.numel() else 0.0
        terms = positions // max(grad.numel(), 1) if name in buffers else summed[name]
        if one_key_rows and name != "v":
            cancelled = cancelled_ds * (q_or_k * max(scale, 1.0) if name in ("q", "k") else 1.0)
            terms *= max(1.0, cancelled / max(1.0, gold_magnitude)) ** 2
        modelled = (lse_round_off * gold_magnitude + round_off_unit * sensitivity.get(name, 0.0)
                    + one_key_allowance.get(name, 0.0))
        oracle.assert_within(f"{label} d{name}", grad, gold_grads[name], base_grads[name], terms_per_element=terms,
                             modelled_round_off=modelled)


def _sum_round_off_unit(dtype, terms):
    """Relative round-off of a row term taken from O: O's rounding to ``dtype`` and a float32 sum
    of ``terms`` products with random-sign errors."""
    return torch.finfo(dtype).eps + torch.finfo(torch.float32).eps * math.sqrt(terms)


def _row_sensitivity(variant, inputs, buffers, fields, scale, row_weights, data_seed, samples=8):
    """For each captured buffer with a gradient: sqrt(Σ_rows (weight_row · W_row)²) at its largest
    element, W_row = d lse_row / d element, in float64. With random signs c_row (Rademacher), the
    gradient of Σ c_row · weight_row · lse_row is Σ c_row · weight_row · W_row, whose mean square
    over c is that sum of squares; ``samples`` draws estimate it to within about
    sqrt(2 / samples), hence the factor 2."""
    learnable = {n: t for n, t in buffers.items() if t.requires_grad}
    if not learnable:
        return {}
    tensors = {n: t.detach().double() for n, t in inputs.items()}
    captured = {n: t.detach().double().requires_grad_(n in learnable) for n, t in buffers.items()}
    score_mod, mask_mod = variant.build(captured)
    _, lse, _ = attention_reference(tensors["q"], tensors["k"], tensors["v"],
                                    score_mod or (lambda score, b, h, q_idx, kv_idx: score),
                                    fields[:-1] + (mask_mod or fields[-1],), scale)
    lse = torch.where(torch.isfinite(lse), lse, 0.0)
    signs = torch.Generator().manual_seed(data_seed)
    mean_square = {n: 0.0 for n in learnable}
    for i in range(samples):
        c = torch.randint(0, 2, lse.shape, generator=signs).double().mul_(2).sub_(1).to(lse.device) * row_weights
        grads = torch.autograd.grad((lse * c).sum(), [captured[n] for n in learnable], retain_graph=i + 1 < samples,
                                    allow_unused=True)
        for n, g in zip(learnable, grads):
            if g is not None:
                # NaN is autograd's 0 × inf at an element that a -inf score scales; the oracle
                # leaves such elements unchecked (oracle.assert_within), so they weigh nothing.
                mean_square[n] = mean_square[n] + g.nan_to_num(nan=0.0).pow(2) / samples
    return {n: 2.0 * (m.max().sqrt().item() if torch.is_tensor(m) and m.numel() else 0.0)
            for n, m in mean_square.items()}


def _reference_max(copy, variant, inputs, buffers, fields, scale):
    """max_scores of the reference run on ``copy`` of the inputs (float64 or same dtype)."""
    with torch.no_grad():
        tensors, captured = copy(inputs), copy(buffers)
        score_mod, mask_mod = variant.build(captured)
        return attention_reference(
            tensors["q"], tensors["k"], tensors["v"], score_mod or (lambda score, b, h, q, kv: score),
            fields[:-1] + (mask_mod or fields[-1],), scale)[2]
