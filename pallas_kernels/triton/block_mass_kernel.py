"""Block-mass search kernel in Pallas (Triton lowering): one QK^T pass, no PV.

``mass[b, h, p, c] = sum_{i in block p, j in block c} exp(s_ij - lse_i)``. One
program per (query tile, batch, head) walks every key once. Tiles need not match
the selection block: a tile larger than the block is cut into block-sized groups
by masked sums, and a block larger than the tile is covered by several row
programs (summed afterwards) or several key steps (summed in registers).

The row LSE arrives pre-scaled to base 2, with padded rows set to +inf so that
exp2(s - inf) = 0 removes them without a per-element row mask.

Tuning: ``BlockMassConfig`` (tiles and launch parameters), a static argument;
``DEFAULT_CONFIG`` is what ``pallas_kernels.triton.ops`` passes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.triton import common


@dataclasses.dataclass(frozen=True)
class BlockMassConfig(common.TileConfig):
  """Tiles and launch parameters of ``block_mass`` (fields: ``common.TileConfig``).

  block_q and block_k may be smaller or larger than the selection block; prefetch
  applies when block_k >= block_size.
  """


# From the H200 sweeps (docs/log/triton.md): 3 stages held up better than 2 at
# S = 118,784 (209 vs 237 ms), though 2 won the S = 32,768 sweep.
DEFAULT_CONFIG = BlockMassConfig(block_q=128, block_k=64, num_warps=4, num_stages=3,
                                 fast_exp2=True)


def _mass_kernel(lengths_ref, q_ref, k_ref, lse_ref, mass_ref, *, scale2, block_q, block_k,
                 unit_q, unit_k, sub_steps, n_steps, mask_keys, fast_exp2, prefetch):
  """One (query tile, batch, head).

  Refs: lengths int32 [B]; q [block_q, D]; k [S_pad, D]; lse2 f32 [block_q] (base 2,
  +inf on padded rows); mass f32 [block_q // unit_q, nK_pad]. A step covers
  ``sub_steps * block_k`` keys = ``block_k // unit_k`` selection blocks.
  """
  b = pl.program_id(1)
  length = lengths_ref[b]
  q = q_ref[...]
  lse2 = lse_ref[...]
  precision = common.dot_precision(q_ref.dtype)
  groups_q, groups_k = block_q // unit_q, block_k // unit_k
  row_group = lax.div(lax.broadcasted_iota(jnp.int32, (block_q,), 0), unit_q)
  col_group = lax.div(lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1), unit_k)

  def scores(tile):
    """Raw q k^T of key tile ``tile`` (f32 [block_q, block_k])."""
    start = common.aligned(tile * block_k, block_k)
    k = k_ref[pl.ds(start, block_k), :]
    return lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)

  def process(t, tiles_s):
    sums = [None] * groups_k  # per key group: [block_q] row sums
    for sub, s in enumerate(tiles_s):
      p = common.exp2(s * scale2 - lse2[:, None], fast_exp2)
      if mask_keys:
        start = (t * sub_steps + sub) * block_k
        cols = start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
        p = jnp.where(cols < length, p, 0.0)
      for g in range(groups_k):
        part = (p if groups_k == 1 else jnp.where(col_group == g, p, 0.0)).sum(axis=1)
        sums[g] = part if sums[g] is None else sums[g] + part
    for g in range(groups_k):
      for j in range(groups_q):
        row_sum = sums[g] if groups_q == 1 else jnp.where(row_group == j, sums[g], 0.0)
        mass_ref[j, t * groups_k + g] = row_sum.sum()

  if prefetch and sub_steps == 1:
    # As in the flash kernel: the next tile's QK^T is issued before this tile's exp2.
    def body(t, s):
      s_next = scores(jnp.minimum(t + 1, n_steps - 1))
      process(t, [s])
      return s_next
    lax.fori_loop(0, n_steps, body, scores(0))
  else:
    def body(t, carry):
      process(t, [scores(t * sub_steps + sub) for sub in range(sub_steps)])
      return carry
    lax.fori_loop(0, n_steps, body, 0)


@functools.partial(jax.jit, static_argnames=(
    "block_size", "sm_scale", "config", "mask_keys", "interpret"))
def block_mass(q, k, lse, lengths, *, block_size, sm_scale, config, mask_keys,
               interpret=False):
  """Block mass on validated inputs.

  Args:
    q, k: [B, S, H, D].
    lse: float32 [B, H, S], natural log.
    lengths: int32 [B], valid tokens (already clipped to S).
    config: ``BlockMassConfig`` (static).
    mask_keys: False only when every key of the sequence is valid.

  Returns:
    float32 [B, H, nQ, nK], nQ = nK = ceil(S / block_size).
  """
  if not isinstance(config, BlockMassConfig):
    raise ValueError(f"config={config!r}: expected a BlockMassConfig.")
  b, s, h, _ = q.shape
  n_blocks = -(-s // block_size)
  block_q, block_k = config.block_q, config.block_k
  unit_q, unit_k = min(block_q, block_size), min(block_k, block_size)
  step_keys = max(block_k, block_size)
  s_pad = -(-s // max(block_q, step_keys)) * max(block_q, step_keys)
  mask_keys = mask_keys or s_pad != s
  qp, kp = (common.pad_seq_and_dim(x, s_pad) for x in (q, k))
  d_pad = qp.shape[-1]
  # Base-2 LSE; padded rows -> +inf (they add nothing); a valid row's non-finite
  # LSE counts as 0, as the float64 test reference does.
  row_ok = jnp.arange(s_pad)[None, None, :] < lengths[:, None, None]
  lse_p = jnp.pad(lse, ((0, 0), (0, 0), (0, s_pad - s)))
  lse2 = jnp.where(row_ok, jnp.where(jnp.isfinite(lse_p), lse_p, 0.0) * common.LOG2E, jnp.inf)
  n_col_blocks = s_pad // block_size

  kernel = functools.partial(
      _mass_kernel, scale2=sm_scale * common.LOG2E, block_q=block_q, block_k=block_k,
      unit_q=unit_q, unit_k=unit_k, sub_steps=step_keys // block_k,
      n_steps=s_pad // step_keys, mask_keys=mask_keys,
      fast_exp2=config.fast_exp2 and not interpret, prefetch=config.prefetch)
  mass = pl.pallas_call(
      kernel,
      grid=(s_pad // block_q, b, h),
      in_specs=[
          pl.BlockSpec(lengths.shape, lambda *_: (0,)),
          pl.BlockSpec((None, block_q, None, d_pad), lambda i, bi, hi: (bi, i, hi, 0)),
          pl.BlockSpec((None, s_pad, None, d_pad), lambda i, bi, hi: (bi, 0, hi, 0)),
          pl.BlockSpec((None, None, block_q), lambda i, bi, hi: (bi, hi, i)),
      ],
      out_specs=pl.BlockSpec((None, None, block_q // unit_q, n_col_blocks),
                             lambda i, bi, hi: (bi, hi, i, 0)),
      out_shape=jax.ShapeDtypeStruct((b, h, s_pad // unit_q, n_col_blocks), jnp.float32),
      compiler_params=None if interpret else common.compiler_params(config),
      interpret=interpret,
      name="adaspa_block_mass",
  )(lengths, qp, kp, lse2.astype(jnp.float32))
  if unit_q < block_size:  # several row programs per query block: add their parts
    mass = mass.reshape(b, h, -1, block_size // unit_q, n_col_blocks).sum(axis=3)
  return mass[:, :, :n_blocks, :n_blocks]
