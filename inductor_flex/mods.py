"""Evaluating user ``score_mod`` / ``mask_mod`` functions over whole index grids.

A mod is written for one (b, h, q_idx, kv_idx) point of scalar tensors. The reference and
``create_block_mask`` need it over a grid, so it is vmapped once per index dimension; vmap,
unlike plain broadcasting, keeps the per-point semantics for every op a mod may use.
"""

import contextlib
import inspect
from typing import Callable

import torch

from ._compat.hop import TransformGetItemToIndex, zeros_and_scatter_op

SCORE_MOD_ARITY = 5  # score, b, h, q_idx, kv_idx
MASK_MOD_ARITY = 4  # b, h, q_idx, kv_idx


def identity_score_mod(score, b, h, q_idx, kv_idx):
    """The score_mod used when the caller passes none."""
    return score


def index_examples(like: torch.Tensor) -> list:
    """Four *distinct* int32 scalars standing for b, h, q_idx, kv_idx when tracing a mod.

    Aliased examples (one tensor passed four times) silently trace to a wrong graph.
    """
    return [like.new_zeros((), dtype=torch.int32) for _ in range(4)]


class UnsupportedGradient(NotImplementedError):
    """A score_mod whose captured tensors' gradient no backward here can compute; the message
    says how to rewrite it."""


def vmap_over_bhqkv(fn: Callable, prefix: tuple, suffix: tuple = (), out_dims=0) -> Callable:
    """vmap ``fn(*prefix_args, b, h, q_idx, kv_idx, *suffix_args)`` over the four index axes.

    ``prefix``/``suffix`` give the in_dims of the extra leading/trailing arguments (``0`` for a
    tensor laid out [B, H, Q, KV] like the scores, ``None`` for captured buffers). The result
    takes b:[B], h:[H], q_idx:[Q], kv_idx:[KV] and returns [B, H, Q, KV].
    """
    axes = [(None, None, None, 0), (None, None, 0, None), (None, 0, None, None), (0, None, None, None)]
    for dims in axes:
        fn = torch.vmap(fn, in_dims=prefix + dims + suffix, out_dims=out_dims)
    return fn


RETURN_HINT = {
    "score_mod": "return an expression of `score` (e.g. `score + bias[h]`).",
    "mask_mod": "return a comparison of the index tensors (e.g. `q_idx >= kv_idx`).",
}


def check_mod_output(role: str, value, expected_shape: tuple) -> None:
    """Raise a TypeError/ValueError naming the fix unless ``value`` is what ``role`` must return:
    a floating-point score (score_mod) or a bool (mask_mod) per position, ``expected_shape``
    in all (``()`` for one traced position, the grid's shape for a vmapped evaluation)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{role} must return a tensor, but it returned a {type(value).__name__}; {RETURN_HINT[role]}")
    if role == "score_mod" and not value.is_floating_point():
        raise TypeError(
            f"score_mod must return a floating-point score, but it returned dtype {value.dtype}; "
            + RETURN_HINT[role]
        )
    if role == "mask_mod" and value.dtype != torch.bool:
        raise TypeError(
            f"mask_mod must return a bool tensor, but it returned dtype {value.dtype}; "
            "return a comparison (e.g. `q_idx >= kv_idx`) or cast with `.bool()`."
        )
    if tuple(value.shape) != tuple(expected_shape):
        per_position = tuple(value.shape[len(expected_shape):]) if value.dim() > len(expected_shape) else "?"
        raise ValueError(
            f"{role} must return one value per position (a 0-d tensor), but it returned shape "
            f"{per_position} per position; reduce it to one element: index captured tensors with "
            "every index they vary over (e.g. `bias[h, q_idx]`), and do not unsqueeze or expand."
        )


def _returning_a_tensor(mod: Callable, role: str) -> Callable:
    """``mod``, raising our TypeError when it returns a non-tensor (vmap's own error names
    a fix that does not apply: out_dims)."""

    def checked(*args):
        value = mod(*args)
        if not isinstance(value, torch.Tensor):
            check_mod_output(role, value, ())
        return value

    return checked


@contextlib.contextmanager
def _vmap_errors_name_the_fix(role: str):
    """vmap refuses Python control flow on tensor values and .item(): say what to write instead."""
    try:
        yield
    except RuntimeError as error:
        if not str(error).startswith("vmap:"):
            raise
        raise TypeError(
            f"{role} must be a pure tensor function of its index arguments, evaluated for many "
            f"positions at once ({error}); use torch.where(cond, a, b) instead of Python if/while "
            "on tensor values, and no .item() or .tolist()."
        ) from error


def evaluate_mask_mod(mask_mod, b, h, q_idx, kv_idx, buffers=()):
    """mask_mod over the grid b × h × q_idx × kv_idx, as a bool tensor [B, H, Q, KV]."""
    grid_fn = vmap_over_bhqkv(_returning_a_tensor(mask_mod, "mask_mod"), prefix=(), suffix=(None,) * len(buffers))
    with TransformGetItemToIndex(), _vmap_errors_name_the_fix("mask_mod"):
        allowed = grid_fn(b, h, q_idx, kv_idx, *buffers)
    check_mod_output("mask_mod", allowed, (b.numel(), h.numel(), q_idx.numel(), kv_idx.numel()))
    return allowed.expand(b.numel(), h.numel(), q_idx.numel(), kv_idx.numel())


def evaluate_score_mod(score_mod, scores, b, h, q_idx, kv_idx, buffers=()):
    """score_mod applied to every entry of ``scores`` [B, H, Q, KV]."""
    grid_fn = vmap_over_bhqkv(_returning_a_tensor(score_mod, "score_mod"), prefix=(0,), suffix=(None,) * len(buffers))
    with TransformGetItemToIndex(), _vmap_errors_name_the_fix("score_mod"):
        modified = grid_fn(scores, b, h, q_idx, kv_idx, *buffers)
    check_mod_output("score_mod", modified, tuple(scores.shape))
    return modified


def positional_arity(fn: Callable) -> int | None:
    """Number of positional parameters ``fn`` accepts, or None when it takes ``*args``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    count = 0
    for p in params:
        if p.kind == p.VAR_POSITIONAL:
            return None
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty:
            count += 1
    return count


def check_mod_arity(fn: Callable, expected: int, role: str) -> None:
    """Raise a TypeError naming the expected signature when ``fn`` has the wrong arity."""
    signature = "score_mod(score, b, h, q_idx, kv_idx)" if role == "score_mod" else "mask_mod(b, h, q_idx, kv_idx)"
    if not callable(fn):
        raise TypeError(f"{role} must be callable, got {type(fn).__name__}; pass a function `{signature}`")
    if torch.compiler.is_dynamo_compiling():
        # Dynamo cannot trace inspect.signature; a wrong arity fails when the mod is captured.
        return
    arity = positional_arity(fn)
    if arity is not None and arity != expected:
        raise TypeError(
            f"{role} takes {arity} positional arguments but must take {expected}: "
            f"define it as `{signature}`."
        )


def gradient_summands(node) -> list:
    """The terms of a joint-graph gradient that autograd accumulated with additions."""
    if node.op == "call_function" and node.target is torch.ops.aten.add.Tensor and not node.kwargs \
            and len(node.args) == 2 and all(isinstance(a, torch.fx.Node) for a in node.args):
        return gradient_summands(node.args[0]) + gradient_summands(node.args[1])
    return [node]


def joint_outputs_per_position(graph_module, n_grid_inputs: int) -> list:
    """For each output of the graph: does it depend on one of the first ``n_grid_inputs``
    placeholders (the per-position inputs vmapped over the grid) other than through
    ``flex_lib.zeros_and_scatter``, whose vmap rule returns a result already summed over the
    grid? An output that mixes both kinds (a captured tensor read both indexed and whole)
    cannot be summed correctly and raises NotImplementedError."""
    scatter = zeros_and_scatter_op()
    batched, scattered = set(), set()
    placeholders = 0
    outputs = ()
    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            if placeholders < n_grid_inputs:
                batched.add(node)
            placeholders += 1
        elif node.op == "call_function":
            if node.target is scatter:
                scattered.add(node)
                continue
            if any(n in batched for n in node.all_input_nodes):
                batched.add(node)
            if any(n in scattered for n in node.all_input_nodes):
                scattered.add(node)
        elif node.op == "output":
            outputs = node.args[0]
    result = []
    for i, out in enumerate(outputs):
        is_batched = isinstance(out, torch.fx.Node) and out in batched
        if is_batched and out in scattered:
            raise UnsupportedGradient(
                f"inductor_flex: score_mod reads captured tensor #{i - 5} both indexed by b/h/q_idx/kv_idx "
                "and as a whole; the gradient of such a tensor is not supported: read it one way only "
                "(e.g. `w[0]` for a scalar)."
            )
        result.append(is_batched)
    return result
