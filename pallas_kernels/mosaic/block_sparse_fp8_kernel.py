"""8-bit block-sparse flash attention for Hopper in Pallas Mosaic GPU: P.V in
float8_e4m3fn, Q.K^T in float8_e4m3fn ("fp8") or int8 ("int8_fp8").

The FP8 twin of ``block_sparse_kernel`` (same CTA: two compute warpgroups of 64 query rows
and one memory warpgroup streaming the listed K/V blocks through a TMA ring; same lists,
tilings, ping-pong and ``lengths`` masking; its ``stream_kv_blocks``, ``read_entry`` and
``listed_block`` are imported, not copied). It follows the recipe of
``pallas_kernels.reference.fp8`` (SageAttention2-style); the quantisation itself is a jnp
pre-pass (``fp8_ops.quantize_inputs``), this kernel takes 8-bit operands and their scales.
Q and K are both e4m3 or both int8 (the dtype of ``q8`` picks the Q.K^T wgmma: int8
operands accumulate exactly in int32, converted to float32 before the scales); V^T and P
are e4m3 either way.

Hopper's FP8 wgmma reads shared-memory operands K-major only (only 16-bit wgmma can
transpose), so:

- Q.K^T: Q [64, D] and a K block [bs, D] as in ``common.qk_matmul``, both D (= the
  contraction) minor: K-major, allowed.
- P.V: V is given transposed, ``vt8`` [B, H, D, S_pad], so a V^T tile [D, bs] has the
  keys (the contraction) minor. P is the left operand from registers as 8-bit, which
  wgmma wants in ``WGMMA_LAYOUT_8BIT`` (4 consecutive columns per thread); P is computed
  in the accumulator's ``WGMMA_LAYOUT`` (2 + 2 columns 8 apart per thread). Rather than
  shuffle P across threads every step, the registers are relabelled as they are
  (``_p_operand``: the two 2-element registers of columns 16t + {2l, 2l+1} and
  16t + 8 + {2l, 2l+1} of lane l become the one 4-element register of columns
  16t + 4l + {0..3}), which permutes P's columns within each group of 16 keys by
  ``KEY_PERMUTATION``, and the pre-pass stores V^T's keys permuted the same way within
  each 16-key group, so the contraction is unchanged. No data moves.

Numerics (per step = one key block of ``block_size`` keys):

- ``S = (q8 . k8) * q_scale[row block] * k_scale[key block] * sm_scale * log2(e)``: one
  float32 scalar per step applied to the float32 wgmma result (scores in log2 units).
- Online softmax in float32; ``P * 448 = exp2(S - (m - log2(448)))`` in one exp2 (P in
  [0, 1]); ``l`` sums the float32 ``P * 448``.
- ``p8 = e4m3(P * 448)`` (``cvt.rn.satfinite``), the fixed scale of the recipe.
- P.V goes into a fresh float32 wgmma accumulator each step, added to the running
  (rescaled) one: FP8 wgmma's reduced-precision accumulation spans one key block only
  (``BlockSparseFp8Config.split_accumulation``, default on).
- ``out = acc * v_scale[d] / l`` (the 448 of P cancels the one in l);
  ``lse = m * ln2 + log(l) - log(448)`` (natural log of the smoothed scores; the caller
  adds the smoothing shift). Rows with no valid key: out 0, lse -inf.

Scales: ``q_scale`` float32 [B, H, S_pad / 64] (one per 64-row block, i.e. per compute
warpgroup; the op repeats coarser scales), ``k_scale`` float32 [B, H, S_pad / block_size]
(one per key block), ``v_scale`` float32 [B, H, D] (per channel).

Shared memory: 1-byte tiles use the swizzle of their row width (``common.smem_transforms``
with the minor dimension: 64 bytes for 64 columns, 128 for 128); Q is 8-bit [2, 64, D],
O a separate bf16 [2, 64, D], K [bs, D] and V^T [D, bs] stages of 1 byte per element,
so a stage is half the bf16 one.

Under the GPU interpreter (``interpret`` given) the wgmmas are emulated with float32
``jnp.dot`` of the e4m3 values, P permuted as the registers are (``emulate`` below), so
the emulation applies the same quantisation and the same V^T key order.

Everything in this module is ours.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mosaic.block_sparse_kernel import (
    BlockSparseConfig, CtaLists, balance_ping_pong, check_lists, check_tiling, listed_block,
    mask_keys_past, memory_warpgroup, next_k_waiter, num_stages, ping_pong_barrier,
    pipelines, read_entry, softmax_start, wait_for_v)
from pallas_kernels.mosaic.common import (
    COMPUTE_WGS, CTA_ROWS, LN2, LOG2E, ROWS_PER_WG, check_flag, check_stages, qk_matmul,
    smem_footprint, smem_transforms)
from pallas_kernels.reference import fp8 as fp8_reference

FP8_DTYPE = fp8_reference.FP8_DTYPE
QK_DTYPES = tuple(jnp.dtype(x) for x in fp8_reference.QK_DTYPES.values())  # q8 and k8
FP8_MAX = fp8_reference.FP8_MAX  # largest finite e4m3; P in [0, 1] is stored as e4m3(P * 448)
LOG2_FP8_MAX = math.log2(FP8_MAX)
OUT_DTYPE = jnp.bfloat16
SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_TILINGS = ((64, 64), (128, 128), (128, 64))  # (query_block_size, block_size)


@dataclasses.dataclass(frozen=True)
class BlockSparseFp8Config(BlockSparseConfig):
  """Tuning of ``block_sparse_attention_fp8_padded``: ``BlockSparseConfig``'s fields and

    split_accumulation: each step's P.V into a fresh float32 accumulator added to the
      running one (True, the recipe: FP8 wgmma's reduced-precision accumulation spans one
      key block), or straight into the rescaled running accumulator (False: 64 x D fewer
      live float32 registers per thread during the wgmma, FP8 accumulation across all
      key blocks; for timing against True).
    int_scores: how int8 Q.K^T's int32 scores become float32. "convert" (default): an
      int-to-float conversion per score (I2F). "bias": the int32 plus ``INT_BITS_BIAS``
      read as float32 bits, which is the score plus ``INT_SCORE_BIAS`` exactly (|score|
      <= 127^2 * D < 2^22), minus that bias: an integer add and a float add per score
      instead of the quarter-rate I2F. The same exact float32 scores either way. On an
      H100 (jax 0.11.2, 2026-12-07, ``tools/fp8_gpu_check.py``) "bias" was the slower,
      by 6-7% at 128 x 128 and 4% at 128 x 64 (docs/benchmarks.md), hence the default.

  A plain ``BlockSparseConfig`` is taken as this with the defaults above.
  """
  split_accumulation: bool = True
  int_scores: str = "convert"

  def __post_init__(self):
    super().__post_init__()
    check_flag(self, "split_accumulation")
    if self.int_scores not in INT_SCORE_MODES:
      raise ValueError(f"int_scores={self.int_scores!r}: expected one of {INT_SCORE_MODES}.")


INT_SCORE_MODES = ("bias", "convert")
# For an int32 |x| < 2^22, the float32 with bits x + INT_BITS_BIAS is INT_SCORE_BIAS + x
# exactly (1.5 * 2^23 puts x in the mantissa's low bits).
INT_BITS_BIAS = 0x4B400000
INT_SCORE_BIAS = 12582912.0  # 1.5 * 2^23

DEFAULT_CONFIG = BlockSparseFp8Config()
_REDUCTION_SCRATCH = 0  # as block_sparse_kernel: only in-warp WGMMA row reductions
_HIGHEST = lax.Precision.HIGHEST

# Column c of the 8-bit P operand within a group of 16 keys is key KEY_PERMUTATION[c] of
# the group (see the module docstring). V^T's keys are stored in this order.
KEY_PERMUTATION = (0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15)


def key_order(n: int) -> np.ndarray:
  """int [n] (n a multiple of 16): the key stored at position c of the permuted V^T,
  ``KEY_PERMUTATION`` applied within each group of 16."""
  if n % 16:
    raise ValueError(f"n={n}: expected a multiple of 16 keys.")
  c = np.arange(n)
  return (c // 16) * 16 + np.asarray(KEY_PERMUTATION)[c % 16]


def permute_keys(x):
  """``x`` [..., n] (n a multiple of 16) with its last axis in ``key_order``: a reshape
  and a transpose, so that it needs no index constant (a kernel may not capture one).

  Key ``8 * h + 2 * l + j`` of a group of 16 (h, j in {0, 1}, l in 0..3: the WGMMA
  layout's register half, lane and element) goes to ``4 * l + 2 * h + j`` (the 8-bit
  layout's lane and element)."""
  *lead, n = x.shape
  if n % 16:
    raise ValueError(f"x of shape {x.shape}: expected a multiple of 16 along the last axis.")
  groups = x.reshape(*lead, n // 16, 2, 4, 2)
  return jnp.swapaxes(groups, -3, -2).reshape(*lead, n)


def smem_bytes(block_size: int, head_dim: int, stages: int,
               query_block_size: int | None = None) -> int:
  """Shared memory of ``block_sparse_attention_fp8_padded`` with ``stages`` K/V stages of
  ``block_size`` keys per pipeline."""
  pipes = pipelines(block_size if query_block_size is None else query_block_size)
  tile = block_size * head_dim  # 1 byte per element
  rows = COMPUTE_WGS * ROWS_PER_WG
  buffers = (rows * head_dim,  # Q (e4m3)
             rows * head_dim * jnp.dtype(OUT_DTYPE).itemsize,  # O
             pipes * stages * tile, pipes * stages * tile,  # K ring, V^T ring
             rows * 4)  # LSE
  barriers = 4 * pipes * stages + COMPUTE_WGS + 1
  return smem_footprint(buffers, barriers, _REDUCTION_SCRATCH)


def _p_operand(p8, emulate):
  """P e4m3 [64, bs] in the WGMMA layout as the 8-bit wgmma left operand.

  On the GPU: the same registers relabelled as ``WGMMA_LAYOUT_8BIT`` (columns permuted by
  ``KEY_PERMUTATION`` within each 16). Emulated: the permuted array itself."""
  rows, bs = p8.shape
  if emulate:
    return permute_keys(p8)
  # Imported here: only the compiled path needs Mosaic GPU's own modules.
  from jax.experimental.mosaic.gpu import fragmented_array as fa
  from jax.experimental.mosaic.gpu import utils as mgpu_utils

  @plgpu.inline_mgpu(
      arg_types=(plgpu.Layout.WGMMA,),
      return_type=plgpu.ShapeDtypeStruct((rows, bs), FP8_DTYPE, layout=plgpu.Layout.WGMMA_8BIT))
  def relabel(_, x):
    src = x.registers  # [1, bs / 8, 1, 1, 2, 1, 1, 1, 1] of 2 x e4m3
    shape = fa.WGMMA_LAYOUT_8BIT.registers_shape((rows, bs))  # [1, bs / 16, ...] of 4
    regs = np.empty(shape, dtype=object)
    for idx in np.ndindex(*shape):
      pair = [src[(idx[0], 2 * idx[1] + i, *idx[2:])] for i in range(2)]
      regs[idx] = mgpu_utils.vector_concat(pair)
    return fa.FragmentedArray(_registers=regs, _layout=fa.WGMMA_LAYOUT_8BIT, _is_signed=None)

  return relabel(p8)


def _qk_fp8(q_smem, k_smem, *, int_scores, after_issue, emulate):
  """float32 [64, bs] = q8 [64, D] @ k8 [bs, D]^T, e4m3 or int8 (``common.qk_matmul``;
  int32 scores converted as ``int_scores`` says, exactly either way). Emulated in
  float32, where products of e4m3 or int8 values and int8 sums over D are exact."""
  if emulate:
    qk = jnp.dot(q_smem[...].astype(jnp.float32), k_smem[...].astype(jnp.float32).T,
                 precision=_HIGHEST)
    after_issue()
    return qk
  qk = qk_matmul(q_smem, k_smem, after_issue=after_issue)
  if not jnp.issubdtype(q_smem.dtype, jnp.integer):
    return qk
  if int_scores == "bias":
    return lax.bitcast_convert_type(qk + INT_BITS_BIAS, jnp.float32) - INT_SCORE_BIAS
  return qk.astype(jnp.float32)


def _pv_fp8(acc, alpha, p_op, vt_smem, *, split, after_issue, emulate):
  """``acc * alpha[:, None] + p_op [64, bs] @ vt_smem [D, bs]^T``, float32 [64, D]; the
  tile's keys are in ``key_order`` as ``p_op``'s columns are. ``split``: the product in a
  fresh accumulator, the rescale done while the wgmma runs, then the sum; else the wgmma
  accumulates into the rescaled ``acc``. ``after_issue`` runs while the wgmma runs."""
  rescale = lambda: acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
  if emulate:
    pv = jnp.dot(p_op.astype(jnp.float32), vt_smem[...].astype(jnp.float32).T,
                 precision=_HIGHEST)
    after_issue()
    return rescale() + pv
  vt = plgpu.transpose_ref(vt_smem, (1, 0))
  if not split:
    def body(acc_ref):
      plgpu.wgmma(acc_ref, p_op, vt)
      after_issue()

    return pl.run_state(body)(plgpu.ACC.init(rescale()))

  def scope(acc_ref):
    plgpu.wgmma(acc_ref, p_op, vt)
    after_issue()
    rescaled = rescale()
    return acc_ref[...], rescaled

  pv, rescaled = pl.run_scoped(scope, plgpu.ACC((p_op.shape[0], vt_smem.shape[0]),
                                                jnp.float32))
  return rescaled + pv


def _check_inputs(q8, k8, vt8, q_scale, k_scale, v_scale, block_size, qbs):
  b, s_pad, h, d = q8.shape
  for name, x in (("q8", q8), ("k8", k8), ("vt8", vt8)):
    want = FP8_DTYPE if name == "vt8" else q8.dtype
    if x.dtype != want or x.dtype not in QK_DTYPES:
      raise ValueError(f"{name} of dtype {x.dtype}: expected "
                       + ("float8_e4m3fn." if name == "vt8" else
                          "float8_e4m3fn or int8, the same for q8 and k8."))
  if k8.shape != q8.shape:
    raise ValueError(f"k8 of shape {k8.shape}: expected q8's {q8.shape} [B, S_pad, H, D].")
  if vt8.shape != (b, h, d, s_pad):
    raise ValueError(f"vt8 of shape {vt8.shape}: expected {(b, h, d, s_pad)} "
                     "[B, H, D, S_pad] (V transposed, keys in key_order).")
  if d not in SUPPORTED_HEAD_DIMS:
    raise ValueError(f"head_dim={d}: expected one of {SUPPORTED_HEAD_DIMS}.")
  if s_pad % CTA_ROWS or s_pad % qbs:
    raise ValueError(f"S_pad={s_pad}: expected a multiple of {max(CTA_ROWS, qbs)}.")
  for name, x, want in (("q_scale", q_scale, (b, h, s_pad // ROWS_PER_WG)),
                        ("k_scale", k_scale, (b, h, s_pad // block_size)),
                        ("v_scale", v_scale, (b, h, d))):
    if x.shape != want or x.dtype != jnp.float32:
      raise ValueError(f"{name} of shape {x.shape} and dtype {x.dtype}: expected float32 "
                       f"{want}.")


@functools.partial(
    jax.jit,
    static_argnames=("block_size", "sm_scale", "num_kv_blocks", "config", "interpret",
                     "query_block_size"))
def block_sparse_attention_fp8_padded(q8, k8, vt8, q_scale, k_scale, v_scale,
                                      kv_block_indices, kv_steps, dense_rows, lengths, *,
                                      block_size, sm_scale, num_kv_blocks,
                                      config=DEFAULT_CONFIG, interpret=None,
                                      query_block_size=None):
  """FP8 block-sparse attention on padded, quantised operands.

  Args:
    q8, k8: float8_e4m3fn or int8 (both the same) [B, S_pad, H, D], S_pad a multiple of
      128 (K smoothed).
    vt8: float8_e4m3fn [B, H, D, S_pad]: V^T, the keys of each group of 16 in
      ``key_order`` (``fp8_ops.quantize_inputs`` makes it).
    q_scale: float32 [B, H, S_pad / 64], one per 64 query rows.
    k_scale: float32 [B, H, S_pad / block_size], one per key block.
    v_scale: float32 [B, H, D], one per channel.
    kv_block_indices, kv_steps, dense_rows, lengths, block_size, num_kv_blocks,
      query_block_size, config, interpret: as ``block_sparse_kernel.
      block_sparse_attention_padded`` (``config`` a ``BlockSparseFp8Config`` or
      ``BlockSparseConfig``).
    sm_scale: softmax scale (a Python float).

  Returns:
    out bf16 [B, S_pad, H, D] and lse float32 [B, H, S_pad] (natural log of the smoothed
    scores, -inf for rows that read no valid key). Rows past ``lengths`` are not zeroed.
  """
  if not isinstance(config, BlockSparseConfig):
    raise ValueError(f"config={config!r}: expected a BlockSparseConfig.")
  if not isinstance(config, BlockSparseFp8Config):  # the 8-bit fields at their defaults
    config = BlockSparseFp8Config(**dataclasses.asdict(config))
  schedule_barrier, heads_major = config.schedule_barrier, config.heads_major
  split, int_scores = config.split_accumulation, config.int_scores
  b, s_pad, h, d = q8.shape
  bs = block_size
  qbs = check_tiling(bs, query_block_size)
  _check_inputs(q8, k8, vt8, q_scale, k_scale, v_scale, bs, qbs)
  pipes = pipelines(qbs)
  check_lists(kv_block_indices, kv_steps, dense_rows, batch=b, heads=h, s_pad=s_pad,
              query_block_size=qbs)
  tiling = "" if qbs == bs else f"query_block_size={qbs}, "
  stages = check_stages(config.stages, num_stages(bs, d, 1, qbs),
                        lambda n: smem_bytes(bs, d, n, qbs),
                        f"{tiling}block_size={bs}, head_dim={d}, float8_e4m3fn")
  base_scale = float(sm_scale) * LOG2E  # scores in log2 units: exp2 is one FMA away
  n_tiles = s_pad // CTA_ROWS
  emulate = interpret is not None
  block_of = functools.partial(listed_block, num_kv_blocks=num_kv_blocks)

  def kernel(q_ref, k_ref, vt_ref, qs_ref, ks_ref, vs_ref, idx_ref, steps_ref, dense_ref,
             len_ref, out_ref, lse_ref, q_smem2, o_smem2, k_smem, vt_smem, lse_smem2,
             k_ready, v_ready, q_ready, k_free, v_free, sched):
    cta = CtaLists(idx_ref, steps_ref, dense_ref, qbs)
    tile, hi, bi, wg = cta.tile, cta.head, cta.batch, cta.wg
    length = len_ref[bi]
    pipe_steps = cta.steps
    ping_pong = ping_pong_barrier(sched, schedule_barrier)

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      q_smem = q_smem2.at[wg]
      o_smem = o_smem2.at[wg]
      lse_smem = lse_smem2.at[wg]
      row0 = tile * CTA_ROWS + wg * ROWS_PER_WG
      qb = row0 // qbs
      pipe = wg if pipes == 2 else 0
      ring = pipe * stages
      n = steps_ref[bi, hi, qb]
      n_max = jnp.maximum(pipe_steps(0), pipe_steps(1)) if pipes == 2 else n
      q_step_scale = qs_ref[bi, hi, row0 // ROWS_PER_WG] * base_scale

      plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(row0, ROWS_PER_WG), hi], q_smem,
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
        ahead = read_entry(idx_ref, dense_ref, bi, hi, qb, step + 1)
        block = block_of(entry, step)
        n_valid = length - block * bs
        scale = q_step_scale * ks_ref[bi, hi, block]  # one float32 scalar per step

        qk = _qk_fp8(q_smem, k_smem.at[slot], int_scores=int_scores, after_issue=ping_pong,
                     emulate=emulate)
        plgpu.barrier_arrive(k_free.at[slot])
        qk = mask_keys_past(qk, n_valid, bs, emulate)

        m_new = jnp.maximum(m_i, qk.max(axis=1) * scale)
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m_i - m_use)
        # P * 448 in one exp2 (the shift folds the scale in); l sums it in float32, so
        # the 448 cancels in acc / l and leaves the LSE as log(448).
        p448 = jnp.exp2(qk * scale - lax.broadcast_in_dim(m_use - LOG2_FP8_MAX, qk.shape, [0]))
        l_i = l_i * alpha + p448.sum(axis=1)
        p_op = _p_operand(p448.astype(FP8_DTYPE), emulate)
        # (After the relabelling: Mosaic's barrier takes 8-bit registers 4 to a vector.)
        acc, l_i, m_new, alpha, p_op = lax.optimization_barrier((acc, l_i, m_new, alpha, p_op))
        wait_for_v(v_ready.at[slot], sched, schedule_barrier)
        wait_next_k = next_k_waiter(k_ready, ring=ring, stages=stages, step=step, steps=n)
        acc = _pv_fp8(acc, alpha, p_op, vt_smem.at[slot], split=split,
                      after_issue=wait_next_k, emulate=emulate)
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m_new, l_i, ahead

      acc, m_i, l_i, _ = lax.fori_loop(
          0, n, step_fn, (acc, m_i, l_i, read_entry(idx_ref, dense_ref, bi, hi, qb, 0)))

      balance_ping_pong(ping_pong, n, n_max, schedule_barrier and pipes == 2)

      pl.when(wg == 0)(ping_pong)

      has_keys = l_i > 0.0
      inv_l = 1.0 / jnp.where(has_keys, l_i, 1.0)
      if emulate:
        v_cols = vs_ref[bi, hi]
      else:
        v_cols = plgpu.load(vs_ref.at[bi, hi], (), layout=plgpu.Layout.WGMMA.reduce(0),
                            optimized=False)
      # l holds 448 * sum(P): its 448 cancels P's.
      acc = (acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])
             * lax.broadcast_in_dim(v_cols, acc.shape, [1]))
      o_smem[...] = acc.astype(OUT_DTYPE)
      lse_smem[...] = jnp.where(
          has_keys, m_i * LN2 + (jnp.log(jnp.where(has_keys, l_i, 1.0)) - math.log(FP8_MAX)),
          -jnp.inf)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, out_ref.at[bi, pl.ds(row0, ROWS_PER_WG), hi])
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, hi, pl.ds(row0, ROWS_PER_WG)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
      memory_warpgroup(k_ref, vt_ref, k_smem, vt_smem, (k_ready, v_ready, k_free, v_free),
                       cta, pipes=pipes, num_kv_blocks=num_kv_blocks, block_size=bs,
                       stages=stages,
                       v_index=lambda batch, keys, head: (batch, head, slice(None), keys))

  def entry(*refs):
    consumers = 1 if pipes == 2 else COMPUTE_WGS
    d_major = smem_transforms(q8.dtype, d)  # Q, K: rows of D bytes
    pl.run_scoped(
        lambda *scratch: kernel(*refs, *scratch),
        plgpu.SMEM((COMPUTE_WGS, ROWS_PER_WG, d), q8.dtype, transforms=d_major),
        plgpu.SMEM((COMPUTE_WGS, ROWS_PER_WG, d), OUT_DTYPE,
                   transforms=smem_transforms(OUT_DTYPE)),
        plgpu.SMEM((pipes * stages, bs, d), q8.dtype, transforms=d_major),
        plgpu.SMEM((pipes * stages, d, bs), FP8_DTYPE, transforms=smem_transforms(FP8_DTYPE, bs)),
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
      out_type=(jax.ShapeDtypeStruct((b, s_pad, h, d), OUT_DTYPE),
                jax.ShapeDtypeStruct((b, h, s_pad), jnp.float32)),
      grid=(h, n_tiles, b) if heads_major else (n_tiles, h, b),
      grid_names=("heads", "q_tile", "batch") if heads_major else ("q_tile", "heads", "batch"),
      num_threads=COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True,
                                           reduction_scratch_bytes=_REDUCTION_SCRATCH),
      interpret=interpret,
  )(q8, k8, vt8, q_scale, k_scale, v_scale, kv_block_indices, kv_steps, dense_rows, lengths)
  return out, lse
