"""The FP8 Mosaic block-sparse kernel on a Hopper GPU: compiles, checks, times (one process).

  source tools/device_env.sh; python $REPO/tools/fp8_gpu_check.py --out=$OUT/fp8.json

Stages (each in its own try/except: a failure is recorded with its error text, up to 3000
characters, and the rest still runs; the JSON is rewritten after every stage):

1. ``small``: ``fp8_ops.block_sparse_attention_fp8`` at B=1, H=2, S=1000 (padded to 1024,
   kv_lengths 900), D 64 and 128, tilings 128x64, 128x128 and 64x64, Q and K in e4m3
   ("fp8") and in int8 ("int8_fp8", names ending ``_int8``), against
   ``reference.fp8.fp8_block_sparse_attention`` (rel L2 <= 4e-2, as the CPU tests; finite
   LSE within 5e-3: GPU exp2 is approximate and FP8 wgmma's own accumulation over D is not
   float32) and float32 attention (cosine >= 0.99). This is the first run of the 8-bit
   register operand of the P.V wgmma; if it fails, ``small_diagnosis`` reruns the kernel
   with V^T's keys left in natural order: if that one agrees instead, the relabelled P
   registers hold another column order than ``block_sparse_fp8_kernel.KEY_PERMUTATION``.
2. ``big``: B=1, H=24, D=128, S = 32768 and 118784, density 0.2 (``kernel_bench.
   random_lists``, row-wise), tilings 128x64 and 128x128. For each: the quantisation
   pre-pass (``fp8_ops.quantize_inputs``) and the 8-bit kernel timed apart (the kernel on
   pre-quantised inputs), for e4m3 and for int8 Q and K, the bf16 Mosaic kernel on the
   same lists, cuDNN bf16 dense once per length; TFLOP/s = 4 * D * computed pairs
   (``kernel_bench.computed_pairs``) / time, and ratios to cuDNN's; with ``--unsplit``,
   last, the FP8 kernel with ``split_accumulation=False`` (P.V accumulated in the running
   accumulator: fewer live registers), its output against the default's; and the int8
   kernel with ``int_scores="bias"`` (the float-bits bias instead of an I2F per score),
   its output against the default's. Correctness
   (``check``, ``check_int8``) on a few query blocks (rows) against float32
   attention restricted to their lists: cosine, rel L2 (bf16 kernel alongside), LSE error.

Timing: ``harness.timing.time_fn`` (a warm-up call with compile, then ``REPS`` reps of
back-to-back calls lasting >= 20 ms each, median). Inputs: random normal bf16 with a
channel-wise offset on K (what smoothing removes).
"""

from __future__ import annotations

import argparse
import json
import itertools
import math
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from adaspa_jax.harness import metrics, timing
from adaspa_jax.harness.kernel_bench import computed_pairs, random_lists
from pallas_kernels.mosaic import block_sparse_fp8_kernel as fp8_kernel
from pallas_kernels.mosaic import block_sparse_kernel as bf16_kernel
from pallas_kernels.mosaic import fp8_ops, interpreter
from pallas_kernels.mosaic.ops import kernel_lists
from pallas_kernels.reference import fp8 as fp8_reference
from pallas_kernels.reference import ops as reference_ops

B, H, D = 1, 24, 128
SEQ_LENS = (32768, 118784)
DENSITY = 0.2
TILINGS = ((128, 64), (128, 128))  # (query_block_size, block_size)
REPS = 3
MIN_REP_S = 0.02
BUDGET_S = 300  # stop starting timed stages past this (the run must end in ~6 minutes)
ERR_CHARS = 3000
# --cpu_dry_run: the script's own logic on CPU (interpreted kernels, XLA for cuDNN) at toy
# sizes, so that a slip in it does not cost a GPU run.
DRY = {"on": False, "small_seq": 1000, "small_length": 900}
UNSPLIT = {"on": False}  # --unsplit
# What Q and K are quantised to at precision "fp8" and "int8_fp8" (names: row labels).
QK_DTYPES = tuple(jnp.dtype(x).name for x in fp8_reference.QK_DTYPES.values())


def _interp():
  """(op ``interpret`` flag, padded kernels' ``interpret`` params, a fresh context for
  them)."""
  on = DRY["on"]
  return on, interpreter.params(on), interpreter.device_context(on)


def _error(e):
  text = "".join(traceback.format_exception(e))
  print(text[-ERR_CHARS:], flush=True)
  return f"{type(e).__name__}: {e}"[:ERR_CHARS] + "\n--- traceback tail ---\n" + text[-ERR_CHARS:]


def _lse_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  finite = np.isfinite(want)
  same = bool(np.array_equal(np.isfinite(got), finite))
  err = float(np.abs(got[finite] - want[finite]).max()) if finite.any() else 0.0
  return same, err


def _qkv(key, b, s, h, d):
  kq, kk, kv = jax.random.split(key, 3)
  q = jax.random.normal(kq, (b, s, h, d), jnp.float32)
  k = jax.random.normal(kk, (b, s, h, d), jnp.float32) + 2.0 * jnp.linspace(-1, 1, d)
  v = jax.random.normal(kv, (b, s, h, d), jnp.float32)
  return [x.astype(jnp.bfloat16) for x in (q, k, v)]


def small_checks(res):
  """Stage 1 (see the module docstring)."""
  s, h, length = DRY["small_seq"], 2, DRY["small_length"]
  interpret = _interp()[0]
  key = jax.random.key(1)
  for d in ((64,) if DRY["on"] else (128, 64)):
    q, k, v = _qkv(jax.random.fold_in(key, d), 1, s, h, d)
    kl = jnp.array([length], jnp.int32)
    for (qbs, bs), qk_dtype in itertools.product(((128, 64), (128, 128), (64, 64)),
                                                 QK_DTYPES):
      name = f"d{d}_q{qbs}k{bs}" + ("" if qk_dtype == "float8_e4m3fn" else f"_{qk_dtype}")
      try:
        n_k, n_q = -(-s // bs), -(-s // qbs)
        idx, cnt = random_lists(jax.random.fold_in(key, qbs + bs + d), 1, h, n_k,
                                max(1, n_k // 2), k_max=n_k, n_query_blocks=n_q)
        cnt = cnt.at[0, 0, 0].set(n_k).at[0, 1, 1].set(0)  # a dense row and an empty row
        out, lse = fp8_ops.block_sparse_attention_fp8(
            q, k, v, idx, cnt, block_size=bs, query_block_size=qbs, kv_lengths=kl,
            interpret=interpret, qk_dtype=jnp.dtype(qk_dtype))
        ref_out, ref_lse = fp8_reference.fp8_block_sparse_attention(
            q, k, v, idx, cnt, block_size=bs, query_block_size=qbs, kv_lengths=kl,
            qk_dtype=jnp.dtype(qk_dtype))
        f32 = lambda x: x.astype(jnp.float32)
        f_out, _ = reference_ops.block_sparse_attention(
            f32(q), f32(k), f32(v), idx, cnt, block_size=bs, query_block_size=qbs,
            kv_lengths=kl)
        vs_recipe = metrics.output_agreement(out, ref_out)
        vs_f32 = metrics.output_agreement(out, f_out)
        lse_same, lse_err = _lse_err(lse, ref_lse)
        nan = bool(np.isnan(np.asarray(out, np.float32)).any() or np.isnan(np.asarray(lse)).any())
        ok = (vs_recipe["rel_l2"] <= 4e-2 and vs_f32["cosine"] >= 0.99 and lse_same
              and lse_err <= 5e-3 and not nan)
        res["small"][name] = {"pass": ok, "vs_recipe": vs_recipe, "vs_float32": vs_f32,
                              "lse_finite_same": lse_same, "lse_max_err": lse_err, "nan": nan}
        print(f"small {name}: {'PASS' if ok else 'FAIL'} recipe rel_l2 "
              f"{vs_recipe['rel_l2']:.4f}, f32 cosine {vs_f32['cosine']:.5f}, lse err "
              f"{lse_err:.2e}", flush=True)
        if not ok and qk_dtype == "float8_e4m3fn":
          res["small_diagnosis"][name] = _diagnose(q, k, v, idx, cnt, kl, bs, qbs, ref_out)
      except Exception as e:  # pylint: disable=broad-except
        res["small"][name] = {"pass": False, "error": _error(e)}
        print(f"small {name}: FAIL (error)", flush=True)


def _diagnose(q, k, v, idx, cnt, kl, bs, qbs, ref_out):
  """The kernel with V^T in natural key order: which order the P registers really hold."""
  try:
    s = q.shape[1]
    s_pad = -(-s // 128) * 128
    scale = 1 / math.sqrt(q.shape[-1])
    q8, k8, vt8, qs, ks, vs, _ = fp8_ops.quantize_inputs(q, k, v, kl, block_size=bs,
                                                         sm_scale=scale, s_pad=s_pad)
    n_k = -(-s // bs)
    lists = kernel_lists(idx, cnt, num_kv_blocks=n_k, num_query_blocks=s_pad // qbs)
    order = np.argsort(fp8_kernel.key_order(s_pad))  # undo the permutation
    natural = vt8[..., order]
    out = {}
    params = _interp()[1]
    for label, vt in (("permuted_vt", vt8), ("natural_vt", natural)):
      with _interp()[2]:
        o, _ = fp8_kernel.block_sparse_attention_fp8_padded(
            q8, k8, vt, qs, ks, vs, *lists, kl, block_size=bs, sm_scale=scale,
            num_kv_blocks=n_k, query_block_size=qbs, interpret=params)
      valid = slice(0, int(kl[0]))
      out[label] = metrics.output_agreement(o[:, valid], ref_out[:, valid])
    print(f"  diagnosis: {out}", flush=True)
    return out
  except Exception as e:  # pylint: disable=broad-except
    return {"error": _error(e)}


def _rows_reference(q, k, v, idx, cnt, *, rows, head, bs, qbs, scale):
  """float32 attention of query rows ``rows`` (one query block) of ``head`` over its
  list's key blocks: out [R, D], lse [R]."""
  s = q.shape[1]
  n_k = -(-s // bs)
  qb = rows.start // qbs
  c = int(cnt[0, head, qb])
  blocks = np.arange(n_k) if c >= n_k else np.asarray(idx[0, head, qb, :c])
  allowed = np.zeros(n_k, bool)
  allowed[blocks] = True
  allowed = jnp.asarray(np.repeat(allowed, bs)[:s])
  qr = q[0, rows, head].astype(jnp.float32)
  sc = jnp.dot(qr, k[0, :, head].astype(jnp.float32).T,
               precision=jax.lax.Precision.HIGHEST) * scale
  sc = jnp.where(allowed[None], sc, -jnp.inf)
  m = sc.max(-1, keepdims=True)
  p = jnp.exp(sc - m)
  l = p.sum(-1, keepdims=True)
  o = jnp.dot(p / l, v[0, :, head].astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return o, (m + jnp.log(l))[:, 0]


def _time(fn, *args):
  with _interp()[2]:
    t = timing.time_fn(fn, *args, reps=REPS, min_rep_s=MIN_REP_S)
  return t, {"ms": t.median_s * 1e3, "first_s": t.first_s}


def big_runs(res, start, save=lambda: None):
  """Stage 2 (see the module docstring); ``save`` after each tiling's row."""
  _, params, _ = _interp()
  impl = None if DRY["on"] else "cudnn"
  for s in SEQ_LENS:
    key = jax.random.key(s)
    q, k, v = _qkv(key, B, s, H, D)
    lengths = jnp.array([s], jnp.int32)
    scale = 1 / math.sqrt(D)
    entry = res["big"].setdefault(str(s), {})
    dense_tflops = None
    try:
      if time.perf_counter() - start > BUDGET_S:
        raise TimeoutError("time budget spent before cuDNN")
      cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v,
                                                                    implementation=impl))
      _, t = _time(cudnn, q, k, v)
      dense_tflops = 4.0 * D * B * H * s * s / (t["ms"] * 1e-3) / 1e12
      entry["cudnn_dense"] = {**t, "tflops": dense_tflops}
      print(f"S={s} cuDNN dense bf16: {t['ms']:.2f} ms, {dense_tflops:.0f} TFLOP/s", flush=True)
    except Exception as e:  # pylint: disable=broad-except
      entry["cudnn_dense"] = {"error": _error(e)}
    for qbs, bs in TILINGS:
      row = entry.setdefault(f"q{qbs}k{bs}", {})
      n_k = s // bs
      count = max(1, round(DENSITY * n_k))
      idx, cnt = random_lists(jax.random.fold_in(key, bs), B, H, n_k, count, k_max=count,
                              n_query_blocks=s // qbs)
      pairs = computed_pairs(idx, cnt, s, bs, qbs)
      row.update({"density": DENSITY, "count": count, "pairs": pairs})
      lists = kernel_lists(idx, cnt, num_kv_blocks=n_k, num_query_blocks=s // qbs)
      tflops = lambda ms: 4.0 * D * pairs / (ms * 1e-3) / 1e12
      bf16_out = None
      quant, outs = {}, {}
      stages = [("prepass", "quant", "float8_e4m3fn"), ("fp8_kernel", "fp8", "float8_e4m3fn"),
                ("prepass_int8", "quant", "int8"), ("int8_fp8_kernel", "fp8", "int8"),
                ("int8_fp8_kernel_bias", "fp8_bias", "int8"),
                ("bf16_kernel", "bf16", None)]
      if UNSPLIT["on"]:
        stages.append(("fp8_kernel_unsplit", "fp8_unsplit", "float8_e4m3fn"))
      for label, fn, qk_dtype in stages:
        if time.perf_counter() - start > BUDGET_S:
          row[label] = {"error": "skipped: time budget spent"}
          continue
        try:
          if fn == "quant":
            prepass = jax.jit(lambda q, k, v: fp8_ops.quantize_inputs(
                q, k, v, lengths, block_size=bs, sm_scale=scale, qk_dtype=jnp.dtype(qk_dtype)))
            tm, t = _time(prepass, q, k, v)
            quant[qk_dtype] = tm.output
            row[label] = t
          elif fn in ("fp8", "fp8_unsplit", "fp8_bias"):
            if qk_dtype not in quant:
              raise RuntimeError("no pre-pass output")
            config = fp8_kernel.BlockSparseFp8Config(
                split_accumulation=fn != "fp8_unsplit",
                int_scores="bias" if fn == "fp8_bias" else fp8_kernel.DEFAULT_CONFIG.int_scores)
            kern = jax.jit(lambda *a: fp8_kernel.block_sparse_attention_fp8_padded(
                *a, block_size=bs, sm_scale=scale, num_kv_blocks=n_k, query_block_size=qbs,
                config=config, interpret=params))
            tm, t = _time(kern, *quant[qk_dtype][:6], *lists, lengths)
            row[label] = {**t, "tflops": tflops(t["ms"])}
            if fn == "fp8":
              outs[qk_dtype] = tm.output
            elif qk_dtype in outs:  # the variant's output against the default's
              row[label]["vs_default"] = metrics.output_agreement(tm.output[0],
                                                                  outs[qk_dtype][0])
          else:
            kern = jax.jit(lambda *a: bf16_kernel.block_sparse_attention_padded(
                *a, block_size=bs, sm_scale=scale, num_kv_blocks=n_k, query_block_size=qbs,
                interpret=params))
            tm, t = _time(kern, q, k, v, *lists, lengths)
            bf16_out = tm.output
            row[label] = {**t, "tflops": tflops(t["ms"])}
          if dense_tflops and "tflops" in row[label]:
            row[label]["ratio_to_cudnn_tflops"] = row[label]["tflops"] / dense_tflops
          print(f"S={s} q{qbs}k{bs} {label}: {row[label]['ms']:.2f} ms"
                + (f", {row[label]['tflops']:.0f} TFLOP/s" if "tflops" in row[label] else ""),
                flush=True)
        except Exception as e:  # pylint: disable=broad-except
          row[label] = {"error": _error(e)}
          print(f"S={s} q{qbs}k{bs} {label}: FAIL (error)", flush=True)
      for kernel, prepass, tag in (("fp8_kernel", "prepass", "fp8"),
                                   ("int8_fp8_kernel", "prepass_int8", "int8_fp8")):
        if "ms" in row.get(kernel, {}) and "ms" in row.get("bf16_kernel", {}):
          row[f"{tag}_speedup_over_bf16"] = row["bf16_kernel"]["ms"] / row[kernel]["ms"]
          row[f"{tag}_with_prepass_speedup_over_bf16"] = row["bf16_kernel"]["ms"] / (
              row[kernel]["ms"] + row[prepass]["ms"])
      for qk_dtype, out in outs.items():
        check = "check" if qk_dtype == "float8_e4m3fn" else f"check_{qk_dtype}"
        try:
          row[check] = _big_check(q, k, v, idx, cnt, out, bf16_out, quant[qk_dtype][6], s, bs,
                                  qbs, scale)
          print(f"S={s} q{qbs}k{bs} {check}: {'PASS' if row[check]['pass'] else 'FAIL'} "
                f"{row[check]['fp8']}", flush=True)
        except Exception as e:  # pylint: disable=broad-except
          row[check] = {"pass": False, "error": _error(e)}
      del quant, outs, bf16_out
      save()


def _big_check(q, k, v, idx, cnt, fp8_out, bf16_out, lse_shift, s, bs, qbs, scale):
  """fp8 (and bf16) kernel rows against float32 on three query blocks of two heads."""
  out8, lse8 = fp8_out
  got8, got16, want, lse_got, lse_want = [], [], [], [], []
  for head in (0, H - 1):
    for qb in (0, (s // qbs) // 2, s // qbs - 1):
      rows = slice(qb * qbs, (qb + 1) * qbs)
      o, l = _rows_reference(q, k, v, idx, cnt, rows=rows, head=head, bs=bs, qbs=qbs,
                             scale=scale)
      want.append(np.asarray(o))
      lse_want.append(np.asarray(l))
      got8.append(np.asarray(out8[0, rows, head], np.float32))
      lse_got.append(np.asarray(lse8[0, head, rows] + lse_shift[0, head, rows]))
      if bf16_out is not None:
        got16.append(np.asarray(bf16_out[0][0, rows, head], np.float32))
  want = np.concatenate(want)
  fp8 = metrics.output_agreement(np.concatenate(got8), want)
  _, lse_err = _lse_err(np.concatenate(lse_got), np.concatenate(lse_want))
  fp8["lse_max_err"] = lse_err
  check = {"fp8": fp8, "pass": fp8["cosine"] >= 0.99 and fp8["rel_l2"] <= 0.1 and lse_err <= 0.1}
  if got16:
    check["bf16"] = metrics.output_agreement(np.concatenate(got16), want)
  return check


def main():
  global B, H, SEQ_LENS, REPS, MIN_REP_S, BUDGET_S  # pylint: disable=global-statement
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"),
                                                    "fp8_gpu_check.json"))
  parser.add_argument("--skip_big", action="store_true", help="stage 1 only")
  parser.add_argument("--seq_lens", default=",".join(map(str, SEQ_LENS)),
                      help="comma-separated lengths of the big stage")
  parser.add_argument("--unsplit", action="store_true",
                      help="also time split_accumulation=False (e4m3)")
  parser.add_argument("--cpu_dry_run", action="store_true",
                      help="toy sizes, interpreted kernels, XLA for cuDNN (tests this script)")
  args = parser.parse_args()
  UNSPLIT["on"] = args.unsplit
  SEQ_LENS = tuple(int(x) for x in args.seq_lens.split(",") if x)
  if args.cpu_dry_run:
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    DRY.update(on=True, small_seq=300, small_length=250)
    B, H, SEQ_LENS, REPS, MIN_REP_S, BUDGET_S = 1, 2, (256,), 1, 0.0, 10**6
  start = time.perf_counter()
  dev = jax.devices()[0]
  res = {"device": dev.device_kind, "platform": dev.platform, "jax_version": jax.__version__,
         "config": {"batch": B, "heads": H, "head_dim": D, "seq_lens": SEQ_LENS,
                    "density": DENSITY, "tilings": TILINGS, "reps": REPS},
         "small": {}, "small_diagnosis": {}, "big": {}}
  print(f"{dev.device_kind}, jax {jax.__version__}", flush=True)

  def save():
    res["elapsed_s"] = time.perf_counter() - start
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(res, f, indent=1, default=str)

  for stage in (small_checks, None if args.skip_big else (lambda r: big_runs(r, start, save))):
    if stage is None:
      continue
    try:
      stage(res)
    except Exception as e:  # pylint: disable=broad-except
      res.setdefault("errors", []).append(_error(e))
    save()
  small_ok = all(r.get("pass") for r in res["small"].values())
  big_ok = all(row.get(c, {}).get("pass") for e in res["big"].values()
               for name, row in e.items() if name.startswith("q")
               for c in ("check", "check_int8"))
  res["pass"] = {"small": small_ok, "big": big_ok}
  save()
  print(f"small checks: {'PASS' if small_ok else 'FAIL'}; big checks: "
        f"{'PASS' if big_ok else 'FAIL'}; {time.perf_counter() - start:.0f} s; "
        f"JSON: {args.out}", flush=True)
  return 0 if small_ok and big_ok else 1


if __name__ == "__main__":
  sys.exit(main())
