"""Wall-clock timing of a call on its device: warm up, synchronise, repeat, take the median.

``time_fn(fn, *args, reps=...)`` is the one timing helper of the benchmarks
(``harness/kernel_bench.py``, ``harness/e2e.py``) and the kernel-development tools
(``tools/``):

1. one warm-up call, timed on its own (``first_s``: compile included) and blocked on
   with ``jax.block_until_ready``; its output is returned (``Timing.output``);
2. with ``min_rep_s > 0``, one more call, timed, sets how many calls a rep makes
   (``calls_per_rep``: enough for a rep to last ``min_rep_s``, 1 to 100), so that host
   dispatch overlaps device work for short kernels;
3. ``reps`` reps: each launches ``calls_per_rep`` calls back to back and blocks once on
   the last output; its time is the host wall clock (``time.perf_counter``) divided by
   ``calls_per_rep``;
4. ``median_s`` is the median of the reps.
"""

from __future__ import annotations

import dataclasses
import statistics
from time import perf_counter
from typing import Any

import jax
import numpy as np

MAX_CALLS_PER_REP = 100


@dataclasses.dataclass(frozen=True)
class Timing:
  """What ``time_fn`` measured (seconds)."""
  median_s: float  # median of reps_s
  reps_s: list  # seconds per call, one entry per rep
  first_s: float  # the warm-up call, compile included
  calls_per_rep: int  # back-to-back calls per rep, blocked on once
  output: Any = dataclasses.field(default=None, repr=False, compare=False)  # warm-up output

  def as_dict(self) -> dict:
    """The three times as JSON-ready fields: ``median_s``, ``reps_s``, ``first_s``."""
    return {"median_s": self.median_s, "reps_s": list(self.reps_s), "first_s": self.first_s}


def time_fn(fn, *args, reps: int, min_rep_s: float = 0.0) -> Timing:
  """Times ``fn(*args)``; see the module docstring.

  Args:
    fn: a callable whose outputs are JAX arrays (or pytrees of them), e.g. a jitted
      function.
    reps: timed reps, an int >= 1.
    min_rep_s: 0 for one call per rep; > 0 to launch as many calls per rep (up to
      ``MAX_CALLS_PER_REP``) as it takes a rep to last about this long.
  """
  if not isinstance(reps, (int, np.integer)) or isinstance(reps, bool) or reps < 1:
    raise ValueError(f"reps={reps!r}: expected an int >= 1.")
  if not isinstance(min_rep_s, (int, float)) or isinstance(min_rep_s, bool) or min_rep_s < 0:
    raise ValueError(f"min_rep_s={min_rep_s!r}: expected a number >= 0 (seconds).")
  start = perf_counter()
  output = jax.block_until_ready(fn(*args))
  first = perf_counter() - start
  calls = 1
  if min_rep_s > 0:
    start = perf_counter()
    jax.block_until_ready(fn(*args))
    once = perf_counter() - start
    calls = max(1, min(MAX_CALLS_PER_REP, int(min_rep_s / max(once, 1e-6))))
  times = []
  for _ in range(int(reps)):
    start = perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((perf_counter() - start) / calls)
  return Timing(statistics.median(times), times, first, calls, output)
