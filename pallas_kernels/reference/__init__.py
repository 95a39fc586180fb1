"""``implementation="reference"``: the pure-jnp references (``ops``), exact on any device,
and the FP8 recipe (``fp8``)."""

from pallas_kernels.reference.fp8 import fp8_block_sparse_attention
from pallas_kernels.reference.fp8 import fp8_attention as fp8_dense_attention
from pallas_kernels.reference.ops import (
    attention,
    attention_with_block_mass,
    block_mask_from_lists,
    block_mass,
    block_sparse_attention,
)

__all__ = ["attention", "attention_with_block_mass", "block_mask_from_lists", "block_mass",
           "block_sparse_attention", "fp8_block_sparse_attention", "fp8_dense_attention"]
