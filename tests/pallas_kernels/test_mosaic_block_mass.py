"""The Mosaic block-mass kernel (``pallas_kernels.mosaic.block_mass_kernel``) with Pallas'
automatic barriers and with ``explicit_barriers=True``, each with 64-, 128- and 256-key
tiles (two TMA copies per 256-key stage); its argument checks; and what
``pallas_kernels.mosaic.ops`` asks of it.

Results run under JAX's GPU interpreter (CPU) against the numpy reference, from a
stale cached LSE, on ragged lengths with an odd number of key blocks. A few cases
shrink the config's ``group`` so that one short sequence spans several groups, including
a group of a single tile (prologue and epilogue only). Lowering for CUDA runs on
a CPU-only machine and covers the shapes the interpreter does not.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.mosaic import block_mass_kernel as mosaic_block_mass
from pallas_kernels.mosaic import interpreter as mosaic_interpret
from pallas_kernels.mosaic.block_mass_kernel import BlockMassConfig, block_mass_padded
from tests import numpy_ref
from tests.pallas_kernels.kernel_suite import make_qkv

TOL = 3e-2  # bf16 inputs


VARIANTS = [{}, {"explicit_barriers": True}]
VARIANT_IDS = ["auto_barriers", "explicit_barriers"]
SPLIT = {"explicit_barriers": True, "split_wgmma": True}


def _config(key_tile, stages, **fields):
  """A ``BlockMassConfig`` with Pallas' automatic barriers unless ``fields`` say otherwise."""
  return BlockMassConfig(**{"key_tile": key_tile, "stages": stages,
                            "explicit_barriers": False, **fields})


def _interpreted_mass(q, k, lse, length, *, bs, config):
  """block mass [B, H, nK, nK] of the kernel with ``config``, from a natural-log LSE."""
  b, seq, h, d = q.shape
  s_pad = -(-seq // 128) * 128
  k_pad = -(-seq // (config.key_tile or bs)) * (config.key_tile or bs)  # whole K tiles
  pad = lambda x, axis, value, n=s_pad: np.pad(
      np.asarray(x), [(0, n - seq) if a == axis else (0, 0) for a in range(x.ndim)],
      constant_values=value)
  # As pallas_kernels.mosaic.ops.log2_lse: log2 units, +inf on rows that must add nothing.
  lse2 = np.where(np.arange(seq) < length, lse / math.log(2), np.inf)
  n_blk = -(-seq // bs)
  with mosaic_interpret.device_context(True):
    chunks = block_mass_padded(
        jnp.asarray(pad(q, 1, 0)), jnp.asarray(pad(k, 1, 0, k_pad)),
        jnp.asarray(pad(lse2, 2, np.inf).astype(np.float32)), jnp.array([length], jnp.int32),
        block_size=bs, sm_scale=1 / math.sqrt(d), num_kv_blocks=n_blk, config=config,
        interpret=mosaic_interpret.params(True))
  chunks = np.asarray(chunks)
  assert not np.isnan(chunks[:, :, :, :n_blk]).any()
  # The 64-row chunks of a query block add up to its mass.
  return chunks.reshape(b, h, s_pad // bs, bs // 64, -1).sum(3)[:, :, :n_blk, :n_blk]


# (seq, length, head_dim, block_size, key_tile, stages, group): S_pad = 384, three
# CTAs (1152, nine, for the last). Group None keeps the default, 64 (one group).
CASES = [
    (300, 270, 64, 64, None, 3, None),  # 5 blocks, the ring wraps
    (300, 270, 128, 64, 128, 2, 4),  # 3 tiles of 2 blocks: groups of 2 tiles and 1
    (300, 290, 128, 64, None, 3, 2),  # groups of 2, 2 and 1 tiles
    (300, 290, 64, 128, None, 2, 2),  # 3 blocks of 128: groups of 2 tiles and 1
    (300, 280, 128, 64, 256, 2, 4),  # 5 blocks in 2 tiles of 4, one group per tile
    (300, 300, 64, 128, 256, None, None),  # 3 blocks of 128 in 2 tiles of 2
    (1100, 1000, 64, 64, 128, 3, 8),  # 18 blocks in tiles of 2: groups of 4, 4 and 1 tiles
]


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"bs{c[3]}d{c[2]}kt{c[4]}g{c[6]}")
def test_mass_variant_matches_reference(case, variant):
  seq, length, d, bs, key_tile, stages, group = case
  q, k, _ = make_qkv(41 + d + bs, 1, seq, 1, d, jnp.bfloat16)
  _, lse = numpy_ref.attention(q, k, k, (length,))
  lse = lse + np.random.default_rng(42).normal(0, 0.3, lse.shape)  # a cached, stale LSE
  config = _config(key_tile, stages, **variant, **({} if group is None else {"group": group}))
  mass = _interpreted_mass(q, k, lse, length, bs=bs, config=config)
  want = numpy_ref.block_mass(q, k, lse, bs, (length,))
  np.testing.assert_allclose(mass, want, rtol=TOL, atol=TOL * 1e-2)


# split_wgmma (two wgmmas per tile): tiles of 2 and 4 blocks, the ragged last tile's mask
# in either half, and several groups.
SPLIT_CASES = [
    (300, 280, 128, 64, 256, 2, 4),  # 5 blocks in 2 tiles of 4; tile 1's first half ragged
    (1100, 1000, 64, 128, 256, 3, 4),  # 9 blocks of 128 in tiles of 2, groups of 2 tiles;
                                       # the last tile's second half past the keys
]


@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: f"bs{c[3]}d{c[2]}kt{c[4]}g{c[6]}")
def test_split_wgmma_matches_reference(case):
  seq, length, d, bs, key_tile, stages, group = case
  q, k, _ = make_qkv(7 + d + bs, 1, seq, 1, d, jnp.bfloat16)
  _, lse = numpy_ref.attention(q, k, k, (length,))
  lse = lse + np.random.default_rng(3).normal(0, 0.3, lse.shape)
  config = _config(key_tile, stages, **SPLIT, **({} if group is None else {"group": group}))
  mass = _interpreted_mass(q, k, lse, length, bs=bs, config=config)
  want = numpy_ref.block_mass(q, k, lse, bs, (length,))
  np.testing.assert_allclose(mass, want, rtol=TOL, atol=TOL * 1e-2)


def _mass_call(bs, d, stages, key_tile, s=512, variant=VARIANTS[0]):
  """The padded kernel at abstract shapes; ``fn(*args, **fields)`` makes its config (from
  ``_config(key_tile, stages, **variant, **fields)``) when called."""
  qk = jax.ShapeDtypeStruct((1, s, 2, d), jnp.bfloat16)

  def fn(*args, **fields):
    config = _config(**{"key_tile": key_tile, "stages": stages, **variant, **fields})
    return block_mass_padded(*args, block_size=bs, sm_scale=0.125, num_kv_blocks=s // bs - 1,
                             config=config)
  return fn, (qk, qk, jax.ShapeDtypeStruct((1, 2, s), jnp.float32),
              jax.ShapeDtypeStruct((1,), jnp.int32))


@pytest.mark.parametrize("bs", [64, 128])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("key_tile,stages", [(None, None), (None, 2), (128, None), (128, 3),
                                             (256, None)])
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_mass_variant_lowers_for_cuda(bs, d, key_tile, stages, variant):
  fn, args = _mass_call(bs, d, stages, key_tile, variant=variant)
  jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("bs,key_tile,d", [(64, 128, 64), (64, 256, 128), (128, 256, 64)])
def test_split_wgmma_lowers_for_cuda(bs, d, key_tile):
  """The GPU path (two accumulators, the first read with one wgmma still in flight),
  which the interpreter does not run."""
  fn, args = _mass_call(bs, d, None, key_tile, variant=SPLIT)
  jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def test_split_wgmma_needs_two_blocks_of_a_tile():
  fn, args = _mass_call(128, 128, None, 128, variant=SPLIT)
  with pytest.raises(ValueError, match="split_wgmma=True with key_tile=128, block_size=128"):
    jax.eval_shape(fn, *args)


def test_bad_key_tile_and_short_k_raise():
  fn, args = _mass_call(128, 128, None, None, variant={})
  for bad in (64, 192, 512):  # 64 is below block_size: refused when the kernel traces
    with pytest.raises(ValueError, match=f"key_tile={bad}"):
      jax.eval_shape(functools.partial(fn, key_tile=bad), *args)
  # 256-key tiles hold 2 blocks of 128, which do not divide a group of 3.
  with pytest.raises(ValueError, match="key_tile=256: .* a divisor of group=3 key blocks"):
    jax.eval_shape(functools.partial(fn, key_tile=256, group=3), *args)
  # 3 key blocks of 128 in tiles of 256 read 512 keys; k holds 384.
  q, k, lse, lengths = args
  short = jax.ShapeDtypeStruct((1, 384, 2, 128), jnp.bfloat16)
  with pytest.raises(ValueError, match="k has 384 keys: expected at least 512"):
    jax.eval_shape(functools.partial(fn, key_tile=256), q, short, lse, lengths)


def test_rows_not_a_multiple_of_128_raise():
  fn, args = _mass_call(64, 128, None, None, s=320, variant={})
  with pytest.raises(ValueError, match="320 rows: expected a multiple of 128"):
    jax.eval_shape(fn, *args)


def test_public_block_mass_asks_for_the_module_defaults(monkeypatch):
  """``pallas_kernels.mosaic`` passes the measured defaults (256-key tiles, hand-placed
  barriers: ``DEFAULT_CONFIG``) to the kernel, and a config it is given."""
  import pallas_kernels as pk
  from pallas_kernels.mosaic import ops as mosaic
  asked = {}

  def spy(q, k, lse2, lengths, **kw):
    asked.update(kw)
    return jnp.zeros((q.shape[0], q.shape[2], q.shape[1] // 64, 64), jnp.float32)
  monkeypatch.setattr(mosaic, "block_mass_padded", spy)
  q, k, _ = make_qkv(5, 1, 130, 1, 64, jnp.bfloat16)
  pk.block_mass(q, k, jnp.zeros((1, 1, 130), jnp.float32), block_size=64,
                implementation="mosaic", interpret=True)
  assert asked["config"] is mosaic_block_mass.DEFAULT_CONFIG
  assert asked["config"].key_tile == 256
  assert asked["config"].explicit_barriers is True
  given = BlockMassConfig(key_tile=128, stages=3)
  pk.attention_with_block_mass(q, k, k, block_size=64, implementation="mosaic",
                               interpret=True)
  assert asked["config"] is mosaic_block_mass.DEFAULT_CONFIG
  mosaic.block_mass(q, k, jnp.zeros((1, 1, 130), jnp.float32), block_size=64, interpret=True,
                    config=given)
  assert asked["config"] is given
  mosaic.attention_with_block_mass(q, k, k, block_size=64, interpret=True, mass_config=given)
  assert asked["config"] is given


def test_public_block_mass_pads_k_to_whole_wide_tiles():
  """With 256-key tiles (the default), ``pallas_kernels.mosaic`` pads K to whole tiles;
  the masses do not change."""
  import pallas_kernels as pk
  assert mosaic_block_mass.DEFAULT_CONFIG.key_tile == 256
  q, k, _ = make_qkv(9, 1, 330, 2, 64, jnp.bfloat16)
  lengths = (330,)
  _, lse = numpy_ref.attention(q, k, k, lengths)
  got = pk.block_mass(q, k, jnp.asarray(lse, jnp.float32), block_size=64,
                      implementation="mosaic", interpret=True)
  want = numpy_ref.block_mass(q, k, lse, 64, lengths)
  np.testing.assert_allclose(np.asarray(got), want, rtol=TOL, atol=TOL * 1e-2)


@pytest.mark.parametrize("field,bad,want", [
    ("key_tile", 192, "None, 64, 128 or 256"), ("key_tile", 128.0, "None, 64, 128 or 256"),
    ("explicit_barriers", 1, "True or False"), ("heads_major", None, "True or False"),
    ("split_wgmma", "yes", "True or False"),
    ("stages", 1, "an int >= 2"), ("stages", True, "an int >= 2"),
    ("group", 0, "an int >= 1"), ("group", 8.0, "an int >= 1"),
    ("timing_stand_ins", ("exp",), "a tuple of distinct names"),
    ("timing_stand_ins", ("qk", "qk"), "a tuple of distinct names"),
    ("timing_stand_ins", "qk", "a tuple of distinct names")])
def test_bad_config_raises(field, bad, want):
  with pytest.raises(ValueError, match=rf"BlockMassConfig\.{field}={re.escape(repr(bad))}: "
                                       rf"expected {want}"):
    BlockMassConfig(**{field: bad})


def test_config_of_the_other_kernel_raises():
  from pallas_kernels.mosaic.block_sparse_kernel import BlockSparseConfig
  fn, args = _mass_call(64, 128, None, None)
  with pytest.raises(ValueError, match="expected a BlockMassConfig"):
    jax.eval_shape(functools.partial(block_mass_padded, block_size=64, sm_scale=0.125,
                                     num_kv_blocks=7, config=BlockSparseConfig()), *args)


def test_timing_stand_ins_replace_the_exponentials_and_the_scores():
  """Timing only: ``"exp2"`` makes each term ``1.0001 * (s * scale * log2(e) - lse2)``,
  ``"qk"`` takes every score as 0.5; both: the term of a score of 0.5."""
  seq, d, bs = 128, 64, 64
  q, k, _ = make_qkv(43, 1, seq, 1, d, jnp.bfloat16)
  lse2 = np.full((1, 1, seq), 3.0, np.float32)
  scale2 = 1 / math.sqrt(d) / math.log(2)
  scores = np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), np.asarray(k, np.float64))
  terms = {(): np.exp2(scores * scale2 - 3.0), ("exp2",): 1.0001 * (scores * scale2 - 3.0),
           ("qk",): np.full_like(scores, 2.0 ** (0.5 * scale2 - 3.0)),
           ("exp2", "qk"): np.full_like(scores, 1.0001 * (0.5 * scale2 - 3.0))}
  for stand_ins, term in terms.items():
    with mosaic_interpret.device_context(True):
      chunks = block_mass_padded(q, k, jnp.asarray(lse2), jnp.array([seq], jnp.int32),
                                 block_size=bs, sm_scale=1 / math.sqrt(d), num_kv_blocks=2,
                                 config=BlockMassConfig(timing_stand_ins=stand_ins,
                                                        key_tile=None),
                                 interpret=mosaic_interpret.params(True))
    want = term.reshape(1, 1, 2, bs, 2, bs).sum(axis=(3, 5))
    np.testing.assert_allclose(np.asarray(chunks)[:, :, :, :2], want, rtol=1e-2,
                               err_msg=str(stand_ins))
