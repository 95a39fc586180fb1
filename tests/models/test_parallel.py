"""Tiny DiTs through the scanned sampler on a 4-device mesh equal the single-device run.

The sharded runs need 4 CPU devices, fixed when JAX starts, so they run in a
subprocess (this file as a module) that saves both runs' latents and per-step
AdaSpa states; the tests compare them here. The launcher's ``--mesh`` flag is
exercised as a subprocess too (absl flags are global).
"""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from adaspa_jax import AdaSpaConfig

DEVICES = 4
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
B, C, F, H, W, TEXT = 1, 4, 3, 8, 10, 6   # 3 x 4 x 5 = 60 video tokens, 15 per device
ADASPA = AdaSpaConfig(sparsity=0.5, block_size=16, num_steps=5, search_steps=(1, 3),
                      implementation="reference")
# family -> weights FSDP-sharded. HunyuanVideo (joint attention, text suffix with
# padding) is the benchmark's model; Wan (video-only self-attention, row-parallel
# cross-attention, FSDP) runs through the launcher in test_cli_mesh_flag_...; CPU
# time allows no more (each tiny model takes seconds to build and compile).
RUNS = {"hunyuan_video": False}


def _setup(family, rng):
  """(model, scheduler, latents, cond, uncond, shared, make_state or None)."""
  from flax import nnx
  from adaspa_jax.models import cogvideox, hunyuan_video, schedulers, wan
  normal = lambda *s: rng.standard_normal(s).astype(np.float32)
  module = {"wan": wan, "hunyuan_video": hunyuan_video, "cogvideox": cogvideox}[family]
  cfg = dataclasses.replace(module.PRESETS["tiny"], num_attention_heads=4, attention="adaspa",
                            adaspa=ADASPA)
  model = module.Model(cfg, rngs=nnx.Rngs(0))
  if family == "wan":
    text = lambda: {"encoder_hidden_states": normal(B, TEXT, cfg.text_dim)}
    return (model, schedulers.PRESETS["wan2.1"], normal(B, C, F, H, W), text(), text(), {},
            None)
  if family == "hunyuan_video":
    mask = np.ones((B, TEXT), np.int32)
    mask[:, -2:] = 0                                  # padded text: kv_lengths < seq_len
    cond = {"encoder_hidden_states": normal(B, TEXT, cfg.text_embed_dim),
            "encoder_attention_mask": mask,
            "pooled_projections": normal(B, cfg.pooled_projection_dim),
            "guidance": np.full((B,), 6000.0, np.float32)}
    return (model, schedulers.PRESETS["hunyuan-video"], normal(B, C, F, H, W), cond, None, {},
            lambda m: m.init_adaspa_state(B, F, H, W, TEXT))
  text = lambda: {"encoder_hidden_states": normal(B, 7, cfg.text_embed_dim)}
  shared = {"image_rotary_emb": cogvideox.rotary_positional_embeddings(cfg, F, H, W)}
  return (model, schedulers.PRESETS["cogvideox-5b"], normal(B, F, C, H, W), text(), text(),
          shared, lambda m: m.init_adaspa_state(2 * B, F, H, W))


def _collectives(compiled_text):
  """(op, elements of its largest result) for every collective of an HLO module."""
  import re
  found = []
  for line in compiled_text.splitlines():
    m = re.search(r"= (.+?) (all-gather|all-to-all|all-reduce|collective-permute|"
                  r"reduce-scatter)(-start)?\(", line)
    if m:
      sizes = [int(np.prod([int(d) for d in dims.split(",") if d]))
               for dims in re.findall(r"[a-z0-9]+\[([\d,]*)\]", m.group(1))]
      found.append((m.group(2), max(sizes, default=0)))
  return found


def _worker(path):
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from adaspa_jax import parallel
  from adaspa_jax.models import parallel as model_parallel
  from adaspa_jax.models import sampler

  assert jax.device_count() == DEVICES, jax.devices()
  sp = parallel.make_sequence_parallel(DEVICES)
  out, info = {}, {}
  for family, fsdp in RUNS.items():
    runs = {}
    for tag in ("single", "sharded"):
      model, sched, latents, cond, uncond, shared, make = _setup(family,
                                                                 np.random.default_rng(0))
      if tag == "sharded":
        model_parallel.shard_model(model, sp, fsdp=fsdp)
        state = model_parallel.init_state(lambda: make(model), sp)
      else:
        state = make(model)
      runs[tag] = sampler.sample(model, sched, latents, cond, uncond, num_steps=ADASPA.num_steps,
                                 guidance_scale=5.0, shared=shared, adaspa_state=state,
                                 key=jax.random.key(1), record_states=True)
      out[f"{family}/{tag}/latents"] = np.asarray(runs[tag].latents)
      for field in ("indices", "counts", "lse", "sparsity"):
        out[f"{family}/{tag}/{field}"] = np.asarray(getattr(runs[tag].states, field))
    if family == "hunyuan_video":
      sharded_hunyuan = (model, latents, cond, make)
    specs = [list(x.sharding.spec) for x in jax.tree.leaves(nnx.state(model))]
    info[family] = {"params_sharded": sum("seq" in s for s in specs),
                    "params": len(specs), "phases": runs["sharded"].phases.tolist()}

  # Between attention calls the activations stay split on the sequence: no collective of
  # the compiled forward moves a whole [B, video tokens, C] activation.
  model, latents, cond, make = sharded_hunyuan
  graphdef, params = nnx.split(model)
  state = model_parallel.init_state(lambda: make(model), sp)
  forward = jax.jit(lambda p, x, c, st: nnx.merge(graphdef, p)(
      hidden_states=x, timestep=jnp.ones((B,)), **c, adaspa_state=st, adaspa_step=4))
  text = forward.lower(params, latents, cond, state).compile().as_text()
  info["collectives"] = _collectives(text)
  info["activation_elements"] = B * (F * H * W // 4) * model.config.inner_dim
  np.savez(os.path.join(path, "results.npz"), **out)
  with open(os.path.join(path, "info.json"), "w") as f:
    json.dump(info, f)


def _env(devices):
  flags = os.environ.get("XLA_FLAGS", "")
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("model_parallel"))
  proc = subprocess.run([sys.executable, "-m", "tests.models.test_parallel", path], cwd=ROOT,
                        env=_env(DEVICES), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(os.path.join(path, "info.json")) as f:
    info = json.load(f)
  return dict(np.load(os.path.join(path, "results.npz"))), info


@pytest.mark.parametrize("family", sorted(RUNS))
def test_sharded_sampler_matches_single_device(results, family):
  arrays, info = results
  fsdp = RUNS[family]
  single, sharded = f"{family}/single", f"{family}/sharded"
  scale = np.abs(arrays[f"{single}/latents"]).max()
  np.testing.assert_allclose(arrays[f"{sharded}/latents"], arrays[f"{single}/latents"],
                             rtol=1e-5, atol=1e-5 * scale)
  # Every step's selection ([N, L, B', H, nQ, K_max]) is the same.
  for field in ("indices", "counts"):
    np.testing.assert_array_equal(arrays[f"{sharded}/{field}"], arrays[f"{single}/{field}"])
  np.testing.assert_allclose(arrays[f"{sharded}/lse"], arrays[f"{single}/lse"],
                             rtol=1e-5, atol=1e-5)
  assert (arrays[f"{single}/sparsity"][-1] > 0).all()            # blocks were dropped
  assert info[family]["phases"] == [0, 1, 3, 2, 3]                # every phase ran
  assert (info[family]["params_sharded"] > 0) == fsdp


def test_activations_stay_sequence_sharded(results):
  info = results[1]
  ops = {op for op, _ in info["collectives"]}
  assert "all-to-all" in ops
  whole = 4 * info["activation_elements"]    # one device's shard x 4 = the whole activation
  assert max(size for _, size in info["collectives"]) < whole, info["collectives"]


def test_cli_mesh_flag_matches_single_device(tmp_path):
  """The launcher with --mesh=2 --fsdp on two forced devices, against the library in-process."""
  from adaspa_jax.harness import generation
  out = str(tmp_path / "mesh")
  common = ["--model=wan", "--preset=tiny", "--steps=5", "--search_steps=1,3", "--sparsity=0.5",
            "--block_size=16", "--text_len=6", "--dtype=float32", "--noprogress",
            "--attention=adaspa", "--latent_frames=3", "--latent_height=8",
            "--latent_width=10", "--implementation=reference"]
  proc = subprocess.run([sys.executable, "-m", "adaspa_jax.experiments.generate", *common,
                         "--mesh=seq:2", "--fsdp", f"--output_dir={out}"], cwd=ROOT, env=_env(2),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(os.path.join(out, "report.json")) as f:
    report = json.load(f)
  assert report["mesh_devices"] == 2 and report["fsdp"] is True
  sharded = np.load(os.path.join(out, "latents_adaspa.npy"))
  ref = generation.run(family="wan", preset="tiny", steps=5, attention="adaspa",
                       adaspa=dataclasses.replace(ADASPA), latent=(3, 8, 10), text_len=6,
                       dtype="float32", progress=False, output_dir=str(tmp_path / "one"))
  assert ref["mesh_devices"] == 1
  single = np.load(os.path.join(tmp_path / "one", "latents_adaspa.npy"))
  np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5 * np.abs(single).max())


def test_generation_rejects_bad_mesh_flags(tmp_path):
  from adaspa_jax.harness import generation
  with pytest.raises(ValueError, match="--fsdp without --mesh"):
    generation.run(fsdp=True, output_dir=str(tmp_path))
  with pytest.raises(ValueError, match="devices=2"):     # this process has one CPU device
    generation.run(mesh="2", output_dir=str(tmp_path))


def test_shard_model_places_parameters():
  import jax
  from flax import nnx
  from adaspa_jax import parallel
  from adaspa_jax.models import parallel as model_parallel
  from adaspa_jax.models import wan
  sp = parallel.make_sequence_parallel(1)
  model = wan.Model(wan.PRESETS["tiny"], rngs=nnx.Rngs(0))
  model_parallel.shard_model(model, sp, fsdp=True)
  assert model.config.sequence_parallel == sp
  # The tiny preset the CLI test runs with --fsdp does get split parameters.
  specs = [tuple(x.sharding.spec) for x in jax.tree.leaves(nnx.state(model))]
  assert 0 < sum("seq" in s for s in specs) < len(specs)
  with pytest.raises(ValueError, match="sequence_parallel"):
    model_parallel.shard_model(model, "seq:2")
  big = (2, 48, 96)
  assert tuple(model_parallel.param_spec(big, sp, fsdp=False)) == ()
  assert tuple(model_parallel.param_spec(big, sp, fsdp=True)) == (None, None, "seq")
  assert tuple(model_parallel.param_spec((96,), sp, fsdp=True)) == ()    # biases stay whole


if __name__ == "__main__":
  _worker(sys.argv[1])
