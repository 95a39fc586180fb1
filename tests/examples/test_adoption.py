"""The adoption examples (examples/dit_nnx.py, examples/dit_linen.py): a third-party DiT
switched to AdaSpa by its attention line samples a whole schedule (dense warm-up, fused
search, cached search, sparse steps) with guidance on [uncond; cond] and padded text, and
every step's velocity and the final state equal those of the same model whose attention
line calls the functional ``adaspa_jax.adaspa_attention`` with its state passed by hand."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adaspa_jax import AdaSpaConfig, adaspa_attention, init_state, text_blocks_mask
from adaspa_jax.schedule import phase_table
from examples import dit_linen, dit_nnx

CFG = AdaSpaConfig(sparsity=0.5, block_size=16, num_steps=6, search_steps=(1, 3),
                   implementation="reference")
B, N, T, C, TEXT_DIM, HEADS = 2, 64, 16, 4, 16, 2        # S = 80 tokens = 5 blocks
SPAN = (N, T)


def _inputs():
  k = jax.random.split(jax.random.key(7), 3)
  noise = jax.random.normal(k[0], (B, N, C))
  text = jax.random.normal(k[1], (B, T, TEXT_DIM))
  null = jnp.zeros((B, T, TEXT_DIM)) + 0.1 * jax.random.normal(k[2], (B, T, TEXT_DIM))
  return noise, text, jnp.array([11, 16]), null, jnp.array([3, 3])


def test_schedule_has_every_phase():
  assert sorted(set(phase_table(CFG).tolist())) == [0, 1, 2, 3]


class _FunctionalNNX(nnx.Module):
  """The attention line written with the functional API: state in, state out."""

  def __init__(self, config):
    self.config = config
    self.state = nnx.data(None)

  def init_cache(self, batch, seq_len, heads, *, text_span=None, num_layers=None):
    self.span = tuple(text_span)          # static: the mask is rebuilt from it when called
    mask = text_blocks_mask(seq_len, self.config.block_size, *self.span)
    self.state = nnx.Variable(init_state(self.config, batch, seq_len, heads, text_blocks=mask))

  def __call__(self, q, k, v, *, step, kv_lengths=None):
    mask = text_blocks_mask(q.shape[1], self.config.block_size, *self.span)
    out, new = adaspa_attention(q, k, v, self.state.get_value(), step, self.config,
                                text_blocks=mask, kv_lengths=kv_lengths)
    self.state.set_value(new)
    return out


def _close(a, b, what):
  for name in ("indices", "counts", "lse", "recall", "sparsity"):
    np.testing.assert_allclose(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)),
                               rtol=1e-4, atol=1e-4, err_msg=f"{what} {name}")


def _nnx_run(monkeypatch, attention_cls=None):
  if attention_cls is not None:      # the functional twin; else the example as written
    monkeypatch.setattr(dit_nnx, "AdaSpaAttention", attention_cls)
    monkeypatch.setattr(dit_nnx, "init_caches", lambda model, *a, **kw: [
        m.init_cache(*a, **kw) for _, m in nnx.iter_graph(model)
        if isinstance(m, attention_cls)])
  model = dit_nnx.DiT(channels=C, text_dim=TEXT_DIM, heads=HEADS, adaspa=CFG, rngs=nnx.Rngs(0))
  dit_nnx.prepare_adaspa(model, B, N, T, HEADS)
  x, velocities = dit_nnx.sample(model, *_inputs(), num_steps=CFG.num_steps)
  return x, velocities, [blk.attend for blk in model.blocks]


def test_nnx_example_equals_the_functional_api(monkeypatch):
  x, v, mods = _nnx_run(monkeypatch)
  with monkeypatch.context() as m:
    x_ref, v_ref, refs = _nnx_run(m, _FunctionalNNX)
  for t in range(CFG.num_steps):
    np.testing.assert_allclose(v[t], v_ref[t], rtol=1e-4, atol=1e-4, err_msg=f"step {t}")
  for layer, (mod, ref) in enumerate(zip(mods, refs)):
    assert mod.state.counts.shape[0] == 2 * B
    _close(mod.state, ref.state.get_value(), f"layer {layer}")
  # AdaSpa really ran sparse: the dense model's velocities differ after the first search.
  dense = dit_nnx.DiT(channels=C, text_dim=TEXT_DIM, heads=HEADS, rngs=nnx.Rngs(0))
  _, v_dense = dit_nnx.sample(dense, *_inputs(), num_steps=CFG.num_steps)
  np.testing.assert_allclose(v_dense[0], v[0], rtol=1e-4, atol=1e-4)     # warm-up is exact
  assert np.abs(np.asarray(v_dense[-1]) - np.asarray(v[-1])).max() > 1e-3


class _FunctionalLinen(nn.Module):
  config: AdaSpaConfig
  text_span: tuple = None

  @nn.compact
  def __call__(self, q, k, v, step, *, kv_lengths=None):
    b, s, h, _ = q.shape
    mask = text_blocks_mask(s, self.config.block_size, *self.text_span)
    state = self.variable("adaspa", "state",
                          lambda: init_state(self.config, b, s, h, text_blocks=mask))
    out, new = adaspa_attention(q, k, v, state.value, step, self.config, text_blocks=mask,
                                kv_lengths=kv_lengths)
    if not self.is_initializing():
      state.value = new
    return out


def _linen_run():
  model = dit_linen.DiT(channels=C, heads=HEADS, text_span=SPAN, adaspa=CFG)
  noise, text, lengths, null, null_lengths = _inputs()
  variables = model.init(jax.random.key(0), jnp.concatenate([noise, noise]),
                         jnp.zeros((2 * B,)), jnp.concatenate([null, text]),
                         jnp.concatenate([null_lengths, lengths]), 0)
  return dit_linen.sample(model, variables, noise, text, lengths, null, null_lengths,
                          num_steps=CFG.num_steps)


def test_linen_example_equals_the_functional_api(monkeypatch):
  x, v, variables = _linen_run()
  with monkeypatch.context() as m:
    m.setattr(dit_linen, "AdaSpaAttention", _FunctionalLinen)
    x_ref, v_ref, ref_variables = _linen_run()
  np.testing.assert_allclose(v, v_ref, rtol=1e-4, atol=1e-4)
  state = jax.tree.leaves(variables["adaspa"], is_leaf=lambda s: hasattr(s, "indices"))[0]
  ref = jax.tree.leaves(ref_variables["adaspa"], is_leaf=lambda s: hasattr(s, "indices"))[0]
  assert state.counts.shape[:2] == (2, 2 * B)                 # [layers, 2B, ...]
  _close(state, ref, "stacked layers")
  changed = np.abs(np.asarray(v[-1]) - np.asarray(v[0])).max()
  assert np.isfinite(np.asarray(x)).all() and changed > 0
