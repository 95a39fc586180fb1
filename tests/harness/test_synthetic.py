"""harness/synthetic.py: one attention layer through the AdaSpa schedule on synthetic inputs."""

import numpy as np

from adaspa_jax import CACHED_SEARCH, DENSE, FUSED_SEARCH, SPARSE, AdaSpaConfig
from adaspa_jax.harness import synthetic


def test_demo_run_reports_each_phase():
  cfg = AdaSpaConfig(sparsity=0.7, block_size=16, num_steps=6, search_steps=(1, 4))
  per_step, seconds = synthetic.run_schedule(cfg, frames=2, height=4, width=8, text_len=5,
                                             heads=3, head_dim=32)
  np.testing.assert_array_equal(per_step["phase"],
                                [DENSE, FUSED_SEARCH, SPARSE, SPARSE, CACHED_SEARCH, SPARSE])
  err = per_step["rel_error"]
  assert err[0] < 1e-5 and err[1] < 1e-5       # dense and fused search are exact
  assert 0 < err[2] < 1.0                       # sparse steps approximate
  assert np.all((per_step["recall"][1:] > 0) & (per_step["recall"][1:] <= 1 + 1e-6))
  assert per_step["sparsity"][2] > 0.3
  assert seconds > 0
