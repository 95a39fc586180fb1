"""The procedural clip generator: determinism, geometry that matches the caption, pixels."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaspa_jax.models.embedded import data as sd

N = 200


@pytest.fixture(scope="module")
def batch():
  return sd.sample_batch(3, 0, N)


def _arrays(spec):
  return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}


def test_deterministic_and_independent_of_batching():
  a = sd.sample_batch(5, 10, 6)
  b = sd.sample_batch(5, 10, 6)
  c = sd.sample_batch(5, 13, 3)          # clips 13..15 drawn on their own
  d = sd.sample_batch(6, 10, 6)
  assert a.captions == b.captions and a.captions[3:] == c.captions
  for name, x in _arrays(a.spec).items():
    np.testing.assert_array_equal(x, _arrays(b.spec)[name])
    np.testing.assert_array_equal(x[3:], _arrays(c.spec)[name])
  assert a.captions != d.captions
  np.testing.assert_array_equal(sd.render(a.spec), sd.render(b.spec))


def test_render_numpy_and_jitted_jax_agree(batch):
  spec = jax.tree.map(lambda x: x[:8], batch.spec)
  want = sd.render(spec, 48, 48)
  got = jax.jit(lambda s: sd.render(s, 48, 48, xp=jnp))(spec)
  assert got.shape == (8, 8, 48, 48, 3) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def _single(shape, motion, frames=3, size=48):
  return sd.sample_batch(11, 0, 1, frames=frames, height=size, width=size,
                         items=[(sd.Item("red", shape, motion),)])


@pytest.mark.parametrize("shape,area", [
    ("circle", math.pi), ("square", (2 * sd.SQUARE_HALF) ** 2),
    ("triangle", 3 * math.sqrt(3) / 4 * sd.TRIANGLE_CIRCUMRADIUS ** 2)])
@pytest.mark.parametrize("motion", ["left", "spin"])
def test_painted_area_is_the_shapes_area(shape, area, motion):
  """Coverage (how much of the red colour each frame holds) integrates the shape's area."""
  if shape == "circle" and motion == "spin":
    return
  b = _single(shape, motion)
  video = sd.render(b.spec).astype(np.float64)
  spec = b.spec
  bg = video[0, 0, 0, 0]                    # a corner is background for plain clips
  if spec.bg_kind[0] != 0:
    bg = sd.render(dataclasses.replace(spec, present=np.zeros_like(spec.present)))[0]
  red = np.asarray(sd.COLOURS["red"])
  # video = bg + alpha (red - bg) on every channel: solve for alpha by least squares.
  diff, target = video[0] - bg, red - bg
  alpha = (diff * target).sum(-1) / (target * target).sum(-1)
  r = spec.size[0, 0]
  np.testing.assert_allclose(alpha.sum((1, 2)), area * r * r, rtol=0.03)


def test_circle_pixels_against_distance():
  b = _single("circle", "up", frames=2)
  video = sd.render(b.spec)
  x, y, r = b.spec.x[0, 0, 1], b.spec.y[0, 0, 1], b.spec.size[0, 0]
  ys, xs = np.mgrid[:48, :48] + 0.5
  dist = np.hypot(xs - x, ys - y)
  np.testing.assert_allclose(video[0, 1][dist < r - 0.5], np.broadcast_to(
      sd.COLOURS["red"], video[0, 1][dist < r - 0.5].shape), atol=1e-6)
  assert np.all(video[0, 1][dist > r + 0.5].std(-1) < 1e-6)      # grey background only


def test_geometry_matches_caption(batch):
  _assert_geometry_matches_caption(batch)


def test_time_reversed_clips_are_clips_of_the_reversed_caption(batch):
  """Played backwards, every clip is a valid clip of its caption with motions reversed."""
  rev = sd.time_reversed(batch)
  _assert_geometry_matches_caption(rev)
  np.testing.assert_array_equal(sd.render(rev.spec)[:20], sd.render(batch.spec)[:20, ::-1])
  for fwd, back in zip(batch.items, rev.items):
    assert [(i.colour, i.shape) for i in fwd] == [(i.colour, i.shape) for i in back]
    assert [sd.REVERSED_MOTION[i.motion] for i in fwd] == [i.motion for i in back]
  assert sd.time_reversed(rev).captions == batch.captions
  assert "moves right" in sd.time_reversed(sd.sample_batch(
      0, 0, 1, items=[(sd.Item("red", "square", "left"),)])).captions[0]


def test_mirrored_clips_are_clips_of_the_mirrored_caption(batch):
  """Mirrored, every clip is a valid clip of its caption with left and right swapped."""
  mir = sd.mirrored(batch)
  _assert_geometry_matches_caption(mir)
  for clip, image in zip(batch.items, mir.items):
    assert [(i.colour, i.shape) for i in clip] == [(i.colour, i.shape) for i in image]
    swap = {"left": "right", "right": "left"}
    assert [swap.get(i.motion, i.motion) for i in clip] == [i.motion for i in image]
  caption = sd.mirrored(sd.sample_batch(0, 0, 1, items=[(
      sd.Item("red", "square", "left"), sd.Item("blue", "triangle", "right"),
      sd.Item("green", "circle", "up"))])).captions[0]
  assert caption == "a red square moves right, a blue triangle moves left, a green circle rises"
  twice = sd.mirrored(mir)
  assert twice.items == batch.items and twice.captions == batch.captions
  for name, x in _arrays(twice.spec).items():
    assert x.dtype == _arrays(batch.spec)[name].dtype, name
    if name == "x":     # width - (width - x) in float32: x to within one rounding of width - x
      np.testing.assert_allclose(x, batch.spec.x, rtol=0, atol=2.0 ** -18)
    else:
      np.testing.assert_array_equal(x, _arrays(batch.spec)[name], err_msg=name)
  with pytest.raises(ValueError, match="width=8"):
    sd.mirrored(batch, width=8)


def _mirror_cases(batch, n=40):
  """The first n clips, checked to hold every shape spinning and every textured background."""
  spec = jax.tree.map(lambda x: x[:n], batch.spec)
  spinning = {sd.SHAPES[s] for s, a, on in zip(spec.shape.ravel(), np.ptp(spec.angle, -1).ravel(),
                                              spec.present.ravel()) if on and a > 0}
  assert spinning == {"square", "triangle"}
  backgrounds = set(zip(spec.bg_kind.tolist(), spec.bg_vertical.tolist()))
  assert {(1, 0.0), (1, 1.0), (2, 0.0), (2, 1.0), (0, 0.0)} <= backgrounds
  return sd.Batch(spec, batch.items[:n], batch.captions[:n])


def test_rendered_mirror_is_the_flipped_render(batch):
  """Shapes and textures are symmetric in the renderer: exactly so where width - x is exact in
  float32 (centres on a 1/64 pixel grid), within that rounding otherwise."""
  clips = _mirror_cases(batch)
  np.testing.assert_allclose(sd.render(sd.mirrored(clips).spec),
                             sd.render(clips.spec)[:, :, :, ::-1], rtol=0, atol=1e-5)
  on_grid = dataclasses.replace(clips.spec, x=np.round(clips.spec.x * 64) / 64)
  on_grid = sd.Batch(on_grid, clips.items, clips.captions)
  flipped = sd.render(on_grid.spec)[:, :, :, ::-1]
  mirrored = sd.render(sd.mirrored(on_grid).spec)
  np.testing.assert_array_equal(mirrored, flipped)
  got = jax.jit(lambda s: sd.render(s, xp=jnp))(sd.mirrored(on_grid).spec)
  np.testing.assert_allclose(np.asarray(got), mirrored, atol=1e-5)
  small = sd.sample_batch(2, 0, 12, frames=3, height=16, width=24)
  np.testing.assert_allclose(sd.render(sd.mirrored(small, 24).spec, 16, 24),
                             sd.render(small.spec, 16, 24)[:, :, :, ::-1], rtol=0, atol=1e-5)


def test_caption_check_passes_mirrored_clips_with_their_captions(batch):
  """The analytic checker reads the mirrored clips as their new captions say, and rejects
  them with the old captions wherever an object moves sideways."""
  from adaspa_jax.models.embedded import caption_check
  clips = sd.Batch(jax.tree.map(lambda x: x[:12], batch.spec), batch.items[:12],
                   batch.captions[:12])
  mir = sd.mirrored(clips)
  videos = sd.render(mir.spec)
  sideways = 0
  for video, old, new, items in zip(videos, clips.captions, mir.captions, clips.items):
    result = caption_check.check(video, new)
    assert result.passed, (new, result.wrong, result.missing, result.extra)
    if any(i.motion in ("left", "right") for i in items):
      sideways += 1
      assert not caption_check.check(video, old).passed, old
  assert sideways >= 3


def _assert_geometry_matches_caption(batch):
  spec = batch.spec
  span = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
  seen = set()
  for b, items in enumerate(batch.items):
    assert 1 <= len(items) <= 3 and spec.present[b].sum() == len(items)
    assert len({i.colour for i in items}) == len(items)
    assert sd.parse_caption(batch.captions[b]) == items
    for k, item in enumerate(items):
      seen.add((item.colour, item.shape, item.motion))
      x, y, a = spec.x[b, k], spec.y[b, k], spec.angle[b, k]
      np.testing.assert_allclose(spec.rgb[b, k], sd.COLOURS[item.colour], rtol=1e-6)
      assert sd.SHAPES[spec.shape[b, k]] == item.shape
      ext = sd._EXTENT[item.shape] * spec.size[b, k]
      assert x.min() >= ext and x.max() <= 48 - ext and y.min() >= ext and y.max() <= 48 - ext
      dx, dy = np.diff(x), np.diff(y)
      if item.motion in span:
        sx, sy = span[item.motion]
        moving, still = (dx, dy) if sx else (dy, dx)
        assert np.all(np.sign(moving) == sx + sy) and np.all(still == 0)
        assert abs(moving.sum()) >= 0.25 * 48
      elif item.motion == "bounce":
        assert np.all(dx == 0) and (dy > 0).any() and (dy < 0).any()
        assert np.ptp(y) >= 0.2 * 48
      else:
        assert np.all(dx == 0) and np.all(dy == 0)
      spins = np.abs(np.diff(a))
      if item.motion == "spin":
        assert np.all((spins >= math.radians(11.9)) & (spins <= math.radians(20.1)))
      else:
        assert np.all(a == 0)
    # Objects never touch: outlines (bounding circles) keep a pixel apart in every frame.
    for i in range(len(items)):
      for j in range(i):
        gap = np.hypot(spec.x[b, i] - spec.x[b, j], spec.y[b, i] - spec.y[b, j])
        gap -= (sd._EXTENT[items[i].shape] * spec.size[b, i]
                + sd._EXTENT[items[j].shape] * spec.size[b, j])
        assert gap.min() >= 1.0 - 1e-4
  colours, shapes, motions = (set(x) for x in zip(*seen))
  assert colours == set(sd.COLOUR_NAMES) and shapes == set(sd.SHAPES)
  assert motions == set(sd.MOTIONS)
  assert set(spec.bg_kind.tolist()) == {0, 1, 2}
  assert not any(s == "circle" and m == "spin" for _, s, m in seen)


def test_caption_grammar_round_trip_and_vocabulary():
  rng = np.random.default_rng(0)
  for _ in range(50):
    items = sd.sample_items(rng)
    text = sd.caption(items)
    assert sd.parse_caption(text.upper().replace(", ", " ,  ")) == items
    assert set(sd.words(text)) <= set(sd.VOCABULARY)
  assert sd.caption([sd.Item("red", "circle", "left"), sd.Item("blue", "square", "down")]) == \
      "a red circle moves left, a blue square falls"
  assert sd.VOCABULARY[:2] == ("<pad>", "<s>") and len(set(sd.VOCABULARY)) == len(sd.VOCABULARY)


@pytest.mark.parametrize("text,match", [
    ("a purple circle moves left", "clause 'a purple circle moves left'"),
    ("a red circle moves sideways", "moves sideways"),
    ("red circle moves left", "clause"),
    ("", "clause ''"),
    ("a red circle falls, a red square rises", "distinct colours"),
    ("a red circle falls, a blue square rises, a green circle rises, a cyan square falls",
     "at most 3"),
])
def test_parse_caption_rejects(text, match):
  with pytest.raises(ValueError, match=match):
    sd.parse_caption(text)


def test_items_and_arguments_are_checked():
  with pytest.raises(ValueError, match="circle.*spin"):
    sd.Item("red", "circle", "spin")
  with pytest.raises(ValueError, match="colour='purple'"):
    sd.Item("purple", "circle", "left")
  with pytest.raises(ValueError, match="n=-1"):
    sd.sample_batch(0, 0, -1)
  with pytest.raises(ValueError, match="height=8"):
    sd.sample_batch(0, 0, 1, height=8)
  with pytest.raises(ValueError, match="items has 1 entries"):
    sd.sample_batch(0, 0, 2, items=[(sd.Item("red", "circle", "left"),)])


def test_other_sizes_keep_objects_inside():
  b = sd.sample_batch(2, 0, 20, frames=4, height=16, width=24)
  video = sd.render(b.spec, 16, 24)
  assert video.shape == (20, 4, 16, 24, 3) and video.min() >= 0 and video.max() <= 1
  ext = np.asarray([[sd._EXTENT[sd.SHAPES[s]] for s in row] for row in b.spec.shape])
  ext = (ext * b.spec.size)[..., None]
  on = b.spec.present[..., None] > 0
  assert np.all(~on | ((b.spec.x >= ext) & (b.spec.x <= 24 - ext)))
  assert np.all(~on | ((b.spec.y >= ext) & (b.spec.y <= 16 - ext)))
