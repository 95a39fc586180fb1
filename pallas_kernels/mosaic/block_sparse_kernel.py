"""Block-sparse flash attention for Hopper in Pallas Mosaic GPU (FA3 style).

One CTA holds three warpgroups: two compute warpgroups of 64 query rows each and
one memory warpgroup that walks the key-block lists and issues TMA copies of
the named K/V blocks into a ring of shared-memory stages guarded by mbarriers.
Compute warpgroups run QK^T and PV on wgmma with an online softmax in registers.

The query block (``query_block_size``, rows that share one list) and the key block
(``block_size``, keys per list entry and per K/V stage) make three tilings
(``SUPPORTED_TILINGS``):

- 64 x 64: each compute warpgroup has its own list and its own K/V ring (two
  pipelines per CTA), so a CTA streams K/V twice where the lists overlap.
- 128 x 128: both compute warpgroups share one list and one ring of 128-key stages
  (as in FA3).
- 128 x 64: both share one list and one ring whose stages hold 64-key blocks; the
  memory warpgroup streams each listed block once for both warpgroups. A stage is half
  the 128 x 128 one, so the ring holds twice as many stages in the same bytes.

Inputs are pre-padded by the caller (``pallas_kernels.mosaic.ops``): the sequence to
a multiple of 128 and the block lists to ``S_pad / query_block_size`` query blocks.
Constraints: bf16/f16, head_dim in ``SUPPORTED_HEAD_DIMS``, (query_block_size,
block_size) in ``SUPPORTED_TILINGS``.

Tuning: ``BlockSparseConfig`` (ping-pong, launch order, ring depth), a static argument;
``DEFAULT_CONFIG`` is what ``pallas_kernels.mosaic.ops`` passes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mosaic.common import (
    COMPUTE_WGS, CTA_ROWS, LN2, LOG2E, ROWS_PER_WG, check_flag, check_ring_depth, check_stages,
    column_ids, pv_matmul, qk_matmul, smem_footprint, smem_transforms, with_layout)

SUPPORTED_BLOCK_SIZES = (64, 128)
# (query_block_size, block_size): rows per list, keys per list entry.
SUPPORTED_TILINGS = ((64, 64), (128, 128), (128, 64))
SUPPORTED_HEAD_DIMS = (64, 128)
_SMEM_FOR_KV = 160 * 1024  # bytes of K/V stages; leaves room for Q/O, LSE and barriers.
# Mosaic reserves 2 KiB for cross-warp reductions by default. This kernel only
# reduces WGMMA rows, which stay inside a warp, so it asks for none: that 2 KiB is
# what a third K/V stage at block 64, D 128 lacks.
_REDUCTION_SCRATCH = 0


@dataclasses.dataclass(frozen=True)
class BlockSparseConfig:
  """Tuning of ``block_sparse_attention_padded`` (a static argument; checked when made).

  Fields:
    schedule_barrier: alternate the two compute warpgroups' softmax and wgmma
      (FA3 ping-pong).
    heads_major: launch order, heads fastest (True) or query tiles fastest.
      Heads fastest ran 1.2-1.7x faster on an H200 (docs/log/mosaic.md).
    stages: K/V ring depth per pipeline, an int >= 2 whose rings fit in
      ``common.SMEM_LIMIT`` (see ``smem_bytes``; checked when the kernel traces); None for
      ``num_stages``.
  """
  schedule_barrier: bool = True
  heads_major: bool = True
  stages: int | None = None

  def __post_init__(self):
    check_flag(self, "schedule_barrier")
    check_flag(self, "heads_major")
    check_ring_depth(self.stages, "BlockSparseConfig.stages")


DEFAULT_CONFIG = BlockSparseConfig()


def pipelines(query_block_size: int) -> int:
  """K/V pipelines (lists, rings) per CTA: one per compute warpgroup for 64-row query
  blocks, one shared by both for 128-row blocks."""
  return 2 if query_block_size == ROWS_PER_WG else 1


def check_tiling(block_size, query_block_size=None) -> int:
  """The query block size (``block_size`` for None); ``ValueError`` unless the pair
  is in ``SUPPORTED_TILINGS``."""
  qbs = block_size if query_block_size is None else query_block_size
  if (qbs, block_size) not in SUPPORTED_TILINGS:
    raise ValueError(f"query_block_size={query_block_size!r}, block_size={block_size!r}: "
                     f"expected (query_block_size, block_size) in {SUPPORTED_TILINGS}.")
  return qbs


def num_stages(block_size: int, head_dim: int, itemsize: int = 2,
               query_block_size: int | None = None) -> int:
  """K/V ring depth per pipeline that fits the shared-memory budget (stages of
  ``block_size`` keys; ``query_block_size`` None for ``block_size``)."""
  pipes = pipelines(block_size if query_block_size is None else query_block_size)
  per_stage = 2 * pipes * block_size * head_dim * itemsize
  return int(max(2, min(4, _SMEM_FOR_KV // per_stage)))


def smem_bytes(block_size: int, head_dim: int, itemsize: int, stages: int,
               query_block_size: int | None = None) -> int:
  """Shared memory of ``block_sparse_attention_padded`` with ``stages`` K/V stages of
  ``block_size`` keys per pipeline (``query_block_size`` None for ``block_size``)."""
  pipes = pipelines(block_size if query_block_size is None else query_block_size)
  tile = block_size * head_dim * itemsize
  buffers = (COMPUTE_WGS * ROWS_PER_WG * head_dim * itemsize,  # Q, then O
             pipes * stages * tile, pipes * stages * tile,  # K ring, V ring
             COMPUTE_WGS * ROWS_PER_WG * 4)  # LSE
  # ready/free for K and V per slot, one Q barrier per warpgroup, the ping-pong one.
  barriers = 4 * pipes * stages + COMPUTE_WGS + 1
  return smem_footprint(buffers, barriers, _REDUCTION_SCRATCH)


def read_entry(idx_ref, dense_ref, bi, hi, qb, step):
  """What query block ``qb`` reads at ``step``, as loaded: its list's entry (the last
  one past the list's end; any step may be asked) and the row's dense flag.

  Both kernels load these a step ahead of ``listed_block``: loaded right before their
  use, the two scalar loads held back each step's TMA copy (memory warpgroup) and QK^T
  (compute warpgroups) by an L2 round trip in Nsight Compute's stall samples. Read a step
  ahead the outputs are bit-identical and, on an H200 at S=118,784, the time 1-4% lower
  at densities 0.05-0.2 and 1% higher at 1.0 (``tools/sparse_ab.py``,
  docs/log/mosaic.md)."""
  return idx_ref[bi, hi, qb, jnp.minimum(step, idx_ref.shape[-1] - 1)], dense_ref[bi, hi, qb]


def listed_block(entry, step, *, num_kv_blocks):
  """Key block read at ``step`` from ``read_entry``'s ``entry``: the list's entry,
  clipped, or ``step`` itself for a dense row."""
  listed, dense = entry
  return jnp.where(dense != 0, step, jnp.clip(listed, 0, num_kv_blocks - 1))


def stream_kv_blocks(k_ref, v_ref, k_smem, v_smem, barriers, *, counts, read, key_block,
                     batch, head, block_size, stages, v_index=None):
  """The memory warpgroup's loop: TMA copies of the listed K/V blocks into the rings.

  Pipeline p (one per compute warpgroup for 64-row query blocks, one shared for
  128) reads ``counts[p]`` blocks, ``key_block(read(p, step), step)`` in turn (``read``
  is called a step ahead, see ``read_entry``), into slots
  ``p * stages + step % stages``, waiting for a slot's release before refilling
  it. ``barriers`` = (k_ready, v_ready, k_free, v_free). ``v_index(batch, keys, head)``
  (None: the K index, ``(batch, keys, head)`` of a [B, S, H, D] V) names the V tile
  read for the key slice ``keys``; the FP8 kernel's V^T [B, H, D, S] passes its own.
  Shared with the
  load-only twin in ``tools/mosaic_floor.py``, so the floor it measures is
  this loop's.
  """
  k_ready, v_ready, k_free, v_free = barriers
  bs = block_size
  total = functools.reduce(jnp.maximum, counts)

  def body(step, entries):
    ahead = tuple(read(p, step + 1) for p in range(len(counts)))
    for p, count in enumerate(counts):
      @pl.when(step < count)
      def _():
        slot = p * stages + lax.rem(step, stages)
        keys = pl.ds(key_block(entries[p], step) * bs, bs)
        src = (batch, keys, head)
        v_src = src if v_index is None else v_index(batch, keys, head)

        @pl.when(step >= stages)
        def _():
          plgpu.barrier_wait(k_free.at[slot])

        plgpu.copy_gmem_to_smem(k_ref.at[src], k_smem.at[slot], k_ready.at[slot])

        @pl.when(step >= stages)
        def _():
          plgpu.barrier_wait(v_free.at[slot])

        plgpu.copy_gmem_to_smem(v_ref.at[v_src], v_smem.at[slot], v_ready.at[slot])

    return ahead

  lax.fori_loop(0, total, body, tuple(read(p, 0) for p in range(len(counts))))

  # Observe the last consumptions too, so that every barrier phase is waited
  # on before the CTA exits (the interpreter checks this).
  for p, count in enumerate(counts):
    @pl.loop(jnp.maximum(count - stages, 0), count)
    def _(step):
      slot = p * stages + lax.rem(step, stages)
      plgpu.barrier_wait(k_free.at[slot])
      plgpu.barrier_wait(v_free.at[slot])


def check_lists(kv_block_indices, kv_steps, dense_rows, *, batch, heads, s_pad, query_block_size):
  """ValueError unless the lists have one row per query block: [B, H, nQ_pad, K_max],
  [B, H, nQ_pad], [B, H, nQ_pad] with nQ_pad = S_pad / query_block_size."""
  rows = (batch, heads, s_pad // query_block_size)
  if (kv_block_indices.ndim != 4 or kv_block_indices.shape[:3] != rows
      or kv_steps.shape != rows or dense_rows.shape != rows):
    raise ValueError(
        f"lists of shapes {kv_block_indices.shape}, {kv_steps.shape}, {dense_rows.shape}: "
        f"expected {rows} + (K_max,), {rows}, {rows} (S_pad={s_pad} / "
        f"query_block_size={query_block_size} query blocks).")


class CtaLists:
  """Inside a block-sparse kernel: the CTA's place in the grid (``tile``, ``head``,
  ``batch``, ``wg``) and the lists of its query blocks of ``query_block_size`` rows.
  Pipeline (or compute warpgroup) ``p`` reads the list of ``query_block(p)``."""

  def __init__(self, idx_ref, steps_ref, dense_ref, query_block_size):
    self.tile = lax.axis_index("q_tile")
    self.head = lax.axis_index("heads")
    self.batch = lax.axis_index("batch")
    self.wg = lax.axis_index("wg")
    self.idx_ref, self.steps_ref, self.dense_ref = idx_ref, steps_ref, dense_ref
    self.query_block_size = query_block_size

  def query_block(self, w):
    """The query block of the CTA's 64-row chunk ``w``."""
    return (self.tile * CTA_ROWS + w * ROWS_PER_WG) // self.query_block_size

  def steps(self, p):
    """Key blocks pipeline ``p`` reads."""
    return self.steps_ref[self.batch, self.head, self.query_block(p)]

  def read(self, p, step):
    """``read_entry`` of pipeline ``p`` at ``step``."""
    return read_entry(self.idx_ref, self.dense_ref, self.batch, self.head,
                      self.query_block(p), step)


def ping_pong_barrier(sched, enabled: bool):
  """FA3's ping-pong: a function that arrives at and waits on ``sched`` (nothing when
  not ``enabled``)."""
  def ping_pong():
    if enabled:
      plgpu.barrier_arrive(sched)
      plgpu.barrier_wait(sched)
  return ping_pong


def memory_warpgroup(k_ref, v_ref, k_smem, v_smem, barriers, cta: CtaLists, *, pipes,
                     num_kv_blocks, block_size, stages, v_index=None):
  """The memory warpgroup of a block-sparse kernel: gives up registers, then
  ``stream_kv_blocks`` over the ``pipes`` lists of ``cta``."""
  plgpu.set_max_registers(40, action="decrease")
  stream_kv_blocks(
      k_ref, v_ref, k_smem, v_smem, barriers,
      counts=[cta.steps(p) for p in range(pipes)], read=cta.read,
      key_block=functools.partial(listed_block, num_kv_blocks=num_kv_blocks),
      batch=cta.batch, head=cta.head, block_size=block_size, stages=stages, v_index=v_index)


def softmax_start(head_dim, emulate):
  """(m, l, acc) of an empty online softmax for one warpgroup: m = -inf and l = 0 [64] in
  the row layout, acc = 0 [64, head_dim] in the WGMMA layout."""
  row_layout = plgpu.Layout.WGMMA.reduce(1)
  m_i = with_layout(jnp.full((ROWS_PER_WG,), -jnp.inf, jnp.float32), row_layout, emulate)
  l_i = with_layout(jnp.full((ROWS_PER_WG,), 0.0, jnp.float32), row_layout, emulate)
  acc = with_layout(jnp.full((ROWS_PER_WG, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA,
                    emulate)
  return m_i, l_i, acc


def mask_keys_past(qk, n_valid, block_size, emulate):
  """The [64, block_size] scores with the keys at or past ``n_valid`` set to -inf. Only
  the block that straddles kv_lengths pays for the mask."""
  def mask_tail(x):
    cols = column_ids((ROWS_PER_WG, block_size), emulate)
    return jnp.where(cols < n_valid, x, -jnp.inf)

  return lax.cond(n_valid < block_size, mask_tail, lambda x: x, qk)


def wait_for_v(v_ready, sched, schedule_barrier: bool):
  """After the softmax: signal the ping-pong barrier, wait for the V stage, then for the
  tensor cores' turn (FA3's schedule)."""
  if schedule_barrier:
    plgpu.barrier_arrive(sched)
  plgpu.barrier_wait(v_ready)
  if schedule_barrier:
    plgpu.barrier_wait(sched)


def next_k_waiter(k_ready, *, ring, stages, step, steps):
  """A function that waits for the K stage of ``step + 1`` (if there is one), run while
  the P.V wgmma of ``step`` is in flight."""
  def wait_next_k():
    nxt = step + 1

    @pl.when(nxt < steps)
    def _():
      plgpu.barrier_wait(k_ready.at[ring + lax.rem(nxt, stages)])
  return wait_next_k


def balance_ping_pong(ping_pong, steps, max_steps, enabled: bool):
  """Both warpgroups run the ping-pong barrier the same number of times even when their
  lists differ in length: the shorter one idles through the difference."""
  if enabled:
    @pl.loop(steps, max_steps)
    def _(_):
      ping_pong()
      ping_pong()


@functools.partial(
    jax.jit,
    static_argnames=("block_size", "sm_scale", "num_kv_blocks", "config", "interpret",
                     "query_block_size"))
def block_sparse_attention_padded(q, k, v, kv_block_indices, kv_steps, dense_rows, lengths,
                                  *, block_size, sm_scale, num_kv_blocks,
                                  config=DEFAULT_CONFIG, interpret=None,
                                  query_block_size=None):
  """Block-sparse attention on padded operands.

  Args:
    q, k, v: [B, S_pad, H, D] bf16/f16, S_pad a multiple of 128.
    kv_block_indices: int32 [B, H, nQ_pad, K_max] of key-block ids (blocks of
      ``block_size`` keys), nQ_pad = S_pad / query_block_size.
    kv_steps: int32 [B, H, nQ_pad], key blocks each query block reads (0..nK).
    dense_rows: int32 [B, H, nQ_pad], 1 where a query block reads key blocks 0..nK-1 in
      order (its list is not read).
    lengths: int32 [B], valid keys per batch element (<= S).
    block_size: keys per key block (list entry, K/V stage): 64 or 128.
    num_kv_blocks: nK, key blocks that hold any real key.
    query_block_size: query rows per list; None for ``block_size``. 128 with
      ``block_size=64`` gives the 128 x 64 tiling (one list per CTA, one ring of 64-key
      stages shared by both compute warpgroups).
    config: a ``BlockSparseConfig``.
    interpret: None to compile, or an ``InterpretGPUParams``.

  Returns:
    out [B, S_pad, H, D] in q's dtype and lse float32 [B, H, S_pad] (natural log,
    -inf for rows that read no valid key). Rows past ``lengths`` are not zeroed.
  """
  if not isinstance(config, BlockSparseConfig):
    raise ValueError(f"config={config!r}: expected a BlockSparseConfig.")
  schedule_barrier, heads_major = config.schedule_barrier, config.heads_major
  b, s_pad, h, d = q.shape
  dtype = q.dtype
  bs = block_size  # keys per list entry and per K/V stage
  qbs = check_tiling(bs, query_block_size)  # query rows per list
  pipes = pipelines(qbs)
  check_lists(kv_block_indices, kv_steps, dense_rows, batch=b, heads=h, s_pad=s_pad,
              query_block_size=qbs)  # one list per query block
  itemsize = jnp.dtype(dtype).itemsize
  tiling = "" if qbs == bs else f"query_block_size={qbs}, "
  stages = check_stages(config.stages, num_stages(bs, d, itemsize, qbs),
                        lambda n: smem_bytes(bs, d, itemsize, n, qbs),
                        f"{tiling}block_size={bs}, head_dim={d}, {jnp.dtype(dtype).name}")
  qk_scale = sm_scale * LOG2E  # scores are kept in log2 units so exp2 is one FMA away.
  n_tiles = s_pad // CTA_ROWS
  transforms = smem_transforms(dtype)
  emulate = interpret is not None

  block_of = functools.partial(listed_block, num_kv_blocks=num_kv_blocks)

  def kernel(q_ref, k_ref, v_ref, idx_ref, steps_ref, dense_ref, len_ref, out_ref, lse_ref,
             qo_smem2, k_smem, v_smem, lse_smem2, k_ready, v_ready, q_ready, k_free, v_free,
             sched):
    cta = CtaLists(idx_ref, steps_ref, dense_ref, qbs)
    tile, hi, bi, wg = cta.tile, cta.head, cta.batch, cta.wg
    length = len_ref[bi]
    pipe_steps = cta.steps
    ping_pong = ping_pong_barrier(sched, schedule_barrier)

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      qo_smem = qo_smem2.at[wg]
      lse_smem = lse_smem2.at[wg]
      row0 = tile * CTA_ROWS + wg * ROWS_PER_WG
      qb = row0 // qbs
      pipe = wg if pipes == 2 else 0
      ring = pipe * stages
      n = steps_ref[bi, hi, qb]
      n_max = jnp.maximum(pipe_steps(0), pipe_steps(1)) if pipes == 2 else n

      plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(row0, ROWS_PER_WG), hi], qo_smem,
                              q_ready.at[wg])
      plgpu.barrier_wait(q_ready.at[wg])

      m_i, l_i, acc = softmax_start(d, emulate)

      @pl.when(n > 0)
      def _():
        plgpu.barrier_wait(k_ready.at[ring])

      pl.when(wg == 1)(ping_pong)

      def step_fn(step, carry):
        acc, m_i, l_i, entry = carry
        slot = ring + lax.rem(step, stages)
        ahead = read_entry(idx_ref, dense_ref, bi, hi, qb, step + 1)  # used next step
        n_valid = length - block_of(entry, step) * bs

        qk = qk_matmul(qo_smem, k_smem.at[slot], after_issue=ping_pong, emulate=emulate)
        plgpu.barrier_arrive(k_free.at[slot])
        qk = mask_keys_past(qk, n_valid, bs, emulate)

        m_new = jnp.maximum(m_i, qk.max(axis=1) * qk_scale)
        # A row with no valid key so far keeps m = -inf; exponents use 0 instead.
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m_i - m_use)
        p = jnp.exp2(qk * qk_scale - lax.broadcast_in_dim(m_use, qk.shape, [0]))
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        l_i = l_i * alpha + p.sum(axis=1)
        p16 = p.astype(dtype)
        acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
        wait_for_v(v_ready.at[slot], sched, schedule_barrier)
        wait_next_k = next_k_waiter(k_ready, ring=ring, stages=stages, step=step, steps=n)
        acc = pv_matmul(acc, p16, v_smem.at[slot], after_issue=wait_next_k, emulate=emulate)
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m_new, l_i, ahead

      acc, m_i, l_i, _ = lax.fori_loop(
          0, n, step_fn, (acc, m_i, l_i, read_entry(idx_ref, dense_ref, bi, hi, qb, 0)))

      balance_ping_pong(ping_pong, n, n_max, schedule_barrier and pipes == 2)

      pl.when(wg == 0)(ping_pong)

      has_keys = l_i > 0.0
      inv_l = 1.0 / jnp.where(has_keys, l_i, 1.0)
      acc = acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])
      qo_smem[...] = acc.astype(dtype)
      lse_smem[...] = jnp.where(has_keys, m_i * LN2 + jnp.log(jnp.where(has_keys, l_i, 1.0)),
                                -jnp.inf)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[bi, pl.ds(row0, ROWS_PER_WG), hi])
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, hi, pl.ds(row0, ROWS_PER_WG)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
      memory_warpgroup(k_ref, v_ref, k_smem, v_smem, (k_ready, v_ready, k_free, v_free), cta,
                       pipes=pipes, num_kv_blocks=num_kv_blocks, block_size=bs, stages=stages)

  def entry(*refs):
    consumers = 1 if pipes == 2 else COMPUTE_WGS
    pl.run_scoped(
        lambda *scratch: kernel(*refs, *scratch),
        plgpu.SMEM((COMPUTE_WGS, ROWS_PER_WG, d), dtype, transforms=transforms),
        plgpu.SMEM((pipes * stages, bs, d), dtype, transforms=transforms),
        plgpu.SMEM((pipes * stages, bs, d), dtype, transforms=transforms),
        plgpu.SMEM((COMPUTE_WGS, ROWS_PER_WG), jnp.float32),
        plgpu.Barrier(num_barriers=pipes * stages),
        plgpu.Barrier(num_barriers=pipes * stages),
        plgpu.Barrier(num_barriers=COMPUTE_WGS),
        plgpu.Barrier(num_arrivals=consumers, num_barriers=pipes * stages),
        plgpu.Barrier(num_arrivals=consumers, num_barriers=pipes * stages),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS),
        collective_axes="wg",
    )

  out, lse = plgpu.kernel(
      entry,
      out_type=(jax.ShapeDtypeStruct(q.shape, dtype),
                jax.ShapeDtypeStruct((b, h, s_pad), jnp.float32)),
      grid=(h, n_tiles, b) if heads_major else (n_tiles, h, b),
      grid_names=("heads", "q_tile", "batch") if heads_major else ("q_tile", "heads", "batch"),
      num_threads=COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True,
                                           reduction_scratch_bytes=_REDUCTION_SCRATCH),
      interpret=interpret,
  )(q, k, v, kv_block_indices, kv_steps, dense_rows, lengths)
  return out, lse
