"""GPU tier for the fused backward template: forward + backward through the real kernels against
the float64 oracle (run with `pytest -m gpu tests/test_backward_gpu.py`)."""

import functools
import warnings

import pytest
import torch

import oracle
from catalogue import BY_NAME, CATALOGUE
from inductor_flex import flex_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(autouse=True)
def template_only():
    """A refusal must not hide behind the decomposition: its warning fails the test."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="inductor_flex: the fused backward kernel cannot run")
        yield


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("variant", CATALOGUE, ids=lambda v: v.name)
def test_catalogue_forward_backward(variant, dtype):
    oracle.run_variant(variant, mode="inductor", device="cuda", dtype=dtype,
                       B=2, Hq=4, Hkv=2, L=300, S=300, E=64, Ev=64, block_size=128)


@pytest.mark.parametrize("E", [16, 64, 80, 128, 192, 256], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("variant", ["causal", "alibi", "document", "relative_position", "softcap"])
def test_head_dims(variant, E):
    oracle.run_variant(BY_NAME[variant], mode="inductor", device="cuda", dtype=torch.bfloat16,
                       B=1, Hq=4, Hkv=2, L=333, S=333, E=E, Ev=E, block_size=128)


@pytest.mark.parametrize("E", [64, 128, 192, 256], ids=lambda d: f"D{d}")
def test_learnable_full_bias_compiles_at_large_head_dims(E):
    """torch 2.11 runs out of shared memory here at D=128; the lighter config must not (float32:
    the template's case, and the most shared memory)."""
    oracle.run_variant(BY_NAME["learnable_bias"], mode="inductor", device="cuda", dtype=torch.float32,
                       B=2, Hq=4, Hkv=4, L=256, S=256, E=E, Ev=E, block_size=128)


@pytest.mark.parametrize("dtype,E,variant", [(torch.float32, 128, "learnable_bias"), (torch.float32, 256, "learnable_bias"),
                                             (torch.bfloat16, 128, "softcap_document")], ids=str)
def test_every_backward_candidate_config_alone(dtype, E, variant):
    """Every config max-autotune may pick, forced alone and checked: one that Triton compiles
    wrong (as (32, 64, 64, 32) with 4 warps did for float32 D128 on the H200) fails by name."""
    from inductor_flex.lowering import configs

    for c in configs.backward_configs(torch.device("cuda"), dtype, E, E, autotune=True, mods_read_tensors=True):
        options = dict(BLOCK_M1=c.block_m1, BLOCK_N1=c.block_n1, BLOCK_M2=c.block_m2, BLOCK_N2=c.block_n2,
                       bwd_num_warps=c.num_warps, bwd_num_stages=c.num_stages)
        torch._dynamo.reset()
        compiled = functools.partial(torch.compile(flex_attention, fullgraph=True), kernel_options=options)
        oracle.check_call(compiled, BY_NAME[variant], B=2, Hq=4, Hkv=4, L=256, S=256, E=E, dtype=dtype,
                          device="cuda", block_size=128, label=f"{variant} {c}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_captured_tensors_computed_in_the_graph_get_gradients(dtype):
    oracle.check_captures_computed_in_the_graph("cuda", dtype, L=300, S=300, E=64)


@pytest.mark.parametrize("E,Ev", [(128, 64), (64, 128), (96, 192), (8, 8)], ids=str)
@pytest.mark.parametrize("variant", ["alibi", "causal"])  # with / without a captured gradient
def test_qk_and_v_dims_differ(variant, E, Ev):
    oracle.run_variant(BY_NAME[variant], mode="inductor", device="cuda", dtype=torch.float16,
                       B=1, Hq=4, Hkv=1, L=200, S=333, E=E, Ev=Ev, block_size=64)


@pytest.mark.parametrize("block_size", [16, 24, 48, 100, (64, 32), (128, 16)], ids=str)
def test_any_block_size(block_size):
    oracle.run_variant(BY_NAME["sliding_window"], mode="inductor", device="cuda", dtype=torch.bfloat16,
                       B=1, Hq=2, Hkv=1, L=1000, S=1000, E=64, Ev=64, block_size=block_size)


@pytest.mark.parametrize("variant", ["causal", "alibi", "sliding_window", "learnable_bias", "softcap"])
def test_blocks_of_64_at_head_dim_128(variant):
    """64-blocks shrink the default 128-wide tiles; at D128 they run with fewer pipeline stages
    (configs.backward_launch), a launch no other case of the tier takes in bf16."""
    oracle.run_variant(BY_NAME[variant], mode="inductor", device="cuda", dtype=torch.bfloat16,
                       B=2, Hq=4, Hkv=2, L=1000, S=1000, E=128, Ev=128, block_size=64)


@pytest.mark.parametrize("L", [1, 17, 1000, 4096], ids=lambda s: f"S{s}")
def test_lengths(L):
    oracle.run_variant(BY_NAME["prefix_lm"], mode="inductor", device="cuda", dtype=torch.bfloat16,
                       B=1, Hq=4, Hkv=2, L=L, S=L, E=64, Ev=64, block_size=128)


def _grads(variant_name, options, seed=0):
    from inductor_flex import create_block_mask, flex_attention

    torch.manual_seed(seed)
    variant = BY_NAME[variant_name]
    B, H, L, E = 2, 8, 1024, 64
    buffers = variant.make_buffers(B, H, L, L, "cuda")
    for name in variant.learnable:
        buffers[name].requires_grad_(True)
    score_mod, mask_mod = variant.build(buffers)
    mask = create_block_mask(mask_mod, B, H, L, L, device="cuda") if mask_mod else None
    q, k, v = (torch.randn(B, H, L, E, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    compiled = torch.compile(flex_attention, fullgraph=True)
    out = compiled(q, k, v, score_mod=score_mod, block_mask=mask, kernel_options=options)
    tensors = [q, k, v, *(buffers[n] for n in variant.learnable)]
    return torch.autograd.grad(out, tensors, torch.ones_like(out))


@pytest.mark.parametrize("variant", ["alibi", "relative_position", "head_batch_bias", "learnable_bias", "document"])
def test_deterministic_gradients_are_bit_identical(variant):
    first = _grads(variant, {"DETERMINISTIC": True})
    for _ in range(3):
        again = _grads(variant, {"DETERMINISTIC": True})
        for a, b in zip(first, again):
            assert torch.equal(a, b), "gradients differ between runs with DETERMINISTIC=True"
    default = _grads(variant, {})
    for a, b in zip(first, default):  # the same gradients, up to the order of additions
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def test_backend_triton_compiles_the_template():
    from torch._inductor.utils import run_and_get_code

    from inductor_flex import create_block_mask, flex_attention

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    mask = create_block_mask(causal, None, None, 512, 512, device="cuda")
    q, k, v = (torch.randn(1, 2, 512, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

    def step(q, k, v):
        out = flex_attention(q, k, v, block_mask=mask, kernel_options={"BACKEND": "TRITON"})
        out.sum().backward()
        return out

    _, codes = run_and_get_code(torch.compile(step), q, k, v)
    assert any("dkdv_block_list" in code for code in codes)


def test_max_autotune_backward():
    from inductor_flex import create_block_mask, flex_attention

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    mask = create_block_mask(causal, None, None, 1024, 1024, device="cuda")
    q, k, v = (torch.randn(2, 4, 1024, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    compiled = torch.compile(flex_attention, mode="max-autotune-no-cudagraphs", fullgraph=True)
    out = compiled(q, k, v, block_mask=mask)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    gold = torch.autograd.grad(flex_attention(q64, k64, v64, block_mask=mask).sum(), (q64, k64, v64))
    for ours, ref in zip(grads, gold):
        torch.testing.assert_close(ours.double(), ref, atol=5e-2, rtol=5e-2)


def test_captured_tensor_gradients_of_every_kind():
    """Per-row index plus a 0-dim tensor read whole, a table indexed twice, a per-column index."""
    from test_backward_interpreter import CAPTURED, WHOLE_READ

    for variant in (WHOLE_READ, *CAPTURED):
        torch._dynamo.reset()
        oracle.run_variant(variant, mode="inductor", device="cuda", dtype=torch.float32,
                           B=2, Hq=4, Hkv=2, L=300, S=211, E=64, Ev=64, block_size=128)


def test_learnable_tensors_read_through_chained_indexing():
    oracle.check_chained_reads(torch.compile(flex_attention, fullgraph=True), "cuda", L=300, S=211, E=64)


def test_batch_made_dynamic_by_a_recompile():
    """A new batch size recompiles with the batch symbolic: the query and key batches are then
    two equal symbols, not a broadcast key batch (found by the GPU fuzz)."""
    compiled = torch.compile(flex_attention)
    for B in (2, 3, 2):
        oracle.check_call(compiled, BY_NAME["alibi"], B=B, Hq=4, Hkv=2, L=200, S=300, E=64, dtype=torch.float32,
                          device="cuda", block_size=128)
