"""AdaSpa attention on synthetic video-DiT inputs: recall, sparsity and error vs dense.

Runs one attention layer through the AdaSpa schedule (dense warm-up, fused search,
sparse steps, cached search) as a jitted ``lax.scan`` over denoising steps, then
prints one line per phase change.

  python -m adaspa_jax.experiments.attention_demo --frames=8 --height=16 --width=16
"""

from __future__ import annotations

import json

import jax

from adaspa_jax import PHASE_NAMES, AdaSpaConfig
from adaspa_jax.extras import require
from adaspa_jax.harness import synthetic
import pallas_kernels as pk

app, flags = require("absl.app"), require("absl.flags")

_FRAMES = flags.DEFINE_integer("frames", 8, "latent frames")
_HEIGHT = flags.DEFINE_integer("height", 12, "latent height (tokens)")
_WIDTH = flags.DEFINE_integer("width", 16, "latent width (tokens)")
_TEXT = flags.DEFINE_integer("text_len", 40, "text tokens (a suffix, as in HunyuanVideo)")
_HEADS = flags.DEFINE_integer("heads", 6, "attention heads")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "head dimension")
_SPARSITY = flags.DEFINE_float("sparsity", 0.8, "AdaSpa base sparsity")
_BLOCK = flags.DEFINE_integer("block_size", 64, "block size")
_STEPS = flags.DEFINE_integer("steps", 20, "denoising steps")
_SEARCH = flags.DEFINE_list("search_steps", ["4", "12"], "0-indexed search steps")
_HEAD_ADAPTIVE = flags.DEFINE_bool("head_adaptive", True, "three-tier head hierarchy")
_LSE_CACHE = flags.DEFINE_bool("lse_cache", True, "reuse the first search's LSE")
_IMPL = flags.DEFINE_string("implementation", None, "kernel implementation (default: device)")
_INTERPRET = flags.DEFINE_bool("interpret", False, "Pallas interpret mode (CPU)")
_SEED = flags.DEFINE_integer("seed", 0, "random seed")
_JSON = flags.DEFINE_string("json_out", None, "optional path for per-step results as JSON")


def main(argv):
  del argv
  config = AdaSpaConfig(sparsity=_SPARSITY.value, block_size=_BLOCK.value,
                        num_steps=_STEPS.value,
                        search_steps=tuple(int(s) for s in _SEARCH.value),
                        head_adaptive=_HEAD_ADAPTIVE.value, lse_cache=_LSE_CACHE.value,
                        implementation=_IMPL.value)
  seq = _FRAMES.value * _HEIGHT.value * _WIDTH.value + _TEXT.value
  impl = pk.resolve(config.implementation)[0]
  print(f"AdaSpa demo: {_FRAMES.value}x{_HEIGHT.value}x{_WIDTH.value} video + {_TEXT.value} "
        f"text tokens = {seq}, {_HEADS.value} heads x {_HEAD_DIM.value}, block {config.block_size}, "
        f"sparsity {config.sparsity}, kernels: {impl} on {jax.devices()[0].platform}")
  per_step, seconds = synthetic.run_schedule(config, frames=_FRAMES.value, height=_HEIGHT.value,
                                              width=_WIDTH.value, text_len=_TEXT.value,
                                              heads=_HEADS.value, head_dim=_HEAD_DIM.value,
                                              seed=_SEED.value, implementation=_IMPL.value,
                                              interpret=_INTERPRET.value)
  print(f"{'step':>4}  {'phase':<14} {'recall':>7} {'sparsity':>8} {'rel.err vs dense':>17}")
  for t in range(config.num_steps):
    print(f"{t:>4}  {PHASE_NAMES[per_step['phase'][t]]:<14} {per_step['recall'][t]:7.3f} "
          f"{per_step['sparsity'][t]:8.3f} {per_step['rel_error'][t]:17.2e}")
  heads = per_step["head_sparsity"][-1]
  print(f"head sparsities after the last search: {', '.join(f'{x:.3f}' for x in heads)} "
        f"(mean {heads.mean():.3f})")
  print(f"{config.num_steps} steps in {seconds:.2f} s (one jitted lax.scan)")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({k: v.tolist() for k, v in per_step.items()} | {"seconds": seconds}, f)


if __name__ == "__main__":
  app.run(main)
