"""precision="fp8" through the dispatchers (``pallas_kernels.api``), cuDNN FP8's
quantisation and its jnp emulation (``pallas_kernels.cudnn_fp8``), and the config field
through ``adaspa_attention``. On CPU the FP8 paths are the reference recipe; the Mosaic
FP8 kernel's own tests are test_mosaic_fp8.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from adaspa_jax import AdaSpaConfig, adaspa_attention, init_state, text_blocks_mask
from pallas_kernels import cudnn_fp8
from pallas_kernels.reference import fp8 as ref_fp8
from tests import numpy_ref


def _qkv(seed, b=1, s=200, h=2, d=64, k_offset=0.0):
  rng = np.random.default_rng(seed)
  q, k, v = (rng.standard_normal((b, s, h, d)).astype(np.float32) for _ in range(3))
  # A channel-wise offset on K, as video DiTs' K carries (what smoothing removes).
  k = k + k_offset * rng.standard_normal((1, 1, h, d)).astype(np.float32)
  return tuple(jnp.asarray(x) for x in (q, k, v))


def _cos(a, b):
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _lists(seed, b, h, n_q, n_k, keep):
  """Random row-wise lists: ``keep`` distinct key blocks per row, block 0 always kept."""
  rng = np.random.default_rng(seed)
  idx = np.zeros((b, h, n_q, keep), np.int32)
  for pos in np.ndindex(b, h, n_q):
    idx[pos] = np.concatenate([[0], rng.choice(np.arange(1, n_k), keep - 1, replace=False)])
  return jnp.asarray(idx), jnp.full((b, h, n_q), keep, jnp.int32)


def test_quantize_scales_and_smoothing():
  q, k, v = _qkv(0, k_offset=4.0)
  q8, k8, v8, p = cudnn_fp8.quantize(q, k, v)
  assert q8.dtype == k8.dtype == v8.dtype == jnp.float8_e4m3fn
  assert set(p) == set(cudnn_fp8._PARAM_KEYS)  # pylint: disable=protected-access
  assert all(x.shape == (1, 1, 1, 1) and x.dtype == jnp.float32 for x in p.values())
  np.testing.assert_allclose(float(p["descale_q"][0, 0, 0, 0]),
                             float(jnp.abs(q).max()) / 448, rtol=1e-6)
  ks = k - k.mean(axis=1, keepdims=True)
  np.testing.assert_allclose(float(p["descale_k"][0, 0, 0, 0]),
                             float(jnp.abs(ks).max()) / 448, rtol=1e-6)
  # Each tensor's largest entry lands on e4m3's largest finite value.
  for x8 in (q8, k8, v8):
    assert float(jnp.abs(x8.astype(jnp.float32)).max()) == 448.0
  np.testing.assert_allclose(float(p["scale_o"][0, 0, 0, 0] * p["descale_o"][0, 0, 0, 0]), 1,
                             rtol=1e-6)
  assert float(p["scale_s"][0, 0, 0, 0]) == 448.0
  # Dequantised K is the smoothed K to e4m3's precision (3 mantissa bits).
  k_back = k8.astype(jnp.float32) * p["descale_k"]
  assert float(jnp.abs(k_back - ks).max()) <= float(jnp.abs(ks).max()) * 2.0 ** -4


@pytest.mark.parametrize("k_offset", [0.0, 5.0])
def test_emulation_against_float32(k_offset):
  q, k, v = _qkv(1, k_offset=k_offset)
  out = cudnn_fp8.emulate(q, k, v)
  want, _ = numpy_ref.attention(q, k, v, np.array([200]))
  assert out.shape == q.shape and not np.isnan(np.asarray(out)).any()
  assert _cos(out, want) >= 0.995
  # Without smoothing the offset K quantises worse.
  if k_offset:
    rough = cudnn_fp8.emulate(q, k, v, smooth=False)
    assert _cos(rough, want) < _cos(out, want)


def test_cudnn_path_reports_why_it_cannot_run_and_the_dispatcher_falls_back():
  q, k, v = _qkv(2)
  if jax.devices()[0].platform != "gpu":
    assert "GPU" in cudnn_fp8.unsupported_reason(q)
    with pytest.raises(ValueError, match="cuDNN FP8 attention cannot run here"):
      cudnn_fp8.dense_attention(q, k, v)
    with pytest.raises(ValueError, match="implementation='cudnn' with precision='fp8'"):
      pk.dense_attention(q, k, v, precision="fp8", implementation="cudnn")
  assert "kv_lengths" in cudnn_fp8.unsupported_reason(q, jnp.array([5]))
  assert "head_dim=32" in cudnn_fp8.unsupported_reason(q[..., :32])
  # The fallback: the FP8 recipe with every row dense, equal to the reference's dense FP8.
  lengths = jnp.array([170], jnp.int32)
  got = pk.dense_attention(q, k, v, kv_lengths=lengths, precision="fp8",
                           implementation="reference")
  want, _ = ref_fp8.fp8_attention(q, k, v, block_size=64, kv_lengths=lengths)
  np.testing.assert_allclose(np.asarray(got[:, :170]), np.asarray(want[:, :170]), atol=1e-6)
  assert not np.asarray(got[:, 170:]).any()
  assert _cos(got[:, :170], numpy_ref.attention(q, k, v, np.array([170]))[0][:, :170]) >= 0.995


def test_block_sparse_fp8_dispatch_and_refusals():
  q, k, v = _qkv(3, s=300, k_offset=2.0)
  n_k = 5  # ceil(300 / 64)
  idx, cnt = _lists(3, 1, 2, 3, n_k, 3)  # 128-row query blocks over 64-key blocks
  kw = dict(block_size=64, query_block_size=128, kv_lengths=jnp.array([290], jnp.int32))
  out, lse = pk.block_sparse_attention(q, k, v, idx, cnt, precision="fp8",
                                       implementation="reference", **kw)
  want, want_lse = ref_fp8.fp8_block_sparse_attention(q, k, v, idx, cnt, **kw)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
  np.testing.assert_array_equal(np.asarray(lse), np.asarray(want_lse))
  exact, exact_lse = pk.block_sparse_attention(q, k, v, idx, cnt, implementation="reference",
                                               **kw)
  assert _cos(out[:, :290], exact[:, :290]) >= 0.995
  np.testing.assert_allclose(np.asarray(lse)[..., :290], np.asarray(exact_lse)[..., :290],
                             atol=0.05)
  only = pk.block_sparse_attention(q, k, v, idx, cnt, precision="fp8", return_lse=False,
                                   implementation="reference", **kw)
  np.testing.assert_array_equal(np.asarray(only), np.asarray(out))
  with pytest.raises(ValueError, match="precision='fp8' with implementation='triton'"):
    pk.block_sparse_attention(q, k, v, idx, cnt, precision="fp8", implementation="triton",
                              **kw)
  with pytest.raises(ValueError, match="precision='int8'"):
    pk.block_sparse_attention(q, k, v, idx, cnt, precision="int8", **kw)
  # "int8_fp8": the reference recipe with int8 Q and K; cuDNN has no INT8 attention.
  out8, lse8 = pk.block_sparse_attention(q, k, v, idx, cnt, precision="int8_fp8",
                                         implementation="reference", **kw)
  want8, want8_lse = ref_fp8.fp8_block_sparse_attention(q, k, v, idx, cnt, qk_dtype=jnp.int8,
                                                        **kw)
  np.testing.assert_array_equal(np.asarray(out8), np.asarray(want8))
  np.testing.assert_array_equal(np.asarray(lse8), np.asarray(want8_lse))
  assert _cos(out8[:, :290], exact[:, :290]) > _cos(out[:, :290], exact[:, :290])
  with pytest.raises(ValueError, match="precision='int8_fp8' with implementation='triton'"):
    pk.block_sparse_attention(q, k, v, idx, cnt, precision="int8_fp8",
                              implementation="triton", **kw)
  with pytest.raises(ValueError, match="cuDNN has no INT8 attention"):
    pk.dense_attention(q, k, v, precision="int8_fp8", implementation="cudnn")
  dense8 = pk.dense_attention(q, k, v, precision="int8_fp8", implementation="reference",
                              block_size=64)
  np.testing.assert_array_equal(
      np.asarray(dense8),
      np.asarray(ref_fp8.fp8_attention(q, k, v, block_size=64, qk_dtype=jnp.int8)[0]))
  with pytest.raises(ValueError, match="precision='xla'|implementation='xla'"):
    pk.dense_attention(q, k, v, precision="fp8", implementation="xla")


def test_config_precision_through_adaspa_attention():
  with pytest.raises(ValueError, match="precision='fp16'"):
    AdaSpaConfig(precision="fp16")
  for precision in ("fp8", "int8_fp8"):
    with pytest.raises(ValueError, match="Triton has no 8-bit path"):
      AdaSpaConfig(precision=precision, implementation="triton")
  cfg = AdaSpaConfig(sparsity=0.5, block_size=16, num_steps=6, search_steps=(1, 3),
                     implementation="reference")
  cfg8 = cfg.replace(precision="fp8")
  q, k, v = _qkv(4, b=1, s=96, h=2, d=32, k_offset=3.0)
  text = text_blocks_mask(96, 16, 80, 16)
  state = init_state(cfg, 1, 96, 2, text_blocks=text)
  outs = {}
  for name, c in (("bf16", cfg), ("fp8", cfg8)):
    st = state
    outs[name] = []
    for step in range(3):  # dense, fused search, sparse
      out, st = adaspa_attention(q, k, v, st, step, c, text_blocks=text)
      outs[name].append(out)
    outs[name + "_state"] = st
  # The search runs in the inputs' dtype: both precisions choose the same lists.
  np.testing.assert_array_equal(np.asarray(outs["bf16_state"].indices),
                                np.asarray(outs["fp8_state"].indices))
  np.testing.assert_array_equal(np.asarray(outs["bf16"][1]), np.asarray(outs["fp8"][1]))
  for step in (0, 2):  # dense and sparse steps differ by FP8's error only
    a, b = outs["bf16"][step], outs["fp8"][step]
    assert 0.99 <= _cos(a, b) < 1.0 and not np.isnan(np.asarray(b)).any()


@pytest.mark.parametrize("precision", ["fp8", "int8_fp8"])
def test_mosaic_fp8_through_the_dispatcher_in_interpret_mode(precision):
  """implementation="mosaic" at an 8-bit precision: the Mosaic 8-bit kernel under JAX's
  GPU interpreter, on the same lists as the reference recipe (128 x 64, ragged length)."""
  q, k, v = _qkv(5, s=300, h=1, k_offset=2.0)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  idx, cnt = _lists(5, 1, 1, 3, 5, 2)
  kw = dict(block_size=64, query_block_size=128, kv_lengths=jnp.array([260], jnp.int32))
  out, lse = pk.block_sparse_attention(q, k, v, idx, cnt, precision=precision,
                                       implementation="mosaic", interpret=True, **kw)
  want, want_lse = ref_fp8.fp8_block_sparse_attention(
      q, k, v, idx, cnt, qk_dtype=ref_fp8.QK_DTYPES[precision], **kw)
  exact, _ = pk.block_sparse_attention(q, k, v, idx, cnt, implementation="reference", **kw)
  assert out.dtype == jnp.bfloat16 and not np.isnan(np.asarray(out, np.float32)).any()
  assert _cos(out[:, :260], want[:, :260]) >= 0.999
  assert _cos(out[:, :260], exact[:, :260]) >= 0.99
  np.testing.assert_allclose(np.asarray(lse)[..., :260], np.asarray(want_lse)[..., :260],
                             atol=1e-2)
