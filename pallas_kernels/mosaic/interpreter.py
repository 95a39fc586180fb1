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

Compiling each warpgroup once: the interpreter runs every CTA by handing the
warpgroups' jaxpr to ``thread_map``, whose runner (``thread_map._run_jaxpr`` in jax
0.10.2) traces, lowers and compiles it under a fresh ``jax.jit`` on every thread of
every CTA, so nothing is cached: a 4-CTA kernel of 3 warpgroups compiles 12 times a
call (about 2 s per CTA on a 2-core machine, nearly all of an interpreted call's time).
``params`` swaps in ``_run_jaxpr_cached``, which keeps the compiled program per (jaxpr,
argument shapes and dtypes) in a small LRU table and only runs it thereafter. The
program is the same one JAX would compile (the thread id and the CTA's values are its
arguments), so results are unchanged; only the interpreter's speed differs. Where the
private runner is not there in the expected form, nothing is swapped.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import threading

import jax
from jax._src import core as jax_core
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

try:  # The runner the cache replaces (private; see the module docstring).
  from jax._src.pallas.mosaic.interpret import thread_map as _thread_map
except ImportError:  # pragma: no cover - another JAX layout: keep JAX's own runner
  _thread_map = None
# JAX's own runner, as imported (the tests run it to compare against the cache).
ORIGINAL_RUNNER = getattr(_thread_map, "_run_jaxpr", None)

DEVICE_KIND = "NVIDIA H100 80GB HBM3"
NUM_SMS = 132


CACHE_SIZE = 64  # compiled warpgroup programs kept (least recently used dropped first)
_compiled = collections.OrderedDict()
_compiled_lock = threading.Lock()
_counts = {"hits": 0, "misses": 0}
CacheInfo = collections.namedtuple("CacheInfo", "hits misses currsize")


def _signature(tree):
  return tuple((tuple(getattr(x, "shape", ())), str(getattr(x, "dtype", type(x).__name__)))
               for x in jax.tree.leaves(tree))


def _run_jaxpr_cached(jaxpr, consts, *args):
  """``thread_map._run_jaxpr`` with the compiled program kept: run the warpgroup
  ``jaxpr`` (its first argument the thread id) on ``consts`` and ``args``.

  The lock is held while compiling only, so warpgroups of one CTA that wait on each
  other's barriers still run at the same time."""
  key = (jaxpr, _signature(consts), _signature(args))
  with _compiled_lock:
    program = _compiled.get(key)
    if program is None:
      def run(consts, *args):
        jax_core.eval_jaxpr(jaxpr, consts, *args)

      program = jax.jit(run).trace(consts, *args).lower().compile()
      _compiled[key] = program
      _counts["misses"] += 1
      while len(_compiled) > CACHE_SIZE:
        _compiled.popitem(last=False)
    else:
      _compiled.move_to_end(key)
      _counts["hits"] += 1
  program(consts, *args)


def replaceable(runner) -> bool:
  """Whether ``runner`` has the form the cache stands in for: ``(jaxpr, consts, *args)``."""
  if runner is None:
    return False
  if runner is _run_jaxpr_cached:
    return True
  params_ = list(inspect.signature(runner).parameters.values())
  return ([p.name for p in params_[:2]] == ["jaxpr", "consts"] and len(params_) == 3
          and params_[2].kind is inspect.Parameter.VAR_POSITIONAL)


def install_compile_cache() -> bool:
  """Swap ``_run_jaxpr_cached`` in for the interpreter's runner (idempotent); whether it
  is in place."""
  if not replaceable(getattr(_thread_map, "_run_jaxpr", None)):
    return False
  _thread_map._run_jaxpr = _run_jaxpr_cached
  return True


def cache_info() -> CacheInfo:
  """Runs that found their program compiled (hits), compiles (misses), programs held."""
  with _compiled_lock:
    return CacheInfo(_counts["hits"], _counts["misses"], len(_compiled))


def params(interpret: bool, detect_races: bool = False):
  """The ``interpret=`` value for ``plgpu.kernel``: None compiles for the GPU. Interpreting
  installs the compile cache (module docstring)."""
  if not interpret:
    return None
  install_compile_cache()
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
