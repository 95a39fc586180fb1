"""No input reaches a kernel unchecked: concrete bad values raise, traced ones are kept in
bounds (and caught by ``debug_checks`` under checkify), and reruns are bitwise equal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import pallas_kernels as pk
from pallas_kernels import validation

B, S, H, D, BS = 1, 150, 2, 64, 64          # 3 blocks of 64, the last one partial
N = 3
IMPLS = {"reference": False, "triton": True, "mosaic": True}


def _qkv(dtype=jnp.bfloat16, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal((B, S, H, D)), dtype) for _ in range(3)]


def _lists():
  idx = np.tile(np.asarray([[0, 1], [1, 2], [2, 0]], np.int32), (B, H, 1, 1))   # [B,H,3,2]
  cnt = np.full((B, H, N), 2, np.int32)
  return idx, cnt


def _kw(impl):
  return dict(block_size=BS, implementation=impl, interpret=IMPLS[impl])


def _planted(kind):
  idx, cnt = _lists()
  if kind == "index too large":
    idx[0, 1, 2, 0] = N
  elif kind == "negative index":
    idx[0, 0, 1, 1] = -4
  elif kind == "negative count":
    cnt[0, 1, 0] = -1
  elif kind == "duplicate":
    idx[0, 0, 0, 1] = idx[0, 0, 0, 0]
  return idx, cnt


BAD = [("index too large",
        "kv_block_indices\\[0, 1, 2, 0\\]=3: expected a key block in \\[0, nK=3\\)"),
       ("negative index", "kv_block_indices\\[0, 0, 1, 1\\]=-4"),
       ("negative count", "kv_block_counts\\[0, 1, 0\\]=-1: expected a count in \\[0, K_max=2\\]"),
       ("duplicate", "lists key block 0 twice")]


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("kind,match", BAD, ids=[b[0] for b in BAD])
def test_concrete_bad_lists_raise(impl, kind, match):
  q, k, v = _qkv()
  idx, cnt = _planted(kind)
  with pytest.raises(ValueError, match=match):
    pk.block_sparse_attention(q, k, v, jnp.asarray(idx), jnp.asarray(cnt), **_kw(impl))


def test_count_between_k_max_and_nk_raises():
  q, k, v = _qkv(jnp.float32)
  idx = np.zeros((B, H, 5, 2), np.int32) + np.arange(2, dtype=np.int32)
  cnt = np.full((B, H, 5), 2, np.int32)
  cnt[0, 0, 4] = 3                              # K_max 2 < 3 < nK 5: reads past the list
  qq, kk, vv = (jnp.concatenate([x, x], 1)[:, :300] for x in (q, k, v))
  with pytest.raises(ValueError, match="kv_block_counts\\[0, 0, 4\\]=3: expected a count in "
                                       "\\[0, K_max=2\\] or >= nK=5"):
    pk.block_sparse_attention(qq, kk, vv, jnp.asarray(idx), jnp.asarray(cnt), block_size=BS,
                              implementation="reference")


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_concrete_bad_lengths_and_shapes_raise(impl):
  q, k, v = _qkv()
  idx, cnt = (jnp.asarray(x) for x in _lists())
  for lengths, match in (([S + 1], f"kv_lengths\\[0\\]={S + 1}: expected valid lengths in "
                                   f"\\[0, seq={S}\\]"),
                         ([-2], "kv_lengths\\[0\\]=-2")):
    with pytest.raises(ValueError, match=match):
      pk.block_sparse_attention(q, k, v, idx, cnt, kv_lengths=jnp.asarray(lengths, jnp.int32),
                                **_kw(impl))
    with pytest.raises(ValueError, match=match):
      pk.attention_with_block_mass(q, k, v, kv_lengths=jnp.asarray(lengths, jnp.int32),
                                   **_kw(impl))
  empty = jnp.zeros((B, S, H, 0), jnp.bfloat16)
  with pytest.raises(ValueError, match="q has shape \\(1, 150, 2, 0\\): expected every "
                                       "dimension >= 1"):
    pk.attention_with_block_mass(empty, empty, empty, **_kw(impl))
  with pytest.raises(ValueError, match="kv_lengths"):
    pk.dense_attention(q, k, v, kv_lengths=jnp.asarray([S + 5], jnp.int32))


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_traced_bad_lists_stay_in_bounds(impl):
  """Under jit the values are unknown at trace time: the kernels read the clamped lists
  (every id in [0, nK), counts in [0, K_max] or dense), so the call runs and returns
  exactly what the clamped lists give, finite, whatever was planted."""
  q, k, v = _qkv()
  f = jax.jit(lambda i, c: pk.block_sparse_attention(q, k, v, i, c, **_kw(impl)))
  # The three kinds sit in three different (head, query block) rows: one call plants all.
  kinds = ("index too large", "negative index", "negative count")
  base_idx, base_cnt = _lists()
  idx, cnt = base_idx, base_cnt
  for p_idx, p_cnt in (_planted(kind) for kind in kinds):
    idx = np.where(p_idx != base_idx, p_idx, idx)
    cnt = np.where(p_cnt != base_cnt, p_cnt, cnt)
  assert (idx < 0).any() and (idx >= N).any() and (cnt < 0).any()
  idx, cnt = jnp.asarray(idx), jnp.asarray(cnt)
  safe = validation.safe_block_lists(idx, cnt, N)
  assert int(safe[0].min()) >= 0 and int(safe[0].max()) < N
  out, lse = f(idx, cnt)
  want, want_lse = f(*safe)
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))
  np.testing.assert_array_equal(np.asarray(lse), np.asarray(want_lse))
  assert np.isfinite(np.asarray(out, np.float32)).all()
  # Huge ids and counts: the same.
  idx, cnt = _lists()
  idx[0, 0, 0, 0], cnt[0, 1, 1] = 2**30, -(2**30)
  out, _ = f(jnp.asarray(idx), jnp.asarray(cnt))
  assert np.isfinite(np.asarray(out, np.float32)).all()


def test_safe_block_lists_leave_valid_lists_alone():
  idx, cnt = (jnp.asarray(x) for x in _lists())
  cnt = cnt.at[0, 0, 1].set(N)                 # a dense row stays dense
  safe_idx, safe_cnt = validation.safe_block_lists(idx, cnt, N)
  np.testing.assert_array_equal(safe_idx, idx)
  np.testing.assert_array_equal(safe_cnt, cnt)


def test_debug_checks_catch_traced_bad_lists_and_lengths():
  q, k, v = _qkv(jnp.float32)

  def f(i, c, lengths):
    return pk.block_sparse_attention(q, k, v, i, c, kv_lengths=lengths, block_size=BS,
                                     implementation="reference", debug_checks=True)[0]

  checked = jax.jit(checkify.checkify(f, errors=checkify.user_checks))
  good = [jnp.asarray(x) for x in _lists()]
  err, _ = checked(*good, jnp.asarray([S], jnp.int32))
  err.throw()
  for kind, match in (("index too large", "expected read entries in \\[0, nK=3\\)"),
                      ("negative count", "expected counts in \\[0, K_max=2\\]"),
                      ("duplicate", "lists a key block twice")):
    err, _ = checked(*(jnp.asarray(x) for x in _planted(kind)), jnp.asarray([S], jnp.int32))
    with pytest.raises(checkify.JaxRuntimeError, match=match):
      err.throw()
  err, _ = checked(*good, jnp.asarray([S + 1], jnp.int32))
  with pytest.raises(checkify.JaxRuntimeError, match="kv_lengths=.*expected valid lengths"):
    err.throw()


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_reruns_are_bitwise_equal(impl):
  q, k, v = _qkv(seed=3)
  idx, cnt = (jnp.asarray(x) for x in _lists())
  lengths = jnp.asarray([131], jnp.int32)
  runs = []
  for _ in range(2):
    out, lse = pk.block_sparse_attention(q, k, v, idx, cnt, kv_lengths=lengths, **_kw(impl))
    dense, dlse, mass = pk.attention_with_block_mass(q, k, v, kv_lengths=lengths, **_kw(impl))
    runs.append([np.asarray(x).view(np.uint16) if x.dtype == jnp.bfloat16 else np.asarray(x)
                 for x in (out, lse, dense, dlse, mass)])
  for a, b in zip(*runs):
    np.testing.assert_array_equal(a, b)
