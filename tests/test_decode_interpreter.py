"""The decode kernel (short queries), run on CPU by Triton's interpreter, vs the float64 oracle.

Runs only inside the subprocess that ``test_templates_on_cpu.py`` starts with
``TRITON_INTERPRET=1``; in the main run it skips. Every case asserts that the decode lowering
really ran (not the forward template). The interpreter is slow: shapes stay small, and the KV
sequence is split into many short ranges (patched split heuristic) so that splits starting
inside a sparse block, and empty splits, are exercised.
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._inductor.utils import run_and_get_code
from torch.testing import FileCheck

import oracle
from catalogue import BY_NAME, CATALOGUE
from decode_cases import DECODE_VARIANTS, check_decode, decode_runs  # noqa: F401 (fixture)
from inductor_flex import AuxRequest, create_block_mask, flex_attention
from inductor_flex.lowering import configs
from triton_on_cpu import interpreter_requested, triton_on_cpu

pytestmark = pytest.mark.skipif(
    not interpreter_requested(), reason="run by test_templates_on_cpu.py in a TRITON_INTERPRET=1 subprocess"
)


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    # Short splits: a 300-key sequence becomes several ranges, some starting mid-block.
    monkeypatch.setattr(configs, "DECODE_MIN_SPLIT_POSITIONS", 16)
    monkeypatch.setattr(configs, "DECODE_PROGRAMS_PER_SM", 8)
    with triton_on_cpu():
        yield


# Triton's interpreter has no libdevice (tanh & co.); softcap runs in the GPU tier instead.
INTERPRETABLE = [v for v in CATALOGUE if not v.name.startswith("softcap")]


@pytest.mark.parametrize("variant", INTERPRETABLE, ids=lambda v: v.name)
def test_catalogue(variant, decode_runs):
    # Lq 3 with a GQA group of 2: six packed rows; S 170 spans several blocks and splits.
    check_decode(variant, B=2, Hq=4, Hkv=2, Lq=3, S=170, block_size=64)
    assert decode_runs


@pytest.mark.parametrize("variant", DECODE_VARIANTS, ids=lambda v: v.name)
@pytest.mark.parametrize("shared_mask", [True, False], ids=["shared_mask", "per_head_mask"])
def test_decode_shaped_masks(variant, shared_mask, decode_runs):
    """Query tokens at the end of the cache: causal, sliding window, ragged per-sequence lengths."""
    check_decode(variant, B=3, Hq=6, Hkv=2, Lq=2, S=300, block_size=32, shared_mask=shared_mask)
    assert decode_runs


@pytest.mark.parametrize("variant", ["causal", "alibi", "document"])
def test_catalogue_with_a_shared_mask_packs_the_group(variant, decode_runs):
    check_decode(BY_NAME[variant], B=2, Hq=10, Hkv=2, Lq=2, S=300, block_size=32, shared_mask=True)
    assert decode_runs


@pytest.mark.parametrize("Lq,group", [(1, 1), (2, 2), (3, 5), (4, 7), (1, 7)], ids=str)
def test_query_lengths_and_groups(Lq, group, decode_runs):
    check_decode(BY_NAME["head_batch_bias"], B=1, Hq=2 * group, Hkv=2, Lq=Lq, S=77, block_size=16)
    check_decode(BY_NAME["prefix_lm"], B=1, Hq=group, Hkv=1, Lq=Lq, S=77, block_size=16, shared_mask=True)
    assert decode_runs


@pytest.mark.parametrize("S", [1, 17, 300], ids=lambda s: f"S{s}")
@pytest.mark.parametrize("block_size", [16, 128], ids=lambda b: f"block{b}")
def test_kv_lengths_and_block_sizes(S, block_size, decode_runs):
    check_decode(BY_NAME["sliding_window"], B=1, Hq=4, Hkv=2, Lq=2, S=S, block_size=block_size, shared_mask=True)
    assert decode_runs


@pytest.mark.parametrize("block_size", [24, (16, 48)], ids=str)
def test_block_sizes_that_are_not_powers_of_two(block_size, decode_runs):
    check_decode(BY_NAME["document"], B=1, Hq=3, Hkv=1, Lq=2, S=200, block_size=block_size)
    assert decode_runs


@pytest.mark.parametrize("E,Ev", [(80, 80), (16, 48)], ids=str)
def test_head_dims(E, Ev, decode_runs):
    check_decode(BY_NAME["alibi"], B=1, Hq=4, Hkv=2, Lq=1, S=100, E=E, Ev=Ev, block_size=32)
    assert decode_runs


def test_dynamic_shapes_keep_the_decode_kernel(decode_runs):
    """Under dynamic=True Dynamo makes the BlockMask's block sizes symbols too; the decode
    kernel must still be chosen, for every cache length and batch, from one compile (found by
    the GPU tier: the forward template ran instead)."""
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(flex_attention, backend=counter, dynamic=True, fullgraph=True)
    for B, S in [(3, 90), (5, 41)]:  # no batch equal to a head count: duck sizing would share the symbol
        oracle.check_call(compiled, BY_NAME["alibi"], B=B, Hq=4, Hkv=2, L=1, S=S, E=16, dtype=torch.float32,
                          device="cpu", block_size=16, backward=False)
    assert counter.frame_count == 1 and len(decode_runs) == 1, (counter.frame_count, len(decode_runs))


def test_per_head_masks_in_one_group_are_not_mixed(decode_runs):
    """Heads of one GQA group with different block lists: each keeps its own."""

    def per_head_window(b, h, q_idx, kv_idx):
        return kv_idx < 20 + 40 * h

    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 1, 200, 16), torch.randn(1, 1, 200, 16)
    mask = create_block_mask(per_head_window, 1, 4, 1, 200, device="cpu", BLOCK_SIZE=16)
    out = torch.compile(flex_attention, fullgraph=True)(q, k, v, block_mask=mask, enable_gqa=True)
    gold = flex_attention(q.double(), k.double(), v.double(), block_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out.double(), gold, atol=1e-5, rtol=1e-5)
    assert decode_runs


def test_fully_masked_rows_give_zero_and_minus_inf(decode_runs):
    def odd_heads_and_second_token_masked(b, h, q_idx, kv_idx):
        return (h % 2 == 0) & (q_idx == 0) & (kv_idx >= 0)

    mask = create_block_mask(odd_heads_and_second_token_masked, 1, 4, 2, 90, device="cpu", BLOCK_SIZE=16)
    q, k, v = torch.randn(1, 4, 2, 16), torch.randn(1, 2, 90, 16), torch.randn(1, 2, 90, 16)
    out, aux = torch.compile(flex_attention, fullgraph=True)(
        q, k, v, block_mask=mask, enable_gqa=True, return_aux=AuxRequest(lse=True, max_scores=True))
    assert not out.isnan().any()
    assert torch.all(out[:, 1::2] == 0) and torch.all(out[:, :, 1] == 0)
    assert torch.all(aux.lse[:, 1::2] == float("-inf")) and torch.all(aux.max_scores[:, :, 1] == float("-inf"))
    assert torch.isfinite(aux.lse[:, 0::2, 0]).all()
    assert decode_runs


def test_generated_code_packs_rows_and_reads_captures_per_row():
    """A mod indexing a captured tensor by h and q_idx becomes a per-row load in the packed tile."""
    bias = torch.randn(6, 3)

    def head_token_bias(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx]

    q, k, v = torch.randn(1, 6, 3, 16), torch.randn(1, 2, 50, 16), torch.randn(1, 2, 50, 16)
    compiled = torch.compile(flex_attention, fullgraph=True)
    out, (code,) = run_and_get_code(compiled, q, k, v, score_mod=head_token_bias, enable_gqa=True)
    FileCheck().check("PACKED_HEADS : tl.constexpr = 3").check("ROWS : tl.constexpr = 16").run(code)
    FileCheck().check("def modified_row_scores").check("tl.load").run(code)
    FileCheck().check("attend_step_range(").check("SPLITS_ROUNDED").run(code)  # the split kernel, then the merge
    # 8 SMs × 8 programs per SM over 2 packs: 32 wanted, 50 keys / 16 per split: 4 splits.
    FileCheck().check("SPLITS : tl.constexpr = 4").run(code)
    gold = flex_attention(q.double(), k.double(), v.double(), score_mod=lambda s, b, h, m, n: s + bias.double()[h, m],
                          enable_gqa=True)
    torch.testing.assert_close(out.double(), gold, atol=1e-5, rtol=1e-5)


def test_force_use_flex_attention_keeps_the_forward_template(decode_runs):
    q, k, v = (torch.randn(1, 2, 1, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16))
    compiled = torch.compile(flex_attention, fullgraph=True)
    _, (code,) = run_and_get_code(compiled, q, k, v, kernel_options={"FORCE_USE_FLEX_ATTENTION": True})
    FileCheck().check("attend_block_list(").run(code)
    FileCheck().check_not("attend_step_range(").run(code)
    assert not decode_runs


def test_long_queries_take_the_forward_template(decode_runs):
    from inductor_flex.lowering.forward import DECODE_MAX_QUERY_LEN

    L = DECODE_MAX_QUERY_LEN + 1
    check_decode(BY_NAME["causal"], B=1, Hq=2, Hkv=1, Lq=L, S=40, block_size=32)
    assert not decode_runs


def test_kernel_options_are_honoured(decode_runs):
    options = {"BLOCK_N": 16, "PRESCALE_QK": True, "num_warps": 2}
    q, k, v = (torch.randn(1, 2, 1, 16), torch.randn(1, 1, 64, 16), torch.randn(1, 1, 64, 16))
    compiled = torch.compile(flex_attention, fullgraph=True)
    out, (code,) = run_and_get_code(compiled, q, k, v, enable_gqa=True, kernel_options=options)
    FileCheck().check("BLOCK_N : tl.constexpr = 16").check("PRESCALE_QK : tl.constexpr = True").run(code)
    gold = flex_attention(q.double(), k.double(), v.double(), enable_gqa=True)
    torch.testing.assert_close(out.double(), gold, atol=1e-5, rtol=1e-5)
    assert decode_runs


def test_half_precision(decode_runs):
    check_decode(BY_NAME["relative_position"], B=1, Hq=4, Hkv=2, Lq=2, S=64, block_size=16, dtype=torch.float16)
    assert decode_runs


def test_dynamic_batch_and_kv_length(decode_runs):
    """dynamic=True: one compiled kernel serves other batches and cache lengths."""

    def alibi_like(score, b, h, q_idx, kv_idx):
        return score - 0.1 * (h + 1) * (kv_idx - q_idx).abs()

    compiled = torch.compile(flex_attention, dynamic=True, fullgraph=True)
    for B, S in ((2, 100), (3, 157)):
        q, k, v = torch.randn(B, 4, 1, 16), torch.randn(B, 2, S, 16), torch.randn(B, 2, S, 16)
        out = compiled(q, k, v, score_mod=alibi_like, enable_gqa=True)
        gold = flex_attention(q.double(), k.double(), v.double(), score_mod=alibi_like, enable_gqa=True)
        torch.testing.assert_close(out.double(), gold, atol=1e-5, rtol=1e-5)
    assert decode_runs


def test_key_value_batch_of_one_broadcasts(decode_runs):
    q, k, v = torch.randn(3, 6, 2, 16), torch.randn(1, 3, 90, 16), torch.randn(1, 3, 90, 16)
    out = torch.compile(flex_attention, fullgraph=True)(q, k, v, enable_gqa=True)
    gold = flex_attention(q.double(), k.double(), v.double(), enable_gqa=True)
    torch.testing.assert_close(out.double(), gold, atol=1e-5, rtol=1e-5)
    assert decode_runs


def test_one_split_writes_the_result_without_a_merge(decode_runs, monkeypatch):
    monkeypatch.setattr(configs, "DECODE_MAX_SPLITS", 1)
    q, k, v = torch.randn(2, 4, 3, 16), torch.randn(2, 2, 70, 16), torch.randn(2, 2, 70, 16)
    compiled = torch.compile(flex_attention, fullgraph=True)
    (out, aux), (code,) = run_and_get_code(compiled, q, k, v, enable_gqa=True,
                                           return_aux=AuxRequest(lse=True, max_scores=True))
    FileCheck().check("SPLITS : tl.constexpr = 1").run(code)
    FileCheck().check_not("SPLITS_ROUNDED").run(code)
    gold, gold_aux = flex_attention(q.double(), k.double(), v.double(), enable_gqa=True,
                                    return_aux=AuxRequest(lse=True, max_scores=True))
    torch.testing.assert_close(out.double(), gold, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux.lse.double(), gold_aux.lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux.max_scores.double(), gold_aux.max_scores, atol=1e-5, rtol=1e-5)
    assert decode_runs
