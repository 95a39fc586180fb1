"""Flax NNX video DiTs that load diffusers checkpoints.

``from_pretrained(path)`` reads a diffusers model directory and builds the model
named by its config's ``_class_name`` through ``REGISTRY``, which follows the
family registry ``families.FAMILIES`` (the harness reads the same one).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from adaspa_jax.models import families
from adaspa_jax.models.families import FAMILIES, Family
from adaspa_jax.models.loading import Rule, from_pretrained, load_state_dict

# diffusers `_class_name` -> module implementing it (from FAMILIES); modules are
# imported on first use, so a model's dependencies load only when needed.
_MODULES = families.by_class_name()


class _Registry(Mapping):
  """Class name -> model module, importing each module on first access."""

  def __getitem__(self, class_name):
    return importlib.import_module(_MODULES[class_name])

  def __iter__(self):
    return iter(_MODULES)

  def __len__(self):
    return len(_MODULES)


REGISTRY: Mapping = _Registry()

__all__ = ["FAMILIES", "Family", "REGISTRY", "Rule", "families", "from_pretrained",
           "load_state_dict"]
