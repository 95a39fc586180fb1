"""The model families: one registry the loader and the harness read.

A ``Family`` names the module that implements the architecture, the diffusers
class it loads (``from_pretrained`` reads ``_class_name`` from a checkpoint's
config.json), the config fields that count its self/joint attention layers,
and what the family's diffusers pipeline fixes (scheduler, guidance, default
latent size and text length).
"""

from __future__ import annotations

import dataclasses
import importlib
import numbers
from types import ModuleType


@dataclasses.dataclass(frozen=True)
class Family:
  """One model family.

  Attributes:
    name: the family's name (``--model=``).
    module: the module implementing it (``Config``, ``Model``, ``PRESETS``,
      ``weight_rules``).
    class_names: diffusers ``_class_name`` values it loads.
    layer_fields: config fields counting the blocks that each hold one self/joint
      attention layer (AdaSpa state layer), in the state's order.
    scheduler: ``adaspa_jax.models.schedulers`` preset of its pipeline.
    guidance_scale: the pipeline's default guidance.
    guided: classifier-free guidance with two branches ([uncond; cond] rows).
    latent: default latent (F, H, W): the pipeline's default video size / VAE.
    text_len: default text tokens (None: the config's max_text_seq_length).
  """
  name: str
  module: str
  class_names: tuple[str, ...]
  layer_fields: tuple[str, ...]
  scheduler: str
  guidance_scale: float
  guided: bool
  latent: tuple[int, int, int]
  text_len: int | None

  def load(self) -> ModuleType:
    """The family's module (imported on first use)."""
    return importlib.import_module(self.module)

  def attention_layers(self, config) -> int:
    """Self/joint attention calls per forward: the layers AdaSpa sparsifies."""
    return sum(getattr(config, f) for f in self.layer_fields)

  def with_layers(self, config, layers: int):
    """``config`` with ``layers`` blocks; several block kinds (HunyuanVideo's dual- and
    single-stream) keep the config's ratio, rounded, the last kind taking the rest."""
    if (not isinstance(layers, numbers.Integral) or isinstance(layers, bool) or layers < 1):
      raise ValueError(f"layers={layers!r}: expected an int >= 1 (transformer blocks to "
                       "build).")
    total, counts = self.attention_layers(config), {}
    for f in self.layer_fields[:-1]:
      counts[f] = round(layers * getattr(config, f) / total)
    counts[self.layer_fields[-1]] = int(layers) - sum(counts.values())
    return dataclasses.replace(config, **counts)


FAMILIES = {
    # WanPipeline: 480 x 832, 81 frames; T5 padded to 512 tokens; CFG 5.0.
    "wan": Family("wan", "adaspa_jax.models.wan", ("WanTransformer3DModel",), ("num_layers",),
                  "wan2.1", 5.0, True, (21, 60, 104), 512),
    # HunyuanVideoPipeline: 720 x 1280, 129 frames; 256 LLaMA tokens; guidance 6.0 is
    # embedded (guidance x 1000), true CFG off.
    "hunyuan_video": Family("hunyuan_video", "adaspa_jax.models.hunyuan_video",
                            ("HunyuanVideoTransformer3DModel",),
                            ("num_layers", "num_single_layers"), "hunyuan-video", 6.0, False,
                            (33, 90, 160), 256),
    # CogVideoXPipeline: 480 x 720, 49 frames; 226 T5 tokens; CFG 6.0.
    "cogvideox": Family("cogvideox", "adaspa_jax.models.cogvideox",
                        ("CogVideoXTransformer3DModel",), ("num_layers",), "cogvideox-5b",
                        6.0, True, (13, 60, 90), None),
}


def get(name: str) -> Family:
  """The family called ``name``; ``ValueError`` naming the model otherwise."""
  if name not in FAMILIES:
    raise ValueError(f"model={name!r}: expected one of {sorted(FAMILIES)}.")
  return FAMILIES[name]


def of_model(model) -> Family:
  """The family of a model object (by the module that defines its class)."""
  module = type(model).__module__
  for family in FAMILIES.values():
    if family.module == module:
      return family
  raise ValueError(f"checkpoint model from module {module!r}: expected one of "
                   f"{[f.module for f in FAMILIES.values()]}.")


def by_class_name() -> dict[str, str]:
  """diffusers ``_class_name`` -> module, for ``from_pretrained``."""
  return {c: f.module for f in FAMILIES.values() for c in f.class_names}
