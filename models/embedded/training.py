"""Training the embedded model (``adaspa_jax.models.embedded.model``) by rectified flow, on the fly.

Each step draws B new clips of ``adaspa_jax.models.embedded.data`` (stream ``seed``,
clips ``step * B ..``): geometry and captions on the host in numpy, pixels
rendered inside the jitted step on the device. The loss is rectified flow as
in Wan / HunyuanVideo: sigma ~ logit-normal(0, 1), x = (1 - sigma) x0 + sigma
noise, the transformer (given timestep 1000 sigma) predicts noise - x0, MSE.
A ``caption_dropout`` share of captions is replaced by the empty caption so
the model also learns the unconditional branch of classifier-free guidance.

``reversal_pairs``: half of each batch is the other half played backwards
(``shapes_data.time_reversed``: motions reversed in the caption), noised with
the same noise at the same sigma. The clips are still draws of the stream's
distribution; what changes is that every batch holds pairs alike in all but
the order of their frames and the sign of their captioned motions, so the
loss cannot fall without the model reading that sign. It did read it only
once half of the clips also had sigma in [0.9, 1] (``high_sigma_share``),
where the noisy clip no longer shows the motion and only the caption can
(docs/tiny_t2v.md: runs 4-6).

``mirror_pairs``: the same with the other half mirrored left-right
(``shapes_data.mirrored``: "moves left" and "moves right" swapped, same noise
and sigma). A pair's captions then differ in "left" <-> "right" only (and not at
all where nothing moves sideways): the words run 6 did not learn from reversal
pairs, while it learned "rises" / "falls".
With both set, the paired half alternates: partner i (the clip at n / 2 + i)
is clip i reversed for even i and mirrored for odd i.

Mixed precision: AdamW keeps float32 master weights; the forward pass casts
them to the model's compute dtype (bfloat16 on the GPU; layer norms and the
text encoder stay float32). An exponential moving average (EMA) of the master
weights is what gets saved.

Cost of the "embedded" preset (``flops_per_sample``; matmul FLOPs, backward =
2 x forward): S = 64 text + 2048 video tokens, width 256, 6 blocks ->
forward 6 x (24 * 256^2 * S + 4 * S^2 * 256) = 47.3 GFLOP per clip (42% linear
layers, 58% attention), training 142 GFLOP per clip, 9.1 TFLOP per step at
batch 64. At the ~400 TFLOP/s bf16 an H200 can reach that is 23 ms a step; a
width-256 model will not keep the tensor cores busy, so expect 2-3x that
(~50-70 ms: an estimate, not a measurement). Eight minutes, less ~1 minute for
start-up and compilation, is then ~6,000-8,000 steps of batch 64 (~0.4-0.5 M
clips, each seen once). The host draws a batch of 64 in 16-27 ms (numpy;
``make_batch`` timed on this repo's shared 2-core CPU machine), inside that step
time. ``time_budget_s`` stops training and saves before the budget is spent,
whatever ``steps`` says.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adaspa_jax.extras import require
from adaspa_jax.models.embedded import data as shapes_data, model as tiny_t2v

optax = require("optax")

# Clips for evaluation losses come from their own stream, never trained on.
EVAL_STREAM = 1_000_003


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Hyper-parameters of a training run (defaults: the shipped model on one H200)."""

  preset: str = "embedded"
  steps: int = 8000
  batch_size: int = 64
  learning_rate: float = 5e-4
  warmup_steps: int = 200
  weight_decay: float = 0.0
  grad_clip: float = 1.0
  caption_dropout: float = 0.1
  ema_decay: float = 0.999
  seed: int = 0
  log_every: int = 50
  time_budget_s: float | None = None
  # Seconds kept at the end of the budget for the evaluation loss (one more
  # compilation) and writing the checkpoint.
  save_reserve_s: float = 45.0
  dtype: str = "bfloat16"
  save_dtype: str = "bfloat16"
  reversal_pairs: bool = False
  mirror_pairs: bool = False
  # Location of the logit-normal sigma distribution (0: SD3's; > 0 favours high noise,
  # where the caption rather than the noisy input decides the layout).
  sigma_logit_mean: float = 0.0
  # Share of training clips (pairs) whose sigma is drawn uniformly from
  # [high_sigma_min, 1] instead: logit-normal(0, 1) puts 0.16% of its mass above
  # 0.95, where nothing but the caption says which way an object goes.
  high_sigma_share: float = 0.0
  high_sigma_min: float = 0.9
  # The text encoder's learning rate relative to the transformer's.
  text_lr_scale: float = 1.0

  def __post_init__(self):
    if self.preset not in tiny_t2v.PRESETS:
      raise ValueError(f"preset={self.preset!r}: expected one of {sorted(tiny_t2v.PRESETS)}.")
    for name in ("steps", "batch_size", "log_every"):
      v = getattr(self, name)
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name}={v!r}: expected an int >= 1.")
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate={self.learning_rate!r}: expected > 0.")
    for name in ("caption_dropout", "ema_decay"):
      if not 0 <= getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)!r}: expected a float in [0, 1).")
    if self.time_budget_s is not None and not self.time_budget_s > 0:
      raise ValueError(f"time_budget_s={self.time_budget_s!r}: expected > 0 or None.")
    for name in ("dtype", "save_dtype"):
      if getattr(self, name) not in ("bfloat16", "float32"):
        raise ValueError(f"{name}={getattr(self, name)!r}: expected 'bfloat16' or 'float32'.")
    if not self.text_lr_scale > 0:
      raise ValueError(f"text_lr_scale={self.text_lr_scale!r}: expected > 0.")
    if not 0 <= self.high_sigma_share <= 1:
      raise ValueError(f"high_sigma_share={self.high_sigma_share!r}: expected a float in [0, 1].")
    if not 0 < self.high_sigma_min < 1:
      raise ValueError(f"high_sigma_min={self.high_sigma_min!r}: expected a float in (0, 1).")
    if not math.isfinite(self.sigma_logit_mean):
      raise ValueError(f"sigma_logit_mean={self.sigma_logit_mean!r}: expected a finite float.")
    if self.paired and self.batch_size % 2:
      pairing = _pairing(self.reversal_pairs, self.mirror_pairs)
      raise ValueError(f"batch_size={self.batch_size} with {pairing}: expected an even batch "
                       "(clips and their partners).")

  @property
  def paired(self) -> bool:
    """Whether half of each batch is partners of the other half (see the module docstring)."""
    return self.reversal_pairs or self.mirror_pairs


def _pairing(reversal_pairs: bool, mirror_pairs: bool) -> str:
  """The pairing flags that are set, for error messages."""
  return " and ".join(f"{name}=True" for name, on in (("reversal_pairs", reversal_pairs),
                                                       ("mirror_pairs", mirror_pairs)) if on)


def flops_per_sample(config: tiny_t2v.TinyT2VConfig) -> dict[str, float]:
  """Matmul FLOPs of one clip: transformer forward (linear, attention) and a training step."""
  t = config.transformer
  d, s = t.inner_dim, config.video_tokens + t.max_text_seq_length
  linear = t.num_layers * 24 * d * d * s
  attention = t.num_layers * 4 * s * s * d
  forward = linear + attention
  return {"linear": float(linear), "attention": float(attention), "forward": float(forward),
          "train": float(3 * forward)}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  """What a step carries: float32 master weights, optimiser state, EMA, step.

  ``params`` and ``ema`` are every weight raveled into one float32 vector
  (``Trainer.unravel`` restores the tree): the optimiser and the average then
  compile to a few vector ops instead of a few per parameter, which more than
  halves the step's compile time on CPU.
  """
  params: jax.Array
  opt_state: optax.OptState
  ema: jax.Array
  step: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
  """Host batch: clip geometry (rendered on device) and tokenized captions."""
  spec: shapes_data.ClipSpec
  ids: np.ndarray        # int32 [B, T]
  lengths: np.ndarray    # int32 [B]


def noised(x0, noise, sigma, num_train_timesteps: int = 1000):
  """Rectified flow at noise level sigma [B] for clean latents x0 [B, ...].

  Returns (x_sigma = (1 - sigma) x0 + sigma noise, the velocity target
  noise - x0, the timestep sigma * num_train_timesteps): the conventions of
  ``adaspa_jax.models.schedulers.FlowMatchEuler``, whose Euler step x + (sigma' - sigma) v
  follows this straight path.
  """
  s = sigma.reshape(sigma.shape + (1,) * (x0.ndim - 1))
  return (1 - s) * x0 + s * noise, noise - x0, sigma * num_train_timesteps


def make_batch(config: tiny_t2v.TinyT2VConfig, stream: int, start: int, n: int, *,
               reversal_pairs: bool = False, mirror_pairs: bool = False) -> Batch:
  """Clips ``start ..`` of a stream; with a pairing, n / 2 of them and then their
  partners: played backwards (``reversal_pairs``), mirrored (``mirror_pairs``) or,
  with both, clip i reversed for even i and mirrored for odd i."""
  paired = reversal_pairs or mirror_pairs
  if paired and n % 2:
    raise ValueError(f"n={n} with {_pairing(reversal_pairs, mirror_pairs)}: expected an even "
                     "count.")
  data = shapes_data.sample_batch(stream, start, n // 2 if paired else n,
                                  frames=config.frames, height=config.height, width=config.width)
  spec, captions = data.spec, data.captions
  if paired:
    m = n // 2
    reverse = np.full(m, reversal_pairs)
    if reversal_pairs and mirror_pairs:
      reverse = np.arange(m) % 2 == 0
    rev = shapes_data.time_reversed(data)
    mir = shapes_data.mirrored(data, config.width)
    pick = lambda r, f: np.where(reverse.reshape((m,) + (1,) * (r.ndim - 1)), r, f)
    partner = jax.tree.map(pick, rev.spec, mir.spec)
    spec = jax.tree.map(lambda a, b: np.concatenate([a, b]), data.spec, partner)
    captions = data.captions + tuple(r if on else f for r, f, on in
                                     zip(rev.captions, mir.captions, reverse))
  tok = tiny_t2v.Tokenizer(config.text.vocabulary, config.text.max_length)
  ids, lengths = tok(captions)
  return Batch(spec, ids, lengths)


def _same_model(a: tiny_t2v.TinyT2VConfig, b: tiny_t2v.TinyT2VConfig) -> bool:
  """Equal up to how attention runs (dense or AdaSpa, sequence parallelism)."""
  runtime = {"attention": "dense", "adaspa": b.transformer.adaspa,
             "sequence_parallel": b.transformer.sequence_parallel}
  return dataclasses.replace(a, transformer=dataclasses.replace(a.transformer, **runtime)) == \
      dataclasses.replace(b, transformer=dataclasses.replace(b.transformer, **runtime))


class Trainer:
  """Builds the model, optimiser and jitted step for a ``TrainConfig``.

  Args:
    cfg: the run.
    config: a model config replacing the preset's (tests use tiny ones).
    init: start from this model's weights (e.g. ``tiny_t2v.load`` of an earlier
      run) instead of a random initialisation; its config must be ``config``'s.
  """

  def __init__(self, cfg: TrainConfig, config: tiny_t2v.TinyT2VConfig | None = None,
               init: tiny_t2v.TinyT2V | None = None):
    self.cfg = cfg
    self.model_config = config or (init.config if init is not None
                                   else tiny_t2v.PRESETS[cfg.preset])
    if init is not None and not _same_model(init.config, self.model_config):
      raise ValueError(f"init has config {init.config}: expected {self.model_config}.")
    compute = nnx.eval_shape(lambda: tiny_t2v.build(self.model_config,
                                                    dtype=jnp.dtype(cfg.dtype)))
    self.graphdef, abstract = nnx.split(compute)
    self.dtypes = jax.tree.map(lambda x: x.dtype, abstract)
    if init is None:
      init = tiny_t2v.build(self.model_config, seed=cfg.seed)
    _, state = nnx.split(init)
    # Linear warm-up to a constant rate (no decay, so a run cut short by its time
    # budget ends as well trained as it got); step 0 already moves.
    warmup = max(cfg.warmup_steps, 1)
    schedule = lambda count: cfg.learning_rate * jnp.minimum(1.0, (count + 1) / warmup)
    self.tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                          optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=cfg.weight_decay))
    master, self.unravel = jax.flatten_util.ravel_pytree(
        jax.tree.map(lambda x: x.astype(jnp.float32), state))
    # Per-weight factor on the optimiser's update: text_lr_scale on the text encoder.
    self.lr_scale = jax.flatten_util.ravel_pytree(jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.full(x.shape, cfg.text_lr_scale if str(
            getattr(path[0], "key", path[0])) == "text_encoder" else 1.0, jnp.float32),
        state))[0]
    # The EMA starts as a copy: the step donates its input, and one buffer cannot be donated twice.
    self.state = TrainState(master, self.tx.init(master), jnp.copy(master),
                            jnp.zeros((), jnp.int32))
    self.rope = tiny_t2v.rotary_embedding(self.model_config)
    null_ids, null_len = tiny_t2v.Tokenizer(self.model_config.text.vocabulary,
                                            self.model_config.text.max_length)([""])
    self._null = (jnp.asarray(null_ids[0]), jnp.asarray(null_len[0]))
    self.step_fn = jax.jit(self._step, donate_argnums=0)
    self.loss_fn = jax.jit(self._loss)

  def _model(self, params):
    cast = jax.tree.map(lambda p, d: p.astype(d), self.unravel(params), self.dtypes)
    return nnx.merge(self.graphdef, cast)

  def sigmas(self, key, n: int, train_sigmas: bool = True):
    """float32 [n] noise levels: logit-normal(sigma_logit_mean, 1), a high_sigma_share of
    them uniform in [high_sigma_min, 1]; with ``train_sigmas=False`` logit-normal(0, 1)."""
    shift = self.cfg.sigma_logit_mean if train_sigmas else 0.0
    sigma = jax.nn.sigmoid(shift + jax.random.normal(key, (n,)))
    if train_sigmas and self.cfg.high_sigma_share > 0:
      k_pick, k_high = jax.random.split(jax.random.fold_in(key, 1))
      high = jax.random.uniform(k_high, (n,), minval=self.cfg.high_sigma_min, maxval=1.0)
      sigma = jnp.where(jax.random.bernoulli(k_pick, self.cfg.high_sigma_share, (n,)), high,
                        sigma)
    return sigma

  def _loss(self, params, batch: Batch, key, dropout=0.0, paired=False, train_sigmas=False):
    """Mean squared velocity error of a batch at sigmas and noise drawn from ``key``.

    ``paired``: the batch's two halves share them (a ``reversal_pairs`` or
    ``mirror_pairs`` batch).
    ``train_sigmas``: draw sigmas as the run's config says (``sigma_logit_mean``,
    ``high_sigma_share``); otherwise from logit-normal(0, 1), so evaluation losses
    of differently trained runs compare.
    """
    c = self.model_config
    model = self._model(params)
    video = shapes_data.render(batch.spec, c.height, c.width, xp=jnp)
    x0 = tiny_t2v.to_latents(video)
    k_sigma, k_noise, k_drop = jax.random.split(key, 3)
    b = x0.shape[0]
    # A clip and its partner share their noise and sigma (see reversal_pairs).
    m = b // 2 if paired else b
    sigma = self.sigmas(k_sigma, m, train_sigmas)
    noise = jax.random.normal(k_noise, (m,) + x0.shape[1:])
    if paired:
      sigma, noise = jnp.concatenate([sigma, sigma]), jnp.concatenate([noise, noise])
    x, target, timestep = noised(x0, noise, sigma)
    ids, lengths = jnp.asarray(batch.ids), jnp.asarray(batch.lengths)
    if dropout:
      drop = jax.random.bernoulli(k_drop, dropout, (b,))
      ids = jnp.where(drop[:, None], self._null[0][None], ids)
      lengths = jnp.where(drop, self._null[1], lengths)
    text = model.text_encoder(ids, lengths)
    dtype = jnp.dtype(self.cfg.dtype)
    pred = model.transformer(x.astype(dtype), text.astype(dtype), timestep,
                             image_rotary_emb=self.rope)
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - target))

  def _step(self, state: TrainState, batch: Batch, key):
    loss, grads = jax.value_and_grad(self._loss)(state.params, batch, key,
                                                 self.cfg.caption_dropout,
                                                 self.cfg.paired, True)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    if self.cfg.text_lr_scale != 1.0:
      updates = updates * self.lr_scale
    params = optax.apply_updates(state.params, updates)
    # EMA with a short warm-up, so early checkpoints are not dominated by the init.
    t = state.step.astype(jnp.float32)
    decay = jnp.minimum(self.cfg.ema_decay, (1 + t) / (10 + t))
    ema = decay * state.ema + (1 - decay) * params
    return TrainState(params, opt_state, ema, state.step + 1), {
        "loss": loss, "grad_norm": jnp.linalg.norm(grads)}

  def batch(self, step: int) -> Batch:
    # With pairs, a step draws batch_size / 2 new clips.
    per_step = self.cfg.batch_size // (2 if self.cfg.paired else 1)
    return make_batch(self.model_config, self.cfg.seed, step * per_step, self.cfg.batch_size,
                      reversal_pairs=self.cfg.reversal_pairs, mirror_pairs=self.cfg.mirror_pairs)

  def eval_loss(self, params, batch: Batch, seed: int = 0) -> float:
    """Loss at fixed sigmas and noise (``seed``), no caption dropout."""
    return float(self.loss_fn(params, batch, jax.random.key(seed)))

  def model(self, which: str = "ema", dtype=jnp.float32) -> tiny_t2v.TinyT2V:
    """The model with the master ("params") or averaged ("ema") weights, in ``dtype``."""
    params = self.unravel(getattr(self.state, "params" if which == "params" else "ema"))
    model = nnx.eval_shape(lambda: tiny_t2v.build(self.model_config, dtype=dtype))
    graphdef, abstract = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda p, a: p.astype(a.dtype), params, abstract))


def train(cfg: TrainConfig, output_dir: str, *, command: str = "",
          config: tiny_t2v.TinyT2VConfig | None = None, started_at: float | None = None,
          init: tiny_t2v.TinyT2V | None = None, log: Callable[[str], None] = print) -> dict:
  """Trains, saves the EMA model to ``output_dir`` and returns the training record.

  Args:
    cfg: the run.
    command: the command line, stored in the record.
    config: a model config replacing the preset's (tests).
    started_at: ``time.perf_counter()`` value the time budget counts from
      (default: now), e.g. the launcher's start.
    init: weights to start from (see ``Trainer``); the optimiser starts fresh
      and the data stream from clip 0 of ``cfg.seed`` (pick another seed to see
      new clips).
  """
  start = time.perf_counter() if started_at is None else started_at
  trainer = Trainer(cfg, config, init)
  mc = trainer.model_config
  flops = flops_per_sample(mc)
  log(f"tiny_t2v {cfg.preset}: {mc.video_tokens} video + {mc.text.max_length} text "
      f"tokens, {flops['train'] / 1e9:.3g} GFLOP per clip per step, batch "
      f"{cfg.batch_size}, device {jax.devices()[0]}")
  key = jax.random.key(cfg.seed)
  history, pending, last = [], [], float("nan")
  stopped_by, step = "steps", 0
  t_log = time.perf_counter()
  while step < cfg.steps:
    trainer.state, metrics = trainer.step_fn(trainer.state, trainer.batch(step),
                                             jax.random.fold_in(key, step))
    pending.append(metrics)
    step += 1
    if step % cfg.log_every and step != cfg.steps:
      continue
    values = jax.device_get(pending)   # the only host sync: once per log line
    pending = []
    now = time.perf_counter()
    last = float(np.mean([v["loss"] for v in values]))
    per_step = (now - t_log) / len(values)
    t_log = now
    history.append({"step": step, "loss": last, "seconds": round(now - start, 2),
                    "grad_norm": float(np.mean([v["grad_norm"] for v in values]))})
    if not math.isfinite(last):
      raise FloatingPointError(f"loss is {last} at step {step}: stopping.")
    log(f"step {step}: loss {last:.4f}, {per_step * 1e3:.1f} ms/step, "
        f"{now - start:.0f} s")
    if (cfg.time_budget_s is not None and step < cfg.steps
        and now - start + cfg.log_every * per_step + cfg.save_reserve_s > cfg.time_budget_s):
      stopped_by = "time_budget"
      log(f"stopping after step {step}: the next {cfg.log_every} steps would pass "
          f"time_budget_s={cfg.time_budget_s}")
      break
  eval_batch = make_batch(mc, EVAL_STREAM, 0, min(cfg.batch_size, 16))
  record = {
      "command": command, "preset": cfg.preset, "steps": step,
      "stopped_by": stopped_by, "final_loss": last,
      "final_loss_note": f"mean training loss of the last {len(values)} steps",
      "eval_loss_ema": trainer.eval_loss(trainer.state.ema, eval_batch),
      "eval_loss_params": trainer.eval_loss(trainer.state.params, eval_batch),
      "eval_loss_note": f"loss of {len(eval_batch.ids)} clips of stream {EVAL_STREAM} (never "
                        "trained on) at fixed sigmas and noise",
      "train_config": dataclasses.asdict(cfg),
      "train_seconds": round(time.perf_counter() - start, 1),
      "device": str(jax.devices()[0]), "gflop_per_clip_step": flops["train"] / 1e9,
  }
  tiny_t2v.save(trainer.model("ema"), output_dir, dtype=cfg.save_dtype, record=record)
  with open(os.path.join(output_dir, "training_log.json"), "w") as f:
    json.dump({**record, "history": history}, f, indent=1)
  log(f"saved {output_dir}: {step} steps, final loss {last:.4f}, eval loss (EMA) "
      f"{record['eval_loss_ema']:.4f}")
  return {**record, "history": history}
