"""Pure-jnp references for the three AdaSpa kernels (``implementation="reference"``).

Exact (float32 accumulation at HIGHEST precision) for any sequence length, and
chunked so a call at S = 16K never materialises an S x S matrix: queries are
processed in chunks by ``lax.map`` and keys by an online-softmax ``lax.scan``.

Conventions shared by every implementation (see ``pallas_kernels.api``):

* q, k, v are [B, S, H, D] (self-attention: one sequence length); outputs keep
  q's dtype; LSE is natural-log float32 [B, H, S].
* ``kv_lengths[b]`` is the number of valid tokens of batch element b. Keys at or
  past it are masked; query rows at or past it are padding: output 0, LSE -inf,
  and they add nothing to a block mass.
* A valid row that attends to no valid key also gets output 0 and LSE -inf
  (never NaN).
* Block lists: ``kv_block_indices`` int32 [B, H, nQ, K_max], ``kv_block_counts``
  int32 [B, H, nQ], nQ = ceil(S / query_block_size) (``query_block_size`` None:
  ``block_size``; larger query blocks: ``pallas_kernels.query_blocks``); entries
  are key blocks of ``block_size`` keys, nK = ceil(S / block_size). A row reads its
  first ``count`` entries (distinct block ids in [0, nK); ascending order is what
  selection produces and what kernels prefetch best). A row whose count is >= nK attends to every key block and its
  entries are not read: this lets dense rows (text queries) live beside sparse
  rows without widening K_max to nK.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import query_blocks, validation
from pallas_kernels.reference.chunking import (chunk_size, merge_chunks, pad_block_mask, pair_mask,
                                               softmax_finish, softmax_init, softmax_step,
                                               split_chunks, to_heads_major)

_HIGHEST = jax.lax.Precision.HIGHEST


def _masked_flash(q, k, v, lengths, sm_scale, block_size, block_mask):
  """Online-softmax attention over chunks.

  Args:
    q, k, v: [B, S, H, D].
    lengths: int32 [B], valid tokens.
    block_mask: bool [B, H, nQ, nK] or None (dense).

  Returns:
    out float32 [B, S, H, D] and lse float32 [B, H, S].
  """
  b, s, h, d = q.shape
  chunk = chunk_size(s, block_size)
  s_pad = -(-s // chunk) * chunk
  qc = split_chunks(to_heads_major(q, s_pad, jnp.float32), chunk)
  kc = split_chunks(to_heads_major(k, s_pad, jnp.float32), chunk)
  vc = split_chunks(to_heads_major(v, s_pad, jnp.float32), chunk)
  n_chunks = s_pad // chunk
  block_mask = pad_block_mask(block_mask, s_pad, block_size)

  def query_chunk(args):
    qi, q_blk = args
    row_ok = (qi * chunk + jnp.arange(chunk))[None, :] < lengths[:, None]  # [B, chunk]

    def key_chunk(carry, kargs):
      m, l, acc = carry
      ki, k_blk, v_blk = kargs
      ok = pair_mask(row_ok, qi, ki, lengths, block_mask, chunk=chunk, block_size=block_size)
      scores = sm_scale * jnp.einsum("bhqd,bhkd->bhqk", q_blk, k_blk, precision=_HIGHEST)
      m, l, alpha, p = softmax_step(m, l, scores, ok)
      acc = alpha[..., None] * acc + jnp.einsum("bhqk,bhkd->bhqd", p, v_blk, precision=_HIGHEST)
      return (m, l, acc), None

    init = softmax_init(b, h, chunk, d)
    (m, l, acc), _ = jax.lax.scan(key_chunk, init, (jnp.arange(n_chunks), kc, vc))
    return softmax_finish(m, l, acc)

  out, lse = jax.lax.map(query_chunk, (jnp.arange(n_chunks), qc))
  out = jnp.swapaxes(merge_chunks(out)[:, :, :s], 1, 2)
  return out, merge_chunks(lse)[:, :, :s]


def attention(q, k, v, *, kv_lengths=None, sm_scale=None):
  """Exact dense attention.

  Args:
    q, k, v: [B, S, H, D].
    kv_lengths: optional int [B]; see the module docstring.
    sm_scale: softmax scale, default 1/sqrt(D).

  Returns:
    out [B, S, H, D] in q's dtype, lse float32 [B, H, S].
  """
  b, s, h, d = validation.check_qkv(q, k, v)
  kv_lengths = validation.check_kv_lengths(kv_lengths, b, s)
  scale = validation.default_scale(sm_scale, d)
  out, lse = _masked_flash(q, k, v, validation.valid_lengths(kv_lengths, b, s), scale, 16,
                           None)
  return out.astype(q.dtype), lse


def block_mask_from_lists(kv_block_indices, kv_block_counts, num_kv_blocks):
  """bool [B, H, nQ, nK]: which key blocks each (batch, head, query block) reads."""
  b, h, n_q, k_max = kv_block_indices.shape
  slot = jnp.arange(k_max)
  read = slot < kv_block_counts[..., None]
  ids = jnp.where(read & (kv_block_indices >= 0) & (kv_block_indices < num_kv_blocks),
                  kv_block_indices, num_kv_blocks)
  mask = jnp.zeros((b, h, n_q, num_kv_blocks + 1), bool)
  mask = mask.at[jnp.arange(b)[:, None, None, None], jnp.arange(h)[None, :, None, None],
                 jnp.arange(n_q)[None, None, :, None], ids].set(True)[..., :num_kv_blocks]
  dense_row = kv_block_counts >= num_kv_blocks
  return mask | dense_row[..., None]


def block_sparse_attention(q, k, v, kv_block_indices, kv_block_counts, *, block_size,
                           kv_lengths=None, sm_scale=None, return_lse=True,
                           query_block_size=None):
  """Attention restricted to the key blocks listed per (batch, head, query block).

  Args:
    q, k, v: [B, S, H, D].
    kv_block_indices: int32 [B, H, nQ, K_max], nQ = ceil(S / query_block_size).
    kv_block_counts: int32 [B, H, nQ].
    block_size: tokens per key block (power of two >= 16).
    query_block_size: rows per query block, a power-of-two multiple of block_size
      (at most 128 unless equal to it); None for block_size.

  Returns:
    out [B, S, H, D] in q's dtype, and lse float32 [B, H, S] if ``return_lse``.
  """
  _, (_, _, _, _, block_size, n_blk, _, scale, lengths), kv_block_indices, kv_block_counts = (
      query_blocks.checked_sparse_call(
          q, k, v, kv_block_indices, kv_block_counts, block_size=block_size,
          kv_lengths=kv_lengths, sm_scale=sm_scale, query_block_size=query_block_size))
  mask = block_mask_from_lists(kv_block_indices, kv_block_counts, n_blk)
  out, lse = _masked_flash(q, k, v, lengths, scale, block_size, mask)
  out = out.astype(q.dtype)
  return (out, lse) if return_lse else out


def block_mass(q, k, lse, *, block_size, kv_lengths=None, sm_scale=None,
               query_block_size=None):
  """Softmax mass per (query block, key block), from a given row LSE.

  ``mass[b,h,p,c] = sum_{i in block p, j in block c} exp(s_ij - lse[b,h,i])``
  over valid rows i and keys j, with ``s = sm_scale * q_i . k_j``: a sum over the
  rows of the query block (not a mean), so a valid row of exact attention adds 1.

  Args:
    q, k: [B, S, H, D].
    lse: float32 [B, H, S] (natural log), e.g. cached from an earlier step.
    query_block_size: rows per query block p (None: block_size); key blocks c
      have block_size keys.

  Returns:
    float32 [B, H, nQ, nK], nQ = ceil(S / query_block_size), nK = ceil(S / block_size).
  """
  qbs = validation.check_query_block_size(query_block_size, block_size)
  mass = _block_mass(q, k, lse, block_size=block_size, kv_lengths=kv_lengths,
                     sm_scale=sm_scale)
  return query_blocks.coarsen_mass(mass, seq=q.shape[1], block_size=block_size,
                                   query_block_size=qbs)


def _block_mass(q, k, lse, *, block_size, kv_lengths, sm_scale):
  """``block_mass`` at square blocks of ``block_size``."""
  b, s, h, _, block_size, n_blk, _, scale, lengths = validation.block_mass_call(
      q, k, lse, block_size, kv_lengths, sm_scale)
  chunk = chunk_size(s, block_size)
  s_pad = -(-s // chunk) * chunk
  bpc = chunk // block_size
  qc = split_chunks(to_heads_major(q, s_pad, jnp.float32), chunk)
  kc = split_chunks(to_heads_major(k, s_pad, jnp.float32), chunk)
  lse_c = split_chunks(jnp.pad(lse, ((0, 0), (0, 0), (0, s_pad - s))), chunk)
  n_chunks = s_pad // chunk
  pos = jnp.arange(chunk)

  def query_chunk(args):
    qi, q_blk, lse_blk = args
    row_ok = (qi * chunk + pos)[None, :] < lengths[:, None]

    def key_chunk(ki, k_blk):
      ok = row_ok[:, None, :, None] & (
          (ki * chunk + pos)[None, None, None, :] < lengths[:, None, None, None])
      scores = scale * jnp.einsum("bhqd,bhkd->bhqk", q_blk, k_blk, precision=_HIGHEST)
      p = jnp.where(ok, jnp.exp(scores - lse_blk[..., None]), 0.0)
      return p.reshape(b, h, bpc, block_size, bpc, block_size).sum(axis=(3, 5))

    per_key = jax.lax.map(lambda a: key_chunk(*a), (jnp.arange(n_chunks), kc))
    return jnp.moveaxis(per_key, 0, 3).reshape(b, h, bpc, n_chunks * bpc)

  mass = jax.lax.map(query_chunk, (jnp.arange(n_chunks), qc, lse_c))
  mass = jnp.moveaxis(mass, 0, 2).reshape(b, h, n_chunks * bpc, n_chunks * bpc)
  return mass[:, :, :n_blk, :n_blk]


def attention_with_block_mass(q, k, v, *, block_size, kv_lengths=None, sm_scale=None,
                              query_block_size=None):
  """The fused search: exact dense attention, its LSE, and the block mass.

  Returns:
    out [B, S, H, D] (q's dtype), lse float32 [B, H, S], mass float32 [B, H, nQ, nK]
    (nQ at ``query_block_size``, as in ``block_mass``).
  """
  validation.check_query_block_size(query_block_size, block_size)
  out, lse = attention(q, k, v, kv_lengths=kv_lengths, sm_scale=sm_scale)
  mass = block_mass(q, k, lse, block_size=block_size, kv_lengths=kv_lengths,
                    sm_scale=sm_scale, query_block_size=query_block_size)
  return out, lse, mass
