"""AdaSpa as a Flax linen module: a one-line swap for a DiT's attention.

  out = AdaSpaAttention(AdaSpaConfig(), text_span=(0, 226))(q, k, v, step)
  # was: out = jax.nn.dot_product_attention(q, k, v)

The state (block lists, counts, cached LSE: an ``AdaSpaState``) lives in the
``"adaspa"`` collection, variable ``"state"``, created from q's shape on the
first ``init`` / ``apply`` and updated by every call made with
``mutable=["adaspa"]``:

  variables = model.init(rng, x, step=0)                   # params + a fresh state
  out, updates = model.apply(variables, x, step=t, mutable=["adaspa"])
  variables = {**variables, **updates}                     # carry it to step t + 1

Under ``nn.scan`` over layers give the collection a layer axis
(``variable_axes={"params": 0, "adaspa": 0}``). ``init`` leaves the state as
created (every row dense), whatever step it is given. What stays the caller's
is as in ``adaspa_jax.nnx``: the step, the text span, ``kv_lengths`` and the
guidance batch (2B rows, one state row each).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from adaspa_jax import parallel
from adaspa_jax.config import AdaSpaConfig
from adaspa_jax.layout import BlockLayout
from adaspa_jax.state import init_state

COLLECTION = "adaspa"


class AdaSpaAttention(nn.Module):
  """AdaSpa attention whose state is the ``"adaspa"`` collection.

  Attributes:
    config: the ``AdaSpaConfig``.
    text_span: (start, length) of the text tokens (a prefix or a suffix), or None.
    sequence_parallel: an ``adaspa_jax.parallel.SequenceParallel`` (the caller's mesh
      and axis name) for head-parallel attention, or None.
    implementation, interpret: kernel implementation and Pallas interpret mode.
  """
  config: AdaSpaConfig
  text_span: Any = None
  sequence_parallel: Any = None
  implementation: str | None = None
  interpret: bool = False

  @nn.compact
  def __call__(self, q, k, v, step, *, kv_lengths=None, sm_scale=None):
    """q, k, v [B, S, H, D] at denoising step ``step`` -> out [B, S, H, D]."""
    if not isinstance(self.config, AdaSpaConfig):
      raise ValueError(f"config={self.config!r}: expected an adaspa_jax.AdaSpaConfig.")
    b, s, h, _ = q.shape
    layout = BlockLayout.create(s, self.config.block_size, text_span=self.text_span,
                                query_block_size=self.config.query_block_size)
    state = self.variable(COLLECTION, "state",
                          lambda: init_state(self.config, b, s, h, layout=layout))
    out, new = parallel.adaspa_attention(
        q, k, v, state.value, step, self.config, sequence_parallel=self.sequence_parallel,
        layout=layout, kv_lengths=kv_lengths, sm_scale=sm_scale,
        implementation=self.implementation, interpret=self.interpret)
    if not self.is_initializing() and self.is_mutable_collection(COLLECTION):
      state.value = new
    return out
