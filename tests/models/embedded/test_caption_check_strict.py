"""The strict verdict of the caption check: extra objects, transient ones, occlusion, touching."""

import dataclasses

import numpy as np
import pytest

from adaspa_jax.models.embedded import caption_check as cc
from adaspa_jax.models.embedded import data as sd


def _clip(items, *, seed=0, frames=8, size=48, planted=None):
  """One rendered clip of ``items``; ``planted``: an extra (colour, shape, x, y, r) drawn in
  slot 3 of every frame (the caption does not name it)."""
  batch = sd.sample_batch(31, seed, 1, frames=frames, height=size, width=size, items=[items])
  spec = batch.spec
  if planted is not None:
    colour, shape, x, y, r = planted
    k = len(items)
    assert k < sd.MAX_OBJECTS

    def put(a, v):
      a = np.array(a)
      a[0, k] = v
      return a
    spec = dataclasses.replace(
        spec, present=put(spec.present, 1.0), rgb=put(spec.rgb, sd.COLOURS[colour]),
        shape=put(spec.shape, sd.SHAPES.index(shape)), size=put(spec.size, r),
        x=put(spec.x, x), y=put(spec.y, y), angle=put(spec.angle, 0.0))
  return sd.render(spec, size, size)[0], batch.captions[0]


RED = sd.Item("red", "circle", "left")
BLUE = sd.Item("blue", "square", "down")


@pytest.mark.parametrize("frames,size", [(8, 48), (16, 96)])
def test_generated_clips_pass_strict(frames, size):
  batch = sd.sample_batch(32, 0, 12, frames=frames, height=size, width=size)
  videos = sd.render(batch.spec, size, size)
  results = [cc.check(v, c) for v, c in zip(videos, batch.captions)]
  assert all(r.strict_passed and not r.extra_objects for r in results), [
      (c, r.extra_objects) for c, r in zip(batch.captions, results) if not r.strict_passed]


def _far_corner(video_without):
  """A corner of the frame the clip's objects never come near (object pixels absent)."""
  labels = cc.segment(video_without)
  size = video_without.shape[1]
  for x, y in ((7, 7), (size - 7, 7), (7, size - 7), (size - 7, size - 7)):
    if (labels[:, max(0, y - 7):y + 7, max(0, x - 7):x + 7] < 0).all():
      return x, y
  pytest.skip("no free corner in this clip")


def test_planted_uncaptioned_object_fails_strict_in_few_frames():
  clean, caption = _clip([RED])
  x, y = _far_corner(clean)
  planted, _ = _clip([RED], planted=("green", "square", x, y, 4.5))
  # In 3 consecutive frames of 8: fewer than half, so the lenient check ignores the colour.
  video = clean.copy()
  video[2:5] = planted[2:5]
  r = cc.check(video, caption)
  assert r.passed and not r.strict_passed
  assert r.extra_objects == (cc.ExtraObject("green", False, 2, 3, 1),)
  # In every frame both verdicts fail.
  r = cc.check(planted, caption)
  assert not r.passed and not r.strict_passed and r.extra == ("green",)


def test_transient_object_is_not_extra():
  clean, caption = _clip([RED, BLUE])
  x, y = _far_corner(clean)
  planted, _ = _clip([RED, BLUE], planted=("yellow", "triangle", x, y, 4.5))
  video = clean.copy()
  video[1], video[3], video[6] = planted[1], planted[3], planted[6]   # never two in a row
  r = cc.check(video, caption)
  assert r.strict_passed and r.extra_objects == ()
  assert cc.extra_objects(video, caption, min_frames=1)   # each frame alone is seen


def test_second_object_of_a_captioned_colour():
  clean, caption = _clip([RED])
  x, y = _far_corner(clean)
  # A smaller second red object: the lenient check sees only the largest red component.
  planted, _ = _clip([RED], planted=("red", "square", x, y, 3.5))
  r = cc.check(planted, caption)
  assert r.passed and not r.strict_passed
  assert [(e.colour, e.captioned, e.count) for e in r.extra_objects] == [("red", True, 2)]
  assert r.extra_objects[0].frames == 8


def test_occluded_object_split_in_two_counts_once():
  """A blue bar across a red disc cuts it into two red components: one object."""
  video = np.full((4, 48, 48, 3), 0.4, np.float32)
  yy, xx = np.mgrid[:48, :48] + 0.5
  disc = (xx - 24) ** 2 + (yy - 24) ** 2 <= 8 ** 2
  bar = (np.abs(xx - 24) <= 2) & (np.abs(yy - 24) <= 14)
  video[:, disc] = sd.COLOURS["red"]
  video[:, bar] = sd.COLOURS["blue"]
  labels = cc.segment(video)
  red = sd.COLOUR_NAMES.index("red")
  from scipy import ndimage
  assert ndimage.label(labels[0] == red)[1] == 2          # two red pieces ...
  min_area = cc.MIN_AREA * 48 * 48
  assert cc.count_objects(labels[0], red, min_area) == 1  # ... one red object
  # Without the bar's pixels between them, the two halves are two objects.
  gap = video.copy()
  gap[:, bar] = 0.4
  assert cc.count_objects(cc.segment(gap)[0], red, min_area) == 2
  items = [sd.Item("red", "circle", "left"), sd.Item("blue", "square", "left")]
  assert cc.extra_objects(video, items) == ()
  assert cc.extra_objects(gap, items[:1])[0].count == 2


def test_touching_objects_are_two_objects_of_their_colours():
  video = np.full((4, 48, 48, 3), 0.4, np.float32)
  yy, xx = np.mgrid[:48, :48] + 0.5
  video[:, (xx - 16) ** 2 + (yy - 24) ** 2 <= 7 ** 2] = sd.COLOURS["red"]
  video[:, (np.abs(xx - 29.5) <= 6.5) & (np.abs(yy - 24) <= 6.5)] = sd.COLOURS["blue"]
  labels = cc.segment(video)
  min_area = cc.MIN_AREA * 48 * 48
  for colour in ("red", "blue"):
    assert cc.count_objects(labels[0], sd.COLOUR_NAMES.index(colour), min_area) == 1
  items = [sd.Item("red", "circle", "left")]
  runs = cc.extra_objects(video, items)
  assert [(e.colour, e.captioned, e.frames) for e in runs] == [("blue", False, 4)]


def test_small_specks_are_not_objects():
  video = np.full((4, 48, 48, 3), 0.4, np.float32)
  video[:, 10:12, 10:12] = sd.COLOURS["cyan"]     # 4 pixels, under MIN_AREA (9.2 px)
  assert cc.extra_objects(video, [RED]) == ()


def test_bad_arguments():
  video = np.zeros((2, 16, 16, 3), np.float32)
  with pytest.raises(ValueError, match="min_frames"):
    cc.extra_objects(video, [RED], min_frames=0)
  with pytest.raises(ValueError, match="caption"):
    cc.extra_objects(video, "a purple blob")
