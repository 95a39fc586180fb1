"""Tests of the rule-table loader and the safetensors reader.

The toy model below doubles as a registry entry for the ``from_pretrained``
round trip (``Config``, ``Model``, ``weight_rules`` as a model module has them).
Expected values come from torch (conv, linear) and numpy on the diffusers-layout
arrays, never from the loader's own transforms.
"""

import dataclasses
import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from flax import nnx

from adaspa_jax import models
from adaspa_jax.models import loading

LAYERS, WIDTH, CH = 3, 6, 4


@dataclasses.dataclass(frozen=True)
class Config:
  width: int = WIDTH
  num_layers: int = LAYERS
  attention: str = "dense"
  adaspa: object = None

  @classmethod
  def from_diffusers(cls, d):
    return cls(**{k: v for k, v in d.items() if not k.startswith("_")})


class Model(nnx.Module):
  """Linear in, a Conv3d patchifier, a norm, and per-layer stacked projections."""

  def __init__(self, config, *, rngs, dtype=jnp.float32):
    w, n = config.width, config.num_layers
    self.proj_in = nnx.Linear(CH, w, rngs=rngs, param_dtype=dtype)
    self.patch = nnx.Conv(CH, w, (1, 2, 2), strides=(1, 2, 2), padding="VALID", rngs=rngs,
                          param_dtype=dtype)
    self.norm = nnx.LayerNorm(w, rngs=rngs, param_dtype=dtype)
    init = nnx.initializers.normal()
    self.to_q = nnx.Param(init(rngs.params(), (n, w, w), dtype))
    self.to_k = nnx.Param(init(rngs.params(), (n, w, w), dtype))
    self.ff = nnx.Param(init(rngs.params(), (n, w), dtype))


def weight_rules(config):
  del config
  return [
      loading.Rule(r"proj_in\.weight", "proj_in/kernel", "linear"),
      loading.Rule(r"proj_in\.bias", "proj_in/bias"),
      loading.Rule(r"patch_embedding\.weight", "patch/kernel", "conv3d"),
      loading.Rule(r"patch_embedding\.bias", "patch/bias"),
      loading.Rule(r"norm\.weight", "norm/scale"),
      loading.Rule(r"norm\.bias", "norm/bias"),
      loading.Rule(r"blocks\.(?P<layer>\d+)\.attn\.(?P<name>to_q|to_k)\.weight",
                   "{name}", "linear"),
      loading.Rule(r"blocks\.(?P<layer>\d+)\.ff\.bias", "ff"),
  ]


def diffusers_tensors(seed=0, width=WIDTH, layers=LAYERS):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.standard_normal(s).astype(np.float32)
  t = {"proj_in.weight": f(width, CH), "proj_in.bias": f(width),
       "patch_embedding.weight": f(width, CH, 1, 2, 2), "patch_embedding.bias": f(width),
       "norm.weight": f(width), "norm.bias": f(width)}
  for i in range(layers):
    t[f"blocks.{i}.attn.to_q.weight"] = f(width, width)
    t[f"blocks.{i}.attn.to_k.weight"] = f(width, width)
    t[f"blocks.{i}.ff.bias"] = f(width)
  return t


def new_model(dtype=jnp.float32, abstract=False):
  make = lambda: Model(Config(), rngs=nnx.Rngs(1), dtype=dtype)
  return nnx.eval_shape(make) if abstract else make()


def check_model_matches(model, t, atol):
  """Runs the loaded layers and compares with torch / numpy on diffusers' layout."""
  rng = np.random.default_rng(5)
  x = rng.standard_normal((2, CH)).astype(np.float32)
  got = np.asarray(model.proj_in(jnp.asarray(x, model.proj_in.kernel.dtype)), np.float32)
  want = torch.nn.functional.linear(torch.tensor(x), torch.tensor(t["proj_in.weight"]),
                                    torch.tensor(t["proj_in.bias"])).numpy()
  np.testing.assert_allclose(got, want, atol=atol, rtol=atol)

  video = rng.standard_normal((1, CH, 3, 4, 6)).astype(np.float32)  # [B, C, F, H, W]
  want = torch.nn.functional.conv3d(torch.tensor(video), torch.tensor(t["patch_embedding.weight"]),
                                    torch.tensor(t["patch_embedding.bias"]), stride=(1, 2, 2))
  got = model.patch(jnp.asarray(np.moveaxis(video, 1, -1), model.patch.kernel.dtype))
  np.testing.assert_allclose(np.asarray(got, np.float32), np.moveaxis(want.numpy(), 1, -1),
                             atol=atol * 4, rtol=atol)

  np.testing.assert_allclose(np.asarray(model.norm.scale[...], np.float32), t["norm.weight"],
                             atol=atol, rtol=atol)
  h = rng.standard_normal((2, WIDTH)).astype(np.float32)
  for i in range(LAYERS):
    for name in ("to_q", "to_k"):
      got = h @ np.asarray(getattr(model, name)[...][i], np.float32)
      np.testing.assert_allclose(got, h @ t[f"blocks.{i}.attn.{name}.weight"].T,
                                 atol=atol * 4, rtol=atol)
    np.testing.assert_allclose(np.asarray(model.ff[...][i], np.float32), t[f"blocks.{i}.ff.bias"],
                               atol=atol, rtol=atol)


@pytest.mark.parametrize("abstract", [False, True])
def test_load_numpy_state_dict_f32(abstract):
  t = diffusers_tensors()
  model = new_model(abstract=abstract)
  loading.load_state_dict(model, t, weight_rules(None))
  assert model.to_q[...].dtype == jnp.float32
  check_model_matches(model, t, atol=1e-5)


def test_dtype_argument_and_model_dtype():
  t = diffusers_tensors()
  model = new_model()
  loading.load_state_dict(model, t, weight_rules(None), dtype=jnp.bfloat16)
  assert all(p[...].dtype == jnp.bfloat16 for p in loading.model_params(model).values())
  check_model_matches(model, t, atol=2e-2)
  model = new_model(dtype=jnp.bfloat16, abstract=True)
  loading.load_state_dict(model, t, weight_rules(None))
  assert all(p[...].dtype == jnp.bfloat16 for p in loading.model_params(model).values())


def expect_error(t, *fragments, model=None):
  model = model or new_model()
  before = {k: np.asarray(v[...]) for k, v in loading.model_params(model).items()}
  with pytest.raises(ValueError) as info:
    loading.load_state_dict(model, t, weight_rules(None))
  for frag in fragments:
    assert frag in str(info.value), str(info.value)
  for k, v in loading.model_params(model).items():  # nothing written on failure
    np.testing.assert_array_equal(np.asarray(v[...]), before[k])


def test_missing_keys_are_listed():
  t = diffusers_tensors()
  del t["norm.bias"], t["blocks.1.attn.to_k.weight"]
  expect_error(t, "2 missing NNX parameters", "norm/bias", "to_k[layer 1]")


def test_unexpected_keys_are_listed():
  t = diffusers_tensors()
  t["blocks.0.attn.to_v.weight"] = t["blocks.0.attn.to_k.weight"]
  t["extra.weight"] = np.zeros(3, np.float32)
  expect_error(t, "2 unexpected diffusers keys", "blocks.0.attn.to_v.weight", "extra.weight")


def test_shape_mismatch_names_key():
  t = diffusers_tensors()
  t["blocks.2.attn.to_q.weight"] = np.zeros((WIDTH, WIDTH + 1), np.float32)
  t["patch_embedding.weight"] = np.zeros((WIDTH, CH, 2, 2, 2), np.float32)
  expect_error(t, "'blocks.2.attn.to_q.weight' has shape (6, 7)", "'patch_embedding.weight'",
               "per layer")


def test_layer_out_of_range_and_rank_error():
  t = diffusers_tensors()
  t[f"blocks.{LAYERS}.ff.bias"] = np.zeros(WIDTH, np.float32)
  expect_error(t, f"layer {LAYERS} out of range")
  t = diffusers_tensors()
  t["proj_in.weight"] = np.zeros(WIDTH, np.float32)
  with pytest.raises(ValueError, match="transform 'linear' expects rank 2"):
    loading.load_state_dict(new_model(), t, weight_rules(None))


def test_rule_validation():
  with pytest.raises(ValueError, match="transform='transpose'"):
    loading.Rule("a", "b", "transpose")
  with pytest.raises(ValueError, match="not a valid regex"):
    loading.Rule("a(", "b")
  with pytest.raises(ValueError, match="placeholder"):
    loading.load_state_dict(new_model(), {"x.weight": np.zeros(1)},
                            [loading.Rule(r"x\.weight", "{name}/kernel")])


def save_torch_bf16(t, path):
  safetensors.torch.save_file({k: torch.tensor(v).to(torch.bfloat16) for k, v in t.items()}, path)


def test_safetensors_reader_dtypes(tmp_path):
  rng = np.random.default_rng(3)
  t = {"a": rng.standard_normal((3, 5)).astype(np.float32),
       "b": rng.integers(-9, 9, (7,)).astype(np.int64),
       "c": rng.standard_normal((2, 2, 2)).astype(np.float16)}
  safetensors.numpy.save_file(t, str(tmp_path / "x.safetensors"))
  save_torch_bf16({"d": t["a"]}, str(tmp_path / "y.safetensors"))
  files = loading.SafetensorsFiles([tmp_path / "x.safetensors", tmp_path / "y.safetensors"])
  assert sorted(files) == ["a", "b", "c", "d"] and len(files) == 4
  for k in "abc":
    assert files[k].dtype == t[k].dtype and files.shape(k) == t[k].shape
    np.testing.assert_array_equal(files[k], t[k])
  d = torch.tensor(t["a"]).to(torch.bfloat16).float().numpy()
  assert files["d"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(files["d"].astype(np.float32), d)
  with pytest.raises(ValueError, match="appears in both"):
    loading.SafetensorsFiles([tmp_path / "x.safetensors", tmp_path / "x.safetensors"])


def write_model_dir(directory, t, *, shards, bf16=False, class_name="ToyModel"):
  directory.mkdir()
  (directory / "config.json").write_text(json.dumps(
      {"_class_name": class_name, "_diffusers_version": "0.42.1", "width": WIDTH,
       "num_layers": LAYERS}))
  keys = sorted(t)
  if shards == 1:
    name = "diffusion_pytorch_model.safetensors"
    (save_torch_bf16 if bf16 else safetensors.numpy.save_file)(t, str(directory / name))
    return
  weight_map = {}
  for s in range(shards):
    name = f"diffusion_pytorch_model-{s + 1:05d}-of-{shards:05d}.safetensors"
    part = {k: t[k] for k in keys[s::shards]}
    (save_torch_bf16 if bf16 else safetensors.numpy.save_file)(part, str(directory / name))
    weight_map.update({k: name for k in part})
  (directory / "diffusion_pytorch_model.safetensors.index.json").write_text(
      json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture
def toy_registry(monkeypatch):
  monkeypatch.setitem(models._MODULES, "ToyModel", __name__)


@pytest.mark.parametrize("shards", [1, 3])
def test_from_pretrained_f32(tmp_path, toy_registry, shards):
  t = diffusers_tensors(seed=shards)
  write_model_dir(tmp_path / "m", t, shards=shards)
  model = models.from_pretrained(tmp_path / "m", dtype=jnp.float32)
  assert isinstance(model, Model)
  check_model_matches(model, t, atol=1e-5)


def test_from_pretrained_bf16_checkpoint_pipeline_dir(tmp_path, toy_registry):
  t = diffusers_tensors(seed=7)
  (tmp_path / "pipe").mkdir()
  write_model_dir(tmp_path / "pipe" / "transformer", t, shards=2, bf16=True)
  model = models.from_pretrained(tmp_path / "pipe", dtype=jnp.bfloat16, attention="adaspa",
                                 adaspa="cfg")
  assert model.to_q[...].dtype == jnp.bfloat16
  rounded = {k: torch.tensor(v).to(torch.bfloat16).float().numpy() for k, v in t.items()}
  np.testing.assert_array_equal(np.asarray(model.to_q[...][2], np.float32),
                                rounded["blocks.2.attn.to_q.weight"].T)
  check_model_matches(model, t, atol=2e-2)
  # f32 model from a bf16 checkpoint: exactly the bf16 values.
  model = models.from_pretrained(tmp_path / "pipe", dtype=jnp.float32)
  np.testing.assert_array_equal(np.asarray(model.patch.kernel[...]),
                                np.transpose(rounded["patch_embedding.weight"], (2, 3, 4, 1, 0)))


def test_from_pretrained_errors(tmp_path, toy_registry):
  t = diffusers_tensors()
  write_model_dir(tmp_path / "other", t, shards=1, class_name="UNet2DConditionModel")
  with pytest.raises(ValueError, match="_class_name='UNet2DConditionModel'"):
    models.from_pretrained(tmp_path / "other")
  with pytest.raises(ValueError, match="expected a diffusers model directory"):
    models.from_pretrained(tmp_path)
  del t["blocks.0.ff.bias"]
  write_model_dir(tmp_path / "broken", t, shards=1)
  with pytest.raises(ValueError, match=r"ff\[layer 0\]"):
    models.from_pretrained(tmp_path / "broken", dtype=jnp.float32)
  with pytest.raises(ValueError, match="dtype=.*int8.*expected float32"):
    models.from_pretrained(tmp_path / "broken", dtype=jnp.int8)
  with pytest.raises(ValueError, match="attention='sparse'"):
    models.from_pretrained(tmp_path / "broken", attention="sparse")
