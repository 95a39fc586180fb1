"""The Mosaic block-sparse kernel's 128 x 64 tiling under JAX's GPU interpreter (CPU).

``block_sparse_attention_padded(..., query_block_size=128, block_size=64)``: one list per
128-row query block (a CTA's rows), 64-key blocks streamed once into one K/V ring that
both compute warpgroups read. Checked against a dense masked softmax in jnp whose token
mask is expanded from the coarse lists, against the 64 x 64 tiling given each 64-row
block its 128-row parent's list (bit-identical: same blocks, same order, same math), and
for races. The shared-memory accounting of the one ring of 64-key stages is checked
against Mosaic GPU itself by lowering for CUDA (CPU-only).

Interpreting costs about two seconds per CTA, so the cases are few and small, and each
kernel run is shared by the tests that read it.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.mosaic import block_sparse_kernel as mosaic_block_sparse
from pallas_kernels.mosaic import common as mosaic_common
from pallas_kernels.mosaic import interpreter as mosaic_interpret
from pallas_kernels.mosaic.block_sparse_kernel import (
    BlockSparseConfig, block_sparse_attention_padded)
from tests.pallas_kernels.kernel_suite import make_qkv

TOL = {jnp.bfloat16: 3e-2, jnp.float16: 1e-2}
LSE_TOL = 2e-2
QB, KB = 128, 64  # query rows per list, keys per list entry

# (name, seq, s_pad, heads, head_dim, dtype, k_max, stages, kv_length). nK = ceil(seq / 64).
CASES = {
    # nK=4, K_max=3 < nK. Length 180: key block 2 straddles it, block 3 lies past it.
    # Two stages, so a 3-block list wraps the ring.
    "s256d64": (256, 256, 2, 64, jnp.bfloat16, 3, 2, 180),
    # An odd sequence (300, padded to 384): nK=5, K_max=4. Length 250: key block 3
    # straddles it, block 4 lies past it. The default ring (4 stages at D=128), wrapped by
    # the dense row's 5 blocks.
    "s300d128": (300, 384, 2, 128, jnp.float16, 4, None, 250),
}


def _lists(rng, heads, n_q, n_k, k_max):
  """Duplicate-free unsorted lists with random counts in [0, K_max]; unread slots hold
  ids out of range (the kernel must not read them). Head 0: query block 0 is dense,
  block 1 reads nothing. Head 1: block 0 reads only the last key block (past the
  length in both cases: every key masked), the others K_max blocks."""
  idx = np.full((1, heads, n_q, k_max), -7, np.int32)
  cnt = rng.integers(0, k_max + 1, (1, heads, n_q)).astype(np.int32)
  cnt[0, 0, 0] = n_k  # dense: count >= nK, list unread
  cnt[0, 0, 1] = 0
  cnt[0, 1, :] = k_max
  cnt[0, 1, 0] = 1
  for hi in range(heads):
    for qb in range(n_q):
      c = min(cnt[0, hi, qb], k_max)
      idx[0, hi, qb, :c] = rng.permutation(n_k)[:c]
  idx[0, 1, 0, 0] = n_k - 1
  return idx, cnt


def _kernel_lists(idx, cnt, n_k):
  """(indices, steps, dense_rows) as the padded kernel reads them (the convention of
  ``pallas_kernels.mosaic.ops.kernel_lists``): a count >= nK is a dense row of nK steps."""
  dense = (cnt >= n_k).astype(np.int32)
  steps = np.where(dense, n_k, np.clip(cnt, 0, idx.shape[-1])).astype(np.int32)
  return idx, steps, dense


def _reference(q, k, v, idx, cnt, n_k, length, sm_scale):
  """Dense masked softmax in float32: key j is allowed for row i when 64-key block j // 64
  is in row block i // 128's list (all nK blocks for a dense row) and j < length. Rows
  with no allowed key give 0 and LSE -inf."""
  b, s_pad, h, _ = q.shape
  blocks = np.zeros((b, h, s_pad // QB, n_k), bool)
  for bi, hi, qb in np.ndindex(*cnt.shape):
    c = cnt[bi, hi, qb]
    blocks[bi, hi, qb, :] = c >= n_k
    if c < n_k:
      blocks[bi, hi, qb, idx[bi, hi, qb, :c]] = True
  tokens = np.repeat(np.repeat(blocks, QB, axis=2), KB, axis=3)  # [B, H, S_pad, nK * 64]
  keys = np.zeros((b, h, s_pad, s_pad), bool)
  keys[..., :min(n_k * KB, s_pad)] = tokens[..., :s_pad]
  allowed = jnp.asarray(keys & (np.arange(s_pad) < length))
  s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * sm_scale
  s = jnp.where(allowed, s, -jnp.inf)
  m = jnp.max(s, -1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(allowed, jnp.exp(s - m), 0.0)
  l = p.sum(-1, keepdims=True)
  out = jnp.einsum("bhqk,bkhd->bqhd", p / jnp.where(l > 0, l, 1.0), v.astype(jnp.float32))
  lse = jnp.where(l[..., 0] > 0, m[..., 0] + jnp.log(jnp.where(l[..., 0] > 0, l[..., 0], 1.0)),
                  -jnp.inf)
  return np.asarray(out, np.float64), np.asarray(lse, np.float64)


@functools.cache
def _inputs(name):
  seq, s_pad, h, d, dtype, k_max, stages, length = CASES[name]
  q, k, v = make_qkv(41, 1, seq, h, d, dtype)
  pad = ((0, 0), (0, s_pad - seq), (0, 0), (0, 0))
  q, k, v = (jnp.pad(x, pad) for x in (q, k, v))  # as pallas_kernels.mosaic.ops pads
  n_k = -(-seq // KB)
  idx, cnt = _lists(np.random.default_rng(42), h, s_pad // QB, n_k, k_max)
  return q, k, v, idx, cnt, n_k


@functools.cache
def _run(name, query_block_size):
  """The kernel on case ``name`` at query_block_size x 64; at 64 x 64 each 64-row block
  gets its 128-row parent's list."""
  q, k, v, idx, cnt, n_k = _inputs(name)
  _, _, _, d, _, _, stages, length = CASES[name]
  lists = _kernel_lists(idx, cnt, n_k)
  if query_block_size == KB:
    lists = tuple(np.repeat(x, QB // KB, axis=2) for x in lists)
  with mosaic_interpret.device_context(True):
    out, lse = block_sparse_attention_padded(
        q, k, v, *(jnp.asarray(x) for x in lists), jnp.array([length], jnp.int32),
        block_size=KB, query_block_size=query_block_size, sm_scale=1 / math.sqrt(d),
        num_kv_blocks=n_k, config=BlockSparseConfig(stages=stages),
        interpret=mosaic_interpret.params(True))
    return jax.block_until_ready((out, lse))


@pytest.mark.parametrize("name", CASES)
def test_q128_matches_reference(name):
  q, k, v, idx, cnt, n_k = _inputs(name)
  _, _, _, d, dtype, _, _, length = CASES[name]
  out, lse = _run(name, QB)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert lse.shape == (1, q.shape[2], q.shape[1]) and lse.dtype == jnp.float32
  want_out, want_lse = _reference(q, k, v, idx, cnt, n_k, length, 1 / math.sqrt(d))
  out, lse = np.asarray(out, np.float64), np.asarray(lse, np.float64)
  assert not np.isnan(out).any() and not np.isnan(lse).any()
  np.testing.assert_allclose(out, want_out, atol=TOL[dtype], rtol=0)
  finite = np.isfinite(want_lse)
  np.testing.assert_array_equal(np.isfinite(lse), finite)
  np.testing.assert_allclose(lse[finite], want_lse[finite], atol=LSE_TOL, rtol=0)
  # The empty row (head 0, block 1) and the one whose only block lies past the length
  # (head 1, block 0): exact zeros, LSE -inf.
  for hi, qb in ((0, 1), (1, 0)):
    rows = slice(qb * QB, (qb + 1) * QB)
    assert not finite[0, hi, rows].any()
    assert np.all(out[0, rows, hi] == 0)


@pytest.mark.parametrize("name", CASES)
def test_q128_equals_q64_on_expanded_lists(name):
  """The 64 x 64 tiling (two lists, two rings per CTA) on each 128-row block's list,
  repeated for both of its 64-row blocks, reads the same key blocks in the same order."""
  out128, lse128 = _run(name, QB)
  out64, lse64 = _run(name, KB)
  np.testing.assert_array_equal(np.asarray(out128), np.asarray(out64))
  np.testing.assert_array_equal(np.asarray(lse128), np.asarray(lse64))


def test_q128_shared_ring_has_no_races():
  """The race detector over one CTA whose two compute warpgroups share a 2-deep ring of
  64-key stages for 3 steps (the ring wraps)."""
  d = 64
  q, k, v = make_qkv(43, 1, 128, 1, d, jnp.bfloat16)
  idx = jnp.array([[[[1, 0, 1]]]], jnp.int32)  # a repeated block is read twice
  steps = jnp.array([[[3]]], jnp.int32)
  dense = jnp.zeros((1, 1, 1), jnp.int32)
  with mosaic_interpret.device_context(True):
    out, _ = block_sparse_attention_padded(
        q, k, v, idx, steps, dense, jnp.array([128], jnp.int32), block_size=KB,
        query_block_size=QB, sm_scale=1 / math.sqrt(d), num_kv_blocks=2,
        config=BlockSparseConfig(stages=2),
        interpret=mosaic_interpret.params(True, detect_races=True))
    jax.block_until_ready(out)
  assert not mosaic_interpret.races_found()
  # Block 1 twice and block 0 once: softmax weights of block 1 doubled.
  s = jnp.einsum("qhd,khd->hqk", q[0].astype(jnp.float32), k[0].astype(jnp.float32))
  s = s / math.sqrt(d)
  w = jnp.exp(s - s.max(-1, keepdims=True)) * jnp.where(jnp.arange(128) >= 64, 2.0, 1.0)
  want = jnp.einsum("hqk,khd->qhd", w / w.sum(-1, keepdims=True), v[0].astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(out[0], np.float64), np.asarray(want),
                             atol=TOL[jnp.bfloat16])


def _call(d, stages, query_block_size=QB, block_size=KB, s=256, n_q=None):
  """The padded kernel at abstract shapes, ready to trace or lower."""
  n_q = s // (query_block_size or block_size) if n_q is None else n_q
  qkv = jax.ShapeDtypeStruct((1, s, 1, d), jnp.bfloat16)
  idx = jax.ShapeDtypeStruct((1, 1, n_q, 4), jnp.int32)
  rows = jax.ShapeDtypeStruct((1, 1, n_q), jnp.int32)
  fn = lambda *a: block_sparse_attention_padded(
      *a, block_size=block_size, query_block_size=query_block_size, sm_scale=0.125,
      num_kv_blocks=s // block_size, config=BlockSparseConfig(stages=stages))
  return fn, (qkv, qkv, qkv, idx, rows, rows, jax.ShapeDtypeStruct((1,), jnp.int32))


def _eval_shape(fn, args):
  return jax.eval_shape(fn, *args)


def test_ring_depths():
  """One ring of 64-key stages: the default is 4 (the cap) at D=64 and D=128, twice the
  stages of 128 x 128 or of each of 64 x 64's two rings at D=128; 13 and 6 fit."""
  ns, sm = mosaic_block_sparse.num_stages, mosaic_block_sparse.smem_bytes
  assert [ns(KB, d, 2, QB) for d in (64, 128)] == [4, 4]
  assert [ns(KB, 128, 2), ns(QB, 128, 2)] == [2, 2]
  for d, most in ((64, 13), (128, 6)):
    assert sm(KB, d, 2, most, QB) <= mosaic_common.SMEM_LIMIT < sm(KB, d, 2, most + 1, QB)
  # The same bytes per stage pair as one of 64 x 64's two rings; only Q/O, LSE and
  # barriers are not doubled.
  assert sm(KB, 128, 2, 3) - sm(KB, 128, 2, 3, QB) == 2 * 3 * 64 * 128 * 2 + 8 * 4 * 3


@pytest.mark.parametrize("qbs,bs", [(64, 128), (256, 64), (128, 32)])
def test_bad_tiling_raises(qbs, bs):
  with pytest.raises(ValueError, match=re.escape(f"query_block_size={qbs}, block_size={bs}")):
    _eval_shape(*_call(64, None, qbs, bs))


def test_lists_at_the_wrong_granularity_raise():
  """Lists of 64-row blocks (S_pad / 64 of them) given to the 128 x 64 tiling."""
  with pytest.raises(ValueError, match=r"query_block_size=128 query blocks"):
    _eval_shape(*_call(64, None, n_q=4))


def test_stages_over_shared_memory_raise():
  with pytest.raises(ValueError, match=r"stages=7: query_block_size=128, block_size=64, "
                                       r"head_dim=128, .* at most 6 stages"):
    _eval_shape(*_call(128, 7))


def _lower_for_cuda(fn, args):
  jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("d,stages", [(64, 13), (128, 6)])
def test_deepest_ring_lowers_for_cuda(d, stages):
  _lower_for_cuda(*_call(d, stages))


def test_footprint_is_what_mosaic_allocates(monkeypatch):
  want = mosaic_block_sparse.smem_bytes(KB, 128, 2, 7, QB)
  assert want > mosaic_common.SMEM_LIMIT
  # Past our own check, Mosaic GPU refuses the kernel and says how much it needed.
  monkeypatch.setattr(mosaic_common, "SMEM_LIMIT", 10**9)
  with pytest.raises(ValueError, match=rf"smem_bytes={want} > max_smem_bytes=232448"):
    _lower_for_cuda(*_call(128, 7))
