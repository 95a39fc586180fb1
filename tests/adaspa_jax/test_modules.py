"""The NNX and linen AdaSpa modules against the functional API over a whole schedule."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adaspa_jax import AdaSpaConfig, adaspa_attention, init_state, text_blocks_mask
from adaspa_jax import linen as adaspa_linen
from adaspa_jax import nnx as adaspa_nnx
from adaspa_jax.schedule import CACHED_SEARCH, DENSE, FUSED_SEARCH, SPARSE, phase_table

# Four phases in six steps: dense 0, fused search 1, sparse 2, cached search 3, sparse 4-5.
CFG = AdaSpaConfig(sparsity=0.5, block_size=16, num_steps=6, search_steps=(1, 3),
                   implementation="reference")
B, S, H, D, L = 2, 88, 2, 16, 2          # B = 2 guidance rows ([uncond; cond]), L layers
TEXT = (72, 16)                          # text suffix, padded: row lengths below
LENGTHS = jnp.array([80, 86], jnp.int32)


def _qkv(step, layer=0):
  """Inputs that drift with the step, as a DiT's activations do."""
  key = jax.random.fold_in(jax.random.key(layer), 0)
  base, drift = jax.random.normal(key, (2, 3, B, S, H, D))
  return tuple(base + (step / CFG.num_steps) * 2.0 * drift)


def _functional(layers=1):
  """Outputs [N][L] and final states [L] of the functional API."""
  mask = text_blocks_mask(S, CFG.block_size, *TEXT)
  states = [init_state(CFG, B, S, H, text_blocks=mask) for _ in range(layers)]
  outs = []
  for t in range(CFG.num_steps):
    row = []
    for l in range(layers):
      o, states[l] = adaspa_attention(*_qkv(t, l), states[l], t, CFG, text_blocks=mask,
                                      kv_lengths=LENGTHS)
      row.append(o)
    outs.append(row)
  return outs, states


def _close_states(a, b):
  for name in ("indices", "counts", "lse", "recall", "sparsity"):
    np.testing.assert_allclose(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)),
                               rtol=1e-5, atol=1e-5, err_msg=name)


def test_schedule_covers_every_phase():
  assert set(phase_table(CFG).tolist()) == {DENSE, FUSED_SEARCH, CACHED_SEARCH, SPARSE}


def test_nnx_module_equals_functional_under_jit_compiling_once():
  want, want_states = _functional()
  m = adaspa_nnx.AdaSpaAttention(CFG)
  m.init_cache(B, S, H, text_span=TEXT)
  traces = []

  @nnx.jit
  def call(m, q, k, v, t):
    traces.append(1)
    return m(q, k, v, step=t, kv_lengths=LENGTHS)

  for t in range(CFG.num_steps):
    out = call(m, *_qkv(t), jnp.int32(t))
    np.testing.assert_allclose(out, want[t][0], rtol=1e-5, atol=1e-5, err_msg=f"step {t}")
  assert len(traces) == 1
  _close_states(m.state, want_states[0])


class _Block(nnx.Module):
  """A layer that owns its attention module, as a third-party DiT block would."""

  def __init__(self):
    self.attn = adaspa_nnx.AdaSpaAttention(CFG)

  def __call__(self, qkv, t):
    return self.attn(*qkv, step=t, kv_lengths=LENGTHS)


def test_nnx_scan_over_stacked_layers_with_remat_in_a_scanned_loop():
  want, want_states = _functional(L)

  @nnx.vmap(in_axes=0, out_axes=0, axis_size=L)
  def make(_):
    return _Block()

  blocks = make(jnp.arange(L))
  count = adaspa_nnx.init_caches(blocks, B, S, H, text_span=TEXT, num_layers=L)
  assert count == 1 and blocks.attn.state.indices.shape[0] == L

  def step(blocks, qkv, t):
    @nnx.scan(in_axes=(0, 0, None), out_axes=0)
    @nnx.remat
    def layer(block, x, t):
      return block(x, t)
    return layer(blocks, qkv, t)

  graphdef, state = nnx.split(blocks)
  inputs = jnp.stack([jnp.stack([jnp.stack(_qkv(t, l)) for l in range(L)])
                      for t in range(CFG.num_steps)])          # [N, L, 3, B, S, H, D]

  def body(state, xs):
    qkv, t = xs
    blocks = nnx.merge(graphdef, state)
    out = step(blocks, tuple(jnp.moveaxis(qkv, 1, 0)), t)
    return nnx.state(blocks), out

  state, outs = jax.jit(lambda s: jax.lax.scan(body, s, (inputs, jnp.arange(CFG.num_steps))))(
      state)
  for t in range(CFG.num_steps):
    for l in range(L):
      np.testing.assert_allclose(outs[t, l], want[t][l], rtol=1e-5, atol=1e-5,
                                 err_msg=f"step {t} layer {l}")
  final = nnx.merge(graphdef, state).attn.state
  for l in range(L):
    _close_states(jax.tree.map(lambda x, l=l: x[l], final), want_states[l])


def test_nnx_errors():
  m = adaspa_nnx.AdaSpaAttention(CFG)
  with pytest.raises(ValueError, match="call init_cache"):
    m(*_qkv(0), step=0)
  with pytest.raises(ValueError, match="text_span=\\(3, 4\\)"):
    m.init_cache(B, S, H, text_span=(3, 4))
  with pytest.raises(ValueError, match="text_span='x'"):
    m.init_cache(B, S, H, text_span="x")
  with pytest.raises(ValueError, match="config=None"):
    adaspa_nnx.AdaSpaAttention(None)
  with pytest.raises(ValueError, match="has no AdaSpaAttention"):
    adaspa_nnx.init_caches(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), B, S, H)


class _LinenStack(nn.Module):
  @nn.compact
  def __call__(self, qkv, t):
    def layer(mdl, x, _):
      return x, adaspa_linen.AdaSpaAttention(CFG, text_span=TEXT)(*x, t, kv_lengths=LENGTHS)
    scan = nn.scan(layer, variable_axes={adaspa_linen.COLLECTION: 0},
                   split_rngs={"params": True}, length=L)
    _, out = scan(self, qkv, None)
    return out


def test_linen_module_and_nn_scan_equal_functional():
  want, want_states = _functional()
  single = adaspa_linen.AdaSpaAttention(CFG, text_span=TEXT)
  variables = single.init(jax.random.key(0), *_qkv(0), 0)
  assert set(variables) == {adaspa_linen.COLLECTION}
  apply = jax.jit(lambda v, q, k, vv, t: single.apply(v, q, k, vv, t, kv_lengths=LENGTHS,
                                                      mutable=[adaspa_linen.COLLECTION]))
  for t in range(CFG.num_steps):
    out, updates = apply(variables, *_qkv(t), jnp.int32(t))
    variables = {**variables, **updates}
    np.testing.assert_allclose(out, want[t][0], rtol=1e-5, atol=1e-5, err_msg=f"step {t}")
  _close_states(variables[adaspa_linen.COLLECTION]["state"], want_states[0])
  # A read-only apply leaves the state alone.
  out = single.apply(variables, *_qkv(5), 5, kv_lengths=LENGTHS)
  np.testing.assert_allclose(out, want[5][0], rtol=1e-5, atol=1e-5)


def test_linen_nn_scan_stack():
  """Every layer of an nn.scan stack gets its own state slice; with equal inputs all
  layers select alike, equal to the functional API on those inputs."""
  stack = _LinenStack()
  variables = stack.init(jax.random.key(0), _qkv(0), 0)
  leaves = jax.tree.leaves(variables[adaspa_linen.COLLECTION])
  assert all(x.shape[0] == L for x in leaves)
  want, want_states = _functional(1)
  for t in range(CFG.num_steps):
    out, updates = stack.apply(variables, _qkv(t), jnp.int32(t),
                               mutable=[adaspa_linen.COLLECTION])
    variables = {**variables, **updates}
    assert out.shape == (L, B, S, H, D)
    for l in range(L):
      np.testing.assert_allclose(out[l], want[t][0], rtol=1e-5, atol=1e-5)
  state = jax.tree.leaves(variables[adaspa_linen.COLLECTION],
                          is_leaf=lambda x: hasattr(x, "indices"))[0]
  for l in range(L):
    _close_states(jax.tree.map(lambda x, l=l: x[l], state), want_states[0])
