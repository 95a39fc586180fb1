"""Numerics of the FP8 reference recipe against float32 attention (issue 25, CPU).

Measures the output cosine similarity and relative L2 error of
``pallas_kernels.reference.fp8.fp8_attention`` (with and without K smoothing, and
with one stage quantised at a time: the error budget) against the exact float32
``pallas_kernels.reference.ops.attention`` on

* random normal q/k/v, plain and with a per-channel offset on K (an "outlier
  channel", as DiT keys have);
* q/k/v captured from layers of the long embedded model (``checkpoints/long_t2v``)
  at the first denoising step (pure noise latents, one held-out prompt, batch 1):
  the layers' ``self_attention`` is wrapped to copy q, k, v and the valid lengths
  out with ``jax.debug.callback``, then the model runs one forward pass on CPU.

These are the numerics of the reference recipe, not a kernel timing. Run (CPU):

  python tools/fp8_quality.py --out docs/log/fp8/fp8_quality_$(date +%Y%m%d).json

``--kernels=mosaic,cudnn`` (GPU) also runs the FP8 kernels (dense, bf16 inputs) on the same
q/k/v: output cosine and relative L2 against float32.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.reference import fp8, ops
from pallas_kernels.validation import EIGHT_BIT_PRECISIONS


def metrics(got, want, lengths):
  """Cosine and relative L2 over the valid rows (padding rows are 0 in both)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  a = np.concatenate([got[b, :n].ravel() for b, n in enumerate(lengths)])
  w = np.concatenate([want[b, :n].ravel() for b, n in enumerate(lengths)])
  return {"cosine": float(a @ w / (np.linalg.norm(a) * np.linalg.norm(w))),
          "rel_l2": float(np.linalg.norm(a - w) / np.linalg.norm(w))}


def kernel_outputs(q, k, v, lengths, *, block_size, kernels):
  """{name: out [B, S, H, D]} of the 8-bit kernels in ``kernels`` ("mosaic": the Mosaic
  kernel, every row dense, at precision "fp8" and "int8_fp8"; "cudnn": cuDNN's FP8
  attention, only without padding) on q, k, v cast to bfloat16, as a model would call
  them."""
  import pallas_kernels as pk  # pylint: disable=import-outside-toplevel
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  full = all(int(n) == q.shape[1] for n in lengths)
  kv = None if full else jnp.asarray(lengths, jnp.int32)
  outs = {}
  for name in kernels:
    if name == "cudnn" and not full:
      continue
    for precision in EIGHT_BIT_PRECISIONS if name == "mosaic" else ("fp8",):
      outs[f"{name}_{precision}_kernel"] = pk.dense_attention(
          q, k, v, kv_lengths=kv, precision=precision, implementation=name,
          block_size=block_size)
  return outs


def evaluate(q, k, v, lengths, *, block_size, stages, kernels=()):
  """Every variant of the recipe on one (q, k, v) against float32; then the FP8 kernels
  in ``kernels`` (``kernel_outputs``), output only."""
  kv = jnp.asarray(lengths, jnp.int32)
  want, lse_want = ops.attention(q, k, v, kv_lengths=kv)
  finite = np.isfinite(np.asarray(lse_want))
  variants = {"fp8": dict(smooth=True), "fp8_no_smoothing": dict(smooth=False),
              "int8_fp8": dict(smooth=True, qk_dtype=fp8.QK_DTYPES["int8_fp8"])}
  if stages:
    for stage in fp8.STAGES:
      variants[f"only_{stage}"] = dict(smooth=True, quantized=(stage,))
  result = {"shape": list(q.shape), "kv_lengths": [int(n) for n in lengths]}
  for name, kw in variants.items():
    t0 = time.time()
    out, lse = fp8.fp8_attention(q, k, v, block_size=block_size, kv_lengths=kv, **kw)
    row = metrics(out, want, lengths)
    lse_err = np.abs(np.asarray(lse - lse_want)[finite])
    row["lse_max_abs_err"] = float(lse_err.max())
    row["lse_p99_abs_err"] = float(np.percentile(lse_err, 99))
    row["lse_median_abs_err"] = float(np.median(lse_err))
    row["seconds"] = round(time.time() - t0, 1)
    result[name] = row
    print(f"  {name:18s} cosine {row['cosine']:.6f}  rel_l2 {row['rel_l2']:.4f}  "
          f"lse err max {row['lse_max_abs_err']:.3g} p99 {row['lse_p99_abs_err']:.3g}  ({row['seconds']} s)", flush=True)
  for name, out in kernel_outputs(q, k, v, lengths, block_size=block_size,
                                  kernels=kernels).items():
    row = metrics(out.astype(jnp.float32), want, lengths)
    result[name] = row
    print(f"  {name:18s} cosine {row['cosine']:.6f}  rel_l2 {row['rel_l2']:.4f}", flush=True)
  return result


def random_cases(seq, heads, head_dim, seed):
  rng = np.random.default_rng(seed)
  q, k, v = (rng.standard_normal((1, seq, heads, head_dim)).astype(np.float32)
             for _ in range(3))
  offset = np.zeros(head_dim, np.float32)
  offset[rng.choice(head_dim, 3, replace=False)] = [20.0, -15.0, 25.0]
  return {"random_normal": (q, k, v), "random_k_outlier_channels": (q, k + offset, v)}


def capture_model_qkv(checkpoint, layer_ids, prompt, seed):
  """({layer: (q, k, v, kv_lengths)}, timestep) of one forward pass at the first
  denoising step (float32 parameters and activations, dense attention)."""
  from adaspa_jax.models import cogvideox
  from adaspa_jax.models.embedded import model as embedded

  model = embedded.load(checkpoint, dtype=jnp.float32)
  noise, cond, _, shared = embedded.sampler_inputs(model, [prompt], seed=seed)
  t = model.config.scheduler().timesteps(model.config.num_steps)[0]
  captured, counter = {}, [0]

  def keep(q, k, v, lengths):
    layer = counter[0]
    counter[0] += 1
    if layer in layer_ids:
      captured[layer] = tuple(np.asarray(x) for x in (q, k, v, lengths))

  original = cogvideox.layers.self_attention

  def wrapped(adaspa, q, k, v, ctx):
    jax.debug.callback(keep, q, k, v, ctx.kv_lengths)
    return original(adaspa, q, k, v, ctx)

  cogvideox.layers.self_attention = wrapped
  try:
    out = model.transformer(hidden_states=noise, timestep=t, **cond, **shared)
    jax.block_until_ready(out)
    jax.effects_barrier()
  finally:
    cogvideox.layers.self_attention = original
  return captured, float(t)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="JSON file to write")
  parser.add_argument("--block_size", type=int, default=64)
  parser.add_argument("--random_seq", type=int, default=4096)
  parser.add_argument("--random_heads", type=int, default=4)
  parser.add_argument("--random_head_dim", type=int, default=64)
  parser.add_argument("--checkpoint", default="checkpoints/long_t2v")
  parser.add_argument("--layers", default="3", help="comma-separated layer indices")
  parser.add_argument("--prompt", default=None, help="default: the first held-out prompt")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no_stages", action="store_true",
                      help="skip the one-stage-at-a-time error budget (random cases)")
  parser.add_argument("--kernels", default="",
                      help="comma-separated FP8 kernels to measure too (GPU): mosaic, cudnn")
  parser.add_argument("--model_stages", action="store_true",
                      help="also the error budget on captured q/k/v (3 more passes a layer)")
  args = parser.parse_args(argv)
  stages = not args.no_stages
  kernels = tuple(x for x in args.kernels.split(",") if x)
  argv = sys.argv[1:] if argv is None else list(argv)

  record = {
      "command": "python tools/fp8_quality.py " + " ".join(shlex.quote(a) for a in argv),
      "date": datetime.date.today().isoformat(),
      "device": (f"{jax.devices()[0].device_kind} ({jax.devices()[0].platform}), "
                 f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}"),
      "note": ("Numerics of the FP8 reference recipe (pallas_kernels.reference.fp8, "
               "float8_e4m3fn emulated with jnp casts) against exact float32 attention "
               "(pallas_kernels.reference.ops.attention); not a kernel timing. Metrics over "
               "valid rows; only_<stage>: that stage alone quantised (error budget)."),
      "block_size": args.block_size,
      "p_scale": fp8.P_SCALE,
      "cases": {},
  }
  for name, (q, k, v) in random_cases(args.random_seq, args.random_heads,
                                      args.random_head_dim, args.seed).items():
    print(name, flush=True)
    record["cases"][name] = evaluate(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                     [q.shape[1]], block_size=args.block_size, stages=stages,
                                     kernels=kernels)

  layer_ids = [int(x) for x in args.layers.split(",") if x]
  if layer_ids:
    prompt = args.prompt
    if prompt is None:
      from adaspa_jax.harness import embedded_eval
      prompt = embedded_eval.held_out_prompts(1)[0]
    t0 = time.time()
    captured, timestep = capture_model_qkv(args.checkpoint, layer_ids, prompt, args.seed)
    record["model"] = {"checkpoint": args.checkpoint, "prompt": prompt, "seed": args.seed,
                       "denoising_step": 0, "timestep": timestep,
                       "capture_seconds": round(time.time() - t0, 1)}
    print("captured layers", sorted(captured), "in", record["model"]["capture_seconds"], "s")
  for layer in layer_ids:
    q, k, v, lengths = captured[layer]
    name = f"{os.path.basename(os.path.normpath(args.checkpoint))}_layer{layer}_step0"
    print(name, q.shape, "kv_lengths", lengths, flush=True)
    case = evaluate(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), [int(n) for n in lengths],
                    block_size=args.block_size, stages=args.model_stages, kernels=kernels)
    valid = k[0, :int(lengths[0])]
    # How far K's per-channel mean sits from zero, in units of its spread (smoothing's target).
    case["k_channel_abs_mean_over_std"] = float(
        (np.abs(valid.mean(axis=0)) / valid.std(axis=0)).mean())
    record["cases"][name] = case

  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(record, f, indent=1)
    f.write("\n")
  print("wrote", args.out)


if __name__ == "__main__":
  main()
