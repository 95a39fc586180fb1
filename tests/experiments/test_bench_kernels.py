"""Smoke test of experiments/bench_kernels.py on CPU (interpret mode, tiny sizes)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np

from adaspa_jax.harness import kernel_bench

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_check_only_writes_json(tmp_path):
  cmd = [sys.executable, "-m", "adaspa_jax.experiments.bench_kernels", "--check_only",
         "--interpret", "--seq_lens=64", "--heads=2", "--head_dim=64", "--dtype=float32",
         "--check_seq=90", "--block_size=32", "--implementations=triton", f"--out_dir={tmp_path}",
         "--tag=_smoke"]
  env = dict(os.environ, PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run(cmd, cwd=_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  [path] = list(tmp_path.glob("bench_*_smoke.json"))
  res = json.loads(path.read_text())
  for field in ("date", "device", "jax_version", "command", "config", "checks", "sizes"):
    assert field in res
  assert res["jax_version"] == jax.__version__
  assert res["config"]["check_only"] and res["config"]["block_size"] == 32
  [check] = res["checks"]
  assert check["implementation"] == "triton" and check["seq"] == 90
  assert "error" not in check and check["passed"], check
  for field in ("block_sparse_out_rel_err", "block_mass_rel_err", "fused_out_rel_err",
                "fused_mass_rel_err"):
    assert 0 <= check[field] < 1e-4
  assert res["sizes"] == []  # no timing in check-only mode


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
