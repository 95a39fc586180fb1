"""AdaSpa kernels in Pallas with the Triton lowering (``implementation="triton"``).

Same signatures and conventions as ``pallas_kernels.reference`` plus
``interpret``: ``interpret=True`` runs the kernels in the Pallas interpreter, so
this path is exercised on CPU. The kernels live in ``block_sparse_kernel``
(flash attention, dense or from block lists) and ``block_mass_kernel``.

Tuning: each entry point takes an optional ``config`` (``BlockSparseConfig`` for the
flash kernel, ``BlockMassConfig`` for the block mass; None for the kernel module's
default), shrunk here if its tiles would not fit in shared memory.

Preconditions beyond the reference's checks: listed block ids are distinct and in
[0, nK) (selection produces that); ids are clamped into range so a bad list can
never read out of bounds, but a duplicate id is counted twice.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.triton import block_mass_kernel
from pallas_kernels.triton import block_sparse_kernel
from pallas_kernels import query_blocks, validation

BlockSparseConfig = block_sparse_kernel.BlockSparseConfig
BlockMassConfig = block_mass_kernel.BlockMassConfig


_SMEM_BYTES = 220 * 1024  # a little under the 227 KB an H100/H200 block may use


def _fit_smem(config, head_dim, itemsize, streams):
  """Shrinks a config's tiles whose shared memory would not fit (float32 inputs at large
  tiles).

  Estimate: the query tile plus (num_stages - 1) buffered key tiles of each
  streamed operand (K and V: streams=2; K only: 1), which is what Triton's
  pipeliner allocates. Stages go first, then the key tile, then the query tile.
  """
  d = max(16, 1 << (head_dim - 1).bit_length())
  def need(t):
    return (t.block_q + max(1, t.num_stages - 1) * streams * t.block_k) * d * itemsize
  while need(config) > _SMEM_BYTES:
    if config.num_stages > 2:
      config = dataclasses.replace(config, num_stages=config.num_stages - 1)
    elif config.block_k > 32:
      config = dataclasses.replace(config, block_k=config.block_k // 2)
    elif config.block_q > 32:
      config = dataclasses.replace(config, block_q=config.block_q // 2)
    else:
      break
  return config


def attention(q, k, v, *, kv_lengths=None, sm_scale=None, interpret=False, config=None):
  """Exact dense attention by the flash kernel.

  Args:
    q, k, v: [B, S, H, D].
    kv_lengths: optional int [B]; keys at or past it are masked, rows at or past
      it output 0 with LSE -inf.
    config: optional ``BlockSparseConfig`` (default
      ``block_sparse_kernel.DEFAULT_DENSE_CONFIG``).

  Returns:
    out [B, S, H, D] in q's dtype, lse float32 [B, H, S].
  """
  b, s, _, d = validation.check_qkv(q, k, v)
  kv_lengths = validation.check_kv_lengths(kv_lengths, b, s)
  scale = validation.default_scale(sm_scale, d)
  if config is None:
    config = block_sparse_kernel.DEFAULT_DENSE_CONFIG
  config = _fit_smem(config, d, q.dtype.itemsize, streams=2)
  return block_sparse_kernel.flash_attention(
      q, k, v, validation.valid_lengths(kv_lengths, b, s), block_size=0, sm_scale=scale,
      config=config,
      mask_keys=kv_lengths is not None, interpret=interpret)


def block_sparse_attention(q, k, v, kv_block_indices, kv_block_counts, *, block_size,
                           kv_lengths=None, sm_scale=None, return_lse=True,
                           interpret=False, config=None, query_block_size=None):
  """Attention restricted to the key blocks listed per (batch, head, query block).

  Args:
    q, k, v: [B, S, H, D].
    kv_block_indices: int32 [B, H, nQ, K_max], nQ = ceil(S / query_block_size).
    kv_block_counts: int32 [B, H, nQ]; a count >= nK means every key block.
    block_size: tokens per key block (power of two >= 16).
    config: optional ``BlockSparseConfig`` (default ``block_sparse_kernel.DEFAULT_CONFIG``),
      its tiles clamped to block_size.
    query_block_size: rows per query block (None: block_size); the lists are expanded
      to block_size rows for the kernel (``query_blocks.expand_lists``).

  Returns:
    out [B, S, H, D] in q's dtype, and lse float32 [B, H, S] if ``return_lse``.
  """
  _, (_, s, _, d, block_size, n_blk, kv_lengths, scale, lengths), kv_block_indices, \
      kv_block_counts = query_blocks.checked_sparse_call(
          q, k, v, kv_block_indices, kv_block_counts, block_size=block_size,
          kv_lengths=kv_lengths, sm_scale=sm_scale, query_block_size=query_block_size)
  if config is None:
    config = block_sparse_kernel.DEFAULT_CONFIG
  config = _fit_smem(config, d, q.dtype.itemsize, streams=2)
  out, lse = block_sparse_kernel.flash_attention(
      q, k, v, lengths, kv_block_indices, kv_block_counts,
      block_size=block_size, sm_scale=scale, config=config,
      mask_keys=kv_lengths is not None, interpret=interpret)
  return (out, lse) if return_lse else out


def block_mass(q, k, lse, *, block_size, kv_lengths=None, sm_scale=None, interpret=False,
               config=None, query_block_size=None):
  """Softmax mass per (query block, key block) from a given row LSE.

  Args:
    q, k: [B, S, H, D].
    lse: float32 [B, H, S] (natural log), e.g. cached from an earlier step.
    config: optional ``BlockMassConfig`` (default ``block_mass_kernel.DEFAULT_CONFIG``).
    query_block_size: rows per query block (None: block_size); the kernel's
      block_size rows are summed into them (``query_blocks.coarsen_mass``).

  Returns:
    float32 [B, H, nQ, nK], nQ = ceil(S / query_block_size).
  """
  qbs = validation.check_query_block_size(query_block_size, block_size)
  _, s, _, d, block_size, _, kv_lengths, scale, lengths = validation.block_mass_call(
      q, k, lse, block_size, kv_lengths, sm_scale)
  if config is None:
    config = block_mass_kernel.DEFAULT_CONFIG
  config = _fit_smem(config, d, q.dtype.itemsize, streams=1)
  mass = block_mass_kernel.block_mass(
      q, k, lse, lengths, block_size=block_size, sm_scale=scale,
      config=config, mask_keys=kv_lengths is not None, interpret=interpret)
  return query_blocks.coarsen_mass(mass, seq=s, block_size=block_size, query_block_size=qbs)


def attention_with_block_mass(q, k, v, *, block_size, kv_lengths=None, sm_scale=None,
                              interpret=False, config=None, mass_config=None,
                              query_block_size=None):
  """The fused search: dense attention (out, LSE), then the block mass from that LSE.

  ``config`` (a ``BlockSparseConfig``) tunes the dense pass, ``mass_config`` (a
  ``BlockMassConfig``) the block mass; None for their defaults.

  Returns:
    out [B, S, H, D] (q's dtype), lse float32 [B, H, S], mass float32 [B, H, nQ, nK]
    (nQ at ``query_block_size``, as in ``block_mass``).
  """
  block_size = validation.check_block_size(block_size)
  validation.check_query_block_size(query_block_size, block_size)
  out, lse = attention(q, k, v, kv_lengths=kv_lengths, sm_scale=sm_scale,
                       interpret=interpret, config=config)
  mass = block_mass(q, k, lse, block_size=block_size, kv_lengths=kv_lengths,
                    sm_scale=sm_scale, interpret=interpret, config=mass_config,
                    query_block_size=query_block_size)
  return out, lse, mass
