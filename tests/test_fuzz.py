"""Property-based fuzzing: random structures and shapes through torch.compile, vs the oracle.

Strategies and the case runner live in ``fuzz_cases.py``. Two profiles:

- CPU (``python -m pytest -q`` runs it): a few dozen cases through the Inductor CPU lowering.
- GPU (``pytest -m gpu tests/test_fuzz.py``): >= 1000 cases through our Triton kernels;
  ``INDUCTOR_FLEX_FUZZ_EXAMPLES`` sets the number of cases.

The hypothesis seed is printed; ``INDUCTOR_FLEX_FUZZ_SEED=<seed>`` replays a run. Failures found
so far are pinned below as plain tests.
"""

import dataclasses
import math
import os
import random
import time
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, seed, settings

from fuzz_cases import (CPU_PROFILE, GPU_PROFILE, INTERPRETER_PROFILE, FuzzStats, Shape, Structure, fuzz_examples,
                        run_case, run_example)
from inductor_flex import create_block_mask, flex_attention, noop_mask
from triton_on_cpu import interpreter_requested, run_pytest_in_interpreter, triton_on_cpu

# Hypothesis examples (structures) of the CPU profile, each CPU_PROFILE.cases_per_structure
# cases, and the seconds they may take: examples past the budget are drawn but not run, so
# the tier's time stays bounded on a loaded machine (the summary says how many ran).
CPU_STRUCTURES = 40
CPU_SECONDS = 120
# The GPU profile: INDUCTOR_FLEX_FUZZ_EXAMPLES cases (GPU_PROFILE.cases_per_structure a
# structure), within GPU_SECONDS.
GPU_CASES = 1000
GPU_SECONDS = 450
# Our Triton templates in Triton's interpreter (a subprocess), short sequences.
INTERPRETER_STRUCTURES = 16
INTERPRETER_SECONDS = 30
# After a failure, shrinking may run this much longer (each step compiles).
SHRINK_SECONDS = 240


@pytest.fixture
def quiet():
    with warnings.catch_warnings():
        # A draw the fused kernels refuse (announced, then decomposed) is still a valid case.
        warnings.filterwarnings("ignore", message="inductor_flex")
        yield


class Budget:
    """Runs examples until ``seconds`` have passed; after a failure, shrinking gets
    SHRINK_SECONDS more, and an example that failed always runs again (hypothesis replays it
    to report it)."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.started = time.perf_counter()
        self.failed = set()
        self.skipped = 0

    def allows(self, key):
        limit = self.seconds + (SHRINK_SECONDS if self.failed else 0)
        if key in self.failed or self.seconds <= 0 or time.perf_counter() - self.started < limit:
            return True
        self.skipped += 1
        return False


def _fuzz(profile, structures, seconds, request, *, shrink):
    fuzz_seed = int(os.environ.get("INDUCTOR_FLEX_FUZZ_SEED", random.randrange(2**32)))
    seconds = float(os.environ.get("INDUCTOR_FLEX_FUZZ_SECONDS", seconds))
    print(f"hypothesis seed {fuzz_seed} (replay: INDUCTOR_FLEX_FUZZ_SEED={fuzz_seed})")
    request.node.user_properties.append(("fuzz_seed", fuzz_seed))
    stats, budget = FuzzStats(), Budget(seconds)
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if shrink else [])

    @seed(fuzz_seed)
    @settings(max_examples=structures, deadline=None, database=None, derandomize=False, phases=phases,
              report_multiple_bugs=False, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(fuzz_examples(profile))
    def check(example):
        structure, cases = example
        key = repr(example)
        if not budget.allows(key):
            return
        try:
            run_example(structure, cases, stats)
        except Exception:
            budget.failed.add(key)
            raise

    try:
        check()
    finally:
        skipped = f", {budget.skipped} more drawn past the {seconds:.0f} s budget" if budget.skipped else ""
        print(f"fuzz seed {fuzz_seed}: {stats.summary()}{skipped}")


def test_fuzz_cpu(request, quiet):
    _fuzz(CPU_PROFILE, CPU_STRUCTURES, CPU_SECONDS, request, shrink=True)


def test_fuzz_templates_through_triton_interpreter():
    """A few structures through our Triton templates on CPU tensors (Triton's interpreter), in a
    subprocess: TRITON_INTERPRET must be set before triton is imported."""
    result, output = run_pytest_in_interpreter("-s", str(Path(__file__)), "-k", "in_interpreter", timeout=600)
    print("\n".join(line for line in output.splitlines() if "seed" in line))
    assert result.returncode == 0, output[-8000:]
    interpreted = 1 + len(ONE_KEY_CASES) + len(ROUND_OFF_CASES)  # the fuzz run and the pinned cases
    assert f"{interpreted} passed" in result.stdout, output[-8000:]


@pytest.mark.skipif(not interpreter_requested(), reason="run by test_fuzz_templates_through_triton_interpreter")
def test_fuzz_in_interpreter(request, quiet):
    with triton_on_cpu():
        _fuzz(INTERPRETER_PROFILE, INTERPRETER_STRUCTURES, INTERPRETER_SECONDS, request, shrink=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fuzz_gpu(request, quiet):
    cases = int(os.environ.get("INDUCTOR_FLEX_FUZZ_EXAMPLES", GPU_CASES))
    structures = math.ceil(cases / GPU_PROFILE.cases_per_structure)
    # Shrinking recompiles at every step; off unless asked for (INDUCTOR_FLEX_FUZZ_SHRINK=1).
    _fuzz(GPU_PROFILE, structures, GPU_SECONDS, request, shrink=os.environ.get("INDUCTOR_FLEX_FUZZ_SHRINK") == "1")


# ------------------------------------------------------------------ failures found by fuzzing
def _structure(**overrides):
    fields = dict(device="cpu", dtype=torch.float32, Hq=2, Hkv=2, E=16, Ev=16, mask=None, score=(),
                  grads_for_captures=(), block_size=64, use_block_mask=False, mask_per_batch=False,
                  mask_per_head=False, enable_gqa=False, broadcast_kv_batch=False, scale=None, aux="lse")
    return Structure(**{**fields, **overrides})


@pytest.mark.parametrize("aux", ["return_lse", "lse_max"])
def test_return_lse_under_fullgraph_compile(quiet, aux):
    """Found by fuzzing: return_lse=True under torch.compile(fullgraph=True) failed on the
    deprecation warnings.warn (Dynamo cannot trace it)."""
    run_case(_structure(aux=aux, mask="causal", use_block_mask=True), Shape(2, 37, 29), data_seed=1)


def test_partial_kv_block_with_two_captured_tensors():
    """Found by fuzzing (CPU): with a BlockMask whose KV length is not a multiple of the KV
    block size and a score_mod reading two captured tensors, the scores of the last, partial
    KV block kept their raw values (no scale, no score_mod): Inductor's C++ loop split
    (``CppScheduling.try_loop_split``, torch 2.13) iterates ``S // c * c`` positions of a loop
    indexed by ``kv_idx // c``. Pure torch: ``torch.compile(lambda x, t, w: x * w.view(2, 1)
    * t[torch.arange(200) // 128])`` leaves columns 128..199 wrong."""
    w1, w2 = 0.5 + torch.rand(2), 0.5 + torch.rand(2)

    def two_head_weights(score, b, h, q_idx, kv_idx):
        return score * w1[h] * w2[h]

    q, k, v = (torch.randn(1, 2, length, 8) for length in (4, 200, 200))
    mask = create_block_mask(noop_mask, None, None, 4, 200, device="cpu", BLOCK_SIZE=128)
    with torch._inductor.config.patch(fx_graph_cache=False):
        out = torch.compile(flex_attention, fullgraph=True)(q, k, v, score_mod=two_head_weights, block_mask=mask)
    gold = flex_attention(q.double(), k.double(), v.double(), score_mod=two_head_weights, block_mask=mask)
    torch.testing.assert_close(out.double(), gold, atol=1e-5, rtol=1e-5)


def test_captures_computed_in_the_graph(quiet):
    """The fuzz's captures_in_graph structures (added after the GPU tier found it): score_mod
    captures copies made inside the compiled function; the leaves' gradients were None."""
    structure = _structure(score=("alibi", "head_batch_bias"), grads_for_captures=(True, True), mask="causal",
                           use_block_mask=True, captures_in_graph=True)
    run_case(structure, Shape(2, 37, 29), data_seed=3)


def test_learnable_scale_of_a_minus_infinity_score(quiet):
    """Found by the interpreter fuzz in CI: a per-head learnable scale times a score_mod's -inf
    has an undefined (NaN) reference gradient, which the oracle skips; the round-off model fed
    that NaN into the floor of every element, so an exact gradient failed its check."""
    structure = _structure(Hq=2, Hkv=1, E=4, Ev=4, mask="causal", score=("score_mask", "head_scale"),
                           grads_for_captures=(False, True), block_size=16, use_block_mask=True, enable_gqa=True,
                           broadcast_kv_batch=True, aux="none", captures_in_graph=True)
    run_case(structure, Shape(1, 15, 15), data_seed=0)


ONE_KEY_CASES = [
    (_structure(Hq=3, Hkv=1, E=4, Ev=4, enable_gqa=True, broadcast_kv_batch=True, aux="none"), Shape(1, 15, 1)),
    (_structure(Hq=2, Hkv=1, E=4, Ev=32, score=("alibi", "alibi"), grads_for_captures=(False, False),
                enable_gqa=True, broadcast_kv_batch=True, aux="return_lse"), Shape(1, 15, 1)),
]


@pytest.mark.skipif(not interpreter_requested(), reason="run by test_fuzz_templates_through_triton_interpreter")
@pytest.mark.parametrize("structure,shape", ONE_KEY_CASES, ids=["out", "out_and_lse"])
def test_one_key_gradients_in_interpreter(quiet, structure, shape):
    """Found by fuzzing (backward template, Triton interpreter): with one key (Lkv = 1) the
    softmax part of dQ and dK is zero in exact arithmetic; the kernel's Σ dO·O leaves
    round-off of the cancelled terms' size, which the check must allow for (and no more)."""
    with triton_on_cpu():
        run_case(structure, shape, data_seed=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("structure,shape", ONE_KEY_CASES, ids=["out", "out_and_lse"])
def test_one_key_gradients_gpu(quiet, structure, shape):
    run_case(dataclasses.replace(structure, device="cuda"), shape, data_seed=0)


def _replay(pinned, device=None):
    """Run a pinned case, (structure, shape, data seeds), on its own device or on ``device``."""
    structure, shape, data_seeds = pinned
    if device is not None:
        structure = dataclasses.replace(structure, device=device)
    for data_seed in data_seeds:
        run_case(structure, shape, data_seed=data_seed)


# Found by fuzzing (backward template, Triton's interpreter): round-off of a flash-style
# backward that the float32 reference does not have, which the check now models.
ROUND_OFF_CASES = {
    # Every position reads bucket 0 of the table (distances below 16), so its gradient sums
    # whole rows of dS, exactly zero in the reference; ours holds the round-off of Σ dO·O,
    # taken for Σ P·dP (CI: 1.5e-5 against the reference's 4.2e-6).
    "whole_row_table": (
        _structure(Hq=9, Hkv=3, E=4, Ev=80, mask="causal", score=("learnable_bias", "bucket_bias"),
                   grads_for_captures=(False, True), block_size=16, use_block_mask=True, enable_gqa=True,
                   broadcast_kv_batch=True, aux="none", captures_in_graph=True),
        Shape(1, 15, 16), (0, 1, 2, 3)),
    # Scores scaled up to 4.4x by two head-dependent score_mods, lse ~ 6: P rebuilt from the
    # float32 lse is off by a few units of |lse| (dq: 4.5e-6 against 4.2e-7, 2e-6 relative).
    "large_lse": (
        _structure(Hq=12, Hkv=3, E=80, Ev=4, score=("head_batch_bias", "head_batch_bias"),
                   grads_for_captures=(True, True), block_size=16, enable_gqa=True, aux="none",
                   captures_in_graph=True),
        Shape(3, 4, 3), (15846,)),
    # Some rows attend a single key (documents of one token): their dS is zero in the reference
    # but the round-off of Σ dO·O against dP in ours (interpreter fuzz, seed 369006101:
    # dk 1.6e-6 against the reference's 1.7e-7, Ev = 64).
    "single_key_rows": (
        _structure(E=8, Ev=64, Hq=1, Hkv=1, mask="document", block_size=16, use_block_mask=True, aux="none"),
        Shape(2, 4, 5), (9447,)),
}


@pytest.mark.skipif(not interpreter_requested(), reason="run by test_fuzz_templates_through_triton_interpreter")
@pytest.mark.parametrize("case", sorted(ROUND_OFF_CASES))
def test_modelled_round_off_in_interpreter(quiet, case):
    with triton_on_cpu():
        _replay(ROUND_OFF_CASES[case])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", sorted(ROUND_OFF_CASES))
def test_modelled_round_off_gpu(quiet, case):
    _replay(ROUND_OFF_CASES[case], device="cuda")


# Found by the GPU fuzz (H200, 2026-12-02): float32 alibi slopes over long query rows and 3 keys.
# A slope's gradient weights each row's dS by kv_idx - q_idx (up to 255 here), so the per-row
# round-off of Σ dO·O against Σ P·dP reaches it amplified by the row's distance; the check now
# weights each row by d lse / d slope (4.3e-3 and 3.7e-3 against eager errors of 8.6e-4 and
# 7.7e-4). A flash-style float32 backward emulated on the CPU with exact exp shows the same:
# 3x the eager error at the median, 16x at worst, over 40 seeds.
LONG_ROW_CASES = {
    "alibi_twice_gqa": (
        _structure(Hq=3, Hkv=1, score=("alibi", "alibi"), grads_for_captures=(True, True), block_size=128,
                   mask_per_head=True, enable_gqa=True, scale=0.2933033247915877, aux="lse_max"),
        Shape(3, 127, 3), (1181,)),
    "alibi_head_scale_global_local": (
        _structure(E=64, mask=("and", ("global_local",)), score=("alibi", "head_scale"),
                   grads_for_captures=(True, True), block_size=16, use_block_mask=True, mask_per_head=True,
                   enable_gqa=True, scale=0.18877054808190208, aux="none", captures_in_graph=True),
        Shape(3, 256, 3), (105170263,)),
}


@pytest.mark.parametrize("case", sorted(LONG_ROW_CASES))
def test_long_rows_weighting_captured_gradients_cpu(quiet, case):
    _replay(LONG_ROW_CASES[case])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", sorted(LONG_ROW_CASES))
def test_long_rows_weighting_captured_gradients_gpu(quiet, case):
    _replay(LONG_ROW_CASES[case], device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_scalar_captured_with_cuda_inputs(quiet):
    """Suggested by the interpreter runs (not seen on a GPU yet): Inductor passes a 0-d CPU
    tensor to a Triton kernel as a Python scalar (``.item()``), while our templates load
    captured tensors through pointers. A 0-d CPU weight with CUDA inputs is ordinary torch
    (``torch.tensor(0.7)``) and must work, or fail saying why."""
    weight = torch.tensor(0.7, requires_grad=True)

    def weighted(score, b, h, q_idx, kv_idx):
        return score * weight

    q, k, v = (torch.randn(1, 2, 128, 64, device="cuda", requires_grad=True) for _ in range(3))
    out = torch.compile(flex_attention, fullgraph=True)(q, k, v, score_mod=weighted)
    out.sum().backward()
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    weight64 = weight.detach().double().requires_grad_()
    gold = flex_attention(q64, k64, v64, score_mod=lambda score, b, h, q_idx, kv_idx: score * weight64)
    gold.sum().backward()
    torch.testing.assert_close(out.double(), gold, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(weight.grad.double(), weight64.grad, atol=1e-3, rtol=1e-3)


def test_one_bucket_table_gradient():
    """Found by fuzzing (CPU): a learnable table with one element along the dim a score_mod
    indexes by a floor division the sizes keep at 0 (a bucketed distance bias, sequences
    shorter than a bucket). The backward failed in Inductor's C++ code generation
    (``CppVecKernel.store``: ``assert isinstance(index, CppCSEVariable) and index.is_vec``);
    the decomposition now drops indices into dims of size 1 from the scatter.
    Pure torch: ``torch.compile(lambda x: torch.zeros(1).index_put((torch.arange(15) // 16,),
    x, accumulate=True))(torch.randn(15))``."""
    table = torch.randn(1, requires_grad=True)

    def bucket_bias(score, b, h, q_idx, kv_idx):
        return score + table[(q_idx - kv_idx).abs() // 16]

    q, k, v = (torch.randn(1, 1, length, 16, requires_grad=True) for length in (6, 15, 15))
    out = torch.compile(flex_attention, fullgraph=True)(q, k, v, score_mod=bucket_bias)
    (grad,) = torch.autograd.grad(out.sum(), (table,))
    table64 = table.detach().double().requires_grad_()
    gold = flex_attention(q.double(), k.double(), v.double(),
                          score_mod=lambda score, b, h, q_idx, kv_idx: score + table64[(q_idx - kv_idx).abs() // 16])
    (grad64,) = torch.autograd.grad(gold.sum(), (table64,))
    torch.testing.assert_close(grad.double(), grad64, atol=1e-4, rtol=1e-4)


def test_captured_float_changing_value():
    """Found by fuzzing: the same score_mod code closing over a Python float, called again with
    another value (two layers with different soft caps). Dynamo's automatic dynamic made the
    float a SymFloat read by .item() inside the subgraph, which failed to lower (torch's
    flex_attention fails too); the capture now keeps such floats constant, one compile per value.
    More cases: test_dynamo.py::test_symbolic_floats_are_specialised."""
    def softcap(cap):
        def soft_cap(score, b, h, q_idx, kv_idx):
            return cap * torch.tanh(score / cap)

        return soft_cap

    compiled = torch.compile(flex_attention, fullgraph=True)
    q, k, v = (torch.randn(1, 2, 24, 16) for _ in range(3))
    for cap in (4.0, 5.0, 6.0):
        out = compiled(q, k, v, score_mod=softcap(cap))
        torch.testing.assert_close(out, flex_attention(q, k, v, score_mod=softcap(cap)), atol=1e-5, rtol=1e-5)
