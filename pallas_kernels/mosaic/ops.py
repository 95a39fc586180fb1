"""``implementation="mosaic"``: the Hopper (sm90) path in Pallas Mosaic GPU.

Same signatures and conventions as ``pallas_kernels.reference`` plus
``interpret``: True runs the kernels under JAX's GPU interpreter on the CPU.

The kernels take bf16/f16, head_dim 64 or 128 and block_size 64 or 128; other
calls go to the Triton path (the reference if that module is missing) with a
one-line warning, never to a kernel that would answer wrongly.

Padding done here so the kernels see whole tiles: the sequence is padded to a
multiple of 128 (padded keys are masked through the valid lengths, padded rows
are cut off), K for the block mass to whole key tiles, and the block lists to the
padded number of query blocks with count 0 (``padded_len``, ``pad_seq``,
``kernel_lists``, ``log2_lse``).

Query blocks larger than key blocks (``query_block_size=``): 128 x 64 runs the
block-sparse kernel's native path (one list per 128-row CTA, both compute warpgroups
sharing one ring of 64-key stages; ``block_sparse_kernel.SUPPORTED_TILINGS``); other
pairs expand the lists to ``block_size``-row query blocks (``_expand_query_blocks``).
The block mass is computed at ``block_size`` rows and summed into query blocks
(``query_blocks.coarsen_mass``).

Tuning: ``config`` (a ``BlockSparseConfig``: the block-sparse kernel, and the fused
search's dense pass) and ``mass_config`` / ``config`` of ``block_mass`` (a
``BlockMassConfig``); None for the kernel modules' ``DEFAULT_CONFIG``.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from pallas_kernels import query_blocks, validation
from pallas_kernels.mosaic import block_mass_kernel, block_sparse_kernel, interpreter
from pallas_kernels.mosaic.block_mass_kernel import BlockMassConfig, block_mass_padded
from pallas_kernels.mosaic.block_sparse_kernel import (
    SUPPORTED_BLOCK_SIZES, SUPPORTED_HEAD_DIMS, block_sparse_attention_padded)
from pallas_kernels.mosaic.common import CTA_ROWS, LOG2E, ROWS_PER_WG

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
# The fused search's dense pass reads every block, so its tiling is free of the
# selection block size: 128-row query blocks let both compute warpgroups share
# one K/V stream.
DENSE_PASS_BLOCK = 128


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


def padded_len(seq: int, multiple: int = CTA_ROWS) -> int:
  """The least multiple of ``multiple`` (default: the rows of a CTA) >= seq."""
  return -(-seq // multiple) * multiple


def pad_seq(x, s_pad, axis, value=0):
  """``x`` padded with ``value`` to ``s_pad`` entries along ``axis`` (as is if it has them)."""
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, s_pad - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value) if s_pad != x.shape[axis] else x


def kernel_lists(kv_block_indices, kv_block_counts, *, num_kv_blocks, num_query_blocks):
  """Block lists as ``block_sparse_attention_padded`` reads them.

  Args:
    kv_block_indices: int32 [B, H, nQ, K_max]; kv_block_counts: int32 [B, H, nQ]
      (the API's lists: a count >= nK marks a dense row).
    num_kv_blocks: nK.
    num_query_blocks: nQ_pad >= nQ, the query blocks of the padded sequence.

  Returns:
    (indices, steps, dense_rows), each padded to nQ_pad query blocks with zeros:
    int32 [B, H, nQ_pad, K_max], int32 [B, H, nQ_pad] (key blocks each row reads,
    nK for a dense row, else its count clipped to [0, K_max]) and int32 [B, H, nQ_pad]
    (1 on dense rows).
  """
  dense = kv_block_counts >= num_kv_blocks
  steps = jnp.where(dense, num_kv_blocks,
                    jnp.clip(kv_block_counts, 0, kv_block_indices.shape[-1])).astype(jnp.int32)
  return (pad_seq(kv_block_indices, num_query_blocks, 2), pad_seq(steps, num_query_blocks, 2),
          pad_seq(dense.astype(jnp.int32), num_query_blocks, 2))


def log2_lse(lse, lengths, s_pad):
  """The row LSE as ``block_mass_padded`` takes it.

  Args:
    lse: float32 [B, H, S], natural log.
    lengths: int32 [B], valid rows per batch element.
    s_pad: rows of the padded q.

  Returns:
    float32 [B, H, s_pad] in log2 units, +inf on rows past ``lengths`` and on the
    padding (they add exp2(-inf) = 0).
  """
  rows_ok = jnp.arange(lse.shape[2])[None, None, :] < lengths[:, None, None]
  return pad_seq(jnp.where(rows_ok, lse * LOG2E, jnp.inf), s_pad, 2, jnp.inf)


def _expand_query_blocks(indices, counts, *, seq, block_size, query_block_size):
  """Lists the block-sparse kernel runs: (indices, counts, their query-block rows).

  A tiling in ``block_sparse_kernel.SUPPORTED_TILINGS`` (64 x 64, 128 x 128, 128 x 64)
  runs natively: the lists as given. Any other pair is expanded to ``block_size``-row
  query blocks (``query_blocks.expand_lists``: each fine query block reads its query
  block's list), which the square kernel runs.
  """
  if (query_block_size, block_size) in block_sparse_kernel.SUPPORTED_TILINGS:
    return indices, counts, query_block_size
  indices, counts = query_blocks.expand_lists(indices, counts, seq=seq, block_size=block_size,
                                              query_block_size=query_block_size)
  return indices, counts, block_size


def _sparse(qp, kp, vp, idx, counts, lengths, *, seq, block_size, scale, config, interpret,
            query_block_size=None):
  """Runs the sparse kernel on padded q/k/v; returns unpadded-row outputs [.., S_pad].

  ``idx``/``counts`` have one row per ``query_block_size`` (None: ``block_size``) rows,
  a tiling in ``block_sparse_kernel.SUPPORTED_TILINGS``."""
  qbs = query_block_size or block_size
  n_blk = validation.num_blocks(seq, block_size)
  idx, steps, dense = kernel_lists(idx, counts, num_kv_blocks=n_blk,
                                   num_query_blocks=qp.shape[1] // qbs)
  with interpreter.device_context(interpret):
    return block_sparse_attention_padded(
        qp, kp, vp, idx, steps, dense, lengths, block_size=block_size, sm_scale=scale,
        num_kv_blocks=n_blk, config=config, interpret=interpreter.params(interpret),
        query_block_size=qbs)


def _mass(qp, kp, lse, lengths, *, seq, block_size, scale, config, interpret):
  """Block mass from padded q/k and an unpadded [B, H, S] LSE."""
  b, _, h, _ = qp.shape
  n_blk = validation.num_blocks(seq, block_size)
  s_pad = qp.shape[1]
  if not isinstance(config, BlockMassConfig):
    raise ValueError(f"config={config!r}: expected a pallas_kernels.mosaic.BlockMassConfig.")
  key_tile = config.key_tile or block_size
  kp = pad_seq(kp, padded_len(kp.shape[1], max(key_tile, block_size)), 1)  # whole K tiles
  lse2 = log2_lse(lse, lengths, s_pad)
  with interpreter.device_context(interpret):
    chunks = block_mass_padded(qp, kp, lse2, lengths, block_size=block_size, sm_scale=scale,
                               num_kv_blocks=n_blk, config=config,
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
                           kv_lengths=None, sm_scale=None, return_lse=True, interpret=False,
                           config=None, query_block_size=None):
  """Block-sparse flash attention; see ``reference.block_sparse_attention``.

  Args:
    q, k, v: [B, S, H, D].
    kv_block_indices: int32 [B, H, nQ, K_max]; kv_block_counts: int32 [B, H, nQ],
      nQ = ceil(S / query_block_size).
    interpret: run under JAX's GPU interpreter (CPU).
    config: a ``BlockSparseConfig``, or None for ``block_sparse_kernel.DEFAULT_CONFIG``.
    query_block_size: rows per query block (None: block_size); see
      ``_expand_query_blocks``.

  Returns:
    out [B, S, H, D] in q's dtype, and lse float32 [B, H, S] if ``return_lse``.
  """
  qbs, (b, s, h, d, block_size, n_blk, kv_lengths, scale, lengths), kv_block_indices, \
      kv_block_counts = query_blocks.checked_sparse_call(
          q, k, v, kv_block_indices, kv_block_counts, block_size=block_size,
          kv_lengths=kv_lengths, sm_scale=sm_scale, query_block_size=query_block_size,
          expand=False)
  reason = unsupported_reason(q.dtype, d, block_size)
  if reason:
    return _call_fallback("block_sparse_attention", reason, interpret, q, k, v,
                          kv_block_indices, kv_block_counts, block_size=block_size,
                          kv_lengths=kv_lengths, sm_scale=scale, return_lse=return_lse,
                          query_block_size=qbs)
  _check_device(interpret)
  kv_block_indices, kv_block_counts, list_rows = _expand_query_blocks(
      kv_block_indices, kv_block_counts, seq=s, block_size=block_size, query_block_size=qbs)
  s_pad = padded_len(s)
  qp, kp, vp = (pad_seq(x, s_pad, 1) for x in (q, k, v))
  out, lse = _sparse(qp, kp, vp, kv_block_indices, kv_block_counts, lengths, seq=s,
                     block_size=block_size, scale=scale, interpret=interpret,
                     config=block_sparse_kernel.DEFAULT_CONFIG if config is None else config,
                     query_block_size=list_rows)
  out, lse = _finish(out, lse, kv_lengths, lengths, s)
  return (out, lse) if return_lse else out


def block_mass(q, k, lse, *, block_size, kv_lengths=None, sm_scale=None, interpret=False,
               config=None, query_block_size=None):
  """Per-block softmax mass from a given LSE; see ``reference.block_mass``.

  Args:
    q, k: [B, S, H, D]; lse: float32 [B, H, S] (natural log).
    config: a ``BlockMassConfig``, or None for ``block_mass_kernel.DEFAULT_CONFIG``.
    query_block_size: rows per query block (None: block_size); the kernel's
      block_size rows are summed into them.

  Returns:
    float32 [B, H, nQ, nK], nQ = ceil(S / query_block_size).
  """
  qbs = validation.check_query_block_size(query_block_size, block_size)
  b, s, h, d, block_size, _, kv_lengths, scale, lengths = validation.block_mass_call(
      q, k, lse, block_size, kv_lengths, sm_scale)
  reason = unsupported_reason(q.dtype, d, block_size)
  if reason:
    return _call_fallback("block_mass", reason, interpret, q, k, lse, block_size=block_size,
                          kv_lengths=kv_lengths, sm_scale=scale, query_block_size=qbs)
  _check_device(interpret)
  s_pad = padded_len(s)
  mass = _mass(pad_seq(q, s_pad, 1), pad_seq(k, s_pad, 1), lse, lengths, seq=s,
               block_size=block_size, scale=scale, interpret=interpret,
               config=block_mass_kernel.DEFAULT_CONFIG if config is None else config)
  return query_blocks.coarsen_mass(mass, seq=s, block_size=block_size, query_block_size=qbs)


def attention_with_block_mass(q, k, v, *, block_size, kv_lengths=None, sm_scale=None,
                              interpret=False, config=None, mass_config=None,
                              query_block_size=None):
  """Fused search: the sparse kernel at full density with LSE, then the mass kernel.

  The dense pass runs the block-sparse kernel on ``DENSE_PASS_BLOCK``-row blocks, every
  row dense, tuned by ``config``; the block mass from its LSE by ``mass_config``.

  Returns:
    out [B, S, H, D] (q's dtype), lse float32 [B, H, S], mass float32 [B, H, nQ, nK]
    (nQ at ``query_block_size``, as in ``block_mass``).
  """
  b, s, h, d = validation.check_qkv(q, k, v)
  block_size = validation.check_block_size(block_size)
  qbs = validation.check_query_block_size(query_block_size, block_size)
  kv_lengths = validation.check_kv_lengths(kv_lengths, b, s)
  scale = validation.default_scale(sm_scale, d)
  reason = unsupported_reason(q.dtype, d, block_size)
  if reason:
    return _call_fallback("attention_with_block_mass", reason, interpret, q, k, v,
                          block_size=block_size, kv_lengths=kv_lengths, sm_scale=scale,
                          query_block_size=qbs)
  _check_device(interpret)
  s_pad = padded_len(s)
  n_dense = validation.num_blocks(s, DENSE_PASS_BLOCK)
  lengths = validation.valid_lengths(kv_lengths, b, s)
  qp, kp, vp = (pad_seq(x, s_pad, 1) for x in (q, k, v))
  # Count nK marks every row dense, so the one-column list is never read.
  idx = jnp.zeros((b, h, n_dense, 1), jnp.int32)
  counts = jnp.full((b, h, n_dense), n_dense, jnp.int32)
  out, lse = _sparse(qp, kp, vp, idx, counts, lengths, seq=s, block_size=DENSE_PASS_BLOCK,
                     scale=scale, interpret=interpret,
                     config=block_sparse_kernel.DEFAULT_CONFIG if config is None else config)
  out, lse = _finish(out, lse, kv_lengths, lengths, s)
  mass = _mass(qp, kp, lse, lengths, seq=s, block_size=block_size, scale=scale,
               interpret=interpret,
               config=block_mass_kernel.DEFAULT_CONFIG if mass_config is None else mass_config)
  return out, lse, query_blocks.coarsen_mass(mass, seq=s, block_size=block_size,
                                             query_block_size=qbs)
