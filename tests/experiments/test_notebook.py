"""The ablations notebook (jupytext percent format) executed headless as a plain script."""

import json
import os
import subprocess
import sys

import numpy as np

NOTEBOOK = os.path.join("experiments", "notebooks", "ablations.py")


def test_notebook_runs_headless_and_draws_recall_and_masks(tmp_path):
  env = dict(os.environ, MPLBACKEND="Agg", ABLATIONS_NOTEBOOK_OUT=str(tmp_path))
  proc = subprocess.run([sys.executable, NOTEBOOK], capture_output=True, text=True,
                        timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ("recall_layer_head.png", "block_masks.png"):
    assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
  with open(tmp_path / "summary.json") as f:
    summary = json.load(f)
  assert set(summary["settings"]) == {"AdaSpa", "AdaSpa w/o head adaptive", "SVG"}
  for name, s in summary["settings"].items():
    recall = np.asarray(s["recall_layer_head"])
    assert recall.shape == (6, 4) and np.all((recall > 0) & (recall <= 1)), name
    assert np.isclose(recall.mean(), s["mean_recall"]), name
    assert 0.75 < s["sparsity"] < 0.85, name
    assert f"{name:28s}" in proc.stdout
  # 8 masks (2 settings x 2 layers x 2 heads); each keeps the text row and column and
  # 10-30% of the video blocks of every other row (AdaSpa's tiers at 0.8: 0.9 / 0.8 / 0.7).
  assert len(summary["kept"]) == 8
  assert all(0.1 < k < 0.4 for k in summary["kept"].values())
