"""Schedulers against diffusers' torch schedulers: timesteps, sigmas and whole trajectories."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from adaspa_jax.models import schedulers

SHAPE = (2, 3, 4, 5, 6)   # [B, C, F, H, W]; the update is elementwise


def _outputs(n, seed=0):
  rng = np.random.default_rng(seed)
  return rng.standard_normal((n,) + SHAPE).astype(np.float32)


def _torch_flow(ours):
  return diffusers.FlowMatchEulerDiscreteScheduler(
      num_train_timesteps=ours.num_train_timesteps, shift=ours.shift)


def _set_flow_timesteps(sched, ours, n):
  if ours.sigma_spacing == "linspace":
    # HunyuanVideo's pipeline: retrieve_timesteps(scheduler, n, device, sigmas=...).
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, n + 1)[:-1])
  else:
    sched.set_timesteps(n)          # Wan's pipeline
  sched.set_begin_index(0)


@pytest.mark.parametrize("name", ["wan2.1", "hunyuan-video"])
@pytest.mark.parametrize("n", [1, 7, 50])
def test_flow_match_timesteps_and_sigmas(name, n):
  ours = schedulers.get(name)
  sched = _torch_flow(ours)
  _set_flow_timesteps(sched, ours, n)
  np.testing.assert_array_equal(ours.timesteps(n), sched.timesteps.numpy())
  np.testing.assert_array_equal(ours.sigmas(n), sched.sigmas.numpy())
  assert ours.timesteps(n).dtype == np.float32


@pytest.mark.parametrize("ours", [schedulers.PRESETS["wan2.1"],
                                  schedulers.PRESETS["hunyuan-video"],
                                  schedulers.FlowMatchEuler(shift=5.0, num_train_timesteps=999)])
def test_flow_match_trajectory(ours):
  n = 5
  sched = _torch_flow(ours)
  _set_flow_timesteps(sched, ours, n)
  x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
  xt, xj, state = torch.from_numpy(x), jnp.asarray(x), ours.init(x)
  step = jax.jit(lambda st, o, s, i: ours.step(st, o, s, i, n))
  for i, out in enumerate(_outputs(n)):
    xt = sched.step(torch.from_numpy(out), sched.timesteps[i], xt, return_dict=False)[0]
    xj, state = step(state, jnp.asarray(out), xj, i)   # traced step index
    np.testing.assert_allclose(np.asarray(xj), xt.numpy(), rtol=1e-6, atol=1e-6)


def _torch_cog(ours):
  cls = (diffusers.CogVideoXDPMScheduler if isinstance(ours, schedulers.CogVideoXDPM)
         else diffusers.CogVideoXDDIMScheduler)
  return cls(num_train_timesteps=ours.num_train_timesteps, beta_start=ours.beta_start,
             beta_end=ours.beta_end, beta_schedule="scaled_linear", clip_sample=False,
             set_alpha_to_one=ours.set_alpha_to_one, steps_offset=ours.steps_offset,
             prediction_type=ours.prediction_type, timestep_spacing=ours.timestep_spacing,
             rescale_betas_zero_snr=ours.rescale_betas_zero_snr,
             snr_shift_scale=ours.snr_shift_scale)


COG = [schedulers.PRESETS["cogvideox-2b"], schedulers.PRESETS["cogvideox-5b"],
       schedulers.CogVideoXDDIM(timestep_spacing="leading", steps_offset=1,
                                prediction_type="epsilon", rescale_betas_zero_snr=False),
       schedulers.CogVideoXDPM(timestep_spacing="linspace", prediction_type="sample",
                               set_alpha_to_one=False)]


@pytest.mark.parametrize("ours", COG)
@pytest.mark.parametrize("n", [1, 6, 50])
def test_cogvideox_timesteps_and_alphas(ours, n):
  sched = _torch_cog(ours)
  sched.set_timesteps(n)
  np.testing.assert_array_equal(ours.timesteps(n), sched.timesteps.numpy())
  np.testing.assert_allclose(ours.alphas_cumprod(), sched.alphas_cumprod.numpy(), rtol=1e-12,
                             atol=1e-15)


@pytest.mark.parametrize("ours", COG)
def test_cogvideox_trajectory(ours):
  """Every step of a 6-step run (first-order start, 2nd-order middle, landing step)."""
  n = 6
  sched = _torch_cog(ours)
  sched.set_timesteps(n)
  timesteps = sched.timesteps
  x = np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)
  xt, xj = torch.from_numpy(x), jnp.asarray(x)
  dpm = isinstance(ours, schedulers.CogVideoXDPM)
  state = ours.init(xj, jax.random.key(0)) if dpm else ours.init(xj)
  old = None
  for i, out in enumerate(_outputs(n, seed=3)):
    out_t = torch.from_numpy(out)
    if dpm:
      # diffusers draws one noise tensor, and a second one for a 2nd-order step, which it uses.
      gen = torch.Generator().manual_seed(100 + i)
      draws = [torch.randn(SHAPE, generator=gen) for _ in range(2)]
      xt, old = sched.step(out_t, old, timesteps[i], timesteps[i - 1] if i > 0 else None, xt,
                           generator=torch.Generator().manual_seed(100 + i), return_dict=False)
      second = bool(ours.coefficients(n)["second_order"][i])
      assert second == (i > 0 and int(timesteps[i]) - 1000 // n >= 0)
      noise = jnp.asarray(draws[1 if second else 0].numpy())
      xj, state = ours.step_with_noise(state, jnp.asarray(out), xj, jnp.int32(i), n, noise)
      np.testing.assert_allclose(np.asarray(state.prev_x0), old.numpy(), rtol=1e-5, atol=1e-5)
    else:
      xt = sched.step(out_t, timesteps[i], xt, return_dict=False)[0]
      xj, state = ours.step(state, jnp.asarray(out), xj, jnp.int32(i), n)
    np.testing.assert_allclose(np.asarray(xj), xt.numpy(), rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(xj)).all()


def test_dpm_noise_is_a_function_of_key_and_step():
  ours = schedulers.PRESETS["cogvideox-5b"]
  x = jnp.ones(SHAPE)
  out = jnp.zeros(SHAPE)
  a, _ = ours.step(ours.init(x, jax.random.key(0)), out, x, 1, 4)
  b, _ = ours.step(ours.init(x, jax.random.key(0)), out, x, 1, 4)
  c, _ = ours.step(ours.init(x, jax.random.key(1)), out, x, 1, 4)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))


def test_bad_arguments():
  with pytest.raises(ValueError, match="shift"):
    schedulers.FlowMatchEuler(shift=0.0)
  with pytest.raises(ValueError, match="sigma_spacing"):
    schedulers.FlowMatchEuler(sigma_spacing="karras")
  with pytest.raises(ValueError, match="num_steps"):
    schedulers.PRESETS["wan2.1"].timesteps(0)
  with pytest.raises(ValueError, match="prediction_type"):
    schedulers.CogVideoXDDIM(prediction_type="flow")
  with pytest.raises(ValueError, match="num_steps=1001"):
    schedulers.PRESETS["cogvideox-2b"].timesteps(1001)
  with pytest.raises(ValueError, match="key"):
    schedulers.PRESETS["cogvideox-5b"].init(jnp.zeros(SHAPE))
  with pytest.raises(ValueError, match="scheduler 'euler'"):
    schedulers.get("euler")
