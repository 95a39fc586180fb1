"""Sequence/head-parallel (Ulysses) AdaSpa attention on a ``jax.sharding.Mesh``.

Layout: between attention calls a DiT's activations are sharded on the sequence
axis over one mesh axis of n devices (token-wise layers need no traffic). For
attention an all-to-all trades the sequence shards for head shards, so every
device holds the whole sequence for H/n heads; AdaSpa's work is per head, so the
kernels run unchanged on the local heads with the local slice of the state
([B, H, ...] sharded on H). A second all-to-all brings the output back to
sequence shards. Joint text+video attention keeps its text tokens (a prefix or a
suffix of the sequence, small) replicated, and so does the padding a model added
after the sequence (``BlockLayout.padded_len``): each device takes its heads of
them, and their output is all-gathered over heads.

The only cross-head step of AdaSpa, the head-tier ranking, gathers the [B, H]
recalls over the axis (``selection.head_budgets``), so a sharded run selects the
same blocks as a single-device run.

Requirements: heads divisible by n and the sharded tokens (video tokens; the
whole sequence without text) divisible by n, else ``ValueError``.

Two-GPU benchmark still to run (device kind nvidia-h200-x2, issue 9; HunyuanVideo
720p 129 frames = latent 33 x 90 x 160: 118800 video + 256 text tokens, 24 heads,
60 blocks; random bf16 weights, which time like real ones)::

  G="python -m adaspa_jax.experiments.generate --model=hunyuan_video --preset=hunyuan-video-13b \\
     --attention=both --steps=10 --noprogress"
  CUDA_VISIBLE_DEVICES=0 $G --output_dir=outputs/mesh1          # one GPU
  $G --mesh=seq:2 --output_dir=outputs/mesh2                     # both GPUs

Each report.json holds ``runs.{dense,adaspa}.wall_s`` (compile excluded, in
``compile_s``); scaling efficiency = wall_s(1 GPU) / (2 * wall_s(2 GPUs)) per
mode, to record in docs/benchmarks.md. --steps=10 keeps the paper's phase mix
(searches at 20% and 60% of the steps) and, by a FLOP count (~1e16 attention
FLOPs per dense step), one GPU's run within the 10-minute command limit; that
count is an estimate, not a measurement. Add ``--fsdp`` if memory runs short.
Not yet run on GPUs: inside ``shard_map`` the Triton kernels were checked on
CPU in interpret mode only (tests/adaspa_jax/test_parallel.py).
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from adaspa_jax.attention import adaspa_attention as single_device_attention
from adaspa_jax.config import AdaSpaConfig
from adaspa_jax.layout import BlockLayout, check_text_span
from adaspa_jax.state import AdaSpaState
import pallas_kernels as pk


def _shard_map(f, mesh, in_specs, out_specs):
  """``jax.shard_map`` with replication checks off: Pallas calls and ``lax.switch``
  over phases need not carry replication types, and the outputs' specs are exact
  by construction."""
  return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


@dataclasses.dataclass(frozen=True)
class SequenceParallel:
  """Where the sequence (and, inside attention, the heads) are split.

  Attributes:
    mesh: the device mesh (hashable: it is static in a model config).
    axis: the mesh axis the sequence is sharded over.
  """
  mesh: Mesh
  axis: str = "seq"

  def __post_init__(self):
    if not isinstance(self.mesh, Mesh):
      raise ValueError(f"mesh={self.mesh!r}: expected a jax.sharding.Mesh.")
    if self.axis not in self.mesh.axis_names:
      raise ValueError(f"axis={self.axis!r}: expected one of the mesh's axes "
                       f"{self.mesh.axis_names}.")

  @property
  def size(self) -> int:
    return self.mesh.shape[self.axis]

  def sharding(self, spec: P) -> NamedSharding:
    return NamedSharding(self.mesh, spec)


def make_sequence_parallel(devices: int, axis: str = "seq") -> SequenceParallel:
  """A one-axis mesh over the first ``devices`` devices."""
  available = jax.devices()
  if (not isinstance(devices, numbers.Integral) or isinstance(devices, bool)
      or not 1 <= devices <= len(available)):
    raise ValueError(f"devices={devices!r}: expected an int in [1, {len(available)}] "
                     f"(devices available: {len(available)}).")
  return SequenceParallel(Mesh(np.asarray(available[:devices]), (axis,),
                               axis_types=(jax.sharding.AxisType.Auto,)), axis)


def parse_mesh(value: str | None) -> SequenceParallel | None:
  """The ``--mesh`` flag: "" or None (one device, no mesh), "N" or "seq:N"."""
  if value is None or value.strip() in ("", "none"):
    return None
  name, _, count = value.strip().rpartition(":")
  if name not in ("", "seq") or not count.isdigit():
    raise ValueError(f"--mesh={value!r}: expected a device count N or 'seq:N' "
                     "(sequence/head parallel over N devices).")
  return make_sequence_parallel(int(count), "seq")


def check_divisible(sp: SequenceParallel, *, heads: int, tokens: int, seq_len: int) -> None:
  """``ValueError`` unless heads and the sharded tokens split evenly over the axis."""
  n = sp.size
  if heads % n:
    raise ValueError(f"heads={heads}: expected a multiple of the mesh axis {sp.axis!r} "
                     f"size {n} (Ulysses gives every device heads / {n} heads).")
  if tokens % n:
    what = "seq_len" if tokens == seq_len else f"video tokens (seq_len={seq_len} minus text)"
    raise ValueError(f"{what}={tokens}: expected a multiple of the mesh axis {sp.axis!r} "
                     f"size {n} (the sequence is sharded evenly).")


# (start, length) of the text tokens, a prefix or suffix; (0, 0) without text.
text_layout = check_text_span


def call_layout(layout: BlockLayout | None, text_span, seq_len: int, block_size: int,
                query_block_size: int | None = None):
  """``layout`` (checked against q's length) or, when None, the unpadded layout of
  ``seq_len`` tokens with ``text_span`` (query blocks of ``query_block_size`` rows,
  None: ``block_size``)."""
  if layout is None:
    return BlockLayout.create(seq_len, block_size, text_span=text_span,
                              query_block_size=query_block_size)
  if not isinstance(layout, BlockLayout):
    raise ValueError(f"layout={layout!r}: expected an adaspa_jax.layout.BlockLayout.")
  if text_span is not None and check_text_span(text_span, layout.seq_len) != layout.text_tokens:
    raise ValueError(f"text_span={tuple(text_span)}: expected None or the layout's "
                     f"{layout.text_tokens}.")
  if seq_len != layout.padded_len:
    raise ValueError(f"q has {seq_len} tokens: expected layout.padded_len={layout.padded_len}.")
  return layout


def _ulysses(attend, q, k, v, state, replicated, sp, layout: BlockLayout):
  """Runs ``attend(q, k, v, state, replicated) -> (out, state)`` on local heads.

  q, k, v: [B, S_pad, H, D] global arrays; the video tokens enter sharded on S, the
  text (a prefix or a suffix) and the padding after the sequence replicated.
  state: pytree of [B, H, ...] leaves (or None). replicated: pytree of arrays every
  device sees whole (or None).
  """
  h = q.shape[2]
  lo, hi = layout.video_tokens
  check_divisible(sp, heads=h, tokens=hi - lo, seq_len=layout.seq_len)
  axis, h_local = sp.axis, h // sp.size
  has_head, has_tail = lo > 0, hi < layout.padded_len
  head_of = lambda x: x[:, :lo]
  video_of = lambda x: x[:, lo:hi]
  tail_of = lambda x: x[:, hi:]
  join = lambda head, video, tail: jnp.concatenate(
      [p for p, on in ((head, has_head), (video, True), (tail, has_tail)) if on], axis=1)

  def local(qkv_video, qkv_head, qkv_tail, state, replicated):
    to_heads = lambda x: jax.lax.all_to_all(x, axis, 2, 1, tiled=True)
    own = jax.lax.axis_index(axis) * h_local
    heads_of = lambda x: None if x is None else jax.lax.dynamic_slice_in_dim(
        x, own, h_local, axis=2)
    qkv = [join(heads_of(hd), to_heads(x), heads_of(tl))
           for x, hd, tl in zip(qkv_video, qkv_head or (None,) * 3, qkv_tail or (None,) * 3)]
    out, state = attend(*qkv, state, replicated)
    gather = lambda x: jax.lax.all_gather(x, axis, axis=2, tiled=True)
    video = jax.lax.all_to_all(video_of(out), axis, 1, 2, tiled=True)
    head = gather(head_of(out)) if has_head else None
    tail = gather(tail_of(out)) if has_tail else None
    return video, head, tail, state

  seq, heads, whole = P(None, axis), P(None, axis), P()
  state_specs = jax.tree.map(lambda _: heads, state)
  part = lambda on, of: tuple(of(x) for x in (q, k, v)) if on else None
  video, head, tail, state = _shard_map(
      local, sp.mesh,
      in_specs=(seq, whole, whole, state_specs, jax.tree.map(lambda _: whole, replicated)),
      out_specs=(seq, whole, whole, state_specs))(
          part(True, video_of), part(has_head, head_of), part(has_tail, tail_of), state,
          replicated)
  return join(head, video, tail), state


def adaspa_attention(q, k, v, state: AdaSpaState, step, config: AdaSpaConfig, *,
                     sequence_parallel: SequenceParallel | None = None, text_span=None,
                     kv_lengths=None, layout: BlockLayout | None = None, sm_scale=None,
                     implementation=None, interpret=False):
  """``adaspa_jax.adaspa_attention``, head-parallel over ``sequence_parallel``.

  Args:
    q, k, v: [B, S, H, D] (global arrays; [B, layout.padded_len, H, D] with a layout).
    state: the layer's ``AdaSpaState`` ([B, H, ...] leaves, sharded on H).
    step, config, kv_lengths, sm_scale, implementation, interpret: as in
      ``adaspa_attention``.
    sequence_parallel: the mesh layout, or None for the single-device call.
    text_span: static (start, length) of the text tokens, a prefix or a suffix,
      or None; the text blocks AdaSpa keeps dense follow from it.
    layout: the call's ``BlockLayout`` instead of ``text_span`` (built once per
      model call, possibly padded).

  Returns:
    out [B, S, H, D] and the new state, equal to the single-device call's.
  """
  layout = call_layout(layout, text_span, q.shape[1], config.block_size,
                       config.query_block_size)
  kw = dict(layout=layout, sm_scale=sm_scale, implementation=implementation,
            interpret=interpret)
  if sequence_parallel is None:
    return single_device_attention(q, k, v, state, step, config, kv_lengths=kv_lengths, **kw)
  # A Python-int step stays static (one phase compiled); a traced one travels.
  static_step = step if isinstance(step, numbers.Integral) else None
  replicated = {"kv_lengths": kv_lengths}
  if static_step is None:
    replicated["step"] = jnp.asarray(step, jnp.int32)

  def attend(q, k, v, st, rep):
    return single_device_attention(q, k, v, st, rep.get("step", static_step), config,
                                   kv_lengths=rep["kv_lengths"],
                                   head_axis=sequence_parallel.axis, **kw)

  return _ulysses(attend, q, k, v, state, replicated, sequence_parallel, layout)


def dense_attention(q, k, v, *, sequence_parallel: SequenceParallel | None = None,
                    text_span=None, kv_lengths=None, layout: BlockLayout | None = None,
                    sm_scale=None, implementation=None):
  """``pallas_kernels.dense_attention``, head-parallel over ``sequence_parallel``.

  q, k, v: [B, S, H, D]; text_span and layout as in ``adaspa_attention`` (a padded
  layout masks the padding: kv_lengths None means ``layout.seq_len``).
  Returns [B, S, H, D].
  """
  kw = dict(sm_scale=sm_scale, implementation=implementation)
  if layout is not None:
    kv_lengths = layout.kv_lengths(kv_lengths, q.shape[0])
  if sequence_parallel is None:
    return pk.dense_attention(q, k, v, kv_lengths=kv_lengths, **kw)
  # Any block size: only the token spans matter here.
  layout = call_layout(layout, text_span, q.shape[1], 16)

  def attend(q, k, v, st, rep):
    return pk.dense_attention(q, k, v, kv_lengths=rep["kv_lengths"], **kw), st

  return _ulysses(attend, q, k, v, None, {"kv_lengths": kv_lengths}, sequence_parallel,
                  layout)[0]


def row_parallel(fn, sequence_parallel: SequenceParallel | None, x, *replicated):
  """``fn(x, *replicated)`` with x [B, S, ...] sharded on S and the rest whole.

  For per-query work such as cross-attention to text: every device computes its
  own rows, with no traffic and no partitioning rule needed for ``fn``'s kernels
  (cuDNN attention refuses a sharded sequence). S must divide over the axis.
  Returns [B, S, ...] sharded on S.
  """
  if sequence_parallel is None:
    return fn(x, *replicated)
  n = sequence_parallel.size
  if x.shape[1] % n:
    raise ValueError(f"seq_len={x.shape[1]}: expected a multiple of the mesh axis "
                     f"{sequence_parallel.axis!r} size {n}.")
  seq = P(None, sequence_parallel.axis)
  return _shard_map(fn, sequence_parallel.mesh,
                    in_specs=(seq,) + (P(),) * len(replicated), out_specs=seq)(x, *replicated)


def state_sharding(sequence_parallel: SequenceParallel, state: AdaSpaState) -> AdaSpaState:
  """NamedShardings putting the heads axis of every state leaf on the mesh axis.

  Works for one layer ([B, H, ...]) or a stack ([L, B, H, ...]).
  """
  if not isinstance(state, AdaSpaState) or state.recall.ndim not in (2, 3):
    raise ValueError(f"state={type(state).__name__}: expected an AdaSpaState with recall "
                     "[B, H] or [L, B, H].")
  heads = state.recall.shape[-1]
  if heads % sequence_parallel.size:
    raise ValueError(f"heads={heads}: expected a multiple of the mesh axis "
                     f"{sequence_parallel.axis!r} size {sequence_parallel.size}.")
  spec = P(*([None] * (state.recall.ndim - 1)), sequence_parallel.axis)
  return jax.tree.map(lambda _: sequence_parallel.sharding(spec), state)
