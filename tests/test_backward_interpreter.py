"""The fused backward template, run on CPU by Triton's interpreter, against the float64 oracle.

These run only inside the subprocess that ``test_templates_on_cpu.py`` starts with
``TRITON_INTERPRET=1``; in the main run they skip. Small shapes: the interpreter is slow.
"""

import warnings

import pytest
import torch
from torch._inductor.utils import run_and_get_code
from torch.testing import FileCheck

import oracle
from catalogue import BY_NAME, CATALOGUE, Variant
from inductor_flex import create_block_mask, flex_attention
from triton_on_cpu import interpreter_requested, triton_on_cpu

pytestmark = pytest.mark.skipif(
    not interpreter_requested(), reason="run by test_templates_on_cpu.py in a TRITON_INTERPRET=1 subprocess"
)


@pytest.fixture(autouse=True)
def interpreter():
    with triton_on_cpu(), warnings.catch_warnings():
        # A refusal would silently test the decomposition instead of the template.
        warnings.filterwarnings("error", message="inductor_flex: the fused backward kernel cannot run")
        yield


def _run(variant, **shape):
    oracle.run_variant(variant, mode="inductor", backward=True, **shape)


# Triton's interpreter has no libdevice (tanh & co.); softcap runs in the GPU tier instead.
INTERPRETABLE = [v for v in CATALOGUE if not v.name.startswith("softcap")]


@pytest.mark.parametrize("variant", INTERPRETABLE, ids=lambda v: v.name)
def test_catalogue_forward_backward(variant):
    _run(variant, B=1, Hq=2, Hkv=1, L=40, S=40, E=16, Ev=16, block_size=16)


def test_gqa_groups_of_four():
    _run(BY_NAME["alibi"], B=1, Hq=4, Hkv=1, L=33, S=40, E=16, Ev=16, block_size=16)


@pytest.mark.parametrize("E,Ev", [(16, 32), (24, 8), (80, 48)], ids=str)
def test_qk_and_v_dims_differ(E, Ev):
    _run(BY_NAME["relative_position"], B=1, Hq=2, Hkv=1, L=33, S=19, E=E, Ev=Ev, block_size=16)


@pytest.mark.parametrize("L,S", [(17, 3), (33, 17), (50, 37)], ids=str)
def test_lengths_not_multiples_of_the_block(L, S):
    _run(BY_NAME["prefix_lm"], B=1, Hq=2, Hkv=1, L=L, S=S, E=16, Ev=16, block_size=16)


@pytest.mark.parametrize("block_size", [16, 24, 48, (32, 16), (16, 48)], ids=str)
def test_any_block_size(block_size):
    _run(BY_NAME["document"], B=1, Hq=1, Hkv=1, L=64, S=53, E=16, Ev=16, block_size=block_size)


def _late_start(buffers):
    def late_start(b, h, q_idx, kv_idx):  # rows 0..19 attend nothing: the first block list is empty
        return (q_idx >= 20) & (kv_idx <= q_idx) & (q_idx % 3 != 1)  # and every third row is empty

    return None, late_start


def test_fully_masked_rows_and_an_empty_first_block():
    _run(Variant("late_start", _late_start), B=1, Hq=2, Hkv=1, L=48, S=48, E=16, Ev=16, block_size=16)


def _table_twice(buffers):
    table = buffers["table"]
    offset = table.numel() // 2

    def relative_twice(score, b, h, q_idx, kv_idx):  # one tensor indexed twice (torch refuses this)
        return score + table[q_idx - kv_idx + offset] + 0.5 * table[kv_idx]

    return relative_twice, None


def _table_buffers(B, H, L, S, device):
    return {"table": torch.randn(2 * max(L, S) + 1, device=device) * 0.5}


def _row_and_scalar(buffers):
    row_bias, gain = buffers["row_bias"], buffers["gain"]

    def row_and_scalar(score, b, h, q_idx, kv_idx):  # a per-row index and a 0-dim tensor read whole
        return score * gain + row_bias[h, q_idx]

    return row_and_scalar, None


def _row_and_scalar_buffers(B, H, L, S, device):
    return {"row_bias": torch.randn(H, L, device=device), "gain": torch.tensor(1.3, device=device)}


def _row_bias(buffers):
    row_bias = buffers["row_bias"]

    def row(score, b, h, q_idx, kv_idx):
        return score + row_bias[h, q_idx]

    return row, None


def _row_bias_buffers(B, H, L, S, device):
    return {"row_bias": torch.randn(H, L, device=device)}


def _column_bias(buffers):
    column_bias = buffers["column_bias"]

    def column(score, b, h, q_idx, kv_idx):
        return score + column_bias[b, kv_idx]

    return column, _causal


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _column_buffers(B, H, L, S, device):
    return {"column_bias": torch.randn(B, S, device=device)}


CAPTURED = [
    Variant("table_indexed_twice", _table_twice, _table_buffers, learnable=("table",)),
    Variant("row_bias", _row_bias, _row_bias_buffers, learnable=("row_bias",)),
    Variant("column_bias", _column_bias, _column_buffers, learnable=("column_bias",)),
]
# A 0-dim CPU tensor reaches a Triton kernel as a Python scalar under this harness (the forward
# template then cannot load it): the whole-read case runs in the GPU tier.
WHOLE_READ = Variant("row_bias_and_scalar", _row_and_scalar, _row_and_scalar_buffers,
                     learnable=("row_bias", "gain"))


@pytest.mark.parametrize("variant", CAPTURED, ids=lambda v: v.name)
def test_captured_tensor_gradients(variant):
    _run(variant, B=1, Hq=2, Hkv=1, L=37, S=29, E=16, Ev=16, block_size=16)


def test_learnable_tensors_read_through_chained_indexing():
    """``pair[q_idx][kv_idx]`` and kin: one scatter per chained read in the fused backward."""
    oracle.check_chained_reads(torch.compile(flex_attention, fullgraph=True), "cpu", L=37, S=29)


def test_captured_tensors_computed_in_the_graph_get_gradients():
    """Captured tensors derived in the compiled function (``raw * raw / 2``) reach their leaves
    through the fused template (the compiled backward used to drop these gradients)."""
    oracle.check_captures_computed_in_the_graph("cpu", torch.float32, L=40, S=40, zero_dim_weight=False)


def test_half_precision():
    _run(BY_NAME["sliding_window"], B=1, Hq=2, Hkv=2, L=32, S=32, E=16, Ev=16, dtype=torch.float16,
         block_size=16)


def _gradients(variant, options, B=1, H=2, L=40, seed=0):
    torch.manual_seed(seed)
    buffers = variant.make_buffers(B, H, L, L, "cpu")
    for name in variant.learnable:
        buffers[name].requires_grad_(True)
    score_mod, mask_mod = variant.build(buffers)
    mask = create_block_mask(mask_mod, B, H, L, L, device="cpu", BLOCK_SIZE=16) if mask_mod else None
    q, k, v = (torch.randn(B, H, L, 16, requires_grad=True) for _ in range(3))
    compiled = torch.compile(flex_attention, fullgraph=True)

    def run():
        out = compiled(q, k, v, score_mod=score_mod, block_mask=mask, kernel_options=options)
        tensors = [q, k, v, *(buffers[n] for n in variant.learnable)]
        return torch.autograd.grad(out, tensors, torch.ones_like(out))

    grads, codes = run_and_get_code(run)
    return grads, "\n".join(codes)


@pytest.mark.parametrize("variant", ["relative_position", "alibi"])
def test_deterministic_gradients(variant):
    variant = BY_NAME[variant]
    first, code = _gradients(variant, {"DETERMINISTIC": True})
    FileCheck().check("EXACT=True").run(code)
    torch._dynamo.reset()
    again, _ = _gradients(variant, {"DETERMINISTIC": True})
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    torch._dynamo.reset()
    default, code = _gradients(variant, {})
    FileCheck().check("EXACT=False").run(code)
    for a, b in zip(first, default):  # exact fixed point vs float32 atomics: the same sums
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_kernel_options_are_honoured():
    options = {"BLOCK_M1": 16, "BLOCK_N1": 32, "BLOCK_M2": 32, "BLOCK_N2": 16, "bwd_PRESCALE_QK": True}
    grads, code = _gradients(BY_NAME["alibi"], options)
    (FileCheck().check("def dkdv_block_list").check("BLOCK_M1 : tl.constexpr = 16")
     .check("BLOCK_N1 : tl.constexpr = 32").check("BLOCK_M : tl.constexpr = 32")
     .check("BLOCK_N : tl.constexpr = 16").check("PRESCALE_QK : tl.constexpr = True").run(code))
    torch._dynamo.reset()
    default, _ = _gradients(BY_NAME["alibi"], {})
    for a, b in zip(grads, default):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_padded_row_statistics():
    """On a GPU Inductor pads the strides of the buffers it lays out (comprehensive padding,
    off for CPU graphs): DELTA = rowsum(dO * O) reached the kernel as [B, H, L] with padded
    batch/head strides, and a kernel that assumed it contiguous read other rows and
    uninitialised padding (garbage dQ on the H100 only). Pad on CPU too, from tiny strides on,
    so that this shape is padded (float32: strides rounded up to multiples of 32)."""
    from torch._inductor import config

    with config.patch(disable_padding_cpu=False, comprehensive_padding=True, padding_stride_threshold=16):
        _run(BY_NAME["noop"], B=2, Hq=2, Hkv=1, L=40, S=24, E=16, Ev=16, block_size=16)


LEARNABLE = [v for v in INTERPRETABLE if v.learnable]


@pytest.mark.parametrize("variant", LEARNABLE, ids=lambda v: v.name)
def test_captured_gradients_in_float16(variant):
    """slopes[h] and the other captured tensors get their gradients as sums of ds over whole
    rows, which nearly cancel. With DELTA = rowsum(dO * O) from the rounded fp16/bf16 output,
    each row left a residue far above eager's error (3x to 10^4x on the H100; here 10x to 1300x
    in float16), so the template refused these; the dQ programs now rebuild DELTA from their
    own tiles first. bfloat16 runs in the GPU tier: the interpreter does not compute in it."""
    _run(variant, B=2, Hq=2, Hkv=1, L=72, S=56, E=16, Ev=16, block_size=16, dtype=torch.float16)


def test_row_delta_pass_only_for_low_precision_captured_gradients():
    """The extra pass over the KV tiles runs where it is needed, not in every backward."""
    buffers = BY_NAME["alibi"].make_buffers(1, 2, 32, 32, "cpu")
    buffers["slopes"].requires_grad_(True)
    score_mod, _ = BY_NAME["alibi"].build(buffers)
    compiled = torch.compile(flex_attention, fullgraph=True)
    for dtype, expected in ((torch.bfloat16, True), (torch.float32, False)):
        torch._dynamo.reset()
        q, k, v = (torch.randn(1, 2, 32, 16, dtype=dtype, requires_grad=True) for _ in range(3))

        def step():
            compiled(q, k, v, score_mod=score_mod, kernel_options={"bwd_BACKEND": "TRITON"}).sum().backward()

        _, code = run_and_get_code(step)
        FileCheck().check(f"ROW_DELTA_FROM_TILES : tl.constexpr = {expected}").run("\n".join(code))


def test_captured_gradients_in_float16_under_dynamic_shapes():
    """The row pass with symbolic lengths and batches, blocks of 16 regrouped: one compile
    serves every size (batches and block counts kept apart from the head counts, which duck
    sizing would otherwise pin with them; the regrouped 128-tiles are also what keeps this
    affordable in the interpreter: unregrouped 16-tiles took four times as long)."""
    from test_dynamic_shapes import ALIBI_DOCUMENTS, _sweep

    def call(compiled, B, L):
        oracle.check_call(compiled, ALIBI_DOCUMENTS, B=B, Hq=4, Hkv=2, L=L, S=L, E=16, dtype=torch.float16,
                          device="cpu", block_size=16)

    _sweep([(3, 90), (5, 100), (3, 85)], call)


def test_minus_inf_scores_scaled_by_a_learnable_tensor():
    """The backward template with the joint graph's zero-gradient guard: -inf from score_mod
    times a learnable per-head weight gives finite gradients, equal to a -1e30 stand-in's."""
    from test_edge_cases import _scaled_masked_scores

    B, H, L, S, D = 1, 2, 33, 40, 16
    q, k, v = (torch.randn(B, H, n, D, requires_grad=True) for n in (L, S, S))
    weight = (0.5 + torch.rand(H)).requires_grad_()
    out = torch.compile(flex_attention, fullgraph=True)(q, k, v, score_mod=_scaled_masked_scores(weight, -float("inf")),
                                                        kernel_options={"BACKEND": "TRITON"})
    grads = torch.autograd.grad(out, (q, k, v, weight), torch.ones_like(out))
    gold_inputs = [t.detach().double().requires_grad_() for t in (q, k, v, weight)]
    gold_out = flex_attention(*gold_inputs[:3], score_mod=_scaled_masked_scores(gold_inputs[3], -1e30))
    gold = torch.autograd.grad(gold_out, gold_inputs, torch.ones_like(gold_out))
    for name, ours, expected in zip("qkvw", grads, gold):
        assert torch.isfinite(ours).all(), f"d{name}: not finite"
        torch.testing.assert_close(ours.double(), expected, atol=1e-4, rtol=1e-4, msg=f"d{name}")


def test_batch_made_dynamic_by_a_recompile():
    """A new batch size recompiles with the batch symbolic (automatic dynamic): query and key
    batches are then two symbols, which are equal, not a broadcast key batch of 1 (the
    GPU fuzz found dK/dV summed over the batch here)."""
    compiled = torch.compile(flex_attention)
    for B in (2, 3, 2):
        oracle.check_call(compiled, BY_NAME["alibi"], B=B, Hq=4, Hkv=2, L=20, S=24, E=16, dtype=torch.float32,
                          device="cpu", block_size=16)


@pytest.mark.parametrize("variant,block_size", [("relative_position", 32), ("document", (48, 16)),
                                                ("alibi", (64, 24))], ids=str)
def test_small_blocks_regrouped(variant, block_size):
    """Regrouped 128-blocks (block_regroup.py) through the backward, captured-tensor gradients
    included. B·H·(L/128) and B·H·L·S reach the interpreter's regrouping thresholds."""
    from inductor_flex.block_regroup import MIN_REGROUPED_PROGRAMS_OFF_GPU, MIN_REGROUPED_SCORES_OFF_GPU

    B, Hq, L = 2, 4, 140
    assert B * Hq * -(-L // 128) >= MIN_REGROUPED_PROGRAMS_OFF_GPU and B * Hq * L * L >= MIN_REGROUPED_SCORES_OFF_GPU
    _run(BY_NAME[variant], B=B, Hq=Hq, Hkv=2, L=L, S=L, E=16, Ev=16, block_size=block_size)


def test_inductor_caches_never_serve_one_query_length_for_another():
    """Query lengths under the decode guard, made dynamic by a recompile, with Inductor's graph
    caches on (the other tests turn them off). The forward lowering used to specialise such a
    length to its value; the cache drops that guard, so the next length was served the kernel
    of the last one (the GPU fuzz: "expected size 2==5")."""
    compiled = torch.compile(flex_attention)
    with torch._inductor.config.patch(fx_graph_cache=True), \
            torch._functorch.config.patch(enable_autograd_cache=True):
        for B, L, S in [(3, 1, 1), (2, 5, 8), (2, 2, 8), (2, 5, 8), (2, 7, 8)]:
            oracle.check_call(compiled, BY_NAME["sliding_window"], B=B, Hq=2, Hkv=1, L=L, S=S, E=16, Ev=8,
                              dtype=torch.float32, device="cpu", block_size=(128, 100))


def test_an_int_derived_from_a_dynamic_size_in_a_learnable_score_mod():
    """A relative-position table sized by the lengths, indexed with ``table.numel() // 2``,
    all inside the compiled function: under dynamic shapes the offset is a SymInt that the
    backward could not render (the GPU fuzz). Mods now take such ints as guarded constants."""
    def attention(q, k, v, table):
        scaled = table * 1
        offset = scaled.numel() // 2
        return flex_attention(q, k, v, score_mod=lambda s, b, h, q_idx, kv_idx: s + scaled[q_idx - kv_idx + offset])

    compiled = torch.compile(attention, fullgraph=True)
    for L, S in [(40, 20), (24, 5), (30, 7)]:
        inputs = [torch.randn(1, 2, n, 16, requires_grad=True) for n in (L, S, S)]
        inputs.append(torch.randn(2 * max(L, S) + 1, requires_grad=True))
        out = compiled(*inputs)
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, inputs, grad_out)
        gold_inputs = [t.detach().double().requires_grad_() for t in inputs]
        gold_out = attention(*gold_inputs)
        gold = torch.autograd.grad(gold_out, gold_inputs, grad_out.double())
        torch.testing.assert_close(out.double(), gold_out, atol=1e-5, rtol=1e-5, msg=f"out L={L} S={S}")
        for name, ours, expected in zip(("dq", "dk", "dv", "dtable"), grads, gold):
            torch.testing.assert_close(ours.double(), expected, atol=1e-4, rtol=1e-4, msg=f"{name} L={L} S={S}")
