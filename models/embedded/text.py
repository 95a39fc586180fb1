"""The embedded model's text side: a word-level tokenizer and a small text encoder.

The caption grammar is closed (``adaspa_jax.models.embedded.data.VOCABULARY``), so the
tokenizer is a word list: ids are positions in it, every caption starts with
the start token ``<s>`` (the empty caption, used for classifier-free guidance,
is ``<s>`` alone, so no row is ever all padding) and is padded with ``<pad>``
(id 0) to ``max_length``. A vocabulary entry may be a phrase of several words
("moves left"): the tokenizer then reads those words as one token, longest
phrase first, the way a BPE merge does (see ``tiny_t2v.merge_phrases`` for why).

The encoder is token + learned position embeddings, ``num_layers`` pre-norm
transformer layers (self-attention over the caption's valid tokens, GELU MLP),
and a final layer norm; padded positions come out as zeros, so they carry
nothing about the caption. It produces CogVideoX's ``encoder_hidden_states``
[B, max_length, width].
"""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from adaspa_jax.models import layers
from adaspa_jax.models.hunyuan_video_layers import RefinerAttention

PAD, START = "<pad>", "<s>"
_LN_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
  """Tokenizer and encoder sizes (saved as the text encoder's config.json)."""

  vocabulary: tuple[str, ...]
  max_length: int = 64
  width: int = 128
  num_layers: int = 2
  num_heads: int = 4
  mlp_ratio: float = 4.0

  def __post_init__(self):
    object.__setattr__(self, "vocabulary", tuple(self.vocabulary))
    v = self.vocabulary
    if len(v) < 3 or v[:2] != (PAD, START) or len(set(v)) != len(v):
      raise ValueError(f"vocabulary={v!r}: expected distinct words starting with "
                       f"({PAD!r}, {START!r}).")
    bad = [w for w in v[2:] if not isinstance(w, str) or " ".join(words(w)) != w]
    if bad:
      raise ValueError(f"vocabulary has entries {bad!r}: expected lower-case words or commas, "
                       "a phrase's words separated by single spaces.")
    for name in ("max_length", "width", "num_layers", "num_heads"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r}: expected a positive int.")
    if self.width % self.num_heads:
      raise ValueError(f"width={self.width} with num_heads={self.num_heads}: expected width "
                       "divisible by num_heads.")
    if self.max_length < 2:
      raise ValueError(f"max_length={self.max_length}: expected at least 2 (<s> and a word).")


def words(text: str) -> list[str]:
  """The caption's words as the tokenizer sees them (commas are words)."""
  return re.findall(r"[a-z]+|,", text.lower())


class Tokenizer:
  """Words (and commas) of a caption -> ids int32 [B, max_length] and lengths int32 [B].

  Phrase entries of the vocabulary win over their words: at each position the
  longest phrase that matches the next words is one token.
  """

  def __init__(self, vocabulary, max_length: int):
    self.vocabulary = tuple(vocabulary)
    self.max_length = int(max_length)
    self._ids = {w: i for i, w in enumerate(self.vocabulary)}
    self._longest = max(len(w.split(" ")) for w in self.vocabulary)

  def _tokens(self, text: str) -> list[str]:
    ws, out, i = words(text), [START], 0
    while i < len(ws):
      n = next((n for n in range(min(self._longest, len(ws) - i), 1, -1)
                if " ".join(ws[i:i + n]) in self._ids), 1)
      out.append(" ".join(ws[i:i + n]))
      i += n
    return out

  def __call__(self, texts):
    """Returns (ids, lengths); raises ValueError on an unknown word or a long caption."""
    if isinstance(texts, str):
      raise ValueError(f"texts={texts!r}: expected a sequence of strings (a batch).")
    ids = np.zeros((len(texts), self.max_length), np.int32)
    lengths = np.zeros(len(texts), np.int32)
    for b, text in enumerate(texts):
      tokens = self._tokens(text)
      unknown = [w for w in tokens if w not in self._ids]
      if unknown:
        raise ValueError(f"caption {text!r} has words {unknown} outside the vocabulary "
                         f"{self.vocabulary[2:]}.")
      if len(tokens) > self.max_length:
        raise ValueError(f"caption {text!r} has {len(tokens)} tokens with <s>: expected at "
                         f"most max_length={self.max_length}.")
      ids[b, :len(tokens)] = [self._ids[w] for w in tokens]
      lengths[b] = len(tokens)
    return ids, lengths

  def decode(self, ids, lengths) -> list[str]:
    """Inverse of ``__call__`` up to spacing before commas."""
    out = []
    for row, n in zip(np.asarray(ids), np.asarray(lengths)):
      words = [self.vocabulary[i] for i in row[1:n]]
      out.append(" ".join(words).replace(" ,", ","))
    return out


class _Layer(nnx.Module):
  """Pre-norm transformer layer over the valid tokens."""

  def __init__(self, cfg: TextEncoderConfig, *, rngs, dtype):
    w = cfg.width
    self.norm1 = layers.LayerNorm(w, _LN_EPS)
    self.attn = RefinerAttention(w, cfg.num_heads, rngs=rngs, dtype=dtype)
    self.norm2 = layers.LayerNorm(w, _LN_EPS)
    self.ff = layers.FeedForward(w, int(w * cfg.mlp_ratio), approximate=True, rngs=rngs,
                                 dtype=dtype)

  def __call__(self, x, lengths):
    x = x + self.attn(self.norm1(x), lengths)
    return x + self.ff(self.norm2(x))


class TextEncoder(nnx.Module):
  """``TextEncoder(config, rngs=nnx.Rngs(0))``; call with (ids, lengths) from ``Tokenizer``."""

  def __init__(self, config: TextEncoderConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.config = config
    w = config.width
    self.token_embedding = nnx.Embed(len(config.vocabulary), w, dtype=dtype, param_dtype=dtype,
                                     rngs=rngs)
    self.position_embedding = nnx.Param(
        0.02 * nnx.initializers.normal(1.0)(rngs.params(), (config.max_length, w), dtype))
    self.layers = layers.stack_layers(lambda r: _Layer(config, rngs=r, dtype=dtype),
                                      config.num_layers, rngs)
    self.norm_out = layers.LayerNorm(w, _LN_EPS)

  def __call__(self, ids, lengths):
    """ids int [B, T], lengths int [B] (T <= max_length) -> [B, T, width]; padding rows 0."""
    ids, lengths = jnp.asarray(ids), jnp.asarray(lengths, jnp.int32)
    cfg = self.config
    if ids.ndim != 2 or ids.shape[1] > cfg.max_length or not jnp.issubdtype(ids.dtype,
                                                                             jnp.integer):
      raise ValueError(f"ids has shape {ids.shape} and dtype {ids.dtype}: expected integer "
                       f"[batch, tokens <= max_length={cfg.max_length}].")
    if lengths.shape != ids.shape[:1]:
      raise ValueError(f"lengths has shape {lengths.shape}: expected [{ids.shape[0]}].")
    t = ids.shape[1]
    x = self.token_embedding(ids) + self.position_embedding[:t].astype(
        self.token_embedding.dtype)
    x, _ = layers.scan_layers(self.layers, lambda layer, h, _: (layer(h, lengths), None), x)
    valid = jnp.arange(t)[None, :, None] < lengths[:, None, None]
    return jnp.where(valid, self.norm_out(x), 0).astype(x.dtype)
