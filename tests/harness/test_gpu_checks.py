"""harness/gpu_checks.py on CPU: the checks run at small sizes and the accounting solves."""

import jax.numpy as jnp
import pytest

from adaspa_jax.config import AdaSpaConfig
from adaspa_jax.harness import gpu_checks
from adaspa_jax.state import state_nbytes


def test_determinism_reference_small():
  res = gpu_checks.determinism(seq_len=150, heads=2, head_dim=64, dtype=jnp.float32)
  assert set(res["bitwise_equal"]) == {"reference"}
  assert set(res["bitwise_equal"]["reference"]) == {
      "block_sparse_attention", "attention_with_block_mass", "block_mass", "adaspa_cycle"}
  assert res["all_equal"] is True


def test_memory_runs_every_phase_and_reports_state_bytes():
  res = gpu_checks.memory([200], num_layers=2, heads=2, head_dim=64, log=lambda _: None)
  (row,) = res["rows"]
  assert row["ok"], row.get("error")
  assert set(row["phases"]) == {"warmup", "search", "sparse"}
  assert row["state_nbytes"] == state_nbytes(AdaSpaConfig(), 1, 200, 2, num_layers=2)
  assert row["phases"]["search"]["step"] == AdaSpaConfig().search_steps[0]


@pytest.mark.parametrize("layers,heads", [(60, 24), (2, 4)])
def test_largest_seq_len_is_the_boundary(layers, heads):
  card = 80 * 2**30
  best = gpu_checks.largest_seq_len(card, num_layers=layers, heads=heads, multiple=4096)
  assert best % 4096 == 0 and best > 0

  def need(s):
    return (state_nbytes(AdaSpaConfig(), 1, s, heads, num_layers=layers)
            + 4 * s * heads * 128 * 2
            + gpu_checks.WORKSPACE_PER_MASS * heads * (-(-s // 64)) ** 2 * 4)

  assert need(best) <= card < need(best + 4096)
