import pytest

from adaspa_jax import AdaSpaConfig, get_config
from adaspa_jax.schedule import describe


@pytest.mark.parametrize("kwargs,match", [
    (dict(sparsity=1.0), "sparsity=1.0"),
    (dict(sparsity=-0.1), "sparsity=-0.1"),
    (dict(block_size=48), "block_size=48"),
    (dict(block_size=8), "block_size=8"),
    (dict(num_steps=0), "num_steps=0"),
    (dict(search_steps=(29, 9)), "search_steps"),
    (dict(search_steps=(9, 50)), "search_steps"),
    (dict(search_steps=()), "search_steps"),
    (dict(search_steps=(3, 3)), "search_steps"),
    (dict(recall_threshold=0.0), "recall_threshold"),
    (dict(implementation="cuda"), "implementation"),
])
def test_bad_config_raises(kwargs, match):
  with pytest.raises(ValueError, match=match):
    AdaSpaConfig(**kwargs)


def test_presets():
  paper = get_config("paper")
  assert (paper.sparsity, paper.block_size, paper.num_steps, paper.search_steps) == (
      0.8, 64, 50, (9, 29))
  assert paper.head_adaptive and paper.lse_cache and paper.recall_threshold == 0.8
  assert not get_config("paper-uniform").head_adaptive
  assert get_config("paper", sparsity=0.9).sparsity == 0.9
  assert AdaSpaConfig(search_steps=[3, 7]).search_steps == (3, 7)
  with pytest.raises(ValueError, match="config name"):
    get_config("nope")


def test_describe_paper_schedule():
  assert describe(get_config("paper")).splitlines() == [
      "steps 0-8: dense", "steps 9: fused_search", "steps 10-28: sparse",
      "steps 29: cached_search", "steps 30-49: sparse"]
  no_cache = describe(get_config("paper", lse_cache=False)).splitlines()
  assert no_cache[3] == "steps 29: fused_search"
