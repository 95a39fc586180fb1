"""The ``stages`` field of the Mosaic kernels' configs: results, checks, shared memory.

Results run under JAX's GPU interpreter (CPU) against the numpy references, with
lists long enough that a 3-deep ring wraps (its mbarrier phases flip). The
shared-memory footprint is checked against Mosaic GPU itself: lowering a kernel
for CUDA runs on a CPU-only machine and raises with the bytes it would allocate
when they exceed the 227 KiB of an sm90 CTA.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.mosaic import block_mass_kernel as mosaic_block_mass
from pallas_kernels.mosaic import block_sparse_kernel as mosaic_block_sparse
from pallas_kernels.mosaic import common as mosaic_common
from pallas_kernels.mosaic import interpreter as mosaic_interpret
from pallas_kernels.mosaic.block_mass_kernel import BlockMassConfig, block_mass_padded
from pallas_kernels.mosaic.block_sparse_kernel import (
    BlockSparseConfig, block_sparse_attention_padded)
from tests import numpy_ref
from tests.pallas_kernels.kernel_suite import make_qkv

TOL = {jnp.bfloat16: 3e-2, jnp.float16: 1e-2}


def _pad_rows(x, s_pad, axis=1, value=0):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, s_pad - x.shape[axis])
  return np.pad(np.asarray(x), pad, constant_values=value)


# (seq, head_dim, block_size, dtype, stages, kv_length): S_pad = 384, three CTAs;
# up to 5 (bs 64) or 3 (bs 128) blocks per row, so every ring wraps.
SPARSE_CASES = [
    (300, 128, 64, jnp.bfloat16, 3, 290),
    (300, 64, 128, jnp.float16, 2, 300),  # the default at D=64 is 4: the override is used
]


@pytest.mark.parametrize("case", SPARSE_CASES, ids=lambda c: f"bs{c[2]}d{c[1]}st{c[4]}")
def test_block_sparse_stages_match_reference(case):
  seq, d, bs, dtype, stages, length = case
  q, k, v = make_qkv(31, 1, seq, 1, d, dtype)
  n_blk = -(-seq // bs)
  rng = np.random.default_rng(32)
  # Unsorted lists; rows that read all blocks in order (dense), nothing, all but one
  # from the list (past a 3-deep ring), two, one.
  idx = np.stack([rng.permutation(n_blk) for _ in range(n_blk)]).astype(np.int32)[None, None]
  cnt = np.array([n_blk, 0, n_blk - 1, 2, 1][:n_blk], np.int32)[None, None]
  dense = (cnt >= n_blk).astype(np.int32)  # as pallas_kernels.mosaic.ops.kernel_lists
  s_pad = -(-seq // 128) * 128
  n_q = s_pad // bs
  with mosaic_interpret.device_context(True):
    out, lse = block_sparse_attention_padded(
        *(jnp.asarray(_pad_rows(x, s_pad)) for x in (q, k, v)),
        *(jnp.asarray(_pad_rows(x, n_q, axis=2)) for x in (idx, cnt, dense)),
        jnp.array([length], jnp.int32), block_size=bs,
        sm_scale=1 / math.sqrt(d), num_kv_blocks=n_blk, config=BlockSparseConfig(stages=stages),
        interpret=mosaic_interpret.params(True))
  want_out, want_lse = numpy_ref.block_sparse_attention(q, k, v, idx, cnt, bs, (length,))
  out = np.asarray(out, np.float64)[:, :length]
  lse = np.asarray(lse, np.float64)[:, :, :length]
  want_out, want_lse = want_out[:, :length], want_lse[:, :, :length]
  assert not np.isnan(out).any() and not np.isnan(lse).any()
  np.testing.assert_allclose(out, want_out, atol=TOL[dtype], rtol=0)
  finite = np.isfinite(want_lse)
  np.testing.assert_array_equal(np.isfinite(lse), finite)
  np.testing.assert_allclose(lse[finite], want_lse[finite], atol=2e-2, rtol=0)


@pytest.mark.parametrize("key_tile", [None, 128])
def test_block_mass_stages_match_reference(key_tile):
  """Five key blocks of 64: one per K tile (default), or two per 128-key tile, where the
  last tile holds one real block and one past the keys."""
  seq, d, bs, dtype, stages, length = 300, 64, 64, jnp.bfloat16, 3, 270
  q, k, _ = make_qkv(33, 1, seq, 1, d, dtype)
  _, lse = numpy_ref.attention(q, k, k, (length,))
  lse = lse + np.random.default_rng(34).normal(0, 0.3, lse.shape)  # a cached, stale LSE
  s_pad = 384
  rows_ok = np.arange(seq) < length
  lse2 = np.where(rows_ok, lse / math.log(2), np.inf)  # as pallas_kernels.mosaic.ops.log2_lse
  lse2 = _pad_rows(lse2, s_pad, axis=2, value=np.inf).astype(np.float32)
  n_blk = -(-seq // bs)
  with mosaic_interpret.device_context(True):
    chunks = block_mass_padded(
        jnp.asarray(_pad_rows(q, s_pad)), jnp.asarray(_pad_rows(k, s_pad)), jnp.asarray(lse2),
        jnp.array([length], jnp.int32), block_size=bs, sm_scale=1 / math.sqrt(d),
        num_kv_blocks=n_blk, config=_mass_config(stages, key_tile),
        interpret=mosaic_interpret.params(True))
  mass = np.asarray(chunks)[:, :, :n_blk, :n_blk]  # bs 64: one 64-row chunk per block
  want = numpy_ref.block_mass(q, k, lse, bs, (length,))
  np.testing.assert_allclose(mass, want, rtol=TOL[dtype], atol=TOL[dtype] * 1e-2)


def _mass_config(stages, key_tile=None):
  """A ``BlockMassConfig`` with Pallas' automatic barriers."""
  return BlockMassConfig(stages=stages, key_tile=key_tile, explicit_barriers=False)


def _sparse_call(bs, d, stages, s=256, dtype=jnp.bfloat16):
  """The padded sparse kernel at abstract shapes, ready to trace or lower (its config is
  made when it is called)."""
  h = 1
  qkv = jax.ShapeDtypeStruct((1, s, h, d), dtype)
  idx = jax.ShapeDtypeStruct((1, h, s // bs, 4), jnp.int32)
  rows = jax.ShapeDtypeStruct((1, h, s // bs), jnp.int32)
  fn = lambda *a: block_sparse_attention_padded(
      *a, block_size=bs, sm_scale=0.125, num_kv_blocks=s // bs,
      config=BlockSparseConfig(stages=stages))
  return fn, (qkv, qkv, qkv, idx, rows, rows, jax.ShapeDtypeStruct((1,), jnp.int32))


def _mass_call(bs, d, stages, s=256, dtype=jnp.bfloat16, key_tile=None):
  qk = jax.ShapeDtypeStruct((1, s, 1, d), dtype)
  fn = lambda *a: block_mass_padded(*a, block_size=bs, sm_scale=0.125, num_kv_blocks=s // bs,
                                    config=_mass_config(stages, key_tile))
  return fn, (qk, qk, jax.ShapeDtypeStruct((1, 1, s), jnp.float32),
              jax.ShapeDtypeStruct((1,), jnp.int32))


@pytest.mark.parametrize("stages", [1, 0, -3, True, 2.5, "3"])
def test_bad_stages_raise(stages):
  for fn, args in (_sparse_call(64, 128, stages), _mass_call(64, 128, stages)):
    with pytest.raises(ValueError, match=re.escape(f"stages={stages!r}")):
      jax.eval_shape(fn, *args)


@pytest.mark.parametrize("make,bs,stages,most", [
    (_sparse_call, 64, 4, 3), (_sparse_call, 128, 4, 3), (_mass_call, 64, 10, 9),
    (functools.partial(_mass_call, key_tile=128), 64, 5, 4)])
def test_stages_over_shared_memory_raise(make, bs, stages, most):
  fn, args = make(bs, 128, stages)
  with pytest.raises(ValueError, match=rf"stages={stages}: .* 232448 .* at most {most} stages"):
    jax.eval_shape(fn, *args)


def _lower_for_cuda(fn, args):
  jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


# (kernel, footprint, block_size, head_dim, stages): the deepest rings that fit at
# D=128 (three K/V stages at block 64 rely on the kernel asking for no reduction
# scratch), and one past each.
FITS = [("sparse", 64, 128, 3), ("sparse", 128, 128, 3), ("mass", 64, 128, 9),
        ("mass", 128, 128, 4), ("mass_kt128", 64, 128, 4)]
OVER = [("sparse", 64, 128, 4), ("sparse", 128, 128, 4), ("sparse", 64, 64, 7),
        ("mass", 64, 128, 10), ("mass", 128, 128, 5), ("mass_kt128", 64, 128, 5)]
# With key_tile=128 the mass kernel's K stages hold 128 keys at block 64 too.
KERNELS = {
    "sparse": (_sparse_call, mosaic_block_sparse.smem_bytes),
    "mass": (_mass_call, mosaic_block_mass.smem_bytes),
    "mass_kt128": (functools.partial(_mass_call, key_tile=128),
                   lambda bs, d, item, n: mosaic_block_mass.smem_bytes(128, d, item, n))}


@pytest.mark.parametrize("kind,bs,d,stages", FITS, ids=lambda x: str(x))
def test_deepest_rings_lower_for_cuda(kind, bs, d, stages):
  make, footprint = KERNELS[kind]
  assert footprint(bs, d, 2, stages) <= mosaic_common.SMEM_LIMIT
  _lower_for_cuda(*make(bs, d, stages))


@pytest.mark.parametrize("kind,bs,d,stages", OVER, ids=lambda x: str(x))
def test_footprint_is_what_mosaic_allocates(kind, bs, d, stages, monkeypatch):
  make, footprint = KERNELS[kind]
  want = footprint(bs, d, 2, stages)
  assert want > mosaic_common.SMEM_LIMIT
  # Past our own check, Mosaic GPU refuses the kernel and says how much it needed.
  monkeypatch.setattr(mosaic_common, "SMEM_LIMIT", 10**9)
  with pytest.raises(ValueError, match=rf"smem_bytes={want} > max_smem_bytes=232448"):
    _lower_for_cuda(*make(bs, d, stages))
