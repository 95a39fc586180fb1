"""``implementation="mosaic"``: the Hopper (sm90) path in Pallas Mosaic GPU.

Same signatures and conventions as ``pallas_kernels.reference`` plus
``interpret``: True runs the kernels under JAX's GPU interpreter on the CPU.

The kernels take bf16/f16, head_dim 64 or 128 and block_size 64 or 128; other
calls go to the Triton path (the reference if that module is missing) with a
one-line warning, never to a kernel that would answer wrongly.

Padding done here so the kernels see whole tiles: the sequence is padded to a
multiple of 128 (padded keys are masked through the valid lengths, padded rows
are cut off), and the block lists to the padded number of query blocks with
count 0.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp

from pallas_kernels import validation
from pallas_kernels.mosaic import interpreter
from pallas_kernels.mosaic import block_mass_kernel
from pallas_kernels.mosaic.block_mass_kernel import block_mass_padded
from pallas_kernels.mosaic.block_sparse_kernel import (
    CTA_ROWS, ROWS_PER_WG, SUPPORTED_BLOCK_SIZES, SUPPORTED_HEAD_DIMS,
    block_sparse_attention_padded)

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
# The fused search's dense pass reads every block, so its tiling is free of the
# selection block size: 128-row query blocks let both compute warpgroups share
# one K/V stream.
DENSE_PASS_BLOCK = 128
_LOG2E = math.log2(math.e)


def unsupported_reason(dtype, head_dim: int, block_size: int) -> str | None:
  """Why the Mosaic kernels cannot take this call, or None if they can."""
  if jnp.dtype(dtype) not in [jnp.dtype(t) for t in SUPPORTED_DTYPES]:
    return f"dtype {jnp.dtype(dtype).name} (kernels take bfloat16/float16)"
  if head_dim not in SUPPORTED_HEAD_DIMS:
    return f"head_dim {head_dim} (kernels take {SUPPORTED_HEAD_DIMS})"
  if block_size not in SUPPORTED_BLOCK_SIZES:
    return f"block_size {block_size} (kernels take {SUPPORTED_BLOCK_SIZES})"
  return None


def _fallback(op: str, reason: str):
  """The module that serves a call the kernels cannot take, after one warning."""
  from pallas_kernels import api  # api imports this module lazily; avoid a cycle.
  try:
    name, mod = api.resolve("triton")
  except ImportError:
    name, mod = api.resolve("reference")
  warnings.warn(f"mosaic {op}: {reason}; using the {name} implementation.", stacklevel=3)
  return name, mod


def _call_fallback(op, reason, interpret, *args, **kwargs):
  name, mod = _fallback(op, reason)
  if name != "reference":
    kwargs["interpret"] = interpret
  return getattr(mod, op)(*args, **kwargs)


def _check_device(interpret: bool):
  if interpret:
    return
  dev = jax.devices()[0]
  if dev.platform != "gpu" or not str(getattr(dev, "compute_capability", "")).startswith("9"):
    raise ValueError(
        f"interpret=False on {dev.device_kind!r}: the mosaic kernels compile for Hopper "
        "(sm90) only; pass interpret=True to run them on the CPU.")


def _padded_len(seq: int, multiple: int = CTA_ROWS) -> int:
  return -(-seq // multiple) * multiple


def _pad_seq(x, s_pad, axis, value=0):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, s_pad - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value) if s_pad != x.shape[axis] else x


def _sparse(qp, kp, vp, idx, counts, lengths, *, seq, block_size, scale, interpret):
  """Runs the sparse kernel on padded q/k/v; returns unpadded-row outputs [.., S_pad]."""
  n_blk = validation.num_blocks(seq, block_size)
  nq_pad = qp.shape[1] // block_size
  k_max = idx.shape[-1]
  dense = counts >= n_blk
  steps = jnp.where(dense, n_blk, jnp.clip(counts, 0, k_max)).astype(jnp.int32)
  idx = _pad_seq(idx, nq_pad, 2)
  steps = _pad_seq(steps, nq_pad, 2)
  dense = _pad_seq(dense.astype(jnp.int32), nq_pad, 2)
  with interpreter.device_context(interpret):
    return block_sparse_attention_padded(
        qp, kp, vp, idx, steps, dense, lengths, block_size=block_size, sm_scale=scale,
        num_kv_blocks=n_blk, interpret=interpreter.params(interpret))


def _mass(qp, kp, lse, lengths, *, seq, block_size, scale, interpret):
  """Block mass from padded q/k and an unpadded [B, H, S] LSE."""
  b, _, h, _ = qp.shape
  n_blk = validation.num_blocks(seq, block_size)
  # Read at trace time, so a benchmark can set them (docs/log/kernel_notes.md).
  key_tile = block_mass_kernel.DEFAULT_KEY_TILE
  s_pad = qp.shape[1]
  kp = _pad_seq(kp, _padded_len(kp.shape[1], max(key_tile, block_size)), 1)  # whole K tiles
  rows_ok = jnp.arange(seq)[None, None, :] < lengths[:, None, None]
  lse2 = jnp.where(rows_ok, lse * _LOG2E, jnp.inf)  # +inf rows add exp2(-inf) = 0.
  lse2 = _pad_seq(lse2, s_pad, 2, jnp.inf)
  with interpreter.device_context(interpret):
    chunks = block_mass_padded(qp, kp, lse2, lengths, block_size=block_size, sm_scale=scale,
                               num_kv_blocks=n_blk,
                               key_tile=key_tile,
                               explicit_barriers=block_mass_kernel.DEFAULT_EXPLICIT_BARRIERS,
                               interpret=interpreter.params(interpret))
  per_block = block_size // ROWS_PER_WG
  mass = chunks.reshape(b, h, s_pad // block_size, per_block, chunks.shape[-1]).sum(3)
  return mass[:, :, :n_blk, :n_blk]


def _finish(out, lse, kv_lengths, lengths, seq):
  """Cuts padding rows; zeroes rows past kv_lengths (output 0, LSE -inf)."""
  out, lse = out[:, :seq], lse[:, :, :seq]
  if kv_lengths is not None:
    rows_ok = jnp.arange(seq)[None, :] < lengths[:, None]
    out = jnp.where(rows_ok[:, :, None, None], out, jnp.zeros((), out.dtype))
    lse = jnp.where(rows_ok[:, None, :], lse, -jnp.inf)
  return out, lse


def block_sparse_attention(q, k, v, kv_block_indices, kv_block_counts, *, block_size,
                           kv_lengths=None, sm_scale=None, return_lse=True, interpret=False):
  """Block-sparse flash attention; see ``reference.block_sparse_attention``.

  Args:
    q, k, v: [B, S, H, D].
    kv_block_indices: int32 [B, H, nQ, K_max]; kv_block_counts: int32 [B, H, nQ].
    interpret: run under JAX's GPU interpreter (CPU).

  Returns:
    out [B, S, H, D] in q's dtype, and lse float32 [B, H, S] if ``return_lse``.
  """
  b, s, h, d, block_size, _, kv_lengths, scale, lengths = validation.block_sparse_call(
      q, k, v, kv_block_indices, kv_block_counts, block_size, kv_lengths, sm_scale)
  reason = unsupported_reason(q.dtype, d, block_size)
  if reason:
    return _call_fallback("block_sparse_attention", reason, interpret, q, k, v,
                          kv_block_indices, kv_block_counts, block_size=block_size,
                          kv_lengths=kv_lengths, sm_scale=scale, return_lse=return_lse)
  _check_device(interpret)
  s_pad = _padded_len(s)
  qp, kp, vp = (_pad_seq(x, s_pad, 1) for x in (q, k, v))
  out, lse = _sparse(qp, kp, vp, kv_block_indices, kv_block_counts, lengths, seq=s,
                     block_size=block_size, scale=scale, interpret=interpret)
  out, lse = _finish(out, lse, kv_lengths, lengths, s)
  return (out, lse) if return_lse else out


def block_mass(q, k, lse, *, block_size, kv_lengths=None, sm_scale=None, interpret=False):
  """Per-block softmax mass from a given LSE; see ``reference.block_mass``.

  Args:
    q, k: [B, S, H, D]; lse: float32 [B, H, S] (natural log).

  Returns:
    float32 [B, H, nQ, nK].
  """
  b, s, h, d, block_size, _, kv_lengths, scale, lengths = validation.block_mass_call(
      q, k, lse, block_size, kv_lengths, sm_scale)
  reason = unsupported_reason(q.dtype, d, block_size)
  if reason:
    return _call_fallback("block_mass", reason, interpret, q, k, lse, block_size=block_size,
                          kv_lengths=kv_lengths, sm_scale=scale)
  _check_device(interpret)
  s_pad = _padded_len(s)
  return _mass(_pad_seq(q, s_pad, 1), _pad_seq(k, s_pad, 1), lse, lengths, seq=s,
               block_size=block_size, scale=scale, interpret=interpret)


def attention_with_block_mass(q, k, v, *, block_size, kv_lengths=None, sm_scale=None,
                              interpret=False):
  """Fused search: the sparse kernel at full density with LSE, then the mass kernel.

  Returns:
    out [B, S, H, D] (q's dtype), lse float32 [B, H, S], mass float32 [B, H, nQ, nK].
  """
  b, s, h, d = validation.check_qkv(q, k, v)
  block_size = validation.check_block_size(block_size)
  kv_lengths = validation.check_kv_lengths(kv_lengths, b)
  scale = validation.default_scale(sm_scale, d)
  reason = unsupported_reason(q.dtype, d, block_size)
  if reason:
    return _call_fallback("attention_with_block_mass", reason, interpret, q, k, v,
                          block_size=block_size, kv_lengths=kv_lengths, sm_scale=scale)
  _check_device(interpret)
  s_pad = _padded_len(s)
  n_dense = validation.num_blocks(s, DENSE_PASS_BLOCK)
  lengths = validation.valid_lengths(kv_lengths, b, s)
  qp, kp, vp = (_pad_seq(x, s_pad, 1) for x in (q, k, v))
  # Count nK marks every row dense, so the one-column list is never read.
  idx = jnp.zeros((b, h, n_dense, 1), jnp.int32)
  counts = jnp.full((b, h, n_dense), n_dense, jnp.int32)
  out, lse = _sparse(qp, kp, vp, idx, counts, lengths, seq=s, block_size=DENSE_PASS_BLOCK,
                     scale=scale, interpret=interpret)
  out, lse = _finish(out, lse, kv_lengths, lengths, s)
  mass = _mass(qp, kp, lse, lengths, seq=s, block_size=block_size, scale=scale,
               interpret=interpret)
  return out, lse, mass
