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
* AdaSpa in a model: ``adaspa_module`` (the ``adaspa_jax.nnx.AdaSpaAttention`` a
  self/joint attention layer holds), ``check_adaspa_state`` (the models' and the
  sampler's one check of a given state), ``AttentionContext`` and
  ``self_attention`` (what every layer's self/joint attention needs besides q, k,
  v, computed once per model call: the padded ``BlockLayout``, valid lengths,
  step), ``with_adaspa_state`` (a copy of stacked layers holding a given state).

Arrays are [batch, seq, features] or [batch, seq, heads, head_dim].
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from adaspa_jax import AdaSpaConfig, AdaSpaState, parallel
from adaspa_jax import nnx as adaspa_nnx
from adaspa_jax.layout import BlockLayout
from adaspa_jax.parallel import SequenceParallel


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
    fn: ``fn(layer, carry, x) -> (carry, y)`` for one layer (its variables
      without the layer axis); it may advance the layer's AdaSpa caches
      (``adaspa_jax.nnx.AdaSpaCache``) and nothing else.
    carry: initial carry (e.g. hidden states).
    xs: per-layer inputs, each leaf with a leading [L] axis, or None.
  Returns:
    (final carry, ys stacked on a leading [L] axis). The layers' AdaSpa caches
    hold every layer's new state afterwards, as ``nnx.scan`` leaves them.
  """
  graphdef, state = nnx.split(layers)

  def body(c, inputs):
    layer_state, x = inputs
    layer = nnx.merge(graphdef, layer_state)
    c, y = fn(layer, c, x)
    return c, (y, nnx.state(layer, adaspa_nnx.AdaSpaCache))

  carry, (ys, caches) = jax.lax.scan(body, carry, (state, xs))
  nnx.update(layers, caches)
  return carry, ys


def check_attention_fields(config) -> None:
  """Checks the attention fields every model config shares (attention, adaspa,
  sequence_parallel); raises ValueError naming the field."""
  if config.attention not in ("dense", "adaspa"):
    raise ValueError(f"attention={config.attention!r}: expected 'dense' or 'adaspa'.")
  if not isinstance(config.adaspa, AdaSpaConfig):
    raise ValueError(f"adaspa={config.adaspa!r}: expected an adaspa_jax.AdaSpaConfig.")
  sp = config.sequence_parallel
  if sp is not None and not isinstance(sp, SequenceParallel):
    raise ValueError(f"sequence_parallel={sp!r}: expected None or an "
                     "adaspa_jax.parallel.SequenceParallel.")


def check_adaspa_state(config, adaspa_state, adaspa_step=None, *, num_layers=None,
                       need_step: bool = True) -> bool:
  """Whether a model call runs AdaSpa (a state given); ``ValueError`` for a state the
  model cannot take. The one check of the three models and the sampler.

  Args:
    config: the model's config (``attention``, ``adaspa``).
    adaspa_state: None (dense) or a stacked ``AdaSpaState``.
    adaspa_step: the denoising step that must come with a state (``need_step``).
    num_layers: attention layers the state must stack on its leading axis, or None.
  """
  if adaspa_state is None:
    return False
  attention = getattr(config, "attention", None)
  if attention != "adaspa" or not isinstance(getattr(config, "adaspa", None), AdaSpaConfig):
    raise ValueError(f"adaspa_state given but config.attention={attention!r}: expected "
                     "'adaspa' (a model whose config.attention is not 'adaspa' runs dense; "
                     "build it with attention='adaspa').")
  if not isinstance(adaspa_state, AdaSpaState):
    raise ValueError(f"adaspa_state={type(adaspa_state).__name__}: expected an AdaSpaState.")
  counts = adaspa_state.counts
  if num_layers is not None and (counts.ndim != 4 or counts.shape[0] != num_layers):
    raise ValueError(f"adaspa_state.counts has shape {counts.shape}: expected a leading "
                     f"[{num_layers}] layer axis (the model's init_adaspa_state).")
  if need_step and adaspa_step is None:
    raise ValueError("adaspa_step=None: expected the denoising step (int or int32 scalar) "
                     "with adaspa_state.")
  return True


def adaspa_module(config) -> adaspa_nnx.AdaSpaAttention | None:
  """The AdaSpa attention module of a self/joint attention layer (None unless
  ``config.attention == "adaspa"``). It holds no state until a call gives one."""
  if config.attention != "adaspa":
    return None
  return adaspa_nnx.AdaSpaAttention(config.adaspa, sequence_parallel=config.sequence_parallel)


@dataclasses.dataclass(frozen=True)
class AttentionContext:
  """What every layer's self/joint attention needs besides q, k, v; built once per
  model call.

  Attributes:
    layout: the padded ``BlockLayout`` of the sequence the layers run on.
    kv_lengths: int32 [B] valid tokens (the real ones; padded keys are masked).
    step: int32 scalar denoising step with AdaSpa, None for dense attention.
    sequence_parallel: the config's mesh layout, or None.
  """
  layout: BlockLayout
  kv_lengths: jax.Array
  step: jax.Array | None
  sequence_parallel: SequenceParallel | None

  @classmethod
  def create(cls, config, layout: BlockLayout, batch: int, *, kv_lengths=None,
             adaspa_step=None, use_adaspa: bool = False) -> "AttentionContext":
    """kv_lengths None: every real token valid. The step becomes an int32 scalar: the
    layer scan traces its body, so a Python int would buy no specialisation and every
    layer takes the same ``lax.switch`` over phases."""
    step = jnp.asarray(adaspa_step, jnp.int32) if use_adaspa else None
    return cls(layout=layout, kv_lengths=layout.kv_lengths(kv_lengths, batch), step=step,
               sequence_parallel=config.sequence_parallel)


def self_attention(adaspa: adaspa_nnx.AdaSpaAttention | None, q, k, v, ctx: AttentionContext):
  """A layer's self/joint attention on q, k, v [B, S_pad, H, D]: its AdaSpa module at
  ``ctx.step`` (the state in the module's cache), or dense attention without a step."""
  if ctx.step is None:
    return parallel.dense_attention(q, k, v, sequence_parallel=ctx.sequence_parallel,
                                    layout=ctx.layout, kv_lengths=ctx.kv_lengths)
  return adaspa(q, k, v, step=ctx.step, kv_lengths=ctx.kv_lengths)


def with_adaspa_state(layers: nnx.Module, adaspa_state: AdaSpaState, layout: BlockLayout,
                      sequence_parallel: SequenceParallel | None):
  """(copy of ``layers``, its AdaSpa module) with the module holding ``adaspa_state``.

  The stacked layers hold one ``AdaSpaAttention`` (stacked like their parameters);
  the copy's caches get the given state ([L, ...]) and layout, so a model call
  leaves the model itself unchanged. After ``scan_layers`` over the copy, the
  module's ``state`` is every layer's new state.
  """
  copy = nnx.merge(*nnx.split(layers))
  found = adaspa_nnx.modules(copy)
  if len(found) != 1:
    raise ValueError(f"{type(layers).__name__}: expected one AdaSpaAttention module in the "
                     f"stacked layers, found {len(found)} (build the model with "
                     "attention='adaspa').")
  module = found[0]
  module.sequence_parallel = sequence_parallel
  module.load_state(adaspa_state, layout)
  return copy, module
