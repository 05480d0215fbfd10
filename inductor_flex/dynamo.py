"""Teaching Dynamo our forward operator: score_mod and mask_mod become subgraphs.

When Dynamo meets ``flex_attention_op(query, key, value, score_mod, block_mask, scale,
kernel_options)`` it cannot put Python functions into an FX graph. This tracker speculates each
mod on scalar example tensors into a subgraph installed on the output graph; every tensor the
mod closes over (alibi slopes, a bias table, document ids) is *lifted* into an explicit input,
passed as ``score_mod_buffers`` / ``mask_mod_buffers``. That is what lets autograd give those
tensors gradients and lets the lowering treat them as kernel inputs.

A graph break inside a mod is a hard error naming the fix: falling back to eager would run the
O(S²) reference silently.
"""

import types

import torch

from ._compat.dynamo import (
    TorchHigherOrderOperatorVariable,
    TupleVariable,
    UncapturedHigherOrderOpError,
    Unsupported,
    VariableTracker,
    discard_graph_changes,
    dynamo_config,
    guard_float,
    guard_int,
    hop_variable_registry,
    make_attr,
    proxy_args_kwargs,
    set_original_aten_op,
    speculate_subgraph,
    wrap_fx_proxy,
)
from ._compat.hop import TransformGetItemToIndex
from .lowering import register_lowerings
from .mods import (MASK_MOD_ARITY, RETURN_HINT, SCORE_MOD_ARITY, UnsupportedGradient, check_mod_arity,
                   check_mod_output)
from .source_version import with_source_version

_GRAPH_BREAK_FIX = (
    "{role} must be traceable by torch.compile as a pure tensor function of its arguments: no "
    "print(), .item(), .tolist(), Python if/while on tensor values or calls into non-torch "
    "libraries. Use torch.where(cond, a, b) for branches and index captured tensors with the "
    "index arguments (e.g. bias[h, q_idx])."
)


class CaptureTypeError(UncapturedHigherOrderOpError, TypeError):
    """A mod found wrong while capturing it (e.g. it returns the wrong dtype). Still a TypeError
    for the caller: Dynamo lets this error class through unwrapped, with or without fullgraph
    (other exceptions raised here would become an InternalTorchDynamoError)."""


class CaptureValueError(UncapturedHigherOrderOpError, ValueError):
    """Like CaptureTypeError, a ValueError (e.g. a mod returns the wrong shape)."""


class CaptureNotImplementedError(UncapturedHigherOrderOpError, NotImplementedError):
    """Like CaptureTypeError, a NotImplementedError: a score_mod whose gradient is unsupported,
    found when the operator first runs on fake tensors (building the joint graph)."""


def _unsupported_gradient(error):
    """Our UnsupportedGradient among the causes of a Dynamo error, or None."""
    while error is not None and not isinstance(error, UnsupportedGradient):
        error = error.__cause__ or error.__context__
    return error


def _example_value(variable):
    """The value a traced VariableTracker stands for (a fake tensor for tensors)."""
    proxy = variable if isinstance(variable, torch.fx.Proxy) else getattr(variable, "as_proxy", lambda: variable)()
    return proxy.node.meta.get("example_value") if isinstance(proxy, torch.fx.Proxy) else proxy


def _specialise_symbols(graph, lifted, ints: bool):
    """Replace symbolic numbers of a mod's subgraph by their values, guarded.

    A float the compiled function reads elsewhere too (``q * (1 / cap)``) or one computed from a
    dynamic int (``window * 0.01``) is a SymFloat in the subgraph; no lowering can put one into
    a kernel (Inductor would even bake in the value of the compile that made it dynamic, a
    silent wrong answer on the next value). Guarding on the value recompiles per value instead,
    as for any specialised constant. With ``ints``, so is every SymInt the subgraph computes
    with (``table.numel() // 2`` indexing a learnable table): the backward's gradient scatter
    cannot render one. Elsewhere SymInts stay symbolic (a causal offset ``S - L`` keeps one
    graph for every length). Returns the lifted inputs still used by the subgraph.
    """
    def specialised(node):
        example = node.meta.get("example_value")
        if isinstance(example, torch.SymFloat):
            return True
        return ints and isinstance(example, torch.SymInt) and bool(node.users)

    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    lifted_placeholders = dict(zip(placeholders[len(placeholders) - len(lifted):], lifted))
    replaced = set()
    for node in list(graph.nodes):
        if not specialised(node):
            continue
        example = node.meta["example_value"]
        try:
            value = guard_float(example) if isinstance(example, torch.SymFloat) else guard_int(example)
        except Exception as error:  # a number read from tensor data (.item()) has no value to guard
            raise CaptureTypeError(
                f"a mod reads a number that torch.compile cannot keep constant ({example}); "
                "pass the value as a tensor captured by the mod (e.g. cap = torch.tensor(cap)) instead."
            ) from error
        for user in list(node.users):
            user.args = torch.fx.node.map_arg(user.args, lambda arg: value if arg is node else arg)
            user.kwargs = torch.fx.node.map_arg(user.kwargs, lambda arg: value if arg is node else arg)
        replaced.add(node)
    graph.eliminate_dead_code()
    kept = []
    for node, outer in lifted_placeholders.items():
        if node.users or node not in replaced:
            kept.append(outer)
        else:
            graph.erase_node(node)
    return tuple(kept)


def _on_device(tx, buffers, device):
    """Captured 0-d CPU tensors moved to the query's device, in the graph.

    ``score * torch.tensor(0.7)`` with CUDA inputs is ordinary torch (a CPU scalar mixes with
    any device), but Inductor hands a 0-d CPU graph input to a Triton kernel as a Python number,
    while our kernels read captured tensors through pointers. A ``.to(device)`` in the graph
    gives the kernels a device tensor, and autograd carries the gradient back to the CPU.
    """
    moved = []
    for proxy in buffers:
        value = _example_value(proxy)
        if isinstance(value, torch.Tensor) and value.device != device:
            if value.dim() > 0:  # torch would not mix these either; the kernels could not read it
                raise CaptureValueError(
                    f"a tensor of shape {tuple(value.shape)} captured by score_mod/mask_mod is on {value.device} "
                    f"but query is on {device}; move it with .to(query.device) (only 0-dim tensors "
                    "are moved for you)"
                )
            proxy = wrap_fx_proxy(tx, tx.output.create_proxy("call_method", "to", (proxy, device), {})).as_proxy()
        moved.append(proxy)
    return tuple(moved)


class FlexAttentionVariable(TorchHigherOrderOperatorVariable):
    _HOP_NAME = "inductor_flex_attention"
    _ALLOW_FALLBACK_TO_EAGER = False

    def _speculate_mod(self, tx, query, mod, role):
        """Trace ``mod`` into a subgraph; returns (get_attr proxy of it, lifted closure proxies)."""

        def int_scalar():
            return query.call_method(
                tx, "new_empty", [VariableTracker.build(tx, [])], {"dtype": VariableTracker.build(tx, torch.int32)}
            )

        with discard_graph_changes(tx):
            indices = [int_scalar() for _ in range(4)]  # four distinct tensors: b, h, q_idx, kv_idx
            if role == "score_mod":
                requires_grad = VariableTracker.build(tx, query.requires_grad)
                score = query.call_method(tx, "new_empty", [VariableTracker.build(tx, [])],
                                          {"requires_grad": requires_grad})
                example_args = [score, *indices]
            else:
                example_args = indices

        # Under Dynamo flex_attention() cannot inspect the mod: check its arity here.
        function = getattr(mod, "fn", None)
        if callable(function) and isinstance(getattr(mod, "obj", None), VariableTracker):
            function = types.MethodType(function, object())  # a bound method: its self is given
        if callable(function):
            try:
                check_mod_arity(function, SCORE_MOD_ARITY if role == "score_mod" else MASK_MOD_ARITY, role)
            except TypeError as error:
                raise CaptureTypeError(str(error)) from None

        try:
            # A Python float the mod closes over stays a constant of the subgraph (one compile
            # per value, like any specialised constant): with Dynamo's automatic dynamic it would
            # become a graph input read by .item() inside the subgraph, which no kernel can run.
            with TransformGetItemToIndex(), dynamo_config.patch(specialize_float=True):
                (_output, _spec), graph, lifted = speculate_subgraph(
                    tx,
                    mod,
                    example_args,
                    {},
                    description=f"inductor_flex {role}",
                    source_target=self.value,
                    set_subgraph_inputs="flatten_manual",
                )
        except Unsupported as error:
            if "output" in str(error) and "must consist of tensors" in str(error):  # e.g. a Python float
                message = f"{role} must return a tensor, not a Python number; {RETURN_HINT[role]}"
                raise CaptureTypeError(message) from error
            raise CaptureTypeError(
                f"inductor_flex could not capture {role}: {error}\n" + _GRAPH_BREAK_FIX.format(role=role)
            ) from error

        # Checked at capture, before any lowering or kernel sees a wrong dtype or shape.
        try:
            check_mod_output(role, _example_value(_output), ())
        except TypeError as error:
            raise CaptureTypeError(str(error)) from None
        except ValueError as error:
            raise CaptureValueError(str(error)) from None
        learnable = any(getattr(_example_value(p), "requires_grad", False) for p in lifted)
        if role == "mask_mod" and learnable:
            raise CaptureValueError(
                "a tensor captured by mask_mod requires grad; masks are not differentiable: "
                "detach it (`t.detach()`), or move the learnable part into score_mod."
            )
        lifted = _specialise_symbols(graph, lifted, ints=learnable)
        name = tx.output.install_subgraph(role, torch.fx.GraphModule(tx.output.nn_modules, graph))
        return make_attr(tx, name), tuple(lifted)

    def _call_function(self, tx, args, kwargs):
        if kwargs or len(args) != 7:
            raise UncapturedHigherOrderOpError(
                "inductor_flex_attention is called by inductor_flex.flex_attention with 7 positional "
                "arguments; call flex_attention() instead of the operator."
            )
        query, key, value, score_mod, block_mask, scale, kernel_options = args
        # The graph we emit may reach Inductor: make sure it knows how to lower our operators.
        register_lowerings()
        score_node, score_buffers = self._speculate_mod(tx, query, score_mod, "score_mod")
        mask_node, mask_buffers = self._speculate_mod(tx, query, block_mask.items[-1], "mask_mod")

        device = _example_value(query).device
        score_buffers = _on_device(tx, score_buffers, device)
        mask_buffers = _on_device(tx, mask_buffers, device)

        if isinstance(_example_value(scale), torch.SymFloat):
            # A scale that changed between calls is symbolic; kernels take it as a constant.
            scale = VariableTracker.build(tx, guard_float(_example_value(scale)))

        sparse_fields = TupleVariable(block_mask.items[:-1])
        (query_p, key_p, value_p, sparse_p, scale_p, options_p), _ = proxy_args_kwargs(
            [query, key, value, sparse_fields, scale, kernel_options], {}
        )
        node_args = (
            query_p, key_p, value_p, score_node, tuple(sparse_p) + (mask_node,), scale_p,
            with_source_version(options_p),
            score_buffers, mask_buffers,
        )
        with set_original_aten_op(self.value):
            proxy = tx.output.create_proxy("call_function", self.value, args=node_args, kwargs={})
        try:
            return wrap_fx_proxy(tx=tx, proxy=proxy, example_value=None)
        except Exception as error:
            # Dynamo wraps what the fake run raises in a graph-break error; say ours plainly.
            cause = _unsupported_gradient(error)
            if cause is None:
                raise
            raise CaptureNotImplementedError(str(cause)) from None


def register_dynamo_variable(op_name: str) -> None:
    """Route Dynamo's handling of the operator named ``op_name`` to our tracker.

    Dynamo's registry is keyed by the operator's ``__name__``; ours is unique, so torch's own
    flex_attention keeps its tracker.
    """
    hop_variable_registry[op_name] = FlexAttentionVariable
