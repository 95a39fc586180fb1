"""``merge_lists=True`` in the block-sparse Mosaic kernel (block 64): the two query blocks
of a CTA read their lists through one K/V ring, a block both hold loaded once.

``merged_walk`` is checked on its own (every entry taken once, by its own list, in order;
equal heads shared), then the kernel under JAX's GPU interpreter against the numpy
reference on sorted, unsorted, identical, empty and dense lists with ragged lengths, and
its CUDA lowering on CPU.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import mosaic_interpret
from pallas_kernels.mosaic_block_sparse import (
    block_sparse_attention_padded, listed_block, merged_walk, smem_bytes)
from tests import numpy_ref
from tests.pallas_kernels.kernel_suite import make_qkv

TOL = {jnp.bfloat16: 3e-2, jnp.float16: 1e-2}


def _walk(lists, counts, dense=(0, 0), n_blk=64):
  """(block, takes) of every active step of ``merged_walk`` over two numpy lists."""
  idx = jnp.asarray(np.array([np.pad(x, (0, 8 - len(x)), mode="edge") if len(x) else
                              np.zeros(8, np.int32) for x in lists], np.int32))
  read = lambda p, step: (idx[p, jnp.minimum(step, 7)], jnp.int32(dense[p]))
  block_of = functools.partial(listed_block, num_kv_blocks=n_blk)
  state, step = merged_walk([jnp.int32(c) for c in counts], read, block_of)
  out = []
  for _ in range(sum(counts) + 1):
    block, active, take, state = step(state)
    if bool(active):
      out.append((int(block), bool(take[0]), bool(take[1])))
  return out


@pytest.mark.parametrize("lists,counts", [
    (([1, 4, 6], [0, 4, 5, 6]), (3, 4)),  # sorted: 4 and 6 shared
    (([5, 2, 7], [2, 7, 5]), (3, 3)),  # unsorted: every entry still taken once
    (([3, 3], [1]), (2, 1)),  # a repeat within one list
    (([], [2, 3]), (0, 2)),
    (([1, 2, 9], [1, 2, 9]), (2, 3)),  # counts shorter than the lists
])
def test_walk_takes_every_entry_once_in_order(lists, counts):
  steps = _walk(lists, counts)
  for p in range(2):
    taken = [block for block, *take in steps if take[p]]
    assert taken == list(lists[p][:counts[p]])
  for block, t0, t1 in steps:
    assert t0 or t1
  assert len(steps) == sum(counts) - sum(t0 and t1 for _, t0, t1 in steps)


def test_walk_shares_sorted_lists_and_dense_rows():
  assert _walk(([1, 4, 6], [0, 4, 5, 6]), (3, 4)) == [
      (0, False, True), (1, True, False), (4, True, True), (5, False, True), (6, True, True)]
  # Dense rows read 0..n-1 (their lists unread): all shared with a dense partner.
  assert _walk(([9, 9, 9], [7, 7, 7]), (3, 3), dense=(1, 1)) == [
      (0, True, True), (1, True, True), (2, True, True)]


def _run(q, k, v, idx, cnt, length, bs, stages, merge):
  seq = q.shape[1]
  s_pad = -(-seq // 128) * 128
  n_q = s_pad // bs
  pad = lambda x, n, axis: np.pad(np.asarray(x), [(0, n - x.shape[axis]) if a == axis
                                                  else (0, 0) for a in range(x.ndim)])
  dense = (cnt >= -(-seq // bs)).astype(np.int32)
  with mosaic_interpret.device_context(True):
    out, lse = block_sparse_attention_padded(
        *(jnp.asarray(pad(x, s_pad, 1)) for x in (q, k, v)),
        *(jnp.asarray(pad(x, n_q, 2)) for x in (idx, cnt, dense)),
        jnp.array([length], jnp.int32), block_size=bs, sm_scale=1 / math.sqrt(q.shape[-1]),
        num_kv_blocks=-(-seq // bs), stages=stages, schedule_barrier=not merge,
        merge_lists=merge, interpret=mosaic_interpret.params(True))
  return np.asarray(out, np.float64)[:, :length], np.asarray(lse, np.float64)[:, :, :length]


def _lists(kind, n_blk, rng):
  """idx [1, 1, n_blk, n_blk] and counts [1, 1, n_blk] of one of the list kinds."""
  if kind == "sorted":
    rows = [np.sort(rng.choice(n_blk, size=n_blk, replace=False)) for _ in range(n_blk)]
    cnt = rng.integers(1, n_blk, n_blk)
  elif kind == "unsorted":
    rows = [rng.permutation(n_blk) for _ in range(n_blk)]
    cnt = np.array([n_blk, 0, n_blk - 1, 2, 1, 3][:n_blk])  # dense and empty rows too
  else:  # "same": both query blocks of each CTA read one list
    rows = [np.sort(rng.choice(n_blk, size=n_blk, replace=False)) for _ in range(n_blk // 2)]
    rows = [r for r in rows for _ in range(2)]
    cnt = np.repeat(rng.integers(1, n_blk, n_blk // 2), 2)
  return np.stack(rows).astype(np.int32)[None, None], cnt.astype(np.int32)[None, None]


@pytest.mark.parametrize("kind,d,dtype,stages,seq,length", [
    ("sorted", 128, jnp.bfloat16, None, 384, 380),
    ("unsorted", 64, jnp.float16, 2, 300, 290),
    ("same", 128, jnp.bfloat16, 3, 384, 384),
])
def test_merged_lists_match_reference(kind, d, dtype, stages, seq, length):
  q, k, v = make_qkv(61 + d, 1, seq, 1, d, dtype)
  n_blk = -(-seq // 64)
  idx, cnt = _lists(kind, n_blk, np.random.default_rng(7))
  out, lse = _run(q, k, v, idx, cnt, length, 64, stages, merge=True)
  want_out, want_lse = numpy_ref.block_sparse_attention(q, k, v, idx, cnt, 64, (length,))
  want_out, want_lse = want_out[:, :length], want_lse[:, :, :length]
  assert not np.isnan(out).any() and not np.isnan(lse).any()
  np.testing.assert_allclose(out, want_out, atol=TOL[dtype], rtol=0)
  finite = np.isfinite(want_lse)
  np.testing.assert_array_equal(np.isfinite(lse), finite)
  np.testing.assert_allclose(lse[finite], want_lse[finite], atol=2e-2, rtol=0)


def _call(d, stages=None, **kw):
  qk = jax.ShapeDtypeStruct((1, 512, 2, d), jnp.bfloat16)
  lists = jax.ShapeDtypeStruct((1, 2, 8, 8), jnp.int32)
  rows = jax.ShapeDtypeStruct((1, 2, 8), jnp.int32)
  fn = functools.partial(block_sparse_attention_padded, block_size=kw.pop("bs", 64),
                         sm_scale=0.125, num_kv_blocks=8, stages=stages, **kw)
  return fn, (qk, qk, qk, lists, rows, rows, jax.ShapeDtypeStruct((1,), jnp.int32))


@pytest.mark.parametrize("d,stages", [(64, None), (128, None), (128, 2)])
def test_merged_lists_lower_for_cuda(d, stages):
  fn, args = _call(d, stages, merge_lists=True, schedule_barrier=False)
  jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def test_bad_merge_lists_raise():
  for kw in ({"merge_lists": True, "schedule_barrier": True},
             {"merge_lists": True, "schedule_barrier": False, "bs": 128},
             {"merge_lists": 1, "schedule_barrier": False}):
    fn, args = _call(128, **dict(kw))
    with pytest.raises(ValueError, match=f"merge_lists={kw['merge_lists']!r} with block_size"):
      jax.eval_shape(fn, *args)


def test_one_ring_has_both_rings_slots():
  assert smem_bytes(64, 128, 2, 4, rings=1) == smem_bytes(64, 128, 2, 2)
