"""inductor_flex: FlexAttention as score_mod / mask_mod functions, compiled into fused kernels.

Drop-in for ``torch.nn.attention.flex_attention``: the same public names and signatures.
"""

from .api import AuxOutput, AuxRequest, flex_attention
from .block_mask import BlockMask, and_masks, create_block_mask, create_mask, noop_mask, or_masks
from .kernel_options import FlexKernelOptions
from .merge import merge_attention_states
from .paged import PagedKVCache

__all__ = [
    "AuxOutput",
    "AuxRequest",
    "BlockMask",
    "FlexKernelOptions",
    "and_masks",
    "create_block_mask",
    "create_mask",
    "flex_attention",
    "merge_attention_states",
    "noop_mask",
    "or_masks",
    "PagedKVCache",
]
