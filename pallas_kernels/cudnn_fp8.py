"""Dense FP8 (float8_e4m3fn) attention through cuDNN: the FP8 dense baseline and a dense
path for FP8 warm-up steps (issue 25).

JAX reaches cuDNN's FP8 flash attention only through a private module,
``jax._src.cudnn.fused_attention_stablehlo.dot_product_attention(..., use_fp8=True)``
(JAX's own ``tests/fused_attention_stablehlo_test.py`` calls it that way). We write the
quantisation around it; cuDNN does the attention. Being private, it is imported lazily
and guarded: ``unsupported_reason`` says why it cannot run (no Hopper GPU, the module or
its ``use_fp8`` argument gone, padding it does not take), and ``pallas_kernels.api``
then falls back to another FP8 implementation instead of failing.

What cuDNN's FP8 forward takes: e4m3 Q, K, V in [B, S, H, D] with ONE descale factor per
tensor (float32 [1, 1, 1, 1]; a tensor is ``x8 * descale``), the scale P is multiplied by
before its own e4m3 cast (``scale_s``, and ``descale_s`` to undo it) and the scale of
the e4m3 output (``scale_o``). It takes no sequence lengths, so padded batches are not
for it. The recipe (``quantize``), matching ``pallas_kernels.reference.fp8`` where a
per-tensor scale allows:

* K smoothed: its mean over tokens per (batch, head, channel) is subtracted, which
  leaves the softmax unchanged and shrinks K's amax (video DiTs' K carries a
  channel-wise offset).
* Q, K, V per tensor: ``descale = amax / 448`` (448: e4m3's largest finite value).
* P with the fixed scale 448 (P <= 1 after the max subtraction): ``scale_s = 448``.
* The output is e4m3 too: since |O| <= max |V| per channel, ``scale_o = 448 / amax(V)``
  can not overflow; we return ``o8 / scale_o`` in bf16. The e4m3 output is this path's
  main error (3 mantissa bits: about 2^-4 relative per element; output cosine against
  float32 ~0.998-0.999), which the Mosaic FP8 kernel, writing bf16, does not have.

``emulate`` is the same computation in jnp on any device (each cast where cuDNN casts,
float32 between), for the CPU tests and for comparing against cuDNN on the GPU; it is not
bit-exact with cuDNN (cuDNN's exp, accumulation order and reduced-precision FP8 MMA
accumulation differ).
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

from pallas_kernels import validation

FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = 448.0
_PRIVATE = "jax._src.cudnn.fused_attention_stablehlo"
# Every key check_fp8_params asks for; the forward reads six of them (the rest are the
# backward pass's and stay 1).
_PARAM_KEYS = ("amax_dQ", "amax_dK", "amax_dV", "amax_dP", "descale_q", "descale_k",
               "descale_v", "descale_s", "scale_s", "scale_o", "descale_o", "descale_dO",
               "descale_dP", "scale_dQ", "scale_dK", "scale_dV", "scale_dP")


def _to_fp8(x):
  return jnp.clip(x, -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)


def _descale(x):
  """float32 [1, 1, 1, 1]: amax / 448 (1 for an all-zero tensor)."""
  amax = jnp.max(jnp.abs(x))
  return jnp.where(amax > 0, amax / FP8_MAX, 1.0).reshape(1, 1, 1, 1).astype(jnp.float32)


def quantize(q, k, v, *, smooth=True):
  """The e4m3 operands and the cuDNN FP8 parameters of the module docstring.

  Args:
    q, k, v: [B, S, H, D] float.
    smooth: subtract K's mean over tokens first.

  Returns:
    (q8, k8, v8, params): e4m3 [B, S, H, D] each and a dict of float32 [1, 1, 1, 1]
    with every key cuDNN's FP8 call checks for.
  """
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  if smooth:
    k = k - k.mean(axis=1, keepdims=True)
  dq, dk, dv = _descale(q), _descale(k), _descale(v)
  one = jnp.ones((1, 1, 1, 1), jnp.float32)
  params = dict.fromkeys(_PARAM_KEYS, one)
  params.update(descale_q=dq, descale_k=dk, descale_v=dv,
                descale_s=one / FP8_MAX, scale_s=one * FP8_MAX,
                scale_o=one / dv,  # = 448 / amax(v)
                descale_o=dv)
  return _to_fp8(q / dq), _to_fp8(k / dk), _to_fp8(v / dv), params


@functools.cache
def _private_api():
  """cuDNN's FP8 entry point, or a string saying why it is missing."""
  try:
    mod = importlib.import_module(_PRIVATE)
  except ImportError as e:
    return f"{_PRIVATE} does not import ({e})"
  fn = getattr(mod, "dot_product_attention", None)
  if fn is None:
    return f"{_PRIVATE}.dot_product_attention is gone"
  try:
    import inspect  # pylint: disable=import-outside-toplevel
    if "use_fp8" not in inspect.signature(fn).parameters:
      return f"{_PRIVATE}.dot_product_attention takes no use_fp8"
  except (TypeError, ValueError):
    pass
  return fn


def unsupported_reason(q=None, kv_lengths=None) -> str | None:
  """None when cuDNN FP8 attention can run here on these arguments, else why not (the
  arguments are looked at first, then the device and the private API)."""
  if kv_lengths is not None:
    return "cuDNN FP8 attention takes no sequence lengths (kv_lengths was given)"
  if q is not None and q.shape[-1] not in (64, 128):
    return f"head_dim={q.shape[-1]}: cuDNN FP8 attention is used at head_dim 64 or 128"
  dev = jax.devices()[0]
  if dev.platform != "gpu":
    return f"cuDNN FP8 attention needs a GPU (the default device is {dev.platform})"
  cc = str(getattr(dev, "compute_capability", "0"))
  if not cc.startswith("9"):
    return f"cuDNN FP8 attention is used on Hopper (sm90) only, not compute capability {cc}"
  api = _private_api()
  if isinstance(api, str):
    return api
  return None


def dense_attention(q, k, v, *, sm_scale=None, smooth=True):
  """Dense attention on cuDNN's FP8 kernel.

  Args:
    q, k, v: [B, S, H, D] float (quantised here, ``quantize``).
    sm_scale: softmax scale (default 1/sqrt(D)).
    smooth: subtract K's mean over tokens before quantising.

  Returns:
    out [B, S, H, D] in q's dtype (from cuDNN's e4m3 output).

  Raises:
    ValueError: where ``unsupported_reason`` names a reason.
  """
  _, _, _, d = validation.check_qkv(q, k, v)
  why = unsupported_reason(q)
  if why is not None:
    raise ValueError(f"cuDNN FP8 attention cannot run here: {why}.")
  scale = validation.default_scale(sm_scale, d)
  q8, k8, v8, params = quantize(q, k, v, smooth=smooth)
  out8, _, _ = _private_api()(q8, k8, v8, fp8_params=params, scale=scale, use_fp8=True)
  return (out8.astype(jnp.float32) * params["descale_o"]).astype(q.dtype)


def emulate(q, k, v, *, sm_scale=None, smooth=True):
  """``dense_attention``'s numerics in jnp (float32 between the casts), any device.

  Returns out [B, S, H, D] in q's dtype.
  """
  _, _, _, d = validation.check_qkv(q, k, v)
  scale = validation.default_scale(sm_scale, d)
  q8, k8, v8, params = quantize(q, k, v, smooth=smooth)
  p = {name: x.reshape(()) for name, x in params.items()}  # the [1, 1, 1, 1] scalars
  hi = jax.lax.Precision.HIGHEST
  s = jnp.einsum("bqhd,bkhd->bhqk", q8.astype(jnp.float32), k8.astype(jnp.float32),
                 precision=hi) * (p["descale_q"] * p["descale_k"] * scale)
  probs = jnp.exp(s - s.max(axis=-1, keepdims=True))
  l = probs.sum(axis=-1)
  p8 = _to_fp8(probs * p["scale_s"])
  o = jnp.einsum("bhqk,bkhd->bqhd", p8.astype(jnp.float32), v8.astype(jnp.float32),
                 precision=hi)
  o = o * (p["descale_s"] * p["descale_v"])
  o = o / jnp.transpose(l, (0, 2, 1))[..., None]
  o8 = _to_fp8(o * p["scale_o"])
  return (o8.astype(jnp.float32) * p["descale_o"]).astype(q.dtype)
