"""Pure-functional diffusion schedulers, as diffusers' video pipelines configure them.

* ``FlowMatchEuler``: diffusers' ``FlowMatchEulerDiscreteScheduler`` (shifted sigmas,
  Euler steps on the predicted velocity). Wan's pipeline calls
  ``set_timesteps(n)``; HunyuanVideo's passes ``sigmas=linspace(1, 0, n + 1)[:-1]``
  (``sigma_spacing="linspace"``).
* ``CogVideoXDDIM`` / ``CogVideoXDPM``: diffusers' ``CogVideoXDDIMScheduler`` and
  ``CogVideoXDPMScheduler`` (scaled-linear betas, SNR shift, zero terminal SNR,
  trailing timesteps, v-prediction). The DPM solver is second order: it carries
  the previous step's predicted clean sample, and it adds fresh noise every step.

A scheduler is a frozen dataclass of hyper-parameters (hashable, static under
``jax.jit``). Its per-step coefficients are computed once per step count on the
host, in the dtypes diffusers uses, and indexed by the (possibly traced) step
inside the denoising scan:

  ``timesteps(n)``                  numpy [n], what the denoiser is given at step i;
  ``init(latents, key)``            the scheduler state carried through the scan;
  ``step(state, out, x, i, n)``     -> (previous sample, new state), float32.

Latents may have any layout ([B, C, F, H, W] or [B, F, C, H, W]); the update is
elementwise.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np


def _check_steps(n):
  if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 1:
    raise ValueError(f"num_steps={n!r}: expected an int >= 1.")
  return int(n)


def _table(x, i):
  """Row ``i`` of a host table, i a Python int or a traced int32 scalar."""
  return jnp.asarray(x)[i]


# ------------------------------------------------------------------ flow matching


@dataclasses.dataclass(frozen=True)
class FlowMatchEuler:
  """``FlowMatchEulerDiscreteScheduler`` with a static shift (no dynamic shifting).

  Attributes:
    shift: sigma shift s: sigma' = s * sigma / (1 + (s - 1) * sigma).
    num_train_timesteps: timesteps are sigma * num_train_timesteps.
    sigma_spacing: "scheduler" when the pipeline calls ``set_timesteps(n)``
      (Wan: linear from the shifted sigma_max to the shifted sigma_min, shifted
      again, as diffusers does); "linspace" when it passes
      ``sigmas=linspace(1, 0, n + 1)[:-1]`` (HunyuanVideo).
  """

  shift: float = 1.0
  num_train_timesteps: int = 1000
  sigma_spacing: str = "scheduler"

  def __post_init__(self):
    if not isinstance(self.shift, numbers.Real) or not self.shift > 0:
      raise ValueError(f"shift={self.shift!r}: expected a float > 0.")
    if not isinstance(self.num_train_timesteps, numbers.Integral) or self.num_train_timesteps < 1:
      raise ValueError(f"num_train_timesteps={self.num_train_timesteps!r}: expected an int >= 1.")
    if self.sigma_spacing not in ("scheduler", "linspace"):
      raise ValueError(f"sigma_spacing={self.sigma_spacing!r}: expected 'scheduler' or "
                       "'linspace'.")

  def _shifted(self, sigmas):
    return self.shift * sigmas / (1 + (self.shift - 1) * sigmas)

  @functools.lru_cache(maxsize=16)
  def sigmas(self, num_steps: int) -> np.ndarray:
    """float32 [n + 1]: the step's sigmas, then a final 0."""
    n, big_n = _check_steps(num_steps), self.num_train_timesteps
    if self.sigma_spacing == "linspace":
      s = self._shifted(np.linspace(1.0, 0.0, n + 1)[:-1].astype(np.float32))
    else:
      # The constructor's float32 training sigmas fix sigma_max and sigma_min;
      # set_timesteps then spaces timesteps between them in float64 and shifts once more.
      train = self._shifted(np.linspace(1, big_n, big_n, dtype=np.float32)[::-1] / big_n)
      t = np.linspace(float(train[0]) * big_n, float(train[-1]) * big_n, n)
      s = self._shifted(t / big_n).astype(np.float32)
    return np.concatenate([s.astype(np.float32), np.zeros(1, np.float32)])

  def timesteps(self, num_steps: int) -> np.ndarray:
    """float32 [n]: sigma * num_train_timesteps, what the denoiser is given."""
    return self.sigmas(num_steps)[:-1] * np.float32(self.num_train_timesteps)

  def init(self, latents, key=None):
    del latents, key
    return ()

  def step(self, state, model_output, sample, i, num_steps):
    """Euler step x + (sigma_{i+1} - sigma_i) * v; returns (prev_sample f32, state)."""
    s = self.sigmas(num_steps)
    dt = s[1:] - s[:-1]
    prev = sample.astype(jnp.float32) + _table(dt, i) * model_output.astype(jnp.float32)
    return prev, state


# ------------------------------------------------------------------ CogVideoX


@dataclasses.dataclass(frozen=True)
class _CogVideoXBase:
  """Fields of diffusers' CogVideoX schedulers (scaled-linear betas only)."""

  snr_shift_scale: float = 3.0
  prediction_type: str = "v_prediction"
  num_train_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  rescale_betas_zero_snr: bool = True
  set_alpha_to_one: bool = True
  timestep_spacing: str = "trailing"
  steps_offset: int = 0

  def __post_init__(self):
    if self.prediction_type not in ("epsilon", "sample", "v_prediction"):
      raise ValueError(f"prediction_type={self.prediction_type!r}: expected 'epsilon', "
                       "'sample' or 'v_prediction'.")
    if self.timestep_spacing not in ("linspace", "leading", "trailing"):
      raise ValueError(f"timestep_spacing={self.timestep_spacing!r}: expected 'linspace', "
                       "'leading' or 'trailing'.")
    if not isinstance(self.num_train_timesteps, numbers.Integral) or self.num_train_timesteps < 1:
      raise ValueError(f"num_train_timesteps={self.num_train_timesteps!r}: expected an int >= 1.")
    if not isinstance(self.snr_shift_scale, numbers.Real) or not self.snr_shift_scale > 0:
      raise ValueError(f"snr_shift_scale={self.snr_shift_scale!r}: expected a float > 0.")

  @functools.lru_cache(maxsize=4)
  def alphas_cumprod(self) -> np.ndarray:
    """float64 [num_train_timesteps], SNR-shifted and (optionally) zero-terminal-SNR."""
    n = self.num_train_timesteps
    betas = np.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, n, dtype=np.float64) ** 2
    ac = np.cumprod(1.0 - betas)
    ac = ac / (self.snr_shift_scale + (1 - self.snr_shift_scale) * ac)
    if self.rescale_betas_zero_snr:
      # Lin et al. 2023, Algorithm 1: shift sqrt(alpha_bar) so the last is 0, keep the first.
      r = np.sqrt(ac)
      r0, rt = r[0], r[-1]
      r = (r - rt) * (r0 / (r0 - rt))
      ac = r ** 2
    return ac

  def timesteps(self, num_steps: int) -> np.ndarray:
    """int64 [n] training timesteps, descending."""
    n, big_n = _check_steps(num_steps), self.num_train_timesteps
    if n > big_n:
      raise ValueError(f"num_steps={n}: expected at most num_train_timesteps={big_n}.")
    if self.timestep_spacing == "linspace":
      return np.linspace(0, big_n - 1, n).round()[::-1].astype(np.int64)
    if self.timestep_spacing == "leading":
      return (np.arange(n) * (big_n // n)).round()[::-1].astype(np.int64) + self.steps_offset
    return np.round(np.arange(big_n, 0, -big_n / n)).astype(np.int64) - 1

  def _alphas(self, num_steps):
    """float64 alpha_bar at each step's timestep and at the one it steps to."""
    n = _check_steps(num_steps)
    ac = self.alphas_cumprod()
    t = self.timesteps(n)
    prev = t - self.num_train_timesteps // n
    final = 1.0 if self.set_alpha_to_one else ac[0]
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
    return ac[t], a_prev, prev

  def _pred_x0(self, model_output, sample, i, num_steps):
    a_t = self._alphas(num_steps)[0]
    out = model_output.astype(jnp.float32)
    x = sample.astype(jnp.float32)
    sa = _table(np.sqrt(a_t).astype(np.float32), i)
    sb = _table(np.sqrt(1 - a_t).astype(np.float32), i)
    if self.prediction_type == "v_prediction":
      return sa * x - sb * out
    if self.prediction_type == "epsilon":
      return (x - sb * out) / sa
    return out


@dataclasses.dataclass(frozen=True)
class CogVideoXDDIM(_CogVideoXBase):
  """``CogVideoXDDIMScheduler`` (deterministic; eta is ignored there too)."""

  def init(self, latents, key=None):
    del latents, key
    return ()

  def step(self, state, model_output, sample, i, num_steps):
    a_t, a_prev, _ = self._alphas(num_steps)
    a = np.sqrt((1 - a_prev) / (1 - a_t))
    b = np.sqrt(a_prev) - np.sqrt(a_t) * a
    x0 = self._pred_x0(model_output, sample, i, num_steps)
    prev = (_table(a.astype(np.float32), i) * sample.astype(jnp.float32)
            + _table(b.astype(np.float32), i) * x0)
    return prev, state


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DPMState:
  """Carry of ``CogVideoXDPM``.

  Attributes:
    prev_x0: float32, the latents' shape: the previous step's predicted clean sample.
    key: PRNG key; step i's noise is drawn from ``fold_in(key, i)``.
  """
  prev_x0: jax.Array
  key: jax.Array


@dataclasses.dataclass(frozen=True)
class CogVideoXDPM(_CogVideoXBase):
  """``CogVideoXDPMScheduler``: stochastic DPM-Solver++ (2M at every step after the
  first, except the last, which lands on the clean sample)."""

  @functools.lru_cache(maxsize=16)
  def coefficients(self, num_steps: int) -> dict[str, np.ndarray]:
    """Per-step float32 multipliers, as diffusers' ``get_variables`` / ``get_mult``.

    Returns a dict of [n] arrays: m1 (sample), m2 (denoised), noise, m3 and m4
    (second-order blend of this and the previous predicted x0), and the bool
    second_order (the step has a previous prediction and does not land on t < 0).
    """
    n = _check_steps(num_steps)
    a_t, a_prev, prev = self._alphas(n)
    a_back = np.concatenate([[np.nan], a_t[:-1]])
    # With zero terminal SNR alpha_bar(999) = 0 and the last step lands on
    # alpha_bar = 1: the log-SNRs are -inf / +inf there, and the multipliers
    # reach their finite limits exactly as in diffusers' float64 torch code.
    with np.errstate(divide="ignore", invalid="ignore"):
      lamb = np.log(np.sqrt(a_t / (1 - a_t)))
      lamb_next = np.log(np.sqrt(a_prev / (1 - a_prev)))
      lamb_back = np.log(np.sqrt(a_back / (1 - a_back)))
      h = lamb_next - lamb
      r = (lamb - lamb_back) / h
      m1 = np.sqrt((1 - a_prev) / (1 - a_t)) * np.exp(-h)
      m2 = np.expm1(-2 * h) * np.sqrt(a_prev)
      m3 = 1 + 1 / (2 * r)
      m4 = 1 / (2 * r)
      noise = np.sqrt(1 - a_prev) * np.sqrt(1 - np.exp(-2 * h))
    second = (np.arange(n) > 0) & (prev >= 0)
    f32 = lambda x: np.where(np.isfinite(x), x, 0).astype(np.float32)
    return dict(m1=f32(m1), m2=f32(m2), noise=f32(noise), m3=np.where(second, m3, 0).astype(
        np.float32), m4=np.where(second, m4, 0).astype(np.float32), second_order=second)

  def init(self, latents, key=None):
    if key is None:
      raise ValueError("key=None: CogVideoXDPM draws noise at every step; expected a PRNG key.")
    return DPMState(prev_x0=jnp.zeros(latents.shape, jnp.float32), key=key)

  def step(self, state: DPMState, model_output, sample, i, num_steps):
    noise = jax.random.normal(jax.random.fold_in(state.key, i), sample.shape, jnp.float32)
    return self.step_with_noise(state, model_output, sample, i, num_steps, noise)

  def step_with_noise(self, state: DPMState, model_output, sample, i, num_steps, noise):
    """``step`` with the noise given (to match diffusers' draws in tests)."""
    c = self.coefficients(num_steps)
    x = sample.astype(jnp.float32)
    x0 = self._pred_x0(model_output, sample, i, num_steps)
    blended = _table(c["m3"], i) * x0 - _table(c["m4"], i) * state.prev_x0
    d = jnp.where(_table(c["second_order"], i), blended, x0)
    prev = _table(c["m1"], i) * x - _table(c["m2"], i) * d + _table(c["noise"], i) * noise
    return prev, DPMState(prev_x0=x0, key=state.key)


# Each entry: the scheduler diffusers' conversion script writes for the model.
PRESETS = {
    # convert_wan_to_diffusers.py: FlowMatchEulerDiscreteScheduler(shift=3.0) (480p;
    # the Wan pipeline's docs suggest 5.0 at 720p).
    "wan2.1": FlowMatchEuler(shift=3.0),
    # convert_hunyuan_video_to_diffusers.py: FlowMatchEulerDiscreteScheduler(shift=7.0);
    # the pipeline passes its own linspace sigmas.
    "hunyuan-video": FlowMatchEuler(shift=7.0, sigma_spacing="linspace"),
    # convert_cogvideox_to_diffusers.py: snr_shift_scale 3.0 for 2B, 1.0 for 5B; the
    # 5B models run with the DPM scheduler in diffusers' docs.
    "cogvideox-2b": CogVideoXDDIM(snr_shift_scale=3.0),
    "cogvideox-5b": CogVideoXDPM(snr_shift_scale=1.0),
    "cogvideox-5b-ddim": CogVideoXDDIM(snr_shift_scale=1.0),
}


def get(name: str):
  if name not in PRESETS:
    raise ValueError(f"scheduler {name!r}: expected one of {sorted(PRESETS)}.")
  return PRESETS[name]
