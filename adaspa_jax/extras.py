"""Optional dependencies: what each extra of the distribution installs, and a clear error.

The base install (``pip install adaspa-jax``) holds what the method and the kernels need:
jax, jaxlib, flax and numpy. Everything else is an extra:

  cli     absl-py, safetensors  the launchers (``adaspa_jax.experiments.*``), prompt files
  video   imageio, pillow, matplotlib, tqdm   GIFs, figures, progress bars
  eval    scipy, scikit-image   the caption check (connected components) and SSIM
  train   optax, safetensors    training and saving the embedded models
  all     every extra above;  test, parity: the test suite and diffusers parity tests
"""

from __future__ import annotations

import importlib
from types import ModuleType

# Top-level module -> the extra that installs it.
EXTRA_OF = {"absl": "cli", "safetensors": "cli", "imageio": "video", "PIL": "video",
            "matplotlib": "video", "tqdm": "video", "scipy": "eval", "skimage": "eval",
            "optax": "train", "torch": "parity"}  # torch: also the FlexAttention peer


def require(module: str, extra: str | None = None) -> ModuleType:
  """``importlib.import_module(module)``, or an ImportError naming the extra to install.

  Args:
    module: a dotted module name, e.g. "scipy.ndimage".
    extra: the extra that provides it; default: ``EXTRA_OF`` of its top-level package.
  """
  try:
    return importlib.import_module(module)
  except ImportError as e:
    top = module.split(".")[0]
    name = extra or EXTRA_OF.get(top, "all")
    raise ImportError(f"{module!r} is not installed: this part of adaspa-jax needs the "
                      f"'{name}' extra (pip install 'adaspa-jax[{name}]').") from e
