"""The embedded default: one prompt through the shipped shapes model, dense vs AdaSpa.

What ``make demo`` runs (through ``experiments/generate.py --model=embedded``): samples
the committed checkpoint (``checkpoints/tiny_t2v``, see docs/tiny_t2v.md) from the same
noise with dense attention and with AdaSpa, scores both clips with the analytic caption
check (colour, shape and motion from the pixels; its strict verdict also fails a clip that
shows an object the caption does not name), compares them (PSNR / SSIM), and writes the
clips as GIFs, one side-by-side GIF (dense | AdaSpa | absolute difference) and a PNG of the
selected block masks.
"""

from __future__ import annotations

import os

import numpy as np

from adaspa_jax import AdaSpaConfig, checkpoints
from adaspa_jax.extras import require
from adaspa_jax.models.embedded import model as tiny_t2v

CHECKPOINT = checkpoints.locate("tiny_t2v")
DEFAULT_PROMPT = "a red circle moves left, a blue square falls"


def default_steps(checkpoint=None) -> int:
  """Denoising steps the checkpoint was made for."""
  return int(tiny_t2v.read_meta(checkpoint or CHECKPOINT)["num_steps"])


def default_block_size(checkpoint=None) -> int:
  """AdaSpa block size the checkpoint is sampled with (``TinyT2VConfig.adaspa_block_size``)."""
  return int(tiny_t2v.read_meta(checkpoint or CHECKPOINT)["adaspa_block_size"])


def default_head_adaptive(checkpoint=None) -> bool:
  """Whether the checkpoint is sampled with AdaSpa's head tiers
  (``TinyT2VConfig.adaspa_head_adaptive``)."""
  return bool(tiny_t2v.read_meta(checkpoint or CHECKPOINT)["adaspa_head_adaptive"])


def write_gif(path, video, *, scale=4, fps=8):
  """video: float [F, H, W, 3] in [0, 1]; nearest-neighbour upscaled so 48 px is visible."""
  frames = np.clip(np.asarray(video) * 255.0 + 0.5, 0, 255).astype(np.uint8)
  frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
  require("imageio.v3").imwrite(path, frames, extension=".gif", duration=1000 / fps, loop=0)


def side_by_side(dense, adaspa, *, gap=2) -> np.ndarray:
  """[F, H, 3 W + 2 gap, 3]: dense | AdaSpa | |AdaSpa - dense| (white gaps), in [0, 1]."""
  dense, adaspa = np.asarray(dense, np.float32), np.asarray(adaspa, np.float32)
  if dense.shape != adaspa.shape or dense.ndim != 4:
    raise ValueError(f"dense, adaspa have shapes {dense.shape}, {adaspa.shape}: expected two "
                     "[F, H, W, 3] clips of one shape.")
  white = np.ones(dense.shape[:2] + (gap, 3), np.float32)
  return np.concatenate([dense, white, adaspa, white, np.abs(adaspa - dense)], axis=2)


def _verdict(clip, mode) -> str:
  strict = "PASS" if clip[f"{mode}_strict_passed"] else "FAIL"
  lenient = "PASS" if clip[f"{mode}_passed"] else "fail"
  extras = "; ".join(
      f"{'second ' if e['captioned'] else 'extra '}{e['colour']} object in frames "
      f"{e['first_frame']}-{e['first_frame'] + e['frames'] - 1}"
      for e in clip[f"{mode}_extra_objects"])
  return (f"caption check: strict {strict}{' (' + extras + ')' if extras else ''}, "
          f"attributes {lenient} ({clip[f'{mode}_score']:.0%} match)")


def run(*, prompt=DEFAULT_PROMPT, checkpoint=None, seed=0, adaspa: AdaSpaConfig,
        guidance_scale=None, output_dir="outputs/demo") -> dict:
  """Samples ``prompt`` dense and with AdaSpa; prints and returns the report.

  Writes ``report.json``, ``clip_dense.gif``, ``clip_adaspa.gif`` and the float32 videos
  (``videos_{dense,adaspa}.npy``, [1, F, H, W, 3] in [0, 1]) to ``output_dir``.
  """
  from adaspa_jax.harness import embedded_eval  # embedded_eval imports harness.generation

  checkpoint = checkpoint or CHECKPOINT
  report = embedded_eval.evaluate(checkpoint, n=1, prompts=[prompt], seed=seed,
                                  num_steps=adaspa.num_steps, guidance_scale=guidance_scale,
                                  adaspa=adaspa, batch=1, output_dir=output_dir,
                                  masks_png="masks.png")
  videos = {}
  for mode in ("dense", "adaspa"):
    videos[mode] = np.load(os.path.join(output_dir, f"videos_{mode}.npy"))[0]
    write_gif(os.path.join(output_dir, f"clip_{mode}.gif"), videos[mode])
  write_gif(os.path.join(output_dir, "side_by_side.gif"),
            side_by_side(videos["dense"], videos["adaspa"]))
  clip = report["clips"][0]
  seconds = report["seconds_incl_compile"]
  print(f'prompt: "{prompt}" (seed {seed}, {report["num_steps"]} steps, guidance '
        f'{report["guidance_scale"]}, AdaSpa sparsity {adaspa.sparsity}, block '
        f"{adaspa.block_size}, head tiers {'on' if adaspa.head_adaptive else 'off'}, "
        f"searches at {list(adaspa.search_steps)})")
  for mode in ("dense", "adaspa"):
    print(f"  {mode:<6} {seconds[mode]:6.1f} s (incl. compile)  {_verdict(clip, mode)}")
  print(f"  AdaSpa vs dense: PSNR {report['psnr_db']:.2f} dB, SSIM {report['ssim']:.3f}; "
        f"mean recall {report['mean_recall']:.3f} at sparsity {report['mean_sparsity']:.3f}")
  print(f"  clips: {os.path.join(output_dir, 'side_by_side.gif')} (dense | AdaSpa | "
        f"difference), clip_dense.gif, clip_adaspa.gif; masks: "
        f"{os.path.join(output_dir, 'masks.png')}")
  return report
