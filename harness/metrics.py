"""Fidelity of a sparse-attention result to the dense one: PSNR and SSIM (float64), and
``output_agreement`` (cosine, relative L2, max error) of kernel outputs.

Both take arrays whose last two axes are height and width (video frames or latents,
[..., H, W]); SSIM is computed per 2-D slice and averaged over all slices. The
dynamic range L defaults to the reference's max - min over the whole array,
which suits latents (not bounded like pixels); pass ``data_range`` for images.

SSIM is scikit-image's ``structural_similarity`` (the ``eval`` extra installs it) with
the settings of Wang et al. 2004.
"""

from __future__ import annotations

import numpy as np

from adaspa_jax.extras import require

K1, K2, SIGMA, WINDOW = 0.01, 0.03, 1.5, 11
# scikit-image cuts its Gaussian at TRUNCATE sigmas (fixed): 11 taps at sigma 1.5.
TRUNCATE = 3.5


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


def window_size(height: int, width: int) -> int:
  """11 (Wang et al.), shrunk to the largest odd size that fits small inputs."""
  size = min(WINDOW, height, width)
  return size if size % 2 else size - 1 if size > 1 else 1


def window_sigma(size: int) -> float:
  """The Gaussian's sigma for a window of ``size`` taps: 1.5 for 11, and for a smaller
  window the sigma whose 3.5-sigma cut (scikit-image's) gives ``size`` taps."""
  return SIGMA if size == WINDOW else (size - 1) / 2 / TRUNCATE


def ssim(x, ref, data_range=None) -> float:
  """Mean SSIM (Wang, Bovik, Sheikh, Simoncelli 2004) over every 2-D [H, W] slice.

  ``skimage.metrics.structural_similarity`` per slice: Gaussian window 11 x 11 with
  sigma 1.5 over the 'valid' positions, C1 = (0.01 L)^2, C2 = (0.03 L)^2, population
  (biased) local variances. Slices smaller than 11 use the largest odd window that fits,
  with the sigma that scikit-image's 3.5-sigma cut gives that window (``window_sigma``).
  """
  x, ref = _pair(x, ref)
  data_range = _range(ref, data_range)
  structural_similarity = require("skimage.metrics", "eval").structural_similarity
  sigma = window_sigma(window_size(*x.shape[-2:]))
  slices = zip(x.reshape(-1, *x.shape[-2:]), ref.reshape(-1, *ref.shape[-2:]))
  # Every slice has the same number of window positions: the mean of the slices' means
  # is the mean over all positions.
  return float(np.mean([
      structural_similarity(a, b, data_range=data_range, gaussian_weights=True, sigma=sigma,
                            use_sample_covariance=False, K1=K1, K2=K2)
      for a, b in slices]))


def output_agreement(x, ref) -> dict:
  """Cosine similarity, relative L2 error and max absolute error of ``x`` against ``ref``
  over all entries (float64; any equal shapes, e.g. attention outputs [B, S, H, D])."""
  a = np.asarray(x, np.float64).ravel()
  w = np.asarray(ref, np.float64).ravel()
  if a.shape != w.shape:
    raise ValueError(f"x has {a.size} entries: expected the reference's {w.size}.")
  return {"cosine": float(a @ w / (np.linalg.norm(a) * np.linalg.norm(w) + 1e-30)),
          "rel_l2": float(np.linalg.norm(a - w) / (np.linalg.norm(w) + 1e-30)),
          "max_abs": float(np.abs(a - w).max())}
