"""``implementation="triton"``: the kernels in Pallas with the Triton lowering.

``ops`` holds the entry points (the reference's signatures plus ``interpret``);
``block_sparse_kernel`` the flash kernel (dense or from block lists),
``block_mass_kernel`` the block-mass kernel and ``common`` what both use.
"""

from pallas_kernels.triton.ops import (
    BlockMassConfig,
    BlockSparseConfig,
    attention,
    attention_with_block_mass,
    block_mass,
    block_sparse_attention,
)

__all__ = ["BlockMassConfig", "BlockSparseConfig", "attention", "attention_with_block_mass",
           "block_mass", "block_sparse_attention"]
