"""Brute-force float64 numpy versions of the kernels, independent of the library.

Written the slow, obvious way (full S x S matrices, Python loops over blocks) so
they share no code and no tricks with ``pallas_kernels``.
"""

import numpy as np


def _valid(batch, seq, kv_lengths):
  lengths = [seq] * batch if kv_lengths is None else [min(int(x), seq) for x in kv_lengths]
  ok = np.zeros((batch, 1, seq, seq), bool)
  for b, n in enumerate(lengths):
    ok[b, :, :n, :n] = True
  return ok


def scores(q, k, sm_scale=None):
  q = np.asarray(q, np.float64)
  k = np.asarray(k, np.float64)
  scale = 1.0 / np.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
  return scale * np.einsum("bqhd,bkhd->bhqk", q, k)


def masked_attention(q, k, v, allowed):
  """allowed: bool [B, H, S, S]. Returns out [B, S, H, D] f64, lse [B, H, S] (-inf if empty)."""
  s = np.where(allowed, scores(q, k), -np.inf)
  m = s.max(-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  p = np.where(allowed, np.exp(s - m), 0.0)
  l = p.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", p / np.where(l > 0, l, 1.0), np.asarray(v, np.float64))
  lse = np.where(l[..., 0] > 0, m[..., 0] + np.log(np.where(l[..., 0] > 0, l[..., 0], 1.0)),
                 -np.inf)
  return out, lse


def attention(q, k, v, kv_lengths=None):
  b, s, h, _ = q.shape
  return masked_attention(q, k, v, np.broadcast_to(_valid(b, s, kv_lengths), (b, h, s, s)))


def token_mask(indices, counts, seq, block_size, query_block_size=None):
  """bool [B, H, S, S]: the (query, key) tokens block lists allow. Rows of the lists are
  query blocks of ``query_block_size`` rows (None: ``block_size``), entries key blocks
  of ``block_size`` keys; a count >= nK reads every key."""
  indices, counts = np.asarray(indices), np.asarray(counts)
  b, h, n_q, _ = indices.shape
  qbs = block_size if query_block_size is None else query_block_size
  n_k = -(-seq // block_size)
  allowed = np.zeros((b, h, seq, seq), bool)
  for bi in range(b):
    for hi in range(h):
      for p in range(n_q):
        c = counts[bi, hi, p]
        blocks = range(n_k) if c >= n_k else indices[bi, hi, p, :c]
        for blk in blocks:
          allowed[bi, hi, p * qbs:(p + 1) * qbs, blk * block_size:(blk + 1) * block_size] = True
  return allowed


def block_sparse_attention(q, k, v, indices, counts, block_size, kv_lengths=None,
                           query_block_size=None):
  b, s, h, _ = q.shape
  allowed = token_mask(indices, counts, s, block_size, query_block_size)
  return masked_attention(q, k, v, allowed & _valid(b, s, kv_lengths))


def block_mass(q, k, lse, block_size, kv_lengths=None, query_block_size=None):
  """[B, H, nQ, nK]: softmax mass summed over query blocks of ``query_block_size`` rows
  (None: ``block_size``) and key blocks of ``block_size`` keys."""
  b, s, h, _ = q.shape
  qbs = block_size if query_block_size is None else query_block_size
  ok = np.broadcast_to(_valid(b, s, kv_lengths), (b, h, s, s))
  lse = np.asarray(lse, np.float64)
  p = np.where(ok, np.exp(scores(q, k) - np.where(np.isfinite(lse), lse, 0.0)[..., None]), 0.0)
  n_q, n_k = -(-s // qbs), -(-s // block_size)
  mass = np.zeros((b, h, n_q, n_k))
  for i in range(n_q):
    for j in range(n_k):
      mass[:, :, i, j] = p[:, :, i * qbs:(i + 1) * qbs,
                           j * block_size:(j + 1) * block_size].sum((-1, -2))
  return mass


def random_block_lists(rng, batch, heads, n_blk, k_max, dense_fraction=0.15, n_kv=None):
  """Distinct ascending ids per row, counts in [1, K_max], some rows dense (count = nK).

  ``n_blk`` rows (query blocks) over ``n_kv`` key blocks (None: ``n_blk``)."""
  n_kv = n_blk if n_kv is None else n_kv
  idx = np.zeros((batch, heads, n_blk, k_max), np.int32)
  cnt = rng.integers(1, k_max + 1, (batch, heads, n_blk)).astype(np.int32)
  cnt[..., 0] = 1
  cnt[..., -1] = k_max
  for pos in np.ndindex(batch, heads, n_blk):
    chosen = np.sort(rng.choice(n_kv, size=k_max, replace=False))
    idx[pos] = chosen
    # Unread slots repeat the last read id, as selection does; kernels may prefetch them.
    idx[pos][cnt[pos]:] = chosen[cnt[pos] - 1]
  dense = rng.random((batch, heads, n_blk)) < dense_fraction
  cnt[dense] = n_kv
  return idx, cnt
