"""The embedded default: the shipped checkpoint's metadata (the demo path through the
launcher, on a tiny checkpoint: tests/experiments/test_generate.py)."""

import os

import numpy as np
import pytest

from adaspa_jax.harness import demo
from adaspa_jax.models.embedded import model as tiny_t2v


def test_shipped_checkpoint_is_complete():
  record = tiny_t2v.training_record(demo.CHECKPOINT)
  assert record["steps"] > 0 and record["final_loss"] > 0
  assert demo.default_steps() == 25
  assert demo.default_block_size() == 32
  assert demo.default_head_adaptive() is False
  size = sum(os.path.getsize(os.path.join(d, f))
             for d, _, files in os.walk(demo.CHECKPOINT) for f in files)
  assert size < 15 * 2**20


def test_side_by_side_puts_the_difference_last():
  rng = np.random.default_rng(0)
  d, a = rng.random((2, 3, 16, 20, 3), dtype=np.float32)
  x = demo.side_by_side(d, a, gap=2)
  assert x.shape == (3, 16, 64, 3)
  np.testing.assert_array_equal(x[:, :, :20], d)
  np.testing.assert_array_equal(x[:, :, 22:42], a)
  np.testing.assert_allclose(x[:, :, 44:], np.abs(a - d))
  assert (x[:, :, 20:22] == 1).all() and (x[:, :, 42:44] == 1).all()
  with pytest.raises(ValueError, match="dense, adaspa have shapes"):
    demo.side_by_side(d, a[:, :8])
