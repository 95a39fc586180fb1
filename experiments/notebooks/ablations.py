# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # AdaSpa ablations on the embedded model, small enough for a CPU
#
# One held-out prompt, a few denoising steps, float32: the dense clip is sampled once
# and every setting is scored against it (`adaspa_jax.harness.ablations`). Then, per setting,
# the recall of every layer and head at the search steps, and the key blocks a few
# heads keep after the last search. The full grid is `python -m adaspa_jax.experiments.ablate`
# (see `docs/ablations.md`).
#
# Runs as a Jupyter notebook (jupytext percent format) or as a plain script:
# `MPLBACKEND=Agg python experiments/notebooks/ablations.py` from the repository root.
# Set `ABLATIONS_NOTEBOOK_OUT` to keep the figures and the summary.

# %%
import json
import os
import pathlib
import sys
import tempfile

# Jupyter starts in the notebook's folder and a script run puts that folder on the path,
# neither of which is the repository root the packages import from.
ROOT = next(p for p in [pathlib.Path.cwd(), *pathlib.Path.cwd().parents]
            if (p / "adaspa_jax").is_dir())
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from adaspa_jax.harness import ablations, embedded_eval, generation
from adaspa_jax.models.embedded import model as tiny_t2v

# %% [markdown]
# ## Settings
# The paper's {10, 30} of 50 scaled to `NUM_STEPS`; recall measured exactly at every
# search so it means the same for every policy.

# %%
CHECKPOINT = ROOT / "checkpoints" / "tiny_t2v"
N_PROMPTS, NUM_STEPS = 1, 2
OUTPUT_DIR = pathlib.Path(os.environ.get("ABLATIONS_NOTEBOOK_OUT") or tempfile.mkdtemp())
OUTPUT_DIR.mkdir(parents=True, exist_ok=True)

model = tiny_t2v.load(CHECKPOINT, dtype=jnp.float32, attention="adaspa")
base = ablations.base_config(NUM_STEPS)
settings = {
    "AdaSpa": base,
    "AdaSpa w/o head adaptive": base.replace(head_adaptive=False),
    "SVG": base.replace(policy="svg", frame_tokens=ablations.frame_tokens_of(model)),
}
print("search steps (0-indexed):", base.search_steps)

# %% [markdown]
# ## One dense reference, then every setting

# %%
prompts = embedded_eval.held_out_prompts(N_PROMPTS)
ref = ablations.dense_reference(model, prompts, num_steps=NUM_STEPS,
                                guidance_scale=model.config.guidance_scale)
runs = {name: ablations.run_setting(model, config, ref) for name, config in settings.items()}

print(f"{'setting':28s} {'PSNR dB':>8s} {'SSIM':>7s} {'recall':>7s} {'sparsity':>8s}")
for name, (summary, _, _) in runs.items():
  psnr = summary["psnr_db"] if summary["psnr_db"] is not None else float("inf")
  print(f"{name:28s} {psnr:8.2f} {summary['ssim']:7.4f} {summary['mean_recall']:7.3f} "
        f"{summary['sparsity']:8.3f}")

# %% [markdown]
# ## Recall per layer and head
# Mean over the search steps and both guidance branches.

# %%
fig, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs), 3.4), squeeze=False)
for ax, (name, (summary, _, _)) in zip(axes[0], runs.items()):
  recall = np.asarray(summary["recall_layer_head"])            # [L, H]
  ax.imshow(recall, vmin=0, vmax=1, cmap="viridis")
  for (layer, head), r in np.ndenumerate(recall):
    ax.text(head, layer, f"{r:.2f}", ha="center", va="center", fontsize=7,
            color="black" if r > 0.6 else "white")
  ax.set_title(name, fontsize=9)
  ax.set_xlabel("head")
  ax.set_ylabel("layer")
fig.tight_layout()
fig.savefig(OUTPUT_DIR / "recall_layer_head.png", dpi=100)
plt.show()

# %% [markdown]
# ## Key blocks kept after the last search
# The conditional branch of the last prompt; black = kept. Block 0 is the text sink,
# then 4 blocks per frame.

# %%
layers = sorted({0, model.config.transformer.num_layers - 1})
heads = sorted({0, model.config.transformer.num_attention_heads - 1})
mask_names = ("AdaSpa", "SVG")
fig, axes = plt.subplots(len(mask_names), len(layers) * len(heads),
                         figsize=(2.4 * len(layers) * len(heads), 2.6 * len(mask_names)),
                         squeeze=False)
kept = {}
for row, name in enumerate(mask_names):
  state = runs[name][2].adaspa_state                          # fields [L, 2B, H, ...]
  n_blocks = state.counts.shape[-1]
  for col, (layer, head) in enumerate((l, h) for l in layers for h in heads):
    mask = generation.block_mask(state.indices[layer, -1, head], state.counts[layer, -1, head],
                                 n_blocks)
    kept[f"{name} layer {layer} head {head}"] = float(mask.mean())
    ax = axes[row][col]
    ax.imshow(mask, cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(f"{name}: L{layer} H{head}, {mask.mean():.0%}", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
fig.tight_layout()
fig.savefig(OUTPUT_DIR / "block_masks.png", dpi=100)
plt.show()

# %%
with open(OUTPUT_DIR / "summary.json", "w") as f:
  json.dump({"prompts": prompts, "search_steps": list(base.search_steps),
             "settings": {name: summary for name, (summary, _, _) in runs.items()},
             "kept": kept}, f, indent=1)
print("figures and summary in", OUTPUT_DIR)
