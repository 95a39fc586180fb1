"""Baseline policies (topp, svg, minference) against loop-by-loop numpy, and through the
shared entry point."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaspa_jax import (POLICIES, AdaSpaConfig, adaspa_attention, get_config, init_state,
                        parallel, policies, svg, text_blocks_mask)
from adaspa_jax.state import k_max_for
from tests import numpy_policies, numpy_ref, numpy_selection

BS = 16


def _text(n_k, where):
  text = np.zeros(n_k, bool)
  if where == "start":
    text[:2] = True
  elif where == "end":
    text[-1] = True
  return text


@pytest.mark.parametrize("case", ["random", "ties", "one_block", "p_one"])
@pytest.mark.parametrize("where", ["none", "start", "end"])
def test_topp_matches_numpy(case, where):
  rng = np.random.default_rng(len(case) * 7 + len(where))
  b, h, n_k = 2, 3, 11
  text = _text(n_k, where)
  if case == "random":
    mass, p = rng.gamma(rng.uniform(0.1, 2.0, (1, h, 1, 1)), size=(b, h, n_k, n_k)), 0.8
  elif case == "ties":  # integer masses; 0.63 * total never sits on an integer running sum
    mass, p = rng.integers(0, 4, (b, h, n_k, n_k)).astype(float) + 1.0, 0.63
  elif case == "one_block":  # all of a row's mass in one block: that block alone
    mass, p = np.zeros((b, h, n_k, n_k)), 0.9
    mass[..., 5] = rng.uniform(0.5, 1.0, (b, h, n_k))
  else:  # p = 1 keeps every block of nonzero mass, even a tiny one
    mass, p = rng.gamma(1.0, size=(b, h, n_k, n_k)), 1.0
    mass[rng.random(mass.shape) < 0.4] = 0.0
    mass[..., 7] *= 1e-9
  mass = mass.astype(np.float32)
  sel = jax.jit(lambda m: policies.topp_blocks(m, top_p=p, text=text, k_max=n_k))(
      jnp.asarray(mass))
  sets, counts, recall, spars = numpy_policies.topp(mass, p, text)
  np.testing.assert_array_equal(np.asarray(sel.counts), counts)
  numpy_selection.assert_lists_equal_sets(sel.indices, sel.counts, sets, len(text))
  np.testing.assert_allclose(np.asarray(sel.recall), recall, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(sel.sparsity), spars, atol=1e-6)
  if case == "one_block":
    assert np.all(counts[..., ~text] == 1 + text.sum())


@pytest.mark.parametrize("seq,frame,text_span", [
    (136, 32, (128, 8)),    # frames of two blocks, text suffix
    (150, 24, (0, 20)),     # frames not a multiple of the block, text prefix ending mid-block
    (103, 40, None),        # no text, partial last block
])
def test_svg_patterns_match_numpy(seq, frame, text_span):
  text = (text_blocks_mask(seq, BS, *text_span) if text_span
          else np.zeros(-(-seq // BS), bool))
  for k in (1, 3, int((~text).sum())):
    spatial, temporal = svg.patterns(text, seq, BS, frame, k)
    want_s, want_t = numpy_policies.svg_patterns(text, seq, BS, frame, k)
    for i in np.flatnonzero(~text):
      assert list(spatial[i]) == want_s[i], (k, i)
      assert list(temporal[i]) == want_t[i], (k, i)
  assert list(svg.sample_rows(text, seq, BS)) == numpy_policies.svg_rows(text, seq, BS)


def _video_qkv(rng, frames, frame_tokens, n_text, d, kinds, b=1):
  """q, k, v [B, S, H, D], text suffix; head h attends by ``kinds[h]``: 'frame' (same
  frame), 'position' (same in-frame block position) or 'random'."""
  video = frames * frame_tokens
  s = video + n_text
  q, k, v = (rng.standard_normal((b, s, len(kinds), d)) for _ in range(3))
  t = np.arange(video)
  for h, kind in enumerate(kinds):
    if kind == "random":
      continue
    group = t // frame_tokens if kind == "frame" else (t % frame_tokens) // BS
    u = rng.standard_normal((b, group.max() + 1, d))
    q[:, :video, h] = 3.0 * u[:, group]
    k[:, :video, h] = u[:, group] + 0.2 * rng.standard_normal((b, video, d))
  return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v)), s


def test_svg_picks_the_pattern_the_attention_follows():
  rng = np.random.default_rng(0)
  frames, frame_tokens, n_text = 6, 64, 8          # 4 blocks per frame, 24 video blocks
  (q, k, v), s = _video_qkv(rng, frames, frame_tokens, n_text, 64,
                            ("frame", "position", "random", "position"), b=2)
  text = text_blocks_mask(s, BS, s - n_text, n_text)
  cfg = AdaSpaConfig(sparsity=0.75, block_size=BS, policy="svg", frame_tokens=frame_tokens)
  k_max = k_max_for(cfg, s, text)
  lengths = np.array([s, s - 5])
  sel = jax.jit(lambda q, k, v, n: svg.select(
      q, k, v, sparsity=0.75, frame_tokens=frame_tokens, text=text, block_size=BS, k_max=k_max,
      kv_lengths=n))(q, k, v, jnp.asarray(lengths, jnp.int32))
  use_spatial, sets, recall, errors = numpy_policies.svg(q, k, v, 0.75, text, BS, frame_tokens,
                                                          lengths)
  np.testing.assert_array_equal(use_spatial[:, [0, 1, 3]], [[True, False, False]] * 2)
  margin = np.abs(errors[..., 0] - errors[..., 1]) / errors.max(-1)
  assert margin.min() > 1e-3  # the random head's choice is not a float-rounding coin toss
  numpy_selection.assert_lists_equal_sets(sel.indices, sel.counts, sets, len(text))
  np.testing.assert_allclose(np.asarray(sel.recall), recall, rtol=1e-4)
  assert np.all(np.asarray(sel.recall)[:, [0, 1, 3]] > 0.9)


@pytest.mark.parametrize("seq,text_span,sparsity,d,dtype", [
    (150, (0, 20), 0.8, 64, jnp.float32),     # text prefix, partial last block
    (136, (128, 8), 0.5, 128, jnp.bfloat16),  # text suffix: the last video block precedes it
])
def test_minference_matches_numpy(seq, text_span, sparsity, d, dtype):
  rng = np.random.default_rng(seq)
  q, k = (jnp.asarray(2.0 * rng.standard_normal((2, seq, 2, d)), dtype) for _ in range(2))
  text = text_blocks_mask(seq, BS, *text_span)
  cfg = AdaSpaConfig(sparsity=sparsity, block_size=BS, policy="minference")
  lengths = np.array([seq, seq - 3])
  sel = jax.jit(lambda q, k, n: policies.select(
      cfg, q, k, None, mass=None, text=text, k_max=k_max_for(cfg, seq, text), kv_lengths=n))(
          q, k, jnp.asarray(lengths, jnp.int32))
  sets, recall = numpy_policies.minference(q.astype(jnp.float32), k.astype(jnp.float32),
                                           sparsity, text, BS, lengths)
  numpy_selection.assert_lists_equal_sets(sel.indices, sel.counts, sets, len(text))
  np.testing.assert_allclose(np.asarray(sel.recall), recall, rtol=1e-4)


def _inputs(seed, s, h=2, d=64, b=1):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(1.5 * rng.standard_normal((b, s, h, d)), jnp.float32) for _ in range(3)]


def _recall_from_exact_softmax(q, k, indices, counts, text, lengths):
  _, lse = numpy_ref.attention(q, k, k, lengths)
  mass = numpy_ref.block_mass(q, k, lse, BS, lengths)
  idx, cnt = np.asarray(indices), np.asarray(counts)
  n_k = len(text)
  sets = [[[set(range(n_k)) if cnt[b, h, p] >= n_k else set(idx[b, h, p, :cnt[b, h, p]])
            for p in range(n_k)] for h in range(cnt.shape[1])] for b in range(cnt.shape[0])]
  return numpy_policies.recall_of(mass, sets, text)


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_in_a_jitted_scan(policy):
  """Finite outputs, lists that move only at searches, exact recall (measure_recall) at
  the fused and the cached search, and dense attention when every block is kept."""
  s, n_text, steps = 136, 8, 8
  text = text_blocks_mask(s, BS, s - n_text, n_text)
  lengths = np.array([s - 3])
  base, drift = _inputs(10, s), _inputs(11, s)
  qkv = [[x + t / steps * 2.0 * y for x, y in zip(base, drift)] for t in range(steps)]
  dense = [numpy_ref.attention(*x, lengths)[0] for x in qkv]

  def run(cfg):
    def body(st, t):
      q, k, v = (x + t / steps * 2.0 * y for x, y in zip(base, drift))
      out, st = adaspa_attention(q, k, v, st, t, cfg, text_blocks=text,
                                 kv_lengths=jnp.asarray(lengths, jnp.int32))
      return st, (out, st.indices, st.counts, st.recall)
    st = init_state(cfg, 1, s, 2, text_blocks=text)
    return map(np.asarray, jax.jit(lambda st: jax.lax.scan(body, st, jnp.arange(steps)))(st)[1])

  cfg = get_config("tiny", policy=policy, sparsity=0.7, frame_tokens=32, measure_recall=True,
                   implementation="reference")
  assert cfg.search_steps == (2, 5) and cfg.num_steps == steps
  outs, indices, counts, recall = run(cfg)
  assert np.isfinite(outs).all()
  changed = [t for t in range(1, steps) if not np.array_equal(indices[t], indices[t - 1])]
  assert 2 in changed and set(changed) <= {2, 5}
  err = [np.abs(outs[t] - dense[t]).max() for t in range(steps)]
  assert max(err[:3]) < 1e-4 and max(err[3:]) > 1e-3  # exact until the first search, then sparse
  for t in cfg.search_steps:  # the fused search, then a cached one on drifted inputs
    want = _recall_from_exact_softmax(*qkv[t][:2], indices[t], counts[t], text, lengths)
    np.testing.assert_allclose(recall[t], want, rtol=1e-4)
    assert np.all(want < 0.999)  # the lists really drop mass
  if policy == "adaspa":
    return  # sparsity 0 is dense: tests/adaspa_jax/test_attention.py
  # Keeping everything (sparsity 0; top_p = 1 for topp) is dense attention at every step.
  outs0, *_ = run(cfg.replace(sparsity=0.0, top_p=1.0, measure_recall=False))
  np.testing.assert_allclose(outs0, np.stack(dense), atol=1e-4)


@pytest.mark.parametrize("policy", ["svg", "minference"])  # mass policies: test_parallel.py
def test_head_parallel_call_equals_single_device(policy):
  s, n_text = 72, 8
  sp = parallel.make_sequence_parallel(1)
  cfg = get_config("tiny", policy=policy, sparsity=0.6, frame_tokens=16,
                   implementation="reference")
  text = text_blocks_mask(s, BS, s - n_text, n_text)
  q, k, v = _inputs(3, s)
  st1 = st2 = init_state(cfg, 1, s, 2, text_blocks=text)
  for t in (5,):  # a cached search: the policy's selection, then the sparse kernel
    o1, st1 = jax.jit(lambda *a: adaspa_attention(*a, t, cfg, text_blocks=text))(q, k, v, st1)
    o2, st2 = jax.jit(lambda *a: parallel.adaspa_attention(
        *a, t, cfg, sequence_parallel=sp, text_span=(s - n_text, n_text)))(q, k, v, st2)
    np.testing.assert_allclose(np.asarray(o2), np.asarray(o1), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(st2.indices), np.asarray(st1.indices))


def test_state_width_per_policy():
  s = 1000
  text = text_blocks_mask(s, 64, s - 100, 100)           # 16 blocks, 2 of them text
  widths = {p: init_state(get_config("paper", policy=p), 1, s, 2, text_blocks=text)
            .indices.shape[-1] for p in POLICIES}
  assert widths == {"adaspa": round(0.3 * 14) + 2, "topp": 16, "svg": round(0.2 * 14) + 2,
                    "minference": round(0.2 * 14) + 2}


@pytest.mark.parametrize("kwargs,match", [
    (dict(policy="h2o"), "policy='h2o'"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(frame_tokens=0), "frame_tokens=0"),
    (dict(frame_tokens=2.5), "frame_tokens=2.5"),
    (dict(measure_recall="yes"), "measure_recall='yes'"),
])
def test_bad_config_raises(kwargs, match):
  with pytest.raises(ValueError, match=match):
    AdaSpaConfig(**kwargs)


def test_presets_and_call_time_errors():
  for name in ("svg", "minference", "topp"):
    cfg = get_config(name)
    assert cfg.policy == name and (cfg.sparsity, cfg.search_steps) == (0.8, (9, 29))
  assert get_config("paper").policy == "adaspa" and not get_config("paper").measure_recall
  q, k, v = _inputs(4, 64)
  cfg = get_config("tiny", policy="svg")
  with pytest.raises(ValueError, match="frame_tokens=None"):
    adaspa_attention(q, k, v, init_state(cfg, 1, 64, 2), 0, cfg)
  narrow = init_state(get_config("tiny"), 1, 64, 2)
  with pytest.raises(ValueError, match="K_max"):
    adaspa_attention(q, k, v, narrow, 2, get_config("tiny", policy="topp"))
