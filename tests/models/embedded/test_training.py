"""Training the embedded model on CPU (tiny config): the loss falls, the result saves,
loads back and denoises with the sampler."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adaspa_jax.models import loading, sampler
from adaspa_jax.models.embedded import data as shapes_data, model as tiny_t2v, training

STEPS = 30


@pytest.fixture(scope="module")
def trained():
  cfg = training.TrainConfig(preset="test", batch_size=4, learning_rate=1e-2, warmup_steps=1,
                             caption_dropout=0.0, ema_decay=0.9, dtype="float32",
                             save_dtype="float32")
  # Random weights filled from numpy into an abstract model: an eager random
  # initialisation compiles every initialiser, which costs seconds on CPU.
  init = nnx.eval_shape(lambda: tiny_t2v.build(tiny_t2v.PRESETS["test"]))
  rng = np.random.default_rng(0)
  for path, var in loading.model_params(init).items():
    shape = var.get_value().shape
    fan_in = shape[-2] if len(shape) > 1 else 1
    scale = 1.0 if path.endswith("scale") else 0.0          # layer norms start near 1
    var.set_value(jnp.asarray(scale + rng.normal(0, 0.2 / math.sqrt(fan_in), shape),
                              jnp.float32))
  trainer = training.Trainer(cfg, init=init)
  batch, key = trainer.batch(0), jax.random.key(0)
  losses, norms = [], []
  for _ in range(STEPS):
    # Same batch, sigmas and noise every step: each step's loss is the fixed-batch loss
    # of the weights it starts from.
    trainer.state, metrics = trainer.step_fn(trainer.state, batch, key)
    losses.append(float(metrics["loss"]))
    norms.append(float(metrics["grad_norm"]))
  return trainer, batch, losses, norms


def test_loss_falls_on_a_fixed_batch(trained):
  trainer, _, losses, norms = trained
  assert np.all(np.isfinite(losses)) and np.all(np.isfinite(norms))
  assert losses[-1] < 0.5 * losses[0], losses
  assert int(trainer.state.step) == STEPS
  assert not np.array_equal(np.asarray(trainer.state.ema), np.asarray(trainer.state.params))


def test_save_load_and_one_sampler_step(trained, tmp_path):
  trainer, _, _, _ = trained
  model = trainer.model("params")
  path = tiny_t2v.save(model, tmp_path / "ckpt", dtype="float32", record={"steps": STEPS})
  loaded = tiny_t2v.load(path)
  prompts = ["a red circle moves left", "a blue triangle spins, a green square rises"]
  noise, cond, uncond, shared = tiny_t2v.sampler_inputs(loaded, prompts, seed=0)
  denoise = nnx.jit(lambda m, x, text, t: m(x, text, t, **shared))
  x2, t0 = jnp.concatenate([noise, noise]), jnp.full((4,), 1000.0)
  text = jnp.concatenate([cond["encoder_hidden_states"], uncond["encoder_hidden_states"]])
  c, u = jnp.split(denoise(loaded.transformer, x2, text, t0), 2)
  ref_text = jnp.concatenate([model.encode(prompts), model.encode(["", ""])])
  np.testing.assert_array_equal(np.asarray(text), np.asarray(ref_text))
  np.testing.assert_array_equal(np.asarray(denoise(model.transformer, x2, ref_text, t0)),
                                np.asarray(jnp.concatenate([c, u])))
  guidance, sched = 3.0, loaded.config.scheduler()
  result = sampler.sample(loaded.transformer, sched, noise, cond, uncond, num_steps=1,
                          guidance_scale=guidance, shared=shared)
  # One Euler step by hand: sigma 1 -> 0 with the guided velocity.
  sigmas = sched.sigmas(1)
  want = noise + (sigmas[1] - sigmas[0]) * (u + guidance * (c - u))
  assert result.latents.shape == noise.shape
  np.testing.assert_allclose(np.asarray(result.latents), np.asarray(want), atol=1e-5)
  video = tiny_t2v.to_video(result.latents)
  assert video.shape == (2, 2, 16, 16, 3) and 0 <= video.min() and video.max() <= 1


def test_training_target_is_what_the_sampler_integrates():
  """A denoiser that returns the exact velocity of ``noised`` for one clip takes the
  scheduler from pure noise to that clip: training and sampling share a convention."""
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.uniform(-1, 1, (1, 2, 3, 16, 16)), jnp.float32)
  noise = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
  sched = tiny_t2v.PRESETS["test"].scheduler()

  class Oracle(nnx.Module):
    def __call__(self, hidden_states, timestep, encoder_hidden_states):
      sigma = timestep[:, None, None, None, None] / 1000.0
      return (hidden_states - x0) / sigma       # = noise - x0 on the path through x0

  x, target, t = training.noised(x0, noise, jnp.asarray([0.3]))
  np.testing.assert_allclose(np.asarray(Oracle()(x, t, None)), np.asarray(target), atol=1e-5)
  out = sampler.sample(Oracle(), sched, noise, {"encoder_hidden_states": jnp.zeros((1, 1, 1))},
                       num_steps=4)
  np.testing.assert_allclose(np.asarray(out.latents), np.asarray(x0), atol=1e-5)


def test_flops_of_the_embedded_preset():
  f = training.flops_per_sample(tiny_t2v.PRESETS["embedded"])
  s, d = 2048 + 64, 256
  assert f["linear"] == 6 * 24 * d * d * s and f["attention"] == 6 * 4 * s * s * d
  assert f["train"] == 3 * f["forward"] and 40e9 < f["forward"] < 55e9


def test_make_batch_is_the_stream():
  cfg = tiny_t2v.PRESETS["test"]
  a = training.make_batch(cfg, 5, 8, 4)
  b = training.make_batch(cfg, 5, 10, 2)
  np.testing.assert_array_equal(a.ids[2:], b.ids)
  np.testing.assert_array_equal(a.spec.x[2:], b.spec.x)
  assert a.ids.shape == (4, cfg.text.max_length) and np.all(a.ids[:, 0] == 1)


def test_reversal_pairs_batches_and_shared_noise(trained):
  """A paired batch is m clips then the same clips backwards; a pair shares its noise and
  sigma, so a batch of two equal halves has the loss of one half alone."""
  cfg = tiny_t2v.PRESETS["test"]
  pairs = training.make_batch(cfg, 5, 8, 6, reversal_pairs=True)
  plain = training.make_batch(cfg, 5, 8, 3)
  np.testing.assert_array_equal(pairs.ids[:3], plain.ids)
  np.testing.assert_array_equal(pairs.spec.x[3:], plain.spec.x[..., ::-1])
  np.testing.assert_array_equal(pairs.spec.y[3:], plain.spec.y[..., ::-1])
  trainer, batch, _, _ = trained
  twice = jax.tree.map(lambda a: np.concatenate([a, a]), batch)
  key, params = jax.random.key(3), trainer.state.params
  np.testing.assert_allclose(float(trainer._loss(params, twice, key, paired=True)),
                             float(trainer._loss(params, batch, key)), rtol=1e-6)
  assert abs(float(trainer._loss(params, twice, key)) -
             float(trainer._loss(params, batch, key))) > 1e-6
  paired = training.Trainer(training.TrainConfig(preset="test", batch_size=4,
                                                 reversal_pairs=True), init=trainer.model())
  np.testing.assert_array_equal(paired.batch(1).ids[:2],
                                training.make_batch(cfg, 0, 2, 2).ids)
  with pytest.raises(ValueError, match="n=3 with reversal_pairs"):
    training.make_batch(cfg, 5, 8, 3, reversal_pairs=True)


def test_mirror_pairs_batches(trained):
  """A mirror-paired batch is m clips then the same clips mirrored, left and right swapped in
  their captions; with both pairings, partner i is reversed for even i and mirrored for odd i.
  A mirror-paired run shares noise and sigma within pairs and draws m new clips a step."""
  cfg = tiny_t2v.PRESETS["test"]
  data = shapes_data.sample_batch(5, 8, 3, frames=cfg.frames, height=cfg.height,
                                  width=cfg.width)
  tok = tiny_t2v.Tokenizer(cfg.text.vocabulary, cfg.text.max_length)
  pairs = training.make_batch(cfg, 5, 8, 6, mirror_pairs=True)
  np.testing.assert_array_equal(pairs.ids, tok(data.captions + shapes_data.mirrored(
      data, cfg.width).captions)[0])
  np.testing.assert_array_equal(pairs.spec.x[:3], data.spec.x)
  np.testing.assert_allclose(pairs.spec.x[3:], cfg.width - data.spec.x, rtol=0, atol=1e-5)
  np.testing.assert_array_equal(pairs.spec.y[3:], data.spec.y)
  np.testing.assert_array_equal(pairs.spec.angle[3:], -data.spec.angle)
  np.testing.assert_array_equal(pairs.spec.bg_flip_x, [0, 0, 0, 1, 1, 1])
  both = training.make_batch(cfg, 5, 8, 6, reversal_pairs=True, mirror_pairs=True)
  rev = shapes_data.time_reversed(data)
  np.testing.assert_array_equal(both.spec.x[3:],
                                np.stack([rev.spec.x[0], pairs.spec.x[4], rev.spec.x[2]]))
  np.testing.assert_array_equal(both.spec.bg_flip_x, [0, 0, 0, 0, 1, 0])
  partners = (rev.captions[0], shapes_data.mirrored(data, cfg.width).captions[1],
              rev.captions[2])
  np.testing.assert_array_equal(both.ids, tok(data.captions + partners)[0])
  with pytest.raises(ValueError, match="n=3 with mirror_pairs=True"):
    training.make_batch(cfg, 5, 8, 3, mirror_pairs=True)

  trainer = training.Trainer(training.TrainConfig(preset="test", batch_size=4, mirror_pairs=True,
                                                  caption_dropout=0.0, high_sigma_share=0.5,
                                                  dtype="float32"),
                             init=trained[0].model())
  batch = trainer.batch(1)
  np.testing.assert_array_equal(batch.ids, training.make_batch(cfg, 0, 2, 4,
                                                               mirror_pairs=True).ids)
  # The step asks for the paired loss at the training sigmas (one noise and sigma per pair,
  # high_sigma_share per pair), whose numbers test_reversal_pairs_batches_and_shared_noise checks.
  calls, loss = [], trainer._loss
  trainer._loss = lambda *args: calls.append(args[3:]) or loss(*args)
  jax.eval_shape(trainer._step, trainer.state, batch, jax.random.key(4))
  assert calls == [(0.0, True, True)]


@pytest.mark.parametrize("field,value,match", [
    ("preset", "huge", "preset='huge'"), ("steps", 0, "steps=0"),
    ("caption_dropout", 1.0, "caption_dropout=1.0"), ("dtype", "float16", "dtype='float16'"),
    ("time_budget_s", -1.0, "time_budget_s=-1.0"),
    ("batch_size", 5, "batch_size=5 with reversal_pairs=True:"),
    ("batch_size", 3, "batch_size=3 with mirror_pairs=True:"),
    ("batch_size", 7, "batch_size=7 with reversal_pairs=True and mirror_pairs=True:"),
    ("text_lr_scale", 0.0, "text_lr_scale=0.0"),
    ("sigma_logit_mean", float("nan"), "sigma_logit_mean=nan"),
    ("high_sigma_share", 1.5, "high_sigma_share=1.5"), ("high_sigma_min", 1.0, "high_sigma_min=1.0")])
def test_config_is_checked(field, value, match):
  extra = {name: True for name in ("reversal_pairs", "mirror_pairs")
           if field == "batch_size" and name in match}
  with pytest.raises(ValueError, match=match):
    training.TrainConfig(**{field: value}, **extra)


def test_text_lr_scale_scales_only_the_text_encoders_update(trained):
  trainer, batch, _, _ = trained
  init = trainer.model("params")
  deltas = {}
  for scale in (1.0, 3.0):
    t = training.Trainer(training.TrainConfig(preset="test", batch_size=4, warmup_steps=1,
                                              text_lr_scale=scale, dtype="float32"),
                         init=init)
    before = np.asarray(t.state.params)
    t.state, _ = t.step_fn(t.state, batch, jax.random.key(1))
    deltas[scale] = t.unravel(np.asarray(t.state.params) - before)
  leaves = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
  text1, text3 = (leaves(deltas[s]["text_encoder"]) for s in (1.0, 3.0))
  np.testing.assert_allclose(text3, 3 * text1, rtol=1e-4, atol=1e-7)
  assert np.abs(text1).max() > 0
  np.testing.assert_allclose(leaves(deltas[3.0]["transformer"]),
                             leaves(deltas[1.0]["transformer"]), rtol=1e-5, atol=1e-7)


def test_training_sigmas(trained):
  """logit-normal(mean, 1) with a share replaced by U(high_sigma_min, 1); evaluation always
  draws logit-normal(0, 1)."""
  init = trained[0].model("params")
  make = lambda **kw: training.Trainer(training.TrainConfig(preset="test", batch_size=2, **kw),
                                       init=init)
  key, n = jax.random.key(0), 4000
  logit = lambda x: np.log(x / (1 - x))
  base = np.asarray(make().sigmas(key, n))
  assert abs(logit(base).mean()) < 0.1 and abs(logit(base).std() - 1) < 0.05
  shifted = make(sigma_logit_mean=1.5)
  assert abs(logit(np.asarray(shifted.sigmas(key, n))).mean() - 1.5) < 0.1
  np.testing.assert_array_equal(np.asarray(shifted.sigmas(key, n, train_sigmas=False)), base)
  mixed = np.asarray(make(high_sigma_share=0.5, high_sigma_min=0.95).sigmas(key, n))
  high = mixed >= 0.95
  assert 0.45 < high.mean() < 0.56 and mixed.max() <= 1.0
  np.testing.assert_array_equal(mixed[~high & (base < 0.95)], base[~high & (base < 0.95)])
  assert np.all(np.asarray(make(high_sigma_share=1.0).sigmas(key, n)) >= 0.9)
