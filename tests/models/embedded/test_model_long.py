"""The long embedded model: growing a model to a larger clip, sharded checkpoints."""

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from adaspa_jax.models import loading, saving
from adaspa_jax.models.embedded import model as tiny_t2v


def _small(frames, size, learned=True):
  return tiny_t2v._config(heads=2, head_dim=16, layers=2, time_dim=16, text_width=32,
                          text_len=24, text_layers=1, text_heads=2, frames=frames, size=size,
                          patch=2, learned_positions=learned)


def test_long_preset_is_the_embedded_architecture_at_16k_tokens():
  long, emb = tiny_t2v.PRESETS["long"], tiny_t2v.PRESETS["embedded"]
  assert long.video_tokens == 16 * 32 * 32 == 16384
  assert (long.video_tokens + long.text.max_length) / 64 == 257
  assert long.adaspa_block_size == 64
  same = lambda c: dataclasses.replace(c, sample_frames=0, sample_height=0, sample_width=0)
  assert same(long.transformer) == same(emb.transformer)
  assert long.text == emb.text


def test_grow_keeps_weights_and_resamples_learned_positions():
  small = tiny_t2v.build(_small(2, 8), seed=3)
  big = tiny_t2v.grow(small, _small(4, 16))
  assert big.config.video_tokens == 4 * 8 * 8
  old, new = loading.model_params(small.transformer), loading.model_params(big.transformer)
  assert set(old) == set(new)
  for path in old:
    if path != "patch_embed/pos_embedding":
      np.testing.assert_array_equal(old[path].get_value(), new[path].get_value(), err_msg=path)
  a = np.asarray(old["patch_embed/pos_embedding"].get_value())     # [1, 24 + 2*4*4, D]
  b = np.asarray(new["patch_embed/pos_embedding"].get_value())     # [1, 24 + 4*8*8, D]
  assert b.shape == (1, 24 + 4 * 8 * 8, a.shape[-1])
  np.testing.assert_array_equal(a[:, :24], b[:, :24])               # text rows kept
  src, dst = a[0, 24:].reshape(2, 4, 4, -1), b[0, 24:].reshape(4, 8, 8, -1)
  # Doubling every axis: new cell i sits at old coordinate (i + 0.5) / 2 - 0.5, i.e.
  # weights (0.75, 0.25) between old cells; corners clamp to the old corner cells.
  np.testing.assert_allclose(dst[0, 0, 0], src[0, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(dst[-1, -1, -1], src[-1, -1, -1], rtol=1e-6)
  want = 0.75 * src[0, 1, 2] + 0.25 * src[0, 1, 1]     # t: frame 0 (clamped), row 2 -> old 1
  np.testing.assert_allclose(dst[0, 2, 4], 0.75 * want + 0.25 * (
      0.75 * src[0, 0, 2] + 0.25 * src[0, 0, 1]), rtol=1e-5)
  # The grown model runs at its size.
  rope = tiny_t2v.rotary_embedding(big.config)
  x = jnp.zeros((1, 4, 3, 16, 16))
  out = big.transformer(x, big.encode(["a red circle rises"]), jnp.array([500.0]),
                        image_rotary_emb=rope)
  assert out.shape == x.shape and np.isfinite(np.asarray(out)).all()


def test_grow_refuses_another_architecture():
  small = tiny_t2v.build(_small(2, 8))
  wider = dataclasses.replace(_small(4, 16), transformer=dataclasses.replace(
      _small(4, 16).transformer, num_layers=3))
  with pytest.raises(ValueError, match="expected the model's architecture"):
    tiny_t2v.grow(small, wider)
  text = dataclasses.replace(_small(4, 16), text=dataclasses.replace(_small(4, 16).text,
                                                                     num_layers=2))
  with pytest.raises(ValueError, match="expected the model's text encoder"):
    tiny_t2v.grow(small, text)


def test_sharded_save_round_trips(tmp_path, monkeypatch):
  model = tiny_t2v.build(_small(2, 8), seed=1)
  monkeypatch.setattr(tiny_t2v, "MAX_FILE_BYTES", 8_000)
  tiny_t2v.save(model, tmp_path, dtype="float32")
  files = sorted(os.listdir(tmp_path / "transformer"))
  shards = [f for f in files if f.endswith(".safetensors")]
  assert len(shards) > 1 and "diffusion_pytorch_model.safetensors.index.json" in files
  index = json.loads((tmp_path / "transformer" /
                      "diffusion_pytorch_model.safetensors.index.json").read_text())
  assert sorted(set(index["weight_map"].values())) == shards
  loaded = tiny_t2v.load(tmp_path)
  for path, var in loading.model_params(model.transformer).items():
    np.testing.assert_array_equal(var.get_value(),
                                  loading.model_params(loaded.transformer)[path].get_value())
  # Saving again unsharded removes the shards, so no stale weights are read.
  monkeypatch.setattr(tiny_t2v, "MAX_FILE_BYTES", 2**30)
  tiny_t2v.save(model, tmp_path, dtype="float32")
  assert sorted(os.listdir(tmp_path / "transformer")) == [
      "config.json", "diffusion_pytorch_model.safetensors"]


def test_shard_groups():
  t = {k: np.zeros(n, np.uint8) for k, n in (("a", 5), ("b", 5), ("c", 12), ("d", 1))}
  assert [sorted(g) for g in saving.shard(t, 10)] == [["a", "b"], ["c"], ["d"]]
  with pytest.raises(ValueError, match="max_shard_bytes=0"):
    saving.shard(t, 0)
