"""Flax NNX video DiTs that load diffusers checkpoints.

``from_pretrained(path)`` reads a diffusers model directory and builds the model
named by its config's ``_class_name`` through ``REGISTRY``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from adaspa_jax.models.loading import Rule, from_pretrained, load_state_dict

# diffusers `_class_name` -> module implementing it. One line per model; modules
# are imported on first use, so a model's dependencies load only when needed.
_MODULES = {
    "WanTransformer3DModel": "adaspa_jax.models.wan",
    "HunyuanVideoTransformer3DModel": "adaspa_jax.models.hunyuan_video",
    "CogVideoXTransformer3DModel": "adaspa_jax.models.cogvideox",
}


class _Registry(Mapping):
  """Class name -> model module, importing each module on first access."""

  def __getitem__(self, class_name):
    return importlib.import_module(_MODULES[class_name])

  def __iter__(self):
    return iter(_MODULES)

  def __len__(self):
    return len(_MODULES)


REGISTRY: Mapping = _Registry()

__all__ = ["REGISTRY", "Rule", "from_pretrained", "load_state_dict"]
