"""HunyuanVideo transformer (diffusers' ``HunyuanVideoTransformer3DModel``) in Flax NNX.

Video latents are patchified by a Conv3d, text tokens go through the token
refiner, then ``num_layers`` dual-stream blocks (separate video/text weights,
joint attention) and ``num_single_layers`` single-stream blocks (one joint
sequence) run as two ``lax.scan``s over stacked parameters. The joint
sequence is [video tokens (f, h, w order) | text tokens]: text is a suffix,
padded text sits at its end and is excluded through ``kv_lengths`` = video
tokens + valid text tokens. RoPE over (t, h, w) rotates video tokens only.

The joint sequence is padded once, after the text suffix, to the kernels'
multiple (``adaspa_jax.layout``): the text stream carries the padding through
the dual blocks and the single blocks run on [video | text | padding], with
the padded keys masked through ``kv_lengths``.

With ``Config.attention == "adaspa"`` and an ``adaspa_state`` the joint
attention of every block goes through its ``adaspa_jax.nnx.AdaSpaAttention``
(``attn.adaspa``) with the text suffix as its text blocks; each block owns one
layer of the state (dual blocks first, then single blocks).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adaspa_jax import AdaSpaConfig, AdaSpaState, init_state
from adaspa_jax.layout import BlockLayout
from adaspa_jax.parallel import SequenceParallel
from adaspa_jax.models.hunyuan_video_layers import (LN_EPS, FeedForward, TextProjection,
                                                    TimestepEmbedding, TokenRefiner, apply_rope,
                                                    gelu_tanh, layer_norm, linear, modulate,
                                                    rope_tables, scan_layers, stacked)
from adaspa_jax.models import layers
from adaspa_jax.models.loading import Rule

@dataclasses.dataclass(frozen=True)
class Config:
  """Fields as in diffusers' config.json (defaults: the published 13B model)."""

  in_channels: int = 16
  out_channels: int = 16
  num_attention_heads: int = 24
  attention_head_dim: int = 128
  num_layers: int = 20
  num_single_layers: int = 40
  num_refiner_layers: int = 2
  mlp_ratio: float = 4.0
  patch_size: int = 2
  patch_size_t: int = 1
  qk_norm: str = "rms_norm"
  guidance_embeds: bool = True
  text_embed_dim: int = 4096
  pooled_projection_dim: int = 768
  rope_theta: float = 256.0
  rope_axes_dim: tuple[int, int, int] = (16, 56, 56)
  image_condition_type: str | None = None
  attention: str = "dense"
  adaspa: AdaSpaConfig = AdaSpaConfig()
  # Sequence/head-parallel layout over a device mesh (adaspa_jax.parallel), or None.
  sequence_parallel: SequenceParallel | None = None

  def __post_init__(self):
    object.__setattr__(self, "rope_axes_dim", tuple(int(d) for d in self.rope_axes_dim))
    for name in ("in_channels", "num_attention_heads", "attention_head_dim", "patch_size",
                 "patch_size_t", "text_embed_dim", "pooled_projection_dim"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r}: expected a positive int.")
    for name in ("num_layers", "num_single_layers", "num_refiner_layers"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name}={value!r}: expected an int >= 0.")
    dims = self.rope_axes_dim
    if len(dims) != 3 or any(d % 2 for d in dims) or sum(dims) != self.attention_head_dim:
      raise ValueError(
          f"rope_axes_dim={dims!r}: expected three even ints (t, h, w) summing to "
          f"attention_head_dim={self.attention_head_dim}.")
    if self.qk_norm != "rms_norm":
      raise ValueError(f"qk_norm={self.qk_norm!r}: expected 'rms_norm' (HunyuanVideo's).")
    if self.image_condition_type not in (None, "latent_concat"):
      # "token_replace" (HunyuanVideo-I2V) modulates first-frame tokens separately;
      # not implemented here.
      raise ValueError(
          f"image_condition_type={self.image_condition_type!r}: expected None or "
          "'latent_concat' ('token_replace' is not supported).")
    layers.check_attention_fields(self)

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def total_layers(self) -> int:
    """Attention layers carrying AdaSpa state: dual blocks then single blocks."""
    return self.num_layers + self.num_single_layers

  @classmethod
  def from_diffusers(cls, d: dict) -> "Config":
    """From diffusers' config.json dict; keys starting with '_' are ignored."""
    known = {f.name for f in dataclasses.fields(cls)} - {"attention", "adaspa",
                                                          "sequence_parallel"}
    kwargs = {}
    for key, value in d.items():
      if key.startswith("_"):
        continue
      if key not in known:
        raise ValueError(f"config key {key!r}: not a HunyuanVideoTransformer3DModel field "
                         f"(expected one of {sorted(known)}).")
      kwargs[key] = value
    if kwargs.get("out_channels") is None:
      kwargs["out_channels"] = kwargs.get("in_channels", cls.in_channels)
    return cls(**kwargs)


PRESETS = {
    # hunyuanvideo-community/HunyuanVideo transformer/config.json (diffusers' defaults).
    "hunyuan-video-13b": Config(),
    "tiny": Config(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                   num_layers=1, num_single_layers=2, num_refiner_layers=1, text_embed_dim=24,
                   pooled_projection_dim=12, rope_axes_dim=(4, 6, 6)),
}


# --- attention ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _AttnContext:
  """What every block's joint attention needs besides q, k, v (closed over by the scans)."""
  cos: jax.Array              # float32 [Nv, D] RoPE for video tokens
  sin: jax.Array
  num_video: int              # Nv: video tokens precede text tokens
  attention: layers.AttentionContext   # padded layout, kv_lengths = Nv + valid text, step


def _rope_video(x, ctx):
  """RoPE on the video rows of x [B, S, H, D] (the first Nv), text rows unchanged."""
  video = apply_rope(x[:, :ctx.num_video], ctx.cos, ctx.sin)
  return jnp.concatenate([video, x[:, ctx.num_video:]], axis=1)


def _heads(x, heads):
  return x.reshape(*x.shape[:2], heads, -1)


def _qk_rms_norm(head_dim, rngs, dtype):
  return nnx.RMSNorm(head_dim, epsilon=LN_EPS, dtype=dtype, param_dtype=dtype, rngs=rngs)


class DualAttention(nnx.Module):
  """Joint attention with separate video (to_*) and text (add_*) projections."""

  def __init__(self, config: Config, *, rngs, dtype):
    c, d = config.inner_dim, config.attention_head_dim
    self.heads = config.num_attention_heads
    self.to_q, self.to_k, self.to_v = (linear(c, c, rngs, dtype) for _ in range(3))
    self.add_q_proj, self.add_k_proj, self.add_v_proj = (linear(c, c, rngs, dtype)
                                                         for _ in range(3))
    self.norm_q, self.norm_k = _qk_rms_norm(d, rngs, dtype), _qk_rms_norm(d, rngs, dtype)
    self.norm_added_q = _qk_rms_norm(d, rngs, dtype)
    self.norm_added_k = _qk_rms_norm(d, rngs, dtype)
    self.to_out = linear(c, c, rngs, dtype)
    self.to_add_out = linear(c, c, rngs, dtype)
    self.adaspa = layers.adaspa_module(config)

  def __call__(self, x, ctx_tokens, ctx):
    """x [B, Nv, C] video, ctx_tokens [B, Nt + padding, C] text -> (video out, text out)."""
    h = self.heads
    q = apply_rope(self.norm_q(_heads(self.to_q(x), h)), ctx.cos, ctx.sin)
    k = apply_rope(self.norm_k(_heads(self.to_k(x), h)), ctx.cos, ctx.sin)
    v = _heads(self.to_v(x), h)
    q = jnp.concatenate([q, self.norm_added_q(_heads(self.add_q_proj(ctx_tokens), h))], axis=1)
    k = jnp.concatenate([k, self.norm_added_k(_heads(self.add_k_proj(ctx_tokens), h))], axis=1)
    v = jnp.concatenate([v, _heads(self.add_v_proj(ctx_tokens), h)], axis=1)
    out = layers.self_attention(self.adaspa, q, k, v, ctx.attention)
    out = out.reshape(*out.shape[:2], -1)
    n = ctx.num_video
    return self.to_out(out[:, :n]), self.to_add_out(out[:, n:])


class AdaNormZero(nnx.Module):
  """diffusers' AdaLayerNormZero: six [B, C] modulations from SiLU(temb)."""

  def __init__(self, dim, *, rngs, dtype, chunks=6):
    self.chunks = chunks
    self.linear = linear(dim, chunks * dim, rngs, dtype)

  def __call__(self, temb):
    return jnp.split(self.linear(jax.nn.silu(temb)), self.chunks, axis=-1)


class TransformerBlock(nnx.Module):
  """diffusers' HunyuanVideoTransformerBlock (dual stream)."""

  def __init__(self, config: Config, *, rngs, dtype):
    c = config.inner_dim
    self.norm1 = AdaNormZero(c, rngs=rngs, dtype=dtype)
    self.norm1_context = AdaNormZero(c, rngs=rngs, dtype=dtype)
    self.attn = DualAttention(config, rngs=rngs, dtype=dtype)
    self.ff = FeedForward(c, config.mlp_ratio, gelu_tanh, rngs=rngs, dtype=dtype)
    self.ff_context = FeedForward(c, config.mlp_ratio, gelu_tanh, rngs=rngs, dtype=dtype)

  def __call__(self, x, txt, temb, ctx):
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1(temb)
    c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(temb)
    ax, at = self.attn(modulate(layer_norm(x), shift, scale),
                       modulate(layer_norm(txt), c_shift, c_scale), ctx)
    x = x + ax * gate[:, None]
    txt = txt + at * c_gate[:, None]
    x = x + self.ff(modulate(layer_norm(x), shift_mlp, scale_mlp)) * gate_mlp[:, None]
    ff_txt = self.ff_context(modulate(layer_norm(txt), c_shift_mlp, c_scale_mlp))
    txt = txt + ff_txt * c_gate_mlp[:, None]
    return x, txt


class SingleAttention(nnx.Module):
  """Q/K/V of the single-stream block (no output projection: diffusers' pre_only)."""

  def __init__(self, config: Config, *, rngs, dtype):
    c, d = config.inner_dim, config.attention_head_dim
    self.heads = config.num_attention_heads
    self.to_q, self.to_k, self.to_v = (linear(c, c, rngs, dtype) for _ in range(3))
    self.norm_q, self.norm_k = _qk_rms_norm(d, rngs, dtype), _qk_rms_norm(d, rngs, dtype)
    self.adaspa = layers.adaspa_module(config)

  def __call__(self, h, ctx):
    """h [B, S_pad, C] joint tokens -> [B, S_pad, C]."""
    q = _rope_video(self.norm_q(_heads(self.to_q(h), self.heads)), ctx)
    k = _rope_video(self.norm_k(_heads(self.to_k(h), self.heads)), ctx)
    out = layers.self_attention(self.adaspa, q, k, _heads(self.to_v(h), self.heads),
                                ctx.attention)
    return out.reshape(*out.shape[:2], -1)


class SingleTransformerBlock(nnx.Module):
  """diffusers' HunyuanVideoSingleTransformerBlock on the joint [video | text] sequence."""

  def __init__(self, config: Config, *, rngs, dtype):
    c = config.inner_dim
    mlp = int(c * config.mlp_ratio)
    self.attn = SingleAttention(config, rngs=rngs, dtype=dtype)
    self.norm = AdaNormZero(c, rngs=rngs, dtype=dtype, chunks=3)
    self.proj_mlp = linear(c, mlp, rngs, dtype)
    self.proj_out = linear(c + mlp, c, rngs, dtype)

  def __call__(self, h, temb, ctx):
    shift, scale, gate = self.norm(temb)
    normed = modulate(layer_norm(h), shift, scale)
    attn = self.attn(normed, ctx)
    mlp = gelu_tanh(self.proj_mlp(normed))
    return h + self.proj_out(jnp.concatenate([attn, mlp], axis=-1)) * gate[:, None]


class PatchEmbed(nnx.Module):
  """Conv3d with stride = kernel = (patch_size_t, patch_size, patch_size)."""

  def __init__(self, config: Config, *, rngs, dtype):
    p = (config.patch_size_t, config.patch_size, config.patch_size)
    self.proj = nnx.Conv(config.in_channels, config.inner_dim, kernel_size=p, strides=p,
                         padding="VALID", dtype=dtype, param_dtype=dtype, rngs=rngs)

  def __call__(self, x):
    """x [B, C, F, H, W] -> tokens [B, F'*H'*W', inner_dim]."""
    y = self.proj(jnp.moveaxis(x, 1, -1))
    return y.reshape(y.shape[0], -1, y.shape[-1])


class ConditionEmbedding(nnx.Module):
  """diffusers' HunyuanVideoConditionEmbedding: timestep (+ guidance) + pooled text."""

  def __init__(self, config: Config, *, rngs, dtype):
    c = config.inner_dim
    self.timestep_embedder = TimestepEmbedding(c, rngs=rngs, dtype=dtype)
    self.text_embedder = TextProjection(config.pooled_projection_dim, c, rngs=rngs, dtype=dtype)
    self.guidance_embedder = (TimestepEmbedding(c, rngs=rngs, dtype=dtype)
                              if config.guidance_embeds else None)

  def __call__(self, timestep, pooled, guidance):
    temb = self.timestep_embedder(timestep) + self.text_embedder(pooled)
    if self.guidance_embedder is not None:
      temb = temb + self.guidance_embedder(guidance)
    return temb


class AdaNormOut(nnx.Module):
  """diffusers' AdaLayerNormContinuous (no affine): note the (scale, shift) order."""

  def __init__(self, dim, *, rngs, dtype):
    self.linear = linear(dim, 2 * dim, rngs, dtype)

  def __call__(self, x, temb):
    scale, shift = jnp.split(self.linear(jax.nn.silu(temb)), 2, axis=-1)
    return modulate(layer_norm(x), shift, scale)


def _per_batch(name, value, batch):
  """A scalar or [batch] value -> [batch]."""
  value = jnp.asarray(value)
  if value.shape not in ((), (1,), (batch,)):
    raise ValueError(f"{name} has shape {value.shape}: expected a scalar or [batch={batch}].")
  return jnp.broadcast_to(value.reshape(-1) if value.ndim else value, (batch,))


def _check_batch(name, x, batch, rank_desc):
  if x.shape[0] != batch:
    raise ValueError(f"{name} has shape {tuple(x.shape)}: expected {rank_desc} with batch "
                     f"{batch}.")


class Model(nnx.Module):
  """HunyuanVideoTransformer3DModel.

  Call with diffusers' argument names and layouts; see ``__call__``.
  """

  def __init__(self, config: Config, *, rngs: nnx.Rngs, dtype=jnp.float32):
    if not isinstance(config, Config):
      raise ValueError(f"config={config!r}: expected a adaspa_jax.models.hunyuan_video.Config.")
    self.config = config
    self.dtype = dtype
    c = config.inner_dim
    self.x_embedder = PatchEmbed(config, rngs=rngs, dtype=dtype)
    # diffusers builds the refiner with its default MLP ratio 4, whatever config.mlp_ratio is.
    self.context_embedder = TokenRefiner(config.text_embed_dim, c, config.num_attention_heads,
                                         config.num_refiner_layers, 4.0, rngs=rngs, dtype=dtype)
    self.time_text_embed = ConditionEmbedding(config, rngs=rngs, dtype=dtype)
    self.transformer_blocks = stacked(
        lambda r: TransformerBlock(config, rngs=r, dtype=dtype), config.num_layers, rngs)
    self.single_transformer_blocks = stacked(
        lambda r: SingleTransformerBlock(config, rngs=r, dtype=dtype), config.num_single_layers,
        rngs)
    self.norm_out = AdaNormOut(c, rngs=rngs, dtype=dtype)
    self.proj_out = linear(
        c, config.patch_size_t * config.patch_size ** 2 * config.out_channels, rngs, dtype)

  def _latent_grid(self, shape):
    """(F', H', W') patches of a [B, C, F, H, W] latent."""
    cfg = self.config
    if len(shape) != 5 or shape[1] != cfg.in_channels:
      raise ValueError(f"hidden_states has shape {tuple(shape)}: expected [batch, "
                       f"in_channels={cfg.in_channels}, frames, height, width].")
    grid = (shape[2] // cfg.patch_size_t, shape[3] // cfg.patch_size, shape[4] // cfg.patch_size)
    if min(grid) < 1:
      raise ValueError(f"hidden_states has shape {tuple(shape)}: frames, height, width must be at "
                       f"least the patch sizes ({cfg.patch_size_t}, {cfg.patch_size}, "
                       f"{cfg.patch_size}).")
    return grid

  def adaspa_layout(self, num_video: int, num_text: int) -> BlockLayout:
    """The joint attention's padded block layout: ``num_text`` text tokens (valid and
    padded) after ``num_video`` video tokens."""
    return BlockLayout.create(num_video + num_text, self.config.adaspa.block_size,
                              text_span=(num_video, num_text), pad=True,
                              query_block_size=self.config.adaspa.query_block_size)

  def text_blocks(self, num_video: int, num_text: int):
    """Static bool [nK]: AdaSpa key blocks holding text (the suffix after Nv video tokens)."""
    return self.adaspa_layout(num_video, num_text).text_blocks

  def init_adaspa_state(self, batch: int, num_frames: int, height: int, width: int,
                        text_len: int) -> AdaSpaState:
    """All-dense AdaSpa state for a latent [batch, C, num_frames, height, width] and text_len
    (padded) text tokens; leading axis [num_layers + num_single_layers], dual blocks first."""
    f, h, w = self._latent_grid((batch, self.config.in_channels, num_frames, height, width))
    if not isinstance(text_len, (int, np.integer)) or text_len < 0:
      raise ValueError(f"text_len={text_len!r}: expected an int >= 0.")
    layout = self.adaspa_layout(f * h * w, text_len)
    return init_state(self.config.adaspa, batch, layout.seq_len,
                      self.config.num_attention_heads, num_layers=self.config.total_layers,
                      layout=layout)

  def __call__(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask=None,
               pooled_projections=None, guidance=None, *, adaspa_state=None, adaspa_step=None):
    """Denoiser prediction.

    Args:
      hidden_states: [B, in_channels, F, H, W] latents.
      timestep: [B] diffusion timesteps (float or int).
      encoder_hidden_states: [B, Nt, text_embed_dim] text-encoder tokens.
      encoder_attention_mask: [B, Nt], 1 for valid tokens, a prefix of ones per row;
        None = all valid.
      pooled_projections: [B, pooled_projection_dim].
      guidance: [B] guidance scale (x1000 as in diffusers' pipeline), required
        when ``guidance_embeds``.
      adaspa_state: None for dense attention; else the state of
        ``init_adaspa_state`` (needs ``config.attention == "adaspa"``).
      adaspa_step: the denoising step (int or traced int32 scalar) with a state.

    Returns:
      [B, out_channels, F'*patch_size_t, H'*patch_size, W'*patch_size]; with a
      state, (that output, new state).
    """
    cfg = self.config
    dtype = self.dtype
    b = hidden_states.shape[0]
    f, h, w = self._latent_grid(hidden_states.shape)
    if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != cfg.text_embed_dim:
      raise ValueError(f"encoder_hidden_states has shape {tuple(encoder_hidden_states.shape)}: "
                       f"expected [batch, text_len, text_embed_dim={cfg.text_embed_dim}].")
    _check_batch("encoder_hidden_states", encoder_hidden_states, b, "[batch, text_len, C]")
    num_text = encoder_hidden_states.shape[1]
    if encoder_attention_mask is None:
      encoder_attention_mask = jnp.ones((b, num_text), jnp.int32)
    if encoder_attention_mask.shape != (b, num_text):
      raise ValueError(f"encoder_attention_mask has shape {tuple(encoder_attention_mask.shape)}: "
                       f"expected [batch, text_len] = {(b, num_text)}.")
    if pooled_projections is None or pooled_projections.shape != (b, cfg.pooled_projection_dim):
      raise ValueError(
          f"pooled_projections has shape {getattr(pooled_projections, 'shape', None)}: expected "
          f"[batch, pooled_projection_dim] = {(b, cfg.pooled_projection_dim)}.")
    timestep = _per_batch("timestep", timestep, b)
    if cfg.guidance_embeds:
      if guidance is None:
        raise ValueError("guidance=None: expected [batch] guidance values (the config has "
                         "guidance_embeds=True).")
      guidance = _per_batch("guidance", guidance, b)
    use_adaspa = layers.check_adaspa_state(cfg, adaspa_state, adaspa_step,
                                           num_layers=cfg.total_layers)

    temb = self.time_text_embed(timestep, pooled_projections.astype(dtype), guidance)
    x = self.x_embedder(hidden_states.astype(dtype))
    txt = self.context_embedder(encoder_hidden_states.astype(dtype), timestep,
                                encoder_attention_mask)
    num_video = x.shape[1]
    cos, sin = rope_tables(f, h, w, cfg.rope_axes_dim, cfg.rope_theta)
    layout = self.adaspa_layout(num_video, num_text)
    txt = layout.pad(txt)          # [text; padding]: the joint sequence's padding, once
    kv_lengths = num_video + encoder_attention_mask.astype(jnp.int32).sum(1)
    ctx = _AttnContext(cos=cos, sin=sin, num_video=num_video,
                       attention=layers.AttentionContext.create(
                           cfg, layout, b, kv_lengths=kv_lengths, adaspa_step=adaspa_step,
                           use_adaspa=use_adaspa))

    duals, singles = self.transformer_blocks, self.single_transformer_blocks
    dual_attn = single_attn = None
    if use_adaspa:
      split = lambda lo, hi: jax.tree.map(lambda s: s[lo:hi], adaspa_state)
      sp = cfg.sequence_parallel
      if duals is not None:
        duals, dual_attn = layers.with_adaspa_state(duals, split(0, cfg.num_layers), layout,
                                                    sp)
      if singles is not None:
        singles, single_attn = layers.with_adaspa_state(
            singles, split(cfg.num_layers, cfg.total_layers), layout, sp)

    def dual(block, carry, _):
      return block(*carry, temb, ctx), None

    def single(block, carry, _):
      return block(carry, temb, ctx), None

    (x, txt), _ = scan_layers(duals, dual, (x, txt))
    joint, _ = scan_layers(singles, single, jnp.concatenate([x, txt], axis=1))
    x = self.proj_out(self.norm_out(joint[:, :num_video], temb))

    p, pt = cfg.patch_size, cfg.patch_size_t
    x = x.reshape(b, f, h, w, cfg.out_channels, pt, p, p)
    x = x.transpose(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, cfg.out_channels, f * pt, h * p, w * p)
    if not use_adaspa:
      return x
    states = [m.state for m in (dual_attn, single_attn) if m is not None] or [adaspa_state]
    return x, jax.tree.map(lambda *parts: jnp.concatenate(parts, axis=0), *states)


# --- weights ------------------------------------------------------------------------


def _linear_rules(source: str, target: str) -> list[Rule]:
  """nn.Linear at diffusers prefix ``source`` (regex) -> nnx.Linear at ``target``."""
  return [Rule(source + r"\.weight", target + "/kernel", "linear"),
          Rule(source + r"\.bias", target + "/bias")]


def weight_rules(config: Config) -> list[Rule]:
  """diffusers HunyuanVideoTransformer3DModel keys -> NNX parameter paths.

  One table serves every config: modules a config lacks (e.g. the guidance
  embedder) have no keys, and the loader checks that every parameter is filled.
  """
  dual = r"transformer_blocks\.(?P<layer>\d+)"
  single = r"single_transformer_blocks\.(?P<layer>\d+)"
  refiner = r"context_embedder\.token_refiner\.refiner_blocks\.(?P<layer>\d+)"
  embedder = r"(?P<emb>timestep_embedder|text_embedder|guidance_embedder)\.(?P<lin>linear_[12])"
  rules = [
      Rule(r"x_embedder\.proj\.weight", "x_embedder/proj/kernel", "conv3d"),
      Rule(r"x_embedder\.proj\.bias", "x_embedder/proj/bias"),
      *_linear_rules(r"time_text_embed\." + embedder, "time_text_embed/{emb}/{lin}"),
      *_linear_rules(r"context_embedder\.time_text_embed\." + embedder,
                     "context_embedder/time_text_embed/{emb}/{lin}"),
      *_linear_rules(r"context_embedder\.proj_in", "context_embedder/proj_in"),
      # Refiner blocks.
      Rule(refiner + r"\.(?P<norm>norm[12])\.weight",
           "context_embedder/refiner_blocks/{norm}/scale"),
      Rule(refiner + r"\.(?P<norm>norm[12])\.bias", "context_embedder/refiner_blocks/{norm}/bias"),
      *_linear_rules(refiner + r"\.attn\.(?P<name>to_[qkv])",
                     "context_embedder/refiner_blocks/attn/{name}"),
      *_linear_rules(refiner + r"\.attn\.to_out\.0", "context_embedder/refiner_blocks/attn/to_out"),
      *_linear_rules(refiner + r"\.ff\.net\.0\.proj",
                     "context_embedder/refiner_blocks/ff/net_0/proj"),
      *_linear_rules(refiner + r"\.ff\.net\.2", "context_embedder/refiner_blocks/ff/net_2"),
      *_linear_rules(refiner + r"\.norm_out\.linear", "context_embedder/refiner_blocks/norm_out/linear"),
      # Dual-stream blocks.
      *_linear_rules(dual + r"\.(?P<norm>norm1|norm1_context)\.linear",
                     "transformer_blocks/{norm}/linear"),
      *_linear_rules(dual + r"\.attn\." + r"(?P<name>to_[qkv]|add_[qkv]_proj|to_add_out)",
                     "transformer_blocks/attn/{name}"),
      *_linear_rules(dual + r"\.attn\.to_out\.0", "transformer_blocks/attn/to_out"),
      Rule(dual + r"\.attn\.(?P<name>norm_q|norm_k|norm_added_q|norm_added_k)\.weight",
           "transformer_blocks/attn/{name}/scale"),
      *_linear_rules(dual + r"\.(?P<ff>ff|ff_context)\.net\.0\.proj",
                     "transformer_blocks/{ff}/net_0/proj"),
      *_linear_rules(dual + r"\.(?P<ff>ff|ff_context)\.net\.2", "transformer_blocks/{ff}/net_2"),
      # Single-stream blocks.
      *_linear_rules(single + r"\.attn\.(?P<name>to_[qkv])", "single_transformer_blocks/attn/{name}"),
      Rule(single + r"\.attn\.(?P<name>norm_q|norm_k)\.weight",
           "single_transformer_blocks/attn/{name}/scale"),
      *_linear_rules(single + r"\." + r"(?P<name>proj_mlp|proj_out)",
                     "single_transformer_blocks/{name}"),
      *_linear_rules(single + r"\.norm\.linear", "single_transformer_blocks/norm/linear"),
      # Output.
      *_linear_rules(r"norm_out\.linear", "norm_out/linear"),
      *_linear_rules(r"proj_out", "proj_out"),
  ]
  return rules
