"""The paper's observations on an embedded model (``adaspa_jax.harness.observations``).

  python -m adaspa_jax.experiments.observe --checkpoint=checkpoints/long_t2v --n=16 \\
      --output_dir=outputs/observations

writes observations.json (overlap of the kept blocks from one search to the next and
across prompts, per layer and head; per-head recall against sparsity), recall.png and
masks.png to ``--output_dir``.
"""

from __future__ import annotations

import json
import os
import shlex
import sys

import jax.numpy as jnp

from adaspa_jax import checkpoints
from adaspa_jax.extras import require
from adaspa_jax.harness import observations

app, flags = require("absl.app"), require("absl.flags")

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "embedded-model checkpoint directory "
                                  "(default: the shipped tiny_t2v)")
_N = flags.DEFINE_integer("n", 8, "held-out prompt/seed pairs")
_SEED = flags.DEFINE_integer("seed", 0, "noise seed of the first pair (pair i: seed + i)")
_SPARSITY = flags.DEFINE_float("sparsity", 0.8, "AdaSpa sparsity of the stability runs")
_SPARSITIES = flags.DEFINE_list("sparsities", ["0.5", "0.7", "0.8", "0.9", "0.95"],
                                "sparsities of the per-head recall curves")
_BATCH = flags.DEFINE_integer("batch", 4, "prompts sampled together")
_BLOCK = flags.DEFINE_integer("block_size", None, "block size (default: the checkpoint's)")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "compute dtype")
_OUT = flags.DEFINE_string("output_dir", "outputs/observations", "where the outputs go")


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  checkpoint = _CHECKPOINT.value or checkpoints.locate("tiny_t2v")
  obs = observations.run(checkpoint, n=_N.value, seed=_SEED.value, sparsity=_SPARSITY.value,
                         sparsities=tuple(float(s) for s in _SPARSITIES.value),
                         batch=_BATCH.value, dtype=jnp.dtype(_DTYPE.value),
                         block_size=_BLOCK.value,
                         masks_png=os.path.join(_OUT.value, "masks.png"))
  obs["command"] = " ".join(["python -m adaspa_jax.experiments.observe"]
                            + [shlex.quote(a) for a in sys.argv[1:]])
  observations.recall_figure(obs, os.path.join(_OUT.value, "recall.png"))
  with open(os.path.join(_OUT.value, "observations.json"), "w") as f:
    json.dump(obs, f, indent=1)
  print(f"search overlap {obs['search_overlap_mean']}, prompt overlap "
        f"{obs['prompt_overlap_mean']}, chance {obs['chance_overlap']:.3f}; wrote "
        f"{_OUT.value}", flush=True)


if __name__ == "__main__":
  app.run(main)
