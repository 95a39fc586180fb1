"""MInference-style vertical-slash selection (Jiang et al. 2024), at block granularity.

From the exact softmax rows of the last video query block (``block_size`` rows x all
keys, per head), over video keys only:

* vertical[j]: the mass of key block j (column sums, aggregated per key block);
* slash[d]: the mass along key-query token offsets o with |o| nearest the block
  distance d (``d = floor(|o| / block_size + 1/2)``).

Video attention is bidirectional but the last video block sees (almost) only keys
behind it, so a signed slash would leave every forward diagonal unscored: the
slash is scored by distance, the same in both directions. Each video query block
i keeps the ``video_budget(sparsity, n_video)`` video key blocks of highest
``vertical[j] + slash[|j - i|]`` (ties: lower id), plus the text blocks.
Recall without ``measure_recall``: the share of the probed rows' exact softmax
mass that the last video block's list keeps.

Query blocks larger than key blocks (``query_block_size``): the probe is the last
video query block (``query_block_size`` rows, no text token), the distances stay in
key blocks, and a query block's score for key block j is the sum of the scores of
its key-block-sized parts i, ``sum_i vertical[j] + slash[|j - i|]`` (as its block
mass is the sum of theirs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from adaspa_jax import blocks, probe
from adaspa_jax.selection import Selection, block_lists, kept_mass, query_grid
from pallas_kernels import query_blocks


def select(q, k, *, sparsity, text, block_size, k_max, kv_lengths=None,
           sm_scale=None, query_block_size=None, query_text=None) -> Selection:
  """Vertical-slash block lists for q, k [B, S, H, D]; text numpy bool [nK]; k_max static;
  query_block_size (None: block_size) and query_text numpy bool [nQ] (None: text) for
  query blocks larger than key blocks."""
  b, s, h, _ = q.shape
  n_k = text.size
  qbs, n_q, query_text = query_grid(s, block_size, query_block_size, query_text, text)
  vid = np.flatnonzero(~text)
  vid_rows = np.flatnonzero(~query_text)
  kb = blocks.video_budget(sparsity, vid.size)
  if vid_rows.size == 0:  # no video query block: every row is a dense text row
    indices, counts = block_lists(jnp.zeros((b, h, n_q, 0), jnp.int32),
                                  jnp.zeros((b, h, n_q), jnp.int32), text, k_max, query_text)
    return Selection(indices=indices, counts=counts, recall=jnp.ones((b, h), jnp.float32),
                     sparsity=jnp.zeros((b, h), jnp.float32))

  last = int(vid_rows[-1])
  rows = np.arange(last * qbs, min((last + 1) * qbs, s))
  p = probe.probabilities(q, k, rows, kv_lengths=kv_lengths, sm_scale=sm_scale)  # [B,H,R,S]
  video_key = jnp.asarray(~text)[jnp.arange(s) // block_size]
  p_video = jnp.where(video_key, p, 0.0)
  vertical = probe.key_blocks(p_video.sum(2), block_size)                        # [B, H, nK]
  offset = jnp.abs(jnp.arange(s)[None, :] - jnp.asarray(rows)[:, None])          # [R, S]
  distance = (2 * offset + block_size) // (2 * block_size)                        # <= nK
  slash = jnp.zeros((b, h, n_k + 1), jnp.float32).at[:, :, distance].add(p_video)
  gap = jnp.abs(jnp.arange(n_k)[None, :] - jnp.arange(n_k)[:, None])             # [nK, nK]
  score = vertical[:, :, None, :] + slash[:, :, gap]                              # [B,H,nK,nK]
  score = query_blocks.coarsen_mass(score, seq=s, block_size=block_size,
                                    query_block_size=qbs)                         # [B,H,nQ,nK]
  _, pos = jax.lax.top_k(score[..., vid], kb)                                     # ties: lower id
  ids = jnp.asarray(vid, jnp.int32)[pos]
  indices, counts = block_lists(ids, jnp.full((b, h, n_q), kb, jnp.int32), text, k_max,
                                query_text)

  probed = probe.key_blocks(p.sum(2), block_size)[:, :, None, :]                 # [B,H,1,nK]
  kept = kept_mass(probed, indices[:, :, last:last + 1], counts[:, :, last:last + 1])[..., 0]
  total = probed.sum((-1, -2))
  recall = jnp.where(total > 0, kept / jnp.where(total > 0, total, 1.0), 1.0)
  return Selection(indices=indices, counts=counts, recall=recall.astype(jnp.float32),
                   sparsity=jnp.full((b, h), 1.0 - kb / vid.size, jnp.float32))
