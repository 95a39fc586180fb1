"""PyTorch FlexAttention as a peer of the AdaSpa kernels, on the same block lists.

Our lists (``pallas_kernels.api``: ``kv_block_indices`` int32 [B, H, nQ, K_max] of key
blocks of ``block_size`` keys, ``kv_block_counts`` int32 [B, H, nQ], a row with
count >= nK dense) become a FlexAttention ``BlockMask`` of ``query_block_size`` x
``block_size`` tiles (``flex_lists``, ``block_mask``):

* every listed block is a *full* block (the kernel calls no ``mask_mod`` on it), except
  blocks that reach past a batch element's ``kv_lengths``: those are *partial* blocks,
  masked by a ``mask_mod`` that keeps query rows and keys below the length. A last key
  block shorter than ``block_size`` (S not a multiple of it) stays full: the Flex kernel
  checks the sequence bound itself on every block when S is not a multiple of its tile.
* dense rows list every key block; index rows are padded to nK entries (the width
  ``BlockMask`` assumes when it transposes the mask, torch <= 2.13).

The block lists bind only the compiled kernel: eager ``flex_attention`` applies the
mask_mod alone and, with no mask_mod, computes dense attention (seen with torch 2.13 on
CPU). Hence always ``torch.compile`` here, a raised recompile limit, and the checks.

q, k, v stay JAX arrays [batch, seq, heads, head_dim]; torch reads them through DLPack
without a copy (``to_torch``) as [batch, heads, seq, head_dim] views (a transpose;
FlexAttention takes the strides as they are, and its output keeps q's layout).
``run_flex`` calls ``torch.compile(flex_attention, dynamic=False)`` with
``kernel_options`` BLOCK_M = query_block_size and BLOCK_N = block_size (at most 128 and
64: our tiling, 64 x 64 or 128 x 64); ``time_flex`` times it with CUDA events (CPU:
the host clock), ``check_flex`` and ``spot_check`` compare it with our reference.

Torch is optional: it is imported inside the functions (``adaspa_jax.extras.require``,
the ``parity`` extra), never when this module is imported.
"""

from __future__ import annotations

import functools
import inspect
import statistics
from time import perf_counter

import jax
import jax.numpy as jnp
import numpy as np

from adaspa_jax.extras import require
from pallas_kernels import validation

# Largest Flex tiles we ask for: BLOCK_M x BLOCK_N = 128 x 64 is the tiling of our Mosaic
# kernel; larger tiles may not fit shared memory at head_dim 128.
MAX_BLOCK_M, MAX_BLOCK_N = 128, 64
MAX_CALLS_PER_REP = 100  # as harness/timing.py


def _torch():
  return require("torch", "parity")


def _flex_module():
  return require("torch.nn.attention.flex_attention", "parity")


def torch_version() -> str | None:
  """The installed torch's version, or None without torch."""
  try:
    return _torch().__version__
  except ImportError:
    return None


# ----------------------------------------------------------------------------- lists
def kernel_options(block_size: int, query_block_size: int | None = None) -> dict:
  """Flex ``kernel_options``: BLOCK_M (query rows) and BLOCK_N (keys) of one Flex tile,
  the block sizes capped at ``MAX_BLOCK_M`` / ``MAX_BLOCK_N`` (they must divide the
  BlockMask's block sizes)."""
  qbs = validation.check_query_block_size(query_block_size, block_size)
  return {"BLOCK_M": min(qbs, MAX_BLOCK_M), "BLOCK_N": min(block_size, MAX_BLOCK_N)}


def flex_lists(indices, counts, *, seq: int, block_size: int, query_block_size=None,
               kv_lengths=None):
  """Our block lists as Flex's four BlockMask tensors (JAX arrays, on their device).

  Args:
    indices: int32 [batch, heads, nQ, K_max] key-block ids, nQ = ceil(seq /
      query_block_size).
    counts: int32 [batch, heads, nQ]; >= nK = ceil(seq / block_size): a dense row.
    kv_lengths: optional int [batch] valid tokens (keys and query rows past it are
      padding); None: seq everywhere.

  Returns:
    dict with ``full_kv_num_blocks`` int32 [B, H, nQ], ``full_kv_indices`` int32
    [B, H, nQ, nK] (blocks that need no mask), ``kv_num_blocks`` and ``kv_indices``
    (partial blocks: those that reach past ``kv_lengths``; none when it is None). Each
    row keeps its blocks in list order; entries past its count are 0.
  """
  qbs = validation.check_query_block_size(query_block_size, block_size)
  if not isinstance(seq, (int, np.integer)) or isinstance(seq, bool) or seq < 1:
    raise ValueError(f"seq={seq!r}: expected a positive int (tokens per sequence).")
  if np.ndim(indices) != 4:
    raise ValueError(f"indices has shape {tuple(np.shape(indices))}: expected "
                     "[batch, heads, num_query_blocks, K_max].")
  b, h = indices.shape[:2]
  n_q, n_k = validation.num_blocks(seq, qbs), validation.num_blocks(seq, block_size)
  validation.check_block_lists(indices, counts, b, h, n_q, seq=seq, query_block_size=qbs)
  validation.check_block_list_values(indices, counts, n_k)
  kv_lengths = validation.check_kv_lengths(kv_lengths, b, seq)
  indices, counts = validation.safe_block_lists(indices, counts, n_k)
  k_max = indices.shape[-1]
  if k_max < n_k:  # BlockMask rows are nK wide
    indices = jnp.pad(indices, ((0, 0), (0, 0), (0, 0), (0, n_k - k_max)), mode="edge")
  indices = indices[..., :n_k]  # a row reading past nK entries is dense
  slot = jnp.arange(n_k, dtype=jnp.int32)
  dense = counts >= n_k
  ids = jnp.where(dense[..., None], slot, indices).astype(jnp.int32)
  n = jnp.where(dense, n_k, counts).astype(jnp.int32)
  read = slot < n[..., None]
  if kv_lengths is None:
    return {"full_kv_num_blocks": n, "full_kv_indices": jnp.where(read, ids, 0),
            "kv_num_blocks": jnp.zeros_like(n), "kv_indices": jnp.zeros_like(ids)}
  lengths = validation.valid_lengths(kv_lengths, b, seq)
  q_end = jnp.minimum((jnp.arange(n_q) + 1) * qbs, seq)      # [nQ] rows end
  k_end = jnp.minimum((ids + 1) * block_size, seq)             # [B, H, nQ, nK] keys end
  whole = ((q_end[None, None, :, None] <= lengths[:, None, None, None])
           & (k_end <= lengths[:, None, None, None]))
  full, part = read & whole, read & ~whole

  def compact(keep):
    order = jnp.argsort(jnp.where(keep, slot, n_k + slot), axis=-1)
    n_keep = keep.sum(-1).astype(jnp.int32)
    kept = jnp.take_along_axis(ids, order, axis=-1)
    return n_keep, jnp.where(slot < n_keep[..., None], kept, 0).astype(jnp.int32)

  (n_full, full_ids), (n_part, part_ids) = compact(full), compact(part)
  return {"full_kv_num_blocks": n_full, "full_kv_indices": full_ids,
          "kv_num_blocks": n_part, "kv_indices": part_ids}


def to_torch(x):
  """A JAX array as a torch tensor on the same device, sharing its memory (DLPack)."""
  torch = _torch()
  x = jax.block_until_ready(x)
  return torch.from_dlpack(x)


def heads_major(x):
  """JAX [batch, seq, heads, head_dim] -> torch [batch, heads, seq, head_dim], a view of
  the same memory (no copy)."""
  return to_torch(x).transpose(1, 2)


def _lengths_mask_mod(lengths):
  """Flex mask_mod keeping query rows and keys below ``lengths[b]`` (torch int32 [B])."""

  def mask_mod(b, h, q_idx, kv_idx):
    del h
    return (q_idx < lengths[b]) & (kv_idx < lengths[b])

  return mask_mod


def block_mask(indices, counts, *, seq: int, block_size: int, query_block_size=None,
               kv_lengths=None):
  """A torch ``BlockMask`` of our lists (``flex_lists``), on the lists' device.

  Tiles are ``query_block_size`` x ``block_size`` (None: square). With ``kv_lengths``
  the partial blocks carry a mask_mod of the lengths; without, there are none.
  """
  flex = _flex_module()
  qbs = validation.check_query_block_size(query_block_size, block_size)
  parts = flex_lists(indices, counts, seq=seq, block_size=block_size, query_block_size=qbs,
                     kv_lengths=kv_lengths)
  t = {name: to_torch(x) for name, x in parts.items()}
  kw = dict(BLOCK_SIZE=(qbs, block_size), seq_lengths=(seq, seq))
  if "compute_q_blocks" in inspect.signature(flex.BlockMask.from_kv_blocks).parameters:
    kw["compute_q_blocks"] = False  # forward only: the transposed (q) lists are not read
  if kv_lengths is not None:
    lengths = validation.valid_lengths(validation.check_kv_lengths(
        kv_lengths, indices.shape[0], seq), indices.shape[0], seq)
    kw["mask_mod"] = _lengths_mask_mod(to_torch(lengths))
  return flex.BlockMask.from_kv_blocks(t["kv_num_blocks"], t["kv_indices"],
                                       t["full_kv_num_blocks"], t["full_kv_indices"], **kw)


# ----------------------------------------------------------------------------- running
# Compiles dynamo may keep of flex_attention (one per shape and grain): past its default
# limit (8) it would run flex_attention eagerly: dense attention, ignoring our lists.
RECOMPILE_LIMIT = 64


@functools.cache
def compiled_flex_attention():
  """``torch.compile(flex_attention, dynamic=False)`` (one per process: every shape is
  compiled for its static sizes; dynamo's recompile limit raised to ``RECOMPILE_LIMIT``)."""
  torch, flex = _torch(), _flex_module()
  config = torch._dynamo.config  # pylint: disable=protected-access
  for name in ("recompile_limit", "cache_size_limit"):  # the name changed across versions
    if hasattr(config, name):
      setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
  return torch.compile(flex.flex_attention, dynamic=False)


def make_call(q, k, v, mask, *, sm_scale=None, return_lse=False, options=None):
  """A zero-argument callable running compiled FlexAttention on JAX q, k, v
  [batch, seq, heads, head_dim] (torch views made once, here) and a BlockMask.

  The callable returns the torch output [batch, heads, seq, head_dim] (q's dtype; with
  ``return_lse`` also the LSE float32 [batch, heads, seq], natural log).
  """
  b, s, h, d = validation.check_qkv(q, k, v)
  if tuple(mask.seq_lengths) != (s, s):
    raise ValueError(f"mask.seq_lengths={tuple(mask.seq_lengths)}: expected (seq, seq) = "
                     f"{(s, s)} of q, k, v.")
  scale = validation.default_scale(sm_scale, d)
  qt, kt, vt = heads_major(q), heads_major(k), heads_major(v)
  fn = compiled_flex_attention()
  return lambda: fn(qt, kt, vt, block_mask=mask, scale=scale, return_lse=return_lse,
                    kernel_options=options)


def run_flex(q, k, v, mask, *, sm_scale=None, return_lse=False, options=None):
  """One call of ``make_call``'s callable: the torch output [batch, heads, seq, head_dim]
  (and the LSE [batch, heads, seq] with ``return_lse``)."""
  return make_call(q, k, v, mask, sm_scale=sm_scale, return_lse=return_lse,
                   options=options)()


def _synchronize(device):
  torch = _torch()
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def time_call(fn, *, device, reps: int, min_rep_s: float = 0.0) -> dict:
  """Times ``fn()`` (torch work) as ``harness/timing.py`` does, with CUDA events on a GPU
  (host clock on CPU): a warm-up call (compile, ``first_s``), then ``reps`` reps of
  ``calls_per_rep`` back-to-back calls (enough for a rep to last ``min_rep_s``); a rep's
  time is its elapsed time / calls. Returns a dict of seconds (``median_s``, ``reps_s``,
  ``first_s``, ``calls_per_rep``, ``clock``) and ``launch_s``: the median host time to
  launch one call (on a GPU: close to ``median_s`` means the host, not the kernel, set
  the pace)."""
  if not isinstance(reps, (int, np.integer)) or isinstance(reps, bool) or reps < 1:
    raise ValueError(f"reps={reps!r}: expected an int >= 1.")
  torch = _torch()
  cuda = device.type == "cuda"

  launches = []

  def elapsed(calls):
    if cuda:
      start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
      start.record()
      host = perf_counter()
      for _ in range(calls):
        fn()
      launches.append((perf_counter() - host) / calls)
      end.record()
      end.synchronize()
      return start.elapsed_time(end) / 1e3
    start = perf_counter()
    for _ in range(calls):
      fn()
    launches.append((perf_counter() - start) / calls)
    return perf_counter() - start

  start = perf_counter()
  fn()
  _synchronize(device)
  first = perf_counter() - start
  calls = 1
  if min_rep_s > 0:
    calls = max(1, min(MAX_CALLS_PER_REP, int(min_rep_s / max(elapsed(1), 1e-6))))
  del launches[:]
  times = [elapsed(calls) / calls for _ in range(int(reps))]
  return {"median_s": statistics.median(times), "reps_s": times, "first_s": first,
          "calls_per_rep": calls, "launch_s": statistics.median(launches),
          "clock": "cuda events" if cuda else "host perf_counter"}


def free_torch_memory():
  """Returns torch's cached GPU memory to the driver (JAX keeps its own pool)."""
  torch = _torch()
  if torch.cuda.is_available():
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- checks
def to_numpy_bshd(out) -> np.ndarray:
  """Torch [batch, heads, seq, head_dim] -> float32 numpy [batch, seq, heads, head_dim]."""
  return np.swapaxes(out.detach().float().cpu().numpy(), 1, 2)


def compare(x, ref, mask=None) -> dict:
  """Max abs error, relative L2 error and cosine of ``x`` against ``ref`` (over
  ``mask`` when given)."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  if mask is not None:
    x, ref = x[mask], ref[mask]
  x, ref = x.ravel(), ref.ravel()
  nx, nr = np.linalg.norm(x), np.linalg.norm(ref)
  return {"max_abs_err": float(np.max(np.abs(x - ref))) if x.size else 0.0,
          "rel_err": float(np.linalg.norm(x - ref) / max(nr, 1e-30)),
          "cosine": float(x @ ref / max(nx * nr, 1e-30))}


def check_flex(*, seq, heads, head_dim, dtype, block_size, key, query_block_size=None,
               batch=2) -> dict:
  """FlexAttention against ``implementation="reference"`` at a small size, on random
  lists with rows of one block, dense rows and ``kv_lengths`` (the second batch element
  padded to 70%), like ``kernel_bench.check``; returns a JSON-ready dict with the output's
  ``out_max_abs_err``, ``out_rel_err``, ``out_cosine`` and, off CPU, the LSE's max error
  (``lse_max_abs_err``, ``lse_inf_match``: -inf on the same rows)."""
  import pallas_kernels as pk  # pylint: disable=g-import-not-at-top
  from adaspa_jax.harness import kernel_bench  # pylint: disable=g-import-not-at-top
  qbs = validation.check_query_block_size(query_block_size, block_size)
  res = {"implementation": "flex", "seq": seq, "batch": batch, "heads": heads,
         "head_dim": head_dim, "dtype": jnp.dtype(dtype).name, "block_size": block_size,
         "query_block_size": qbs, "torch_version": torch_version()}
  try:
    q, k, v = kernel_bench.random_qkv(key, batch, seq, heads, head_dim, dtype)
    lengths = jnp.array([seq] + [max(1, (seq * 7) // 10)] * (batch - 1), jnp.int32)
    n_blk = validation.num_blocks(seq, block_size)
    idx, cnt = kernel_bench.random_lists(jax.random.fold_in(key, 1), batch, heads, n_blk,
                                         max(1, n_blk // 3),
                                         n_query_blocks=validation.num_blocks(seq, qbs))
    sel = jax.random.randint(jax.random.fold_in(key, 2), cnt.shape, 0, 3)
    cnt = jnp.where(sel == 0, 1, jnp.where(sel == 1, n_blk, cnt)).astype(jnp.int32)
    mask = block_mask(idx, cnt, seq=seq, block_size=block_size, query_block_size=qbs,
                      kv_lengths=lengths)
    # Inductor's CPU FlexAttention has no LSE output (torch 2.13): the LSE is checked on GPU.
    with_lse = q.devices().pop().platform != "cpu"
    got = run_flex(q, k, v, mask, return_lse=with_lse, options=kernel_options(block_size, qbs))
    want, want_lse = pk.block_sparse_attention(q, k, v, idx, cnt, block_size=block_size,
                                               kv_lengths=lengths, query_block_size=qbs,
                                               implementation="reference")
    out = to_numpy_bshd(got[0] if with_lse else got)
    err = compare(out, want)
    res.update({f"out_{name}": val for name, val in err.items()})
    if with_lse:
      lse, want_lse = got[1].detach().float().cpu().numpy(), np.asarray(want_lse)
      finite = np.isfinite(want_lse)
      res["lse_max_abs_err"] = float(np.max(np.abs(lse[finite] - want_lse[finite])))
      res["lse_inf_match"] = bool(np.array_equal(np.isfinite(lse), finite))
    res["nan"] = bool(np.isnan(out).any())
    tol = 1e-4 if jnp.dtype(dtype) == jnp.float32 else 2e-2
    res["passed"] = bool(err["rel_err"] < tol and not res["nan"]
                         and res.get("lse_max_abs_err", 0.0) < 5 * tol
                         and res.get("lse_inf_match", True))
  except Exception as e:  # pylint: disable=broad-except
    res["passed"] = False
    res["error"] = f"{type(e).__name__}: {e}"[:2000]
  return res


def spot_check(out, q, k, v, indices, counts, *, block_size, query_block_size=None,
               key, n_rows=4, sm_scale=None) -> dict:
  """Compares ``n_rows`` distinct random query blocks of a Flex output with exact attention over
  the blocks their lists name (float32, on q's device), e.g. at a timing size where the
  full reference is too slow.

  Args:
    out: torch [batch, heads, seq, head_dim], FlexAttention's output on the lists.
    q, k, v: JAX [batch, seq, heads, head_dim].
    indices, counts: the lists (int32 [B, H, nQ, K_max], [B, H, nQ]).

  Returns:
    dict: ``rows`` ((b, h, query block) checked), ``max_abs_err``, ``rel_err``, ``cosine``.
  """
  b, s, h, d = validation.check_qkv(q, k, v)
  qbs = validation.check_query_block_size(query_block_size, block_size)
  n_q, n_k = validation.num_blocks(s, qbs), validation.num_blocks(s, block_size)
  scale = validation.default_scale(sm_scale, d)
  rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))
  got, want, rows = [], [], []
  picks = rng.choice(b * h * n_q, size=min(n_rows, b * h * n_q), replace=False)
  for bi, hi, p in zip(*np.unravel_index(np.sort(picks), (b, h, n_q))):
    bi, hi, p = int(bi), int(hi), int(p)
    lo, hi_row = p * qbs, min((p + 1) * qbs, s)
    c = int(counts[bi, hi, p])  # one row of the lists to the host, not all of them
    blocks = np.arange(n_k) if c >= n_k else np.asarray(indices[bi, hi, p])[:c]
    allowed = np.zeros(s, bool)
    for blk in blocks:
      allowed[blk * block_size:(blk + 1) * block_size] = True
    qr = q[bi, lo:hi_row, hi, :].astype(jnp.float32)
    kr, vr = k[bi, :, hi, :].astype(jnp.float32), v[bi, :, hi, :].astype(jnp.float32)
    scores = scale * jnp.dot(qr, kr.T, precision=jax.lax.Precision.HIGHEST)
    scores = jnp.where(jnp.asarray(allowed)[None, :], scores, -jnp.inf)
    ref = jnp.dot(jax.nn.softmax(scores, axis=-1), vr, precision=jax.lax.Precision.HIGHEST)
    want.append(np.asarray(ref))
    got.append(out[bi, hi, lo:hi_row, :].detach().float().cpu().numpy())
    rows.append((bi, hi, p))
  res = compare(np.concatenate(got), np.concatenate(want))
  res["rows"] = rows
  return res
