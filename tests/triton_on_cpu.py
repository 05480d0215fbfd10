"""Run Inductor's generated Triton (our templates included) on CPU through Triton's interpreter.

Inductor is told to emit Triton for CPU tensors (``cpu_backend="triton"``), ``TRITON_INTERPRET=1``
makes every ``@triton.jit`` kernel run in the interpreter, and a small driver stands in for a
GPU so Triton's compile-time queries have answers. Only for tests: the package never does this.
"""

import contextlib
import os

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


@contextlib.contextmanager
def triton_on_cpu():
    from torch._inductor import config

    assert interpreter_requested(), "start the process with TRITON_INTERPRET=1"
    triton.runtime.driver.set_active(_InterpreterDriver())
    with config.patch(cpu_backend="triton", max_autotune=False, fx_graph_cache=False):
        torch._dynamo.reset()
        yield
