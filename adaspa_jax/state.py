"""The per-layer AdaSpa state carried from one denoising step to the next."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from adaspa_jax import policies
from adaspa_jax.config import AdaSpaConfig
from adaspa_jax.layout import BlockLayout


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdaSpaState:
  """Sparse indices and cached LSE of one attention layer (a pytree).

  A stack of layers carries the same fields with a leading [L] axis.

  Attributes:
    indices: int32 [B, H, nQ, K_max] key blocks per query block (see ``Selection``);
      nQ = ceil(S / query_block_size) (``BlockLayout.num_query_blocks``).
    counts: int32 [B, H, nQ] entries read per row (nK = dense row).
    lse: float32 [B, H, S] natural-log LSE cached at the first search step.
    recall: float32 [B, H] mass kept by the current selection (for inspection).
    sparsity: float32 [B, H] video-block sparsity of the current selection.
  """

  indices: jax.Array
  counts: jax.Array
  lse: jax.Array
  recall: jax.Array
  sparsity: jax.Array


def layout_for(config: AdaSpaConfig, seq_len: int, *, text_blocks=None,
               layout: BlockLayout | None = None) -> BlockLayout:
  """``layout`` checked against ``config`` and ``seq_len``, or the unpadded layout of
  ``seq_len`` tokens with ``text_blocks`` when None."""
  if layout is None:
    return BlockLayout.create(seq_len, config.block_size, text_blocks=text_blocks,
                              query_block_size=config.query_block_size)
  if not isinstance(layout, BlockLayout):
    raise ValueError(f"layout={layout!r}: expected an adaspa_jax.layout.BlockLayout.")
  if text_blocks is not None:
    raise ValueError("text_blocks and layout both given: expected one of them (the layout "
                     "holds the text blocks).")
  if layout.block_size != config.block_size:
    raise ValueError(f"layout.block_size={layout.block_size}: expected config.block_size="
                     f"{config.block_size}.")
  if layout.query_block_size != config.effective_query_block_size:
    raise ValueError(f"layout.query_block_size={layout.query_block_size}: expected "
                     f"config.query_block_size={config.effective_query_block_size} (build "
                     "the layout with BlockLayout.create(..., query_block_size=...)).")
  if seq_len is not None and seq_len != layout.seq_len:
    raise ValueError(f"seq_len={seq_len!r}: expected layout.seq_len={layout.seq_len}.")
  return layout


def k_max_for(config: AdaSpaConfig, seq_len: int, text_blocks=None, *,
              layout: BlockLayout | None = None) -> int:
  """Width of the index lists for ``config.policy`` (nK for "topp")."""
  layout = layout_for(config, seq_len, text_blocks=text_blocks, layout=layout)
  return policies.required_k_max(config, layout.text_blocks)


def state_shapes(config: AdaSpaConfig, batch: int, seq_len: int, heads: int, *,
                 text_blocks=None, num_layers: int | None = None,
                 layout: BlockLayout | None = None) -> AdaSpaState:
  """The state's shapes and dtypes as ``jax.ShapeDtypeStruct`` leaves."""
  layout = layout_for(config, seq_len, text_blocks=text_blocks, layout=layout)
  n_q = layout.num_query_blocks
  k_max = policies.required_k_max(config, layout.text_blocks)
  lead = () if num_layers is None else (num_layers,)
  spec = lambda *shape, dtype: jax.ShapeDtypeStruct(lead + shape, dtype)
  return AdaSpaState(
      indices=spec(batch, heads, n_q, k_max, dtype=jnp.int32),
      counts=spec(batch, heads, n_q, dtype=jnp.int32),
      lse=spec(batch, heads, layout.seq_len, dtype=jnp.float32),
      recall=spec(batch, heads, dtype=jnp.float32),
      sparsity=spec(batch, heads, dtype=jnp.float32))


def init_state(config: AdaSpaConfig, batch: int, seq_len: int, heads: int, *,
               text_blocks=None, num_layers: int | None = None,
               layout: BlockLayout | None = None) -> AdaSpaState:
  """A state whose rows are all dense, so a sparse step before any search is exact.

  Args:
    config: the AdaSpa config (block size, sparsity and policy fix K_max).
    batch, seq_len, heads: the attention's B, S, H (S: real tokens, no padding).
    text_blocks: static bool [nK] or None.
    num_layers: if given, every field gets a leading [num_layers] axis.
    layout: the call's ``BlockLayout`` instead of ``text_blocks`` (its ``seq_len``
      must be ``seq_len``).
  """
  for name, value in (("batch", batch), ("seq_len", seq_len), ("heads", heads)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name}={value!r}: expected a positive int.")
  layout = layout_for(config, seq_len, text_blocks=text_blocks, layout=layout)
  shapes = state_shapes(config, batch, seq_len, heads, num_layers=num_layers, layout=layout)
  n_blk = layout.num_blocks  # key blocks: a count of nK marks a dense row
  k_max = shapes.indices.shape[-1]
  return AdaSpaState(
      indices=jnp.broadcast_to(jnp.minimum(jnp.arange(k_max, dtype=jnp.int32), n_blk - 1),
                               shapes.indices.shape),
      counts=jnp.full(shapes.counts.shape, n_blk, jnp.int32),
      lse=jnp.zeros(shapes.lse.shape, jnp.float32),
      recall=jnp.ones(shapes.recall.shape, jnp.float32),
      sparsity=jnp.zeros(shapes.sparsity.shape, jnp.float32))


def state_nbytes(config: AdaSpaConfig, batch: int, seq_len: int, heads: int, *,
                 text_blocks=None, num_layers: int | None = None,
                 layout: BlockLayout | None = None) -> int:
  """Bytes the state occupies on device (e.g. to check it fits beside a model)."""
  shapes = state_shapes(config, batch, seq_len, heads, text_blocks=text_blocks,
                        num_layers=num_layers, layout=layout)
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(shapes))


def check_state(state: AdaSpaState, batch: int, heads: int, layout: BlockLayout):
  """``ValueError`` unless ``state`` is one layer's state for [B, S, H] in ``layout``."""
  n_q, seq_len = layout.num_query_blocks, layout.seq_len
  want = {"indices": (batch, heads, n_q), "counts": (batch, heads, n_q),
          "lse": (batch, heads, seq_len), "recall": (batch, heads)}
  for name, lead in want.items():
    got = getattr(state, name).shape
    if got[:len(lead)] != lead:
      raise ValueError(
          f"state.{name} has shape {got}: expected leading dims {lead} for q of "
          f"[B={batch}, S={seq_len}, H={heads}] at block_size={layout.block_size}, "
          f"query_block_size={layout.query_block_size} (for a stack of layers, pass one "
          "layer's slice).")
