"""Static block layout: which key blocks hold text, and the budgets that follow.

Text positions are static in every DiT we serve (a prefix in CogVideoX, a suffix
in HunyuanVideo), and they fix the size of the index lists (K_max), so
``text_blocks`` is a concrete numpy bool array, never a traced value.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from pallas_kernels import validation


def text_blocks_mask(seq_len: int, block_size: int, text_start: int, text_len: int) -> np.ndarray:
  """bool [nK]: blocks holding any token of [text_start, text_start + text_len).

  A block that mixes video and text tokens counts as text (the paper's text sink).
  """
  validation.check_block_size(block_size)
  if not 0 <= text_start <= seq_len or text_len < 0 or text_start + text_len > seq_len:
    raise ValueError(
        f"text span [{text_start}, {text_start + text_len}) does not fit seq_len={seq_len}.")
  n_blk = validation.num_blocks(seq_len, block_size)
  mask = np.zeros(n_blk, bool)
  if text_len:
    mask[text_start // block_size:(text_start + text_len - 1) // block_size + 1] = True
  return mask


def static_text_blocks(text_blocks, num_kv_blocks: int, what: str = "key block") -> np.ndarray:
  """Checks and returns text_blocks as numpy bool [nK] (all False when None);
  ``what`` names the blocks in the error (e.g. "query block" for the [nQ] rows)."""
  name = "text_blocks" if what == "key block" else "query_text"
  if text_blocks is None:
    return np.zeros(num_kv_blocks, bool)
  if isinstance(text_blocks, jax.core.Tracer):
    raise ValueError(
        f"{name} is a traced value: expected a static numpy bool array of shape "
        f"[{num_kv_blocks}] (text positions fix K_max, so they must be known at trace time).")
  mask = np.asarray(text_blocks)
  if mask.dtype != bool or mask.shape != (num_kv_blocks,):
    raise ValueError(
        f"{name} has dtype {mask.dtype} and shape {mask.shape}: expected bool "
        f"[{num_kv_blocks}] (one flag per {what}).")
  return mask


def video_budget(sparsity: float, num_video_blocks: int) -> int:
  """k(s) = max(1, round((1 - s) * n_video)) video blocks per query row (round half up)."""
  if num_video_blocks == 0:
    return 0
  k = math.floor((1.0 - sparsity) * num_video_blocks + 0.5)
  return min(num_video_blocks, max(1, k))


def tier_sparsities(sparsity: float) -> tuple[float, float, float]:
  """(high, base, low) tier sparsities of the head hierarchy.

  The paper gives (1+s)/2, s, (3s-1)/2, which keeps the mean over heads at s. For
  s < 1/3 the low tier would be negative: we clamp it at 0 and set the high tier
  to 2s so the mean stays s (then s = 0 keeps every block). Where no clamp is
  needed, 2s - low == (1+s)/2, i.e. exactly the paper's tiers.
  """
  low = max(0.0, (3.0 * sparsity - 1.0) / 2.0)
  return 2.0 * sparsity - low, sparsity, low


def required_k_max(sparsity: float, text_blocks: np.ndarray, head_adaptive: bool) -> int:
  """Smallest static K_max that holds every row of a selection: lowest tier + text blocks."""
  n_text = int(text_blocks.sum())
  n_video = text_blocks.size - n_text
  low = tier_sparsities(sparsity)[2] if head_adaptive else sparsity
  return max(1, video_budget(low, n_video) + n_text)
