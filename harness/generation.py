"""Library behind ``experiments/generate.py``: model and input building, runs, reports.

Kept free of absl flags so tests, notebooks and other launchers can import it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adaspa_jax.extras import require
from adaspa_jax import PHASE_NAMES, AdaSpaConfig, models, parallel
from adaspa_jax.harness import metrics
from adaspa_jax.models import families, parallel as model_parallel, sampler, schedulers


@dataclasses.dataclass
class Inputs:
  """One family's denoiser inputs (see ``adaspa_jax.models.sampler.sample``)."""
  latents: jax.Array
  cond: dict
  uncond: dict | None
  shared: dict
  init_state: object            # batch -> stacked AdaSpaState
  random_embeddings: bool


def default_search_steps(num_steps: int) -> tuple[int, ...]:
  """The paper's searches at the 10th and 30th of 50 steps, at the same fractions."""
  steps = sorted({max(0, math.ceil(num_steps * f) - 1) for f in (0.2, 0.6)})
  return tuple(steps)


def _load_embeddings(path):
  if path is None:
    return None
  load_file = require("safetensors.numpy", "cli").load_file
  return load_file(path)


def _embedding(emb, name, shape, rng, dtype, *, required=True):
  if emb is None:
    return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
  if name not in emb:
    if not required:
      return None
    raise ValueError(f"--embeddings has no tensor {name!r}: expected diffusers' names "
                     f"(has {sorted(emb)}).")
  x = emb[name]
  if x.ndim != len(shape) or x.shape[-1] != shape[-1]:
    raise ValueError(f"--embeddings tensor {name!r} has shape {x.shape}: expected "
                     f"[batch, ..., {shape[-1]}] like {shape}.")
  if x.shape[0] not in (1, shape[0]):
    raise ValueError(f"--embeddings tensor {name!r} has batch {x.shape[0]}: expected 1 or "
                     f"--batch={shape[0]}.")
  return jnp.asarray(np.broadcast_to(x, (shape[0],) + x.shape[1:]), dtype)


def build_inputs(family: str, model, *, batch, frames, height, width, text_len, embeddings,
                 guidance_scale, seed) -> Inputs:
  """Initial noise and conditioning as the family's diffusers pipeline prepares them."""
  cfg, dtype = model.config, sampler.input_dtype(model)
  rng = np.random.default_rng(seed)
  emb = _load_embeddings(embeddings)

  def noise(shape):
    return jnp.asarray(rng.standard_normal(shape, np.float32))
  if family == "wan":
    latents = noise((batch, cfg.in_channels, frames, height, width))
    text = (batch, text_len, cfg.text_dim)
    cond = {"encoder_hidden_states": _embedding(emb, "prompt_embeds", text, rng, dtype)}
    uncond = {"encoder_hidden_states": _embedding(emb, "negative_prompt_embeds", text, rng,
                                                  dtype)}
    return Inputs(latents, cond, uncond, {},
                  lambda b: model.init_adaspa_state(b, frames, height, width), emb is None)
  if family == "hunyuan_video":
    latents = noise((batch, cfg.in_channels, frames, height, width))
    text = (batch, text_len, cfg.text_embed_dim)
    embeds = _embedding(emb, "prompt_embeds", text, rng, dtype)
    n_text = embeds.shape[1]
    mask = None
    if emb is not None:
      mask = _embedding(emb, "prompt_attention_mask", (batch, n_text), rng, jnp.int32,
                        required=False)
    cond = {"encoder_hidden_states": embeds,
            "encoder_attention_mask": jnp.ones((batch, n_text), jnp.int32) if mask is None
            else mask,
            "pooled_projections": _embedding(emb, "pooled_prompt_embeds",
                                             (batch, cfg.pooled_projection_dim), rng, dtype)}
    if cfg.guidance_embeds:
      cond["guidance"] = jnp.full((batch,), guidance_scale * 1000.0, jnp.float32)
    return Inputs(latents, cond, None, {},
                  lambda b: model.init_adaspa_state(b, frames, height, width, n_text),
                  emb is None)
  from adaspa_jax.models import cogvideox  # family-specific helper
  latents = noise((batch, frames, cfg.in_channels, height, width))
  text = (batch, cfg.max_text_seq_length if text_len is None else text_len, cfg.text_embed_dim)
  cond = {"encoder_hidden_states": _embedding(emb, "prompt_embeds", text, rng, dtype)}
  uncond = {"encoder_hidden_states": _embedding(emb, "negative_prompt_embeds", text, rng, dtype)}
  n_text = cond["encoder_hidden_states"].shape[1]
  shared = {}
  if cfg.use_rotary_positional_embeddings:
    shared["image_rotary_emb"] = cogvideox.rotary_positional_embeddings(cfg, frames, height,
                                                                        width)
  return Inputs(latents, cond, uncond, shared,
                lambda b: model.init_adaspa_state(b, frames, height, width, n_text), emb is None)


def build_model(*, family, preset, checkpoint, adaspa: AdaSpaConfig, dtype, seed):
  """(family, model, random_weights); the model is built for AdaSpa, and runs dense
  when called without a state."""
  if checkpoint is not None:
    model = models.from_pretrained(checkpoint, dtype=dtype, attention="adaspa", adaspa=adaspa)
    return families.of_model(model).name, model, False
  module = families.get(family).load()
  if preset not in module.PRESETS:
    raise ValueError(f"--preset={preset!r}: expected one of {sorted(module.PRESETS)} for "
                     f"--model={family}.")
  config = dataclasses.replace(module.PRESETS[preset], attention="adaspa", adaspa=adaspa)
  return family, module.Model(config, rngs=nnx.Rngs(seed), dtype=dtype), True


def block_mask(indices, counts, num_blocks) -> np.ndarray:
  """bool [nQ, nK] of one head from its index lists (int [nQ, K_max], counts [nQ]);
  a count >= nK marks a dense row (text queries), whose list is not spelled out."""
  mask = np.zeros((len(counts), num_blocks), bool)
  for q, (row, n) in enumerate(zip(np.asarray(indices), np.asarray(counts))):
    if n >= num_blocks:
      mask[q] = True
    else:
      mask[q, row[:n]] = True
  return mask


def plot_masks(state, path, *, block_size: int, max_layers=3, max_heads=2) -> list[dict]:
  """PNG of the selected blocks of the last batch row (a conditional branch) for the
  first, middle and last layer and the first and last head; returns what it drew.

  ``block_size``: the key blocks' tokens (the config's ``block_size``); the key-block
  count is ceil(S / block_size) for the state's S, the query blocks are the lists' rows
  (more than one key block each with ``query_block_size``)."""
  import matplotlib  # the "video" extra, needed only here
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib import ticker
  indices, counts = np.asarray(state.indices), np.asarray(state.counts)   # [L, B, H, nQ, K]
  n_layers, _, n_heads, _ = counts.shape
  n_blocks = -(-state.lse.shape[-1] // block_size)
  layers = sorted({0, n_layers // 2, n_layers - 1})[:max_layers]
  heads = sorted({0, n_heads - 1})[:max_heads]
  fig, axes = plt.subplots(len(layers), len(heads), squeeze=False,
                           figsize=(3 * len(heads), 3 * len(layers)))
  drawn = []
  for r, layer in enumerate(layers):
    for c, head in enumerate(heads):
      mask = block_mask(indices[layer, -1, head], counts[layer, -1, head], n_blocks)
      ax = axes[r][c]
      ax.imshow(mask, cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
      ax.set_title(f"layer {layer} head {head}: {mask.mean():.0%} kept", fontsize=8)
      ax.set_xlabel("key block", fontsize=7)
      ax.set_ylabel("query block", fontsize=7)
      ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
      ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
      drawn.append({"layer": layer, "head": head, "kept": float(mask.mean())})
  fig.suptitle(f"selected key blocks (black) after the last search, batch row "
               f"{counts.shape[1] - 1}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return drawn


def _rounded(x, digits=4):
  return np.round(np.asarray(x, np.float64), digits).tolist()


def _loud(lines):
  bar = "!" * 78
  print("\n".join([bar] + [f"!! {line}" for line in lines] + [bar]), file=sys.stderr,
        flush=True)


def run(*, family="wan", preset="tiny", checkpoint=None, embeddings=None, seed=0, steps=50,
        attention="both", adaspa: AdaSpaConfig | None = None, guidance_scale=None,
        dynamic_cfg=False, scheduler=None, shift=None, latent=(None, None, None),
        text_len=None, batch=1, dtype="bfloat16", progress=True, output_dir="outputs/generate",
        mesh=None, fsdp=False):
  """Runs the requested attention modes and writes the outputs; returns the report.

  ``mesh`` ("N" or "seq:N", see ``adaspa_jax.parallel.parse_mesh``) runs the
  model sequence/head-parallel over N devices, weights replicated or, with
  ``fsdp``, sharded.
  """
  sp = parallel.parse_mesh(mesh)
  if fsdp and sp is None:
    raise ValueError("--fsdp without --mesh: expected --mesh=N (weights are sharded over "
                     "the mesh's devices).")
  if adaspa is None:
    adaspa = AdaSpaConfig(num_steps=steps, search_steps=default_search_steps(steps))
  family, model, random_weights = build_model(family=family, preset=preset,
                                              checkpoint=checkpoint, adaspa=adaspa,
                                              dtype=jnp.dtype(dtype), seed=seed)
  if sp is not None:
    model_parallel.shard_model(model, sp, fsdp=fsdp)
  fam = families.get(family)
  sched = schedulers.get(scheduler or fam.scheduler)
  if shift is not None:
    if not isinstance(sched, schedulers.FlowMatchEuler):
      raise ValueError(f"--shift={shift}: only flow-matching schedulers have a shift, not "
                       f"{type(sched).__name__}.")
    sched = dataclasses.replace(sched, shift=shift)
  guidance = fam.guidance_scale if guidance_scale is None else guidance_scale
  frames, height, width = (d if d is not None else fd for d, fd in zip(latent, fam.latent))
  inputs = build_inputs(family, model, batch=batch, frames=frames, height=height, width=width,
                        text_len=fam.text_len if text_len is None else text_len,
                        embeddings=embeddings, guidance_scale=guidance, seed=seed)
  if random_weights or inputs.random_embeddings:
    _loud([f"RANDOM WEIGHTS: preset {preset!r} of {family} is randomly initialised "
           "(no --checkpoint)." if random_weights else "weights from " + str(checkpoint),
           "RANDOM EMBEDDINGS: no --embeddings given." if inputs.random_embeddings
           else "embeddings from " + str(embeddings),
           "The latents are not a video of anything: use this run for speed work only."])
  guided = fam.guided and guidance > 1.0
  uncond = inputs.uncond if guided else None
  row_batch = 2 * batch if guided else batch
  os.makedirs(output_dir, exist_ok=True)
  report = {
      "model": family, "preset": None if checkpoint else preset, "checkpoint": checkpoint,
      "random_weights": random_weights, "random_embeddings": inputs.random_embeddings,
      "embeddings": embeddings, "dtype": dtype, "seed": seed, "num_steps": steps,
      "latent_shape": list(inputs.latents.shape), "scheduler": repr(sched),
      "guidance_scale": guidance, "classifier_free_guidance": guided,
      "batch_rows": (["uncond"] * batch + ["cond"] * batch) if guided else ["cond"] * batch,
      "device": str(jax.devices()[0]), "runs": {},
      "mesh_devices": 1 if sp is None else sp.size, "fsdp": bool(fsdp),
  }
  common = dict(num_steps=steps, guidance_scale=guidance, shared=inputs.shared,
                key=jax.random.key(seed + 2), dynamic_cfg=dynamic_cfg, progress=progress)
  results = {}
  for mode in (["dense", "adaspa"] if attention == "both" else [attention]):
    state = None
    if mode == "adaspa":
      make = lambda: inputs.init_state(row_batch)
      state = make() if sp is None else model_parallel.init_state(make, sp)
    args = (model, sched, inputs.latents, inputs.cond, uncond)
    compile_s = sampler.compile_seconds(*args, adaspa_state=state, **common)
    start = time.perf_counter()
    results[mode] = sampler.sample(*args, adaspa_state=state, **common)
    wall = time.perf_counter() - start
    name = f"latents_{mode}.npy"
    np.save(os.path.join(output_dir, name), np.asarray(results[mode].latents, np.float32))
    report["runs"][mode] = {"wall_s": wall, "compile_s": compile_s, "latents": name}
    print(f"{mode}: {steps} steps in {wall:.2f} s (compile {compile_s:.2f} s)", flush=True)

  if "adaspa" in results:
    res = results["adaspa"]
    report["adaspa"] = dataclasses.asdict(adaspa)
    report["phases"] = [PHASE_NAMES[p] for p in res.phases]
    report["layout"] = "[layer][batch row][head]"
    report["searches"] = [
        {"step": int(t), "phase": PHASE_NAMES[res.phases[t]], "recall": _rounded(res.recall[t]),
         "sparsity": _rounded(res.sparsity[t])} for t in adaspa.search_steps]
    report["mean_recall"] = float(res.recall[-1].mean())
    report["mean_sparsity"] = float(res.sparsity[-1].mean())
    report["masks"] = plot_masks(res.adaspa_state, os.path.join(output_dir, "masks.png"),
                                 block_size=adaspa.block_size)
    report["masks_png"] = "masks.png"
    print(f"adaspa: mean recall {report['mean_recall']:.3f}, mean sparsity "
          f"{report['mean_sparsity']:.3f} after the last search")
  if len(results) == 2:
    ref = np.asarray(results["dense"].latents)
    x = np.asarray(results["adaspa"].latents)
    p = metrics.psnr(x, ref)
    report["psnr_db"] = p if math.isfinite(p) else None   # None: identical latents
    report["ssim"] = metrics.ssim(x, ref)
    report["speedup"] = report["runs"]["dense"]["wall_s"] / report["runs"]["adaspa"]["wall_s"]
    print(f"AdaSpa vs dense latents: PSNR {p:.2f} dB, SSIM {report['ssim']:.4f}, "
          f"speedup {report['speedup']:.2f}x")
  with open(os.path.join(output_dir, "report.json"), "w") as f:
    json.dump(report, f, indent=1)
  return report
