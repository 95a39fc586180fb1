"""The embedded default: the shipped checkpoint's metadata and the demo path on a tiny one."""

import json
import os
import subprocess
import sys

import pytest

from adaspa_jax.harness import demo
from adaspa_jax.models.embedded import model as tiny_t2v
from tests.models.embedded import tiny_checkpoint


def test_shipped_checkpoint_is_complete():
  record = tiny_t2v.training_record(demo.CHECKPOINT)
  assert record["steps"] > 0 and record["final_loss"] > 0
  assert demo.default_steps() == 25
  assert demo.default_block_size() == 32
  size = sum(os.path.getsize(os.path.join(d, f))
             for d, _, files in os.walk(demo.CHECKPOINT) for f in files)
  assert size < 15 * 2**20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return str(tiny_checkpoint.random_checkpoint(tmp_path_factory.mktemp("ckpt"))[0])


def test_demo_cli_writes_clips_and_report(checkpoint, tmp_path):
  """generate.py's default model, as a subprocess (launchers define absl flags)."""
  out = tmp_path / "demo"
  proc = subprocess.run(
      [sys.executable, "-m", "adaspa_jax.experiments.generate", f"--checkpoint={checkpoint}",
       "--prompt=a green triangle spins", "--steps=3", "--search_steps=1,2",
       "--block_size=16", "--sparsity=0.5", f"--output_dir={out}"],
      check=True, capture_output=True, text=True)
  assert 'prompt: "a green triangle spins"' in proc.stdout
  assert "caption check" in proc.stdout and "PSNR" in proc.stdout
  for name in ("clip_dense.gif", "clip_adaspa.gif"):
    with open(out / name, "rb") as f:
      assert f.read(6) in (b"GIF87a", b"GIF89a")
  report = json.loads((out / "report.json").read_text())
  assert report["clips"][0]["prompt"] == "a green triangle spins"
  assert report["num_steps"] == 3 and 0 < report["mean_sparsity"] < 1


def test_embedded_refuses_a_single_mode(checkpoint, tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "adaspa_jax.experiments.generate", f"--checkpoint={checkpoint}",
       "--attention=dense", f"--output_dir={tmp_path}"], capture_output=True, text=True)
  assert proc.returncode != 0 and "--attention='dense'" in proc.stderr
