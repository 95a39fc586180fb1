"""The attention demo launcher as a subprocess (the library: tests/harness/test_synthetic.py)."""


def test_demo_cli_runs(tmp_path):
  """The launcher itself, as a subprocess (launchers define absl flags at import)."""
  import json
  import subprocess
  import sys
  out = tmp_path / "demo.json"
  subprocess.run([sys.executable, "-m", "adaspa_jax.experiments.attention_demo", "--frames=2",
                  "--height=4", "--width=8", "--text_len=3", "--heads=2", "--head_dim=32",
                  "--block_size=16", "--steps=4", "--search_steps=1,3", f"--json_out={out}"],
                 check=True)
  record = json.loads(out.read_text())
  assert len(record["phase"]) == 4 and record["seconds"] > 0
