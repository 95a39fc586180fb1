"""Pieces both Mosaic GPU kernels use: the CTA's shape, wgmma and layout helpers that also
run under the GPU interpreter, and the shared-memory accounting.

A CTA of either kernel holds ``COMPUTE_WGS`` compute warpgroups of ``ROWS_PER_WG``
query rows (the wgmma M of one warpgroup) and one memory warpgroup. Helpers taking
``emulate`` do under the GPU interpreter (``emulate=True``) what the interpreter can
run: it has no transposed or register wgmma operands, ``plgpu.load`` or layouts.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

ROWS_PER_WG = 64  # wgmma M of one warpgroup.
COMPUTE_WGS = 2
CTA_ROWS = ROWS_PER_WG * COMPUTE_WGS
SMEM_LIMIT = 232448  # bytes of shared memory one sm90 CTA may opt in to (227 KiB).
# Mosaic GPU rounds every scoped buffer and the reduction scratch up to 1 KiB and
# puts the 8-byte mbarriers after them; the footprints follow that layout.
SMEM_ALIGN = 1024
BARRIER_BYTES = 8
LOG2E = math.log2(math.e)  # scores are kept in log2 units so that exp2 is one FMA away
LN2 = math.log(2.0)


def qk_matmul(q_smem, k_smem, *, after_issue=None, emulate=False):
  """q_smem [M, D] @ k_smem[N, D]^T -> float32 [M, N] in the WGMMA layout (int32 for
  int8 tiles: exact, the caller converts).

  ``after_issue`` runs while the wgmma is in flight. ``emulate`` (the GPU
  interpreter, whose wgmma takes neither transposed operands nor register
  operands) reads both tiles and multiplies with ``jnp.dot`` instead.
  """
  integer = jnp.issubdtype(q_smem.dtype, jnp.integer)
  if emulate:
    qk = jnp.dot(q_smem[...], k_smem[...].T,
                 preferred_element_type=jnp.int32 if integer else jnp.float32)
    if after_issue is not None:
      after_issue()
    return qk

  def scope(acc_ref):
    plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem, (1, 0)))
    if after_issue is not None:
      after_issue()
    return acc_ref[...]

  return pl.run_scoped(scope, plgpu.ACC((q_smem.shape[0], k_smem.shape[0]),
                                        jnp.int32 if integer else jnp.float32))


def pv_matmul(acc, p, v_smem, *, after_issue=None, emulate=False):
  """acc + p @ v_smem with p [M, N] in registers, v_smem [N, D]; see ``qk_matmul``."""
  if emulate:
    out = acc + jnp.dot(p, v_smem[...], preferred_element_type=jnp.float32)
    if after_issue is not None:
      after_issue()
    return out

  def body(acc_ref):
    plgpu.wgmma(acc_ref, p, v_smem)
    if after_issue is not None:
      after_issue()

  return pl.run_state(body)(plgpu.ACC.init(acc))


def load_row_vector(ref, emulate=False):
  """A [64] float32 shared-memory vector in the layout of a WGMMA row reduction."""
  if emulate:  # The interpreter has no plgpu.load.
    return ref[...]
  return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(1))


def with_layout(x, layout, emulate=False):
  """``plgpu.layout_cast`` on the GPU; the interpreter has no layouts."""
  return x if emulate else plgpu.layout_cast(x, layout)


def column_ids(shape, emulate=False):
  """int32 column index of each element of a [M, N] WGMMA-layout tile."""
  if emulate:
    return lax.broadcasted_iota(jnp.int32, shape, 1)
  return plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)


def smem_footprint(buffer_bytes, num_barriers: int, reduction_scratch: int) -> int:
  """Dynamic shared memory of one CTA as Mosaic GPU allocates it, in bytes."""
  aligned = lambda n: -(-n // SMEM_ALIGN) * SMEM_ALIGN
  return (sum(aligned(n) for n in buffer_bytes) + aligned(reduction_scratch)
          + BARRIER_BYTES * num_barriers)


def check_flag(config, field: str):
  """Raises ``ValueError`` unless ``config.<field>`` is True or False."""
  val = getattr(config, field)
  if not isinstance(val, bool):
    raise ValueError(f"{type(config).__name__}.{field}={val!r}: expected True or False.")


def check_ring_depth(stages, name: str = "stages"):
  """Raises ``ValueError`` unless ``stages`` is None or an int >= 2 (a ring depth)."""
  if stages is not None and (not isinstance(stages, (int, np.integer))
                             or isinstance(stages, bool) or stages < 2):
    raise ValueError(f"{name}={stages!r}: expected an int >= 2 (ring depth) or None for "
                     "the kernel's default.")


def check_stages(stages, default: int, smem_of, what: str) -> int:
  """The ring depth to use: ``default`` for None, else ``stages``, if it fits.

  ``smem_of(stages)`` is the kernel's shared memory in bytes; a depth over
  ``SMEM_LIMIT`` is refused here rather than by the GPU compiler (the default
  too: it is 2 at least, which some tiles do not leave room for).
  """
  check_ring_depth(stages)
  if stages is None:
    need = smem_of(default)
    if need > SMEM_LIMIT:
      raise ValueError(f"{what}: the default {default} stages need {need} bytes of shared "
                       f"memory, over the {SMEM_LIMIT} (227 KiB) of an sm90 CTA.")
    return default
  need = smem_of(int(stages))
  if need > SMEM_LIMIT:
    fits = [n for n in range(2, int(stages)) if smem_of(n) <= SMEM_LIMIT]
    most = f"at most {fits[-1]} stages fit" if fits else "no depth >= 2 fits"
    raise ValueError(f"stages={stages}: {what} needs {need} bytes of shared memory, over "
                     f"the {SMEM_LIMIT} (227 KiB) of an sm90 CTA; {most}.")
  return int(stages)


def smem_transforms(dtype, minor_dim: int | None = None):
  """The tiling and swizzle of a shared-memory tile of ``dtype`` that wgmma and TMA read and
  write.

  The swizzle is 128 bytes, or, given the tile's minor dimension ``minor_dim`` (elements),
  its width in bytes when that is 32 or 64 (an 8-bit tile of 64 columns is 64 bytes wide: a
  128-byte swizzle would need 128 of them). 16-bit tiles of 64 or more columns, all the
  bf16 kernels have, get 128 either way.
  """
  swizzle = 128
  if minor_dim is not None:
    width = minor_dim * jnp.dtype(dtype).itemsize
    if width not in (32, 64) and width % 128:
      raise ValueError(f"minor_dim={minor_dim}: a {jnp.dtype(dtype).name} tile row of "
                       f"{width} bytes; expected 32, 64 or a multiple of 128.")
    swizzle = min(128, width)
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(swizzle))
