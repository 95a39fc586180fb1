"""Parameter counts of our NNX models and of diffusers' models on the meta device
(no weights allocated), shared by the per-architecture preset tests."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from adaspa_jax.models import saving


def diffusers_meta_model(cls, config):
  """diffusers model class ``cls`` built from our config on torch's meta device."""
  import torch  # the "parity" extra; callers importorskip it first

  with torch.device("meta"):
    return cls(**saving.diffusers_config(config))


def torch_count(module) -> int:
  return sum(p.numel() for p in module.parameters())


def nnx_count(model) -> int:
  """Parameters of an (abstract, ``nnx.eval_shape``) NNX model."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
