"""Each model pads its joint token sequence once per call, not once per layer per kernel.

The compiled program of a tiny model with AdaSpa (every phase compiled: the step
is traced) holds one sequence pad, before the layer scan, and no pad of q, k or v
inside the scan; with the model's padding switched off the kernels pad q, k, v in
every phase of every layer (inside the scan), which is what the model's pad
replaces. The padded model's outputs and states equal the unpadded run's.
"""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adaspa_jax import AdaSpaConfig
from adaspa_jax import nnx as adaspa_nnx
from adaspa_jax.layout import BlockLayout
from adaspa_jax.models import cogvideox, hunyuan_video, wan

ADASPA = AdaSpaConfig(sparsity=0.5, block_size=16, num_steps=6, search_steps=(1, 3),
                      implementation="reference")
def _pads(hlo: str):
  """(dtype, shape, grown axes, inside the layer scan) of every pad op in compiled HLO."""
  found = []
  for line in hlo.splitlines():
    if " pad(" not in line:
      continue
    m = re.search(r"= (?P<dtype>[a-z]+\d+)\[(?P<shape>[\d,]*)\]\{[^}]*\} pad\(.*"
                  r"padding=(?P<padding>[\d_x-]+)", line)
    assert m, line
    shape = tuple(int(d) for d in m["shape"].split(",") if d)
    widths = [tuple(int(w) for w in dim.split("_")[:2]) for dim in m["padding"].split("x")]
    grown = tuple(i for i, (lo, hi) in enumerate(widths) if lo or hi)
    found.append((m["dtype"], shape, grown, "/while/" in line))
  return found


def _qkv_pads(pads, head_dim):
  """Pads inside the layer scan that grow the token axis of a q, k or v array
  ([B, S, H, D], or [B, H, S, D] as the reference kernels hold them)."""
  return [p for p in pads if p[0].startswith(("f", "bf")) and len(p[1]) == 4
          and p[1][-1] == head_dim and p[2] and 3 not in p[2] and p[3]]


def _model_pads(pads, padded_len_of_stream):
  """Float pads outside the scan that grow axis 1 to the padded stream length."""
  return [p for p in pads if p[0].startswith(("f", "bf")) and not p[3] and p[2] == (1,)
          and p[1][1] == padded_len_of_stream]


def _compiled(model, args):
  graphdef, params = nnx.split(model)
  fn = jax.jit(lambda p, a, s, t: nnx.merge(graphdef, p)(**a, adaspa_state=s, adaspa_step=t))
  return fn, params


def _wan():
  cfg = dataclasses.replace(wan.PRESETS["tiny"], attention="adaspa", adaspa=ADASPA)
  model = wan.Model(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  args = dict(hidden_states=jnp.asarray(rng.standard_normal((2, 4, 3, 6, 10)), jnp.float32),
              timestep=jnp.asarray([500.0, 700.0]),
              encoder_hidden_states=jnp.asarray(rng.standard_normal((2, 5, 32)), jnp.float32))
  return model, args, model.init_adaspa_state(2, 3, 6, 10)


def test_wan_pads_once_and_equals_the_unpadded_model(monkeypatch):
  model, args, state = _wan()
  seq = math.prod(model.grid(3, 6, 10))                       # 45 tokens -> 128
  fn, params = _compiled(model, args)
  hlo = fn.lower(params, args, state, jnp.int32(0)).compile().as_text()
  pads = _pads(hlo)
  assert _qkv_pads(pads, 24) == []
  assert len(_model_pads(pads, 128)) == 1, pads

  padded = []
  for t in range(ADASPA.num_steps):
    out, state = fn(params, args, state, jnp.int32(t))
    padded.append((out, state))

  # The same model with its padding off: the kernels pad q, k, v inside the scan.
  monkeypatch.setattr(wan.Model, "adaspa_layout",
                      lambda self, grid: BlockLayout.create(math.prod(grid), 16))
  fn, params = _compiled(model, args)
  state = model.init_adaspa_state(2, 3, 6, 10)
  hlo = fn.lower(params, args, state, jnp.int32(0)).compile().as_text()
  pads = _pads(hlo)
  assert len(_qkv_pads(pads, 24)) >= 4          # every phase's kernels pad q, k and v
  assert _model_pads(pads, 128) == [] and seq == 45
  for t in range(ADASPA.num_steps):
    out, state = fn(params, args, state, jnp.int32(t))
    want_out, want_state = padded[t]
    np.testing.assert_allclose(want_out, out, rtol=1e-5, atol=1e-5, err_msg=f"step {t}")
    for a, b in zip(jax.tree.leaves(want_state), jax.tree.leaves(state)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"step {t}")


@pytest.mark.parametrize("family", ["cogvideox", "hunyuan_video"])
def test_joint_attention_models_pad_once(family):
  """CogVideoX pads its video stream ([text; video; padding]), HunyuanVideo its text
  stream ([video | text | padding]): one pad each, none of q, k, v in the scan."""
  rng = np.random.default_rng(1)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  if family == "cogvideox":
    cfg = dataclasses.replace(cogvideox.PRESETS["tiny"], attention="adaspa", adaspa=ADASPA)
    model = cogvideox.Model(cfg, rngs=nnx.Rngs(0))
    args = dict(hidden_states=normal(2, 2, 4, 6, 8), encoder_hidden_states=normal(2, 7, 24),
                timestep=jnp.asarray([500.0, 700.0]),
                image_rotary_emb=cogvideox.rotary_positional_embeddings(cfg, 2, 6, 8))
    state = model.init_adaspa_state(2, 2, 6, 8)
    seq, stream = 7 + 24, 24 + 128 - 31                       # the video stream is padded
  else:
    cfg = dataclasses.replace(hunyuan_video.PRESETS["tiny"], attention="adaspa", adaspa=ADASPA)
    model = hunyuan_video.Model(cfg, rngs=nnx.Rngs(0))
    args = dict(hidden_states=normal(2, 4, 2, 4, 6), encoder_hidden_states=normal(2, 5, 24),
                encoder_attention_mask=jnp.asarray([[1] * 5, [1] * 3 + [0] * 2], jnp.int32),
                timestep=jnp.asarray([500.0, 700.0]), pooled_projections=normal(2, 12),
                guidance=jnp.asarray([4000.0, 4000.0]))
    state = model.init_adaspa_state(2, 2, 4, 6, 5)
    seq, stream = 12 + 5, 5 + 128 - 17                        # the text stream is padded
  fn, params = _compiled(model, args)
  assert state.lse.shape[-1] == seq                           # the state keeps the real layout
  pads = _pads(fn.lower(params, args, state, jnp.int32(0)).compile().as_text())
  assert _qkv_pads(pads, cfg.attention_head_dim) == []
  assert len(_model_pads(pads, stream)) == 1, pads
  out, new = fn(params, args, state, jnp.int32(1))           # the fused search runs
  assert np.isfinite(np.asarray(out)).all()
  assert jax.tree.map(jnp.shape, new) == jax.tree.map(jnp.shape, state)
  # Every self/joint attention layer holds the NNX module (one per stack of blocks);
  # a call with a state leaves the model's own caches empty.
  found = adaspa_nnx.modules(model)
  assert len(found) == (1 if family == "cogvideox" else 2)
  model(**args, adaspa_state=state, adaspa_step=0)
  assert all(m.cache is None for m in found)
