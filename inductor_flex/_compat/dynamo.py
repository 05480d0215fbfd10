"""Private Dynamo pieces for teaching Dynamo our higher-order operators."""

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

__all__ = [
    "ConstantVariable",
    "TorchHigherOrderOperatorVariable",
    "TupleVariable",
    "UncapturedHigherOrderOpError",
    "Unsupported",
    "VariableTracker",
    "disable_cache_limit",
    "discard_graph_changes",
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
