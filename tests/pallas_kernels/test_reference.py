import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import reference
from tests.pallas_kernels.kernel_suite import KernelSuite, make_qkv


class TestReference(KernelSuite):
  implementation = "reference"


@pytest.mark.parametrize("seq,d", [(128, 64), (333, 128)])
def test_attention_matches_jax_nn(seq, d):
  q, k, v = make_qkv(0, 2, seq, 3, d, jnp.float32)
  out, _ = reference.attention(q, k, v)
  want = jax.nn.dot_product_attention(q, k, v, implementation="xla")
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5, rtol=0)


def test_attention_kv_lengths_matches_jax_nn_on_valid_rows():
  q, k, v = make_qkv(1, 2, 100, 2, 64, jnp.float32)
  lengths = jnp.array([100, 37], jnp.int32)
  out, lse = reference.attention(q, k, v, kv_lengths=lengths)
  want = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths)
  np.testing.assert_allclose(np.asarray(out[1, :37]), np.asarray(want[1, :37]), atol=1e-5)
  assert np.all(np.asarray(out[1, 37:]) == 0)
  assert np.all(np.isneginf(np.asarray(lse[1, :, 37:])))


def _largest_intermediate(fn, *args):
  """Largest array (in elements) any equation of fn's jaxpr produces, nested ones too."""
  sizes = []

  def subjaxprs(value):
    if isinstance(value, (tuple, list)):
      for item in value:
        yield from subjaxprs(item)
    elif hasattr(value, "eqns"):
      yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
      yield value.jaxpr

  def visit(jx):
    for eqn in jx.eqns:
      sizes.extend(int(np.prod(var.aval.shape)) for var in eqn.outvars)
      for value in eqn.params.values():
        for sub in subjaxprs(value):
          visit(sub)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return max(sizes)


@pytest.mark.parametrize("op", ["attention", "block_mass", "block_sparse"])
def test_reference_never_materialises_s_by_s(op):
  s, h, d, bs = 16384, 1, 64, 64
  spec = jax.ShapeDtypeStruct((1, s, h, d), jnp.bfloat16)
  n = s // bs
  if op == "attention":
    fn = lambda q, k, v: reference.attention(q, k, v)
    args = (spec, spec, spec)
  elif op == "block_mass":
    fn = lambda q, k, lse: reference.block_mass(q, k, lse, block_size=bs)
    args = (spec, spec, jax.ShapeDtypeStruct((1, h, s), jnp.float32))
  else:
    fn = lambda q, k, v, i, c: reference.block_sparse_attention(q, k, v, i, c, block_size=bs)
    args = (spec, spec, spec, jax.ShapeDtypeStruct((1, h, n, 8), jnp.int32),
            jax.ShapeDtypeStruct((1, h, n), jnp.int32))
  assert _largest_intermediate(fn, *args) < s * s // 64


def test_unknown_implementation_raises():
  q, k, v = make_qkv(2, 1, 32, 1, 64, jnp.float32)
  with pytest.raises(ValueError, match="implementation='cuda'"):
    pk.block_mass(q, k, jnp.zeros((1, 1, 32)), block_size=16, implementation="cuda")


@pytest.mark.parametrize("bad,match", [
    (dict(q=np.zeros((2, 3, 4), np.float32)), "q has shape"),
    (dict(k=np.zeros((1, 33, 1, 64), np.float32)), "k has shape"),
    (dict(v=np.zeros((1, 32, 1, 64), np.int32)), "v has dtype"),
    (dict(kv_lengths=np.array([3, 4], np.int32)), "kv_lengths has shape"),
    (dict(sm_scale=-1.0), "sm_scale"),
])
def test_bad_inputs_raise(bad, match):
  q, k, v = [np.asarray(x) for x in make_qkv(3, 1, 32, 1, 64, jnp.float32)]
  args = dict(q=q, k=k, v=v, kv_lengths=None, sm_scale=None)
  args.update(bad)
  args = {n: (jnp.asarray(x) if isinstance(x, np.ndarray) else x) for n, x in args.items()}
  with pytest.raises(ValueError, match=match):
    reference.attention(args["q"], args["k"], args["v"], kv_lengths=args["kv_lengths"],
                        sm_scale=args["sm_scale"])


def test_dense_attention_zeroes_padding():
  q, k, v = make_qkv(4, 2, 48, 2, 64, jnp.float32)
  lengths = jnp.array([48, 20], jnp.int32)
  out = pk.dense_attention(q, k, v, kv_lengths=lengths)
  want, _ = reference.attention(q, k, v, kv_lengths=lengths)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5)
