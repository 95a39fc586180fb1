"""AdaSpa state threaded through a 50-step lax.scan over several layers."""

import jax
import jax.numpy as jnp
import numpy as np

from adaspa_jax import (AdaSpaConfig, adaspa_attention, init_state, phase, phase_table,
                        text_blocks_mask)
from adaspa_jax.schedule import CACHED_SEARCH, DENSE, FUSED_SEARCH, SPARSE
from pallas_kernels import reference

LAYERS, B, S, H, D = 3, 1, 72, 2, 32
TEXT = text_blocks_mask(S, 16, 64, 8)


def _run(cfg):
  base = jax.random.normal(jax.random.key(0), (LAYERS, 3, B, S, H, D))
  drift = jax.random.normal(jax.random.key(1), (LAYERS, 3, B, S, H, D))

  def step_fn(states, step):
    # Inputs drift with the step, as a DiT's activations do across denoising.
    qkv = base + (step / cfg.num_steps) * 3.0 * drift

    def layer(_, xs):
      (q, k, v), st = (xs[0][0], xs[0][1], xs[0][2]), xs[1]
      out, new = adaspa_attention(q, k, v, st, step, cfg, text_blocks=TEXT)
      dense, _ = reference.attention(q, k, v)
      return None, (new, jnp.abs(out - dense).max())

    _, (states, err) = jax.lax.scan(layer, None, (qkv, states))
    return states, (phase(step, cfg), states.indices, states.counts, states.lse, err)

  states = init_state(cfg, B, S, H, text_blocks=TEXT, num_layers=LAYERS)
  run = jax.jit(lambda st: jax.lax.scan(step_fn, st, jnp.arange(cfg.num_steps)))
  return run(states)


def test_fifty_step_scan_phases_and_state():
  cfg = AdaSpaConfig(sparsity=0.6, block_size=16, num_steps=50, search_steps=(9, 29))
  _, (phases, indices, counts, lse, err) = _run(cfg)
  phases, indices, counts, lse = map(np.asarray, (phases, indices, counts, lse))
  want = np.full(50, SPARSE)
  want[:9], want[9], want[29] = DENSE, FUSED_SEARCH, CACHED_SEARCH
  np.testing.assert_array_equal(phases, want)
  np.testing.assert_array_equal(phases, phase_table(cfg))

  def changed(x):
    return [t for t in range(1, 50) if not np.array_equal(x[t], x[t - 1])]

  assert changed(indices) == [9, 29]         # indices move only at search steps
  assert changed(lse) == [9]                  # the LSE is cached once, at the first search
  assert np.all(counts[:9] == counts[0])      # untouched state before the first search
  err = np.asarray(err)
  assert err[:10].max() < 1e-5                # warm-up and fused search are exact
  assert err[10:].max() > 1e-3                # sparse steps really are sparse


def test_all_blocks_scan_equals_dense():
  cfg = AdaSpaConfig(sparsity=0.0, block_size=16, num_steps=50, search_steps=(9, 29))
  _, (_, _, counts, _, err) = _run(cfg)
  assert np.asarray(err).max() < 1e-5
  assert np.all(np.asarray(counts) == -(-S // 16))  # every row keeps every block
