"""Reports of ``harness/e2e.py``'s results: a log line, markdown tables, the
length-sweep PNG and the files ``bench_e2e`` writes."""

from __future__ import annotations

import json
import os
import sys

from adaspa_jax import PHASE_NAMES


def summary_line(m: dict) -> str:
  c = m["composition"]
  return (f"  S={m['seq_len']}: dense {c['dense_total_s']:.2f} s, AdaSpa "
          f"{c['adaspa_total_s']:.2f} s -> speedup {c['speedup']:.3f}x; attention share "
          f"{m['attention_share']:.3f}, density {m['density']:.3f}, ceiling "
          f"{m['ceiling']:.3f}x, speedup / ceiling {m['speedup_over_ceiling']:.3f}")


def _tiling(adaspa: dict) -> str:
  """'Q x K': query rows per list row x keys per list entry of an ``AdaSpaConfig`` dict."""
  bs = adaspa["block_size"]
  qbs = adaspa.get("query_block_size") or bs
  return f"{qbs} x {bs}"


def table(results: dict) -> str:
  """Markdown: per-phase step times, the composition, the ceiling, walls and the sweep."""
  m = results["main"]
  c = m["composition"]
  lay = results["layers"]
  lines = [
      f"# {results['model']} ({results['preset']}), {results['date']}",
      "",
      f"{results['device']} x {results['devices']}, jax {results['jax_version']}, "
      f"{results['dtype']}, random weights, {lay['built']} of {lay['full_depth']} attention "
      f"layers built, latent {tuple(m['latent'])} = S {m['seq_len']} tokens "
      f"({m['text_tokens']} text), {m['batch_rows']} batch row(s); AdaSpa "
      f"{results['implementation']} at {_tiling(results['adaspa'])}, dense "
      f"{results['dense_implementation']}.",
      "",
      f"Command: `{results['command']}`",
      "",
      "| step kind | steps | ms / step | total s |",
      "|---|---|---|---|",
      f"| dense model (baseline) | {sum(c['phase_steps'].values())} | "
      f"{1e3 * m['steps']['dense_baseline']['median_s']:.2f} | {c['dense_total_s']:.3f} |",
  ]
  for name in PHASE_NAMES:
    n = c["phase_steps"][name]
    if n:
      t = m["steps"][name]["median_s"]
      lines.append(f"| AdaSpa {name} | {n} | {1e3 * t:.2f} | {n * t:.3f} |")
  lines += [f"| AdaSpa total | {sum(c['phase_steps'].values())} | | {c['adaspa_total_s']:.3f} |",
            "",
            "| quantity | value |", "|---|---|",
            f"| end-to-end speedup (composed) | {c['speedup']:.3f}x |",
            f"| attention share a of a dense step | {m['attention_share']:.3f} |",
            f"| achieved density d | {m['density']:.4f} |",
            f"| Amdahl ceiling (W = {m['ceiling_dense_steps']}) | {m['ceiling']:.3f}x |",
            f"| speedup / ceiling (target >= 0.95) | {m['speedup_over_ceiling']:.3f} |",
            f"| dense model step again at the end (clock drift) | "
            f"{1e3 * m['dense_baseline_again']['median_s']:.2f} ms |"]
  if "sparse_kernel_vs_ideal" in m:
    lines += [f"| sparse attention / (d x dense attention) | {m['sparse_kernel_vs_ideal']:.3f} |",
              f"| attention share of a sparse step | {m['sparse_attention_share']:.3f} |"]
  est = results.get("full_depth_estimate")
  if est:
    lines.append(f"| full depth ({lay['full_depth']} layers), estimate x{est['scale']:.1f} | "
                 f"dense {est['dense_total_s']:.1f} s, AdaSpa {est['adaspa_total_s']:.1f} s |")
  fr = results.get("full_run")
  if fr and "error" not in fr:
    lines += [f"| full run dense, measured wall | {fr['dense']['wall_s']:.3f} s "
              f"(composed / measured {c['dense_total_s'] / fr['dense']['wall_s']:.3f}) |",
              f"| full run AdaSpa, measured wall | {fr['adaspa']['wall_s']:.3f} s "
              f"(composed / measured {c['adaspa_total_s'] / fr['adaspa']['wall_s']:.3f}) |",
              f"| full run speedup, measured | {fr['speedup']:.3f}x |"]
  elif fr:
    lines.append(f"| full run | failed: {fr['error'][:200]} |")
  if results.get("sweep"):
    lines += ["", f"Length sweep ({results['sweep_layers']} layer(s) built):", "",
              "| seconds | frames | S | attention share | density | speedup | ceiling | "
              "speedup / ceiling |", "|---|---|---|---|---|---|---|---|"]
    for r in results["sweep"]:
      if "error" in r:
        lines.append(f"| {r['seconds']} | {r['frames']} | | failed: {r['error'][:120]} "
                     "| | | | |")
        continue
      lines.append(f"| {r['seconds']} | {r['frames']} | {r['seq_len']} | "
                   f"{r['attention_share']:.3f} | {r['density']:.4f} | "
                   f"{r['composition']['speedup']:.3f}x | {r['ceiling']:.3f}x | "
                   f"{r['speedup_over_ceiling']:.3f} |")
  return "\n".join(lines) + "\n"


def plot_sweep(results: dict, path: str) -> None:
  """PNG: composed speedup and Amdahl ceiling vs seconds of video (cf. paper Fig. 11)."""
  import matplotlib  # the "video" extra, needed only here
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [r for r in results["sweep"] if "error" not in r]
  fig, ax = plt.subplots(figsize=(5.5, 4))
  xs = [r["seconds"] for r in rows]
  ax.plot(xs, [r["composition"]["speedup"] for r in rows], "o-",
          label="AdaSpa (composed from measured steps)")
  ax.plot(xs, [r["ceiling"] for r in rows], "k--", label="Amdahl ceiling")
  for r in rows:
    s = r["seq_len"]
    ax.annotate(f"S={s / 1000:.0f}K" if s >= 10000 else f"S={s}",
                (r["seconds"], r["composition"]["speedup"]), textcoords="offset points",
                xytext=(0, 6), fontsize=7, ha="center")
  ax.set_xlabel("seconds of video")
  ax.set_ylabel(f"speedup over dense, {results['adaspa']['num_steps']} steps")
  ax.set_title(f"{results['model']} {results['preset']}, {results['sweep_layers']} layer(s), "
               f"sparsity {results['adaspa']['sparsity']}\n{results['device']}, jax "
               f"{results['jax_version']}", fontsize=8)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write(results: dict, output_dir: str, tag: str = "") -> dict:
  """Writes JSON, the markdown table and (with a sweep) the PNG; returns their paths."""
  os.makedirs(output_dir, exist_ok=True)
  stem = os.path.join(output_dir, f"e2e_{results['model']}_{results['date'][:10]}{tag}")
  paths = {"json": stem + ".json", "markdown": stem + ".md"}
  with open(paths["json"], "w") as f:
    json.dump(results, f, indent=1, default=str)
  with open(paths["markdown"], "w") as f:
    f.write(table(results))
  if any("error" not in r for r in results.get("sweep", ())):
    paths["png"] = stem + "_sweep.png"
    plot_sweep(results, paths["png"])
  return paths


def command_line(argv=None) -> str:
  return " ".join(["python -m adaspa_jax.experiments.bench_e2e"] + list((argv or sys.argv)[1:]))
