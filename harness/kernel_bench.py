"""Library behind ``experiments/bench_kernels.py``: checks the AdaSpa kernels against the
reference, then times them against cuDNN (free of absl flags; ``run`` is the whole job).

On a GPU, in one process: (1) each implementation's three kernels are compared
with ``implementation="reference"`` at a small size (odd length, padded rows,
dense rows); (2) optionally a sweep of Triton tiles at the first sequence length;
(3) for each sequence length, cuDNN dense attention
(``jax.nn.dot_product_attention(..., implementation="cudnn")``) and each
implementation's block-sparse attention at each density (random index lists,
the same count for every row), ``block_mass`` and ``attention_with_block_mass``.
Prints a table, writes JSON and a PNG of time vs density with the ideal line
(cuDNN dense time x density).

``query_block_size`` (e.g. 128 over ``block_size`` 64): the checks run at that query
granularity, and each implementation is also timed on random row-wise lists with one
row per query block of ``query_block_size`` rows (``block_sparse_qblock``), and its
block mass and fused search at that granularity (``block_mass_qblock_ms``,
``fused_qblock_ms``), beside the square ``block_size`` timings of the same run.

``flex``: PyTorch FlexAttention (``harness/flex_peer.py``) is checked against the
reference like our implementations, and timed at each length and density on the same
lists (a ``"flex"`` entry beside them, with a spot check of its output against exact
attention on those lists); its times come from CUDA events, in the same process as the
cuDNN baseline. Without torch, or when Flex fails, the error goes in the JSON instead.

Timing (``harness/timing.py``): after a warm-up call (compile), each rep launches the
function back to back n times (n chosen so a rep lasts >= 20 ms, ``MIN_REP_S``) and
blocks once; the rep time is the wall time / n, so host dispatch overlaps device work;
the reported time is the median rep. Effective TFLOP/s = 4 * D * (computed query x key pairs,
summed over batch and heads) / time.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from adaspa_jax.harness import flex_peer, timing
from pallas_kernels import validation
from pallas_kernels.triton import block_mass_kernel, block_sparse_kernel
from pallas_kernels.triton import ops as tk


# ----------------------------------------------------------------------------- inputs
def random_qkv(key, batch, seq, heads, head_dim, dtype):
  """Three [B, S, H, D] normal arrays."""
  return [jax.random.normal(k, (batch, seq, heads, head_dim), jnp.float32).astype(dtype)
          for k in jax.random.split(key, 3)]


def random_lists(key, batch, heads, n_blocks, count, k_max=None, n_query_blocks=None):
  """Row-wise random lists: ``count`` distinct ascending ids of ``n_blocks`` key blocks per
  (batch, head, query block); ``n_query_blocks`` rows (None: ``n_blocks``).

  Returns indices int32 [B, H, nQ, k_max] (unread slots repeat the last id) and
  counts int32 [B, H, nQ]; count >= n_blocks gives dense rows.
  """
  n_q = n_blocks if n_query_blocks is None else n_query_blocks
  k_max = k_max or max(1, min(count, n_blocks))
  count = max(1, min(count, n_blocks))
  keys = jax.random.uniform(key, (batch, heads, n_q, n_blocks))
  chosen = jnp.sort(jnp.argsort(keys, axis=-1)[..., :count], axis=-1).astype(jnp.int32)
  if k_max > count:
    chosen = jnp.pad(chosen, ((0, 0), (0, 0), (0, 0), (0, k_max - count)), mode="edge")
  return chosen[..., :k_max], jnp.full((batch, heads, n_q), count, jnp.int32)


def computed_pairs(indices, counts, seq, block_size, query_block_size=None):
  """Query x key pairs the lists make a kernel compute (exact for a partial last block);
  rows are query blocks of ``query_block_size`` (None: ``block_size``) rows."""
  qbs = block_size if query_block_size is None else query_block_size
  n_blocks = -(-seq // block_size)
  sizes = jnp.minimum(block_size, seq - jnp.arange(n_blocks) * block_size)
  rows = jnp.minimum(qbs, seq - jnp.arange(indices.shape[2]) * qbs)
  slot = jnp.arange(indices.shape[-1]) < counts[..., None]
  listed = jnp.where(slot, sizes[jnp.clip(indices, 0, n_blocks - 1)], 0).sum(-1)
  keys = jnp.where(counts >= n_blocks, seq, listed)  # int32 [B, H, nQ], keys per query row
  return int((np.asarray(keys, np.int64) * np.asarray(rows, np.int64)).sum())


MIN_REP_S = 0.02  # a timed rep launches back-to-back calls for about this long (``timing``)


# ----------------------------------------------------------------------------- kernels
def implementation_ops(name, interpret, configs=None):
  """(block_sparse_attention, block_mass, attention_with_block_mass) of one implementation,
  with the reference's signatures.

  ``configs`` ({"sparse", "dense", "mass"}: Triton configs, e.g. from ``sweep``) only for
  ``"triton"``: its ops are then called with them (a missing kind: the default).
  """
  if configs:
    if name != "triton":
      raise ValueError(f"configs={configs!r} with implementation={name!r}: expected configs "
                       "only for 'triton'.")
    return (functools.partial(tk.block_sparse_attention, interpret=interpret,
                              config=configs.get("sparse")),
            functools.partial(tk.block_mass, interpret=interpret, config=configs.get("mass")),
            functools.partial(tk.attention_with_block_mass, interpret=interpret,
                              config=configs.get("dense"), mass_config=configs.get("mass")))
  kw = dict(implementation=name)
  if name != "reference":
    kw["interpret"] = interpret
  return tuple(functools.partial(op, **kw) for op in (
      pk.block_sparse_attention, pk.block_mass, pk.attention_with_block_mass))


def kernels(name, interpret, configs=None, query_block_size=None):
  """(block_sparse, block_mass, fused) callables of one implementation, jitted
  (``configs``: see ``implementation_ops``; ``query_block_size``: rows per list row and
  per mass row, None for the block size)."""
  sparse_op, mass_op, fused_op = implementation_ops(name, interpret, configs)
  qb = dict(query_block_size=query_block_size)
  sparse = lambda q, k, v, i, c, bs: sparse_op(q, k, v, i, c, block_size=bs, return_lse=False,
                                               **qb)
  mass = lambda q, k, lse, bs: mass_op(q, k, lse, block_size=bs, **qb)
  fused = lambda q, k, v, bs: fused_op(q, k, v, block_size=bs, **qb)
  return (jax.jit(sparse, static_argnums=5), jax.jit(mass, static_argnums=3),
          jax.jit(fused, static_argnums=3))


def _rel(x, ref, mask=None):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  if mask is not None:
    x, ref = x[mask], ref[mask]
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def check(name, *, seq, heads, head_dim, dtype, block_size, interpret, key, configs=None,
          query_block_size=None):
  """Compares one implementation with the reference at a small size; returns a dict
  (``configs``: see ``implementation_ops``; ``query_block_size``: every op at that
  query granularity, None for the block size)."""
  b = 2
  q, k, v = random_qkv(key, b, seq, heads, head_dim, dtype)
  lengths = jnp.array([seq, max(1, (seq * 7) // 10)], jnp.int32)
  n_blk = -(-seq // block_size)
  qbs = block_size if query_block_size is None else query_block_size
  idx, cnt = random_lists(jax.random.fold_in(key, 1), b, heads, n_blk, max(1, n_blk // 3),
                          n_query_blocks=-(-seq // qbs))
  # Mixed counts: some rows keep 1 block, some are dense (count = nK).
  sel = jax.random.randint(jax.random.fold_in(key, 2), cnt.shape, 0, 3)
  cnt = jnp.where(sel == 0, 1, jnp.where(sel == 1, n_blk, cnt)).astype(jnp.int32)
  ops = implementation_ops(name, interpret, configs)
  qb = dict(query_block_size=query_block_size)
  sparse_op, mass_op, fused_op = (functools.partial(op, **qb) for op in ops)
  ref = dict(implementation="reference", **qb)
  res = {"implementation": name, "seq": seq, "batch": b, "heads": heads, "head_dim": head_dim,
         "dtype": jnp.dtype(dtype).name, "block_size": block_size,
         "query_block_size": qbs}
  try:
    out, lse = sparse_op(q, k, v, idx, cnt, block_size=block_size, kv_lengths=lengths)
    want_out, want_lse = pk.block_sparse_attention(q, k, v, idx, cnt, block_size=block_size,
                                                   kv_lengths=lengths, **ref)
    finite = np.isfinite(np.asarray(want_lse))
    res["block_sparse_out_rel_err"] = _rel(out, want_out)
    res["block_sparse_lse_max_abs_err"] = float(
        np.max(np.abs(np.asarray(lse)[finite] - np.asarray(want_lse)[finite])))
    res["block_sparse_lse_inf_match"] = bool(
        np.array_equal(np.isfinite(np.asarray(lse)), finite))
    res["block_sparse_nan"] = bool(np.isnan(np.asarray(out, np.float32)).any()
                                   or np.isnan(np.asarray(lse)).any())
    f_out, f_lse, f_mass = fused_op(q, k, v, block_size=block_size, kv_lengths=lengths)
    w_out, w_lse, w_mass = pk.attention_with_block_mass(
        q, k, v, block_size=block_size, kv_lengths=lengths, **ref)
    finite = np.isfinite(np.asarray(w_lse))
    res["fused_out_rel_err"] = _rel(f_out, w_out)
    res["fused_lse_max_abs_err"] = float(
        np.max(np.abs(np.asarray(f_lse)[finite] - np.asarray(w_lse)[finite])))
    res["fused_mass_rel_err"] = _rel(f_mass, w_mass)
    # A cached LSE from another step: the dense one, shifted (finite on every valid row).
    cached = w_lse + 0.3 * jax.random.normal(jax.random.fold_in(key, 3), w_lse.shape)
    mass = mass_op(q, k, cached, block_size=block_size, kv_lengths=lengths)
    want_mass = pk.block_mass(q, k, cached, block_size=block_size, kv_lengths=lengths, **ref)
    res["block_mass_rel_err"] = _rel(mass, want_mass)
    tol = 1e-4 if dtype == jnp.float32 else 2e-2
    res["passed"] = bool(
        res["block_sparse_out_rel_err"] < tol and res["block_sparse_lse_max_abs_err"] < 5 * tol
        and res["block_sparse_lse_inf_match"] and not res["block_sparse_nan"]
        and res["block_mass_rel_err"] < tol and res["fused_out_rel_err"] < tol
        and res["fused_lse_max_abs_err"] < 5 * tol and res["fused_mass_rel_err"] < tol)
  except Exception as e:  # pylint: disable=broad-except
    res["passed"] = False
    res["error"] = f"{type(e).__name__}: {e}"[:2000]
  return res


# ----------------------------------------------------------------------------- timing runs
def dense_flops(b, h, d, s):
  return 4.0 * b * h * d * s * s


def typical_lse(q):
  """float32 [B, H, S]: log(S) + 1/2, the LSE of unit-normal q, k at scale 1/sqrt(D).

  Timing does not depend on the exact value; this keeps block_mass timings free of
  any other kernel.
  """
  b, s, h, _ = q.shape
  return jnp.full((b, h, s), np.log(s) + 0.5, jnp.float32)


def time_dense(q, k, v, reps, implementation="cudnn") -> timing.Timing:
  fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v,
                                                            implementation=implementation))
  return timing.time_fn(fn, q, k, v, reps=reps, min_rep_s=MIN_REP_S)


def timing_lists(key, i, density, batch, heads, n_blk, n_query_blocks):
  """(count, indices, counts): the random lists of the ``i``-th density of a timing run,
  one list width (nK) for every density, so one compile per size. Every timed
  implementation (and FlexAttention) gets the same lists from the same ``key``."""
  count = max(1, round(density * n_blk))
  idx, cnt = random_lists(jax.random.fold_in(key, i), batch, heads, n_blk, count, k_max=n_blk,
                          n_query_blocks=n_query_blocks)
  return count, idx, cnt


def grains(block_size, query_block_size=None):
  """(field suffix, query_block_size) of each list granularity a run times: square
  blocks ("", None), and with a ``query_block_size`` other than ``block_size`` also
  ("_qblock", query_block_size)."""
  out = [("", None)]
  if query_block_size not in (None, block_size):
    out.append(("_qblock", query_block_size))
  return out


def timed_row(density, count, n_blk, pairs, head_dim, median_s, reps_s) -> dict:
  """A timed block-sparse row: ms, the reps and TFLOP/s per computed block (``pairs``
  sums over batch and heads)."""
  return {"density": density, "count": min(count, n_blk), "pairs": pairs,
          "ms": median_s * 1e3, "rep_ms": [t * 1e3 for t in reps_s],
          "tflops": 4.0 * head_dim * pairs / median_s / 1e12}


def time_impl(name, q, k, v, *, densities, block_size, reps, interpret, key, with_search=True,
              configs=None, query_block_size=None):
  """Times one implementation's kernels at one size; returns a dict (ms, TFLOP/s)
  (``configs``: see ``implementation_ops``). With ``query_block_size`` (not the block
  size) also ``block_sparse_qblock`` rows (lists of one row per query block of that many
  rows), ``block_mass_qblock_ms`` and ``fused_qblock_ms``."""
  b, s, h, d = q.shape
  n_blk = -(-s // block_size)
  res = {}
  for suffix, qbs in grains(block_size, query_block_size):
    sparse, mass, fused = kernels(name, interpret, configs, qbs)
    n_q = -(-s // (qbs or block_size))
    rows = []
    for i, density in enumerate(densities):
      count, idx, cnt = timing_lists(key, i, density, b, h, n_blk, n_q)
      pairs = computed_pairs(idx, cnt, s, block_size, qbs)
      t = timing.time_fn(sparse, q, k, v, idx, cnt, block_size, reps=reps, min_rep_s=MIN_REP_S)
      rows.append(timed_row(density, count, n_blk, pairs, d, t.median_s, t.reps_s))
      del idx, cnt
    res["block_sparse" + suffix] = rows
    if with_search:
      for field, fn, args in ((f"block_mass{suffix}_ms", mass,
                               (q, k, typical_lse(q), block_size)),
                              (f"fused{suffix}_ms", fused, (q, k, v, block_size))):
        try:
          res[field] = timing.time_fn(fn, *args, reps=reps, min_rep_s=MIN_REP_S).median_s * 1e3
        except Exception as e:  # pylint: disable=broad-except
          res[field.replace("_ms", "_error")] = f"{type(e).__name__}: {e}"[:2000]
  return res


def time_flex(q, k, v, *, densities, block_size, reps, key, query_block_size=None,
              spot_rows=4):
  """Times PyTorch FlexAttention on the lists ``time_impl`` times (same ``key``); returns
  a dict shaped like ``time_impl``'s (``block_sparse`` rows, ``block_sparse_qblock``
  with ``query_block_size``), each row with a ``check`` (``flex_peer.spot_check`` of
  ``spot_rows`` query blocks) and ``launch_ms`` (host time to launch a call: near ``ms``,
  the host set the pace), plus the torch version and the kernel options per grain.

  q, k, v: JAX [batch, seq, heads, head_dim] on the GPU (shared with torch, no copy).
  """
  b, s, h, d = q.shape
  n_blk = -(-s // block_size)
  device = flex_peer.heads_major(q).device
  res = {"torch_version": flex_peer.torch_version(), "device": str(device),
         "kernel_options": {}, "clock": None}
  for suffix, qbs in grains(block_size, query_block_size):
    opts = flex_peer.kernel_options(block_size, qbs)
    res["kernel_options"]["block_sparse" + suffix] = opts
    n_q = -(-s // (qbs or block_size))
    rows = []
    for i, density in enumerate(densities):
      count, idx, cnt = timing_lists(key, i, density, b, h, n_blk, n_q)
      pairs = computed_pairs(idx, cnt, s, block_size, qbs)
      mask = flex_peer.block_mask(idx, cnt, seq=s, block_size=block_size, query_block_size=qbs)
      call = flex_peer.make_call(q, k, v, mask, options=opts)
      t = flex_peer.time_call(call, device=device, reps=reps, min_rep_s=MIN_REP_S)
      res["clock"] = t["clock"]
      rows.append({**timed_row(density, count, n_blk, pairs, d, t["median_s"], t["reps_s"]),
                   "first_s": t["first_s"], "calls_per_rep": t["calls_per_rep"],
                   "launch_ms": t["launch_s"] * 1e3,
                   "check": flex_peer.spot_check(
                       call(), q, k, v, idx, cnt, block_size=block_size, query_block_size=qbs,
                       key=jax.random.fold_in(key, 1000 + i), n_rows=spot_rows)})
      del idx, cnt, mask, call
      flex_peer.free_torch_memory()
    res["block_sparse" + suffix] = rows
  return res


# (block_q, block_k, num_warps, num_stages, fast_exp2, prefetch) of a Triton config
# (BlockSparseConfig for sparse and dense, BlockMassConfig for mass). Kept short: each
# entry is one Triton compile on the device. First H200 run (docs/log/triton.md):
# block_k 32 beat 64 for the sparse kernel and fast_exp2 helped a little everywhere.
SWEEP_SPARSE = [(64, 32, 4, 3, True, False), (64, 32, 4, 3, True, True),
                (64, 32, 4, 2, True, False), (64, 32, 4, 4, True, False),
                (64, 64, 4, 2, True, True), (64, 16, 4, 3, True, False)]
SWEEP_DENSE = [(128, 64, 8, 3, True, False), (128, 64, 8, 3, True, True),
               (128, 64, 4, 3, True, False), (128, 128, 8, 3, True, False),
               (128, 32, 4, 3, True, False)]
SWEEP_MASS = [(128, 64, 4, 3, True, False), (128, 64, 4, 3, True, True),
              (128, 64, 4, 2, True, False), (64, 64, 4, 2, True, False),
              (64, 64, 4, 2, True, True), (128, 128, 8, 3, True, True)]


def sweep(q, k, v, *, block_size, reps, key, log, interpret=False):
  """Times Triton tile choices; returns (results, best config per kernel kind)."""
  b, s, h, d = q.shape
  n_blk = -(-s // block_size)
  lists = [random_lists(jax.random.fold_in(key, i), b, h, n_blk,
                        max(1, round(dens * n_blk)), k_max=n_blk)
           for i, dens in enumerate((0.1, 0.5, 1.0))]
  out = {"sparse": [], "dense": [], "mass": []}
  best = {}

  def run(kind, cfg, fn):
    try:
      sec = fn()
      out[kind].append({"tiles": cfg, "ms": sec * 1e3})
      log(f"sweep {kind:6s} {cfg}: {sec * 1e3:8.3f} ms")
      if kind not in best or sec < best[kind][1]:
        best[kind] = (cfg, sec)
    except Exception as e:  # pylint: disable=broad-except
      out[kind].append({"tiles": cfg, "error": f"{type(e).__name__}: {e}"[:500]})
      log(f"sweep {kind:6s} {cfg}: FAILED {type(e).__name__}: {str(e)[:200]}")

  def sparse_fn(t):
    fn = jax.jit(lambda q, k, v, i, c: tk.block_sparse_attention(
        q, k, v, i, c, block_size=block_size, return_lse=False, config=t, interpret=interpret))
    return lambda: sum(timing.time_fn(fn, q, k, v, i, c, reps=reps, min_rep_s=MIN_REP_S).median_s
                       for i, c in lists)

  def dense_fn(t):
    fn = jax.jit(lambda q, k, v: tk.attention(q, k, v, config=t, interpret=interpret))
    return lambda: timing.time_fn(fn, q, k, v, reps=reps, min_rep_s=MIN_REP_S).median_s

  lse = typical_lse(q)

  def mass_fn(t):
    fn = jax.jit(lambda q, k, l: tk.block_mass(q, k, l, block_size=block_size, config=t,
                                               interpret=interpret))
    return lambda: timing.time_fn(fn, q, k, lse, reps=reps, min_rep_s=MIN_REP_S).median_s

  kinds = (("sparse", SWEEP_SPARSE, tk.BlockSparseConfig, sparse_fn),
           ("dense", SWEEP_DENSE, tk.BlockSparseConfig, dense_fn),
           ("mass", SWEEP_MASS, tk.BlockMassConfig, mass_fn))
  for kind, choices, cls, make in kinds:
    for cfg in choices:
      run(kind, cfg, make(cls(*cfg)))
  chosen = {kind: cls(*best[kind][0]) for kind, _, cls, _ in kinds if kind in best}
  return out, chosen


def triton_configs(configs):
  """The Triton configs a run uses ({"sparse", "dense", "mass"}: ``configs``' or the
  defaults), as JSON-ready dicts."""
  defaults = {"sparse": block_sparse_kernel.DEFAULT_CONFIG,
              "dense": block_sparse_kernel.DEFAULT_DENSE_CONFIG,
              "mass": block_mass_kernel.DEFAULT_CONFIG}
  return {kind: dataclasses.asdict(configs.get(kind, default))
          for kind, default in defaults.items()}


def flex_info(*, block_size, query_block_size=None):
  """What a run records about FlexAttention before timing it: the torch version, the
  kernel options per grain, how q, k, v reach torch and JAX's GPU memory settings; or
  ``error`` (e.g. torch not installed)."""
  info = {"torch_version": flex_peer.torch_version(),
          "layout": "JAX [B, S, H, D] shared by DLPack, transposed view [B, H, S, D] "
                    "(no copy)",
          "compile": "torch.compile(flex_attention, dynamic=False)",
          "timing": "CUDA events (each size's 'clock'; the host clock off GPU): median of "
                    "reps; a rep = n back-to-back calls / n (n so that a rep lasts >= 20 ms), "
                    "after a warm-up (compile) call",
          "env": {name: os.environ.get(name) for name in (
              "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE",
              "XLA_PYTHON_CLIENT_ALLOCATOR")}}
  if info["torch_version"] is None:
    info["error"] = "ImportError: torch is not installed (the 'parity' extra)"
    return info
  try:
    info["kernel_options"] = {"block_sparse" + suffix: flex_peer.kernel_options(block_size, qbs)
                              for suffix, qbs in grains(block_size, query_block_size)}
    flex_peer.compiled_flex_attention()  # imports torch.nn.attention.flex_attention
  except Exception as e:  # pylint: disable=broad-except
    info["error"] = f"{type(e).__name__}: {e}"[:2000]
  return info


def add_baseline_ratios(entry):
  """Adds ``tflops_vs_baseline`` (row TFLOP/s / the size's dense baseline TFLOP/s, from
  the same run) to every timed row of a size entry."""
  base = entry["baseline"]["tflops"]
  for res in entry["implementations"].values():
    for field in ("block_sparse", "block_sparse_qblock"):
      for row in res.get(field, []):
        row["tflops_vs_baseline"] = row["tflops"] / base if base == base and base else None


# ----------------------------------------------------------------------------- report
def table(results):
  lines = []
  flex = results.get("flex")
  if flex:
    lines.append(f"flex: torch {flex.get('torch_version')}"
                 + (f" ERROR {flex['error'][:150]}" if "error" in flex else ""))
  for entry in results["sizes"]:
    s, base = entry["seq"], entry["baseline"]
    lines.append(f"S={s}: {base['implementation']} dense {base['ms']:.3f} ms = "
                 f"{base['tflops']:.1f} TFLOP/s "
                 f"(again at the end: {base.get('ms_again', float('nan')):.3f} ms)")
    lines.append(f"  {'impl':8s} {'density':>7s} {'count':>6s} {'ms':>10s} {'TFLOP/s':>8s} "
                 f"{'% base':>8s} {'x ideal':>8s}")
    qbs = results["config"].get("query_block_size")
    for name, res in entry["implementations"].items():
      if "error" in res:
        lines.append(f"  {name:8s} ERROR {res['error'][:150]}")
        continue
      for suffix, label in (("", name), ("_qblock", f"{name}:q{qbs}")):
        for row in res.get("block_sparse" + suffix, []):
          ideal = base["ms"] * row["pairs"] / entry["dense_pairs"]
          lines.append(f"  {label:8s} {row['density']:7.2f} {row['count']:6d} "
                       f"{row['ms']:10.3f} {row['tflops']:8.1f} "
                       f"{100 * row['tflops'] / base['tflops']:7.1f}% {row['ms'] / ideal:8.2f}")
          if "check" in row:
            lines.append(f"  {label:8s} spot check of {len(row['check']['rows'])} query "
                         f"blocks: max |err| {row['check']['max_abs_err']:.2e}, cosine "
                         f"{row['check']['cosine']:.6f}; host launch "
                         f"{row.get('launch_ms', float('nan')):.3f} ms/call")
        for field in (f"block_mass{suffix}_error", f"fused{suffix}_error"):
          if field in res:
            lines.append(f"  {label:8s} {field} {res[field][:150]}")
        if f"block_mass{suffix}_ms" in res:
          ms = res[f"block_mass{suffix}_ms"]
          lines.append(f"  {label:8s} block_mass {ms:.3f} ms = {ms / base['ms']:.2f} x dense "
                       "(target <= 0.6)")
        if f"fused{suffix}_ms" in res:
          ms = res[f"fused{suffix}_ms"]
          lines.append(f"  {label:8s} attention_with_block_mass {ms:.3f} ms = "
                       f"{ms / base['ms']:.2f} x dense (target <= 1.7)")
  return "\n".join(lines)


def plot(results, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  sizes = results["sizes"]
  fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False)
  for ax, entry in zip(axes[0], sizes):
    base, base_name = entry["baseline"]["ms"], entry["baseline"]["implementation"]
    dens = np.linspace(0, 1, 50)
    ax.plot(dens, base * dens, "k--", label=f"ideal ({base_name} dense x density)")
    ax.axhline(base, color="gray", lw=1, label=f"{base_name} dense")
    qbs = results["config"].get("query_block_size")
    for name, res in entry["implementations"].items():
      for field, label in (("block_sparse", f"{name} block-sparse"),
                           ("block_sparse_qblock", f"{name} block-sparse q{qbs}")):
        if field not in res:
          continue
        xs = [r["pairs"] / entry["dense_pairs"] for r in res[field]]
        ax.plot(xs, [r["ms"] for r in res[field]], "o-", label=label)
    ax.set_xlabel("density (computed pairs / dense pairs)")
    ax.set_ylabel("ms")
    ax.set_title(f"S={entry['seq']} B={results['config']['batch']} "
                 f"H={results['config']['heads']} D={results['config']['head_dim']}")
    ax.legend(fontsize=8)
  fig.suptitle(f"{results['device']}, jax {results['jax_version']}")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def replot(json_path):
  """Re-prints the table of a results JSON and re-draws its PNG beside it."""
  with open(json_path) as f:
    results = json.load(f)
  print(table(results))
  plot(results, os.path.splitext(json_path)[0] + ".png")
  return results


def run(*, seq_lens, batch, heads, head_dim, dtype, block_size, densities, implementations,
        out_dir, check_only=False, interpret=False, check_seq=1000, reps=5, sweep_tiles=False,
        tag="", baseline="cudnn", command="", query_block_size=None, flex=False):
  """The checks, then (unless ``check_only``) the timings; writes
  ``out_dir/bench_<date><tag>.json`` after every step and the table and PNG at the end.

  seq_lens and densities may be strings (as flags give them); ``sweep_tiles`` sweeps the
  Triton tiles at the first length and keeps the fastest; ``baseline`` is the dense
  implementation (``"xla"`` only for CPU dry runs); ``command`` is recorded as is;
  ``query_block_size``: see the module docstring (None: square blocks only); ``flex``:
  also check and time PyTorch FlexAttention (module docstring; ``results["flex"]`` holds
  its torch version, options and any error). Every timed row gets ``tflops_vs_baseline``
  (its TFLOP/s / the dense baseline's of the same size and run).
  Returns the results dict (what the JSON holds).
  """
  dtype = jnp.dtype(dtype)
  bs = block_size
  validation.check_query_block_size(query_block_size, bs)
  densities = [float(x) for x in densities]
  os.makedirs(out_dir, exist_ok=True)
  stamp = datetime.datetime.now(datetime.timezone.utc)
  name = f"bench_{stamp.strftime('%Y%m%d')}{tag}"
  json_path = os.path.join(out_dir, name + ".json")
  results = {
      "date": stamp.isoformat(timespec="seconds"),
      "device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
      "jax_version": jax.__version__, "command": command,
      "config": {"batch": batch, "heads": heads, "head_dim": head_dim,
                 "dtype": dtype.name, "block_size": bs, "query_block_size": query_block_size,
                 "densities": densities,
                 "implementations": list(implementations), "reps": reps,
                 "interpret": interpret, "check_only": check_only, "baseline": baseline,
                 "flex": bool(flex)},
      "timing": "median of reps; a rep = n back-to-back calls / n, host wall clock, "
                "blocked once (n so that a rep lasts >= 20 ms)",
      "checks": [], "sizes": [],
  }

  def save():
    with open(json_path, "w") as f:
      json.dump(results, f, indent=1, default=str)

  def log(msg):
    print(msg, flush=True)

  key = jax.random.key(0)
  configs = {}  # Triton configs: the defaults, or the sweep's choice
  for impl in implementations:
    res = check(impl, seq=check_seq, heads=min(2, heads), head_dim=head_dim, dtype=dtype,
                block_size=bs, interpret=interpret, key=jax.random.fold_in(key, 7),
                query_block_size=query_block_size)
    results["checks"].append(res)
    log(f"check {impl}: " + json.dumps(res))
    save()
  if flex:
    results["flex"] = flex_info(block_size=bs, query_block_size=query_block_size)
    if "error" not in results["flex"]:
      res = flex_peer.check_flex(seq=check_seq, heads=min(2, heads), head_dim=head_dim,
                                 dtype=dtype, block_size=bs, key=jax.random.fold_in(key, 7),
                                 query_block_size=query_block_size)
      results["checks"].append(res)
      log("check flex: " + json.dumps(res))
    else:
      log(f"flex: {results['flex']['error']}")
    save()
  if check_only:
    log(f"wrote {json_path}")
    return results

  for si, seq in enumerate(int(x) for x in seq_lens):
    q, k, v = random_qkv(jax.random.fold_in(key, seq), batch, seq, heads, head_dim, dtype)
    if si == 0 and sweep_tiles and "triton" in implementations:
      sweep_res, tiles = sweep(q, k, v, block_size=bs, reps=max(3, reps // 2),
                               key=jax.random.fold_in(key, 99), log=log, interpret=interpret)
      results["sweep"] = {"seq": seq, "densities": [0.1, 0.5, 1.0], "results": sweep_res,
                          "chosen": {k_: dataclasses.asdict(t) for k_, t in tiles.items()}}
      configs = tiles  # the Triton timings below use the chosen tiles
      # The chosen tiles (perhaps with the approximate exp2) pass the same check.
      res = check("triton", seq=check_seq, heads=min(2, heads), head_dim=head_dim, dtype=dtype,
                  block_size=bs, interpret=interpret, key=jax.random.fold_in(key, 8),
                  configs=configs, query_block_size=query_block_size)
      res["tiles"] = results["sweep"]["chosen"]
      results["checks"].append(res)
      log("check triton (swept tiles): " + json.dumps(res))
      save()
    try:
      base = time_dense(q, k, v, reps, baseline)
      base_s, base_reps, base_err = base.median_s, base.reps_s, None
    except Exception as e:  # pylint: disable=broad-except
      base_s, base_reps, base_err = float("nan"), [], f"{type(e).__name__}: {e}"[:2000]
      log(f"baseline failed: {base_err}")
    n_blk = -(-seq // bs)
    entry = {"seq": seq, "dense_pairs": batch * heads * seq * seq,
             "baseline": {"implementation": baseline, "ms": base_s * 1e3,
                          "rep_ms": [t * 1e3 for t in base_reps], "error": base_err,
                          "tflops": dense_flops(batch, heads, head_dim, seq) / base_s / 1e12},
             "num_blocks": n_blk, "implementations": {}}
    results["sizes"].append(entry)
    for impl in implementations:
      try:
        entry["implementations"][impl] = time_impl(
            impl, q, k, v, densities=densities, block_size=bs, reps=reps,
            interpret=interpret, key=jax.random.fold_in(key, seq + 1),
            configs=configs if impl == "triton" else None, query_block_size=query_block_size)
        if impl == "triton":
          entry["implementations"][impl]["tiles"] = triton_configs(configs)
      except Exception as e:  # pylint: disable=broad-except
        entry["implementations"][impl] = {"error": f"{type(e).__name__}: {e}"[:2000]}
      log(f"S={seq} {impl}: " + json.dumps(entry["implementations"][impl])[:600])
      save()
    if flex:
      if "error" in results["flex"]:
        entry["implementations"]["flex"] = {"error": results["flex"]["error"]}
      else:
        try:
          entry["implementations"]["flex"] = time_flex(
              q, k, v, densities=densities, block_size=bs, reps=reps,
              key=jax.random.fold_in(key, seq + 1), query_block_size=query_block_size)
        except Exception as e:  # pylint: disable=broad-except
          entry["implementations"]["flex"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        try:
          flex_peer.free_torch_memory()
        except Exception:  # pylint: disable=broad-except
          pass
      log(f"S={seq} flex: " + json.dumps(entry["implementations"]["flex"])[:600])
      save()
    add_baseline_ratios(entry)
    if base_err is None:
      entry["baseline"]["ms_again"] = time_dense(q, k, v, reps, baseline).median_s * 1e3
    save()
    del q, k, v
  log(table(results))
  plot(results, os.path.join(out_dir, name + ".png"))
  save()
  log(f"wrote {json_path}")
  return results
