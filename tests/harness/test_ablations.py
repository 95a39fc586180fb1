"""The ablation grid, its metrics and writers, and a short run on a random checkpoint (the
launcher on the embedded checkpoint: tests/experiments/test_ablate.py)."""

import numpy as np
import pytest

from adaspa_jax import CACHED_SEARCH, DENSE, FUSED_SEARCH, SPARSE
from adaspa_jax.harness import ablations
from adaspa_jax.harness.generation import default_search_steps
from tests.models.embedded import tiny_checkpoint


def test_grid_applies_the_paper_schedules_literally_at_50_steps():
  settings = ablations.grid(num_steps=50, frame_tokens=256)
  by = {(s.group, s.name): s for s in settings}
  assert [s.group for s in settings] == (["table1"] * 9 + ["policies"] * 13 + ["components"] * 4
                                         + ["warmup"] * 4 + ["schedule"] * 4
                                         + ["precision"] * 5 + ["granularity"] * 4)
  assert by["policies", "dense"].config is None
  base = by["components", "AdaSpa"].config
  assert base == by["policies", "AdaSpa s=0.8"].config == by["schedule", "{10,30}"].config
  assert (base.sparsity, base.search_steps, base.head_adaptive, base.lse_cache,
          base.policy, base.measure_recall) == (0.8, (9, 29), True, True, "adaspa", True)
  assert [by["schedule", n].config.search_steps for n in
          ("{10}", "{10,30}", "{10,20,30}", "{10,20,30,40}")] == [
              (9,), (9, 29), (9, 19, 29), (9, 19, 29, 39)]
  assert [by["warmup", f"warm-up {w}"].config.search_steps for w in (0, 2, 5, 10)] == [
      (0, 29), (2, 29), (5, 29), (10, 29)]
  assert {(c.head_adaptive, c.lse_cache) for c in
          (s.config for s in settings if s.group == "components")} == {
              (True, True), (True, False), (False, True), (False, False)}
  for policy in ("adaspa", "svg", "minference"):
    got = [(s.config.policy, s.config.sparsity) for s in settings
           if s.params.get("policy") == policy and s.group == "policies"]
    assert got == [(policy, 0.7), (policy, 0.8), (policy, 0.9)]
  assert by["policies", "SVG s=0.9"].config.frame_tokens == 256
  assert [by["policies", f"top-p p={p}"].config.top_p for p in ablations.TOP_P] == list(
      ablations.TOP_P)
  assert all(s.config.measure_recall and s.config.num_steps == 50 for s in settings
             if s.config is not None)
  # AdaSpa 0.8 on {10,30} sits in five groups and runs once; precision adds four,
  # granularity two.
  assert len({s.config for s in settings if s.config is not None}) == 28


def test_grid_scales_steps_and_checks_its_arguments():
  assert ablations.schedule_steps((10, 30), 25) == default_search_steps(25) == (4, 14)
  assert ablations.schedule_steps((10, 20, 30, 40), 4) == (0, 1, 2, 3)
  assert ablations.schedule_steps((10, 20), 2) == (0,)           # merged when they coincide
  assert ablations.warmup_steps(10, 25) == (5, 14)
  assert ablations.warmup_steps(10, 4) == (0, 2)
  assert ablations.warmup_steps(10, 2) == (0, 1)
  settings = ablations.grid(num_steps=8, frame_tokens=64, groups=["schedule"], block_size=16)
  assert {s.group for s in settings} == {"schedule"}
  assert all(s.config.block_size == 16 and s.config.num_steps == 8 for s in settings)
  with pytest.raises(ValueError, match="groups=\\['nope'\\]"):
    ablations.grid(frame_tokens=256, groups=["nope"])
  with pytest.raises(ValueError, match="frame_tokens=0"):
    ablations.grid(frame_tokens=0)


def test_summarize_against_hand_computed_numbers():
  clips = [{"psnr_db": 30.0, "ssim": 0.9, "passed": True, "score": 1.0,
            "strict_passed": False, "extra_object": True},
           {"psnr_db": None, "ssim": 1.0, "passed": False, "score": 2 / 3,
            "strict_passed": False, "extra_object": False},
           {"psnr_db": 20.0, "ssim": 0.8, "passed": True, "score": 1 / 3,
            "strict_passed": True, "extra_object": False}]
  recall = np.full((4, 2, 1, 2), 99.0)           # [N, L, B, H]; only search steps count
  recall[1] = [[[0.5, 0.7]], [[0.9, 0.1]]]
  recall[3] = [[[0.3, 0.5]], [[0.7, 0.3]]]
  sparsity = np.zeros((4, 2, 1, 2))
  sparsity[1], sparsity[2], sparsity[3] = 0.5, 0.8, 0.6   # step 1 ran dense (fused search)
  phases = [DENSE, FUSED_SEARCH, SPARSE, CACHED_SEARCH]
  s = ablations.summarize(clips, recall, sparsity, phases, (1, 3), wall_s=2.0, compile_s=5.0,
                          dense_wall_s=3.0)
  assert s["psnr_db"] == pytest.approx(25.0) and s["identical_clips"] == 1
  assert s["ssim"] == pytest.approx(0.9)
  assert s["pass_rate"] == pytest.approx(2 / 3) and s["mean_score"] == pytest.approx(2 / 3)
  assert s["strict_pass_rate"] == pytest.approx(1 / 3)
  assert s["extra_object_rate"] == pytest.approx(1 / 3)
  assert s["seconds_per_clip"] == pytest.approx(2.0 / 3)
  assert s["mean_recall"] == pytest.approx(0.5)
  np.testing.assert_allclose(s["recall_layer_head"], [[0.4, 0.6], [0.8, 0.2]])
  assert s["sparsity"] == pytest.approx(0.7) and s["sparse_steps"] == 2
  assert s["speedup"] == pytest.approx(1.5) and s["compile_s"] == 5.0
  none = ablations.summarize(clips[1:2], recall, sparsity, [DENSE, FUSED_SEARCH, DENSE, DENSE],
                             (1,), wall_s=1.0, compile_s=0.0, dense_wall_s=1.0)
  assert none["psnr_db"] is None and none["sparsity"] is None


def test_chunks_share_one_size_and_padded_rows_are_dropped():
  assert ablations._chunks(25, 10) == [(0, 9), (9, 9), (18, 7)]
  assert ablations._chunks(5, 2) == [(0, 2), (2, 2), (4, 1)]
  assert ablations._chunks(3, 10) == [(0, 3)]
  # Rows [uncond 0..3; cond 0..3] with 3 real: keep uncond 0-2 and cond 0-2.
  rec = np.arange(8, dtype=np.float64).reshape(1, 1, 8, 1)

  class Result:
    recall = rec

  np.testing.assert_array_equal(ablations._real_rows(Result, 3, "recall")[0, 0, :, 0],
                                [0, 1, 2, 4, 5, 6])


def _row(results, group, name):
  return next(r for r in results["settings"] if r["group"] == group and r["name"] == name)


def test_every_block_reproduces_dense_and_every_policy_runs(tmp_path):
  """On a random checkpoint, 3 prompts in chunks of 2 (the last padded): AdaSpa keeping
  every block gives each clip its dense reference back; the baselines at sparsity 0.8
  choose other blocks than AdaSpa, and top-p reports the sparsity its p gave."""
  checkpoint = tiny_checkpoint.random_checkpoint(tmp_path / "ckpt")[0]
  every = ablations.base_config(2, sparsity=0.0, block_size=16)
  keep = {"AdaSpa s=0.8", "SVG s=0.8", "MInference s=0.8", "top-p p=0.9"}
  settings = [ablations.Setting("components", "every block", every, {})] + [
      s for s in ablations.grid(num_steps=2, frame_tokens=64, groups=["policies"],
                                block_size=16) if s.name in keep]
  results = ablations.run(checkpoint, settings, n=3, num_steps=2, batch=2, log=lambda _: None)
  assert [c["seed"] for c in results["dense"]["clips"]] == [0, 1, 2]
  full = _row(results, "components", "every block")
  assert all(c["psnr_db"] is None or c["psnr_db"] > 60 for c in full["clips"])
  assert full["summary"]["ssim"] > 0.9999 and full["summary"]["mean_recall"] > 0.999
  assert full["summary"]["sparsity"] == 0.0
  assert [c["passed"] for c in full["clips"]] == [c["passed"] for c in results["dense"]["clips"]]
  rows = {r["name"]: r for r in results["settings"]}
  for name in keep:
    s = rows[name]["summary"]
    assert 0 < s["mean_recall"] < 1 and 0 < s["sparsity"] < 1, name
    if name != "top-p p=0.9":   # random weights spread attention: p = 0.9 keeps most blocks
      assert 0.7 < s["sparsity"] < 0.9 and s["psnr_db"] < 60, name
    assert rows[name]["config"]["policy"] == rows[name]["params"]["policy"]
  ada = [c["psnr_db"] for c in rows["AdaSpa s=0.8"]["clips"]]
  for name in ("SVG s=0.8", "MInference s=0.8", "top-p p=0.9"):
    assert [c["psnr_db"] for c in rows[name]["clips"]] != ada, name
  with pytest.raises(ValueError, match="config.num_steps=2: expected num_steps=3"):
    ablations.run(checkpoint, settings, n=1, num_steps=3)


def test_precision_rows():
  settings = ablations.grid(num_steps=25, frame_tokens=1024, groups=["precision"])
  assert [s.name for s in settings] == ["AdaSpa s=0.8", "AdaSpa s=0.8 fp8",
                                        "AdaSpa s=0.8 int8_fp8", "dense fp8 (24 of 25 steps)",
                                        "dense int8_fp8 (24 of 25 steps)"]
  bf16, fp8, int8, dense, dense8 = (s.config for s in settings)
  assert [c.precision for c in (bf16, fp8, int8, dense, dense8)] == [
      "bf16", "fp8", "int8_fp8", "fp8", "int8_fp8"]
  assert fp8 == bf16.replace(precision="fp8") and dense.search_steps == (24,)
  assert int8 == bf16.replace(precision="int8_fp8") and dense8.search_steps == (24,)


def test_granularity_rows_pair_square_and_tall_query_blocks():
  settings = ablations.grid(num_steps=25, frame_tokens=1024, groups=["granularity"])
  assert [s.name for s in settings] == ["AdaSpa s=0.8 64x64", "AdaSpa s=0.8 128x64",
                                        "AdaSpa s=0.9 64x64", "AdaSpa s=0.9 128x64"]
  got = [(s.config.sparsity, s.config.effective_query_block_size, s.config.block_size)
         for s in settings]
  assert got == [(0.8, 64, 64), (0.8, 128, 64), (0.9, 64, 64), (0.9, 128, 64)]
  # The square rows are table1's configs (sampled once when both groups run).
  table1 = {s.name: s.config for s in ablations.grid(num_steps=25, frame_tokens=1024,
                                                     groups=["table1"])}
  assert settings[0].config == table1["AdaSpa s=0.8"]
  assert settings[2].config == table1["AdaSpa s=0.9"]
  small = ablations.grid(num_steps=8, frame_tokens=64, groups=["granularity"], block_size=16)
  assert [s.name for s in small][:2] == ["AdaSpa s=0.8 16x16", "AdaSpa s=0.8 32x16"]


def test_table1_rows_are_the_issue_rows():
  settings = ablations.grid(num_steps=25, frame_tokens=1024, groups=["table1"])
  assert [s.name for s in settings] == [
      "dense", "AdaSpa s=0.7", "AdaSpa s=0.8", "AdaSpa s=0.9",
      "AdaSpa s=0.8 w/o head adaptive", "AdaSpa s=0.8 w/o LSE cache", "SVG s=0.8",
      "MInference s=0.8", "top-p p=0.9"]
  by = {s.name: s.config for s in settings}
  assert by["dense"] is None
  assert by["AdaSpa s=0.8"].search_steps == (4, 14) and by["AdaSpa s=0.8"].block_size == 64
  assert not by["AdaSpa s=0.8 w/o head adaptive"].head_adaptive
  assert not by["AdaSpa s=0.8 w/o LSE cache"].lse_cache
  assert by["SVG s=0.8"].frame_tokens == 1024 and by["SVG s=0.8"].sparsity == 0.8
  assert by["top-p p=0.9"].top_p == 0.9
  # Rows shared with the other groups are the same configs, so a full run samples them once.
  others = {s.config for s in ablations.grid(num_steps=25, frame_tokens=1024)
            if s.group != "table1"}
  assert {c for c in by.values() if c is not None} <= others
