"""Text-to-video with dense attention, AdaSpa, or both (and how they differ).

By default (``--model=embedded``) it samples the shipped shapes model for one
``--prompt``, dense and with AdaSpa, and prints timing, PSNR/SSIM and both clips'
caption checks (``harness/demo.py``; this is ``make demo``). Otherwise it runs a
Wan2.1, HunyuanVideo or CogVideoX transformer through the whole denoising schedule as
one jitted ``lax.scan`` (``adaspa_jax.models.sampler``). Text encoders and VAEs are
out of scope: the prompt comes as precomputed embeddings (a ``.safetensors`` file
with diffusers' tensor names, see the README) and the result is latents.
Without ``--checkpoint`` the preset runs with random weights, and without
``--embeddings`` on random embeddings: speed work only, and the run says so.

Writes to ``--output_dir``:
  latents_dense.npy / latents_adaspa.npy   float32, the pipeline's latent layout;
  report.json                              settings, wall time per run and, with
                                           AdaSpa, recall and sparsity per search
                                           step, layer, batch row and head; with
                                           ``both``, PSNR/SSIM of AdaSpa vs dense;
  masks.png                                selected key blocks of a few heads.

  python -m adaspa_jax.experiments.generate --prompt="a green triangle spins"
  python -m adaspa_jax.experiments.generate --model=wan --preset=wan2.1-t2v-1.3b --attention=both
  python -m adaspa_jax.experiments.generate --checkpoint=/ckpt/HunyuanVideo/transformer \\
      --embeddings=prompt.safetensors --steps=50 --sparsity=0.8
  python -m adaspa_jax.experiments.generate --model=hunyuan_video --preset=hunyuan-video-13b \\
      --mesh=seq:2
"""

from __future__ import annotations

from adaspa_jax import AdaSpaConfig, checkpoints
from adaspa_jax.extras import require
from adaspa_jax.harness import demo
from adaspa_jax.harness.generation import default_search_steps, run
from adaspa_jax.models import schedulers
from pallas_kernels.validation import PRECISIONS

app, flags = require("absl.app"), require("absl.flags")

_MODEL = flags.DEFINE_enum("model", "embedded",
                           ["embedded", "long", "wan", "hunyuan_video", "cogvideox"],
                           "model family; 'embedded' is the shipped shapes model "
                           "(checkpoints/tiny_t2v, the CPU demo), 'long' the same at 16,384 "
                           "video tokens (checkpoints/long_t2v, for a GPU); others are ignored "
                           "with --checkpoint (read from its config)")
_PROMPT = flags.DEFINE_string("prompt", demo.DEFAULT_PROMPT,
                              "caption for --model=embedded (its grammar: docs/tiny_t2v.md)")
_PRESET = flags.DEFINE_string("preset", "tiny", "the family's preset (e.g. wan2.1-t2v-1.3b, "
                              "hunyuan-video-13b, cogvideox-5b, tiny); random weights")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "diffusers transformer directory "
                                  "(config.json + *.safetensors) or pipeline root")
_EMBEDDINGS = flags.DEFINE_string("embeddings", None, ".safetensors with diffusers' prompt "
                                  "tensors (prompt_embeds, negative_prompt_embeds, ...)")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the initial noise (and random weights)")
_STEPS = flags.DEFINE_integer("steps", None, "denoising steps (default: 50; the embedded "
                              "model: its checkpoint's)")
_ATTENTION = flags.DEFINE_enum("attention", "both", ["dense", "adaspa", "both"], "what to run")
_SPARSITY = flags.DEFINE_float("sparsity", 0.8, "AdaSpa base sparsity")
_BLOCK = flags.DEFINE_integer("block_size", None, "AdaSpa block size (default: 64; the embedded "
                             "model: its checkpoint's, 32)")
_SEARCH = flags.DEFINE_list("search_steps", None, "0-indexed search steps; default the paper's "
                            "10th and 30th of 50 steps, scaled to --steps")
_HEAD_ADAPTIVE = flags.DEFINE_bool("head_adaptive", None, "AdaSpa head hierarchy (default: "
                                   "on; the embedded models: their checkpoint's setting)")
_LSE_CACHE = flags.DEFINE_bool("lse_cache", True, "AdaSpa LSE cache")
_QBLOCK = flags.DEFINE_integer("query_block_size", None, "AdaSpa query rows per list row "
                               "(default: --block_size; 128 over blocks of 64: 128 x 64)")
_PRECISION = flags.DEFINE_enum("precision", "bf16", list(PRECISIONS), "AdaSpa's dense warm-up "
                               "and sparse attention: the inputs' dtype, FP8 or INT8 Q.K^T with FP8 P.V (searches stay "
                               "in the inputs' dtype)")
_IMPL = flags.DEFINE_string("implementation", None, "kernel implementation (default: device)")
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "guidance (default: the pipeline's; "
                               "HunyuanVideo: embedded guidance, no second branch)")
_DYNAMIC_CFG = flags.DEFINE_bool("dynamic_cfg", False, "CogVideoX's use_dynamic_cfg")
_SCHEDULER = flags.DEFINE_enum("scheduler", None, sorted(schedulers.PRESETS),
                               "scheduler preset (default: the model's)")
_SHIFT = flags.DEFINE_float("shift", None, "flow-matching shift override (Wan, HunyuanVideo)")
_FRAMES = flags.DEFINE_integer("latent_frames", None, "latent frames (default: the pipeline's "
                               "default video size)")
_HEIGHT = flags.DEFINE_integer("latent_height", None, "latent height")
_WIDTH = flags.DEFINE_integer("latent_width", None, "latent width")
_TEXT_LEN = flags.DEFINE_integer("text_len", None, "text tokens of random embeddings")
_BATCH = flags.DEFINE_integer("batch", 1, "videos per run")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "model dtype")
_PROGRESS = flags.DEFINE_bool("progress", True, "tqdm bar per denoising step")
_OUT = flags.DEFINE_string("output_dir", "outputs/generate", "where to write results")
_MESH = flags.DEFINE_string("mesh", None, "sequence/head parallel (Ulysses) over N devices: "
                            "'N' or 'seq:N' (default: one device)")
_FSDP = flags.DEFINE_bool("fsdp", False, "with --mesh: shard large weights over the devices "
                          "instead of replicating them")


def main(argv):
  del argv
  is_embedded = _MODEL.value in ("embedded", "long")
  checkpoint = _CHECKPOINT.value
  if _MODEL.value == "long" and checkpoint is None:
    checkpoint = checkpoints.locate("long_t2v")
  steps = _STEPS.value or (demo.default_steps(checkpoint) if is_embedded else 50)
  search = (tuple(int(s) for s in _SEARCH.value) if _SEARCH.value
            else default_search_steps(steps))
  block = _BLOCK.value or (demo.default_block_size(checkpoint) if is_embedded else 64)
  head_adaptive = _HEAD_ADAPTIVE.value
  if head_adaptive is None:
    head_adaptive = demo.default_head_adaptive(checkpoint) if is_embedded else True
  adaspa = AdaSpaConfig(sparsity=_SPARSITY.value, block_size=block,
                        num_steps=steps, search_steps=search,
                        head_adaptive=head_adaptive, lse_cache=_LSE_CACHE.value,
                        implementation=_IMPL.value, query_block_size=_QBLOCK.value,
                        precision=_PRECISION.value)
  if is_embedded:
    if _ATTENTION.value != "both":
      raise app.UsageError(f"--model={_MODEL.value} always compares dense and AdaSpa: "
                           f"--attention={_ATTENTION.value!r}, expected 'both'.")
    demo.run(prompt=_PROMPT.value, checkpoint=checkpoint, seed=_SEED.value,
             adaspa=adaspa, guidance_scale=_GUIDANCE.value, output_dir=_OUT.value)
    return
  run(family=_MODEL.value, preset=_PRESET.value, checkpoint=_CHECKPOINT.value,
      embeddings=_EMBEDDINGS.value, seed=_SEED.value, steps=steps,
      attention=_ATTENTION.value, adaspa=adaspa, guidance_scale=_GUIDANCE.value,
      dynamic_cfg=_DYNAMIC_CFG.value, scheduler=_SCHEDULER.value, shift=_SHIFT.value,
      latent=(_FRAMES.value, _HEIGHT.value, _WIDTH.value), text_len=_TEXT_LEN.value,
      batch=_BATCH.value, dtype=_DTYPE.value, progress=_PROGRESS.value,
      output_dir=_OUT.value, mesh=_MESH.value, fsdp=_FSDP.value)


if __name__ == "__main__":
  app.run(main)
