"""The ablations' tables and figures: ``tables.md`` shaped like the paper's Tables 1
and 2, PNG figures per group, and ``results.json`` (``adaspa_jax.harness.ablations.run``'s
results)."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from adaspa_jax.harness.ablations import GROUPS, POLICY_NAMES


def _fmt(x, spec, none="-"):
  return none if x is None else format(x, spec)


_COLUMNS = (("strict pass", lambda s: _fmt(s.get("strict_pass_rate"), ".0%")),
            ("extra objects", lambda s: _fmt(s.get("extra_object_rate"), ".0%")),
            ("caption pass", lambda s: _fmt(s["pass_rate"], ".0%")),
            ("mean score", lambda s: _fmt(s["mean_score"], ".3f")),
            ("PSNR dB", lambda s: _fmt(s["psnr_db"], ".2f")),
            ("SSIM", lambda s: _fmt(s["ssim"], ".4f")),
            ("recall", lambda s: _fmt(s["mean_recall"], ".3f")),
            ("sparsity", lambda s: _fmt(s["sparsity"], ".3f")),
            ("wall s", lambda s: _fmt(s["wall_s"], ".2f")),
            ("s / clip", lambda s: _fmt(s.get("seconds_per_clip"), ".3f")),
            ("speedup", lambda s: _fmt(s["speedup"], ".2f")))


def _table(rows, first="setting") -> list[str]:
  head = [first] + [c for c, _ in _COLUMNS]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in rows:
    lines.append("| " + " | ".join([row["name"]] + [f(row["summary"]) for _, f in _COLUMNS])
                 + " |")
  return lines


_TITLES = {
    "table1": "Table 1: AdaSpa at 0.7 / 0.8 / 0.9, its components, and the peers at 0.8",
    "policies": "Table 1 (like the paper's): policies at sparsity 0.7 / 0.8 / 0.9",
    "components": "Table 1's component rows: head-adaptive and LSE cache at sparsity 0.8",
    "warmup": "Warm-up: w dense steps, searches at step w + 1 and 30 (1-indexed of 50)",
    "schedule": "Table 2 (like the paper's): search schedule at sparsity 0.8",
    "precision": "Precision: AdaSpa at 0.8 in bf16 and FP8, and dense FP8",
    "granularity": "Granularity: query rows x keys per list entry at sparsity 0.8 / 0.9",
}


def tables_markdown(results: dict) -> str:
  """Markdown: a header with the run's facts and one table per group present."""
  lines = [f"# Ablations on `{results['checkpoint']}`", "",
           f"{results['n']} held-out prompt/seed pairs (seeds {results['seed']}.."
           f"{results['seed'] + results['n'] - 1}), {results['num_steps']} steps, guidance "
           f"{results['guidance_scale']}, {results['dtype']}, {results['device']}. "
           "PSNR / SSIM of the pixels against the dense clip of the same pair; recall: "
           "mass kept at the search steps; sparsity: video-block sparsity of the steps "
           "that ran sparse attention; wall s: sampling all pairs without compilation; "
           "speedup: dense wall s / wall s.", ""]
  if results.get("command"):
    lines += [f"Command: `{results['command']}` ({results['total_s']:.0f} s in all).", ""]
  for group in GROUPS:
    rows = [r for r in results["settings"] if r["group"] == group]
    if not rows:
      continue
    if group not in ("policies", "table1"):
      rows = [{"name": "dense", "summary": results["dense"]["summary"]}] + rows
    lines += [f"## {_TITLES[group]}", ""] + _table(rows) + [""]
  return "\n".join(lines)


def _plot_rows(results, group):
  return [r for r in results["settings"] if r["group"] == group and r["config"] is not None]


_METRICS = (("psnr_db", "PSNR vs dense (dB)"), ("ssim", "SSIM vs dense"),
            ("mean_recall", "mean recall"), ("pass_rate", "caption pass rate"))


def plot_figures(results: dict, output_dir) -> list[str]:
  """PNG figures of the groups present: metrics vs achieved sparsity per policy, vs
  warm-up, per schedule; returns the file names."""
  import matplotlib  # the "video" extra, needed only here
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  written = []

  def figure(name, draw):
    fig, axes = plt.subplots(1, len(_METRICS), figsize=(4 * len(_METRICS), 3.6))
    for ax, (key, label) in zip(axes, _METRICS):
      draw(ax, key)
      ax.set_title(label, fontsize=9)
      ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, name), dpi=100)
    plt.close(fig)
    written.append(name)

  value = lambda r, key: np.nan if r["summary"][key] is None else r["summary"][key]
  rows = _plot_rows(results, "policies")
  if rows:
    def draw(ax, key):
      for policy in dict.fromkeys(r["params"]["policy"] for r in rows):
        mine = [r for r in rows if r["params"]["policy"] == policy]
        mine.sort(key=lambda r: value(r, "sparsity"))
        ax.plot([value(r, "sparsity") for r in mine], [value(r, key) for r in mine], "o-",
                label=POLICY_NAMES.get(policy, policy))
      ax.set_xlabel("achieved sparsity", fontsize=8)
      ax.legend(fontsize=7)
    figure("policies.png", draw)
  rows = _plot_rows(results, "warmup")
  if rows:
    def draw(ax, key):
      ax.plot([r["params"]["warmup"] for r in rows], [value(r, key) for r in rows], "o-")
      ax.set_xlabel("dense warm-up steps (of 50)", fontsize=8)
    figure("warmup.png", draw)
  for group in ("table1", "schedule", "components"):
    rows = _plot_rows(results, group)
    if rows:
      def draw(ax, key, rows=rows):
        # Points, not bars: the y axis then zooms on the (small) differences.
        ax.plot(range(len(rows)), [value(r, key) for r in rows], "o")
        ax.set_xticks(range(len(rows)), [r["name"].replace("AdaSpa w/o", "w/o")
                                         .replace(", ", "\n") for r in rows],
                      fontsize=7, rotation=30, ha="right")
        ax.set_xlim(-0.5, len(rows) - 0.5)
      figure(f"{group}.png", draw)
  return written


def write_outputs(results: dict, output_dir) -> dict[str, Any]:
  """Writes results.json, tables.md and the figures; returns their names."""
  os.makedirs(output_dir, exist_ok=True)
  with open(os.path.join(output_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=1, allow_nan=False)
  with open(os.path.join(output_dir, "tables.md"), "w") as f:
    f.write(tables_markdown(results))
  return {"json": "results.json", "tables": "tables.md",
          "figures": plot_figures(results, output_dir)}
