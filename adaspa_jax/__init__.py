"""AdaSpa: training-free adaptive block-sparse attention for video DiTs (arXiv 2502.21079)."""

from adaspa_jax.attention import adaspa_attention
from adaspa_jax.blocks import text_blocks_mask, tier_sparsities, video_budget
from adaspa_jax.config import POLICIES, PRESETS, AdaSpaConfig, get_config
from adaspa_jax.schedule import (CACHED_SEARCH, DENSE, FUSED_SEARCH, PHASE_NAMES, SPARSE,
                                 phase, phase_table)
from adaspa_jax.selection import Selection, select_blocks
from adaspa_jax.state import AdaSpaState, init_state, state_nbytes, state_shapes

__all__ = [
    "AdaSpaConfig", "AdaSpaState", "CACHED_SEARCH", "DENSE", "FUSED_SEARCH", "PHASE_NAMES",
    "POLICIES", "PRESETS", "SPARSE", "Selection", "adaspa_attention", "get_config",
    "init_state", "phase", "phase_table", "select_blocks", "state_nbytes", "state_shapes",
    "text_blocks_mask", "tier_sparsities", "video_budget",
]
