"""Wan2.1 T2V: parity with diffusers' WanTransformer3DModel, loading, AdaSpa, presets.

The reference is diffusers' PyTorch model built from small random configs on CPU
(no download). Its 1-D parameters (norm weights, biases) are re-drawn so that a
norm scale mapped to the wrong place cannot hide behind an all-ones init.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from flax import nnx

from adaspa_jax import models
from adaspa_jax import AdaSpaConfig
from adaspa_jax.models import loading, saving, wan
from tests.models import param_counts

TINY = wan.PRESETS["tiny"]
# Patch (2, 2, 2), head_dim 16 (RoPE dims t=8, h=4, w=4), no cross-attention norm.
ODD = dataclasses.replace(TINY, patch_size=(2, 2, 2), num_attention_heads=3,
                          attention_head_dim=16, in_channels=3, out_channels=5, text_dim=20,
                          freq_dim=10, ffn_dim=40, num_layers=3, cross_attn_norm=False)


def torch_model(config, seed=0):
  torch.manual_seed(seed)
  model = WanTransformer3DModel(**saving.diffusers_config(config)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim < 2:
        p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
  return model


def state_dict(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


def inputs(config, batch, frames, height, width, text_len, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, config.in_channels, frames, height, width)).astype(np.float32)
  t = rng.uniform(0, 1000, batch).astype(np.float32)
  c = rng.standard_normal((batch, text_len, config.text_dim)).astype(np.float32)
  return x, t, c


def torch_forward(model, x, t, c):
  with torch.no_grad():
    return model(torch.tensor(x), torch.tensor(t), torch.tensor(c)).sample.numpy()


def nnx_model(config, tm, dtype=jnp.float32):
  # Abstract build + load: every parameter comes from the torch model, and the
  # random initialisers never compile (the slowest part on a CPU).
  model = nnx.eval_shape(lambda: wan.Model(config, rngs=nnx.Rngs(0), dtype=dtype))
  loading.load_state_dict(model, state_dict(tm), wan.weight_rules(config))
  return model


@nnx.jit
def forward(model, x, t, c):
  return model(x, t, c)


@nnx.jit
def adaspa_forward(model, x, t, c, state, step):
  return model(x, t, c, adaspa_state=state, adaspa_step=step)


@pytest.fixture(scope="module")
def tiny_pair():
  tm = torch_model(TINY)
  return tm, nnx_model(TINY, tm)


@pytest.fixture(scope="module")
def adaspa_case(tiny_pair):
  """Inputs and the dense output for the AdaSpa tests: a 3 x 6 x 10 latent is
  45 tokens, 3 blocks of 16 with the last one partial."""
  tm, dense = tiny_pair
  x, t, c = (jnp.asarray(a) for a in inputs(TINY, 2, 3, 6, 10, 7, seed=5))
  return tm, (x, t, c), np.asarray(forward(dense, x, t, c))


# (config, batch, frames, height, width, text_len): frames, height, width all differ;
# ODD's 5 x 7 x 9 latent does not divide by its (2, 2, 2) patch, so both floor.
PARITY_CASES = [(TINY, 2, 3, 6, 10, 7), (ODD, 1, 5, 7, 9, 4)]


@pytest.mark.parametrize("config,batch,frames,height,width,text_len", PARITY_CASES,
                         ids=["tiny", "odd"])
def test_parity_with_diffusers(config, batch, frames, height, width, text_len):
  tm = torch_model(config, seed=1)
  x, t, c = inputs(config, batch, frames, height, width, text_len, seed=2)
  want = torch_forward(tm, x, t, c)
  model = nnx_model(config, tm)
  got = np.asarray(forward(model, jnp.asarray(x), jnp.asarray(t), jnp.asarray(c)))
  assert got.shape == want.shape
  assert np.max(np.abs(got - want)) <= 1e-4, np.max(np.abs(got - want))


def test_every_key_mapped_and_every_param_filled():
  for config in (TINY, ODD):
    sd = state_dict(torch_model(config))
    model = nnx.eval_shape(lambda: wan.Model(config, rngs=nnx.Rngs(0)))
    params = loading.model_params(model)
    matches, unexpected = loading._match_keys(list(sd), wan.weight_rules(config))
    assert not unexpected
    assert {m.target for m in matches} == set(params)
    loading.load_state_dict(model, sd, wan.weight_rules(config))  # raises if any layer is left
    n_ours = sum(int(np.prod(p.get_value().shape)) for p in params.values())
    assert n_ours == sum(int(np.prod(v.shape)) for v in sd.values())


def test_from_pretrained_round_trip(tmp_path):
  tm = torch_model(ODD, seed=3)
  tm.save_pretrained(tmp_path / "wan")
  model = models.from_pretrained(tmp_path / "wan", dtype=jnp.float32)
  assert isinstance(model, wan.Model)
  assert model.config == dataclasses.replace(ODD, adaspa=AdaSpaConfig())
  x, t, c = inputs(ODD, 1, 4, 6, 8, 5, seed=4)
  want = torch_forward(tm, x, t, c)
  got = np.asarray(forward(model, jnp.asarray(x), jnp.asarray(t), jnp.asarray(c)))
  assert np.max(np.abs(got - want)) <= 1e-4

  bf16 = models.from_pretrained(tmp_path / "wan", dtype=jnp.bfloat16)
  assert bf16.blocks.attn1.to_q.kernel[...].dtype == jnp.bfloat16
  # diffusers keeps these in float32 (_keep_in_fp32_modules); so do we.
  assert bf16.blocks.scale_shift_table[...].dtype == jnp.float32
  assert bf16.condition_embedder.time_embedder.linear_1.kernel[...].dtype == jnp.float32
  out = forward(bf16, jnp.asarray(x), jnp.asarray(t), jnp.asarray(c))
  assert out.dtype == jnp.bfloat16
  err = np.max(np.abs(np.asarray(out, np.float32) - want))
  assert err <= 0.05 * np.max(np.abs(want)), err


def adaspa_model(tm, **adaspa):
  config = dataclasses.replace(TINY, attention="adaspa",
                               adaspa=TINY.adaspa.replace(implementation="reference", **adaspa))
  return nnx_model(config, tm)


def test_adaspa_sparsity_zero_equals_dense(adaspa_case):
  tm, (x, t, c), want = adaspa_case
  model = adaspa_model(tm, sparsity=0.0)
  state = model.init_adaspa_state(2, 3, 6, 10)
  assert state.counts.shape == (TINY.num_layers, 2, TINY.num_attention_heads, 3)
  for step in range(TINY.adaspa.num_steps):
    out, state = adaspa_forward(model, x, t, c, state, jnp.int32(step))
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-5, rtol=1e-5, err_msg=f"step {step}")


def test_adaspa_sparse_under_jit_with_traced_step(adaspa_case):
  tm, (x, t, c), want = adaspa_case
  model = adaspa_model(tm, sparsity=0.8)

  state = model.init_adaspa_state(2, 3, 6, 10)
  first = TINY.adaspa.search_steps[0]
  outs = []
  for step in range(first + 2):
    out, state = adaspa_forward(model, x, t, c, state, jnp.int32(step))
    outs.append(np.asarray(out))
    assert np.all(np.isfinite(outs[-1]))
  for step in range(first + 1):  # dense warm-up, then the fused search's exact output
    np.testing.assert_allclose(outs[step], want, atol=1e-5, rtol=1e-5, err_msg=f"step {step}")
  # After the search every video row keeps 1 of 3 key blocks (round(0.2 * 3) = 1,
  # head tiers 0.9 / 0.8 / 0.7 all give 1), so the sparse step differs from dense.
  np.testing.assert_array_equal(np.asarray(state.counts), 1)
  assert np.max(np.abs(outs[first + 1] - want)) > 1e-3


def test_config_and_input_errors(tiny_pair):
  _, model = tiny_pair
  with pytest.raises(ValueError, match="image_dim=1280"):
    wan.Config.from_diffusers({"_class_name": "WanTransformer3DModel", "image_dim": 1280})
  with pytest.raises(ValueError, match="window_size"):
    wan.Config.from_diffusers({"window_size": [-1, -1]})
  assert wan.Config.from_diffusers({"_diffusers_version": "0.42.1", "patch_size": [1, 2, 2],
                                    "num_layers": 30}).num_layers == 30
  x, t, c = (jnp.asarray(a) for a in inputs(TINY, 1, 2, 4, 4, 3))
  with pytest.raises(ValueError, match=r"hidden_states has shape \(1, 4, 2, 4\)"):
    model(x[..., 0], t, c)
  with pytest.raises(ValueError, match="encoder_hidden_states has shape"):
    model(x, t, c[..., :5])
  with pytest.raises(ValueError, match="config.attention='dense'"):
    model(x, t, c, adaspa_state=model.init_adaspa_state(1, 2, 4, 4), adaspa_step=0)


@pytest.mark.parametrize("name,low,high", [("wan2.1-t2v-1.3b", 1.3e9, 1.5e9),
                                           ("wan2.1-t2v-14b", 14.0e9, 14.5e9),
                                           ("tiny", 1e4, 1e6)])
def test_preset_parameter_counts(name, low, high):
  config = wan.PRESETS[name]
  model = nnx.eval_shape(lambda: wan.Model(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
  ours = param_counts.nnx_count(model)
  assert ours == param_counts.torch_count(
      param_counts.diffusers_meta_model(WanTransformer3DModel, config))
  assert low <= ours <= high, ours
  assert model.blocks.attn1.to_q.kernel.get_value().shape[0] == config.num_layers
