"""Sparse VideoGen-style selection (Xi et al. 2025, arXiv 2502.01776), at block granularity.

Each (batch, head) gets one of two static patterns, chosen online by profiling:

* spatial: a query block keeps the key blocks of its own frame, then of the nearest
  frames (within a frame distance, nearest in the sequence first);
* temporal: a query block keeps the key blocks at its in-frame position in every
  frame, then the nearest positions (within a position distance, nearest frames first).

Both are filled to the row budget ``video_budget(sparsity, n_video)``; ties go to
the lower block id. Profiling computes ``SAMPLE_ROWS`` evenly spaced video query
rows exactly (dense, and under each pattern's mask) and keeps the pattern whose
outputs have the lower squared error: O(rows x S) per head.

Geometry: video tokens are frame-major with ``frame_tokens`` per frame. A block's
place is its centre token counted in video tokens (tokens of text blocks are
skipped), so with text that ends mid-block the frame edges sit less than a block
off the true ones. Recall without ``measure_recall``: the share of the sampled
rows' exact softmax mass that the chosen pattern keeps.

Query blocks larger than key blocks (``query_block_size``): a video query block (one
without text tokens) is placed at its own centre token in the same video-token
count, and ranks the key blocks by their distance to it; sampled rows come from the
video query blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from adaspa_jax import blocks, probe
from adaspa_jax.selection import Selection, block_lists, query_grid

SAMPLE_ROWS = 64  # SVG profiles ~1% of the tokens; a fixed count keeps shapes static.
_HIGHEST = jax.lax.Precision.HIGHEST


def block_geometry(text: np.ndarray, seq_len: int, block_size: int, frame_tokens: int):
  """(frame, twice the in-frame position, twice the centre) int64 [nK] of each block.

  Doubling keeps the half-token centres of even-sized blocks exact integers.
  """
  n_k = text.size
  sizes = np.minimum(block_size, seq_len - np.arange(n_k) * block_size)
  start = np.concatenate([[0], np.cumsum(np.where(text, 0, sizes))[:-1]])
  centre2 = 2 * start + sizes - 1
  frame = centre2 // (2 * frame_tokens)
  return frame, centre2 - frame * 2 * frame_tokens, centre2


def query_geometry(text: np.ndarray, seq_len: int, block_size: int, frame_tokens: int,
                   query_block_size: int):
  """(frame, twice the in-frame position, twice the centre) int64 [nQ] of each query
  block of ``query_block_size`` rows (a multiple of ``block_size``), in the video-token
  count of ``block_geometry``; ``block_geometry`` itself for square blocks. Exact for
  video query blocks (all their key-block-sized parts are video); text query blocks,
  dense rows, get a placeholder."""
  if query_block_size == block_size:
    return block_geometry(text, seq_len, block_size, frame_tokens)
  r = query_block_size // block_size
  n_k = text.size
  sizes = np.minimum(block_size, seq_len - np.arange(n_k) * block_size)
  start = np.concatenate([[0], np.cumsum(np.where(text, 0, sizes))[:-1]])
  n_q = -(-seq_len // query_block_size)
  q_sizes = np.minimum(query_block_size, seq_len - np.arange(n_q) * query_block_size)
  centre2 = 2 * start[np.arange(n_q) * r] + q_sizes - 1
  frame = centre2 // (2 * frame_tokens)
  return frame, centre2 - frame * 2 * frame_tokens, centre2


@functools.lru_cache(maxsize=16)
def _patterns(text_bytes: bytes, seq_len: int, block_size: int, frame_tokens: int, k: int,
              query_block_size: int):
  text = np.frombuffer(text_bytes, bool)
  frame, pos2, centre2 = block_geometry(text, seq_len, block_size, frame_tokens)
  q_frame, q_pos2, q_centre2 = (x[:, None] for x in query_geometry(
      text, seq_len, block_size, frame_tokens, query_block_size))
  vid = np.flatnonzero(~text)
  d_frame = np.abs(frame[vid][None, :] - q_frame)
  d_pos = np.abs(pos2[vid][None, :] - q_pos2)
  d_seq = np.abs(centre2[vid][None, :] - q_centre2)
  ids = np.broadcast_to(vid, d_frame.shape)
  # np.lexsort sorts by the last key first.
  spatial = vid[np.lexsort((ids, d_seq, d_frame), axis=-1)[:, :k]]
  temporal = vid[np.lexsort((ids, d_frame, d_pos), axis=-1)[:, :k]]
  return spatial.astype(np.int32), temporal.astype(np.int32)


def patterns(text: np.ndarray, seq_len: int, block_size: int, frame_tokens: int, k: int,
             query_block_size: int | None = None):
  """(spatial, temporal) int32 [nQ, k]: each query block (of ``query_block_size`` rows,
  None: ``block_size``) its k video key blocks, best first; text [nK]."""
  qbs = block_size if query_block_size is None else query_block_size
  return _patterns(np.asarray(text, bool).tobytes(), seq_len, block_size, frame_tokens, k,
                   qbs)


def sample_rows(text: np.ndarray, seq_len: int, block_size: int, count: int = SAMPLE_ROWS):
  """int [min(count, video tokens)]: evenly spaced video query positions (centres of
  equal slices of the video rows); text: bool per query block of ``block_size`` rows."""
  video = probe.video_rows(text, seq_len, block_size)
  n = min(count, video.size)
  return video[((2 * np.arange(n) + 1) * video.size) // (2 * n)]


def select(q, k, v, *, sparsity, frame_tokens, text, block_size, k_max, kv_lengths=None,
           sm_scale=None, query_block_size=None, query_text=None) -> Selection:
  """SVG block lists for q, k, v [B, S, H, D]; text numpy bool [nK]; k_max static;
  query_block_size (None: block_size) and query_text numpy bool [nQ] (None: text) for
  query blocks larger than key blocks."""
  b, s, h, _ = q.shape
  n_k = text.size
  qbs, n_q, query_text = query_grid(s, block_size, query_block_size, query_text, text)
  n_video = int((~text).sum())
  kb = blocks.video_budget(sparsity, n_video)
  spatial, temporal = patterns(text, s, block_size, frame_tokens, kb, qbs)
  k_rows = jnp.full((1, 1, n_q), kb, jnp.int32)
  idx_s, counts = block_lists(jnp.asarray(spatial)[None, None], k_rows, text, k_max,
                              query_text)
  idx_t, _ = block_lists(jnp.asarray(temporal)[None, None], k_rows, text, k_max, query_text)
  rows = sample_rows(query_text, s, qbs)
  if rows.size == 0:  # no video query block: every row is a dense text row
    return Selection(indices=jnp.broadcast_to(idx_s, (b, h, n_q, k_max)),
                     counts=jnp.broadcast_to(counts, (b, h, n_q)),
                     recall=jnp.ones((b, h), jnp.float32),
                     sparsity=jnp.zeros((b, h), jnp.float32))

  scores, ok, row_ok = probe.row_scores(q, k, rows, kv_lengths=kv_lengths, sm_scale=sm_scale)
  token_block = np.arange(s) // block_size
  vf = v.astype(jnp.float32)

  def allowed(ids):  # bool [R, S]: the sampled rows' keys under a pattern
    keep = np.zeros((rows.size, n_k), bool)
    keep[np.arange(rows.size)[:, None], ids[rows // qbs]] = True
    keep |= text[None, :]
    return jnp.asarray(keep)[:, jnp.asarray(token_block)]

  p = probe.masked_softmax(scores, ok)
  dense = jnp.einsum("bhrs,bshd->bhrd", p, vf, precision=_HIGHEST)
  weight = row_ok[:, None, :, None].astype(jnp.float32)

  def profile(ids):  # squared error of the sampled outputs and mass kept, [B, H] each
    mask = allowed(ids)
    out = jnp.einsum("bhrs,bshd->bhrd", probe.masked_softmax(scores, ok & mask), vf,
                     precision=_HIGHEST)
    return ((out - dense) ** 2 * weight).sum((-1, -2)), jnp.where(mask, p, 0.0).sum((-1, -2))

  err_s, kept_s = profile(spatial)
  err_t, kept_t = profile(temporal)
  use_spatial = err_s <= err_t                                          # [B, H]
  kept = jnp.where(use_spatial, kept_s, kept_t)
  total = p.sum((-1, -2))
  recall = jnp.where(total > 0, kept / jnp.where(total > 0, total, 1.0), 1.0)
  indices = jnp.where(use_spatial[..., None, None], idx_s, idx_t)
  return Selection(indices=indices, counts=jnp.broadcast_to(counts, (b, h, n_q)),
                   recall=recall.astype(jnp.float32),
                   sparsity=jnp.full((b, h), 1.0 - kb / n_video, jnp.float32))
