"""``exp2_poly`` against numpy's exp2 in float64: error bound, saturation at both ends,
exact zeros for -inf (the LSE of rows that must add nothing), and argument checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.exp2_poly import DEGREE, coefficients, exp2_poly


def _poly(x, **kw):
  return np.asarray(jax.jit(lambda v: exp2_poly(v, **kw))(jnp.asarray(x, jnp.float32)),
                    np.float64)


@pytest.mark.parametrize("degree,bound", [(3, 1.1e-4), (4, 4e-6), (DEGREE, 2.5e-7)])
def test_relative_error_over_the_normal_range(degree, bound):
  rng = np.random.default_rng(degree)
  x = np.concatenate([rng.uniform(-125, 126, 200_000), rng.uniform(-1, 1, 50_000),
                      np.arange(-125, 127) + 0.5, np.arange(-125, 127)]).astype(np.float32)
  got = _poly(x, degree=degree)
  rel = np.abs(got / np.exp2(x.astype(np.float64)) - 1)
  assert rel.max() < bound
  assert rel.max() > bound / 20  # the bound is about what this degree gives, not loose


def test_integers_and_ends():
  x = np.array([0, 1, -1, 10, -10, 126, -126, 127, 200, np.inf, -127, -500, -np.inf],
               np.float32)
  got = _poly(x)
  np.testing.assert_allclose(got[:7], np.exp2(x[:7].astype(np.float64)), rtol=3e-7)
  big = got[7:10]
  assert np.isfinite(big).all() and np.allclose(big, 2.0**127, rtol=3e-7)
  assert (got[10:] == 0).all()


def test_order_of_the_rounding_is_kept_under_jit():
  """XLA on CPU folds (x + M) - M into x unless told not to; every result would then
  be a power of two (2**0.5 as 1 or 2)."""
  x = np.linspace(-3, 3, 61, dtype=np.float32)
  np.testing.assert_allclose(_poly(x), np.exp2(x.astype(np.float64)), rtol=3e-7)


def test_coefficients_are_a_fit_of_exp2():
  c = np.asarray(coefficients(), np.float64)
  assert len(c) == DEGREE + 1
  f = np.linspace(-0.5, 0.5, 101)
  np.testing.assert_allclose(np.polynomial.polynomial.polyval(f, c), np.exp2(f), rtol=3e-7)


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="x has dtype bfloat16: expected float32"):
    exp2_poly(jnp.zeros((2,), jnp.bfloat16))
  with pytest.raises(ValueError, match="degree=0: expected an int in 1..8"):
    exp2_poly(jnp.zeros((2,), jnp.float32), degree=0)
