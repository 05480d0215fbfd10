"""Print the signatures of the torch internals _compat feature-detects (run on each torch)."""
import inspect

import torch

print("torch", torch.__version__)
from torch._inductor import select_algorithm as sa
from torch._inductor.select_algorithm import TritonTemplate, autotune_select_algorithm

print("TritonTemplate.__init__", inspect.signature(TritonTemplate.__init__))
print("maybe_append_choice", inspect.signature(TritonTemplate.maybe_append_choice))
print("autotune_select_algorithm", inspect.signature(autotune_select_algorithm))
from torch._inductor.select_algorithm import TritonTemplateKernel
print("modification", inspect.signature(TritonTemplateKernel.modification))
print("SymbolicGridFn", hasattr(sa, "SymbolicGridFn"))
import torch._inductor.kernel.flex.common as c
print("flex common", [n for n in ("build_subgraph_buffer", "create_placeholder", "freeze_irnodes", "maybe_realize", "zeros_and_scatter_lowering", "infer_dense_strides") if hasattr(c, n)])
from torch._higher_order_ops.utils import register_fake
print("register_fake", inspect.signature(register_fake))
from torch._ops import HigherOrderOperator
print("HOP init", inspect.signature(HigherOrderOperator.__init__))
from torch._inductor import config
print("cpu_backend", config.cpu_backend)
