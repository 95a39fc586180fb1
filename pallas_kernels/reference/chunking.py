"""Chunked layouts shared by the pure-jnp references (``ops`` and ``fp8``).

The references process queries in chunks (``lax.map``) and keys in chunks (an
online-softmax ``lax.scan``) so that no S x S matrix is materialised; these helpers
choose the chunk and move [B, S, H, X] arrays in and out of that layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import validation

TARGET_CHUNK = 512  # tokens per query/key chunk; bounds memory at ~B*H*512*512 floats.


def chunk_size(seq_len: int, block_size: int) -> int:
  """Tokens per chunk: whole blocks, at most ``TARGET_CHUNK`` (one block if larger)
  and at most the sequence's block count."""
  blocks_per_chunk = max(1, TARGET_CHUNK // block_size)
  return block_size * min(blocks_per_chunk, validation.num_blocks(seq_len, block_size))


def to_heads_major(x, padded_len, dtype=None):
  """[B, S, H, X] -> [B, H, S_pad, X], zero-padded to ``padded_len`` tokens, cast to
  ``dtype`` (None keeps x's)."""
  x = jnp.swapaxes(x, 1, 2)
  if dtype is not None:
    x = x.astype(dtype)
  return jnp.pad(x, ((0, 0), (0, 0), (0, padded_len - x.shape[2]), (0, 0)))


def split_chunks(x, chunk):
  """[B, H, S_pad, ...] -> [S_pad // chunk, B, H, chunk, ...]."""
  b, h, s = x.shape[:3]
  x = x.reshape(b, h, s // chunk, chunk, *x.shape[3:])
  return jnp.moveaxis(x, 2, 0)


def merge_chunks(x):
  """Inverse of ``split_chunks``."""
  x = jnp.moveaxis(x, 0, 2)
  return x.reshape(x.shape[0], x.shape[1], -1, *x.shape[4:])


def pad_block_mask(block_mask, padded_len: int, block_size: int):
  """A bool [B, H, nQ, nK] block mask padded with False to the padded length's blocks
  (None stays None)."""
  if block_mask is None:
    return None
  pad = padded_len // block_size - block_mask.shape[2]
  return jnp.pad(block_mask, ((0, 0), (0, 0), (0, pad), (0, pad)))


def pair_mask(row_ok, qi, ki, lengths, block_mask, *, chunk: int, block_size: int):
  """bool [B, H or 1, chunk, chunk]: which (query, key) pairs of query chunk ``qi`` and key
  chunk ``ki`` count: valid rows (``row_ok`` [B, chunk]) and keys (< ``lengths`` [B]),
  and, with a padded ``block_mask`` [B, H, nQ, nK], the listed blocks."""
  cols = ki * chunk + jnp.arange(chunk)
  ok = row_ok[:, None, :, None] & (cols[None, None, None, :] < lengths[:, None, None, None])
  if block_mask is not None:
    bpc = chunk // block_size
    sub = jax.lax.dynamic_slice_in_dim(block_mask, qi * bpc, bpc, axis=2)
    sub = jax.lax.dynamic_slice_in_dim(sub, ki * bpc, bpc, axis=3)
    sub = jnp.repeat(jnp.repeat(sub, block_size, axis=2), block_size, axis=3)
    ok = ok & sub
  return ok


def softmax_step(m, l, scores, ok):
  """One online-softmax step over a key chunk of float32 ``scores`` [..., q, k] masked by
  ``ok``: returns the new running max and sum, the rescale ``alpha`` of the previous
  accumulator and ``p = exp(scores - max)`` (0 where masked; no NaN on empty rows)."""
  scores = jnp.where(ok, scores, -jnp.inf)
  m_new = jnp.maximum(m, scores.max(axis=-1))
  m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
  alpha = jnp.exp(m - m_safe)
  p = jnp.where(ok, jnp.exp(scores - m_safe[..., None]), 0.0)
  return m_new, alpha * l + p.sum(axis=-1), alpha, p


def softmax_init(b: int, h: int, chunk: int, d: int):
  """(running max -inf, running sum 0, accumulator 0) of a query chunk."""
  return (jnp.full((b, h, chunk), -jnp.inf, jnp.float32),
          jnp.zeros((b, h, chunk), jnp.float32),
          jnp.zeros((b, h, chunk, d), jnp.float32))


def softmax_finish(m, l, acc):
  """(out, natural-log LSE) of a query chunk; rows that saw no valid key: 0 and -inf."""
  has_keys = l > 0
  out = jnp.where(has_keys[..., None], acc / jnp.where(has_keys, l, 1.0)[..., None], 0.0)
  lse = jnp.where(has_keys, m + jnp.log(jnp.where(has_keys, l, 1.0)), -jnp.inf)
  return out, lse
