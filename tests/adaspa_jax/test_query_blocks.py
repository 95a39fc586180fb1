"""Query blocks of 128 rows over key blocks of 64 (``AdaSpaConfig.query_block_size``):
layout, state, every policy against loop-by-loop numpy, and the entry point phase by phase
against dense float64 attention under the selected lists' token mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from adaspa_jax import (AdaSpaConfig, adaspa_attention, init_state, policies, select_blocks,
                        state_shapes, svg, text_blocks_mask)
from adaspa_jax.layout import BlockLayout
from adaspa_jax.state import k_max_for
from tests import numpy_policies, numpy_ref, numpy_selection

BS, QBS = 64, 128
S, TEXT = 600, (560, 40)          # 10 key blocks (8 video), 5 query blocks (4 video)
LENGTHS = np.array([600, 571])    # padded text at the end of row 1
CFG = AdaSpaConfig(sparsity=0.5, block_size=BS, query_block_size=QBS, num_steps=4,
                   search_steps=(1, 2), implementation="reference")


def query_text_by_tokens(seq, qbs, span):
  """bool [nQ]: the query blocks holding any text token, token by token."""
  start, length = span
  n_q = -(-seq // qbs)
  return np.array([any(start <= t < start + length for t in range(p * qbs, min((p + 1) * qbs,
                                                                               seq)))
                   for p in range(n_q)])


def sets_of(indices, counts, n_k):
  idx, cnt = np.asarray(indices), np.asarray(counts)
  return [[[set(range(n_k)) if cnt[b, h, p] >= n_k else set(idx[b, h, p, :cnt[b, h, p]])
            for p in range(cnt.shape[2])] for h in range(cnt.shape[1])]
          for b in range(cnt.shape[0])]


def inputs(seed, b=2, s=S, h=4, d=32):
  """q, k, v [B, S, H, D]; heads 0 and 1 attend within their own 64-token block."""
  rng = np.random.default_rng(seed)
  q, k, v = (rng.standard_normal((b, s, h, d)) for _ in range(3))
  dirs = rng.standard_normal((b, -(-s // 64), d))
  for head in (0, 1):
    q[:, :, head] = 2.0 * dirs[:, np.arange(s) // 64]
    k[:, :, head] = dirs[:, np.arange(s) // 64] + 0.3 * rng.standard_normal((b, s, d))
  return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))


# ----------------------------------------------------------------------------- layout, state

def test_layout_and_state_shapes():
  lay = BlockLayout.create(S, BS, text_span=TEXT, query_block_size=QBS)
  assert (lay.num_blocks, lay.num_query_blocks, lay.query_ratio) == (10, 5, 2)
  np.testing.assert_array_equal(lay.query_text_blocks, query_text_by_tokens(S, QBS, TEXT))
  np.testing.assert_array_equal(lay.query_text_blocks, [0, 0, 0, 0, 1])
  prefix = BlockLayout.create(333, BS, text_span=(0, 70), query_block_size=QBS)
  np.testing.assert_array_equal(prefix.query_text_blocks,
                                query_text_by_tokens(333, QBS, (0, 70)))
  # None means block_size; equal by value.
  assert BlockLayout.create(S, BS).query_block_size == BS
  assert BlockLayout.create(S, BS, query_block_size=BS) == BlockLayout.create(S, BS)
  square = BlockLayout.create(S, BS, text_span=TEXT)
  assert square.num_query_blocks == square.num_blocks
  assert square.query_text_blocks is square.text_blocks                # square: the same rows
  # Padding: to a multiple of lcm(128, query_block_size); the kernels' block counts.
  pad = BlockLayout.create(130, 16, query_block_size=32, pad=True)
  assert (pad.padded_len, pad.num_query_blocks, pad.padded_query_blocks) == (256, 5, 8)
  assert (pad.num_blocks, pad.padded_blocks) == (9, 16)
  idx = jnp.zeros((1, 1, 5, 2), jnp.int32)
  cnt = jnp.array([[[1, 9, 2, 0, 1]]], jnp.int32)          # row 1 dense (nK = 9)
  pidx, pcnt = pad.kernel_lists(idx, cnt)
  assert pidx.shape == (1, 1, 8, 2)
  np.testing.assert_array_equal(pcnt, [[[1, 16, 2, 0, 1, 0, 0, 0]]])
  assert pad.real_mass(jnp.zeros((1, 1, 8, 16))).shape == (1, 1, 5, 9)
  # The state: nQ list rows, a count of nK marks a dense row.
  shapes = state_shapes(CFG, 2, S, 4, text_blocks=text_blocks_mask(S, BS, *TEXT))
  assert shapes.indices.shape[:3] == (2, 4, 5) and shapes.counts.shape == (2, 4, 5)
  st = init_state(CFG, 2, S, 4, layout=lay)
  assert np.all(np.asarray(st.counts) == 10) and np.asarray(st.indices).max() <= 9


@pytest.mark.parametrize("kwargs,match", [
    (dict(query_block_size=96), "query_block_size=96"),
    (dict(query_block_size=32), "query_block_size=32"),
    (dict(query_block_size=256), "query_block_size=256"),
    (dict(query_block_size=128.0), "query_block_size=128.0"),
])
def test_bad_query_block_size_raises(kwargs, match):
  with pytest.raises(ValueError, match=match):
    AdaSpaConfig(block_size=64, **kwargs)
  with pytest.raises(ValueError, match=match):
    BlockLayout.create(S, 64, **kwargs)


def test_layout_and_state_must_match_the_config():
  lay = BlockLayout.create(S, BS, text_span=TEXT)          # square blocks
  with pytest.raises(ValueError, match="layout.query_block_size=64"):
    init_state(CFG, 2, S, 4, layout=lay)
  q = jnp.zeros((2, S, 4, 32))
  square = init_state(CFG.replace(query_block_size=None), 2, S, 4)
  with pytest.raises(ValueError, match=r"state\.indices.*query_block_size=128"):
    adaspa_attention(q, q, q, square, 3, CFG)


# ----------------------------------------------------------------------------- selection

@pytest.mark.parametrize("where", ["none", "prefix", "suffix"])
@pytest.mark.parametrize("sparsity,tiers", [(0.5, True), (0.8, True), (0.25, False)])
def test_select_matches_numpy(where, sparsity, tiers):
  rng = np.random.default_rng(len(where) + int(10 * sparsity))
  b, h, seq = 2, 6, 1000                                  # nQ = 8, nK = 16
  span = {"none": (0, 0), "prefix": (0, 70), "suffix": (950, 50)}[where]
  text = text_blocks_mask(seq, BS, *span)
  qtext = query_text_by_tokens(seq, QBS, span)
  mass = rng.gamma(rng.uniform(0.2, 2.0, (1, h, 1, 1)), size=(b, h, 8, 16)).astype(np.float32)
  mass[0, 0, 1, 3:5] = mass[0, 0, 1, 7]                   # ties: lower id first
  sel = jax.jit(lambda m: select_blocks(m, sparsity=sparsity, text_blocks=text,
                                        head_adaptive=tiers, query_text=qtext))(
                                            jnp.asarray(mass))
  sets, counts, recall, spars = numpy_selection.select(mass, sparsity, text, tiers,
                                                       query_text=qtext)
  assert sel.indices.shape[:3] == (b, h, 8)
  np.testing.assert_array_equal(np.asarray(sel.counts), counts)
  numpy_selection.assert_lists_equal_sets(sel.indices, sel.counts, sets, 16)
  np.testing.assert_allclose(np.asarray(sel.recall), recall, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(sel.sparsity), spars, atol=1e-6)


def test_select_needs_query_text_for_coarse_mass():
  with pytest.raises(ValueError, match="query_text"):
    select_blocks(jnp.ones((1, 1, 8, 16)), sparsity=0.5)
  with pytest.raises(ValueError, match=r"query_text has dtype bool and shape \(7,\)"):
    select_blocks(jnp.ones((1, 1, 8, 16)), sparsity=0.5, query_text=np.zeros(7, bool))


@pytest.mark.parametrize("where", ["prefix", "suffix"])
def test_topp_matches_numpy(where):
  rng = np.random.default_rng(3)
  seq = 1000
  span = {"prefix": (0, 70), "suffix": (950, 50)}[where]
  text, qtext = text_blocks_mask(seq, BS, *span), query_text_by_tokens(seq, QBS, span)
  mass = rng.gamma(0.5, size=(2, 3, 8, 16)).astype(np.float32)
  sel = policies.topp_blocks(jnp.asarray(mass), top_p=0.8, text=text, k_max=16,
                             query_text=qtext)
  sets, counts, recall, spars = numpy_policies.topp(mass, 0.8, text, query_text=qtext)
  np.testing.assert_array_equal(np.asarray(sel.counts), counts)
  numpy_selection.assert_lists_equal_sets(sel.indices, sel.counts, sets, 16)
  np.testing.assert_allclose(np.asarray(sel.recall), recall, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(sel.sparsity), spars, atol=1e-6)


@pytest.mark.parametrize("seq,frame,span", [
    (1100, 256, (1024, 76)),    # frames of four key blocks, text suffix
    (900, 192, (0, 70)),        # text prefix ending mid-block: video starts off the grid
])
def test_svg_matches_numpy(seq, frame, span):
  text, qtext = text_blocks_mask(seq, BS, *span), query_text_by_tokens(seq, QBS, span)
  for k in (1, 3, int((~text).sum())):
    spatial, temporal = svg.patterns(text, seq, BS, frame, k, QBS)
    want_s, want_t = numpy_policies.svg_patterns(text, seq, BS, frame, k, QBS)
    for i in np.flatnonzero(~qtext):
      assert list(spatial[i]) == want_s[i], (k, i)
      assert list(temporal[i]) == want_t[i], (k, i)
  rng = np.random.default_rng(seq)
  q, k_, v = (jnp.asarray(rng.standard_normal((1, seq, 2, 32)), jnp.float32) for _ in range(3))
  cfg = AdaSpaConfig(sparsity=0.6, block_size=BS, query_block_size=QBS, policy="svg",
                     frame_tokens=frame)
  lengths = np.array([seq - 9])
  sel = policies.select(cfg, q, k_, v, mass=None, text=text, k_max=k_max_for(cfg, seq, text),
                        kv_lengths=jnp.asarray(lengths, jnp.int32), query_text=qtext)
  _, sets, recall, _ = numpy_policies.svg(q, k_, v, 0.6, text, BS, frame, lengths,
                                          query_block_size=QBS, query_text=qtext)
  numpy_selection.assert_lists_equal_sets(sel.indices, sel.counts, sets, len(text))
  np.testing.assert_allclose(np.asarray(sel.recall), recall, rtol=1e-4)


@pytest.mark.parametrize("seq,span", [(1000, (950, 50)), (700, (0, 70))])
def test_minference_matches_numpy(seq, span):
  text, qtext = text_blocks_mask(seq, BS, *span), query_text_by_tokens(seq, QBS, span)
  rng = np.random.default_rng(seq)
  q, k = (jnp.asarray(2.0 * rng.standard_normal((2, seq, 2, 32)), jnp.float32)
          for _ in range(2))
  cfg = AdaSpaConfig(sparsity=0.6, block_size=BS, query_block_size=QBS, policy="minference")
  lengths = np.array([seq, seq - 5])
  sel = policies.select(cfg, q, k, None, mass=None, text=text,
                        k_max=k_max_for(cfg, seq, text), kv_lengths=jnp.asarray(lengths),
                        query_text=qtext)
  sets, recall = numpy_policies.minference(q, k, 0.6, text, BS, lengths,
                                           query_block_size=QBS, query_text=qtext)
  numpy_selection.assert_lists_equal_sets(sel.indices, sel.counts, sets, len(text))
  np.testing.assert_allclose(np.asarray(sel.recall), recall, rtol=1e-4)


# ----------------------------------------------------------------------------- entry point

def check_sparse(out, q, k, v, state, lengths, tol=1e-5):
  """out equals float64 dense softmax under the token mask of the state's 128 x 64 lists."""
  want, _ = numpy_ref.block_sparse_attention(q, k, v, state.indices, state.counts, BS, lengths,
                                             query_block_size=QBS)
  np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=tol)


def test_phases_warmup_search_sparse():
  q, k, v = inputs(0)
  text = text_blocks_mask(S, BS, *TEXT)
  qtext = query_text_by_tokens(S, QBS, TEXT)
  kw = dict(text_blocks=text, kv_lengths=jnp.asarray(LENGTHS, jnp.int32))
  state = init_state(CFG, 2, S, 4, text_blocks=text)
  dense_out, dense_lse = numpy_ref.attention(q, k, v, LENGTHS)

  out, st = adaspa_attention(q, k, v, state, 0, CFG, **kw)               # dense warm-up
  np.testing.assert_allclose(np.asarray(out, np.float64), dense_out, atol=1e-5)

  out, st = adaspa_attention(q, k, v, state, 1, CFG, **kw)               # fused search
  np.testing.assert_allclose(np.asarray(out, np.float64), dense_out, atol=1e-5)
  assert st.indices.shape[:3] == (2, 4, 5) and st.counts.shape == (2, 4, 5)
  mass = numpy_ref.block_mass(q, k, dense_lse, BS, LENGTHS, query_block_size=QBS)
  _, counts, recall, _ = numpy_selection.select(mass, CFG.sparsity, text, query_text=qtext)
  np.testing.assert_array_equal(np.asarray(st.counts), counts)
  np.testing.assert_allclose(np.asarray(st.recall), recall, rtol=1e-4)
  assert np.all(np.asarray(st.counts)[..., 4] == 10)                     # text row: dense
  assert (np.asarray(st.counts)[..., :4] < 10).all()                      # video rows: sparse
  # The head tiers: the block-local heads keep fewer blocks than the diffuse ones.
  assert np.all(np.asarray(st.sparsity)[:, :2] > np.asarray(st.sparsity)[:, 2:])

  out, st_sparse = adaspa_attention(q, k, v, st, 3, CFG, **kw)            # sparse
  assert st_sparse is st
  check_sparse(out, q, k, v, st, LENGTHS)
  assert np.abs(np.asarray(out, np.float64) - dense_out).max() > 1e-3    # sparsity changed it

  q2, k2, v2 = inputs(1)                                                  # cached search
  out, st2 = adaspa_attention(q2, k2, v2, st, 2, CFG, **kw)
  np.testing.assert_array_equal(np.asarray(st2.lse), np.asarray(st.lse))
  mass2 = numpy_ref.block_mass(q2, k2, np.asarray(st.lse), BS, LENGTHS, query_block_size=QBS)
  _, counts2, _, _ = numpy_selection.select(mass2, CFG.sparsity, text, query_text=qtext)
  np.testing.assert_array_equal(np.asarray(st2.counts), counts2)
  check_sparse(out, q2, k2, v2, st2, LENGTHS)


@pytest.mark.parametrize("policy", ["adaspa", "topp", "svg", "minference"])
def test_every_policy_in_a_jitted_schedule_with_padding(policy):
  """One compile (traced step): a padded layout gives the unpadded call's outputs and
  state in every phase; the sparse step equals the dense-masked reference."""
  cfg = CFG.replace(policy=policy, frame_tokens=192 if policy == "svg" else None,
                    head_adaptive=policy == "adaspa")
  lay = BlockLayout.create(S, BS, text_span=TEXT, pad=True, query_block_size=QBS)
  assert lay.padded_len == 640
  text = text_blocks_mask(S, BS, *TEXT)
  lengths = jnp.asarray(LENGTHS, jnp.int32)

  @jax.jit
  def both(q, k, v, st_u, st_p, t):
    out_u, st_u = adaspa_attention(q, k, v, st_u, t, cfg, text_blocks=text, kv_lengths=lengths)
    out_p, st_p = adaspa_attention(*(lay.pad(x) for x in (q, k, v)), st_p, t, cfg,
                                   layout=lay, kv_lengths=lengths)
    return out_u, st_u, out_p, st_p

  st_u = init_state(cfg, 2, S, 4, text_blocks=text)
  st_p = init_state(cfg, 2, S, 4, layout=lay)
  q, k, v = inputs(2)
  for t in range(cfg.num_steps):
    out_u, st_u, out_p, st_p = both(q, k, v, st_u, st_p, jnp.int32(t))
    np.testing.assert_allclose(out_p[:, :S], out_u, rtol=1e-5, atol=1e-5, err_msg=f"step {t}")
    assert not np.asarray(out_p[:, S:]).any()
    for name in ("indices", "counts", "recall", "sparsity"):
      np.testing.assert_allclose(np.asarray(getattr(st_p, name)),
                                 np.asarray(getattr(st_u, name)), rtol=1e-5, atol=1e-5,
                                 err_msg=f"step {t} {name}")
  assert st_u.counts.shape == (2, 4, 5) and (np.asarray(st_u.counts) < 10).any()
  check_sparse(out_u, q, k, v, st_u, LENGTHS)


def test_triton_kernels_in_the_schedule():
  """The Pallas Triton kernels (interpret mode) at 128 x 64: fused search, then sparse."""
  cfg = CFG.replace(implementation="triton", num_steps=2, search_steps=(0,))
  s, span = 300, (260, 40)
  q, k, v = inputs(3, b=1, s=s, h=2)
  text = text_blocks_mask(s, BS, *span)
  st = init_state(cfg, 1, s, 2, text_blocks=text)
  _, st = adaspa_attention(q, k, v, st, 0, cfg, text_blocks=text, interpret=True)
  want = pk.attention_with_block_mass(q, k, v, block_size=BS, query_block_size=QBS,
                                      implementation="reference")[2]
  assert want.shape == (1, 2, 3, 5)
  out, _ = adaspa_attention(q, k, v, st, 1, cfg, text_blocks=text, interpret=True)
  want_out, _ = numpy_ref.block_sparse_attention(q, k, v, st.indices, st.counts, BS,
                                                 query_block_size=QBS)
  np.testing.assert_allclose(np.asarray(out, np.float64), want_out, atol=1e-5)


def test_nnx_module_state_rows():
  from adaspa_jax import nnx as adaspa_nnx
  m = adaspa_nnx.AdaSpaAttention(CFG)
  m.init_cache(2, S, 4, text_span=TEXT)
  assert m.layout.query_block_size == QBS and m.state.indices.shape[:3] == (2, 4, 5)
  with pytest.raises(ValueError, match="query_block_size=128"):
    m.load_state(m.state, BlockLayout.create(S, BS, text_span=TEXT))
