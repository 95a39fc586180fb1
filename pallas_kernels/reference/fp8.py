"""Pure-jnp reference of the 8-bit attention recipes (issue 25): FP8 (float8_e4m3fn)
throughout, or INT8 Q.K^T with FP8 P.V.

This is the numerics the FP8 kernels will follow, emulated with ``jnp`` casts to
``float8_e4m3fn`` so it runs (and is tested) on CPU. It is not fast; it is the
ground truth a GPU kernel is compared against, the way ``ops`` is for bf16.

The recipe (SageAttention2-style, see issue 25 and the paper notes):

1. K smoothing. ``k_s = k - mean_k`` with ``mean_k`` the mean of k over the valid
   tokens of each (batch, head), per channel. Every score of a row shifts by the
   same ``sm_scale * q_i . mean_k``, so the softmax, hence the output, is
   unchanged (``test_fp8_reference`` checks it in float32); it removes the
   channel-wise offset ("outlier channel") that K of DiTs carries, so K's per-block
   amax, hence its quantisation step, shrinks. The LSE returned is the LSE of the
   original (unsmoothed) scores: ``lse_s + sm_scale * q_i . mean_k``, computed in
   float32 from the unquantised q (a [B, H, S] GEMV a pre-pass can do).
2. Q and K per-block scales: one scale per (batch, head, block of ``block_size``
   tokens), ``scale = amax / 448`` over the block's tokens and channels, 448 being
   the largest finite float8_e4m3fn. Operands are ``x / scale`` rounded to e4m3
   (round to nearest even; clipped to +-448 first so a rounding of the division
   cannot leave the finite range: e4m3fn has no infinity). A block of zeros gets
   scale 1. Padding tokens (at or past ``kv_lengths``) are zeroed before the amax
   so they never widen a scale.
   With ``qk_dtype=jnp.int8`` (``precision="int8_fp8"``, SageAttention2's split of
   INT8 Q.K^T and FP8 P.V) Q and K are instead ``round(x / scale)`` clipped to
   [-127, 127] with ``scale = amax / 127``: a uniform step of amax / 127 against
   e4m3's relative step of 2^-4, which for the near-Gaussian entries of Q and K is
   about 4x less error in the scores (the Q.K rounding is nearly the whole FP8 error on
   the long model's q/k/v; docs/benchmarks.md). Products of two int8 values are exact
   integers and the kernel sums them in int32: no reduced-precision accumulation.
3. ``S = (q8 . k8) * scale_q * scale_k * sm_scale`` with the e4m3 products
   accumulated in float32. (Products of two e4m3 values are exact in float32; the
   sum here is a float32 sum at HIGHEST precision. Hopper's FP8 wgmma accumulates
   with fewer mantissa bits: a kernel must split the accumulation into chunks
   summed in float32, as SageAttention2 does, to match this.)
4. Online softmax in float32: running max ``m``, ``P = exp(S - m)`` in [0, 1].
   ``P`` is quantised with the fixed scale 1/448: ``p8 = e4m3(P * 448)``. After the
   max subtraction every entry is <= 1, so 448 maps the range onto e4m3's full
   finite range with no per-tile amax (that costs a reduction per tile and buys
   nothing since the tile max is known to be <= 1). The cost: P < 2^-9 / 448
   (~4.4e-6, below e4m3's smallest subnormal after scaling) flushes to 0, and P in
   [2^-6/448, 1] (normal range) keeps a relative error <= 2^-4. The row sum ``l``
   is accumulated from the float32 P (before quantisation), as a kernel does from
   the registers that hold P.
5. V per channel: one scale per (batch, head, channel) over the valid tokens,
   ``scale_v = amax / 448``; ``O += (p8 . v8) * (1/448) * scale_v`` accumulated in
   float32.
6. ``out = O / l`` (0 where the row saw no valid key), ``lse = m + log(l)`` in
   float32 natural log [B, H, S] (-inf where the row saw no valid key), with the
   smoothing correction of step 1.

Conventions are exactly those of ``pallas_kernels.reference.ops`` ([B, S, H, D],
``kv_lengths`` masking, fully masked rows output 0 and LSE -inf, never NaN, a
block-list row with count >= nK is dense). Memory: like ``ops``, queries and keys
are processed in chunks of up to 512 tokens (``lax.map`` over query chunks,
``lax.scan`` over key chunks), so the largest temporary is B*H*512*512 float32;
the quantised copies of q, k, v and their scales add O(B*S*H*D).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import query_blocks, validation
from pallas_kernels.reference import chunking, ops

FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0  # largest int8 used (the range is kept symmetric: -128 is never made)
# precision (``validation.PRECISIONS``, 8-bit ones) -> the dtype Q and K are quantised to.
QK_DTYPES = {"fp8": FP8_DTYPE, "int8_fp8": jnp.int8}
P_SCALE = 1.0 / FP8_MAX  # fixed scale of the softmax probabilities P in [0, 1]
_HIGHEST = jax.lax.Precision.HIGHEST


def to_fp8(x):
  """float32 -> float8_e4m3fn, clipped to the finite range (e4m3fn has no inf)."""
  return jnp.clip(x.astype(jnp.float32), -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)


def to_int8(x):
  """float32 -> int8: rounded to nearest (ties to even), clipped to [-127, 127]."""
  return jnp.clip(jnp.round(x.astype(jnp.float32)), -INT8_MAX, INT8_MAX).astype(jnp.int8)


# 8-bit operand dtype -> (the largest value a block's amax is scaled to, the cast).
_QUANTIZERS = {jnp.dtype(FP8_DTYPE): (FP8_MAX, to_fp8), jnp.dtype(jnp.int8): (INT8_MAX, to_int8)}


def _quantizer(dtype, name):
  """``(dtype, largest value, cast)`` of an 8-bit operand ``dtype`` (float8_e4m3fn or
  int8); ValueError naming the argument ``name`` for any other."""
  try:
    key = jnp.dtype(dtype)
  except TypeError:
    key = None
  if key not in _QUANTIZERS:
    shown = repr(dtype) if key is None else key.name
    raise ValueError(f"{name}={shown}: expected float8_e4m3fn or int8.")
  return (key, *_QUANTIZERS[key])


def quantize_blockwise(x, block, axis, *, reduce_axes=(-1,), dtype=FP8_DTYPE):
  """Quantise ``x`` to ``dtype`` (float8_e4m3fn or int8) with one scale per block along
  ``axis``.

  Blocks are ``block`` consecutive entries along ``axis`` (the last block may be
  short). The amax of a block is also taken over ``reduce_axes`` (default the
  last axis, e.g. the channels of a [B, S, H, D] tensor); the remaining axes keep
  their own scales. Examples for [B, S, H, D]:

  * Q / K per block of 64 tokens: ``quantize_blockwise(q, 64, axis=1)`` ->
    scales [B, nS, H, 1].
  * V per channel over all tokens: ``quantize_blockwise(v, S, axis=1,
    reduce_axes=())`` -> scales [B, 1, H, D].

  Args:
    x: array, any float dtype.
    block: entries per block along ``axis`` (>= 1).
    axis: the blocked axis.
    reduce_axes: further axes the amax is taken over (kept as size 1 in scales).
    dtype: float8_e4m3fn (``to_fp8``) or int8 (``to_int8``).

  Returns:
    (x_q, scales): x_q of ``dtype`` and x's shape; scales float32 with
    ``axis`` of size ceil(n / block) and ``reduce_axes`` of size 1, such that
    ``dequantize_blockwise(x_q, scales, block, axis)`` approximates x.
    ``scale = amax / 448`` for e4m3, ``amax / 127`` for int8 (1 for an all-zero block).
  """
  _, top, cast = _quantizer(dtype, "dtype")
  if block < 1:
    raise ValueError(f"block must be >= 1, got {block}")
  x = jnp.asarray(x).astype(jnp.float32)
  axis = axis % x.ndim
  reduce_axes = tuple(sorted({a % x.ndim for a in reduce_axes}))
  if axis in reduce_axes:
    raise ValueError("axis cannot also be in reduce_axes")
  n = x.shape[axis]
  n_blk = -(-n // block)
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, n_blk * block - n)
  xp = jnp.pad(x, pad)
  blocked = xp.reshape(*xp.shape[:axis], n_blk, block, *xp.shape[axis + 1:])
  # Axes of ``blocked``: those after ``axis`` moved one to the right.
  red = (axis + 1,) + tuple(a + 1 if a > axis else a for a in reduce_axes)
  amax = jnp.max(jnp.abs(blocked), axis=red, keepdims=True)
  scales = jnp.where(amax > 0, amax / top, 1.0)
  q = cast(blocked / scales)
  q = q.reshape(xp.shape)
  q = jax.lax.slice_in_dim(q, 0, n, axis=axis)
  return q, jnp.squeeze(scales, axis + 1)


def expand_scales(scales, block, axis, n):
  """Repeat per-block scales to per-entry scales of length ``n`` along ``axis``."""
  axis = axis % scales.ndim
  rep = jnp.repeat(scales, block, axis=axis)
  return jax.lax.slice_in_dim(rep, 0, n, axis=axis)


def dequantize_blockwise(x_q, scales, block, axis):
  """float32 approximation of the tensor ``quantize_blockwise`` was given."""
  return x_q.astype(jnp.float32) * expand_scales(scales, block, axis, x_q.shape[axis])


def _zero_padding(x, lengths):
  """[B, S, H, D] float32 with tokens at or past lengths[b] set to 0."""
  valid = jnp.arange(x.shape[1])[None, :] < lengths[:, None]
  return jnp.where(valid[:, :, None, None], x.astype(jnp.float32), 0.0)


def smooth_k(k, lengths):
  """(k - mean_k, mean_k): mean over the valid tokens per (batch, head, channel).

  Args:
    k: [B, S, H, D] with padding tokens already zeroed.
    lengths: int32 [B].

  Returns:
    k_smoothed float32 [B, S, H, D] (padding stays 0), mean_k float32 [B, 1, H, D]
    (0 for a batch element without valid tokens).
  """
  count = jnp.maximum(lengths, 1).astype(jnp.float32)[:, None, None, None]
  mean = k.sum(axis=1, keepdims=True) / count
  valid = jnp.arange(k.shape[1])[None, :] < lengths[:, None]
  return jnp.where(valid[:, :, None, None], k - mean, 0.0), mean


STAGES = ("qk", "p", "v")


def _check_stages(quantized):
  quantized = frozenset(quantized)
  if not quantized <= set(STAGES):
    raise ValueError(f"quantized={sorted(quantized)!r}: expected a subset of {STAGES}")
  return quantized


def check_qk_dtype(qk_dtype):
  """``qk_dtype`` as a jnp dtype if it is one of ``QK_DTYPES``' values, else ValueError."""
  return _quantizer(qk_dtype, "qk_dtype")[0]


def _fp8_flash(q, k, v, lengths, sm_scale, block_size, block_mask, smooth, quantized,
               qk_dtype=FP8_DTYPE):
  """The recipe of the module docstring, chunked like ``ops``' attention (``chunking``).

  Args:
    q, k, v: [B, S, H, D].
    lengths: int32 [B].
    block_mask: bool [B, H, nQ, nK] at ``block_size`` or None (dense).
    smooth: whether to subtract K's mean (step 1).
    quantized: which of STAGES are quantised ("qk": Q and K, "p": P, "v": V); a
      stage left out runs in float32 (its scale is 1), for error budgets.
    qk_dtype: what Q and K are quantised to (float8_e4m3fn or int8).

  Returns:
    out float32 [B, S, H, D], lse float32 [B, H, S].
  """
  b, s, h, d = q.shape
  q = _zero_padding(q, lengths)
  k = _zero_padding(k, lengths)
  v = _zero_padding(v, lengths)
  if smooth:
    k, mean_k = smooth_k(k, lengths)
    # [B, H, S]: the per-row shift that smoothing removed from every score.
    lse_shift = sm_scale * jnp.einsum("bshd,bhd->bhs", q, mean_k[:, 0], precision=_HIGHEST)
  else:
    lse_shift = jnp.zeros((b, h, s), jnp.float32)
  if "qk" in quantized:
    q8, sq = quantize_blockwise(q, block_size, axis=1, dtype=qk_dtype)  # sq [B, nS, H, 1]
    k8, sk = quantize_blockwise(k, block_size, axis=1, dtype=qk_dtype)
  else:
    n_s = validation.num_blocks(s, block_size)
    q8, k8, sq = q, k, jnp.ones((b, n_s, h, 1), jnp.float32)
    sk = sq
  if "v" in quantized:
    v8, sv = quantize_blockwise(v, s, axis=1, reduce_axes=())  # sv [B, 1, H, D]
  else:
    v8, sv = v, jnp.ones((b, 1, h, d), jnp.float32)
  p_scale = P_SCALE if "p" in quantized else 1.0
  sq_tok = expand_scales(sq, block_size, 1, s)                # [B, S, H, 1]
  sk_tok = expand_scales(sk, block_size, 1, s)
  sv = jnp.swapaxes(sv, 1, 2)                                 # [B, H, 1, D]

  chunk = chunking.chunk_size(s, block_size)
  s_pad = -(-s // chunk) * chunk
  qc = chunking.split_chunks(chunking.to_heads_major(q8, s_pad), chunk)
  kc = chunking.split_chunks(chunking.to_heads_major(k8, s_pad), chunk)
  vc = chunking.split_chunks(chunking.to_heads_major(v8, s_pad), chunk)
  # per-token scales: [n, B, H, chunk]
  sqc = chunking.split_chunks(chunking.to_heads_major(sq_tok, s_pad)[..., 0], chunk)
  skc = chunking.split_chunks(chunking.to_heads_major(sk_tok, s_pad)[..., 0], chunk)
  n_chunks = s_pad // chunk
  block_mask = chunking.pad_block_mask(block_mask, s_pad, block_size)

  def query_chunk(args):
    qi, q_blk, sq_blk = args
    row_ok = (qi * chunk + jnp.arange(chunk))[None, :] < lengths[:, None]

    def key_chunk(carry, kargs):
      m, l, acc = carry
      ki, k_blk, v_blk, sk_blk = kargs
      ok = chunking.pair_mask(row_ok, qi, ki, lengths, block_mask, chunk=chunk,
                              block_size=block_size)
      # Step 3: e4m3 (or int8) products, float32 accumulation (exact for int8 x int8
      # summed over D <= 256: |sum| < 2^22), then the scales.
      raw = jnp.einsum("bhqd,bhkd->bhqk", q_blk.astype(jnp.float32),
                       k_blk.astype(jnp.float32), precision=_HIGHEST)
      scores = raw * (sm_scale * sq_blk[..., :, None] * sk_blk[..., None, :])
      # Step 4: online softmax in float32 (the row sum from float32 P); P quantised with
      # the fixed scale.
      m, l, alpha, p = chunking.softmax_step(m, l, scores, ok)
      p8 = to_fp8(p / P_SCALE) if "p" in quantized else p
      # Step 5: e4m3 P x e4m3 V, float32 accumulation, then the scales.
      pv = jnp.einsum("bhqk,bhkd->bhqd", p8.astype(jnp.float32), v_blk.astype(jnp.float32),
                      precision=_HIGHEST)
      acc = alpha[..., None] * acc + pv * (p_scale * sv)
      return (m, l, acc), None

    init = chunking.softmax_init(b, h, chunk, d)
    (m, l, acc), _ = jax.lax.scan(key_chunk, init, (jnp.arange(n_chunks), kc, vc, skc))
    return chunking.softmax_finish(m, l, acc)

  out, lse = jax.lax.map(query_chunk, (jnp.arange(n_chunks), qc, sqc))
  out = jnp.swapaxes(chunking.merge_chunks(out)[:, :, :s], 1, 2)
  lse = chunking.merge_chunks(lse)[:, :, :s]
  lse = jnp.where(jnp.isfinite(lse), lse + lse_shift, lse)
  return out, lse


def fp8_attention(q, k, v, *, block_size, kv_lengths=None, sm_scale=None, smooth=True,
                  quantized=STAGES, qk_dtype=FP8_DTYPE):
  """Dense attention with the FP8 recipe of the module docstring.

  Args:
    q, k, v: [B, S, H, D].
    block_size: tokens per Q / K scale block (power of two >= 16, e.g. 64).
    kv_lengths: optional int [B]; see ``ops``.
    sm_scale: softmax scale, default 1/sqrt(D).
    smooth: subtract K's mean over valid tokens before quantising (default True;
      False only to measure what smoothing buys).
    quantized: the stages quantised, default all of STAGES (fewer: error budgets).
    qk_dtype: float8_e4m3fn (``precision="fp8"``) or int8 (``"int8_fp8"``): what Q and K
      are quantised to; P and V are e4m3 either way.

  Returns:
    out [B, S, H, D] in q's dtype, lse float32 [B, H, S].
  """
  qk_dtype = check_qk_dtype(qk_dtype)
  b, s, h, d = validation.check_qkv(q, k, v)
  block_size = validation.check_block_size(block_size)
  kv_lengths = validation.check_kv_lengths(kv_lengths, b, s)
  scale = validation.default_scale(sm_scale, d)
  out, lse = _fp8_flash(q, k, v, validation.valid_lengths(kv_lengths, b, s), scale,
                        block_size, None, smooth, _check_stages(quantized), qk_dtype)
  return out.astype(q.dtype), lse


def fp8_block_sparse_attention(q, k, v, kv_block_indices, kv_block_counts, *, block_size,
                               kv_lengths=None, sm_scale=None, smooth=True,
                               query_block_size=None, quantized=STAGES, qk_dtype=FP8_DTYPE):
  """``ops.block_sparse_attention`` with the FP8 recipe of the module docstring.

  Q and K scale blocks are ``block_size`` tokens (the key block of the lists).

  Args:
    q, k, v: [B, S, H, D].
    kv_block_indices: int32 [B, H, nQ, K_max], nQ = ceil(S / query_block_size).
    kv_block_counts: int32 [B, H, nQ]; count >= nK means a dense row.
    block_size: tokens per key block (power of two >= 16).
    query_block_size: as in ``ops.block_sparse_attention`` (None: block_size).
    smooth, quantized, qk_dtype: as in ``fp8_attention``.

  Returns:
    out [B, S, H, D] in q's dtype, lse float32 [B, H, S].
  """
  qk_dtype = check_qk_dtype(qk_dtype)
  _, (_, _, _, _, block_size, n_blk, _, scale, lengths), kv_block_indices, kv_block_counts = (
      query_blocks.checked_sparse_call(
          q, k, v, kv_block_indices, kv_block_counts, block_size=block_size,
          kv_lengths=kv_lengths, sm_scale=sm_scale, query_block_size=query_block_size))
  mask = ops.block_mask_from_lists(kv_block_indices, kv_block_counts, n_blk)
  out, lse = _fp8_flash(q, k, v, lengths, scale, block_size, mask, smooth,
                        _check_stages(quantized), qk_dtype)
  return out.astype(q.dtype), lse
