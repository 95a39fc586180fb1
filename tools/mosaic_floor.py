"""Load-only twin of the block-sparse Mosaic kernel: the floor its K/V traffic sets.

A measurement tool for ``tools/mosaic_variants.py floor``, not a library
kernel. It keeps what moves data in ``pallas_kernels.mosaic.block_sparse_kernel``: the
grid and launch order, the per-row index lists (dense rows included), the memory
warpgroup's TMA copies into the K/V rings, and the ready/free mbarriers of every
stage. The compute warpgroups only wait for each stage and release it: no wgmma,
no softmax. If the real kernel takes about as long as this one, it is bound by
moving K/V from L2/HBM into shared memory, not by math.

Each compute warpgroup writes its 64 output rows, as the real kernel writes O,
from a buffer the copies filled, so the loads feed a result: the V tile of the
last block its list names (with 128 x 128 blocks, the warpgroup's half of that
128-key tile), or its own Q rows when its list is empty.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mosaic.block_sparse_kernel import (
    CtaLists, check_tiling, memory_warpgroup, num_stages, pipelines, smem_bytes)
from pallas_kernels.mosaic.common import (
    COMPUTE_WGS, CTA_ROWS, ROWS_PER_WG, check_stages, smem_transforms)


@functools.partial(jax.jit, static_argnames=("block_size", "num_kv_blocks", "heads_major",
                                              "stages", "interpret", "query_block_size"))
def load_only_padded(q, k, v, kv_block_indices, kv_steps, dense_rows, *, block_size,
                     num_kv_blocks, heads_major=True, stages=None, interpret=None,
                     query_block_size=None):
  """Streams the listed K/V blocks like ``block_sparse_attention_padded``, no math.

  Args:
    q, k, v: [B, S_pad, H, D] bf16/f16, S_pad a multiple of 128.
    kv_block_indices: int32 [B, H, nQ_pad, K_max], nQ_pad = S_pad / query_block_size.
    kv_steps: int32 [B, H, nQ_pad], key blocks each row reads.
    dense_rows: int32 [B, H, nQ_pad], 1 where a row reads blocks 0..steps-1.
    num_kv_blocks: nK, list entries are clipped to [0, nK).
    stages: K/V ring depth per pipeline (None: the real kernel's default).
    query_block_size: rows per list (None: ``block_size``); the real kernel's tilings
      (``SUPPORTED_TILINGS``), e.g. 128 over 64-key blocks: one list and one ring of
      64-key stages per CTA.

  Returns:
    [B, S_pad, H, D] in q's dtype; ``expected_output`` says what it holds.
  """
  b, s_pad, h, d = q.shape
  dtype = q.dtype
  bs = block_size
  qbs = check_tiling(bs, query_block_size)
  pipes = pipelines(qbs)
  itemsize = jnp.dtype(dtype).itemsize
  stages = check_stages(stages, num_stages(bs, d, itemsize, qbs),
                        lambda n: smem_bytes(bs, d, itemsize, n, qbs),
                        f"query_block_size={qbs}, block_size={bs}, head_dim={d}, "
                        f"{jnp.dtype(dtype).name}")
  transforms = smem_transforms(dtype)

  def kernel(q_ref, k_ref, v_ref, idx_ref, steps_ref, dense_ref, out_ref,
             q_smem2, k_smem, v_smem, k_ready, v_ready, q_ready, k_free, v_free):
    cta = CtaLists(idx_ref, steps_ref, dense_ref, qbs)
    tile, hi, bi, wg = cta.tile, cta.head, cta.batch, cta.wg

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      q_smem = q_smem2.at[wg]
      row0 = tile * CTA_ROWS + wg * ROWS_PER_WG
      qb = row0 // qbs
      ring = (wg if pipes == 2 else 0) * stages
      n = steps_ref[bi, hi, qb]
      dst = out_ref.at[bi, pl.ds(row0, ROWS_PER_WG), hi]
      plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(row0, ROWS_PER_WG), hi], q_smem,
                              q_ready.at[wg])
      plgpu.barrier_wait(q_ready.at[wg])

      def write_tile(slot):
        if bs == ROWS_PER_WG:  # a 64-key stage: the warpgroup's whole output tile
          plgpu.copy_smem_to_gmem(v_smem.at[slot], dst)
          return
        # Static halves: each warpgroup owns 64 of the tile's 128 keys.
        for w in range(COMPUTE_WGS):
          @pl.when(wg == w)
          def _():
            plgpu.copy_smem_to_gmem(v_smem.at[slot, pl.ds(w * ROWS_PER_WG, ROWS_PER_WG)], dst)

      @pl.loop(0, n)
      def _(step):
        slot = ring + lax.rem(step, stages)
        plgpu.barrier_wait(k_ready.at[slot])
        plgpu.barrier_arrive(k_free.at[slot])
        plgpu.barrier_wait(v_ready.at[slot])

        @pl.when(step == n - 1)
        def _():
          write_tile(slot)
          # The stage is handed back only once the store has read it.
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        plgpu.barrier_arrive(v_free.at[slot])

      @pl.when(n == 0)
      def _():
        plgpu.copy_smem_to_gmem(q_smem, dst)

      plgpu.wait_smem_to_gmem(0)

    # The memory warpgroup of block_sparse_attention_padded: the same function.
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
        plgpu.Barrier(num_barriers=pipes * stages),
        plgpu.Barrier(num_barriers=pipes * stages),
        plgpu.Barrier(num_barriers=COMPUTE_WGS),
        plgpu.Barrier(num_arrivals=consumers, num_barriers=pipes * stages),
        plgpu.Barrier(num_arrivals=consumers, num_barriers=pipes * stages),
        collective_axes="wg",
    )

  return plgpu.kernel(
      entry,
      out_type=jax.ShapeDtypeStruct(q.shape, dtype),
      grid=(h, s_pad // CTA_ROWS, b) if heads_major else (s_pad // CTA_ROWS, h, b),
      grid_names=("heads", "q_tile", "batch") if heads_major else ("q_tile", "heads", "batch"),
      num_threads=COMPUTE_WGS + 1,
      thread_name="wg",
      interpret=interpret,
  )(q, k, v, kv_block_indices, kv_steps, dense_rows)


def expected_output(q, v, kv_block_indices, kv_steps, dense_rows, *, block_size,
                    num_kv_blocks, query_block_size=None):
  """What ``load_only_padded`` writes, gathered with jnp ([B, S_pad, H, D])."""
  b, s_pad, h, d = q.shape
  k_max = kv_block_indices.shape[-1]
  chunk = jnp.arange(s_pad // ROWS_PER_WG)
  qb = chunk * ROWS_PER_WG // (query_block_size or block_size)
  n = kv_steps[:, :, qb]  # [B, H, chunks]
  pos = jnp.clip(n - 1, 0, k_max - 1)[..., None]
  listed = jnp.take_along_axis(kv_block_indices[:, :, qb], pos, axis=-1)[..., 0]
  last = jnp.where(dense_rows[:, :, qb] != 0, n - 1, jnp.clip(listed, 0, num_kv_blocks - 1))
  first_key = last * block_size + (chunk * ROWS_PER_WG) % block_size
  rows = (first_key[..., None] + jnp.arange(ROWS_PER_WG)).reshape(b, h, s_pad)
  v_rows = jnp.take_along_axis(v.transpose(0, 2, 1, 3), rows[..., None], axis=2)
  empty = jnp.repeat(n == 0, ROWS_PER_WG, axis=-1)[..., None]
  return jnp.where(empty, q.transpose(0, 2, 1, 3), v_rows).transpose(0, 2, 1, 3)
