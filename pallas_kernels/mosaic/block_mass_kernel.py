"""Block mass from a cached LSE for Hopper in Pallas Mosaic GPU (``block_mass_padded``).

``mass[b, h, p, c] = sum_{i in query block p, j in key block c} exp(s_ij - lse_i)``.

One CTA holds two compute warpgroups (64 query rows each) and a memory
warpgroup that streams K through a ring of TMA stages shared by both, ``key_tile``
keys per stage: one key block, or several (``key_tile`` 128 or 256; a 256-key stage
is loaded by two TMA copies of 128 keys on one barrier).
Per tile a warpgroup runs one QK^T on wgmma, exponentiates against its rows' LSE
and sums each row over each key block of the tile (warp shuffles only). The
per-row sums of ``GROUP`` consecutive key blocks go to a small shared-memory
table that is then reduced across rows once, so the cross-warp reduction is paid
once per ``GROUP`` blocks, not once per block.

Each warpgroup writes the mass of its own 64 rows; the caller adds the 64-row
chunks of a query block together (block_size = 128 has two).

Inputs are pre-padded by the caller (``pallas_kernels.mosaic.ops``): bf16/f16 q and k
[B, S_pad, H, D] with D 64 or 128, q to a multiple of 128 rows and k to whole key
tiles, and the row LSE in log2 units with +inf on rows that must add nothing. The
arguments and their constraints: ``block_mass_padded``. Why the defaults
(``DEFAULT_*``) are what they are: docs/log/kernel_notes.md.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.exp2_poly import exp2_poly
from pallas_kernels.mosaic.block_sparse_kernel import (
    COMPUTE_WGS, CTA_ROWS, ROWS_PER_WG, _smem_transforms, check_stages, column_ids,
    load_row_vector, qk_matmul, smem_footprint, with_layout)

GROUP = 64  # key blocks per cross-row reduction; the output is padded to a multiple.
KEY_TILE = 128  # keys per stage and per QK^T wgmma, beside block_size itself
WIDE_KEY_TILE = 256  # the widest a wgmma takes (N <= 256)
DEFAULT_KEY_TILE = WIDE_KEY_TILE  # what pallas_kernels.mosaic asks for (docs/log/kernel_notes.md).
DEFAULT_ROW_TILES = 1  # what pallas_kernels.mosaic asks for (docs/log/kernel_notes.md).
DEFAULT_EXPLICIT_BARRIERS = True  # likewise
DEFAULT_MMA_SUMS = False  # likewise
DEFAULT_POLY_KEYS = 0  # likewise
POLY_CHUNK = 64  # keys per column chunk when some of a tile's exp2 are polynomials
_SMEM_FOR_K = 96 * 1024
# This kernel keeps Mosaic's default reduction scratch, so its footprint counts it.
_REDUCTION_SCRATCH = plgpu.CompilerParams().reduction_scratch_bytes
_LOG2E = math.log2(math.e)


def padded_num_kv_blocks(num_kv_blocks: int) -> int:
  return -(-num_kv_blocks // GROUP) * GROUP


def num_stages(key_tile: int, head_dim: int, itemsize: int = 2, row_tiles: int = 1) -> int:
  """Depth of the K ring (tiles of ``key_tile`` keys) that fits the default budget; a
  second row tile's Q and table take 32 KB of it."""
  budget = _SMEM_FOR_K - (row_tiles - 1) * 32 * 1024
  return int(max(2, min(4, budget // (key_tile * head_dim * itemsize))))


def smem_bytes(key_tile: int, head_dim: int, itemsize: int, stages: int,
               row_tiles: int = 1, sums_matrix_bytes: int = 0) -> int:
  """Shared memory of ``block_mass_padded`` with ``stages`` K stages, in bytes
  (``sums_matrix_bytes``: the indicator matrices of ``mma_sums``)."""
  chunks = COMPUTE_WGS * row_tiles  # 64-row chunks of Q per CTA
  buffers = (chunks * ROWS_PER_WG * head_dim * itemsize,  # Q
             stages * key_tile * head_dim * itemsize,  # K ring
             chunks * ROWS_PER_WG * 4,  # LSE
             chunks * GROUP * ROWS_PER_WG * 4,  # row-sum tables
             chunks * GROUP * 4)  # reduced sums on their way out
  buffers += (sums_matrix_bytes,) if sums_matrix_bytes else ()
  # K ready, Q and LSE per chunk, K free, ping-pong (and the indicators' arrival)
  barriers = stages + 2 * chunks + stages + 1 + bool(sums_matrix_bytes)
  return smem_footprint(buffers, barriers, _REDUCTION_SCRATCH)


SUMS_N = 8  # key blocks per accumulator of ``mma_sums`` (the narrowest wgmma)


def sums_matrices(block_size: int, key_tile: int):
  """float16 [tiles per chunk, SUMS_N, key_tile] 0/1: ``[j, n, key]`` is 1 where key block
  n of a chunk of SUMS_N blocks is the one that ``key`` of the chunk's tile j falls in."""
  per_tile = key_tile // block_size
  tiles = SUMS_N // per_tile
  j = jnp.arange(tiles)[:, None, None]
  n = jnp.arange(SUMS_N)[None, :, None]
  key = jnp.arange(key_tile)[None, None, :]
  return (n == j * per_tile + key // block_size).astype(jnp.float16)


def sums_matmul(acc, p16, e_smem, emulate=False):
  """acc + p16 @ e_smem^T: float32 [64, SUMS_N] += float16 [64, kt] (registers) @
  ([SUMS_N, kt] in shared memory)^T."""
  if emulate:
    return acc + jnp.dot(p16, e_smem[...].T, preferred_element_type=jnp.float32)

  def body(acc_ref):
    plgpu.wgmma(acc_ref, p16, plgpu.transpose_ref(e_smem, (1, 0)))

  return pl.run_state(body)(plgpu.ACC.init(acc))


@functools.partial(jax.jit, static_argnames=("block_size", "sm_scale", "num_kv_blocks",
                                              "heads_major", "stages", "key_tile",
                                              "pipeline", "schedule_barrier",
                                              "row_tiles", "explicit_barriers",
                                              "mma_sums", "poly_keys", "interpret"))
def block_mass_padded(q, k, lse2, lengths, *, block_size, sm_scale, num_kv_blocks,
                      heads_major=True, stages=None, key_tile=None, pipeline=False,
                      schedule_barrier=False, row_tiles=1, explicit_barriers=False,
                      mma_sums=False, poly_keys=0, interpret=None):
  """Per-64-row-chunk block mass on padded operands.

  Args:
    q, k: [B, S_pad, H, D] bf16/f16, S_pad a multiple of 128 (of 256 for q with
      ``row_tiles=2``; k only needs the keys the tiles read).
    lse2: float32 [B, H, S_pad], the row LSE in log2 units; +inf on rows that
      must add nothing (padding, rows past ``lengths``).
    lengths: int32 [B], valid keys per batch element.
    num_kv_blocks: nK, key blocks that hold any real key.
    heads_major: launch order, heads fastest (True) or query tiles fastest.
    stages: K ring depth, an int >= 2 that fits in the shared memory of a CTA
      (see ``smem_bytes``); None for ``num_stages``.
    key_tile: keys per stage and wgmma: None or block_size (one key block per
      tile), ``KEY_TILE`` (two blocks per tile at block_size 64, faster there:
      docs/log/kernel_notes.md; ``pallas_kernels.mosaic`` passes ``DEFAULT_KEY_TILE``)
      or ``WIDE_KEY_TILE`` (a 64 x 256 accumulator per warpgroup).
    pipeline: False, or True to overlap each tile's exp with the next tile's
      QK^T wgmma (measured slower or equal; docs/log/kernel_notes.md).
    schedule_barrier: False, or True to make the two compute warpgroups take
      turns (FA3 ping-pong): one runs its QK^T while the other exponentiates.
      Not with ``pipeline``.
    row_tiles: 64-row chunks of Q per compute warpgroup, 1 or 2. With 2 a CTA
      covers 256 query rows and each warpgroup runs both its chunks against
      every K tile it holds (the second chunk's QK^T in flight while the first
      exponentiates), so K is streamed half as often. Not with ``pipeline`` or
      ``schedule_barrier``.
    explicit_barriers: False, or True to compile without Pallas' automatic
      warpgroup barriers around every shared-memory load and store (two per
      row-sum store, four per tile at 128-key tiles) and to place the ones the
      kernel needs by hand: one before each group's table is read back.
    mma_sums: False, or True to sum each tile's exponentials per key block on the
      tensor cores: float16 P [64, key_tile] times a 0/1 block indicator
      (``sums_matrices``), accumulated over the tiles of ``SUMS_N`` key blocks in a
      [64, SUMS_N] wgmma accumulator whose columns go to the table, instead of a
      shuffle reduction and a table store per block. Not with ``pipeline``,
      ``schedule_barrier`` or ``row_tiles=2``.
    poly_keys: 0, or how many of each tile's keys (its last ones, a multiple of
      ``POLY_CHUNK`` up to key_tile) get their exp2 from ``exp2_poly`` on the FMA and
      ALU pipes instead of the MUFU; the tile is then exponentiated and masked in
      ``POLY_CHUNK``-column chunks. Not with ``mma_sums``.

  Returns:
    float32 [B, H, S_pad / 64, padded_num_kv_blocks(nK)]; columns >= nK are junk.
  """
  b, s_pad, h, d = q.shape
  dtype = q.dtype
  bs = block_size
  kt = bs if key_tile is None else key_tile
  if kt not in (bs, KEY_TILE, WIDE_KEY_TILE) or kt < bs or GROUP % (kt // bs):
    raise ValueError(f"key_tile={key_tile!r}: expected None, {KEY_TILE}, {WIDE_KEY_TILE} or "
                     f"block_size={bs}, at least block_size and a divisor of {GROUP} key "
                     "blocks.")
  if not isinstance(pipeline, bool):
    raise ValueError(f"pipeline={pipeline!r}: expected True or False.")
  if not isinstance(schedule_barrier, bool) or (schedule_barrier and pipeline):
    raise ValueError(f"schedule_barrier={schedule_barrier!r} with pipeline={pipeline}: "
                     "expected True or False, and not True with pipeline=True.")
  if not isinstance(explicit_barriers, bool):
    raise ValueError(f"explicit_barriers={explicit_barriers!r}: expected True or False.")
  if row_tiles not in (1, 2) or isinstance(row_tiles, bool):
    raise ValueError(f"row_tiles={row_tiles!r}: expected 1 or 2.")
  if not isinstance(mma_sums, bool) or (mma_sums and (pipeline or schedule_barrier
                                                       or row_tiles != 1)):
    raise ValueError(f"mma_sums={mma_sums!r} with pipeline={pipeline}, schedule_barrier="
                     f"{schedule_barrier}, row_tiles={row_tiles}: expected True or False, "
                     "and True only without the others.")
  if row_tiles == 2 and (pipeline or schedule_barrier):
    raise ValueError(f"row_tiles=2 with pipeline={pipeline}, schedule_barrier="
                     f"{schedule_barrier}: expected neither.")
  if (not isinstance(poly_keys, int) or isinstance(poly_keys, bool) or poly_keys % POLY_CHUNK
      or not 0 <= poly_keys <= kt or (poly_keys and mma_sums)):
    raise ValueError(f"poly_keys={poly_keys!r} with key_tile={kt}, mma_sums={mma_sums}: "
                     f"expected a multiple of {POLY_CHUNK} in 0..{kt}, and 0 with mma_sums.")
  cta_rows = CTA_ROWS * row_tiles
  if s_pad % cta_rows:
    raise ValueError(f"q has {s_pad} rows: expected a multiple of {cta_rows} with "
                     f"row_tiles={row_tiles}.")
  per_tile = kt // bs
  copy_keys = min(kt, KEY_TILE)
  copies = kt // copy_keys
  n_tiles = -(-num_kv_blocks // per_tile)   # the last may end past nK: junk columns
  if k.shape[1] < n_tiles * kt:
    raise ValueError(f"k has {k.shape[1]} keys: expected at least {n_tiles * kt}, the "
                     f"{n_tiles} tiles of key_tile={kt} that cover {num_kv_blocks} key blocks.")
  itemsize = jnp.dtype(dtype).itemsize
  if mma_sums and GROUP % SUMS_N:
    raise ValueError(f"mma_sums=True with GROUP={GROUP}: expected a multiple of {SUMS_N}.")
  sums_e = sums_matrices(bs, kt) if mma_sums else None  # [tiles per accumulator, ...]
  sums_tiles = sums_e.shape[0] if mma_sums else 0
  sums_bytes = sums_e.nbytes if mma_sums else 0
  stages = check_stages(stages, num_stages(kt, d, itemsize, row_tiles),
                        lambda n: smem_bytes(kt, d, itemsize, n, row_tiles, sums_bytes),
                        f"block mass at block_size={bs}, key_tile={kt}, row_tiles={row_tiles}, "
                        f"head_dim={d}, {jnp.dtype(dtype).name}")
  qk_scale = sm_scale * _LOG2E
  n_groups = padded_num_kv_blocks(num_kv_blocks) // GROUP
  transforms = _smem_transforms(dtype)
  emulate = interpret is not None

  def kernel(q_ref, k_ref, lse_ref, len_ref, *refs):
    e_ref = refs[0] if mma_sums else None
    (mass_ref, q_smem2, k_smem, lse_smem2, rows_smem2, out_smem2, k_ready, q_ready, k_free,
     sched, *sums_scratch) = refs[1:] if mma_sums else refs
    e_smem, e_ready = sums_scratch if mma_sums else (None, None)
    tile = lax.axis_index("q_tile")
    hi = lax.axis_index("heads")
    bi = lax.axis_index("batch")
    wg = lax.axis_index("wg")
    length = len_ref[bi]

    def ping_pong():
      # A rendezvous of the two compute warpgroups; warpgroup 1 runs one extra
      # at the start and warpgroup 0 one at the end, so between two of them one
      # warpgroup's QK^T runs while the other exponentiates.
      if schedule_barrier:
        plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(sched)

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      # Chunk c of this warpgroup: rows (c * COMPUTE_WGS + wg) * 64 of the CTA's.
      chunks = [(tile * cta_rows + (c * COMPUTE_WGS + wg) * ROWS_PER_WG) // ROWS_PER_WG
                for c in range(row_tiles)]
      for c, chunk in enumerate(chunks):
        row0 = chunk * ROWS_PER_WG
        bar = 2 * COMPUTE_WGS * c + wg
        plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(row0, ROWS_PER_WG), hi],
                                q_smem2.at[wg, c], q_ready.at[bar])
        plgpu.copy_gmem_to_smem(lse_ref.at[bi, hi, pl.ds(row0, ROWS_PER_WG)],
                                lse_smem2.at[wg, c], q_ready.at[bar + COMPUTE_WGS])
      if mma_sums:  # one copy of the indicators, read by both warpgroups
        @pl.when(wg == 0)
        def _():
          plgpu.copy_gmem_to_smem(e_ref, e_smem, e_ready)
      for c in range(row_tiles):
        plgpu.barrier_wait(q_ready.at[2 * COMPUTE_WGS * c + wg])
        plgpu.barrier_wait(q_ready.at[2 * COMPUTE_WGS * c + COMPUTE_WGS + wg])
      if mma_sums:
        plgpu.barrier_wait(e_ready)
      lse_rows = [load_row_vector(lse_smem2.at[wg, c], emulate) for c in range(row_tiles)]
      # One chunk keeps its LSE broadcast across the loop; two would not fit in registers
      # next to two tiles of scores, so they broadcast per tile.
      lse_b = (lax.broadcast_in_dim(lse_rows[0], (ROWS_PER_WG, kt), [0])
               if row_tiles == 1 else None)
      pl.when(wg == 1)(ping_pong)

      @pl.loop(0, n_groups)
      def _(g):
        first = g * GROUP
        first_tile = first if per_tile == 1 else first // per_tile
        last_tile = jnp.minimum(first_tile + GROUP // per_tile, n_tiles)

        def exps(t, qk, c=0):
          """Tile t's exponentials for chunk c, masked past the keys: [64, kt], or with
          ``poly_keys`` a list of [64, POLY_CHUNK] column chunks."""
          lse = (lse_b if lse_b is not None
                 else lax.broadcast_in_dim(lse_rows[c], (ROWS_PER_WG, kt), [0]))
          x = qk * qk_scale - lse
          n_valid = length - t * kt
          if poly_keys:
            starts = range(0, kt, POLY_CHUNK)
            p = [exp2_poly(x[:, a:a + POLY_CHUNK], keep_order=emulate)
                 if a >= kt - poly_keys else jnp.exp2(x[:, a:a + POLY_CHUNK]) for a in starts]

            def mask_chunks(chunks):
              cols = column_ids((ROWS_PER_WG, POLY_CHUNK), emulate)
              return [jnp.where(cols < n_valid - a, y, 0.0) for a, y in zip(starts, chunks)]

            return lax.cond(n_valid < kt, mask_chunks, lambda y: y, p)
          p = jnp.exp2(x)

          def mask_tail(y):
            cols = column_ids((ROWS_PER_WG, kt), emulate)
            return jnp.where(cols < n_valid, y, 0.0)

          return lax.cond(n_valid < kt, mask_tail, lambda y: y, p)

        def row_sums(t, qk, c=0):
          """Tile t's exponentials for chunk c summed per key block into the chunk's table
          for the group."""
          rows_smem = rows_smem2.at[wg, c]
          p = exps(t, qk, c)
          row = (t - first_tile) * per_tile
          if poly_keys:
            per_block = bs // POLY_CHUNK
            for j in range(per_tile):
              block = functools.reduce(lambda u, w: u + w,
                                       p[j * per_block:(j + 1) * per_block])
              rows_smem.at[row + j][...] = block.sum(axis=1)
          elif per_tile == 1:
            rows_smem.at[row][...] = p.sum(axis=1)
          else:
            for j in range(per_tile):
              rows_smem.at[row + j][...] = p[:, j * bs:(j + 1) * bs].sum(axis=1)

        def tile_scores(t, after_issue=None):
          slot = lax.rem(t, stages)
          plgpu.barrier_wait(k_ready.at[slot])

          qk = qk_matmul(q_smem2.at[wg, 0], k_smem.at[slot], after_issue=after_issue,
                         emulate=emulate)
          if row_tiles == 2:
            # Chunk 1's QK^T runs while chunk 0 exponentiates; chunk 1's scores return.
            qk0 = qk
            qk = qk_matmul(q_smem2.at[wg, 1], k_smem.at[slot],
                           after_issue=lambda: row_sums(t, qk0, 0), emulate=emulate)
          # The slot may be refilled only once its scores are out of the accumulator.
          plgpu.barrier_arrive(k_free.at[slot])
          return qk

        if row_tiles == 2:
          @pl.loop(first_tile, last_tile)
          def _(t):
            row_sums(t, tile_scores(t), 1)
        elif mma_sums:
          def step(t, acc):
            j = lax.rem(t - first_tile, sums_tiles)
            p16 = exps(t, tile_scores(t)).astype(jnp.float16)
            acc = sums_matmul(acc, p16, e_smem.at[j], emulate)
            flush = (j == sums_tiles - 1) | (t == last_tile - 1)

            @pl.when(flush)
            def _():
              # The chunk's SUMS_N columns are its key blocks' row sums.
              base = (t - first_tile - j) * per_tile
              cols = column_ids((ROWS_PER_WG, SUMS_N), emulate)
              for n in range(SUMS_N):
                rows_smem2.at[wg, 0].at[base + n][...] = jnp.where(cols == n, acc,
                                                                   0.0).sum(axis=1)

            return lax.cond(flush, lambda a: sums_zero, lambda a: a, acc)

          sums_zero = with_layout(jnp.zeros((ROWS_PER_WG, SUMS_N), jnp.float32),
                                  plgpu.Layout.WGMMA, emulate)
          lax.fori_loop(first_tile, last_tile, step, sums_zero)
        elif pipeline:
          # Tile t's exponentials run while tile t + 1's QK^T is in flight; the scores
          # of the tile in hand are the loop's carry.
          def step(t, qk_prev):
            return tile_scores(t, after_issue=lambda: row_sums(t - 1, qk_prev))

          qk_last = lax.fori_loop(first_tile + 1, last_tile, step, tile_scores(first_tile))
          row_sums(last_tile - 1, qk_last)
        else:
          @pl.loop(first_tile, last_tile)
          def _(t):
            qk = tile_scores(t)
            ping_pong()
            row_sums(t, qk)
            ping_pong()

        if explicit_barriers:
          # Every thread's row sums must be in the tables before any thread reads them.
          # (wait_smem_to_gmem below ends in a warpgroup barrier, so the tables are read
          # out before the next group writes them; commit_smem fences and syncs again.)
          plgpu.commit_smem()
        # The previous group's TMA stores must have read out_smem before it is reused.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        for c, chunk in enumerate(chunks):
          rows_smem, out_smem = rows_smem2.at[wg, c], out_smem2.at[wg, c]
          if emulate:
            table = rows_smem[...]
          else:
            table = plgpu.load(rows_smem, (), layout=plgpu.Layout.WGMMA, optimized=False)
          out_smem[...] = table.sum(axis=1)
        plgpu.commit_smem()
        for c, chunk in enumerate(chunks):
          plgpu.copy_smem_to_gmem(out_smem2.at[wg, c],
                                  mass_ref.at[bi, hi, chunk, pl.ds(first, GROUP)])

      pl.when(wg == 0)(ping_pong)
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
        # copy the H200 gave wrong masses in some runs (docs/bench/mosaic.md).
        for part in range(copies):
          keys = pl.ds(part * copy_keys, copy_keys)
          plgpu.copy_gmem_to_smem(k_ref.at[bi, pl.ds(t * kt + part * copy_keys, copy_keys), hi],
                                  k_smem.at[slot, keys], k_ready.at[slot])

      # Observe the last consumptions too (see mosaic_block_sparse).
      @pl.loop(max(n_tiles - stages, 0), n_tiles)
      def _(t):
        plgpu.barrier_wait(k_free.at[lax.rem(t, stages)])

  def entry(*refs):
    pl.run_scoped(
        lambda *scratch: kernel(*refs, *scratch),
        plgpu.SMEM((COMPUTE_WGS, row_tiles, ROWS_PER_WG, d), dtype, transforms=transforms),
        plgpu.SMEM((stages, kt, d), dtype, transforms=transforms),
        plgpu.SMEM((COMPUTE_WGS, row_tiles, ROWS_PER_WG), jnp.float32),
        plgpu.SMEM((COMPUTE_WGS, row_tiles, GROUP, ROWS_PER_WG), jnp.float32),
        plgpu.SMEM((COMPUTE_WGS, row_tiles, GROUP), jnp.float32),
        plgpu.Barrier(num_arrivals=copies, num_barriers=stages),
        plgpu.Barrier(num_barriers=2 * COMPUTE_WGS * row_tiles),  # Q and LSE of each chunk.
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS),  # ping-pong (schedule_barrier)
        *((plgpu.SMEM(sums_e.shape, sums_e.dtype, transforms=_smem_transforms(sums_e.dtype)),
           plgpu.Barrier()) if mma_sums else ()),
        collective_axes="wg",
    )

  return plgpu.kernel(
      entry,
      out_type=jax.ShapeDtypeStruct((b, h, s_pad // ROWS_PER_WG, n_groups * GROUP),
                                    jnp.float32),
      grid=(h, s_pad // cta_rows, b) if heads_major else (s_pad // cta_rows, h, b),
      grid_names=("heads", "q_tile", "batch") if heads_major else ("q_tile", "heads", "batch"),
      num_threads=COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True,
                                           unsafe_no_auto_barriers=explicit_barriers),
      interpret=interpret,
  )(q, k, lse2, lengths, *((sums_e,) if mma_sums else ()))
