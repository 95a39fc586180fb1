"""Property-based sweep of every kernel implementation against the numpy brute force.

Hypothesis draws batch, heads, head_dim 64/128, lengths that are not a multiple of the
block, kv_lengths from 1 to S (padded text at the end), dtype, and random block lists
(distinct blocks per row, counts from 0 to K_max, dense rows), then checks each result
against ``tests/numpy_ref.py`` within the tolerances below; fully masked rows are zeros,
nothing is NaN, and the LSE is finite exactly where a row has a valid key.

The suite runs ``FUZZ_EXAMPLES`` cases per implementation and op (environment variable
``ADASPA_FUZZ_EXAMPLES``, default 4 so ``make test`` and CI stay short); ``make fuzz`` runs 200.
Shapes come from a small grid so compilations are shared between cases; values and
lists are fresh for every case.
"""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pallas_kernels as pk
from tests import numpy_ref

FUZZ_EXAMPLES = int(os.environ.get("ADASPA_FUZZ_EXAMPLES", "4"))
SETTINGS = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Stated tolerances (absolute, on outputs of unit-variance inputs; relative on masses).
OUT_TOL = {jnp.float32: 2e-4, jnp.bfloat16: 4e-2}
LSE_TOL = {jnp.float32: 2e-4, jnp.bfloat16: 3e-2}
MASS_TOL = {jnp.float32: 1e-3, jnp.bfloat16: 5e-2}

# What each implementation runs: (block sizes, dtypes, interpret). Mosaic's wgmma takes
# 16-bit inputs and blocks of 64 or 128; other sizes would only test its fallback.
IMPLS = {
    "reference": ((16, 32, 64), (jnp.float32, jnp.bfloat16), False),
    "triton": ((16, 32, 64), (jnp.float32, jnp.bfloat16), True),
    "mosaic": ((64,), (jnp.bfloat16,), True),
}


@st.composite
def cases(draw, impl, with_lists=True):
  blocks, dtypes, _ = IMPLS[impl]
  bs = draw(st.sampled_from(blocks))
  seq = bs * draw(st.sampled_from((2, 3))) - draw(st.sampled_from((3, 17)))   # not a multiple
  b, h = draw(st.integers(1, 2)), draw(st.integers(1, 2))
  d = draw(st.sampled_from((64, 128)))
  dtype = draw(st.sampled_from(dtypes))
  lengths = None
  if draw(st.booleans()):
    lengths = np.asarray([draw(st.integers(1, seq)) for _ in range(b)], np.int32)
  seed = draw(st.integers(0, 2**31 - 1))
  case = dict(b=b, seq=seq, h=h, d=d, bs=bs, dtype=dtype, lengths=lengths, seed=seed)
  if with_lists:
    n = -(-seq // bs)
    k_max = draw(st.integers(1, n))
    rng = np.random.default_rng(seed)
    idx = np.zeros((b, h, n, k_max), np.int32)
    cnt = rng.integers(0, k_max + 1, (b, h, n)).astype(np.int32)
    for row in np.ndindex(b, h, n):
      idx[row] = rng.permutation(n)[:k_max]      # distinct; unread entries are valid ids too
    cnt[rng.random((b, h, n)) < 0.2] = n         # dense rows
    case.update(indices=idx, counts=cnt)
  return case


def _inputs(c):
  rng = np.random.default_rng(c["seed"])
  return [jnp.asarray(rng.standard_normal((c["b"], c["seq"], c["h"], c["d"])), c["dtype"])
          for _ in range(3)]


def _kw(impl):
  return dict(implementation=impl, interpret=IMPLS[impl][2])


def _check_out_lse(out, lse, want_out, want_lse, c):
  out, lse = np.asarray(out, np.float64), np.asarray(lse, np.float64)
  assert not np.isnan(out).any() and not np.isnan(lse).any()
  np.testing.assert_allclose(out, want_out, atol=OUT_TOL[c["dtype"]], rtol=0)
  finite = np.isfinite(want_lse)
  np.testing.assert_array_equal(np.isfinite(lse), finite)
  np.testing.assert_allclose(lse[finite], want_lse[finite], atol=LSE_TOL[c["dtype"]], rtol=0)
  # Rows past a row's length, and rows with no valid key, are exactly zero.
  lengths = np.full(c["b"], c["seq"]) if c["lengths"] is None else c["lengths"]
  padded = np.arange(c["seq"])[None, :] >= lengths[:, None]
  assert np.all(out[padded] == 0)
  empty = ~finite.transpose(0, 2, 1)                                   # [B, S, H]
  assert np.all(out[empty] == 0)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_block_sparse_attention_fuzz(impl):
  @SETTINGS
  @given(cases(impl))
  def run(c):
    q, k, v = _inputs(c)
    lengths = None if c["lengths"] is None else jnp.asarray(c["lengths"])
    out, lse = pk.block_sparse_attention(q, k, v, jnp.asarray(c["indices"]),
                                         jnp.asarray(c["counts"]), block_size=c["bs"],
                                         kv_lengths=lengths, **_kw(impl))
    want_out, want_lse = numpy_ref.block_sparse_attention(q, k, v, c["indices"], c["counts"],
                                                          c["bs"], c["lengths"])
    _check_out_lse(out, lse, want_out, want_lse, c)
  run()


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_fused_search_and_block_mass_fuzz(impl):
  @SETTINGS
  @given(cases(impl, with_lists=False))
  def run(c):
    q, k, v = _inputs(c)
    lengths = None if c["lengths"] is None else jnp.asarray(c["lengths"])
    out, lse, mass = pk.attention_with_block_mass(q, k, v, block_size=c["bs"],
                                                  kv_lengths=lengths, **_kw(impl))
    want_out, want_lse = numpy_ref.attention(q, k, v, c["lengths"])
    _check_out_lse(out, lse, want_out, want_lse, c)
    want_mass = numpy_ref.block_mass(q, k, want_lse, c["bs"], c["lengths"])
    tol = MASS_TOL[c["dtype"]]
    np.testing.assert_allclose(np.asarray(mass, np.float64), want_mass, rtol=tol, atol=tol * 1e-2)
    again = pk.block_mass(q, k, jnp.asarray(want_lse, jnp.float32), block_size=c["bs"],
                          kv_lengths=lengths, **_kw(impl))
    np.testing.assert_allclose(np.asarray(again, np.float64), want_mass, rtol=tol,
                               atol=tol * 1e-2)
  run()
