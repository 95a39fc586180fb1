"""Argument checks shared by every implementation of the attention kernels.

Each check raises ``ValueError`` naming the argument, the value it got and what
was expected, so a wrong call fails at trace time instead of returning a silent
wrong answer.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def num_blocks(seq_len: int, block_size: int) -> int:
  return -(-seq_len // block_size)


def check_block_size(block_size) -> int:
  if (not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool)
      or block_size < 16 or block_size & (block_size - 1)):
    raise ValueError(
        f"block_size={block_size!r}: expected a power of two >= 16 (e.g. 64).")
  return int(block_size)


def check_qkv(q, k, v=None):
  """Checks [B, S, H, D] query/key/value shapes and dtypes; returns (B, S, H, D)."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x is None:
      continue
    if x.ndim != 4:
      raise ValueError(
          f"{name} has shape {tuple(x.shape)}: expected rank 4 [batch, seq, heads, head_dim].")
    if x.dtype not in FLOAT_DTYPES:
      raise ValueError(
          f"{name} has dtype {x.dtype}: expected one of float32, bfloat16, float16.")
  for name, x in (("k", k), ("v", v)):
    if x is None:
      continue
    if x.shape != q.shape:
      raise ValueError(
          f"{name} has shape {tuple(x.shape)}: expected the shape of q {tuple(q.shape)} "
          "(self-attention, same heads and head_dim).")
    if x.dtype != q.dtype:
      raise ValueError(f"{name} has dtype {x.dtype}: expected q's dtype {q.dtype}.")
  return q.shape


def check_kv_lengths(kv_lengths, batch: int):
  if kv_lengths is None:
    return None
  if getattr(kv_lengths, "ndim", None) != 1 or kv_lengths.shape[0] != batch:
    raise ValueError(
        f"kv_lengths has shape {getattr(kv_lengths, 'shape', None)}: expected [{batch}] "
        "(one valid length per batch element).")
  if not jnp.issubdtype(kv_lengths.dtype, jnp.integer):
    raise ValueError(f"kv_lengths has dtype {kv_lengths.dtype}: expected an integer dtype.")
  return kv_lengths.astype(jnp.int32)


def check_lse(lse, batch: int, seq: int, heads: int):
  if lse.shape != (batch, heads, seq):
    raise ValueError(
        f"lse has shape {tuple(lse.shape)}: expected [batch, heads, seq] = "
        f"{(batch, heads, seq)}.")
  if lse.dtype != jnp.float32:
    raise ValueError(f"lse has dtype {lse.dtype}: expected float32 (natural log).")


def check_block_lists(indices, counts, batch: int, heads: int, n_q: int):
  if indices.ndim != 4 or indices.shape[:3] != (batch, heads, n_q):
    raise ValueError(
        f"kv_block_indices has shape {tuple(indices.shape)}: expected "
        f"[batch, heads, num_query_blocks, K_max] with leading dims {(batch, heads, n_q)}.")
  if indices.dtype != jnp.int32:
    raise ValueError(f"kv_block_indices has dtype {indices.dtype}: expected int32.")
  if counts.shape != (batch, heads, n_q):
    raise ValueError(
        f"kv_block_counts has shape {tuple(counts.shape)}: expected {(batch, heads, n_q)}.")
  if counts.dtype != jnp.int32:
    raise ValueError(f"kv_block_counts has dtype {counts.dtype}: expected int32.")


def default_scale(sm_scale, head_dim: int) -> float:
  if sm_scale is None:
    return 1.0 / math.sqrt(head_dim)
  if not isinstance(sm_scale, (int, float, np.floating)) or not sm_scale > 0:
    raise ValueError(f"sm_scale={sm_scale!r}: expected a positive Python float or None.")
  return float(sm_scale)


class Call(NamedTuple):
  """A checked kernel call: shapes, the normalised arguments and valid lengths."""
  batch: int
  seq: int
  heads: int
  head_dim: int
  block_size: int
  num_blocks: int
  kv_lengths: object      # int32 [B] or None, as given
  sm_scale: float
  lengths: object         # int32 [B]: kv_lengths clipped to [0, S], S when None


def valid_lengths(kv_lengths, batch: int, seq: int):
  """int32 [B] valid tokens per batch element (S everywhere when kv_lengths is None)."""
  if kv_lengths is None:
    return jnp.full((batch,), seq, jnp.int32)
  return jnp.clip(kv_lengths, 0, seq).astype(jnp.int32)


def _call(q, k, v, block_size, kv_lengths, sm_scale):
  b, s, h, d = check_qkv(q, k, v)
  block_size = check_block_size(block_size)
  kv_lengths = check_kv_lengths(kv_lengths, b)
  return Call(b, s, h, d, block_size, num_blocks(s, block_size), kv_lengths,
              default_scale(sm_scale, d), valid_lengths(kv_lengths, b, s))


def block_sparse_call(q, k, v, kv_block_indices, kv_block_counts, block_size, kv_lengths,
                      sm_scale) -> Call:
  """Checks the arguments of ``block_sparse_attention`` (every implementation)."""
  call = _call(q, k, v, block_size, kv_lengths, sm_scale)
  check_block_lists(kv_block_indices, kv_block_counts, call.batch, call.heads, call.num_blocks)
  return call


def block_mass_call(q, k, lse, block_size, kv_lengths, sm_scale) -> Call:
  """Checks the arguments of ``block_mass`` (every implementation)."""
  call = _call(q, k, None, block_size, kv_lengths, sm_scale)
  check_lse(lse, call.batch, call.seq, call.heads)
  return call
