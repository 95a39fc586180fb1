"""The block-sparse Mosaic kernel of this tree against another version of its file, in one
process: same inputs, outputs compared bit for bit, times interleaved (new, old, new, ...)
so that drift of the shared GPU hits both alike. cuDNN dense is timed in the same run.

  git show COMMIT:pallas_kernels/mosaic/block_sparse_kernel.py > /tmp/old_sparse.py
  python -m tools.sparse_ab --old=/tmp/old_sparse.py   # JSON to $OUT

(from the repository root; B=1, H=24, D=128, bf16, random lists.)
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
from absl import app, flags

from adaspa_jax.harness import timing
from tools.mosaic_variants import cudnn_ms, lists
from pallas_kernels.mosaic import block_sparse_kernel as mosaic_block_sparse

B, H, D = 1, 24, 128

_OLD = flags.DEFINE_string("old", None, "path of the other mosaic_block_sparse.py", required=True)
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["32768", "118784"], "sequence lengths")
_CASES = flags.DEFINE_list("cases", ["64:0.05", "64:0.2", "64:1.0", "128:0.05", "128:0.2"],
                           "block_size:density pairs")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "interleaved rounds (the fastest is reported)")


def load_module(path):
  """The module in file ``path`` (it imports this tree's packages as usual)."""
  if not os.path.isfile(path):
    raise ValueError(f"--old={path!r}: expected the path of a mosaic_block_sparse.py.")
  spec = importlib.util.spec_from_file_location("old_mosaic_block_sparse", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # its dataclasses (e.g. the kernel's config) look it up
  spec.loader.exec_module(module)
  return module


def parse_case(text):
  bs, density = text.split(":")
  if int(bs) not in mosaic_block_sparse.SUPPORTED_BLOCK_SIZES or not 0 < float(density) <= 1:
    raise ValueError(f"case {text!r}: expected BLOCK:DENSITY, BLOCK in "
                     f"{mosaic_block_sparse.SUPPORTED_BLOCK_SIZES}, 0 < DENSITY <= 1.")
  return int(bs), float(density)


def compare(modules, seq, bs, density, key, q, k, v, rounds, reps=5, interpret=None):
  """One row: both versions on the same random lists, checked equal, then timed
  (``interpret``: the kernels' interpreter parameters, for CPU)."""
  n = seq // bs
  count = max(1, round(density * n))
  idx, steps = lists(jax.random.fold_in(key, bs + int(100 * density)), B, H, n, count, count)
  dense = jnp.zeros((B, H, n), jnp.int32)
  lengths = jnp.full((B,), seq, jnp.int32)
  fns = {name: jax.jit(lambda q, k, v, m=m: m.block_sparse_attention_padded(
      q, k, v, idx, steps, dense, lengths, block_size=bs, sm_scale=1 / math.sqrt(D),
      num_kv_blocks=n, interpret=interpret)) for name, m in modules.items()}
  new, old = (fns[name](q, k, v) for name in ("new", "old"))
  same = all(bool(jnp.array_equal(a, b)) for a, b in zip(new, old))
  del new, old
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      times[name].append(timing.time_fn(fn, q, k, v, reps=reps).median_s * 1e3)
  return {"S": seq, "bs": bs, "density": density, "count": count, "identical": same,
          **{f"{name}_ms": min(t) for name, t in times.items()},
          **{f"{name}_rounds_ms": t for name, t in times.items()}}


def main(argv):
  del argv
  modules = {"new": mosaic_block_sparse, "old": load_module(_OLD.value)}
  cases = [parse_case(c) for c in _CASES.value]
  rows = []
  for seq in (int(s) for s in _SEQ_LENS.value):
    key = jax.random.key(seq)
    q, k, v = (jax.random.normal(kk, (B, seq, H, D), jnp.float32).astype(jnp.bfloat16)
               for kk in jax.random.split(key, 3))
    dense_ms = cudnn_ms(q, k, v, 7) * 1e3
    for bs, density in cases:
      row = compare(modules, seq, bs, density, key, q, k, v, _ROUNDS.value)
      share = row["count"] * bs / seq  # computed share of the dense work
      row.update(cudnn_ms=dense_ms, **{f"{name}_pct_cudnn": 100 * dense_ms * share / row[
          f"{name}_ms"] for name in modules})
      print(json.dumps({k: v for k, v in row.items() if not k.endswith("rounds_ms")}),
            flush=True)
      rows.append(row)
  path = os.path.join(os.environ.get("OUT", "/tmp"), "sparse_ab.json")
  with open(path, "w") as f:
    json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
               "old": _OLD.value, "rows": rows}, f, indent=1)
  print("wrote", path)


if __name__ == "__main__":
  app.run(main)
