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
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from adaspa_jax import blocks, parallel
from adaspa_jax.config import AdaSpaConfig
from adaspa_jax.parallel import SequenceParallel
from adaspa_jax.state import AdaSpaState, init_state


# Flax >= 0.12 tells data attributes from static ones at assignment; ``nnx.data`` marks
# the cache slot as data while it is still None.
_data = getattr(nnx, "data", lambda x: x)


class AdaSpaCache(nnx.Variable):
  """The ``AdaSpaState`` of one attention layer (or a stack of them)."""


def text_span_of(text_span, seq_len: int) -> tuple[int, int]:
  """(start, length) of the text tokens, checked: a prefix, a suffix, or (0, 0) for none."""
  if text_span is None:
    return 0, 0
  if (not isinstance(text_span, (tuple, list)) or len(text_span) != 2
      or not all(isinstance(x, int) and not isinstance(x, bool) for x in text_span)):
    raise ValueError(f"text_span={text_span!r}: expected None or (start, length) ints.")
  return parallel.text_layout(text_span, seq_len)


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
    self.text_span: tuple[int, int] = (0, 0)
    self.cache: AdaSpaCache | None = _data(None)

  def init_cache(self, batch: int, seq_len: int, heads: int, *, text_span=None,
                 num_layers: int | None = None) -> None:
    """Allocates a fresh state (every row dense until the first search).

    Args:
      batch: rows of q (2B with classifier-free guidance batched as [uncond; cond]).
      seq_len: S, text and video tokens together.
      heads: H.
      text_span: (start, length) of the text tokens, a prefix (start 0) or a suffix
        (start + length = seq_len), or None; AdaSpa keeps text blocks dense.
      num_layers: for a module inside stacked layers, their count L (every state
        leaf gets a leading [L] axis).
    """
    start, length = text_span_of(text_span, seq_len)
    mask = (blocks.text_blocks_mask(seq_len, self.config.block_size, start, length)
            if length else None)
    make = lambda: init_state(self.config, batch, seq_len, heads, text_blocks=mask,
                              num_layers=num_layers)
    if self.sequence_parallel is None:
      state = make()
    else:
      parallel.check_divisible(self.sequence_parallel, heads=heads, tokens=seq_len - length,
                               seq_len=seq_len)
      shapes = jax.eval_shape(make)
      state = jax.jit(make, out_shardings=parallel.state_sharding(self.sequence_parallel,
                                                                  shapes))()
    self.text_span = (start, length)
    self.cache = _data(AdaSpaCache(state))

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
      q, k, v: [B, S, H, D] as for ``jax.nn.dot_product_attention``.
      step: 0-indexed denoising step (Python int or traced int32 scalar).
      kv_lengths: optional int [B]: valid tokens per row (padding at the end).
      sm_scale: softmax scale, default 1/sqrt(D).

    Returns:
      out [B, S, H, D] in q's dtype.
    """
    out, new = parallel.adaspa_attention(
        q, k, v, self.state, step, self.config, sequence_parallel=self.sequence_parallel,
        text_span=self.text_span if self.text_span[1] else None, kv_lengths=kv_lengths,
        sm_scale=sm_scale, implementation=self.implementation, interpret=self.interpret)
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
