"""Which kind of attention each denoising step runs.

Phases (paper Section 4, 0-indexed steps):
  DENSE          steps before the first search (warm-up);
  FUSED_SEARCH   the first search step (exact dense output + LSE + block mass),
                 and every later search when the LSE cache is off;
  CACHED_SEARCH  later search steps with the LSE cache: block mass from the cached
                 LSE (one QK^T pass), new selection, sparse attention;
  SPARSE         every other step after the first search, with carried indices.
"""

from __future__ import annotations

import numbers

import jax.numpy as jnp
import numpy as np

from adaspa_jax.config import AdaSpaConfig

DENSE, FUSED_SEARCH, CACHED_SEARCH, SPARSE = 0, 1, 2, 3
PHASE_NAMES = ("dense", "fused_search", "cached_search", "sparse")


def phase(step, config: AdaSpaConfig):
  """Phase of ``step``: a Python int for an int step (usable inside any trace),
  else an int32 scalar computed from the traced step."""
  first = config.first_search
  later_phase = CACHED_SEARCH if config.lse_cache else FUSED_SEARCH
  if isinstance(step, numbers.Integral):
    if step < first:
      return DENSE
    if step == first:
      return FUSED_SEARCH
    return later_phase if step in config.search_steps else SPARSE
  later = jnp.zeros((), bool)
  for t in config.search_steps[1:]:
    later = later | (step == t)
  return jnp.where(step < first, DENSE,
                   jnp.where(step == first, FUSED_SEARCH,
                             jnp.where(later, later_phase, SPARSE))).astype(jnp.int32)


def phase_table(config: AdaSpaConfig) -> np.ndarray:
  """int32 [num_steps]: the phase of every step, for inspection and plots."""
  return np.asarray([phase(t, config) for t in range(config.num_steps)], np.int32)


def describe(config: AdaSpaConfig) -> str:
  """One line per run of equal phases, e.g. 'steps 0-8: dense'."""
  table = phase_table(config)
  lines, start = [], 0
  for t in range(1, len(table) + 1):
    if t == len(table) or table[t] != table[start]:
      span = f"{start}" if t - 1 == start else f"{start}-{t - 1}"
      lines.append(f"steps {span}: {PHASE_NAMES[table[start]]}")
      start = t
  return "\n".join(lines)
