"""Does a clip show what its caption says? An analytic detector, no learned weights.

For a video [F, H, W, 3] in [0, 1] and a caption of ``shapes_data``'s grammar:

1. Colour segmentation: a pixel is an object pixel when its saturation
   (max - min channel) is at least ``SATURATION``; it takes the palette colour of
   nearest hue, (rgb - min) / (max - min), within ``COLOUR_RADIUS``. Backgrounds
   are grey, and an edge pixel (a colour mixed with grey) keeps its colour's hue
   where its RGB value could be nearer another colour (yellow on grey -> green).
2. Per colour and frame, the largest 4-connected component of at least
   ``MIN_AREA`` of the frame is the object; a colour counts as present when it
   is found in at least half the frames.
3. Shape from the rotation-invariant ratio area / R^2, R the largest distance
   from the centroid to the outline: pi for a disc, 2 for a square, 3 sqrt(3) / 4
   ~ 1.30 for an equilateral triangle (median over the frames where the object
   is at least 70% of its largest area).
4. Motion from the centroid track: a rise and a fall both of at least
   ``BOUNCE_TRAVEL`` is a bounce; otherwise a net displacement of at least
   ``MOVE_TRAVEL`` along the dominant axis is left / right / up / down; otherwise
   a shape that changes between frames (mean IoU of consecutive masks aligned at
   their centroids below ``SPIN_IOU``) spins, and one that does not is "still".

Thresholds are shares of min(H, W), so they hold at any clip size; they are
set between the feature ranges measured on generated clips (see the tests).
A clip passes when every captioned object is found with its shape and motion
and no other object is.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage

from experiments import shapes_data

SATURATION = 0.3
COLOUR_RADIUS = 0.35   # palette hues are at least 0.73 apart
MIN_AREA = 0.004
MOVE_TRAVEL = 0.12
BOUNCE_TRAVEL = 0.10
SPIN_IOU = 0.9
# area / R^2 boundaries, the geometric means of the neighbouring ranges measured on
# 793 generated objects at 48 x 48 (stream 7, clips 0-399; pixelation lowers the
# ideal values): discs 2.52-2.79, squares 1.87-2.16, triangles 1.24-1.62. Spinning
# objects measured a mean consecutive IoU of 0.66-0.85 there, still ones 1.
CIRCLE_MIN_RATIO = 2.33
SQUARE_MIN_RATIO = 1.74


@dataclasses.dataclass(frozen=True)
class Detection:
  """One object found in a clip.

  Attributes:
    colour: palette name.
    shape: one of ``shapes_data.SHAPES``.
    motion: one of ``shapes_data.MOTIONS`` or "still".
    frames: int [n] frames the object was found in.
    centroid: float [n, 2] (x, y) per found frame, pixels.
    area: int [n] pixels per found frame.
    shape_ratio: median area / R^2.
    spin_iou: mean IoU of consecutive centroid-aligned masks (1 when found once).
  """
  colour: str
  shape: str
  motion: str
  frames: np.ndarray
  centroid: np.ndarray
  area: np.ndarray
  shape_ratio: float
  spin_iou: float


@dataclasses.dataclass(frozen=True)
class CheckResult:
  """``check``'s verdict.

  Attributes:
    passed: every captioned object matched in colour, shape and motion, and
      nothing else detected.
    score: matched attributes (colour, shape, motion per captioned object) over
      three per captioned object, in [0, 1].
    expected: the caption's items.
    detected: what the detector found, by colour.
    missing: captioned colours not found.
    extra: colours found but not captioned.
    wrong: (colour, attribute, expected, detected) of each mismatch.
  """
  passed: bool
  score: float
  expected: tuple
  detected: dict
  missing: tuple
  extra: tuple
  wrong: tuple


def _check_video(video):
  video = np.asarray(video)
  if video.ndim != 4 or video.shape[-1] != 3 or min(video.shape[1:3]) < 16:
    raise ValueError(f"video has shape {video.shape}: expected [frames, height, width, 3] with "
                     "height and width >= 16.")
  if not np.issubdtype(video.dtype, np.floating):
    raise ValueError(f"video has dtype {video.dtype}: expected floats in [0, 1].")
  return video.astype(np.float32)


def _hue(rgb):
  """(rgb - min) / (max - min): unchanged by mixing with grey, as edge pixels are."""
  low, high = rgb.min(-1, keepdims=True), rgb.max(-1, keepdims=True)
  return (rgb - low) / np.maximum(high - low, 1e-6)


def segment(video) -> np.ndarray:
  """int [F, H, W]: palette index of each object pixel, -1 for background."""
  video = _check_video(video)
  saturation = video.max(-1) - video.min(-1)
  dist = np.linalg.norm(_hue(video)[..., None, :] - _hue(shapes_data.PALETTE), axis=-1)
  nearest = dist.argmin(-1)
  ok = (saturation >= SATURATION) & (dist.min(-1) <= COLOUR_RADIUS)
  return np.where(ok, nearest, -1)


_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


def _largest_component(mask):
  labels, n = ndimage.label(mask, structure=_FOUR_CONNECTED)
  if n == 0:
    return mask
  sizes = np.bincount(labels.ravel())[1:]
  return labels == 1 + int(sizes.argmax())


def _shape_ratio(mask):
  ys, xs = np.nonzero(mask)
  cy, cx = ys.mean(), xs.mean()
  # Pixel centres sit up to half a pixel inside the outline.
  reach = math.sqrt(float(((ys - cy) ** 2 + (xs - cx) ** 2).max())) + 0.5
  return len(ys) / reach ** 2


def _aligned_iou(a, ca, b, cb):
  """IoU of mask a and mask b moved so its centroid cb lands on ca (nearest pixel)."""
  moved = ndimage.shift(b.astype(np.float32), (ca[1] - cb[1], ca[0] - cb[0]), order=0) > 0.5
  union = (a | moved).sum()
  return float((a & moved).sum() / union) if union else 1.0


def _classify_shape(ratio):
  if ratio >= CIRCLE_MIN_RATIO:
    return "circle"
  return "square" if ratio >= SQUARE_MIN_RATIO else "triangle"


def _classify_motion(centroid, spin_iou, scale):
  x, y = centroid[:, 0], centroid[:, 1]
  # Largest fall (y grows) and largest rise over ordered pairs of found frames.
  later_minus_earlier = y[None, :] - y[:, None]
  upper = np.triu(np.ones_like(later_minus_earlier, bool), 1)
  fall = float(np.max(np.where(upper, later_minus_earlier, 0.0), initial=0.0))
  rise = float(np.max(np.where(upper, -later_minus_earlier, 0.0), initial=0.0))
  if min(fall, rise) >= BOUNCE_TRAVEL * scale:
    return "bounce"
  dx, dy = x[-1] - x[0], y[-1] - y[0]
  if max(abs(dx), abs(dy)) >= MOVE_TRAVEL * scale:
    if abs(dx) >= abs(dy):
      return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"
  return "spin" if spin_iou < SPIN_IOU else "still"


def detect(video) -> dict[str, Detection]:
  """Objects in a clip, by colour name (see the module docstring).

  Args:
    video: float [F, H, W, 3] in [0, 1].
  """
  video = _check_video(video)
  frames, height, width = video.shape[:3]
  scale = min(height, width)
  labels = segment(video)
  min_area = MIN_AREA * height * width
  found = {}
  for c, name in enumerate(shapes_data.COLOUR_NAMES):
    masks, idx = [], []
    for f in range(frames):
      m = _largest_component(labels[f] == c)
      if m.sum() >= min_area:
        masks.append(m)
        idx.append(f)
    if 2 * len(idx) < frames:
      continue
    area = np.asarray([m.sum() for m in masks])
    centroid = np.asarray([(np.nonzero(m)[1].mean() + 0.5, np.nonzero(m)[0].mean() + 0.5)
                           for m in masks])
    big = [m for m, a in zip(masks, area) if a >= 0.7 * area.max()]
    ratio = float(np.median([_shape_ratio(m) for m in big]))
    ious = [_aligned_iou(masks[i], centroid[i], masks[i + 1], centroid[i + 1])
            for i in range(len(masks) - 1)]
    spin_iou = float(np.mean(ious)) if ious else 1.0
    found[name] = Detection(name, _classify_shape(ratio),
                            _classify_motion(centroid, spin_iou, scale), np.asarray(idx),
                            centroid, area, ratio, spin_iou)
  return found


def check(video, caption) -> CheckResult:
  """Scores a clip against a caption (a string of the grammar or ``Item``s)."""
  expected = (shapes_data.parse_caption(caption) if isinstance(caption, str)
              else tuple(caption))
  if not expected:
    raise ValueError(f"caption={caption!r}: expected at least one object.")
  detected = detect(video)
  wrong, missing, matched = [], [], 0
  for item in expected:
    det = detected.get(item.colour)
    if det is None:
      missing.append(item.colour)
      continue
    matched += 1
    for attr in ("shape", "motion"):
      if getattr(det, attr) == getattr(item, attr):
        matched += 1
      else:
        wrong.append((item.colour, attr, getattr(item, attr), getattr(det, attr)))
  extra = tuple(sorted(set(detected) - {i.colour for i in expected}))
  passed = not (wrong or missing or extra)
  return CheckResult(passed=passed, score=matched / (3 * len(expected)), expected=expected,
                     detected=detected, missing=tuple(missing), extra=extra, wrong=tuple(wrong))
