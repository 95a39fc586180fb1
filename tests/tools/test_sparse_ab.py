"""tools/sparse_ab.py on CPU: a version against itself, interpreted."""

import jax
import jax.numpy as jnp
import pytest

from tools import sparse_ab
from pallas_kernels.mosaic import block_sparse_kernel as mosaic_block_sparse
from pallas_kernels.mosaic import interpreter as mosaic_interpret


def test_a_version_against_itself_is_identical(monkeypatch):
  monkeypatch.setattr(sparse_ab, "H", 1)
  modules = {"new": mosaic_block_sparse,
             "old": sparse_ab.load_module(mosaic_block_sparse.__file__)}
  assert modules["old"] is not mosaic_block_sparse
  key = jax.random.key(0)
  q, k, v = (jax.random.normal(kk, (1, 128, 1, sparse_ab.D), jnp.float32).astype(jnp.bfloat16)
             for kk in jax.random.split(key, 3))
  with mosaic_interpret.device_context(True):
    row = sparse_ab.compare(modules, 128, 128, 1.0, key, q, k, v, rounds=1, reps=1,
                            interpret=mosaic_interpret.params(True))
  assert row["identical"] and row["count"] == 1
  assert row["new_ms"] > 0 and row["old_ms"] > 0 and len(row["new_rounds_ms"]) == 1


def test_bad_arguments_raise(tmp_path):
  with pytest.raises(ValueError, match="expected the path of a mosaic_block_sparse.py"):
    sparse_ab.load_module(str(tmp_path / "missing.py"))
  for bad in ("32:0.2", "64:0", "128:1.5"):
    with pytest.raises(ValueError, match=f"case '{bad}': expected BLOCK:DENSITY"):
      sparse_ab.parse_case(bad)
  assert sparse_ab.parse_case("64:0.2") == (64, 0.2)


def test_launcher_parses_its_flags(tmp_path):
  """The launcher itself, as a subprocess (absl parses its flags)."""
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  proc = subprocess.run([sys.executable, "-m", "tools.sparse_ab",
                         f"--old={tmp_path / 'missing.py'}", "--cases=64:0.2"], cwd=root,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode != 0
  assert "expected the path of a mosaic_block_sparse.py" in proc.stderr
