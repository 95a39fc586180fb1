"""The shipped checkpoints, installed as package data of ``adaspa_jax.checkpoints``.

  tiny_t2v   the embedded text-to-video model the CPU demo samples (docs/tiny_t2v.md)
  long_t2v   the same architecture at 16 x 96 x 96 pixels, 16,384 video tokens
             (docs/long_t2v.md)

``locate(name)`` finds one in an installed distribution (site-packages) and in a
source checkout (this folder) alike.
"""

from __future__ import annotations

import os

NAMES = ("tiny_t2v", "long_t2v")


def locate(name: str = "tiny_t2v") -> str:
  """The directory of shipped checkpoint ``name`` (one of ``NAMES``)."""
  if name not in NAMES:
    raise ValueError(f"name={name!r}: expected one of {NAMES}.")
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
  if not os.path.isfile(os.path.join(path, "tiny_t2v.json")):
    raise ValueError(f"checkpoint {name!r} is not installed at {path} (expected its "
                     "tiny_t2v.json there): reinstall adaspa-jax or pass a checkpoint path.")
  return path
