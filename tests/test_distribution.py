"""The built wheel in a fresh virtual environment without extras, used from another folder.

Installing the distribution must add no top-level ``models``, ``experiments`` or
``harness`` package; the base install (jax, jaxlib, flax, numpy) must run the method and
the kernels (Triton lowering in interpret mode) and load the shipped embedded checkpoint;
an optional part must fail with an error that names its extra.
"""

import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import importlib.util, os, sys
    import jax, jax.numpy as jnp, numpy as np
    for name in ("models", "experiments", "harness", "tools", "checkpoints"):
      assert importlib.util.find_spec(name) is None, name
    import adaspa_jax, pallas_kernels
    assert "site-packages" in adaspa_jax.__file__, adaspa_jax.__file__
    from adaspa_jax import AdaSpaConfig, adaspa_attention, init_state, text_blocks_mask
    cfg = AdaSpaConfig(sparsity=0.5, block_size=16, num_steps=4, search_steps=(1, 2))
    q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 48, 2, 16))
    text = text_blocks_mask(48, 16, 40, 8)
    state = init_state(cfg, 1, 48, 2, text_blocks=text)
    outs = []
    for impl in ("triton", "reference"):
      st = state
      for t in range(4):
        o, st = adaspa_attention(q, k, v, st, t, cfg, text_blocks=text, implementation=impl,
                                 interpret=impl == "triton")
      outs.append(o)
    np.testing.assert_allclose(outs[0], outs[1], rtol=2e-3, atol=2e-3)
    from adaspa_jax import checkpoints
    from adaspa_jax.models.embedded import model as tiny_t2v
    m = tiny_t2v.load(checkpoints.locate("tiny_t2v"))
    cfg = m.config
    x = jnp.zeros((1, cfg.frames, 3, cfg.height, cfg.width))
    out = m.transformer(x, m.encode(["a red circle rises"]), jnp.array([500.0]),
                        image_rotary_emb=tiny_t2v.rotary_embedding(cfg))
    assert out.shape == x.shape and np.isfinite(np.asarray(out)).all()
    from adaspa_jax.harness import demo
    try:
      demo.write_gif("x.gif", np.zeros((1, 16, 16, 3)))
      raise AssertionError("imageio should be missing")
    except ImportError as e:
      assert "adaspa-jax[video]" in str(e), e
    try:
      tiny_t2v.save(m, "ckpt")
      raise AssertionError("safetensors should be missing")
    except ImportError as e:
      assert "adaspa-jax[train]" in str(e), e
    print("OK")
""")


def _run(cmd, **kw):
  proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
  assert proc.returncode == 0, (cmd, proc.stdout[-2000:], proc.stderr[-4000:])
  return proc


@pytest.mark.skipif(os.environ.get("ADASPA_SKIP_WHEEL_TEST") == "1",
                    reason="ADASPA_SKIP_WHEEL_TEST=1")
def test_wheel_installs_without_extras_and_runs_from_another_folder(tmp_path):
  # Build from a copy of the sources: a build/ folder left in the checkout could carry
  # modules that no longer exist into the wheel.
  src = tmp_path / "src"
  shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
      ".git", ".venv", "build", "dist", "*.egg-info", "outputs", "__pycache__",
      ".pytest_cache", ".hypothesis", ".whl", ".gl"))
  dist = tmp_path / "dist"
  _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
        "-w", str(dist), str(src)], timeout=600)
  wheels = list(dist.glob("adaspa_jax-*.whl"))
  assert len(wheels) == 1
  assert wheels[0].stat().st_size < 48 * 2**20
  venv = tmp_path / "venv"
  _run([sys.executable, "-m", "venv", str(venv)], timeout=300)
  py = str(venv / "bin" / "python")
  # The dependencies come from the registry (or pip's cache); the wheel brings the rest.
  _run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheels[0])],
       timeout=900)
  # Our own requirements are the four the method and kernels need (jax brings scipy and
  # flax brings optax and absl-py themselves); the extras' packages stay out.
  with zipfile.ZipFile(wheels[0]) as z:
    meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA")))
  base = {re.split(r"[<>=!~ ;\[]", line.split(":", 1)[1].strip())[0].lower()
          for line in meta.decode().splitlines()
          if line.startswith("Requires-Dist:") and "extra ==" not in line}
  assert base == {"jax", "jaxlib", "flax", "numpy"}, base
  listing = _run([py, "-m", "pip", "list", "--format=freeze"]).stdout.lower()
  for extra_only in ("imageio", "matplotlib", "safetensors", "scikit-image", "tqdm", "pillow"):
    assert f"\n{extra_only}==" not in "\n" + listing, extra_only
  work = tmp_path / "elsewhere"
  work.mkdir()
  proc = _run([py, "-c", SCRIPT], cwd=work, timeout=900,
              env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
  assert proc.stdout.strip().endswith("OK")
