"""The paper's ablations on the embedded model (``checkpoints/tiny_t2v``).

Every setting samples the same held-out prompt/seed pairs (``embedded_eval``) from
the same noise and is scored against ONE dense reference clip per pair:
PSNR and SSIM of the pixels ([0, 1]), the caption check (pass rate, mean
score), mean recall at the search steps (``measure_recall``: the mass the
selection keeps, comparable across policies), achieved sparsity and wall time.

Groups (``GROUPS``):
  table1      the issue's Table 1 rows: dense; AdaSpa at 0.7 / 0.8 / 0.9; AdaSpa at
              0.8 without head tiers and without the LSE cache; SVG, MInference at
              0.8; top-p at p = ``TABLE1_TOP_P`` (SVG2's p).
  policies    dense, AdaSpa, SVG and MInference at sparsity 0.7 / 0.8 / 0.9 and
              top-p at p in ``TOP_P`` (its sparsity is whatever p gives);
              the paper's Table 1.
  components  AdaSpa at 0.8, head-adaptive on/off x LSE cache on/off (Table 1's
              "w/o head adaptive", "w/o LSE cache" rows).
  warmup      AdaSpa at 0.8 with w = 0, 2, 5, 10 dense steps, then searches at
              step w and at the paper's 30th step (the warm-up figure).
  schedule    AdaSpa at 0.8 searching at {10}, {10,30}, {10,20,30},
              {10,20,30,40} (Table 2).
  precision   AdaSpa at 0.8 in bf16, "fp8" and "int8_fp8" (``AdaSpaConfig.precision``),
              and dense in each 8-bit precision: every step but the last dense in it
              (the last is a search, which runs in the inputs' dtype), all against the
              bf16 dense clips.
  granularity AdaSpa at 0.8 / 0.9 with lists per query block of ``block_size`` rows
              (the paper's square blocks) and of ``GRANULARITY_ROWS`` x ``block_size``
              rows (e.g. 128 x 64, the tiling that shares one K/V ring per CTA).

Steps are named as in the paper, 1-indexed of 50 (``PAPER_STEPS``); with
``num_steps`` = 50 they apply literally ({10, 30} -> 0-indexed (9, 29); warm-up
w -> first search at 0-indexed step w), with fewer steps at the same fractions
(``paper_step``, ``warmup_steps``).

Settings of different groups with equal configs (AdaSpa 0.8 with {10,30} is
in three groups) run once. Each config compiles once: prompts are sampled in
equal chunks (the last one padded with repeats whose outputs are dropped).

  from adaspa_jax.harness import ablation_report, ablations
  settings = ablations.grid(num_steps=50, frame_tokens=256)
  results = ablations.run("checkpoints/tiny_t2v", settings, n=20)
  ablation_report.write_outputs(results, "outputs/ablations")
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adaspa_jax import CACHED_SEARCH, SPARSE, AdaSpaConfig
from adaspa_jax.harness import embedded_eval, metrics
from adaspa_jax.models import cogvideox, sampler
from adaspa_jax.models.embedded import caption_check, model as tiny_t2v
from pallas_kernels.validation import EIGHT_BIT_PRECISIONS

PAPER_STEPS = 50
SPARSITIES = (0.7, 0.8, 0.9)
# top-p keeps the fewest blocks whose mass reaches p, so p sets recall, not sparsity:
# 0.9 as in SVG2 (on the embedded model it left sparsity 0.49: one prompt, 10 steps,
# CPU), and two values near the recall AdaSpa keeps there at sparsity 0.8 (0.59), where
# top-p's sparsity should reach the others' 0.7-0.9.
TOP_P = (0.9, 0.75, 0.6)
BASE_SPARSITY = 0.8
WARMUPS = (0, 2, 5, 10)
SCHEDULES = ((10,), (10, 30), (10, 20, 30), (10, 20, 30, 40))
PAPER_SCHEDULE = (10, 30)
TABLE1_TOP_P = 0.9
GRANULARITY_SPARSITIES = (0.8, 0.9)
GRANULARITY_ROWS = (1, 2)  # query block = this many key blocks of rows
GROUPS = ("table1", "policies", "components", "warmup", "schedule", "precision",
          "granularity")
POLICY_NAMES = {"adaspa": "AdaSpa", "svg": "SVG", "minference": "MInference", "topp": "top-p"}


@dataclasses.dataclass(frozen=True)
class Setting:
  """One row of an ablation table.

  Attributes:
    group: one of ``GROUPS``.
    name: the row label.
    config: the AdaSpa config the setting samples with (None: the dense reference).
    params: what the row varies, for tables and figures (JSON-serialisable).
  """
  group: str
  name: str
  config: AdaSpaConfig | None
  params: dict


# ---------------------------------------------------------------- the grid


def paper_step(step: int, num_steps: int) -> int:
  """0-indexed step of ``num_steps`` at the fraction of the paper's 1-indexed ``step`` of 50
  (``step - 1`` when num_steps is 50)."""
  return max(0, math.ceil(num_steps * step / PAPER_STEPS) - 1)


def schedule_steps(schedule: Sequence[int], num_steps: int) -> tuple[int, ...]:
  """0-indexed search steps of a paper schedule (1-indexed of 50); steps that coincide
  when ``num_steps`` is small are merged."""
  return tuple(sorted({paper_step(t, num_steps) for t in schedule}))


def warmup_steps(warmup: int, num_steps: int) -> tuple[int, ...]:
  """Search steps after ``warmup`` dense steps of 50 (scaled, rounded down): the first
  search right after them, the second at the paper's 30th step (dropped if not later)."""
  first = warmup * num_steps // PAPER_STEPS
  second = paper_step(PAPER_SCHEDULE[-1], num_steps)
  return (first, second) if second > first else (first,)


def base_config(num_steps: int = PAPER_STEPS, **overrides) -> AdaSpaConfig:
  """AdaSpa at sparsity 0.8 with the paper's {10, 30} schedule and recall measured at every
  search (so recall means the same for every policy)."""
  fields = dict(sparsity=BASE_SPARSITY, num_steps=num_steps,
                search_steps=schedule_steps(PAPER_SCHEDULE, num_steps), measure_recall=True)
  fields.update(overrides)
  return AdaSpaConfig(**fields)


def _schedule_name(schedule) -> str:
  return "{" + ",".join(str(t) for t in schedule) + "}"


def policy_settings(base: AdaSpaConfig, frame_tokens: int) -> list[Setting]:
  """Dense, then AdaSpa / SVG / MInference at ``SPARSITIES`` and top-p at ``TOP_P``."""
  out = [Setting("policies", "dense", None, {"policy": "dense"})]
  for policy in ("adaspa", "svg", "minference"):
    extra = {"frame_tokens": frame_tokens} if policy == "svg" else {}
    for s in SPARSITIES:
      out.append(Setting("policies", f"{POLICY_NAMES[policy]} s={s}",
                         base.replace(policy=policy, sparsity=s, **extra),
                         {"policy": policy, "sparsity": s}))
  for p in TOP_P:
    out.append(Setting("policies", f"top-p p={p}", base.replace(policy="topp", top_p=p),
                       {"policy": "topp", "top_p": p}))
  return out


def component_settings(base: AdaSpaConfig) -> list[Setting]:
  """AdaSpa at ``base``'s sparsity, head-adaptive x LSE cache, the full method first."""
  out = []
  for head_adaptive in (True, False):
    for lse_cache in (True, False):
      off = ([] if head_adaptive else ["head adaptive"]) + ([] if lse_cache else ["LSE cache"])
      name = "AdaSpa" + ("" if not off else " w/o " + ", w/o ".join(off))
      out.append(Setting("components", name,
                         base.replace(head_adaptive=head_adaptive, lse_cache=lse_cache),
                         {"head_adaptive": head_adaptive, "lse_cache": lse_cache}))
  return out


def table1_settings(base: AdaSpaConfig, frame_tokens: int) -> list[Setting]:
  """Dense; AdaSpa at ``SPARSITIES``; AdaSpa at ``base``'s sparsity w/o head tiers and w/o
  the LSE cache; SVG and MInference at ``base``'s sparsity; top-p at ``TABLE1_TOP_P``."""
  s = base.sparsity
  out = [Setting("table1", "dense", None, {"policy": "dense"})]
  out += [Setting("table1", f"AdaSpa s={x}", base.replace(sparsity=x),
                  {"policy": "adaspa", "sparsity": x}) for x in SPARSITIES]
  out += [Setting("table1", f"AdaSpa s={s} w/o head adaptive",
                  base.replace(head_adaptive=False), {"policy": "adaspa", "sparsity": s,
                                                      "head_adaptive": False}),
          Setting("table1", f"AdaSpa s={s} w/o LSE cache", base.replace(lse_cache=False),
                  {"policy": "adaspa", "sparsity": s, "lse_cache": False}),
          Setting("table1", f"SVG s={s}", base.replace(policy="svg", frame_tokens=frame_tokens),
                  {"policy": "svg", "sparsity": s}),
          Setting("table1", f"MInference s={s}", base.replace(policy="minference"),
                  {"policy": "minference", "sparsity": s}),
          Setting("table1", f"top-p p={TABLE1_TOP_P}",
                  base.replace(policy="topp", top_p=TABLE1_TOP_P),
                  {"policy": "topp", "top_p": TABLE1_TOP_P})]
  return out


def warmup_group(base: AdaSpaConfig) -> list[Setting]:
  return [Setting("warmup", f"warm-up {w}",
                  base.replace(search_steps=warmup_steps(w, base.num_steps)), {"warmup": w})
          for w in WARMUPS]


def schedule_group(base: AdaSpaConfig) -> list[Setting]:
  return [Setting("schedule", _schedule_name(s),
                  base.replace(search_steps=schedule_steps(s, base.num_steps)),
                  {"schedule": list(s)}) for s in SCHEDULES]


def precision_group(base: AdaSpaConfig) -> list[Setting]:
  """AdaSpa at ``base`` in bf16 and in each 8-bit precision ("fp8": e4m3 throughout;
  "int8_fp8": int8 Q.K^T, e4m3 P.V); dense in each 8-bit precision (searching only at
  the last step)."""
  last = base.num_steps - 1
  rows = [Setting("precision", f"AdaSpa s={base.sparsity}", base,
                  {"policy": "adaspa", "precision": "bf16"})]
  for p in EIGHT_BIT_PRECISIONS:
    rows.append(Setting("precision", f"AdaSpa s={base.sparsity} {p}", base.replace(precision=p),
                        {"policy": "adaspa", "precision": p}))
  for p in EIGHT_BIT_PRECISIONS:
    rows.append(Setting("precision", f"dense {p} ({last} of {base.num_steps} steps)",
                        base.replace(precision=p, search_steps=(last,)),
                        {"policy": "dense", "precision": p, "fp8_steps": last}))
  return rows


def granularity_group(base: AdaSpaConfig) -> list[Setting]:
  """AdaSpa at ``GRANULARITY_SPARSITIES`` with query blocks of ``GRANULARITY_ROWS`` x
  ``block_size`` rows; the square rows are ``base``'s own configs (so a run with table1
  samples them once)."""
  bs = base.block_size
  out = []
  for x in GRANULARITY_SPARSITIES:
    for m in GRANULARITY_ROWS:
      qbs = m * bs
      config = base.replace(sparsity=x, query_block_size=None if m == 1 else qbs)
      out.append(Setting("granularity", f"AdaSpa s={x} {qbs}x{bs}", config,
                         {"policy": "adaspa", "sparsity": x, "query_block_size": qbs,
                          "block_size": bs}))
  return out


def grid(*, num_steps: int = PAPER_STEPS, frame_tokens: int, groups: Sequence[str] = GROUPS,
         **base_overrides) -> list[Setting]:
  """The settings of ``groups`` (in ``GROUPS`` order, each once).

  Args:
    num_steps: denoising steps (paper schedules scale to it).
    frame_tokens: video tokens per latent frame (SVG's temporal pattern), e.g.
      ``frame_tokens_of(model)``.
    groups: names from ``GROUPS``.
    base_overrides: fields of ``base_config`` to change (e.g. block_size).
  """
  unknown = [g for g in groups if g not in GROUPS]
  if unknown or not groups:
    raise ValueError(f"groups={list(groups)!r}: expected a non-empty subset of {list(GROUPS)}.")
  if not isinstance(frame_tokens, int) or frame_tokens < 1:
    raise ValueError(f"frame_tokens={frame_tokens!r}: expected a positive int.")
  base = base_config(num_steps, **base_overrides)
  build = {"table1": lambda: table1_settings(base, frame_tokens),
           "policies": lambda: policy_settings(base, frame_tokens),
           "components": lambda: component_settings(base),
           "warmup": lambda: warmup_group(base), "schedule": lambda: schedule_group(base),
           "precision": lambda: precision_group(base),
           "granularity": lambda: granularity_group(base)}
  return [s for g in GROUPS if g in groups for s in build[g]()]


def frame_tokens_of(model: tiny_t2v.TinyT2V) -> int:
  """Video tokens per latent frame: (height / patch) x (width / patch)."""
  cfg = model.config
  p = cfg.transformer.patch_size
  return (cfg.height // p) * (cfg.width // p)


# ---------------------------------------------------------------- sampling


def with_config(transformer: cogvideox.Model, config: AdaSpaConfig) -> cogvideox.Model:
  """The transformer with ``config`` as its AdaSpa config, sharing its weights: the config
  is static in the graph, so a new graph definition is built around the same parameters."""
  tcfg = dataclasses.replace(transformer.config, attention="adaspa", adaspa=config)
  dtype = sampler.input_dtype(transformer)
  shell = nnx.eval_shape(lambda: cogvideox.Model(tcfg, rngs=nnx.Rngs(0), dtype=dtype))
  graphdef, _ = nnx.split(shell)
  _, params = nnx.split(transformer)
  return nnx.merge(graphdef, params)


@dataclasses.dataclass
class Reference:
  """The dense clips every setting is compared with, and the inputs that made them.

  Attributes:
    prompts, seeds: the n prompt/seed pairs.
    chunks: per chunk, (noise, cond, uncond, shared, real) for ``sampler.sample``;
      every chunk has the same batch, the last one padded, ``real`` rows kept.
    videos: float32 [n, F, H, W, 3] in [0, 1].
    checks: ``caption_check.CheckResult`` per clip.
    num_steps, guidance_scale: of the sampling.
    wall_s: sampling seconds without compilation; compile_s: compilation seconds.
  """
  prompts: list[str]
  seeds: list[int]
  chunks: list[tuple]
  videos: np.ndarray
  checks: list
  num_steps: int
  guidance_scale: float
  wall_s: float
  compile_s: float


def _chunks(n: int, batch: int) -> list[tuple[int, int]]:
  """(start, real rows) of ceil(n / batch) chunks of one common size."""
  count = -(-n // batch)
  size = -(-n // count)
  return [(lo, min(size, n - lo)) for lo in range(0, n, size)]


def _sample_chunks(transformer, scheduler, ref_chunks, *, num_steps, guidance_scale,
                   state_fn=None):
  """Samples every chunk (all of one shape, so one compilation); returns (SampleResults,
  wall seconds, compile seconds)."""
  results, wall, compile_s = [], 0.0, 0.0
  for noise, cond, uncond, shared, _ in ref_chunks:
    state = None if state_fn is None else state_fn(2 * noise.shape[0])
    common = dict(num_steps=num_steps, guidance_scale=guidance_scale, shared=shared,
                  adaspa_state=state)
    if not results:
      compile_s = sampler.compile_seconds(transformer, scheduler, noise, cond, uncond, **common)
    start = time.perf_counter()
    results.append(sampler.sample(transformer, scheduler, noise, cond, uncond, **common))
    wall += time.perf_counter() - start
  return results, wall, compile_s


def dense_reference(model: tiny_t2v.TinyT2V, prompts: Sequence[str], *, seed: int = 0,
                    num_steps: int, guidance_scale: float, batch: int = 10) -> Reference:
  """Samples the dense clips of prompt i with noise seed ``seed + i``."""
  if not isinstance(batch, int) or batch < 1:
    raise ValueError(f"batch={batch!r}: expected a positive int.")
  prompts = list(prompts)
  if not prompts:
    raise ValueError("prompts=[]: expected at least one prompt.")
  seeds = [seed + i for i in range(len(prompts))]
  chunks = []
  spans = _chunks(len(prompts), batch)
  size = spans[0][1]
  for lo, real in spans:
    idx = [lo + min(j, real - 1) for j in range(size)]   # pad with the chunk's last pair
    noise, cond, uncond, shared = tiny_t2v.sampler_inputs(
        model, [prompts[i] for i in idx], seed=[seeds[i] for i in idx])
    chunks.append((noise, cond, uncond, shared, real))
  results, wall, compile_s = _sample_chunks(model.transformer, model.config.scheduler(), chunks,
                                            num_steps=num_steps, guidance_scale=guidance_scale)
  videos = _videos(results, chunks)
  checks = [caption_check.check(v, p) for v, p in zip(videos, prompts)]
  return Reference(prompts, seeds, chunks, videos, checks, num_steps, guidance_scale, wall,
                   compile_s)


def _videos(results, chunks) -> np.ndarray:
  return np.concatenate([tiny_t2v.to_video(r.latents)[:c[-1]] for r, c in zip(results, chunks)])


def _real_rows(result: sampler.SampleResult, real: int, field: str) -> np.ndarray:
  """[N, L, 2 real, H] of a per-step record: the padded rows of both guidance halves dropped."""
  x = np.asarray(getattr(result, field), np.float64)
  half = x.shape[2] // 2
  return np.concatenate([x[:, :, :real], x[:, :, half:half + real]], axis=2)


def clip_scores(video, reference, check) -> dict:
  """PSNR (dB, None when identical) and SSIM of one clip [F, H, W, 3] against its dense
  reference, with its caption-check verdicts (lenient, strict, extra objects)."""
  psnr = metrics.psnr(video, reference, data_range=1.0)
  # SSIM per (frame, channel) image: metrics wants [..., H, W].
  ssim = metrics.ssim(np.moveaxis(video, -1, -3), np.moveaxis(reference, -1, -3),
                      data_range=1.0)
  return {"psnr_db": psnr if math.isfinite(psnr) else None, "ssim": ssim,
          "passed": bool(check.passed), "score": float(check.score),
          "strict_passed": bool(check.strict_passed),
          "extra_object": bool(check.extra_objects)}


def summarize(clips: Sequence[dict], recall, sparsity, phases, search_steps, *,
              wall_s: float, compile_s: float, dense_wall_s: float) -> dict:
  """One setting's metrics.

  Args:
    clips: ``clip_scores`` per clip.
    recall, sparsity: float [N, L, B', H] per step (real rows only).
    phases: int [N] phase of each step.
    search_steps: the config's search steps.

  Returns:
    psnr_db: mean per-clip PSNR (None if every clip equals its reference; identical
      clips are left out of the mean, ``identical_clips`` counts them); ssim: mean;
    pass_rate, mean_score: caption check (lenient); strict_pass_rate, extra_object_rate:
    the strict verdict and the share of clips with an extra object; seconds_per_clip:
    wall_s / clips; mean_recall: mean over searches, layers,
    rows and heads; recall_layer_head [L][H]: the same per layer and head;
    sparsity: mean video-block sparsity over the steps that ran sparse attention
    (None if none did); sparse_steps; wall_s, compile_s, speedup (dense / this).
  """
  recall = np.asarray(recall, np.float64)[list(search_steps)]
  sparsity = np.asarray(sparsity, np.float64)
  sparse_steps = [t for t, p in enumerate(np.asarray(phases)) if p in (CACHED_SEARCH, SPARSE)]
  psnrs = [c["psnr_db"] for c in clips if c["psnr_db"] is not None]
  return {
      "psnr_db": float(np.mean(psnrs)) if psnrs else None,
      "identical_clips": len(clips) - len(psnrs),
      "ssim": float(np.mean([c["ssim"] for c in clips])),
      "pass_rate": float(np.mean([c["passed"] for c in clips])),
      "mean_score": float(np.mean([c["score"] for c in clips])),
      "strict_pass_rate": float(np.mean([c["strict_passed"] for c in clips])),
      "extra_object_rate": float(np.mean([c["extra_object"] for c in clips])),
      "seconds_per_clip": wall_s / len(clips),
      "mean_recall": float(recall.mean()),
      "recall_layer_head": recall.mean(axis=(0, 2)).tolist(),
      "sparsity": float(sparsity[sparse_steps].mean()) if sparse_steps else None,
      "sparse_steps": len(sparse_steps),
      "wall_s": wall_s, "compile_s": compile_s,
      "speedup": dense_wall_s / wall_s if wall_s > 0 else None,
  }


def dense_summary(ref: Reference) -> dict:
  return {"psnr_db": None, "identical_clips": len(ref.prompts), "ssim": 1.0,
          "pass_rate": float(np.mean([c.passed for c in ref.checks])),
          "mean_score": float(np.mean([c.score for c in ref.checks])),
          "strict_pass_rate": float(np.mean([c.strict_passed for c in ref.checks])),
          "extra_object_rate": float(np.mean([bool(c.extra_objects) for c in ref.checks])),
          "seconds_per_clip": ref.wall_s / len(ref.checks),
          "mean_recall": 1.0, "recall_layer_head": None, "sparsity": 0.0, "sparse_steps": 0,
          "wall_s": ref.wall_s, "compile_s": ref.compile_s, "speedup": 1.0}


def run_setting(model: tiny_t2v.TinyT2V, config: AdaSpaConfig, ref: Reference):
  """Samples ``ref``'s prompts with ``config``; returns (summary, per-clip scores, the last
  chunk's ``SampleResult``, whose ``adaspa_state`` holds the final block selection)."""
  if config.num_steps != ref.num_steps:
    raise ValueError(f"config.num_steps={config.num_steps}: expected the reference's "
                     f"num_steps={ref.num_steps}.")
  transformer = with_config(model.transformer, config)
  cfg = model.config
  state_fn = lambda rows: transformer.init_adaspa_state(rows, cfg.frames, cfg.height,
                                                        cfg.width, cfg.text.max_length)
  results, wall, compile_s = _sample_chunks(transformer, cfg.scheduler(), ref.chunks,
                                            num_steps=ref.num_steps,
                                            guidance_scale=ref.guidance_scale,
                                            state_fn=state_fn)
  videos = _videos(results, ref.chunks)
  clips = [clip_scores(v, r, caption_check.check(v, p))
           for v, r, p in zip(videos, ref.videos, ref.prompts)]
  reals = [c[-1] for c in ref.chunks]
  recall = np.concatenate([_real_rows(r, n, "recall") for r, n in zip(results, reals)], axis=2)
  sparsity = np.concatenate([_real_rows(r, n, "sparsity") for r, n in zip(results, reals)],
                            axis=2)
  summary = summarize(clips, recall, sparsity, results[0].phases, config.search_steps,
                      wall_s=wall, compile_s=compile_s, dense_wall_s=ref.wall_s)
  return summary, clips, results[-1]


def _jsonable(x):
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.floating, float)):
    return float(x) if math.isfinite(x) else None
  if isinstance(x, (np.integer, np.bool_)):
    return x.item()
  return x


def run(checkpoint, settings: Sequence[Setting], *, n: int, seed: int = 0, num_steps=None,
        guidance_scale=None, batch: int = 10, dtype=jnp.float32, prompts=None,
        log=print) -> dict:
  """Runs ``settings`` over n held-out prompt/seed pairs; returns the results (JSON-ready).

  Args:
    checkpoint: a ``adaspa_jax.models.embedded.model`` checkpoint directory.
    settings: from ``grid``; a setting with ``config=None`` is the dense reference.
    num_steps, guidance_scale: default: the checkpoint's; every config's num_steps must
      equal num_steps.
    batch: prompts sampled together (the denoiser sees 2 x batch rows).
    prompts: n prompts instead of ``embedded_eval.held_out_prompts(n)``.
    log: called with one line per finished setting.

  Returns:
    dict with the run's facts, "dense" (the reference's summary and per-clip verdicts)
    and "settings": per setting its group, name, params, config, summary and per-clip
    scores; settings with equal configs share one run (``"same_run_as"``: the first).
  """
  model = tiny_t2v.load(checkpoint, dtype=dtype, attention="adaspa")
  steps = num_steps or model.config.num_steps
  guidance = model.config.guidance_scale if guidance_scale is None else guidance_scale
  for s in settings:
    if s.config is not None and s.config.num_steps != steps:
      raise ValueError(f"setting {s.name!r} has config.num_steps={s.config.num_steps}: "
                       f"expected num_steps={steps}.")
  prompts = embedded_eval.held_out_prompts(n) if prompts is None else list(prompts)
  if len(prompts) != n:
    raise ValueError(f"prompts has {len(prompts)} entries: expected n={n}.")
  start = time.perf_counter()
  ref = dense_reference(model, prompts, seed=seed, num_steps=steps, guidance_scale=guidance,
                        batch=batch)
  dense = dense_summary(ref)
  log(f"dense: pass {dense['pass_rate']:.0%}, {ref.wall_s:.2f} s (compile {ref.compile_s:.2f} s)")
  done: dict[AdaSpaConfig, tuple[str, dict, list]] = {}
  rows = []
  for s in settings:
    row = {"group": s.group, "name": s.name, "params": s.params}
    if s.config is None:
      row.update(config=None, summary=dense, clips=None)
    else:
      if s.config not in done:
        summary, clips, _ = run_setting(model, s.config, ref)
        done[s.config] = (f"{s.group}/{s.name}", summary, clips)
        log(f"{s.group}/{s.name}: PSNR {summary['psnr_db'] or float('inf'):.2f} dB, "
            f"SSIM {summary['ssim']:.4f}, recall {summary['mean_recall']:.3f}, "
            f"sparsity {summary['sparsity'] or 0:.3f}, pass {summary['pass_rate']:.0%}, "
            f"{summary['wall_s']:.2f} s (compile {summary['compile_s']:.2f} s)")
      else:
        row["same_run_as"] = done[s.config][0]
      row.update(config=dataclasses.asdict(s.config), summary=done[s.config][1],
                 clips=done[s.config][2])
    rows.append(row)
  return _jsonable({
      "checkpoint": str(checkpoint), "n": n, "seed": seed, "num_steps": steps,
      "guidance_scale": guidance, "batch": batch, "dtype": jnp.dtype(dtype).name,
      "device": str(jax.devices()[0]), "total_s": time.perf_counter() - start,
      "prompts": prompts,
      "dense": {"summary": dense, "clips": [
          {"prompt": p, "seed": sd, "passed": bool(c.passed), "score": float(c.score),
           "strict_passed": bool(c.strict_passed), "extra_object": bool(c.extra_objects)}
          for p, sd, c in zip(ref.prompts, ref.seeds, ref.checks)]},
      "settings": rows})
