"""The interpreter's compile cache (``pallas_kernels.mosaic.interpreter``): the same
results as JAX's own runner, bit for bit, one compile per warpgroup program, bounded."""

import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels.mosaic import interpreter

B, S, H, D, BS = 1, 200, 1, 64, 64   # 4 key blocks, the last one partial; 2 CTAs


def _inputs(seed):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.standard_normal((B, S, H, D)), jnp.bfloat16) for _ in range(3))
  n = -(-S // BS)
  idx = np.stack([rng.permutation(n)[:2] for _ in range(n)]).astype(np.int32)
  return q, k, v, jnp.asarray(idx[None, None]), jnp.full((B, H, n), 2, jnp.int32)


def _sparse(q, k, v, idx, cnt, lengths=None):
  out, lse = pk.block_sparse_attention(q, k, v, idx, cnt, block_size=BS, kv_lengths=lengths,
                                       implementation="mosaic", interpret=True)
  return np.asarray(out).view(np.uint16), np.asarray(lse)


@pytest.fixture
def runner():
  """The thread_map module with its runner restored after the test."""
  if not interpreter.replaceable(interpreter.ORIGINAL_RUNNER):
    pytest.skip("this JAX has no thread_map runner of the form the cache replaces")
  thread_map = interpreter._thread_map  # pylint: disable=protected-access
  before = thread_map._run_jaxpr  # pylint: disable=protected-access
  yield thread_map
  thread_map._run_jaxpr = before  # pylint: disable=protected-access


def test_cached_runner_matches_jax_runner_bitwise_and_compiles_once(runner):
  assert interpreter.install_compile_cache()
  q, k, v, idx, cnt = _inputs(0)
  lengths = jnp.asarray([170], jnp.int32)
  cached = _sparse(q, k, v, idx, cnt, lengths)
  before = interpreter.cache_info()
  q2, k2, v2, idx2, _ = _inputs(1)   # new values, same shapes: no new program
  cached2 = _sparse(q2, k2, v2, idx2, cnt, lengths)
  after = interpreter.cache_info()
  assert after.misses == before.misses
  assert after.hits >= before.hits + 2 * 3   # 2 CTAs of 3 warpgroups

  runner._run_jaxpr = interpreter.ORIGINAL_RUNNER  # pylint: disable=protected-access
  for got, args in ((cached, (q, k, v, idx, cnt)), (cached2, (q2, k2, v2, idx2, cnt))):
    want = _sparse(*args, lengths)
    for a, b in zip(got, want):
      np.testing.assert_array_equal(a, b)


def test_cache_keeps_at_most_cache_size_programs(runner, monkeypatch):
  del runner
  assert interpreter.install_compile_cache()
  monkeypatch.setattr(interpreter, "CACHE_SIZE", 1)
  q, k, v, idx, cnt = _inputs(2)
  _sparse(q, k, v, idx, cnt)
  pk.attention_with_block_mass(q, k, v, block_size=BS, implementation="mosaic",
                               interpret=True)[0].block_until_ready()
  assert interpreter.cache_info().currsize == 1


def test_a_runner_of_another_form_is_left_alone(runner):
  def other(jaxpr, consts, token, *args):   # not (jaxpr, consts, *args)
    raise AssertionError("not to be called")

  runner._run_jaxpr = other  # pylint: disable=protected-access
  assert not interpreter.install_compile_cache()
  assert runner._run_jaxpr is other  # pylint: disable=protected-access
