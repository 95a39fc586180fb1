"""Determinism and memory checks of the kernels and of one AdaSpa layer (issue 24).

Two checks, both pure functions returning JSON-ready dicts (``experiments/check_gpu.py``
runs them on the GPU and writes the JSON; ``docs/benchmarks.md`` has the results):

* ``determinism``: every op of every implementation available on the device, called twice
  on the same inputs under the same compiled function, gives bitwise-equal outputs. Also
  the full AdaSpa cycle (warm-up, search, sparse) of ``adaspa_attention``.
* ``memory``: one attention layer at S tokens runs every AdaSpa phase (dense warm-up,
  the first search with its fused dense pass, a sparse step) with the state of a whole
  model (``num_layers`` layers) resident on the device, as a scan over the layers keeps it.
  Reports ``state_nbytes`` (computed) beside what the device measured: the bytes in use
  once the state and q/k/v are allocated, XLA's temporary workspace per phase
  (``memory_analysis``) and the allocator's peak. ``largest_seq_len`` solves the same
  accounting for the longest sequence a card of a given size holds.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adaspa_jax import state as state_lib
from adaspa_jax.attention import adaspa_attention
from adaspa_jax.config import AdaSpaConfig
from pallas_kernels import api


def _bits(tree) -> list[bytes]:
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def available_implementations() -> list[str]:
  """The implementations that compile on the default device (reference always)."""
  names = ["reference"]
  if jax.devices()[0].platform == "gpu":
    names.append("triton")
    if api.default_implementation() == "mosaic":
      names.append("mosaic")
  return names


def _random_lists(key, b, h, n_blk, k_max):
  """Duplicate-free random read lists with random counts (some rows dense)."""
  ka, kb = jax.random.split(key)
  scores = jax.random.uniform(ka, (b, h, n_blk, n_blk))
  order = jnp.argsort(scores, axis=-1)[..., :k_max].astype(jnp.int32)
  counts = jax.random.randint(kb, (b, h, n_blk), 1, k_max + 1).astype(jnp.int32)
  counts = counts.at[:, :, 0].set(n_blk)  # dense first row
  return order, counts


def determinism(*, batch: int = 1, seq_len: int = 4_160, heads: int = 4, head_dim: int = 128,
                block_size: int = 64, dtype=jnp.bfloat16, implementations=None,
                seed: int = 0) -> dict:
  """Runs each op twice per implementation; returns {impl: {op: bitwise_equal}}.

  The lengths are not a multiple of the block (``seq_len`` - 17 valid keys in row 0)."""
  impls = available_implementations() if implementations is None else list(implementations)
  keys = jax.random.split(jax.random.key(seed), 4)
  q, k, v = (jax.random.normal(kk, (batch, seq_len, heads, head_dim), jnp.float32).astype(dtype)
             for kk in keys[:3])
  n_blk = -(-seq_len // block_size)
  idx, cnt = _random_lists(keys[3], batch, heads, n_blk, max(1, n_blk // 4))
  lengths = jnp.full((batch,), seq_len, jnp.int32).at[0].set(seq_len - 17)
  lse = api.attention_with_block_mass(q, k, v, block_size=block_size, kv_lengths=lengths,
                                      implementation="reference")[1]
  out: dict = {}
  for impl in impls:
    ops: dict[str, Callable] = {
        "block_sparse_attention": lambda q, k, v, impl=impl: api.block_sparse_attention(
            q, k, v, idx, cnt, block_size=block_size, kv_lengths=lengths,
            implementation=impl),
        "attention_with_block_mass": lambda q, k, v, impl=impl: api.attention_with_block_mass(
            q, k, v, block_size=block_size, kv_lengths=lengths, implementation=impl),
    }
    ops["block_mass"] = lambda q, k, v, impl=impl: api.block_mass(
        q, k, lse, block_size=block_size, kv_lengths=lengths, implementation=impl)
    ops["adaspa_cycle"] = lambda q, k, v, impl=impl: _adaspa_cycle(
        q, k, v, block_size=block_size, implementation=impl)
    res = {}
    for name, fn in ops.items():
      f = jax.jit(fn)
      first = _bits(jax.block_until_ready(f(q, k, v)))
      second = _bits(jax.block_until_ready(f(q, k, v)))
      res[name] = first == second
    out[impl] = res
  return {"shape": [batch, seq_len, heads, head_dim], "dtype": jnp.dtype(dtype).name,
          "block_size": block_size, "bitwise_equal": out,
          "all_equal": all(all(r.values()) for r in out.values())}


def _adaspa_cycle(q, k, v, *, block_size, implementation):
  """Warm-up, search and sparse steps of one layer; returns every output and state."""
  config = AdaSpaConfig(block_size=block_size, num_steps=4, search_steps=(1,),
                        implementation=implementation)
  b, s, h, _ = q.shape
  st = state_lib.init_state(config, b, s, h)
  outs = []
  for step in range(3):
    o, st = adaspa_attention(q, k, v, st, step, config)
    outs.append(o)
  return outs, st


def _phases(config: AdaSpaConfig) -> dict[str, int]:
  first = config.search_steps[0]
  return {"warmup": 0, "search": first, "sparse": first + 1}


def _layer_fn(config: AdaSpaConfig, step: int):
  def fn(q, k, v, states, layer):
    st = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, layer, keepdims=False), states)
    o, new = adaspa_attention(q, k, v, st, step, config)
    states = jax.tree.map(lambda x, n: jax.lax.dynamic_update_index_in_dim(x, n, layer, 0),
                          states, new)
    return o, states
  return jax.jit(fn, donate_argnums=(3,))


def _device_bytes() -> dict:
  stats = jax.devices()[0].memory_stats() or {}
  return {k: stats.get(k) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")}


def memory(seq_lens: Sequence[int], *, num_layers: int = 60, heads: int = 24,
           head_dim: int = 128, block_size: int = 64, sparsity: float = 0.8,
           dtype=jnp.bfloat16, seed: int = 0, log=print) -> dict:
  """One layer at each S in ``seq_lens`` (ascending), every phase, whole-model state.

  Returns per S: ``state_nbytes`` (computed for ``num_layers`` layers), ``qkv_nbytes``,
  the bytes in use after allocating them, per phase the compiled workspace
  (``temp_nbytes``), the run's seconds (compile excluded) and the peak so far, and
  ``ok`` (False with the error text on a failure such as running out of memory).
  """
  config = AdaSpaConfig(block_size=block_size, sparsity=sparsity)
  rows = []
  for s in seq_lens:
    row: dict = {"seq_len": int(s), "num_layers": num_layers, "heads": heads,
                 "head_dim": head_dim,
                 "state_nbytes": state_lib.state_nbytes(config, 1, s, heads,
                                                        num_layers=num_layers),
                 "qkv_nbytes": 4 * s * heads * head_dim * jnp.dtype(dtype).itemsize}
    try:
      keys = jax.random.split(jax.random.key(seed), 3)
      q, k, v = (jax.random.normal(kk, (1, s, heads, head_dim), dtype) for kk in keys)
      states = state_lib.init_state(config, 1, s, heads, num_layers=num_layers)
      jax.block_until_ready((q, k, v, states))
      row["after_alloc"] = _device_bytes()
      phases = {}
      for name, step in _phases(config).items():
        fn = _layer_fn(config, step)
        compiled = fn.lower(q, k, v, states, 0).compile()
        mem = compiled.memory_analysis()
        temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
        _, states = jax.block_until_ready(fn(q, k, v, states, 0))  # includes compile
        t0 = time.perf_counter()
        o, states = jax.block_until_ready(fn(q, k, v, states, 1))
        phases[name] = {"step": step, "temp_nbytes": temp,
                        "seconds": time.perf_counter() - t0, **_device_bytes(),
                        "finite": bool(jnp.isfinite(o.astype(jnp.float32)).all())}
        del o
      row["phases"] = phases
      row["ok"] = all(p["finite"] for p in phases.values())
    except Exception as e:  # noqa: BLE001 -- an OOM is a result here, not a crash
      row["ok"] = False
      row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    finally:
      q = k = v = states = None
    rows.append(row)
    peak = (row.get("phases") or {}).get("sparse", {}).get("peak_bytes_in_use")
    log(f"S={s}: state {row['state_nbytes'] / 2**30:.2f} GiB, ok={row['ok']}"
        + (f", peak {peak / 2**30:.2f} GiB" if peak else "")
        + (f" ({row['error'][:120]})" if "error" in row else ""))
  return {"config": {"block_size": block_size, "sparsity": sparsity,
                     "dtype": jnp.dtype(dtype).name}, "rows": rows}


# A search step's XLA temporaries over one float32 block-mass matrix: measured 3.0x at
# 262,144, 327,680 and 360,448 tokens (24 heads, block 64, H100, jax 0.11.2;
# docs/benchmarks.md, "Determinism and memory").
WORKSPACE_PER_MASS = 3


def largest_seq_len(card_bytes: int, *, num_layers: int = 60, heads: int = 24,
                    head_dim: int = 128, block_size: int = 64, sparsity: float = 0.8,
                    workspace: Callable[[int], int] | None = None,
                    reserved_bytes: int = 0, multiple: int | None = None) -> int:
  """The longest S (a multiple of ``multiple``, default ``block_size``) whose whole-model
  AdaSpa state, one layer's q/k/v/out in bf16, ``workspace(S)`` and ``reserved_bytes``
  (weights, activations) fit in ``card_bytes``.

  ``workspace`` defaults to ``WORKSPACE_PER_MASS`` float32 block-mass matrices [heads,
  nQ, nK]: a search step's temporaries (the mass, the top-k's sort and the lists).
  """
  step = multiple or block_size
  config = AdaSpaConfig(block_size=block_size, sparsity=sparsity)
  if workspace is None:
    workspace = lambda s: WORKSPACE_PER_MASS * heads * math.ceil(s / block_size) ** 2 * 4

  def need(s):
    return (state_lib.state_nbytes(config, 1, s, heads, num_layers=num_layers)
            + 4 * s * heads * head_dim * 2 + workspace(s) + reserved_bytes)

  lo, hi = 0, step
  while need(hi) <= card_bytes:
    lo, hi = hi, hi * 2
  while hi - lo > step:
    mid = (lo + hi) // 2 // step * step
    lo, hi = (mid, hi) if need(mid) <= card_bytes else (lo, mid)
  return lo
