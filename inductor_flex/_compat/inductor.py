"""Private Inductor pieces: lowering registration, IR, templates and autotuning."""

import inspect

from torch._inductor import config as inductor_config
from torch._inductor import ir
from torch._inductor.lowering import empty_strided, register_lowering
from torch._inductor.select_algorithm import TritonTemplate, autotune_select_algorithm, realize_inputs
from torch._inductor.virtualized import V

__all__ = [
    "V",
    "TritonTemplate",
    "autotune_select_algorithm",
    "empty_strided",
    "inductor_config",
    "ir",
    "realize_inputs",
    "register_lowering",
]

from torch._inductor.ir import FixedLayout
from torch._inductor.kernel.flex.common import (
    build_subgraph_buffer,
    create_placeholder,
    freeze_irnodes,
    zeros_and_scatter_lowering,
)
from torch._inductor.select_algorithm import SymbolicGridFn, TritonTemplateKernel

# torch 2.13's template hook `modification(...)` types the index inputs with `input_dtypes=`;
# torch 2.11 has no such keyword and would take it as one more fixed input.
MODIFICATION_TAKES_INPUT_DTYPES = "input_dtypes" in inspect.signature(TritonTemplateKernel.modification).parameters


def select_algorithm(name, choices, input_nodes, layout, **kwargs):
    """autotune_select_algorithm returning the output node on both torch versions.

    torch 2.11 returns the node; torch 2.13 returns (node, choice).
    """
    result = autotune_select_algorithm(name, choices, input_nodes, layout, **kwargs)
    return result[0] if isinstance(result, tuple) else result


__all__ += [
    "FixedLayout",
    "MODIFICATION_TAKES_INPUT_DTYPES",
    "SymbolicGridFn",
    "build_subgraph_buffer",
    "create_placeholder",
    "freeze_irnodes",
    "select_algorithm",
    "zeros_and_scatter_lowering",
]
