"""Trains the embedded text-to-video model (``adaspa_jax.models.embedded.model``) on shapes clips.

Rectified-flow training on clips drawn on the fly (``adaspa_jax.models.embedded.training``);
saves the EMA weights as a ``adaspa_jax.models.embedded.model`` checkpoint (safetensors + config
JSON; ``tiny_t2v.json`` records this command, the steps run and the final loss)
and ``training_log.json`` with the loss curve. One H200 command under 9
minutes:

  python -m adaspa_jax.experiments.train_tiny --output_dir=checkpoints/tiny_t2v --time_budget_s=480

``--time_budget_s`` counts from the start of the process (start-up and
compilation included) and stops early enough to save within it. A second
command can continue with ``--init_from=<checkpoint> --seed=1`` (new clips,
fresh optimiser).
"""

from __future__ import annotations

import shlex
import sys
import time

from adaspa_jax.extras import require
from adaspa_jax.models.embedded import model as tiny_t2v, training

app, flags = require("absl.app"), require("absl.flags")

# The time budget counts from here (after ~1 s of imports): compilation and data
# generation are inside it.
_STARTED_AT = time.perf_counter()

_PRESET = flags.DEFINE_string("preset", "embedded",
                              "adaspa_jax.models.embedded.model preset ('test' for CPU)")
_STEPS = flags.DEFINE_integer("steps", training.TrainConfig.steps, "optimiser steps (at most)")
_BATCH = flags.DEFINE_integer("batch_size", training.TrainConfig.batch_size, "clips per step")
_LR = flags.DEFINE_float("learning_rate", training.TrainConfig.learning_rate, "AdamW peak rate")
_WARMUP = flags.DEFINE_integer("warmup_steps", training.TrainConfig.warmup_steps,
                               "linear warm-up steps")
_DROPOUT = flags.DEFINE_float("caption_dropout", training.TrainConfig.caption_dropout,
                              "share of captions replaced by the empty caption (CFG)")
_EMA = flags.DEFINE_float("ema_decay", training.TrainConfig.ema_decay, "weight EMA decay")
_SEED = flags.DEFINE_integer("seed", 0, "data stream and initialisation seed")
_LOG = flags.DEFINE_integer("log_every", training.TrainConfig.log_every, "steps per loss line")
_BUDGET = flags.DEFINE_float("time_budget_s", None, "stop and save before this many seconds")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "compute dtype")
_SAVE_DTYPE = flags.DEFINE_enum("save_dtype", "bfloat16", ["bfloat16", "float32"],
                                "checkpoint dtype")
_OUT = flags.DEFINE_string("output_dir", "checkpoints/tiny_t2v", "checkpoint directory")
_INIT = flags.DEFINE_string("init_from", None, "start from this tiny_t2v checkpoint's weights "
                            "(fresh optimiser; use another --seed for new clips)")
_PAIRS = flags.DEFINE_bool("reversal_pairs", False, "half of each batch is the other half "
                           "played backwards (motions reversed in the caption)")
_MIRROR = flags.DEFINE_bool("mirror_pairs", False, "half of each batch is the other half "
                            "mirrored left-right (left and right swapped in the caption); with "
                            "--reversal_pairs, partners alternate reversed / mirrored")
_SIGMA_MEAN = flags.DEFINE_float("sigma_logit_mean", 0.0, "location of the logit-normal "
                                  "sigma distribution (> 0: more high-noise steps)")
_HIGH_SHARE = flags.DEFINE_float("high_sigma_share", 0.0, "share of clips with sigma drawn "
                                  "uniformly from [high_sigma_min, 1]")
_HIGH_MIN = flags.DEFINE_float("high_sigma_min", training.TrainConfig.high_sigma_min,
                               "lower end of those sigmas")
_TEXT_LR = flags.DEFINE_float("text_lr_scale", 1.0, "text encoder learning rate relative to "
                              "the transformer's")
_ADD_POS = flags.DEFINE_float("add_learned_positions", None, "with --init_from: switch on the "
                              "learned positional embedding, initialised to this scale times "
                              "the sin-cos table (tiny_t2v.add_learned_positions)")
_SEPARATE = flags.DEFINE_list("separate_words", None, "with --init_from: two words whose "
                              "token embeddings start pushed apart (tiny_t2v.separate_words), "
                              "e.g. left,right")
_MERGE = flags.DEFINE_list("merge_phrases", None, "with --init_from: phrases the tokenizer "
                           "reads as one new token each (tiny_t2v.merge_phrases), e.g. "
                           "'moves left,moves right'")

_GROW = flags.DEFINE_string("grow_to", None, "with --init_from: move the model to this "
                            "preset's clip size first (tiny_t2v.grow; progressive training)")


def main(argv):
  del argv
  cfg = training.TrainConfig(
      preset=_PRESET.value, steps=_STEPS.value, batch_size=_BATCH.value,
      learning_rate=_LR.value, warmup_steps=_WARMUP.value, caption_dropout=_DROPOUT.value,
      ema_decay=_EMA.value, seed=_SEED.value, log_every=_LOG.value,
      time_budget_s=_BUDGET.value, dtype=_DTYPE.value, save_dtype=_SAVE_DTYPE.value,
      reversal_pairs=_PAIRS.value, mirror_pairs=_MIRROR.value, sigma_logit_mean=_SIGMA_MEAN.value,
      text_lr_scale=_TEXT_LR.value, high_sigma_share=_HIGH_SHARE.value,
      high_sigma_min=_HIGH_MIN.value)
  command = " ".join(["python -m adaspa_jax.experiments.train_tiny"]
                     + [shlex.quote(a) for a in sys.argv[1:]])
  if _ADD_POS.value is not None and not _INIT.value:
    raise app.UsageError("--add_learned_positions needs --init_from (a new model takes the "
                         "preset's positions).")
  if _SEPARATE.value and (not _INIT.value or len(_SEPARATE.value) != 2):
    raise app.UsageError(f"--separate_words={','.join(_SEPARATE.value)}: expected two words "
                         "and --init_from (a new model starts with unrelated embeddings).")
  if _MERGE.value and not _INIT.value:
    raise app.UsageError(f"--merge_phrases={','.join(_MERGE.value)}: needs --init_from (a new "
                         "model takes the preset's vocabulary).")
  if _GROW.value and not _INIT.value:
    raise app.UsageError(f"--grow_to={_GROW.value}: needs --init_from (the model to grow).")
  if _GROW.value and _GROW.value not in tiny_t2v.PRESETS:
    raise app.UsageError(f"--grow_to={_GROW.value}: expected one of {sorted(tiny_t2v.PRESETS)}.")
  init = None
  if _INIT.value:
    init = tiny_t2v.load(_INIT.value)
    if _ADD_POS.value is not None:
      init = tiny_t2v.add_learned_positions(init, scale=_ADD_POS.value)
    if _SEPARATE.value:
      init = tiny_t2v.separate_words(init, *_SEPARATE.value)
    if _MERGE.value:
      init = tiny_t2v.merge_phrases(init, _MERGE.value)
    if _GROW.value:
      init = tiny_t2v.grow(init, tiny_t2v.PRESETS[_GROW.value])
  training.train(cfg, _OUT.value, command=command, started_at=_STARTED_AT, init=init)


if __name__ == "__main__":
  app.run(main)
