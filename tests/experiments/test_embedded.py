"""The embedded default: the shipped checkpoint's metadata and the demo path on a tiny one."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import embedded
from models import tiny_t2v
from tests.experiments import tiny_checkpoint


def test_shipped_checkpoint_is_complete():
  record = tiny_t2v.training_record(embedded.CHECKPOINT)
  assert record["steps"] > 0 and record["final_loss"] > 0
  assert embedded.default_steps() == 25
  assert embedded.default_block_size() == 32
  size = sum(os.path.getsize(os.path.join(d, f))
             for d, _, files in os.walk(embedded.CHECKPOINT) for f in files)
  assert size < 15 * 2**20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return str(tiny_checkpoint.random_checkpoint(tmp_path_factory.mktemp("ckpt"))[0])


def test_demo_cli_writes_clips_and_report(checkpoint, tmp_path):
  """generate.py's default model, as a subprocess (launchers define absl flags)."""
  out = tmp_path / "demo"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.generate", f"--checkpoint={checkpoint}",
       "--prompt=a green triangle spins", "--steps=3", "--search_steps=1,2",
       "--block_size=16", "--sparsity=0.5", f"--output_dir={out}"],
      check=True, capture_output=True, text=True)
  assert 'prompt: "a green triangle spins"' in proc.stdout
  assert "caption check" in proc.stdout and "PSNR" in proc.stdout
  assert "strict PASS" in proc.stdout or "strict FAIL" in proc.stdout
  for name in ("clip_dense.gif", "clip_adaspa.gif", "side_by_side.gif"):
    with open(out / name, "rb") as f:
      assert f.read(6) in (b"GIF87a", b"GIF89a")
  assert (out / "masks.png").read_bytes()[:4] == b"\x89PNG"
  report = json.loads((out / "report.json").read_text())
  assert report["clips"][0]["prompt"] == "a green triangle spins"
  assert report["num_steps"] == 3 and 0 < report["mean_sparsity"] < 1
  clip = report["clips"][0]
  assert clip["adaspa_strict_passed"] == (clip["adaspa_passed"]
                                          and not clip["adaspa_extra_objects"])
  assert report["masks_png"] == "masks.png" and len(report["masks"]) == 4


def test_side_by_side_puts_the_difference_last():
  rng = np.random.default_rng(0)
  d, a = rng.random((2, 3, 16, 20, 3), dtype=np.float32)
  x = embedded.side_by_side(d, a, gap=2)
  assert x.shape == (3, 16, 64, 3)
  np.testing.assert_array_equal(x[:, :, :20], d)
  np.testing.assert_array_equal(x[:, :, 22:42], a)
  np.testing.assert_allclose(x[:, :, 44:], np.abs(a - d))
  assert (x[:, :, 20:22] == 1).all() and (x[:, :, 42:44] == 1).all()
  with pytest.raises(ValueError, match="dense, adaspa have shapes"):
    embedded.side_by_side(d, a[:, :8])


def test_embedded_refuses_a_single_mode(checkpoint, tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.generate", f"--checkpoint={checkpoint}",
       "--attention=dense", f"--output_dir={tmp_path}"], capture_output=True, text=True)
  assert proc.returncode != 0 and "--attention='dense'" in proc.stderr
