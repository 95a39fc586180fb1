"""harness/generation.py: tiny random presets on CPU, files and report fields (the
launcher: tests/experiments/test_generate.py)."""

import os

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.numpy import save_file

from adaspa_jax import AdaSpaConfig
from adaspa_jax.harness import generation
from adaspa_jax.models import cogvideox, hunyuan_video, saving, wan
from tests.harness.generation_report import SEARCH, STEPS, check_report

ADASPA = AdaSpaConfig(sparsity=0.5, block_size=16, num_steps=STEPS, search_steps=SEARCH)


def test_hunyuan_video_tiny_with_embeddings_file(tmp_path):
  """Embedded guidance (one branch), diffusers' tensor names, padded text."""
  cfg = hunyuan_video.PRESETS["tiny"]
  rng = np.random.default_rng(0)
  path = str(tmp_path / "prompt.safetensors")
  mask = np.zeros((1, 9), np.int32)
  mask[:, :5] = 1
  save_file({"prompt_embeds": rng.standard_normal((1, 9, cfg.text_embed_dim), np.float32),
             "prompt_attention_mask": mask,
             "pooled_prompt_embeds": rng.standard_normal((1, cfg.pooled_projection_dim),
                                                         np.float32)}, path)
  out = str(tmp_path / "hunyuan")
  report = generation.run(family="hunyuan_video", preset="tiny", embeddings=path, steps=STEPS,
                        attention="adaspa", adaspa=ADASPA, latent=(3, 8, 10), dtype="float32",
                        progress=False, output_dir=out)
  assert report["random_embeddings"] is False and not report["classifier_free_guidance"]
  check_report(out, report, layers=cfg.num_layers + cfg.num_single_layers,
                heads=cfg.num_attention_heads, rows=1, modes=("adaspa",))


def test_cogvideox_tiny(tmp_path):
  # DDIM: the DPM solver's noise would add a one-off ~5 s random-number compile on CPU;
  # tests/models/test_sampler.py runs the DPM carry through the scan.
  cfg = cogvideox.PRESETS["tiny"]
  out = str(tmp_path / "cog")
  report = generation.run(family="cogvideox", preset="tiny", steps=STEPS, attention="adaspa",
                        adaspa=ADASPA, latent=(3, 8, 10), dtype="float32", progress=False,
                        scheduler="cogvideox-5b-ddim", dynamic_cfg=True, output_dir=out)
  assert "CogVideoXDDIM" in report["scheduler"]
  assert report["latent_shape"] == [1, 3, cfg.in_channels, 8, 10]     # [B, F, C, H, W]
  check_report(out, report, layers=cfg.num_layers, heads=cfg.num_attention_heads, rows=2,
                modes=("adaspa",))


def test_default_search_steps_scale_the_papers():
  assert generation.default_search_steps(50) == (9, 29)
  assert generation.default_search_steps(8) == (1, 4)


def test_bad_preset_and_shift(tmp_path):
  with pytest.raises(ValueError, match="--preset='huge'"):
    generation.run(family="wan", preset="huge", steps=STEPS, adaspa=ADASPA,
                 output_dir=str(tmp_path))
  with pytest.raises(ValueError, match="--shift=3.0"):
    generation.run(family="cogvideox", preset="tiny", steps=STEPS, adaspa=ADASPA, shift=3.0,
                 dtype="float32", output_dir=str(tmp_path))


def test_block_mask_spells_out_dense_rows():
  indices = np.array([[0, 2, 2], [0, 1, 3], [3, 3, 3]])
  counts = np.array([2, 4, 1])                 # row 1: count == nK, a dense (text) row
  np.testing.assert_array_equal(generation.block_mask(indices, counts, 4),
                                [[1, 0, 1, 0], [1, 1, 1, 1], [0, 0, 0, 1]])


def test_checkpoint_directory_sets_the_family(tmp_path):
  """A diffusers save_pretrained directory: family from its config, weights not random."""
  cfg = wan.PRESETS["tiny"]
  torch.manual_seed(0)
  WanTransformer3DModel(**saving.diffusers_config(cfg)).save_pretrained(tmp_path / "ckpt")
  out = str(tmp_path / "out")
  report = generation.run(family="cogvideox", checkpoint=str(tmp_path / "ckpt"), steps=STEPS,
                        attention="dense", adaspa=ADASPA, latent=(3, 8, 10), text_len=6,
                        dtype="float32", progress=False, output_dir=out)
  assert report["model"] == "wan" and report["random_weights"] is False
  assert report["preset"] is None and report["runs"]["dense"]["wall_s"] > 0
  assert np.load(os.path.join(out, "latents_dense.npy")).shape == (1, cfg.in_channels, 3, 8, 10)
