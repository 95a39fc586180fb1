"""The AdaSpa attention entry point: one call replaces a DiT's self/joint attention."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

import pallas_kernels as pk
from adaspa_jax import policies, schedule
from adaspa_jax.config import AdaSpaConfig
from adaspa_jax.layout import BlockLayout
from adaspa_jax.selection import Selection
from adaspa_jax.state import AdaSpaState, check_state, layout_for
from pallas_kernels import validation


def _with_selection(state: AdaSpaState, sel: Selection, lse=None) -> AdaSpaState:
  return AdaSpaState(indices=sel.indices, counts=sel.counts,
                     lse=state.lse if lse is None else lse,
                     recall=sel.recall, sparsity=sel.sparsity)


def check_step(step, config: AdaSpaConfig) -> None:
  """ValueError for a concrete step outside [0, config.num_steps) or not an integer;
  a traced step is checked only under ``config.debug_checks`` (checkify)."""
  if isinstance(step, jax.core.Tracer):
    if config.debug_checks:
      checkify.check((step >= 0) & (step < config.num_steps),
                     f"step={{}}: expected 0 <= step < num_steps={config.num_steps}.", step)
    return
  value = np.asarray(step)
  if value.shape or not np.issubdtype(value.dtype, np.integer):
    raise ValueError(f"step={step!r}: expected an int or an int32 scalar.")
  if not 0 <= int(value) < config.num_steps:
    raise ValueError(f"step={int(value)}: expected 0 <= step < num_steps={config.num_steps}.")


def adaspa_attention(q, k, v, state: AdaSpaState, step, config: AdaSpaConfig, *,
                     text_blocks=None, kv_lengths=None, layout: BlockLayout | None = None,
                     sm_scale=None, implementation=None, interpret=False, head_axis=None):
  """AdaSpa attention at denoising step ``step``.

  Search steps choose block lists with ``config.policy`` (``adaspa_jax.policies``);
  every policy shares this schedule and these kernels. "svg" and "minference" run
  their fused-search step as plain dense attention unless ``measure_recall`` asks
  for the exact block mass (which also caches the LSE).

  Args:
    q, k, v: [B, S, H, D] (one sequence: self or joint text+video attention); with
      a padded ``layout``, [B, layout.padded_len, H, D].
    state: this layer's ``AdaSpaState`` (from ``init_state`` or the previous step).
    step: 0-indexed denoising step; a Python int or a traced int32 scalar (the
      call then compiles every phase and switches at run time, as in a scan).
    config: ``AdaSpaConfig`` (static).
    text_blocks: static bool [nK] (``text_blocks_mask``) or None when no text.
    kv_lengths: optional int [B] valid tokens (padded text at the end); with a
      padded layout, None means ``layout.seq_len`` for every row.
    layout: the call's ``BlockLayout`` (built once per model call), instead of
      ``text_blocks``; None builds the unpadded layout of q's length here.
    sm_scale: softmax scale, default 1/sqrt(D).
    implementation: kernel implementation; None uses ``config.implementation``
      (None there: the fastest for the device).
    interpret: run Pallas kernels in interpret mode (CPU tests).
    head_axis: inside ``shard_map`` with the heads split over this mesh axis
      (``adaspa_jax.parallel``), its name, so the head tiers rank all heads.

  Returns:
    out [B, S, H, D] (S: q's length, padded rows zero) in q's dtype and the new state.
  """
  if not isinstance(config, AdaSpaConfig):
    raise ValueError(f"config={config!r}: expected an AdaSpaConfig.")
  check_step(step, config)
  b, s, h, _ = validation.check_qkv(q, k, v)
  if layout is None:
    layout = BlockLayout.create(s, config.block_size, text_blocks=text_blocks,
                                query_block_size=config.query_block_size)
  else:
    layout = layout_for(config, None, text_blocks=text_blocks, layout=layout)
    if s != layout.padded_len:
      raise ValueError(f"q has shape {tuple(q.shape)}: expected layout.padded_len="
                       f"{layout.padded_len} tokens.")
  check_state(state, b, h, layout)
  text, query_text = layout.text_blocks, layout.query_text_blocks
  k_max = state.indices.shape[-1]
  policies.check(config, text, k_max)
  impl = config.implementation if implementation is None else implementation
  # Lengths count real tokens: at most layout.seq_len, also in a padded layout.
  validation.check_kv_lengths(kv_lengths, b, layout.seq_len)
  if config.debug_checks and kv_lengths is not None:
    validation.debug_checks(kv_lengths=kv_lengths, seq=layout.seq_len)
  kv_lengths = layout.kv_lengths(kv_lengths, b)
  kernel_kw = dict(block_size=config.block_size, query_block_size=layout.query_block_size,
                   kv_lengths=kv_lengths, sm_scale=sm_scale, implementation=impl,
                   interpret=interpret, debug_checks=config.debug_checks)
  with_mass = policies.needs_mass(config)

  def choose(mass, exact_mass):
    # Policies that probe q, k, v themselves see the real tokens only.
    sel = policies.select(config, *(layout.real(x) for x in (q, k, v)), mass=mass, text=text,
                          k_max=k_max, kv_lengths=kv_lengths, sm_scale=sm_scale,
                          head_axis=head_axis, query_text=query_text)
    if config.measure_recall:
      sel = policies.with_exact_recall(sel, exact_mass(), text, query_text)
    return sel

  def fresh_mass():  # exact block mass (fresh LSE), for measure_recall at a cached search
    return layout.real_mass(pk.attention_with_block_mass(q, k, v, **kernel_kw)[2])

  def sparse_with(st):
    return pk.block_sparse_attention(q, k, v, *layout.kernel_lists(st.indices, st.counts),
                                     return_lse=False, precision=config.precision, **kernel_kw)

  def dense(st):
    # None: cuDNN where it runs (FP8: else the device's FP8 kernel, all rows dense).
    dense_impl = "reference" if impl == "reference" else None
    out = pk.dense_attention(q, k, v, kv_lengths=kv_lengths, sm_scale=sm_scale,
                             debug_checks=config.debug_checks, implementation=dense_impl,
                             precision=config.precision, block_size=config.block_size,
                             interpret=interpret)
    return out, st

  def fused_search(st):
    if not (with_mass or config.measure_recall):  # svg/minference: no map needed
      out, _ = dense(st)
      return out, _with_selection(st, choose(None, None))
    out, lse, mass = pk.attention_with_block_mass(q, k, v, **kernel_kw)
    lse, mass = layout.real_lse(lse), layout.real_mass(mass)
    # Only the first search's LSE is cached (without the cache, later fused
    # searches leave it as it was).
    lse = jnp.where(jnp.asarray(step) == config.first_search, lse, st.lse)
    return out, _with_selection(st, choose(mass, lambda: mass), lse)

  def cached_search(st):
    mass = None
    if with_mass:
      mass = layout.real_mass(pk.block_mass(q, k, layout.kernel_lse(st.lse), **kernel_kw))
    new = _with_selection(st, choose(mass, fresh_mass))
    return sparse_with(new), new

  def sparse(st):
    return sparse_with(st), st

  branches = (dense, fused_search, cached_search, sparse)
  if isinstance(step, numbers.Integral):
    # A concrete step compiles only its own phase.
    return branches[schedule.phase(int(step), config)](state)
  return jax.lax.switch(schedule.phase(step, config), branches, state)
