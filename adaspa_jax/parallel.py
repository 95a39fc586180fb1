"""Sequence/head-parallel (Ulysses) AdaSpa attention on a ``jax.sharding.Mesh``.

Layout: between attention calls a DiT's activations are sharded on the sequence
axis over one mesh axis of n devices (token-wise layers need no traffic). For
attention an all-to-all trades the sequence shards for head shards, so every
device holds the whole sequence for H/n heads; AdaSpa's work is per head, so the
kernels run unchanged on the local heads with the local slice of the state
([B, H, ...] sharded on H). A second all-to-all brings the output back to
sequence shards. Joint text+video attention keeps its text tokens (a prefix or a
suffix of the sequence, small) replicated: each device takes its heads of them,
and the text output is all-gathered over heads.

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

from adaspa_jax import blocks
from adaspa_jax.attention import adaspa_attention as _adaspa_attention
from adaspa_jax.config import AdaSpaConfig
from adaspa_jax.state import AdaSpaState
import pallas_kernels as pk

try:
  _AUTO = (jax.sharding.AxisType.Auto,)
except AttributeError:  # older jax: every mesh axis is automatic
  _AUTO = None


def _shard_map(f, mesh, in_specs, out_specs):
  """``jax.shard_map`` where present (jax >= 0.6), else the experimental one.

  Replication checks are off: Pallas calls and ``lax.switch`` over phases need
  not carry replication types, and the outputs' specs are exact by construction.
  """
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  from jax.experimental.shard_map import shard_map
  return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


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
  kw = {} if _AUTO is None else {"axis_types": _AUTO}
  return SequenceParallel(Mesh(np.asarray(available[:devices]), (axis,), **kw), axis)


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


def text_layout(text_span, seq_len):
  """(start, length) of the text tokens, a prefix or suffix; (0, 0) without text."""
  if text_span is None:
    return 0, 0
  start, length = (int(x) for x in text_span)
  if length == 0:
    return 0, 0
  if length < 0 or start < 0 or start + length > seq_len or (start and start + length != seq_len):
    raise ValueError(f"text_span={tuple(text_span)}: expected (start, length) of a prefix "
                     f"(start 0) or a suffix (start + length = seq_len={seq_len}).")
  return start, length


def _ulysses(attend, q, k, v, state, replicated, sp, text_span):
  """Runs ``attend(q, k, v, state, replicated) -> (out, state)`` on local heads.

  q, k, v: [B, S, H, D] global arrays; the video tokens enter sharded on S,
  text tokens replicated. state: pytree of [B, H, ...] leaves (or None).
  replicated: pytree of arrays every device sees whole (or None).
  """
  b, s, h, d = q.shape
  start, n_text = text_layout(text_span, s)
  check_divisible(sp, heads=h, tokens=s - n_text, seq_len=s)
  axis, h_local = sp.axis, h // sp.size
  text_first = n_text and start == 0
  video_of = lambda x: x[:, n_text:] if text_first else x[:, :s - n_text]
  text_of = lambda x: x[:, :n_text] if text_first else x[:, s - n_text:]
  join = lambda video, text: jnp.concatenate([text, video] if text_first else [video, text], 1)

  def local(qkv_video, qkv_text, state, replicated):
    to_heads = lambda x: jax.lax.all_to_all(x, axis, 2, 1, tiled=True)
    own = jax.lax.axis_index(axis) * h_local
    heads_of = lambda x: jax.lax.dynamic_slice_in_dim(x, own, h_local, axis=2)
    qkv = [to_heads(x) for x in qkv_video]
    if n_text:
      qkv = [join(x, heads_of(t)) for x, t in zip(qkv, qkv_text)]
    out, state = attend(*qkv, state, replicated)
    video = jax.lax.all_to_all(video_of(out), axis, 1, 2, tiled=True)
    text = jax.lax.all_gather(text_of(out), axis, axis=2, tiled=True) if n_text else None
    return video, text, state

  seq, heads, whole = P(None, axis), P(None, axis), P()
  state_specs = jax.tree.map(lambda _: heads, state)
  video, text, state = _shard_map(
      local, sp.mesh,
      in_specs=(seq, whole, state_specs, jax.tree.map(lambda _: whole, replicated)),
      out_specs=(seq, whole, state_specs))(
          tuple(video_of(x) for x in (q, k, v)),
          tuple(text_of(x) for x in (q, k, v)) if n_text else None, state, replicated)
  return (join(video, text) if n_text else video), state


def adaspa_attention(q, k, v, state: AdaSpaState, step, config: AdaSpaConfig, *,
                     sequence_parallel: SequenceParallel | None = None, text_span=None,
                     kv_lengths=None, sm_scale=None, implementation=None, interpret=False):
  """``adaspa_jax.adaspa_attention``, head-parallel over ``sequence_parallel``.

  Args:
    q, k, v: [B, S, H, D] (global arrays).
    state: the layer's ``AdaSpaState`` ([B, H, ...] leaves, sharded on H).
    step, config, kv_lengths, sm_scale, implementation, interpret: as in
      ``adaspa_attention``.
    sequence_parallel: the mesh layout, or None for the single-device call.
    text_span: static (start, length) of the text tokens, a prefix or a suffix,
      or None; the text blocks AdaSpa keeps dense follow from it.

  Returns:
    out [B, S, H, D] and the new state, equal to the single-device call's.
  """
  s = q.shape[1]
  start, n_text = text_layout(text_span, s)
  text = (blocks.text_blocks_mask(s, config.block_size, start, n_text) if n_text else None)
  kw = dict(text_blocks=text, sm_scale=sm_scale, implementation=implementation,
            interpret=interpret)
  if sequence_parallel is None:
    return _adaspa_attention(q, k, v, state, step, config, kv_lengths=kv_lengths, **kw)
  # A Python-int step stays static (one phase compiled); a traced one travels.
  static_step = step if isinstance(step, numbers.Integral) else None
  replicated = {"kv_lengths": kv_lengths}
  if static_step is None:
    replicated["step"] = jnp.asarray(step, jnp.int32)

  def attend(q, k, v, st, rep):
    return _adaspa_attention(q, k, v, st, rep.get("step", static_step), config,
                             kv_lengths=rep["kv_lengths"], head_axis=sequence_parallel.axis,
                             **kw)

  return _ulysses(attend, q, k, v, state, replicated, sequence_parallel, (start, n_text))


def dense_attention(q, k, v, *, sequence_parallel: SequenceParallel | None = None,
                    text_span=None, kv_lengths=None, sm_scale=None, implementation=None):
  """``pallas_kernels.dense_attention``, head-parallel over ``sequence_parallel``.

  q, k, v: [B, S, H, D]; text_span as in ``adaspa_attention``. Returns [B, S, H, D].
  """
  kw = dict(sm_scale=sm_scale, implementation=implementation)
  if sequence_parallel is None:
    return pk.dense_attention(q, k, v, kv_lengths=kv_lengths, **kw)

  def attend(q, k, v, st, rep):
    return pk.dense_attention(q, k, v, kv_lengths=rep["kv_lengths"], **kw), st

  return _ulysses(attend, q, k, v, None, {"kv_lengths": kv_lengths}, sequence_parallel,
                  text_span)[0]


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
