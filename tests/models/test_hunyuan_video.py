"""HunyuanVideo NNX model against diffusers' PyTorch HunyuanVideoTransformer3DModel (CPU).

Parity: diffusers' model is built from a tiny random config, its state dict is
loaded through ``weight_rules`` and both run the same random inputs in float32.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from adaspa_jax import models  # noqa: E402
from adaspa_jax import AdaSpaConfig  # noqa: E402
from adaspa_jax.models import hunyuan_video as hv  # noqa: E402
from adaspa_jax.models.loading import load_state_dict, model_params  # noqa: E402
from tests.models import param_counts  # noqa: E402

# Spatial RoPE dims non-zero; frames, height and width of the patch grid differ.
TINY = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
            num_layers=2, num_single_layers=2, num_refiner_layers=2, text_embed_dim=24,
            pooled_projection_dim=12, rope_axes_dim=(4, 6, 6))
# No guidance embedder, temporal patches, in != out channels, other MLP ratio.
TINY_B = dict(in_channels=5, out_channels=3, num_attention_heads=3, attention_head_dim=32,
              num_layers=1, num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0,
              patch_size=1, patch_size_t=2, guidance_embeds=False, text_embed_dim=20,
              pooled_projection_dim=8, rope_axes_dim=(8, 12, 12),
              image_condition_type="latent_concat")


def torch_model(cfg, seed=0):
  """diffusers' model with default init, plus noise on 1-D parameters (norm scales
  start at 1 and biases at 0, which would hide swapped mappings)."""
  torch.manual_seed(seed)
  model = diffusers.HunyuanVideoTransformer3DModel(**cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
  return model


def nnx_model(tm, dtype=jnp.float32, **overrides):
  cfg = dataclasses.replace(hv.Config.from_diffusers(dict(tm.config)), **overrides)
  # Abstract build, then every parameter comes from the state dict (as from_pretrained does).
  model = nnx.eval_shape(lambda: hv.Model(cfg, rngs=nnx.Rngs(1), dtype=dtype))
  load_state_dict(model, {k: v.numpy() for k, v in tm.state_dict().items()},
                  hv.weight_rules(cfg))
  return model


def make_inputs(cfg, batch, frames, height, width, text_len, valid, seed=0):
  rng = np.random.default_rng(seed)
  mask = (np.arange(text_len)[None, :] < np.asarray(valid)[:, None]).astype(np.int64)
  return dict(
      hidden_states=rng.standard_normal((batch, cfg["in_channels"], frames, height, width)),
      timestep=rng.uniform(0, 1000, batch),
      encoder_hidden_states=rng.standard_normal((batch, text_len, cfg["text_embed_dim"])),
      encoder_attention_mask=mask,
      pooled_projections=rng.standard_normal((batch, cfg["pooled_projection_dim"])),
      guidance=rng.uniform(1000, 7000, batch) if cfg.get("guidance_embeds", True) else None)


def run_torch(tm, inputs):
  to_torch = lambda v: torch.from_numpy(v.astype(np.float32) if v.dtype.kind == "f" else v)
  args = {k: None if v is None else to_torch(v) for k, v in inputs.items()}
  with torch.no_grad():
    return tm(**args).sample.numpy()


def nnx_args(inputs, dtype=jnp.float32):
  return {k: None if v is None else jnp.asarray(v, dtype if v.dtype.kind == "f" else jnp.int32)
          for k, v in inputs.items()}


def run_nnx(model, inputs, dtype=jnp.float32):
  graphdef, params = nnx.split(model)
  forward = jax.jit(lambda p, args: nnx.merge(graphdef, p)(**args))
  return forward(params, nnx_args(inputs, dtype))


@pytest.mark.parametrize("cfg,shape,valid,via_files", [
    (TINY, (2, 3, 8, 12, 7), (7, 4), False),   # batch, frames, height, width, text_len
    (TINY_B, (1, 4, 5, 3, 5), (3,), True),
], ids=["guidance", "no-guidance-patch-t2-from-pretrained"])
def test_parity_with_diffusers(cfg, shape, valid, via_files, tmp_path):
  tm = torch_model(cfg)
  if via_files:   # diffusers' save_pretrained -> config.json + safetensors -> our loader
    tm.save_pretrained(tmp_path)
    model = models.from_pretrained(tmp_path, dtype=jnp.float32)
    assert isinstance(model, hv.Model)
  else:
    model = nnx_model(tm)
  inputs = make_inputs(cfg, *shape, valid)
  want = run_torch(tm, inputs)
  got = np.asarray(run_nnx(model, inputs))
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_every_key_mapped_and_every_param_filled():
  tm = torch_model(TINY)
  cfg = hv.Config.from_diffusers(dict(tm.config))
  tensors = {k: v.numpy() for k, v in tm.state_dict().items()}
  model = nnx.eval_shape(lambda: hv.Model(cfg, rngs=nnx.Rngs(0)))
  load_state_dict(model, tensors, hv.weight_rules(cfg))
  left = [p for p, v in model_params(model).items()
          if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
  assert not left
  # A dropped key names the NNX parameter (and layer) left empty.
  key = "single_transformer_blocks.1.attn.norm_k.weight"
  fresh = nnx.eval_shape(lambda: hv.Model(cfg, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"single_transformer_blocks/attn/norm_k/scale\[layer 1\]"):
    load_state_dict(fresh, {k: v for k, v in tensors.items() if k != key}, hv.weight_rules(cfg))


def test_bfloat16_close_to_diffusers_float32():
  tm = torch_model(TINY)
  inputs = make_inputs(TINY, 1, 2, 6, 4, 5, (3,))
  # Both sides see the same bf16-rounded inputs (guidance ~1e3 loses digits in bf16),
  # so the gap measures bf16 compute alone.
  inputs = {k: v if v is None or v.dtype.kind != "f" else
            np.asarray(jnp.asarray(v, jnp.bfloat16), np.float32) for k, v in inputs.items()}
  want = run_torch(tm, inputs)
  got = run_nnx(nnx_model(tm, dtype=jnp.bfloat16), inputs, dtype=jnp.bfloat16)
  assert got.dtype == jnp.bfloat16
  got = np.asarray(got, np.float32)
  assert np.isfinite(got).all()
  assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()


def _jitted(model):
  graphdef, params = nnx.split(model)

  @jax.jit
  def forward(params, args, state, step):
    return nnx.merge(graphdef, params)(**args, adaspa_state=state, adaspa_step=step)

  return lambda inputs, state, step: forward(params, nnx_args(inputs), state, jnp.int32(step))


def test_adaspa_sparsity_zero_equals_dense():
  # head_adaptive=False: the hierarchy's top tier drops blocks even at base sparsity 0.
  ada = AdaSpaConfig(sparsity=0.0, block_size=16, num_steps=4, search_steps=(1, 2),
                     head_adaptive=False, implementation="reference")
  cfg = dict(TINY, num_layers=1, num_single_layers=1, num_refiner_layers=1)
  tm = torch_model(cfg)
  model = nnx_model(tm, attention="adaspa", adaspa=ada)
  b, f, h, w, nt = 2, 3, 8, 12, 7
  inputs = make_inputs(cfg, b, f, h, w, nt, (7, 3))
  want = run_torch(tm, inputs)
  state = model.init_adaspa_state(b, f, h, w, nt)
  assert state.counts.shape[0] == cfg["num_layers"] + cfg["num_single_layers"]
  forward = _jitted(model)
  for step in range(ada.num_steps):  # dense, fused search, cached search, sparse
    out, state = forward(inputs, state, step)
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-4, rtol=0)


def test_adaspa_sparse_runs_under_jit_with_traced_step():
  ada = AdaSpaConfig(sparsity=0.8, block_size=16, num_steps=4, search_steps=(1, 2),
                     implementation="reference")
  cfg = dict(TINY, num_layers=1, num_single_layers=1, num_refiner_layers=1)
  tm = torch_model(cfg)
  model = nnx_model(tm, attention="adaspa", adaspa=ada)
  b, f, h, w, nt = 1, 4, 8, 16, 9   # 128 video tokens = 8 video blocks
  inputs = make_inputs(cfg, b, f, h, w, nt, (6,))
  dense = run_torch(tm, inputs)
  state = model.init_adaspa_state(b, f, h, w, nt)
  forward = _jitted(model)
  outs = []
  for step in range(ada.num_steps):
    out, state = forward(inputs, state, step)
    outs.append(np.asarray(out))
    assert outs[-1].shape == dense.shape and np.isfinite(outs[-1]).all()
  # Dense warm-up and the fused search are exact; afterwards the selection drops blocks.
  np.testing.assert_allclose(outs[0], dense, atol=1e-4, rtol=0)
  np.testing.assert_allclose(outs[1], dense, atol=1e-4, rtol=0)
  assert float(np.asarray(state.sparsity).max()) > 0.5
  assert np.abs(outs[3] - dense).max() > 1e-4


def test_text_blocks_are_the_suffix():
  model = nnx.eval_shape(lambda: hv.Model(dataclasses.replace(
      hv.PRESETS["tiny"], adaspa=AdaSpaConfig(block_size=16)), rngs=nnx.Rngs(0)))
  mask = model.text_blocks(num_video=40, num_text=9)   # text spans tokens 40..48
  np.testing.assert_array_equal(mask, [False, False, True, True])


@pytest.mark.parametrize("name", sorted(hv.PRESETS))
def test_preset_parameter_count_matches_diffusers(name):
  cfg = hv.PRESETS[name]
  tm = param_counts.diffusers_meta_model(diffusers.HunyuanVideoTransformer3DModel, cfg)
  want = param_counts.torch_count(tm)
  got = param_counts.nnx_count(
      nnx.eval_shape(lambda: hv.Model(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)))
  assert got == want
  assert hv.Config.from_diffusers(dict(tm.config)) == cfg
  if name == "hunyuan-video-13b":   # published: ~12.8B, 20 dual + 40 single blocks, 24 x 128
    assert 12.7e9 < got < 12.9e9
    assert (cfg.num_layers, cfg.num_single_layers) == (20, 40)
    assert (cfg.num_attention_heads, cfg.attention_head_dim) == (24, 128)


def test_bad_inputs_raise_value_error():
  # Checks run before any parameter is read, so an abstract model suffices.
  model = nnx.eval_shape(lambda: hv.Model(hv.PRESETS["tiny"], rngs=nnx.Rngs(0)))
  inputs = make_inputs(TINY, 1, 2, 4, 4, 3, (3,))
  call = lambda **changes: model(**nnx_args(dict(inputs, **changes)))
  with pytest.raises(ValueError, match="hidden_states has shape"):
    call(hidden_states=inputs["hidden_states"][:, :3])
  with pytest.raises(ValueError, match="guidance=None"):
    call(guidance=None)
  with pytest.raises(ValueError, match="encoder_attention_mask has shape"):
    call(encoder_attention_mask=inputs["encoder_attention_mask"][:, :2])
  with pytest.raises(ValueError, match="config.attention='dense'"):
    model(**nnx_args(inputs), adaspa_state=model.init_adaspa_state(1, 2, 4, 4, 3),
          adaspa_step=0)
  ada = nnx.eval_shape(lambda: hv.Model(dataclasses.replace(hv.PRESETS["tiny"], attention="adaspa"),
                                        rngs=nnx.Rngs(0)))
  one_layer = jax.tree.map(lambda x: x[:1], ada.init_adaspa_state(1, 2, 4, 4, 3))
  with pytest.raises(ValueError, match="adaspa_state.counts has shape"):
    ada(**nnx_args(inputs), adaspa_state=one_layer, adaspa_step=0)
  with pytest.raises(ValueError, match="timestep has shape"):
    call(timestep=np.zeros((2, 2)))
  with pytest.raises(ValueError, match="rope_axes_dim"):
    hv.Config(attention_head_dim=64)
  with pytest.raises(ValueError, match="'not_a_field'"):
    hv.Config.from_diffusers({"_class_name": "HunyuanVideoTransformer3DModel",
                              "not_a_field": 1})
  with pytest.raises(ValueError, match="token_replace"):
    hv.Config(image_condition_type="token_replace")
