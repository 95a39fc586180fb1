"""Launch-order and ping-pong variants of the Mosaic GPU kernels, on an H200.

The tuning runs behind the defaults of ``pallas_kernels.mosaic_block_sparse``
and ``mosaic_block_mass`` (results: docs/bench/mosaic.md). The kernels are
called directly with explicit ``schedule_barrier`` / ``heads_major`` so the
numbers do not depend on the defaults of the day.

  python3 experiments/mosaic_variants.py check             # every variant vs reference
  python3 experiments/mosaic_variants.py time 32768 118784  # sparse variants, all densities
  python3 experiments/mosaic_variants.py tune 118784        # bs 128 and block-mass order

Inputs: B=1, H=24, D=128, bf16 normal q/k/v; random row-wise lists with the same
count in every row. Timing: one warm-up call, then the median of 3-5 calls each
blocked on (host wall clock). JSON goes to $OUT (default /tmp).
"""

import json
import math
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from pallas_kernels import mosaic
from pallas_kernels.mosaic_block_mass import block_mass_padded
from pallas_kernels.mosaic_block_sparse import block_sparse_attention_padded

B, H, D = 1, 24, 128


def rel(x, y):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))


def lists(key, b, h, n_blk, count, k_max):
  """``count`` distinct ascending random ids per row, padded to k_max by repetition."""
  keys = jax.random.uniform(key, (b, h, n_blk, n_blk))
  chosen = jnp.sort(jnp.argsort(keys, -1)[..., :count], -1).astype(jnp.int32)
  chosen = jnp.pad(chosen, ((0, 0), (0, 0), (0, 0), (0, k_max - count)), mode="edge")
  return chosen, jnp.full((b, h, n_blk), count, jnp.int32)


def time_fn(fn, *args, reps=5):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def sparse_fn(bs, n_blk, lengths, **variant):
  return jax.jit(lambda q, k, v, i, c, z: block_sparse_attention_padded(
      q, k, v, i, c, z, lengths, block_size=bs, sm_scale=1 / math.sqrt(D),
      num_kv_blocks=n_blk, **variant))


def check(d, bs, dtype, seq=1000, b=2, h=2):
  """Public entry points vs the reference, and every variant vs the default."""
  key = jax.random.key(d * 1000 + bs)
  q, k, v = [jax.random.normal(kk, (b, seq, h, d), jnp.float32).astype(dtype)
             for kk in jax.random.split(key, 3)]
  lengths = jnp.array([seq, 700], jnp.int32)
  n_blk = -(-seq // bs)
  idx, cnt = lists(jax.random.fold_in(key, 1), b, h, n_blk, max(1, n_blk // 3),
                   max(1, n_blk // 3))
  sel = jax.random.randint(jax.random.fold_in(key, 2), cnt.shape, 0, 4)
  cnt = jnp.where(sel == 0, 1, jnp.where(sel == 1, n_blk, jnp.where(sel == 2, 0, cnt)))
  cnt = cnt.astype(jnp.int32)
  r = {"d": d, "bs": bs, "dtype": jnp.dtype(dtype).name, "seq": seq}
  ref = dict(implementation="reference")
  o, l = mosaic.block_sparse_attention(q, k, v, idx, cnt, block_size=bs, kv_lengths=lengths)
  wo, wl = pk.block_sparse_attention(q, k, v, idx, cnt, block_size=bs, kv_lengths=lengths,
                                     **ref)
  fin = np.isfinite(np.asarray(wl))
  r["sparse_out"] = rel(o, wo)
  r["sparse_lse"] = float(np.abs(np.asarray(l)[fin] - np.asarray(wl)[fin]).max())
  r["sparse_inf_ok"] = bool((np.isfinite(np.asarray(l)) == fin).all())
  r["nan"] = bool(np.isnan(np.asarray(o, np.float32)).any() or np.isnan(np.asarray(l)).any())
  wo2, wl2, wm2 = pk.attention_with_block_mass(q, k, v, block_size=bs, kv_lengths=lengths, **ref)
  o2, l2, m2 = mosaic.attention_with_block_mass(q, k, v, block_size=bs, kv_lengths=lengths)
  fin = np.isfinite(np.asarray(wl2))
  r["fused_out"] = rel(o2, wo2)
  r["fused_lse"] = float(np.abs(np.asarray(l2)[fin] - np.asarray(wl2)[fin]).max())
  r["fused_mass"] = rel(m2, wm2)
  cached = wl2 + 0.3 * jax.random.normal(jax.random.fold_in(key, 3), wl2.shape)
  m = mosaic.block_mass(q, k, cached, block_size=bs, kv_lengths=lengths)
  r["mass"] = rel(m, pk.block_mass(q, k, cached, block_size=bs, kv_lengths=lengths, **ref))
  pad_s = lambda x: jnp.pad(x, ((0, 0), (0, 1024 - seq), (0, 0), (0, 0)))
  n_q = 1024 // bs
  pad_q = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, n_q - x.shape[2])) + ((0, 0),) * (x.ndim - 3))
  dense = cnt >= n_blk
  steps = jnp.where(dense, n_blk, jnp.clip(cnt, 0, idx.shape[-1]))
  args = (pad_s(q), pad_s(k), pad_s(v), pad_q(idx), pad_q(steps), pad_q(dense.astype(jnp.int32)))
  base = None
  for sb in (True, False):
    for hm in (False, True):
      out, _ = sparse_fn(bs, n_blk, lengths, schedule_barrier=sb, heads_major=hm)(*args)
      if base is None:
        base = np.asarray(out, np.float32)
      else:
        r[f"variant_sb{int(sb)}_hm{int(hm)}_maxdiff"] = float(
            np.abs(np.asarray(out, np.float32) - base).max())
  return r


def qkv(seq):
  key = jax.random.key(seq)
  return key, [jax.random.normal(kk, (B, seq, H, D), jnp.float32).astype(jnp.bfloat16)
               for kk in jax.random.split(key, 3)]


def cudnn_ms(q, k, v, reps):
  fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
  return time_fn(fn, q, k, v, reps=reps)


def time_sparse(seq, key, q, k, v, td, bs, density, reps, **variant):
  n_blk = seq // bs
  count = max(1, round(density * n_blk))
  idx, cnt = lists(jax.random.fold_in(key, int(density * 100)), B, H, n_blk, count, count)
  lengths = jnp.full((B,), seq, jnp.int32)
  t = time_fn(sparse_fn(bs, n_blk, lengths, **variant), q, k, v, idx, cnt, jnp.zeros_like(cnt),
              reps=reps)
  flops = 4.0 * B * H * D * count * bs * seq
  return {"S": seq, "op": "sparse", "bs": bs, "density": density, **variant, "ms": t * 1e3,
          "tflops": flops / t / 1e12, "pct_cudnn": 100 * td / (t / (count * bs / seq))}


def main():
  mode = sys.argv[1]
  out = os.environ.get("OUT", "/tmp")
  res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "mode": mode,
         "argv": sys.argv[1:], "rows": []}

  def emit(row):
    print(json.dumps(row)[:600], flush=True)
    res["rows"].append(row)
    with open(f"{out}/mosaic_variants_{mode}.json", "w") as f:
      json.dump(res, f, indent=1, default=str)

  def attempt(fn, **label):
    try:
      emit(fn())
    except Exception:  # pylint: disable=broad-except
      emit({**label, "error": traceback.format_exc()[-2000:]})

  if mode == "check":
    for d, bs, dt in [(128, 64, jnp.bfloat16), (64, 64, jnp.bfloat16), (128, 128, jnp.bfloat16),
                      (64, 128, jnp.float16), (128, 64, jnp.float16)]:
      attempt(lambda d=d, bs=bs, dt=dt: check(d, bs, dt), d=d, bs=bs)
  elif mode == "time":
    for seq in (int(x) for x in sys.argv[2:]):
      key, (q, k, v) = qkv(seq)
      td = cudnn_ms(q, k, v, 5)
      emit({"S": seq, "op": "cudnn", "ms": td * 1e3})
      for bs in (64, 128):
        for dens in (0.05, 0.2, 0.5, 1.0) if bs == 64 else (0.2, 1.0):
          variants = ((True, False), (False, False), (True, True)) if bs == 64 else ((True, False),)
          for sb, hm in variants:
            attempt(lambda: time_sparse(seq, key, q, k, v, td, bs, dens, 5, schedule_barrier=sb,
                                        heads_major=hm), S=seq, bs=bs, density=dens)
  elif mode == "tune":
    seq = int(sys.argv[2])
    key, (q, k, v) = qkv(seq)
    td = cudnn_ms(q, k, v, 3)
    emit({"S": seq, "op": "cudnn", "ms": td * 1e3})
    for bs, dens, hm in [(64, 0.2, True), (128, 0.2, True), (128, 0.2, False), (128, 1.0, True)]:
      attempt(lambda: time_sparse(seq, key, q, k, v, td, bs, dens, 3, heads_major=hm), S=seq,
              bs=bs, density=dens)
    lse = jax.jit(lambda q, k, v: mosaic.attention_with_block_mass(q, k, v, block_size=64)[1])(
        q, k, v)
    lse2 = lse * (1 / math.log(2))
    lengths = jnp.full((B,), seq, jnp.int32)
    for hm in (True, False):
      def mass(hm=hm):
        fn = jax.jit(lambda q, k, l: block_mass_padded(
            q, k, l, lengths, block_size=64, sm_scale=1 / math.sqrt(D), num_kv_blocks=seq // 64,
            heads_major=hm))
        t = time_fn(fn, q, k, lse2, reps=3)
        return {"S": seq, "op": "mass", "bs": 64, "heads_major": hm, "ms": t * 1e3,
                "x_dense": t / td}
      attempt(mass, op="mass", heads_major=hm)
  else:
    raise ValueError(f"mode={mode!r}: expected check, time or tune.")


if __name__ == "__main__":
  main()
