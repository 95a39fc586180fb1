"""PSNR and SSIM against brute-force per-window formulas and closed forms."""

import math

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


def test_ssim_small_slices_shrink_the_window():
  rng = np.random.default_rng(1)
  ref = rng.standard_normal((8, 10))
  x = ref + 0.1 * rng.standard_normal((8, 10))
  assert metrics.window_size(8, 10) == 7 and metrics.window_size(4, 1) == 1
  assert metrics.ssim(x, ref) == pytest.approx(_ssim_brute_force(x, ref, np.ptp(ref), size=7),
                                               abs=1e-12)


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
