"""harness/flex_peer.py: our lists as a FlexAttention BlockMask, and Flex's output on them
against pallas_kernels.reference (torch on CPU: compiled FlexAttention, no LSE)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from adaspa_jax.harness import flex_peer, kernel_bench

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _subprocess_env():
  """This process's environment, with the adaspa_jax it imported first on the path (then
  the repository root), so a subprocess run outside the repository imports the same
  code."""
  import adaspa_jax  # pylint: disable=g-import-not-at-top
  site = os.path.dirname(os.path.dirname(os.path.abspath(adaspa_jax.__file__)))
  return dict(os.environ, PYTHONPATH=os.pathsep.join(
      [site, _ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))


def _mixed_lists(key, b, h, n_blk, n_q, count):
  """Random lists (K_max = count < nK) with rows of one block and dense rows."""
  idx, cnt = kernel_bench.random_lists(key, b, h, n_blk, count, n_query_blocks=n_q)
  sel = jax.random.randint(jax.random.fold_in(key, 1), cnt.shape, 0, 3)
  cnt = jnp.where(sel == 0, 1, jnp.where(sel == 1, n_blk, cnt)).astype(jnp.int32)
  return idx, cnt


def _listed(idx, cnt, n_blk):
  """Python sets of the key blocks each row reads."""
  idx, cnt = np.asarray(idx), np.asarray(cnt)
  return {at: (set(range(n_blk)) if cnt[at] >= n_blk else set(idx[at][:cnt[at]].tolist()))
          for at in np.ndindex(cnt.shape)}


def _rows(n, ids):
  n, ids = np.asarray(n), np.asarray(ids)
  return {at: ids[at][:n[at]].tolist() for at in np.ndindex(n.shape)}


def test_flex_lists_are_full_blocks_without_lengths():
  b, h, seq, bs, qbs = 2, 3, 300, 32, 64          # 10 key blocks (last holds 12), 5 rows
  idx, cnt = _mixed_lists(jax.random.key(0), b, h, 10, 5, 3)
  parts = flex_peer.flex_lists(idx, cnt, seq=seq, block_size=bs, query_block_size=qbs)
  assert parts["full_kv_indices"].shape == (b, h, 5, 10)      # padded to nK entries
  assert parts["full_kv_num_blocks"].shape == (b, h, 5)
  assert not np.asarray(parts["kv_num_blocks"]).any()          # no partial blocks
  full = _rows(parts["full_kv_num_blocks"], parts["full_kv_indices"])
  for at, blocks in _listed(idx, cnt, 10).items():
    assert full[at] == sorted(blocks), at                      # list order kept (ascending)


def test_flex_lists_split_at_kv_lengths():
  b, h, seq, bs, qbs = 2, 2, 300, 32, 64
  lengths = np.array([300, 150])                               # element 1: rows/keys >= 150
  idx, cnt = _mixed_lists(jax.random.key(1), b, h, 10, 5, 4)
  parts = flex_peer.flex_lists(idx, cnt, seq=seq, block_size=bs, query_block_size=qbs,
                               kv_lengths=jnp.asarray(lengths, jnp.int32))
  full = _rows(parts["full_kv_num_blocks"], parts["full_kv_indices"])
  part = _rows(parts["kv_num_blocks"], parts["kv_indices"])
  for (bi, hi, p), blocks in _listed(idx, cnt, 10).items():
    n = lengths[bi]
    rows_ok = min((p + 1) * qbs, seq) <= n
    want_full = sorted(c for c in blocks if rows_ok and min((c + 1) * bs, seq) <= n)
    assert full[bi, hi, p] == want_full
    assert part[bi, hi, p] == sorted(blocks - set(want_full))


def test_flex_lists_reject_bad_input():
  idx, cnt = kernel_bench.random_lists(jax.random.key(2), 1, 2, 4, 2)
  with pytest.raises(ValueError, match="indices has shape"):
    flex_peer.flex_lists(idx[0], cnt, seq=128, block_size=32)
  with pytest.raises(ValueError, match="seq=0"):
    flex_peer.flex_lists(idx, cnt, seq=0, block_size=32)
  with pytest.raises(ValueError, match="kv_block_indices has shape"):
    flex_peer.flex_lists(idx, cnt, seq=200, block_size=32)    # 7 query blocks, not 4
  with pytest.raises(ValueError, match="query_block_size=96"):
    flex_peer.flex_lists(idx, cnt, seq=128, block_size=32, query_block_size=96)


def test_importing_the_harness_does_not_import_torch(tmp_path):
  code = ("import sys; import adaspa_jax.harness.flex_peer, adaspa_jax.harness.kernel_bench, "
          "adaspa_jax.experiments.bench_kernels; assert 'torch' not in sys.modules")
  proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_subprocess_env(),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]


# ----------------------------------------------------------------------------- with torch
@pytest.mark.parametrize("seq,bs,qbs", [(200, 64, None),    # S not a multiple of the block
                                        (300, 64, 128)])    # 128-row query blocks over 64
def test_check_flex_against_reference(seq, bs, qbs):
  pytest.importorskip("torch")
  res = flex_peer.check_flex(seq=seq, heads=2, head_dim=64, dtype=jnp.float32, block_size=bs,
                             key=jax.random.key(3), query_block_size=qbs)
  assert "error" not in res, res
  assert res["passed"] and res["out_rel_err"] < 1e-5 and res["out_cosine"] > 1 - 1e-9, res


def test_flex_without_lengths_matches_reference():
  """The benchmark's path: every listed block full, no mask_mod, a dense row, S odd."""
  pytest.importorskip("torch")
  b, h, seq, d, bs, qbs = 1, 2, 250, 64, 32, 64
  n_blk, n_q = -(-seq // bs), -(-seq // qbs)
  q, k, v = kernel_bench.random_qkv(jax.random.key(4), b, seq, h, d, jnp.float32)
  idx, cnt = _mixed_lists(jax.random.key(5), b, h, n_blk, n_q, 3)
  mask = flex_peer.block_mask(idx, cnt, seq=seq, block_size=bs, query_block_size=qbs)
  out = flex_peer.run_flex(q, k, v, mask, options=flex_peer.kernel_options(bs, qbs))
  assert tuple(out.shape) == (b, h, seq, d)
  want = pk.block_sparse_attention(q, k, v, idx, cnt, block_size=bs, query_block_size=qbs,
                                   implementation="reference", return_lse=False)
  err = flex_peer.compare(flex_peer.to_numpy_bshd(out), want)
  assert err["max_abs_err"] < 1e-5 and err["cosine"] > 1 - 1e-9, err
  spot = flex_peer.spot_check(out, q, k, v, idx, cnt, block_size=bs, query_block_size=qbs,
                              key=jax.random.key(6), n_rows=3)
  assert len(set(map(tuple, spot["rows"]))) == 3 and spot["max_abs_err"] < 1e-5, spot


def test_time_flex_uses_the_lists_of_time_impl():
  pytest.importorskip("torch")
  b, h, seq, d, bs, qbs = 1, 2, 256, 64, 32, 64
  q, k, v = kernel_bench.random_qkv(jax.random.key(7), b, seq, h, d, jnp.float32)
  kw = dict(densities=[0.25, 1.0], block_size=bs, reps=1, key=jax.random.key(8),
            query_block_size=qbs)
  flex = kernel_bench.time_flex(q, k, v, spot_rows=2, **kw)
  ours = kernel_bench.time_impl("reference", q, k, v, interpret=True, with_search=False, **kw)
  assert flex["kernel_options"] == {"block_sparse": {"BLOCK_M": 32, "BLOCK_N": 32},
                                    "block_sparse_qblock": {"BLOCK_M": 64, "BLOCK_N": 32}}
  for field in ("block_sparse", "block_sparse_qblock"):
    assert [r["pairs"] for r in flex[field]] == [r["pairs"] for r in ours[field]]
    for row in flex[field]:
      assert row["ms"] > 0 and row["tflops"] > 0 and row["check"]["max_abs_err"] < 1e-5, row


def test_mask_of_another_length_is_rejected():
  pytest.importorskip("torch")
  q, k, v = kernel_bench.random_qkv(jax.random.key(9), 1, 128, 2, 64, jnp.float32)
  idx, cnt = kernel_bench.random_lists(jax.random.key(10), 1, 2, 2, 1)
  mask = flex_peer.block_mask(idx, cnt, seq=64, block_size=32)
  with pytest.raises(ValueError, match=r"mask.seq_lengths=\(64, 64\)"):
    flex_peer.make_call(q, k, v, mask)
