"""One launch of one attention kernel, for Nsight Compute (``ncu``) to profile.

Inputs are made on the host with numpy, so the kernel under study is the only GPU work
besides copies (``ncu -c N`` then catches just its launches). On an H200 machine:

  ncu --clock-control none --set full -c 2 -f -o /tmp/mass \
      python -m tools.ncu_probe mass
  ncu -i /tmp/mass.ncu-rep --page details --print-details all > mass_details.txt
  ncu -i /tmp/mass.ncu-rep --page source --csv --print-source sass > mass_sass.csv
  python -m tools.ncu_summary --details=mass_details.txt --sass=mass_sass.csv > mass.json

Kernels (the first argument): ``mass`` (the block-mass kernel at its shipped settings:
256-key tiles, hand-placed barriers), ``sparse64`` /
``sparse128`` (block-sparse attention on random lists at ``--density``), ``cudnn``
(``jax.nn.dot_product_attention``, the dense baseline). Shapes: B=1, H=24, D=128, bf16,
``--seq`` (default 32768). Each runs twice (a warm launch and one more).
(from the repository root)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import app, flags

from pallas_kernels.mosaic.block_mass_kernel import DEFAULT_CONFIG, WIDE_KEY_TILE, block_mass_padded
from pallas_kernels.mosaic.block_sparse_kernel import block_sparse_attention_padded

KERNELS = ("mass", "sparse64", "sparse128", "cudnn")
HEAD_DIM = 128

_SEQ = flags.DEFINE_integer("seq", 32768, "sequence length (a multiple of 256)")
_HEADS = flags.DEFINE_integer("heads", 24, "attention heads")
_DENSITY = flags.DEFINE_float("density", 0.2, "share of key blocks each sparse row reads")


def host_qkv(seq, heads):
  """numpy bf16 q, k, v [1, seq, heads, HEAD_DIM], the same on every call."""
  rng = np.random.default_rng(0)
  return tuple(rng.standard_normal((1, seq, heads, HEAD_DIM), np.float32)
               .astype(ml_dtypes.bfloat16) for _ in range(3))


def kernel_call(kernel, seq, heads, density=0.2, interpret=None):
  """A no-argument function that launches ``kernel`` once on host-made inputs (copied
  to the device here, by ``jnp.asarray`` of numpy arrays: no kernel of XLA's runs)."""
  if kernel not in KERNELS:
    raise ValueError(f"kernel={kernel!r}: expected one of {', '.join(KERNELS)}.")
  if seq % WIDE_KEY_TILE:
    raise ValueError(f"seq={seq}: expected a multiple of {WIDE_KEY_TILE}.")
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(x) for x in host_qkv(seq, heads))
  lengths = jnp.asarray(np.full((1,), seq, np.int32))
  scale = 1 / math.sqrt(HEAD_DIM)
  if kernel == "mass":
    lse2 = jnp.asarray(np.full((1, heads, seq), math.log2(seq) + 1.0, np.float32))
    return lambda: block_mass_padded(q, k, lse2, lengths, block_size=64, sm_scale=scale,
                                     num_kv_blocks=seq // 64, config=DEFAULT_CONFIG,
                                     interpret=interpret)
  if kernel == "cudnn":
    return lambda: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  bs = int(kernel[len("sparse"):])
  n = seq // bs
  count = max(1, round(density * n))
  chosen = np.sort(np.argsort(rng.random((1, heads, n, n), np.float32), -1)[..., :count], -1)
  idx = jnp.asarray(chosen.astype(np.int32))
  steps = jnp.asarray(np.full((1, heads, n), count, np.int32))
  dense = jnp.asarray(np.zeros((1, heads, n), np.int32))
  return lambda: block_sparse_attention_padded(q, k, v, idx, steps, dense, lengths,
                                               block_size=bs, sm_scale=scale,
                                               num_kv_blocks=n, interpret=interpret)


def main(argv):
  if len(argv) != 2:
    raise app.UsageError(f"expected one kernel name ({', '.join(KERNELS)}).")
  fn = kernel_call(argv[1], _SEQ.value, _HEADS.value, _DENSITY.value)
  for _ in range(2):
    jax.block_until_ready(fn())
  print("launched", argv[1])


if __name__ == "__main__":
  app.run(main)
