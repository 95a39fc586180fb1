"""Checks the AdaSpa kernels against the reference, then times them against cuDNN.

On a GPU, in one process: (1) each implementation's three kernels are compared
with ``implementation="reference"`` at a small size (odd length, padded rows,
dense rows); (2) optionally a sweep of Triton tiles at the first sequence length;
(3) for each sequence length, cuDNN dense attention
(``jax.nn.dot_product_attention(..., implementation="cudnn")``) and each
implementation's block-sparse attention at each density (random index lists,
the same count for every row), ``block_mass`` and ``attention_with_block_mass``.
Prints a table, writes JSON and a PNG of time vs density with the ideal line
(cuDNN dense time x density). The library is ``harness/kernel_bench.py`` (timing:
its docstring).

  python -m adaspa_jax.experiments.bench_kernels --seq_lens=32768,118784 --out_dir=/tmp/bench
  python -m adaspa_jax.experiments.bench_kernels --check_only --interpret --seq_lens=64 \\
      --heads=2 --head_dim=64 --dtype=float32   # CPU smoke run

``--query_block_size=128`` (with ``--block_size=64``) also times lists of one row per
128-row query block (the 128 x 64 granularity) beside the 64 x 64 ones, and checks
every implementation at that granularity.

``--flex`` adds PyTorch FlexAttention (``harness/flex_peer.py``, torch from the
``parity`` extra) as a peer: checked against the reference at ``--check_seq``, then timed
(CUDA events) on the same random lists as our kernels at every length and density (and
at ``--query_block_size``), in the same process as the cuDNN baseline, with TFLOP/s,
the ratio to cuDNN (``tflops_vs_baseline``) and the torch version in the JSON. Without
torch, or if Flex fails to compile, the error is recorded and the other rows still come.
JAX preallocates 75% of GPU memory by default, which leaves torch little room: with
``--flex`` the launcher sets ``XLA_PYTHON_CLIENT_MEM_FRACTION=0.5`` unless it is already
set (or set ``XLA_PYTHON_CLIENT_PREALLOCATE=false``), and frees torch's cached memory
after each size:

  python -m adaspa_jax.experiments.bench_kernels --implementations=mosaic --block_size=64 \\
      --query_block_size=128 --densities=0.2 --seq_lens=32768,118784 --reps=5 --flex
"""

from __future__ import annotations

import os
import sys

from adaspa_jax.extras import require
from adaspa_jax.harness import kernel_bench
from pallas_kernels import api

app, flags = require("absl.app"), require("absl.flags")

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["32768", "118784"], "sequence lengths to time")
_BATCH = flags.DEFINE_integer("batch", 1, "batch size")
_HEADS = flags.DEFINE_integer("heads", 24, "attention heads")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "head dimension")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"], "dtype")
_BLOCK = flags.DEFINE_integer("block_size", 64, "selection block size")
_QBLOCK = flags.DEFINE_integer("query_block_size", None,
                               "rows per query block of the lists (a power-of-two multiple "
                               "of block_size, <= 128); None: square blocks only")
_DENSITIES = flags.DEFINE_list("densities", ["0.05", "0.1", "0.2", "0.3", "0.5", "0.75", "1.0"],
                               "fractions of key blocks each query block reads")
_IMPLS = flags.DEFINE_list("implementations", ["triton"],
                           f"any of {sorted(api.IMPLEMENTATIONS)}")
_OUT_DIR = flags.DEFINE_string("out_dir", "out/bench", "where the JSON and PNG go")
_CHECK_ONLY = flags.DEFINE_bool("check_only", False, "only the correctness checks")
_INTERPRET = flags.DEFINE_bool("interpret", False, "Pallas interpret mode (CPU)")
_CHECK_SEQ = flags.DEFINE_integer("check_seq", 1000, "sequence length of the checks")
_REPS = flags.DEFINE_integer("reps", 5, "timed reps (median reported)")
_SWEEP = flags.DEFINE_bool("sweep", False, "sweep Triton tiles at the first sequence length")
_TAG = flags.DEFINE_string("tag", "", "suffix of the output file names")
_FROM_JSON = flags.DEFINE_string("from_json", None,
                                 "re-print the table and re-plot from a results JSON, then exit")
_BASELINE = flags.DEFINE_enum("baseline", "cudnn", ["cudnn", "xla"],
                              "dense baseline implementation (xla only for CPU dry runs)")
_FLEX = flags.DEFINE_bool("flex", False,
                          "also check and time PyTorch FlexAttention on the same lists")

# JAX's share of GPU memory with --flex (unless set in the environment): torch needs room
# for FlexAttention's output, compile and block mask beside JAX's pool.
FLEX_XLA_MEM_FRACTION = "0.5"


def main(argv):
  del argv
  if _FROM_JSON.value:
    kernel_bench.replot(_FROM_JSON.value)
    return
  if _FLEX.value and "XLA_PYTHON_CLIENT_PREALLOCATE" not in os.environ:
    # Read when JAX creates its GPU client, i.e. at the first device use below.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", FLEX_XLA_MEM_FRACTION)
  kernel_bench.run(
      seq_lens=_SEQ_LENS.value, batch=_BATCH.value, heads=_HEADS.value,
      head_dim=_HEAD_DIM.value, dtype=_DTYPE.value, block_size=_BLOCK.value,
      densities=_DENSITIES.value, implementations=_IMPLS.value, out_dir=_OUT_DIR.value,
      check_only=_CHECK_ONLY.value, interpret=_INTERPRET.value, check_seq=_CHECK_SEQ.value,
      reps=_REPS.value, sweep_tiles=_SWEEP.value, tag=_TAG.value, baseline=_BASELINE.value,
      query_block_size=_QBLOCK.value, flex=_FLEX.value,
      command=" ".join(["python -m adaspa_jax.experiments.bench_kernels"] + sys.argv[1:]))


if __name__ == "__main__":
  app.run(main)
