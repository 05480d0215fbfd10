"""Dynamo's recompile limit never turns flex_attention into a silent unfused run.

Once a compiled function reaches ``torch._dynamo.config.recompile_limit``, Dynamo runs it (and
everything it calls) eagerly; flex_attention then runs its reference implementation and must
say why (``inductor_flex.compile_check``). The compiles here use the "eager" backend: what is
tested is Dynamo's frame handling, which does not depend on the backend.
"""

import warnings

import pytest
import torch

from inductor_flex import flex_attention
from inductor_flex.compile_check import RecompileLimitWarning, UnfusedAttentionWarning, uncompiled_call_message
from inductor_flex.block_mask import full_block_mask
from inductor_flex.reference import attention_reference


def _qkv(length):
    return [torch.randn(1, 2, length, 8, dtype=torch.float64) for _ in range(3)]


def _expected(q, k, v):
    fields = full_block_mask(q.size(2), k.size(2), device=q.device).as_tuple()
    out, _, _ = attention_reference(q, k, v, lambda s, b, h, i, j: s, fields, 1 / 8 ** 0.5)
    return out


def _our_warnings(record):
    return [w for w in record if issubclass(w.category, (RecompileLimitWarning, UnfusedAttentionWarning))]


def step(q, k, v):
    return flex_attention(q, k, v) * 2


@pytest.fixture
def low_recompile_limit():
    with torch._dynamo.config.patch(recompile_limit=2):
        yield


def test_reaching_the_limit_warns_naming_the_function_and_the_fixes(low_recompile_limit):
    compiled = torch.compile(step, backend="eager", dynamic=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for length in (8, 9):  # two static shapes: two compiles, the limit
            compiled(*_qkv(length))
        assert not _our_warnings(record)
        q, k, v = _qkv(10)
        out = compiled(q, k, v)  # a third shape: Dynamo runs `step` eagerly
    torch.testing.assert_close(out, 2 * _expected(q, k, v))
    (warning,) = _our_warnings(record)
    message = str(warning.message)
    assert warning.category is RecompileLimitWarning
    assert "'step'" in message and __file__ in message and "recompile_limit (2" in message
    for fix in ("dynamic=True", "mark_dynamic", "recompile_limit", "closure", "fullgraph=True"):
        assert fix in message, fix
    assert warning.filename == __file__  # attributed to the caller of flex_attention


def test_compiled_flex_attention_itself(low_recompile_limit):
    compiled = torch.compile(flex_attention, backend="eager", dynamic=False)
    for length in (8, 9):
        compiled(*_qkv(length))
    with pytest.warns(RecompileLimitWarning, match="stopped compiling 'flex_attention'"):
        compiled(*_qkv(10))


def test_the_warning_can_be_an_error(low_recompile_limit):
    compiled = torch.compile(step, backend="eager", dynamic=False)
    for length in (8, 9):
        compiled(*_qkv(length))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecompileLimitWarning)
        with pytest.raises(RecompileLimitWarning, match="recompile_limit"):
            compiled(*_qkv(10))


def test_fullgraph_makes_dynamo_raise(low_recompile_limit):
    compiled = torch.compile(step, backend="eager", dynamic=False, fullgraph=True)
    for length in (8, 9):
        compiled(*_qkv(length))
    with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
        compiled(*_qkv(10))


def test_eager_on_recompile_stance_is_named():
    compiled = torch.compile(step, backend="eager", dynamic=False)
    compiled(*_qkv(8))
    with torch.compiler.set_stance("eager_on_recompile"):
        compiled(*_qkv(8))  # cached: compiled code runs, nothing to say
        with pytest.warns(RecompileLimitWarning, match="eager_on_recompile"):
            compiled(*_qkv(9))


def test_plain_eager_calls_on_cpu_are_quiet():
    q, k, v = _qkv(8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        flex_attention(q, k, v)
        step(q, k, v)
        torch.compile(step, backend="eager")(q, k, v)
        step(q, k, v)  # compiled before, called plainly now: not a recompile-limit case
    assert not _our_warnings(record)


def test_eager_calls_on_a_gpu_warn_that_they_are_unfused():
    category, message = uncompiled_call_message(torch.device("cuda", 0))
    assert category is UnfusedAttentionWarning
    assert "without torch.compile" in message and "torch.compile(flex_attention)" in message


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_eager_call_on_cuda_warns():
    q, k, v = (torch.randn(1, 2, 256, 64, device="cuda") for _ in range(3))
    with pytest.warns(UnfusedAttentionWarning, match="cuda"):
        flex_attention(q, k, v)


@pytest.mark.parametrize("stance", ["force_eager", "eager_on_recompile", "fail_on_recompile"])
def test_compiler_stances_keep_closure_gradients(stance):
    """The eager path's capture (what lifts closure tensors, so they get gradients) runs
    whatever stance the user set: force_eager would otherwise skip it silently."""
    q, k, v = _qkv(8)
    weight = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)

    def scaled(score, b, h, q_idx, kv_idx):
        return score * weight

    expected = torch.autograd.grad(flex_attention(q, k, v, score_mod=scaled).pow(2).sum(), weight)[0]
    torch._dynamo.reset()
    with torch.compiler.set_stance(stance):
        out = flex_attention(q, k, v, score_mod=scaled)
    (grad,) = torch.autograd.grad(out.pow(2).sum(), weight)
    torch.testing.assert_close(grad, expected)
    assert grad.abs() > 0
