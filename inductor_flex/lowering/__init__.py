"""Inductor lowerings of our operators.

``register_lowerings()`` installs them into Inductor's table; it is called when Dynamo or
make_fx first captures one of our operators (never at import), and is idempotent.

- forward: the fused Triton template (``triton_forward.py``) on GPUs, and on CPU when
  Inductor's CPU backend is Triton (the interpreter tests); otherwise the query-chunked
  decomposition compiled by Inductor (``decomposed.py``).
- backward: the fused Triton backward template (``triton_backward.py``) where
  ``backward.backward_refusals`` finds no reason against it, otherwise the decomposition's backward.
"""

import warnings

_registered = False


def register_lowerings() -> None:
    global _registered
    if _registered:
        return
    from .._compat.inductor import register_lowering
    from ..ops import flex_attention_backward_op, flex_attention_op
    from .backward import lower_backward
    from .forward import lower_forward

    # Inductor's fake-tensor updater warns about every unknown operator with subgraph
    # arguments; ours need nothing from it.
    warnings.filterwarnings("ignore", message="Please add support for subgraph args to function inductor_flex")
    register_lowering(flex_attention_op, type_promotion_kind=None)(lower_forward)
    register_lowering(flex_attention_backward_op, type_promotion_kind=None)(lower_backward)
    _registered = True
