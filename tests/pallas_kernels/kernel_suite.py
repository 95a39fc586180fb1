"""The one test suite every kernel implementation passes.

Each implementation's test file subclasses ``KernelSuite`` and sets
``implementation`` (and ``interpret`` for Pallas paths on CPU); the cases and the
numpy brute-force references are shared, so no kernel gets an easier suite.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from tests import numpy_ref

# (batch, seq, heads, head_dim, block_size, dtype, kv_lengths)
CASES = [
    (1, 128, 2, 64, 64, jnp.float32, None),
    (2, 200, 3, 64, 32, jnp.float32, (200, 131)),
    (2, 96, 2, 128, 32, jnp.bfloat16, (70, 96)),
    (1, 150, 1, 128, 64, jnp.float32, (101,)),
    (2, 77, 2, 64, 16, jnp.bfloat16, None),
]
CASE_IDS = [f"b{c[0]}s{c[1]}h{c[2]}d{c[3]}bs{c[4]}{jnp.dtype(c[5]).name}"
            f"{'' if c[6] is None else 'len'}" for c in CASES]


# Query blocks larger than key blocks (query_block_size):
# (batch, seq, heads, head_dim, block_size, query_block_size, dtype, kv_lengths)
QB_CASES = [
    (1, 200, 2, 64, 64, 128, jnp.float32, (150,)),        # 128 x 64, odd length, padded rows
    (2, 77, 2, 64, 16, 64, jnp.bfloat16, (77, 40)),       # 4 key blocks per query block
    (1, 150, 1, 128, 32, 128, jnp.float32, None),
]
QB_IDS = [f"b{c[0]}s{c[1]}h{c[2]}d{c[3]}q{c[5]}k{c[4]}{jnp.dtype(c[6]).name}"
          f"{'' if c[7] is None else 'len'}" for c in QB_CASES]


def make_qkv(seed, batch, seq, heads, head_dim, dtype):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal((batch, seq, heads, head_dim)), dtype)
          for _ in range(3)]


def rows_valid(batch, seq, kv_lengths):
  lengths = np.full(batch, seq) if kv_lengths is None else np.asarray(kv_lengths)
  return np.arange(seq)[None, :] < lengths[:, None]  # [B, S]


class KernelSuite:
  implementation = "reference"
  interpret = False
  out_tol = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}
  lse_tol = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
  mass_rtol = {jnp.float32: 1e-4, jnp.bfloat16: 3e-2}

  def kw(self):
    return dict(implementation=self.implementation, interpret=self.interpret)

  def _lengths(self, kv_lengths):
    return None if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)

  def check_out_lse(self, out, lse, want_out, want_lse, dtype, valid):
    assert not np.isnan(np.asarray(out, np.float32)).any()
    assert not np.isnan(np.asarray(lse)).any()
    out = np.asarray(out, np.float64)
    np.testing.assert_allclose(out, want_out, atol=self.out_tol[dtype], rtol=0)
    # Padded rows are exactly zero.
    assert np.all(out[~valid] == 0)
    lse = np.asarray(lse, np.float64)
    finite = np.isfinite(want_lse)
    np.testing.assert_array_equal(np.isfinite(lse), finite)
    np.testing.assert_allclose(lse[finite], want_lse[finite], atol=self.lse_tol[dtype], rtol=0)

  @pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
  def test_block_sparse_attention(self, case):
    b, s, h, d, bs, dtype, kv_lengths = case
    q, k, v = make_qkv(1, b, s, h, d, dtype)
    n_blk = -(-s // bs)
    rng = np.random.default_rng(2)
    idx, cnt = numpy_ref.random_block_lists(rng, b, h, n_blk, max(1, n_blk - 1))
    out, lse = pk.block_sparse_attention(
        q, k, v, jnp.asarray(idx), jnp.asarray(cnt), block_size=bs,
        kv_lengths=self._lengths(kv_lengths), **self.kw())
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (b, h, s) and lse.dtype == jnp.float32
    want_out, want_lse = numpy_ref.block_sparse_attention(q, k, v, idx, cnt, bs, kv_lengths)
    self.check_out_lse(out, lse, want_out, want_lse, dtype, rows_valid(b, s, kv_lengths))

  def test_block_sparse_all_blocks_equals_dense(self):
    b, s, h, d, bs = 1, 160, 2, 64, 32
    q, k, v = make_qkv(3, b, s, h, d, jnp.float32)
    n_blk = -(-s // bs)
    idx = jnp.broadcast_to(jnp.arange(n_blk, dtype=jnp.int32), (b, h, n_blk, n_blk))
    cnt = jnp.full((b, h, n_blk), n_blk, jnp.int32)
    out, lse = pk.block_sparse_attention(q, k, v, idx, cnt, block_size=bs, **self.kw())
    want_out, want_lse = numpy_ref.attention(q, k, v)
    self.check_out_lse(out, lse, want_out, want_lse, jnp.float32, rows_valid(b, s, None))

  def test_block_sparse_without_lse(self):
    b, s, h, d, bs = 1, 64, 1, 64, 16
    q, k, v = make_qkv(4, b, s, h, d, jnp.float32)
    idx, cnt = numpy_ref.random_block_lists(np.random.default_rng(5), b, h, 4, 2)
    out = pk.block_sparse_attention(q, k, v, jnp.asarray(idx), jnp.asarray(cnt),
                                    block_size=bs, return_lse=False, **self.kw())
    want_out, _ = numpy_ref.block_sparse_attention(q, k, v, idx, cnt, bs)
    np.testing.assert_allclose(np.asarray(out), want_out, atol=self.out_tol[jnp.float32])

  @pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
  def test_block_mass(self, case):
    b, s, h, d, bs, dtype, kv_lengths = case
    q, k, _ = make_qkv(6, b, s, h, d, dtype)
    _, lse = numpy_ref.attention(q, k, k, kv_lengths)
    # A cached LSE from another step need not normalise this step's rows: shift it.
    lse = lse + np.random.default_rng(7).normal(0, 0.3, lse.shape)
    mass = pk.block_mass(q, k, jnp.asarray(lse, jnp.float32), block_size=bs,
                         kv_lengths=self._lengths(kv_lengths), **self.kw())
    n_blk = -(-s // bs)
    assert mass.shape == (b, h, n_blk, n_blk) and mass.dtype == jnp.float32
    want = numpy_ref.block_mass(q, k, lse, bs, kv_lengths)
    np.testing.assert_allclose(np.asarray(mass), want, rtol=self.mass_rtol[dtype],
                               atol=self.mass_rtol[dtype] * 1e-2)

  @pytest.mark.parametrize("case", CASES[1:3], ids=CASE_IDS[1:3])
  def test_attention_with_block_mass(self, case):
    b, s, h, d, bs, dtype, kv_lengths = case
    q, k, v = make_qkv(8, b, s, h, d, dtype)
    out, lse, mass = pk.attention_with_block_mass(
        q, k, v, block_size=bs, kv_lengths=self._lengths(kv_lengths), **self.kw())
    want_out, want_lse = numpy_ref.attention(q, k, v, kv_lengths)
    self.check_out_lse(out, lse, want_out, want_lse, dtype, rows_valid(b, s, kv_lengths))
    want_mass = numpy_ref.block_mass(q, k, want_lse, bs, kv_lengths)
    np.testing.assert_allclose(np.asarray(mass), want_mass, rtol=self.mass_rtol[dtype],
                               atol=self.mass_rtol[dtype] * 1e-2)
    # Every valid row's mass sums to one.
    rows = np.asarray(mass).sum(-1)
    assert np.all(rows <= bs + 1e-2)

  def test_runs_under_jit(self):
    b, s, h, d, bs = 1, 96, 2, 64, 32
    q, k, v = make_qkv(9, b, s, h, d, jnp.float32)
    idx, cnt = numpy_ref.random_block_lists(np.random.default_rng(10), b, h, 3, 2)
    fn = jax.jit(lambda q, k, v, i, c: pk.block_sparse_attention(
        q, k, v, i, c, block_size=bs, **self.kw()))
    out, _ = fn(q, k, v, jnp.asarray(idx), jnp.asarray(cnt))
    want_out, _ = numpy_ref.block_sparse_attention(q, k, v, idx, cnt, bs)
    np.testing.assert_allclose(np.asarray(out), want_out, atol=self.out_tol[jnp.float32])

  def test_bad_block_lists_raise(self):
    q, k, v = make_qkv(11, 1, 64, 2, 64, jnp.float32)
    idx = jnp.zeros((1, 2, 3, 2), jnp.int32)  # nQ should be 4 at block 16
    cnt = jnp.ones((1, 2, 3), jnp.int32)
    with pytest.raises(ValueError, match="kv_block_indices"):
      pk.block_sparse_attention(q, k, v, idx, cnt, block_size=16, **self.kw())
    with pytest.raises(ValueError, match="block_size"):
      pk.block_mass(q, k, jnp.zeros((1, 2, 64)), block_size=48, **self.kw())

  # ---------------------------------------------------------- query_block_size > block_size

  @pytest.mark.parametrize("case", QB_CASES, ids=QB_IDS)
  def test_block_sparse_query_blocks(self, case):
    b, s, h, d, bs, qbs, dtype, kv_lengths = case
    q, k, v = make_qkv(12, b, s, h, d, dtype)
    n_q, n_k = -(-s // qbs), -(-s // bs)
    idx, cnt = numpy_ref.random_block_lists(np.random.default_rng(13), b, h, n_q,
                                            max(1, n_k - 2), n_kv=n_k)
    cnt[:, 0, -1] = 0  # a row that reads nothing: output 0, LSE -inf
    out, lse = pk.block_sparse_attention(
        q, k, v, jnp.asarray(idx), jnp.asarray(cnt), block_size=bs, query_block_size=qbs,
        kv_lengths=self._lengths(kv_lengths), **self.kw())
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (b, h, s)
    # Independent: dense float64 softmax under the token mask the coarse lists give.
    want_out, want_lse = numpy_ref.block_sparse_attention(q, k, v, idx, cnt, bs, kv_lengths,
                                                          query_block_size=qbs)
    self.check_out_lse(out, lse, want_out, want_lse, dtype, rows_valid(b, s, kv_lengths))

  @pytest.mark.parametrize("case", QB_CASES, ids=QB_IDS)
  def test_block_mass_query_blocks(self, case):
    b, s, h, d, bs, qbs, dtype, kv_lengths = case
    q, k, _ = make_qkv(14, b, s, h, d, dtype)
    _, lse = numpy_ref.attention(q, k, k, kv_lengths)
    lse = lse + np.random.default_rng(15).normal(0, 0.3, lse.shape)
    mass = pk.block_mass(q, k, jnp.asarray(lse, jnp.float32), block_size=bs,
                         query_block_size=qbs, kv_lengths=self._lengths(kv_lengths),
                         **self.kw())
    assert mass.shape == (b, h, -(-s // qbs), -(-s // bs)) and mass.dtype == jnp.float32
    want = numpy_ref.block_mass(q, k, lse, bs, kv_lengths, query_block_size=qbs)
    np.testing.assert_allclose(np.asarray(mass), want, rtol=self.mass_rtol[dtype],
                               atol=self.mass_rtol[dtype] * 1e-2)

  def test_attention_with_block_mass_query_blocks(self):
    b, s, h, d, bs, qbs, dtype, kv_lengths = QB_CASES[0]
    q, k, v = make_qkv(16, b, s, h, d, dtype)
    out, lse, mass = pk.attention_with_block_mass(
        q, k, v, block_size=bs, query_block_size=qbs, kv_lengths=self._lengths(kv_lengths),
        **self.kw())
    want_out, want_lse = numpy_ref.attention(q, k, v, kv_lengths)
    self.check_out_lse(out, lse, want_out, want_lse, dtype, rows_valid(b, s, kv_lengths))
    want_mass = numpy_ref.block_mass(q, k, want_lse, bs, kv_lengths, query_block_size=qbs)
    np.testing.assert_allclose(np.asarray(mass), want_mass, rtol=self.mass_rtol[dtype],
                               atol=self.mass_rtol[dtype] * 1e-2)
    # A query block's row sums to its valid rows (exact attention): 128 and 22 of 150.
    np.testing.assert_allclose(np.asarray(mass)[0, 0].sum(-1), [128.0, 22.0], rtol=1e-4)

  def test_query_block_lists_at_key_granularity_raise(self):
    q, k, v = make_qkv(17, 1, 200, 1, 64, jnp.float32)
    idx = jnp.zeros((1, 1, 4, 2), jnp.int32)  # 4 rows: blocks of 64; 128-row blocks give 2
    cnt = jnp.ones((1, 1, 4), jnp.int32)
    with pytest.raises(ValueError, match=r"query_block_size=128\) = 2"):
      pk.block_sparse_attention(q, k, v, idx, cnt, block_size=64, query_block_size=128,
                                **self.kw())

  @pytest.mark.parametrize("qbs", [96, 32, 256, 64.0, True])
  def test_bad_query_block_size_raises(self, qbs):
    q, k, v = make_qkv(18, 1, 128, 1, 64, jnp.float32)
    idx = jnp.zeros((1, 1, 1, 1), jnp.int32)
    cnt = jnp.ones((1, 1, 1), jnp.int32)
    with pytest.raises(ValueError, match=f"query_block_size={qbs!r}"):
      pk.block_sparse_attention(q, k, v, idx, cnt, block_size=64, query_block_size=qbs,
                                **self.kw())
    with pytest.raises(ValueError, match=f"query_block_size={qbs!r}"):
      pk.block_mass(q, k, jnp.zeros((1, 1, 128)), block_size=64, query_block_size=qbs,
                    **self.kw())
    with pytest.raises(ValueError, match=f"query_block_size={qbs!r}"):
      pk.attention_with_block_mass(q, k, v, block_size=64, query_block_size=qbs, **self.kw())
