"""The Mosaic GPU kernels under JAX's GPU interpreter (CPU), and their fallbacks.

What runs here: the whole kernels (warp specialisation, TMA copies of the listed
K/V blocks, the mbarrier rings and their phases, per-row loop lengths from the
counts, dense rows, the tail mask past kv_lengths, the LSE, the block-mass
reduction table) in the interpreter, against the numpy references.

What the interpreter cannot run, and where it is checked instead: wgmma with a
transposed B operand (QK^T) or a register A operand (PV), ``plgpu.load`` and
layout casts. Under ``interpret=True`` the kernels read the same shared-memory
tiles and multiply them with ``jnp.dot`` instead
(``mosaic_block_sparse.qk_matmul``, ``pv_matmul``, ``load_row_vector``,
``with_layout``, ``column_ids``). The wgmma path is checked against the reference
on the GPU by the correctness stage of ``experiments/bench_kernels.py``
(results in docs/log/mosaic.md).

Interpreting costs seconds per CTA, so each kernel case is one CTA (128 rows).
"""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels.mosaic import interpreter as mosaic_interpret
from pallas_kernels.mosaic import ops as mosaic
from pallas_kernels.mosaic.block_sparse_kernel import block_sparse_attention_padded
from tests import numpy_ref
from tests.pallas_kernels.kernel_suite import KernelSuite, make_qkv, rows_valid

TOL = {jnp.bfloat16: 3e-2, jnp.float16: 1e-2}
LSE_TOL = 2e-2


@pytest.mark.filterwarnings("ignore:mosaic")
class TestMosaic(KernelSuite):
  """The shared suite. Its cases are float32 or blocks under 64, so they exercise
  the fallback; the kernel itself is tested by the functions below."""
  implementation = "mosaic"
  interpret = True


def _lengths(kv_lengths):
  return None if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)


# (batch, seq, heads, head_dim, block_size, dtype, kv_lengths)
SPARSE_CASES = [
    (1, 120, 2, 64, 64, jnp.bfloat16, (101,)),  # two lists per CTA, ragged tail, padding
    (1, 200, 1, 128, 128, jnp.float16, None),  # one list shared by both warpgroups
]


@pytest.mark.filterwarnings("error:mosaic")  # a fallback would leave the kernel untested
@pytest.mark.parametrize("case", SPARSE_CASES, ids=lambda c: f"s{c[1]}d{c[3]}bs{c[4]}")
def test_block_sparse_kernel(case):
  b, s, h, d, bs, dtype, kv_lengths = case
  q, k, v = make_qkv(21, b, s, h, d, dtype)
  n_blk = -(-s // bs)
  idx, cnt = numpy_ref.random_block_lists(np.random.default_rng(22), b, h, n_blk,
                                          max(1, n_blk - 1))
  if h > 1:
    cnt[:, 0, 1] = 0  # a row that reads nothing: output 0, LSE -inf
    cnt[:, 1, 0] = n_blk  # a dense row, its list unread
  out, lse = pk.block_sparse_attention(
      q, k, v, jnp.asarray(idx), jnp.asarray(cnt), block_size=bs,
      kv_lengths=_lengths(kv_lengths), implementation="mosaic", interpret=True)
  assert out.dtype == q.dtype and lse.dtype == jnp.float32
  want_out, want_lse = numpy_ref.block_sparse_attention(q, k, v, idx, cnt, bs, kv_lengths)
  out = np.asarray(out, np.float64)
  lse = np.asarray(lse, np.float64)
  assert not np.isnan(out).any() and not np.isnan(lse).any()
  np.testing.assert_allclose(out, want_out, atol=TOL[dtype], rtol=0)
  assert np.all(out[~rows_valid(b, s, kv_lengths)] == 0)
  finite = np.isfinite(want_lse)
  np.testing.assert_array_equal(np.isfinite(lse), finite)
  np.testing.assert_allclose(lse[finite], want_lse[finite], atol=LSE_TOL, rtol=0)


# (batch, seq, heads, head_dim, block_size, dtype, kv_lengths)
MASS_CASES = [
    (1, 120, 1, 128, 64, jnp.bfloat16, (101,)),
    (1, 128, 1, 64, 128, jnp.float16, (110,)),  # two 64-row chunks per query block
]


@pytest.mark.filterwarnings("error:mosaic")  # a fallback would leave the kernel untested
@pytest.mark.parametrize("case", MASS_CASES, ids=lambda c: f"s{c[1]}d{c[3]}bs{c[4]}")
def test_block_mass_kernel(case):
  b, s, h, d, bs, dtype, kv_lengths = case
  q, k, _ = make_qkv(23, b, s, h, d, dtype)
  _, lse = numpy_ref.attention(q, k, k, kv_lengths)
  lse = lse + np.random.default_rng(24).normal(0, 0.3, lse.shape)  # a cached, stale LSE
  mass = pk.block_mass(q, k, jnp.asarray(lse, jnp.float32), block_size=bs,
                       kv_lengths=_lengths(kv_lengths), implementation="mosaic",
                       interpret=True)
  want = numpy_ref.block_mass(q, k, lse, bs, kv_lengths)
  assert mass.shape == want.shape and mass.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(mass), want, rtol=TOL[dtype], atol=TOL[dtype] * 1e-2)


@pytest.mark.filterwarnings("error:mosaic")  # a fallback would leave the kernel untested
def test_fused_search_kernel():
  b, s, h, d, bs, dtype, kv_lengths = 1, 128, 1, 64, 64, jnp.bfloat16, (100,)
  q, k, v = make_qkv(25, b, s, h, d, dtype)
  out, lse, mass = pk.attention_with_block_mass(
      q, k, v, block_size=bs, kv_lengths=_lengths(kv_lengths), implementation="mosaic",
      interpret=True)
  want_out, want_lse = numpy_ref.attention(q, k, v, kv_lengths)
  np.testing.assert_allclose(np.asarray(out, np.float64), want_out, atol=TOL[dtype], rtol=0)
  finite = np.isfinite(want_lse)
  np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
  np.testing.assert_allclose(np.asarray(lse)[finite], want_lse[finite], atol=LSE_TOL)
  want_mass = numpy_ref.block_mass(q, k, want_lse, bs, kv_lengths)
  np.testing.assert_allclose(np.asarray(mass), want_mass, rtol=TOL[dtype],
                             atol=TOL[dtype] * 1e-2)
  # Exact attention: every valid row's mass sums to one (64 + 36 valid rows).
  np.testing.assert_allclose(np.asarray(mass)[0, 0].sum(-1), [64.0, 36.0], rtol=TOL[dtype])


@pytest.mark.filterwarnings("error:mosaic")  # a fallback would leave the kernel untested
def test_query_blocks_128x64_kernels(monkeypatch):
  # 128-row query blocks over 64-key blocks: the block-sparse kernel's native path (one
  # list per CTA, never expanded to 64-row lists), the block mass summed over 64-row halves.
  from pallas_kernels.mosaic import ops as mosaic_ops

  def no_expansion(*args, **kwargs):
    raise AssertionError("128 x 64 lists were expanded instead of running natively")

  monkeypatch.setattr(mosaic_ops.query_blocks, "expand_lists", no_expansion)
  b, s, h, d, bs, qbs, dtype, kv_lengths = 1, 250, 2, 64, 64, 128, jnp.bfloat16, (201,)
  q, k, v = make_qkv(30, b, s, h, d, dtype)
  n_q, n_k = 2, 4
  idx, cnt = numpy_ref.random_block_lists(np.random.default_rng(31), b, h, n_q, 2, n_kv=n_k)
  cnt[:, 0, 1] = 0     # reads nothing
  cnt[:, 1, 0] = n_k   # dense
  out, lse = pk.block_sparse_attention(
      q, k, v, jnp.asarray(idx), jnp.asarray(cnt), block_size=bs, query_block_size=qbs,
      kv_lengths=_lengths(kv_lengths), implementation="mosaic", interpret=True)
  want_out, want_lse = numpy_ref.block_sparse_attention(q, k, v, idx, cnt, bs, kv_lengths,
                                                        query_block_size=qbs)
  out, lse = np.asarray(out, np.float64), np.asarray(lse, np.float64)
  np.testing.assert_allclose(out, want_out, atol=TOL[dtype], rtol=0)
  assert np.all(out[~rows_valid(b, s, kv_lengths)] == 0)
  finite = np.isfinite(want_lse)
  np.testing.assert_array_equal(np.isfinite(lse), finite)
  np.testing.assert_allclose(lse[finite], want_lse[finite], atol=LSE_TOL, rtol=0)

  _, lse_ref = numpy_ref.attention(q, k, v, kv_lengths)
  mass = pk.block_mass(q, k, jnp.asarray(lse_ref, jnp.float32), block_size=bs,
                       query_block_size=qbs, kv_lengths=_lengths(kv_lengths),
                       implementation="mosaic", interpret=True)
  want = numpy_ref.block_mass(q, k, lse_ref, bs, kv_lengths, query_block_size=qbs)
  assert mass.shape == (b, h, n_q, n_k)
  np.testing.assert_allclose(np.asarray(mass), want, rtol=TOL[dtype], atol=TOL[dtype] * 1e-2)


def test_kernel_has_no_races():
  """The interpreter's happens-before race detector over one CTA with two rings."""
  b, s, h, d, bs = 1, 128, 1, 64, 64
  q, k, v = make_qkv(26, b, s, h, d, jnp.bfloat16)
  idx = jnp.array([[[[1, 0], [0, 1]]]], jnp.int32)
  steps = jnp.array([[[2, 1]]], jnp.int32)
  dense = jnp.zeros((1, 1, 2), jnp.int32)
  with mosaic_interpret.device_context(True):
    out, _ = block_sparse_attention_padded(
        q, k, v, idx, steps, dense, jnp.array([s], jnp.int32), block_size=bs,
        sm_scale=1 / math.sqrt(d), num_kv_blocks=2,
        interpret=mosaic_interpret.params(True, detect_races=True))
    jax.block_until_ready(out)
  assert not mosaic_interpret.races_found()
  want, _ = numpy_ref.block_sparse_attention(q, k, v, np.asarray(idx), np.asarray(steps), bs)
  np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=TOL[jnp.bfloat16])


@pytest.mark.parametrize("dtype,d,bs,reason", [
    (jnp.float32, 64, 64, "dtype float32"),
    (jnp.bfloat16, 96, 64, "head_dim 96"),
    (jnp.bfloat16, 64, 32, "block_size 32"),
])
def test_unsupported_falls_back_with_one_warning(dtype, d, bs, reason):
  b, s, h = 1, 64, 1
  q, k, v = make_qkv(27, b, s, h, d, dtype)
  n_blk = -(-s // bs)
  idx, cnt = numpy_ref.random_block_lists(np.random.default_rng(28), b, h, n_blk, n_blk)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out, lse = pk.block_sparse_attention(q, k, v, jnp.asarray(idx), jnp.asarray(cnt),
                                         block_size=bs, implementation="mosaic",
                                         interpret=True)
  msgs = [str(w.message) for w in caught if "mosaic" in str(w.message)]
  assert len(msgs) == 1 and reason in msgs[0] and "\n" not in msgs[0]
  want_out, want_lse = numpy_ref.block_sparse_attention(q, k, v, idx, cnt, bs)
  tol = 2e-5 if dtype == jnp.float32 else 3e-2
  np.testing.assert_allclose(np.asarray(out, np.float64), want_out, atol=tol, rtol=0)
  np.testing.assert_allclose(np.asarray(lse), want_lse, atol=max(tol, 2e-5), rtol=0)


def test_unsupported_reason():
  assert mosaic.unsupported_reason(jnp.bfloat16, 128, 64) is None
  assert mosaic.unsupported_reason(jnp.float16, 64, 128) is None
  assert "float32" in mosaic.unsupported_reason(jnp.float32, 128, 64)
  assert "head_dim" in mosaic.unsupported_reason(jnp.bfloat16, 256, 64)
  assert "block_size" in mosaic.unsupported_reason(jnp.bfloat16, 128, 256)


@pytest.mark.skipif(jax.devices()[0].platform == "gpu", reason="checks the CPU error")
def test_compiling_off_hopper_raises():
  q, k, v = make_qkv(29, 1, 64, 1, 64, jnp.bfloat16)
  idx = jnp.zeros((1, 1, 1, 1), jnp.int32)
  cnt = jnp.ones((1, 1, 1), jnp.int32)
  with pytest.raises(ValueError, match="interpret"):
    mosaic.block_sparse_attention(q, k, v, idx, cnt, block_size=64, interpret=False)
