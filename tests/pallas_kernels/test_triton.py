"""The Pallas Triton kernels, in interpret mode on CPU, against float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pallas_kernels.triton import ops as tk
from pallas_kernels.triton.block_mass_kernel import BlockMassConfig
from pallas_kernels.triton.block_sparse_kernel import BlockSparseConfig
from tests import numpy_ref
from tests.pallas_kernels.kernel_suite import KernelSuite, make_qkv, rows_valid


class TestTriton(KernelSuite):
  implementation = "triton"
  interpret = True


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled Triton kernels need a GPU")
class TestTritonCompiled(KernelSuite):
  """The same suite through the compiled kernels (default tiles, approximate exp2)."""
  implementation = "triton"
  interpret = False


_TOL = {jnp.float32: (2e-5, 2e-5, 1e-4), jnp.bfloat16: (3e-2, 2e-2, 3e-2)}


def _check_attention(out, lse, want_out, want_lse, dtype, valid):
  out_tol, lse_tol, _ = _TOL[dtype]
  out = np.asarray(out, np.float64)
  lse = np.asarray(lse, np.float64)
  assert not np.isnan(out).any() and not np.isnan(lse).any()
  np.testing.assert_allclose(out, want_out, atol=out_tol, rtol=0)
  assert np.all(out[~valid] == 0)
  finite = np.isfinite(want_lse)
  np.testing.assert_array_equal(np.isfinite(lse), finite)
  np.testing.assert_allclose(lse[finite], want_lse[finite], atol=lse_tol, rtol=0)


def _sparse(q, k, v, idx, cnt, bs, lengths=None, config=None):
  lens = None if lengths is None else jnp.asarray(lengths, jnp.int32)
  return tk.block_sparse_attention(q, k, v, jnp.asarray(idx), jnp.asarray(cnt), block_size=bs,
                                   kv_lengths=lens, config=config, interpret=True)


@pytest.mark.parametrize("config", [BlockSparseConfig(block_q=16, block_k=32),
                                    BlockSparseConfig(block_q=32, block_k=16, prefetch=True)],
                         ids=["q16k32", "q32k16_prefetch"])
def test_sub_block_tiles_match_reference(config):
  # Tiles smaller than the selection block: several query programs share a list
  # and each listed block is walked in several key steps.
  b, s, h, d, bs, lengths = 1, 150, 2, 64, 64, (101,)
  q, k, v = make_qkv(20, b, s, h, d, jnp.float32)
  idx, cnt = numpy_ref.random_block_lists(np.random.default_rng(21), b, h, 3, 2)
  out, lse = _sparse(q, k, v, idx, cnt, bs, lengths, config)
  want_out, want_lse = numpy_ref.block_sparse_attention(q, k, v, idx, cnt, bs, lengths)
  _check_attention(out, lse, want_out, want_lse, jnp.float32, rows_valid(b, s, lengths))


def test_dense_rows_short_lists_and_garbage_slots():
  # K_max = 2 < nK = 7; rows with count >= nK carry garbage ids that must not be read;
  # counts 1 and K_max sit beside them.
  b, s, h, d, bs = 2, 112, 3, 64, 16
  n_blk, k_max = 7, 2
  q, k, v = make_qkv(22, b, s, h, d, jnp.bfloat16)
  rng = np.random.default_rng(23)
  idx = np.stack([np.sort(rng.choice(n_blk, k_max, replace=False))
                  for _ in range(b * h * n_blk)]).reshape(b, h, n_blk, k_max).astype(np.int32)
  cnt = rng.integers(1, k_max + 1, (b, h, n_blk)).astype(np.int32)
  cnt[0, 0, 0] = 1
  dense = rng.random((b, h, n_blk)) < 0.3
  dense[1, 2, 3] = True
  cnt[dense] = np.where(rng.random(dense.sum()) < 0.5, n_blk, n_blk + 5)
  idx[dense] = np.array([-7, 10**6], np.int32)
  out, lse = _sparse(q, k, v, idx, cnt, bs)
  want_out, want_lse = numpy_ref.block_sparse_attention(q, k, v, idx, cnt, bs)
  _check_attention(out, lse, want_out, want_lse, jnp.bfloat16, rows_valid(b, s, None))


def test_lengths_empty_batch_and_rows_without_valid_keys():
  # Batch element 0 has no valid token at all; in element 1 some query blocks list
  # only blocks past its length: their valid rows see no key -> 0 and LSE -inf.
  b, s, h, d, bs, lengths = 2, 128, 2, 64, 32, (0, 45)
  q, k, v = make_qkv(24, b, s, h, d, jnp.float32)
  idx = np.zeros((b, h, 4, 2), np.int32)
  idx[..., 0], idx[..., 1] = 2, 3
  idx[1, 0, 1] = (0, 3)
  cnt = np.full((b, h, 4), 2, np.int32)
  out, lse = _sparse(q, k, v, idx, cnt, bs, lengths)
  want_out, want_lse = numpy_ref.block_sparse_attention(q, k, v, idx, cnt, bs, lengths)
  assert np.isneginf(want_lse[1, 1, :32]).all()
  _check_attention(out, lse, want_out, want_lse, jnp.float32, rows_valid(b, s, lengths))
  mass = tk.block_mass(q, k, jnp.zeros((b, h, s), jnp.float32), block_size=bs,
                       kv_lengths=jnp.asarray(lengths, jnp.int32), interpret=True)
  assert np.all(np.asarray(mass)[0] == 0)
  np.testing.assert_allclose(np.asarray(mass),
                             numpy_ref.block_mass(q, k, np.zeros((b, h, s)), bs, lengths),
                             rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("config,bs", [(BlockMassConfig(block_q=16, block_k=16), 32),
                                       (BlockMassConfig(block_q=128, block_k=128, prefetch=True),
                                        32)],
                         ids=["tiles_below_block", "tiles_above_block_prefetch"])
def test_block_mass_tiles(config, bs):
  b, s, h, d, lengths = 2, 200, 2, 64, (200, 131)
  q, k, _ = make_qkv(25, b, s, h, d, jnp.float32)
  _, lse = numpy_ref.attention(q, k, k, lengths)
  mass = tk.block_mass(q, k, jnp.asarray(lse, jnp.float32), block_size=bs,
                       kv_lengths=jnp.asarray(lengths, jnp.int32), interpret=True, config=config)
  np.testing.assert_allclose(np.asarray(mass), numpy_ref.block_mass(q, k, lse, bs, lengths),
                             rtol=1e-4, atol=1e-6)


def test_dense_attention_odd_head_dim():
  # D = 80 is padded to 128 inside; lengths shorter than the sequence.
  b, s, h, d, lengths = 2, 90, 2, 80, (90, 33)
  q, k, v = make_qkv(26, b, s, h, d, jnp.bfloat16)
  out, lse = tk.attention(q, k, v, kv_lengths=jnp.asarray(lengths, jnp.int32), interpret=True)
  assert out.shape == q.shape
  want_out, want_lse = numpy_ref.attention(q, k, v, lengths)
  _check_attention(out, lse, want_out, want_lse, jnp.bfloat16, rows_valid(b, s, lengths))


@settings(max_examples=3, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), seq=st.integers(20, 140), heads=st.integers(1, 3),
       bs=st.sampled_from([16, 32]), d=st.sampled_from([64, 128]),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16]), cut=st.floats(0.3, 1.0))
def test_random_shapes(seed, seq, heads, bs, d, dtype, cut):
  b = 2
  lengths = (seq, max(1, int(seq * cut)))
  q, k, v = make_qkv(seed, b, seq, heads, d, dtype)
  n_blk = -(-seq // bs)
  idx, cnt = numpy_ref.random_block_lists(np.random.default_rng(seed), b, heads, n_blk,
                                          max(1, n_blk // 2))
  out, lse = _sparse(q, k, v, idx, cnt, bs, lengths)
  want_out, want_lse = numpy_ref.block_sparse_attention(q, k, v, idx, cnt, bs, lengths)
  _check_attention(out, lse, want_out, want_lse, dtype, rows_valid(b, seq, lengths))


def _lower_for_cuda(fn, *specs):
  """StableHLO text of fn lowered for CUDA: runs the Pallas -> Triton IR lowering on CPU."""
  return jax.jit(fn).trace(*specs).lower(lowering_platforms=("cuda",)).as_text()


@pytest.fixture
def verify_triton_modules(monkeypatch):
  """Runs the MLIR verifier on every Triton module the lowering builds.

  The GPU compiler verifies the module when it parses it; the lowering alone
  does not, so an ill-typed module (e.g. an i1 loop bound) would pass here
  unnoticed without this.
  """
  from jax._src.pallas.triton import lowering  # pylint: disable=g-import-not-at-top
  original = lowering.lower_jaxpr_to_triton_module
  count = []

  def lower_and_verify(*args, **kwargs):
    result = original(*args, **kwargs)
    assert result.module.operation.verify()
    count.append(1)
    return result

  monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
  return count


def test_kernels_lower_to_triton_at_benchmark_tiles(verify_triton_modules):
  # Interpret mode never runs the Triton lowering; this does, at the shapes and
  # tiles the GPU benchmark uses, so a kernel that cannot lower fails on CPU.
  b, s, h, d, bs = 1, 8192, 2, 128, 64
  x = jax.ShapeDtypeStruct((b, s, h, d), jnp.bfloat16)
  n = s // bs
  idx = jax.ShapeDtypeStruct((b, h, n, 13), jnp.int32)
  cnt = jax.ShapeDtypeStruct((b, h, n), jnp.int32)
  lse = jax.ShapeDtypeStruct((b, h, s), jnp.float32)
  lens = jax.ShapeDtypeStruct((b,), jnp.int32)
  texts = [
      _lower_for_cuda(lambda q, k, v, i, c: tk.block_sparse_attention(
          q, k, v, i, c, block_size=bs), x, x, x, idx, cnt),
      _lower_for_cuda(lambda q, k, v, i, c, n: tk.block_sparse_attention(
          q, k, v, i, c, block_size=bs, kv_lengths=n, config=BlockSparseConfig(32, 16)),
          x, x, x, idx, cnt, lens),
      _lower_for_cuda(lambda q, k, v: tk.attention_with_block_mass(q, k, v, block_size=bs),
                      x, x, x),
      _lower_for_cuda(lambda q, k, l: tk.block_mass(q, k, l, block_size=16,
                                                    config=BlockMassConfig(128, 64)), x, x, lse),
      _lower_for_cuda(lambda q, k, v, i, c: tk.block_sparse_attention(
          q, k, v, i, c, block_size=bs, config=BlockSparseConfig(fast_exp2=True)),
          x, x, x, idx, cnt),
      _lower_for_cuda(lambda q, k, l: tk.block_mass(
          q, k, l, block_size=bs, config=BlockMassConfig(128, 64, fast_exp2=True, prefetch=True)),
          x, x, lse),
      _lower_for_cuda(lambda q, k, v, i, c: tk.block_sparse_attention(
          q, k, v, i, c, block_size=bs, config=BlockSparseConfig(block_k=32, prefetch=True)),
          x, x, x, idx, cnt),
      _lower_for_cuda(lambda q, k, v: tk.attention(q, k, v,
                                                   config=BlockSparseConfig(128, 64, 8, 3)),
                      x, x, x),
  ]
  for text in texts:
    assert "triton" in text and "stablehlo.custom_call" in text
  assert len(verify_triton_modules) == len(texts) + 1  # the fused search lowers two kernels


@pytest.mark.parametrize("cls", [BlockSparseConfig, BlockMassConfig])
@pytest.mark.parametrize("field,bad,want", [
    ("block_q", 48, "a power of two >= 16"), ("block_k", 8, "a power of two >= 16"),
    ("block_q", 64.0, "a power of two >= 16"), ("num_warps", 3, "1, 2, 4, 8 or 16"),
    ("num_stages", 0, "an int >= 1"), ("fast_exp2", 1, "True or False"),
    ("prefetch", None, "True or False")])
def test_bad_config_raises(cls, field, bad, want):
  with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field}={bad!r}: expected {want}"):
    cls(**{field: bad})


def test_config_of_the_other_kernel_raises():
  q, k, v = make_qkv(27, 1, 64, 1, 64, jnp.float32)
  idx, cnt = numpy_ref.random_block_lists(np.random.default_rng(28), 1, 1, 4, 2)
  with pytest.raises(ValueError, match="expected a BlockSparseConfig"):
    _sparse(q, k, v, idx, cnt, 16, config=BlockMassConfig())
  with pytest.raises(ValueError, match="expected a BlockMassConfig"):
    tk.block_mass(q, k, jnp.zeros((1, 1, 64), jnp.float32), block_size=16, interpret=True,
                  config=BlockSparseConfig())


def test_default_configs_are_the_swept_tiles():
  """What ``ops`` passes when no config is given (docs/log/triton.md)."""
  from pallas_kernels.triton import block_mass_kernel, block_sparse_kernel
  assert block_sparse_kernel.DEFAULT_CONFIG == BlockSparseConfig(64, 64, 4, 2, True, True)
  assert block_sparse_kernel.DEFAULT_DENSE_CONFIG == BlockSparseConfig(128, 128, 8, 3, True)
  assert block_mass_kernel.DEFAULT_CONFIG == BlockMassConfig(128, 64, 4, 3, True)
