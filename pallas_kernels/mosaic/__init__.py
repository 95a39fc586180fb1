"""``implementation="mosaic"``: the Hopper (sm90) kernels in Pallas Mosaic GPU.

``ops`` holds the entry points (the reference's signatures plus ``interpret``) and
the padding the kernels need; ``block_sparse_kernel`` the block-sparse flash kernel
(also the fused search's dense pass), ``block_mass_kernel`` the block-mass kernel,
``block_sparse_fp8_kernel`` and ``fp8_ops`` the 8-bit block-sparse kernel (P.V in e4m3,
Q.K^T in e4m3 or int8) and its quantising pre-pass (``precision="fp8"`` and
``"int8_fp8"`` in ``pallas_kernels.api``),
``common`` what both use, ``interpreter`` what runs them on the CPU.
"""

from pallas_kernels.mosaic.block_sparse_kernel import BlockSparseConfig
from pallas_kernels.mosaic.fp8_ops import (
    block_sparse_attention_fp8 as fp8_block_sparse_attention)
from pallas_kernels.mosaic.fp8_ops import dense_attention_fp8 as fp8_dense_attention
from pallas_kernels.mosaic.ops import (
    SUPPORTED_DTYPES,
    BlockMassConfig,
    attention_with_block_mass,
    block_mass,
    block_sparse_attention,
    unsupported_reason,
)

__all__ = ["SUPPORTED_DTYPES", "BlockMassConfig", "BlockSparseConfig",
           "attention_with_block_mass", "block_mass", "block_sparse_attention",
           "fp8_block_sparse_attention", "fp8_dense_attention",
           "unsupported_reason"]
