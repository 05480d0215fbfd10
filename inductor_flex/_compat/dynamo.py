"""Private Dynamo pieces for teaching Dynamo our higher-order operators."""

from torch._dynamo import config as dynamo_config
from torch._dynamo import is_dynamo_supported, mark_static
from torch._dynamo import reset as reset_dynamo
from torch._dynamo.exc import UncapturedHigherOrderOpError, Unsupported
from torch._dynamo.utils import disable_cache_limit, proxy_args_kwargs
from torch._dynamo.variables.base import VariableTracker
from torch._dynamo.variables.builder import wrap_fx_proxy
from torch._dynamo.variables.constant import ConstantVariable
from torch._dynamo.variables.higher_order_ops import (
    TorchHigherOrderOperatorVariable,
    _hop_name_to_variable_class as hop_variable_registry,
    discard_graph_changes,
    make_attr,
    speculate_subgraph,
)
from torch._dynamo.variables.lists import TupleVariable
from torch.fx.experimental.proxy_tensor import set_original_aten_op
from torch.fx.experimental.symbolic_shapes import guard_float, guard_int

__all__ = [
    "ConstantVariable",
    "TorchHigherOrderOperatorVariable",
    "TupleVariable",
    "UncapturedHigherOrderOpError",
    "Unsupported",
    "VariableTracker",
    "disable_cache_limit",
    "discard_graph_changes",
    "dynamo_config",
    "export_compilation_env",
    "guard_float",
    "guard_int",
    "hop_variable_registry",
    "is_dynamo_supported",
    "make_attr",
    "mark_static",
    "proxy_args_kwargs",
    "reset_dynamo",
    "set_original_aten_op",
    "speculate_subgraph",
    "wrap_fx_proxy",
]


# ---------------------------------------------------------------- frames Dynamo runs uncompiled

from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list, get_eval_frame_callback
from torch._dynamo import eval_frame as _eval_frame


def runs_only_cached_code() -> bool:
    """Is this Python code running in Dynamo's "run only" mode: compiled code is used where
    its guards pass, nothing new is compiled, and everything else runs eagerly? Dynamo runs a
    function (and all it calls) so once it reached the recompile limit (the frame strategy
    RUN_ONLY, in torch 2.11 and 2.13 alike), under ``torch.compiler.set_stance(
    "eager_on_recompile")`` and under ``torch._dynamo.run()``. The eval-frame callback is then
    ``False``; it is ``None`` outside torch.compile."""
    return get_eval_frame_callback() is False


def compiled_versions(code) -> int:
    """How many compiled versions (cache entries) Dynamo holds for a code object."""
    return len(_debug_get_cache_entry_list(code))


def recompile_limits() -> tuple:
    """(recompile_limit, accumulated_recompile_limit); torch names them cache_size_limit and
    accumulated_cache_size_limit too (aliases)."""
    limit = getattr(dynamo_config, "recompile_limit", None)
    if limit is None:
        limit = dynamo_config.cache_size_limit
    accumulated = getattr(dynamo_config, "accumulated_recompile_limit", None)
    if accumulated is None:
        accumulated = dynamo_config.accumulated_cache_size_limit
    return limit, accumulated


def compiler_stance() -> str:
    """The name set by ``torch.compiler.set_stance`` ("default" unless changed)."""
    stance = getattr(_eval_frame, "_stance", None)
    return getattr(stance, "stance", "default")


__all__ += ["compiled_versions", "compiler_stance", "recompile_limits", "runs_only_cached_code"]


# ---------------------------------------------------------------- torch.compile inside torch.export

try:  # torch's own HOPs (flex attention, while_loop) compile this way inside an export
    from torch._higher_order_ops.utils import setup_compilation_env as export_compilation_env
except ImportError:  # pragma: no cover - a torch without it: export inlines the operator call
    export_compilation_env = None
