"""Putting a video DiT and its AdaSpa state on a sequence-parallel mesh.

``shard_model`` gives the model's config the mesh layout
(``adaspa_jax.parallel.SequenceParallel``), so every self/joint attention runs
head-parallel (Ulysses) and cross-attention row-parallel, and places the
parameters: replicated, or FSDP-style with each large parameter split over the
mesh axis (the compiler gathers it where a layer uses it). ``init_state``
builds the stacked AdaSpa state directly in its head-sharded layout. The
sampler needs nothing else: its jitted scan takes the placed parameters and
state as arguments and keeps their layout.

  sp = adaspa_jax.parallel.make_sequence_parallel(2)
  model = shard_model(model, sp, fsdp=False)
  state = init_state(lambda: model.init_adaspa_state(...), sp)
  sampler.sample(model, scheduler, latents, cond, adaspa_state=state, ...)
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

from adaspa_jax.parallel import SequenceParallel, state_sharding

# Parameters smaller than this stay replicated under FSDP: a bias or a norm
# scale costs more to gather than to keep.
FSDP_MIN_SIZE = 4096


def param_spec(shape, sequence_parallel: SequenceParallel, fsdp: bool) -> P:
  """Replicated, or (FSDP) split over the mesh axis on the largest dimension it
  divides (the last such on ties; in practice never the stacked-layer axis)."""
  n_elems = 1
  for d in shape:
    n_elems *= d
  if not fsdp or n_elems < FSDP_MIN_SIZE:
    return P()
  dims = [i for i, d in enumerate(shape) if d % sequence_parallel.size == 0]
  if not dims:
    return P()
  best = max(dims, key=lambda i: (shape[i], i))
  return P(*([None] * best), sequence_parallel.axis)


def shard_model(model: nnx.Module, sequence_parallel: SequenceParallel, *,
                fsdp: bool = False) -> nnx.Module:
  """Sets ``model.config.sequence_parallel`` and places the parameters (in place).

  Args:
    model: a Wan, HunyuanVideo or CogVideoX ``Model``.
    sequence_parallel: the mesh layout.
    fsdp: split large parameters over the mesh axis instead of replicating them.

  Returns:
    The same model object.
  """
  if not isinstance(sequence_parallel, SequenceParallel):
    raise ValueError(f"sequence_parallel={sequence_parallel!r}: expected an "
                     "adaspa_jax.parallel.SequenceParallel.")
  config = getattr(model, "config", None)
  if config is None or not any(f.name == "sequence_parallel"
                               for f in dataclasses.fields(config)):
    raise ValueError(f"model {type(model).__name__}: expected a model whose config has a "
                     "sequence_parallel field (Wan, HunyuanVideo, CogVideoX).")
  heads = config.num_attention_heads
  if heads % sequence_parallel.size:
    raise ValueError(f"num_attention_heads={heads}: expected a multiple of the mesh axis "
                     f"{sequence_parallel.axis!r} size {sequence_parallel.size}.")
  model.config = dataclasses.replace(config, sequence_parallel=sequence_parallel)
  state = nnx.state(model)
  placement = lambda x: sequence_parallel.sharding(param_spec(x.shape, sequence_parallel, fsdp))
  nnx.update(model, jax.device_put(state, jax.tree.map(placement, state)))
  return model


def init_state(make_state, sequence_parallel: SequenceParallel):
  """Runs ``make_state() -> AdaSpaState`` so its leaves come out sharded on heads.

  The state of a long video is large ([L, B, H, nQ, K_max] indices), so it is
  created in place on every device rather than whole on one and then split.
  """
  shapes = jax.eval_shape(make_state)
  return jax.jit(make_state, out_shardings=state_sharding(sequence_parallel, shapes))()
