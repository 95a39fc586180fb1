"""tools/ncu_probe.py (its kernels, interpreted on CPU) and ncu_summary.py (on
text in Nsight Compute's formats)."""

import csv
import io
import math

import numpy as np
import pytest

from tools import ncu_probe, ncu_summary
from pallas_kernels.mosaic import interpreter as mosaic_interpret
from tests import numpy_ref


def test_probe_mass_is_the_block_mass_of_its_inputs():
  seq = 256
  with mosaic_interpret.device_context(True):
    chunks = ncu_probe.kernel_call("mass", seq, 1, interpret=mosaic_interpret.params(True))()
  q, k, _ = ncu_probe.host_qkv(seq, 1)
  lse = np.full((1, 1, seq), (math.log2(seq) + 1.0) * math.log(2))
  want = numpy_ref.block_mass(q, k, lse, 64)
  np.testing.assert_allclose(np.asarray(chunks)[:, :, :4, :4], want, rtol=1e-4)


def test_probe_sparse_runs_its_lists():
  with mosaic_interpret.device_context(True):
    out, lse = ncu_probe.kernel_call("sparse128", 256, 1, density=0.5,
                                     interpret=mosaic_interpret.params(True))()
  assert out.shape == (1, 256, 1, 128) and np.isfinite(np.asarray(out, np.float32)).all()
  assert np.isfinite(np.asarray(lse)).all()


def test_probe_refuses_unknown_kernels_and_lengths():
  with pytest.raises(ValueError, match="kernel='dense': expected one of mass"):
    ncu_probe.kernel_call("dense", 256, 1)
  with pytest.raises(ValueError, match="seq=300: expected a multiple of 256"):
    ncu_probe.kernel_call("mass", 300, 1)


DETAILS = """\
==PROF== Connected
  entry_mosaic_gpu_kernel (1, 256, 24)x(384, 1, 1), Context 1, Stream 14, Device 0, CC 9.0
    Section: GPU Speed Of Light Throughput
    ----------------------- ----------- ------------
    Metric Name             Metric Unit Metric Value
    ----------------------- ----------- ------------
    Duration                         ms        10.95
    Elapsed Cycles                cycle   19,694,350
    Waves Per SM                               46.55
    Section: Compute Workload Analysis
    Table Name : Pipe Utilization (% of elapsed cycles)
    Tensor (FP)                    %        62.15
    FMA                            %        17.09
    Table Name : Pipe Utilization (% of peak instructions executed over elapsed cycles)
    XU                            %        62.15
    FMA                           %        17.10
    Section: Warp State Statistics
    Warp Cycles Per Issued Instruction             cycle         9.57
    Table Name : Warp State (All Cycles)
    Stall Long Scoreboard           inst         3.19
    Stall Wait                      inst         2.42
  cudnn_generated_kernel (1, 1, 1)x(384, 1, 1), Context 1, Stream 14, Device 0, CC 9.0
    Duration                         ms        99.00
"""

SASS = [
    ["Kernel Name", "entry_mosaic_gpu_kernel"],
    ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed",
     "stall_wait", "stall_barrier", "stall_wait (Not Issued)"],
    ["0x10", "      FFMA R1, R2, 0.5, -R3", "10", "64", "8", "0", "1"],
    ["0x20", "      MUFU.EX2 R1, R1", "50", "64", "40", "0", "1"],
    ["0x30", "      WARPGROUP.DEPBAR.LE gsb0, 0x0", "30", "64", "0", "30", "0"],
    ["0x40", "@!P1  BRA 0x10", "10", "4", "2", "0", "0"],
    ["Kernel Name", "entry_mosaic_gpu_kernel"],
    ["0x10", "      FFMA R1, R2, 0.5, -R3", "999", "64", "0", "0", "0"],
]


def test_summary_reads_the_first_kernel_of_the_details():
  out = ncu_summary.read_details(io.StringIO(DETAILS))
  assert out["kernel"].startswith("entry_mosaic_gpu_kernel")
  assert out["Duration"] == 10.95 and out["Elapsed Cycles"] == 19694350
  assert out["Warp Cycles Per Issued Instruction"] == 9.57
  assert out["pipes_pct_of_cycles"] == {"Tensor (FP)": 62.15, "FMA": 17.09}
  assert out["pipes_pct_of_peak_instructions"] == {"XU": 62.15, "FMA": 17.10}
  assert out["stall_cycles_per_issued_instruction"] == {"Stall Long Scoreboard": 3.19,
                                                        "Stall Wait": 2.42}
  with pytest.raises(ValueError, match="no kernel in the details text"):
    ncu_summary.read_details(io.StringIO("nothing\n"))


def test_summary_ranks_sass_and_splits_the_hot_loop():
  text = io.StringIO()
  csv.writer(text).writerows(SASS)
  out = ncu_summary.read_sass(csv.reader(io.StringIO(text.getvalue())), top=2)
  assert out["instructions"] == 4 and out["samples"] == 100  # the second kernel is not read
  assert [h["sass"] for h in out["hottest"]] == ["MUFU.EX2 R1, R1",
                                                  "WARPGROUP.DEPBAR.LE gsb0, 0x0"]
  assert out["hottest"][0]["stalls"] == {"wait": 40}
  assert out["loop_executions"] == 64 and out["loop_pct_of_samples"] == 90
  assert out["loop_opcode_pct"] == pytest.approx({"MUFU": 500 / 9, "WARPGROUP": 300 / 9,
                                                  "FFMA": 100 / 9})
  with pytest.raises(ValueError, match="no 'Warp Stall Sampling"):
    ncu_summary.read_sass([["Address", "Source"]])


def test_probe_launcher_parses_its_flags():
  """The launcher itself, as a subprocess (absl parses its flags)."""
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  proc = subprocess.run([sys.executable, "-m", "tools.ncu_probe", "mass", "--seq=300",
                         "--heads=1"], cwd=root, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode != 0
  assert "seq=300: expected a multiple of 256" in proc.stderr


def test_summary_launcher_reads_its_files(tmp_path):
  """ncu_summary as a subprocess: --details and --sass give the JSON the readers give."""
  import json
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  (tmp_path / "details.txt").write_text(DETAILS)
  with open(tmp_path / "sass.csv", "w", newline="") as f:
    csv.writer(f).writerows(SASS)
  proc = subprocess.run([sys.executable, "-m", "tools.ncu_summary",
                         f"--details={tmp_path / 'details.txt'}",
                         f"--sass={tmp_path / 'sass.csv'}"], cwd=root, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  want = ncu_summary.read_details(io.StringIO(DETAILS))
  text = io.StringIO()
  csv.writer(text).writerows(SASS)
  want["sass"] = ncu_summary.read_sass(csv.reader(io.StringIO(text.getvalue())))
  assert json.loads(proc.stdout) == json.loads(json.dumps(want))
  bad = subprocess.run([sys.executable, "-m", "tools.ncu_summary",
                        str(tmp_path / "details.txt")], cwd=root, capture_output=True,
                       text=True, timeout=300)
  assert bad.returncode != 0 and "--details" in bad.stderr
