"""Private torch pieces for defining a higher-order operator and its dispatch rules."""

from torch._C import DispatchKey
from torch._C import _AutoDispatchBelowAutograd as AutoDispatchBelowAutograd
from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex
from torch._guards import detect_fake_mode
from torch._higher_order_ops.utils import redirect_to_mode, reenter_make_fx
from torch._ops import HigherOrderOperator
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import (
    ProxyTorchDispatchMode,
    make_fx,
    set_original_aten_op,
    track_tensor_tree,
)
from torch.utils.checkpoint import (
    _CachedTorchDispatchMode as CachedTorchDispatchMode,
    _CachingTorchDispatchMode as CachingTorchDispatchMode,
)

import inspect

import torch

# ``cacheable`` lets Inductor's FX-graph cache store graphs holding our operators.
HOP_OPTIONS = (
    {"cacheable": True} if "cacheable" in inspect.signature(HigherOrderOperator.__init__).parameters else {}
)

def zeros_and_scatter_op():
    """torch's private ``flex_lib.zeros_and_scatter``: how a joint graph traced under
    TransformGetItemToIndex returns the gradient of an indexed captured tensor."""
    return torch.ops.flex_lib.zeros_and_scatter.default


__all__ = [
    "HOP_OPTIONS",
    "zeros_and_scatter_op",
    "AutoDispatchBelowAutograd",
    "CachedTorchDispatchMode",
    "CachingTorchDispatchMode",
    "DispatchKey",
    "FakeTensorMode",
    "HigherOrderOperator",
    "ProxyTorchDispatchMode",
    "TransformGetItemToIndex",
    "detect_fake_mode",
    "make_fx",
    "redirect_to_mode",
    "reenter_make_fx",
    "set_original_aten_op",
    "track_tensor_tree",
]
