"""The held-out evaluation of the embedded model, on a random tiny checkpoint."""

import os

import numpy as np
import pytest

from adaspa_jax import AdaSpaConfig
from adaspa_jax.harness import embedded_eval
from adaspa_jax.models.embedded import caption_check, data as shapes_data
from tests.models.embedded import tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return tiny_checkpoint.random_checkpoint(tmp_path_factory.mktemp("ckpt"))[0]


def test_held_out_prompts_are_the_grammars_and_not_the_training_streams():
  prompts = embedded_eval.held_out_prompts(20)
  assert prompts == embedded_eval.held_out_prompts(20)
  for p in prompts:
    shapes_data.parse_caption(p)
  assert prompts != list(shapes_data.sample_batch(0, 0, 20).captions)


def test_report_matches_the_written_clips(checkpoint, tmp_path):
  """AdaSpa keeping every block (sparsity 0) reproduces dense; the report's verdicts are
  the caption check of the clips it wrote."""
  adaspa = AdaSpaConfig(sparsity=0.0, block_size=16, num_steps=3, search_steps=(1,))
  report = embedded_eval.evaluate(checkpoint, n=3, num_steps=3, adaspa=adaspa, batch=2,
                                  output_dir=str(tmp_path))
  dense = np.load(os.path.join(tmp_path, "videos_dense.npy"))
  sparse = np.load(os.path.join(tmp_path, "videos_adaspa.npy"))
  assert dense.shape == (3, 2, 16, 16, 3)
  assert report["psnr_db"] > 60 and report["ssim"] > 0.999
  assert report["mean_recall"] > 0.999 and report["mean_sparsity"] == 0.0
  prompts = embedded_eval.held_out_prompts(3)
  for i, clip in enumerate(report["clips"]):
    assert clip["prompt"] == prompts[i] and clip["seed"] == i
    assert clip["dense_passed"] == caption_check.check(dense[i], prompts[i]).passed
    assert clip["adaspa_passed"] == caption_check.check(sparse[i], prompts[i]).passed
  assert report["dense_pass_rate"] == np.mean([c["dense_passed"] for c in report["clips"]])
  checks = [caption_check.check(dense[i], p) for i, p in enumerate(prompts)]
  assert report["attributes"]["dense"] == embedded_eval.attribute_counts(checks)
  assert report["attributes"]["dense"]["objects"] == sum(len(c.expected) for c in checks)
  assert os.path.exists(os.path.join(tmp_path, "report.json"))


def test_sparse_adaspa_differs_and_arguments_are_checked(checkpoint):
  adaspa = AdaSpaConfig(sparsity=0.7, block_size=16, num_steps=3, search_steps=(1,))
  report = embedded_eval.evaluate(checkpoint, n=2, num_steps=3, adaspa=adaspa, batch=2)
  assert 0 < report["mean_sparsity"] < 1 and 0 < report["mean_recall"] < 1
  assert report["psnr_db"] < 60
  with pytest.raises(ValueError, match="adaspa.num_steps=3"):
    embedded_eval.evaluate(checkpoint, n=2, num_steps=4, adaspa=adaspa)
  with pytest.raises(ValueError, match="prompts has 1 entries"):
    embedded_eval.evaluate(checkpoint, n=2, num_steps=3, adaspa=adaspa,
                           prompts=["a red circle falls"])


def test_swap_directions():
  assert embedded_eval.swap_directions("a red circle moves left, a blue square rises, "
                                       "a green triangle spins") == \
      "a red circle moves right, a blue square falls, a green triangle spins"
  assert embedded_eval.swap_directions("a cyan square falls, a red circle moves right") == \
      "a cyan square rises, a red circle moves left"


def test_direction_sensitivity(checkpoint):
  """Held-out directional clips; the swapped captions are different inputs, so a random
  model's losses differ; the gap is (swapped - true) / true; the run is deterministic."""
  out = embedded_eval.direction_sensitivity(checkpoint, n=3, sigmas=(0.8, 0.4))
  assert out["n"] == 3 and len(out["prompts"]) == 3
  for p in out["prompts"]:
    assert any(m in p for m in ("left", "right", "rises", "falls"))
  for key in ("loss_true", "loss_swapped", "relative_gap"):
    assert len(out[key]) == 2 and np.all(np.isfinite(out[key]))
  assert out["loss_true"] != out["loss_swapped"]
  np.testing.assert_allclose(out["relative_gap"],
                             np.subtract(out["loss_swapped"], out["loss_true"]) /
                             np.asarray(out["loss_true"]))
  again = embedded_eval.direction_sensitivity(checkpoint, n=3, sigmas=(0.8, 0.4))
  assert again["loss_true"] == out["loss_true"]
  with pytest.raises(ValueError, match="sigmas"):
    embedded_eval.direction_sensitivity(checkpoint, n=3, sigmas=(0.0,))
  with pytest.raises(ValueError, match="axis='diagonal'"):
    embedded_eval.direction_sensitivity(checkpoint, n=3, axis="diagonal")
  for axis, words, not_words in (("horizontal", ("left", "right"), ("rises", "falls")),
                                 ("vertical", ("rises", "falls"), ("left", "right"))):
    one = embedded_eval.direction_sensitivity(checkpoint, n=2, sigmas=(0.8,), axis=axis)
    assert one["axis"] == axis
    for p in one["prompts"]:
      assert any(w in p for w in words) and not any(w in p for w in not_words)


def test_attribute_counts_on_clips_of_known_content():
  """Clips rendered from their captions are right in every attribute; the same clips
  played backwards have every directional motion reversed, along its axis."""
  batch = shapes_data.sample_batch(5, 0, 12)
  videos = shapes_data.render(batch.spec)
  fwd = [caption_check.check(v, p) for v, p in zip(videos, batch.captions)]
  counts = embedded_eval.attribute_counts(fwd)
  n = sum(len(i) for i in batch.items)
  assert counts == dict(objects=n, colour_found=n, shape_right=n, motion_right=n,
                        reversed_horizontal=0, reversed_vertical=0)
  back = [caption_check.check(v[::-1], p) for v, p in zip(videos, batch.captions)]
  counts = embedded_eval.attribute_counts(back)
  motions = [i.motion for items in batch.items for i in items]
  assert counts["reversed_horizontal"] == sum(m in ("left", "right") for m in motions)
  assert counts["reversed_vertical"] == sum(m in ("up", "down") for m in motions)
  assert counts["colour_found"] == n and counts["shape_right"] == n


class _StandIn:
  """A denoiser with a known symmetry: out = x + ramp along one axis (or none)."""

  def __init__(self, config, axis):
    self.config, self.axis = config, axis

  def encode(self, prompts):
    return np.zeros((len(prompts), 4, 8), np.float32)

  def transformer(self, x, text, t, image_rotary_emb=None):
    if self.axis is None:
      return 2.0 * x
    shape = [1] * x.ndim
    shape[self.axis] = x.shape[self.axis]
    return x + np.arange(x.shape[self.axis], dtype=np.float32).reshape(shape)


def test_symmetry_errors_find_the_broken_symmetry(checkpoint):
  """A pointwise denoiser commutes with every flip; adding a ramp along one axis breaks
  exactly that axis's flip; a real (random) model breaks all three."""
  cfg = embedded_eval.tiny_t2v.load(checkpoint).config
  rows = embedded_eval.symmetry_errors(_StandIn(cfg, None), ["a red circle rises"],
                                       timesteps=(500,))
  assert rows[0]["caption"] == "a red circle rises" and rows[0]["timestep"] == 500.0
  assert rows[0]["hflip"] == rows[0]["vflip"] == rows[0]["time"] == 0.0
  for axis, broken in ((-1, "hflip"), (-2, "vflip"), (1, "time")):
    row = embedded_eval.symmetry_errors(_StandIn(cfg, axis), ["a red circle rises"],
                                        timesteps=(500,))[0]
    assert row[broken] > 0.1
    assert all(row[k] == 0.0 for k in ("hflip", "vflip", "time") if k != broken)
  real = embedded_eval.symmetry_errors(checkpoint,
                                       ["a red circle moves left", "a blue square falls"],
                                       timesteps=(900, 100))
  assert [(r["caption"][:5], r["timestep"]) for r in real] == [
      ("a red", 900.0), ("a red", 100.0), ("a blu", 900.0), ("a blu", 100.0)]
  assert all(np.isfinite(r[k]) and r[k] > 0 for r in real for k in ("hflip", "vflip", "time"))
  with pytest.raises(ValueError, match="captions='a red circle rises'"):
    embedded_eval.symmetry_errors(checkpoint, "a red circle rises")
  with pytest.raises(ValueError, match="timesteps"):
    embedded_eval.symmetry_errors(checkpoint, ["a red circle rises"], timesteps=(1001,))
