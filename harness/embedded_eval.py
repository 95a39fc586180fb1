"""Does the embedded model do what its prompts say, with dense attention and with AdaSpa?

For n held-out prompt/seed pairs (captions of ``shapes_data`` stream
``HELD_OUT_STREAM``, prompt i with noise seed ``seed + i``), samples the
checkpoint twice from the same noise, dense and with AdaSpa, and scores every
clip with ``caption_check``. Reports the pass rates (the issue's targets: dense
>= 80% of 50 pairs, AdaSpa at sparsity 0.8 within 5 points), mean scores,
AdaSpa's mean recall and sparsity after its last search, and PSNR / SSIM of the
AdaSpa clips against the dense ones (pixels in [0, 1]), and per mode how many
captioned objects were found with the right colour, shape and motion
(``attribute_counts``).

  from adaspa_jax.harness import embedded_eval
  report = embedded_eval.evaluate("checkpoints/tiny_t2v", n=50)

``direction_sensitivity`` asks a narrower question without sampling: does the
denoiser's error grow when every captioned direction is swapped?
``symmetry_errors`` asks why not: how nearly does the denoiser commute with
mirroring its input or playing it backwards, for a fixed caption?
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from adaspa_jax import AdaSpaConfig
from adaspa_jax.harness import metrics
from adaspa_jax.harness.generation import default_search_steps
from adaspa_jax.models import sampler
from adaspa_jax.models.embedded import caption_check, data as shapes_data, model as tiny_t2v
from adaspa_jax.models.embedded.training import noised

HELD_OUT_STREAM = 2_000_003


def held_out_prompts(n: int, stream: int = HELD_OUT_STREAM) -> list[str]:
  """The captions of clips 0 .. n - 1 of a stream the training never draws from."""
  return list(shapes_data.sample_batch(stream, 0, n).captions)


def attribute_counts(results) -> dict:
  """Per-attribute tally of ``caption_check.CheckResult``s: captioned objects, colours
  found, shapes and motions right, and motions read with the opposite direction."""
  out = dict(objects=0, colour_found=0, shape_right=0, motion_right=0,
             reversed_horizontal=0, reversed_vertical=0)
  opposite = {("left", "right"): "horizontal", ("right", "left"): "horizontal",
              ("up", "down"): "vertical", ("down", "up"): "vertical"}
  for r in results:
    bad = {(colour, attr) for colour, attr, _, _ in r.wrong}
    for item in r.expected:
      found = item.colour not in r.missing
      out["objects"] += 1
      out["colour_found"] += found
      out["shape_right"] += found and (item.colour, "shape") not in bad
      out["motion_right"] += found and (item.colour, "motion") not in bad
    for _, attr, want, got in r.wrong:
      if attr == "motion" and (want, got) in opposite:
        out["reversed_" + opposite[want, got]] += 1
  return out


def evaluate(checkpoint, *, n: int = 50, prompts=None, seed: int = 0, num_steps=None,
             guidance_scale=None, adaspa: AdaSpaConfig | None = None, batch: int = 10,
             dtype=jnp.float32, output_dir=None, masks_png: str | None = None) -> dict:
  """Samples and scores n prompt/seed pairs; returns the report (see the module docstring).

  Args:
    checkpoint: a ``adaspa_jax.models.embedded.model`` checkpoint directory.
    prompts: n prompts instead of ``held_out_prompts(n)``.
    num_steps, guidance_scale: default: the checkpoint's.
    adaspa: AdaSpa settings; default sparsity 0.8 with the paper's search steps
      scaled to ``num_steps`` and the checkpoint's ``adaspa_block_size``.
    batch: prompts sampled together.
    output_dir: if set, writes report.json and the clips, videos_dense.npy and
      videos_adaspa.npy (float32 [n, F, H, W, 3] in [0, 1]).
    masks_png: if set (a file name in ``output_dir``), a PNG of the blocks the last
      chunk's last prompt selected (``generation.plot_masks``).
  """
  probe = tiny_t2v.load(checkpoint)
  steps = num_steps or probe.config.num_steps
  guidance = probe.config.guidance_scale if guidance_scale is None else guidance_scale
  if adaspa is None:
    adaspa = AdaSpaConfig(num_steps=steps, search_steps=default_search_steps(steps),
                          block_size=probe.config.adaspa_block_size,
                          head_adaptive=probe.config.adaspa_head_adaptive)
  if adaspa.num_steps != steps:
    raise ValueError(f"adaspa.num_steps={adaspa.num_steps}: expected num_steps={steps}.")
  model = tiny_t2v.load(checkpoint, dtype=dtype, attention="adaspa", adaspa=adaspa)
  cfg = model.config
  prompts = held_out_prompts(n) if prompts is None else list(prompts)
  if len(prompts) != n:
    raise ValueError(f"prompts has {len(prompts)} entries: expected n={n}.")
  sched = cfg.scheduler()
  videos = {"dense": [], "adaspa": []}
  recall, sparsity, seconds = [], [], {"dense": 0.0, "adaspa": 0.0}
  last_state = None
  for lo in range(0, n, batch):
    chunk = prompts[lo:lo + batch]
    noise, cond, uncond, shared = tiny_t2v.sampler_inputs(
        model, chunk, seed=[seed + i for i in range(lo, lo + len(chunk))])
    common = dict(num_steps=steps, guidance_scale=guidance, shared=shared)
    for mode in ("dense", "adaspa"):
      state = None
      if mode == "adaspa":
        state = model.transformer.init_adaspa_state(2 * len(chunk), cfg.frames, cfg.height,
                                                    cfg.width, cfg.text.max_length)
      start = time.perf_counter()
      result = sampler.sample(model.transformer, sched, noise, cond, uncond,
                              adaspa_state=state, **common)
      seconds[mode] += time.perf_counter() - start
      videos[mode].append(tiny_t2v.to_video(result.latents))
      if mode == "adaspa":
        last_state = result.adaspa_state
        recall.append(np.asarray(result.recall[-1]))        # [L, 2B, H] after the last step
        sparsity.append(np.asarray(result.sparsity[-1]))
  report = {"checkpoint": str(checkpoint), "n": n, "seed": seed, "num_steps": steps,
            "guidance_scale": guidance, "adaspa": dataclasses.asdict(adaspa),
            "seconds_incl_compile": seconds, "clips": []}
  dense, sparse = (np.concatenate(videos[m]) for m in ("dense", "adaspa"))
  checks = {"dense": [], "adaspa": []}
  for i, prompt in enumerate(prompts):
    d, a = caption_check.check(dense[i], prompt), caption_check.check(sparse[i], prompt)
    checks["dense"].append(d)
    checks["adaspa"].append(a)
    report["clips"].append({"prompt": prompt, "seed": seed + i, "dense_passed": d.passed,
                            "adaspa_passed": a.passed, "dense_score": d.score,
                            "adaspa_score": a.score, "dense_strict_passed": d.strict_passed,
                            "adaspa_strict_passed": a.strict_passed,
                            "dense_extra_objects": [dataclasses.asdict(e)
                                                    for e in d.extra_objects],
                            "adaspa_extra_objects": [dataclasses.asdict(e)
                                                     for e in a.extra_objects]})
  clips = report["clips"]
  report.update(
      dense_pass_rate=float(np.mean([c["dense_passed"] for c in clips])),
      adaspa_pass_rate=float(np.mean([c["adaspa_passed"] for c in clips])),
      dense_mean_score=float(np.mean([c["dense_score"] for c in clips])),
      adaspa_mean_score=float(np.mean([c["adaspa_score"] for c in clips])),
      dense_strict_pass_rate=float(np.mean([c["dense_strict_passed"] for c in clips])),
      adaspa_strict_pass_rate=float(np.mean([c["adaspa_strict_passed"] for c in clips])),
      dense_extra_object_rate=float(np.mean([bool(c["dense_extra_objects"]) for c in clips])),
      adaspa_extra_object_rate=float(np.mean([bool(c["adaspa_extra_objects"])
                                              for c in clips])),
      attributes={m: attribute_counts(c) for m, c in checks.items()},
      mean_recall=float(np.mean(np.concatenate(recall, axis=1))),
      mean_sparsity=float(np.mean(np.concatenate(sparsity, axis=1))),
      psnr_db=metrics.psnr(sparse, dense, data_range=1.0),
      # SSIM per (clip, frame, channel) image: metrics wants [..., H, W].
      ssim=metrics.ssim(np.moveaxis(sparse, -1, -3), np.moveaxis(dense, -1, -3),
                        data_range=1.0))
  if output_dir is not None:
    os.makedirs(output_dir, exist_ok=True)
    np.save(os.path.join(output_dir, "videos_dense.npy"), dense)
    np.save(os.path.join(output_dir, "videos_adaspa.npy"), sparse)
    if masks_png is not None:
      from adaspa_jax.harness.generation import plot_masks  # pylint: disable=import-outside-toplevel
      report["masks"] = plot_masks(last_state, os.path.join(output_dir, masks_png),
                                   block_size=adaspa.block_size)
      report["masks_png"] = masks_png
    with open(os.path.join(output_dir, "report.json"), "w") as f:
      json.dump(report, f, indent=1)
  return report


def swap_directions(prompt: str) -> str:
  """The caption with left <-> right and rises <-> falls (other motions kept)."""
  items = shapes_data.parse_caption(prompt)
  swap = {"left": "right", "right": "left", "up": "down", "down": "up"}
  return shapes_data.caption(
      [shapes_data.Item(i.colour, i.shape, swap.get(i.motion, i.motion)) for i in items])


_AXES = {None: {"left", "right", "up", "down"}, "horizontal": {"left", "right"},
         "vertical": {"up", "down"}}


def direction_sensitivity(checkpoint, *, n: int = 64, sigmas=(1.0, 0.97, 0.9, 0.7), seed: int = 0,
                          dtype=jnp.float32, stream: int = HELD_OUT_STREAM,
                          axis: str | None = None) -> dict:
  """Denoising loss with the true captions and with every direction swapped.

  Takes the first n held-out clips whose caption has a directional motion
  (moves left / right, rises, falls), noises each at every sigma with the same
  noise for both captions, and reports the velocity MSE of both. A model that
  reads the direction words does worse with them swapped, so ``relative_gap``
  = (swapped - true) / true measures how much it uses them (0: not at all).

  Args:
    checkpoint: a ``adaspa_jax.models.embedded.model`` checkpoint directory, or a loaded model.
    sigmas: noise levels (0 < sigma <= 1).
    axis: None for any directional clip; "horizontal" (moves left / right) or
      "vertical" (rises / falls) for clips whose directional motions are all
      along that axis, to tell which direction words the model reads.

  Returns:
    {"sigmas", "loss_true", "loss_swapped", "relative_gap"} (lists, one per
    sigma) and "n", "prompts".
  """
  if not (isinstance(n, int) and n >= 1):
    raise ValueError(f"n={n!r}: expected an int >= 1.")
  if not sigmas or not all(0 < float(s) <= 1 for s in sigmas):
    raise ValueError(f"sigmas={sigmas!r}: expected values in (0, 1].")
  if axis not in _AXES:
    raise ValueError(f"axis={axis!r}: expected None, 'horizontal' or 'vertical'.")
  model = (tiny_t2v.load(checkpoint, dtype=dtype) if isinstance(checkpoint, (str, os.PathLike))
           else checkpoint)
  cfg = model.config
  pool = 4 * n if axis is None else 12 * n
  batch = shapes_data.sample_batch(stream, 0, pool, frames=cfg.frames, height=cfg.height,
                                   width=cfg.width)
  wanted, others = _AXES[axis], _AXES[None] - _AXES[axis]
  keep = [i for i, items in enumerate(batch.items)
          if any(it.motion in wanted for it in items)
          and not any(it.motion in others for it in items)][:n]
  if len(keep) < n:
    raise ValueError(f"n={n}: only {len(keep)} of the first {pool} held-out clips have a "
                     f"directional motion{'' if axis is None else ' along ' + axis} only.")
  spec = jax.tree.map(lambda a: np.asarray(a)[keep], batch.spec)
  prompts = [batch.captions[i] for i in keep]
  x0 = tiny_t2v.to_latents(shapes_data.render(spec, cfg.height, cfg.width))
  texts = {"true": model.encode(prompts),
           "swapped": model.encode([swap_directions(p) for p in prompts])}
  rope = tiny_t2v.rotary_embedding(cfg)
  param_dtype = model.transformer.patch_embed.text_proj.kernel.get_value().dtype
  forward = jax.jit(lambda x, text, t: model.transformer(
      x.astype(param_dtype), text.astype(param_dtype), t, image_rotary_emb=rope))
  noise = jax.random.normal(jax.random.key(seed), x0.shape)
  out = {"n": n, "axis": axis, "sigmas": [float(s) for s in sigmas], "loss_true": [],
         "loss_swapped": [], "prompts": prompts}
  for sigma in sigmas:
    x, target, timestep = noised(x0, noise, jnp.full((n,), float(sigma)))
    for name, text in texts.items():
      pred = forward(x, text, timestep).astype(jnp.float32)
      out[f"loss_{name}"].append(float(jnp.mean(jnp.square(pred - target))))
  out["relative_gap"] = [(s - t) / t for t, s in zip(out["loss_true"], out["loss_swapped"])]
  return out


_FLIPS = {"hflip": -1, "vflip": -2, "time": 1}  # axes of latents [B, F, C, H, W]


def symmetry_errors(checkpoint, captions, *, timesteps=(950.0, 500.0), n: int = 2,
                    seed: int = 0, dtype=jnp.float32) -> list[dict]:
  """How far the denoiser is from commuting with flips of its input, per caption.

  For noise x [n, F, C, H, W] (standard normal, ``seed``) and each caption and
  timestep, ``error[T] = |T f(T x) - f(x)| / |f(x)|`` (Frobenius norms) for T a
  left-right mirror ("hflip"), an upside-down mirror ("vflip") or frame
  reversal ("time"). A model with error 0 for T cannot tell a caption's motion
  from its T-image: with "time" or "hflip" near 0 for a caption that says
  "moves left", the clips it samples move left or right as the noise decides.

  Args:
    checkpoint: a ``adaspa_jax.models.embedded.model`` checkpoint directory, or a loaded model.
    captions: prompts of the caption grammar.
    timesteps: denoiser timesteps in [0, 1000].

  Returns:
    one dict per (caption, timestep): "caption", "timestep", "hflip", "vflip", "time".
  """
  if isinstance(captions, str) or not captions:
    raise ValueError(f"captions={captions!r}: expected a non-empty list of prompts.")
  if not (isinstance(n, int) and n >= 1):
    raise ValueError(f"n={n!r}: expected an int >= 1.")
  if not timesteps or not all(0 <= float(t) <= 1000 for t in timesteps):
    raise ValueError(f"timesteps={timesteps!r}: expected values in [0, 1000].")
  model = (tiny_t2v.load(checkpoint, dtype=dtype) if isinstance(checkpoint, (str, os.PathLike))
           else checkpoint)
  cfg = model.config
  rope = tiny_t2v.rotary_embedding(cfg)
  forward = jax.jit(lambda x, text, t: model.transformer(x, text, t, image_rotary_emb=rope))
  x = jax.random.normal(jax.random.key(seed), (n, cfg.frames, 3, cfg.height, cfg.width), dtype)
  rows = []
  for caption in captions:
    text = jnp.repeat(model.encode([caption]), n, axis=0).astype(dtype)
    for t in timesteps:
      ts = jnp.full((n,), float(t), jnp.float32)
      out = np.asarray(forward(x, text, ts), np.float64)
      row = {"caption": caption, "timestep": float(t)}
      for name, axis in _FLIPS.items():
        back = np.flip(np.asarray(forward(jnp.flip(x, axis), text, ts), np.float64), axis)
        row[name] = float(np.linalg.norm(back - out) / np.linalg.norm(out))
      rows.append(row)
  return rows
