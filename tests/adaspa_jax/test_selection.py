import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaspa_jax import blocks, select_blocks, text_blocks_mask
from tests import numpy_selection


def _text(n_blk, where):
  text = np.zeros(n_blk, bool)
  if where == "start":
    text[:2] = True
  elif where == "end":
    text[-1] = True
  return text


@pytest.mark.parametrize("heads", [1, 4, 5])
@pytest.mark.parametrize("sparsity", [0.2, 0.5, 0.8, 0.9])
@pytest.mark.parametrize("text_where", ["none", "start", "end"])
@pytest.mark.parametrize("ties", [False, True])
def test_matches_brute_force(heads, sparsity, text_where, ties):
  rng = np.random.default_rng(heads * 100 + int(sparsity * 10) + ties)
  b, n_blk = 2, 11
  if ties:  # small integers: many equal masses within a row
    mass = rng.integers(0, 4, (b, heads, n_blk, n_blk)).astype(np.float32)
  else:  # peaked rows so that some heads have high recall and the tiers are used
    mass = rng.gamma(rng.uniform(0.05, 2.0, (1, heads, 1, 1)), size=(b, heads, n_blk, n_blk))
    mass = mass.astype(np.float32)
  text = _text(n_blk, text_where)
  sel = select_blocks(jnp.asarray(mass), sparsity=sparsity,
                      text_blocks=None if text_where == "none" else text)
  sets, counts, recall, spars = numpy_selection.select(mass, sparsity, text)
  np.testing.assert_array_equal(np.asarray(sel.counts), counts)
  idx = np.asarray(sel.indices)
  for pos in np.ndindex(b, heads, n_blk):
    c = counts[pos]
    row = idx[pos]
    if c >= n_blk:  # dense text row: entries are not read
      continue
    assert list(row[:c]) == sorted(sets[pos[0]][pos[1]][pos[2]])
    assert np.all(row[c:] == row[c - 1])
  np.testing.assert_allclose(np.asarray(sel.recall), recall, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(sel.sparsity), spars, atol=1e-6)


def test_tiers_use_three_levels_and_keep_mean_budget():
  # Eight heads: four very peaked (high recall), four flat.
  rng = np.random.default_rng(0)
  n_blk = 20
  flat = rng.uniform(0.9, 1.1, (1, 4, n_blk, n_blk))
  peaked = np.where(rng.random((1, 4, n_blk, n_blk)) < 0.1, 50.0, 0.01)
  mass = jnp.asarray(np.concatenate([peaked, flat], 1), jnp.float32)
  sel = select_blocks(mass, sparsity=0.8)
  spars = np.asarray(sel.sparsity)[0]
  np.testing.assert_allclose(sorted(spars), [0.7] * 4 + [0.9] * 4, atol=1e-6)
  assert np.all(spars[:4] == pytest.approx(0.9))
  # Without the hierarchy every head gets the base sparsity.
  uniform = select_blocks(mass, sparsity=0.8, head_adaptive=False)
  np.testing.assert_allclose(np.asarray(uniform.sparsity), 0.8, atol=1e-6)


def test_n_is_capped_at_half_the_heads():
  mass = jnp.asarray(np.eye(10, dtype=np.float32)[None, None].repeat(3, 1) + 1e-4)
  sel = select_blocks(mass, sparsity=0.8)  # every head has recall ~1 > 0.8
  spars = sorted(np.asarray(sel.sparsity)[0].round(3))
  assert spars == [0.7, 0.8, 0.9]  # n = floor(3/2) = 1


def test_k_max_and_errors():
  mass = jnp.ones((1, 2, 8, 8), jnp.float32)
  assert select_blocks(mass, sparsity=0.8).indices.shape[-1] == blocks.video_budget(0.7, 8)
  assert select_blocks(mass, sparsity=0.8, k_max=8).indices.shape[-1] == 8
  with pytest.raises(ValueError, match="k_max=1"):
    select_blocks(mass, sparsity=0.5, k_max=1)
  with pytest.raises(ValueError, match="sparsity=1.0"):
    select_blocks(mass, sparsity=1.0)
  with pytest.raises(ValueError, match="mass has shape"):
    select_blocks(jnp.ones((2, 8, 8)), sparsity=0.5)
  with pytest.raises(ValueError, match="text_blocks"):
    select_blocks(mass, sparsity=0.5, text_blocks=np.zeros(7, bool))
  with pytest.raises(ValueError, match="traced"):
    jax.jit(lambda m, t: select_blocks(m, sparsity=0.5, text_blocks=t).counts)(
        mass, jnp.zeros(8, bool))


def test_runs_under_jit():
  mass = jnp.asarray(np.random.default_rng(1).random((2, 3, 9, 9)), jnp.float32)
  text = text_blocks_mask(9 * 16, 16, 8 * 16, 16)
  fn = jax.jit(lambda m: select_blocks(m, sparsity=0.8, text_blocks=text))
  eager = select_blocks(mass, sparsity=0.8, text_blocks=text)
  jitted = fn(mass)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tiers_keep_the_mean():
  for s in np.linspace(0, 0.95, 20):
    hi, base, lo = blocks.tier_sparsities(float(s))
    assert hi + lo == pytest.approx(2 * base) and lo >= 0
    if s >= 1 / 3:
      assert hi == pytest.approx((1 + s) / 2) and lo == pytest.approx((3 * s - 1) / 2)
  assert blocks.tier_sparsities(0.0) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("s,n,want", [(0.8, 10, 2), (0.9, 5, 1), (0.0, 7, 7), (0.99, 3, 1),
                                      (0.5, 5, 3), (0.7, 0, 0)])
def test_video_budget(s, n, want):
  assert blocks.video_budget(s, n) == want


def test_text_blocks_mask():
  np.testing.assert_array_equal(text_blocks_mask(200, 64, 150, 50), [False, False, True, True])
  np.testing.assert_array_equal(text_blocks_mask(200, 64, 0, 65), [True, True, False, False])
  assert not text_blocks_mask(100, 16, 0, 0).any()
  with pytest.raises(ValueError, match="text span"):
    text_blocks_mask(100, 16, 90, 20)
