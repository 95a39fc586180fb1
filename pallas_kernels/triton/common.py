"""Pieces both Triton kernels use: launch parameters, the exp2, offsets, padding.

``block_sparse_kernel`` (flash attention) and ``block_mass_kernel`` share them; none
holds state.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

LOG2E = math.log2(math.e)  # scores are scaled by it so that exp becomes exp2


def compiler_params(config):
  """Triton launch parameters (``num_warps``, ``num_stages``) of a kernel config."""
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
