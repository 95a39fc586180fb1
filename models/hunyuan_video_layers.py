"""HunyuanVideo building blocks that are not transformer blocks.

Conditioning embeddings, the 3D rotary embedding, the text token refiner and
small shared layers of ``adaspa_jax.models.hunyuan_video``. Attribute names follow
diffusers' ``transformer_hunyuan_video.py`` so the weight table stays short.
Activations are [batch, tokens, channels]; attention runs on
[batch, seq, heads, head_dim].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels as pk
from adaspa_jax.models import layers

LN_EPS = 1e-6
TIME_CHANNELS = 256  # width of the sinusoidal timestep/guidance features

# LayerNorm without affine parameters, statistics in float32.
layer_norm = functools.partial(layers.layer_norm, eps=LN_EPS)


def linear(din, dout, rngs, dtype):
  return nnx.Linear(din, dout, dtype=dtype, param_dtype=dtype, rngs=rngs)


def modulate(x, shift, scale):
  """x [B, N, C] * (1 + scale [B, C]) + shift [B, C]."""
  return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedding(layers.TimestepEmbedding):
  """diffusers' Timesteps(256, flip_sin_to_cos=True, shift 0) + TimestepEmbedding on t [B]."""

  def __init__(self, dim, *, rngs, dtype):
    super().__init__(TIME_CHANNELS, dim, rngs=rngs, dtype=dtype)

  def __call__(self, t):
    features = layers.timestep_embedding(t, TIME_CHANNELS, flip_sin_to_cos=True,
                                         downscale_freq_shift=0.0)
    return super().__call__(features.astype(self.linear_1.param_dtype))


class TextProjection(nnx.Module):
  """diffusers' PixArtAlphaTextProjection with SiLU: linear_1 -> SiLU -> linear_2."""

  def __init__(self, din, dim, *, rngs, dtype):
    self.linear_1 = linear(din, dim, rngs, dtype)
    self.linear_2 = linear(dim, dim, rngs, dtype)

  def __call__(self, x):
    return self.linear_2(jax.nn.silu(self.linear_1(x)))


class ActLinear(nnx.Module):
  """First half of a feed-forward: ``proj`` then an activation (diffusers' net.0)."""

  def __init__(self, din, dout, activation, *, rngs, dtype):
    self.proj = linear(din, dout, rngs, dtype)
    self.activation = activation

  def __call__(self, x):
    return self.activation(self.proj(x))


def gelu_tanh(x):
  return jax.nn.gelu(x, approximate=True)


class FeedForward(nnx.Module):
  """diffusers' FeedForward: ``net_0`` (projection + activation) then ``net_2``."""

  def __init__(self, dim, mult, activation, *, rngs, dtype):
    inner = int(dim * mult)
    self.net_0 = ActLinear(dim, inner, activation, rngs=rngs, dtype=dtype)
    self.net_2 = linear(inner, dim, rngs, dtype)

  def __call__(self, x):
    return self.net_2(self.net_0(x))


# --- 3D rotary embedding ------------------------------------------------------------


def rope_tables(frames, height, width, axes_dim, theta):
  """cos, sin float32 [frames*height*width, sum(axes_dim)] for video tokens in (f, h, w) order.

  Each axis d_i contributes d_i / 2 frequencies theta^(-2j/d_i), each repeated
  twice so that it rotates one (even, odd) channel pair. Computed in the trace
  (not numpy constants): at 720p x 129 frames the tables would be ~120 MB of HLO
  constants.
  """
  sizes = (frames, height, width)
  cos, sin = [], []
  for axis, dim in enumerate(axes_dim):
    shape = [1, 1, 1]
    shape[axis] = sizes[axis]
    pos = jnp.broadcast_to(jnp.arange(sizes[axis], dtype=jnp.float32).reshape(shape), sizes)
    inv = 1.0 / (jnp.float32(theta) ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    angles = pos.reshape(-1, 1) * inv[None, :]
    cos.append(jnp.repeat(jnp.cos(angles), 2, axis=1))
    sin.append(jnp.repeat(jnp.sin(angles), 2, axis=1))
  return jnp.concatenate(cos, axis=1), jnp.concatenate(sin, axis=1)


def apply_rope(x, cos, sin):
  """Rotates channel pairs (2i, 2i+1) of x [B, N, H, D] by cos, sin [N, D]; float32 math."""
  xf = x.astype(jnp.float32)
  pairs = xf.reshape(*x.shape[:-1], -1, 2)
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  return (xf * cos[None, :, None] + rotated * sin[None, :, None]).astype(x.dtype)


# --- text token refiner -------------------------------------------------------------


class RefinerAttention(nnx.Module):
  """Plain multi-head self-attention over text tokens (no QK norm, no RoPE)."""

  def __init__(self, dim, heads, *, rngs, dtype):
    self.heads = heads
    self.to_q = linear(dim, dim, rngs, dtype)
    self.to_k = linear(dim, dim, rngs, dtype)
    self.to_v = linear(dim, dim, rngs, dtype)
    self.to_out = linear(dim, dim, rngs, dtype)

  def __call__(self, x, lengths):
    b, n, c = x.shape
    split = lambda t: t.reshape(b, n, self.heads, c // self.heads)
    # XLA, not cuDNN: over <= 256 text tokens the kernel costs nothing, and under a
    # sequence-parallel mesh the partitioner may hand this call sharded text, which
    # XLA's attention partitions and cuDNN's custom partitioning rejects.
    out = pk.dense_attention(split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x)),
                             kv_lengths=lengths, implementation="xla")
    return self.to_out(out.reshape(b, n, c))


class AdaGate(nnx.Module):
  """diffusers' HunyuanVideoAdaNorm: SiLU -> linear -> (gate_msa, gate_mlp), each [B, C]."""

  def __init__(self, dim, *, rngs, dtype):
    self.linear = linear(dim, 2 * dim, rngs, dtype)

  def __call__(self, temb):
    return jnp.split(self.linear(jax.nn.silu(temb)), 2, axis=-1)


class RefinerBlock(nnx.Module):
  """diffusers' HunyuanVideoIndividualTokenRefinerBlock."""

  def __init__(self, dim, heads, mlp_ratio, *, rngs, dtype):
    ln = lambda: nnx.LayerNorm(dim, epsilon=LN_EPS, use_fast_variance=False, dtype=dtype,
                               param_dtype=dtype, rngs=rngs)
    self.norm1 = ln()
    self.attn = RefinerAttention(dim, heads, rngs=rngs, dtype=dtype)
    self.norm2 = ln()
    self.ff = FeedForward(dim, mlp_ratio, jax.nn.silu, rngs=rngs, dtype=dtype)
    self.norm_out = AdaGate(dim, rngs=rngs, dtype=dtype)

  def __call__(self, x, temb, lengths):
    gate_msa, gate_mlp = self.norm_out(temb)
    x = x + self.attn(self.norm1(x), lengths) * gate_msa[:, None]
    return x + self.ff(self.norm2(x)) * gate_mlp[:, None]


class RefinerTimeTextEmbed(nnx.Module):
  """diffusers' CombinedTimestepTextProjEmbeddings: timestep + pooled-text embedding."""

  def __init__(self, dim, text_dim, *, rngs, dtype):
    self.timestep_embedder = TimestepEmbedding(dim, rngs=rngs, dtype=dtype)
    self.text_embedder = TextProjection(text_dim, dim, rngs=rngs, dtype=dtype)

  def __call__(self, t, pooled):
    return self.timestep_embedder(t) + self.text_embedder(pooled)


def stacked(make, num, rngs):
  """``num`` modules from ``make(rngs)``, parameters stacked on a leading axis; None if 0."""
  return layers.stack_layers(make, num, rngs) if num else None


def scan_layers(blocks, body, carry, xs=None):
  """``layers.scan_layers``; with no blocks, returns the carry unchanged and ys = xs."""
  if blocks is None:
    return carry, xs
  return layers.scan_layers(blocks, body, carry, xs)


class TokenRefiner(nnx.Module):
  """diffusers' HunyuanVideoTokenRefiner: projects and refines the text tokens.

  Padded text tokens (``encoder_attention_mask`` 0) are excluded from the
  pooled text feature and, as keys, from the refiner's attention. The mask is
  read as a prefix of valid tokens (as diffusers' joint attention reads it, by
  its sum); padded rows come out of attention as zeros (diffusers' let them
  attend to the first token); no valid token depends on them.
  """

  def __init__(self, text_dim, dim, heads, num_layers, mlp_ratio, *, rngs, dtype):
    self.time_text_embed = RefinerTimeTextEmbed(dim, text_dim, rngs=rngs, dtype=dtype)
    self.proj_in = linear(text_dim, dim, rngs, dtype)
    self.refiner_blocks = stacked(
        lambda r: RefinerBlock(dim, heads, mlp_ratio, rngs=r, dtype=dtype), num_layers, rngs)

  def __call__(self, x, t, mask):
    """x [B, Nt, text_dim], t [B], mask [B, Nt] (1 = valid) -> [B, Nt, dim]."""
    maskf = mask.astype(jnp.float32)[..., None]
    # A row without valid tokens pools to zeros instead of diffusers' 0/0 = NaN.
    pooled = ((x.astype(jnp.float32) * maskf).sum(1)
              / jnp.maximum(maskf.sum(1), 1.0)).astype(x.dtype)
    temb = self.time_text_embed(t, pooled)
    lengths = mask.astype(jnp.int32).sum(1)
    x = self.proj_in(x)
    x, _ = scan_layers(self.refiner_blocks, lambda blk, h, _: (blk(h, temb, lengths), None), x)
    return x
