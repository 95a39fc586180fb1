"""tools/mosaic_variants.py on CPU: the ring-depth checks under JAX's GPU
interpreter, and the ``all`` run end to end with stand-ins for the GPU-only calls
(so that a slip in the driver shows here, not in the one GPU run)."""

import dataclasses
import inspect
import json

import jax
import jax.numpy as jnp
import pytest

from adaspa_jax.harness import timing
from tools import mosaic_floor, mosaic_variants as mv


@pytest.mark.parametrize("check", [mv.check_sparse_stages, mv.check_mass_stages])
def test_stage_checks_pass_on_the_interpreted_kernels(check):
  row = check(64, 3, seq=130, h=1, interpret=True)
  assert row["ok"], row


def _stand_in(real, make_out):
  """Binds the call to the real kernel's signature, then returns ``make_out``'s result
  (called with the arguments, and the fields of a ``config`` among them beside it)."""
  sig = inspect.signature(real)

  def fake(*args, **kwargs):
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    if dataclasses.is_dataclass(arguments.get("config")):
      arguments.update(dataclasses.asdict(arguments["config"]))
    return make_out(**arguments)
  return fake


def _zeros_attention(q, lengths, **_):
  b, s, h, _ = q.shape
  return jnp.zeros_like(q), jnp.zeros((b, h, s), jnp.float32)


def _zeros_mass(q, num_kv_blocks, group=64, **_):
  b, s, h, _ = q.shape
  cols = mv.mosaic_block_mass.padded_num_kv_blocks(num_kv_blocks, group)
  return jnp.zeros((b, h, s // 64, cols), jnp.float32)


def _copying_floor(q, v, kv_block_indices, kv_steps, dense_rows, block_size, num_kv_blocks,
                   **_):
  return mosaic_floor.expected_output(q, v, kv_block_indices, kv_steps, dense_rows,
                                      block_size=block_size, num_kv_blocks=num_kv_blocks)


def test_all_writes_every_row(monkeypatch, tmp_path, capsys):
  monkeypatch.setattr(mv, "block_sparse_attention_padded",
                      _stand_in(mv.block_sparse_attention_padded, _zeros_attention))
  monkeypatch.setattr(mv, "block_mass_padded", _stand_in(mv.block_mass_padded, _zeros_mass))
  monkeypatch.setattr(mv, "load_only_padded", _stand_in(mv.load_only_padded, _copying_floor))
  monkeypatch.setattr(mv, "cudnn_ms", lambda q, k, v, reps: timing.time_fn(
      jax.jit(jax.nn.dot_product_attention), q, k, v, reps=reps).median_s)
  monkeypatch.setattr(mv, "H", 2)
  monkeypatch.setattr(mv, "CHECK_SEQ", 130)
  monkeypatch.setattr(mv.sys, "argv", ["mosaic_variants.py", "all", "256"])
  monkeypatch.setenv("OUT", str(tmp_path))
  mv.main()
  res = json.loads((tmp_path / "mosaic_variants_all.json").read_text())
  assert res["done"] and res["budget_s"] == 210.0
  rows = res["rows"]
  assert not [r for r in rows if "error" in r or "skipped" in r]
  checks = [r for r in rows if r.get("check")]
  assert {(r["op"], r["bs"], r["stages"]) for r in checks} == {
      ("sparse", 64, 2), ("sparse", 64, 3), ("sparse", 128, 2), ("sparse", 128, 3),
      ("mass", 64, 2), ("mass", 64, 3), ("mass", 64, 4), ("mass", 64, 6)}
  assert not any(r["ok"] for r in checks)  # the stand-ins return zeros
  timed = [r for r in rows if r["section"] == "stages" and "ms" in r and r["op"] != "cudnn"]
  assert len(timed) == 2 * 2 * len(mv.STAGE_DENSITIES) + 4
  assert all(r["checked_ok"] is False for r in timed)
  floors = [r for r in rows if r["op"] == "floor"]
  assert len(floors) == 3 * len(mv.FLOOR_DENSITIES)
  for r in floors:
    assert r["copy_exact"] and r["real_ms"] > 0 and r["floor_GBps"] > 0
    count = max(1, round(r["density"] * 256 / r["bs"]))
    assert r["kv_GB"] * 1e9 == 2 * 256 * count * 128 * 2 * 2  # H rows of S/bs lists
  assert [r["S"] for r in rows if r["op"] == "cudnn"] == [256]
  assert "real/floor" in capsys.readouterr().out


def test_run_records_errors_and_skips(tmp_path):
  run = mv.Run("unit", str(tmp_path), budget_s=100.0)
  assert run.attempt(lambda: 1 / 0, what="boom") is None
  assert run.attempt(lambda: {"x": 1.0}, deadline=run.elapsed() - 1, what="late") is None
  assert run.attempt(lambda: {"x": 2.0}, what="fine")["x"] == 2.0
  run.finish()
  rows = json.loads((tmp_path / "mosaic_variants_unit.json").read_text())["rows"]
  assert "ZeroDivisionError" in rows[0]["error"]
  assert "time budget" in rows[1]["skipped"]
  assert rows[2]["x"] == 2.0 and "wall_s" in rows[2]


def test_parse_args():
  assert mv.parse_args(["all"]) == ("all", [], 210.0)
  assert mv.parse_args(["floor", "32768", "--budget=60"]) == ("floor", [32768], 60.0)
  assert mv.parse_args(["stages", "1024"]) == ("stages", [1024], None)
  with pytest.raises(ValueError, match="'--reps=3'"):
    mv.parse_args(["all", "--reps=3"])


def _run_mode(monkeypatch, tmp_path, mode, zeros_mass, fused=None):
  """Runs ``mosaic_variants.py MODE 256`` (H=2, checks at S=130) with stand-ins for the
  block-mass kernel, the fused search and cuDNN; returns its JSON rows, none an error."""
  if fused is None:
    def fused(q, k, v, block_size, mass_config=None):
      del k, v, block_size, mass_config
      return q, jnp.zeros(q.shape[:1] + q.shape[2:3] + q.shape[1:2]), None
  monkeypatch.setattr(mv, "block_mass_padded", _stand_in(mv.block_mass_padded, zeros_mass))
  monkeypatch.setattr(mv.mosaic, "attention_with_block_mass", fused)
  monkeypatch.setattr(mv, "cudnn_ms", lambda q, k, v, reps: 1.0)
  monkeypatch.setattr(mv, "H", 2)
  monkeypatch.setattr(mv, "CHECK_SEQ", 130)
  monkeypatch.setattr(mv.sys, "argv", ["mosaic_variants.py", mode, "256"])
  monkeypatch.setenv("OUT", str(tmp_path))
  mv.main()
  rows = json.loads((tmp_path / f"mosaic_variants_{mode}.json").read_text())["rows"]
  assert not [r for r in rows if "error" in r]
  return rows


def test_keytile_checks_then_times_every_variant(monkeypatch, tmp_path):
  seen = []

  def zeros_mass(q, num_kv_blocks, key_tile, **_):
    seen.append(key_tile)
    return _zeros_mass(q, num_kv_blocks)
  rows = _run_mode(monkeypatch, tmp_path, "keytile", zeros_mass)
  variants = [None, 128]
  got = [(r["op"], r.get("key_tile"), bool(r.get("check"))) for r in rows
         if r["op"] != "cudnn"]
  assert got == ([("mass", kt, True) for kt in variants]
                 + [("mass", kt, False) for kt in variants]
                 + [("fused", None, False)])
  assert set(seen) == set(variants)


# mode, config field, its values, check lengths (CHECK_SEQ = 130), whether the fused
# search runs with each value too.
FLAG_MODES = [
    ("barriers", "explicit_barriers", (False, True), (130, 1170), True),
]


@pytest.mark.parametrize("mode,flag,values,check_seqs,with_fused", FLAG_MODES,
                         ids=[m[0] for m in FLAG_MODES])
def test_flag_modes_check_then_time_every_variant(mode, flag, values, check_seqs, with_fused,
                                                  monkeypatch, tmp_path):
  seen, fused_values = [], []
  before = mv.mosaic_block_mass.DEFAULT_CONFIG

  def zeros_mass(q, num_kv_blocks, key_tile, block_size, **kw):
    seen.append((block_size, key_tile, kw[flag]))
    return _zeros_mass(q, num_kv_blocks)

  def fused(q, k, v, block_size, mass_config):
    # The shipped config with the flag's value, nothing else changed.
    assert mass_config == dataclasses.replace(before, **{flag: getattr(mass_config, flag)})
    fused_values.append(getattr(mass_config, flag))
    return q, jnp.zeros(q.shape[:1] + q.shape[2:3] + q.shape[1:2]), None
  rows = _run_mode(monkeypatch, tmp_path, mode, zeros_mass, fused)
  variants = [(bs, kt, v) for bs, kt in ((64, 128), (128, None)) for v in values]
  checks = [(r["S"], r["bs"], r.get("key_tile"), r[flag]) for r in rows if r.get("check")]
  assert checks == [(s, bs, kt, v) for bs, kt, v in variants for s in check_seqs]
  timed = [(r["bs"], r.get("key_tile"), r[flag]) for r in rows
           if r["op"] == "mass" and not r.get("check")]
  assert timed == variants
  assert set(seen) == set(variants)
  fused_rows = [r[flag] for r in rows if r["op"] == "fused"]
  if not with_fused:
    assert not fused_rows and not fused_values
  else:
    # Each fused call traced with its own setting; the shipped config is left as it was.
    assert fused_rows == list(values) and set(fused_values) == set(values)
    assert mv.mosaic_block_mass.DEFAULT_CONFIG is before


def test_anatomy_times_the_kernel_without_its_parts(monkeypatch, tmp_path):
  mbm = mv.mosaic_block_mass
  real_jnp, real_qk = mbm.jnp, mbm.qk_matmul
  seen = []

  def zeros_mass(q, num_kv_blocks, stages, heads_major, timing_stand_ins, **_):
    # What the kernel would trace with.
    seen.append(("exp2" not in timing_stand_ins, "qk" not in timing_stand_ins, stages,
                 heads_major))
    return _zeros_mass(q, num_kv_blocks)
  rows = _run_mode(monkeypatch, tmp_path, "anatomy", zeros_mass)
  parts = [(r["without_exp"], r["without_qk"]) for r in rows if "without_exp" in r]
  assert parts == [(False, False), (True, False), (False, True), (True, True)]
  # Each call saw its parts replaced or not: (exp real?, QK^T real?, stages, heads_major).
  calls = set(seen)
  assert (True, True, None, True) in calls and (False, True, None, True) in calls
  assert (True, False, None, True) in calls and (False, False, None, True) in calls
  assert {(s, hm) for e, q, s, hm in calls if s} == {(2, True), (3, True), (4, True), (3, False)}
  assert mbm.jnp is real_jnp and mbm.qk_matmul is real_qk


def test_widetile_checks_then_times_every_tile(monkeypatch, tmp_path):
  mbm = mv.mosaic_block_mass
  before = mbm.DEFAULT_CONFIG
  seen, fused_tiles = [], []

  def zeros_mass(q, num_kv_blocks, key_tile, block_size, explicit_barriers, heads_major, **_):
    assert explicit_barriers
    seen.append((block_size, key_tile, heads_major))
    return _zeros_mass(q, num_kv_blocks)

  def fused(q, k, v, block_size, mass_config):
    assert mass_config == dataclasses.replace(before, key_tile=mass_config.key_tile)
    fused_tiles.append(mass_config.key_tile)
    return q, jnp.zeros(q.shape[:1] + q.shape[2:3] + q.shape[1:2]), None
  rows = _run_mode(monkeypatch, tmp_path, "widetile", zeros_mass, fused)
  # CHECK_SEQ = 130: checks at 130, 1170 (two ways) and 2340, twice per tile.
  checks = [(r["S"], r["bs"], r.get("key_tile"), r.get("heads_major")) for r in rows
            if r.get("check")]
  ways = [(130, None), (1170, None), (1170, False), (2340, None)]
  assert checks == [(s, bs, kt, hm) for bs, kt in mv.WIDE_TILES for _ in range(2)
                    for s, hm in ways]
  assert not any(r["ok"] for r in rows if r.get("check"))  # the stand-in returns zeros
  timed = [(r["bs"], r.get("key_tile"), r["checked_ok"]) for r in rows
           if r["op"] == "mass" and not r.get("check")]
  assert timed == [(bs, kt, False) for bs, kt in mv.WIDE_TILES]
  assert {(bs, kt) for bs, kt, _ in seen} == set(mv.WIDE_TILES)
  assert {hm for _, _, hm in seen} == {True, False}
  assert [r["key_tile"] for r in rows if r["op"] == "fused"] == [128, 256] == fused_tiles
  assert mbm.DEFAULT_CONFIG is before


def test_anatomy256_times_the_shipped_kernel_without_its_parts(monkeypatch, tmp_path):
  mbm = mv.mosaic_block_mass
  real_jnp, real_qk = mbm.jnp, mbm.qk_matmul
  seen = []

  def zeros_mass(q, num_kv_blocks, key_tile, block_size, explicit_barriers, timing_stand_ins,
                 **_):
    assert key_tile == 256 and explicit_barriers
    seen.append((block_size, "exp2" in timing_stand_ins, "qk" in timing_stand_ins))
    return _zeros_mass(q, num_kv_blocks)
  rows = _run_mode(monkeypatch, tmp_path, "anatomy256", zeros_mass)
  parts = [(r["S"], r["bs"], r["without_exp"], r["without_qk"]) for r in rows
           if "without_exp" in r]
  order = [(False, False), (True, False), (False, True), (True, True), (False, False)]
  assert parts == [(256, bs, e, q) for bs in (64, 128) for e, q in order]
  assert set(seen) == {(bs, e, q) for bs in (64, 128) for e, q in order}
  assert mbm.jnp is real_jnp and mbm.qk_matmul is real_qk
