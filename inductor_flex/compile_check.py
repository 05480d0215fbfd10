"""Saying so when ``flex_attention`` runs uncompiled, never switching silently.

Uncompiled, ``flex_attention`` runs the reference implementation (``reference.py``: chunked,
memory-bounded, but unfused and many times slower than the fused kernels). Three ways a call
gets there:

1. **Dynamo's recompile limit.** Each guard failure (a new static size, a new Python number,
   a new mod function) recompiles the calling function; after ``recompile_limit`` (default 8)
   versions Dynamo stops compiling it and runs it, and every function it calls, eagerly from
   then on (torch 2.11 and 2.13: frame strategy RUN_ONLY, logged once through ``logging``,
   easy to miss). ``flex_attention`` sees this as its Python body running while Dynamo is in
   "run only" mode, names the function that hit the limit and warns with the fixes
   (:class:`RecompileLimitWarning`). With ``fullgraph=True`` or
   ``torch._dynamo.config.fail_on_recompile_limit_hit = True`` Dynamo itself raises instead.
2. ``torch.compiler.set_stance("eager_on_recompile")`` (or ``torch._dynamo.run()``): the same
   "run only" mode, chosen by the user; the warning names that cause.
3. A plain eager call: on a GPU that is almost always an oversight (the fused kernel exists),
   so it warns (:class:`UnfusedAttentionWarning`); on the CPU the compiled path is the same
   chunked math fused by Inductor, and eager calls are common in tests: no warning.

Warnings go through :mod:`warnings`, attributed to the caller of ``flex_attention``, so the
default filter shows each once per call site, and ``warnings.simplefilter("error",
RecompileLimitWarning)`` turns them into errors.
"""

import sys
import warnings

from ._compat.dynamo import compiled_versions, compiler_stance, recompile_limits, runs_only_cached_code


class RecompileLimitWarning(UserWarning):
    """flex_attention runs uncompiled because Dynamo stopped compiling the calling function."""


class UnfusedAttentionWarning(UserWarning):
    """flex_attention runs uncompiled on a device where torch.compile gives a fused kernel."""


_RECOMPILE_FIXES = (
    "Fix the recompiles (TORCH_LOGS=recompiles prints their reasons): pass dynamic=True to "
    "torch.compile, or torch._dynamo.mark_dynamic(tensor, dim) the sizes that change; reuse one "
    "score_mod/mask_mod function instead of defining a new closure or lambda per call, and pass "
    "values that change as tensors rather than Python numbers; or raise "
    "torch._dynamo.config.recompile_limit (alias cache_size_limit). To fail instead of running "
    "slowly: torch.compile(..., fullgraph=True) or torch._dynamo.config.fail_on_recompile_limit_hit"
    " = True."
)


def _stopped_frame(start):
    """The innermost frame from ``start`` outwards whose function Dynamo has compiled before:
    (function name, file, first line, compiled versions), or None."""
    frame = start
    while frame is not None:
        code = frame.f_code
        versions = compiled_versions(code)
        if versions:
            return code.co_name, code.co_filename, code.co_firstlineno, versions
        frame = frame.f_back
    return None


def uncompiled_call_message(device) -> tuple | None:
    """(warning category, message) if this eager call of flex_attention deserves one, else None.
    Called from flex_attention's eager path, two frames below the user's code."""
    if runs_only_cached_code():
        slow = ("inductor_flex.flex_attention runs uncompiled: the unfused reference "
                "implementation, many times slower than the fused kernel, ")
        stance = compiler_stance()
        if stance == "eager_on_recompile":
            return RecompileLimitWarning, (
                slow + "because torch.compiler.set_stance('eager_on_recompile') runs recompiles "
                "eagerly and this call needed one. " + _RECOMPILE_FIXES)
        limit, accumulated = recompile_limits()
        stopped = _stopped_frame(sys._getframe(2))
        if stopped is None:
            return RecompileLimitWarning, (
                slow + "because Dynamo runs the calling code without compiling it (its \"run only\" "
                "mode: a recompile limit was reached, or torch._dynamo.run()). " + _RECOMPILE_FIXES)
        name, filename, line, versions = stopped
        return RecompileLimitWarning, (
            slow + f"because Dynamo stopped compiling '{name}' ({filename}:{line}): it holds {versions} "
            f"compiled versions and reached torch._dynamo.config.recompile_limit ({limit}; "
            f"accumulated_recompile_limit {accumulated}), so Dynamo runs it and everything it calls "
            "eagerly from now on. " + _RECOMPILE_FIXES)
    if device.type != "cpu":
        return UnfusedAttentionWarning, (
            f"inductor_flex.flex_attention called without torch.compile on {device.type}: it runs the "
            "unfused reference implementation, many times slower than the fused kernel. Compile the "
            "call or the model: torch.compile(flex_attention)(...), or torch.compile(model).")
    return None


def warn_if_uncompiled(device) -> None:
    """Warn (attributed to flex_attention's caller) when an eager call is not what the user
    asked for or not what they would want; see the module docstring."""
    found = uncompiled_call_message(device)
    if found is not None:
        category, message = found
        warnings.warn(message, category, stacklevel=3)
