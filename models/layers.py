"""Small pieces shared by the video DiTs, each matching a diffusers building block.

* ``timestep_embedding``: diffusers' ``get_timestep_embedding`` (sinusoidal).
* ``FeedForward``: diffusers' ``FeedForward`` with ``gelu`` / ``gelu-approximate``
  (also ``PixArtAlphaTextProjection`` with gelu-tanh).
* ``TimestepEmbedding``: diffusers' ``TimestepEmbedding`` (linear, SiLU, linear).
* ``layer_norm`` / ``LayerNorm``: layer norm computed in float32 (diffusers'
  ``FP32LayerNorm``; also right for plain ``nn.LayerNorm`` in float32).
* ``rms_norm``: RMS norm in float32, cast back (``torch.nn.RMSNorm``).
* ``attention``: softmax attention for different query and key lengths
  (cross-attention); cuDNN on GPU for 16-bit inputs, XLA otherwise.
* ``stack_layers`` / ``scan_layers``: create repeated blocks with parameters
  stacked on a leading layer axis, and run them with ``jax.lax.scan``.

Arrays are [batch, seq, features] or [batch, seq, heads, head_dim].
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx


def timestep_embedding(timesteps, dim: int, *, flip_sin_to_cos: bool = False,
                       downscale_freq_shift: float = 1.0, scale: float = 1.0,
                       max_period: float = 10000.0):
  """Sinusoidal embedding of (possibly fractional) timesteps.

  Args:
    timesteps: [N] numbers.
    dim: embedding width; odd widths get a zero last column.
  Returns:
    float32 [N, dim]: [sin, cos] halves ([cos, sin] with ``flip_sin_to_cos``).
  """
  timesteps = jnp.asarray(timesteps)
  if timesteps.ndim != 1:
    raise ValueError(f"timesteps has shape {timesteps.shape}: expected [N].")
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
  freqs = jnp.exp(exponent / (half - downscale_freq_shift))
  angles = scale * timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def layer_norm(x, eps: float, scale=None, bias=None):
  """Layer norm over the last axis in float32; result in x's dtype.

  Two-pass variance (mean of squared deviations), as torch computes it.
  """
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
  y = (xf - mean) * jax.lax.rsqrt(var + eps)
  if scale is not None:
    y = y * scale.astype(jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(x.dtype)


def rms_norm(x, eps: float, scale=None):
  """RMS norm over the last axis in float32; result in x's dtype."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
  if scale is not None:
    y = y * scale.astype(jnp.float32)
  return y.astype(x.dtype)


class LayerNorm(nnx.Module):
  """Float32 layer norm with optional affine parameters ``scale`` and ``bias``.

  Parameters are float32 whatever the model dtype (diffusers keeps its
  ``FP32LayerNorm`` weights in float32).
  """

  def __init__(self, dim: int, eps: float, *, affine: bool = True):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32)) if affine else None
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32)) if affine else None

  def __call__(self, x):
    if self.scale is None:
      return layer_norm(x, self.eps)
    return layer_norm(x, self.eps, self.scale[...], self.bias[...])


class RMSNorm(nnx.Module):
  """RMS norm with a learned ``scale`` (``torch.nn.RMSNorm``)."""

  def __init__(self, dim: int, eps: float, *, dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), dtype))

  def __call__(self, x):
    return rms_norm(x, self.eps, self.scale[...])


class FeedForward(nnx.Module):
  """Linear -> GELU -> Linear (diffusers ``FeedForward``, ``net.0.proj`` / ``net.2``).

  ``approximate=True`` is diffusers' "gelu-approximate" (tanh GELU).
  """

  def __init__(self, dim: int, inner_dim: int, dim_out: int | None = None, *,
               approximate: bool = True, rngs: nnx.Rngs, dtype=jnp.float32):
    self.approximate = approximate
    self.proj_in = nnx.Linear(dim, inner_dim, rngs=rngs, dtype=dtype, param_dtype=dtype)
    self.proj_out = nnx.Linear(inner_dim, dim_out or dim, rngs=rngs, dtype=dtype,
                               param_dtype=dtype)

  def __call__(self, x):
    return self.proj_out(jax.nn.gelu(self.proj_in(x), approximate=self.approximate))


class TimestepEmbedding(nnx.Module):
  """Linear -> SiLU -> Linear (diffusers ``TimestepEmbedding``, ``linear_1`` / ``linear_2``)."""

  def __init__(self, in_dim: int, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.linear_1 = nnx.Linear(in_dim, dim, rngs=rngs, dtype=dtype, param_dtype=dtype)
    self.linear_2 = nnx.Linear(dim, dim, rngs=rngs, dtype=dtype, param_dtype=dtype)

  def __call__(self, x):
    return self.linear_2(jax.nn.silu(self.linear_1(x)))


def _on_gpu() -> bool:
  return jax.devices()[0].platform == "gpu"


def attention(q, k, v, *, kv_lengths=None, sm_scale=None):
  """Softmax attention where queries and keys may differ in length.

  Args:
    q: [B, Sq, H, D]; k, v: [B, Sk, H, D].
    kv_lengths: int [B] valid keys per batch element, or None (all valid).
  Returns:
    [B, Sq, H, D] in q's dtype.
  """
  if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[::2] != k.shape[::2] \
      or q.shape[3] != k.shape[3]:
    raise ValueError(f"q, k, v have shapes {q.shape}, {k.shape}, {v.shape}: expected "
                     "[B, Sq, H, D], [B, Sk, H, D], [B, Sk, H, D].")
  implementation = "cudnn" if _on_gpu() and q.dtype != jnp.float32 else "xla"
  scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
  return jax.nn.dot_product_attention(
      q, k, v, scale=scale, key_value_seq_lengths=kv_lengths, implementation=implementation)


def stack_layers(make: Callable[[nnx.Rngs], nnx.Module], num_layers: int,
                 rngs: nnx.Rngs) -> nnx.Module:
  """Creates ``num_layers`` copies of ``make(rngs)`` as one module.

  Every parameter gets a leading [num_layers] axis; each layer draws its own
  random keys. Works under ``nnx.eval_shape``.
  """

  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(layer_rngs):
    return make(layer_rngs)

  return create(rngs)


def scan_layers(layers: nnx.Module, fn: Callable, carry, xs=None):
  """Runs stacked layers in order with ``jax.lax.scan``.

  Args:
    layers: a module from ``stack_layers`` (parameters [L, ...]).
    fn: ``fn(layer, carry, x) -> (carry, y)`` for one layer (its parameters
      without the layer axis); it must not mutate the layer.
    carry: initial carry (e.g. hidden states).
    xs: per-layer inputs, each leaf with a leading [L] axis (e.g. one AdaSpa
      state per layer), or None.
  Returns:
    (final carry, ys stacked on a leading [L] axis).
  """
  graphdef, state = nnx.split(layers)

  def body(c, inputs):
    layer_state, x = inputs
    return fn(nnx.merge(graphdef, layer_state), c, x)

  return jax.lax.scan(body, carry, (state, xs))


def check_attention_fields(config) -> None:
  """Checks the attention fields every model config shares (attention, adaspa,
  sequence_parallel); raises ValueError naming the field."""
  from adaspa_jax import AdaSpaConfig  # pylint: disable=import-outside-toplevel
  from adaspa_jax.parallel import SequenceParallel  # pylint: disable=import-outside-toplevel
  if config.attention not in ("dense", "adaspa"):
    raise ValueError(f"attention={config.attention!r}: expected 'dense' or 'adaspa'.")
  if not isinstance(config.adaspa, AdaSpaConfig):
    raise ValueError(f"adaspa={config.adaspa!r}: expected an adaspa_jax.AdaSpaConfig.")
  sp = config.sequence_parallel
  if sp is not None and not isinstance(sp, SequenceParallel):
    raise ValueError(f"sequence_parallel={sp!r}: expected None or an "
                     "adaspa_jax.parallel.SequenceParallel.")
