"""AdaSpa as a Flax NNX module: a one-line swap for a DiT's attention.

A DiT's self/joint attention computes q, k, v [B, S, H, D] and calls an attention
function; ``AdaSpaAttention`` is that function with AdaSpa's state inside, as a
decoder's attention keeps its KV cache:

  self.attn_fn = AdaSpaAttention(AdaSpaConfig())        # in the layer's __init__
  ...
  out = self.attn_fn(q, k, v, step=step)                # was jax.nn.dot_product_attention

Before sampling, ``init_cache(batch, seq_len, heads, text_span=...)`` (or
``init_caches(model, ...)`` for every such module of a model) allocates the
state: block lists, counts and the cached LSE in an ``AdaSpaCache`` variable.
Each call runs the phase of ``step`` (dense warm-up, fused search, cached
search or sparse; ``adaspa_jax.schedule``) and writes the new state back, so
under ``nnx.jit``, ``nnx.scan`` over stacked layers, ``nnx.remat`` or a
denoising loop over ``nnx.split`` / ``nnx.merge`` the state travels as any
other variable. ``step`` may be a traced int32 (a scanned sampler compiles one
program for all phases) or a Python int (one phase compiled).

What stays the caller's: the denoising step counter, the text span (where the
text tokens sit: a prefix or a suffix of the sequence), per-example valid
lengths (``kv_lengths``, padded text at the end), and classifier-free guidance
(a batch of 2B rows gets a cache of 2B rows: each branch keeps its own lists).

Stacked layers: a model that stacks its layers (``nnx.vmap`` at construction,
``nnx.scan`` over them) calls ``init_cache(..., num_layers=L)``, which gives
every state leaf a leading [L] axis that the scan splits like the parameters.

Padding: a model that pads its sequence once per call (``adaspa_jax.layout``)
gives ``init_cache(..., layout=BlockLayout.create(seq_len, block_size,
text_span=..., pad=True))`` and calls the module with q, k, v of
``layout.padded_len`` tokens; the state keeps the real layout. A caller that
carries the state itself (our models' functional ``adaspa_state=`` argument)
hands it over with ``load_state(state, layout)`` and reads ``state`` back.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from adaspa_jax import parallel
from adaspa_jax.config import AdaSpaConfig
from adaspa_jax.layout import BlockLayout
from adaspa_jax.parallel import SequenceParallel
from adaspa_jax.state import AdaSpaState, check_state, init_state


class AdaSpaCache(nnx.Variable):
  """The ``AdaSpaState`` of one attention layer (or a stack of them)."""


class AdaSpaAttention(nnx.Module):
  """AdaSpa attention with its state: ``out = module(q, k, v, step=step)``.

  Args:
    config: the ``AdaSpaConfig`` (static).
    sequence_parallel: run head-parallel (Ulysses) over the caller's mesh axis
      (``adaspa_jax.parallel.SequenceParallel(mesh, axis)``), or None.
    implementation, interpret: kernel implementation (None: the config's, else the
      fastest for the device) and Pallas interpret mode (CPU tests).
  """

  def __init__(self, config: AdaSpaConfig, *, sequence_parallel: SequenceParallel | None = None,
               implementation: str | None = None, interpret: bool = False):
    if not isinstance(config, AdaSpaConfig):
      raise ValueError(f"config={config!r}: expected an adaspa_jax.AdaSpaConfig.")
    if sequence_parallel is not None and not isinstance(sequence_parallel, SequenceParallel):
      raise ValueError(f"sequence_parallel={sequence_parallel!r}: expected None or an "
                       "adaspa_jax.parallel.SequenceParallel.")
    self.config = config
    self.sequence_parallel = sequence_parallel
    self.implementation = implementation
    self.interpret = interpret
    # The static block layout of the cached state (``init_cache`` / ``load_state``).
    self.layout: BlockLayout | None = None
    self.cache: AdaSpaCache | None = nnx.data(None)

  @property
  def text_span(self) -> tuple[int, int]:
    """(start, length) of the text tokens of the cached state ((0, 0): none)."""
    return (0, 0) if self.layout is None else self.layout.text_tokens

  def init_cache(self, batch: int, seq_len: int, heads: int, *, text_span=None,
                 num_layers: int | None = None, layout: BlockLayout | None = None) -> None:
    """Allocates a fresh state (every row dense until the first search).

    Args:
      batch: rows of q (2B with classifier-free guidance batched as [uncond; cond]).
      seq_len: S, text and video tokens together.
      heads: H.
      text_span: (start, length) of the text tokens, a prefix (start 0) or a suffix
        (start + length = seq_len), or None; AdaSpa keeps text blocks dense.
      num_layers: for a module inside stacked layers, their count L (every state
        leaf gets a leading [L] axis).
      layout: the ``BlockLayout`` instead of ``text_span`` (e.g. a padded one: q, k,
        v then come with ``layout.padded_len`` tokens); its seq_len must be seq_len.
    """
    if layout is None:
      layout = BlockLayout.create(seq_len, self.config.block_size, text_span=text_span,
                                  query_block_size=self.config.query_block_size)
    else:
      layout = parallel.call_layout(layout, text_span, layout.padded_len,
                                    self.config.block_size, self.config.query_block_size)
    make = lambda: init_state(self.config, batch, seq_len, heads, num_layers=num_layers,
                              layout=layout)
    if self.sequence_parallel is None:
      state = make()
    else:
      lo, hi = layout.video_tokens
      parallel.check_divisible(self.sequence_parallel, heads=heads, tokens=hi - lo,
                               seq_len=seq_len)
      shapes = jax.eval_shape(make)
      state = jax.jit(make, out_shardings=parallel.state_sharding(self.sequence_parallel,
                                                                  shapes))()
    self.load_state(state, layout)

  def load_state(self, state: AdaSpaState, layout: BlockLayout) -> None:
    """Sets the cached state (one layer's, or [L, ...] for stacked layers) and its
    layout, e.g. a state carried outside the module by a functional caller."""
    if not isinstance(state, AdaSpaState):
      raise ValueError(f"state={type(state).__name__}: expected an AdaSpaState.")
    if (not isinstance(layout, BlockLayout) or layout.block_size != self.config.block_size
        or layout.query_block_size != self.config.effective_query_block_size):
      raise ValueError(f"layout={layout!r}: expected a BlockLayout with block_size="
                       f"{self.config.block_size} and query_block_size="
                       f"{self.config.effective_query_block_size}.")
    lead = state.recall.ndim - 2   # 1 for stacked layers
    one_layer = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[lead:], x.dtype), state)
    check_state(one_layer, state.recall.shape[-2], state.recall.shape[-1], layout)
    self.layout = layout
    self.cache = nnx.data(AdaSpaCache(state))
  @property
  def state(self) -> AdaSpaState:
    """The current state (``ValueError`` before ``init_cache``)."""
    if self.cache is None:
      raise ValueError("AdaSpaAttention has no state: call init_cache(batch, seq_len, heads, "
                       "text_span=...) before the first call.")
    return self.cache.get_value()

  def __call__(self, q, k, v, *, step, kv_lengths=None, sm_scale=None):
    """AdaSpa attention at denoising step ``step``; updates the cache.

    Args:
      q, k, v: [B, S, H, D] as for ``jax.nn.dot_product_attention`` (S =
        ``layout.padded_len`` for a padded layout).
      step: 0-indexed denoising step (Python int or traced int32 scalar).
      kv_lengths: optional int [B]: valid tokens per row (padding at the end).
      sm_scale: softmax scale, default 1/sqrt(D).

    Returns:
      out [B, S, H, D] in q's dtype.
    """
    out, new = parallel.adaspa_attention(
        q, k, v, self.state, step, self.config, sequence_parallel=self.sequence_parallel,
        layout=self.layout, kv_lengths=kv_lengths, sm_scale=sm_scale,
        implementation=self.implementation, interpret=self.interpret)
    self.cache.set_value(new)
    return out


def modules(model: Any) -> list[AdaSpaAttention]:
  """Every ``AdaSpaAttention`` inside ``model`` (graph order)."""
  return [node for _, node in nnx.iter_graph(model) if isinstance(node, AdaSpaAttention)]


def init_caches(model: Any, batch: int, seq_len: int, heads: int, *, text_span=None,
                num_layers: int | None = None) -> int:
  """``init_cache`` on every ``AdaSpaAttention`` of ``model``; returns how many.

  All of them must attend over the same (batch, seq_len, heads, text span): a model
  whose layers differ calls ``init_cache`` per module instead.
  """
  found = modules(model)
  if not found:
    raise ValueError(f"model {type(model).__name__}: has no AdaSpaAttention module.")
  for m in found:
    m.init_cache(batch, seq_len, heads, text_span=text_span, num_layers=num_layers)
  return len(found)
