"""Tuning variants of the Mosaic GPU kernels on an H200: launch order, ping-pong, ring depth, floor.

The tuning runs behind the ``DEFAULT_CONFIG`` of ``pallas_kernels.mosaic.block_sparse_kernel``
and ``block_mass_kernel`` (results: docs/log/mosaic.md). The kernels are called
directly with explicit configs (``BlockSparseConfig``, ``BlockMassConfig``; the
block mass with Pallas' automatic barriers and one key block per K tile unless a
mode says otherwise, as the kernel's defaults were when these runs began), so the
numbers do not depend on the defaults of the day; the fused search through the public
API gets its ``mass_config``.

  python -m tools.mosaic_variants check             # every variant vs reference
  python -m tools.mosaic_variants time 32768 118784  # sparse variants, all densities
  python -m tools.mosaic_variants tune 118784        # bs 128 and block-mass order
  python -m tools.mosaic_variants stages [S ...]     # K/V ring depth (below)
  python -m tools.mosaic_variants floor [S ...]      # load-only floor (below)
  python -m tools.mosaic_variants all [S ...] [--budget=210]  # stages, then floor
  python -m tools.mosaic_variants keytile [S ...]    # block-mass K tile
  python -m tools.mosaic_variants anatomy [S ...]    # block-mass time without its parts
  python -m tools.mosaic_variants barriers [S ...]   # block mass, hand-placed barriers
  python -m tools.mosaic_variants widetile [S ...]   # block mass, 256-key tiles
  python -m tools.mosaic_variants anatomy256 [S ...] # as anatomy, 256-key tiles
  python -m tools.mosaic_variants split [S ...]      # block mass, split_wgmma off / on

(from the repository root; S defaults to 32768 118784.) The block-mass options that
were measured slower and removed (``pipeline``, ``schedule_barrier``, ``row_tiles``,
``mma_sums``, ``poly_keys``) had modes here too (``pingpong``, ``rows``, ``mmasums``,
``polyexp``, ``pingpoly``, and ``keytile`` with and without ``pipeline``): their results
are in docs/log/mosaic.md and the modes in git history.

``stages``: block-sparse bs 64 with rings of 2 (default) and 3 stages, bs 128
with its default (2) and 3, densities 0.05/0.2/0.5/1.0; block mass bs 64 with
2, 3, 4 (default) and 6 stages (a constant LSE: its time does not depend on the
values). Depths that do not fit in shared memory get a row saying so. Each
depth is first checked against ``implementation="reference"`` at S=1000, B=2,
H=2 (as ``check``), then timed.

``floor``: ``tools.mosaic_floor.load_only_padded`` (same grid, lists,
rings and barriers, no math) at bs 64 and 128, densities 0.05/0.2/1.0, next to
the real kernel on the same lists and cuDNN dense; K+V GB/s = bytes the lists
name / time, and real/floor. Its output is compared with what it must copy.
Then the floor of a 3-stage ring at bs 64, if time is left.

``keytile``: block mass at bs 64 with 64-key K tiles (one key block per
wgmma) and with 128-key tiles (two blocks, ``key_tile=128``, the default from this
mode's run until ``widetile``'s), each checked at S=1000 first, then timed; then the
fused search (``mosaic.attention_with_block_mass``, bs 64) through the public API;
cuDNN in the same run.

``anatomy``: block mass at bs 64 (128-key tiles) as it is, with its exponentials
replaced by a multiply, with its QK^T wgmma replaced by a constant tile, and with
both (stand-ins for timing only: the masses are wrong); then K rings of 2, 3
and 4 stages and query tiles fastest in the grid. cuDNN in the same run.

``barriers``: block mass at bs 64 (128-key tiles) and bs 128 with Pallas' automatic
barriers and with ``explicit_barriers``, each checked at S=1000 and at S=9000 (several
groups of key blocks, so a missing barrier between groups would show), then timed; then
the fused search through the public API with each. cuDNN in the same run.

``widetile``: block mass (hand-placed barriers) at bs 64 and 128 with 128- and 256-key
tiles (``WIDE_TILES``), each checked twice at each of ``WIDE_CHECKS`` (S = 1000, 9000 with
and without query tiles fastest, 18000), then timed; then the fused search through the
public API with each tile. cuDNN in the same run.

``all`` writes one JSON, rewritten after every row; a row whose measurement
raises records the error and the run goes on. ``--budget`` (seconds from the
start) skips what would start too late: ``stages`` gets 55% of it; a watchdog
ends the process if one measurement hangs for 90 s, leaving the JSON as it is.
At the default sizes ``all`` compiles about 32 kernels and spends about 25 s in
them (from the H200 times in docs/log/mosaic.md; compile times not yet measured).

Inputs: B=1, H=24, D=128, bf16 normal q/k/v; random row-wise lists with the same
count in every row (``stages``/``floor``: padded to nK columns, so one compile
serves every density). Timing (``adaspa_jax.harness.timing``): one warm-up call, then the
median of 3-5 calls each blocked on (host wall clock). JSON goes to $OUT (default /tmp).
"""

import dataclasses
import functools
import json
import math
import os
import sys
import threading
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from adaspa_jax.harness import timing
from tools.mosaic_floor import expected_output, load_only_padded
from pallas_kernels.mosaic import block_mass_kernel as mosaic_block_mass
from pallas_kernels.mosaic import block_sparse_kernel as mosaic_block_sparse
from pallas_kernels.mosaic import common as mosaic_common
from pallas_kernels.mosaic import interpreter as mosaic_interpret
from pallas_kernels.mosaic import ops as mosaic
from pallas_kernels.mosaic.block_mass_kernel import BlockMassConfig, block_mass_padded
from pallas_kernels.mosaic.block_sparse_kernel import (
    BlockSparseConfig, block_sparse_attention_padded)

B, H, D = 1, 24, 128
SM_SCALE = 1 / math.sqrt(D)
SEQS = (32768, 118784)
STAGE_DENSITIES = (0.05, 0.2, 0.5, 1.0)
FLOOR_DENSITIES = (0.05, 0.2, 1.0)
SPARSE_STAGES = (None, 3)  # None: the kernel's default (2 at D=128 for both block sizes)
MASS_STAGES = (2, 3, None, 6)  # None: the default, 4 at bs 64, D=128
CHECK_SEQ = 1000  # sequence length of the ring-depth checks (as ``check``)
HANG_S = 90  # one measurement (compile included) taking longer than this is a hang


def rel(x, y):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))


def lists(key, b, h, n_blk, count, k_max):
  """``count`` distinct ascending random ids per row, padded to k_max by repetition."""
  keys = jax.random.uniform(key, (b, h, n_blk, n_blk))
  chosen = jnp.sort(jnp.argsort(keys, -1)[..., :count], -1).astype(jnp.int32)
  chosen = jnp.pad(chosen, ((0, 0), (0, 0), (0, 0), (0, k_max - count)), mode="edge")
  return chosen, jnp.full((b, h, n_blk), count, jnp.int32)


def mass_config(stages=None, key_tile=None, **fields):
  """The ``BlockMassConfig`` of a tuning run: Pallas' automatic barriers and ``key_tile``
  None (one key block per K tile) unless ``fields`` say otherwise."""
  return BlockMassConfig(**{"explicit_barriers": False, "key_tile": key_tile, "stages": stages,
                            **fields})


def sparse_fn(bs, n_blk, lengths, **variant):
  """The padded block-sparse kernel, jitted, with ``BlockSparseConfig(**variant)``."""
  config = BlockSparseConfig(**variant)
  return jax.jit(lambda q, k, v, i, c, z: block_sparse_attention_padded(
      q, k, v, i, c, z, lengths, block_size=bs, sm_scale=1 / math.sqrt(D),
      num_kv_blocks=n_blk, config=config))


def check_inputs(d, bs, dtype, seq=1000, b=2, h=2):
  """The correctness case of ``check``: odd length, a short batch element, rows
  with count 0, 1 and nK (dense), lists of nK/3 random blocks."""
  key = jax.random.key(d * 1000 + bs)
  q, k, v = [jax.random.normal(kk, (b, seq, h, d), jnp.float32).astype(dtype)
             for kk in jax.random.split(key, 3)]
  lengths = jnp.array([seq, seq * 7 // 10], jnp.int32)
  n_blk = -(-seq // bs)
  idx, cnt = lists(jax.random.fold_in(key, 1), b, h, n_blk, max(1, n_blk // 3),
                   max(1, n_blk // 3))
  sel = jax.random.randint(jax.random.fold_in(key, 2), cnt.shape, 0, 4)
  cnt = jnp.where(sel == 0, 1, jnp.where(sel == 1, n_blk, jnp.where(sel == 2, 0, cnt)))
  return key, q, k, v, lengths, n_blk, idx, cnt.astype(jnp.int32)


def padded_args(q, k, v, idx, cnt, n_blk, bs):
  """Operands of the padded kernels for a ``check_inputs`` case, padded as
  ``pallas_kernels.mosaic.ops`` pads them."""
  s_pad = mosaic.padded_len(q.shape[1])
  lists = mosaic.kernel_lists(idx, cnt, num_kv_blocks=n_blk, num_query_blocks=s_pad // bs)
  return (*(mosaic.pad_seq(x, s_pad, 1) for x in (q, k, v)), *lists)


def check(d, bs, dtype, seq=1000, b=2, h=2):
  """Public entry points vs the reference, and every variant vs the default."""
  key, q, k, v, lengths, n_blk, idx, cnt = check_inputs(d, bs, dtype, seq, b, h)
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
  args = padded_args(q, k, v, idx, cnt, n_blk, bs)
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
  return timing.time_fn(fn, q, k, v, reps=reps).median_s


def time_sparse(seq, key, q, k, v, td, bs, density, reps, **variant):
  n_blk = seq // bs
  count = max(1, round(density * n_blk))
  idx, cnt = lists(jax.random.fold_in(key, int(density * 100)), B, H, n_blk, count, count)
  lengths = jnp.full((B,), seq, jnp.int32)
  t = timing.time_fn(sparse_fn(bs, n_blk, lengths, **variant), q, k, v, idx, cnt,
                     jnp.zeros_like(cnt), reps=reps).median_s
  flops = 4.0 * B * H * D * count * bs * seq
  return {"S": seq, "op": "sparse", "bs": bs, "density": density, **variant, "ms": t * 1e3,
          "tflops": flops / t / 1e12, "pct_cudnn": 100 * td / (t / (count * bs / seq))}


def fmt_row(row):
  """One compact line of a result row."""
  if "error" in row:
    last = row["error"].strip().splitlines()[-1]
    row = {k: v for k, v in row.items() if k != "error"}
    return f"{fmt_row(row)}  ERROR {last[:200]}"
  show = lambda x: f"{x:.4g}" if isinstance(x, float) else str(x)
  return " ".join(f"{k}={show(v)}" for k, v in row.items())


class Run:
  """The rows of one invocation: printed as they come, the JSON rewritten after each.

  ``attempt`` runs one measurement: a raised exception becomes an error row, a
  start later than the deadline a skipped row, and with ``hang_s`` a watchdog ends
  the process (the JSON already written) if one measurement runs longer.
  """

  def __init__(self, mode, out_dir, budget_s=None, hang_s=None):
    self.t0 = time.perf_counter()
    self.budget_s, self.hang_s = budget_s, hang_s
    self.path = os.path.join(out_dir, f"mosaic_variants_{mode}.json")
    self.res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "mode": mode,
                "argv": sys.argv[1:], "budget_s": budget_s, "done": False, "rows": []}
    self.current = None
    self._stop = threading.Event()
    if hang_s is not None:
      threading.Thread(target=self._watch, daemon=True).start()

  def elapsed(self):
    return time.perf_counter() - self.t0

  def deadline(self, fraction=1.0):
    return None if self.budget_s is None else self.budget_s * fraction

  def write(self):
    self.res["elapsed_s"] = round(self.elapsed(), 1)
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.res, f, indent=1, default=str)
    os.replace(tmp, self.path)

  def emit(self, row):
    print(f"[{self.elapsed():6.1f}s] {fmt_row(row)}", flush=True)
    self.res["rows"].append(row)
    self.write()

  def attempt(self, fn, *, deadline=None, est_s=0.0, **label):
    """``fn()`` -> row dict, emitted with its wall time; returns it, or None."""
    if deadline is not None and self.elapsed() + est_s > deadline:
      self.emit({**label, "skipped": f"time budget ({deadline:.0f} s)"})
      return None
    start = time.perf_counter()
    self.current = (label, start)
    try:
      row = {**label, **fn()}
    except Exception:  # pylint: disable=broad-except
      row = {**label, "error": traceback.format_exc()[-2000:]}
    self.current = None
    row["wall_s"] = round(time.perf_counter() - start, 2)
    self.emit(row)
    return None if "error" in row else row

  def finish(self):
    self._stop.set()
    self.res["done"] = True
    self.write()
    print(f"wrote {self.path}", flush=True)

  def _watch(self):
    while not self._stop.wait(1.0):
      current = self.current
      if current is not None and time.perf_counter() - current[1] > self.hang_s:
        self.res["rows"].append({**current[0], "error": f"hung: no result after {self.hang_s} s"})
        self.write()
        print(f"hung after {self.hang_s} s at {current[0]}; exiting", flush=True)
        os._exit(3)


class Inputs:
  """q/k/v, index lists, cuDNN and real-kernel times per size, made once and
  shared by the sections (the floor compares with the real kernel on the same lists)."""

  def __init__(self, reps):
    self.reps = reps
    self._qkv, self._lists, self._cudnn, self.real = {}, {}, {}, {}
    self.cudnn_emitted = set()

  def qkv(self, seq):
    if seq not in self._qkv:
      self._qkv[seq] = qkv(seq)
    return self._qkv[seq]

  def lists(self, seq, bs, density):
    """idx int32 [B, H, nQ, nK] (ids past the count repeat the last), cnt, count."""
    if (seq, bs, density) not in self._lists:
      key, _ = self.qkv(seq)
      n_blk = seq // bs
      count = max(1, round(density * n_blk))
      idx, cnt = lists(jax.random.fold_in(key, int(density * 100)), B, H, n_blk, count, n_blk)
      self._lists[seq, bs, density] = (idx, cnt, count)
    return self._lists[seq, bs, density]

  def cudnn_ms(self, seq):
    """cuDNN dense ms; NaN after a failure (raised once, into the section's cuDNN row)."""
    if seq not in self._cudnn:
      self._cudnn[seq] = math.nan
      _, (q, k, v) = self.qkv(seq)
      self._cudnn[seq] = cudnn_ms(q, k, v, self.reps) * 1e3
    return self._cudnn[seq]


def kv_bytes(cnt, bs):
  """Bytes of K and V the lists make a kernel load (bf16, D columns)."""
  return float(np.asarray(cnt, np.int64).sum()) * bs * D * 2 * 2


def stage_label(kind, bs, stages):
  default = (mosaic_block_mass.num_stages(bs, D) if kind == "mass" else
             mosaic_block_sparse.num_stages(bs, D))
  return {"stages": default if stages is None else stages, "stages_arg": stages}


def fits(kind, bs, stages):
  """None if ``stages`` fits in shared memory at D=128 bf16, else why not."""
  mod = mosaic_block_mass if kind == "mass" else mosaic_block_sparse
  need = mod.smem_bytes(bs, D, 2, stages)
  limit = mosaic_common.SMEM_LIMIT
  return None if need <= limit else f"needs {need} bytes of shared memory > {limit}"


def check_sparse_stages(bs, stages, seq=1000, h=2, interpret=False, **variant):
  """The padded block-sparse kernel at a ring depth (and other kernel keywords,
  ``variant``) vs the reference (``check``'s case, bf16); ``interpret`` runs it under
  the GPU interpreter (CPU)."""
  _, q, k, v, lengths, n_blk, idx, cnt = check_inputs(D, bs, jnp.bfloat16, seq, h=h)
  with mosaic_interpret.device_context(interpret):
    out, lse = block_sparse_attention_padded(
        *padded_args(q, k, v, idx, cnt, n_blk, bs), lengths, block_size=bs, sm_scale=SM_SCALE,
        num_kv_blocks=n_blk, config=BlockSparseConfig(stages=stages, **variant),
        interpret=mosaic_interpret.params(interpret))
  wo, wl = pk.block_sparse_attention(q, k, v, idx, cnt, block_size=bs, kv_lengths=lengths,
                                     implementation="reference")
  # The padded kernel does not zero rows past kv_lengths (pallas_kernels.mosaic.ops does).
  valid = np.arange(seq)[None, :] < np.asarray(lengths)[:, None]  # [B, S]
  o = np.where(valid[:, :, None, None], np.asarray(out[:, :seq], np.float32), 0.0)
  l, wl = np.asarray(lse[:, :, :seq]), np.asarray(wl)
  rows = np.broadcast_to(valid[:, None, :], l.shape)  # [B, H, S]
  fin = np.isfinite(wl) & rows
  r = {"out_rel": rel(o, wo), "lse_max_abs": float(np.abs(l[fin] - wl[fin]).max()),
       "inf_ok": bool((np.isfinite(l) == np.isfinite(wl))[rows].all()),
       "nan": bool(np.isnan(o).any() or np.isnan(l).any())}
  r["ok"] = r["out_rel"] < 1e-2 and r["lse_max_abs"] < 1e-3 and r["inf_ok"] and not r["nan"]
  return r


def check_mass_stages(bs, stages, seq=1000, h=2, interpret=False, key_tile=None, **variant):
  """The padded block-mass kernel at a ring depth (K tile, other config fields:
  ``variant``; see ``mass_config``) vs the reference, from a stale LSE."""
  key, q, k, v, lengths, n_blk, _, _ = check_inputs(D, bs, jnp.bfloat16, seq, h=h)
  _, lse, _ = pk.attention_with_block_mass(q, k, v, block_size=bs, kv_lengths=lengths,
                                           implementation="reference")
  cached = lse + 0.3 * jax.random.normal(jax.random.fold_in(key, 3), lse.shape)
  want = pk.block_mass(q, k, cached, block_size=bs, kv_lengths=lengths,
                       implementation="reference")
  s_pad = mosaic.padded_len(seq)
  lse2 = mosaic.log2_lse(cached, lengths, s_pad)  # as pallas_kernels.mosaic.ops passes it
  k_pad = mosaic.padded_len(seq, max(bs, key_tile or bs))  # whole K tiles
  with mosaic_interpret.device_context(interpret):
    chunks = block_mass_padded(mosaic.pad_seq(q, s_pad, 1), mosaic.pad_seq(k, k_pad, 1), lse2,
                               lengths, block_size=bs,
                               sm_scale=SM_SCALE, num_kv_blocks=n_blk,
                               config=mass_config(stages, key_tile, **variant),
                               interpret=mosaic_interpret.params(interpret))
  b = q.shape[0]
  got = chunks.reshape(b, h, s_pad // bs, bs // 64, -1).sum(3)[:, :, :n_blk, :n_blk]
  r = {"mass_rel": rel(got, want), "nan": bool(np.isnan(np.asarray(got)).any())}
  r["ok"] = r["mass_rel"] < 1e-3 and not r["nan"]
  return r


def sparse_row(inp, seq, bs, density, stages, **variant):
  """The real block-sparse kernel on ``Inputs`` lists, with config fields ``variant``;
  memoised for the floor when there are none."""
  _, (q, k, v) = inp.qkv(seq)
  idx, cnt, count = inp.lists(seq, bs, density)
  fn = functools.partial(block_sparse_attention_padded, block_size=bs, sm_scale=SM_SCALE,
                         num_kv_blocks=seq // bs,
                         config=BlockSparseConfig(stages=stages, **variant))
  t = timing.time_fn(fn, q, k, v, idx, cnt, jnp.zeros_like(cnt), jnp.full((B,), seq, jnp.int32),
                     reps=inp.reps).median_s
  td = inp.cudnn_ms(seq) / 1e3
  flops = 4.0 * B * H * D * count * bs * seq
  row = {"ms": t * 1e3, "tflops": flops / t / 1e12,
         "pct_cudnn": 100 * td / (t / (count * bs / seq)), "kv_GBps": kv_bytes(cnt, bs) / t / 1e9}
  if not variant:
    inp.real[seq, bs, density, stages] = row["ms"]
  return row


def mass_row(inp, seq, stages, bs=64, key_tile=None, **variant):
  """The block-mass kernel timed at ``seq`` with config fields ``variant`` (see
  ``mass_config``)."""
  _, (q, k, _) = inp.qkv(seq)
  rows = 128  # per CTA
  lse2 = jnp.full((B, H, seq), math.log2(seq) + 1.0, jnp.float32)
  fn = functools.partial(block_mass_padded, block_size=bs, sm_scale=SM_SCALE,
                         num_kv_blocks=seq // bs, config=mass_config(stages, key_tile, **variant))
  t = timing.time_fn(fn, q, k, lse2, jnp.full((B,), seq, jnp.int32), reps=inp.reps).median_s
  k_bytes = B * H * (seq // rows) * seq * D * 2  # every CTA streams every K block once
  return {"ms": t * 1e3, "x_dense": t * 1e3 / inp.cudnn_ms(seq), "k_GBps": k_bytes / t / 1e9}


def floor_row(inp, seq, bs, density, stages=None):
  """The load-only kernel, its output checked, next to the real kernel and cuDNN."""
  _, (q, k, v) = inp.qkv(seq)
  idx, cnt, _ = inp.lists(seq, bs, density)
  dense = jnp.zeros_like(cnt)
  fn = functools.partial(load_only_padded, block_size=bs, num_kv_blocks=seq // bs,
                         stages=stages)
  want = expected_output(q, v, idx, cnt, dense, block_size=bs, num_kv_blocks=seq // bs)
  row = {"copy_exact": bool(jnp.array_equal(fn(q, k, v, idx, cnt, dense), want))}
  del want
  t = timing.time_fn(fn, q, k, v, idx, cnt, dense, reps=inp.reps).median_s
  moved = kv_bytes(cnt, bs)
  row.update(floor_ms=t * 1e3, kv_GB=moved / 1e9, floor_GBps=moved / t / 1e9)
  real = inp.real.get((seq, bs, density, stages))
  if real is None:
    try:
      real = sparse_row(inp, seq, bs, density, stages)["ms"]
    except Exception:  # pylint: disable=broad-except
      row["real_error"] = traceback.format_exc()[-1000:]
  if real is not None:
    row.update(real_ms=real, real_GBps=moved / real * 1e3 / 1e9,
               real_over_floor=real / row["floor_ms"])
  row["cudnn_ms"] = inp.cudnn_ms(seq)
  return row


def cudnn_rows(run, inp, seqs, section, deadline):
  for seq in seqs:
    if seq not in inp.cudnn_emitted:
      inp.cudnn_emitted.add(seq)
      run.attempt(lambda: {"ms": inp.cudnn_ms(seq)}, deadline=deadline, section=section,
                  op="cudnn", S=seq)


def run_stages(run, inp, seqs, deadline):
  """Ring depths: check each at a small size, then time it (see the module docstring)."""
  cudnn_rows(run, inp, seqs, "stages", deadline)
  families = [("sparse", 64, SPARSE_STAGES), ("sparse", 128, SPARSE_STAGES),
              ("mass", 64, MASS_STAGES)]
  for kind, bs, depths in families:
    ok = {}
    for st in depths:
      label = {"section": "stages", "op": kind, "bs": bs, **stage_label(kind, bs, st)}
      why = None if st is None else fits(kind, bs, st)
      if why:
        run.emit({**label, "skipped": why})
        continue
      checker = check_mass_stages if kind == "mass" else check_sparse_stages
      row = run.attempt(lambda st=st: checker(bs, st, seq=CHECK_SEQ), deadline=deadline,
                        check=True, **label)
      ok[st] = bool(row and row["ok"])
    for seq in seqs:
      for density in (None,) if kind == "mass" else STAGE_DENSITIES:
        for st in [d for d in depths if d in ok]:
          label = {"section": "stages", "op": kind, "S": seq, "bs": bs, "density": density,
                   **stage_label(kind, bs, st), "checked_ok": ok[st]}
          default_ms = inp.real.get((seq, bs, density, None), 0.0)
          if kind == "mass":
            fn = lambda st=st: mass_row(inp, seq, st, bs)
          else:
            fn = lambda st=st: sparse_row(inp, seq, bs, density, st)
          run.attempt(fn, deadline=deadline, est_s=(inp.reps + 1) * default_ms / 1e3, **label)


def run_keytile(run, inp, seqs, deadline):
  """Block mass at block 64 with 64-key K tiles and 128-key ones, each checked first;
  then the fused search through the public API."""
  cudnn_rows(run, inp, seqs, "keytile", deadline)
  variants = (None, 128)
  ok = {}
  for kt in variants:
    row = run.attempt(
        lambda kt=kt: check_mass_stages(64, None, seq=CHECK_SEQ, key_tile=kt),
        deadline=deadline, check=True, section="keytile", op="mass", bs=64, key_tile=kt)
    ok[kt] = bool(row and row["ok"])
  for seq in seqs:
    for kt in variants:
      run.attempt(lambda kt=kt: mass_row(inp, seq, None, 64, kt),
                  deadline=deadline, section="keytile", op="mass", S=seq, bs=64, key_tile=kt,
                  checked_ok=ok[kt])
    def fused():
      _, (q, k, v) = inp.qkv(seq)
      fn = jax.jit(lambda q, k, v: mosaic.attention_with_block_mass(q, k, v, block_size=64))
      t = timing.time_fn(fn, q, k, v, reps=inp.reps).median_s
      return {"ms": t * 1e3, "x_dense": t * 1e3 / inp.cudnn_ms(seq)}
    run.attempt(fused, deadline=deadline, section="keytile", op="fused", S=seq, bs=64)


def run_flag(run, inp, seqs, deadline, section, flag, values, check_times=(1,), fused=False):
  """Block mass at bs 64 (128-key tiles) and bs 128 for each value of the config field
  ``flag``, each checked at ``check_times`` x CHECK_SEQ, then timed; then, with ``fused``,
  the fused search through the public API with each value (``run_mass_grid``)."""
  variants = [{"bs": bs, "key_tile": kt, flag: value} for bs, kt in ((64, 128), (128, None))
              for value in values]
  fused = [{flag: value} for value in values] if fused else []
  run_mass_grid(run, inp, seqs, deadline, section, variants,
                [(times, {}) for times in check_times], fused)


def fused_with(inp, seq, fields):
  """The fused search (bs 64) through the public API, its ``mass_config`` the shipped one
  (``block_mass_kernel.DEFAULT_CONFIG``) with ``fields`` replaced."""
  config = dataclasses.replace(mosaic_block_mass.DEFAULT_CONFIG, **fields)
  _, (q, k, v) = inp.qkv(seq)
  fn = jax.jit(lambda q, k, v: mosaic.attention_with_block_mass(q, k, v, block_size=64,
                                                                mass_config=config))
  t = timing.time_fn(fn, q, k, v, reps=inp.reps).median_s
  return {"ms": t * 1e3, "x_dense": t * 1e3 / inp.cudnn_ms(seq)}


def stand_ins(exp=False, qk=False):
  """``BlockMassConfig.timing_stand_ins`` for the kernel without its exp2 (a multiply
  instead) and/or its QK^T wgmma (a constant tile instead): wrong masses, for timing
  what is left."""
  return (("exp2",) if exp else ()) + (("qk",) if qk else ())


WIDE_TILES = ((64, 128), (64, 256), (128, None), (128, 256))  # (block size, key tile)
# Where the masses are checked: (length in CHECK_SEQs, kernel keywords). The 256-key tile
# loaded by one TMA copy was wrong at S=9000 in most runs, every time with the ping-pong
# barrier (since removed) or query tiles fastest in the grid (docs/log/mosaic.md), so
# query tiles fastest comes again.
WIDE_CHECKS = ((1, {}), (9, {}), (9, {"heads_major": False}), (18, {}))


def run_mass_grid(run, inp, seqs, deadline, section, variants, checks, fused, repeats=1):
  """Block mass with each of ``variants`` (config fields, ``bs`` and ``key_tile`` among
  them), checked ``repeats`` times at each of ``checks`` ((length in CHECK_SEQs, more
  fields)), then timed; then the fused search through the public API with each of
  ``fused`` ({field: value} of its ``mass_config``, see ``fused_with``)."""
  cudnn_rows(run, inp, seqs, section, deadline)
  split = lambda v: (v["bs"], v["key_tile"],
                     {k: x for k, x in v.items() if k not in ("bs", "key_tile")})
  ok = []
  for variant in variants:
    bs, kt, kw = split(variant)
    good = True
    for rep in range(repeats):
      for times, extra in checks:
        seq = times * CHECK_SEQ
        row = run.attempt(lambda bs=bs, kt=kt, kw=kw, seq=seq, extra=extra: check_mass_stages(
            bs, None, seq=seq, key_tile=kt, **kw, **extra),
            deadline=deadline, check=True, section=section, op="mass", S=seq, bs=bs,
            key_tile=kt, repeat=rep, **kw, **extra)
        good = good and bool(row and row["ok"])
    ok.append(good)
  for seq in seqs:
    for variant, good in zip(variants, ok):
      bs, kt, kw = split(variant)
      run.attempt(lambda bs=bs, kt=kt, kw=kw: mass_row(inp, seq, None, bs, kt, **kw),
                  deadline=deadline, section=section, op="mass", S=seq, bs=bs, key_tile=kt,
                  checked_ok=good, **kw)
    for setting in fused:
      run.attempt(lambda setting=setting: fused_with(inp, seq, setting), deadline=deadline,
                  section=section, op="fused", S=seq, bs=64, **setting)


def run_widetile(run, inp, seqs, deadline):
  """``WIDE_TILES`` with hand-placed barriers, each checked twice at each of
  ``WIDE_CHECKS``; then the fused search with 128- and 256-key tiles."""
  run_mass_grid(run, inp, seqs, deadline, "widetile",
                [{"bs": bs, "key_tile": kt, "explicit_barriers": True} for bs, kt in WIDE_TILES],
                WIDE_CHECKS,
                [{"key_tile": 128}, {"key_tile": 256}], repeats=2)


def run_anatomy(run, inp, seqs, deadline):
  """Block mass at bs 64 without its parts, then ring depths and launch order."""
  cudnn_rows(run, inp, seqs, "anatomy", deadline)
  for seq in seqs:
    for exp, qk in ((False, False), (True, False), (False, True), (True, True)):
      def parts(exp=exp, qk=qk):
        return mass_row(inp, seq, None, 64, 128, timing_stand_ins=stand_ins(exp, qk))
      run.attempt(parts, deadline=deadline, section="anatomy", op="mass", S=seq, bs=64,
                  key_tile=128, without_exp=exp, without_qk=qk)
    for stages, hm in ((2, True), (3, True), (4, True), (3, False)):
      run.attempt(lambda stages=stages, hm=hm: mass_row(inp, seq, stages, 64, 128,
                                                        heads_major=hm),
                  deadline=deadline, section="anatomy", op="mass", S=seq, bs=64, key_tile=128,
                  stages=stages, heads_major=hm)


def run_floor(run, inp, seqs, deadline):
  """Load-only floor vs the real kernel and cuDNN, then the floor of a 3-stage ring."""
  cudnn_rows(run, inp, seqs, "floor", deadline)
  for extra in (False, True):
    for seq in seqs:
      for bs in (64,) if extra else (64, 128):
        for density in FLOOR_DENSITIES:
          st = 3 if extra else None
          real_ms = inp.real.get((seq, bs, density, st), 0.0)
          run.attempt(lambda: floor_row(inp, seq, bs, density, st), deadline=deadline,
                      est_s=(inp.reps + 1) * 2 * real_ms / 1e3, section="floor", op="floor",
                      S=seq, bs=bs, density=density, **stage_label("sparse", bs, st))
  rows = [r for r in run.res["rows"] if r.get("op") == "floor" and "floor_ms" in r]
  print("\n    S   bs  st  dens   real ms  floor ms  real/floor  floor GB/s  real GB/s  cuDNN ms",
        flush=True)
  for r in rows:
    print(f"{r['S']:6d} {r['bs']:4d} {r['stages']:3d} {r['density']:5.2f} "
          f"{r.get('real_ms', float('nan')):9.2f} {r['floor_ms']:9.2f} "
          f"{r.get('real_over_floor', float('nan')):11.2f} {r['floor_GBps']:11.0f} "
          f"{r.get('real_GBps', float('nan')):10.0f} {r['cudnn_ms']:9.2f}", flush=True)


def run_anatomy256(run, inp, seqs, deadline):
  """Block mass as shipped (256-key tiles, hand-placed barriers) at bs 64 and 128, whole
  and without its parts, the whole kernel timed first and last (drift)."""
  cudnn_rows(run, inp, seqs, "anatomy256", deadline)
  parts = ((False, False), (True, False), (False, True), (True, True), (False, False))
  for seq in seqs:
    for bs in (64, 128):
      for exp, qk in parts:
        def timed(exp=exp, qk=qk, bs=bs):
          return mass_row(inp, seq, None, bs, 256, explicit_barriers=True,
                          timing_stand_ins=stand_ins(exp, qk))
        run.attempt(timed, deadline=deadline, section="anatomy256", op="mass", S=seq, bs=bs,
                    key_tile=256, without_exp=exp, without_qk=qk)


def run_split(run, inp, seqs, deadline):
  """Block mass (hand-placed barriers, 256-key tiles) at bs 64 and 128 with and without
  ``split_wgmma``, each checked at each of ``WIDE_CHECKS``; then the fused search with
  each."""
  variants = [{"bs": bs, "key_tile": kt, "explicit_barriers": True, "split_wgmma": split}
              for bs, kt in ((64, 256), (128, 256)) for split in (False, True)]
  run_mass_grid(run, inp, seqs, deadline, "split", variants, WIDE_CHECKS,
                [{"split_wgmma": False}, {"split_wgmma": True}])


def parse_args(argv):
  """mode, sequence lengths (ints) and --budget=SECONDS from the command line."""
  mode, seqs, budget = argv[0], [], None
  for a in argv[1:]:
    if a.startswith("--budget="):
      budget = float(a.split("=", 1)[1])
    elif a.isdigit():
      seqs.append(int(a))
    else:
      raise ValueError(f"argument {a!r}: expected a sequence length or --budget=SECONDS.")
  if mode == "all" and budget is None:
    budget = 210.0
  return mode, seqs, budget


def main():
  mode, seqs, budget = parse_args(sys.argv[1:])
  modes = ("check", "time", "tune", "stages", "floor", "all", "keytile", "anatomy", "barriers",
           "widetile", "anatomy256", "split")
  if mode not in modes:
    raise ValueError(f"mode={mode!r}: expected one of {', '.join(modes)}.")
  tuning = mode in ("stages", "floor", "all", "keytile", "anatomy", "barriers", "widetile",
                    "anatomy256", "split")
  run = Run(mode, os.environ.get("OUT", "/tmp"), budget, HANG_S if tuning else None)
  emit, attempt = run.emit, run.attempt

  if mode == "check":
    for d, bs, dt in [(128, 64, jnp.bfloat16), (64, 64, jnp.bfloat16), (128, 128, jnp.bfloat16),
                      (64, 128, jnp.float16), (128, 64, jnp.float16)]:
      attempt(lambda d=d, bs=bs, dt=dt: check(d, bs, dt), d=d, bs=bs)
  elif mode == "time":
    for seq in seqs:
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
    seq = seqs[0]
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
            config=mass_config(heads_major=hm)))
        t = timing.time_fn(fn, q, k, lse2, reps=3).median_s
        return {"S": seq, "op": "mass", "bs": 64, "heads_major": hm, "ms": t * 1e3,
                "x_dense": t / td}
      attempt(mass, op="mass", heads_major=hm)
  else:  # tuning
    inp = Inputs(reps=3)
    seqs = seqs or list(SEQS)
    if mode in ("stages", "all"):
      run_stages(run, inp, seqs, run.deadline(0.55 if mode == "all" else 1.0))
    if mode in ("floor", "all"):
      run_floor(run, inp, seqs, run.deadline())
    if mode == "keytile":
      run_keytile(run, inp, seqs, run.deadline())
    if mode == "anatomy":
      run_anatomy(run, inp, seqs, run.deadline())
    if mode == "barriers":
      # Also at 9x the length: several groups of key blocks, where a missing barrier shows.
      run_flag(run, inp, seqs, run.deadline(), "barriers", "explicit_barriers", (False, True),
               check_times=(1, 9), fused=True)
    if mode == "widetile":
      run_widetile(run, inp, seqs, run.deadline())
    if mode == "anatomy256":
      run_anatomy256(run, inp, seqs, run.deadline())
    if mode == "split":
      run_split(run, inp, seqs, run.deadline())
  run.finish()


if __name__ == "__main__":
  main()
