"""End-to-end denoising time of a video DiT at real sizes: dense (cuDNN) vs AdaSpa.

Library behind ``experiments/bench_e2e.py`` (free of absl flags; the tables,
plot and files are in ``harness/e2e_report.py``). ``run``
(``prepare``, then ``execute``) builds a preset's architecture with random
weights created on the device in the model dtype, but only ``layers``
transformer blocks (the per-block cost is what scales with depth), and
``measure`` times, in one process:

* one denoiser forward per kind of step. The dense model (no AdaSpa state:
  cuDNN attention on GPU) is one program; AdaSpa's forward is another, jitted
  once with the step as a traced argument (as in the sampler's scan, so all
  four phases are compiled and the step picks one at run time) and called at
  a concrete step of each phase: dense warm-up (init state), fused search
  (init state), cached search and sparse (both on the state the fused search
  returned: real selections on the same inputs, never random lists);
* the attention alone on the model's q/k/v shape, as the model calls it
  (``adaspa_jax.parallel``): one dense call, and each layer's sparse call at
  the lists that layer selected.

Each timing (``harness/timing.py``): jit, one warm-up call (compile, reported as
``first_s``), then the median of ``reps`` calls, each ended by ``block_until_ready``.

From these, ``compose`` multiplies each phase's step time by its number of
steps in ``adaspa_jax.phase_table`` (the paper's schedule by default) and
gives both runs' totals and the end-to-end speedup; ``amdahl_ceiling`` gives
the speedup perfect kernels would reach. With ``full_run`` the real
``adaspa_jax.models.sampler`` scan also runs end to end, dense and AdaSpa, and its
measured walls sit beside the composed totals (they validate the composition:
the scan adds only the scheduler update per step).

A length sweep (``sweep_seconds``) repeats ``measure`` over video lengths at
the same height and width (the shape of the paper's Fig. 11: the attention
share, and with it the speedup, grows with length).

Shapes: B batch rows of the denoiser (2 with classifier-free guidance), S
attention tokens, H heads, D head_dim, L layers built.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from adaspa_jax import PHASE_NAMES, AdaSpaConfig, parallel, phase_table
from adaspa_jax.harness import generation
from adaspa_jax.harness.timing import time_fn
from adaspa_jax.harness.e2e_report import summary_line
from adaspa_jax.models import families, parallel as model_parallel, sampler, schedulers
from adaspa_jax.schedule import CACHED_SEARCH, DENSE, FUSED_SEARCH, SPARSE
from pallas_kernels import api

VAE_TEMPORAL, VAE_SPATIAL = 4, 8   # every family's VAE: 4x in time, 8x in height and width


@dataclasses.dataclass(frozen=True)
class Video:
  """A family's default video at 720p, and how seconds of video map to frames.

  Attributes:
    preset: the model preset benchmarked by default.
    height, width, frames: pixels and frames of the pipeline's default video.
    fps: frames per second of the model's videos.
    frame_step: valid frame counts are ``frame_step * n + 1``.
    source: where the numbers come from.
  """
  preset: str
  height: int
  width: int
  frames: int
  fps: int
  frame_step: int
  source: str


VIDEOS = {
    "hunyuan_video": Video(
        "hunyuan-video-13b", 720, 1280, 129, 24, 4,
        "HunyuanVideo 720p: 720 x 1280, 129 frames (~5 s at 24 fps), the paper's setting; "
        "latent 33 x 90 x 160 = 118,800 video tokens + 256 text tokens"),
    "wan": Video(
        "wan2.1-t2v-14b", 720, 1280, 81, 16, 4,
        "Wan2.1-T2V-14B 720p: 1280 x 720, 81 frames at 16 fps; latent 21 x 90 x 160 = "
        "75,600 video tokens (text enters by cross-attention)"),
    "cogvideox": Video(
        "cogvideox1.5-5b", 768, 1360, 81, 16, 16,
        "CogVideoX1.5-5B model card (huggingface.co/zai-org/CogVideoX1.5-5B): 1360 x 768, "
        "frames 16N + 1 (default 81) at 16 fps; the pipeline pads the 21 latent frames to "
        "22 (patch_size_t 2): 11 x 48 x 85 = 44,880 video tokens + 226 text tokens"),
}


def frames_for_seconds(seconds: float, video: Video) -> int:
  """Pixel frames of ``seconds`` of video: the nearest valid count (frame_step * n + 1)."""
  if not isinstance(seconds, (int, float)) or not seconds > 0:
    raise ValueError(f"seconds={seconds!r}: expected a positive number of seconds of video.")
  n = max(1, round(seconds * video.fps / video.frame_step))
  return video.frame_step * n + 1


def latent_frames(frames: int, patch_size_t: int = 1) -> int:
  """Latent frames of a pixel video, padded up to a multiple of patch_size_t as
  diffusers' CogVideoX1.5 pipeline does."""
  f = (frames - 1) // VAE_TEMPORAL + 1
  return -(-f // patch_size_t) * patch_size_t


def latent_size(frames: int, height: int, width: int, patch_size_t: int = 1):
  """Latent (F, H, W) of a pixel video."""
  return latent_frames(frames, patch_size_t), height // VAE_SPATIAL, width // VAE_SPATIAL


# ----------------------------------------------------------------------------- model
def with_layers(family: str, config, layers: int):
  """The config with ``layers`` transformer blocks; HunyuanVideo's split between dual-
  and single-stream blocks keeps the preset's ratio (20:40), rounded."""
  return families.get(family).with_layers(config, layers)


def attention_layers(family: str, config) -> int:
  """Self/joint attention calls per forward: the layers AdaSpa sparsifies."""
  return families.get(family).attention_layers(config)


def build_model(family: str, preset: str, layers: int, adaspa: AdaSpaConfig, *, dtype,
                seed: int = 0, sequence_parallel=None, fsdp: bool = False):
  """Random-weight model with ``layers`` blocks, created by one jitted init on the
  device(s) in ``dtype`` (no host copy, no float32 copy), placed on the mesh if any.

  Returns (model, preset config): the second gives the full depth.
  """
  module = families.get(family).load()
  if preset not in module.PRESETS:
    raise ValueError(f"preset={preset!r}: expected one of {sorted(module.PRESETS)} for "
                     f"model={family}.")
  full = module.PRESETS[preset]
  config = dataclasses.replace(with_layers(family, full, layers), attention="adaspa",
                               adaspa=adaspa)
  # RngBitGenerator keys: the init program of a model's ~100 parameters compiles about
  # twice as fast as with threefry keys, and these weights need only be random.
  make = lambda: module.Model(config, rngs=nnx.Rngs(jax.random.key(seed, impl="unsafe_rbg")),
                              dtype=dtype)
  graphdef, shapes = nnx.split(nnx.eval_shape(make))
  shardings = None
  if sequence_parallel is not None:
    shardings = jax.tree.map(lambda x: sequence_parallel.sharding(
        model_parallel.param_spec(x.shape, sequence_parallel, fsdp)), shapes)
  state = jax.jit(lambda: nnx.state(make()), out_shardings=shardings)()
  model = nnx.merge(graphdef, state)
  if sequence_parallel is not None:
    model_parallel.shard_model(model, sequence_parallel, fsdp=fsdp)
  return model, full


# ----------------------------------------------------------------------------- inputs
@dataclasses.dataclass
class Case:
  """One model at one latent size: what every timing needs.

  Attributes:
    inputs: ``generation.Inputs`` (random noise and embeddings, one video).
    guided: classifier-free guidance (two batch rows).
    text_span: (start, length) of the attention's text tokens, or None.
    kv_lengths: int32 [B] valid tokens of the attention, or None.
    seq_len: S of the self/joint attention.
  """
  family: str
  model: nnx.Module
  full_config: object
  latent: tuple
  inputs: generation.Inputs
  scheduler: object
  guidance: float
  guided: bool
  text_span: tuple | None
  kv_lengths: jax.Array | None
  seq_len: int
  sequence_parallel: object = None

  @property
  def config(self):
    return self.model.config

  @property
  def batch_rows(self) -> int:
    return 2 if self.guided else 1


def make_case(family, model, full_config, latent, *, text_len=None, seed=0,
              sequence_parallel=None) -> Case:
  """Inputs as the family's pipeline prepares them (``generation.build_inputs``)."""
  fam = families.get(family)
  frames, height, width = latent
  inputs = generation.build_inputs(
      family, model, batch=1, frames=frames, height=height, width=width,
      text_len=fam.text_len if text_len is None else text_len, embeddings=None,
      guidance_scale=fam.guidance_scale, seed=seed)
  guided = fam.guided and fam.guidance_scale > 1.0
  seq_len = int(jax.eval_shape(lambda: inputs.init_state(1)).lse.shape[-1])
  span, kv_lengths = None, None
  if family == "hunyuan_video":
    n_text = inputs.cond["encoder_hidden_states"].shape[1]
    span = (seq_len - n_text, n_text)
    kv_lengths = (seq_len - n_text
                  + jnp.asarray(inputs.cond["encoder_attention_mask"], jnp.int32).sum(1))
  elif family == "cogvideox":
    span = (0, inputs.cond["encoder_hidden_states"].shape[1])
  return Case(family=family, model=model, full_config=full_config, latent=tuple(latent),
              inputs=inputs, scheduler=schedulers.get(fam.scheduler),
              guidance=fam.guidance_scale, guided=guided, text_span=span,
              kv_lengths=kv_lengths, seq_len=seq_len, sequence_parallel=sequence_parallel)


def init_state(case: Case):
  """All-dense stacked AdaSpa state for the denoiser's batch rows (head-sharded on a mesh)."""
  make = lambda: case.inputs.init_state(case.batch_rows)
  sp = case.sequence_parallel
  return make() if sp is None else model_parallel.init_state(make, sp)


def denoiser_inputs(case: Case, step: int) -> dict:
  """The keyword inputs the sampler gives the model at ``step`` (before the state)."""
  ts = case.scheduler.timesteps(case.config.adaspa.num_steps)
  ts = ts.astype(np.int32) if np.issubdtype(ts.dtype, np.integer) else ts.astype(np.float32)
  x = case.inputs.latents.astype(sampler.input_dtype(case.model))
  batched = dict(case.inputs.cond)
  if case.guided:
    x = jnp.concatenate([x, x])
    batched = {k: jnp.concatenate([jnp.asarray(case.inputs.uncond[k]), jnp.asarray(v)])
               for k, v in batched.items()}
  return dict(batched, **case.inputs.shared, hidden_states=x,
              timestep=jnp.broadcast_to(jnp.asarray(ts[step]), (x.shape[0],)))


def phase_counts(config: AdaSpaConfig) -> dict:
  """Steps of each phase in the schedule, by ``PHASE_NAMES``."""
  table = phase_table(config)
  return {name: int((table == p).sum()) for p, name in enumerate(PHASE_NAMES)}


def first_step(config: AdaSpaConfig, phase: int) -> int | None:
  hits = np.flatnonzero(phase_table(config) == phase)
  return int(hits[0]) if hits.size else None


@functools.partial(jax.jit, static_argnums=(2, 3))
def _keys_per_row(indices, counts, seq_len, block_size):
  """int32 [L, B, H, nQ]: keys each query row of the lists reads (key blocks of
  ``block_size``; the rows may be coarser query blocks)."""
  n_blk = -(-seq_len // block_size)
  sizes = jnp.minimum(block_size, seq_len - jnp.arange(n_blk) * block_size)
  read = jnp.arange(indices.shape[-1]) < counts[..., None]
  listed = jnp.where(read, sizes[jnp.clip(indices, 0, n_blk - 1)], 0).sum(-1)
  return jnp.where(counts >= n_blk, seq_len, listed)


def computed_pairs(state, seq_len: int, block_size: int,
                   query_block_size: int | None = None) -> np.ndarray:
  """int64 [L]: query x key pairs each layer's lists make the sparse kernel compute,
  summed over batch rows and heads (dense rows, text blocks and a partial last block
  counted exactly; the sum in int64 on the host, past int32's range at real sizes).
  ``query_block_size``: rows per list row (None: ``block_size``)."""
  qbs = block_size if query_block_size is None else query_block_size
  keys = np.asarray(_keys_per_row(state.indices, state.counts, seq_len, block_size), np.int64)
  sizes = np.minimum(qbs, seq_len - np.arange(keys.shape[-1]) * qbs)
  return (keys * sizes).reshape(keys.shape[0], -1).sum(-1)


def _random_qkv(case: Case, dtype):
  """Three random [B, S, H, D] arrays (replicated over a mesh, as a dense call sees them)."""
  cfg = case.config
  shape = (case.batch_rows, case.seq_len, cfg.num_attention_heads, cfg.attention_head_dim)
  sp = case.sequence_parallel
  out = None if sp is None else sp.sharding(P())
  make = lambda key: [jax.random.normal(k, shape, dtype) for k in jax.random.split(key, 3)]
  return jax.jit(make, out_shardings=out)(jax.random.key(1))


# Module-level programs (static: the model's graph, the layout), so a size measured twice
# in one process compiles once.
@functools.partial(jax.jit, static_argnums=0)
def _dense_forward(graphdef, params, inputs):
  return nnx.merge(graphdef, params)(**inputs)


@functools.partial(jax.jit, static_argnums=0)
def _adaspa_forward(graphdef, params, inputs, state, step):
  return nnx.merge(graphdef, params)(**inputs, adaspa_state=state, adaspa_step=step)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _dense_attention(q, k, v, kv_lengths, sequence_parallel, text_span):
  return parallel.dense_attention(q, k, v, sequence_parallel=sequence_parallel,
                                  text_span=text_span, kv_lengths=kv_lengths)


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8))
def _sparse_attention(q, k, v, state, kv_lengths, step, config, sequence_parallel, text_span):
  # The model's own call at a sparse step: the branch that reads the carried lists.
  return parallel.adaspa_attention(q, k, v, state, step, config,
                                   sequence_parallel=sequence_parallel, text_span=text_span,
                                   kv_lengths=kv_lengths)[0]


def measure(case: Case, *, reps: int, log=print) -> dict:
  """Per-phase step times, attention alone and the achieved density at one size.

  Returns a dict of seconds (see the module docstring) with ``composition``
  (``compose``) and ``ceiling`` (``amdahl_ceiling``) filled in.
  """
  cfg = case.config
  ada = cfg.adaspa
  graphdef, params = nnx.split(case.model)
  n_attn = attention_layers(case.family, cfg)
  res = {"latent": list(case.latent), "seq_len": case.seq_len,
         "text_tokens": 0 if case.text_span is None else case.text_span[1],
         "batch_rows": case.batch_rows, "attention_layers": n_attn, "steps": {},
         "attention": {}}

  dense_forward = functools.partial(_dense_forward, graphdef)
  adaspa_forward = functools.partial(_adaspa_forward, graphdef)

  def record(name, timing):
    res["steps"][name] = timing
    log(f"  {name:15s} {timing['median_s'] * 1e3:10.2f} ms/step  (first call "
        f"{timing['first_s']:.1f} s)")

  res["steps"]["dense_baseline"] = time_fn(dense_forward, params, denoiser_inputs(case, 0),
                                          reps=reps).as_dict()
  record("dense_baseline", res["steps"]["dense_baseline"])
  counts = phase_counts(ada)
  state0 = init_state(case)
  t_fused = first_step(ada, FUSED_SEARCH)
  step = lambda t: jnp.asarray(t, jnp.int32)
  timing = time_fn(adaspa_forward, params, denoiser_inputs(case, t_fused), state0,
                   step(t_fused), reps=reps)
  _, searched = timing.output
  record("fused_search", timing.as_dict())
  for phase, state in ((DENSE, state0), (CACHED_SEARCH, searched), (SPARSE, searched)):
    t = first_step(ada, phase)
    if t is None:
      continue
    timing = time_fn(adaspa_forward, params, denoiser_inputs(case, t), state, step(t),
                     reps=reps)
    record(PHASE_NAMES[phase], timing.as_dict())
  del state0

  pairs = computed_pairs(searched, case.seq_len, ada.block_size, ada.query_block_size)
  dense_pairs = case.batch_rows * cfg.num_attention_heads * case.seq_len ** 2
  res["density_per_layer"] = (pairs / dense_pairs).tolist()
  res["density"] = float(pairs.sum() / (dense_pairs * len(pairs)))
  res["recall_per_layer"] = np.asarray(searched.recall, np.float64).mean((1, 2)).tolist()

  q, k, v = _random_qkv(case, sampler.input_dtype(case.model))
  sp, span, kvl = case.sequence_parallel, case.text_span, case.kv_lengths
  res["attention"]["dense_per_call"] = time_fn(_dense_attention, q, k, v, kvl, sp, span,
                                               reps=reps).as_dict()
  sparse_step = first_step(ada, SPARSE)
  if sparse_step is not None:
    res["attention"]["sparse_per_layer"] = []
    for layer in range(n_attn):
      st = jax.tree.map(lambda x, layer=layer: x[layer], searched)
      timing = time_fn(_sparse_attention, q, k, v, st, kvl, sparse_step, ada, sp, span,
                       reps=reps)
      res["attention"]["sparse_per_layer"].append(timing.as_dict())
  del q, k, v, searched
  # Again at the end: the drift of the device clock over the measurement.
  res["dense_baseline_again"] = time_fn(dense_forward, params, denoiser_inputs(case, 0),
                                       reps=reps).as_dict()
  att = res["attention"]
  log(f"  attention alone: dense {att['dense_per_call']['median_s'] * 1e3:.2f} ms/call x "
      f"{n_attn}, sparse "
      + (f"{sum(t['median_s'] for t in att['sparse_per_layer']) * 1e3:.2f} ms over {n_attn} "
         f"layers" if "sparse_per_layer" in att else "n/a")
      + f", density {res['density']:.3f}")
  res.update(summarize(res, counts, ada))
  return res


# ----------------------------------------------------------------------------- arithmetic
def compose(step_s: dict, counts: dict) -> dict:
  """Schedule totals from per-step seconds.

  Args:
    step_s: seconds of one step: ``dense_baseline`` and each phase name that has steps.
    counts: steps per phase name (``phase_counts``); their sum is the schedule length N.
  Returns:
    dense_total_s = N x dense_baseline; adaspa_total_s = sum over phases of
    counts[phase] x step_s[phase]; speedup = dense_total_s / adaspa_total_s.
  """
  n = sum(counts.values())
  missing = [p for p, c in counts.items() if c and p not in step_s]
  if missing:
    raise ValueError(f"step_s has no time for phases {missing}: expected one for every phase "
                     f"with steps ({counts}).")
  dense = n * step_s["dense_baseline"]
  adaspa = sum(c * step_s[p] for p, c in counts.items() if c)
  return {"dense_total_s": dense, "adaspa_total_s": adaspa, "speedup": dense / adaspa,
          "phase_steps": dict(counts)}


def ceiling_dense_steps(counts: dict) -> int:
  """W of ``amdahl_ceiling``: the warm-up steps plus every search step (fused or cached)."""
  return counts["dense"] + counts["fused_search"] + counts["cached_search"]


def amdahl_ceiling(num_steps: int, dense_steps: int, attention_share: float,
                   density: float) -> float:
  """End-to-end speedup of AdaSpa if its kernels were perfect.

  ceiling = N / (W + (N - W) * (1 - a + a * d)), where
    N = ``num_steps``, the schedule's steps;
    W = ``dense_steps``: the warm-up steps before the first search plus every search
        step, each costing exactly one dense step (the search itself adds nothing);
    a = ``attention_share``: the sparsified self/joint attention's share of a dense
        step's time (all layers' dense attention calls / the dense step, measured);
    d = ``density``: the computed query x key pairs of the achieved selections over
        dense pairs (text blocks, dense text rows included);
  i.e. each of the N - W sparse steps costs its non-attention part (1 - a) plus
  its attention at exactly density x the dense attention time.
  """
  if not 0 <= dense_steps <= num_steps or num_steps < 1:
    raise ValueError(f"dense_steps={dense_steps}, num_steps={num_steps}: expected "
                     "0 <= dense_steps <= num_steps and num_steps >= 1.")
  if not attention_share >= 0 or not 0 <= density <= 1:
    raise ValueError(f"attention_share={attention_share}, density={density}: expected "
                     "attention_share >= 0 and density in [0, 1].")
  sparse_step = 1.0 - attention_share + attention_share * density
  return num_steps / (dense_steps + (num_steps - dense_steps) * sparse_step)


def summarize(res: dict, counts: dict, config: AdaSpaConfig) -> dict:
  """Composition, attention shares, the ceiling and speedup / ceiling from ``measure``'s
  timings (medians)."""
  step_s = {name: t["median_s"] for name, t in res["steps"].items()}
  comp = compose(step_s, counts)
  n_attn = res["attention_layers"]
  dense_attn = n_attn * res["attention"]["dense_per_call"]["median_s"]
  share = dense_attn / step_s["dense_baseline"]
  dense_steps = ceiling_dense_steps(counts)
  ceiling = amdahl_ceiling(config.num_steps, dense_steps, share, res["density"])
  out = {"composition": comp, "attention_share": share, "ceiling_dense_steps": dense_steps,
         "ceiling": ceiling, "speedup_over_ceiling": comp["speedup"] / ceiling}
  sparse = res["attention"].get("sparse_per_layer")
  if sparse:
    sparse_attn = sum(t["median_s"] for t in sparse)
    out["sparse_attention_share"] = sparse_attn / step_s["sparse"]
    # 1.0: the sparse kernel costs exactly density x cuDNN dense (same work per block).
    out["sparse_kernel_vs_ideal"] = sparse_attn / (res["density"] * dense_attn)
  return out


# ----------------------------------------------------------------------------- runs
def full_run(case: Case, log=print) -> dict:
  """The ``adaspa_jax.models.sampler`` scan end to end, dense then AdaSpa; walls exclude compile."""
  out = {}
  for mode in ("dense", "adaspa"):
    state = init_state(case) if mode == "adaspa" else None
    args = (case.model, case.scheduler, case.inputs.latents, case.inputs.cond,
            case.inputs.uncond if case.guided else None)
    kw = dict(num_steps=case.config.adaspa.num_steps, guidance_scale=case.guidance,
              shared=case.inputs.shared, adaspa_state=state, key=jax.random.key(2))
    compile_s = sampler.compile_seconds(*args, **kw)
    start = time.perf_counter()
    result = sampler.sample(*args, **kw)
    wall = time.perf_counter() - start
    out[mode] = {"wall_s": wall, "compile_s": compile_s,
                 "finite": bool(np.isfinite(np.asarray(result.latents)).all())}
    log(f"  full run {mode}: {wall:.2f} s ({case.config.adaspa.num_steps} steps, compile "
        f"{compile_s:.1f} s)")
    del result, state
  out["speedup"] = out["dense"]["wall_s"] / out["adaspa"]["wall_s"]
  return out


@dataclasses.dataclass
class Bench:
  """A configuration ready to measure: the built model at the main size (``case``),
  the results' header, and what a sweep needs to build a model of other depth."""
  case: Case
  header: dict
  preset: str
  adaspa: AdaSpaConfig
  video: Video
  patch_size_t: int
  dtype: object
  seed: int
  text_len: int | None
  fsdp: bool


def prepare(*, family="hunyuan_video", preset=None, layers=2, steps=50, sparsity=0.8,
            block_size=64, query_block_size=None, precision="bf16", search_steps=None,
            dtype="bfloat16",
            implementation=None, latent=None, video_seconds=None, text_len=None, mesh=None, fsdp=False, seed=0,
            command=None, log=print) -> Bench:
  """Checks the configuration and builds the model and inputs (see ``run``)."""
  sp = parallel.parse_mesh(mesh)
  if fsdp and sp is None:
    raise ValueError("fsdp=True without mesh: expected mesh='N' (weights are sharded over "
                     "the mesh's devices).")
  module = families.get(family).load()
  video = VIDEOS[family]
  preset = video.preset if preset is None else preset
  adaspa = AdaSpaConfig(sparsity=sparsity, block_size=block_size,
                        query_block_size=query_block_size, precision=precision,
                        num_steps=steps,
                        search_steps=tuple(search_steps) if search_steps
                        else generation.default_search_steps(steps),
                        implementation=implementation)
  p_t = getattr(module.PRESETS.get(preset), "patch_size_t", None) or 1
  default = latent_size(video.frames, video.height, video.width, p_t)
  latent = tuple(latent or (None,) * 3)
  if video_seconds is not None:
    if latent[0] is not None:
      raise ValueError(f"video_seconds={video_seconds} and latent frames {latent[0]}: expected "
                       "one of them.")
    latent = (latent_frames(frames_for_seconds(video_seconds, video), p_t),) + latent[1:]
  latent = tuple(d if d is not None else fd for d, fd in zip(latent, default))
  dt = jnp.dtype(dtype)
  on_gpu = jax.devices()[0].platform == "gpu"
  header = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
      "devices": 1 if sp is None else sp.size, "fsdp": bool(fsdp),
      "jax_version": jax.__version__, "command": command,
      "model": family, "preset": preset, "video_default": dataclasses.asdict(video),
      "dtype": dt.name, "adaspa": dataclasses.asdict(adaspa),
      "implementation": api.resolve(implementation)[0],
      "dense_implementation": "cudnn" if on_gpu and dt != jnp.float32 else "xla",
      "random_weights": True,
      "timing": "per step kind: jit, one warm-up call (first_s), then the median of reps "
                "calls, each ended by block_until_ready (host clock)",
  }
  log(f"{family} {preset}: {layers} layers, latent {latent}, {steps} steps, search steps "
      f"{adaspa.search_steps}, sparsity {sparsity}, {dt.name}, "
      f"{header['devices']} device(s), {header['device']}")
  model, full = build_model(family, preset, layers, adaspa, dtype=dt, seed=seed,
                            sequence_parallel=sp, fsdp=fsdp)
  header["layers"] = _layer_info(family, model.config, full)
  case = make_case(family, model, full, latent, text_len=text_len, seed=seed,
                   sequence_parallel=sp)
  return Bench(case=case, header=header, preset=preset, adaspa=adaspa, video=video,
               patch_size_t=p_t, dtype=dt, seed=seed, text_len=text_len, fsdp=bool(fsdp))


def execute(bench: Bench, *, reps=3, do_full_run=False, sweep_seconds=(), sweep_layers=1,
            sweep_reps=None, log=print, save=None) -> dict:
  """Measures a prepared configuration (see ``run``); returns the results."""
  save = save or (lambda results: None)
  case = bench.case
  results = dict(bench.header, reps=reps)
  results["main"] = measure(case, reps=reps, log=log)
  results["full_depth_estimate"] = full_depth_estimate(results["main"], results["layers"])
  log(summary_line(results["main"]))
  save(results)
  if do_full_run:
    try:
      results["full_run"] = full_run(case, log=log)
    except Exception as e:  # pylint: disable=broad-except
      results["full_run"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
      log(f"  full run failed: {results['full_run']['error'][:300]}")
    save(results)
  if not sweep_seconds:
    return results
  model = case.model
  if sweep_layers != attention_layers(case.family, case.config):
    model, _ = build_model(case.family, bench.preset, sweep_layers, bench.adaspa,
                           dtype=bench.dtype, seed=bench.seed,
                           sequence_parallel=case.sequence_parallel, fsdp=bench.fsdp)
  results["sweep_layers"] = sweep_layers
  results["sweep"] = []
  for s in sweep_seconds:
    frames = frames_for_seconds(s, bench.video)
    row = {"seconds": s, "frames": frames}
    results["sweep"].append(row)
    latent = (latent_frames(frames, bench.patch_size_t),) + case.latent[1:]
    row.update(sweep_point(case.family, model, case.full_config, latent,
                           text_len=bench.text_len, reps=sweep_reps or reps, seed=bench.seed,
                           sequence_parallel=case.sequence_parallel, log=log))
    save(results)
  return results


def run(*, reps=3, do_full_run=False, sweep_seconds=(), sweep_layers=1, sweep_reps=None,
        log=print, save=None, **setup) -> dict:
  """Measures one configuration (and optionally a length sweep); returns the results.

  Args (``setup``, passed to ``prepare``):
    family: "hunyuan_video", "wan" or "cogvideox".
    preset: the family's preset (default ``VIDEOS[family].preset``, the real size).
    layers: transformer blocks built for the main measurement.
    steps, sparsity, block_size, query_block_size, precision, search_steps,
      implementation: the AdaSpa schedule, granularity (query rows per list row; None for
      ``block_size``), operand precision ("bf16", "fp8" or "int8_fp8": dense warm-up and
      sparse steps) and kernels (search steps default to the paper's, scaled). The dense
      baseline stays cuDNN in the model's dtype.
    dtype: weights and activations.
    latent: (F, H, W) latent size; None entries take the family's 720p default.
    video_seconds: sets the latent frames from seconds of video instead of F.
    text_len: text tokens (default: the pipeline's).
    mesh, fsdp: as ``adaspa_jax.experiments.generate`` (``adaspa_jax.parallel.parse_mesh``).
    seed: weights, noise and embeddings; command: recorded in the results.
  Args (``execute``):
    reps: timed calls per step kind.
    do_full_run: also run the scanned sampler end to end, dense and AdaSpa.
    sweep_seconds: seconds of video for the length sweep (same H, W as ``latent``).
    sweep_layers: blocks built for the sweep (the main model is reused if equal).
    sweep_reps: timed calls per step kind in the sweep (default ``reps``).
    save: called with the results after every stage, so a run cut short (time
      limit, out of memory) keeps what it measured.
  """
  return execute(prepare(log=log, **setup), reps=reps, do_full_run=do_full_run,
                 sweep_seconds=sweep_seconds, sweep_layers=sweep_layers, sweep_reps=sweep_reps,
                 log=log, save=save)


def sweep_point(family, model, full_config, latent, *, text_len, reps, seed,
                sequence_parallel, log=print) -> dict:
  """``measure`` at one length of the sweep; a failure (e.g. out of memory at the
  longest video) is recorded as ``error`` so the sweep goes on."""
  log(f"sweep: latent {latent}")
  try:
    case = make_case(family, model, full_config, latent, text_len=text_len, seed=seed,
                     sequence_parallel=sequence_parallel)
    row = measure(case, reps=reps, log=log)
    log(summary_line(row))
    return row
  except Exception as e:  # pylint: disable=broad-except
    log(f"  failed: {type(e).__name__}: {str(e)[:300]}")
    return {"latent": list(latent), "error": f"{type(e).__name__}: {e}"[:2000]}


def full_depth_estimate(m: dict, layers: dict) -> dict:
  """The composed totals scaled by full-depth / built attention layers: an estimate
  that ignores the parts outside the blocks (patch embedding, text refiner, output
  projection), small beside a block at these sizes but not measured."""
  scale = layers["full_depth"] / layers["built"]
  c = m["composition"]
  return {"scale": scale, "dense_total_s": scale * c["dense_total_s"],
          "adaspa_total_s": scale * c["adaspa_total_s"]}


def _layer_info(family, config, full) -> dict:
  info = {"built": attention_layers(family, config), "full_depth": attention_layers(family, full)}
  if family == "hunyuan_video":
    info.update(dual=config.num_layers, single=config.num_single_layers)
  return info
