"""The static block layout of one self/joint attention: tokens, blocks, text, padding.

A ``BlockLayout`` is built and checked once per model call (``BlockLayout.create``)
and handed down to every layer's attention (``adaspa_attention(..., layout=)``,
``adaspa_jax.parallel``, the policies, ``init_state``), which read the block count,
the text blocks and the padding from it instead of recomputing them. It is a frozen,
hashable dataclass, so it can be a static argument or a module attribute.

Padding. The kernels tile the sequence by ``SEQ_MULTIPLE`` rows and pad q, k, v to
a multiple of it when a call's sequence is not one. A model pads its joint token
sequence once, before its layer stack, to ``padded_len`` (``BlockLayout.create(...,
pad=True)``: the next multiple of ``max(SEQ_MULTIPLE, block_size, query_block_size)``,
i.e. of their lcm, all being powers of two), runs every
layer on the padded sequence with ``kv_lengths`` marking the real tokens (padded
keys masked, padded rows zero), and cuts the padding once at the end; the
kernels' own pad is then a no-op. The AdaSpa state keeps the real layout
(``seq_len`` tokens, ``num_blocks`` key blocks, ``num_query_blocks`` query blocks), so
a padded and an unpadded call give the same state; ``kernel_lists`` / ``kernel_lse`` /
``real_mass`` convert between the state's blocks and the padded kernel call's where
the block counts differ.

Query blocks. With ``query_block_size`` larger than ``block_size`` (e.g. 128 x 64) the
block lists and the block mass have one row per query block of ``query_block_size``
rows (``num_query_blocks``), over key blocks of ``block_size`` keys (``num_blocks``);
a query block holding any text token is a dense row (``query_text_blocks``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from adaspa_jax import blocks
from pallas_kernels import validation

# Rows per tile of the kernels' sequence axis: the Mosaic kernels pad q, k, v to a
# multiple of it (128-row CTAs; pallas_kernels/mosaic.py), the Triton and reference
# kernels to a multiple of the block size or of their tile / chunk, each of which
# divides a multiple of max(SEQ_MULTIPLE, block_size) for the sizes the models
# use. pallas_kernels exports no such constant; tests/adaspa_jax/test_layout.py
# checks that a sequence padded to it reaches the Mosaic kernels without a pad.
SEQ_MULTIPLE = 128


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def check_text_span(text_span, seq_len: int) -> tuple[int, int]:
  """(start, length) of text tokens that are a prefix or a suffix of ``seq_len``
  tokens; (0, 0) for None or an empty span. ``ValueError`` naming text_span."""
  if text_span is None:
    return 0, 0
  if (not isinstance(text_span, (tuple, list)) or len(text_span) != 2
      or not all(_is_int(x) for x in text_span)):
    raise ValueError(f"text_span={text_span!r}: expected None or (start, length) ints.")
  start, length = (int(x) for x in text_span)
  if length == 0:
    return 0, 0
  if length < 0 or start < 0 or start + length > seq_len or (start and start + length != seq_len):
    raise ValueError(f"text_span={tuple(text_span)}: expected (start, length) of a prefix "
                     f"(start 0) or a suffix (start + length = seq_len={seq_len}).")
  return start, length


@dataclasses.dataclass(frozen=True)
class BlockLayout:
  """Where the blocks, the text and the padding of one attention's sequence are.

  Build it with ``BlockLayout.create``; the fields are checked on construction.

  Attributes:
    seq_len: S, the real tokens (text and video); the state's length.
    block_size: tokens per block (``AdaSpaConfig.block_size``).
    padded_len: length of the q, k, v the kernels see: ``seq_len``, or more when
      the model padded its sequence (tokens past ``seq_len`` are padding).
    text_span: (start, length) of the text tokens (a prefix, a suffix, or (0, 0)
      without text), or None when the text blocks were given only as a mask.
    text_mask: per (key) block of the real sequence, whether it holds text (a block
      mixing text and video counts as text: the paper's text sink).
    query_block_size: rows per query block of the block lists
      (``AdaSpaConfig.query_block_size``); None at construction means
      ``block_size`` and is stored as it.
  """

  seq_len: int
  block_size: int
  padded_len: int
  text_span: tuple[int, int] | None
  text_mask: tuple[bool, ...]
  query_block_size: int | None = None

  def __post_init__(self):
    if not _is_int(self.seq_len) or self.seq_len < 1:
      raise ValueError(f"seq_len={self.seq_len!r}: expected a positive int.")
    validation.check_block_size(self.block_size)
    object.__setattr__(self, "query_block_size", validation.check_query_block_size(
        self.query_block_size, self.block_size))
    if not _is_int(self.padded_len) or self.padded_len < self.seq_len:
      raise ValueError(f"padded_len={self.padded_len!r}: expected an int >= "
                       f"seq_len={self.seq_len}.")
    n_blk = validation.num_blocks(self.seq_len, self.block_size)
    if (not isinstance(self.text_mask, tuple) or len(self.text_mask) != n_blk
        or not all(isinstance(t, bool) for t in self.text_mask)):
      raise ValueError(f"text_mask has {len(self.text_mask)} entries: expected a tuple of "
                       f"{n_blk} bools (one per block of seq_len={self.seq_len}).")
    if self.text_span is not None:
      span = check_text_span(self.text_span, self.seq_len)
      if tuple(self.text_span) != span or self._span_mask(span) != self.text_mask:
        raise ValueError(f"text_span={self.text_span!r}: expected the span that gives "
                         "text_mask (use BlockLayout.create).")

  def _span_mask(self, span) -> tuple[bool, ...]:
    return tuple(bool(t) for t in blocks.text_blocks_mask(self.seq_len, self.block_size, *span))

  @classmethod
  def create(cls, seq_len: int, block_size: int, *, text_span=None, text_blocks=None,
             pad: bool = False, query_block_size: int | None = None) -> "BlockLayout":
    """The layout of ``seq_len`` tokens in blocks of ``block_size``.

    Args:
      text_span: (start, length) of the text tokens, a prefix or a suffix, or None.
      text_blocks: alternatively a static numpy bool [nK] mask of the text blocks
        (``adaspa_jax.text_blocks_mask``), or None; not with ``text_span``.
      pad: pad the sequence to the next multiple of ``max(SEQ_MULTIPLE,
        block_size, query_block_size)`` (what a model does once before its layers).
      query_block_size: rows per query block (``AdaSpaConfig.query_block_size``);
        None for ``block_size``.
    """
    if not _is_int(seq_len) or seq_len < 1:
      raise ValueError(f"seq_len={seq_len!r}: expected a positive int.")
    block_size = validation.check_block_size(block_size)
    query_block_size = validation.check_query_block_size(query_block_size, block_size)
    n_blk = validation.num_blocks(seq_len, block_size)
    if text_blocks is not None and text_span is not None:
      raise ValueError("text_span and text_blocks both given: expected one of them.")
    if text_blocks is not None:
      span, mask = None, blocks.static_text_blocks(text_blocks, n_blk)
    else:
      span = check_text_span(text_span, seq_len)
      mask = blocks.text_blocks_mask(seq_len, block_size, *span)
    multiple = max(SEQ_MULTIPLE, block_size, query_block_size)  # powers of two: the lcm
    padded = -(-seq_len // multiple) * multiple if pad else seq_len
    return cls(seq_len=int(seq_len), block_size=block_size, padded_len=int(padded),
               text_span=span, text_mask=tuple(bool(t) for t in mask),
               query_block_size=query_block_size)

  # ------------------------------------------------------------------ derived

  @property
  def num_blocks(self) -> int:
    """nK: key blocks of the real sequence (also the query blocks when
    ``query_block_size == block_size``)."""
    return len(self.text_mask)

  @property
  def padded_blocks(self) -> int:
    """Key blocks of the padded sequence, as the kernels count them."""
    return validation.num_blocks(self.padded_len, self.block_size)

  @property
  def query_ratio(self) -> int:
    """Key blocks per query block (1 for square blocks)."""
    return self.query_block_size // self.block_size

  @property
  def num_query_blocks(self) -> int:
    """nQ: query blocks of the real sequence (the state's list rows)."""
    return validation.num_blocks(self.seq_len, self.query_block_size)

  @property
  def padded_query_blocks(self) -> int:
    """Query blocks of the padded sequence, as the kernels count them."""
    return validation.num_blocks(self.padded_len, self.query_block_size)

  @functools.cached_property
  def query_text_blocks(self) -> np.ndarray:
    """numpy bool [nQ] (read-only): the query blocks holding any text token (dense
    rows); ``text_blocks`` itself for square blocks."""
    r = self.query_ratio
    if r == 1:
      return self.text_blocks
    mask = np.zeros(self.num_query_blocks * r, bool)
    mask[:self.num_blocks] = self.text_blocks
    mask = mask.reshape(-1, r).any(-1)
    mask.setflags(write=False)
    return mask

  @property
  def is_padded(self) -> bool:
    return self.padded_len > self.seq_len

  @functools.cached_property
  def text_blocks(self) -> np.ndarray:
    """numpy bool [nK] (read-only): the text blocks."""
    mask = np.asarray(self.text_mask, bool)
    mask.setflags(write=False)
    return mask

  @property
  def num_text_blocks(self) -> int:
    return int(sum(self.text_mask))

  @property
  def num_video_blocks(self) -> int:
    return self.num_blocks - self.num_text_blocks

  @property
  def text_tokens(self) -> tuple[int, int]:
    """(start, length) of the text tokens; ``ValueError`` for a mask-only layout."""
    if self.text_span is None:
      raise ValueError("text_span=None: this layout has its text blocks as a mask only; "
                       "expected a layout built with text_span=(start, length).")
    return self.text_span

  @property
  def video_tokens(self) -> tuple[int, int]:
    """[start, stop) of the video tokens: the part a sequence-parallel mesh shards.
    Before it sits a text prefix, after it a text suffix and the padding."""
    start, length = self.text_tokens
    if length == 0:
      return 0, self.seq_len
    return (length, self.seq_len) if start == 0 else (0, start)

  # ------------------------------------------------------------------ arrays

  def kv_lengths(self, kv_lengths, batch: int):
    """The kernels' valid lengths: ``kv_lengths`` as given, or ``seq_len`` for every
    row of a padded layout (None for an unpadded layout without lengths)."""
    if kv_lengths is None and self.is_padded:
      return jnp.full((batch,), self.seq_len, jnp.int32)
    return kv_lengths

  def pad(self, x, axis: int = 1):
    """x with ``axis`` (``seq_len`` long, or ``seq_len`` minus a prefix/suffix that
    is not there yet) padded with zeros by ``padded_len - seq_len`` at its end."""
    if not self.is_padded:
      return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, self.padded_len - self.seq_len)
    return jnp.pad(x, widths)

  def kernel_lists(self, indices, counts):
    """The state's block lists [B, H, nQ, K] / [B, H, nQ] for a kernel call on the
    padded sequence: dense rows (count >= nK) marked dense for the padded block
    count, and query blocks made only of padding appended with count 0 (the
    kernels zero those rows anyway). Unchanged when the block counts agree."""
    n_blk, n_pad = self.num_blocks, self.padded_blocks
    extra = self.padded_query_blocks - self.num_query_blocks
    if n_pad == n_blk and not extra:
      return indices, counts
    counts = jnp.where(counts >= n_blk, n_pad, counts)
    indices = jnp.pad(indices, [(0, 0)] * (indices.ndim - 2) + [(0, extra), (0, 0)])
    counts = jnp.pad(counts, [(0, 0)] * (counts.ndim - 1) + [(0, extra)])
    return indices, counts

  def kernel_lse(self, lse):
    """The state's LSE [B, H, S] for a kernel call on the padded sequence (padded
    rows are past ``kv_lengths``, which the kernels skip)."""
    if not self.is_padded:
      return lse
    return jnp.pad(lse, ((0, 0), (0, 0), (0, self.padded_len - self.seq_len)))

  def real_lse(self, lse):
    """A padded kernel call's LSE [B, H, S_pad] -> the state's [B, H, S]."""
    return lse[:, :, :self.seq_len] if self.is_padded else lse

  def real_mass(self, mass):
    """A padded kernel call's block mass [B, H, nQ_pad, nK_pad] -> [B, H, nQ, nK]."""
    n_q, n_k = self.num_query_blocks, self.num_blocks
    if self.padded_blocks == n_k and self.padded_query_blocks == n_q:
      return mass
    return mass[:, :, :n_q, :n_k]

  def real(self, x, axis: int = 1):
    """x cut to the real tokens along ``axis`` (the inverse of ``pad``)."""
    if not self.is_padded:
      return x
    return jax.lax.slice_in_dim(x, 0, x.shape[axis] - (self.padded_len - self.seq_len),
                                axis=axis)
