"""Runs the paper's ablations on the embedded model (``adaspa_jax.harness.ablations``).

  python -m adaspa_jax.experiments.ablate --n=20 --output_dir=outputs/ablations

writes results.json, tables.md and the figures (policies.png, components.png,
warmup.png, schedule.png) to ``--output_dir``. The default 50 steps apply the
paper's schedules literally ({10, 30} -> 0-indexed steps 9 and 29).
"""

from __future__ import annotations

import shlex
import sys

import jax.numpy as jnp

from adaspa_jax.extras import require
from adaspa_jax.harness import ablation_report, ablations
from adaspa_jax.models.embedded import model as tiny_t2v

app, flags = require("absl.app"), require("absl.flags")

_CHECKPOINT = flags.DEFINE_string("checkpoint", "checkpoints/tiny_t2v",
                                  "adaspa_jax.models.embedded.model checkpoint directory")
_N = flags.DEFINE_integer("n", 20, "held-out prompt/seed pairs")
_SEED = flags.DEFINE_integer("seed", 0, "noise seed of the first pair (pair i: seed + i)")
_STEPS = flags.DEFINE_integer("num_steps", ablations.PAPER_STEPS, "denoising steps")
_GROUPS = flags.DEFINE_list("groups", list(ablations.GROUPS),
                            f"ablation groups, of {list(ablations.GROUPS)}")
_BATCH = flags.DEFINE_integer("batch", 10, "prompts sampled together")
_BLOCK = flags.DEFINE_integer("block_size", 64, "AdaSpa block size")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "compute dtype")
_OUT = flags.DEFINE_string("output_dir", "outputs/ablations", "where the outputs go")


def main(argv):
  del argv
  probe = tiny_t2v.load(_CHECKPOINT.value)
  settings = ablations.grid(num_steps=_STEPS.value, frame_tokens=ablations.frame_tokens_of(probe),
                            groups=_GROUPS.value, block_size=_BLOCK.value)
  results = ablations.run(_CHECKPOINT.value, settings, n=_N.value, seed=_SEED.value,
                          num_steps=_STEPS.value, batch=_BATCH.value,
                          dtype=jnp.dtype(_DTYPE.value))
  results["command"] = " ".join(["python -m adaspa_jax.experiments.ablate"]
                                + [shlex.quote(a) for a in sys.argv[1:]])
  written = ablation_report.write_outputs(results, _OUT.value)
  print(f"{len(settings)} settings in {results['total_s']:.1f} s; wrote {written} to "
        f"{_OUT.value}", flush=True)


if __name__ == "__main__":
  app.run(main)
