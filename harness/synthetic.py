"""Synthetic video-DiT attention inputs with the structure AdaSpa exploits.

Tokens sit on a (frames, height, width) grid followed by a text suffix. Each head
mixes a smooth positional code with noise, and heads differ in what they attend
to: spatial neighbours in the same frame, the same pixel across frames, or
nothing in particular (diffuse heads). This gives the block-diagonal / striped
maps of the paper's Fig. 3 and a spread of per-head recall, so selection and the
head hierarchy have something to work with. Inputs drift with the denoising
step, slowly, as real activations do.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from adaspa_jax import AdaSpaConfig, adaspa_attention, init_state, phase, text_blocks_mask
import pallas_kernels as pk


def _grid_code(frames, height, width, dim, rng):
  """[F*H*W, dim] random Fourier features of (t, y, x), one frequency set per axis."""
  t, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
  pos = np.stack([t.ravel(), y.ravel(), x.ravel()], -1).astype(np.float64)
  freqs = rng.normal(0, 0.6, (3, dim // 2))
  angles = pos @ freqs
  return np.concatenate([np.cos(angles), np.sin(angles)], -1)


def video_qkv(key, *, frames, height, width, text_len, heads, head_dim, step=0,
              num_steps=50, batch=1, dtype=jnp.float32):
  """Returns q, k, v [batch, F*H*W + text_len, heads, head_dim] for denoising ``step``."""
  rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))
  n_video = frames * height * width
  codes = []
  for h in range(heads):
    kind = h % 3
    if kind == 0:    # spatial head: position within the frame matters, time does not
      code = _grid_code(1, height, width, head_dim, rng)
      code = np.tile(code, (frames, 1)) + _grid_code(frames, 1, 1, head_dim, rng).repeat(
          height * width, 0) * 1.5
    elif kind == 1:  # temporal head: the same pixel across frames
      code = _grid_code(1, height, width, head_dim, rng) * 1.5
      code = np.tile(code, (frames, 1))
    else:            # diffuse head
      code = rng.normal(0, 0.3, (n_video, head_dim))
    codes.append(code)
  code = np.stack(codes, 1)  # [n_video, H, D]
  sharp = 2.0 * np.sqrt(head_dim)
  text = rng.normal(0, 1.0, (text_len, heads, head_dim))
  drift = rng.normal(0, 1.0, (3, n_video + text_len, heads, head_dim))
  noise = rng.normal(0, 1.0, (3, batch, n_video + text_len, heads, head_dim))
  t = step / max(1, num_steps)
  out = []
  for i in range(3):
    base = np.concatenate([code * (sharp ** 0.5 if i < 2 else 1.0), text], 0)
    x = base[None] + 0.35 * noise[i] + 0.3 * t * drift[i][None]
    out.append(jnp.asarray(x, dtype))
  return out


def run_schedule(config: AdaSpaConfig, *, frames, height, width, text_len, heads, head_dim, seed=0,
        implementation=None, interpret=False):
  """Runs the schedule; returns per-step dict of numpy arrays and the wall time."""
  seq = frames * height * width + text_len
  text = text_blocks_mask(seq, config.block_size, seq - text_len, text_len) if text_len else None
  key = jax.random.key(seed)
  start = video_qkv(key, frames=frames, height=height, width=width, text_len=text_len,
                              heads=heads, head_dim=head_dim, step=0)
  end = video_qkv(key, frames=frames, height=height, width=width, text_len=text_len,
                            heads=heads, head_dim=head_dim, step=config.num_steps)

  def step_fn(state, step):
    t = step / config.num_steps
    q, k, v = [(1 - t) * a + t * b for a, b in zip(start, end)]
    out, state = adaspa_attention(q, k, v, state, step, config, text_blocks=text,
                                  implementation=implementation, interpret=interpret)
    dense = pk.dense_attention(q, k, v)
    rel = jnp.linalg.norm(out - dense) / jnp.linalg.norm(dense)
    return state, dict(phase=phase(step, config), rel_error=rel, recall=state.recall.mean(),
                       sparsity=state.sparsity.mean(), head_sparsity=state.sparsity[0])

  state = init_state(config, 1, seq, heads, text_blocks=text)
  scan = jax.jit(lambda s: jax.lax.scan(step_fn, s, jnp.arange(config.num_steps)))
  jax.block_until_ready(scan(state))  # compile
  t0 = time.perf_counter()
  _, per_step = jax.block_until_ready(scan(state))
  return jax.tree.map(np.asarray, per_step), time.perf_counter() - t0
