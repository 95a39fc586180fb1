"""Flash-attention forward in Pallas (Triton lowering), dense or driven by block lists.

One program per (query tile, batch element, head). In sparse mode the program's
loop runs over the key tiles of its query block's list, so its length is that
row's count (times key tiles per selection block), never K_max; a row whose count
is >= nK walks every key tile in order and never uses its list entries. In dense
mode there are no lists and the query tile is free of the selection block.

Arrays are [B, S, H, D]; the kernel reads the [S, D] slab of one (batch, head)
through strided loads, so no transpose is made. The softmax runs in base 2 with
log2(e) folded into the scale (scaling and max subtraction are one FMA per score,
then one exp2), and the natural-log LSE is recovered at the end.

Tuning: ``BlockSparseConfig`` (tiles and launch parameters), a static argument;
``DEFAULT_CONFIG`` (block-sparse calls) and ``DEFAULT_DENSE_CONFIG`` (dense calls) are
what ``pallas_kernels.triton.ops`` passes.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.triton import common

_LN2 = math.log(2.0)
# Finite start for the running max: a row that has seen only masked (-inf) keys
# keeps max = -1e30 and sum = 0, so exp2(-inf - max) = 0 and no inf - inf appears.
_INIT_MAX = -1e30


@dataclasses.dataclass(frozen=True)
class BlockSparseConfig(common.TileConfig):
  """Tiles and launch parameters of ``flash_attention`` (fields: ``common.TileConfig``).

  In sparse mode block_q and block_k are clamped to the selection block size, which
  they then divide; in dense mode they are free.
  """


# From the H200 sweeps of experiments/bench_kernels.py (docs/log/triton.md). The sparse
# query tile is capped by the selection block (64 in AdaSpa); the dense kernel is free to
# use 128 rows.
DEFAULT_CONFIG = BlockSparseConfig(block_q=64, block_k=64, num_warps=4, num_stages=2,
                                   fast_exp2=True, prefetch=True)  # block-sparse calls
DEFAULT_DENSE_CONFIG = BlockSparseConfig(block_q=128, block_k=128, num_warps=8, num_stages=3,
                                         fast_exp2=True)  # dense calls (no lists)


def _flash_kernel(lengths_ref, *refs, scale2, block_q, block_k, keys_per_block,
                  q_tiles_per_block, n_key_tiles, n_blocks, k_max, mask_keys, sparse,
                  fast_exp2, prefetch):
  """One (query tile, batch, head).

  Refs: lengths int32 [B]; if sparse, indices int32 [B, H, nQ, K_max] and counts
  int32 [B, H, nQ]; q [block_q, D]; k, v [S_pad, D]; out [block_q, D]; lse f32 [block_q].
  """
  if sparse:
    idx_ref, cnt_ref, q_ref, k_ref, v_ref, o_ref, lse_ref = refs
  else:
    q_ref, k_ref, v_ref, o_ref, lse_ref = refs
  qi, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  length = lengths_ref[b]
  precision = common.dot_precision(q_ref.dtype)

  # Integer indices here are non-negative: lax.div/lax.rem, because jnp's
  # sign-correcting // and % do not lower to Triton for int32.
  n_dense = n_key_tiles
  if mask_keys:
    # Key tiles wholly past the valid length would be fully masked: skip them.
    n_dense = jnp.minimum(n_key_tiles, lax.div(length + block_k - 1, block_k))
  if sparse:
    qb = lax.div(qi, q_tiles_per_block) if q_tiles_per_block > 1 else qi
    count = cnt_ref[b, h, qb]
    dense_row = count >= n_blocks
    n_iter = jnp.where(dense_row, n_dense,
                       jnp.clip(count, 0, k_max) * keys_per_block)
  else:
    n_iter = n_dense
  # A tile made only of padded query rows does no work. (Scalar int32 arithmetic:
  # a select between two Python ints lowers to an i1 loop bound in Triton.)
  n_iter = jnp.asarray(n_iter, jnp.int32) * (qi * block_q < length).astype(jnp.int32)

  def key_tile(t):
    if not sparse:
      return t
    slot = lax.div(t, keys_per_block) if keys_per_block > 1 else t
    # Clamped reads keep memory access in bounds; a dense row discards the value.
    blk = idx_ref[b, h, qb, jnp.minimum(slot, k_max - 1)]
    blk = jnp.clip(blk, 0, n_blocks - 1)
    tile = blk * keys_per_block + (lax.rem(t, keys_per_block) if keys_per_block > 1 else 0)
    return jnp.where(dense_row, t, tile)

  q = q_ref[...]

  def scores(t):
    """Raw q k^T of key tile t (f32 [block_q, block_k], masked keys -inf) and its start."""
    start = common.aligned(key_tile(t) * block_k, block_k)
    k = k_ref[pl.ds(start, block_k), :]
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                        preferred_element_type=jnp.float32)
    if mask_keys:
      cols = start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
      s = jnp.where(cols < length, s, -jnp.inf)
    return s, start

  def update(state, s, start):
    acc, m, l = state
    v = v_ref[pl.ds(start, block_k), :]
    # The scale is applied after the max (it is positive) so that scaling and
    # subtracting the max fuse into one FMA per score.
    m_new = jnp.maximum(m, s.max(axis=1) * scale2)
    alpha = common.exp2(m - m_new, fast_exp2)
    p = common.exp2(s * scale2 - m_new[:, None], fast_exp2)
    l = alpha * l + p.sum(axis=1)
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                         precision=precision, preferred_element_type=jnp.float32)
    return alpha[:, None] * acc + pv, m_new, l

  d = q.shape[-1]
  init = (jnp.zeros((block_q, d), jnp.float32),
          jnp.full((block_q,), _INIT_MAX, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  if prefetch:
    # Scores of tile t + 1 are computed before the softmax of tile t, so that
    # the next QK^T can run on the tensor cores while this tile's exp2 runs. The
    # last step recomputes its own tile (in bounds) and drops it.
    def body(t, carry):
      *state, s, start = carry
      s_next, start_next = scores(jnp.minimum(t + 1, n_iter - 1))
      return (*update(state, s, start), s_next, start_next)
    acc, m, l, _, _ = lax.fori_loop(0, n_iter, body, (*init, *scores(0)))
  else:
    acc, m, l = lax.fori_loop(0, n_iter, lambda t, st: update(st, *scores(t)), init)

  rows = qi * block_q + lax.broadcasted_iota(jnp.int32, (block_q,), 0)
  has_keys = (l > 0) & (rows < length)
  l_safe = jnp.where(has_keys, l, 1.0)
  o_ref[...] = jnp.where(has_keys[:, None], acc / l_safe[:, None], 0.0).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(has_keys, (m + jnp.log2(l_safe)) * _LN2, -jnp.inf)


@functools.partial(jax.jit, static_argnames=(
    "block_size", "sm_scale", "config", "mask_keys", "interpret"))
def flash_attention(q, k, v, lengths, kv_block_indices=None, kv_block_counts=None, *,
                    block_size, sm_scale, config, mask_keys, interpret=False):
  """Dense (no lists) or block-sparse flash attention on validated inputs.

  Args:
    q, k, v: [B, S, H, D].
    lengths: int32 [B], valid tokens (already clipped to S).
    kv_block_indices: int32 [B, H, nQ, K_max] or None for dense attention.
    kv_block_counts: int32 [B, H, nQ] or None.
    block_size: selection block size (sparse mode; ignored when dense).
    sm_scale: softmax scale.
    config: ``BlockSparseConfig`` (static); in sparse mode block_q and block_k are
      clamped to block_size.
    mask_keys: False only when every key of the padded sequence is valid.

  Returns:
    out [B, S, H, D] in q's dtype, lse float32 [B, H, S].
  """
  if not isinstance(config, BlockSparseConfig):
    raise ValueError(f"config={config!r}: expected a BlockSparseConfig.")
  b, s, h, d = q.shape
  sparse = kv_block_indices is not None
  if sparse:
    block_q = min(config.block_q, block_size)
    block_k = min(config.block_k, block_size)
    s_pad = common.round_up(s, block_size)
    n_blocks = s_pad // block_size
    k_max = kv_block_indices.shape[-1]
  else:
    block_q, block_k = config.block_q, config.block_k
    s_pad = common.round_up(s, max(block_q, block_k))
    n_blocks, k_max = 1, 1
  mask_keys = mask_keys or s_pad != s
  qp, kp, vp = (common.pad_seq_and_dim(x, s_pad) for x in (q, k, v))
  d_pad = qp.shape[-1]

  kernel = functools.partial(
      _flash_kernel, scale2=sm_scale * common.LOG2E, block_q=block_q, block_k=block_k,
      keys_per_block=block_size // block_k if sparse else 1,
      q_tiles_per_block=block_size // block_q if sparse else 1,
      n_key_tiles=s_pad // block_k, n_blocks=n_blocks, k_max=k_max,
      mask_keys=mask_keys, sparse=sparse, fast_exp2=config.fast_exp2 and not interpret,
      prefetch=config.prefetch)
  whole = lambda x: pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)
  row_tile = pl.BlockSpec((None, block_q, None, d_pad), lambda i, bi, hi: (bi, i, hi, 0))
  seq_slab = pl.BlockSpec((None, s_pad, None, d_pad), lambda i, bi, hi: (bi, 0, hi, 0))
  in_specs = [whole(lengths)]
  operands = [lengths]
  if sparse:
    in_specs += [whole(kv_block_indices), whole(kv_block_counts)]
    operands += [kv_block_indices, kv_block_counts]
  in_specs += [row_tile, seq_slab, seq_slab]
  operands += [qp, kp, vp]
  out, lse = pl.pallas_call(
      kernel,
      grid=(s_pad // block_q, b, h),
      in_specs=in_specs,
      out_specs=[row_tile,
                 pl.BlockSpec((None, None, block_q), lambda i, bi, hi: (bi, hi, i))],
      out_shape=[jax.ShapeDtypeStruct(qp.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, s_pad), jnp.float32)],
      compiler_params=None if interpret else common.compiler_params(config),
      interpret=interpret,
      name="adaspa_block_sparse_flash" if sparse else "adaspa_dense_flash",
  )(*operands)
  return out[:, :s, :, :d], lse[:, :, :s]
