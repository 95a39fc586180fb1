"""``q_in_registers=True`` in the Mosaic block-sparse kernel: each warpgroup loads its Q
tile into registers once and every QK^T wgmma reads it from there.

Results run under JAX's GPU interpreter (CPU) against the numpy reference; the
interpreter multiplies with ``jnp.dot``, so the register operand itself (its layout
and the wgmma that takes it) is covered by lowering for CUDA, which runs on a CPU-only
machine, and by ``experiments/mosaic_variants.py qregs`` on the GPU. The block-mass
kernel's option is in ``test_mosaic_mass_variants.py``.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import mosaic_block_sparse, mosaic_interpret
from pallas_kernels.mosaic_block_sparse import block_sparse_attention_padded
from tests import numpy_ref
from tests.pallas_kernels.kernel_suite import make_qkv

TOL = {jnp.bfloat16: 3e-2, jnp.float16: 1e-2}


def _pad(x, n, axis):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, n - x.shape[axis])
  return jnp.asarray(np.pad(np.asarray(x), pad))


# (seq, head_dim, block_size, dtype, kv_length): three CTAs of 128 rows.
CASES = [(300, 128, 64, jnp.bfloat16, 290), (300, 64, 128, jnp.float16, 300),
         (260, 64, 64, jnp.float16, 201)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"bs{c[2]}d{c[1]}")
def test_q_in_registers_matches_reference(case):
  seq, d, bs, dtype, length = case
  q, k, v = make_qkv(51 + d, 1, seq, 2, d, dtype)
  n_blk = -(-seq // bs)
  rng = np.random.default_rng(52)
  n_q = -(-seq // 128) * 128 // bs
  idx = np.stack([rng.permutation(n_blk) for _ in range(2 * n_q)]).reshape(1, 2, n_q, n_blk)
  cnt = rng.integers(0, n_blk + 1, (1, 2, n_q)).astype(np.int32)
  cnt[0, 0, 0] = n_blk  # a dense row
  dense = (cnt >= n_blk).astype(np.int32)
  s_pad = n_q * bs
  with mosaic_interpret.device_context(True):
    out, lse = block_sparse_attention_padded(
        *(_pad(x, s_pad, 1) for x in (q, k, v)), jnp.asarray(idx, jnp.int32),
        jnp.asarray(cnt), jnp.asarray(dense), jnp.array([length], jnp.int32), block_size=bs,
        sm_scale=1 / math.sqrt(d), num_kv_blocks=n_blk, q_in_registers=True,
        interpret=mosaic_interpret.params(True))
  n_q_real = -(-seq // bs)
  want_out, want_lse = numpy_ref.block_sparse_attention(
      q, k, v, idx[:, :, :n_q_real], cnt[:, :, :n_q_real], bs, (length,))
  out = np.asarray(out, np.float64)[:, :length]
  lse = np.asarray(lse, np.float64)[:, :, :length]
  want_out, want_lse = want_out[:, :length], want_lse[:, :, :length]
  assert not np.isnan(out).any() and not np.isnan(lse).any()
  np.testing.assert_allclose(out, want_out, atol=TOL[dtype], rtol=0)
  finite = np.isfinite(want_lse)
  np.testing.assert_array_equal(np.isfinite(lse), finite)
  np.testing.assert_allclose(lse[finite], want_lse[finite], atol=2e-2, rtol=0)


def _sparse_call(bs, d, dtype=jnp.bfloat16, s=512):
  x = jax.ShapeDtypeStruct((1, s, 2, d), dtype)
  lists = jax.ShapeDtypeStruct((1, 2, s // bs, s // bs), jnp.int32)
  per_row = jax.ShapeDtypeStruct((1, 2, s // bs), jnp.int32)
  fn = functools.partial(block_sparse_attention_padded, block_size=bs, sm_scale=0.125,
                         num_kv_blocks=s // bs)
  return fn, (x, x, x, lists, per_row, per_row, jax.ShapeDtypeStruct((1,), jnp.int32))


@pytest.mark.parametrize("bs", [64, 128])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_q_in_registers_lowers_for_cuda(bs, d, dtype):
  fn, args = _sparse_call(bs, d, dtype)
  jax.jit(functools.partial(fn, q_in_registers=True)).trace(*args).lower(
      lowering_platforms=("cuda",))


@pytest.mark.parametrize("flag", [1, None, "yes"])
def test_bad_q_in_registers_raises(flag):
  fn, args = _sparse_call(64, 128)
  with pytest.raises(ValueError, match=f"q_in_registers={flag!r}"):
    jax.eval_shape(functools.partial(fn, q_in_registers=flag), *args)


def test_public_api_asks_for_the_module_default(monkeypatch):
  """``pallas_kernels.mosaic`` passes ``DEFAULT_Q_IN_REGISTERS``, read when it traces."""
  import pallas_kernels as pk
  from pallas_kernels import mosaic
  asked = []

  def spy(q, k, v, idx, steps, dense, lengths, **kw):
    asked.append(kw["q_in_registers"])
    b, s, h, _ = q.shape
    return jnp.zeros_like(q), jnp.zeros((b, h, s), jnp.float32)
  monkeypatch.setattr(mosaic, "block_sparse_attention_padded", spy)
  q, k, v = make_qkv(5, 1, 130, 1, 64, jnp.bfloat16)
  idx = jnp.zeros((1, 1, 3, 1), jnp.int32)
  cnt = jnp.ones((1, 1, 3), jnp.int32)
  for value in (False, True):
    monkeypatch.setattr(mosaic_block_sparse, "DEFAULT_Q_IN_REGISTERS", value)
    pk.block_sparse_attention(q, k, v, idx, cnt, block_size=64, implementation="mosaic",
                              interpret=True)
  assert asked == [False, True]
