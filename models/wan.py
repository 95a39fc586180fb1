"""Wan2.1 text-to-video transformer (diffusers ``WanTransformer3DModel``) in Flax NNX.

Layout follows diffusers: ``hidden_states`` [B, C, F, H, W] latents,
``timestep`` [B], ``encoder_hidden_states`` [B, L, text_dim] (T5 features, zero
padded, unmasked as in diffusers' pipeline). Video tokens are ordered (f, h, w)
after the (p_t, p_h, p_w) patchifier. Self-attention over the video tokens goes
through AdaSpa (each block's ``attn1.adaspa``, an ``adaspa_jax.nnx.AdaSpaAttention``)
when the model config says ``attention="adaspa"`` and a state is passed; it has no
text tokens. Cross-attention to text is always dense.

The token sequence is padded once, after patchifying, to the kernels' multiple
(``adaspa_jax.layout``); every block runs on the padded sequence with the padded
keys masked, and the padding is cut before the output projection.

The 30/40 transformer blocks have their parameters stacked on a leading layer
axis and run under ``jax.lax.scan``; the per-layer AdaSpa state (the blocks'
AdaSpa caches) is scanned with them. Image-to-video variants (``image_dim`` / ``added_kv_proj_dim``) and
Wan2.2's per-token timesteps are not implemented.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adaspa_jax import AdaSpaConfig, AdaSpaState, init_state, parallel
from adaspa_jax.layout import BlockLayout
from adaspa_jax.parallel import SequenceParallel
from adaspa_jax.models import layers
from adaspa_jax.models.loading import Rule

@dataclasses.dataclass(frozen=True)
class Config:
  """Fields named as in diffusers' config.json for ``WanTransformer3DModel``."""
  patch_size: tuple[int, int, int] = (1, 2, 2)
  num_attention_heads: int = 40
  attention_head_dim: int = 128
  in_channels: int = 16
  out_channels: int = 16
  text_dim: int = 4096
  freq_dim: int = 256
  ffn_dim: int = 13824
  num_layers: int = 40
  cross_attn_norm: bool = True
  qk_norm: str | None = "rms_norm_across_heads"
  eps: float = 1e-6
  image_dim: int | None = None
  added_kv_proj_dim: int | None = None
  rope_max_seq_len: int = 1024
  pos_embed_seq_len: int | None = None
  attention: str = "dense"
  adaspa: AdaSpaConfig = AdaSpaConfig()
  # Sequence/head-parallel layout over a device mesh (adaspa_jax.parallel), or None.
  sequence_parallel: SequenceParallel | None = None

  def __post_init__(self):
    object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
    if len(self.patch_size) != 3 or min(self.patch_size) < 1:
      raise ValueError(f"patch_size={self.patch_size!r}: expected three positive ints (t, h, w).")
    for name in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
      if getattr(self, name) is not None:
        raise ValueError(f"{name}={getattr(self, name)!r}: image-to-video Wan is not "
                         "implemented; expected None (text-to-video).")
    layers.check_attention_fields(self)
    if self.attention_head_dim % 2:
      raise ValueError(f"attention_head_dim={self.attention_head_dim}: expected an even number "
                       "(RoPE rotates pairs).")

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @classmethod
  def from_diffusers(cls, d: dict) -> "Config":
    """Config from a diffusers config.json dict; keys starting with '_' are ignored."""
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"config keys {unknown}: not fields of WanTransformer3DModel's config "
                       f"(expected a subset of {sorted(known)}).")
    return cls(**d)


_WAN21 = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16,
              text_dim=4096, freq_dim=256, cross_attn_norm=True, eps=1e-6)
PRESETS: dict[str, Config] = {
    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json.
    "wan2.1-t2v-1.3b": Config(num_attention_heads=12, ffn_dim=8960, num_layers=30, **_WAN21),
    # Wan-AI/Wan2.1-T2V-14B-Diffusers, transformer/config.json.
    "wan2.1-t2v-14b": Config(num_attention_heads=40, ffn_dim=13824, num_layers=40, **_WAN21),
    # CPU tests: head_dim 24 gives RoPE 8 temporal and 8 + 8 spatial dims.
    "tiny": Config(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24,
                   in_channels=4, out_channels=4, text_dim=32, freq_dim=16, ffn_dim=64,
                   num_layers=2, adaspa=AdaSpaConfig(block_size=16, num_steps=8,
                                                     search_steps=(2, 5))),
}


def rope_dims(head_dim: int) -> tuple[int, int, int]:
  """(t, h, w) channels of the head dimension that RoPE rotates by each axis."""
  hw = 2 * (head_dim // 6)
  return head_dim - 2 * hw, hw, hw


def rope_angles(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0):
  """Rotation angles of every video token, float64 numpy [F*H*W, head_dim // 2].

  Token (f, h, w) rotates its first t_dim/2 channel pairs by f * theta^(-2i/t_dim),
  the next h_dim/2 by h * theta^(-2i/h_dim) and the last w_dim/2 by w.
  """
  parts = []
  for axis, (n, dim) in enumerate(zip(grid, rope_dims(head_dim))):
    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    ang = np.arange(n, dtype=np.float64)[:, None] * freqs[None, :]
    shape = [1, 1, 1, dim // 2]
    shape[axis] = n
    parts.append(np.broadcast_to(ang.reshape(shape), (*grid, dim // 2)))
  return np.concatenate(parts, axis=-1).reshape(-1, head_dim // 2)


def apply_rope(x, cos, sin):
  """Rotates interleaved channel pairs (x[2i], x[2i+1]) of x [B, S, H, D].

  cos, sin: float32 [S, D // 2]. Computed in float32, returned in x's dtype.
  """
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., 0::2], xf[..., 1::2]
  c, s = cos[None, :, None, :], sin[None, :, None, :]
  out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


class WanAttention(nnx.Module):
  """Multi-head attention with RMS-normed q/k across heads (diffusers ``WanAttention``)."""

  def __init__(self, dim: int, heads: int, eps: float, *, rngs: nnx.Rngs, dtype, adaspa=None):
    self.heads = heads
    # The self-attention's AdaSpa module (``layers.adaspa_module``), or None.
    self.adaspa = adaspa
    linear = lambda: nnx.Linear(dim, dim, rngs=rngs, dtype=dtype, param_dtype=dtype)
    self.to_q, self.to_k, self.to_v, self.to_out = linear(), linear(), linear(), linear()
    self.norm_q = layers.RMSNorm(dim, eps, dtype=dtype)
    self.norm_k = layers.RMSNorm(dim, eps, dtype=dtype)

  def _heads(self, x):
    return x.reshape(*x.shape[:2], self.heads, -1)

  def project(self, x, context):
    """q from x [B, S, dim], k and v from context [B, L, dim]; each [B, *, H, D]."""
    q = self._heads(self.norm_q(self.to_q(x)))
    k = self._heads(self.norm_k(self.to_k(context)))
    return q, k, self._heads(self.to_v(context))

  def output(self, o):
    return self.to_out(o.reshape(*o.shape[:2], -1))


class WanTimeTextEmbedding(nnx.Module):
  """Timestep MLP, its 6-way modulation projection and the text projection."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs, dtype):
    dim = config.inner_dim
    self.freq_dim = config.freq_dim
    # diffusers keeps time_embedder in float32 (`_keep_in_fp32_modules`).
    self.time_embedder = layers.TimestepEmbedding(config.freq_dim, dim, rngs=rngs,
                                                  dtype=jnp.float32)
    self.time_proj = nnx.Linear(dim, 6 * dim, rngs=rngs, dtype=dtype, param_dtype=dtype)
    self.text_embedder = layers.FeedForward(config.text_dim, dim, dim, approximate=True,
                                            rngs=rngs, dtype=dtype)

  def __call__(self, timestep, encoder_hidden_states, dtype):
    """Returns temb [B, dim], its projection [B, 6, dim] and text [B, L, dim]."""
    t = layers.timestep_embedding(timestep, self.freq_dim, flip_sin_to_cos=True,
                                  downscale_freq_shift=0)
    temb = self.time_embedder(t).astype(dtype)
    proj = self.time_proj(jax.nn.silu(temb))
    text = self.text_embedder(encoder_hidden_states.astype(dtype))
    return temb, proj.reshape(proj.shape[0], 6, -1), text


class WanTransformerBlock(nnx.Module):
  """Self-attention (RoPE, AdaSpa-capable), cross-attention to text, FFN, all modulated."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs, dtype):
    dim, eps = config.inner_dim, config.eps
    self.eps = eps
    self.attn1 = WanAttention(dim, config.num_attention_heads, eps, rngs=rngs, dtype=dtype,
                              adaspa=layers.adaspa_module(config))
    self.attn2 = WanAttention(dim, config.num_attention_heads, eps, rngs=rngs, dtype=dtype)
    self.norm2 = layers.LayerNorm(dim, eps) if config.cross_attn_norm else None
    self.ffn = layers.FeedForward(dim, config.ffn_dim, approximate=True, rngs=rngs, dtype=dtype)
    self.scale_shift_table = nnx.Param(
        jax.random.normal(rngs.params(), (1, 6, dim), jnp.float32) / math.sqrt(dim))

  def __call__(self, x, context, temb_proj, cos, sin, ctx: layers.AttentionContext,
               cross_attention=layers.attention):
    """x [B, S, dim]; context [B, L, dim]; temb_proj [B, 6, dim]; cos, sin [S, D // 2].

    ``ctx`` says how the self-attention runs (dense, or AdaSpa at ``ctx.step``
    with the state in ``attn1.adaspa``); ``cross_attention(q, k, v)`` is the
    attention to text. Returns x.
    """
    mod = self.scale_shift_table[...] + temb_proj.astype(jnp.float32)
    shift, scale, gate, c_shift, c_scale, c_gate = jnp.split(mod, 6, axis=1)
    dtype = x.dtype
    xf = x.astype(jnp.float32)

    n = (layers.layer_norm(xf, self.eps) * (1 + scale) + shift).astype(dtype)
    q, k, v = self.attn1.project(n, n)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    a = layers.self_attention(self.attn1.adaspa, q, k, v, ctx)
    x = (xf + self.attn1.output(a) * gate).astype(dtype)

    n = x if self.norm2 is None else self.norm2(x.astype(jnp.float32)).astype(dtype)
    q, k, v = self.attn2.project(n, context)
    x = x + self.attn2.output(cross_attention(q, k, v))

    n = (layers.layer_norm(x.astype(jnp.float32), self.eps) * (1 + c_scale) + c_shift)
    f = self.ffn(n.astype(dtype))
    return (x.astype(jnp.float32) + f.astype(jnp.float32) * c_gate).astype(dtype)


class Model(nnx.Module):
  """``WanTransformer3DModel`` (text-to-video)."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.config = config
    self.dtype = dtype
    dim, pt = config.inner_dim, config.patch_size
    self.patch_embedding = nnx.Conv(config.in_channels, dim, pt, strides=pt, padding="VALID",
                                    rngs=rngs, dtype=dtype, param_dtype=dtype)
    self.condition_embedder = WanTimeTextEmbedding(config, rngs=rngs, dtype=dtype)
    self.blocks = layers.stack_layers(
        lambda r: WanTransformerBlock(config, rngs=r, dtype=dtype), config.num_layers, rngs)
    self.proj_out = nnx.Linear(dim, config.out_channels * math.prod(pt), rngs=rngs, dtype=dtype,
                               param_dtype=dtype)
    self.scale_shift_table = nnx.Param(
        jax.random.normal(rngs.params(), (1, 2, dim), jnp.float32) / math.sqrt(dim))

  def grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Token grid (F', H', W') of a latent video [.., F, H, W]."""
    return tuple(n // p for n, p in zip((num_frames, height, width), self.config.patch_size))

  def init_adaspa_state(self, batch: int, num_frames: int, height: int,
                        width: int) -> AdaSpaState:
    """Dense-initialised AdaSpa state of every layer, leading [num_layers] axis.

    Args:
      batch: B of ``hidden_states``.
      num_frames, height, width: F, H, W of the latent ``hidden_states`` (before
        patchifying).
    """
    layout = self.adaspa_layout(self.grid(num_frames, height, width))
    return init_state(self.config.adaspa, batch, layout.seq_len,
                      self.config.num_attention_heads, num_layers=self.config.num_layers,
                      layout=layout)

  def adaspa_layout(self, grid: tuple[int, int, int]) -> BlockLayout:
    """The self-attention's padded block layout for a token grid (no text tokens)."""
    return BlockLayout.create(math.prod(grid), self.config.adaspa.block_size, pad=True,
                              query_block_size=self.config.adaspa.query_block_size)

  def __call__(self, hidden_states, timestep, encoder_hidden_states,
               encoder_hidden_states_image=None, *, adaspa_state: AdaSpaState | None = None,
               adaspa_step=None):
    """Denoiser prediction.

    Args:
      hidden_states: [B, C_in, F, H, W] latents.
      timestep: [B] diffusion timesteps (0..1000).
      encoder_hidden_states: [B, L, text_dim] text features.
      encoder_hidden_states_image: must be None (image-to-video not implemented).
      adaspa_state: per-layer AdaSpa state with a leading [num_layers] axis
        (``init_adaspa_state``); requires ``config.attention == "adaspa"``.
      adaspa_step: 0-indexed denoising step (int or traced int32 scalar), with a state.

    Returns:
      [B, C_out, F', H', W'] with (F', H', W') = grid * patch_size; with a state,
      ``(output, new_state)``.
    """
    cfg = self.config
    if encoder_hidden_states_image is not None:
      raise ValueError("encoder_hidden_states_image: image-to-video Wan is not implemented; "
                       "expected None.")
    if hidden_states.ndim != 5 or hidden_states.shape[1] != cfg.in_channels:
      raise ValueError(f"hidden_states has shape {hidden_states.shape}: expected "
                       f"[B, {cfg.in_channels}, F, H, W].")
    b = hidden_states.shape[0]
    timestep = jnp.asarray(timestep)
    if timestep.ndim == 0:
      timestep = jnp.broadcast_to(timestep, (b,))
    if timestep.shape != (b,):
      raise ValueError(f"timestep has shape {timestep.shape}: expected [{b}] (per-token "
                       "timesteps of Wan2.2 are not implemented).")
    if (encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != b
        or encoder_hidden_states.shape[2] != cfg.text_dim):
      raise ValueError(f"encoder_hidden_states has shape {encoder_hidden_states.shape}: "
                       f"expected [{b}, L, {cfg.text_dim}].")
    use_adaspa = layers.check_adaspa_state(cfg, adaspa_state, adaspa_step,
                                           num_layers=cfg.num_layers)

    grid = self.grid(*hidden_states.shape[2:])
    if min(grid) < 1 or max(grid) > cfg.rope_max_seq_len:
      raise ValueError(f"hidden_states has shape {hidden_states.shape}: token grid {grid} must "
                       f"be in [1, rope_max_seq_len={cfg.rope_max_seq_len}] per axis.")
    layout = self.adaspa_layout(grid)
    # Padded rows rotate by angle 0 (numpy constants: no pad in the program).
    angles = np.pad(rope_angles(grid, cfg.attention_head_dim),
                    ((0, layout.padded_len - layout.seq_len), (0, 0)))
    cos = jnp.asarray(np.cos(angles), jnp.float32)
    sin = jnp.asarray(np.sin(angles), jnp.float32)

    x = jnp.moveaxis(hidden_states.astype(self.dtype), 1, -1)  # [B, F, H, W, C]
    x = self.patch_embedding(x).reshape(b, -1, cfg.inner_dim)  # tokens in (f, h, w) order
    x = layout.pad(x)                                          # once, for every layer
    temb, temb_proj, context = self.condition_embedder(timestep, encoder_hidden_states,
                                                       self.dtype)

    sp = cfg.sequence_parallel
    cross = lambda q, k, v: parallel.row_parallel(layers.attention, sp, q, k, v)
    ctx = layers.AttentionContext.create(cfg, layout, b, adaspa_step=adaspa_step,
                                         use_adaspa=use_adaspa)
    blocks, adaspa = self.blocks, None
    if use_adaspa:
      blocks, adaspa = layers.with_adaspa_state(self.blocks, adaspa_state, layout, sp)
    x, _ = layers.scan_layers(
        blocks, lambda block, x, _: (block(x, context, temb_proj, cos, sin, ctx, cross), None),
        x)
    x = layout.real(x)

    shift, scale = jnp.split(self.scale_shift_table[...] + temb.astype(jnp.float32)[:, None],
                             2, axis=1)
    x = (layers.layer_norm(x.astype(jnp.float32), cfg.eps) * (1 + scale) + shift)
    x = self.proj_out(x.astype(self.dtype))
    pt, ph, pw = cfg.patch_size
    x = x.reshape(b, *grid, pt, ph, pw, cfg.out_channels)
    x = x.transpose(0, 7, 1, 4, 2, 5, 3, 6)
    out = x.reshape(b, cfg.out_channels, grid[0] * pt, grid[1] * ph, grid[2] * pw)
    return (out, adaspa.state) if use_adaspa else out


def weight_rules(config: Config) -> list[Rule]:
  """diffusers ``WanTransformer3DModel`` keys -> NNX parameters."""
  ce = r"condition_embedder\."
  blk = r"blocks\.(?P<layer>\d+)\."
  rules = [
      Rule(r"patch_embedding\.weight", "patch_embedding/kernel", "conv3d"),
      Rule(r"patch_embedding\.bias", "patch_embedding/bias"),
      Rule(ce + r"time_embedder\.(?P<m>linear_[12])\.weight",
           "condition_embedder/time_embedder/{m}/kernel", "linear"),
      Rule(ce + r"time_embedder\.(?P<m>linear_[12])\.bias",
           "condition_embedder/time_embedder/{m}/bias"),
      Rule(ce + r"time_proj\.weight", "condition_embedder/time_proj/kernel", "linear"),
      Rule(ce + r"time_proj\.bias", "condition_embedder/time_proj/bias"),
      # The text projection is an MLP: linear_1 / linear_2 -> FeedForward proj_in / proj_out.
      Rule(ce + r"text_embedder\.linear_1\.weight",
           "condition_embedder/text_embedder/proj_in/kernel", "linear"),
      Rule(ce + r"text_embedder\.linear_1\.bias", "condition_embedder/text_embedder/proj_in/bias"),
      Rule(ce + r"text_embedder\.linear_2\.weight",
           "condition_embedder/text_embedder/proj_out/kernel", "linear"),
      Rule(ce + r"text_embedder\.linear_2\.bias",
           "condition_embedder/text_embedder/proj_out/bias"),
      Rule(r"proj_out\.weight", "proj_out/kernel", "linear"),
      Rule(r"proj_out\.bias", "proj_out/bias"),
      Rule(r"scale_shift_table", "scale_shift_table"),
      Rule(blk + r"(?P<a>attn[12])\.(?P<p>to_q|to_k|to_v)\.weight", "blocks/{a}/{p}/kernel",
           "linear"),
      Rule(blk + r"(?P<a>attn[12])\.(?P<p>to_q|to_k|to_v)\.bias", "blocks/{a}/{p}/bias"),
      Rule(blk + r"(?P<a>attn[12])\.to_out\.0\.weight", "blocks/{a}/to_out/kernel", "linear"),
      Rule(blk + r"(?P<a>attn[12])\.to_out\.0\.bias", "blocks/{a}/to_out/bias"),
      Rule(blk + r"(?P<a>attn[12])\.(?P<n>norm_q|norm_k)\.weight", "blocks/{a}/{n}/scale"),
      Rule(blk + r"ffn\.net\.0\.proj\.weight", "blocks/ffn/proj_in/kernel", "linear"),
      Rule(blk + r"ffn\.net\.0\.proj\.bias", "blocks/ffn/proj_in/bias"),
      Rule(blk + r"ffn\.net\.2\.weight", "blocks/ffn/proj_out/kernel", "linear"),
      Rule(blk + r"ffn\.net\.2\.bias", "blocks/ffn/proj_out/bias"),
      Rule(blk + r"scale_shift_table", "blocks/scale_shift_table"),
  ]
  if config.cross_attn_norm:
    rules += [Rule(blk + r"norm2\.weight", "blocks/norm2/scale"),
              Rule(blk + r"norm2\.bias", "blocks/norm2/bias")]
  return rules
