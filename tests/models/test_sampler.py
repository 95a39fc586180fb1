"""The scanned denoising loop against an unrolled Python loop, on Wan's tiny preset (float32)."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adaspa_jax import AdaSpaConfig, phase_table
from adaspa_jax.schedule import CACHED_SEARCH, DENSE, FUSED_SEARCH, SPARSE
from adaspa_jax.models import cogvideox, sampler, schedulers, wan

B, C, F, H, W, TEXT = 1, 4, 3, 8, 10, 6      # 3 x 4 x 5 = 60 video tokens: 4 blocks of 16
ADASPA = AdaSpaConfig(sparsity=0.5, block_size=16, num_steps=5, search_steps=(1, 3))


@functools.cache
def _model(attention):
  cfg = dataclasses.replace(wan.PRESETS["tiny"], attention=attention, adaspa=ADASPA)
  return wan.Model(cfg, rngs=nnx.Rngs(0))


def _inputs(seed):
  rng = np.random.default_rng(seed)
  text = wan.PRESETS["tiny"].text_dim
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  return (normal(B, C, F, H, W), {"encoder_hidden_states": normal(B, TEXT, text)},
          {"encoder_hidden_states": normal(B, TEXT, text)})


@pytest.fixture(scope="module")
def adaspa_runs():
  model = _model("adaspa")
  latents, cond, uncond = _inputs(0)
  kw = dict(num_steps=ADASPA.num_steps, guidance_scale=5.0, record_states=True)
  sched = schedulers.PRESETS["wan2.1"]
  state = model.init_adaspa_state(2 * B, F, H, W)
  before = dict(sampler.TRACES)
  scanned = sampler.sample(model, sched, latents, cond, uncond, adaspa_state=state, **kw)
  unrolled = sampler.sample(model, sched, latents, cond, uncond, adaspa_state=state,
                            unrolled=True, **kw)
  after_first = dict(sampler.TRACES)
  # New values everywhere (noise, text, guidance, a freshly built state), same shapes.
  latents2, cond2, uncond2 = _inputs(1)
  kw["guidance_scale"] = 3.0
  second = sampler.sample(model, sched, latents2, cond2, uncond2,
                          adaspa_state=model.init_adaspa_state(2 * B, F, H, W), **kw)
  return dict(scanned=scanned, unrolled=unrolled, second=second, before=before,
              after_first=after_first, after_second=dict(sampler.TRACES))


def _changed(x):
  x = np.asarray(x)
  return [t for t in range(1, len(x)) if not np.array_equal(x[t], x[t - 1])]


def test_adaspa_scan_equals_unrolled(adaspa_runs):
  s, u = adaspa_runs["scanned"], adaspa_runs["unrolled"]
  np.testing.assert_allclose(np.asarray(s.latents), np.asarray(u.latents), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(s.phases, u.phases)
  np.testing.assert_array_equal(np.asarray(s.states.indices), np.asarray(u.states.indices))
  np.testing.assert_array_equal(np.asarray(s.states.counts), np.asarray(u.states.counts))
  np.testing.assert_allclose(np.asarray(s.states.lse), np.asarray(u.states.lse), atol=1e-5)
  np.testing.assert_allclose(s.recall, u.recall, atol=1e-5)
  np.testing.assert_allclose(s.sparsity, u.sparsity, atol=1e-6)
  assert np.isfinite(np.asarray(s.latents)).all()


def test_phases_indices_and_lse_follow_the_schedule(adaspa_runs):
  s = adaspa_runs["scanned"]
  np.testing.assert_array_equal(s.phases, phase_table(ADASPA))
  np.testing.assert_array_equal(s.phases, [DENSE, FUSED_SEARCH, SPARSE, CACHED_SEARCH, SPARSE])
  changed = _changed(s.states.indices)
  assert set(changed) <= set(ADASPA.search_steps) and ADASPA.first_search in changed
  assert _changed(s.states.counts) == [ADASPA.first_search]   # dense rows -> budgets, once
  assert _changed(s.states.lse) == [ADASPA.first_search]      # cached once, at the first search
  # Before the first search the state is the all-dense initial one.
  assert np.all(np.asarray(s.states.sparsity)[0] == 0)
  # After it every branch row really is sparse (4 video blocks, budgets 1-3 per head tier).
  assert s.sparsity.shape == (5, wan.PRESETS["tiny"].num_layers, 2 * B,
                              wan.PRESETS["tiny"].num_attention_heads)
  assert np.all(s.sparsity[1:] > 0.2) and np.all((s.recall[1:] > 0) & (s.recall[1:] <= 1 + 1e-6))


def test_each_guidance_branch_has_its_own_state(adaspa_runs):
  lse = np.asarray(adaspa_runs["scanned"].adaspa_state.lse)     # [L, 2B, H, S]
  # Text reaches the video tokens through block 0's cross-attention: layer 1's
  # self-attention inputs, and so its LSE, differ between the branches.
  assert not np.allclose(lse[1, :B], lse[1, B:])


def test_second_call_with_new_inputs_does_not_recompile(adaspa_runs):
  before, first, second = (adaspa_runs[k] for k in ("before", "after_first", "after_second"))
  assert first.get("scan", 0) - before.get("scan", 0) == 1
  assert first.get("step", 0) - before.get("step", 0) == 1     # one step program for all steps
  assert second == first
  a, b = adaspa_runs["scanned"].latents, adaspa_runs["second"].latents
  assert not np.allclose(np.asarray(a), np.asarray(b))         # it really ran on the new inputs


def test_adaspa_scan_equals_unrolled_on_cogvideox():
  """Joint attention with a text prefix, RoPE passed unbatched, CogVideoX's layout and DDIM.
  (HunyuanVideo's scan runs in tests/experiments/test_generate.py; a second joint-attention
  model here would double this file's CPU time.)"""
  rng = np.random.default_rng(4)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  cfg = dataclasses.replace(cogvideox.PRESETS["tiny"], attention="adaspa", adaspa=ADASPA)
  model = cogvideox.Model(cfg, rngs=nnx.Rngs(0))
  text = (B, cfg.max_text_seq_length, cfg.text_embed_dim)
  latents, cond, uncond = (normal(B, F, C, H, W), {"encoder_hidden_states": normal(*text)},
                           {"encoder_hidden_states": normal(*text)})
  shared = {"image_rotary_emb": cogvideox.rotary_positional_embeddings(cfg, F, H, W)}
  state, sched = model.init_adaspa_state(2 * B, F, H, W), schedulers.PRESETS["cogvideox-2b"]
  kw = dict(num_steps=ADASPA.num_steps, guidance_scale=6.0, shared=shared, adaspa_state=state,
            record_states=True)
  s = sampler.sample(model, sched, latents, cond, uncond, **kw)
  u = sampler.sample(model, sched, latents, cond, uncond, unrolled=True, **kw)
  np.testing.assert_allclose(np.asarray(s.latents), np.asarray(u.latents), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(s.states.indices), np.asarray(u.states.indices))
  np.testing.assert_array_equal(s.phases, phase_table(ADASPA))
  assert set(_changed(s.states.indices)) <= set(ADASPA.search_steps)
  assert _changed(s.states.lse) == [ADASPA.first_search]
  assert np.all(s.sparsity[1:] > 0.2) and np.isfinite(np.asarray(s.latents)).all()


def test_dense_scan_equals_unrolled_with_a_stateful_scheduler(capsys):
  """Dense attention, guidance with CogVideoX's dynamic ramp, the DPM solver's carry."""
  model = _model("dense")
  latents, cond, uncond = _inputs(2)
  kw = dict(num_steps=4, guidance_scale=6.0, dynamic_cfg=True, key=jax.random.key(3))
  sched = schedulers.PRESETS["cogvideox-5b"]
  scanned = sampler.sample(model, sched, latents, cond, uncond, progress=True, **kw)
  assert "4/4" in capsys.readouterr().err                       # the bar reached the end
  unrolled = sampler.sample(model, sched, latents, cond, uncond, unrolled=True, **kw)
  np.testing.assert_allclose(np.asarray(scanned.latents), np.asarray(unrolled.latents),
                             rtol=1e-5, atol=1e-5)
  assert scanned.adaspa_state is None and np.all(scanned.phases == DENSE)
  np.testing.assert_array_equal(scanned.timesteps, sched.timesteps(4))


def test_dynamic_guidance_weights_match_diffusers_formula():
  ts = schedulers.PRESETS["cogvideox-5b"].timesteps(50)
  w = sampler.dynamic_guidance_weights(ts, 50)
  for t, got in zip(ts, w):
    # diffusers: guidance = 1 + g * ((1 - cos(pi * ((N - t) / N) ** 5)) / 2)
    assert got == pytest.approx((1 - math.cos(math.pi * ((50 - int(t)) / 50) ** 5.0)) / 2,
                                abs=1e-7)


def test_bad_inputs_name_the_argument():
  model = _model("adaspa")
  latents, cond, uncond = _inputs(0)
  sched = schedulers.PRESETS["wan2.1"]
  state = model.init_adaspa_state(2 * B, F, H, W)
  with pytest.raises(ValueError, match=r"adaspa_state.recall has shape .*expected \[L, 2, H\]"):
    sampler.sample(model, sched, latents, cond, uncond, num_steps=5,
                   adaspa_state=model.init_adaspa_state(B, F, H, W))
  with pytest.raises(ValueError, match="num_steps=0"):
    sampler.sample(model, sched, latents, cond, uncond, num_steps=0)
  with pytest.raises(ValueError, match="num_steps=7"):
    sampler.sample(model, sched, latents, cond, uncond, num_steps=7, adaspa_state=state)
  with pytest.raises(ValueError, match="uncond has keys"):
    sampler.sample(model, sched, latents, cond, {"pooled_projections": latents}, num_steps=5)
  with pytest.raises(ValueError, match="sampler passes those itself"):
    sampler.sample(model, sched, latents, dict(cond, timestep=latents), num_steps=5)
  with pytest.raises(ValueError, match=r"cond\['encoder_hidden_states'\] has shape"):
    sampler.sample(model, sched, latents[:0], cond, num_steps=5)
  with pytest.raises(ValueError, match="config.attention is not 'adaspa'"):
    sampler.sample(_model("dense"), sched, latents, cond, uncond, num_steps=5,
                   adaspa_state=state)


def test_denoiser_input_dtype_follows_the_model():
  abstract = lambda mod, dtype: nnx.eval_shape(
      lambda: mod.Model(mod.PRESETS["tiny"], rngs=nnx.Rngs(0), dtype=dtype))
  assert sampler.input_dtype(abstract(wan, jnp.bfloat16)) == jnp.bfloat16
  # CogVideoX keeps no `dtype` attribute: its largest parameter decides.
  assert sampler.input_dtype(abstract(cogvideox, jnp.bfloat16)) == jnp.bfloat16
  assert sampler.input_dtype(abstract(cogvideox, jnp.float32)) == jnp.float32
