"""Pieces both Triton kernels use: the tile config, launch parameters, the exp2, offsets,
padding.

``block_sparse_kernel`` (flash attention) and ``block_mass_kernel`` share them; none
holds state.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

LOG2E = math.log2(math.e)  # scores are scaled by it so that exp becomes exp2
NUM_WARPS = (1, 2, 4, 8, 16)


@dataclasses.dataclass(frozen=True)
class TileConfig:
  """Tile sizes and Triton launch parameters of one kernel (each kernel subclasses it).

  Passed to the kernels as a static argument; validated when made (``ValueError``
  naming the field).

  Fields:
    block_q: query rows per program, a power of two >= 16.
    block_k: keys per loop step, a power of two >= 16.
    num_warps: Triton warps per program: 1, 2, 4, 8 or 16.
    num_stages: Triton software-pipelining stages, an int >= 1.
    fast_exp2: on GPU, exp2 by ``ex2.approx.ftz.f32`` (one MUFU op) instead of
      libdevice's exp2f, which adds subnormal handling around it; ignored when
      interpreting.
    prefetch: compute the next tile's scores before this tile's softmax (software
      pipelining across loop steps; one wasted QK^T tile per program).
  """
  block_q: int = 64
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 3
  fast_exp2: bool = False
  prefetch: bool = False

  def __post_init__(self):
    name = type(self).__name__
    for field in ("block_q", "block_k"):
      val = getattr(self, field)
      if not _is_int(val) or val < 16 or val & (val - 1):
        raise ValueError(f"{name}.{field}={val!r}: expected a power of two >= 16.")
    if not _is_int(self.num_warps) or self.num_warps not in NUM_WARPS:
      raise ValueError(f"{name}.num_warps={self.num_warps!r}: expected 1, 2, 4, 8 or 16.")
    if not _is_int(self.num_stages) or self.num_stages < 1:
      raise ValueError(f"{name}.num_stages={self.num_stages!r}: expected an int >= 1.")
    for field in ("fast_exp2", "prefetch"):
      if not isinstance(getattr(self, field), bool):
        raise ValueError(f"{name}.{field}={getattr(self, field)!r}: expected True or False.")


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def compiler_params(config):
  """Triton launch parameters (``num_warps``, ``num_stages``) of a ``TileConfig``."""
  return pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


def exp2(x, fast):
  """2**x in float32; ``fast`` uses the approximate PTX instruction (GPU only)."""
  if not fast:
    return jnp.exp2(x)
  [y] = pltriton.elementwise_inline_asm(
      "ex2.approx.ftz.f32 $0, $1;", args=[x], constraints="=r,r", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])
  return y


def aligned(offset, multiple):
  """Marks a traced offset as a multiple of ``multiple``.

  A Python int is returned as is: the Triton lowering cannot attach the hint to a
  constant.
  """
  return offset if isinstance(offset, int) else pl.multiple_of(offset, multiple)


def dot_precision(dtype):
  """Precision of a kernel's dots for inputs of ``dtype``.

  float32 inputs: full-precision products (Triton "ieee"), not tf32, so f32 results
  match the float64 references; bf16/f16 use the tensor cores as is.
  """
  return lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT


def round_up(x: int, multiple: int) -> int:
  """The least multiple of ``multiple`` >= x."""
  return -(-x // multiple) * multiple


def pad_seq_and_dim(x, seq_len):
  """[B, S, H, D] -> [B, seq_len, H, D_pow2] with zeros (Triton tiles need power-of-two D)."""
  d = x.shape[-1]
  d_pad = max(16, 1 << (d - 1).bit_length())
  if x.shape[1] == seq_len and d_pad == d:
    return x
  return jnp.pad(x, ((0, 0), (0, seq_len - x.shape[1]), (0, 0), (0, d_pad - d)))
