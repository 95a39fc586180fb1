"""The entry point, phase by phase, against numpy brute force."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaspa_jax import (AdaSpaConfig, adaspa_attention, init_state,
                        state_nbytes, text_blocks_mask)
from tests import numpy_ref, numpy_selection

CFG = AdaSpaConfig(sparsity=0.6, block_size=16, num_steps=8, search_steps=(2, 5))


def _inputs(seed, b=2, s=100, h=3, d=64, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal((b, s, h, d)), dtype) for _ in range(3)]


def _sets(state):
  idx, cnt = np.asarray(state.indices), np.asarray(state.counts)
  return {pos: tuple(idx[pos][:cnt[pos]]) if cnt[pos] < idx.shape[2] else "all"
          for pos in np.ndindex(cnt.shape)}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_phases_match_brute_force(dtype):
  q, k, v = _inputs(0, dtype=dtype)
  lengths = np.array([100, 83])
  text = text_blocks_mask(100, 16, 80, 20)
  kw = dict(text_blocks=text, kv_lengths=jnp.asarray(lengths, jnp.int32))
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  state = init_state(CFG, 2, 100, 3, text_blocks=text)
  dense_out, dense_lse = numpy_ref.attention(q, k, v, lengths)

  out, st = adaspa_attention(q, k, v, state, 0, CFG, **kw)               # dense
  np.testing.assert_allclose(np.asarray(out, np.float64), dense_out, atol=tol)
  assert st is state

  out, st = adaspa_attention(q, k, v, state, 2, CFG, **kw)               # fused search
  np.testing.assert_allclose(np.asarray(out, np.float64), dense_out, atol=tol)
  np.testing.assert_allclose(np.asarray(st.lse)[np.isfinite(dense_lse)],
                             dense_lse[np.isfinite(dense_lse)], atol=tol)
  mass = numpy_ref.block_mass(q, k, dense_lse, 16, lengths)
  _, counts, recall, _ = numpy_selection.select(mass, CFG.sparsity, text)
  np.testing.assert_array_equal(np.asarray(st.counts), counts)
  np.testing.assert_allclose(np.asarray(st.recall), recall, rtol=1e-3)

  out, st_sparse = adaspa_attention(q, k, v, st, 3, CFG, **kw)            # sparse
  want, _ = numpy_ref.block_sparse_attention(q, k, v, st.indices, st.counts, 16, lengths)
  np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=tol)
  assert st_sparse is st

  q2, k2, v2 = _inputs(1, dtype=dtype)                                    # cached search
  out, st2 = adaspa_attention(q2, k2, v2, st, 5, CFG, **kw)
  np.testing.assert_array_equal(np.asarray(st2.lse), np.asarray(st.lse))  # LSE kept
  mass2 = numpy_ref.block_mass(q2, k2, np.asarray(st.lse), 16, lengths)
  sets, counts2, _, _ = numpy_selection.select(mass2, CFG.sparsity, text)
  np.testing.assert_array_equal(np.asarray(st2.counts), counts2)
  want2, _ = numpy_ref.block_sparse_attention(q2, k2, v2, st2.indices, st2.counts, 16, lengths)
  np.testing.assert_allclose(np.asarray(out, np.float64), want2, atol=tol)
  assert not np.isnan(np.asarray(out, np.float32)).any()


def test_without_lse_cache_later_search_is_dense_and_keeps_lse():
  cfg = CFG.replace(lse_cache=False)
  q, k, v = _inputs(2)
  state = init_state(cfg, 2, 100, 3)
  _, st = adaspa_attention(q, k, v, state, 2, cfg)
  q2, k2, v2 = _inputs(3)
  out, st2 = adaspa_attention(q2, k2, v2, st, 5, cfg)
  np.testing.assert_allclose(np.asarray(out), numpy_ref.attention(q2, k2, v2)[0], atol=1e-5)
  np.testing.assert_array_equal(np.asarray(st2.lse), np.asarray(st.lse))
  assert _sets(st2) != _sets(st)  # the selection was refreshed from the new inputs


def test_sparsity_zero_equals_dense_at_every_step():
  cfg = CFG.replace(sparsity=0.0)
  q, k, v = _inputs(4, s=80)
  want, _ = numpy_ref.attention(q, k, v)
  state = init_state(cfg, 2, 80, 3)
  for step in range(cfg.num_steps):
    out, state = adaspa_attention(q, k, v, state, step, cfg)
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-5)


def test_traced_step_equals_concrete_step():
  q, k, v = _inputs(5)
  text = text_blocks_mask(100, 16, 0, 20)
  fn = jax.jit(lambda q, k, v, st, t: adaspa_attention(q, k, v, st, t, CFG, text_blocks=text))
  st_c = st_t = init_state(CFG, 2, 100, 3, text_blocks=text)
  for step in range(CFG.num_steps):
    out_c, st_c = adaspa_attention(q, k, v, st_c, step, CFG, text_blocks=text)
    out_t, st_t = fn(q, k, v, st_t, jnp.int32(step))
    np.testing.assert_allclose(np.asarray(out_t), np.asarray(out_c), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(st_t.indices), np.asarray(st_c.indices))


def test_bad_state_and_text_raise():
  q, k, v = _inputs(6)
  with pytest.raises(ValueError, match="state.indices"):
    adaspa_attention(q, k, v, init_state(CFG, 2, 64, 3), 0, CFG)
  with pytest.raises(ValueError, match="state.lse"):
    adaspa_attention(q, k, v, init_state(CFG, 2, 97, 3), 0, CFG)
  with pytest.raises(ValueError, match="config="):
    adaspa_attention(q, k, v, init_state(CFG, 2, 100, 3), 0, {"sparsity": 0.8})
  with pytest.raises(ValueError, match="text_blocks"):
    adaspa_attention(q, k, v, init_state(CFG, 2, 100, 3), 0, CFG, text_blocks=np.ones(3, bool))
  with pytest.raises(ValueError, match="batch=0"):
    init_state(CFG, 0, 100, 3)


def test_state_size_at_hunyuan_scale():
  cfg = AdaSpaConfig()
  seq = 118_784  # 33 x 45 x 80 video tokens (720p, 129 frames) + 256 text tokens
  text = text_blocks_mask(seq, 64, seq - 256, 256)
  per_layer = state_nbytes(cfg, 1, seq, 24, text_blocks=text)
  n_blk = -(-seq // 64)
  k_max = round(0.3 * (n_blk - 4)) + 4
  want = 24 * n_blk * (k_max + 1) * 4 + 24 * seq * 4 + 2 * 24 * 4
  assert per_layer == want
  assert state_nbytes(cfg, 1, seq, 24, text_blocks=text, num_layers=60) == 60 * per_layer
  assert 60 * per_layer < 8 * 2**30  # fits beside a 13B bf16 model (26 GB) on one GPU


def test_python_int_step_works_inside_a_trace():
  q, k, v = _inputs(7)

  def body(st, _):
    out, st = adaspa_attention(q, k, v, st, 3, CFG)  # a Python int step inside scan
    return st, out

  st = init_state(CFG, 2, 100, 3)
  _, outs = jax.lax.scan(body, st, None, length=2)
  want, _ = numpy_ref.block_sparse_attention(q, k, v, st.indices, st.counts, 16)
  np.testing.assert_allclose(np.asarray(outs[0]), want, atol=1e-5)
