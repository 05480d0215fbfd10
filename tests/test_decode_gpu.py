"""GPU tier of the decode kernel (short queries): real kernels vs the float64 oracle.

Run with ``pytest -m gpu tests/test_decode_gpu.py``. Every case asserts the decode lowering ran.
"""

import pytest
import torch

from catalogue import BY_NAME, CATALOGUE
from decode_cases import DECODE_VARIANTS, check_decode, decode_runs  # noqa: F401 (fixture)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", CATALOGUE + DECODE_VARIANTS, ids=lambda v: v.name)
def test_catalogue(variant, dtype, decode_runs):
    check_decode(variant, B=2, Hq=8, Hkv=2, Lq=1, S=1000, E=64, block_size=128, dtype=dtype, device="cuda")
    assert decode_runs


@pytest.mark.parametrize("variant", DECODE_VARIANTS + [BY_NAME["alibi"], BY_NAME["softcap_document"]],
                         ids=lambda v: v.name)
@pytest.mark.parametrize("Lq", [2, 4, 16], ids=lambda n: f"Lq{n}")
def test_a_few_query_tokens_with_a_shared_mask(variant, Lq, decode_runs):
    check_decode(variant, B=3, Hq=20, Hkv=4, Lq=Lq, S=1000, E=64, block_size=128, dtype=torch.bfloat16,
                 shared_mask=True, device="cuda")
    assert decode_runs


@pytest.mark.parametrize("D", [64, 128], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("group", [1, 4, 5], ids=lambda g: f"G{g}")
@pytest.mark.parametrize("S", [1, 17, 1000, 8192], ids=lambda s: f"S{s}")
def test_lengths_groups_head_dims(S, group, D, decode_runs):
    check_decode(DECODE_VARIANTS[2], B=4, Hq=2 * group, Hkv=2, Lq=1, S=S, E=D, block_size=128,
                 dtype=torch.bfloat16, shared_mask=True, device="cuda")
    check_decode(BY_NAME["alibi"], B=2, Hq=2 * group, Hkv=2, Lq=1, S=S, E=D, block_size=128,
                 dtype=torch.bfloat16, device="cuda")
    assert decode_runs


@pytest.mark.parametrize("block_size", [16, 48, 64, 100, 256], ids=str)
def test_any_block_size(block_size, decode_runs):
    check_decode(DECODE_VARIANTS[1], B=2, Hq=8, Hkv=2, Lq=2, S=2000, E=128, block_size=block_size,
                 dtype=torch.bfloat16, shared_mask=True, device="cuda")
    assert decode_runs


@pytest.mark.parametrize("E,Ev", [(16, 16), (80, 80), (192, 192), (128, 64)], ids=str)
def test_other_head_dims(E, Ev, decode_runs):
    check_decode(BY_NAME["relative_position"], B=2, Hq=8, Hkv=1, Lq=1, S=777, E=E, Ev=Ev, block_size=128,
                 dtype=torch.float16, device="cuda")
    assert decode_runs


def test_long_cache_batch_one(decode_runs):
    """Batch 1: many splits over a 32k cache."""
    check_decode(DECODE_VARIANTS[0], B=1, Hq=32, Hkv=8, Lq=1, S=32768, E=128, block_size=128,
                 dtype=torch.bfloat16, shared_mask=True, device="cuda")
    assert decode_runs


def test_max_autotune_runs_the_decode_kernel(decode_runs):
    from torch._inductor.utils import run_and_get_code

    from inductor_flex import flex_attention

    q = torch.randn(8, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(8, 8, 4096, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    compiled = torch.compile(flex_attention, mode="max-autotune-no-cudagraphs", fullgraph=True)
    out, codes = run_and_get_code(compiled, q, k, v, enable_gqa=True)
    assert any("attend_step_range" in code for code in codes)
    reference = flex_attention(q.double(), k.double(), v.double(), enable_gqa=True)
    torch.testing.assert_close(out.double(), reference, atol=2e-2, rtol=2e-2)
    assert decode_runs
