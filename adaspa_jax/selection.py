"""Row-wise top-k block selection with the text sink and the head-adaptive hierarchy.

The algorithm (paper Section 4, with the resolutions in our paper notes):

1. Video key blocks are the blocks not in ``text_blocks``. Each query row keeps
   the k video blocks of highest mass (ties: lower block id) plus every text
   block; text query rows keep every key block (dense rows, count = nK).
2. A head's recall is the mass it keeps over the total mass of its video query rows.
Query blocks may be larger than key blocks (``AdaSpaConfig.query_block_size``, e.g.
128 x 64): the mass is then [B, H, nQ, nK] over coarse query rows, each row keeps
its top-k video key blocks, and ``query_text`` [nQ] marks the dense (text) rows; a
query block holding any text token is one. Budgets and tiers count key blocks.

3. Head-adaptive: per batch element, with recall measured at the base sparsity s,
   n = #heads with recall > threshold (at most floor(H/2)); the n heads of highest
   recall get sparsity (1+s)/2, the n lowest (3s-1)/2, the rest s (below s = 1/3 the
   low tier clamps at 0 and the high tier is 2s; see ``blocks.tier_sparsities``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from adaspa_jax import blocks


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Selection:
  """A block selection.

  Attributes:
    indices: int32 [B, H, nQ, K_max], ascending per row; slots past the count
      repeat the row's last id (safe for kernels that prefetch).
    counts: int32 [B, H, nQ]; nK for text query rows (dense rows).
    recall: float32 [B, H], mass kept / total mass over video query rows.
    sparsity: float32 [B, H], 1 - (video blocks kept / video blocks) per row.
  """

  indices: jax.Array
  counts: jax.Array
  recall: jax.Array
  sparsity: jax.Array


def head_budgets(base_recall, sparsity, num_video_blocks, head_adaptive, recall_threshold,
                 head_axis=None):
  """int32 [B, H] video blocks per row for every head, from recall at base sparsity.

  With ``head_axis`` (a mesh axis name, inside ``shard_map``) the H heads given
  are this device's slice of all heads, in axis order: the tiers rank every
  head, so the recalls are gathered over the axis and this slice's budgets kept.
  """
  if head_axis is not None and head_adaptive:
    h_local = base_recall.shape[1]
    full = jax.lax.all_gather(base_recall, head_axis, axis=1, tiled=True)
    k_full = head_budgets(full, sparsity, num_video_blocks, head_adaptive, recall_threshold)
    start = jax.lax.axis_index(head_axis) * h_local
    return jax.lax.dynamic_slice_in_dim(k_full, start, h_local, axis=1)
  b, h = base_recall.shape
  hi_s, base_s, lo_s = blocks.tier_sparsities(sparsity)
  k_base = blocks.video_budget(base_s, num_video_blocks)
  if not head_adaptive:
    return jnp.full((b, h), k_base, jnp.int32)
  k_hi = blocks.video_budget(hi_s, num_video_blocks)
  k_lo = blocks.video_budget(lo_s, num_video_blocks)
  n = jnp.minimum((base_recall > recall_threshold).sum(-1), h // 2)  # [B]
  order = jnp.argsort(-base_recall, axis=-1, stable=True)            # best head first
  rank = jnp.argsort(order, axis=-1, stable=True)                     # rank of each head
  n = n[:, None]
  return jnp.where(rank < n, k_hi, jnp.where(rank >= h - n, k_lo, k_base)).astype(jnp.int32)


def query_text_rows(query_text, text: np.ndarray, num_query_blocks: int) -> np.ndarray:
  """numpy bool [nQ]: the text (dense) query rows. ``query_text`` as given (static bool
  [nQ]), or, when None, ``text`` itself, which needs nQ == nK (square blocks)."""
  if query_text is None:
    if num_query_blocks != text.size:
      raise ValueError(
          f"query_text=None with {num_query_blocks} query blocks and {text.size} key "
          "blocks: expected query_text, a static bool [nQ] of the query blocks holding "
          "text (BlockLayout.query_text_blocks), when the block counts differ.")
    return text
  return blocks.static_text_blocks(query_text, num_query_blocks, what="query block")


def query_grid(seq_len: int, block_size: int, query_block_size, query_text, text):
  """(rows per query block, nQ, numpy bool [nQ] text query rows) of a ``seq_len``-token
  call; ``query_block_size`` None means ``block_size``; ``query_text`` as in
  ``query_text_rows``."""
  qbs = block_size if query_block_size is None else query_block_size
  n_q = -(-seq_len // qbs)
  return qbs, n_q, query_text_rows(query_text, text, n_q)


def block_lists(ids, k_rows, text, k_max, query_text=None):
  """Index lists in the kernels' format from ranked video blocks.

  Args:
    ids: int32 [B, H, nQ, top] video key block ids, best first (any leading
      dims that broadcast to [B, H]).
    k_rows: int32 [B, H, nQ] how many of them each row keeps (<= top).
    text: numpy bool [nK]; every row also keeps every text block.
    k_max: static width of the lists, at least top + the number of text blocks
      for the rows that keep the most.
    query_text: numpy bool [nQ], the text query rows, which are dense; None: ``text``
      (square blocks).

  Returns:
    indices int32 [B, H, nQ, k_max] (ascending, slots past the count repeat the
    last id) and counts int32 [B, H, nQ] (nK for text query rows).
  """
  b, h, n_q = k_rows.shape
  n_k = text.size
  query_text = query_text_rows(query_text, text, n_q)
  text_ids = np.flatnonzero(text)
  top = ids.shape[-1]
  ids = jnp.broadcast_to(ids, (b, h, n_q, top))
  chosen = jnp.where(jnp.arange(top) < k_rows[..., None], ids, n_k)  # n_k sorts last
  chosen = jnp.concatenate(
      [chosen, jnp.broadcast_to(jnp.asarray(text_ids, jnp.int32), (b, h, n_q, text_ids.size))],
      axis=-1)
  chosen = jnp.sort(chosen, axis=-1)
  width = chosen.shape[-1]
  if width < k_max:
    chosen = jnp.concatenate([chosen, jnp.full((b, h, n_q, k_max - width), n_k, jnp.int32)], -1)
  chosen = chosen[..., :k_max]
  counts = k_rows + text_ids.size
  last = jnp.take_along_axis(chosen, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
  indices = jnp.where(jnp.arange(k_max) < counts[..., None], chosen, last)
  counts = jnp.where(jnp.asarray(query_text)[None, None, :], n_k, counts).astype(jnp.int32)
  return indices.astype(jnp.int32), counts


def kept_mass(mass, indices, counts):
  """float32 [B, H, nQ]: the mass of the blocks each row's list reads.

  mass [B, H, nQ, nK]; indices [B, H, nQ, K_max] distinct within the count;
  counts [B, H, nQ] (>= nK: the whole row).
  """
  read = jnp.arange(indices.shape[-1]) < counts[..., None]
  listed = jnp.where(read, jnp.take_along_axis(mass, indices, axis=-1), 0.0).sum(-1)
  return jnp.where(counts >= mass.shape[-1], mass.sum(-1), listed)


def recall_of(mass, indices, counts, text, query_text=None):
  """float32 [B, H]: mass the lists keep over the total, over video query rows
  (1 where a head has no mass); text numpy bool [nK], query_text [nQ] (None: text)."""
  video_rows = jnp.asarray(~query_text_rows(query_text, text, mass.shape[2]), jnp.float32)
  mass = mass.astype(jnp.float32)
  kept = (kept_mass(mass, indices, counts) * video_rows).sum(-1)
  total = (mass.sum(-1) * video_rows).sum(-1)
  return jnp.where(total > 0, kept / jnp.where(total > 0, total, 1.0), 1.0).astype(jnp.float32)


def select_blocks(mass, *, sparsity, text_blocks=None, head_adaptive=True,
                  recall_threshold=0.8, k_max=None, head_axis=None,
                  query_text=None) -> Selection:
  """Chooses key blocks per (batch, head, query block) from block masses.

  Args:
    mass: float32 [B, H, nQ, nK] softmax mass per block (``block_mass``); nQ == nK
      unless ``query_text`` is given.
    sparsity: base sparsity s in [0, 1) (static).
    text_blocks: static bool [nK] or None; a block holding any text token is text.
    query_text: static bool [nQ], the query blocks holding text (dense rows), for
      query blocks larger than key blocks; None: ``text_blocks`` (nQ == nK).
    head_adaptive: use the three-tier head hierarchy.
    recall_threshold: recall above which a head counts toward n.
    k_max: static width of the index lists; default and minimum is the lowest
      tier's budget plus the number of text blocks.
    head_axis: mesh axis the heads are split over (inside ``shard_map``), or None;
      see ``head_budgets``.

  Returns:
    A ``Selection``.
  """
  if getattr(mass, "ndim", None) != 4 or (query_text is None and mass.shape[2] != mass.shape[3]):
    raise ValueError(
        f"mass has shape {getattr(mass, 'shape', None)}: expected [batch, heads, nQ, nK] "
        "with nQ == nK (self-attention blocks), or query_text [nQ] for larger query blocks.")
  if not 0.0 <= sparsity < 1.0:
    raise ValueError(f"sparsity={sparsity!r}: expected a float in [0, 1).")
  b, h, n_q, n_k = mass.shape
  text = blocks.static_text_blocks(text_blocks, n_k)
  query_text = query_text_rows(query_text, text, n_q)
  need = blocks.required_k_max(sparsity, text, head_adaptive)
  if k_max is None:
    k_max = need
  if k_max < need:
    raise ValueError(
        f"k_max={k_max}: expected at least {need} (lowest tier's video budget plus "
        f"{int(text.sum())} text blocks).")
  mass = mass.astype(jnp.float32)
  video_ids = np.flatnonzero(~text)
  text_ids = np.flatnonzero(text)
  n_video = video_ids.size
  top = max(blocks.video_budget(s, n_video) for s in blocks.tier_sparsities(sparsity))

  video_rows = jnp.asarray(~query_text, jnp.float32)               # [nQ]
  row_total = mass.sum(-1)                                          # [B, H, nQ]
  text_mass = mass[..., text_ids].sum(-1)
  total = (row_total * video_rows).sum(-1)                          # [B, H]
  if top:
    vals, pos = jax.lax.top_k(mass[..., video_ids], top)            # ties: lower id first
    ids = jnp.asarray(video_ids, jnp.int32)[pos]
  else:
    vals = jnp.zeros((b, h, n_q, 0), jnp.float32)
    ids = jnp.zeros((b, h, n_q, 0), jnp.int32)
  # kept_prefix[..., k] = video mass kept by the top k blocks of the row.
  kept_prefix = jnp.concatenate([jnp.zeros_like(vals[..., :1]), jnp.cumsum(vals, -1)], -1)

  def recall_at(k):  # k: int32 [B, H] video blocks per row
    k_rows = jnp.broadcast_to(k[..., None, None], (b, h, n_q, 1))
    kept = text_mass + jnp.take_along_axis(kept_prefix, k_rows, axis=-1)[..., 0]
    kept = (kept * video_rows).sum(-1)
    return jnp.where(total > 0, kept / jnp.where(total > 0, total, 1.0), 1.0)

  k_base = jnp.full((b, h), blocks.video_budget(sparsity, n_video), jnp.int32)
  k_head = head_budgets(recall_at(k_base), sparsity, n_video, head_adaptive, recall_threshold,
                        head_axis)

  indices, counts = block_lists(ids, jnp.broadcast_to(k_head[..., None], (b, h, n_q)), text,
                                k_max, query_text)
  sparsity_h = (1.0 - k_head / n_video) if n_video else jnp.zeros((b, h))
  return Selection(indices=indices, counts=counts,
                   recall=recall_at(k_head).astype(jnp.float32),
                   sparsity=jnp.asarray(sparsity_h, jnp.float32))
