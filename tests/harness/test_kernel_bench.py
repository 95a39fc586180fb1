"""harness/kernel_bench.py's random lists and pair count (the launcher runs in
tests/experiments/test_bench_kernels.py)."""

import jax
import numpy as np

from adaspa_jax.harness import kernel_bench


def test_random_lists_and_pair_count():
  b, h, n_blk, bs, seq = 2, 3, 5, 16, 70  # last block holds 6 tokens
  idx, cnt = kernel_bench.random_lists(jax.random.key(0), b, h, n_blk, 2, k_max=4)
  idx, cnt = np.asarray(idx), np.asarray(cnt)
  assert idx.shape == (b, h, n_blk, 4) and np.all(cnt == 2)
  read = idx[..., :2]
  assert np.all(np.diff(read, axis=-1) > 0) and read.min() >= 0 and read.max() < n_blk
  sizes = np.minimum(bs, seq - np.arange(n_blk) * bs)
  want = sum(sizes[p] * sizes[read[i, j, p]].sum()
             for i in range(b) for j in range(h) for p in range(n_blk))
  assert kernel_bench.computed_pairs(idx, cnt, seq, bs) == want
  dense_cnt = np.full_like(cnt, n_blk)
  assert kernel_bench.computed_pairs(idx, dense_cnt, seq, bs) == b * h * seq * seq


def test_query_block_lists_and_pair_count():
  # 32-row query blocks over 16-key blocks (the 128 x 64 shape, small): 3 rows, 5 key blocks.
  b, h, n_blk, bs, qbs, seq = 1, 2, 5, 16, 32, 70
  idx, cnt = kernel_bench.random_lists(jax.random.key(1), b, h, n_blk, 2, k_max=3,
                                       n_query_blocks=3)
  idx, cnt = np.asarray(idx), np.asarray(cnt)
  assert idx.shape == (b, h, 3, 3) and cnt.shape == (b, h, 3)
  read = idx[..., :2]
  assert np.all(np.diff(read, axis=-1) > 0) and read.min() >= 0 and read.max() < n_blk
  sizes = np.minimum(bs, seq - np.arange(n_blk) * bs)
  rows = np.minimum(qbs, seq - np.arange(3) * qbs)              # 32, 32, 6
  want = sum(rows[p] * sizes[read[i, j, p]].sum()
             for i in range(b) for j in range(h) for p in range(3))
  assert kernel_bench.computed_pairs(idx, cnt, seq, bs, qbs) == want
  assert kernel_bench.computed_pairs(idx, np.full_like(cnt, n_blk), seq, bs, qbs) == (
      b * h * seq * seq)
