"""A random ``adaspa_jax.models.embedded.model`` checkpoint for tests (the "test" preset)."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from adaspa_jax.models import loading
from adaspa_jax.models.embedded import model as tiny_t2v


def random_checkpoint(path, *, std=0.1, seed=0):
  """Saves numpy-random weights (norm scales around 1) to ``path``; returns (dir, model).

  Weights come from numpy because an eager initialisation would compile every
  initialiser on CPU.
  """
  model = nnx.eval_shape(lambda: tiny_t2v.build(tiny_t2v.PRESETS["test"]))
  rng = np.random.default_rng(seed)
  for name, var in loading.model_params(model).items():
    scale = 1.0 if name.endswith("scale") else 0.0
    var.set_value(jnp.asarray(scale + rng.normal(0, std, var.get_value().shape), jnp.float32))
  return tiny_t2v.save(model, path, dtype="float32"), model
