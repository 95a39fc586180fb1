"""Dense 8-bit attention peers on one GPU, in one process (issue 25): SageAttention from
PyPI (``sageattention`` 1.0.6: Triton, INT8 Q.K^T per block with K smoothed, fp16 P.V)
against cuDNN bf16 and cuDNN FP8 (``pallas_kernels.cudnn_fp8``) and our Mosaic 8-bit kernel
with every row dense ("fp8": e4m3 throughout; "int8_fp8": int8 Q.K^T, e4m3 P.V), all on
the same q, k, v.

  source tools/device_env.sh; python3 $REPO/tools/sage_peer.py --out=$OUT/sage_peer.json

(``sageattention`` and its Triton come from a carried wheel on the GPU machine; see
/work/.library/device/README.md.) Shapes B=1, H=24, D=128, S in ``--seq_lens``; random
normal bf16 with a channel offset on K (what K smoothing removes). JAX ops are timed with
``harness.timing.time_fn`` (host clock, block_until_ready), SageAttention with CUDA events
(``harness.flex_peer.time_call``); the q/k/v reach torch through DLPack. TFLOP/s =
4 * S^2 * H * D / time. Output of each against cuDNN bf16 (cosine, relative L2) on the
same inputs. Every stage in its own try/except: an error is recorded and the rest runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from adaspa_jax.harness import flex_peer, metrics, timing
from pallas_kernels import cudnn_fp8
from pallas_kernels.validation import EIGHT_BIT_PRECISIONS

B, H, D = 1, 24, 128


def inputs(seq, seed=0):
  """bf16 q, k, v [B, S, H, D], K with a per-channel offset."""
  kq, kk, kv, ko = jax.random.split(jax.random.PRNGKey(seed), 4)
  shape = (B, seq, H, D)
  q = jax.random.normal(kq, shape, jnp.float32)
  k = jax.random.normal(kk, shape, jnp.float32) + 2.0 * jax.random.normal(ko, (1, 1, H, D))
  v = jax.random.normal(kv, shape, jnp.float32)
  return tuple(x.astype(jnp.bfloat16) for x in (q, k, v))


def agreement(x, ref) -> dict:
  """``metrics.output_agreement`` of two outputs of any float dtype (bf16 included)."""
  return metrics.output_agreement(np.asarray(jnp.asarray(x, jnp.float32)),
                                  np.asarray(jnp.asarray(ref, jnp.float32)))


def run_seq(seq, reps, record):
  flops = 4.0 * seq * seq * H * D
  q, k, v = inputs(seq)
  row = {}
  record[str(seq)] = row

  def stage(name, fn):
    t0 = time.time()
    try:
      row[name] = fn()
    except Exception as e:  # pylint: disable=broad-except
      row[name] = {"error": f"{type(e).__name__}: {e}"[:3000],
                   "traceback": traceback.format_exc()[-3000:]}
    row[name]["wall_s"] = round(time.time() - t0, 1)
    print(f"S={seq} {name}: {json.dumps(row[name])[:400]}", flush=True)

  ref = jax.jit(lambda q, k, v: pk.dense_attention(q, k, v, implementation="cudnn"))(q, k, v)

  def jax_timed(fn, check=True):
    t = timing.time_fn(jax.jit(fn), q, k, v, reps=reps)
    out = {"ms": t.median_s * 1e3, "tflops": flops / t.median_s / 1e12}
    if check:
      out.update(agreement(t.output, ref))
    return out

  stage("cudnn_bf16", lambda: jax_timed(
      lambda q, k, v: pk.dense_attention(q, k, v, implementation="cudnn"), check=False))
  stage("cudnn_fp8", lambda: jax_timed(lambda q, k, v: cudnn_fp8.dense_attention(q, k, v)))
  for precision in EIGHT_BIT_PRECISIONS:
    stage(f"mosaic_{precision}_dense", lambda precision=precision: jax_timed(
        lambda q, k, v: pk.dense_attention(q, k, v, precision=precision,
                                           implementation="mosaic", block_size=128)))

  def sage():
    import torch  # pylint: disable=import-outside-toplevel
    from sageattention import sageattn  # pylint: disable=import-outside-toplevel
    tq, tk, tv = (flex_peer.to_torch(x) for x in (q, k, v))  # [B, S, H, D] views
    call = lambda: sageattn(tq, tk, tv, tensor_layout="NHD", is_causal=False,
                            sm_scale=1.0 / math.sqrt(D))
    out = call()
    res = flex_peer.time_call(call, device=tq.device, reps=reps, min_rep_s=0.02)
    res["ms"] = res["median_s"] * 1e3
    res["tflops"] = flops / res["median_s"] / 1e12
    res.update(agreement(jnp.asarray(out.float().cpu().numpy()), ref))
    res["sageattention_version"] = getattr(__import__("sageattention"), "__version__", "1.0.6")
    res["torch_version"] = torch.__version__
    flex_peer.free_torch_memory()
    return res

  stage("sageattention", sage)
  base = row.get("cudnn_bf16", {}).get("tflops")
  if base:
    for name, r in row.items():
      if "tflops" in r:
        r["x_cudnn_bf16"] = r["tflops"] / base


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"),
                                                    "sage_peer.json"))
  parser.add_argument("--seq_lens", default="32768,118784")
  parser.add_argument("--reps", type=int, default=5)
  args = parser.parse_args()
  dev = jax.devices()[0]
  record = {"device": dev.device_kind, "jax_version": jax.__version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "shape": {"batch": B, "heads": H, "head_dim": D},
            "note": ("TFLOP/s = 4 S^2 H D / time; cosine / rel_l2 of each output against "
                     "cuDNN bf16 on the same q, k, v")}
  for seq in [int(s) for s in args.seq_lens.split(",") if s]:
    run_seq(seq, args.reps, record)
    with open(args.out, "w") as f:
      json.dump(record, f, indent=1)
  print("wrote", args.out)


if __name__ == "__main__":
  main()
