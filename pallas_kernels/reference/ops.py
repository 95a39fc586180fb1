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

_HIGHEST = jax.lax.Precision.HIGHEST
_TARGET_CHUNK = 512  # tokens per query/key chunk; bounds memory at ~B*H*512*512 floats.


def _chunk_size(seq_len: int, block_size: int) -> int:
  blocks_per_chunk = max(1, _TARGET_CHUNK // block_size)
  return block_size * min(blocks_per_chunk, validation.num_blocks(seq_len, block_size))


def _to_heads_major(x, padded_len):
  """[B, S, H, D] -> float32 [B, H, S_pad, D] with zero padding."""
  x = jnp.swapaxes(x, 1, 2).astype(jnp.float32)
  return jnp.pad(x, ((0, 0), (0, 0), (0, padded_len - x.shape[2]), (0, 0)))


def _split_chunks(x, chunk):
  """[B, H, S_pad, ...] -> [S_pad // chunk, B, H, chunk, ...]."""
  b, h, s = x.shape[:3]
  x = x.reshape(b, h, s // chunk, chunk, *x.shape[3:])
  return jnp.moveaxis(x, 2, 0)


def _merge_chunks(x):
  """Inverse of ``_split_chunks``."""
  x = jnp.moveaxis(x, 0, 2)
  return x.reshape(x.shape[0], x.shape[1], -1, *x.shape[4:])


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
  chunk = _chunk_size(s, block_size)
  s_pad = -(-s // chunk) * chunk
  qc = _split_chunks(_to_heads_major(q, s_pad), chunk)
  kc = _split_chunks(_to_heads_major(k, s_pad), chunk)
  vc = _split_chunks(_to_heads_major(v, s_pad), chunk)
  n_chunks = s_pad // chunk
  bpc = chunk // block_size
  if block_mask is not None:
    n_blk = s_pad // block_size
    pad = n_blk - block_mask.shape[2]
    block_mask = jnp.pad(block_mask, ((0, 0), (0, 0), (0, pad), (0, pad)))
  pos = jnp.arange(chunk)

  def query_chunk(args):
    qi, q_blk = args
    rows = qi * chunk + pos
    row_ok = rows[None, :] < lengths[:, None]  # [B, chunk]

    def key_chunk(carry, kargs):
      m, l, acc = carry
      ki, k_blk, v_blk = kargs
      cols = ki * chunk + pos
      ok = row_ok[:, None, :, None] & (cols[None, None, None, :] < lengths[:, None, None, None])
      if block_mask is not None:
        sub = jax.lax.dynamic_slice_in_dim(block_mask, qi * bpc, bpc, axis=2)
        sub = jax.lax.dynamic_slice_in_dim(sub, ki * bpc, bpc, axis=3)
        sub = jnp.repeat(jnp.repeat(sub, block_size, axis=2), block_size, axis=3)
        ok = ok & sub
      scores = sm_scale * jnp.einsum("bhqd,bhkd->bhqk", q_blk, k_blk, precision=_HIGHEST)
      scores = jnp.where(ok, scores, -jnp.inf)
      m_new = jnp.maximum(m, scores.max(axis=-1))
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      alpha = jnp.exp(m - m_safe)
      p = jnp.where(ok, jnp.exp(scores - m_safe[..., None]), 0.0)
      l = alpha * l + p.sum(axis=-1)
      acc = alpha[..., None] * acc + jnp.einsum("bhqk,bhkd->bhqd", p, v_blk, precision=_HIGHEST)
      return (m_new, l, acc), None

    init = (jnp.full((b, h, chunk), -jnp.inf, jnp.float32),
            jnp.zeros((b, h, chunk), jnp.float32),
            jnp.zeros((b, h, chunk, d), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(key_chunk, init, (jnp.arange(n_chunks), kc, vc))
    has_keys = l > 0
    out = jnp.where(has_keys[..., None], acc / jnp.where(has_keys, l, 1.0)[..., None], 0.0)
    lse = jnp.where(has_keys, m + jnp.log(jnp.where(has_keys, l, 1.0)), -jnp.inf)
    return out, lse

  out, lse = jax.lax.map(query_chunk, (jnp.arange(n_chunks), qc))
  out = jnp.swapaxes(_merge_chunks(out)[:, :, :s], 1, 2)
  return out, _merge_chunks(lse)[:, :, :s]


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
  qbs = validation.check_query_block_size(query_block_size, block_size)
  _, s, _, _, block_size, n_blk, _, scale, lengths = validation.block_sparse_call(
      q, k, v, kv_block_indices, kv_block_counts, block_size, kv_lengths, sm_scale, qbs)
  kv_block_indices, kv_block_counts = validation.safe_block_lists(
      kv_block_indices, kv_block_counts, n_blk)
  kv_block_indices, kv_block_counts = query_blocks.expand_lists(
      kv_block_indices, kv_block_counts, seq=s, block_size=block_size, query_block_size=qbs)
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
  chunk = _chunk_size(s, block_size)
  s_pad = -(-s // chunk) * chunk
  bpc = chunk // block_size
  qc = _split_chunks(_to_heads_major(q, s_pad), chunk)
  kc = _split_chunks(_to_heads_major(k, s_pad), chunk)
  lse_c = _split_chunks(jnp.pad(lse, ((0, 0), (0, 0), (0, s_pad - s))), chunk)
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
