"""Block mass from a cached LSE for Hopper in Pallas Mosaic GPU (``block_mass_padded``).

``mass[b, h, p, c] = sum_{i in query block p, j in key block c} exp(s_ij - lse_i)``.

One CTA holds two compute warpgroups (64 query rows each) and a memory
warpgroup that streams K through a ring of TMA stages shared by both, ``key_tile``
keys per stage: one key block, or several (``key_tile`` 128 or 256; a 256-key stage
is loaded by two TMA copies of 128 keys on one barrier).
Per tile a warpgroup runs one QK^T on wgmma, exponentiates against its rows' LSE
and sums each row over each key block of the tile (warp shuffles only). The
per-row sums of ``group`` consecutive key blocks (a config field, 64 by default) go to
a small shared-memory table that is then reduced across rows once, so the cross-warp
reduction is paid once per ``group`` blocks, not once per block.

Each warpgroup writes the mass of its own 64 rows; the caller adds the 64-row
chunks of a query block together (block_size = 128 has two).

Inputs are pre-padded by the caller (``pallas_kernels.mosaic.ops``): bf16/f16 q and k
[B, S_pad, H, D] with D 64 or 128, q to a multiple of 128 rows and k to whole key
tiles, and the row LSE in log2 units with +inf on rows that must add nothing. The
arguments and their constraints: ``block_mass_padded``.

Tuning: ``BlockMassConfig`` (key tile, barriers, launch order, ring depth, group), a
static argument; ``DEFAULT_CONFIG`` is what ``pallas_kernels.mosaic.ops`` passes. Why
its values are what they are: docs/log/kernel_notes.md.
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
    COMPUTE_WGS, CTA_ROWS, LOG2E, ROWS_PER_WG, check_flag, check_ring_depth, check_stages,
    column_ids, load_row_vector, qk_matmul, smem_footprint, smem_transforms, with_layout)

KEY_TILE = 128  # keys per stage and per QK^T wgmma, beside block_size itself
WIDE_KEY_TILE = 256  # the widest a wgmma takes (N <= 256)
GROUP = 64  # BlockMassConfig.group's default
TIMING_STAND_INS = ("exp2", "qk")  # what BlockMassConfig.timing_stand_ins may name
_SMEM_FOR_K = 96 * 1024
# This kernel keeps Mosaic's default reduction scratch, so its footprint counts it.
_REDUCTION_SCRATCH = plgpu.CompilerParams().reduction_scratch_bytes


@dataclasses.dataclass(frozen=True)
class BlockMassConfig:
  """Tuning of ``block_mass_padded`` (a static argument; checked when made).

  Fields:
    key_tile: keys per K stage and per QK^T wgmma: None (one key block per tile),
      ``KEY_TILE`` (128) or ``WIDE_KEY_TILE`` (256: a 64 x 256 accumulator per
      warpgroup), or 64; when the kernel traces it must be at least block_size and
      its blocks per tile must divide ``group``.
    explicit_barriers: compile without Pallas' automatic warpgroup barriers around
      every shared-memory load and store (two per row-sum store, four per tile at
      128-key tiles) and place the ones the kernel needs by hand: one before each
      group's table is read back.
    heads_major: launch order, heads fastest (True) or query tiles fastest.
    stages: K ring depth, an int >= 2 that fits in the shared memory of a CTA (see
      ``smem_bytes``; checked when the kernel traces); None for ``num_stages``.
    group: key blocks per cross-row reduction (the row-sum table's height), an int
      >= 1; the output's columns are padded to a multiple of it.
    split_wgmma: issue each tile's QK^T as two wgmmas of half the keys and exponentiate
      and sum the first half while the second is still on the tensor cores (one
      warpgroup overlaps its own matmul and softmax math, as FA3 does across steps);
      needs tiles of at least two key blocks and 128 keys.
    timing_stand_ins: for timing the kernel without its parts only
      (``tools/mosaic_variants.py anatomy``), some of ``TIMING_STAND_INS``:
      ``"exp2"`` replaces the exponentials by a multiply, ``"qk"`` the QK^T wgmma by a
      constant tile. The masses are then wrong.
  """
  key_tile: int | None = WIDE_KEY_TILE
  explicit_barriers: bool = True
  heads_major: bool = True
  stages: int | None = None
  group: int = GROUP
  split_wgmma: bool = False
  timing_stand_ins: tuple = ()

  def __post_init__(self):
    if self.key_tile is not None and (not isinstance(self.key_tile, int)
                                      or self.key_tile not in (64, KEY_TILE, WIDE_KEY_TILE)):
      raise ValueError(f"BlockMassConfig.key_tile={self.key_tile!r}: expected None, 64, "
                       f"{KEY_TILE} or {WIDE_KEY_TILE}.")
    check_flag(self, "explicit_barriers")
    check_flag(self, "heads_major")
    check_flag(self, "split_wgmma")
    check_ring_depth(self.stages, "BlockMassConfig.stages")
    if not isinstance(self.group, int) or isinstance(self.group, bool) or self.group < 1:
      raise ValueError(f"BlockMassConfig.group={self.group!r}: expected an int >= 1.")
    stand_ins = self.timing_stand_ins
    if (not isinstance(stand_ins, tuple) or len(set(stand_ins)) != len(stand_ins)
        or not set(stand_ins) <= set(TIMING_STAND_INS)):
      raise ValueError(f"BlockMassConfig.timing_stand_ins={stand_ins!r}: expected a tuple of "
                       f"distinct names from {TIMING_STAND_INS}.")


DEFAULT_CONFIG = BlockMassConfig()


def padded_num_kv_blocks(num_kv_blocks: int, group: int = GROUP) -> int:
  """The output's columns for nK key blocks: nK rounded up to a multiple of ``group``."""
  return -(-num_kv_blocks // group) * group


def num_stages(key_tile: int, head_dim: int, itemsize: int = 2) -> int:
  """Depth of the K ring (tiles of ``key_tile`` keys) that fits the default budget."""
  return int(max(2, min(4, _SMEM_FOR_K // (key_tile * head_dim * itemsize))))


def smem_bytes(key_tile: int, head_dim: int, itemsize: int, stages: int,
               group: int = GROUP) -> int:
  """Shared memory of ``block_mass_padded`` with ``stages`` K stages, in bytes."""
  buffers = (COMPUTE_WGS * ROWS_PER_WG * head_dim * itemsize,  # Q
             stages * key_tile * head_dim * itemsize,  # K ring
             COMPUTE_WGS * ROWS_PER_WG * 4,  # LSE
             COMPUTE_WGS * group * ROWS_PER_WG * 4,  # row-sum tables
             COMPUTE_WGS * group * 4)  # reduced sums on their way out
  barriers = stages + 2 * COMPUTE_WGS + stages  # K ready, Q and LSE per warpgroup, K free
  return smem_footprint(buffers, barriers, _REDUCTION_SCRATCH)


@functools.partial(jax.jit, static_argnames=("block_size", "sm_scale", "num_kv_blocks",
                                              "config", "interpret"))
def block_mass_padded(q, k, lse2, lengths, *, block_size, sm_scale, num_kv_blocks,
                      config=DEFAULT_CONFIG, interpret=None):
  """Per-64-row-chunk block mass on padded operands.

  Args:
    q, k: [B, S_pad, H, D] bf16/f16, S_pad a multiple of 128 (k only needs the keys
      the tiles read).
    lse2: float32 [B, H, S_pad], the row LSE in log2 units; +inf on rows that
      must add nothing (padding, rows past ``lengths``).
    lengths: int32 [B], valid keys per batch element.
    num_kv_blocks: nK, key blocks that hold any real key.
    config: a ``BlockMassConfig``.
    interpret: None to compile, or an ``InterpretGPUParams``.

  Returns:
    float32 [B, H, S_pad / 64, padded_num_kv_blocks(nK, config.group)]; columns >= nK
    are junk.
  """
  if not isinstance(config, BlockMassConfig):
    raise ValueError(f"config={config!r}: expected a BlockMassConfig.")
  key_tile, explicit_barriers, group = config.key_tile, config.explicit_barriers, config.group
  exp2_stand_in, qk_stand_in = (name in config.timing_stand_ins for name in TIMING_STAND_INS)
  b, s_pad, h, d = q.shape
  dtype = q.dtype
  bs = block_size
  kt = bs if key_tile is None else key_tile
  if kt not in (bs, KEY_TILE, WIDE_KEY_TILE) or kt < bs or group % (kt // bs):
    raise ValueError(f"key_tile={key_tile!r}: expected None, {KEY_TILE}, {WIDE_KEY_TILE} or "
                     f"block_size={bs}, at least block_size and a divisor of group={group} "
                     "key blocks.")
  if s_pad % CTA_ROWS:
    raise ValueError(f"q has {s_pad} rows: expected a multiple of {CTA_ROWS}.")
  per_tile = kt // bs
  parts = 2 if config.split_wgmma else 1  # wgmmas per tile
  if parts == 2 and (per_tile < 2 or kt < 128):
    raise ValueError(f"split_wgmma=True with key_tile={kt}, block_size={bs}: expected tiles "
                     "of at least two key blocks and 128 keys.")
  part_keys = kt // parts
  copy_keys = min(kt, KEY_TILE)
  copies = kt // copy_keys
  n_tiles = -(-num_kv_blocks // per_tile)   # the last may end past nK: junk columns
  if k.shape[1] < n_tiles * kt:
    raise ValueError(f"k has {k.shape[1]} keys: expected at least {n_tiles * kt}, the "
                     f"{n_tiles} tiles of key_tile={kt} that cover {num_kv_blocks} key blocks.")
  itemsize = jnp.dtype(dtype).itemsize
  stages = check_stages(config.stages, num_stages(kt, d, itemsize),
                        lambda n: smem_bytes(kt, d, itemsize, n, group),
                        f"block mass at block_size={bs}, key_tile={kt}, "
                        f"head_dim={d}, {jnp.dtype(dtype).name}")
  qk_scale = sm_scale * LOG2E
  n_groups = padded_num_kv_blocks(num_kv_blocks, group) // group
  transforms = smem_transforms(dtype)
  emulate = interpret is not None

  def kernel(q_ref, k_ref, lse_ref, len_ref, mass_ref, q_smem2, k_smem, lse_smem2, rows_smem2,
             out_smem2, k_ready, q_ready, k_free):
    tile = lax.axis_index("q_tile")
    hi = lax.axis_index("heads")
    bi = lax.axis_index("batch")
    wg = lax.axis_index("wg")
    length = len_ref[bi]

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      # This warpgroup's 64-row chunk of the CTA's rows.
      chunk = (tile * CTA_ROWS + wg * ROWS_PER_WG) // ROWS_PER_WG
      row0 = chunk * ROWS_PER_WG
      rows_smem, out_smem = rows_smem2.at[wg], out_smem2.at[wg]
      plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(row0, ROWS_PER_WG), hi], q_smem2.at[wg],
                              q_ready.at[wg])
      plgpu.copy_gmem_to_smem(lse_ref.at[bi, hi, pl.ds(row0, ROWS_PER_WG)], lse_smem2.at[wg],
                              q_ready.at[wg + COMPUTE_WGS])
      plgpu.barrier_wait(q_ready.at[wg])
      plgpu.barrier_wait(q_ready.at[wg + COMPUTE_WGS])
      # The rows' LSE, broadcast across the tile once for the whole loop.
      lse_b = lax.broadcast_in_dim(load_row_vector(lse_smem2.at[wg], emulate),
                                   (ROWS_PER_WG, part_keys), [0])

      @pl.loop(0, n_groups)
      def _(g):
        first = g * group
        first_tile = first if per_tile == 1 else first // per_tile
        last_tile = jnp.minimum(first_tile + group // per_tile, n_tiles)

        def exps(t, part, qk):
          """Part ``part`` of tile t's exponentials, masked past the keys: [64, part_keys]."""
          x = qk * qk_scale - lse_b
          p = x * 1.0001 if exp2_stand_in else jnp.exp2(x)
          n_valid = length - t * kt - part * part_keys

          def mask_tail(y):
            cols = column_ids((ROWS_PER_WG, part_keys), emulate)
            return jnp.where(cols < n_valid, y, 0.0)

          return lax.cond(n_valid < part_keys, mask_tail, lambda y: y, p)

        def row_sums(t, part, qk):
          """Part ``part`` of tile t's exponentials summed per key block into the table."""
          p = exps(t, part, qk)
          blocks = part_keys // bs
          row = (t - first_tile) * per_tile + part * blocks
          if blocks == 1:
            rows_smem.at[row][...] = p.sum(axis=1)
          else:
            for j in range(blocks):
              rows_smem.at[row + j][...] = p[:, j * bs:(j + 1) * bs].sum(axis=1)

        def stand_in_scores():
          return with_layout(jnp.full((ROWS_PER_WG, part_keys), 0.5, jnp.float32),
                             plgpu.Layout.WGMMA, emulate)

        def whole_tile(t, slot):
          qk = (stand_in_scores() if qk_stand_in
                else qk_matmul(q_smem2.at[wg], k_smem.at[slot], emulate=emulate))
          # The slot may be refilled only once its scores are out of the accumulator.
          plgpu.barrier_arrive(k_free.at[slot])
          row_sums(t, 0, qk)

        def split_tile(t, slot):
          halves = [k_smem.at[slot, pl.ds(i * part_keys, part_keys)] for i in range(2)]
          if emulate or qk_stand_in:
            first_qk, second_qk = (
                stand_in_scores() if qk_stand_in
                else qk_matmul(q_smem2.at[wg], half, emulate=emulate) for half in halves)
            plgpu.barrier_arrive(k_free.at[slot])
            row_sums(t, 0, first_qk)
            row_sums(t, 1, second_qk)
            return

          def scope(acc0, acc1):
            for acc, half in ((acc0, halves[0]), (acc1, halves[1])):
              plgpu.wgmma(acc, q_smem2.at[wg], plgpu.transpose_ref(half, (1, 0)))
            # The first half's sums run while the second half's wgmma is in flight.
            row_sums(t, 0, plgpu.wgmma_accumulator_load(acc0, wait_n=1))
            second_qk = plgpu.wgmma_accumulator_load(acc1, wait_n=0)
            plgpu.barrier_arrive(k_free.at[slot])
            row_sums(t, 1, second_qk)

          acc = plgpu.ACC((ROWS_PER_WG, part_keys), jnp.float32)
          pl.run_scoped(scope, acc, acc)

        @pl.loop(first_tile, last_tile)
        def _(t):
          slot = lax.rem(t, stages)
          plgpu.barrier_wait(k_ready.at[slot])
          (split_tile if parts == 2 else whole_tile)(t, slot)

        if explicit_barriers:
          # Every thread's row sums must be in the tables before any thread reads them.
          # (wait_smem_to_gmem below ends in a warpgroup barrier, so the tables are read
          # out before the next group writes them; commit_smem fences and syncs again.)
          plgpu.commit_smem()
        # The previous group's TMA stores must have read out_smem before it is reused.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        if emulate:
          table = rows_smem[...]
        else:
          table = plgpu.load(rows_smem, (), layout=plgpu.Layout.WGMMA, optimized=False)
        out_smem[...] = table.sum(axis=1)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem, mass_ref.at[bi, hi, chunk, pl.ds(first, group)])

      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")

      @pl.loop(0, n_tiles)
      def _(t):
        slot = lax.rem(t, stages)

        @pl.when(t >= stages)
        def _():
          plgpu.barrier_wait(k_free.at[slot])

        # A 256-key tile is two copies of 128 keys on one barrier (two arrivals): as one
        # copy the H200 gave wrong masses in some runs (docs/log/mosaic.md).
        for part in range(copies):
          keys = pl.ds(part * copy_keys, copy_keys)
          plgpu.copy_gmem_to_smem(k_ref.at[bi, pl.ds(t * kt + part * copy_keys, copy_keys), hi],
                                  k_smem.at[slot, keys], k_ready.at[slot])

      # Observe the last consumptions too (see block_sparse_kernel.stream_kv_blocks).
      @pl.loop(max(n_tiles - stages, 0), n_tiles)
      def _(t):
        plgpu.barrier_wait(k_free.at[lax.rem(t, stages)])

  def entry(*refs):
    pl.run_scoped(
        lambda *scratch: kernel(*refs, *scratch),
        plgpu.SMEM((COMPUTE_WGS, ROWS_PER_WG, d), dtype, transforms=transforms),
        plgpu.SMEM((stages, kt, d), dtype, transforms=transforms),
        plgpu.SMEM((COMPUTE_WGS, ROWS_PER_WG), jnp.float32),
        plgpu.SMEM((COMPUTE_WGS, group, ROWS_PER_WG), jnp.float32),
        plgpu.SMEM((COMPUTE_WGS, group), jnp.float32),
        plgpu.Barrier(num_arrivals=copies, num_barriers=stages),
        plgpu.Barrier(num_barriers=2 * COMPUTE_WGS),  # Q and LSE of each warpgroup.
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
        collective_axes="wg",
    )

  return plgpu.kernel(
      entry,
      out_type=jax.ShapeDtypeStruct((b, h, s_pad // ROWS_PER_WG, n_groups * group),
                                    jnp.float32),
      grid=(h, s_pad // CTA_ROWS, b) if config.heads_major else (s_pad // CTA_ROWS, h, b),
      grid_names=(("heads", "q_tile", "batch") if config.heads_major
                  else ("q_tile", "heads", "batch")),
      num_threads=COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True,
                                           unsafe_no_auto_barriers=explicit_barriers),
      interpret=interpret,
  )(q, k, lse2, lengths)
