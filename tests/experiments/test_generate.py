"""The generation launcher as a subprocess (launchers define absl flags at import): a tiny
random Wan preset on CPU, and the embedded default (``make demo``'s path) on a tiny
random checkpoint."""

import json
import os
import subprocess
import sys

import pytest

from adaspa_jax.models import wan
from tests.harness.generation_report import SEARCH, STEPS, check_report
from tests.models.embedded import tiny_checkpoint

LATENT = ["--latent_frames=3", "--latent_height=8", "--latent_width=10"]


def test_cli_wan_tiny_both(tmp_path):
  """The launcher as a subprocess: launchers define absl flags at import."""
  out = str(tmp_path / "wan")
  proc = subprocess.run(
      [sys.executable, "-m", "adaspa_jax.experiments.generate", "--model=wan", "--preset=tiny",
       f"--steps={STEPS}", f"--search_steps={','.join(map(str, SEARCH))}", "--sparsity=0.5",
       "--block_size=16", "--text_len=6", "--dtype=float32", "--noprogress",
       "--attention=both", f"--output_dir={out}", *LATENT],
      check=True, capture_output=True, text=True)
  assert "RANDOM WEIGHTS" in proc.stderr and "RANDOM EMBEDDINGS" in proc.stderr
  with open(os.path.join(out, "report.json")) as f:
    report = json.load(f)
  cfg = wan.PRESETS["tiny"]
  check_report(out, report, layers=cfg.num_layers, heads=cfg.num_attention_heads, rows=2)
  assert report["batch_rows"] == ["uncond", "cond"] and report["classifier_free_guidance"]
  assert report["adaspa"]["search_steps"] == list(SEARCH)


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


def test_embedded_refuses_a_single_mode(checkpoint, tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "adaspa_jax.experiments.generate", f"--checkpoint={checkpoint}",
       "--attention=dense", f"--output_dir={tmp_path}"], capture_output=True, text=True)
  assert proc.returncode != 0 and "--attention='dense'" in proc.stderr
