"""The denoising loop: one ``jax.jit`` around one ``jax.lax.scan`` over the steps.

The scan carries the latents (float32), the scheduler's state and, with AdaSpa,
every layer's ``AdaSpaState`` (the model's ``init_adaspa_state``). Which
attention each step runs (dense warm-up, fused search, cached search, sparse)
follows the model's ``config.adaspa`` schedule, switched on the traced step.

Classifier-free guidance batches the two branches along the batch axis, the
unconditional rows first (as diffusers' CogVideoX pipeline does): the denoiser
sees ``[uncond; cond]`` and the AdaSpa state has one row per branch element, so
each branch keeps its own selection and LSE.

The model is called with diffusers' keyword names:
``model(hidden_states=x, timestep=t, **cond, **shared)`` (+ ``adaspa_state``,
``adaspa_step``), which fits Wan, HunyuanVideo and CogVideoX alike.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adaspa_jax import AdaSpaState, schedule
from adaspa_jax.models import layers

# Traces of the jitted programs, by name: tests use it to show that a second call
# with new inputs of the same shapes reuses the compiled program.
TRACES: collections.Counter = collections.Counter()
_RESERVED = ("hidden_states", "timestep", "adaspa_state", "adaspa_step")


@dataclasses.dataclass(frozen=True)
class SampleResult:
  """What a denoising run returns.

  Attributes:
    latents: float32, the input latents' shape and layout, after the last step.
    adaspa_state: the carried state after the last step (leading [L] axis, batch
      = the denoiser's batch: 2B with guidance), or None for dense runs.
    timesteps: [N] what the denoiser was given at each step.
    phases: int32 [N] AdaSpa phase of each step (``adaspa_jax.PHASE_NAMES``).
    recall: float32 [N, L, B', H] carried state's recall after each step, or None.
    sparsity: float32 [N, L, B', H] carried state's video-block sparsity, or None.
    states: the whole carried ``AdaSpaState`` after each step (leading [N, L]),
      only with ``record_states=True`` (tests; it is large for real models).
  """
  latents: jax.Array
  adaspa_state: AdaSpaState | None
  timesteps: np.ndarray
  phases: np.ndarray
  recall: np.ndarray | None = None
  sparsity: np.ndarray | None = None
  states: AdaSpaState | None = None


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything that fixes the compiled program besides input shapes (hashable)."""
  graphdef: Any
  scheduler: Any
  num_steps: int
  guided: bool
  dynamic_cfg: bool
  progress: bool
  record_states: bool
  input_dtype: str


class _Progress:
  """Host side of the progress bar; the jitted loop reports through ``jax.debug.callback``.

  One module-level instance, so a compiled program reused by a later call
  reports to that call's bar.
  """

  def __init__(self):
    self.bar = None

  def update(self, step):
    if self.bar is not None:
      self.bar.n = int(step) + 1
      self.bar.refresh()


_PROGRESS = _Progress()


def dynamic_guidance_weights(timesteps: np.ndarray, num_steps: int) -> np.ndarray:
  """float32 [N] w_i with guidance_i = 1 + scale * w_i: CogVideoX's ``use_dynamic_cfg``.

  diffusers computes it in float64 from the step's *timestep* t:
  (1 - cos(pi * ((N - t) / N) ** 5)) / 2; we tabulate it on the host the same way.
  """
  return np.asarray([(1 - math.cos(math.pi * ((num_steps - float(t)) / num_steps) ** 5.0)) / 2
                     for t in timesteps], np.float32)


def _model_timesteps(static: _Static) -> np.ndarray:
  ts = static.scheduler.timesteps(static.num_steps)
  return ts.astype(np.int32) if np.issubdtype(ts.dtype, np.integer) else ts.astype(np.float32)


def _step(static: _Static, model, carry, i, batched, shared, guidance):
  """One denoising step at the traced int32 step ``i``."""
  latents, sched_state, ada = carry
  n = static.num_steps
  ts = _model_timesteps(static)
  x = latents.astype(static.input_dtype)
  x = jnp.concatenate([x, x]) if static.guided else x
  t = jnp.broadcast_to(jnp.asarray(ts)[i], (x.shape[0],))
  kwargs = dict(batched, **shared, hidden_states=x, timestep=t)
  if ada is None:
    out = model(**kwargs)
  else:
    out, ada = model(**kwargs, adaspa_state=ada, adaspa_step=i)
  out = out.astype(jnp.float32)
  if static.guided:
    uncond, cond = jnp.split(out, 2)
    scale = guidance
    if static.dynamic_cfg:
      scale = 1 + guidance * jnp.asarray(dynamic_guidance_weights(ts, n))[i]
    out = uncond + scale * (cond - uncond)
  latents, sched_state = static.scheduler.step(sched_state, out, latents, i, n)
  if static.progress:
    jax.debug.callback(_PROGRESS.update, i)
  record = {}
  if ada is not None:
    record = dict(phase=schedule.phase(i, model.config.adaspa), recall=ada.recall,
                  sparsity=ada.sparsity)
    if static.record_states:
      record["state"] = ada
  return (latents, sched_state, ada), record


@functools.partial(jax.jit, static_argnames=("static",))
def _scanned(params, carry, batched, shared, guidance, *, static: _Static):
  TRACES["scan"] += 1
  model = nnx.merge(static.graphdef, params)
  body = lambda c, i: _step(static, model, c, i, batched, shared, guidance)
  return jax.lax.scan(body, carry, jnp.arange(static.num_steps, dtype=jnp.int32))


@functools.partial(jax.jit, static_argnames=("static",))
def _one_step(params, carry, i, batched, shared, guidance, *, static: _Static):
  TRACES["step"] += 1
  model = nnx.merge(static.graphdef, params)
  return _step(static, model, carry, i, batched, shared, guidance)


def _check_inputs(model, latents, cond, uncond, shared, adaspa_state, num_steps):
  if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
    raise ValueError(f"num_steps={num_steps!r}: expected an int >= 1.")
  if not hasattr(latents, "shape") or latents.ndim < 1:
    raise ValueError(f"latents={latents!r}: expected an array [B, ...].")
  b = latents.shape[0]
  for name, d in (("cond", cond), ("uncond", uncond), ("shared", shared)):
    if d is None:
      continue
    if not isinstance(d, Mapping):
      raise ValueError(f"{name}={d!r}: expected a dict of the denoiser's keyword inputs.")
    bad = sorted(set(d) & set(_RESERVED))
    if bad:
      raise ValueError(f"{name} has keys {bad}: the sampler passes those itself.")
  for k, v in cond.items():
    if jnp.shape(v)[:1] != (b,):
      raise ValueError(f"cond[{k!r}] has shape {jnp.shape(v)}: expected a leading batch of {b} "
                       f"(the latents' batch; batch-independent inputs go in `shared`).")
  if uncond is not None:
    if set(uncond) != set(cond):
      raise ValueError(f"uncond has keys {sorted(uncond)}: expected the same keys as cond, "
                       f"{sorted(cond)}.")
    for k, v in uncond.items():
      if jnp.shape(v) != jnp.shape(cond[k]):
        raise ValueError(f"uncond[{k!r}] has shape {jnp.shape(v)}: expected cond's "
                         f"{jnp.shape(cond[k])}.")
  if layers.check_adaspa_state(getattr(model, "config", None), adaspa_state, need_step=False):
    want = 2 * b if uncond is not None else b
    got = adaspa_state.recall.shape
    if len(got) != 3 or got[1] != want:
      raise ValueError(
          f"adaspa_state.recall has shape {got}: expected [L, {want}, H] (a stacked state "
          f"for the denoiser's batch: {'2 x ' if uncond is not None else ''}{b} latents; "
          "build it with model.init_adaspa_state(that batch, ...)).")
    cfg = model.config.adaspa
    if cfg.num_steps != num_steps:
      raise ValueError(f"num_steps={num_steps}: expected the model's AdaSpa schedule length, "
                       f"config.adaspa.num_steps={cfg.num_steps}.")


def input_dtype(model: nnx.Module):
  """The dtype the denoiser is fed, as diffusers' pipelines cast latents to the
  transformer's dtype: ``model.dtype`` if set, else that of its largest parameter."""
  dtype = getattr(model, "dtype", None)
  if dtype is None:
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    dtype = max(params, key=lambda p: p.size).dtype if params else jnp.float32
  return jnp.dtype(dtype)


def _prepare(model, scheduler, latents, cond, uncond, *, num_steps, guidance_scale, shared,
             adaspa_state, key, dynamic_cfg, progress, record_states):
  """Checks the inputs; returns the static part and the jitted programs' arguments."""
  shared = {} if shared is None else dict(shared)
  _check_inputs(model, latents, cond, uncond, shared, adaspa_state, num_steps)
  graphdef, params = nnx.split(model)
  static = _Static(graphdef=graphdef, scheduler=scheduler, num_steps=int(num_steps),
                   guided=uncond is not None, dynamic_cfg=bool(dynamic_cfg),
                   progress=bool(progress), record_states=bool(record_states),
                   input_dtype=input_dtype(model).name)
  batched = {k: jnp.asarray(v) for k, v in cond.items()}
  if uncond is not None:
    batched = {k: jnp.concatenate([jnp.asarray(uncond[k]), v]) for k, v in batched.items()}
  latents = jnp.asarray(latents, jnp.float32)
  carry = (latents, scheduler.init(latents, key), adaspa_state)
  return static, (params, carry, batched, shared, jnp.float32(guidance_scale))


def sample(model: nnx.Module, scheduler, latents, cond: Mapping, uncond: Mapping | None = None,
           *, num_steps: int, guidance_scale: float = 1.0, shared: Mapping | None = None,
           adaspa_state: AdaSpaState | None = None, key=None, dynamic_cfg: bool = False,
           progress: bool = False, record_states: bool = False,
           unrolled: bool = False) -> SampleResult:
  """Denoises ``latents`` through ``num_steps`` scheduler steps.

  Args:
    model: an NNX denoiser following the shared model conventions (Wan,
      HunyuanVideo, CogVideoX).
    scheduler: a ``adaspa_jax.models.schedulers`` scheduler.
    latents: initial noise, any layout with batch first (Wan/HunyuanVideo
      [B, C, F, H, W], CogVideoX [B, F, C, H, W]); carried in float32 (diffusers
      rounds them to a bfloat16 transformer's dtype after every step), fed to the
      model in ``input_dtype(model)``.
    cond: the denoiser's per-example keyword inputs for the conditional branch,
      diffusers' names, each with leading [B] (e.g. ``encoder_hidden_states``).
    uncond: the same keys for the unconditional branch, or None (no guidance).
    num_steps: denoising steps; with AdaSpa it must equal ``config.adaspa.num_steps``.
    guidance_scale: w in uncond + w * (cond - uncond); traced, so changing it
      does not recompile.
    shared: keyword inputs passed unbatched (e.g. CogVideoX ``image_rotary_emb``).
    adaspa_state: None for dense attention, else the stacked state of
      ``model.init_adaspa_state`` for the denoiser's batch (2B with ``uncond``).
    key: PRNG key for stochastic schedulers (CogVideoX DPM).
    dynamic_cfg: CogVideoX's ``use_dynamic_cfg`` guidance ramp.
    progress: show a tqdm bar fed from inside the compiled loop.
    record_states: also return the whole AdaSpa state after every step.
    unrolled: run a Python loop over the steps, one compiled step program called
      per step with the carry passing through the host, instead of the scan
      (the reference the scan is tested against).

  Returns:
    ``SampleResult``.
  """
  static, args = _prepare(model, scheduler, latents, cond, uncond, num_steps=num_steps,
                          guidance_scale=guidance_scale, shared=shared,
                          adaspa_state=adaspa_state, key=key, dynamic_cfg=dynamic_cfg,
                          progress=progress, record_states=record_states)

  bar = None
  if progress:
    import tqdm  # the "video" extra; only needed for the bar
    bar = tqdm.tqdm(total=num_steps, desc="denoising", unit="step")
  _PROGRESS.bar = bar
  try:
    if unrolled:
      carry, records = args[1], []
      for i in range(num_steps):
        carry, rec = _one_step(args[0], carry, jnp.int32(i), *args[2:], static=static)
        records.append(rec)
      records = jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *records)
    else:
      carry, records = _scanned(*args, static=static)
    carry, records = jax.block_until_ready((carry, records))
  finally:
    _PROGRESS.bar = None
    if bar is not None:
      bar.close()
  latents, _, ada = carry
  timesteps = scheduler.timesteps(num_steps)
  if ada is None:
    return SampleResult(latents=latents, adaspa_state=None, timesteps=timesteps,
                        phases=np.full(num_steps, schedule.DENSE, np.int32))
  return SampleResult(latents=latents, adaspa_state=ada, timesteps=timesteps,
                      phases=np.asarray(records["phase"], np.int32),
                      recall=np.asarray(records["recall"]),
                      sparsity=np.asarray(records["sparsity"]),
                      states=records.get("state"))


def compile_seconds(model, scheduler, latents, cond, uncond=None, *, num_steps,
                    guidance_scale=1.0, shared=None, adaspa_state=None, key=None,
                    dynamic_cfg=False, progress=False) -> float:
  """Compiles the scanned program ``sample`` runs for these inputs; returns seconds.

  The trace and the compiled program are cached, so a following ``sample`` call
  with inputs of the same shapes and options neither traces nor compiles (what
  the CLI relies on to time the run alone).
  """
  static, args = _prepare(model, scheduler, latents, cond, uncond, num_steps=num_steps,
                          guidance_scale=guidance_scale, shared=shared,
                          adaspa_state=adaspa_state, key=key, dynamic_cfg=dynamic_cfg,
                          progress=progress, record_states=False)
  start = time.perf_counter()
  _scanned.lower(*args, static=static).compile()
  return time.perf_counter() - start
