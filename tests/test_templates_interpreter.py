"""Our Triton templates, run on CPU by Triton's interpreter, against the float64 oracle.

These run only inside the subprocess that ``test_templates_on_cpu.py`` starts with
``TRITON_INTERPRET=1`` (it must be set before triton is imported); in the main run they skip.
"""

import pytest
import torch
from torch._inductor.utils import run_and_get_code
from torch.testing import FileCheck

import oracle
from catalogue import BY_NAME, CATALOGUE
from inductor_flex import create_block_mask, flex_attention
from triton_on_cpu import interpreter_requested, triton_on_cpu

pytestmark = pytest.mark.skipif(
    not interpreter_requested(), reason="run by test_templates_on_cpu.py in a TRITON_INTERPRET=1 subprocess"
)


@pytest.fixture(autouse=True)
def interpreter():
    with triton_on_cpu():
        yield


def _forward(variant, **shape):
    oracle.run_variant(variant, mode="inductor", backward=False, **shape)


# Triton's interpreter has no libdevice (tanh & co.); softcap runs in the GPU tier instead.
INTERPRETABLE = [v for v in CATALOGUE if not v.name.startswith("softcap")]


@pytest.mark.parametrize("variant", INTERPRETABLE, ids=lambda v: v.name)
def test_catalogue_forward(variant):
    _forward(variant, B=1, Hq=2, Hkv=1, L=40, S=40, E=16, Ev=16, block_size=16)


@pytest.mark.parametrize("block_size", [16, 24, 48, 100, (32, 16), (16, 64)], ids=str)
def test_any_block_size(block_size):
    _forward(BY_NAME["document"], B=1, Hq=1, Hkv=1, L=70, S=53, E=16, Ev=16, block_size=block_size)


@pytest.mark.parametrize("sparse,gathers", [(16, True), (48, True), (64, False)], ids=str)
def test_small_kv_blocks_are_gathered_into_full_tiles(sparse, gathers):
    """A KV tile that does not divide the sparse block reads rows of consecutive blocks."""
    def sliding(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= 20

    q, k, v = (torch.randn(1, 1, 96, 16, dtype=torch.float64) for _ in range(3))
    mask = create_block_mask(sliding, 1, 1, 96, 96, device="cpu", BLOCK_SIZE=sparse)
    options = {"BLOCK_N": 32 if sparse == 48 else 64}
    out, (code,) = run_and_get_code(torch.compile(flex_attention, fullgraph=True), q.float(), k.float(),
                                    v.float(), block_mask=mask, kernel_options=options)
    FileCheck().check(f"GATHER_KV : tl.constexpr = {gathers}").run(code)
    gold = flex_attention(q, k, v, block_mask=mask)
    torch.testing.assert_close(out.double(), gold, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("E,Ev", [(8, 8), (4, 16), (80, 48), (24, 40)], ids=str)
def test_head_dims(E, Ev):
    _forward(BY_NAME["alibi"], B=1, Hq=2, Hkv=2, L=33, S=19, E=E, Ev=Ev, block_size=16)


@pytest.mark.parametrize("L,S", [(1, 1), (1, 37), (37, 1), (17, 17)], ids=str)
def test_lengths(L, S):
    _forward(BY_NAME["prefix_lm"], B=2, Hq=2, Hkv=1, L=L, S=S, E=16, Ev=16, block_size=16)


# bfloat16 is left to the GPU tier: the interpreter's numpy emulation of it is not faithful.
@pytest.mark.parametrize("dtype", [torch.float16], ids=str)
def test_low_precision(dtype):
    _forward(BY_NAME["relative_position"], B=1, Hq=2, Hkv=2, L=32, S=32, E=16, Ev=16, dtype=dtype, block_size=16)


def test_kernel_options_are_honoured():
    q, k, v = (torch.randn(1, 1, 64, 16) for _ in range(3))

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    mask = create_block_mask(causal, 1, 1, 64, 64, device="cpu", BLOCK_SIZE=32)
    options = {"BLOCK_M": 16, "BLOCK_N": 16, "PRESCALE_QK": True, "ROWS_GUARANTEED_SAFE": True}
    compiled = torch.compile(flex_attention, fullgraph=True)
    out, (code,) = run_and_get_code(compiled, q, k, v, block_mask=mask, kernel_options=options)
    FileCheck().check("BLOCK_M : tl.constexpr = 16").check("PRESCALE_QK : tl.constexpr = True").run(code)
    torch.testing.assert_close(out, flex_attention(q, k, v, block_mask=mask), atol=2e-5, rtol=2e-5)


def test_generated_code_inlines_mods_and_has_full_block_loop():
    slopes = torch.rand(2)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    mask = create_block_mask(causal, 1, 1, 48, 48, device="cpu", BLOCK_SIZE=16)
    q, k, v = (torch.randn(1, 2, 48, 16) for _ in range(3))
    _, (code,) = run_and_get_code(torch.compile(flex_attention, fullgraph=True), q, k, v,
                                  score_mod=alibi, block_mask=mask)
    (
        FileCheck()
        .check("attend_block_list(")
        .check("IS_FULL_BLOCK=False")
        .check("IS_FULL_BLOCK=True")
        .check("def modified_scores")
        .check("tl.load")  # the captured slopes, read inside the inlined score_mod
        .check("scores =")
        .check("keep =")
        .run(code)
    )
    FileCheck().check_not("inductor_flex_attention(").run(code)


def test_softcap_in_half_precision_uses_the_fast_tanh():
    """fp16/bf16 score_mods get tanh rewritten (2·sigmoid(2x) − 1 off NVIDIA): still accurate."""
    _forward(BY_NAME["softcap"], B=1, Hq=2, Hkv=1, L=40, S=40, E=16, Ev=16, dtype=torch.float16, block_size=16)


@pytest.mark.parametrize("block_size", [(32, 32), (48, 16), (100, 64), (64, 24)], ids=str)
def test_small_blocks_are_regrouped_into_full_tiles(block_size):
    """Blocks that are not multiples of 64 run as 128-blocks of the regrouped mask
    (block_regroup.py), here a hand-made one with absent, partial and full blocks."""
    from test_block_regroup import random_block_mask, sliding_or_sink

    B, H, L, S = 2, 4, 140, 150
    mask = random_block_mask(B, H, L, S, block_size, sliding_or_sink)
    q, k, v = (torch.randn(B, H, n, 16, dtype=torch.float64) for n in (L, S, S))
    out, codes = run_and_get_code(torch.compile(flex_attention, fullgraph=True), q.float(), k.float(), v.float(),
                                  block_mask=mask)
    # The lists are rebuilt by our operator (eager code, nothing generated for it), then the
    # template runs 128-row blocks, and 128-column ones where the KV blocks are not 64-multiples.
    q_block, kv_block = (128 if size % 64 else size for size in block_size)
    for expected in ("torch.ops.inductor_flex.regroup_blocks", f"SPARSE_Q_BLOCK_SIZE : tl.constexpr = {q_block}",
                     f"SPARSE_KV_BLOCK_SIZE : tl.constexpr = {kv_block}"):
        FileCheck().check(expected).run("\n".join(codes))
    gold = flex_attention(q, k, v, block_mask=mask)
    oracle.assert_within("regrouped out", out, gold, flex_attention(q.float(), k.float(), v.float(), block_mask=mask),
                         accumulated_terms=S)
