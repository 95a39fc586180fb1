"""The training launcher as a subprocess (it defines absl flags at import): a run cut short
by its time budget still saves a loadable checkpoint with its command, steps and loss."""

import json
import os
import subprocess
import sys

import numpy as np

from adaspa_jax.models import loading
from adaspa_jax.models.embedded import model as tiny_t2v
from tests.models.embedded import tiny_checkpoint


def _start_checkpoint(path):
  return tiny_checkpoint.random_checkpoint(path, std=0.05)


def test_launcher_stops_on_its_budget_and_saves(tmp_path):
  start, model = _start_checkpoint(tmp_path / "start")
  out = tmp_path / "run"
  args = ["--preset=test", "--steps=3", "--batch_size=2", "--log_every=1", "--warmup_steps=1",
          "--dtype=float32", "--save_dtype=float32", "--time_budget_s=1",
          f"--init_from={start}", f"--output_dir={out}"]
  proc = subprocess.run([sys.executable, "-m", "adaspa_jax.experiments.train_tiny", *args],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "stopping after step 1" in proc.stdout
  record = tiny_t2v.training_record(out)
  assert record["command"] == "python -m adaspa_jax.experiments.train_tiny " + " ".join(args)
  assert record["steps"] == 1 and record["stopped_by"] == "time_budget"
  with open(os.path.join(out, "training_log.json")) as f:
    log = json.load(f)
  assert [h["step"] for h in log["history"]] == [1]
  assert np.isfinite(record["final_loss"]) and record["final_loss"] == log["history"][-1]["loss"]
  assert np.isfinite(record["eval_loss_ema"])
  trained = tiny_t2v.load(out)
  assert trained.config == model.config
  before = loading.model_params(model)
  moved = [not np.array_equal(np.asarray(v.get_value()), np.asarray(before[k].get_value()))
           for k, v in loading.model_params(trained).items()]
  assert all(moved)


def test_launcher_adds_learned_positions_and_reversal_and_mirror_pairs(tmp_path):
  start, model = _start_checkpoint(tmp_path / "start")
  out = tmp_path / "run"
  # Batch 4 with both pairings: one reversed and one mirrored pair.
  args = ["--preset=test", "--steps=1", "--batch_size=4", "--warmup_steps=1", "--dtype=float32",
          "--save_dtype=float32", "--reversal_pairs", "--mirror_pairs",
          "--add_learned_positions=0.5", "--separate_words=left,right",
          "--merge_phrases=moves left,moves right",
          "--text_lr_scale=2", "--sigma_logit_mean=0.5", "--high_sigma_share=0.25",
          f"--init_from={start}", f"--output_dir={out}"]
  proc = subprocess.run([sys.executable, "-m", "adaspa_jax.experiments.train_tiny", *args],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  trained = tiny_t2v.load(out)
  assert trained.config.transformer.use_learned_positional_embeddings
  assert not model.config.transformer.use_learned_positional_embeddings
  record = tiny_t2v.training_record(out)["train_config"]
  assert record["reversal_pairs"] is True and record["mirror_pairs"] is True
  assert record["text_lr_scale"] == 2.0 and np.isfinite(tiny_t2v.training_record(out)[
      "final_loss"])
  assert record["sigma_logit_mean"] == 0.5 and record["high_sigma_share"] == 0.25
  # The pair starts 2 x (mean embedding norm) apart; one small step keeps that within 10%.
  vocab, table = trained.config.text.vocabulary, trained.text_encoder.token_embedding.embedding
  e = np.asarray(table.get_value())
  start_e = np.asarray(model.text_encoder.token_embedding.embedding.get_value())
  gap = np.linalg.norm(e[vocab.index("left")] - e[vocab.index("right")])
  want = 2 * np.linalg.norm(start_e, axis=1).mean()
  assert abs(gap - want) < 0.1 * want, (gap, want)
  # The merged phrases are tokens of the saved model, and the step trained their rows.
  assert vocab[-2:] == ("moves left", "moves right") and len(vocab) == len(start_e) + 2
  merged = tiny_t2v.merge_phrases(tiny_t2v.separate_words(model, "left", "right"),
                                  ["moves left", "moves right"])
  first = np.asarray(merged.text_encoder.token_embedding.embedding.get_value())
  assert np.all(np.abs(e[-2:] - first[-2:]).max(-1) > 0)
  pos = np.asarray(trained.transformer.patch_embed.pos_embedding.get_value())
  assert np.all(np.isfinite(pos)) and np.any(pos)
  bad = subprocess.run([sys.executable, "-m", "adaspa_jax.experiments.train_tiny",
                        "--add_learned_positions=0.5", f"--output_dir={tmp_path / 'x'}"],
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "--add_learned_positions needs --init_from" in bad.stderr
  bad = subprocess.run([sys.executable, "-m", "adaspa_jax.experiments.train_tiny",
                        f"--init_from={start}", "--separate_words=left",
                        f"--output_dir={tmp_path / 'x'}"],
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "--separate_words=left: expected two words" in bad.stderr
  bad = subprocess.run([sys.executable, "-m", "adaspa_jax.experiments.train_tiny",
                        "--merge_phrases=moves left,moves right", f"--output_dir={tmp_path / 'x'}"],
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "needs --init_from" in bad.stderr
