"""The embedded text-to-video model: a tiny CogVideoX transformer and its text encoder.

Why CogVideoX: its blocks run *joint* attention over [text; video] in one
sequence, so AdaSpa sees the text sink and the frame-region hierarchy of the
paper; its pipeline already runs classifier-free guidance (the generation CLI
treats a checkpoint of this model as any CogVideoX); and it needs no pooled
text vector, so the text encoder stays a plain token encoder
(``adaspa_jax.models.embedded.text``). The transformer is ``adaspa_jax.models.cogvideox.Model`` with
a small config, nothing new.

Why pixel space: the clips (``adaspa_jax.models.embedded.data``, 8 x 48 x 48 RGB) are
small enough that the transformer can patchify pixels directly (3 x 3 patches ->
8 x 16 x 16 = 2048 video tokens = 32 query blocks of 64), so there is no
autoencoder to train, ship or blame for artefacts, and the caption check reads
the model's output as is. 48 pixels a side (rather than 32) leaves room for
three objects of recognisable size to move without touching.

The text prefix is padded to 64 tokens, one AdaSpa block, so the text sink is
exactly block 0 and every frame (256 tokens) is exactly 4 video blocks.
Positions: 3D RoPE on video (CogVideoX 1.0 style) plus CogVideoX's learned
absolute positional embedding (``add_learned_positions`` says why), learned positions in the
text encoder.

Latents are the pixels: float [B, F, 3, H, W] in [-1, 1] (CogVideoX layout).
Training is rectified flow: x_sigma = (1 - sigma) x0 + sigma noise, the model
predicts noise - x0, and sampling is ``adaspa_jax.models.schedulers.FlowMatchEuler``.

A checkpoint directory holds
  transformer/   config.json + diffusion_pytorch_model.safetensors (diffusers
                 CogVideoXTransformer3DModel layout: ``adaspa_jax.models.from_pretrained``
                 and diffusers both read it)
  text_encoder/  config.json (sizes and vocabulary) + model.safetensors (NNX paths)
  tiny_t2v.json  clip size, sampling defaults and the training record.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from adaspa_jax.extras import require
from adaspa_jax import AdaSpaConfig
from adaspa_jax.models import cogvideox, loading, saving, schedulers
from adaspa_jax.models.embedded.data import VOCABULARY  # the shapes grammar's words
from adaspa_jax.models.embedded.text import TextEncoder, TextEncoderConfig, Tokenizer


@dataclasses.dataclass(frozen=True)
class TinyT2VConfig:
  """Everything that defines the embedded model.

  Attributes:
    transformer: the CogVideoX config (in_channels = out_channels = 3, pixels).
    text: the text encoder (its width is the transformer's text_embed_dim).
    frames, height, width: clip size in pixels.
    flow_shift: sigma shift of the sampling scheduler.
    guidance_scale: classifier-free guidance weight used by default.
    num_steps: default denoising steps.
    adaspa_block_size: AdaSpa block size this model is sampled with by default.
      The paper's 64 cuts HunyuanVideo's 119K tokens into ~1,860 blocks; the
      embedded model's 2,112 tokens make 33, and at sparsity 0.8 its high head
      tier then keeps 3 video blocks per row. Block 32 (66 blocks) keeps twice
      the granularity: on 2 x 50 held-out pairs it passes the caption check as
      often as dense, block 64 24-30 points less (docs/tiny_t2v.md).
    adaspa_head_adaptive: whether the model is sampled with AdaSpa's head tiers by
      default. The tiers exist for long sequences (HunyuanVideo's top tier keeps ~186
      blocks of 64 per row at sparsity 0.8); on the embedded model's 64 video blocks of
      32 the top tier keeps 6, and the shipped checkpoint turns them off (its held-out
      pass rates are in docs/tiny_t2v.md).
  """

  transformer: cogvideox.Config
  text: TextEncoderConfig
  frames: int
  height: int
  width: int
  flow_shift: float = 1.0
  guidance_scale: float = 4.0
  num_steps: int = 25
  adaspa_block_size: int = 64
  adaspa_head_adaptive: bool = True

  def __post_init__(self):
    t, p = self.transformer, self.transformer.patch_size
    b = self.adaspa_block_size
    if not isinstance(self.adaspa_head_adaptive, bool):
      raise ValueError(f"adaspa_head_adaptive={self.adaspa_head_adaptive!r}: expected a bool.")
    if not isinstance(b, (int, np.integer)) or isinstance(b, bool) or b < 16 or b & (b - 1):
      raise ValueError(f"adaspa_block_size={b!r}: expected a power of two >= 16.")
    if t.in_channels != 3 or t.out_channels != 3:
      raise ValueError(f"transformer in/out channels {t.in_channels}/{t.out_channels}: "
                       "expected 3 (RGB pixels).")
    if t.patch_size_t is not None or not t.use_rotary_positional_embeddings:
      raise ValueError("transformer: expected CogVideoX 1.0 patching (patch_size_t=None) with "
                       "rotary positional embeddings.")
    if self.height % p or self.width % p or (self.height, self.width) != (t.sample_height,
                                                                       t.sample_width):
      raise ValueError(f"height x width = {self.height}x{self.width}: expected multiples of "
                       f"patch_size={p} equal to the transformer's sample size "
                       f"{t.sample_height}x{t.sample_width}.")
    if t.text_embed_dim != self.text.width or t.max_text_seq_length != self.text.max_length:
      raise ValueError(f"text width/max_length {self.text.width}/{self.text.max_length}: "
                       f"expected the transformer's text_embed_dim/max_text_seq_length "
                       f"{t.text_embed_dim}/{t.max_text_seq_length}.")

  @property
  def video_tokens(self) -> int:
    p = self.transformer.patch_size
    return self.frames * (self.height // p) * (self.width // p)

  def scheduler(self) -> schedulers.FlowMatchEuler:
    return schedulers.FlowMatchEuler(shift=self.flow_shift, sigma_spacing="linspace")


def _config(*, heads, head_dim, layers, time_dim, text_width, text_len, text_layers,
            text_heads, frames, size, patch, learned_positions=False, adaspa_block_size=64):
  transformer = cogvideox.Config(
      num_attention_heads=heads, attention_head_dim=head_dim, in_channels=3, out_channels=3,
      time_embed_dim=time_dim, text_embed_dim=text_width, num_layers=layers,
      sample_width=size, sample_height=size, sample_frames=frames, patch_size=patch,
      temporal_compression_ratio=1, max_text_seq_length=text_len,
      use_rotary_positional_embeddings=True,
      use_learned_positional_embeddings=learned_positions)
  text = TextEncoderConfig(VOCABULARY, max_length=text_len, width=text_width,
                           num_layers=text_layers, num_heads=text_heads)
  return TinyT2VConfig(transformer, text, frames, size, size,
                       adaspa_block_size=adaspa_block_size)


PRESETS = {
    # The shipped model: 4 heads x 64, 6 blocks; 8 x 48 x 48 clips -> 2048 video tokens
    # + 64 text tokens = 33 blocks of 64. 6.58 M transformer (0.54 M of them the learned
    # positional embedding, added in run 4: see add_learned_positions) + 0.41 M text-encoder
    # parameters: a 14 MB bfloat16 checkpoint. On this repo's 2-core CPU (float32, random
    # weights) one guided step (batch 2) takes ~1.15 s dense, ~1.7 s with AdaSpa.
    "embedded": _config(heads=4, head_dim=64, layers=6, time_dim=64, text_width=128,
                        text_len=64, text_layers=2, text_heads=4, frames=8, size=48, patch=3,
                        learned_positions=True, adaspa_block_size=32),
    # The long model (issue 21): the embedded architecture at AdaSpa's scale, 16 x 96 x 96
    # clips, patch 3 -> 16 frames x 32 x 32 = 16,384 video tokens + 64 text tokens = 257
    # blocks of 64 (each frame 16 blocks). Grown from "embedded" (``grow``): same widths and
    # vocabulary, the learned positional embedding resampled to the larger grid (4.2 M of
    # its 10.3 M parameters). Flow shift 2: four times the pixels per frame keep a layout
    # legible at higher noise (SD3's resolution shift, sqrt(4)).
    "long": dataclasses.replace(
        _config(heads=4, head_dim=64, layers=6, time_dim=64, text_width=128, text_len=64,
                text_layers=2, text_heads=4, frames=16, size=96, patch=3,
                learned_positions=True, adaspa_block_size=64), flow_shift=2.0),
    # CPU tests: 2 x 16 x 16 clips, patch 2 -> 128 video tokens + 24 text tokens.
    "test": _config(heads=2, head_dim=16, layers=2, time_dim=16, text_width=32, text_len=24,
                    text_layers=1, text_heads=2, frames=2, size=16, patch=2),
}


class TinyT2V(nnx.Module):
  """The model's parts: ``transformer(...)`` denoises, ``encode(prompts)`` conditions it."""

  def __init__(self, config: TinyT2VConfig, transformer: cogvideox.Model,
               text_encoder: TextEncoder):
    self.config = config
    self.transformer = transformer
    self.text_encoder = text_encoder

  @property
  def tokenizer(self) -> Tokenizer:
    return Tokenizer(self.config.text.vocabulary, self.config.text.max_length)

  def encode(self, prompts) -> jax.Array:
    """encoder_hidden_states [B, max_length, text width] of the prompts ("" = unconditional)."""
    ids, lengths = self.tokenizer(list(prompts))
    return self.text_encoder(ids, lengths)


def build(config: TinyT2VConfig, *, seed: int = 0, dtype=jnp.float32, attention="dense",
          adaspa: AdaSpaConfig | None = None) -> TinyT2V:
  """A randomly initialised model; the text encoder is float32 whatever ``dtype``."""
  tcfg = dataclasses.replace(config.transformer, attention=attention,
                             **({} if adaspa is None else {"adaspa": adaspa}))
  config = dataclasses.replace(config, transformer=tcfg)
  rngs = nnx.Rngs(seed)
  return TinyT2V(config, cogvideox.Model(tcfg, rngs=rngs, dtype=dtype),
                 TextEncoder(config.text, rngs=rngs))


def add_learned_positions(model: TinyT2V, *, scale: float = 0.25) -> TinyT2V:
  """The model with CogVideoX's learned positional embedding switched on.

  Why: with 3D RoPE alone, positions enter attention scores only as offsets,
  and the text tokens carry none, so what a video token knows about *which*
  frame it is in must be inferred; a model trained that way learned the axis
  of each captioned motion but not its sign (docs/tiny_t2v.md). The learned
  embedding (``use_learned_positional_embeddings``, as in CogVideoX-5B I2V)
  adds absolute (frame, row, col) features to every video token.

  Every existing weight is kept; the new ``patch_embed.pos_embedding`` starts
  as diffusers' sin-cos table times ``scale`` (its full size is comparable
  to a token's norm, too large a jolt for a trained model). A checkpoint saved
  afterwards is an ordinary diffusers CogVideoX one with that option set.

  Args:
    model: a model without the learned embedding.
    scale: factor on the sin-cos initialisation (>= 0).
  """
  t = model.config.transformer
  if t.use_learned_positional_embeddings:
    raise ValueError("model already has use_learned_positional_embeddings=True.")
  if not (isinstance(scale, (int, float)) and scale >= 0):
    raise ValueError(f"scale={scale!r}: expected a float >= 0.")
  tcfg = dataclasses.replace(t, use_learned_positional_embeddings=True)
  old = loading.model_params(model.transformer)
  dtype = next(iter(old.values())).get_value().dtype
  transformer = nnx.eval_shape(lambda: cogvideox.Model(tcfg, rngs=nnx.Rngs(0), dtype=dtype))
  for path, var in loading.model_params(transformer).items():
    if path == "patch_embed/pos_embedding":
      table = cogvideox.sincos_positional_embedding(tcfg, t.sample_height, t.sample_width,
                                                    t.sample_frames)
      var.set_value(jnp.asarray(scale * table, dtype))
    else:
      var.set_value(old[path].get_value())
  config = dataclasses.replace(model.config, transformer=tcfg)
  return TinyT2V(config, transformer, model.text_encoder)


def separate_words(model: TinyT2V, first: str, second: str, *, norm=None) -> TinyT2V:
  """A copy of the model whose two words' token embeddings are pushed apart.

  The pair keeps its mean; its half-difference is rescaled to length ``norm``,
  so the words start as far apart as two unrelated tokens. Why: runs 7 and 8
  of the embedded model left "moves left" and "moves right" unread (swapping
  them changed its output by 1e-4 of its norm) while for horizontal captions the
  transformer stayed almost symmetric under playing its input backwards; a model
  with that symmetry gets the same expected gradient for both words, so their
  small initial difference never grows (docs/tiny_t2v.md).

  Args:
    model: the model; it is not modified.
    first, second: two distinct words of the vocabulary.
    norm: length of the new half-difference (> 0); None: the mean norm of the
      vocabulary's token embeddings.
  """
  vocab = model.config.text.vocabulary
  for name, word in (("first", first), ("second", second)):
    if word not in vocab[2:]:
      raise ValueError(f"{name}={word!r}: expected a word of the vocabulary {vocab[2:]}.")
  if first == second:
    raise ValueError(f"first=second={first!r}: expected two different words.")
  if norm is not None and not (isinstance(norm, (int, float)) and norm > 0):
    raise ValueError(f"norm={norm!r}: expected a float > 0 or None.")
  out = nnx.clone(model)
  table = out.text_encoder.token_embedding.embedding
  e = np.asarray(table.get_value(), np.float64)
  i, j = vocab.index(first), vocab.index(second)
  mean, half = (e[i] + e[j]) / 2, (e[i] - e[j]) / 2
  length = float(np.linalg.norm(e, axis=1).mean()) if norm is None else float(norm)
  half = half * (length / max(np.linalg.norm(half), 1e-12))
  e[i], e[j] = mean + half, mean - half
  table.set_value(jnp.asarray(e, table.get_value().dtype))
  return out


def merge_phrases(model: TinyT2V, phrases, *, norm=None) -> TinyT2V:
  """A copy of the model whose tokenizer reads each phrase as one new token.

  Why: the trained text encoder gathers an object's motion into its colour
  word's slot (two tokens on), which is where the transformer reads it. In
  "a red circle moves left" the direction is three tokens on and never got
  there: swapping "left" and "right" changed that slot's encoding by 0.02
  (against 7.4 for "rises"/"falls") and the output at t = 950 by 4e-4 of its
  norm (run 9, docs/tiny_t2v.md). With "moves left" one token, the direction
  sits where the motion verb sits.

  Each phrase's embedding starts at its first word's (so the model begins by
  reading "moves left" as it read "moves") plus an offset that tells the
  phrases apart: its last word's embedding minus the mean of the phrases' last
  words, rescaled to length ``norm``. The old words stay in the vocabulary.

  Args:
    model: the model; it is not modified.
    phrases: two or more distinct phrases of two or more vocabulary words, not
      already tokens, with distinct last words.
    norm: offset length (> 0); None: the mean norm of the token embeddings.
  """
  vocab = model.config.text.vocabulary
  phrases = tuple(phrases) if not isinstance(phrases, str) else (phrases,)
  split = [p.split(" ") if isinstance(p, str) else [] for p in phrases]
  for p, ws in zip(phrases, split):
    if len(ws) < 2 or any(w not in vocab[2:] for w in ws) or p in vocab:
      raise ValueError(f"phrases has {p!r}: expected a new phrase of two or more vocabulary "
                       f"words {vocab[2:]} separated by single spaces.")
  if len(phrases) < 2 or len({ws[-1] for ws in split}) != len(phrases):
    raise ValueError(f"phrases={phrases!r}: expected two or more phrases with distinct last "
                     "words (their offsets would otherwise coincide).")
  if norm is not None and not (isinstance(norm, (int, float)) and norm > 0):
    raise ValueError(f"norm={norm!r}: expected a float > 0 or None.")
  table = model.text_encoder.token_embedding.embedding.get_value()
  e = np.asarray(table, np.float64)
  last = np.stack([e[vocab.index(ws[-1])] for ws in split])
  offsets = last - last.mean(0)
  length = float(np.linalg.norm(e, axis=1).mean()) if norm is None else float(norm)
  offsets *= length / np.maximum(np.linalg.norm(offsets, axis=1, keepdims=True), 1e-12)
  rows = np.stack([e[vocab.index(ws[0])] for ws in split]) + offsets
  text_cfg = dataclasses.replace(model.config.text, vocabulary=vocab + phrases)
  encoder = nnx.clone(model.text_encoder)
  encoder.config = text_cfg
  encoder.token_embedding = nnx.Embed(len(text_cfg.vocabulary), text_cfg.width,
                                      dtype=table.dtype, param_dtype=table.dtype,
                                      rngs=nnx.Rngs(0))
  encoder.token_embedding.embedding.set_value(
      jnp.asarray(np.concatenate([e, rows]), table.dtype))
  config = dataclasses.replace(model.config, text=text_cfg)
  return TinyT2V(config, nnx.clone(model.transformer), encoder)


def grow(model: TinyT2V, config: TinyT2VConfig) -> TinyT2V:
  """The model moved to a larger clip size: progressive training's next stage.

  Every weight is kept (patch projection, blocks, text encoder and its
  vocabulary); only the learned positional embedding depends on the clip size.
  Its video rows are resampled from the old (frames, rows, cols) grid to the new
  one by trilinear interpolation over normalised coordinates, so a token keeps
  the feature of the same place in the clip; the text rows are kept. RoPE needs
  nothing: it is computed for any size.

  Args:
    model: the trained smaller model.
    config: the target config: the model's architecture (widths, depth, patch,
      text encoder sizes, positional-embedding kind) with another ``frames``,
      ``height``, ``width`` and sampling defaults. The model's vocabulary
      (with any ``merge_phrases``) is kept whatever ``config.text`` says.
  """
  old, new = model.config.transformer, config.transformer
  keep = ("sample_width", "sample_height", "sample_frames", "attention", "adaspa",
          "sequence_parallel")
  same = {f.name: getattr(old, f.name) for f in dataclasses.fields(old) if f.name in keep}
  if dataclasses.replace(new, **same) != old:
    raise ValueError(f"config.transformer={new}: expected the model's architecture {old} "
                     "with another sample size.")
  text = dataclasses.replace(config.text, vocabulary=model.config.text.vocabulary)
  if text != model.config.text:
    raise ValueError(f"config.text={config.text}: expected the model's text encoder "
                     f"{model.config.text} (vocabulary aside).")
  config = dataclasses.replace(config, text=text,
                               transformer=dataclasses.replace(new, **{
                                   k: getattr(old, k) for k in keep[3:]}))
  params = loading.model_params(model.transformer)
  dtype = next(iter(params.values())).get_value().dtype
  tcfg = config.transformer
  transformer = nnx.eval_shape(lambda: cogvideox.Model(tcfg, rngs=nnx.Rngs(0), dtype=dtype))
  for path, var in loading.model_params(transformer).items():
    value = params[path].get_value()
    if path == "patch_embed/pos_embedding":
      value = _resample_positions(np.asarray(value, np.float32), old, tcfg)
    var.set_value(jnp.asarray(value, dtype))
  return TinyT2V(config, transformer, nnx.clone(model.text_encoder))


def _resample_positions(table, old: cogvideox.Config, new: cogvideox.Config) -> np.ndarray:
  """[1, T + F h w, D] learned positions of ``old``'s grid -> ``new``'s (trilinear)."""
  p, t = old.patch_size, old.max_text_seq_length
  src = (old.sample_frames, old.sample_height // p, old.sample_width // p)
  dst = (new.sample_frames, new.sample_height // new.patch_size,
         new.sample_width // new.patch_size)
  grid = table[0, t:].reshape(src + (-1,))
  for axis, (n_in, n_out) in enumerate(zip(src, dst)):
    # Cell centres in [0, 1] of the new grid, located on the old one.
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = (pos - lo).reshape((-1,) + (1,) * (grid.ndim - axis - 1))
    grid = (np.take(grid, lo, axis=axis) * (1 - w) + np.take(grid, hi, axis=axis) * w)
  video = grid.reshape(1, -1, table.shape[-1])
  return np.concatenate([table[:, :t], video], axis=1)


# ---------------------------------------------------------------- pixels <-> latents


def to_latents(video):
  """float [B, F, H, W, 3] in [0, 1] -> [B, F, 3, H, W] in [-1, 1]."""
  return jnp.transpose(2.0 * jnp.asarray(video) - 1.0, (0, 1, 4, 2, 3))


def to_video(latents) -> np.ndarray:
  """[B, F, 3, H, W] -> float32 [B, F, H, W, 3] clipped to [0, 1]."""
  x = np.asarray(latents, np.float32)
  return np.clip((np.transpose(x, (0, 1, 3, 4, 2)) + 1.0) / 2.0, 0.0, 1.0)


def rotary_embedding(config: TinyT2VConfig):
  """CogVideoX's image_rotary_emb for this clip size: (cos, sin) [N, head_dim]."""
  return cogvideox.rotary_positional_embeddings(config.transformer, config.frames,
                                                config.height, config.width)


def sampler_inputs(model: TinyT2V, prompts, *, seed):
  """(noise [B, F, 3, H, W], cond, uncond, shared) for ``adaspa_jax.models.sampler.sample``.

  ``seed``: one int for the whole batch, or one per prompt (each prompt's noise
  then depends on its own seed only).
  """
  cfg = model.config
  shape = (cfg.frames, 3, cfg.height, cfg.width)
  if isinstance(seed, (int, np.integer)):
    noise = np.random.default_rng(seed).standard_normal((len(prompts),) + shape)
  else:
    if len(seed) != len(prompts):
      raise ValueError(f"seed has {len(seed)} entries: expected one per prompt "
                       f"({len(prompts)}) or a single int.")
    noise = np.stack([np.random.default_rng(int(s)).standard_normal(shape) for s in seed])
  noise = noise.astype(np.float32)
  cond = {"encoder_hidden_states": model.encode(prompts)}
  uncond = {"encoder_hidden_states": model.encode([""] * len(prompts))}
  return jnp.asarray(noise), cond, uncond, {"image_rotary_emb": rotary_embedding(cfg)}


def prompt_embeddings(model: TinyT2V, prompt: str) -> dict[str, np.ndarray]:
  """diffusers' CogVideoX prompt tensors for one prompt: ``prompt_embeds`` and
  ``negative_prompt_embeds`` (the empty caption), float32 [1, max_length, width].

  Saved with ``safetensors.numpy.save_file``, they are what
  ``experiments/generate.py --embeddings`` reads for a CogVideoX checkpoint.
  """
  return {"prompt_embeds": np.asarray(model.encode([prompt]), np.float32),
          "negative_prompt_embeds": np.asarray(model.encode([""]), np.float32)}


# ---------------------------------------------------------------- checkpoints

_TRANSFORMER, _TEXT, _META = "transformer", "text_encoder", "tiny_t2v.json"
# Largest weights file written: files of a committed checkpoint stay under 16 MiB.
MAX_FILE_BYTES = 12 * 2**20
_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


def save(model: TinyT2V, directory, *, dtype: str = "bfloat16", record: dict | None = None):
  """Writes a checkpoint directory (see the module docstring); returns its path.

  Args:
    dtype: "bfloat16" (the shipped size) or "float32" for every tensor.
    record: JSON-serialisable facts stored under "training" in tiny_t2v.json
      (command, steps, final loss, ...).
  """
  save_file = require("safetensors.numpy", "train").save_file

  if dtype not in _DTYPES:
    raise ValueError(f"dtype={dtype!r}: expected one of {sorted(_DTYPES)}.")
  directory = os.fspath(directory)
  cfg = model.config
  # tiny_t2v.json marks a complete checkpoint (``read_meta``): removed first, written last,
  # so a save cut short leaves a directory that does not load.
  os.makedirs(directory, exist_ok=True)
  if os.path.exists(os.path.join(directory, _META)):
    os.remove(os.path.join(directory, _META))
  saving.save_pretrained(model.transformer, os.path.join(directory, _TRANSFORMER),
                         class_name="CogVideoXTransformer3DModel",
                         rules=cogvideox.weight_rules(cfg.transformer), dtype=_DTYPES[dtype],
                         max_shard_bytes=MAX_FILE_BYTES)
  text_dir = os.path.join(directory, _TEXT)
  os.makedirs(text_dir, exist_ok=True)
  saving.write_json_atomic(os.path.join(text_dir, "config.json"), dataclasses.asdict(cfg.text))
  tensors = {path: np.ascontiguousarray(np.asarray(var.get_value()).astype(_DTYPES[dtype]))
             for path, var in loading.model_params(model.text_encoder).items()}
  saving.write_atomic(os.path.join(text_dir, "model.safetensors"),
                      lambda tmp: save_file(tensors, tmp))
  meta = {"frames": cfg.frames, "height": cfg.height, "width": cfg.width,
          "flow_shift": cfg.flow_shift, "guidance_scale": cfg.guidance_scale,
          "num_steps": cfg.num_steps, "adaspa_block_size": cfg.adaspa_block_size,
          "adaspa_head_adaptive": cfg.adaspa_head_adaptive,
          "dtype": dtype, "training": record or {}}
  saving.write_json_atomic(os.path.join(directory, _META), meta)
  return directory


def _load_text_encoder(text_dir):
  config_path = os.path.join(text_dir, "config.json")
  try:
    config = TextEncoderConfig(**loading.read_json(config_path))
  except TypeError as e:
    raise ValueError(f"{config_path}: not a text encoder config ({e}).") from None
  encoder = nnx.eval_shape(lambda: TextEncoder(config, rngs=nnx.Rngs(0)))
  files = loading.SafetensorsFiles([os.path.join(text_dir, "model.safetensors")])
  params = loading.model_params(encoder)
  if set(files) != set(params):
    raise ValueError(f"{text_dir}/model.safetensors: keys differ from the text encoder's "
                     f"parameters (missing {sorted(set(params) - set(files))}, unexpected "
                     f"{sorted(set(files) - set(params))}).")
  for path, var in params.items():
    want = var.get_value()
    if files.shape(path) != tuple(want.shape):
      raise ValueError(f"{text_dir}/model.safetensors: {path!r} has shape {files.shape(path)}, "
                       f"expected {tuple(want.shape)}.")
    var.set_value(jnp.asarray(np.asarray(files[path], np.float32), want.dtype))
  return config, encoder


def load(directory, *, dtype=jnp.float32, attention: str = "dense",
         adaspa: AdaSpaConfig | None = None) -> TinyT2V:
  """Reads a checkpoint directory (CPU or accelerator).

  Args:
    dtype: the transformer's parameter and compute dtype (the text encoder is float32).
    attention, adaspa: as in ``adaspa_jax.models.from_pretrained``.
  """
  directory = os.fspath(directory)
  meta = read_meta(directory)
  transformer = loading.from_pretrained(os.path.join(directory, _TRANSFORMER), dtype=dtype,
                                        attention=attention, adaspa=adaspa)
  text_config, encoder = _load_text_encoder(os.path.join(directory, _TEXT))
  config = TinyT2VConfig(transformer.config, text_config, meta["frames"], meta["height"],
                         meta["width"], meta["flow_shift"], meta["guidance_scale"],
                         meta["num_steps"], meta["adaspa_block_size"],
                         meta["adaspa_head_adaptive"])
  return TinyT2V(config, transformer, encoder)


def read_meta(directory) -> dict:
  """A checkpoint's tiny_t2v.json without loading weights; ``adaspa_block_size`` and
  ``adaspa_head_adaptive`` are filled in for checkpoints written before they existed (the
  fields' defaults)."""
  meta_path = os.path.join(os.fspath(directory), _META)
  if not os.path.isfile(meta_path):
    raise ValueError(f"directory={os.fspath(directory)!r}: expected a tiny_t2v checkpoint "
                     f"with {_META}.")
  meta = loading.read_json(meta_path)
  defaults = {name: TinyT2VConfig.__dataclass_fields__[name].default
              for name in ("adaspa_block_size", "adaspa_head_adaptive")}
  return {**defaults, **meta}


def training_record(directory) -> dict:
  """The "training" entry of a checkpoint's tiny_t2v.json."""
  return read_meta(directory)["training"]
