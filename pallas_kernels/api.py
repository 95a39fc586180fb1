"""One signature per op, several implementations behind it (``implementation=``).

Implementations:
  * ``"reference"``: pure jnp (``pallas_kernels.reference``), any device.
  * ``"triton"``: Pallas with the Triton lowering, any recent NVIDIA GPU; runs on
    CPU with ``interpret=True``.
  * ``"mosaic"``: Pallas Mosaic GPU (TMA + wgmma), Hopper (sm90); runs on CPU
    under JAX's GPU interpreter with ``interpret=True``.

``implementation=None`` picks the fastest path available on the default device:
mosaic on sm90, triton on other NVIDIA GPUs, the reference elsewhere.
An implementation module provides ``block_sparse_attention``, ``block_mass`` and
``attention_with_block_mass`` with the reference's signatures plus ``interpret``.

``query_block_size`` (every op; None: ``block_size``): rows per query block when
they differ from the ``block_size`` keys of a key block, e.g. 128 x 64. Lists are
then [B, H, nQ, K_max] with nQ = ceil(S / query_block_size) and entries key-block
ids of ``block_size`` keys; a block mass is [B, H, nQ, nK]. See
``pallas_kernels.query_blocks``.
"""

from __future__ import annotations

import functools
import importlib

import jax

from pallas_kernels import validation

IMPLEMENTATIONS = {
    "reference": "pallas_kernels.reference",
    "triton": "pallas_kernels.triton",
    "mosaic": "pallas_kernels.mosaic",
}


@functools.cache
def _module(name):
  return importlib.import_module(IMPLEMENTATIONS[name])


def _gpu_compute_capability():
  dev = jax.devices()[0]
  if dev.platform != "gpu":
    return None
  cc = getattr(dev, "compute_capability", None)
  try:
    return tuple(int(x) for x in str(cc).split("."))
  except ValueError:
    return (0, 0)


def default_implementation() -> str:
  cc = _gpu_compute_capability()
  if cc is None:
    return "reference"
  if cc[0] == 9 and _has("mosaic"):
    return "mosaic"
  return "triton" if _has("triton") else "reference"


@functools.cache
def _has(name) -> bool:
  try:
    _module(name)
  except ImportError:
    return False
  return True


def resolve(implementation):
  """Returns the implementation module for a name (None = default for the device)."""
  if implementation is None:
    implementation = default_implementation()
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"implementation={implementation!r}: expected one of {sorted(IMPLEMENTATIONS)} or None.")
  return implementation, _module(implementation)


def _call(op, implementation, interpret, *args, **kwargs):
  name, mod = resolve(implementation)
  if name != "reference":
    kwargs["interpret"] = interpret
  return getattr(mod, op)(*args, **kwargs)


def block_sparse_attention(q, k, v, kv_block_indices, kv_block_counts, *, block_size,
                           kv_lengths=None, sm_scale=None, return_lse=True,
                           implementation=None, interpret=False, debug_checks=False,
                           query_block_size=None):
  """Block-sparse flash attention; see ``reference.block_sparse_attention``.

  Concrete lists and lengths are checked (ValueError naming the first bad entry);
  traced ones are kept in bounds (``validation.safe_block_lists``) and, with
  ``debug_checks``, checked with ``checkify`` (run under ``checkify.checkify``).
  ``query_block_size``: rows per list row (None: ``block_size``); see the module
  docstring.
  """
  validation.check_query_block_size(query_block_size, block_size)
  if debug_checks:
    validation.debug_checks(kv_lengths=kv_lengths, seq=q.shape[1], indices=kv_block_indices,
                            counts=kv_block_counts,
                            num_kv_blocks=validation.num_blocks(q.shape[1], block_size))
  return _call("block_sparse_attention", implementation, interpret, q, k, v,
               kv_block_indices, kv_block_counts, block_size=block_size,
               kv_lengths=kv_lengths, sm_scale=sm_scale, return_lse=return_lse,
               query_block_size=query_block_size)


def block_mass(q, k, lse, *, block_size, kv_lengths=None, sm_scale=None,
               implementation=None, interpret=False, debug_checks=False,
               query_block_size=None):
  """Per-block softmax mass from a given LSE; see ``reference.block_mass``
  ([B, H, nQ, nK], nQ at ``query_block_size``)."""
  validation.check_query_block_size(query_block_size, block_size)
  if debug_checks:
    validation.debug_checks(kv_lengths=kv_lengths, seq=q.shape[1])
  return _call("block_mass", implementation, interpret, q, k, lse, block_size=block_size,
               kv_lengths=kv_lengths, sm_scale=sm_scale, query_block_size=query_block_size)


def attention_with_block_mass(q, k, v, *, block_size, kv_lengths=None, sm_scale=None,
                              implementation=None, interpret=False, debug_checks=False,
                              query_block_size=None):
  """Fused search: dense output, LSE and block mass; see the reference."""
  validation.check_query_block_size(query_block_size, block_size)
  if debug_checks:
    validation.debug_checks(kv_lengths=kv_lengths, seq=q.shape[1])
  return _call("attention_with_block_mass", implementation, interpret, q, k, v,
               block_size=block_size, kv_lengths=kv_lengths, sm_scale=sm_scale,
               query_block_size=query_block_size)


def dense_attention(q, k, v, *, kv_lengths=None, sm_scale=None, implementation=None,
                    debug_checks=False):
  """Dense attention without LSE: cuDNN on GPU where it applies, else XLA.

  Padded query rows (at or past ``kv_lengths``) are zero, as in every kernel.

  Args:
    q, k, v: [B, S, H, D].
    implementation: None (cuDNN for bf16/f16 on GPU, XLA otherwise), "cudnn",
      "xla" or "reference".
  Returns:
    out [B, S, H, D] in q's dtype.
  """
  b, s, h, d = validation.check_qkv(q, k, v)
  kv_lengths = validation.check_kv_lengths(kv_lengths, b, s)
  if debug_checks and kv_lengths is not None:
    validation.debug_checks(kv_lengths=kv_lengths, seq=s)
  scale = validation.default_scale(sm_scale, d)
  if implementation == "reference":
    return _module("reference").attention(q, k, v, kv_lengths=kv_lengths, sm_scale=scale)[0]
  if implementation not in (None, "cudnn", "xla"):
    raise ValueError(
        f"implementation={implementation!r}: expected None, 'cudnn', 'xla' or 'reference'.")
  if implementation is None:
    on_gpu = _gpu_compute_capability() is not None
    implementation = "cudnn" if on_gpu and q.dtype != jax.numpy.float32 else "xla"
  out = jax.nn.dot_product_attention(
      q, k, v, scale=scale, query_seq_lengths=kv_lengths, key_value_seq_lengths=kv_lengths,
      implementation=implementation)
  if kv_lengths is not None:
    rows = jax.numpy.arange(s)[None, :, None, None] < kv_lengths[:, None, None, None]
    out = jax.numpy.where(rows, out, 0).astype(q.dtype)
  return out
