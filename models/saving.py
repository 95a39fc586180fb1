"""Writing NNX models as diffusers checkpoints, through the loaders' own rule tables.

``export_state_dict`` runs a model's ``weight_rules`` backwards: each NNX
parameter (each layer of a stacked one) becomes the one diffusers key whose
rule maps to it, in diffusers' layout. The result is checked by loading it back
through ``adaspa_jax.models.loading.load_state_dict`` into a fresh abstract copy and
comparing every value, so a rule the inversion gets wrong cannot pass silently.

``save_pretrained`` writes ``config.json`` (with ``_class_name``) and
``diffusion_pytorch_model.safetensors``, the directory ``adaspa_jax.models.from_pretrained``
and diffusers' ``from_pretrained`` read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import numpy as np
from flax import nnx

from adaspa_jax.extras import require
from adaspa_jax.models import loading

# Model config fields that are ours, not diffusers': they choose how attention runs.
RUNTIME_FIELDS = ("attention", "adaspa", "sequence_parallel")

# "(?P<name>" ... ")" with no nested groups inside, as the rule tables write them.
_GROUP = re.compile(r"\(\?P<(?P<name>\w+)>(?P<body>[^()]*)\)")


def _target_pattern(target: str) -> re.Pattern:
  """'blocks/{n}/kernel' -> a regex capturing n from an NNX path."""
  parts = re.split(r"\{(\w+)\}", target)
  regex = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^/]+)"
                  for i, p in enumerate(parts))
  return re.compile(regex)


def _source_key(source: str, groups: dict[str, str]) -> str | None:
  """The literal key a rule's source regex matches with these group values."""
  def fill(m):
    return groups.get(m.group("name"), m.group(0))
  filled = _GROUP.sub(fill, source)
  if "(" in filled or any(ch in filled for ch in "[]*+?|^$"):
    return None
  return re.sub(r"\\(.)", r"\1", filled)


def _first_rule(key: str, compiled):
  for pattern, rule in compiled:
    if pattern.fullmatch(key):
      return rule
  return None


def export_state_dict(model: nnx.Module, rules, *, dtype=None) -> dict[str, np.ndarray]:
  """diffusers key -> numpy array for every parameter of ``model``.

  Args:
    model: a concrete NNX model.
    rules: the model's ``weight_rules(config)`` (``adaspa_jax.models.loading.Rule``s).
    dtype: dtype of every exported tensor; None keeps each parameter's dtype.

  Raises:
    ValueError naming the NNX parameter that no rule (or more than one key)
    maps to, or the key whose round trip through ``load_state_dict`` differs.
  """
  compiled = [(re.compile(r.source), r) for r in rules]
  params = loading.model_params(model)
  out = {}
  for path, var in params.items():
    value = np.asarray(var.get_value())
    found = None
    for _, rule in compiled:
      m = _target_pattern(rule.target).fullmatch(path)
      if m is None:
        continue
      stacked = "(?P<layer>" in rule.source
      layers = range(value.shape[0]) if stacked else [None]
      keys = []
      for layer in layers:
        groups = dict(m.groupdict(), **({} if layer is None else {"layer": str(layer)}))
        key = _source_key(rule.source, groups)
        # The key must be one this rule reads (first match wins in the loader).
        if key is None or _first_rule(key, compiled) is not rule:
          keys = None
          break
        keys.append((key, layer))
      if keys:
        found = (rule, keys)
        break
    if found is None:
      raise ValueError(f"NNX parameter {path!r}: no weight rule maps a diffusers key to it.")
    rule, keys = found
    inverse = loading._PERMUTATIONS[rule.transform]
    for key, layer in keys:
      x = value if layer is None else value[layer]
      if inverse is not None:
        x = np.transpose(x, np.argsort(inverse))
      if key in out:
        raise ValueError(f"diffusers key {key!r} is produced for two NNX parameters.")
      out[key] = np.ascontiguousarray(x if dtype is None else x.astype(dtype))
  _verify(model, out, rules, dtype)
  return out


def _verify(model, tensors, rules, dtype):
  graphdef, state = nnx.split(model)
  copy = nnx.merge(graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
  loading.load_state_dict(copy, tensors, rules)
  original, loaded = loading.model_params(model), loading.model_params(copy)
  for path, var in original.items():
    a = np.asarray(var.get_value())
    if dtype is not None:
      a = a.astype(dtype).astype(a.dtype)
    if not np.array_equal(a, np.asarray(loaded[path].get_value())):
      raise ValueError(f"NNX parameter {path!r} does not survive export and reload.")


def diffusers_config(config) -> dict:
  """A model config as diffusers' constructor takes it: every field but ``RUNTIME_FIELDS``."""
  return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
          if f.name not in RUNTIME_FIELDS}


_WEIGHTS = "diffusion_pytorch_model"


def write_atomic(path, write) -> None:
  """Calls ``write(tmp)`` to fill a temporary file beside ``path``, then renames it to
  ``path``: a reader sees the old file or the whole new one, never a partial one."""
  path = os.fspath(path)
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json_atomic(path, value) -> None:
  def write(tmp):
    with open(tmp, "w") as f:
      json.dump(value, f, indent=1)
  write_atomic(path, write)


def shard(tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[dict[str, np.ndarray]]:
  """Splits a state dict into groups of at most ``max_shard_bytes`` tensor bytes each
  (in key order; a tensor larger than the limit gets a group of its own)."""
  if not isinstance(max_shard_bytes, (int, np.integer)) or max_shard_bytes < 1:
    raise ValueError(f"max_shard_bytes={max_shard_bytes!r}: expected an int >= 1.")
  groups, size = [{}], 0
  for key in sorted(tensors):
    n = tensors[key].nbytes
    if groups[-1] and size + n > max_shard_bytes:
      groups.append({})
      size = 0
    groups[-1][key] = tensors[key]
    size += n
  return groups


def save_pretrained(model: nnx.Module, directory, *, class_name: str, rules,
                    dtype=None, max_shard_bytes: int | None = None) -> str:
  """Writes ``config.json`` + ``diffusion_pytorch_model.safetensors``; returns the directory.

  The config holds the model config's fields except our run-time options
  (``RUNTIME_FIELDS``: how attention runs, not what the weights are), plus
  ``_class_name``. With ``max_shard_bytes`` and more tensor bytes than that, the
  weights go to diffusers' sharded layout instead:
  ``diffusion_pytorch_model-0000i-of-0000n.safetensors`` and an index
  ``diffusion_pytorch_model.safetensors.index.json`` (what diffusers writes and
  ``adaspa_jax.models.loading.safetensors_files`` reads).
  """
  save_file = require("safetensors.numpy", "train").save_file

  config = diffusers_config(model.config)
  tensors = export_state_dict(model, rules, dtype=dtype)
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  # config.json goes first and comes back last: a save cut short leaves a directory
  # that does not load, never old and new weights mixed.
  config_path = os.path.join(directory, "config.json")
  if os.path.exists(config_path):
    os.remove(config_path)
  # Earlier weights in the directory (one file or shards) would be read with the new ones.
  for name in os.listdir(directory):
    if name.startswith(_WEIGHTS) and (name.endswith(".safetensors") or name.endswith(".json")):
      os.remove(os.path.join(directory, name))
  groups = [tensors] if max_shard_bytes is None else shard(tensors, max_shard_bytes)
  save = lambda group: lambda tmp: save_file(group, tmp)
  if len(groups) == 1:
    write_atomic(os.path.join(directory, f"{_WEIGHTS}.safetensors"), save(tensors))
  else:
    weight_map = {}
    for i, group in enumerate(groups):
      name = f"{_WEIGHTS}-{i + 1:05d}-of-{len(groups):05d}.safetensors"
      write_atomic(os.path.join(directory, name), save(group))
      weight_map.update({key: name for key in group})
    index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
             "weight_map": weight_map}
    write_json_atomic(os.path.join(directory, f"{_WEIGHTS}.safetensors.index.json"), index)
  write_json_atomic(config_path, {"_class_name": class_name, **config})
  return directory
