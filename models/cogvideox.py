"""CogVideoX 1.0 and 1.5 transformer (diffusers' ``CogVideoXTransformer3DModel``) in Flax NNX.

Every block runs joint attention over ``[text; video]``: the text tokens are a
*prefix* of the sequence, which is what AdaSpa's ``text_blocks`` names. 1.0
patchifies each frame with a 2D conv; 1.5 also groups ``patch_size_t`` latent
frames into one token (a linear layer over the flattened patch).

Shapes: B batch, F latent frames, C channels, H x W latent height and width,
T text tokens, p = patch_size, p_t = patch_size_t (1 for 1.0),
N = (F / p_t) * (H / p) * (W / p) video tokens, S = T + N, D = heads * head_dim.

Text is never masked: CogVideoX attends to all ``max_text_seq_length`` T5 tokens
(padding included); padded text in the middle of ``[text; video]`` could not be
expressed as a valid-length anyway. The joint sequence is padded once, at the end
of the video stream, to the kernels' multiple (``adaspa_jax.layout``): every block
runs on ``[text; video; padding]`` with the padded keys masked, and the padding is
cut before the output projection. With ``attention="adaspa"`` each block's joint
attention holds an ``adaspa_jax.nnx.AdaSpaAttention`` (``attn1.adaspa``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adaspa_jax import AdaSpaConfig, AdaSpaState, init_state
from adaspa_jax.layout import BlockLayout
from adaspa_jax.parallel import SequenceParallel
from adaspa_jax.models import layers
from adaspa_jax.models.loading import Rule

DIFFUSERS_CLASS_NAMES = ("CogVideoXTransformer3DModel",)

# diffusers' get_activation names (torch nn.GELU is the exact erf form).
_TIMESTEP_ACTIVATIONS = {
    "silu": jax.nn.silu, "swish": jax.nn.silu, "relu": jax.nn.relu, "mish": jax.nn.mish,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
}
_FF_ACTIVATIONS = ("gelu", "gelu-approximate")
_QK_NORM_EPS = 1e-6  # diffusers' CogVideoXBlock fixes it, independent of norm_eps.


@dataclasses.dataclass(frozen=True)
class Config:
  """diffusers' ``CogVideoXTransformer3DModel`` config (same field names and defaults).

  ``dropout`` is kept for round-tripping configs; this is an inference model and
  applies none. ``attention`` picks dense attention or AdaSpa (``adaspa``) for
  the joint attention of every block.
  """

  num_attention_heads: int = 30
  attention_head_dim: int = 64
  in_channels: int = 16
  out_channels: int | None = 16
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  time_embed_dim: int = 512
  ofs_embed_dim: int | None = None
  text_embed_dim: int = 4096
  num_layers: int = 30
  dropout: float = 0.0
  attention_bias: bool = True
  sample_width: int = 90
  sample_height: int = 60
  sample_frames: int = 49
  patch_size: int = 2
  patch_size_t: int | None = None
  temporal_compression_ratio: int = 4
  max_text_seq_length: int = 226
  activation_fn: str = "gelu-approximate"
  timestep_activation_fn: str = "silu"
  norm_elementwise_affine: bool = True
  norm_eps: float = 1e-5
  spatial_interpolation_scale: float = 1.875
  temporal_interpolation_scale: float = 1.0
  use_rotary_positional_embeddings: bool = False
  use_learned_positional_embeddings: bool = False
  patch_bias: bool = True
  attention: str = "dense"
  adaspa: AdaSpaConfig = AdaSpaConfig()
  # Sequence/head-parallel layout over a device mesh (adaspa_jax.parallel), or None.
  sequence_parallel: SequenceParallel | None = None

  def __post_init__(self):
    layers.check_attention_fields(self)
    if self.out_channels is None:
      raise ValueError("out_channels=None: expected an int (diffusers cannot build the "
                       "output projection without it).")
    if self.activation_fn not in _FF_ACTIVATIONS:
      raise ValueError(f"activation_fn={self.activation_fn!r}: expected one of "
                       f"{sorted(_FF_ACTIVATIONS)}.")
    if self.timestep_activation_fn not in _TIMESTEP_ACTIVATIONS:
      raise ValueError(f"timestep_activation_fn={self.timestep_activation_fn!r}: expected one "
                       f"of {sorted(_TIMESTEP_ACTIVATIONS)}.")
    if self.use_learned_positional_embeddings and not self.use_rotary_positional_embeddings:
      raise ValueError("use_learned_positional_embeddings=True with "
                       "use_rotary_positional_embeddings=False: diffusers rejects this "
                       "combination (no such checkpoint exists).")
    if self.patch_size_t is not None and self.patch_size_t < 1:
      raise ValueError(f"patch_size_t={self.patch_size_t!r}: expected None or an int >= 1.")

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def uses_positional_embeddings(self) -> bool:
    return not self.use_rotary_positional_embeddings or self.use_learned_positional_embeddings

  @classmethod
  def from_diffusers(cls, d: dict) -> "Config":
    """From a diffusers ``config.json`` dict; keys starting with "_" are ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in d.items() if not k.startswith("_")}
    unknown = sorted(set(kwargs) - names)
    if unknown:
      raise ValueError(f"CogVideoX config has unknown keys {unknown}: expected a subset of "
                       f"{sorted(names)}.")
    return cls(**kwargs)


# Published configs (the checkpoints' transformer/config.json).
_COGVIDEOX_5B = Config(
    num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True)
PRESETS = {
    "cogvideox-5b": _COGVIDEOX_5B,
    "cogvideox1.5-5b": dataclasses.replace(
        _COGVIDEOX_5B, patch_size_t=2, patch_bias=False, sample_height=300, sample_width=300,
        sample_frames=81),
    "tiny": Config(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        time_embed_dim=16, text_embed_dim=24, num_layers=2, sample_width=8, sample_height=6,
        sample_frames=9, max_text_seq_length=7, use_rotary_positional_embeddings=True),
}


# ---------------------------------------------------------------- embeddings


def _sincos_1d(dim, pos):
  """numpy float64 [len(pos), dim]: [sin, cos] halves."""
  omega = 1.0 / 10000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.outer(np.asarray(pos, np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_positional_embedding(config: Config, height: int, width: int, frames: int):
  """diffusers' fixed joint positional embedding for a latent of the given size.

  Args:
    height, width: latent height and width (before patching).
    frames: frame count *before* temporal VAE compression, as diffusers counts it.

  Returns:
    numpy float64 [1, max_text_seq_length + n, D]: zeros on the text prefix, then
    [temporal (D/4), spatial (3D/4)] sin-cos features per (frame, row, col) token.
  """
  d = config.inner_dim
  if d % 16:
    raise ValueError(f"num_attention_heads * attention_head_dim = {d}: sinusoidal positional "
                     "embeddings need a multiple of 16.")
  h, w = height // config.patch_size, width // config.patch_size
  t = (frames - 1) // config.temporal_compression_ratio + 1
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  scale = config.spatial_interpolation_scale
  d_spatial = 3 * d // 4
  # diffusers puts the column (w) coordinate in the first half, the row in the second.
  spatial = np.concatenate([_sincos_1d(d_spatial // 2, cols.reshape(-1) / scale),
                            _sincos_1d(d_spatial // 2, rows.reshape(-1) / scale)], axis=1)
  temporal = _sincos_1d(d // 4, np.arange(t) / config.temporal_interpolation_scale)
  video = np.concatenate([np.repeat(temporal[:, None], h * w, axis=1),
                          np.repeat(spatial[None], t, axis=0)], axis=-1).reshape(t * h * w, d)
  joint = np.zeros((1, config.max_text_seq_length + t * h * w, d))
  joint[0, config.max_text_seq_length:] = video
  return joint


def _rope_1d(dim, pos, theta=10000.0):
  freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  angles = np.outer(np.asarray(pos, np.float64), freqs)
  return np.repeat(np.cos(angles), 2, axis=1), np.repeat(np.sin(angles), 2, axis=1)


def _crop_region(grid_h, grid_w, base_h, base_w):
  """The pipeline's get_resize_crop_region_for_grid: fit the grid into the base."""
  if grid_h / grid_w > base_h / base_w:
    rh, rw = base_h, int(round(base_h / grid_h * grid_w))
  else:
    rw, rh = base_w, int(round(base_w / grid_w * grid_h))
  top, left = int(round((base_h - rh) / 2.0)), int(round((base_w - rw) / 2.0))
  return (top, left), (top + rh, left + rw)


def rotary_positional_embeddings(config: Config, num_frames: int, height: int, width: int):
  """The ``image_rotary_emb`` the diffusers CogVideoX pipelines pass to the transformer.

  Args:
    num_frames: latent frames F (``hidden_states.shape[1]``, already padded to a
      multiple of ``patch_size_t`` for 1.5).
    height, width: latent height and width.

  Returns:
    (cos, sin), each float32 [N, attention_head_dim], tokens in (frame, row, col) order.
  """
  if not config.use_rotary_positional_embeddings:
    raise ValueError("config.use_rotary_positional_embeddings is False: this model takes no "
                     "image_rotary_emb.")
  dh = config.attention_head_dim
  if dh % 16:
    raise ValueError(f"attention_head_dim={dh}: 3D RoPE needs a multiple of 16.")
  p, p_t = config.patch_size, config.patch_size_t
  gh, gw = height // p, width // p
  base_h, base_w = config.sample_height // p, config.sample_width // p
  if p_t is None:
    # 1.0: positions stretched over the crop of the training grid ("linspace" grid).
    (top, left), (bottom, right) = _crop_region(gh, gw, base_h, base_w)
    frames = num_frames
    pos_t = np.linspace(0, frames * (frames - 1) / frames, frames)
    pos_h = np.linspace(top, bottom * (gh - 1) / gh, gh)
    pos_w = np.linspace(left, right * (gw - 1) / gw, gw)
  else:
    # 1.5: integer positions ("slice" grid).
    frames = -(-num_frames // p_t)
    pos_t, pos_h, pos_w = np.arange(frames), np.arange(gh), np.arange(gw)
  dims = (dh // 4, dh // 8 * 3, dh // 8 * 3)
  parts = [_rope_1d(n, pos) for n, pos in zip(dims, (pos_t, pos_h, pos_w))]

  def combine(i):
    t, h, w = (x[i] for x in parts)
    grid = np.concatenate([
        np.broadcast_to(t[:, None, None], (frames, gh, gw, dims[0])),
        np.broadcast_to(h[None, :, None], (frames, gh, gw, dims[1])),
        np.broadcast_to(w[None, None, :], (frames, gh, gw, dims[2]))], axis=-1)
    return jnp.asarray(grid.reshape(frames * gh * gw, dh), jnp.float32)

  return combine(0), combine(1)


def apply_rotary_emb(x, cos, sin):
  """RoPE on interleaved (even, odd) pairs. x [B, N, H, Dh]; cos, sin [N, Dh]."""
  pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  out = x.astype(jnp.float32) * cos[None, :, None] + rotated * sin[None, :, None]
  return out.astype(x.dtype)


# ---------------------------------------------------------------- layers


def _linear(n_in, n_out, *, rngs, dtype, bias=True):
  return nnx.Linear(n_in, n_out, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


class TimestepEmbedding(nnx.Module):
  """linear_1 -> activation -> linear_2."""

  def __init__(self, n_in, n_out, activation, *, rngs, dtype):
    self.linear_1 = _linear(n_in, n_out, rngs=rngs, dtype=dtype)
    self.linear_2 = _linear(n_out, n_out, rngs=rngs, dtype=dtype)
    self.activation = activation

  def __call__(self, x):
    return self.linear_2(_TIMESTEP_ACTIVATIONS[self.activation](self.linear_1(x)))


class PatchEmbed(nnx.Module):
  """Text projection, video patchify + projection, optional positional embedding."""

  def __init__(self, config: Config, *, rngs, dtype):
    c, p, d = config.in_channels, config.patch_size, config.inner_dim
    self.config = config
    if config.patch_size_t is None:
      self.proj = nnx.Conv(c, d, (p, p), strides=(p, p), padding="VALID",
                           use_bias=config.patch_bias, dtype=dtype, param_dtype=dtype, rngs=rngs)
    else:
      # diffusers' 1.5 patch projection always has a bias, whatever patch_bias says.
      self.proj = _linear(c * p * p * config.patch_size_t, d, rngs=rngs, dtype=dtype)
    self.text_proj = _linear(config.text_embed_dim, d, rngs=rngs, dtype=dtype)
    if config.use_learned_positional_embeddings:
      init = sincos_positional_embedding(
          config, config.sample_height, config.sample_width, config.sample_frames)
      self.pos_embedding = nnx.Param(jnp.asarray(init, dtype))

  def __call__(self, text, video):
    """text [B, T, text_embed_dim], video [B, F, C, H, W] -> [B, T + N, D]."""
    cfg = self.config
    b, f, c, h, w = video.shape
    p = cfg.patch_size
    if cfg.patch_size_t is None:
      x = jnp.transpose(video.reshape(b * f, c, h, w), (0, 2, 3, 1))
      x = self.proj(x).reshape(b, f * (h // p) * (w // p), -1)
    else:
      p_t = cfg.patch_size_t
      x = video.reshape(b, f // p_t, p_t, c, h // p, p, w // p, p)
      # Token order (frame, row, col); feature order (C, p_t, p, p) as diffusers flattens.
      x = jnp.transpose(x, (0, 1, 4, 6, 3, 2, 5, 7)).reshape(b, -1, c * p_t * p * p)
      x = self.proj(x)
    x = jnp.concatenate([self.text_proj(text), x], axis=1)
    if not cfg.uses_positional_embeddings:
      return x
    if cfg.use_learned_positional_embeddings and (h, w) != (cfg.sample_height,
                                                        cfg.sample_width):
      raise ValueError(
          f"hidden_states has latent size {h}x{w}: this model's learned positional embedding "
          f"only fits sample_height x sample_width = {cfg.sample_height}x{cfg.sample_width}.")
    frames = (f - 1) * cfg.temporal_compression_ratio + 1
    if cfg.use_learned_positional_embeddings and frames == cfg.sample_frames:
      pos = self.pos_embedding.get_value()
    else:
      # diffusers falls back to the fixed embedding at any other frame count.
      pos = jnp.asarray(sincos_positional_embedding(cfg, h, w, frames))
    if pos.shape[1] != x.shape[1]:
      raise ValueError(
          f"encoder_hidden_states has {text.shape[1]} tokens and hidden_states gives "
          f"{x.shape[1] - text.shape[1]} video tokens: the positional embedding expects "
          f"max_text_seq_length={cfg.max_text_seq_length} text tokens and "
          f"{pos.shape[1] - cfg.max_text_seq_length} video tokens.")
    return x + pos.astype(x.dtype)


class LayerNormZero(nnx.Module):
  """Per-stream adaptive LayerNorm: shift/scale/gate for video and for text from temb."""

  def __init__(self, cond_dim, dim, eps, affine, *, rngs, dtype):
    self.linear = _linear(cond_dim, 6 * dim, rngs=rngs, dtype=dtype)
    self.norm = layers.LayerNorm(dim, eps, affine=affine)

  def __call__(self, x, text, temb):
    mod = self.linear(jax.nn.silu(temb))[:, None, :]
    shift, scale, gate, t_shift, t_scale, t_gate = jnp.split(mod, 6, axis=-1)
    x = self.norm(x) * (1 + scale) + shift
    text = self.norm(text) * (1 + t_scale) + t_shift
    return x, text, gate, t_gate


class Attention(nnx.Module):
  """Joint attention over [text; video] with per-head LayerNorm on q, k and RoPE on video."""

  def __init__(self, config: Config, *, rngs, dtype):
    d, dh = config.inner_dim, config.attention_head_dim
    kw = dict(rngs=rngs, dtype=dtype, bias=config.attention_bias)
    self.to_q, self.to_k, self.to_v = (_linear(d, d, **kw) for _ in range(3))
    self.norm_q = layers.LayerNorm(dh, _QK_NORM_EPS)
    self.norm_k = layers.LayerNorm(dh, _QK_NORM_EPS)
    self.to_out = _linear(d, d, rngs=rngs, dtype=dtype)
    self.heads = config.num_attention_heads
    self.adaspa = layers.adaspa_module(config)

  def __call__(self, x, n_text, rope, ctx: layers.AttentionContext):
    """x [B, S_pad, D] = [text prefix (n_text); video; padding]; rope (cos, sin) [N, Dh]
    for the N video tokens, or None."""
    b, s, d = x.shape
    split = lambda y: y.reshape(b, s, self.heads, d // self.heads)
    q, k, v = split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x))
    q, k = self.norm_q(q), self.norm_k(k)
    if rope is not None:
      stop = n_text + rope[0].shape[0]
      q, k = (jnp.concatenate([y[:, :n_text], apply_rotary_emb(y[:, n_text:stop], *rope),
                               y[:, stop:]], axis=1) for y in (q, k))
    out = layers.self_attention(self.adaspa, q, k, v, ctx)
    return self.to_out(out.reshape(b, s, d))


class Block(nnx.Module):
  """CogVideoXBlock: gated joint attention, then a gated feed-forward over both streams."""

  def __init__(self, config: Config, *, rngs, dtype):
    d, eps, affine = config.inner_dim, config.norm_eps, config.norm_elementwise_affine
    self.norm1 = LayerNormZero(config.time_embed_dim, d, eps, affine, rngs=rngs, dtype=dtype)
    self.attn1 = Attention(config, rngs=rngs, dtype=dtype)
    self.norm2 = LayerNormZero(config.time_embed_dim, d, eps, affine, rngs=rngs, dtype=dtype)
    self.ff = layers.FeedForward(d, 4 * d, approximate=config.activation_fn == "gelu-approximate",
                                 rngs=rngs, dtype=dtype)

  def __call__(self, x, text, temb, rope, ctx: layers.AttentionContext):
    """x [B, N + padding, D], text [B, T, D], temb [B, time_embed_dim] -> (x, text)."""
    n_text = text.shape[1]
    nx, nt, gate, t_gate = self.norm1(x, text, temb)
    attn = self.attn1(jnp.concatenate([nt, nx], axis=1), n_text, rope, ctx)
    x = x + gate * attn[:, n_text:]
    text = text + t_gate * attn[:, :n_text]
    nx, nt, gate, t_gate = self.norm2(x, text, temb)
    ff = self.ff(jnp.concatenate([nt, nx], axis=1))
    return x + gate * ff[:, n_text:], text + t_gate * ff[:, :n_text]


class AdaLayerNorm(nnx.Module):
  """Final adaptive norm: (shift, scale) from temb, in that order (diffusers' chunk_dim=1)."""

  def __init__(self, cond_dim, dim, eps, affine, *, rngs, dtype):
    self.linear = _linear(cond_dim, 2 * dim, rngs=rngs, dtype=dtype)
    self.norm = layers.LayerNorm(dim, eps, affine=affine)

  def __call__(self, x, temb):
    shift, scale = jnp.split(self.linear(jax.nn.silu(temb))[:, None, :], 2, axis=-1)
    return self.norm(x) * (1 + scale) + shift


# ---------------------------------------------------------------- model


class Model(nnx.Module):
  """CogVideoXTransformer3DModel. ``Model(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)``.

  ``dtype`` is the parameter and activation dtype; layer norms (float32
  parameters, as in the shared ``layers.LayerNorm``) and RoPE compute in float32.
  """

  def __init__(self, config: Config, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.config = config
    d = config.inner_dim
    act = config.timestep_activation_fn
    self.patch_embed = PatchEmbed(config, rngs=rngs, dtype=dtype)
    self.time_embedding = TimestepEmbedding(d, config.time_embed_dim, act, rngs=rngs,
                                            dtype=dtype)
    if config.ofs_embed_dim:
      self.ofs_embedding = TimestepEmbedding(config.ofs_embed_dim, config.ofs_embed_dim, act,
                                             rngs=rngs, dtype=dtype)
    self.transformer_blocks = layers.stack_layers(
        lambda r: Block(config, rngs=r, dtype=dtype), config.num_layers, rngs)
    eps, affine = config.norm_eps, config.norm_elementwise_affine
    self.norm_final = layers.LayerNorm(d, eps, affine=affine)
    self.norm_out = AdaLayerNorm(config.time_embed_dim, d, eps, affine, rngs=rngs, dtype=dtype)
    out = config.patch_size ** 2 * (config.patch_size_t or 1) * config.out_channels
    self.proj_out = _linear(d, out, rngs=rngs, dtype=dtype)

  def num_tokens(self, num_frames: int, height: int, width: int, text_seq_length=None) -> int:
    """S = T + N for a latent of F x H x W (T defaults to max_text_seq_length)."""
    cfg = self.config
    t = cfg.max_text_seq_length if text_seq_length is None else text_seq_length
    return t + (num_frames // (cfg.patch_size_t or 1)) * (height // cfg.patch_size) * (
        width // cfg.patch_size)

  def init_adaspa_state(self, batch: int, num_frames: int, height: int, width: int,
                        text_seq_length: int | None = None) -> AdaSpaState:
    """AdaSpa state of every block (leading [num_layers] axis) for a latent F x H x W."""
    cfg = self.config
    t = cfg.max_text_seq_length if text_seq_length is None else text_seq_length
    layout = self.adaspa_layout(self.num_tokens(num_frames, height, width, t), t)
    return init_state(cfg.adaspa, batch, layout.seq_len, cfg.num_attention_heads,
                      num_layers=cfg.num_layers, layout=layout)

  def adaspa_layout(self, seq_len: int, text_len: int) -> BlockLayout:
    """The joint attention's padded block layout: ``text_len`` text tokens first."""
    return BlockLayout.create(seq_len, self.config.adaspa.block_size,
                              text_span=(0, text_len), pad=True,
                              query_block_size=self.config.adaspa.query_block_size)

  def _check_inputs(self, hidden_states, encoder_hidden_states, image_rotary_emb):
    cfg = self.config
    if hidden_states.ndim != 5 or hidden_states.shape[2] != cfg.in_channels:
      raise ValueError(
          f"hidden_states has shape {tuple(hidden_states.shape)}: expected [batch, frames, "
          f"{cfg.in_channels}, height, width].")
    b, f, _, h, w = hidden_states.shape
    p, p_t = cfg.patch_size, cfg.patch_size_t or 1
    if h % p or w % p or f % p_t:
      raise ValueError(
          f"hidden_states has frames x height x width = {f}x{h}x{w}: expected height and "
          f"width divisible by patch_size={p} and frames by patch_size_t={p_t}.")
    if (encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != b
        or encoder_hidden_states.shape[2] != cfg.text_embed_dim):
      raise ValueError(
          f"encoder_hidden_states has shape {tuple(encoder_hidden_states.shape)}: expected "
          f"[{b}, text_tokens, {cfg.text_embed_dim}].")
    n = (f // p_t) * (h // p) * (w // p)
    if image_rotary_emb is None and cfg.use_rotary_positional_embeddings:
      raise ValueError("image_rotary_emb=None: this config uses rotary positional embeddings; "
                       "pass rotary_positional_embeddings(config, frames, height, width).")
    if image_rotary_emb is not None:
      shapes = [tuple(getattr(x, "shape", ())) for x in image_rotary_emb]
      if len(shapes) != 2 or any(s != (n, cfg.attention_head_dim) for s in shapes):
        raise ValueError(
            f"image_rotary_emb has shapes {shapes}: expected (cos, sin), each "
            f"[{n}, {cfg.attention_head_dim}] for {n} video tokens.")

  def __call__(self, hidden_states, encoder_hidden_states, timestep, timestep_cond=None,
               ofs=None, image_rotary_emb=None, *, adaspa_state: AdaSpaState | None = None,
               adaspa_step=None):
    """The denoiser's output for a latent video.

    Args:
      hidden_states: [B, F, C, H, W] latent video.
      encoder_hidden_states: [B, T, text_embed_dim] text embeddings (T5).
      timestep: scalar or [B].
      timestep_cond: unsupported by diffusers' CogVideoX (no cond_proj); must be None.
      ofs: scalar or [B], required iff ``ofs_embed_dim`` is set (1.5 I2V).
      image_rotary_emb: (cos, sin) float32 [N, attention_head_dim], from
        ``rotary_positional_embeddings``; required iff the config uses RoPE.
      adaspa_state: per-block AdaSpa state (leading [num_layers] axis), from
        ``init_adaspa_state``; requires ``config.attention == "adaspa"``.
      adaspa_step: denoising step index (int or traced int32 scalar), with the state.

    Returns:
      [B, F, out_channels, H, W] in the activation dtype; with ``adaspa_state``,
      ``(output, new_state)``.
    """
    cfg = self.config
    self._check_inputs(hidden_states, encoder_hidden_states, image_rotary_emb)
    if timestep_cond is not None:
      raise ValueError("timestep_cond is not None: CogVideoX's time embedding has no "
                       "condition projection (diffusers fails on it too).")
    use_adaspa = layers.check_adaspa_state(cfg, adaspa_state, adaspa_step,
                                           num_layers=cfg.num_layers)
    b, f, _, h, w = hidden_states.shape
    dtype = hidden_states.dtype
    d = cfg.inner_dim

    t = jnp.broadcast_to(jnp.asarray(timestep), (b,))
    emb = self.time_embedding(layers.timestep_embedding(
        t, d, flip_sin_to_cos=cfg.flip_sin_to_cos, downscale_freq_shift=cfg.freq_shift
    ).astype(dtype))
    if cfg.ofs_embed_dim:
      if ofs is None:
        raise ValueError("ofs=None: this config has ofs_embed_dim set; expected the ofs value.")
      o = jnp.broadcast_to(jnp.asarray(ofs), (b,))
      emb = emb + self.ofs_embedding(layers.timestep_embedding(
          o, cfg.ofs_embed_dim, flip_sin_to_cos=cfg.flip_sin_to_cos,
          downscale_freq_shift=cfg.freq_shift).astype(dtype))

    x = self.patch_embed(encoder_hidden_states, hidden_states)
    n_text = encoder_hidden_states.shape[1]
    text, x = x[:, :n_text], x[:, n_text:]
    rope = None if image_rotary_emb is None else tuple(
        jnp.asarray(r, jnp.float32) for r in image_rotary_emb)

    layout = self.adaspa_layout(n_text + x.shape[1], n_text)
    x = layout.pad(x)                       # [video; padding], once for every block
    ctx = layers.AttentionContext.create(cfg, layout, b, adaspa_step=adaspa_step,
                                         use_adaspa=use_adaspa)
    blocks, adaspa = self.transformer_blocks, None
    if use_adaspa:
      blocks, adaspa = layers.with_adaspa_state(blocks, adaspa_state, layout,
                                                cfg.sequence_parallel)

    def layer(block, carry, _):
      return block(*carry, emb, rope, ctx), None

    (x, text), _ = layers.scan_layers(blocks, layer, (x, text))
    x = layout.real(x)

    x = self.norm_out(self.norm_final(x), emb)
    x = self.proj_out(x)
    p, p_t = cfg.patch_size, cfg.patch_size_t or 1
    c = cfg.out_channels
    x = x.reshape(b, f // p_t, h // p, w // p, c, p_t, p, p)
    out = jnp.transpose(x, (0, 1, 5, 4, 2, 6, 3, 7)).reshape(b, f, c, h, w)
    return (out, adaspa.state) if use_adaspa else out


# ---------------------------------------------------------------- weights


def _linear_rules(source: str, target: str, bias: bool = True) -> list[Rule]:
  rules = [Rule(source + r"\.weight", target + "/kernel", "linear")]
  return rules + ([Rule(source + r"\.bias", target + "/bias")] if bias else [])


def _norm_rules(source: str, target: str) -> list[Rule]:
  return [Rule(source + r"\.weight", target + "/scale"), Rule(source + r"\.bias", target + "/bias")]


def weight_rules(config: Config) -> list[Rule]:
  """diffusers CogVideoXTransformer3DModel keys -> NNX parameters of ``Model``."""
  blk = r"transformer_blocks\.(?P<layer>\d+)\."
  rules = []
  if config.patch_size_t is None:
    rules.append(Rule(r"patch_embed\.proj\.weight", "patch_embed/proj/kernel", "conv2d"))
    if config.patch_bias:
      rules.append(Rule(r"patch_embed\.proj\.bias", "patch_embed/proj/bias"))
  else:
    rules += _linear_rules(r"patch_embed\.proj", "patch_embed/proj")
  rules += _linear_rules(r"patch_embed\.text_proj", "patch_embed/text_proj")
  if config.use_learned_positional_embeddings:
    rules.append(Rule(r"patch_embed\.pos_embedding", "patch_embed/pos_embedding"))
  for emb in ("time_embedding", "ofs_embedding") if config.ofs_embed_dim else ("time_embedding",):
    for lin in ("linear_1", "linear_2"):
      rules += _linear_rules(rf"{emb}\.{lin}", f"{emb}/{lin}")
  rules += _linear_rules(blk + r"(?P<n>norm1|norm2)\.linear", "transformer_blocks/{n}/linear")
  if config.norm_elementwise_affine:
    rules += _norm_rules(blk + r"(?P<n>norm1|norm2)\.norm", "transformer_blocks/{n}/norm")
  rules += _linear_rules(blk + r"attn1\.(?P<m>to_q|to_k|to_v)", "transformer_blocks/attn1/{m}",
                         bias=config.attention_bias)
  rules += _norm_rules(blk + r"attn1\.(?P<m>norm_q|norm_k)", "transformer_blocks/attn1/{m}")
  rules += _linear_rules(blk + r"attn1\.to_out\.0", "transformer_blocks/attn1/to_out")
  rules += _linear_rules(blk + r"ff\.net\.0\.proj", "transformer_blocks/ff/proj_in")
  rules += _linear_rules(blk + r"ff\.net\.2", "transformer_blocks/ff/proj_out")
  if config.norm_elementwise_affine:
    rules += _norm_rules(r"norm_final", "norm_final")
    rules += _norm_rules(r"norm_out\.norm", "norm_out/norm")
  rules += _linear_rules(r"norm_out\.linear", "norm_out/linear")
  rules += _linear_rules(r"proj_out", "proj_out")
  return rules
