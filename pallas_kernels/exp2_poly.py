"""exp2 on the FMA pipes: round, a polynomial, and a power of two from its bits.

The block-mass kernel's ``poly_keys`` option uses it (off by default; why it exists and
what it measured: docs/log/kernel_notes.md).

``exp2_poly(x)``: ``x`` is clamped to [-127, 127]; ``t = x + M`` with
``M = 1.5 * 2**23 + 127`` rounds to the nearest integer ``j`` (``t`` holds ``j + 127`` in
its low mantissa bits), ``f = x - (t - M)`` lies in [-1/2, 1/2], ``2**f`` is a degree-5
polynomial (a Chebyshev fit on [-1/2, 1/2], ``coefficients``), and ``2**j`` is the
float whose bits are ``(j + 127) << 23``, the low bits of ``t`` shifted into the exponent.
In float32 the relative error is at most 2.5e-7 (2.2e-7 seen over the normal range in
``tests/pallas_kernels/test_exp2_poly.py``), about that of the ``ex2.approx``
instruction. At ``j = -127`` that float is 0.0, so ``x <= -127`` (also ``-inf``) gives
exactly 0; ``x >= 127`` (also ``+inf``) gives about 2**127 instead of ``inf``; a NaN
goes through the clamp as the backend's min/max pass it (the GPU's make it finite). The
rounding add must not be cancelled against the subtraction after it (see ``keep_order``).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from jax import lax

DEGREE = 5
_ROUND = 1.5 * 2.0**23 + 127.0  # adding it rounds to an integer and biases the exponent
_LIMIT = 127.0


@functools.lru_cache(maxsize=None)
def coefficients(degree: int = DEGREE) -> tuple[float, ...]:
  """float32 coefficients c_0..c_degree of 2**f ~ sum c_i f**i on [-1/2, 1/2]: the
  polynomial through 2**f at ``degree + 1`` Chebyshev nodes of the interval."""
  if not isinstance(degree, int) or not 1 <= degree <= 8:
    raise ValueError(f"degree={degree!r}: expected an int in 1..8.")
  nodes = 0.5 * np.cos(np.pi * (np.arange(degree + 1) + 0.5) / (degree + 1))
  coef = np.polynomial.polynomial.polyfit(nodes, np.exp2(nodes), degree)
  return tuple(float(np.float32(c)) for c in coef)


def exp2_poly(x, degree: int = DEGREE, keep_order: bool = True):
  """2**x for float32 ``x`` of any shape, from float adds, multiplies, min/max, a
  bitcast and a shift only (see the module docstring for the range and error).

  ``keep_order`` puts an optimization barrier after the rounding add, which XLA would
  otherwise cancel against the subtraction that follows (it does on CPU). Mosaic GPU
  kernels pass False: their additions are not reassociated, and the barrier would
  constrain LLVM's scheduling.
  """
  if x.dtype != jnp.float32:
    raise ValueError(f"x has dtype {x.dtype}: expected float32.")
  c = coefficients(degree)
  x = jnp.minimum(jnp.maximum(x, -_LIMIT), _LIMIT)
  t = x + _ROUND
  if keep_order:
    t = lax.optimization_barrier(t)
  f = x - (t - _ROUND)
  p = f * c[-1] + c[-2]
  for coef in reversed(c[:-2]):
    p = p * f + coef
  scale = lax.bitcast_convert_type(lax.bitcast_convert_type(t, jnp.int32) << 23, jnp.float32)
  return p * scale
