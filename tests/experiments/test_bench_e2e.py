"""The end-to-end benchmark launcher as a subprocess: Wan on a forced 2-device host mesh
with the full scan runs (CPU time allows one run of each); harness/e2e.py's own tests are
tests/harness/test_e2e.py."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
  """The launcher as a subprocess (absl flags are global): Wan (two CFG rows, no text
  tokens) sequence-parallel over 2 forced host devices, with the full scan runs."""
  out = tmp_path_factory.mktemp("cli")
  flags = os.environ.get("XLA_FLAGS", "")
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=2".strip())
  cmd = [sys.executable, "-m", "adaspa_jax.experiments.bench_e2e", "--model=wan", "--preset=tiny",
         "--dtype=float32", "--implementation=reference", "--latent_height=8",
         "--latent_width=10", "--video_seconds=0.5", "--steps=4", "--search_steps=1,2",
         "--block_size=16", "--sparsity=0.5", "--layers=1", "--reps=1", "--text_len=6",
         "--mesh=2", "--full_run", f"--output_dir={out}", "--tag=_cli"]
  # Files, not pipes: nothing reads a pipe while the subprocess runs.
  with open(out / "stdout.txt", "w") as stdout, open(out / "stderr.txt", "w") as stderr:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=stdout, stderr=stderr)
  yield proc, out
  if proc.poll() is None:
    proc.kill()
    proc.wait()


def test_cli_full_run_on_a_two_device_mesh(cli):
  proc, tmp_path = cli
  proc.wait(timeout=300)
  stdout = (tmp_path / "stdout.txt").read_text()
  assert proc.returncode == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
  [path] = list(tmp_path.glob("e2e_wan_*_cli.json"))
  res = json.loads(path.read_text())
  assert res["devices"] == 2 and "--mesh=2" in res["command"]
  m = res["main"]
  # 0.5 s at 16 fps -> 9 frames -> 3 latent frames; 3 x 4 x 5 = 60 tokens on 2 devices.
  assert m["latent"] == [3, 8, 10] and m["seq_len"] == 60 and m["batch_rows"] == 2
  assert sorted(m["steps"]) == ["cached_search", "dense", "dense_baseline", "fused_search",
                                "sparse"]
  assert m["composition"]["phase_steps"] == {"dense": 1, "fused_search": 1,
                                             "cached_search": 1, "sparse": 1}
  assert 0 < m["density"] < 1 and "sweep" not in res
  fr = res["full_run"]
  for mode in ("dense", "adaspa"):
    assert fr[mode]["wall_s"] > 0 and fr[mode]["compile_s"] > 0 and fr[mode]["finite"]
  np.testing.assert_allclose(fr["speedup"], fr["dense"]["wall_s"] / fr["adaspa"]["wall_s"])
  assert (tmp_path / path.name.replace(".json", ".md")).exists()
  assert "speedup / ceiling" in stdout
