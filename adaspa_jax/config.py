"""AdaSpa configuration: a frozen dataclass (static under jit) with named presets."""

from __future__ import annotations

import dataclasses
import numbers

from pallas_kernels import validation


@dataclasses.dataclass(frozen=True)
class AdaSpaConfig:
  """Hyper-parameters of AdaSpa (paper defaults).

  Attributes:
    sparsity: base share of video key blocks each query block drops, in [0, 1).
    block_size: tokens per block (power of two >= 16).
    num_steps: denoising steps of the schedule.
    search_steps: 0-indexed steps that search, ascending; the first is the fused
      (dense + block mass) search, steps before it are dense warm-up. The paper's
      {10, 30} of 50 (1-indexed) is (9, 29).
    head_adaptive: split heads into three sparsity tiers by recall.
    recall_threshold: recall above which a head counts as "easy" when sizing tiers.
    lse_cache: later searches reuse the first search's LSE (one QK^T pass);
      otherwise every search is a fused dense search.
    implementation: kernel implementation ("reference", "triton", "mosaic") or
      None for the fastest on the device.
  """

  sparsity: float = 0.8
  block_size: int = 64
  num_steps: int = 50
  search_steps: tuple[int, ...] = (9, 29)
  head_adaptive: bool = True
  recall_threshold: float = 0.8
  lse_cache: bool = True
  implementation: str | None = None

  def __post_init__(self):
    s = self.sparsity
    if not isinstance(s, numbers.Real) or isinstance(s, bool) or not 0.0 <= s < 1.0:
      raise ValueError(f"sparsity={s!r}: expected a float in [0, 1).")
    validation.check_block_size(self.block_size)
    if (not isinstance(self.num_steps, numbers.Integral) or isinstance(self.num_steps, bool)
        or self.num_steps < 1):
      raise ValueError(f"num_steps={self.num_steps!r}: expected an int >= 1.")
    steps = tuple(self.search_steps)
    if (not steps or not all(isinstance(t, numbers.Integral) for t in steps)
        or any(not 0 <= t < self.num_steps for t in steps)
        or any(a >= b for a, b in zip(steps, steps[1:]))):
      raise ValueError(
          f"search_steps={self.search_steps!r}: expected a non-empty, strictly increasing "
          f"tuple of ints in [0, num_steps={self.num_steps}).")
    object.__setattr__(self, "search_steps", tuple(int(t) for t in steps))
    r = self.recall_threshold
    if not isinstance(r, numbers.Real) or not 0.0 < r <= 1.0:
      raise ValueError(f"recall_threshold={r!r}: expected a float in (0, 1].")
    if self.implementation not in (None, "reference", "triton", "mosaic"):
      raise ValueError(
          f"implementation={self.implementation!r}: expected None, 'reference', 'triton' "
          "or 'mosaic'.")

  @property
  def first_search(self) -> int:
    return self.search_steps[0]

  def replace(self, **changes) -> "AdaSpaConfig":
    return dataclasses.replace(self, **changes)


PRESETS = {
    # The paper: 50 steps, 10 dense warm-up steps, searches at {10, 30} (1-indexed).
    "paper": AdaSpaConfig(),
    # Paper schedule with the head hierarchy off (its "w/o head adaptive" row).
    "paper-uniform": AdaSpaConfig(head_adaptive=False),
    # Small models and CPU tests: short schedule, small blocks.
    "tiny": AdaSpaConfig(block_size=16, num_steps=8, search_steps=(2, 5)),
}


def get_config(name: str, **overrides) -> AdaSpaConfig:
  """Returns a named preset, optionally with fields replaced."""
  if name not in PRESETS:
    raise ValueError(f"config name {name!r}: expected one of {sorted(PRESETS)}.")
  return PRESETS[name].replace(**overrides)
