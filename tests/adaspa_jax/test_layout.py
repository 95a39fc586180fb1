"""The static block layout: construction, checks, and a padded call equal to the unpadded one."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from adaspa_jax import AdaSpaConfig, adaspa_attention, init_state, text_blocks_mask
from adaspa_jax.layout import SEQ_MULTIPLE, BlockLayout

CFG = AdaSpaConfig(sparsity=0.5, block_size=16, num_steps=6, search_steps=(1, 3),
                   implementation="reference")
B, S, H, D = 2, 88, 2, 16           # 6 blocks of 16; padded to 128 tokens = 8 blocks
TEXT = (72, 16)                     # text suffix, then padding
LENGTHS = jnp.array([80, 86], jnp.int32)


def test_create_and_derived_fields():
  lay = BlockLayout.create(S, 16, text_span=TEXT, pad=True)
  assert (lay.seq_len, lay.padded_len, lay.num_blocks, lay.padded_blocks) == (88, 128, 6, 8)
  np.testing.assert_array_equal(lay.text_blocks, text_blocks_mask(S, 16, *TEXT))
  assert (lay.num_text_blocks, lay.num_video_blocks) == (2, 4)
  assert lay.video_tokens == (0, 72) and lay.is_padded
  assert BlockLayout.create(S, 16, text_span=(0, 8)).video_tokens == (8, 88)
  assert BlockLayout.create(S, 16).video_tokens == (0, 88)
  # Hashable and equal by value: a static argument / module attribute.
  assert lay == BlockLayout.create(S, 16, text_span=TEXT, pad=True)
  assert hash(lay) == hash(BlockLayout.create(S, 16, text_span=TEXT, pad=True))
  assert not lay.text_blocks.flags.writeable
  # The pad multiple is max(SEQ_MULTIPLE, block_size); no pad without pad=True.
  assert BlockLayout.create(300, 256, pad=True).padded_len == 512
  assert BlockLayout.create(S, 16).padded_len == S
  # A mask-only layout (the functional API's text_blocks) has no token span.
  masked = BlockLayout.create(S, 16, text_blocks=text_blocks_mask(S, 16, *TEXT))
  assert masked.text_mask == lay.text_mask and masked.text_span is None
  with pytest.raises(ValueError, match="text_span=None"):
    masked.video_tokens


def test_errors_name_the_argument():
  with pytest.raises(ValueError, match="seq_len=0"):
    BlockLayout.create(0, 16)
  with pytest.raises(ValueError, match="block_size=24"):
    BlockLayout.create(S, 24)
  with pytest.raises(ValueError, match=r"text_span=\(3, 4\)"):
    BlockLayout.create(S, 16, text_span=(3, 4))
  with pytest.raises(ValueError, match="text_blocks"):
    BlockLayout.create(S, 16, text_blocks=np.ones(3, bool))
  with pytest.raises(ValueError, match="text_span and text_blocks"):
    BlockLayout.create(S, 16, text_span=TEXT, text_blocks=np.ones(6, bool))
  with pytest.raises(ValueError, match="padded_len=80"):
    BlockLayout(seq_len=S, block_size=16, padded_len=80, text_span=None,
                text_mask=(False,) * 6)
  with pytest.raises(ValueError, match="text_mask has 2 entries"):
    BlockLayout(seq_len=S, block_size=16, padded_len=S, text_span=None, text_mask=(False,) * 2)
  with pytest.raises(ValueError, match="layout.padded_len=128"):
    lay = BlockLayout.create(S, 16, text_span=TEXT, pad=True)
    q = jnp.zeros((B, S, H, D))
    adaspa_attention(q, q, q, init_state(CFG, B, S, H, layout=lay), 0, CFG, layout=lay)


def test_kernel_lists_mark_dense_rows_and_append_padding_blocks():
  lay = BlockLayout.create(40, 16, pad=True)               # 3 real blocks, 8 padded
  idx = jnp.array([[[[0, 2], [1, 1], [0, 0]]]], jnp.int32)
  counts = jnp.array([[[2, 3, 1]]], jnp.int32)            # row 1 dense (count nK = 3)
  pidx, pcounts = lay.kernel_lists(idx, counts)
  np.testing.assert_array_equal(pcounts, [[[2, 8, 1, 0, 0, 0, 0, 0]]])
  np.testing.assert_array_equal(pidx[..., :3, :], idx)
  assert pidx.shape == (1, 1, 8, 2)
  same = BlockLayout.create(128, 16, pad=True)             # already whole: unchanged
  assert same.kernel_lists(idx, counts)[1] is counts


def _qkv(step):
  key = jax.random.fold_in(jax.random.key(0), 0)
  base, drift = jax.random.normal(key, (2, 3, B, S, H, D))
  return tuple(base + (step / CFG.num_steps) * 2.0 * drift)


@pytest.mark.parametrize("policy", ["adaspa", "minference"])
def test_padded_call_equals_unpadded_over_the_schedule(policy):
  """q, k, v padded once to 128 tokens with the layout give the unpadded call's
  outputs on the real rows, zeros on the padded rows, and the same state, in every
  phase (one compile: the step is traced)."""
  cfg = CFG.replace(policy=policy)
  lay = BlockLayout.create(S, 16, text_span=TEXT, pad=True)
  text = text_blocks_mask(S, 16, *TEXT)

  @jax.jit
  def both(q, k, v, st_u, st_p, t):
    out_u, st_u = adaspa_attention(q, k, v, st_u, t, cfg, text_blocks=text, kv_lengths=LENGTHS)
    out_p, st_p = adaspa_attention(*(lay.pad(x) for x in (q, k, v)), st_p, t, cfg,
                                   layout=lay, kv_lengths=LENGTHS)
    return out_u, st_u, out_p, st_p

  st_u = init_state(cfg, B, S, H, text_blocks=text)
  st_p = init_state(cfg, B, S, H, layout=lay)
  for t in range(cfg.num_steps):
    out_u, st_u, out_p, st_p = both(*_qkv(t), st_u, st_p, jnp.int32(t))
    assert out_p.shape == (B, 128, H, D)
    np.testing.assert_allclose(out_p[:, :S], out_u, rtol=1e-5, atol=1e-5, err_msg=f"step {t}")
    assert not np.asarray(out_p[:, S:]).any()
    for name in ("indices", "counts", "lse", "recall", "sparsity"):
      np.testing.assert_allclose(np.asarray(getattr(st_p, name)),
                                 np.asarray(getattr(st_u, name)), rtol=1e-5, atol=1e-5,
                                 err_msg=f"step {t} {name}")


def _bf16_seq_pads(seq_len):
  """Sequence pads of bf16 q, k, v in the lowered Mosaic sparse kernel call (interpret)."""
  spec = jax.ShapeDtypeStruct((1, seq_len, 1, 64), jnp.bfloat16)
  n_q = -(-seq_len // 64)
  lists = (jax.ShapeDtypeStruct((1, 1, n_q, 1), jnp.int32),
           jax.ShapeDtypeStruct((1, 1, n_q), jnp.int32))
  call = jax.jit(lambda q, k, v, i, c: pk.block_sparse_attention(
      q, k, v, i, c, block_size=64, implementation="mosaic", interpret=True, return_lse=False))
  text = call.lower(spec, spec, spec, *lists).as_text()
  return re.findall(r"stablehlo\.pad .*\(tensor<1x(\d+)x1x64xbf16>.*-> tensor<1x(\d+)x1x64xbf16>",
                    text)


def test_seq_multiple_is_what_the_kernels_pad_to():
  """pallas_kernels exports no such constant: a sequence of SEQ_MULTIPLE x n tokens
  reaches the Mosaic kernel unpadded, another is padded to the next multiple."""
  assert _bf16_seq_pads(3 * SEQ_MULTIPLE) == []
  pads = _bf16_seq_pads(3 * SEQ_MULTIPLE - 20)
  assert pads and all(int(a) == 3 * SEQ_MULTIPLE - 20 and int(b) == 3 * SEQ_MULTIPLE
                      for a, b in pads)


def test_nnx_module_keeps_the_layout_of_its_state():
  from adaspa_jax import nnx as adaspa_nnx
  lay = BlockLayout.create(S, 16, text_span=TEXT, pad=True)
  m = adaspa_nnx.AdaSpaAttention(CFG)
  m.init_cache(B, S, H, layout=lay)
  assert m.layout == lay and m.text_span == TEXT and m.state.lse.shape == (B, H, S)
  with pytest.raises(ValueError, match=r"state\.indices"):
    m.load_state(init_state(CFG, B, 64, H), lay)
  with pytest.raises(ValueError, match="text_span"):
    m.init_cache(B, S, H, text_span=(0, 8), layout=lay)
