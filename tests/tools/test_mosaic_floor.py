"""The load-only floor kernel (tools/mosaic_floor.py) under JAX's GPU interpreter.

Its output must be exactly what its loads feed: per 64-row chunk, the V rows of
the last block the chunk's list names, or the chunk's Q rows when the list is
empty. The expected output is built here with a numpy loop, independently of
``expected_output`` (the jnp gather the GPU run checks with), which is compared too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tools.mosaic_floor import expected_output, load_only_padded
from pallas_kernels.mosaic import interpreter as mosaic_interpret
from tests.pallas_kernels.kernel_suite import make_qkv


def numpy_expected(q, v, idx, steps, dense, bs, n_blk, qbs=None):
  qbs = qbs or bs
  q, v = np.asarray(q), np.asarray(v)
  out = np.empty_like(q)
  for b, h, c in np.ndindex(q.shape[0], q.shape[2], q.shape[1] // 64):
    rows = slice(c * 64, c * 64 + 64)
    qb = c * 64 // qbs
    n = steps[b, h, qb]
    if n == 0:
      out[b, rows, h] = q[b, rows, h]
      continue
    last = n - 1 if dense[b, h, qb] else min(max(idx[b, h, qb, min(n - 1, idx.shape[-1] - 1)],
                                                 0), n_blk - 1)
    first = last * bs + (c * 64) % bs
    out[b, rows, h] = v[b, first:first + 64, h]
  return out


# (seq, heads, head_dim, block_size, dtype, stages, query_block_size): S = 256, two
# CTAs; lists run past the ring (2 stages at D=128 by default).
CASES = [
    (256, 2, 128, 64, jnp.bfloat16, None, None),  # two lists and rings per CTA
    (256, 1, 64, 128, jnp.float16, 2, None),  # one list, one ring shared by both warpgroups
    (256, 2, 64, 64, jnp.bfloat16, 2, 128),  # one list, one ring of 64-key stages
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"q{c[6] or c[3]}bs{c[3]}d{c[2]}")
def test_load_only_writes_the_last_tile_it_loaded(case):
  seq, h, d, bs, dtype, stages, qbs = case
  q, k, v = make_qkv(41, 1, seq, h, d, dtype)
  n_blk = seq // bs
  n_q = seq // (qbs or bs)
  rng = np.random.default_rng(42)
  # Ids out of range (clipped by the kernel), repeats, long lists, empty and dense rows.
  idx = rng.integers(-1, n_blk + 1, (1, h, n_q, n_blk + 2)).astype(np.int32)
  steps = rng.integers(0, n_blk + 3, (1, h, n_q)).astype(np.int32)
  steps[0, 0, 0], steps[0, 0, 1] = 0, n_blk + 2
  dense = (rng.random((1, h, n_q)) < 0.3).astype(np.int32)
  dense[0, 0, 1] = 0
  steps = np.where(dense != 0, np.minimum(steps, n_blk), steps)  # a dense row reads blocks < nK
  args = (q, k, v, jnp.asarray(idx), jnp.asarray(steps), jnp.asarray(dense))
  with mosaic_interpret.device_context(True):
    out = load_only_padded(*args, block_size=bs, num_kv_blocks=n_blk, stages=stages,
                           query_block_size=qbs,
                           interpret=mosaic_interpret.params(True, detect_races=True))
    out = jax.block_until_ready(out)
  assert not mosaic_interpret.races_found()
  want = numpy_expected(q, v, idx, steps, dense, bs, n_blk, qbs)
  np.testing.assert_array_equal(np.asarray(out), want)
  gathered = expected_output(q, v, *args[3:], block_size=bs, num_kv_blocks=n_blk,
                             query_block_size=qbs)
  np.testing.assert_array_equal(np.asarray(gathered), want)


def test_load_only_lowers_for_cuda():
  """The Mosaic GPU lowering (run on the CPU) accepts every tiling's ring layout."""
  for qbs, bs in ((64, 64), (128, 128), (128, 64)):
    qkv = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
    idx = jax.ShapeDtypeStruct((1, 2, 256 // qbs, 4), jnp.int32)
    rows = jax.ShapeDtypeStruct((1, 2, 256 // qbs), jnp.int32)
    fn = lambda *a, bs=bs, qbs=qbs: load_only_padded(*a, block_size=bs, query_block_size=qbs,
                                                     num_kv_blocks=256 // bs)
    jax.jit(fn).trace(qkv, qkv, qkv, idx, rows, rows).lower(lowering_platforms=("cuda",))
