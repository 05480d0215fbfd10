"""The higher-order operators and their dispatch-key implementations.

``flex_attention_op(query, key, value, score_mod, block_mask, scale, kernel_options,
score_mod_buffers, mask_mod_buffers) -> (out, lse, max_scores)`` and
``flex_attention_backward_op(query, key, value, out, lse, grad_out, grad_lse, score_mod,
joint_graph, block_mask, scale, kernel_options, score_mod_buffers, mask_mod_buffers) ->
(grad_query, grad_key, grad_value, buffer_grads)``.

``block_mask`` is ``BlockMask.as_tuple()``: the sparse block tensors with ``mask_mod`` last.
``score_mod``/``mask_mod`` take the tensors they captured as trailing arguments
(``*score_mod_buffers`` / ``*mask_mod_buffers``); Dynamo lifts closures into those tuples.
lse and max_scores are natural-log / natural-scale, float32 (float64 for float64 inputs).

Per dispatch key:
- dense (CompositeExplicitAutograd): the chunked math reference (``reference.py``);
- FakeTensorMode: output metadata only;
- ProxyTorchDispatchMode: traces score_mod/mask_mod into submodules, records one node;
- functionalization: unwraps and redispatches (mods must not mutate their inputs);
- Autograd: ``autograd.py`` (joint graph + autograd.Function).
"""

import torch

from ._compat.hop import (
    AutoDispatchBelowAutograd,
    CachedTorchDispatchMode,
    CachingTorchDispatchMode,
    DispatchKey,
    HOP_OPTIONS,
    FakeTensorMode,
    HigherOrderOperator,
    ProxyTorchDispatchMode,
    TransformGetItemToIndex,
    redirect_to_mode,
    reenter_make_fx,
    set_original_aten_op,
    track_tensor_tree,
)
from ._compat.pytree import tree_map
from .dynamo import register_dynamo_variable
from .lowering import register_lowerings
from .mods import index_examples
from .source_version import with_source_version
from .reference import MASK_MOD, attention_backward_reference, attention_reference, working_dtype

FORWARD_OP_NAME = "inductor_flex_attention"
BACKWARD_OP_NAME = "inductor_flex_attention_backward"


class FlexAttentionOp(HigherOrderOperator):
    """Forward operator; unique name so torch's own ``flex_attention`` HOP is left alone."""

    def __init__(self):
        super().__init__(FORWARD_OP_NAME, **HOP_OPTIONS)

    def __call__(self, query, key, value, score_mod, block_mask, scale, kernel_options,
                 score_mod_buffers=(), mask_mod_buffers=()):
        return super().__call__(query, key, value, score_mod, block_mask, scale, kernel_options,
                                tuple(score_mod_buffers), tuple(mask_mod_buffers))


class FlexAttentionBackwardOp(HigherOrderOperator):
    def __init__(self):
        super().__init__(BACKWARD_OP_NAME, **HOP_OPTIONS)

    def __call__(self, query, key, value, out, lse, grad_out, grad_lse, score_mod, joint_graph,
                 block_mask, scale, kernel_options, score_mod_buffers=(), mask_mod_buffers=()):
        return super().__call__(query, key, value, out, lse, grad_out, grad_lse, score_mod, joint_graph,
                                block_mask, scale, kernel_options, tuple(score_mod_buffers),
                                tuple(mask_mod_buffers))


flex_attention_op = FlexAttentionOp()
flex_attention_backward_op = FlexAttentionBackwardOp()


def _trace_mods(query, score_mod, block_mask, score_mod_buffers, mask_mod_buffers, joint_graph=None):
    """score_mod, mask_mod (and the joint graph, if given) as FX graphs traced on scalar examples."""
    score_example = query.new_zeros((), requires_grad=query.requires_grad)
    with TransformGetItemToIndex():
        score_graph = reenter_make_fx(score_mod)(score_example, *index_examples(query), *score_mod_buffers)
        mask_graph = reenter_make_fx(block_mask[MASK_MOD])(*index_examples(query), *mask_mod_buffers)
        if joint_graph is not None:
            grad_example = query.new_zeros(())
            joint_graph = reenter_make_fx(joint_graph)(
                query.new_zeros(()), *index_examples(query), grad_example, *score_mod_buffers
            )
    return score_graph, mask_graph, joint_graph


def _record(mode, op, example_out, args):
    """Emit one call of ``op`` on the proxy tracer and tie the example outputs to it."""
    # A graph traced without Dynamo (make_fx, non-strict export) may reach Inductor too.
    register_lowerings()
    proxy_args = tree_map(mode.tracer.unwrap_proxy, args)
    with set_original_aten_op(op):
        out_proxy = mode.tracer.create_proxy("call_function", op, proxy_args, {})
    return track_tensor_tree(example_out, out_proxy, constant=None, tracer=mode.tracer)


def _register_submodule(mode, prefix, graph):
    name = mode.tracer.get_fresh_qualname(prefix)
    mode.tracer.root.register_module(name, graph)


# ---------------------------------------------------------------- forward operator


@flex_attention_op.py_impl(DispatchKey.CompositeExplicitAutograd)
def _forward_dense(query, key, value, score_mod, block_mask, scale, kernel_options,
                   score_mod_buffers, mask_mod_buffers):
    return attention_reference(query, key, value, score_mod, block_mask, scale,
                               score_mod_buffers, mask_mod_buffers)


@flex_attention_op.py_impl(FakeTensorMode)
def _forward_fake(mode, query, key, value, score_mod, block_mask, scale, kernel_options,
                  score_mod_buffers, mask_mod_buffers):
    with mode:
        batch, heads, q_len, _ = query.shape
        stats_dtype = working_dtype(query.dtype)
        out = query.new_empty((batch, heads, q_len, value.size(-1)))
        lse = query.new_empty((batch, heads, q_len), dtype=stats_dtype)
        max_scores = query.new_empty((batch, heads, q_len), dtype=stats_dtype)
        return out, lse, max_scores


@flex_attention_op.py_impl(ProxyTorchDispatchMode)
def _forward_proxy(mode, query, key, value, score_mod, block_mask, scale, kernel_options,
                   score_mod_buffers, mask_mod_buffers):
    example_out = flex_attention_op(query, key, value, score_mod, block_mask, scale, kernel_options,
                                    score_mod_buffers, mask_mod_buffers)
    score_graph, mask_graph, _ = _trace_mods(query, score_mod, block_mask, score_mod_buffers, mask_mod_buffers)
    _register_submodule(mode, "inductor_flex_score", score_graph)
    _register_submodule(mode, "inductor_flex_mask", mask_graph)
    block_mask = block_mask[:MASK_MOD] + (mask_graph,)
    args = (query, key, value, score_graph, block_mask, scale, with_source_version(kernel_options),
            score_mod_buffers, mask_mod_buffers)
    return _record(mode, flex_attention_op, example_out, args)


@flex_attention_op.py_functionalize_impl
def _forward_functionalize(ctx, query, key, value, score_mod, block_mask, scale, kernel_options,
                           score_mod_buffers, mask_mod_buffers):
    unwrapped = ctx.unwrap_tensors((query, key, value, block_mask, score_mod_buffers, mask_mod_buffers))
    query, key, value, block_mask, score_mod_buffers, mask_mod_buffers = unwrapped
    with ctx.redispatch_to_next():
        functional_score_mod = ctx.functionalize(score_mod)
        functional_mask_mod = ctx.functionalize(block_mask[MASK_MOD])
        block_mask = block_mask[:MASK_MOD] + (functional_mask_mod,)
        out = flex_attention_op(query, key, value, functional_score_mod, block_mask, scale, kernel_options,
                                score_mod_buffers, mask_mod_buffers)
    return ctx.wrap_tensors(out)


@flex_attention_op.py_impl(DispatchKey.Autograd)
def _forward_autograd(query, key, value, score_mod, block_mask, scale, kernel_options,
                      score_mod_buffers, mask_mod_buffers):
    from .autograd import flex_attention_autograd

    return flex_attention_autograd(query, key, value, score_mod, block_mask, scale, kernel_options,
                                   score_mod_buffers, mask_mod_buffers)


# ---------------------------------------------------------------- backward operator


@flex_attention_backward_op.py_impl(DispatchKey.CompositeExplicitAutograd)
def _backward_dense(query, key, value, out, lse, grad_out, grad_lse, score_mod, joint_graph,
                    block_mask, scale, kernel_options, score_mod_buffers, mask_mod_buffers):
    return attention_backward_reference(query, key, value, out, lse, grad_out, grad_lse, score_mod,
                                        joint_graph, block_mask, scale, score_mod_buffers, mask_mod_buffers)


@flex_attention_backward_op.py_impl(FakeTensorMode)
def _backward_fake(mode, query, key, value, out, lse, grad_out, grad_lse, score_mod, joint_graph,
                   block_mask, scale, kernel_options, score_mod_buffers, mask_mod_buffers):
    with mode:
        grad_query = torch.empty_like(query, memory_format=torch.contiguous_format)
        grad_key = key.new_empty(key.shape)
        grad_value = value.new_empty(value.shape)
        # Every floating-point captured tensor may get a gradient: which ones do is decided by
        # the autograd function (ctx.needs_input_grad), not by requires_grad here, which the
        # unwrapped tensors of a compiled graph's intermediates (``w = weight * 2``) lack.
        buffer_grads = tuple(
            torch.empty_like(b, memory_format=torch.contiguous_format)
            if isinstance(b, torch.Tensor) and b.is_floating_point()
            else None
            for b in score_mod_buffers
        )
        return grad_query, grad_key, grad_value, buffer_grads


@flex_attention_backward_op.py_impl(ProxyTorchDispatchMode)
def _backward_proxy(mode, query, key, value, out, lse, grad_out, grad_lse, score_mod, joint_graph,
                    block_mask, scale, kernel_options, score_mod_buffers, mask_mod_buffers):
    example_out = flex_attention_backward_op(query, key, value, out, lse, grad_out, grad_lse, score_mod,
                                             joint_graph, block_mask, scale, kernel_options,
                                             score_mod_buffers, mask_mod_buffers)
    score_graph, mask_graph, joint_graph = _trace_mods(
        query, score_mod, block_mask, score_mod_buffers, mask_mod_buffers, joint_graph
    )
    _register_submodule(mode, "inductor_flex_score", score_graph)
    _register_submodule(mode, "inductor_flex_joint", joint_graph)
    _register_submodule(mode, "inductor_flex_mask", mask_graph)
    block_mask = block_mask[:MASK_MOD] + (mask_graph,)
    args = (query, key, value, out, lse, grad_out, grad_lse, score_graph, joint_graph, block_mask, scale,
            with_source_version(kernel_options), score_mod_buffers, mask_mod_buffers)
    return _record(mode, flex_attention_backward_op, example_out, args)


@flex_attention_backward_op.py_functionalize_impl
def _backward_functionalize(ctx, query, key, value, out, lse, grad_out, grad_lse, score_mod, joint_graph,
                            block_mask, scale, kernel_options, score_mod_buffers, mask_mod_buffers):
    tensors = (query, key, value, out, lse, grad_out, grad_lse, block_mask, score_mod_buffers, mask_mod_buffers)
    query, key, value, out, lse, grad_out, grad_lse, block_mask, score_mod_buffers, mask_mod_buffers = (
        ctx.unwrap_tensors(tensors)
    )
    with ctx.redispatch_to_next():
        functional_score_mod = ctx.functionalize(score_mod)
        functional_joint = ctx.functionalize(joint_graph)
        grads = flex_attention_backward_op(query, key, value, out, lse, grad_out, grad_lse, functional_score_mod,
                                           functional_joint, block_mask, scale, kernel_options,
                                           score_mod_buffers, mask_mod_buffers)
    return ctx.wrap_tensors(grads)


@flex_attention_backward_op.py_impl(DispatchKey.Autograd)
def _backward_autograd(*args):
    # query .. grad_lse and the score_mod buffers are the differentiable inputs.
    differentiable = (*args[:7], *args[12])
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in differentiable):
        raise NotImplementedError(
            "inductor_flex does not support double backward (gradients of gradients) of flex_attention; "
            "call backward without create_graph=True."
        )
    with AutoDispatchBelowAutograd():
        return flex_attention_backward_op(*args)


# ---------------------------------------------------------------- autocast


def _autocast_off(op):
    """The operator under torch.autocast: q, k, v arrive in autocast's dtype (api.py casts them,
    as torch's flex attention does), and the operator's own arithmetic (the eager path's float32
    softmax, its gradients) runs with autocast off, as the compiled kernels do."""

    def run(*args):
        with torch.autocast(args[0].device.type, enabled=False):
            return op(*args)

    return run


for _op in (flex_attention_op, flex_attention_backward_op):
    _op.py_impl(DispatchKey.AutocastCPU)(_autocast_off(_op))
    _op.py_impl(DispatchKey.AutocastCUDA)(_autocast_off(_op))


# Activation checkpointing (selective) replays the op through these modes.
redirect_to_mode(flex_attention_op, CachingTorchDispatchMode)
redirect_to_mode(flex_attention_op, CachedTorchDispatchMode)

# Dynamo must meet our operator with our tracker, never torch's (see dynamo.py).
register_dynamo_variable(FORWARD_OP_NAME)
