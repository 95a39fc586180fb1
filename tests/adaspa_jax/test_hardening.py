"""Bad steps get a ValueError when concrete and a checkify error when traced."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from adaspa_jax import AdaSpaConfig, adaspa_attention, init_state

CFG = AdaSpaConfig(block_size=16, num_steps=4, search_steps=(1, 2), implementation="reference")
Q = jnp.asarray(np.random.default_rng(0).standard_normal((1, 32, 1, 16)), jnp.float32)
STATE = init_state(CFG, 1, 32, 1)


@pytest.mark.parametrize("step,match", [(-1, "step=-1: expected 0 <= step < num_steps=4"),
                                        (4, "step=4: expected 0 <= step < num_steps=4"),
                                        (1.5, "step=1.5: expected an int"),
                                        (np.zeros(2, np.int32), "expected an int")])
def test_concrete_steps_out_of_range(step, match):
  with pytest.raises(ValueError, match=match):
    adaspa_attention(Q, Q, Q, STATE, step, CFG)


def test_concrete_jax_scalar_step_is_checked_too():
  adaspa_attention(Q, Q, Q, STATE, jnp.int32(3), CFG)
  with pytest.raises(ValueError, match="step=9"):
    adaspa_attention(Q, Q, Q, STATE, jnp.int32(9), CFG)


def test_traced_step_under_debug_checks():
  cfg = CFG.replace(debug_checks=True)
  f = jax.jit(lambda t: adaspa_attention(Q, Q, Q, STATE, t, cfg)[0])
  checked = checkify.checkify(f, errors=checkify.user_checks)
  err, _ = checked(jnp.int32(7))
  with pytest.raises(checkify.JaxRuntimeError, match="step=7: expected 0 <= step"):
    err.throw()
  err, out = checked(jnp.int32(2))
  err.throw()                                           # a valid step passes
  assert np.isfinite(np.asarray(out)).all()
  # Without debug_checks a traced step is not checked (and needs no checkify wrapper).
  jax.jit(lambda t: adaspa_attention(Q, Q, Q, STATE, t, CFG)[0])(jnp.int32(7))


def test_debug_checks_must_be_a_bool():
  with pytest.raises(ValueError, match="debug_checks=1: expected a bool"):
    CFG.replace(debug_checks=1)
