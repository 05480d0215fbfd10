"""Private torch pieces for tracing the joint (forward + backward) graph of a score_mod."""

from torch._dispatch.python import suspend_functionalization
from torch._functorch.aot_autograd import AOTConfig, create_joint
from torch._subclasses.functional_tensor import disable_functional_mode
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

__all__ = [
    "AOTConfig",
    "create_joint",
    "disable_functional_mode",
    "disable_proxy_modes_tracing",
    "suspend_functionalization",
]


def make_aot_config():
    """A do-nothing AOTConfig: create_joint only reads a few of its fields."""
    return AOTConfig(
        fw_compiler=None,
        bw_compiler=None,
        partition_fn=None,
        decompositions={},
        num_params_buffers=0,
        aot_id=0,
        keep_inference_input_mutations=False,
    )
