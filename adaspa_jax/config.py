"""AdaSpa configuration: a frozen dataclass (static under jit) with named presets."""

from __future__ import annotations

import dataclasses
import numbers

from pallas_kernels import validation

# Block-selection policies a search step can use (see ``adaspa_jax.policies``).
POLICIES = ("adaspa", "topp", "svg", "minference")


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
    policy: how a search step chooses the block lists (``adaspa_jax.policies``):
      "adaspa" (row-wise top-k of exact block mass), "topp" (cumulative mass),
      "svg" (Sparse VideoGen spatial/temporal) or "minference" (vertical-slash).
      Every policy shares the schedule, the state and the kernels; the head tiers
      (``head_adaptive``) apply to "adaspa" only.
    top_p: share of each video row's video mass that "topp" keeps, in (0, 1].
      "topp" ignores ``sparsity``; its state is nK ids wide (every block).
    frame_tokens: tokens per latent frame in the video part of the sequence
      (frame-major order); "svg" needs it, the other policies ignore it.
    measure_recall: at search steps the state's recall is the exact share of
      softmax mass the chosen blocks keep (an extra exact block-mass pass where
      the policy has none); otherwise each policy reports its own estimate.
    query_block_size: rows per query block of the block lists and the block mass,
      over key blocks of ``block_size`` keys; None (the default) means
      ``block_size`` (the paper's square blocks). Else a power-of-two multiple of
      ``block_size`` of at most 128, e.g. 128 over blocks of 64 (SpargeAttn's
      granularity): selection is then a row-wise top-k per 128-row query block, a
      query block holding any text token is a dense row, and the state's lists
      have ceil(S / 128) rows. The Mosaic kernel runs 128 x 64 natively (both
      compute warpgroups of a CTA share one list and one K/V ring); the reference and
      Triton paths expand the lists to square blocks (same output, no speed-up).
    precision: "bf16" (the inputs' dtype), "fp8" or "int8_fp8": the dense warm-up
      steps and the sparse steps run the 8-bit recipe (``pallas_kernels.reference.fp8``:
      K smoothed, Q and K per block, P, and V per channel, float32 accumulation) with Q
      and K in float8_e4m3fn ("fp8"; dense FP8 is cuDNN's FP8 kernel where it runs) or
      in int8 ("int8_fp8", SageAttention2's split: about 4x less score error, same
      speed class), P and V in float8_e4m3fn. The search passes (block mass, fused
      search) stay in the inputs' dtype, since their mass chooses the lists.
    debug_checks: also check traced values with ``jax.experimental.checkify``: the
      step in [0, num_steps), kv_lengths in [0, S], and every block list the kernels
      read (indices in range, no duplicates, counts possible). Run the jitted
      function under ``checkify.checkify(f, errors=checkify.user_checks)`` and call
      ``err.throw()`` on its error; without that wrapper JAX refuses to trace the
      checks. Concrete values are always checked, with a ValueError.
  """

  sparsity: float = 0.8
  block_size: int = 64
  num_steps: int = 50
  search_steps: tuple[int, ...] = (9, 29)
  head_adaptive: bool = True
  recall_threshold: float = 0.8
  lse_cache: bool = True
  implementation: str | None = None
  policy: str = "adaspa"
  top_p: float = 0.9
  frame_tokens: int | None = None
  measure_recall: bool = False
  debug_checks: bool = False
  query_block_size: int | None = None
  precision: str = "bf16"

  def __post_init__(self):
    s = self.sparsity
    if not isinstance(s, numbers.Real) or isinstance(s, bool) or not 0.0 <= s < 1.0:
      raise ValueError(f"sparsity={s!r}: expected a float in [0, 1).")
    validation.check_block_size(self.block_size)
    validation.check_query_block_size(self.query_block_size, self.block_size)
    validation.check_precision(self.precision)
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
    if self.precision in validation.EIGHT_BIT_PRECISIONS and self.implementation == "triton":
      raise ValueError(f"precision={self.precision!r} with implementation='triton': expected "
                       "implementation None, 'reference' or 'mosaic' (Triton has no 8-bit "
                       "path).")
    if self.policy not in POLICIES:
      raise ValueError(f"policy={self.policy!r}: expected one of {POLICIES}.")
    p = self.top_p
    if not isinstance(p, numbers.Real) or isinstance(p, bool) or not 0.0 < p <= 1.0:
      raise ValueError(f"top_p={p!r}: expected a float in (0, 1].")
    f = self.frame_tokens
    if f is not None and (not isinstance(f, numbers.Integral) or isinstance(f, bool) or f < 1):
      raise ValueError(f"frame_tokens={f!r}: expected None or an int >= 1.")
    for name in ("measure_recall", "debug_checks"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name}={getattr(self, name)!r}: expected a bool.")

  @property
  def effective_query_block_size(self) -> int:
    """Rows per query block: ``query_block_size``, or ``block_size`` when None."""
    return validation.check_query_block_size(self.query_block_size, self.block_size)

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
    # Baselines on the paper's schedule and sparsity, through the same kernels.
    # "svg" needs the model's frame size: get_config("svg", frame_tokens=...).
    "svg": AdaSpaConfig(policy="svg", head_adaptive=False),
    "minference": AdaSpaConfig(policy="minference", head_adaptive=False),
    "topp": AdaSpaConfig(policy="topp", head_adaptive=False),
}


def get_config(name: str, **overrides) -> AdaSpaConfig:
  """Returns a named preset, optionally with fields replaced."""
  if name not in PRESETS:
    raise ValueError(f"config name {name!r}: expected one of {sorted(PRESETS)}.")
  return PRESETS[name].replace(**overrides)
