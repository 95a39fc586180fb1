"""The embedded model: tokenizer, text encoder (against numpy), presets, checkpoints."""

import dataclasses
import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adaspa_jax import models
from adaspa_jax.models import cogvideox, loading
from adaspa_jax.models.embedded import data as shapes_data, model as tiny_t2v
from adaspa_jax.models.embedded.text import TextEncoder, TextEncoderConfig, Tokenizer

TEST = tiny_t2v.PRESETS["test"]
PROMPTS = ["a red circle moves left", "a blue square spins, a green triangle falls, "
           "a cyan circle bounces", ""]


@pytest.fixture(scope="module")
def model():
  # Random weights everywhere (no norm scale stays 1, no bias 0), filled from numpy into
  # an abstract model: building eagerly compiles every initialiser, which is slow on CPU.
  m = nnx.eval_shape(lambda: tiny_t2v.build(TEST))
  rng = np.random.default_rng(1)
  for var in loading.model_params(m).values():
    shape, dtype = var.get_value().shape, var.get_value().dtype
    var.set_value(jnp.asarray(0.1 * rng.standard_normal(shape), dtype))
  return m


def test_vocabulary_is_the_grammars():
  assert tiny_t2v.VOCABULARY == shapes_data.VOCABULARY


def test_tokenizer_round_trip_and_errors():
  tok = Tokenizer(tiny_t2v.VOCABULARY, 24)
  ids, lengths = tok(PROMPTS)
  assert ids.shape == (3, 24) and ids.dtype == np.int32
  assert lengths.tolist() == [6, 15, 1]                 # <s> + words (commas are words)
  assert np.all(ids[:, 0] == 1) and np.all(ids[np.arange(24)[None] >= lengths[:, None]] == 0)
  assert tok.decode(ids, lengths) == PROMPTS
  with pytest.raises(ValueError, match="'purple'"):
    tok(["a purple circle moves left"])
  with pytest.raises(ValueError, match="max_length=4"):
    Tokenizer(tiny_t2v.VOCABULARY, 4)(["a red circle moves left"])
  with pytest.raises(ValueError, match="sequence of strings"):
    tok("a red circle moves left")
  with pytest.raises(ValueError, match="starting with"):
    TextEncoderConfig(("a", "<pad>", "<s>"))


def test_tokenizer_reads_phrases_as_one_token():
  """Phrase entries win over their words, longest first; words outside a phrase and a
  phrase's first word alone keep their own ids."""
  vocab = tiny_t2v.VOCABULARY + ("moves left", "a red", "a red circle")
  tok = Tokenizer(vocab, 24)
  ids, lengths = tok(["a red circle moves left, a red square moves right", "a red",
                      "a blue circle moves"])
  want = [["<s>", "a red circle", "moves left", ",", "a red", "square", "moves", "right"],
          ["<s>", "a red"], ["<s>", "a", "blue", "circle", "moves"]]
  for row, n, words in zip(ids, lengths, want):
    assert n == len(words) and [vocab[i] for i in row[:n]] == words
  assert tok.decode(ids, lengths) == ["a red circle moves left, a red square moves right",
                                      "a red", "a blue circle moves"]
  with pytest.raises(ValueError, match="single spaces"):
    TextEncoderConfig(tiny_t2v.VOCABULARY + ("moves  left",))
  with pytest.raises(ValueError, match="single spaces"):
    TextEncoderConfig(tiny_t2v.VOCABULARY + ("Moves",))


def test_merge_phrases(model, tmp_path):
  """New rows = first word + last word's offset from the phrases' mean last word, rescaled;
  captions without the phrases encode as before; the merged model saves and loads."""
  vocab = TEST.text.vocabulary
  e = np.asarray(model.text_encoder.token_embedding.embedding.get_value(), np.float64)
  out = tiny_t2v.merge_phrases(model, ["moves left", "moves right"], norm=1.5)
  assert out.config.text.vocabulary == vocab + ("moves left", "moves right")
  assert model.config.text.vocabulary == vocab           # the input is untouched
  after = np.asarray(out.text_encoder.token_embedding.embedding.get_value(), np.float64)
  np.testing.assert_array_equal(after[:len(vocab)], e)
  left, right, moves = (e[vocab.index(w)] for w in ("left", "right", "moves"))
  unit = (left - right) / np.linalg.norm(left - right)
  np.testing.assert_allclose(after[-2], moves + 1.5 * unit, atol=1e-5)
  np.testing.assert_allclose(after[-1], moves - 1.5 * unit, atol=1e-5)
  default = tiny_t2v.merge_phrases(model, ["moves left", "moves right"])
  d = np.asarray(default.text_encoder.token_embedding.embedding.get_value(), np.float64)
  np.testing.assert_allclose(np.linalg.norm(d[-2] - moves), np.linalg.norm(e, axis=1).mean(),
                             rtol=1e-5)
  ids, lengths = out.tokenizer(["a red circle moves left"])
  assert lengths.tolist() == [5] and ids[0, 4] == len(vocab)
  same = ["a blue square rises, a red circle moves"]
  np.testing.assert_array_equal(np.asarray(out.encode(same)), np.asarray(model.encode(same)))
  pair = np.asarray(out.encode(["a red circle moves left", "a red circle moves right"]))
  assert np.linalg.norm(pair[0] - pair[1]) > 0
  tiny_t2v.save(out, tmp_path / "m", dtype="float32")
  back = tiny_t2v.load(tmp_path / "m")
  assert back.config.text.vocabulary == out.config.text.vocabulary
  np.testing.assert_array_equal(np.asarray(back.encode(["a red circle moves right"])),
                                np.asarray(out.encode(["a red circle moves right"])))
  for bad, match in ((["moves left"], "two or more phrases"),
                     (["moves left", "falls left"], "distinct last"),
                     (["moves up", "moves right"], "'moves up'"),
                     (["left", "moves right"], "'left'"),
                     (["moves left", "moves left"], "distinct last")):
    with pytest.raises(ValueError, match=match):
      tiny_t2v.merge_phrases(model, bad)
  with pytest.raises(ValueError, match="already|'moves left'"):
    tiny_t2v.merge_phrases(out, ["moves left", "moves right"])
  with pytest.raises(ValueError, match="norm=-1"):
    tiny_t2v.merge_phrases(model, ["moves left", "moves right"], norm=-1)


def _layer_norm(x, scale, bias, eps=1e-5):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _numpy_encoder(encoder, ids, lengths):
  """The encoder written out in float64 numpy from its parameters."""
  p = {k: np.asarray(v.get_value(), np.float64)
       for k, v in loading.model_params(encoder).items()}
  cfg = encoder.config
  b, t = ids.shape
  heads, dh = cfg.num_heads, cfg.width // cfg.num_heads
  x = p["token_embedding/embedding"][ids] + p["position_embedding"][:t]
  key_ok = np.arange(t)[None, :] < lengths[:, None]                     # [B, T]
  lin = lambda h, name, l: h @ p[f"layers/{name}/kernel"][l] + p[f"layers/{name}/bias"][l]
  for l in range(cfg.num_layers):
    h = _layer_norm(x, p["layers/norm1/scale"][l], p["layers/norm1/bias"][l])
    q, k, v = (lin(h, f"attn/to_{n}", l).reshape(b, t, heads, dh) for n in "qkv")
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
    s = np.where(key_ok[:, None, None, :], s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    attn = np.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, t, -1)
    x = x + lin(attn, "attn/to_out", l)
    h = _layer_norm(x, p["layers/norm2/scale"][l], p["layers/norm2/bias"][l])
    x = x + lin(_gelu_tanh(lin(h, "ff/proj_in", l)), "ff/proj_out", l)
  x = _layer_norm(x, p["norm_out/scale"], p["norm_out/bias"])
  return np.where(key_ok[..., None], x, 0.0)


def test_text_encoder_against_numpy(model):
  ids, lengths = model.tokenizer(PROMPTS)
  got = np.asarray(model.text_encoder(ids, lengths))
  assert got.shape == (3, 24, 32) and got.dtype == np.float32
  np.testing.assert_allclose(got, _numpy_encoder(model.text_encoder, ids, lengths), atol=2e-5)
  # Padding carries nothing: garbage in padded slots changes no output.
  noisy = np.where(np.arange(24)[None] >= lengths[:, None], 7, ids)
  np.testing.assert_array_equal(np.asarray(model.text_encoder(noisy, lengths)), got)


def test_embedded_preset_meets_the_issue():
  cfg = tiny_t2v.PRESETS["embedded"]
  t = cfg.transformer
  assert cfg.frames >= 8
  assert cfg.video_tokens == 2048 and cfg.video_tokens // 64 >= 32
  assert t.max_text_seq_length == 64                      # the text sink is block 0
  assert (cfg.height // t.patch_size) * (cfg.width // t.patch_size) % 64 == 0
  m = nnx.eval_shape(lambda: tiny_t2v.build(cfg))
  n = sum(int(np.prod(v.get_value().shape)) for v in loading.model_params(m).values())
  assert 2 * n < 15e6                                     # a bfloat16 checkpoint under 15 MB
  assert cfg.text.vocabulary == shapes_data.VOCABULARY
  longest = shapes_data.caption([shapes_data.Item(c, "triangle", "right")
                                  for c in ("red", "green", "blue")])
  assert 1 + len(shapes_data.words(longest)) <= min(p.text.max_length
                                                    for p in tiny_t2v.PRESETS.values())


def test_config_checks():
  with pytest.raises(ValueError, match="sample size"):
    dataclasses.replace(TEST, height=32)
  with pytest.raises(ValueError, match="text_embed_dim"):
    dataclasses.replace(TEST, text=dataclasses.replace(TEST.text, width=64))
  with pytest.raises(ValueError, match="channels"):
    dataclasses.replace(TEST, transformer=dataclasses.replace(TEST.transformer, in_channels=4))
  for bad in (48, 8, True):
    with pytest.raises(ValueError, match=f"adaspa_block_size={bad!r}"):
      dataclasses.replace(TEST, adaspa_block_size=bad)
  assert tiny_t2v.PRESETS["embedded"].adaspa_block_size == 32


def test_adaspa_block_size_is_saved(model, tmp_path):
  """A checkpoint keeps its sampling block size; one written before the key existed
  reads as the library default, 64."""
  m = tiny_t2v.TinyT2V(dataclasses.replace(model.config, adaspa_block_size=16),
                       model.transformer, model.text_encoder)
  tiny_t2v.save(m, tmp_path / "m", dtype="float32")
  assert tiny_t2v.load(tmp_path / "m").config.adaspa_block_size == 16
  meta_path = tmp_path / "m" / "tiny_t2v.json"
  meta = json.loads(meta_path.read_text())
  del meta["adaspa_block_size"]
  meta_path.write_text(json.dumps(meta))
  assert tiny_t2v.load(tmp_path / "m").config.adaspa_block_size == 64


def test_adaspa_head_adaptive_is_saved(model, tmp_path):
  """Likewise the head tiers: saved, and on (the field's default) for older checkpoints."""
  m = tiny_t2v.TinyT2V(dataclasses.replace(model.config, adaspa_head_adaptive=False),
                       model.transformer, model.text_encoder)
  tiny_t2v.save(m, tmp_path / "m", dtype="float32")
  assert tiny_t2v.load(tmp_path / "m").config.adaspa_head_adaptive is False
  meta_path = tmp_path / "m" / "tiny_t2v.json"
  meta = json.loads(meta_path.read_text())
  del meta["adaspa_head_adaptive"]
  meta_path.write_text(json.dumps(meta))
  assert tiny_t2v.load(tmp_path / "m").config.adaspa_head_adaptive is True
  with pytest.raises(ValueError, match="adaspa_head_adaptive=1"):
    dataclasses.replace(model.config, adaspa_head_adaptive=1)


def test_latents_and_sampler_inputs(model):
  video = np.random.default_rng(0).uniform(size=(2, 2, 16, 16, 3)).astype(np.float32)
  latents = tiny_t2v.to_latents(video)
  assert latents.shape == (2, 2, 3, 16, 16)
  np.testing.assert_allclose(tiny_t2v.to_video(latents), video, atol=1e-6)
  noise, cond, uncond, shared = tiny_t2v.sampler_inputs(model, PROMPTS[:2], seed=4)
  assert noise.shape == (2, 2, 3, 16, 16)
  np.testing.assert_array_equal(uncond["encoder_hidden_states"][0],
                                model.encode([""])[0])
  cos, sin = shared["image_rotary_emb"]
  assert cos.shape == sin.shape == (TEST.video_tokens, 16)
  # One seed per prompt: a clip's noise does not depend on its batch.
  both = tiny_t2v.sampler_inputs(model, PROMPTS[:2], seed=[7, 9])[0]
  alone = tiny_t2v.sampler_inputs(model, PROMPTS[1:2], seed=[9])[0]
  np.testing.assert_array_equal(both[1], alone[0])
  with pytest.raises(ValueError, match="seed has 1 entries"):
    tiny_t2v.sampler_inputs(model, PROMPTS[:2], seed=[7])
  emb = tiny_t2v.prompt_embeddings(model, PROMPTS[0])
  np.testing.assert_array_equal(emb["prompt_embeds"], cond["encoder_hidden_states"][:1])
  np.testing.assert_array_equal(emb["negative_prompt_embeds"], uncond["encoder_hidden_states"][:1])


def _outputs(m, noise, shared):
  text = m.encode(PROMPTS)
  out = m.transformer(noise, text, jnp.asarray([900.0, 500.0, 20.0]), **shared)
  return np.asarray(text), np.asarray(out, np.float32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_load_round_trip(model, tmp_path, dtype):
  noise = jnp.asarray(np.random.default_rng(0).standard_normal((3, 2, 3, 16, 16)), jnp.float32)
  shared = {"image_rotary_emb": tiny_t2v.rotary_embedding(TEST)}
  path = tiny_t2v.save(model, tmp_path / "ckpt", dtype=dtype, record={"steps": 7})
  loaded = tiny_t2v.load(path)
  assert loaded.config == model.config and tiny_t2v.training_record(path) == {"steps": 7}
  want, got = _outputs(model, noise, shared), _outputs(loaded, noise, shared)
  tol = 0 if dtype == "float32" else 0.05
  for w, g in zip(want, got):
    np.testing.assert_allclose(g, w, atol=tol, rtol=tol)
  # The transformer is a plain diffusers-layout CogVideoX checkpoint.
  with open(os.path.join(path, "transformer", "config.json")) as f:
    config = json.load(f)
  assert config["_class_name"] == "CogVideoXTransformer3DModel"
  assert not {"attention", "adaspa", "sequence_parallel"} & set(config)
  assert type(models.from_pretrained(os.path.join(path, "transformer"),
                                     dtype=jnp.float32)) is type(model.transformer)
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
  n = sum(int(np.prod(v.get_value().shape)) for v in loading.model_params(model).values())
  assert size < n * (4 if dtype == "float32" else 2) + 40_000


def test_load_errors(model, tmp_path):
  with pytest.raises(ValueError, match="tiny_t2v.json"):
    tiny_t2v.load(tmp_path)
  path = tiny_t2v.save(model, tmp_path / "ckpt", dtype="float32")
  other = nnx.eval_shape(lambda: TextEncoder(dataclasses.replace(TEST.text, num_layers=2),
                                             rngs=nnx.Rngs(0)))
  from safetensors.numpy import save_file
  save_file({k: np.zeros(v.get_value().shape, np.float32)
             for k, v in loading.model_params(other).items()},
            os.path.join(path, "text_encoder", "model.safetensors"))
  with pytest.raises(ValueError, match="has shape"):
    tiny_t2v.load(path)


def test_add_learned_positions(model, tmp_path):
  """Scale 0 leaves the function unchanged; otherwise the sin-cos table times the scale is
  added to the video tokens, and the option survives a checkpoint."""
  noise = jnp.asarray(np.random.default_rng(2).standard_normal((3, 2, 3, 16, 16)), jnp.float32)
  shared = {"image_rotary_emb": tiny_t2v.rotary_embedding(TEST)}
  zero = tiny_t2v.add_learned_positions(model, scale=0.0)
  assert zero.config.transformer.use_learned_positional_embeddings
  np.testing.assert_array_equal(_outputs(zero, noise, shared)[1],
                                _outputs(model, noise, shared)[1])
  half = tiny_t2v.add_learned_positions(model, scale=0.5)
  table = cogvideox.sincos_positional_embedding(TEST.transformer, 16, 16, 2)
  pos = np.asarray(half.transformer.patch_embed.pos_embedding.get_value())
  np.testing.assert_allclose(pos, 0.5 * table, rtol=1e-6, atol=1e-7)
  assert not np.any(pos[0, :TEST.text.max_length]) and np.any(pos[0, TEST.text.max_length:])
  text = model.encode(PROMPTS)
  got = half.transformer.patch_embed(text, noise)
  want = model.transformer.patch_embed(text, noise) + 0.5 * table
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  path = tiny_t2v.save(half, tmp_path / "ckpt", dtype="float32")
  loaded = tiny_t2v.load(path)
  assert loaded.config == half.config
  np.testing.assert_array_equal(_outputs(loaded, noise, shared)[1],
                                _outputs(half, noise, shared)[1])
  with pytest.raises(ValueError, match="already has use_learned_positional_embeddings"):
    tiny_t2v.add_learned_positions(half)
  with pytest.raises(ValueError, match="scale=-1"):
    tiny_t2v.add_learned_positions(model, scale=-1)


def test_separate_words(model):
  """The pair keeps its mean, its half-difference gets the asked length, nothing else
  changes, and the original model is untouched."""
  vocab = TEST.text.vocabulary
  i, j = vocab.index("left"), vocab.index("right")
  before = np.asarray(model.text_encoder.token_embedding.embedding.get_value(), np.float64)
  out = tiny_t2v.separate_words(model, "left", "right", norm=2.5)
  after = np.asarray(out.text_encoder.token_embedding.embedding.get_value(), np.float64)
  np.testing.assert_array_equal(
      np.asarray(model.text_encoder.token_embedding.embedding.get_value(), np.float64), before)
  np.testing.assert_allclose((after[i] + after[j]) / 2, (before[i] + before[j]) / 2, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(after[i] - after[j]) / 2, 2.5, rtol=1e-5)
  half = after[i] - after[j]
  np.testing.assert_allclose(half / np.linalg.norm(half),
                             (before[i] - before[j]) / np.linalg.norm(before[i] - before[j]),
                             atol=1e-6)
  others = [k for k in range(len(vocab)) if k not in (i, j)]
  np.testing.assert_array_equal(after[others], before[others])
  default = tiny_t2v.separate_words(model, "left", "right")
  e = np.asarray(default.text_encoder.token_embedding.embedding.get_value(), np.float64)
  np.testing.assert_allclose(np.linalg.norm(e[i] - e[j]) / 2,
                             np.linalg.norm(before, axis=1).mean(), rtol=1e-5)
  ids, lengths = out.tokenizer(["a red circle moves left", "a red circle moves right"])
  text = np.asarray(out.text_encoder(ids, lengths))
  assert np.linalg.norm(text[0] - text[1]) > 0
  with pytest.raises(ValueError, match="first='up'"):
    tiny_t2v.separate_words(model, "up", "right")
  with pytest.raises(ValueError, match="second='<pad>'"):
    tiny_t2v.separate_words(model, "left", "<pad>")
  with pytest.raises(ValueError, match="first=second='left'"):
    tiny_t2v.separate_words(model, "left", "left")
  with pytest.raises(ValueError, match="norm=0"):
    tiny_t2v.separate_words(model, "left", "right", norm=0)
