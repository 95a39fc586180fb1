"""Exact attention of a few query rows against every key: how the baselines look at a map.

Sparse VideoGen profiles ~64 sampled rows and MInference reads its last query block;
both cost O(rows x S) per head, never S x S.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import validation

_HIGHEST = jax.lax.Precision.HIGHEST


def video_rows(text: np.ndarray, seq_len: int, block_size: int) -> np.ndarray:
  """int [n]: token positions of the video query blocks (blocks not in ``text``)."""
  block_of = np.arange(seq_len) // block_size
  return np.flatnonzero(~text[block_of])


def row_scores(q, k, rows: np.ndarray, *, kv_lengths=None, sm_scale=None):
  """Scores of a few query rows against every key.

  Args:
    q, k: [B, S, H, D].
    rows: static int [R] query positions.
    kv_lengths: optional int [B] valid tokens.
    sm_scale: softmax scale, default 1/sqrt(D).

  Returns:
    scores float32 [B, H, R, S], ok bool [B, 1, R, S] (valid row and valid key)
    and row_ok bool [B, R].
  """
  b, s, _, d = q.shape
  scale = validation.default_scale(sm_scale, d)
  lengths = validation.valid_lengths(kv_lengths, b, s)
  scores = scale * jnp.einsum("brhd,bshd->bhrs", q[:, rows].astype(jnp.float32),
                              k.astype(jnp.float32), precision=_HIGHEST)
  row_ok = jnp.asarray(rows)[None, :] < lengths[:, None]
  key_ok = jnp.arange(s)[None, :] < lengths[:, None]
  return scores, row_ok[:, None, :, None] & key_ok[:, None, None, :], row_ok


def probabilities(q, k, rows: np.ndarray, *, kv_lengths=None, sm_scale=None):
  """float32 [B, H, R, S] softmax rows (each sums to 1; padded rows are 0); see
  ``row_scores`` for the arguments."""
  scores, ok, _ = row_scores(q, k, rows, kv_lengths=kv_lengths, sm_scale=sm_scale)
  return masked_softmax(scores, ok)


def masked_softmax(scores, ok):
  """softmax over the last axis restricted to ``ok``; all-masked rows are 0, never NaN."""
  m = jnp.max(jnp.where(ok, scores, -jnp.inf), axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.where(ok, jnp.exp(scores - m), 0.0)
  total = e.sum(-1, keepdims=True)
  return e / jnp.where(total > 0, total, 1.0)


def key_blocks(x, block_size: int):
  """Sums [..., S] over key blocks -> [..., nK] (the last block may be partial)."""
  s = x.shape[-1]
  n_blk = validation.num_blocks(s, block_size)
  x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n_blk * block_size - s)])
  return x.reshape(*x.shape[:-1], n_blk, block_size).sum(-1)
