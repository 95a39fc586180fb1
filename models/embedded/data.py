"""Procedural text-to-video data: coloured shapes moving over plain or textured backgrounds.

A clip shows one to three objects, each a distinct colour from ``COLOURS``, a
shape from ``SHAPES`` and a motion from ``MOTIONS``, over a grey background that
is plain, striped or checkered. Its caption names the objects in order with the
template grammar

  caption := clause ("," clause)*        clause := "a" COLOUR SHAPE MOTION
  MOTION  := "moves left" | "moves right" | "rises" | "falls" | "bounces" | "spins"

e.g. "a red circle moves left, a blue square falls". The background is not in
the caption: the model picks one. Circles never spin (a turning circle looks
still), and objects never overlap, so every object is fully visible in every
frame.

Everything is deterministic: clip ``index`` of stream ``seed`` is drawn from
``numpy.random.default_rng((seed, index))``, whatever batch it lands in.
Sampling (host, numpy) yields a ``ClipSpec`` of per-frame geometry; ``render``
turns specs into pixels with array code that runs unchanged on numpy or, with
``xp=jax.numpy``, inside a jitted training step on the accelerator.

Coordinates: x to the right, y *down*, in pixels; pixel (i, j) covers
[j, j + 1) x [i, i + 1). Videos are float32 [B, F, H, W, 3] in [0, 1].
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

# The tokenizer's split, re-exported for the grammar.
from adaspa_jax.models.embedded.text import words

# Saturated colours far apart in RGB; backgrounds are neutral grey, so a pixel's
# saturation alone tells object from background.
COLOURS = {
    "red": (0.92, 0.12, 0.10),
    "green": (0.12, 0.75, 0.18),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "magenta": (0.85, 0.12, 0.85),
    "cyan": (0.10, 0.82, 0.88),
}
COLOUR_NAMES = tuple(COLOURS)
PALETTE = np.asarray([COLOURS[c] for c in COLOUR_NAMES], np.float32)    # [6, 3]
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("left", "right", "up", "down", "bounce", "spin")
MOTION_PHRASES = {"left": "moves left", "right": "moves right", "up": "rises", "down": "falls",
                  "bounce": "bounces", "spin": "spins"}
BACKGROUNDS = ("plain", "stripes", "checker")
MAX_OBJECTS = 3
FRAMES, HEIGHT, WIDTH = 8, 48, 48

PAD, START = "<pad>", "<s>"
# Every word the grammar can produce; the tokenizer's ids are positions here.
VOCABULARY = (PAD, START, "a", ",", *COLOUR_NAMES, *SHAPES,
              *sorted({w for p in MOTION_PHRASES.values() for w in p.split()}))

# Shape extents relative to the sampled size r: areas pi r^2 (circle), 3.24 r^2
# (square of half-side 0.9 r), 2.2 r^2 (equilateral triangle, circumradius 1.3 r),
# so no shape is much bigger than another.
SQUARE_HALF = 0.9
TRIANGLE_CIRCUMRADIUS = 1.3
# Distance from the centre to the farthest point of each shape, in units of r.
_EXTENT = {"circle": 1.0, "square": SQUARE_HALF * math.sqrt(2), "triangle": TRIANGLE_CIRCUMRADIUS}


@dataclasses.dataclass(frozen=True)
class Item:
  """One object as the caption names it."""
  colour: str
  shape: str
  motion: str

  def __post_init__(self):
    for field, allowed in (("colour", COLOUR_NAMES), ("shape", SHAPES), ("motion", MOTIONS)):
      if getattr(self, field) not in allowed:
        raise ValueError(f"{field}={getattr(self, field)!r}: expected one of {allowed}.")
    if self.shape == "circle" and self.motion == "spin":
      raise ValueError("shape='circle' with motion='spin': a turning circle looks still; "
                       "the grammar has no spinning circles.")


def caption(items) -> str:
  """The caption of a sequence of ``Item``s."""
  return ", ".join(f"a {i.colour} {i.shape} {MOTION_PHRASES[i.motion]}" for i in items)


_PHRASE_TO_MOTION = {p: m for m, p in MOTION_PHRASES.items()}


def parse_caption(text: str) -> tuple[Item, ...]:
  """Inverse of ``caption``: the items a caption names (case and spacing are free).

  Raises ValueError naming the first clause outside the grammar, or a caption
  naming a colour twice or more than ``MAX_OBJECTS`` objects.
  """
  if not isinstance(text, str):
    raise ValueError(f"caption={text!r}: expected a string.")
  items = []
  for clause in text.lower().split(","):
    words = clause.split()
    m = None
    if len(words) >= 4 and words[0] == "a":
      m = _PHRASE_TO_MOTION.get(" ".join(words[3:]))
    if m is None or words[1] not in COLOURS or words[2] not in SHAPES:
      raise ValueError(
          f"caption clause {clause.strip()!r} in {text!r}: expected 'a COLOUR SHAPE MOTION' "
          f"with COLOUR in {COLOUR_NAMES}, SHAPE in {SHAPES}, MOTION in "
          f"{tuple(MOTION_PHRASES.values())}.")
    items.append(Item(words[1], words[2], m))
  colours = [i.colour for i in items]
  if len(set(colours)) != len(colours) or len(items) > MAX_OBJECTS:
    raise ValueError(f"caption={text!r}: expected at most {MAX_OBJECTS} objects of distinct "
                     "colours.")
  return tuple(items)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ClipSpec:
  """Geometry of B clips with up to K = MAX_OBJECTS objects and F frames.

  Attributes:
    present: float32 [B, K], 1 for a drawn object slot.
    rgb: float32 [B, K, 3].
    shape: int32 [B, K], index into ``SHAPES``.
    size: float32 [B, K], r in pixels (see ``SQUARE_HALF``, ``TRIANGLE_CIRCUMRADIUS``).
    x, y: float32 [B, K, F] centre per frame, pixels.
    angle: float32 [B, K, F] rotation per frame, radians.
    bg_level: float32 [B] grey level.
    bg_kind: int32 [B], index into ``BACKGROUNDS``.
    bg_period: float32 [B] texture period, pixels.
    bg_amplitude: float32 [B] texture contrast (+-).
    bg_vertical: float32 [B], 1 for vertical stripes.
    bg_offset: float32 [B] texture phase, pixels.
    bg_flip_x: float32 [B], 1 for a texture drawn mirrored left-right (x -> width - x):
      0 for sampled clips, toggled by ``mirrored``. A checker's one phase serves both
      axes, so no phase mirrors it along x alone; a reflected texture coordinate does,
      exactly.
  """
  present: np.ndarray
  rgb: np.ndarray
  shape: np.ndarray
  size: np.ndarray
  x: np.ndarray
  y: np.ndarray
  angle: np.ndarray
  bg_level: np.ndarray
  bg_kind: np.ndarray
  bg_period: np.ndarray
  bg_amplitude: np.ndarray
  bg_vertical: np.ndarray
  bg_offset: np.ndarray
  bg_flip_x: np.ndarray


@dataclasses.dataclass(frozen=True)
class Batch:
  """Clips ``start .. start + n - 1`` of a stream: geometry, items and captions."""
  spec: ClipSpec
  items: tuple[tuple[Item, ...], ...]
  captions: tuple[str, ...]


def sample_items(rng: np.random.Generator) -> tuple[Item, ...]:
  """One to three objects of distinct colours, uniform over shapes and allowed motions."""
  n = int(rng.integers(1, MAX_OBJECTS + 1))
  colours = rng.choice(len(COLOUR_NAMES), size=n, replace=False)
  items = []
  for c in colours:
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    allowed = [m for m in MOTIONS if not (shape == "circle" and m == "spin")]
    items.append(Item(COLOUR_NAMES[int(c)], shape, allowed[int(rng.integers(len(allowed)))]))
  return tuple(items)


def _trajectory(rng, item, r, frames, height, width):
  """(x [F], y [F], angle [F]) of one object, kept inside the frame."""
  ext = _EXTENT[item.shape] * r + 0.5
  t = np.arange(frames, dtype=np.float64)
  span = max(frames - 1, 1)
  angle = np.zeros(frames)
  if item.motion in ("left", "right", "up", "down"):
    along, across = (width, height) if item.motion in ("left", "right") else (height, width)
    travel = min(rng.uniform(0.30, 0.45) * along, along - 2 * ext)
    start = rng.uniform(ext + travel, along - ext)          # for a move towards 0
    pos = start - travel * t / span
    if item.motion in ("right", "down"):
      pos = along - pos
    other = np.full(frames, rng.uniform(ext, across - ext))
    return (pos, other, angle) if item.motion in ("left", "right") else (other, pos, angle)
  x = np.full(frames, rng.uniform(ext, width - ext))
  if item.motion == "bounce":
    # A ball hopping in place: height above the floor |sin|, one to one and a half hops per clip,
    # so every clip has at least one turn-around with travel both up and down.
    amplitude = min(rng.uniform(0.28, 0.40) * height, height - 2 * ext)
    floor = rng.uniform(ext + amplitude, height - ext)
    hops = rng.uniform(1.0, 1.5)
    phase = rng.uniform(0, math.pi)
    y = floor - amplitude * np.abs(np.sin(math.pi * hops * t / span + phase))
    return x, y, angle
  y = np.full(frames, rng.uniform(ext, height - ext))
  if item.motion == "spin":
    step = math.radians(rng.uniform(12.0, 20.0)) * rng.choice((-1.0, 1.0))
    angle = rng.uniform(0, 2 * math.pi) + step * t
  return x, y, angle


def _min_gap(tracks):
  """Smallest distance between object outlines (bounding circles) over frames and pairs."""
  gap = np.inf
  for i in range(len(tracks)):
    for j in range(i):
      (xi, yi, ei), (xj, yj, ej) = tracks[i], tracks[j]
      gap = min(gap, float(np.min(np.hypot(xi - xj, yi - yj) - ei - ej)))
  return gap


_TRIES, _RESTARTS = 16, 16
SIZE_RANGE = (0.09, 0.12)   # r as a share of min(height, width)


def _sample_clip(rng, items, frames, height, width):
  """Per-object (size, x, y, angle) and background parameters of one clip.

  Objects are placed one at a time; each is redrawn until it keeps a pixel of
  clearance from those already placed over the whole clip (or the tries run
  out: then the least overlapping draw is kept).
  """
  scale = min(height, width)
  best, best_gap = None, -np.inf
  for _ in range(_RESTARTS):
    placed, tracks, clip_gap = [], [], np.inf
    for item in items:
      pick, pick_gap = None, -np.inf
      for _ in range(_TRIES):
        r = rng.uniform(*SIZE_RANGE) * scale
        obj = (r, *_trajectory(rng, item, r, frames, height, width))
        track = (obj[1], obj[2], _EXTENT[item.shape] * r)
        gap = min((_min_gap([track, t]) for t in tracks), default=np.inf)
        if gap > pick_gap:
          pick, pick_gap = (obj, track), gap
        if gap >= 1.0:
          break
      placed.append(pick[0])
      tracks.append(pick[1])
      clip_gap = min(clip_gap, pick_gap)
    if clip_gap > best_gap:
      best, best_gap = placed, clip_gap
    if clip_gap >= 1.0:
      break
  kind = int(rng.integers(len(BACKGROUNDS)))
  background = dict(
      bg_level=rng.uniform(0.2, 0.6), bg_kind=kind, bg_period=rng.uniform(0.12, 0.25) * scale,
      bg_amplitude=0.0 if kind == 0 else rng.uniform(0.05, 0.12),
      bg_vertical=float(rng.integers(2)), bg_offset=rng.uniform(0, scale), bg_flip_x=0.0)
  return best, background


def _check_size(frames, height, width):
  for name, v, lo in (("frames", frames, 1), ("height", height, 16), ("width", width, 16)):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
      raise ValueError(f"{name}={v!r}: expected an int >= {lo}.")


def sample_batch(seed: int, start: int, n: int, *, frames: int = FRAMES, height: int = HEIGHT,
                 width: int = WIDTH, items=None) -> Batch:
  """Clips ``start .. start + n - 1`` of stream ``seed``.

  Args:
    seed, start: the stream and the first clip's index (ints >= 0).
    n: clips.
    frames, height, width: clip size (16 pixels or more a side).
    items: None for random objects, or n sequences of ``Item``s to draw (e.g. a
      prompt's ``parse_caption``); their geometry is still random.

  Returns:
    ``Batch`` with ``spec`` arrays of leading dimension n.
  """
  for name, v in (("seed", seed), ("start", start), ("n", n)):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
      raise ValueError(f"{name}={v!r}: expected an int >= 0.")
  _check_size(frames, height, width)
  if items is not None and len(items) != n:
    raise ValueError(f"items has {len(items)} entries: expected n={n}.")
  k = MAX_OBJECTS
  out = dict(present=np.zeros((n, k)), rgb=np.zeros((n, k, 3)), shape=np.zeros((n, k), int),
             size=np.ones((n, k)), x=np.zeros((n, k, frames)), y=np.zeros((n, k, frames)),
             angle=np.zeros((n, k, frames)))
  bg = {name: np.zeros(n) for name in ("bg_level", "bg_kind", "bg_period", "bg_amplitude",
                                       "bg_vertical", "bg_offset", "bg_flip_x")}
  all_items = []
  for b in range(n):
    rng = np.random.default_rng((int(seed), int(start) + b))
    clip_items = sample_items(rng) if items is None else tuple(items[b])
    if not 1 <= len(clip_items) <= k or not all(isinstance(i, Item) for i in clip_items):
      raise ValueError(f"items[{b}]={clip_items!r}: expected 1 to {k} Items.")
    objects, background = _sample_clip(rng, clip_items, frames, height, width)
    for s, (item, (r, x, y, a)) in enumerate(zip(clip_items, objects)):
      out["present"][b, s] = 1.0
      out["rgb"][b, s] = COLOURS[item.colour]
      out["shape"][b, s] = SHAPES.index(item.shape)
      out["size"][b, s], out["x"][b, s], out["y"][b, s], out["angle"][b, s] = r, x, y, a
    for name, v in background.items():
      bg[name][b] = v
    all_items.append(clip_items)
  ints = {"shape", "bg_kind"}
  arrays = {name: np.asarray(v, np.int32 if name in ints else np.float32)
            for name, v in {**out, **bg}.items()}
  return Batch(ClipSpec(**arrays), tuple(all_items), tuple(caption(i) for i in all_items))


# What a motion looks like played backwards.
REVERSED_MOTION = {"left": "right", "right": "left", "up": "down", "down": "up",
                   "bounce": "bounce", "spin": "spin"}


def time_reversed(batch: Batch) -> Batch:
  """The clips played backwards, captioned with each motion reversed.

  A reversed clip is itself a sample of the stream's distribution (a move's
  start and end are drawn symmetrically, a bounce's phase uniformly and a
  spin's sense at random), so a batch may hold clips and their reversals
  without changing what is learned; the pair differs only in the order of
  its frames and the sign of its captioned motions.
  """
  flip = lambda a: np.ascontiguousarray(np.asarray(a)[..., ::-1])
  spec = dataclasses.replace(batch.spec, x=flip(batch.spec.x), y=flip(batch.spec.y),
                             angle=flip(batch.spec.angle))
  items = tuple(tuple(Item(i.colour, i.shape, REVERSED_MOTION[i.motion]) for i in clip)
                for clip in batch.items)
  return Batch(spec, items, tuple(caption(i) for i in items))


# What a motion looks like in a mirror (x -> width - x); a spin turns the other way, which
# the caption does not say.
MIRRORED_MOTION = {"left": "right", "right": "left", "up": "up", "down": "down",
                   "bounce": "bounce", "spin": "spin"}


def mirrored(batch: Batch, width: int = WIDTH) -> Batch:
  """The clips mirrored left-right, captioned with left and right swapped.

  Centres go to x -> width - x (pixel edges 0 and ``width`` swap, so pixel
  column j lands on column width - 1 - j), angles to -angle, and the background
  texture is drawn mirrored (``bg_flip_x``): rendered at this ``width``, the
  result is the clips' frames flipped along the width axis, exactly but for the
  float32 rounding of width - x (a few 1e-6 of a pixel). Every shape is
  symmetric about its vertical axis when upright, so a mirrored object is the
  same shape turned by -angle.

  Like ``time_reversed``, a mirrored clip is a draw of the stream's
  distribution for its new caption (a move's start and end, and every other
  x, are drawn symmetrically in [0, width]; a spin's sense at random), with
  one exception the caption never sees: a mirrored checker's x and y phases
  differ, where the sampler draws them equal.

  Args:
    batch: clips of width ``width`` (``sample_batch``'s ``width``).
    width: the clips' width in pixels.
  """
  _check_size(1, 16, width)
  x, flip = np.asarray(batch.spec.x), np.asarray(batch.spec.bg_flip_x)
  spec = dataclasses.replace(batch.spec, x=(width - x).astype(x.dtype),
                             angle=-np.asarray(batch.spec.angle), bg_flip_x=(1 - flip).astype(
                                 flip.dtype))
  items = tuple(tuple(Item(i.colour, i.shape, MIRRORED_MOTION[i.motion]) for i in clip)
                for clip in batch.items)
  return Batch(spec, items, tuple(caption(i) for i in items))


def render(spec: ClipSpec, height: int = HEIGHT, width: int = WIDTH, xp=np):
  """Pixels of the clips: float32 [B, F, H, W, 3] in [0, 1].

  Shapes are signed-distance fields with a one-pixel anti-aliased edge, painted
  in slot order over the background. ``xp`` is numpy or jax.numpy (jit- and
  vmap-safe: no data-dependent Python control flow).
  """
  f32 = lambda a: xp.asarray(a, dtype=xp.float32)
  ys = (f32(xp.arange(height)) + 0.5)[:, None]                       # [H, 1]
  xs = (f32(xp.arange(width)) + 0.5)[None, :]                        # [1, W]
  col = lambda a: f32(a)[:, None, None]                              # [B] -> [B, 1, 1]
  # width - xs is exact for pixel centres, so a flipped texture is the texture's pixels flipped.
  tex_x = xp.where(col(spec.bg_flip_x) > 0.5, width - xs + 0 * ys, xs + 0 * ys)   # [B, H, W]
  along = xp.where(col(spec.bg_vertical) > 0.5, tex_x, ys + 0 * xs)
  u = xp.floor(2 * (along + col(spec.bg_offset)) / col(spec.bg_period))
  v = xp.floor(2 * (tex_x + col(spec.bg_offset)) / col(spec.bg_period)) + xp.floor(
      2 * (ys + col(spec.bg_offset)) / col(spec.bg_period))
  kind = xp.asarray(spec.bg_kind)[:, None, None]
  tex = xp.where(kind == 1, xp.mod(u, 2.0), xp.where(kind == 2, xp.mod(v, 2.0), 0.5))
  bg = col(spec.bg_level) + col(spec.bg_amplitude) * (2 * tex - 1)  # [B, H, W]
  frames = spec.x.shape[-1]
  video = xp.broadcast_to(bg[:, None, :, :, None], (bg.shape[0], frames, height, width, 3))

  root3 = math.sqrt(3) / 2
  for k in range(spec.present.shape[1]):
    at = lambda a: f32(a)[:, k, :, None, None]                       # [B, F, 1, 1]
    dx, dy = xs - at(spec.x), ys - at(spec.y)                        # [B, F, H, W]
    cos, sin = xp.cos(at(spec.angle)), xp.sin(at(spec.angle))
    lx, ly = cos * dx + sin * dy, -sin * dx + cos * dy              # object frame
    r = f32(spec.size)[:, k, None, None, None]
    d_circle = xp.sqrt(dx * dx + dy * dy) - r
    d_square = xp.maximum(xp.abs(lx), xp.abs(ly)) - SQUARE_HALF * r
    # Upright equilateral triangle: inward distance to the three edges (inradius R / 2).
    d_triangle = xp.maximum(xp.maximum(ly, -root3 * lx - 0.5 * ly),
                            root3 * lx - 0.5 * ly) - 0.5 * TRIANGLE_CIRCUMRADIUS * r
    shape = xp.asarray(spec.shape)[:, k, None, None, None]
    d = xp.where(shape == 0, d_circle, xp.where(shape == 1, d_square, d_triangle))
    alpha = xp.clip(0.5 - d, 0.0, 1.0) * f32(spec.present)[:, k, None, None, None]
    rgb = f32(spec.rgb)[:, k, None, None, None, :]
    video = video * (1 - alpha[..., None]) + alpha[..., None] * rgb
  return xp.clip(video, 0.0, 1.0)


def clips(seed: int, start: int, n: int, **kwargs):
  """(videos float32 [n, F, H, W, 3], captions) of clips ``start .. start + n - 1``."""
  batch = sample_batch(seed, start, n, **kwargs)
  h, w = kwargs.get("height", HEIGHT), kwargs.get("width", WIDTH)
  return render(batch.spec, h, w), batch.captions
