"""The embedded default: the shipped checkpoint's metadata (the demo path through the
launcher, on a tiny checkpoint: tests/experiments/test_generate.py)."""

import os

from adaspa_jax.harness import demo
from adaspa_jax.models.embedded import model as tiny_t2v


def test_shipped_checkpoint_is_complete():
  record = tiny_t2v.training_record(demo.CHECKPOINT)
  assert record["steps"] > 0 and record["final_loss"] > 0
  assert demo.default_steps() == 25
  assert demo.default_block_size() == 32
  size = sum(os.path.getsize(os.path.join(d, f))
             for d, _, files in os.walk(demo.CHECKPOINT) for f in files)
  assert size < 15 * 2**20
