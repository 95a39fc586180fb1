"""Running the Mosaic GPU kernels under JAX's GPU interpreter (CPU, ``interpret=True``).

The interpreter simulates a Hopper CTA's warpgroups, shared memory, TMA copies and
mbarriers on the host. Kernel code that asks the abstract mesh for the device
(e.g. the number of SMs) sees an H100, so callers need no setup of their own.

JAX exports no public API for this interpreter yet: its entry points are imported from
``jax._src`` here (the only other private import, cuDNN's FP8 attention, is
``pallas_kernels.cudnn_fp8``'s, guarded).

On a machine with few CPU cores, run interpreted kernels with CPU async dispatch off
(``JAX_CPU_ENABLE_ASYNC_DISPATCH=false``, or ``jax.config.update(
"jax_cpu_enable_async_dispatch", False)`` before the first computation): the
interpreter runs each warpgroup as its own computation on its own thread, they wait on
each other's barriers, and queued on XLA's small CPU pool they can deadlock. The test
suite sets it in ``tests/conftest.py``.
"""

from __future__ import annotations

import contextlib

import jax
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

DEVICE_KIND = "NVIDIA H100 80GB HBM3"
NUM_SMS = 132


def params(interpret: bool, detect_races: bool = False):
  """The ``interpret=`` value for ``plgpu.kernel``: None compiles for the GPU."""
  if not interpret:
    return None
  return InterpretGPUParams(detect_races=detect_races)


@contextlib.contextmanager
def device_context(interpret: bool):
  """Abstract H100 mesh around an interpreted kernel; no-op when compiling for a GPU.

  An exception inside an interpreted kernel leaves the interpreter's global
  state half-updated; it is reset so that the next call starts clean.
  """
  if not interpret:
    yield
    return
  device = jax.sharding.AbstractDevice(device_kind=DEVICE_KIND, num_cores=NUM_SMS,
                                       platform="gpu")
  mesh = jax.sharding.AbstractMesh((), (), abstract_device=device)
  try:
    with jax.sharding.use_abstract_mesh(mesh):
      yield
  except Exception:
    interpret_pallas_call.reset_gpu_interpret_mode_state()
    raise


def races_found() -> bool:
  """Whether the interpreter (with ``detect_races``) saw a data race so far."""
  return bool(interpret_pallas_call.get_races().races_found)
