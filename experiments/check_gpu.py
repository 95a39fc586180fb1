"""Determinism and memory checks on the GPU (``adaspa_jax.harness.gpu_checks``, issue 24).

  python -m adaspa_jax.experiments.check_gpu --seq_lens=65536,262144 --out=/tmp/checks.json

(1) every op of every implementation the device runs, and a whole AdaSpa cycle, twice on
the same inputs: bitwise-equal outputs; (2) one layer (24 heads x 128) at each sequence
length runs warm-up, search and sparse steps with a 60-layer AdaSpa state resident, with
the computed ``state_nbytes`` beside the measured bytes; then the longest sequence whose
accounting fits the card, run the same way. Writes the JSON to ``--out``.
"""

from __future__ import annotations

import json
import shlex
import sys

import jax

from adaspa_jax.extras import require
from adaspa_jax.harness import gpu_checks

app, flags = require("absl.app"), require("absl.flags")

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["65536", "262144"], "sequence lengths (ascending)")
_LAYERS = flags.DEFINE_integer("num_layers", 60, "layers whose state stays resident")
_HEADS = flags.DEFINE_integer("heads", 24, "attention heads")
_DET_LEN = flags.DEFINE_integer("determinism_seq_len", 4_160, "tokens of the determinism check")
_LARGEST = flags.DEFINE_bool("run_largest", True, "also run the longest sequence that fits")
_OUT = flags.DEFINE_string("out", "outputs/gpu_checks.json", "where the JSON goes")


def main(argv):
  del argv
  dev = jax.devices()[0]
  res = {"device": dev.device_kind, "jax": jax.__version__,
         "command": " ".join(["python -m adaspa_jax.experiments.check_gpu"]
                             + [shlex.quote(a) for a in sys.argv[1:]])}
  res["determinism"] = gpu_checks.determinism(seq_len=_DET_LEN.value)
  print("determinism:", json.dumps(res["determinism"]["bitwise_equal"]), flush=True)
  lens = [int(s) for s in _SEQ_LENS.value]
  limit = (dev.memory_stats() or {}).get("bytes_limit")
  if limit and _LARGEST.value:
    best = gpu_checks.largest_seq_len(limit, num_layers=_LAYERS.value, heads=_HEADS.value,
                                      multiple=4096)
    res["largest_seq_len"] = {"bytes_limit": limit, "predicted": best}
    lens.append(best)
  res["memory"] = gpu_checks.memory(lens, num_layers=_LAYERS.value, heads=_HEADS.value)
  with open(_OUT.value, "w") as f:
    json.dump(res, f, indent=1)
  print("wrote", _OUT.value, flush=True)


if __name__ == "__main__":
  app.run(main)
