"""Exporting NNX models to diffusers keys: round trips, diffusers' own loader, errors."""

import dataclasses
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from adaspa_jax import models
from adaspa_jax.models import cogvideox, hunyuan_video, loading, saving, wan

FAMILIES = {"cogvideox": cogvideox, "hunyuan_video": hunyuan_video, "wan": wan}


def _random_model(mod, cfg, seed):
  """Random weights filled from numpy into an abstract model (no per-op compiles)."""
  model = nnx.eval_shape(lambda: mod.Model(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  for var in loading.model_params(model).values():
    shape, dtype = var.get_value().shape, var.get_value().dtype
    var.set_value(jnp.asarray(0.1 * rng.standard_normal(shape), dtype))
  return model


def _params(model):
  return {k: np.asarray(v.get_value()) for k, v in loading.model_params(model).items()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_then_load_gives_the_same_weights(family):
  mod = FAMILIES[family]
  cfg = mod.PRESETS["tiny"]
  source = _random_model(mod, cfg, 1)
  tensors = saving.export_state_dict(source, mod.weight_rules(cfg))
  target = nnx.eval_shape(lambda: mod.Model(cfg, rngs=nnx.Rngs(2)))
  loading.load_state_dict(target, tensors, mod.weight_rules(cfg))
  want, got = _params(source), _params(target)
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # Every diffusers key names a single layer: no stacked [L, ...] tensors leak out.
  assert all(".0." in k or ".1." in k for k in tensors if "blocks" in k)
  half = saving.export_state_dict(source, mod.weight_rules(cfg), dtype=ml_dtypes.bfloat16)
  assert half.keys() == tensors.keys()
  assert all(v.dtype == ml_dtypes.bfloat16 for v in half.values())


def test_a_parameter_without_a_rule_is_named():
  cfg = cogvideox.PRESETS["tiny"]
  model = _random_model(cogvideox, cfg, 0)
  rules = [r for r in cogvideox.weight_rules(cfg) if "proj_out" not in r.target]
  with pytest.raises(ValueError, match="NNX parameter 'proj_out/(bias|kernel)'"):
    saving.export_state_dict(model, rules)


def test_save_pretrained_reads_back(tmp_path):
  cfg = wan.PRESETS["tiny"]
  model = _random_model(wan, cfg, 0)
  path = saving.save_pretrained(model, tmp_path / "wan", class_name="WanTransformer3DModel",
                                rules=wan.weight_rules(cfg))
  assert sorted(os.listdir(path)) == ["config.json", "diffusion_pytorch_model.safetensors"]
  loaded = models.from_pretrained(path, dtype=jnp.float32)
  assert dataclasses.replace(loaded.config, adaspa=cfg.adaspa) == cfg
  want, got = _params(model), _params(loaded)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_diffusers_loads_an_export_strictly_and_agrees(tmp_path):
  """diffusers' CogVideoXTransformer3DModel reads our files with no missing or unexpected
  key and computes what our model computes."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  cfg = cogvideox.PRESETS["tiny"]
  model = _random_model(cogvideox, cfg, 0)
  rng = np.random.default_rng(0)
  path = saving.save_pretrained(model, tmp_path / "cv", class_name="CogVideoXTransformer3DModel",
                                rules=cogvideox.weight_rules(cfg))
  theirs, info = diffusers.CogVideoXTransformer3DModel.from_pretrained(
      path, output_loading_info=True)
  assert info["missing_keys"] == [] and info["unexpected_keys"] == []
  assert info["mismatched_keys"] == []
  frames, height, width = 2, 6, 8
  x = rng.standard_normal((1, frames, cfg.in_channels, height, width)).astype(np.float32)
  text = rng.standard_normal((1, cfg.max_text_seq_length, cfg.text_embed_dim)).astype(np.float32)
  rope = cogvideox.rotary_positional_embeddings(cfg, frames, height, width)
  ours = model(jnp.asarray(x), jnp.asarray(text), jnp.asarray([300.0]), image_rotary_emb=rope)
  with torch.no_grad():
    out = theirs(hidden_states=torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(text),
                 timestep=torch.tensor([300.0]),
                 image_rotary_emb=tuple(torch.from_numpy(np.array(r)) for r in rope),
                 return_dict=False)[0]
  np.testing.assert_allclose(np.asarray(ours), out.numpy(), atol=2e-4, rtol=1e-3)
