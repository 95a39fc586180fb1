"""CogVideoX (1.0 and 1.5) against diffusers' PyTorch CogVideoXTransformer3DModel on CPU."""

import ast
import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from adaspa_jax import AdaSpaConfig  # noqa: E402
from diffusers.models import embeddings as diffusers_embeddings  # noqa: E402
from adaspa_jax.models import cogvideox as cv  # noqa: E402
from adaspa_jax.models.loading import load_state_dict  # noqa: E402
from tests.models import param_counts  # noqa: E402

_SMALL = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
              time_embed_dim=16, text_embed_dim=24, num_layers=2, max_text_seq_length=7)
# name -> (diffusers config, latent frames, height, width)
CONFIGS = {
    # 1.0 (CogVideoX-5B style): 2D patches; RoPE on a 3 x 2 x 5 token grid (frames, rows,
    # cols), stretched over a crop of the 4 x 5 training grid.
    "v1.0-rope": (dict(_SMALL, sample_height=8, sample_width=10, sample_frames=9,
                       use_rotary_positional_embeddings=True), 3, 4, 10),
    # 1.5 (CogVideoX1.5-5B style): temporal patches, "slice" RoPE on a 2 x 3 x 5 token
    # grid, I2V's ofs embedding.
    "v1.5-rope-ofs": (dict(_SMALL, patch_size_t=2, patch_bias=False, sample_height=16,
                           sample_width=16, sample_frames=9, ofs_embed_dim=16,
                           use_rotary_positional_embeddings=True), 4, 6, 10),
    # CogVideoX-2B style: fixed sin-cos positional embedding, no RoPE; norms without affine.
    "v1.0-sincos": (dict(_SMALL, sample_height=4, sample_width=6, sample_frames=5,
                         norm_elementwise_affine=False, activation_fn="gelu",
                         timestep_activation_fn="gelu"), 3, 8, 4),
    # CogVideoX-5B-I2V style: learned positional embedding plus RoPE.
    "v1.0-learned": (dict(_SMALL, sample_height=4, sample_width=6, sample_frames=5,
                          use_rotary_positional_embeddings=True,
                          use_learned_positional_embeddings=True), 2, 4, 6),
}


def _pipeline_rope_fn():
  """The CogVideoX pipeline's own RoPE preparation, without importing the pipeline.

  The pipeline module imports ``transformers`` (not a test dependency), so the
  two functions are taken from its source and run against diffusers' embeddings.
  """
  path = inspect.getfile(diffusers_embeddings).replace(
      "models/embeddings.py", "pipelines/cogvideo/pipeline_cogvideox.py")
  tree = ast.parse(open(path).read())
  wanted = {"get_resize_crop_region_for_grid", "_prepare_rotary_positional_embeddings"}
  nodes = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name in wanted]
  assert {n.name for n in nodes} == wanted
  for n in nodes:
    n.decorator_list = []
  namespace = {"torch": torch, "get_3d_rotary_pos_embed": diffusers_embeddings.get_3d_rotary_pos_embed}
  exec(compile(ast.Module(body=nodes, type_ignores=[]), path, "exec"), namespace)
  return namespace["_prepare_rotary_positional_embeddings"]


def _pipeline_rope(torch_model, frames, height, width):
  fake_pipe = type("Pipe", (), {})()
  fake_pipe.vae_scale_factor_spatial = 8
  fake_pipe.transformer = torch_model
  return _pipeline_rope_fn()(fake_pipe, height * 8, width * 8, frames, "cpu")


def _torch_model(config_dict, seed=0):
  torch.manual_seed(seed)
  model = diffusers.CogVideoXTransformer3DModel(**config_dict).eval()
  with torch.no_grad():
    # Move every weight off its init value (norm scales 1, biases 0) so each one matters.
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
    if config_dict.get("use_learned_positional_embeddings"):
      model.patch_embed.pos_embedding.add_(0.5 * torch.randn_like(model.patch_embed.pos_embedding))
  return model


def _jax_model(torch_model, dtype=jnp.float32, **overrides):
  config = cv.Config.from_diffusers(dict(torch_model.config, **overrides))
  # Abstract, then filled by the loader (as from_pretrained does): no random init.
  model = nnx.eval_shape(lambda: cv.Model(config, rngs=nnx.Rngs(0), dtype=dtype))
  tensors = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  load_state_dict(model, tensors, cv.weight_rules(config))
  return model


def _inputs(config_dict, frames, height, width, seed=1, batch=2):
  rng = np.random.default_rng(seed)
  return dict(
      hidden_states=rng.standard_normal(
          (batch, frames, config_dict["in_channels"], height, width)).astype(np.float32),
      encoder_hidden_states=rng.standard_normal(
          (batch, config_dict["max_text_seq_length"], config_dict["text_embed_dim"])
      ).astype(np.float32),
      timestep=rng.uniform(0, 999, batch).astype(np.float32),
      ofs=rng.uniform(0, 3, batch).astype(np.float32) if config_dict.get("ofs_embed_dim") else None)


def _run_torch(model, inputs, rope):
  t = {k: None if v is None else torch.from_numpy(v) for k, v in inputs.items()}
  with torch.no_grad():
    return model(**t, image_rotary_emb=rope, return_dict=False)[0].numpy()


def _jax_args(inputs):
  return {k: None if v is None else jnp.asarray(v) for k, v in inputs.items()}


def _jit_forward(model):
  """model(**inputs, image_rotary_emb=rope, ...) compiled once (eager re-traces the scan)."""
  graphdef, params = nnx.split(model)

  @jax.jit
  def forward(params, inputs, rope, adaspa_state, adaspa_step):
    return nnx.merge(graphdef, params)(**inputs, image_rotary_emb=rope,
                                       adaspa_state=adaspa_state, adaspa_step=adaspa_step)

  return lambda inputs, rope, state=None, step=None: forward(params, inputs, rope, state, step)


@functools.cache
def _case(name):
  config_dict, f, h, w = CONFIGS[name]
  torch_model = _torch_model(config_dict)
  inputs = _inputs(config_dict, f, h, w)
  rope = _pipeline_rope(torch_model, f, h, w) if config_dict.get(
      "use_rotary_positional_embeddings") else None
  return name, config_dict, torch_model, inputs, rope, (f, h, w)


@pytest.fixture(params=sorted(CONFIGS))
def case(request):
  return _case(request.param)


def test_parity_with_diffusers(case):
  name, _, torch_model, inputs, rope, (f, h, w) = case
  want = _run_torch(torch_model, inputs, rope)
  model = _jax_model(torch_model)
  ours_rope = (cv.rotary_positional_embeddings(model.config, f, h, w)
               if model.config.use_rotary_positional_embeddings else None)
  got = np.asarray(_jit_forward(model)(_jax_args(inputs), ours_rope))
  assert got.shape == want.shape == inputs["hidden_states"].shape
  assert np.abs(want).max() > 0.1  # the comparison is not between two near-zero outputs
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=name)


@pytest.mark.parametrize("name", [n for n, c in CONFIGS.items()
                                  if c[0].get("use_rotary_positional_embeddings")])
def test_rope_helper_matches_pipeline(name):
  _, _, torch_model, _, rope, (f, h, w) = _case(name)
  config = cv.Config.from_diffusers(dict(torch_model.config))
  cos, sin = cv.rotary_positional_embeddings(config, f, h, w)
  np.testing.assert_allclose(np.asarray(cos), rope[0].numpy(), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(sin), rope[1].numpy(), atol=1e-5, rtol=0)


def test_every_key_mapped_and_every_param_filled():
  torch_model = _torch_model(CONFIGS["v1.5-rope-ofs"][0])
  config = cv.Config.from_diffusers(dict(torch_model.config))
  tensors = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  abstract = nnx.eval_shape(lambda: cv.Model(config, rngs=nnx.Rngs(0)))
  load_state_dict(abstract, tensors, cv.weight_rules(config))  # raises on any gap
  broken = dict(tensors)
  del broken["transformer_blocks.1.attn1.norm_k.bias"]
  broken["transformer_blocks.0.attn1.to_q.lora"] = tensors["proj_out.bias"]
  model = nnx.eval_shape(lambda: cv.Model(config, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"(?s)attn1/norm_k/bias\[layer 1\].*to_q\.lora"):
    load_state_dict(model, broken, cv.weight_rules(config))


def test_from_pretrained_sharded_bfloat16(tmp_path):
  from adaspa_jax import models
  config_dict, f, h, w = CONFIGS["v1.0-rope"]
  torch_model = _torch_model(config_dict)
  torch_model.save_pretrained(tmp_path, max_shard_size="20KB")  # several shards + index json
  assert len(list(tmp_path.glob("*.safetensors"))) > 1
  model = models.from_pretrained(tmp_path, dtype=jnp.bfloat16, attention="adaspa",
                                 adaspa=AdaSpaConfig(block_size=16))
  assert isinstance(model, cv.Model) and model.config.attention == "adaspa"
  kernel = model.transformer_blocks.attn1.to_q.kernel.get_value()
  assert kernel.dtype == jnp.bfloat16
  want = torch_model.transformer_blocks[1].attn1.to_q.weight.detach().numpy().T
  np.testing.assert_allclose(np.asarray(kernel[1], np.float32), want, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("name", ["cogvideox-5b", "cogvideox1.5-5b"])
def test_preset_parameter_count(name):
  config = cv.PRESETS[name]
  want = param_counts.torch_count(
      param_counts.diffusers_meta_model(diffusers.CogVideoXTransformer3DModel, config))
  got = param_counts.nnx_count(
      nnx.eval_shape(lambda: cv.Model(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)))
  assert got == want
  assert round(got / 1e9) == 6  # "5B" models: 5.57B parameters


def test_tiny_preset_runs_and_from_diffusers_round_trips():
  config = cv.PRESETS["tiny"]
  d = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
  d.pop("attention"), d.pop("adaspa")
  assert cv.Config.from_diffusers(dict(d, _class_name="CogVideoXTransformer3DModel")) == config
  with pytest.raises(ValueError, match="unknown keys.*num_blocks"):
    cv.Config.from_diffusers(dict(d, num_blocks=3))
  x = jnp.ones((1, 2, 4, 6, 4))
  rope = cv.rotary_positional_embeddings(config, 2, 6, 4)
  # Traced only (the parity tests run the same code numerically).
  out = nnx.eval_shape(lambda: cv.Model(config, rngs=nnx.Rngs(0))(
      x, jnp.ones((1, 7, 24)), 5.0, image_rotary_emb=rope))
  assert out.shape == x.shape and out.dtype == x.dtype


def test_bad_inputs_raise():
  config = cv.PRESETS["tiny"]
  model = nnx.eval_shape(lambda: cv.Model(config, rngs=nnx.Rngs(0)))  # checks precede compute
  rope = cv.rotary_positional_embeddings(config, 2, 6, 4)
  text = jnp.ones((1, 7, 24))
  with pytest.raises(ValueError, match="hidden_states has shape"):
    model(jnp.ones((1, 2, 3, 6, 4)), text, 1.0, image_rotary_emb=rope)
  with pytest.raises(ValueError, match="divisible by patch_size=2"):
    model(jnp.ones((1, 2, 4, 5, 4)), text, 1.0, image_rotary_emb=rope)
  with pytest.raises(ValueError, match="encoder_hidden_states has shape"):
    model(jnp.ones((1, 2, 4, 6, 4)), jnp.ones((1, 7, 8)), 1.0, image_rotary_emb=rope)
  with pytest.raises(ValueError, match="image_rotary_emb=None"):
    model(jnp.ones((1, 2, 4, 6, 4)), text, 1.0)
  with pytest.raises(ValueError, match="image_rotary_emb has shapes"):
    model(jnp.ones((1, 3, 4, 6, 4)), text, 1.0, image_rotary_emb=rope)
  with pytest.raises(ValueError, match="adaspa_state given but config.attention='dense'"):
    model(jnp.ones((1, 2, 4, 6, 4)), text, 1.0, image_rotary_emb=rope,
          adaspa_state=object(), adaspa_step=0)
  with pytest.raises(ValueError, match="attention='sparse'"):
    dataclasses.replace(config, attention="sparse")


def test_bfloat16_close_to_diffusers_float32():
  _, _, torch_model, inputs, rope, (f, h, w) = _case("v1.5-rope-ofs")
  want = _run_torch(torch_model, inputs, rope)
  model = _jax_model(torch_model, dtype=jnp.bfloat16)
  bf16 = {k: v if v is None or k in ("timestep", "ofs") else v.astype(jnp.bfloat16)
          for k, v in _jax_args(inputs).items()}
  got = _jit_forward(model)(bf16, cv.rotary_positional_embeddings(model.config, f, h, w))
  assert got.dtype == jnp.bfloat16
  err = np.abs(np.asarray(got, np.float32) - want).max()
  assert err < 0.05 * np.abs(want).max(), err


def _adaspa_setup(sparsity):
  config_dict = dict(CONFIGS["v1.0-rope"][0], sample_height=8, sample_width=12)
  f, h, w = 3, 8, 12  # S = 7 + 3 * 4 * 6 = 79 tokens: 5 blocks of 16, the first holds text
  torch_model = _torch_model(config_dict)
  adaspa = AdaSpaConfig(sparsity=sparsity, block_size=16, num_steps=6, search_steps=(2, 4))
  model = _jax_model(torch_model, attention="adaspa", adaspa=adaspa)
  inputs = _jax_args(_inputs(config_dict, f, h, w, batch=1))
  rope = cv.rotary_positional_embeddings(model.config, f, h, w)
  forward = _jit_forward(model)
  return model, forward, inputs, rope, np.asarray(forward(inputs, rope)), model.init_adaspa_state(
      1, f, h, w)


def test_adaspa_sparsity_zero_equals_dense():
  model, forward, inputs, rope, dense, state = _adaspa_setup(0.0)
  assert jax.tree.leaves(state)[0].shape[0] == model.config.num_layers
  # A Python int step traces too (the blocks' scan is a trace of its own).
  out, new_state = jax.eval_shape(
      lambda s: model(**inputs, image_rotary_emb=rope, adaspa_state=s, adaspa_step=3), state)
  assert out.shape == dense.shape and jax.tree.structure(new_state) == jax.tree.structure(state)
  for step in range(model.config.adaspa.num_steps):  # dense, fused, sparse, cached, sparse
    out, state = forward(inputs, rope, state, jnp.int32(step))
    np.testing.assert_allclose(np.asarray(out), dense, atol=2e-5, rtol=0, err_msg=f"step {step}")


def test_adaspa_sparse_under_jit_with_traced_step():
  model, forward, inputs, rope, dense, state = _adaspa_setup(0.8)
  first_search = model.config.adaspa.first_search
  for step in range(first_search + 2):
    out, state = forward(inputs, rope, state, jnp.int32(step))
    out = np.asarray(out)
    assert np.isfinite(out).all()
    if step <= first_search:  # warm-up and the fused search are exact dense attention
      np.testing.assert_allclose(out, dense, atol=2e-5, rtol=0, err_msg=f"step {step}")
    else:  # sparse attention: close to dense but not equal
      assert 0 < np.abs(out - dense).max() < 0.5 * np.abs(dense).max()
  assert float(jnp.mean(state.sparsity)) > 0.3


