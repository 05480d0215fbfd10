"""Run Inductor's generated Triton (our templates included) on CPU through Triton's interpreter.

Inductor is told to emit Triton for CPU tensors (``cpu_backend="triton"``), ``TRITON_INTERPRET=1``
makes every ``@triton.jit`` kernel run in the interpreter, and a small driver stands in for a
GPU so Triton's compile-time queries have answers. Only for tests: the package never does this.
"""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import triton
from triton.backends.compiler import GPUTarget


class _InterpreterDriver:
    """The few driver calls Inductor and Triton make when no GPU is present."""

    def get_current_target(self):
        return GPUTarget("cuda", 80, 32)

    def get_current_device(self):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        from triton.testing import do_bench

        return do_bench

    def get_device_interface(self):
        return torch.cpu

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


def interpreter_requested() -> bool:
    """Set by the runner test for the subprocess it starts; TRITON_INTERPRET must be set before
    triton and Inductor's runtime helpers are first imported, so it cannot be switched on later."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def run_pytest_in_interpreter(*pytest_args: str, timeout: int) -> tuple[subprocess.CompletedProcess, str]:
    """Runs pytest on ``pytest_args`` in a subprocess with TRITON_INTERPRET=1; returns the
    result and its output, pytest's report last (the tail a failing runner test shows).
    Inductor's report of every autotuning choice is switched off: on stderr after pytest's
    report, it filled that tail and hid the failure."""
    env = dict(os.environ, TRITON_INTERPRET="1", TORCHINDUCTOR_MAX_AUTOTUNE_REPORT_CHOICES_STATS="0")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging", *pytest_args],
        env=env, capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).resolve().parent.parent,
    )
    return result, result.stderr + result.stdout


class OutOfBoundsAccess(AssertionError):
    """A kernel read or wrote memory outside every tensor it was given."""


class _MemoryChecker:
    """compute-sanitizer's memcheck, for the interpreter: every load, store and atomic whose lane
    is active must lie inside one of the tensors (storages) passed to the running kernel. On a
    GPU such an access reads a neighbouring allocation silently or faults; on CPU through the
    interpreter it would read host memory silently."""

    def __init__(self):
        self.ranges = []  # (start, end) byte addresses of the running kernel's storages

    def record_arguments(self, args):
        ranges = []
        for arg in args:
            if isinstance(arg, torch.Tensor):
                storage = arg.untyped_storage()
                ranges.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
        self.ranges = ranges

    def check(self, what, ptrs, mask, itemsize):
        addresses = np.asarray(ptrs.data, dtype=np.uint64)
        if mask is not None:
            addresses = addresses[np.broadcast_to(np.asarray(mask.data, dtype=bool), addresses.shape)]
        addresses = addresses.ravel()
        if addresses.size == 0:
            return
        inside = np.zeros(addresses.shape, dtype=bool)
        for start, end in self.ranges:
            inside |= (addresses >= start) & (addresses + itemsize <= end)
        if not inside.all():
            outside = addresses[~inside]
            raise OutOfBoundsAccess(
                f"{what} of {outside.size} element(s) outside every tensor argument, e.g. address "
                f"{int(outside[0]):#x}; argument ranges {[(hex(a), hex(b)) for a, b in self.ranges]}")


@contextlib.contextmanager
def _checked_memory():
    from triton.runtime import interpreter

    checker = _MemoryChecker()
    builder, executor = interpreter.InterpreterBuilder, interpreter.GridExecutor
    originals = (builder.create_masked_load, builder.create_masked_store, builder.create_atomic_rmw,
                 executor._init_args_hst)

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = originals[3](self, args_dev, kwargs)
        checker.record_arguments([*args_hst, *kwargs_hst.values()])
        return args_hst, kwargs_hst

    def itemsize(ptrs):
        return np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize

    def load(self, ptrs, mask, other, *rest):
        checker.check("load", ptrs, mask, itemsize(ptrs))
        return originals[0](self, ptrs, mask, other, *rest)

    def store(self, ptrs, value, mask, *rest):
        checker.check("store", ptrs, mask, itemsize(ptrs))
        return originals[1](self, ptrs, value, mask, *rest)

    def atomic(self, op, ptrs, value, mask, *rest):
        checker.check("atomic", ptrs, mask, itemsize(ptrs))
        return originals[2](self, op, ptrs, value, mask, *rest)

    builder.create_masked_load, builder.create_masked_store, builder.create_atomic_rmw = load, store, atomic
    executor._init_args_hst = init_args
    try:
        yield
    finally:
        (builder.create_masked_load, builder.create_masked_store, builder.create_atomic_rmw,
         executor._init_args_hst) = originals


@contextlib.contextmanager
def triton_on_cpu():
    """Inductor's Triton for CPU tensors, run by the interpreter with every memory access of a
    kernel checked against the tensors it was given (an out-of-bounds access raises)."""
    from torch._inductor import config

    assert interpreter_requested(), "start the process with TRITON_INTERPRET=1"
    triton.runtime.driver.set_active(_InterpreterDriver())
    with config.patch(cpu_backend="triton", max_autotune=False, fx_graph_cache=False), _checked_memory():
        torch._dynamo.reset()
        yield
