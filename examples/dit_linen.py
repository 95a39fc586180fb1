"""A small joint-attention DiT in Flax linen, blocks under ``nn.scan``, sampler a lax.scan.

Switching it to AdaSpa is the line marked ``ATTENTION`` in ``Block.__call__``. Shapes as
in ``dit_nnx``: video tokens x [B, N, C_in], padded text [B, T, C_text] with
``text_lengths`` [B], joint sequence [video; text].
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from adaspa_jax import AdaSpaConfig
from adaspa_jax.linen import COLLECTION, AdaSpaAttention


class DenseAttention(nn.Module):
  """The attention line before AdaSpa."""

  @nn.compact
  def __call__(self, q, k, v, step, *, kv_lengths=None):
    del step
    out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=kv_lengths)
    rows = jnp.arange(q.shape[1])[None, :, None, None] < kv_lengths[:, None, None, None]
    return jnp.where(rows, out, 0)


class Block(nn.Module):
  dim: int
  heads: int
  text_span: tuple[int, int]
  adaspa: AdaSpaConfig | None = None

  @nn.compact
  def __call__(self, x, inputs):
    temb, step, lengths = inputs
    b, s, d = x.shape
    shift, scale = jnp.split(nn.Dense(2 * d)(nn.silu(temb))[:, None], 2, axis=-1)
    h = nn.LayerNorm()(x) * (1 + scale) + shift
    q, k, v = jnp.split(nn.Dense(3 * d)(h).reshape(b, s, 3 * self.heads, d // self.heads), 3,
                        axis=2)
    # ATTENTION: the one line that picks dense attention or AdaSpa.
    attend = (DenseAttention() if self.adaspa is None
              else AdaSpaAttention(self.adaspa, text_span=self.text_span))
    x = x + nn.Dense(d)(attend(q, k, v, step, kv_lengths=lengths).reshape(b, s, d))
    h = nn.Dense(d)(nn.gelu(nn.Dense(4 * d)(nn.LayerNorm()(x))))
    return x + h, None


class DiT(nn.Module):
  channels: int = 4
  dim: int = 64
  heads: int = 2
  depth: int = 2
  text_span: tuple[int, int] = (0, 0)
  adaspa: Any = None

  @nn.compact
  def __call__(self, x, t, text, text_lengths, step):
    n = x.shape[1]
    freqs = jnp.exp(-jnp.log(1e4) * jnp.arange(self.dim // 2) / (self.dim // 2))
    temb = nn.Dense(self.dim)(jnp.concatenate([jnp.sin(t[:, None] * freqs),
                                               jnp.cos(t[:, None] * freqs)], axis=-1))
    h = jnp.concatenate([nn.Dense(self.dim)(x), nn.Dense(self.dim)(text)], axis=1)
    blocks = nn.scan(Block, variable_axes={"params": 0, COLLECTION: 0},
                     split_rngs={"params": True}, in_axes=nn.broadcast, length=self.depth)
    h, _ = blocks(self.dim, self.heads, self.text_span, self.adaspa)(
        h, (temb, step, n + text_lengths))
    return nn.Dense(self.channels)(h[:, :n])


def sample(model: DiT, variables, noise, text, text_lengths, null, null_lengths, *,
           num_steps: int, guidance: float = 4.0):
  """Euler steps of a rectified-flow sampler under ``jax.lax.scan``, guidance on
  [uncond; cond]; the "adaspa" collection is carried through the scan.

  Returns (x, velocities [num_steps, B, N, C], final variables).
  """
  b = noise.shape[0]
  sigmas = jnp.linspace(1.0, 0.0, num_steps + 1)
  both_text = jnp.concatenate([null, text])
  both_lengths = jnp.concatenate([null_lengths, text_lengths])
  params = {k: v for k, v in variables.items() if k != COLLECTION}

  def step(carry, i):
    x, state = carry
    t = jnp.full((2 * b,), 1000.0 * sigmas[i])
    v, updates = model.apply({**params, **state}, jnp.concatenate([x, x]), t, both_text,
                             both_lengths, i, mutable=[COLLECTION])
    v = v[:b] + guidance * (v[b:] - v[:b])
    return (x + (sigmas[i + 1] - sigmas[i]) * v, updates), v

  state = {k: v for k, v in variables.items() if k == COLLECTION}
  (x, state), velocities = jax.jit(lambda c: jax.lax.scan(step, c, jnp.arange(num_steps)))(
      (noise, state))
  return x, velocities, {**params, **state}
