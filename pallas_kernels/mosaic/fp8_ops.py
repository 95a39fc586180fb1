"""8-bit block-sparse attention on the Mosaic GPU kernel (P.V in float8_e4m3fn, Q.K^T in
float8_e4m3fn or int8: ``qk_dtype``): the quantisation pre-pass in jnp, the kernel call
and the LSE correction.

``block_sparse_attention_fp8`` has the signature and conventions of
``pallas_kernels.mosaic.ops.block_sparse_attention`` (lists, ``kv_lengths``, padding and
query-block handling are that module's helpers) and the numerics of
``pallas_kernels.reference.fp8.fp8_block_sparse_attention``, whose quantisation functions
the pre-pass calls:

1. q, k, v zeroed past ``kv_lengths`` and padded to a multiple of 128 rows;
2. K smoothed (``reference.fp8.smooth_k``), the per-row LSE shift
   ``sm_scale * q . mean_k`` kept in float32 for the end;
3. Q and K per block of ``block_size`` tokens (as the reference; Q's scales repeated to the
   kernel's 64-row granularity) to ``qk_dtype`` (``amax / 448`` for e4m3, ``amax / 127``
   for int8), V per channel to e4m3 (``amax / 448``);
4. V transposed once to [B, H, D, S_pad], its keys in ``block_sparse_fp8_kernel.key_order``
   (the order the kernel's 8-bit P operand has).

``quantize_inputs`` is that pre-pass alone (the GPU check times it apart from the kernel).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import query_blocks
from pallas_kernels.mosaic import block_sparse_fp8_kernel as fp8_kernel
from pallas_kernels.mosaic import interpreter
from pallas_kernels.mosaic.common import ROWS_PER_WG
from pallas_kernels.mosaic.ops import (
    _check_device, _expand_query_blocks, _finish, kernel_lists, pad_seq, padded_len)
from pallas_kernels.reference import fp8 as fp8_reference
from pallas_kernels.validation import num_blocks

SUPPORTED_BLOCK_SIZES = (64, 128)
_HIGHEST = jax.lax.Precision.HIGHEST


def quantize_inputs(q, k, v, lengths, *, block_size, sm_scale, s_pad=None,
                    qk_dtype=fp8_reference.FP8_DTYPE):
  """The pre-pass: 8-bit operands and scales as ``block_sparse_attention_fp8_padded``
  takes them.

  Args:
    q, k, v: [batch, seq, heads, head_dim], any float dtype.
    lengths: int32 [batch], valid tokens per batch element.
    block_size: tokens per Q / K scale block (the key block of the lists).
    sm_scale: softmax scale.
    s_pad: padded sequence (None: the least multiple of 128 >= seq).
    qk_dtype: float8_e4m3fn or int8, what Q and K are quantised to.

  Returns:
    (q8, k8, vt8, q_scale, k_scale, v_scale, lse_shift): q8, k8 ``qk_dtype`` [B, S_pad, H, D]
    (k smoothed); vt8 e4m3 [B, H, D, S_pad] (keys in ``key_order``); q_scale float32
    [B, H, S_pad / 64]; k_scale float32 [B, H, S_pad / block_size]; v_scale float32
    [B, H, D]; lse_shift float32 [B, H, seq], ``sm_scale * q . mean_k`` (add it to the
    kernel's finite LSE).
  """
  b, s, h, d = q.shape
  s_pad = padded_len(s) if s_pad is None else s_pad
  if s_pad % block_size or s_pad % ROWS_PER_WG:
    raise ValueError(f"s_pad={s_pad}: expected a multiple of block_size={block_size} "
                     f"and of {ROWS_PER_WG}.")
  valid = (jnp.arange(s)[None, :] < lengths[:, None])[:, :, None, None]
  q, k, v = (jnp.where(valid, x.astype(jnp.float32), 0.0) for x in (q, k, v))
  k, mean_k = fp8_reference.smooth_k(k, lengths)
  lse_shift = sm_scale * jnp.einsum("bshd,bhd->bhs", q, mean_k[:, 0], precision=_HIGHEST)
  q, k, v = (pad_seq(x, s_pad, 1) for x in (q, k, v))
  q8, q_scale = fp8_reference.quantize_blockwise(q, block_size, axis=1,
                                                 dtype=qk_dtype)  # [B, nS, H, 1]
  k8, k_scale = fp8_reference.quantize_blockwise(k, block_size, axis=1, dtype=qk_dtype)
  v8, v_scale = fp8_reference.quantize_blockwise(v, s_pad, axis=1, reduce_axes=())
  q_scale = jnp.repeat(jnp.swapaxes(q_scale[..., 0], 1, 2), block_size // ROWS_PER_WG, axis=2)
  k_scale = jnp.swapaxes(k_scale[..., 0], 1, 2)
  v_scale = v_scale[:, 0]  # [B, H, D]
  vt8 = fp8_kernel.permute_keys(jnp.transpose(v8, (0, 2, 3, 1)))
  return q8, k8, vt8, q_scale, k_scale, v_scale, lse_shift


def _check_call(dtype, head_dim, block_size):
  if not jnp.issubdtype(dtype, jnp.floating) or jnp.dtype(dtype).itemsize < 2:
    raise ValueError(f"q of dtype {jnp.dtype(dtype).name}: expected bfloat16, float16 or "
                     "float32 (the op quantises them itself).")
  if head_dim not in fp8_kernel.SUPPORTED_HEAD_DIMS:
    raise ValueError(f"head_dim={head_dim}: expected one of "
                     f"{fp8_kernel.SUPPORTED_HEAD_DIMS}.")
  if block_size not in SUPPORTED_BLOCK_SIZES:
    raise ValueError(f"block_size={block_size}: expected one of {SUPPORTED_BLOCK_SIZES}.")


def block_sparse_attention_fp8(q, k, v, kv_block_indices, kv_block_counts, *, block_size,
                               kv_lengths=None, sm_scale=None, query_block_size=None,
                               interpret=False, config=None, return_lse=True,
                               qk_dtype=fp8_reference.FP8_DTYPE):
  """8-bit block-sparse flash attention; see ``reference.fp8.fp8_block_sparse_attention``.

  Args:
    q, k, v: [batch, seq, heads, head_dim] bf16/f16/float32, head_dim 64 or 128.
    kv_block_indices: int32 [B, H, nQ, K_max]; kv_block_counts: int32 [B, H, nQ],
      nQ = ceil(seq / query_block_size); a count >= nK is a dense row.
    block_size: keys per key block, 64 or 128 (also the Q / K scale block).
    kv_lengths: optional int [batch]; keys and rows at or past it are padding.
    sm_scale: softmax scale (None: 1 / sqrt(head_dim)).
    query_block_size: rows per list (None: block_size); 128 x 64, 128 x 128 and 64 x 64
      run natively, other pairs on lists expanded to block_size rows.
    interpret: run under JAX's GPU interpreter (CPU).
    config: a ``BlockSparseConfig`` (None: the kernel's default).
    qk_dtype: float8_e4m3fn (``precision="fp8"``) or int8 (``"int8_fp8"``).

  Returns:
    out [batch, seq, heads, head_dim] in q's dtype and, if ``return_lse``, lse float32
    [batch, heads, seq] (natural log of the unsmoothed scores; rows with no valid key:
    out 0, lse -inf).
  """
  qbs, (b, s, h, d, block_size, n_blk, kv_lengths, scale, lengths), kv_block_indices, \
      kv_block_counts = query_blocks.checked_sparse_call(
          q, k, v, kv_block_indices, kv_block_counts, block_size=block_size,
          kv_lengths=kv_lengths, sm_scale=sm_scale, query_block_size=query_block_size,
          expand=False)
  _check_call(q.dtype, d, block_size)
  qk_dtype = fp8_reference.check_qk_dtype(qk_dtype)
  _check_device(interpret)
  idx, counts, list_rows = _expand_query_blocks(
      kv_block_indices, kv_block_counts, seq=s, block_size=block_size, query_block_size=qbs)
  s_pad = padded_len(s)
  q8, k8, vt8, q_scale, k_scale, v_scale, lse_shift = quantize_inputs(
      q, k, v, lengths, block_size=block_size, sm_scale=scale, s_pad=s_pad, qk_dtype=qk_dtype)
  idx, steps, dense = kernel_lists(idx, counts, num_kv_blocks=n_blk,
                                   num_query_blocks=s_pad // list_rows)
  with interpreter.device_context(interpret):
    out, lse = fp8_kernel.block_sparse_attention_fp8_padded(
        q8, k8, vt8, q_scale, k_scale, v_scale, idx, steps, dense, lengths,
        block_size=block_size, sm_scale=float(scale), num_kv_blocks=n_blk,
        config=fp8_kernel.DEFAULT_CONFIG if config is None else config,
        interpret=interpreter.params(interpret), query_block_size=list_rows)
  out, lse = _finish(out, lse, kv_lengths, lengths, s)
  lse = jnp.where(jnp.isfinite(lse), lse + lse_shift, lse)
  out = out.astype(q.dtype)
  return (out, lse) if return_lse else out


def dense_attention_fp8(q, k, v, *, block_size=128, kv_lengths=None, sm_scale=None,
                        interpret=False, config=None, return_lse=True,
                        qk_dtype=fp8_reference.FP8_DTYPE):
  """Dense 8-bit attention: ``block_sparse_attention_fp8`` with every 128-row query block
  dense (the list is never read). Returns as ``block_sparse_attention_fp8``."""
  b, s, h, _ = q.shape
  n_q = num_blocks(s, 128)
  return block_sparse_attention_fp8(
      q, k, v, jnp.zeros((b, h, n_q, 1), jnp.int32),
      jnp.full((b, h, n_q), num_blocks(s, block_size), jnp.int32), block_size=block_size,
      kv_lengths=kv_lengths, sm_scale=sm_scale, query_block_size=128, interpret=interpret,
      config=config, return_lse=return_lse, qk_dtype=qk_dtype)
