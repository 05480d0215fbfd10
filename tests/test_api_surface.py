"""The public API is torch's: every name of ``torch.nn.attention.flex_attention.__all__`` exists
here, and every parameter torch's functions and BlockMask's methods take, ours take too, in the
same order, of the same kind, with the same default. Code written for torch runs by changing
one import. Ours may take more (torch 2.11 lacks parameters 2.13 added), never fewer."""

import inspect

import pytest
import torch.nn.attention.flex_attention as torch_flex

import inductor_flex

PUBLIC_NAMES = sorted(torch_flex.__all__)


def _comparable_default(default):
    if default is inspect.Parameter.empty:
        return "<required>"
    if callable(default):
        return getattr(default, "__name__", repr(default))  # noop_mask is a different function object
    return default


def _parameters(function):
    return [(p.name, p.kind, _comparable_default(p.default)) for p in inspect.signature(function).parameters.values()]


def _assert_accepts_what_torch_accepts(ours, theirs, where):
    our_params, their_params = _parameters(ours), _parameters(theirs)
    names = [name for name, _kind, _default in our_params]
    missing = [p for p in their_params if p[0] not in names]
    assert not missing, f"{where}: torch takes {missing}, ours does not"
    ours_in_torch_order = [p for p in our_params if p[0] in {q[0] for q in their_params}]
    assert ours_in_torch_order == their_params, f"{where}: order, kind or default differs"
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    extra_positional = [p for p in our_params[: len(their_params)] if p not in their_params and p[1] in positional]
    assert not extra_positional, f"{where}: extra positional parameters before torch's: {extra_positional}"


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_name_exists(name):
    assert hasattr(inductor_flex, name), f"inductor_flex lacks torch's public name {name}"


@pytest.mark.parametrize("name", [n for n in PUBLIC_NAMES if inspect.isfunction(getattr(torch_flex, n))])
def test_function_signature(name):
    _assert_accepts_what_torch_accepts(getattr(inductor_flex, name), getattr(torch_flex, name), name)


BLOCK_MASK_METHODS = sorted(
    name for name, member in vars(torch_flex.BlockMask).items()
    if callable(getattr(torch_flex.BlockMask, name)) and (not name.startswith("_") or name == "__init__")
    and not isinstance(member, property)
)


@pytest.mark.parametrize("method", BLOCK_MASK_METHODS)
def test_block_mask_method_signature(method):
    assert hasattr(inductor_flex.BlockMask, method), f"BlockMask lacks torch's method {method}"
    _assert_accepts_what_torch_accepts(getattr(inductor_flex.BlockMask, method),
                                       getattr(torch_flex.BlockMask, method), f"BlockMask.{method}")


def test_kernel_options_type_lists_torch_keys():
    assert set(torch_flex.FlexKernelOptions.__annotations__) <= set(inductor_flex.FlexKernelOptions.__annotations__)


def test_torch_aux_request_is_taken():
    """Code that switches flex_attention's import but still builds torch's AuxRequest."""
    import torch

    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    _, theirs = torch_flex.flex_attention(q, k, v, return_aux=torch_flex.AuxRequest(lse=True))
    for call in (inductor_flex.flex_attention, torch.compile(inductor_flex.flex_attention, fullgraph=True)):
        out, aux = call(q, k, v, return_aux=torch_flex.AuxRequest(lse=True))
        assert out.shape == q.shape and aux.max_scores is None
        torch.testing.assert_close(aux.lse, theirs.lse)
    _, aux = inductor_flex.flex_attention(q, k, v, return_aux=torch_flex.AuxRequest(max_scores=True))
    assert aux.lse is None
    torch.testing.assert_close(aux.max_scores, (q @ k.transpose(-1, -2) / 4.0).amax(-1))  # torch's CPU lacks it


def test_torch_block_mask_is_taken():
    """A mask built with torch's create_block_mask, passed to our flex_attention."""
    import torch

    def sliding(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < 24)

    q, k, v = (torch.randn(1, 2, 100, 16) for _ in range(3))
    theirs = torch_flex.create_block_mask(sliding, None, None, 100, 100, device="cpu", BLOCK_SIZE=32)
    ours = inductor_flex.create_block_mask(sliding, None, None, 100, 100, device="cpu", BLOCK_SIZE=32)
    expected = inductor_flex.flex_attention(q, k, v, block_mask=ours)
    for call in (inductor_flex.flex_attention, torch.compile(inductor_flex.flex_attention, fullgraph=True)):
        torch.testing.assert_close(call(q, k, v, block_mask=theirs), expected)
