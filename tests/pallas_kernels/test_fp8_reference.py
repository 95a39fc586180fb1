"""The FP8 reference recipe (``pallas_kernels.reference.fp8``) on CPU.

Accuracy bounds below are what e4m3 allows, not tuned to pass: e4m3 keeps 3
mantissa bits, so one rounding has a relative error <= 2^-4 (rms ~2.6% on normal
data); Q.K, P and V each add one such rounding, and on random normal q/k/v the
errors of independent tokens average down exactly as the signal does, so the
output's relative L2 error is ~5% (cosine ~0.9986; cuDNN's FP8 attention, all
scales 1, measured 0.9986-0.9987 against bf16 on the H100, see the paper notes).
Hence the bounds cosine >= 0.998 and relative L2 <= 0.06 on random data: the
issue's 0.999 target is for model-captured q/k/v (``tools/fp8_quality.py``).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.reference import fp8, ops
from tests.pallas_kernels.kernel_suite import make_qkv

BLOCK = 64


def _cos_rel(got, want):
  a = np.asarray(got, np.float64).ravel()
  b = np.asarray(want, np.float64).ravel()
  return a @ b / np.linalg.norm(a) / np.linalg.norm(b), np.linalg.norm(a - b) / np.linalg.norm(b)


# ---------------------------------------------------------------- quantisation


@pytest.mark.parametrize("shape,block,axis,reduce_axes", [
    ((2, 100, 3, 32), 64, 1, (-1,)),     # Q/K: per (b, block of tokens, h); 100 = 64 + 36
    ((2, 100, 3, 32), 100, 1, ()),       # V: per (b, h, channel) over all tokens
    ((37, 16), 16, 0, (-1,)),
])
def test_quantize_blockwise_round_trip(shape, block, axis, reduce_axes):
  rng = np.random.default_rng(0)
  x = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 100, shape[:1] + (1,) * (
      len(shape) - 1)).astype(np.float32)
  x8, scales = fp8.quantize_blockwise(x, block, axis, reduce_axes=reduce_axes)
  assert x8.dtype == jnp.float8_e4m3fn and x8.shape == x.shape
  want_shape = list(shape)
  want_shape[axis] = -(-shape[axis] // block)
  for a in reduce_axes:
    want_shape[a] = 1
  assert scales.shape == tuple(want_shape) and scales.dtype == jnp.float32
  deq = np.asarray(fp8.dequantize_blockwise(x8, scales, block, axis))
  s_tok = np.asarray(fp8.expand_scales(scales, block, axis, shape[axis]))
  err = np.abs(deq - x)
  # Normal e4m3 range: relative error <= 2^-4; subnormals: absolute <= half of 2^-9.
  bound = np.maximum(np.abs(x) * 2.0**-4, s_tok * 2.0**-10) * (1 + 1e-6)
  assert np.all(err <= bound)
  # Per block: the error is at most amax / 16 and each block's amax hits +-448 exactly.
  amax_tok = s_tok * fp8.FP8_MAX
  assert np.all(err <= amax_tok * 2.0**-4 * (1 + 1e-6))
  scaled = np.abs(np.asarray(x8, np.float32))
  blocks_max = np.asarray(fp8.quantize_blockwise(scaled, block, axis,
                                                 reduce_axes=reduce_axes)[1]) * fp8.FP8_MAX
  np.testing.assert_allclose(blocks_max, fp8.FP8_MAX)


@pytest.mark.parametrize("block,axis", [(64, 1), (100, 1)])
def test_quantize_blockwise_int8(block, axis):
  """int8: x / (amax / 127) rounded to nearest, so the error is at most half a step
  (amax / 254) everywhere, and each block's amax lands on +-127 (never -128)."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 100, 3, 32)).astype(np.float32) * 7.0
  x[0, :64, 0] = 0.0  # a block of zeros: scale 1, all zeros
  x8, scales = fp8.quantize_blockwise(x, block, axis, dtype=jnp.int8)
  assert x8.dtype == jnp.int8 and x8.shape == x.shape
  s_tok = np.asarray(fp8.expand_scales(scales, block, axis, x.shape[axis]))
  deq = np.asarray(fp8.dequantize_blockwise(x8, scales, block, axis))
  assert np.all(np.abs(deq - x) <= s_tok * 0.5 * (1 + 1e-6))
  ints = np.abs(np.asarray(x8, np.int32))
  assert ints.max() <= 127
  if block == 100:  # one block per (b, h): its amax is exactly 127
    np.testing.assert_array_equal(ints.max(axis=(1, 3)), 127)
  else:  # the block of zeros
    assert float(scales[0, 0, 0, 0]) == 1.0 and np.all(ints[0, :64, 0] == 0)
  with pytest.raises(ValueError, match="dtype=float16"):
    fp8.quantize_blockwise(x, block, axis, dtype=jnp.float16)


def test_int8_scores_beat_e4m3_scores():
  """The "int8_fp8" recipe (Q, K in int8) against "fp8" (all e4m3), both against float32:
  the Q.K^T rounding is the larger share of FP8's error, and int8's uniform step beats
  e4m3's 3 mantissa bits on Gaussian data."""
  rng = np.random.default_rng(2)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 256, 2, 64)), jnp.float32) for _ in range(3))
  want, want_lse = ops.attention(q, k, v)
  err = {}
  for dt in (jnp.float8_e4m3fn, jnp.int8):
    out, lse = fp8.fp8_attention(q, k, v, block_size=64, qk_dtype=dt)
    err[jnp.dtype(dt).name] = float(jnp.linalg.norm(out - want) / jnp.linalg.norm(want))
    assert float(jnp.abs(lse - want_lse).max()) < (0.05 if dt == jnp.int8 else 0.1)
  assert err["int8"] < 0.8 * err["float8_e4m3fn"], err
  with pytest.raises(ValueError, match="qk_dtype="):
    fp8.fp8_attention(q, k, v, block_size=64, qk_dtype=jnp.bfloat16)


def test_quantize_blockwise_zero_block_and_no_overflow():
  x = np.zeros((1, 80, 1, 16), np.float32)
  x[0, 64:, 0, :] = np.float32(3.0e38)  # near float32 max: the division must not overflow
  x8, scales = fp8.quantize_blockwise(x, 64, 1)
  assert float(scales[0, 0, 0, 0]) == 1.0
  assert np.all(np.asarray(x8[0, :64], np.float32) == 0)
  assert np.all(np.isfinite(np.asarray(x8, np.float32)))
  with pytest.raises(ValueError):
    fp8.quantize_blockwise(x, 64, 1, reduce_axes=(1,))


# ---------------------------------------------------------------- smoothing


def test_k_smoothing_is_softmax_invariant_in_float32():
  q, k, v = make_qkv(1, 2, 96, 2, 32, jnp.float32)
  k = k + 5.0 * jnp.arange(32, dtype=jnp.float32) / 32  # a channel-wise offset
  lengths = jnp.array([96, 70], jnp.int32)
  kz = fp8._zero_padding(k, lengths)
  ks, mean = fp8.smooth_k(kz, lengths)
  np.testing.assert_allclose(np.asarray(mean[:, 0]), np.asarray(
      kz.sum(axis=1) / lengths[:, None, None]), rtol=1e-6)
  out, lse = ops.attention(q, k, v, kv_lengths=lengths)
  out_s, lse_s = ops.attention(q, ks, v, kv_lengths=lengths)
  np.testing.assert_allclose(np.asarray(out_s), np.asarray(out), atol=2e-6, rtol=0)
  # The LSE moves by sm_scale * q . mean_k on valid rows, which fp8 adds back.
  shift = np.einsum("bshd,bhd->bhs", np.asarray(q), np.asarray(mean[:, 0])) / np.sqrt(32)
  valid = np.isfinite(np.asarray(lse))
  np.testing.assert_allclose(np.asarray(lse_s + shift)[valid], np.asarray(lse)[valid],
                             atol=1e-4)


# ---------------------------------------------------------------- accuracy


def test_fp8_vs_float32_random_normal():
  q, k, v = make_qkv(2, 1, 256, 2, 64, jnp.float32)
  want, lse_want = ops.attention(q, k, v)
  out, lse = fp8.fp8_attention(q, k, v, block_size=BLOCK)
  assert out.dtype == q.dtype and lse.shape == (1, 2, 256) and lse.dtype == jnp.float32
  cos, rel = _cos_rel(out, want)
  assert cos >= 0.998 and rel <= 0.06, (cos, rel)
  assert float(jnp.abs(lse - lse_want).max()) < 0.1
  # Each stage alone is more accurate than all three together (the error budget).
  for stage in fp8.STAGES:
    c1, r1 = _cos_rel(fp8.fp8_attention(q, k, v, block_size=BLOCK, quantized=(stage,))[0], want)
    assert c1 >= 0.999 and r1 < rel, (stage, c1, r1)


def test_smoothing_helps_with_an_outlier_k_channel():
  q, k, v = make_qkv(3, 1, 256, 2, 64, jnp.float32)
  # DiT keys carry a large per-channel offset shared by all tokens.
  offset = np.zeros(64, np.float32)
  offset[[3, 17, 40]] = [20.0, -15.0, 25.0]
  k = k + offset
  want, lse_want = ops.attention(q, k, v)
  out, lse = fp8.fp8_attention(q, k, v, block_size=BLOCK)
  raw, _ = fp8.fp8_attention(q, k, v, block_size=BLOCK, smooth=False)
  cos, rel = _cos_rel(out, want)
  cos_raw, rel_raw = _cos_rel(raw, want)
  assert cos >= 0.998 and rel <= 0.06, (cos, rel)
  assert rel_raw > 2 * rel and cos_raw < cos, (cos_raw, rel_raw, cos, rel)
  assert float(jnp.abs(lse - lse_want).max()) < 0.1


# ---------------------------------------------------------------- block-sparse


def _lists(b, h, n_q, n_k, k_max, counts):
  idx = np.broadcast_to(np.arange(k_max, dtype=np.int32) % n_k, (b, h, n_q, k_max)).copy()
  return jnp.asarray(idx), jnp.asarray(np.broadcast_to(counts, (b, h, n_q)).astype(np.int32))


def test_block_sparse_all_dense_rows_equal_dense_fp8():
  q, k, v = make_qkv(4, 2, 200, 2, 32, jnp.float32)   # 200: 4 blocks, last one short
  lengths = jnp.array([200, 150], jnp.int32)
  dense, lse_d = fp8.fp8_attention(q, k, v, block_size=BLOCK, kv_lengths=lengths)
  for k_max, count in ((1, 4), (4, 4)):  # count >= nK: dense row, entries unread / all listed
    idx, cnt = _lists(2, 2, 4, 4, k_max, count)
    out, lse = fp8.fp8_block_sparse_attention(q, k, v, idx, cnt, block_size=BLOCK,
                                              kv_lengths=lengths)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(dense))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(lse_d))


def test_block_sparse_matches_exact_block_sparse():
  q, k, v = make_qkv(5, 1, 256, 2, 64, jnp.float32)
  rng = np.random.default_rng(5)
  idx = np.stack([np.sort(rng.choice(4, 2, replace=False)) for _ in range(8)]).reshape(
      1, 2, 4, 2).astype(np.int32)
  cnt = np.full((1, 2, 4), 2, np.int32)
  cnt[0, 1, 3] = 0  # a row with no blocks: zeros, LSE -inf
  want, lse_want = ops.block_sparse_attention(q, k, v, jnp.asarray(idx), jnp.asarray(cnt),
                                              block_size=BLOCK)
  out, lse = fp8.fp8_block_sparse_attention(q, k, v, jnp.asarray(idx), jnp.asarray(cnt),
                                            block_size=BLOCK)
  cos, rel = _cos_rel(out, want)
  assert cos >= 0.998 and rel <= 0.06, (cos, rel)
  assert np.all(np.asarray(out[0, 192:, 1]) == 0)
  assert np.all(np.isneginf(np.asarray(lse[0, 1, 192:])))
  finite = np.isfinite(np.asarray(lse_want))
  np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
  assert np.abs(np.asarray(lse - lse_want)[finite]).max() < 0.1


# ---------------------------------------------------------------- masking


def test_kv_lengths_masking_odd_lengths_and_padding_invariance():
  q, k, v = make_qkv(6, 3, 100, 2, 32, jnp.float32)   # 100 is not a multiple of 64
  lengths = jnp.array([100, 37, 0], jnp.int32)
  out, lse = fp8.fp8_attention(q, k, v, block_size=BLOCK, kv_lengths=lengths)
  want, lse_want = ops.attention(q, k, v, kv_lengths=lengths)
  assert not np.any(np.isnan(np.asarray(out))) and not np.any(np.isnan(np.asarray(lse)))
  assert np.all(np.asarray(out[1, 37:]) == 0) and np.all(np.asarray(out[2]) == 0)
  assert np.all(np.isneginf(np.asarray(lse[1, :, 37:]))) and np.all(np.isneginf(
      np.asarray(lse[2])))
  for b, n in ((0, 100), (1, 37)):
    cos, rel = _cos_rel(out[b, :n], want[b, :n])
    assert cos >= 0.998 and rel <= 0.06, (b, cos, rel)
    assert np.abs(np.asarray(lse[b, :, :n] - lse_want[b, :, :n])).max() < 0.1
  # Padding tokens never reach a scale or the smoothing mean: garbage there changes nothing.
  junk = jnp.where((jnp.arange(100) >= 37)[None, :, None, None] & (jnp.arange(3) == 1)[
      :, None, None, None], 1e4, 0.0)
  out2, lse2 = fp8.fp8_attention(q + junk, k + junk, v - junk, block_size=BLOCK,
                                 kv_lengths=lengths)
  np.testing.assert_array_equal(np.asarray(out2), np.asarray(out))
  np.testing.assert_array_equal(np.asarray(lse2), np.asarray(lse))


def test_bad_inputs_raise():
  q, k, v = make_qkv(7, 1, 64, 1, 16, jnp.float32)
  with pytest.raises(ValueError):
    fp8.fp8_attention(q, k, v, block_size=48)
  with pytest.raises(ValueError):
    fp8.fp8_attention(q, k, v, block_size=BLOCK, quantized=("qk", "o"))
  with pytest.raises(ValueError):
    fp8.fp8_attention(q, k[:, :32], v, block_size=BLOCK)
