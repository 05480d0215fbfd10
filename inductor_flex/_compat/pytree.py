"""torch.utils._pytree: registering BlockMask as a pytree node."""

from torch.utils._pytree import (
    GetAttrKey,
    register_pytree_node,
    tree_flatten,
    tree_flatten_with_path,
    tree_map,
    tree_unflatten,
)

__all__ = [
    "GetAttrKey",
    "register_pytree_node",
    "tree_flatten",
    "tree_flatten_with_path",
    "tree_map",
    "tree_unflatten",
]
