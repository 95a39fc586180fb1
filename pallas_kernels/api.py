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

``precision`` (``block_sparse_attention`` and ``dense_attention``): "bf16" (default),
"fp8", the FP8 recipe of ``pallas_kernels.reference.fp8`` (Q, K per block, P, and V
per channel in float8_e4m3fn, float32 accumulation), or "int8_fp8", the same with Q and
K in int8 (SageAttention2's INT8 Q.K^T / FP8 P.V split: about 4x less score error). An
implementation serves the 8-bit precisions when its module provides
``fp8_block_sparse_attention`` and ``fp8_dense_attention`` (reference, mosaic), called with
``qk_dtype`` = ``reference.fp8.QK_DTYPES[precision]``; dense "fp8" is cuDNN's FP8 kernel
where it runs (``pallas_kernels.cudnn_fp8``), else the implementation's
``fp8_dense_attention`` (always for "int8_fp8": cuDNN has no INT8 attention). The search
passes (block mass) stay in the inputs' dtype: their mass chooses the lists.

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


def _check_fp8(implementation, precision):
  """ValueError unless the implementation serves the 8-bit ``precision`` (its module
  provides ``fp8_block_sparse_attention`` and ``fp8_dense_attention``)."""
  name, mod = resolve(implementation)
  if not hasattr(mod, "fp8_block_sparse_attention"):
    has = [n for n in IMPLEMENTATIONS if n == name or _has(n)]
    fp8 = [n for n in has if hasattr(_module(n), "fp8_block_sparse_attention")]
    raise ValueError(f"precision={precision!r} with implementation={name!r}: expected one "
                     f"of {fp8}.")


def _qk_dtype(precision):
  from pallas_kernels.reference import fp8  # pylint: disable=import-outside-toplevel
  return fp8.QK_DTYPES[precision]


def block_sparse_attention(q, k, v, kv_block_indices, kv_block_counts, *, block_size,
                           kv_lengths=None, sm_scale=None, return_lse=True,
                           implementation=None, interpret=False, debug_checks=False,
                           query_block_size=None, precision="bf16"):
  """Block-sparse flash attention; see ``reference.block_sparse_attention``.

  Concrete lists and lengths are checked (ValueError naming the first bad entry);
  traced ones are kept in bounds (``validation.safe_block_lists``) and, with
  ``debug_checks``, checked with ``checkify`` (run under ``checkify.checkify``).
  ``query_block_size``: rows per list row (None: ``block_size``); ``precision``:
  "bf16", "fp8" or "int8_fp8"; see the module docstring.
  """
  validation.check_query_block_size(query_block_size, block_size)
  validation.check_precision(precision)
  if debug_checks:
    validation.debug_checks(kv_lengths=kv_lengths, seq=q.shape[1], indices=kv_block_indices,
                            counts=kv_block_counts,
                            num_kv_blocks=validation.num_blocks(q.shape[1], block_size))
  if precision in validation.EIGHT_BIT_PRECISIONS:
    _check_fp8(implementation, precision)
    out, lse = _call("fp8_block_sparse_attention", implementation, interpret, q, k, v,
                     kv_block_indices, kv_block_counts, block_size=block_size,
                     kv_lengths=kv_lengths, sm_scale=sm_scale,
                     query_block_size=query_block_size, qk_dtype=_qk_dtype(precision))
    return (out, lse) if return_lse else out
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


def _dense_fp8(q, k, v, kv_lengths, scale, implementation, block_size, interpret,
               precision):
  """``dense_attention`` at an 8-bit ``precision`` (see there)."""
  from pallas_kernels import cudnn_fp8  # pylint: disable=import-outside-toplevel
  if implementation in (None, "cudnn"):
    why = ("cuDNN has no INT8 attention" if precision == "int8_fp8"
           else cudnn_fp8.unsupported_reason(q, kv_lengths))
    if why is None:
      return cudnn_fp8.dense_attention(q, k, v, sm_scale=scale)
    if implementation == "cudnn":
      raise ValueError(f"implementation='cudnn' with precision={precision!r}: {why}.")
    implementation = None  # the device's 8-bit implementation, every row dense
  if implementation == "xla":
    raise ValueError(f"implementation='xla' with precision={precision!r}: expected None, "
                     "'cudnn', 'reference' or 'mosaic'.")
  _check_fp8(implementation, precision)
  bs = 64 if block_size is None else validation.check_block_size(block_size)
  out, _ = _call("fp8_dense_attention", implementation, interpret, q, k, v, block_size=bs,
                 kv_lengths=kv_lengths, sm_scale=scale, qk_dtype=_qk_dtype(precision))
  return out


def dense_attention(q, k, v, *, kv_lengths=None, sm_scale=None, implementation=None,
                    debug_checks=False, precision="bf16", block_size=None, interpret=False):
  """Dense attention without LSE: cuDNN on GPU where it applies, else XLA.

  Padded query rows (at or past ``kv_lengths``) are zero, as in every kernel.

  Args:
    q, k, v: [B, S, H, D].
    implementation: None (cuDNN for bf16/f16 on GPU, XLA otherwise), "cudnn",
      "xla" or "reference"; with an 8-bit precision also "mosaic".
    precision: "bf16", "fp8" or "int8_fp8". "fp8" with None runs cuDNN's FP8 kernel
      where ``cudnn_fp8.unsupported_reason`` finds none (Hopper, no kv_lengths, head_dim
      64 or 128), else (and "int8_fp8" always) the device's 8-bit block-sparse
      implementation with every row dense (the reference recipe off the GPU).
    block_size: 8-bit only: tokens per Q / K scale block of the fallback (None: 64).
    interpret: 8-bit Pallas fallback only: interpret mode (CPU tests).
  Returns:
    out [B, S, H, D] in q's dtype.
  """
  b, s, h, d = validation.check_qkv(q, k, v)
  kv_lengths = validation.check_kv_lengths(kv_lengths, b, s)
  validation.check_precision(precision)
  if debug_checks and kv_lengths is not None:
    validation.debug_checks(kv_lengths=kv_lengths, seq=s)
  scale = validation.default_scale(sm_scale, d)
  if precision in validation.EIGHT_BIT_PRECISIONS:  # rows past kv_lengths: zero there
    return _dense_fp8(q, k, v, kv_lengths, scale, implementation, block_size, interpret,
                      precision)
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
