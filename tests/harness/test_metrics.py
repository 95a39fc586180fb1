"""PSNR and SSIM against brute-force per-window formulas, closed forms, and the numpy SSIM
that scikit-image's replaced."""

import math
import sys

import numpy as np
import pytest

from adaspa_jax.harness import metrics


def _ssim_brute_force(x, y, L, size=11, sigma=1.5):
  """Wang et al. 2004, one window position at a time with an explicit 2-D Gaussian."""
  r = np.arange(size) - (size - 1) / 2
  w = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma ** 2))
  w /= w.sum()
  c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
  vals = []
  for i in range(x.shape[0] - size + 1):
    for j in range(x.shape[1] - size + 1):
      a, b = x[i:i + size, j:j + size], y[i:i + size, j:j + size]
      ma, mb = (w * a).sum(), (w * b).sum()
      va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
      cov = (w * (a - ma) * (b - mb)).sum()
      vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
  return float(np.mean(vals))


def _ssim_numpy(x, ref, data_range=None):
  """The numpy SSIM that harness/metrics.py had before scikit-image (commit b81547d), for
  slices of at least 11 x 11: separable 'valid' Gaussian filtering, float64."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  L = float(np.ptp(ref)) if data_range is None else float(data_range)
  c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
  r = np.arange(11, dtype=np.float64) - 5
  g = np.exp(-r ** 2 / (2 * 1.5 ** 2))
  g /= g.sum()

  def filt(a):
    a = np.lib.stride_tricks.sliding_window_view(a, 11, axis=-2) @ g
    return np.lib.stride_tricks.sliding_window_view(a, 11, axis=-1) @ g

  mu_x, mu_y = filt(x), filt(ref)
  var_x = filt(x * x) - mu_x ** 2
  var_y = filt(ref * ref) - mu_y ** 2
  cov = filt(x * ref) - mu_x * mu_y
  num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
  return float(np.mean(num / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))))


@pytest.mark.parametrize("shape", [(13, 17), (2, 3, 12, 11)])
def test_ssim_matches_brute_force(shape):
  rng = np.random.default_rng(0)
  ref = rng.standard_normal(shape)
  x = ref + 0.3 * rng.standard_normal(shape)
  L = np.ptp(ref)
  flat_x, flat_r = x.reshape(-1, *shape[-2:]), ref.reshape(-1, *shape[-2:])
  want = np.mean([_ssim_brute_force(a, b, L) for a, b in zip(flat_x, flat_r)])
  assert metrics.ssim(x, ref) == pytest.approx(want, abs=1e-12)
  assert 0 < metrics.ssim(x, ref) < 1


# The callers' stacks: harness/ablations.py one clip [F, 3, H, W] (frames and channels
# moved ahead of H, W) and harness/embedded_eval.py all clips [N, F, 3, H, W] of the
# embedded model (48 x 48 pixels, data_range 1); harness/generation.py latents
# [B, C, F, H, W] (default range: the reference's max - min); plus single images.
@pytest.mark.parametrize("shape,data_range", [
    ((48, 48), 1.0), ((8, 3, 48, 48), 1.0), ((6, 8, 3, 48, 48), 1.0),
    ((1, 16, 3, 30, 52), None), ((2, 4, 2, 11, 11), None), ((13, 17), None), ((64, 40), 2.0)])
@pytest.mark.parametrize("noise", [0.01, 0.1, 0.5])
def test_ssim_matches_the_numpy_implementation(shape, data_range, noise):
  rng = np.random.default_rng(0)
  if data_range == 1.0:    # pixels in [0, 1], as the clips
    ref = rng.uniform(0, 1, shape)
    x = np.clip(ref + noise * rng.standard_normal(shape), 0, 1)
  else:
    ref = rng.standard_normal(shape)
    x = ref + noise * rng.standard_normal(shape)
  # Measured max difference over these cases: 2.2e-16 (scikit-image 0.26.0).
  assert metrics.ssim(x, ref, data_range) == pytest.approx(
      _ssim_numpy(x, ref, data_range), abs=1e-13)


def test_ssim_small_slices_shrink_the_window():
  # Below 11 pixels the window shrinks to the largest odd size that fits, with the sigma
  # whose 3.5-sigma cut (scikit-image's) gives that size.
  rng = np.random.default_rng(1)
  ref = rng.standard_normal((8, 10))
  x = ref + 0.1 * rng.standard_normal((8, 10))
  assert metrics.window_size(8, 10) == 7 and metrics.window_size(4, 1) == 1
  assert metrics.window_sigma(11) == 1.5 and metrics.window_sigma(7) == pytest.approx(3 / 3.5)
  assert metrics.ssim(x, ref) == pytest.approx(
      _ssim_brute_force(x, ref, np.ptp(ref), size=7, sigma=metrics.window_sigma(7)), abs=1e-12)
  # One pixel wide: a 1 x 1 window, SSIM per pixel.
  ref, x = ref[:4, :1], x[:4, :1]
  c1, c2 = (0.01 * np.ptp(ref)) ** 2, (0.03 * np.ptp(ref)) ** 2
  want = np.mean((2 * x * ref + c1) * c2 / ((x ** 2 + ref ** 2 + c1) * c2))
  assert metrics.ssim(x, ref) == pytest.approx(want, abs=1e-12)


def test_closed_forms():
  rng = np.random.default_rng(2)
  ref = rng.uniform(0, 1, (3, 16, 16))
  assert metrics.ssim(ref, ref) == pytest.approx(1.0, abs=1e-12)
  assert metrics.psnr(ref, ref) == math.inf
  # Constant images a, b: the structure term is C2 / C2, SSIM = (2ab + C1) / (a^2 + b^2 + C1).
  a, b, L = 0.2, 0.7, 1.0
  c1 = (0.01 * L) ** 2
  got = metrics.ssim(np.full((12, 12), a), np.full((12, 12), b), data_range=L)
  assert got == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-12)
  # An error of +-d everywhere: MSE = d^2, PSNR = 20 log10(L / d).
  d = 0.05
  signs = rng.choice([-1.0, 1.0], ref.shape)
  assert metrics.psnr(ref + d * signs, ref, data_range=2.0) == pytest.approx(
      20 * math.log10(2.0 / d), abs=1e-9)
  # Default range is the reference's max - min.
  assert metrics.psnr(ref + d * signs, ref) == pytest.approx(
      20 * math.log10(np.ptp(ref) / d), abs=1e-9)


def test_bad_inputs():
  with pytest.raises(ValueError, match="x has shape"):
    metrics.psnr(np.zeros((4, 4)), np.zeros((4, 5)))
  with pytest.raises(ValueError, match="expected \\[..., H, W\\]"):
    metrics.ssim(np.zeros(4), np.zeros(4))
  with pytest.raises(ValueError, match="data_range"):
    metrics.ssim(np.ones((12, 12)), np.zeros((12, 12)))
  with pytest.raises(ValueError, match="data_range=-1"):
    metrics.psnr(np.ones((4, 4)), np.zeros((4, 4)), data_range=-1)


def test_missing_scikit_image_names_the_extra(monkeypatch):
  # A None entry in sys.modules makes the import fail as if the package were absent.
  monkeypatch.setitem(sys.modules, "skimage", None)
  monkeypatch.setitem(sys.modules, "skimage.metrics", None)
  with pytest.raises(ImportError, match=r"'eval' extra \(pip install 'adaspa-jax\[eval\]'\)"):
    metrics.ssim(np.ones((12, 12)), np.zeros((12, 12)), data_range=1.0)
  assert metrics.psnr(np.ones((4, 4)), np.zeros((4, 4)), data_range=1.0) == 0.0


def test_output_agreement_by_hand():
  ref = np.array([[3.0, 4.0], [0.0, 0.0]])
  got = metrics.output_agreement(2 * ref, ref)
  assert got["cosine"] == pytest.approx(1.0) and got["rel_l2"] == pytest.approx(1.0)
  assert got["max_abs"] == 4.0
  got = metrics.output_agreement(np.array([0.0, 1.0]), np.array([1.0, 0.0]))
  assert got == {"cosine": 0.0, "rel_l2": pytest.approx(math.sqrt(2)), "max_abs": 1.0}
  with pytest.raises(ValueError, match="x has 3 entries: expected the reference's 2"):
    metrics.output_agreement(np.ones(3), np.ones(2))
