"""The ablations launcher as a subprocess (it defines absl flags at import)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from adaspa_jax.harness import ablations
from adaspa_jax.models.embedded import model as tiny_t2v

EMBEDDED = "checkpoints/tiny_t2v"


def test_launcher_on_the_embedded_checkpoint_writes_json_tables_and_figures(tmp_path):
  """2 prompts, 2 steps of the shipped model through the launcher: at 2 steps every warm-up
  searches at steps (0, 1), so the group is one run of AdaSpa at 0.8, which keeps about
  80% sparsity; the writers report what was measured."""
  assert ablations.frame_tokens_of(tiny_t2v.load(EMBEDDED)) == 256
  out = tmp_path / "out"
  args = ["--n=2", "--batch=2", "--num_steps=2", "--groups=warmup", "--dtype=float32",
          f"--output_dir={out}"]
  proc = subprocess.run([sys.executable, "-m", "adaspa_jax.experiments.ablate", *args],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / "results.json") as f:
    results = json.load(f)
  assert results["command"] == "python -m adaspa_jax.experiments.ablate " + " ".join(args)
  assert (results["checkpoint"], results["n"], results["num_steps"], results["dtype"]) == (
      EMBEDDED, 2, 2, "float32")
  assert results["prompts"] == ablations.embedded_eval.held_out_prompts(2)
  assert [r["name"] for r in results["settings"]] == [
      "warm-up 0", "warm-up 2", "warm-up 5", "warm-up 10"]
  assert [r.get("same_run_as") for r in results["settings"]] == [None] + ["warmup/warm-up 0"] * 3
  row = results["settings"][0]
  assert row["config"]["search_steps"] == [0, 1] and row["config"]["measure_recall"]
  s = row["summary"]
  assert 0.75 < s["sparsity"] < 0.85 and 0 < s["mean_recall"] < 1
  assert np.shape(s["recall_layer_head"]) == (6, 4)
  assert s["psnr_db"] == pytest.approx(np.mean([c["psnr_db"] for c in row["clips"]]))
  assert s["pass_rate"] == np.mean([c["passed"] for c in row["clips"]])
  assert 0 < s["ssim"] < 1 and s["wall_s"] > 0 and s["sparse_steps"] == 1   # step 1 cached
  tables = (out / "tables.md").read_text()
  assert (f"| warm-up 5 | {s['strict_pass_rate']:.0%} | {s['extra_object_rate']:.0%} | "
          f"{s['pass_rate']:.0%} | {s['mean_score']:.3f} | "
          f"{s['psnr_db']:.2f} | {s['ssim']:.4f} | {s['mean_recall']:.3f} | "
          f"{s['sparsity']:.3f} |") in tables
  assert "## Warm-up" in tables and "## Table 1" not in tables
  assert results["command"] in tables
  assert [p.name for p in out.glob("*.png")] == ["warmup.png"]
  assert (out / "warmup.png").read_bytes()[:4] == b"\x89PNG"
