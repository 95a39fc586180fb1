"""How a search step chooses block lists: AdaSpa and the baselines it is compared with.

Every policy returns a ``Selection`` in the same format (ascending lists padded with
the last id, text blocks kept, text query rows dense), so the schedule, the state
and the kernels are shared; only the choice of video key blocks differs:

* "adaspa": row-wise top-k of exact block mass with the head tiers (``selection``).
* "topp": the same block mass (fused search; cached LSE at later searches); each
  video row keeps the fewest video blocks, highest mass first (ties: lower id), whose
  mass reaches ``top_p`` of the row's video mass, at least one. ``top_p = 1`` keeps
  exactly the blocks of nonzero mass. Counts vary per row, so the lists are nK wide:
  the state holds nK ids per row instead of the tiered budget plus text blocks
  (``state_nbytes`` at HunyuanVideo scale, 60 layers x 24 heads x 118,784 tokens,
  block 64, batch 1: 19.1 GiB against 6.2 GiB for "adaspa" at s = 0.8).
* "svg": Sparse VideoGen spatial/temporal patterns (``adaspa_jax.svg``).
* "minference": vertical-slash from the last video block (``adaspa_jax.minference``).

"svg" and "minference" keep ``video_budget(sparsity, n_video)`` video blocks per row
(AdaSpa's budget without tiers) and never compute the whole map.

Query blocks larger than key blocks (``AdaSpaConfig.query_block_size``): every policy
chooses one list per query block over key blocks, and a query block holding any text
token is dense. "adaspa" and "topp" rank the coarse block mass (the sum of the fine
rows'); "svg" places a query block at its centre token (its frame and in-frame
position) against the key blocks' centres; "minference" probes the last video query
block's rows and scores a query block by the sum of its key-block-sized parts'
vertical + slash scores.

Recall (``Selection.recall``): with ``config.measure_recall`` every search replaces it
with the exact share kept (``recall_of`` on block mass from a fresh LSE). Without it,
"adaspa"/"topp" report the share of the mass they selected from (exact at a fused
search, from the cached LSE at a cached search); "svg" and "minference" their own
estimate from the rows they probe.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from adaspa_jax import blocks, minference, svg
from adaspa_jax.config import POLICIES, AdaSpaConfig
from adaspa_jax.selection import (Selection, block_lists, query_text_rows, recall_of,
                                  select_blocks)

__all__ = ["POLICIES", "check", "needs_mass", "required_k_max", "select", "topp_blocks",
           "with_exact_recall"]


def needs_mass(config: AdaSpaConfig) -> bool:
  """Whether the policy selects from the block mass (fused search / cached LSE)."""
  return config.policy in ("adaspa", "topp")


def required_k_max(config: AdaSpaConfig, text: np.ndarray) -> int:
  """Index-list width the policy needs for a sequence with text blocks ``text`` [nK]."""
  if config.policy == "topp":
    return text.size
  tiers = config.head_adaptive and config.policy == "adaspa"
  return blocks.required_k_max(config.sparsity, text, tiers)


def check(config: AdaSpaConfig, text: np.ndarray, k_max: int) -> None:
  """Call-time requirements of the policy: fields presets leave unset (frame_tokens)
  and a state whose lists are wide enough (``k_max``) for text blocks ``text`` [nK]."""
  if config.policy == "svg" and config.frame_tokens is None:
    raise ValueError("frame_tokens=None: policy 'svg' needs the tokens per latent frame "
                     "(e.g. latent height x width / patch area).")
  need = required_k_max(config, text)
  if k_max < need:
    raise ValueError(f"state.indices has K_max={k_max}: expected at least {need} for policy "
                     f"{config.policy!r} (build the state with init_state(config, ...)).")


def topp_blocks(mass, *, top_p: float, text: np.ndarray, k_max: int,
                query_text: np.ndarray | None = None) -> Selection:
  """Cumulative-mass lists from block mass [B, H, nQ, nK]; see the module docstring.
  query_text: numpy bool [nQ] text query rows (None: ``text``, square blocks)."""
  b, h, n_q, n_k = mass.shape
  query_text = query_text_rows(query_text, text, n_q)
  mass = mass.astype(jnp.float32)
  vid = np.flatnonzero(~text)
  if vid.size:
    vals, pos = jax.lax.top_k(mass[..., vid], vid.size)               # ties: lower id first
    ids = jnp.asarray(vid, jnp.int32)[pos]
    if top_p >= 1.0:  # exact: rounding in the running sum cannot drop a small block
      k_rows = jnp.maximum(1, (vals > 0).sum(-1))
    else:
      csum = jnp.cumsum(vals, axis=-1)
      k_rows = 1 + (csum[..., :-1] < top_p * csum[..., -1:]).sum(-1)
  else:
    ids = jnp.zeros((b, h, n_q, 0), jnp.int32)
    k_rows = jnp.zeros((b, h, n_q), jnp.int32)
  k_rows = k_rows.astype(jnp.int32)
  indices, counts = block_lists(ids, k_rows, text, k_max, query_text)
  # Mean over the video query rows of the share of video key blocks kept.
  n_video_rows = int((~query_text).sum())
  kept_share = ((k_rows * jnp.asarray(~query_text, jnp.float32)).sum(-1)
                / max(1, n_video_rows * vid.size))
  return Selection(indices=indices, counts=counts,
                   recall=recall_of(mass, indices, counts, text, query_text),
                   sparsity=jnp.where(vid.size > 0, 1.0 - kept_share, 0.0).astype(jnp.float32))


def select(config: AdaSpaConfig, q, k, v, *, mass, text: np.ndarray, k_max: int,
           kv_lengths=None, sm_scale=None, head_axis=None,
           query_text: np.ndarray | None = None) -> Selection:
  """The policy's selection for q, k, v [B, S, H, D].

  mass: float32 [B, H, nQ, nK] block mass for "adaspa"/"topp" (None for the others),
  nQ at ``config.effective_query_block_size``.
  text: numpy bool [nK]; k_max: the state's list width; head_axis: see
  ``selection.head_budgets`` (only "adaspa" ranks heads; the others are per head);
  query_text: numpy bool [nQ], the text query rows (None: ``text``, square blocks).
  """
  check(config, text, k_max)
  if config.policy == "adaspa":
    return select_blocks(mass, sparsity=config.sparsity, text_blocks=text,
                         head_adaptive=config.head_adaptive,
                         recall_threshold=config.recall_threshold, k_max=k_max,
                         head_axis=head_axis, query_text=query_text)
  if config.policy == "topp":
    return topp_blocks(mass, top_p=config.top_p, text=text, k_max=k_max,
                       query_text=query_text)
  kw = dict(sparsity=config.sparsity, text=text, block_size=config.block_size, k_max=k_max,
            kv_lengths=kv_lengths, sm_scale=sm_scale,
            query_block_size=config.effective_query_block_size, query_text=query_text)
  if config.policy == "svg":
    return svg.select(q, k, v, frame_tokens=config.frame_tokens, **kw)
  return minference.select(q, k, **kw)


def with_exact_recall(sel: Selection, mass, text: np.ndarray,
                      query_text: np.ndarray | None = None) -> Selection:
  """``sel`` with its recall measured on exact block mass [B, H, nQ, nK]
  (query_text: as in ``select``)."""
  return Selection(indices=sel.indices, counts=sel.counts,
                   recall=recall_of(mass, sel.indices, sel.counts, text, query_text),
                   sparsity=sel.sparsity)
