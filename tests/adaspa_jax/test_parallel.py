"""Ulysses AdaSpa attention on 4 forced CPU devices equals the single-device call.

The device count is fixed when JAX starts and the rest of the suite keeps one
CPU device, so the sharded runs happen in a subprocess (this file run as a
module with ``--xla_force_host_platform_device_count=4``) that saves the
single-device and sharded results of every step to an .npz; the tests compare
them here. The reference kernels cover every phase and layout; the Triton
Pallas kernels (interpret mode) show that pallas_call runs inside shard_map.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from adaspa_jax import parallel

DEVICES = 4
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# (name, B, video tokens, text tokens, text first, heads, head_dim, dtype, lse_cache, kv pad)
CASES = [
    ("suffix_f32_d64", 2, 144, 8, False, 8, 64, "float32", True, 3),
    ("prefix_bf16_d128", 1, 60, 5, True, 4, 128, "bfloat16", False, 0),
]
STEPS, SEARCH = 6, (1, 3)     # phases: dense, fused, sparse, cached (or fused), sparse, sparse
PEAKED_HEADS = (0, 1, 5)      # spread over devices 0 and 2: the tier ranking must see all heads


def _inputs(rng, b, s, h, d, dtype, video, text_first, n_text):
  """q, k, v [B, S, H, D]; the PEAKED_HEADS attend within their block, the others diffusely."""
  import jax.numpy as jnp
  q, k, v = (0.3 * rng.standard_normal((b, s, h, d)) for _ in range(3))
  start = n_text if text_first else 0
  block_of = (np.arange(video) // 16)
  dirs = rng.standard_normal((b, block_of.max() + 1, d))
  for head in PEAKED_HEADS:
    if head < h:
      q[:, start:start + video, head] = dirs[:, block_of]
      k[:, start:start + video, head] = dirs[:, block_of] + 0.1 * rng.standard_normal(
          (b, video, d))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _spec(x):
  """An array's partition spec as a list without trailing Nones."""
  spec = list(x.sharding.spec)
  while spec and spec[-1] is None:
    spec.pop()
  return spec


def _worker(path):
  """Runs in the subprocess: every case through all phases, single-device and sharded."""
  import jax
  import jax.numpy as jnp
  from adaspa_jax import AdaSpaConfig, adaspa_attention, init_state, text_blocks_mask
  import pallas_kernels as pk

  assert jax.device_count() == DEVICES, jax.devices()
  sp = parallel.make_sequence_parallel(DEVICES)
  rng = np.random.default_rng(0)
  out, info = {}, {}
  for name, b, video, n_text, text_first, h, d, dtype, lse_cache, pad in CASES:
    s = video + n_text
    span = (0, n_text) if text_first else (video, n_text)
    config = AdaSpaConfig(sparsity=0.8, block_size=16, num_steps=STEPS, search_steps=SEARCH,
                          lse_cache=lse_cache, implementation="reference")
    text = text_blocks_mask(s, 16, *span)
    q, k, v = _inputs(rng, b, s, h, d, dtype, video, text_first, n_text)
    kv = jnp.asarray([s - pad * (i % 2) for i in range(b)], jnp.int32) if pad else None
    single = jax.jit(lambda q, k, v, st, t: adaspa_attention(
        q, k, v, st, t, config, text_blocks=text, kv_lengths=kv))
    sharded = jax.jit(lambda q, k, v, st, t: parallel.adaspa_attention(
        q, k, v, st, t, config, sequence_parallel=sp, text_span=span, kv_lengths=kv))
    st1 = st2 = init_state(config, b, s, h, text_blocks=text)
    for t in range(STEPS):
      o1, st1 = single(q, k, v, st1, jnp.int32(t))
      o2, st2 = sharded(q, k, v, st2, jnp.int32(t))
      for tag, o, st in (("single", o1, st1), ("sharded", o2, st2)):
        key = f"{name}/{t}/{tag}"
        out[key + "/out"] = np.asarray(o, np.float32)
        for field in ("indices", "counts", "lse", "recall", "sparsity"):
          out[f"{key}/{field}"] = np.asarray(getattr(st, field))
    info[name] = {"state_spec": _spec(st2.indices)}
    # A Python-int step compiles its phase only: the last (sparse) step again.
    o3, _ = jax.jit(lambda q, k, v, st: parallel.adaspa_attention(
        q, k, v, st, STEPS - 1, config, sequence_parallel=sp, text_span=span,
        kv_lengths=kv))(q, k, v, st2)
    out[f"{name}/static_step/sharded"] = np.asarray(o3, np.float32)
    out[f"{name}/dense/single"] = np.asarray(
        pk.dense_attention(q, k, v, kv_lengths=kv), np.float32)
    out[f"{name}/dense/sharded"] = np.asarray(jax.jit(lambda q, k, v: parallel.dense_attention(
        q, k, v, sequence_parallel=sp, text_span=span, kv_lengths=kv))(q, k, v), np.float32)

  # Video-only self-attention (Wan): the output stays sharded on the sequence.
  q, k, v = _inputs(rng, 1, 60, 4, 64, "float32", 60, False, 0)
  o = jax.jit(lambda q, k, v: parallel.dense_attention(q, k, v, sequence_parallel=sp))(q, k, v)
  out["video_only/single"] = np.asarray(pk.dense_attention(q, k, v))
  out["video_only/sharded"] = np.asarray(o)
  info["video_only"] = {"out_spec": _spec(o)}

  # The Triton Pallas kernels inside shard_map (interpret mode): fused search, then sparse.
  config = AdaSpaConfig(sparsity=0.5, block_size=16, num_steps=2, search_steps=(0,),
                        implementation="triton")
  text = text_blocks_mask(64, 16, 60, 4)
  q, k, v = _inputs(rng, 1, 64, 4, 64, "float32", 60, False, 4)
  st1 = st2 = init_state(config, 1, 64, 4, text_blocks=text)
  for t in range(2):
    o1, st1 = jax.jit(lambda q, k, v, st: adaspa_attention(
        q, k, v, st, t, config, text_blocks=text, interpret=True))(q, k, v, st1)
    o2, st2 = jax.jit(lambda q, k, v, st: parallel.adaspa_attention(
        q, k, v, st, t, config, sequence_parallel=sp, text_span=(60, 4), interpret=True))(
            q, k, v, st2)
    for tag, o, st in (("single", o1, st1), ("sharded", o2, st2)):
      out[f"triton/{t}/{tag}/out"] = np.asarray(o)
      out[f"triton/{t}/{tag}/indices"] = np.asarray(st.indices)

  # 128-row query blocks over 64-key blocks: the state's nQ rows travel split on heads.
  config = AdaSpaConfig(sparsity=0.5, block_size=64, query_block_size=128, num_steps=STEPS,
                        search_steps=SEARCH, implementation="reference")
  s, span = 600, (560, 40)
  text = text_blocks_mask(s, 64, *span)
  q, k, v = _inputs(rng, 1, s, 4, 32, "float32", 560, False, 40)
  kv = jnp.asarray([590], jnp.int32)
  single = jax.jit(lambda q, k, v, st, t: adaspa_attention(
      q, k, v, st, t, config, text_blocks=text, kv_lengths=kv))
  sharded = jax.jit(lambda q, k, v, st, t: parallel.adaspa_attention(
      q, k, v, st, t, config, sequence_parallel=sp, text_span=span, kv_lengths=kv))
  st1 = st2 = init_state(config, 1, s, 4, text_blocks=text)
  for t in range(STEPS):
    o1, st1 = single(q, k, v, st1, jnp.int32(t))
    o2, st2 = sharded(q, k, v, st2, jnp.int32(t))
    for tag, o, st in (("single", o1, st1), ("sharded", o2, st2)):
      out[f"qblock/{t}/{tag}/out"] = np.asarray(o)
      for field in ("indices", "counts"):
        out[f"qblock/{t}/{tag}/{field}"] = np.asarray(getattr(st, field))
  info["qblock"] = {"state_spec": _spec(st2.indices)}

  errors = {}
  config = AdaSpaConfig(block_size=16, num_steps=4, search_steps=(1,), implementation="reference")
  for label, (h, video, n_text) in {"heads": (6, 64, 0), "tokens": (4, 62, 8)}.items():
    q = jnp.zeros((1, video + n_text, h, 16))
    try:
      parallel.adaspa_attention(q, q, q, init_state(config, 1, video + n_text, h), 0, config,
                                sequence_parallel=sp, text_span=(video, n_text))
      errors[label] = None
    except ValueError as e:
      errors[label] = str(e)
  info["errors"] = errors
  np.savez(os.path.join(path, "results.npz"), **out)
  with open(os.path.join(path, "info.json"), "w") as f:
    json.dump(info, f)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("parallel"))
  flags = os.environ.get("XLA_FLAGS", "")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={DEVICES}".strip())
  proc = subprocess.run([sys.executable, "-m", "tests.adaspa_jax.test_parallel", path], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(os.path.join(path, "info.json")) as f:
    info = json.load(f)
  return dict(np.load(os.path.join(path, "results.npz"))), info


def _tol(name):
  return dict(rtol=2e-2, atol=2e-2) if "bf16" in name else dict(rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_every_phase_matches_single_device(results, case):
  arrays, info = results
  for t in range(STEPS):
    single, sharded = f"{case}/{t}/single", f"{case}/{t}/sharded"
    for field in ("indices", "counts"):
      np.testing.assert_array_equal(arrays[f"{sharded}/{field}"], arrays[f"{single}/{field}"],
                                    err_msg=f"{field} at step {t}")
    np.testing.assert_allclose(arrays[f"{sharded}/out"], arrays[f"{single}/out"],
                               err_msg=f"output at step {t}", **_tol(case))
    for field in ("lse", "recall", "sparsity"):
      np.testing.assert_allclose(arrays[f"{sharded}/{field}"], arrays[f"{single}/{field}"],
                                 rtol=1e-5, atol=1e-5, err_msg=f"{field} at step {t}")
    assert np.isfinite(arrays[f"{sharded}/out"]).all()
  # The state stays split on heads ([B, H, nQ, K_max] -> P(None, 'seq')).
  assert info[case]["state_spec"] == [None, "seq"]
  np.testing.assert_allclose(arrays[f"{case}/static_step/sharded"],
                             arrays[f"{case}/{STEPS - 1}/single/out"], **_tol(case))


def test_the_run_exercises_sparsity_and_head_tiers(results):
  """Guards the equality tests against a run where nothing was selected."""
  arrays, _ = results
  case = CASES[0][0]
  last = f"{case}/{STEPS - 1}/single"
  # Three tiers: the peaked heads keep fewer blocks, the most diffuse more.
  assert len(np.unique(arrays[f"{last}/sparsity"].round(4))) == 3
  nk = arrays[f"{last}/counts"].shape[-1]
  assert (arrays[f"{last}/counts"] < nk).any()
  # The sparse output differs from dense: the comparison above covers sparse kernels.
  assert np.abs(arrays[f"{last}/out"] - arrays[f"{case}/0/single/out"]).max() > 1e-3


@pytest.mark.parametrize("case", [c[0] for c in CASES] + ["video_only"])
def test_dense_entry_matches(results, case):
  arrays, info = results
  key = "video_only" if case == "video_only" else f"{case}/dense"
  np.testing.assert_allclose(arrays[f"{key}/sharded"], arrays[f"{key}/single"], **_tol(case))
  if case == "video_only":
    assert info[case]["out_spec"] == [None, "seq"]


def test_pallas_kernels_inside_shard_map(results):
  arrays, _ = results
  for t in range(2):
    np.testing.assert_array_equal(arrays[f"triton/{t}/sharded/indices"],
                                  arrays[f"triton/{t}/single/indices"])
    np.testing.assert_allclose(arrays[f"triton/{t}/sharded/out"],
                               arrays[f"triton/{t}/single/out"], rtol=1e-5, atol=2e-6)


def test_query_blocks_128x64_match_single_device(results):
  arrays, info = results
  for t in range(STEPS):
    for field in ("indices", "counts"):
      np.testing.assert_array_equal(arrays[f"qblock/{t}/sharded/{field}"],
                                    arrays[f"qblock/{t}/single/{field}"], err_msg=f"step {t}")
    np.testing.assert_allclose(arrays[f"qblock/{t}/sharded/out"],
                               arrays[f"qblock/{t}/single/out"], rtol=1e-5, atol=2e-6,
                               err_msg=f"step {t}")
  counts = arrays[f"qblock/{STEPS - 1}/single/counts"]
  assert counts.shape == (1, 4, 5) and (counts[..., :4] < 10).all() and (counts[..., 4] == 10).all()
  assert info["qblock"]["state_spec"] == [None, "seq"]


def test_indivisible_heads_and_tokens_raise(results):
  errors = results[1]["errors"]
  assert errors["heads"] is not None and "heads=6" in errors["heads"] and "4" in errors["heads"]
  assert errors["tokens"] is not None and "video tokens" in errors["tokens"]
  assert "=62" in errors["tokens"] and "seq_len=70" in errors["tokens"]


def test_parse_mesh_and_layout_checks():
  assert parallel.parse_mesh(None) is None and parallel.parse_mesh("") is None
  sp = parallel.parse_mesh("seq:1")
  assert sp.size == 1 and sp.axis == "seq" and parallel.parse_mesh("1").size == 1
  for bad in ("data:2", "seq:x", "2x2"):
    with pytest.raises(ValueError, match="--mesh"):
      parallel.parse_mesh(bad)
  with pytest.raises(ValueError, match="devices=99"):
    parallel.parse_mesh("99")
  with pytest.raises(ValueError, match="axis='data'"):
    parallel.SequenceParallel(sp.mesh, "data")
  with pytest.raises(ValueError, match="text_span"):
    parallel.text_layout((3, 4), 20)        # text in the middle of the sequence


if __name__ == "__main__":
  _worker(sys.argv[1])
