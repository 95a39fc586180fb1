"""Fidelity of a sparse-attention result to the dense one: PSNR and SSIM (numpy, float64).

Both take arrays whose last two axes are height and width (video frames or latents,
[..., H, W]); SSIM is computed per 2-D slice and averaged over all slices. The
dynamic range L defaults to the reference's max - min over the whole array,
which suits latents (not bounded like pixels); pass ``data_range`` for images.
"""

from __future__ import annotations

import numpy as np

K1, K2, SIGMA, WINDOW = 0.01, 0.03, 1.5, 11


def _pair(x, ref):
  x = np.asarray(x, np.float64)
  ref = np.asarray(ref, np.float64)
  if x.shape != ref.shape:
    raise ValueError(f"x has shape {x.shape}: expected the reference's shape {ref.shape}.")
  if x.ndim < 2 or min(x.shape[-2:]) < 1:
    raise ValueError(f"x has shape {x.shape}: expected [..., H, W] with H, W >= 1.")
  return x, ref


def _range(ref, data_range):
  value = float(np.ptp(ref)) if data_range is None else float(data_range)
  if not value > 0:
    raise ValueError(f"data_range={data_range!r} (reference max - min = {np.ptp(ref)}): "
                     "expected a positive dynamic range; pass data_range for a constant "
                     "reference.")
  return value


def psnr(x, ref, data_range=None) -> float:
  """10 log10(L^2 / MSE) in dB; inf when x equals ref."""
  x, ref = _pair(x, ref)
  mse = np.mean((x - ref) ** 2)
  if mse == 0:
    return float("inf")
  return float(10 * np.log10(_range(ref, data_range) ** 2 / mse))


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA) -> np.ndarray:
  """Normalised 1-D Gaussian [size]; the 2-D window is its outer product."""
  r = np.arange(size, dtype=np.float64) - (size - 1) / 2
  g = np.exp(-r ** 2 / (2 * sigma ** 2))
  return g / g.sum()


def _filter_valid(a, g):
  """Separable 'valid' correlation of a [..., H, W] with g along both last axes."""
  n = len(g)
  a = np.lib.stride_tricks.sliding_window_view(a, n, axis=-2) @ g      # [..., H', W]
  return np.lib.stride_tricks.sliding_window_view(a, n, axis=-1) @ g   # [..., H', W']


def window_size(height: int, width: int) -> int:
  """11 (Wang et al.), shrunk to the largest odd size that fits small inputs."""
  size = min(WINDOW, height, width)
  return size if size % 2 else size - 1 if size > 1 else 1


def ssim(x, ref, data_range=None) -> float:
  """Mean SSIM (Wang, Bovik, Sheikh, Simoncelli 2004) over every 2-D [H, W] slice.

  Gaussian window 11 x 11 with sigma 1.5 over the 'valid' positions,
  C1 = (0.01 L)^2, C2 = (0.03 L)^2, population (biased) local variances.
  Slices smaller than 11 use the largest odd window that fits (same sigma).
  """
  x, ref = _pair(x, ref)
  c1 = (K1 * _range(ref, data_range)) ** 2
  c2 = (K2 * _range(ref, data_range)) ** 2
  g = gaussian_window(window_size(*x.shape[-2:]))
  mu_x, mu_y = _filter_valid(x, g), _filter_valid(ref, g)
  var_x = _filter_valid(x * x, g) - mu_x ** 2
  var_y = _filter_valid(ref * ref, g) - mu_y ** 2
  cov = _filter_valid(x * ref, g) - mu_x * mu_y
  num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
  return float(np.mean(num / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))))
