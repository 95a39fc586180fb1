"""Loading diffusers checkpoints into NNX models through a declarative rule table.

A model module lists ``Rule``s that map diffusers state-dict keys (regexes) to
NNX parameter paths, with the layout change each key needs. ``load_state_dict``
applies them; ``from_pretrained`` reads a diffusers model directory
(``config.json`` + single or sharded ``*.safetensors``) and builds the model
named by the config's ``_class_name``.

Memory: ``from_pretrained`` builds the model abstractly (``nnx.eval_shape``),
memory-maps the safetensors files and fills one NNX parameter at a time, so the
host holds the finished parameters plus at most one parameter in flight, never a
second copy of the whole checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

TRANSFORMS = ("identity", "linear", "conv3d", "conv2d")
# Axis permutation applied to the diffusers tensor; None keeps it as is.
_PERMUTATIONS = {
    "identity": None,
    "linear": (1, 0),                # W[out, in] -> kernel[in, out]
    "conv3d": (2, 3, 4, 1, 0),       # [O, I, t, h, w] -> [t, h, w, I, O]
    "conv2d": (2, 3, 1, 0),          # [O, I, h, w] -> [h, w, I, O]
}


@dataclasses.dataclass(frozen=True)
class Rule:
  """Maps diffusers keys to one NNX parameter.

  Attributes:
    source: regex that must match the whole diffusers key. An optional named
      group ``layer`` is the index into the leading (stacked-layers) axis of the
      target; any other named group fills a ``{name}`` placeholder of ``target``.
    target: '/'-separated path of an ``nnx.Param`` in the model, e.g.
      ``"blocks/attn1/to_q/kernel"``.
    transform: "identity", "linear" (W[out, in] -> kernel[in, out]), "conv3d"
      (OIthw -> thwIO) or "conv2d" (OIhw -> hwIO).
  """
  source: str
  target: str
  transform: str = "identity"

  def __post_init__(self):
    if self.transform not in TRANSFORMS:
      raise ValueError(
          f"transform={self.transform!r} (rule for {self.source!r}): expected one of {TRANSFORMS}.")
    try:
      re.compile(self.source)
    except re.error as e:
      raise ValueError(f"source={self.source!r}: not a valid regex ({e}).") from None


@dataclasses.dataclass(frozen=True)
class _Match:
  key: str
  target: str
  layer: int | None
  transform: str


def _transformed_shape(shape, transform, key):
  perm = _PERMUTATIONS[transform]
  if perm is None:
    return tuple(shape)
  if len(shape) != len(perm):
    raise ValueError(
        f"diffusers key {key!r} has shape {tuple(shape)}: transform {transform!r} expects "
        f"rank {len(perm)}.")
  return tuple(shape[i] for i in perm)


def _apply_transform(x, transform):
  perm = _PERMUTATIONS[transform]
  return x if perm is None else np.transpose(x, perm)


def _match_keys(keys, rules):
  """Returns (matches, unexpected keys) for the diffusers keys."""
  compiled = [(re.compile(r.source), r) for r in rules]
  matches, unexpected = [], []
  for key in keys:
    for pattern, rule in compiled:
      m = pattern.fullmatch(key)
      if m is None:
        continue
      groups = {k: v for k, v in m.groupdict().items() if v is not None}
      layer = groups.pop("layer", None)
      try:
        target = rule.target.format(**groups)
      except KeyError as e:
        raise ValueError(
            f"rule target {rule.target!r} uses placeholder {e} that source {rule.source!r} "
            "does not capture.") from None
      matches.append(_Match(key, target, None if layer is None else int(layer), rule.transform))
      break
    else:
      unexpected.append(key)
  return matches, unexpected


def model_params(model: nnx.Module) -> dict[str, nnx.Param]:
  """Every ``nnx.Param`` of the model by '/'-joined path."""
  return {"/".join(str(p) for p in path): node
          for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Param)}


def _shape_of(tensors, key):
  if isinstance(tensors, SafetensorsFiles):
    return tensors.shape(key)
  return tuple(np.shape(tensors[key]))


def load_state_dict(model: nnx.Module, tensors: Mapping[str, np.ndarray],
                    rules: Sequence[Rule], *, dtype=None) -> None:
  """Fills the model's parameters in place from a diffusers state dict.

  Every diffusers key must match a rule (first match wins), every NNX parameter
  (every layer of a stacked one) must be filled exactly once, and every shape
  must agree after the transform; otherwise nothing is written and a
  ``ValueError`` lists the missing NNX parameters, the unexpected diffusers keys
  and the shape mismatches (naming the key).

  Args:
    model: an NNX module, concrete or abstract (from ``nnx.eval_shape``).
    tensors: diffusers key -> array (numpy, torch-converted, or a lazy
      ``SafetensorsFiles``); read one key at a time.
    rules: the model's ``weight_rules``.
    dtype: dtype of every loaded parameter; None keeps each parameter's dtype
      in the model.
  """
  params = model_params(model)
  matches, unexpected = _match_keys(list(tensors.keys()), rules)
  problems = []
  by_target: dict[str, list[_Match]] = {}
  for m in matches:
    if m.target not in params:
      problems.append(f"diffusers key {m.key!r} maps to {m.target!r}, which is not an NNX "
                      "parameter of the model")
      continue
    by_target.setdefault(m.target, []).append(m)

  missing = [p for p in params if p not in by_target]
  for target, ms in by_target.items():
    shape = tuple(params[target].get_value().shape)
    stacked = [m for m in ms if m.layer is not None]
    whole = [m for m in ms if m.layer is None]
    if stacked and whole:
      problems.append(f"{target!r} is written whole by {whole[0].key!r} and per layer by "
                      f"{stacked[0].key!r}")
      continue
    if whole and len(whole) > 1:
      problems.append(f"{target!r} is written by several keys: {[m.key for m in whole]}")
      continue
    if stacked:
      if not shape:
        problems.append(f"{target!r} is a scalar but {stacked[0].key!r} gives it a layer index")
        continue
      seen = {}
      for m in stacked:
        if not 0 <= m.layer < shape[0]:
          problems.append(f"diffusers key {m.key!r}: layer {m.layer} out of range for {target!r} "
                          f"with {shape[0]} stacked layers")
        elif m.layer in seen:
          problems.append(f"{target!r} layer {m.layer} is written by {seen[m.layer]!r} and "
                          f"{m.key!r}")
        else:
          seen[m.layer] = m.key
      missing += [f"{target}[layer {i}]" for i in range(shape[0]) if i not in seen]
      expected = shape[1:]
    else:
      expected = shape
    for m in ms:
      got = _transformed_shape(_shape_of(tensors, m.key), m.transform, m.key)
      if got != expected:
        problems.append(
            f"diffusers key {m.key!r} has shape {_shape_of(tensors, m.key)} ({m.transform} -> "
            f"{got}) but {target!r} expects {expected}"
            + (f" per layer (stacked shape {shape})" if m.layer is not None else ""))

  if missing or unexpected or problems:
    lines = []
    if missing:
      lines.append(f"{len(missing)} missing NNX parameters (no diffusers key maps to them): "
                   + ", ".join(missing))
    if unexpected:
      lines.append(f"{len(unexpected)} unexpected diffusers keys (no rule matches): "
                   + ", ".join(unexpected))
    lines += problems
    raise ValueError("load_state_dict: " + "\n  ".join(lines))

  for target, ms in by_target.items():
    var = params[target]
    current = var.get_value()
    out_dtype = jnp.dtype(dtype if dtype is not None else current.dtype)
    if ms[0].layer is None:
      host = np.asarray(_apply_transform(np.asarray(tensors[ms[0].key]), ms[0].transform),
                        dtype=out_dtype)
    else:
      host = np.empty(current.shape, out_dtype)
      for m in ms:
        host[m.layer] = _apply_transform(np.asarray(tensors[m.key]), m.transform)
    var.set_value(jnp.asarray(host))
    del host


# --- safetensors -----------------------------------------------------------------

_ST_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}


def read_header(path) -> tuple[int, dict]:
  """(offset of the data section, {key: info}) of one safetensors file, checked.

  Raises ValueError naming the file for a file too short for its header, a header
  that is not a JSON object, an entry without a known dtype, a shape or offsets,
  and a tensor whose bytes do not fit the file (truncated) or its shape.
  """
  path = os.fspath(path)
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ValueError(f"{path}: truncated safetensors file ({size} bytes): expected an "
                       "8-byte header length first.")
    n = int.from_bytes(head, "little")
    if n > size - 8:
      raise ValueError(f"{path}: truncated or corrupted safetensors file: its header claims "
                       f"{n} bytes but the file holds {size - 8} after the length.")
    raw = f.read(n)
  try:
    header = json.loads(raw)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: corrupted safetensors header (not JSON: {e}).") from None
  if not isinstance(header, dict):
    raise ValueError(f"{path}: corrupted safetensors header: expected a JSON object, got "
                     f"{type(header).__name__}.")
  header.pop("__metadata__", None)
  data = size - 8 - n
  for key, info in header.items():
    ok = (isinstance(info, dict) and isinstance(info.get("shape"), list)
          and all(isinstance(d, int) and d >= 0 for d in info["shape"])
          and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
          and all(isinstance(o, int) for o in info["data_offsets"]))
    if not ok:
      raise ValueError(f"{path}: corrupted safetensors header: entry {key!r} = {info!r} lacks "
                       "a shape or data_offsets.")
    if info.get("dtype") not in _ST_DTYPES:
      raise ValueError(f"safetensors key {key!r} in {path!r} has dtype {info.get('dtype')!r}: "
                       f"expected one of {sorted(_ST_DTYPES)}.")
    begin, end = info["data_offsets"]
    want = int(np.prod(info["shape"], dtype=np.int64)) * _ST_DTYPES[info["dtype"]].itemsize
    if not 0 <= begin <= end or end - begin != want:
      raise ValueError(f"{path}: corrupted safetensors header: {key!r} has offsets "
                       f"[{begin}, {end}) for {want} bytes of {info['dtype']} "
                       f"{tuple(info['shape'])}.")
    if end > data:
      raise ValueError(f"{path}: truncated safetensors file: {key!r} needs bytes up to {end} "
                       f"of the data section, which holds {data}.")
  return 8 + n, header


class SafetensorsFiles(Mapping):
  """Lazy read-only mapping key -> numpy array over one or more safetensors files.

  Each file is memory-mapped; an array is read from disk only when used, so
  iterating over keys and shapes costs nothing. bf16 and float8 tensors come back
  as ml_dtypes arrays.
  """

  def __init__(self, files: Sequence[str | os.PathLike]):
    self._entries = {}
    self._maps = {}
    for path in map(str, files):
      data_start, header = read_header(path)
      for key, info in header.items():
        if key in self._entries:
          raise ValueError(f"safetensors key {key!r} appears in both "
                           f"{self._entries[key][0]!r} and {path!r}.")
        self._entries[key] = (path, data_start, info)

  def _map(self, path):
    if path not in self._maps:
      self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
    return self._maps[path]

  def shape(self, key) -> tuple[int, ...]:
    return tuple(self._entries[key][2]["shape"])

  def __getitem__(self, key) -> np.ndarray:
    path, start, info = self._entries[key]
    begin, end = info["data_offsets"]
    raw = self._map(path)[start + begin:start + end]
    return raw.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)


def safetensors_files(directory) -> list[str]:
  """The safetensors files of a diffusers model directory.

  With an index json (sharded checkpoint) the files it names; otherwise every
  ``*.safetensors`` in the directory.
  """
  directory = os.fspath(directory)
  indices = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors.index.json"))
  if len(indices) > 1:
    raise ValueError(f"path={directory!r} holds several safetensors indices {indices}: "
                     "expected at most one.")
  if indices:
    index = os.path.join(directory, indices[0])
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
      raise ValueError(f"{index}: corrupted safetensors index (expected JSON with a "
                       f"'weight_map' of key -> file): {type(e).__name__}: {e}.") from None
  else:
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
  if not files:
    raise ValueError(f"path={directory!r}: no *.safetensors files found.")
  paths = [os.path.join(directory, f) for f in files]
  for p in paths:
    if not os.path.exists(p):
      raise ValueError(f"safetensors index names {p!r}, which does not exist.")
  return paths


def read_json(path) -> dict:
  """A JSON object from a file; ValueError naming the file if it is not one."""
  try:
    with open(path) as f:
      value = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{os.fspath(path)}: not valid JSON ({e}).") from None
  if not isinstance(value, dict):
    raise ValueError(f"{os.fspath(path)}: expected a JSON object, got {type(value).__name__}.")
  return value


def _model_directory(path) -> str:
  path = os.fspath(path)
  if os.path.isfile(os.path.join(path, "config.json")):
    return path
  # A pipeline root: the transformer lives in its own subfolder.
  sub = os.path.join(path, "transformer")
  if os.path.isfile(os.path.join(sub, "config.json")):
    return sub
  raise ValueError(f"path={path!r}: expected a diffusers model directory with config.json "
                   "(or a pipeline directory with transformer/config.json).")


def from_pretrained(path, *, dtype=jnp.bfloat16, attention: str = "dense", adaspa=None):
  """Builds an NNX model from a diffusers model directory.

  Args:
    path: directory with ``config.json`` and ``*.safetensors`` (single or sharded
      with an index json), as written by diffusers' ``save_pretrained``; a
      pipeline root with a ``transformer/`` subfolder also works.
    dtype: parameter and compute dtype of the model (bfloat16 or float32).
    attention: "dense" or "adaspa" (the model config's ``attention`` field).
    adaspa: an ``AdaSpaConfig``; None keeps the model config's default.

  Returns:
    The model, its parameters on the default device.
  """
  from adaspa_jax.models import REGISTRY  # models/__init__ imports this module

  directory = _model_directory(path)
  raw = read_json(os.path.join(directory, "config.json"))
  class_name = raw.get("_class_name")
  if class_name not in REGISTRY:
    raise ValueError(f"config.json _class_name={class_name!r}: expected one of "
                     f"{sorted(REGISTRY)}.")
  if jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise ValueError(f"dtype={dtype!r}: expected float32, bfloat16 or float16.")
  if attention not in ("dense", "adaspa"):
    raise ValueError(f"attention={attention!r}: expected 'dense' or 'adaspa'.")
  module = REGISTRY[class_name]
  config = module.Config.from_diffusers(raw)
  updates = {"attention": attention}
  if adaspa is not None:
    updates["adaspa"] = adaspa
  config = dataclasses.replace(config, **updates)
  model = nnx.eval_shape(lambda: module.Model(config, rngs=nnx.Rngs(0), dtype=dtype))
  files = safetensors_files(directory)
  try:
    load_state_dict(model, SafetensorsFiles(files), module.weight_rules(config))
  except ValueError as e:
    if not str(e).startswith("load_state_dict:"):
      raise
    raise ValueError(f"{os.path.join(directory, 'config.json')} does not match the weights in "
                     f"{[os.path.basename(f) for f in files]}: {e}") from None
  leftover = ["/".join(map(str, p)) for p, node in nnx.iter_graph(model)
              if isinstance(node, nnx.Variable)
              and isinstance(node.get_value(), jax.ShapeDtypeStruct)]
  if leftover:
    raise ValueError(f"{class_name}: variables still abstract after loading: {leftover}")
  return model
