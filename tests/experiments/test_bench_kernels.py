"""Smoke test of experiments/bench_kernels.py on CPU (interpret mode, tiny sizes)."""

import json
import os
import subprocess
import sys

import jax

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


def test_check_only_at_128x64(tmp_path):
  cmd = [sys.executable, "-m", "adaspa_jax.experiments.bench_kernels", "--check_only",
         "--interpret", "--seq_lens=64", "--heads=2", "--head_dim=64", "--dtype=float32",
         "--check_seq=200", "--block_size=64", "--query_block_size=128",
         "--implementations=triton", f"--out_dir={tmp_path}", "--tag=_qblock"]
  env = dict(os.environ, PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run(cmd, cwd=_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  [path] = list(tmp_path.glob("bench_*_qblock.json"))
  res = json.loads(path.read_text())
  assert res["config"]["query_block_size"] == 128
  [check] = res["checks"]
  assert check["query_block_size"] == 128 and check["passed"], check
