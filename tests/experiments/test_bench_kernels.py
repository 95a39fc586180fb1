"""Smoke test of experiments/bench_kernels.py on CPU (interpret mode, tiny sizes)."""

import json
import os
import subprocess
import sys

import jax
import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env(*first):
  """This process's environment with ``first``, then the adaspa_jax it imported, then
  the repository root first on the path: the launcher subprocess (run outside the
  repository, whose source-layout ``adaspa_jax/`` would come first as the working
  directory) runs this checkout's code, not that of an editable install elsewhere."""
  import adaspa_jax  # pylint: disable=g-import-not-at-top
  site = os.path.dirname(os.path.dirname(os.path.abspath(adaspa_jax.__file__)))
  return dict(os.environ, PYTHONPATH=os.pathsep.join(
      [*first, site, _ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))


def test_check_only_writes_json(tmp_path):
  cmd = [sys.executable, "-m", "adaspa_jax.experiments.bench_kernels", "--check_only",
         "--interpret", "--seq_lens=64", "--heads=2", "--head_dim=64", "--dtype=float32",
         "--check_seq=90", "--block_size=32", "--implementations=triton", f"--out_dir={tmp_path}",
         "--tag=_smoke"]
  env = _env()
  proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
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
  env = _env()
  proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  [path] = list(tmp_path.glob("bench_*_qblock.json"))
  res = json.loads(path.read_text())
  assert res["config"]["query_block_size"] == 128
  [check] = res["checks"]
  assert check["query_block_size"] == 128 and check["passed"], check


def _flex_cmd(tmp_path, tag):
  return [sys.executable, "-m", "adaspa_jax.experiments.bench_kernels", "--interpret",
          "--seq_lens=200", "--heads=2", "--head_dim=64", "--dtype=float32", "--check_seq=90",
          "--block_size=32", "--query_block_size=64", "--implementations=reference",
          "--densities=0.3,1.0", "--reps=1", "--baseline=xla", "--flex",
          f"--out_dir={tmp_path}", f"--tag={tag}"]


def test_flex_rows_on_the_same_lists(tmp_path):
  pytest.importorskip("torch")
  proc = subprocess.run(_flex_cmd(tmp_path, "_flex"), cwd=tmp_path, env=_env(),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  [path] = list(tmp_path.glob("bench_*_flex.json"))
  res = json.loads(path.read_text())
  assert res["config"]["flex"] and res["flex"]["torch_version"] and "error" not in res["flex"]
  flex_check = [c for c in res["checks"] if c["implementation"] == "flex"]
  assert len(flex_check) == 1 and flex_check[0]["passed"], flex_check
  [size] = res["sizes"]
  flex, ours = size["implementations"]["flex"], size["implementations"]["reference"]
  assert "error" not in flex, flex
  for field in ("block_sparse", "block_sparse_qblock"):
    assert [r["pairs"] for r in flex[field]] == [r["pairs"] for r in ours[field]]
    for row in flex[field] + ours[field]:
      assert row["tflops"] > 0 and row["tflops_vs_baseline"] > 0
    for row in flex[field]:
      assert row["check"]["max_abs_err"] < 1e-5, row
  assert "flex:q64" in proc.stdout


def test_flex_without_torch_records_the_error(tmp_path):
  blocker = tmp_path / "no_torch" / "torch"
  blocker.mkdir(parents=True)
  (blocker / "__init__.py").write_text("raise ImportError('torch blocked by the test')\n")
  cmd = _flex_cmd(tmp_path, "_notorch") + ["--densities=0.5"]
  proc = subprocess.run(cmd, cwd=tmp_path, env=_env(str(tmp_path / "no_torch")),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  [path] = list(tmp_path.glob("bench_*_notorch.json"))
  res = json.loads(path.read_text())
  assert res["flex"]["torch_version"] is None and "ImportError" in res["flex"]["error"]
  [size] = res["sizes"]
  assert "ImportError" in size["implementations"]["flex"]["error"]
  assert size["implementations"]["reference"]["block_sparse"][0]["ms"] > 0
