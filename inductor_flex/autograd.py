"""Autograd for the forward operator: the joint graph of score_mod and the autograd.Function.

The backward of attention needs, per score, d(score_mod)/d(score) and the gradients of every
captured tensor score_mod reads. We trace ``score_mod`` once on scalar examples into a joint
(forward + backward) graph with ``create_joint``; the backward operator (and, later, the
backward kernel) evaluates that graph point-wise, so the derivative of any score_mod the user
writes comes from autograd, never from hand-written rules.
"""

import torch

from ._compat.hop import (
    AutoDispatchBelowAutograd,
    FakeTensorMode,
    TransformGetItemToIndex,
    detect_fake_mode,
    make_fx,
    zeros_and_scatter_op,
)
from ._compat.joint import (
    create_joint,
    disable_functional_mode,
    disable_proxy_modes_tracing,
    make_aot_config,
    suspend_functionalization,
)
from .mods import UnsupportedGradient, gradient_summands, index_examples


def _like(t):
    """A fresh tensor with t's metadata (keeps requires_grad), or t itself for non-tensors."""
    if isinstance(t, torch.Tensor):
        return torch.empty_strided(
            t.size(), t.stride(), device=t.device, dtype=t.dtype, requires_grad=t.requires_grad
        )
    return t


def build_joint_graph(score_mod, query: torch.Tensor, score_mod_buffers: tuple):
    """Trace ``score_mod``'s joint graph.

    The graph takes ``(score, b, h, q_idx, kv_idx, grad_of_modified_score, *buffers)`` and
    returns ``(grad_score, None x4, *buffer_grads)`` (None for buffers that need no grad).
    """
    with suspend_functionalization(), disable_functional_mode(), disable_proxy_modes_tracing():
        fake_mode = detect_fake_mode((query, *score_mod_buffers)) or FakeTensorMode(allow_non_fake_inputs=True)
        with fake_mode:
            # Only query's metadata is read: under functionalization it is a wrapper we must not call.
            score = torch.zeros((), dtype=query.dtype, device=query.device, requires_grad=True)
            examples = [score, *index_examples(score)]
            buffers = [_like(t) for t in score_mod_buffers]
            with TransformGetItemToIndex():
                modified = score_mod(*examples, *buffers)
            if not isinstance(modified, torch.Tensor):
                raise TypeError(f"score_mod must return a tensor, got {type(modified).__name__}")
            grad_example = _like(modified)

        def forward_with_grad_mask(*args):
            modified = score_mod(*args)
            return (modified,), (modified.requires_grad,)

        joint = create_joint(forward_with_grad_mask, aot_config=make_aot_config())

        def joint_fn(score, b, h, q_idx, kv_idx, grad_modified, *buffers):
            grads_out = [grad_modified] if grad_modified.requires_grad else []
            _, grads = joint([score, b, h, q_idx, kv_idx, *buffers], grads_out)
            return grads

        # Identity saved-tensor hooks shadow the caller's: under activation checkpointing, the
        # trace's own autograd would otherwise unpack by re-running the checkpointed function.
        with TransformGetItemToIndex(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            graph_module = make_fx(joint_fn)(*examples, grad_example, *buffers)
    graph_module = _merge_chained_scatters(graph_module)
    _refuse_slices_read_whole(graph_module)
    return _zero_where_no_gradient_flows(graph_module)


def _scalar_indices(indices) -> bool:
    return all(isinstance(i, torch.fx.Node) and getattr(i.meta.get("val"), "ndim", None) == 0 for i in indices)


def _same_size(a, b) -> bool:
    """Sizes in a joint graph: ints, or nodes standing for symbolic sizes (compared by symbol)."""
    def symbol(size):
        return str(size.meta.get("val", size.name)) if isinstance(size, torch.fx.Node) else str(size)

    return a is b or symbol(a) == symbol(b)


def _merge_chained_scatters(graph_module):
    """One scatter per chained read: ``bias[q_idx][kv_idx]`` as ``bias[q_idx, kv_idx]``.

    Autograd differentiates a chained read as a scatter of the inner gradient (a row of
    ``bias``, one per position) into ``bias``. A per-position row is what neither the vmap
    rule nor the kernels can sum, so a scatter whose values are scatters (or sums of them) into
    the rest of its shape becomes one scatter per summand with the indices concatenated. Only
    0-dim (per-position) indices qualify, where ``x[i][j]`` is ``x[i, j]`` exactly.
    """
    graph = graph_module.graph
    scatter = zeros_and_scatter_op()

    def summands(node, inner_shape):
        """The scatters into ``inner_shape`` that ``node`` adds up, or None."""
        if not isinstance(node, torch.fx.Node) or node.op != "call_function":
            return None
        if node.target is scatter:
            shape, indices, _ = node.args
            same = len(shape) == len(inner_shape) and all(map(_same_size, shape, inner_shape))
            return [node] if same and _scalar_indices(indices) else None
        if node.target is torch.ops.aten.add.Tensor and len(node.args) == 2 and not node.kwargs:
            parts = [summands(arg, inner_shape) for arg in node.args]
            return None if None in parts else parts[0] + parts[1]
        return None

    merged_any, changed = False, True
    while changed:
        changed = False
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target is not scatter or not node.users:
                continue
            shape, indices, values = node.args
            inner = summands(values, list(shape)[len(indices):]) if _scalar_indices(indices) else None
            if not inner:
                continue
            with graph.inserting_before(node):
                merged = [graph.call_function(scatter, (list(shape), [*indices, *part.args[1]], part.args[2]))
                          for part in inner]
                for new in merged:
                    new.meta = dict(node.meta)
                total = merged[0]
                for new in merged[1:]:
                    total = graph.call_function(torch.ops.aten.add.Tensor, (total, new))
                    total.meta = dict(node.meta)
            node.replace_all_uses_with(total)
            graph.erase_node(node)
            graph.eliminate_dead_code()
            merged_any = changed = True
            break
    if merged_any:
        graph.lint()
        graph_module.recompile()
    return graph_module


def _refuse_slices_read_whole(graph_module):
    """A slice of a captured tensor used whole per position (``t[h].sum()``) has a gradient
    that is a slice per position, which no backward here sums: refuse it with the rewrite."""
    scatter = zeros_and_scatter_op()
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target is scatter:
            values = node.args[2]
            value_shape = getattr(values.meta.get("val"), "shape", ()) if isinstance(values, torch.fx.Node) else ()
            if len(value_shape):
                raise UnsupportedGradient(
                    f"inductor_flex: score_mod takes a {len(value_shape)}-dim slice of a learnable captured "
                    "tensor per position and uses the slice whole (e.g. `t[h].sum()`); its gradient is not "
                    "supported. Index the tensor down to one element per position "
                    "(`t[h, kv_idx]`), or compute the reduction outside score_mod and capture the result "
                    "(`t_sum = t.sum(-1)`, then `t_sum[h]`)."
                )


def _zero_where_no_gradient_flows(graph_module):
    """Where the modified score's gradient is exactly 0, every gradient term is 0.

    By the chain rule each term is that gradient times a derivative; IEEE arithmetic makes
    0 × inf a NaN where score_mod produced ±inf (a score set to -inf then scaled by a learnable
    tensor: d(score·w)/dw = score). Each scattered term (``zeros_and_scatter``'s values), each
    gradient of a tensor read whole, and the score's gradient get ``where(grad == 0, 0, term)``;
    a score gradient that is the incoming gradient itself needs no guard.
    """
    graph = graph_module.graph
    aten = torch.ops.aten
    scatter = zeros_and_scatter_op()
    grad = [n for n in graph.nodes if n.op == "placeholder"][5]
    with graph.inserting_after(grad):
        no_flow = graph.call_function(aten.eq.Scalar, (grad, 0))

    def guarded(term):
        return graph.call_function(aten.where.ScalarSelf, (no_flow, 0.0, term))

    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is scatter:
            with graph.inserting_before(node):
                node.update_arg(2, guarded(node.args[2]))
    output = next(n for n in graph.nodes if n.op == "output")
    outputs = list(output.args[0])
    with graph.inserting_before(output):
        for position, term in enumerate(outputs):
            if position in (1, 2, 3, 4) or not isinstance(term, torch.fx.Node) or term is grad:
                continue
            if any(s.op == "call_function" and s.target is scatter for s in gradient_summands(term)):
                continue  # indexed reads: their scattered values are guarded above
            outputs[position] = guarded(term)
    output.args = (type(output.args[0])(outputs),)
    graph.lint()
    graph_module.recompile()
    return graph_module


_SAVED_TENSOR = object()  # placeholder for a tensor slot in ctx.saved_slots


class FlexAttentionFunction(torch.autograd.Function):
    """Forward operator under autograd; its backward calls the backward operator."""

    @staticmethod
    def forward(ctx, query, key, value, score_mod, joint_graph, block_mask, scale, kernel_options,
                mask_mod_buffers, *score_mod_buffers):
        from .ops import flex_attention_op

        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in mask_mod_buffers):
            raise ValueError(
                "a tensor captured by mask_mod requires grad; masks are not differentiable: "
                "detach it (`t.detach()`), or move the learnable part into score_mod."
            )
        ctx.set_materialize_grads(False)
        ctx.score_mod = score_mod
        ctx.joint_graph = joint_graph
        ctx.block_mask_static = (block_mask[0], block_mask[1], block_mask[10], block_mask[11], block_mask[12])
        ctx.scale = scale
        ctx.kernel_options = kernel_options
        ctx.num_score_buffers = len(score_mod_buffers)
        with AutoDispatchBelowAutograd():
            out, lse, max_scores = flex_attention_op(
                query, key, value, score_mod, block_mask, scale, kernel_options,
                tuple(score_mod_buffers), tuple(mask_mod_buffers),
            )
        ctx.mark_non_differentiable(max_scores)
        saved = (query, key, value, out, lse, *block_mask[2:10], *score_mod_buffers, *mask_mod_buffers)
        # save_for_backward takes tensors only; SymInts and absent (None) fields ride on ctx.
        ctx.save_for_backward(*[t for t in saved if isinstance(t, torch.Tensor)])
        ctx.saved_slots = [_SAVED_TENSOR if isinstance(t, torch.Tensor) else t for t in saved]
        return out, lse, max_scores

    @staticmethod
    def backward(ctx, grad_out, grad_lse, grad_max_scores):
        from .ops import flex_attention_backward_op

        tensors = iter(ctx.saved_tensors)
        saved = [next(tensors) if slot is _SAVED_TENSOR else slot for slot in ctx.saved_slots]
        query, key, value, out, lse = saved[:5]
        sparse = saved[5:13]
        buffers = saved[13:]
        score_mod_buffers = tuple(buffers[: ctx.num_score_buffers])
        mask_mod_buffers = tuple(buffers[ctx.num_score_buffers:])
        q_len, kv_len, q_block, kv_block, mask_mod = ctx.block_mask_static
        block_mask = (q_len, kv_len, *sparse, q_block, kv_block, mask_mod)
        grad_query, grad_key, grad_value, buffer_grads = flex_attention_backward_op(
            query, key, value, out, lse, grad_out, grad_lse,
            ctx.score_mod, ctx.joint_graph, block_mask, ctx.scale, ctx.kernel_options,
            score_mod_buffers, mask_mod_buffers,
        )
        # One slot per forward() argument: score_mod .. mask_mod_buffers get no gradient, nor
        # does a captured tensor that did not require one.
        wanted = ctx.needs_input_grad[9:]
        buffer_grads = [g if want else None for g, want in zip(buffer_grads, wanted)]
        return (grad_query, grad_key, grad_value, None, None, None, None, None, None, *buffer_grads)


def flex_attention_autograd(query, key, value, score_mod, block_mask, scale, kernel_options,
                            score_mod_buffers, mask_mod_buffers):
    """Autograd-key implementation of the forward operator."""
    differentiable = (query, key, value, *score_mod_buffers)
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in differentiable
    )
    joint_graph = build_joint_graph(score_mod, query, score_mod_buffers) if needs_grad else None
    return FlexAttentionFunction.apply(
        query, key, value, score_mod, joint_graph, block_mask, scale, kernel_options,
        mask_mod_buffers, *score_mod_buffers,
    )
