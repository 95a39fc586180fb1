"""Argument checks shared by every implementation of the attention kernels.

Each check raises ``ValueError`` naming the argument, the value it got and what
was expected, so a wrong call fails at trace time instead of returning a silent
wrong answer.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def num_blocks(seq_len: int, block_size: int) -> int:
  return -(-seq_len // block_size)


def check_block_size(block_size) -> int:
  if (not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool)
      or block_size < 16 or block_size & (block_size - 1)):
    raise ValueError(
        f"block_size={block_size!r}: expected a power of two >= 16 (e.g. 64).")
  return int(block_size)


# Largest query block a call may ask for beside smaller key blocks: 128 rows are one
# CTA of the Mosaic kernels (two warpgroups of 64 rows sharing one K/V ring).
MAX_QUERY_BLOCK_SIZE = 128
# Operand precisions of the attention kernels: "bf16" computes in the inputs' dtype
# (bf16/f16 on the tensor cores, float32 in the reference); "fp8" quantises Q, K, P and V
# to float8_e4m3fn; "int8_fp8" Q and K to int8, P and V to float8_e4m3fn
# (``pallas_kernels.reference.fp8`` is the recipe of both).
PRECISIONS = ("bf16", "fp8", "int8_fp8")
EIGHT_BIT_PRECISIONS = ("fp8", "int8_fp8")


def check_precision(precision) -> str:
  """``precision`` if it is one of ``PRECISIONS``, else ValueError."""
  if precision not in PRECISIONS:
    raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}.")
  return precision


def check_query_block_size(query_block_size, block_size) -> int:
  """The query block size of a call: ``block_size`` for None, else ``query_block_size``
  checked to be a power-of-two multiple of ``block_size`` of at most
  ``max(MAX_QUERY_BLOCK_SIZE, block_size)`` (e.g. 128-row query blocks over 64-key blocks).
  """
  block_size = check_block_size(block_size)
  qbs = query_block_size
  if qbs is None:
    return block_size
  top = max(MAX_QUERY_BLOCK_SIZE, block_size)
  if (not isinstance(qbs, (int, np.integer)) or isinstance(qbs, bool) or qbs < block_size
      or qbs % block_size or qbs & (qbs - 1) or qbs > top):
    raise ValueError(
        f"query_block_size={qbs!r}: expected None (= block_size) or a power-of-two multiple "
        f"of block_size={block_size} that is at most {top} (e.g. 128 over blocks of 64).")
  return int(qbs)


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
  if min(q.shape) < 1:
    raise ValueError(f"q has shape {tuple(q.shape)}: expected every dimension >= 1 "
                     "[batch, seq, heads, head_dim].")
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


def is_concrete(x) -> bool:
  """Whether ``x`` has values now (not a tracer inside jit, vmap or a scan)."""
  return not isinstance(x, jax.core.Tracer)


def check_kv_lengths(kv_lengths, batch: int, seq: int | None = None):
  """Checks kv_lengths [B] (shape, integer dtype and, when concrete and ``seq`` is
  given, values in [0, seq]); returns it as int32, or None."""
  if kv_lengths is None:
    return None
  if getattr(kv_lengths, "ndim", None) != 1 or kv_lengths.shape[0] != batch:
    raise ValueError(
        f"kv_lengths has shape {getattr(kv_lengths, 'shape', None)}: expected [{batch}] "
        "(one valid length per batch element).")
  if not jnp.issubdtype(kv_lengths.dtype, jnp.integer):
    raise ValueError(f"kv_lengths has dtype {kv_lengths.dtype}: expected an integer dtype.")
  if seq is not None and is_concrete(kv_lengths):
    values = np.asarray(kv_lengths)
    bad = np.nonzero((values < 0) | (values > seq))[0]
    if len(bad):
      raise ValueError(f"kv_lengths[{bad[0]}]={values[bad[0]]}: expected valid lengths in "
                       f"[0, seq={seq}].")
  return kv_lengths.astype(jnp.int32)


def check_lse(lse, batch: int, seq: int, heads: int):
  if lse.shape != (batch, heads, seq):
    raise ValueError(
        f"lse has shape {tuple(lse.shape)}: expected [batch, heads, seq] = "
        f"{(batch, heads, seq)}.")
  if lse.dtype != jnp.float32:
    raise ValueError(f"lse has dtype {lse.dtype}: expected float32 (natural log).")


def check_block_lists(indices, counts, batch: int, heads: int, n_q: int, *, seq=None,
                      query_block_size=None):
  """Shapes and dtypes of block lists with ``n_q`` query blocks (``seq`` and
  ``query_block_size``, when given, only explain nQ in the message)."""
  why = ("" if seq is None else
         f" (nQ = ceil(S={seq} / query_block_size={query_block_size}) = {n_q})")
  if indices.ndim != 4 or indices.shape[:3] != (batch, heads, n_q):
    raise ValueError(
        f"kv_block_indices has shape {tuple(indices.shape)}: expected "
        f"[batch, heads, num_query_blocks, K_max] with leading dims {(batch, heads, n_q)}"
        f"{why}.")
  if indices.dtype != jnp.int32:
    raise ValueError(f"kv_block_indices has dtype {indices.dtype}: expected int32.")
  if counts.shape != (batch, heads, n_q):
    raise ValueError(
        f"kv_block_counts has shape {tuple(counts.shape)}: expected {(batch, heads, n_q)}"
        f"{why}.")
  if counts.dtype != jnp.int32:
    raise ValueError(f"kv_block_counts has dtype {counts.dtype}: expected int32.")


def check_block_list_values(indices, counts, num_kv_blocks: int) -> None:
  """ValueError naming the first bad entry of concrete block lists; no-op when traced.

  Valid: counts >= 0, and either <= K_max (the entries a row reads) or >= nK (a dense
  row, whose list is not read); the entries a row reads are block ids in [0, nK),
  without repeats.
  """
  if not (is_concrete(indices) and is_concrete(counts)):
    return
  idx, cnt = np.asarray(indices), np.asarray(counts)
  k_max = idx.shape[-1]
  bad = np.argwhere((cnt < 0) | ((cnt > k_max) & (cnt < num_kv_blocks)))
  if len(bad):
    at = tuple(int(i) for i in bad[0])
    raise ValueError(f"kv_block_counts{list(at)}={cnt[at]}: expected a count in [0, "
                     f"K_max={k_max}] or >= nK={num_kv_blocks} (a dense row).")
  used = (np.arange(k_max) < cnt[..., None]) & (cnt[..., None] < num_kv_blocks)
  bad = np.argwhere(used & ((idx < 0) | (idx >= num_kv_blocks)))
  if len(bad):
    at = tuple(int(i) for i in bad[0])
    raise ValueError(f"kv_block_indices{list(at)}={idx[at]}: expected a key block in "
                     f"[0, nK={num_kv_blocks}).")
  ordered = np.sort(np.where(used, idx, -1 - np.arange(k_max)), axis=-1)
  dup = np.argwhere(ordered[..., 1:] == ordered[..., :-1])
  if len(dup):
    row = tuple(int(i) for i in dup[0][:-1])
    raise ValueError(f"kv_block_indices{list(row)} lists key block "
                     f"{ordered[row][dup[0][-1]]} twice: expected distinct blocks.")


def safe_block_lists(indices, counts, num_kv_blocks: int):
  """The lists with every value a kernel could read kept in bounds, whatever a traced
  list holds: ids clipped to [0, nK), counts to [0, K_max] unless >= nK (dense).

  Valid lists come back unchanged; invalid ones give wrong numbers but never an
  out-of-bounds read (``check_block_list_values`` and ``debug_checks`` catch them).
  """
  k_max = indices.shape[-1]
  indices = jnp.clip(indices, 0, num_kv_blocks - 1)
  counts = jnp.where(counts >= num_kv_blocks, counts, jnp.clip(counts, 0, k_max))
  return indices, counts


def debug_checks(*, kv_lengths=None, seq=None, indices=None, counts=None,
                 num_kv_blocks=None) -> None:
  """``checkify.check`` of traced kv_lengths ([0, seq]) and block lists (as
  ``check_block_list_values``). Only under ``checkify.checkify``: see
  ``AdaSpaConfig.debug_checks``."""
  if kv_lengths is not None:
    checkify.check(jnp.all((kv_lengths >= 0) & (kv_lengths <= seq)),
                   f"kv_lengths={{}}: expected valid lengths in [0, seq={seq}].", kv_lengths)
  if indices is None:
    return
  k_max = indices.shape[-1]
  checkify.check(jnp.all((counts >= 0) & ((counts <= k_max) | (counts >= num_kv_blocks))),
                 f"kv_block_counts: expected counts in [0, K_max={k_max}] or >= "
                 f"nK={num_kv_blocks}; min {{}}, max {{}}.", counts.min(), counts.max())
  used = (jnp.arange(k_max) < counts[..., None]) & (counts[..., None] < num_kv_blocks)
  checkify.check(jnp.all(~used | ((indices >= 0) & (indices < num_kv_blocks))),
                 f"kv_block_indices: expected read entries in [0, nK={num_kv_blocks}).")
  ordered = jnp.sort(jnp.where(used, indices, -1 - jnp.arange(k_max)), axis=-1)
  checkify.check(jnp.all(ordered[..., 1:] != ordered[..., :-1]),
                 "kv_block_indices: a row lists a key block twice; expected distinct blocks.")


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
  kv_lengths = check_kv_lengths(kv_lengths, b, s)
  return Call(b, s, h, d, block_size, num_blocks(s, block_size), kv_lengths,
              default_scale(sm_scale, d), valid_lengths(kv_lengths, b, s))


def block_sparse_call(q, k, v, kv_block_indices, kv_block_counts, block_size, kv_lengths,
                      sm_scale, query_block_size=None) -> Call:
  """Checks the arguments of ``block_sparse_attention`` (every implementation).

  The lists have one row per query block of ``query_block_size`` rows (None: of
  ``block_size`` rows); their entries are key blocks of ``block_size`` keys.
  """
  call = _call(q, k, v, block_size, kv_lengths, sm_scale)
  qbs = check_query_block_size(query_block_size, call.block_size)
  check_block_lists(kv_block_indices, kv_block_counts, call.batch, call.heads,
                    num_blocks(call.seq, qbs), seq=call.seq, query_block_size=qbs)
  check_block_list_values(kv_block_indices, kv_block_counts, call.num_blocks)
  return call


def block_mass_call(q, k, lse, block_size, kv_lengths, sm_scale) -> Call:
  """Checks the arguments of ``block_mass`` (every implementation)."""
  call = _call(q, k, None, block_size, kv_lengths, sm_scale)
  check_lse(lse, call.batch, call.seq, call.heads)
  return call
