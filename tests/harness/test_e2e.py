"""harness/e2e.py on CPU: tiny presets in float32 with the reference kernels.

One module-scoped run of HunyuanVideo's tiny preset (2 blocks: 1 dual + 1
single) covers the per-phase timing, a one-length sweep and the outputs; the
tests check its arithmetic by hand, its sparse state against a direct
fused-search call of the model, and its density against a numpy count. The absl
launcher's run (Wan on a forced 2-device host mesh) is tests/experiments/test_bench_e2e.py.
"""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from adaspa_jax import AdaSpaConfig
from adaspa_jax.harness import e2e, e2e_report
from adaspa_jax.models import cogvideox, hunyuan_video, wan

STEPS, SEARCH, REPS = 5, (1, 3), 2       # phases: dense, fused, sparse, cached, sparse
LATENT, TEXT = (3, 8, 10), 6             # 3 x 4 x 5 = 60 video + 6 text tokens
KW = dict(family="hunyuan_video", preset="tiny", layers=2, steps=STEPS, sparsity=0.5,
          block_size=16, search_steps=SEARCH, dtype="float32", implementation="reference",
          latent=LATENT, text_len=TEXT, seed=3)


@pytest.fixture(scope="module")
def bench():
  return e2e.prepare(**KW, command="pytest", log=lambda msg: None)


@pytest.fixture(scope="module")
def results(bench):
  return e2e.execute(bench, reps=REPS, sweep_seconds=(0.4,), sweep_layers=2,
                     log=lambda msg: None)


def _numpy_pairs(indices, counts, seq_len, block_size, query_block_size=None):
  """int [L]: query x key pairs per layer, counted block by block (list rows of
  ``query_block_size`` queries, None: ``block_size``)."""
  qbs = query_block_size or block_size
  n_layers = indices.shape[0]
  n_blk = -(-seq_len // block_size)
  sizes = np.minimum(block_size, seq_len - np.arange(n_blk) * block_size)
  rows = np.minimum(qbs, seq_len - np.arange(counts.shape[-1]) * qbs)
  pairs = np.zeros(n_layers, np.int64)
  for idx in np.ndindex(counts.shape):
    n = counts[idx]
    keys = seq_len if n >= n_blk else sizes[indices[idx][:n]].sum()
    pairs[idx[0]] += rows[idx[-1]] * keys
  return pairs


def test_composition_and_ceiling_by_hand(results):
  m = results["main"]
  t = {name: timing["median_s"] for name, timing in m["steps"].items()}
  for timing in m["steps"].values():
    assert len(timing["reps_s"]) == REPS and timing["median_s"] == np.median(timing["reps_s"])
  c = m["composition"]
  assert c["phase_steps"] == {"dense": 1, "fused_search": 1, "cached_search": 1, "sparse": 2}
  adaspa = t["dense"] + t["fused_search"] + t["cached_search"] + 2 * t["sparse"]
  np.testing.assert_allclose(c["adaspa_total_s"], adaspa, rtol=1e-12)
  np.testing.assert_allclose(c["dense_total_s"], 5 * t["dense_baseline"], rtol=1e-12)
  np.testing.assert_allclose(c["speedup"], 5 * t["dense_baseline"] / adaspa, rtol=1e-12)
  # Two attention layers; W = 1 warm-up + 2 searches; 2 steps at the sparse rate.
  a = 2 * m["attention"]["dense_per_call"]["median_s"] / t["dense_baseline"]
  np.testing.assert_allclose(m["attention_share"], a, rtol=1e-12)
  d = m["density"]
  np.testing.assert_allclose(m["ceiling"], 5 / (3 + 2 * (1 - a + a * d)), rtol=1e-12)
  np.testing.assert_allclose(m["speedup_over_ceiling"], c["speedup"] / m["ceiling"], rtol=1e-12)
  sparse_attn = sum(x["median_s"] for x in m["attention"]["sparse_per_layer"])
  np.testing.assert_allclose(m["sparse_kernel_vs_ideal"],
                             sparse_attn / (d * 2 * m["attention"]["dense_per_call"]["median_s"]),
                             rtol=1e-12)
  est = results["full_depth_estimate"]
  assert results["layers"] == {"built": 2, "full_depth": 3, "dual": 1, "single": 1}
  np.testing.assert_allclose(est["dense_total_s"], 1.5 * c["dense_total_s"], rtol=1e-12)


def test_sparse_state_is_the_fused_search_of_the_same_inputs(bench, results):
  """The state measure times sparse steps with equals the model's own fused search
  on the same inputs (not the all-dense init state, not random lists)."""
  case = bench.case
  graphdef, params = nnx.split(case.model)
  search = jax.jit(lambda p, inputs, st: nnx.merge(graphdef, p)(
      **inputs, adaspa_state=st, adaspa_step=SEARCH[0])[1])
  state = search(params, e2e.denoiser_inputs(case, SEARCH[0]), e2e.init_state(case))
  indices, counts = np.asarray(state.indices), np.asarray(state.counts)
  # 66 tokens, blocks of 16: blocks 0-2 video, 3 (video and text) and 4 text.
  n_blk = counts.shape[-1]
  assert case.seq_len == 66 and n_blk == 5
  assert np.all(counts[..., :3] < n_blk) and np.all(counts[..., 3:] == n_blk)
  pairs = _numpy_pairs(indices, counts, 66, 16)
  m = results["main"]
  np.testing.assert_allclose(m["density_per_layer"], pairs / (66 * 66 * 2), rtol=1e-12)
  np.testing.assert_allclose(m["density"], pairs.sum() / (2 * 66 * 66 * 2), rtol=1e-12)
  np.testing.assert_allclose(m["recall_per_layer"], np.asarray(state.recall).mean((1, 2)),
                             rtol=1e-5)
  assert 0 < m["density"] < 1 and len(m["attention"]["sparse_per_layer"]) == 2


def test_query_blocks_of_32_over_key_blocks_of_16():
  """query_block_size reaches the model: lists have one row per 32 queries over key blocks
  of 16, the density counts 32-row (last: 2-row) query blocks, the table names the tiling."""
  bench = e2e.prepare(**dict(KW, query_block_size=32), command="pytest", log=lambda msg: None)
  case = bench.case
  assert bench.adaspa.query_block_size == 32 and bench.header["adaspa"]["query_block_size"] == 32
  graphdef, params = nnx.split(case.model)
  search = jax.jit(lambda p, inputs, st: nnx.merge(graphdef, p)(
      **inputs, adaspa_state=st, adaspa_step=SEARCH[0])[1])
  state = search(params, e2e.denoiser_inputs(case, SEARCH[0]), e2e.init_state(case))
  indices, counts = np.asarray(state.indices), np.asarray(state.counts)
  assert counts.shape[-1] == 3 and indices.shape[-2] == 3  # 66 tokens / 32 rows
  assert np.all(counts[..., 2] == 5)  # the last query block holds text: dense
  pairs = e2e.computed_pairs(state, 66, 16, 32)
  np.testing.assert_array_equal(pairs, _numpy_pairs(indices, counts, 66, 16, 32))
  assert 0 < pairs.sum() < 2 * 2 * 66 * 66 * 2
  assert e2e_report._tiling(bench.header["adaspa"]) == "32 x 16"  # pylint: disable=protected-access


def test_sweep_and_outputs(results, tmp_path):
  [row] = results["sweep"]
  # 0.4 s at 24 fps -> 9 frames -> 3 latent frames, the main size (its programs are
  # reused: no compile), so the sweep's times are a second measurement of the main's.
  assert (row["seconds"], row["frames"], row["latent"]) == (0.4, 9, list(LATENT))
  assert row["seq_len"] == 66 and row["attention_layers"] == 2 and "error" not in row
  assert row["density_per_layer"] == results["main"]["density_per_layer"]
  assert row["composition"]["speedup"] > 0 and row["ceiling"] >= 1
  paths = e2e_report.write(results, str(tmp_path), "_t")
  with open(paths["json"]) as f:
    saved = json.load(f)
  for field in ("date", "device", "jax_version", "command", "adaspa", "main", "sweep"):
    assert field in saved
  assert saved["jax_version"] == jax.__version__ and saved["command"] == "pytest"
  assert saved["main"]["steps"]["sparse"]["reps_s"] == results["main"]["steps"]["sparse"]["reps_s"]
  with open(paths["markdown"]) as f:
    text = f.read()
  assert "| AdaSpa sparse | 2 |" in text and "speedup / ceiling" in text
  with open(paths["png"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_amdahl_ceiling_known_values():
  assert e2e.amdahl_ceiling(50, 11, 0.9, 0.2) == pytest.approx(2.2810218978, rel=1e-9)
  assert e2e.amdahl_ceiling(50, 11, 0.0, 0.2) == 1.0
  assert e2e.amdahl_ceiling(50, 11, 0.9, 1.0) == pytest.approx(1.0)
  assert e2e.amdahl_ceiling(50, 50, 0.9, 0.1) == 1.0
  assert e2e.amdahl_ceiling(10, 0, 1.0, 0.25) == pytest.approx(4.0)
  counts = {"dense": 9, "fused_search": 1, "cached_search": 1, "sparse": 39}
  assert e2e.ceiling_dense_steps(counts) == 11
  assert e2e.phase_counts(AdaSpaConfig()) == counts
  with pytest.raises(ValueError, match="dense_steps=51"):
    e2e.amdahl_ceiling(50, 51, 0.9, 0.2)
  with pytest.raises(ValueError, match="density=1.5"):
    e2e.amdahl_ceiling(50, 11, 0.9, 1.5)
  with pytest.raises(ValueError, match="phases \\['sparse'\\]"):
    e2e.compose({"dense_baseline": 1.0, "dense": 1.0}, {"dense": 1, "sparse": 1})


def test_real_sizes_and_layer_counts():
  hv, wn, cg = (e2e.VIDEOS[k] for k in ("hunyuan_video", "wan", "cogvideox"))
  assert e2e.latent_size(hv.frames, hv.height, hv.width) == (33, 90, 160)  # 118,800 tokens
  assert e2e.latent_size(wn.frames, wn.height, wn.width) == (21, 90, 160)
  assert e2e.latent_size(cg.frames, cg.height, cg.width, 2) == (22, 96, 170)
  assert e2e.frames_for_seconds(24, hv) == 577 and e2e.latent_frames(577) == 145  # 522,000
  assert e2e.frames_for_seconds(10, cg) == 161 and e2e.latent_frames(161, 2) == 42
  assert e2e.frames_for_seconds(5, wn) == 81
  full = hunyuan_video.PRESETS["hunyuan-video-13b"]
  for layers, (dual, single) in ((1, (0, 1)), (2, (1, 1)), (3, (1, 2)), (60, (20, 40))):
    cfg = e2e.with_layers("hunyuan_video", full, layers)
    assert (cfg.num_layers, cfg.num_single_layers) == (dual, single)
  assert e2e.with_layers("wan", wan.PRESETS["wan2.1-t2v-14b"], 3).num_layers == 3
  with pytest.raises(ValueError, match="layers=0"):
    e2e.with_layers("wan", wan.PRESETS["tiny"], 0)
  with pytest.raises(ValueError, match="seconds=-1"):
    e2e.frames_for_seconds(-1, hv)


def test_cogvideox_case_has_a_text_prefix_and_two_rows():
  adaspa = AdaSpaConfig(sparsity=0.5, block_size=16, num_steps=4, search_steps=(1,))
  full = cogvideox.PRESETS["tiny"]
  config = dataclasses.replace(e2e.with_layers("cogvideox", full, 1), attention="adaspa",
                               adaspa=adaspa)
  # Inputs need the model's config and parameter dtype only: an abstract model will do.
  model = nnx.eval_shape(lambda: cogvideox.Model(config, rngs=nnx.Rngs(0)))
  case = e2e.make_case("cogvideox", model, full, LATENT)
  text = cogvideox.PRESETS["tiny"].max_text_seq_length
  assert case.text_span == (0, text) and case.seq_len == text + 60
  assert case.batch_rows == 2 and case.kv_lengths is None and model.config.num_layers == 1
  inputs = e2e.denoiser_inputs(case, 0)
  assert inputs["hidden_states"].shape == (2, 3, 4, 8, 10) and "image_rotary_emb" in inputs


def test_bad_arguments():
  with pytest.raises(ValueError, match="model='huge'"):
    e2e.run(family="huge")
  with pytest.raises(ValueError, match="fsdp=True without mesh"):
    e2e.run(fsdp=True)
  with pytest.raises(ValueError, match="video_seconds=2.0 and latent frames 5"):
    e2e.run(**dict(KW, latent=(5, None, None)), video_seconds=2.0)
