"""Bad checkpoints give errors naming the file; a save cut short never leaves one that loads."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adaspa_jax import models
from adaspa_jax.models import loading, saving, wan
from adaspa_jax.models.embedded import model as tiny_t2v
from tests.models.embedded import tiny_checkpoint


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
  cfg = wan.PRESETS["tiny"]
  model = nnx.eval_shape(lambda: wan.Model(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  for var in loading.model_params(model).values():
    var.set_value(jnp.asarray(0.1 * rng.standard_normal(var.get_value().shape), jnp.float32))
  path = tmp_path_factory.mktemp("wan") / "ckpt"
  saving.save_pretrained(model, path, class_name="WanTransformer3DModel",
                         rules=wan.weight_rules(cfg))
  return path, model


def _copy(src, dst):
  os.makedirs(dst)
  for name in os.listdir(src):
    with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
      g.write(f.read())
  return dst


def _weights(path):
  return os.path.join(path, "diffusion_pytorch_model.safetensors")


def test_truncated_weights_name_the_file_and_the_tensor(wan_dir, tmp_path):
  path = _copy(wan_dir[0], tmp_path / "cut")
  size = os.path.getsize(_weights(path))
  with open(_weights(path), "r+b") as f:
    f.truncate(size - 100)
  with pytest.raises(ValueError, match="truncated safetensors file: '.*' needs bytes up to"):
    models.from_pretrained(path, dtype=jnp.float32)
  with open(_weights(path), "r+b") as f:
    f.truncate(5)
  with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors: truncated"):
    models.from_pretrained(path, dtype=jnp.float32)


def test_corrupted_header_names_the_file(wan_dir, tmp_path):
  path = _copy(wan_dir[0], tmp_path / "bad")
  with open(_weights(path), "r+b") as f:
    f.seek(8)
    f.write(b"\xff\x00garbage")
  with pytest.raises(ValueError, match="safetensors: corrupted safetensors header"):
    models.from_pretrained(path, dtype=jnp.float32)
  with open(_weights(path), "r+b") as f:          # a header length past the end of the file
    f.write((10**9).to_bytes(8, "little"))
  with pytest.raises(ValueError, match="its header claims 1000000000 bytes"):
    models.from_pretrained(path, dtype=jnp.float32)


def test_header_offsets_must_fit_the_shape(tmp_path):
  header = json.dumps({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}})
  raw = header.encode()
  path = tmp_path / "x.safetensors"
  path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(24))
  with pytest.raises(ValueError, match="'w' has offsets \\[0, 20\\) for 24 bytes"):
    loading.SafetensorsFiles([path])


def test_config_that_does_not_match_the_weights(wan_dir, tmp_path):
  path = _copy(wan_dir[0], tmp_path / "mismatch")
  with open(path / "config.json") as f:
    config = json.load(f)
  config["num_layers"] += 1
  with open(path / "config.json", "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match="config.json does not match the weights in "
                                       "\\['diffusion_pytorch_model.safetensors'\\]: "
                                       "load_state_dict: .*missing"):
    models.from_pretrained(path, dtype=jnp.float32)
  (path / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match="config.json: not valid JSON"):
    models.from_pretrained(path, dtype=jnp.float32)


def test_corrupted_index_names_the_file(wan_dir, tmp_path):
  path = _copy(wan_dir[0], tmp_path / "index")
  (path / "diffusion_pytorch_model.safetensors.index.json").write_text('{"weights": {}}')
  with pytest.raises(ValueError, match="index.json: corrupted safetensors index"):
    models.from_pretrained(path, dtype=jnp.float32)


def test_interrupted_save_pretrained_leaves_nothing_that_loads(wan_dir, tmp_path, monkeypatch):
  path = _copy(wan_dir[0], tmp_path / "again")
  models.from_pretrained(path, dtype=jnp.float32)              # loads before
  import safetensors.numpy

  def fail(*args, **kwargs):
    raise KeyboardInterrupt("power cut")
  monkeypatch.setattr(safetensors.numpy, "save_file", fail)
  with pytest.raises(KeyboardInterrupt):
    saving.save_pretrained(wan_dir[1], path, class_name="WanTransformer3DModel",
                           rules=wan.weight_rules(wan.PRESETS["tiny"]))
  assert not [n for n in os.listdir(path) if ".tmp-" in n]     # no temporary file left
  with pytest.raises(ValueError, match="expected a diffusers model directory with config.json"):
    models.from_pretrained(path, dtype=jnp.float32)


def test_interrupted_embedded_save_leaves_nothing_that_loads(tmp_path, monkeypatch):
  path, model = tiny_checkpoint.random_checkpoint(tmp_path / "ckpt")
  tiny_t2v.load(path)
  calls = []
  real = saving.write_atomic

  def cut_after_two(target, write):
    calls.append(target)
    if len(calls) > 2:
      raise KeyboardInterrupt("power cut")
    real(target, write)
  monkeypatch.setattr(saving, "write_atomic", cut_after_two)
  with pytest.raises(KeyboardInterrupt):
    tiny_t2v.save(model, path, dtype="float32")
  with pytest.raises(ValueError, match="expected a tiny_t2v checkpoint"):
    tiny_t2v.load(path)
  monkeypatch.setattr(saving, "write_atomic", real)
  tiny_t2v.save(model, path, dtype="float32")                 # a full save loads again
  tiny_t2v.load(path)
