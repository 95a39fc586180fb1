"""The analytic caption check on clips of known content, and on captions that must fail."""

import itertools
import math

import numpy as np
import pytest
from scipy import ndimage

from adaspa_jax.models.embedded import caption_check as cc, data as sd

ALL_ITEMS = [sd.Item(c, s, m) for c, s, m in itertools.product(sd.COLOUR_NAMES, sd.SHAPES,
                                                                 sd.MOTIONS)
             if not (s == "circle" and m == "spin")]


@pytest.fixture(scope="module")
def random_clips():
  batch = sd.sample_batch(21, 0, 150)
  return sd.render(batch.spec), batch


def test_every_colour_shape_and_motion_alone():
  """All 102 single objects, each over a random background at a random place."""
  batch = sd.sample_batch(22, 0, len(ALL_ITEMS), items=[(i,) for i in ALL_ITEMS])
  videos = sd.render(batch.spec)
  failed = []
  for video, item in zip(videos, ALL_ITEMS):
    result = cc.check(video, [item])
    if not result.passed:
      failed.append((item, result.wrong, result.missing, result.extra))
  assert not failed


def test_random_multi_object_clips_all_pass(random_clips):
  videos, batch = random_clips
  results = [cc.check(v, c) for v, c in zip(videos, batch.captions)]
  assert all(r.passed and r.score == 1.0 for r in results), [
      (c, r.wrong, r.missing, r.extra) for c, r in zip(batch.captions, results) if not r.passed]
  # Detections carry the track: one centroid per frame, on the generated centres.
  det = results[0].detected
  for k, item in enumerate(batch.items[0]):
    d = det[item.colour]
    assert d.frames.tolist() == list(range(sd.FRAMES))
    np.testing.assert_allclose(d.centroid[:, 0], batch.spec.x[0, k], atol=0.6)
    np.testing.assert_allclose(d.centroid[:, 1], batch.spec.y[0, k], atol=0.6)


def _variants(items, rng):
  """Captions that contradict the clip: one attribute changed, an object dropped or added."""
  out = []
  k = int(rng.integers(len(items)))
  unused = [c for c in sd.COLOUR_NAMES if c not in {i.colour for i in items}]
  item = items[k]
  swap = lambda new: items[:k] + (new,) + items[k + 1:]
  out.append(("colour", swap(sd.Item(unused[0], item.shape, item.motion))))
  for shape in sd.SHAPES:
    if shape != item.shape and not (shape == "circle" and item.motion == "spin"):
      out.append(("shape", swap(sd.Item(item.colour, shape, item.motion))))
  for motion in sd.MOTIONS:
    if motion != item.motion and not (item.shape == "circle" and motion == "spin"):
      out.append(("motion", swap(sd.Item(item.colour, item.shape, motion))))
  if len(items) > 1:
    out.append(("dropped", items[:k] + items[k + 1:]))
  if len(items) < 3:
    out.append(("added", items + (sd.Item(unused[1], "square", "left"),)))
  return out


def test_contradicting_captions_fail(random_clips):
  videos, batch = random_clips
  rng = np.random.default_rng(0)
  n = 0
  for video, items in list(zip(videos, batch.items))[:60]:
    for kind, wrong in _variants(items, rng):
      result = cc.check(video, sd.caption(wrong))
      assert not result.passed, (kind, sd.caption(items), sd.caption(wrong))
      assert result.score < 1.0 or kind == "dropped"
      n += 1
  assert n > 400


@pytest.mark.parametrize("blur,noise", [(0.0, 0.08), (0.8, 0.05)])
def test_blurred_noisy_clips_still_pass(random_clips, blur, noise):
  """Soft edges and pixel noise, as a sampler leaves them, rarely change the verdict."""
  videos, batch = random_clips
  rng = np.random.default_rng(1)
  x = ndimage.gaussian_filter(videos[:60], (0, 0, blur, blur, 0)) if blur else videos[:60]
  x = np.clip(x + rng.normal(0, noise, x.shape), 0, 1)
  passed = [cc.check(v, c).passed for v, c in zip(x, batch.captions[:60])]
  assert np.mean(passed) >= 0.95


def _disc_clip(centres, radius, colour, size=48, frames=8):
  """A disc drawn by thresholding distance: no shapes_data renderer involved."""
  ys, xs = np.mgrid[:size, :size] + 0.5
  video = np.full((frames, size, size, 3), 0.4, np.float32)
  for f, (x, y) in enumerate(centres):
    video[f][np.hypot(xs - x, ys - y) <= radius] = colour
  return video


def test_independently_drawn_discs():
  colour = sd.COLOURS["cyan"]
  t = np.arange(8)
  right = [(10 + 3 * i, 20) for i in t]
  falls = [(30, 8 + 3 * i) for i in t]
  hop = [(24, 38 - 16 * abs(math.sin(math.pi * i / 7))) for i in t]
  still = [(24, 24)] * 8
  for centres, motion in ((right, "right"), (falls, "down"), (hop, "bounce"),
                          (still, "still")):
    det = cc.detect(_disc_clip(centres, 6.0, colour))
    assert list(det) == ["cyan"] and det["cyan"].shape == "circle"
    assert det["cyan"].motion == motion
  assert cc.check(_disc_clip(right, 6.0, colour), "a cyan circle moves right").passed
  assert not cc.check(_disc_clip(still, 6.0, colour), "a cyan circle moves right").passed


def test_segment_labels_palette_and_grey():
  video = np.full((1, 16, 16, 3), 0.5, np.float32)
  video[0, 0, 0] = sd.COLOURS["yellow"]
  video[0, 1, 1] = (0.7, 0.2, 0.2)       # a dull red is still red
  video[0, 2, 2] = (0.55, 0.45, 0.5)     # too grey to be anything
  labels = cc.segment(video)
  assert labels[0, 0, 0] == sd.COLOUR_NAMES.index("yellow")
  assert labels[0, 1, 1] == sd.COLOUR_NAMES.index("red")
  assert (labels == -1).sum() == 16 * 16 - 2


def test_small_specks_are_not_objects():
  video = np.full((8, 48, 48, 3), 0.3, np.float32)
  video[:, 5, 5] = sd.COLOURS["red"]             # one pixel, every frame
  video[:3, 20:28, 20:28] = sd.COLOURS["blue"]   # a square in fewer than half the frames
  assert cc.detect(video) == {}


def test_bad_inputs():
  with pytest.raises(ValueError, match="expected \\[frames, height, width, 3\\]"):
    cc.detect(np.zeros((8, 48, 48)))
  with pytest.raises(ValueError, match="dtype uint8"):
    cc.detect(np.zeros((8, 48, 48, 3), np.uint8))
  with pytest.raises(ValueError, match="purple"):
    cc.check(np.zeros((8, 48, 48, 3), np.float32), "a purple circle moves left")
  with pytest.raises(ValueError, match="at least one object"):
    cc.check(np.zeros((8, 48, 48, 3), np.float32), [])
