"""A small joint-attention DiT in Flax NNX, as a third-party codebase would write it.

Switching it to AdaSpa is the one line marked ``ATTENTION`` in ``Block.__init__``.
Shapes: video tokens x [B, N, C_in], text embeddings [B, T, C_text] (padded at the end,
``text_lengths`` [B] valid), joint sequence [video; text] of S = N + T tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from adaspa_jax import AdaSpaConfig
from adaspa_jax.nnx import AdaSpaAttention, init_caches


class DenseAttention(nnx.Module):
  """The attention line before AdaSpa: plain softmax attention with masked padding."""

  def __call__(self, q, k, v, *, step, kv_lengths=None):
    del step
    out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=kv_lengths)
    if kv_lengths is None:
      return out
    rows = jnp.arange(q.shape[1])[None, :, None, None] < kv_lengths[:, None, None, None]
    return jnp.where(rows, out, 0)


class Block(nnx.Module):
  def __init__(self, dim: int, heads: int, *, adaspa: AdaSpaConfig | None, rngs: nnx.Rngs):
    self.heads = heads
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.mlp = nnx.Sequential(nnx.Linear(dim, 4 * dim, rngs=rngs), jax.nn.gelu,
                              nnx.Linear(4 * dim, dim, rngs=rngs))
    self.ada = nnx.Linear(dim, 2 * dim, rngs=rngs)
    # ATTENTION: the one line that picks dense attention or AdaSpa.
    self.attend = DenseAttention() if adaspa is None else AdaSpaAttention(adaspa)

  def __call__(self, x, temb, step, lengths):
    b, s, d = x.shape
    shift, scale = jnp.split(self.ada(jax.nn.silu(temb))[:, None], 2, axis=-1)
    h = self.norm1(x) * (1 + scale) + shift
    q, k, v = jnp.split(self.qkv(h).reshape(b, s, 3 * self.heads, d // self.heads), 3, axis=2)
    x = x + self.proj(self.attend(q, k, v, step=step, kv_lengths=lengths).reshape(b, s, d))
    return x + self.mlp(self.norm2(x))


class DiT(nnx.Module):
  """Video tokens + text -> velocity, through a list of joint-attention blocks."""

  def __init__(self, *, channels=4, text_dim=16, dim=64, heads=2, depth=2,
               adaspa: AdaSpaConfig | None = None, rngs: nnx.Rngs):
    self.dim = dim
    self.embed = nnx.Linear(channels, dim, rngs=rngs)
    self.text = nnx.Linear(text_dim, dim, rngs=rngs)
    self.time = nnx.Linear(dim, dim, rngs=rngs)
    self.blocks = nnx.List([Block(dim, heads, adaspa=adaspa, rngs=rngs) for _ in range(depth)])
    self.out = nnx.Linear(dim, channels, rngs=rngs)

  def __call__(self, x, t, text, text_lengths, step):
    n = x.shape[1]
    freqs = jnp.exp(-jnp.log(1e4) * jnp.arange(self.dim // 2) / (self.dim // 2))
    temb = self.time(jnp.concatenate([jnp.sin(t[:, None] * freqs), jnp.cos(t[:, None] * freqs)],
                                     axis=-1))
    h = jnp.concatenate([self.embed(x), self.text(text)], axis=1)
    lengths = n + text_lengths
    for block in self.blocks:
      h = block(h, temb, step, lengths)
    return self.out(h[:, :n])


@nnx.jit
def _guided_velocity(model, x, t, text, text_lengths, null, null_lengths, step, guidance):
  """Classifier-free guidance: one call on [uncond; cond]."""
  b = x.shape[0]
  v = model(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([null, text]),
            jnp.concatenate([null_lengths, text_lengths]), step)
  return v[:b] + guidance * (v[b:] - v[:b])


def sample(model, noise, text, text_lengths, null, null_lengths, *, num_steps: int,
           guidance: float = 4.0):
  """Euler steps of a rectified-flow sampler, sigma 1 -> 0; returns (x, per-step velocities)."""
  sigmas = jnp.linspace(1.0, 0.0, num_steps + 1)
  x, velocities = noise, []
  for i in range(num_steps):
    t = jnp.full((noise.shape[0],), 1000.0 * sigmas[i])
    v = _guided_velocity(model, x, t, text, text_lengths, null, null_lengths, jnp.int32(i),
                         guidance)
    velocities.append(v)
    x = x + (sigmas[i + 1] - sigmas[i]) * v
  return x, velocities


def prepare_adaspa(model, batch: int, video_tokens: int, text_tokens: int, heads: int) -> int:
  """The AdaSpa caches for a guided batch (2 x batch rows), text as a suffix."""
  seq = video_tokens + text_tokens
  return init_caches(model, 2 * batch, seq, heads, text_span=(video_tokens, text_tokens))
