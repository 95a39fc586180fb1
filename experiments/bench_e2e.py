"""End-to-end speed of AdaSpa vs dense (cuDNN) at real model sizes, random weights.

Builds a preset's architecture (default: the family's real model at 720p) with
``--layers`` transformer blocks, times one denoising step of each kind and the
attention alone, composes the ``--steps`` schedule (the paper's by default),
and reports the end-to-end speedup beside its Amdahl ceiling
(``harness/e2e.py`` says how). ``--full_run`` also runs the scanned
sampler end to end, dense and AdaSpa; ``--sweep_seconds`` repeats the
per-step timing over video lengths. Writes ``e2e_<model>_<date><tag>.json``
(every time), ``.md`` (the tables) and, with a sweep, ``_sweep.png`` to
``--output_dir``, after every stage.

  python -m adaspa_jax.experiments.bench_e2e --model=hunyuan_video --layers=2 --full_run
  python -m adaspa_jax.experiments.bench_e2e --model=hunyuan_video --layers=2 \\
      --query_block_size=128   # the 128 x 64 tiling (query rows x keys per list entry)
  python -m adaspa_jax.experiments.bench_e2e --model=hunyuan_video --layers=1 \\
      --sweep_seconds=2,5,8,16
  python -m adaspa_jax.experiments.bench_e2e --model=hunyuan_video --layers=2 --mesh=2
  python -m adaspa_jax.experiments.bench_e2e --model=wan --preset=tiny --dtype=float32 \\
      --implementation=reference --latent_height=8 --latent_width=10 --video_seconds=0.5 \\
      --steps=4 --search_steps=1,2 --block_size=16 --layers=1 --reps=1   # CPU smoke run
"""

from __future__ import annotations

import sys

from adaspa_jax.extras import require
from adaspa_jax.harness import e2e, e2e_report
from pallas_kernels.validation import PRECISIONS

app, flags = require("absl.app"), require("absl.flags")

_MODEL = flags.DEFINE_enum("model", "hunyuan_video", sorted(e2e.VIDEOS), "model family")
_PRESET = flags.DEFINE_string("preset", None, "the family's preset (default: the real model: "
                              + ", ".join(f"{k} {v.preset}" for k, v in e2e.VIDEOS.items())
                              + ")")
_LAYERS = flags.DEFINE_integer("layers", 2, "transformer blocks built (HunyuanVideo: dual and "
                               "single blocks in the preset's 1:2 ratio)")
_STEPS = flags.DEFINE_integer("steps", 50, "denoising steps of the schedule")
_SPARSITY = flags.DEFINE_float("sparsity", 0.8, "AdaSpa base sparsity")
_BLOCK = flags.DEFINE_integer("block_size", 64, "AdaSpa block size")
_QBLOCK = flags.DEFINE_integer("query_block_size", None, "query rows per list row (default: "
                               "--block_size); 128 with --block_size=64 is the 128 x 64 tiling")
_PRECISION = flags.DEFINE_enum("precision", "bf16", list(PRECISIONS), "AdaSpa's dense warm-up "
                               "and sparse attention (fp8: e4m3 throughout; int8_fp8: int8 Q.K^T, e4m3 P.V; the dense baseline stays bf16 cuDNN)")
_SEARCH = flags.DEFINE_list("search_steps", None, "0-indexed search steps; default the paper's "
                            "10th and 30th of 50 steps, scaled to --steps")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "weights and "
                           "activations")
_IMPL = flags.DEFINE_enum("implementation", None, ["reference", "triton", "mosaic"],
                          "AdaSpa kernels (default: the fastest on the device)")
_SECONDS = flags.DEFINE_float("video_seconds", None, "seconds of video (sets the latent frames "
                              "from the model's fps; default: the 720p default video)")
_FRAMES = flags.DEFINE_integer("latent_frames", None, "latent frames (default: 720p video's)")
_HEIGHT = flags.DEFINE_integer("latent_height", None, "latent height (default: 720p's)")
_WIDTH = flags.DEFINE_integer("latent_width", None, "latent width (default: 720p's)")
_TEXT_LEN = flags.DEFINE_integer("text_len", None, "text tokens (default: the pipeline's)")
_REPS = flags.DEFINE_integer("reps", 3, "timed calls per step kind (median reported)")
_FULL_RUN = flags.DEFINE_bool("full_run", False, "also run the scanned sampler end to end, "
                              "dense and AdaSpa")
_SWEEP = flags.DEFINE_list("sweep_seconds", [], "seconds of video for the length sweep, e.g. "
                           "2,5,8,16,24 (HunyuanVideo 720p at 24 s: ~522K tokens)")
_SWEEP_LAYERS = flags.DEFINE_integer("sweep_layers", 1, "transformer blocks built for the sweep")
_SWEEP_REPS = flags.DEFINE_integer("sweep_reps", None, "timed calls per step kind in the sweep "
                                   "(default: --reps)")
_MESH = flags.DEFINE_string("mesh", None, "sequence/head parallel (Ulysses) over N devices: "
                            "'N' or 'seq:N' (default: one device)")
_FSDP = flags.DEFINE_bool("fsdp", False, "with --mesh: shard large weights over the devices")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the weights, noise and embeddings")
_OUT = flags.DEFINE_string("output_dir", "outputs/bench_e2e", "where the results go")
_TAG = flags.DEFINE_string("tag", "", "suffix of the output file names")


def main(argv):
  del argv
  paths = {}

  def save(results):
    paths.update(e2e_report.write(results, _OUT.value, _TAG.value))

  results = e2e.run(
      family=_MODEL.value, preset=_PRESET.value, layers=_LAYERS.value, steps=_STEPS.value,
      sparsity=_SPARSITY.value, block_size=_BLOCK.value, query_block_size=_QBLOCK.value,
      precision=_PRECISION.value,
      search_steps=[int(s) for s in _SEARCH.value] if _SEARCH.value else None,
      dtype=_DTYPE.value, implementation=_IMPL.value,
      latent=(_FRAMES.value, _HEIGHT.value, _WIDTH.value), video_seconds=_SECONDS.value,
      text_len=_TEXT_LEN.value, reps=_REPS.value, do_full_run=_FULL_RUN.value,
      sweep_seconds=[float(s) for s in _SWEEP.value], sweep_layers=_SWEEP_LAYERS.value,
      sweep_reps=_SWEEP_REPS.value,
      mesh=_MESH.value, fsdp=_FSDP.value, seed=_SEED.value,
      command=e2e_report.command_line(sys.argv), save=save)
  save(results)
  print(e2e_report.table(results))
  for kind, path in sorted(paths.items()):
    print(f"wrote {kind}: {path}")


if __name__ == "__main__":
  app.run(main)
