"""The observations harness: kept-block masks, overlaps, and a run on a random checkpoint."""

import numpy as np

from adaspa_jax.harness import observations
from tests.models.embedded import tiny_checkpoint


def test_kept_blocks_against_a_loop():
  rng = np.random.default_rng(0)
  n_blk, k_max = 7, 4
  indices = np.stack([rng.permutation(n_blk)[:k_max] for _ in range(2 * 3 * n_blk)])
  indices = indices.reshape(2, 3, n_blk, k_max)
  counts = rng.integers(0, k_max + 1, (2, 3, n_blk))
  counts[0, 1, 2] = n_blk                                  # a dense row
  got = observations.kept_blocks(indices, counts, n_blk)
  want = np.zeros((2, 3, n_blk, n_blk), bool)
  for b, h, q in np.ndindex(2, 3, n_blk):
    if counts[b, h, q] >= n_blk:
      want[b, h, q] = True
    else:
      for j in range(counts[b, h, q]):
        want[b, h, q, indices[b, h, q, j]] = True
  np.testing.assert_array_equal(got, want)


def test_jaccard():
  a = np.array([[[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]], bool)
  b = np.array([[[1, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]], bool)
  rows = np.array([True, True, True])
  np.testing.assert_allclose(observations.jaccard(a, b, rows), [(1 / 3 + 1 + 1) / 3])
  np.testing.assert_allclose(observations.jaccard(a, b, np.array([True, False, False])),
                             [1 / 3])


def test_run_on_a_random_checkpoint(tmp_path):
  checkpoint = tiny_checkpoint.random_checkpoint(tmp_path / "ckpt")[0]
  obs = observations.run(checkpoint, n=3, batch=2, sparsities=(0.5, 0.9), block_size=16,
                         dtype=np.float32, log=lambda _: None)
  assert obs["search_steps"] == [4, 14] and len(obs["search_overlap"]) == 1
  layers, heads = 2, 2
  assert np.shape(obs["search_overlap"][0]) == (layers, heads)
  assert np.shape(obs["prompt_overlap"]) == (layers, heads)
  for o in (obs["search_overlap_mean"][0], obs["prompt_overlap_mean"]):
    assert 0 <= o <= 1
  assert 0 < obs["kept_density"] < 1
  r5, r9 = (np.asarray(obs["recall_curve"][k]) for k in ("0.5", "0.9"))
  assert r5.shape == (layers, heads) and (r5 >= r9 - 1e-6).all() and (r9 > 0).all()
  png = observations.recall_figure(obs, tmp_path / "recall.png")
  assert open(png, "rb").read(4) == b"\x89PNG"


def test_launcher_writes_json_and_figures(tmp_path):
  import json
  import subprocess
  import sys
  checkpoint = tiny_checkpoint.random_checkpoint(tmp_path / "ckpt")[0]
  out = tmp_path / "obs"
  proc = subprocess.run(
      [sys.executable, "-m", "adaspa_jax.experiments.observe", f"--checkpoint={checkpoint}",
       "--n=2", "--batch=2", "--sparsities=0.5", "--block_size=16", "--dtype=float32",
       f"--output_dir={out}"], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  obs = json.loads((out / "observations.json").read_text())
  assert obs["command"].startswith("python -m adaspa_jax.experiments.observe --checkpoint=")
  assert set(obs["recall_curve"]) == {"0.5"} and obs["n"] == 2
  for name in ("masks.png", "recall.png"):
    assert (out / name).read_bytes()[:4] == b"\x89PNG"
