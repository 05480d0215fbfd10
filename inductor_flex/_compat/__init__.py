"""Every import of torch private internals lives in this package, and nowhere else.

Each module groups the internals one layer needs. Symbols that differ between the
supported torch versions (2.11 and 2.13) are feature-detected here with ``hasattr`` /
``inspect.signature``, never by comparing version strings. ``tests/test_compat.py``
imports every name listed in ``PRIVATE_SYMBOLS`` so an upgrade that moves one fails fast.
"""

# module -> names the package uses from it; the canary test walks this table.
PRIVATE_SYMBOLS = {
    "inductor_flex._compat.hop": [
        "HigherOrderOperator",
        "HOP_OPTIONS",
        "DispatchKey",
        "AutoDispatchBelowAutograd",
        "FakeTensorMode",
        "ProxyTorchDispatchMode",
        "track_tensor_tree",
        "reenter_make_fx",
        "make_fx",
        "TransformGetItemToIndex",
        "redirect_to_mode",
        "CachingTorchDispatchMode",
        "CachedTorchDispatchMode",
        "detect_fake_mode",
    ],
    "inductor_flex._compat.joint": [
        "AOTConfig",
        "create_joint",
        "suspend_functionalization",
        "disable_functional_mode",
        "disable_proxy_modes_tracing",
    ],
    "inductor_flex._compat.dynamo": [
        "hop_variable_registry",
        "TorchHigherOrderOperatorVariable",
        "speculate_subgraph",
        "disable_cache_limit",
        "discard_graph_changes",
        "make_attr",
        "proxy_args_kwargs",
        "wrap_fx_proxy",
        "VariableTracker",
        "TupleVariable",
        "ConstantVariable",
        "Unsupported",
        "UncapturedHigherOrderOpError",
        "is_dynamo_supported",
        "set_original_aten_op",
        "mark_static",
        "reset_dynamo",
    ],
    "inductor_flex._compat.inductor": [
        "V",
        "TritonTemplate",
        "autotune_select_algorithm",
        "empty_strided",
        "inductor_config",
        "ir",
        "realize_inputs",
        "register_lowering",
        "FixedLayout",
        "MODIFICATION_TAKES_INPUT_DTYPES",
        "SymbolicGridFn",
        "build_subgraph_buffer",
        "create_placeholder",
        "freeze_irnodes",
        "select_algorithm",
        "zeros_and_scatter_lowering",
        "inline_graph_module",
        "select_decomp_table",
        "vmap_fallback_disabled",
    ],
    "inductor_flex._compat.pytree": [
        "register_pytree_node",
        "GetAttrKey",
        "tree_flatten",
        "tree_flatten_with_path",
        "tree_unflatten",
        "tree_map",
    ],
}
