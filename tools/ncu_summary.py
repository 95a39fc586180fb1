"""Condenses Nsight Compute text output of one kernel into a small JSON (see ncu_probe.py).

  python -m tools.ncu_summary --details=DETAILS.txt [--sass=SASS.csv] > summary.json

DETAILS.txt is ``ncu -i R --page details --print-details all``; only its first kernel is
read. From it: the speed-of-light, scheduler and warp-state metrics, both pipe-utilization
tables and the stall reasons (cycles per issued instruction). SASS.csv is
``ncu -i R --page source --csv --print-source sass`` (first kernel only): the instructions
with the most warp-stall samples, and each opcode's share of the samples of the hottest
loop (the instructions executed as often as the one with the most samples).
"""

from __future__ import annotations

import collections
import csv
import json
import re
import sys

from absl import app, flags

METRICS = ("Duration", "SM Frequency", "Elapsed Cycles", "Compute (SM) Throughput",
           "Memory Throughput", "L1/TEX Cache Throughput", "L2 Cache Throughput",
           "Issue Slots Busy", "Issued Warp Per Scheduler", "Active Warps Per Scheduler",
           "Eligible Warps Per Scheduler", "Warp Cycles Per Issued Instruction")
TABLES = {"Pipe Utilization (% of elapsed cycles)": "pipes_pct_of_cycles",
          "Pipe Utilization (% of peak instructions executed over elapsed cycles)":
              "pipes_pct_of_peak_instructions",
          "Warp State (All Cycles)": "stall_cycles_per_issued_instruction"}
_ROW = re.compile(r"^ {4}(\S.*?) {2,}(?:(\S+) +)?([-\d,.]+)$")
_SAMPLES = "Warp Stall Sampling (All Samples)"

_DETAILS = flags.DEFINE_string("details", None, "ncu's --page details text of the kernel",
                               required=True)
_SASS = flags.DEFINE_string("sass", None, "ncu's --page source --csv SASS listing (optional)")


def read_details(lines):
  """{"kernel", METRICS..., and one dict per TABLES entry} of the first kernel."""
  out = {"kernel": None, **{name: {} for name in TABLES.values()}}
  table = None
  for line in lines:
    line = line.rstrip("\n")
    if re.match(r"^ {2}\S", line):  # a kernel's header line
      if out["kernel"] is not None:
        break
      out["kernel"] = line.strip()
      continue
    if "Table Name :" in line:
      table = TABLES.get(line.split("Table Name :", 1)[1].strip())
      continue
    if line.strip().startswith("Section:"):
      table = None
    m = _ROW.match(line)
    if not m:
      continue
    name, value = m.group(1).strip(), float(m.group(3).replace(",", ""))
    if table is not None:
      out[table][name] = value
    elif name in METRICS and name not in out:
      out[name] = value
  if out["kernel"] is None:
    raise ValueError("no kernel in the details text: expected ncu's --page details output.")
  return out


def read_sass(rows, top=20):
  """The ``top`` instructions by stall samples and the hottest loop's opcode shares."""
  header, body = None, []
  for row in rows:
    if row and row[0] == "Address":
      header = {name: i for i, name in enumerate(row)}
    elif row and row[0] == "Kernel Name" and body:
      break
    elif header and row and row[0].startswith("0x"):
      body.append(row)
  if header is None or _SAMPLES not in header:
    raise ValueError(f"no {_SAMPLES!r} column: expected ncu's --page source --csv output.")
  samples = lambda r: int(r[header[_SAMPLES]] or 0)
  executed = lambda r: int(r[header["Instructions Executed"]] or 0)
  total = sum(samples(r) for r in body) or 1
  reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
  hot = []
  for i, r in sorted(enumerate(body), key=lambda ir: -samples(ir[1]))[:top]:
    why = sorted(((int(r[header[h]] or 0), h[len("stall_"):]) for h in reasons), reverse=True)
    hot.append({"index": i, "sass": r[header["Source"]].strip(), "executed": executed(r),
                "pct_samples": 100 * samples(r) / total,
                "stalls": {name: n for n, name in why[:3] if n}})
  loop_count = executed(max(body, key=samples)) if body else 0
  ops = collections.Counter()
  for r in body:
    if executed(r) == loop_count:
      words = r[header["Source"]].split()
      ops[(words[1] if words[0].startswith("@") else words[0]).split(".")[0]] += samples(r)
  loop_total = sum(ops.values()) or 1
  return {"instructions": len(body), "samples": total, "hottest": hot,
          "loop_executions": loop_count, "loop_pct_of_samples": 100 * loop_total / total,
          "loop_opcode_pct": {op: 100 * n / loop_total for op, n in ops.most_common()}}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}: the files are --details and --sass.")
  with open(_DETAILS.value) as f:
    out = read_details(f)
  if _SASS.value:
    with open(_SASS.value, newline="") as f:
      out["sass"] = read_sass(csv.reader(f))
  json.dump(out, sys.stdout, indent=1)
  print()


if __name__ == "__main__":
  app.run(main)
