"""The paper's observations on an embedded model: how stable AdaSpa's selected lists are,
how recall falls with sparsity per head, and what a few heads' masks look like.

For n held-out prompt/seed pairs (``embedded_eval``), one AdaSpa run records the carried
state after every step (``sampler.sample(record_states=True)``), and so the block lists
chosen at each search step. Measured per layer and head, on video query rows (text rows
are dense) and video key blocks (text blocks are always kept):

- ``search_overlap``: Jaccard overlap |A n B| / |A u B| of the blocks a query row keeps
  at one search step (A) and at the next (B), mean over rows, prompts and both guidance
  branches: is the pattern stable over denoising, as the paper's Observation says?
- ``prompt_overlap``: the same between two prompts' lists at the last search (every
  pair of conditional rows): how much is the pattern the prompt's own?
- ``recall_curve``: mean recall of every head at each sparsity of ``sparsities``, head
  tiers off, so each head keeps exactly that share (``measure_recall``: the exact mass
  the lists keep at the search steps).

``run(..., masks_png=...)`` draws the kept blocks of a few heads after the last search;
``recall_figure`` the recall curves.
"""

from __future__ import annotations

import itertools
import time

import jax.numpy as jnp
import numpy as np

from adaspa_jax.harness import ablations, embedded_eval
from adaspa_jax.harness.generation import plot_masks
from adaspa_jax.models import sampler
from adaspa_jax.models.embedded import model as tiny_t2v


def kept_blocks(indices, counts, num_blocks: int) -> np.ndarray:
  """bool [..., nQ, nK]: the key blocks each query row keeps.

  Args:
    indices: int [..., nQ, K_max] block lists; counts: int [..., nQ] entries used
      (a count >= nK marks a dense row, whose list is not spelled out).
  """
  indices, counts = np.asarray(indices), np.asarray(counts)
  k_max = indices.shape[-1]
  used = (np.arange(k_max) < np.minimum(counts, k_max)[..., None]).reshape(-1)
  out = np.zeros((counts.size, num_blocks), bool)
  row = np.repeat(np.arange(counts.size), k_max)
  out[row[used], indices.reshape(-1)[used]] = True
  out = out.reshape(counts.shape + (num_blocks,))
  out[counts >= num_blocks] = True
  return out


def jaccard(a, b, rows) -> np.ndarray:
  """Mean over ``rows`` (bool [nQ]) of |a n b| / |a u b| per leading index: [...]."""
  a, b = np.asarray(a, bool)[..., rows, :], np.asarray(b, bool)[..., rows, :]
  inter, union = (a & b).sum(-1), (a | b).sum(-1)
  return np.where(union > 0, inter / np.maximum(union, 1), 1.0).mean(-1)


def _video_rows_and_cols(model: tiny_t2v.TinyT2V, block_size: int):
  """bool [nQ] video query rows and [nK] video key blocks (a block holding text is text)."""
  text = model.config.text.max_length
  seq = text + model.config.video_tokens
  n = -(-seq // block_size)
  starts = np.arange(n) * block_size
  video = starts >= text                      # the text prefix fills the first blocks
  return video, video


def run(checkpoint, *, n: int = 8, seed: int = 0, sparsity: float = 0.8,
        sparsities=(0.5, 0.7, 0.8, 0.9, 0.95), batch: int = 4, dtype=jnp.bfloat16,
        block_size: int | None = None, masks_png=None, log=print) -> dict:
  """Measures the observations on n held-out pairs; returns a JSON-ready dict.

  Args:
    checkpoint: an embedded-model checkpoint (``adaspa_jax.models.embedded.model``).
    sparsity: AdaSpa's sparsity for the stability measurements (head tiers on, the
      paper's schedule scaled to the checkpoint's steps).
    sparsities: sparsities of the per-head recall curves (head tiers off).
    batch: prompts per sampling call (the state of every step is kept on the host).
    block_size: default: the checkpoint's ``adaspa_block_size``.
    masks_png: if set, a path for a PNG of a few heads' kept blocks after the last search
      (the last prompt's conditional row; ``generation.plot_masks``).
  """
  start = time.perf_counter()
  probe = tiny_t2v.load(checkpoint)
  steps = probe.config.num_steps
  block = block_size or probe.config.adaspa_block_size
  base = ablations.base_config(steps, sparsity=sparsity, block_size=block)
  model = tiny_t2v.load(checkpoint, dtype=dtype, attention="adaspa", adaspa=base)
  cfg = model.config
  rows, cols = _video_rows_and_cols(model, block)
  prompts = embedded_eval.held_out_prompts(n)
  search = list(base.search_steps)
  per_search, last_cond = [], []
  for lo in range(0, n, batch):
    chunk = prompts[lo:lo + batch]
    noise, cond, uncond, shared = tiny_t2v.sampler_inputs(
        model, chunk, seed=[seed + i for i in range(lo, lo + len(chunk))])
    state = model.transformer.init_adaspa_state(2 * len(chunk), cfg.frames, cfg.height,
                                                cfg.width, cfg.text.max_length)
    res = sampler.sample(model.transformer, cfg.scheduler(), noise, cond, uncond,
                         num_steps=steps, guidance_scale=cfg.guidance_scale, shared=shared,
                         adaspa_state=state, record_states=True)
    idx, cnt = np.asarray(res.states.indices), np.asarray(res.states.counts)  # [N, L, 2B, H, ..]
    n_blk = -(-res.adaspa_state.lse.shape[-1] // block)    # key blocks
    kept = [kept_blocks(idx[t], cnt[t], n_blk)[..., cols] for t in search]    # [L, 2B, H, nQ, nKv]
    per_search.append(kept)
    last_cond.append(kept[-1][:, len(chunk):])                                # conditional rows
    last_state = res.adaspa_state
  kept = [np.concatenate([c[i] for c in per_search], axis=1) for i in range(len(search))]
  search_overlap = [jaccard(kept[i], kept[i + 1], rows).mean(1)               # [L, H]
                    for i in range(len(search) - 1)]
  cond_rows = np.concatenate(last_cond, axis=1)                               # [L, n, H, nQ, nKv]
  pairs = list(itertools.combinations(range(cond_rows.shape[1]), 2))
  prompt_overlap = np.mean([jaccard(cond_rows[:, i], cond_rows[:, j], rows)
                            for i, j in pairs], axis=0) if pairs else None
  if masks_png is not None:
    plot_masks(last_state, masks_png, block_size=block)
  # Chance level: random lists of the same sizes overlap by about k / (2 nKv - k).
  density = float(np.mean([k[..., rows, :].mean() for k in kept]))
  log(f"search overlap {np.mean(search_overlap):.3f}, prompt overlap "
      f"{np.mean(prompt_overlap) if pairs else float('nan'):.3f}, kept density {density:.3f}")

  settings = [ablations.Setting("recall", f"s={s}",
                                base.replace(sparsity=s, head_adaptive=False), {"sparsity": s})
              for s in sparsities]
  results = ablations.run(checkpoint, settings, n=n, seed=seed, batch=batch, dtype=dtype,
                          log=log)
  curve = {r["params"]["sparsity"]: r["summary"]["recall_layer_head"]
           for r in results["settings"]}
  return {
      "checkpoint": str(checkpoint), "n": n, "seed": seed, "sparsity": sparsity,
      "block_size": block, "search_steps": search, "prompts": prompts,
      "kept_density": density,
      "chance_overlap": density / (2 - density),
      "search_overlap": [o.tolist() for o in search_overlap],
      "search_overlap_mean": [float(o.mean()) for o in search_overlap],
      "prompt_overlap": None if prompt_overlap is None else prompt_overlap.tolist(),
      "prompt_overlap_mean": None if prompt_overlap is None else float(prompt_overlap.mean()),
      "recall_curve": {str(s): c for s, c in curve.items()},
      "dense_wall_s": results["dense"]["summary"]["wall_s"],
      "total_s": time.perf_counter() - start,
  }


def recall_figure(obs: dict, path) -> str:
  """PNG: recall of every (layer, head) against sparsity, one line each."""
  import matplotlib  # the "video" extra, needed only here
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  s = sorted(obs["recall_curve"], key=float)
  curves = np.asarray([obs["recall_curve"][k] for k in s])          # [S, L, H]
  fig, ax = plt.subplots(figsize=(5, 3.6))
  n_layers, n_heads = curves.shape[1:]
  colours = plt.cm.viridis(np.linspace(0, 1, n_layers))
  for layer, head in itertools.product(range(n_layers), range(n_heads)):
    ax.plot([float(x) for x in s], curves[:, layer, head], "-", color=colours[layer],
            alpha=0.7, label=f"layer {layer}" if head == 0 else None)
  ax.set_xlabel("sparsity (every head)")
  ax.set_ylabel("recall (mass kept)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return str(path)
