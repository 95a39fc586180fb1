"""Pallas kernels for AdaSpa, each beside its pure-jnp reference.

Use the dispatchers below; ``implementation=`` picks "reference", "triton" or
"mosaic" (None: the fastest for the device).
"""

from pallas_kernels.api import (
    IMPLEMENTATIONS,
    attention_with_block_mass,
    block_mass,
    block_sparse_attention,
    default_implementation,
    dense_attention,
    resolve,
)
from pallas_kernels.reference import attention, block_mask_from_lists

__all__ = [
    "IMPLEMENTATIONS",
    "attention",
    "attention_with_block_mass",
    "block_mask_from_lists",
    "block_mass",
    "block_sparse_attention",
    "default_implementation",
    "dense_attention",
    "resolve",
]
