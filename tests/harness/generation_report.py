"""What every report of harness/generation.py must hold: shared by
tests/harness/test_generation.py and the launcher's tests/experiments/test_generate.py."""

import json
import os

import numpy as np

STEPS, SEARCH = 5, (1, 3)


def check_report(out, report, *, layers, heads, rows, modes=("dense", "adaspa")):
  with open(os.path.join(out, "report.json")) as f:
    on_disk = json.load(f)
  assert on_disk == json.loads(json.dumps(report))
  assert on_disk["random_weights"] is True
  assert sorted(on_disk["runs"]) == sorted(modes)
  for mode in modes:
    run = on_disk["runs"][mode]
    assert run["wall_s"] > 0 and run["compile_s"] > 0
    latents = np.load(os.path.join(out, run["latents"]))
    assert list(latents.shape) == on_disk["latent_shape"] and np.isfinite(latents).all()
  assert on_disk["phases"] == ["dense", "fused_search", "sparse", "cached_search", "sparse"]
  assert [s["step"] for s in on_disk["searches"]] == list(SEARCH)
  for search in on_disk["searches"]:
    for field in ("recall", "sparsity"):
      values = np.asarray(search[field])
      assert values.shape == (layers, rows, heads)             # [layer][batch row][head]
      assert np.all((values >= 0) & (values <= 1 + 1e-6))
    assert np.all(np.asarray(search["sparsity"]) > 0)          # 0.5 really drops blocks
  assert len(on_disk["batch_rows"]) == rows
  assert 0 < on_disk["mean_sparsity"] < 1 and 0 < on_disk["mean_recall"] <= 1 + 1e-6
  with open(os.path.join(out, on_disk["masks_png"]), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert len(on_disk["masks"]) >= 2
  if len(modes) == 2:
    assert np.isfinite(on_disk["psnr_db"]) and -1 <= on_disk["ssim"] < 1
    assert on_disk["speedup"] > 0
  else:
    assert "psnr_db" not in on_disk
