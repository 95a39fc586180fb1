#!/bin/bash
# One training chunk of the long embedded model on the GPU machine (docs/long_t2v.md).
# Usage, from the repository root: tools/long_train_chunk.sh INIT_DIR SEED BUDGET_S
# Trains from INIT_DIR's weights for at most BUDGET_S seconds into /tmp/ckpt, scores 16
# held-out pairs, and writes the checkpoint (split into 15 MiB parts), the log and the
# quick evaluation under $OUT.
set -euo pipefail
init=$1 seed=$2 budget=$3
source "$(dirname "$0")/device_env.sh"
case $init in /*) ;; *) init=$REPO/$init ;; esac
rm -rf /tmp/ckpt
python3 -m adaspa_jax.experiments.train_tiny --preset=long --init_from="$init" --seed="$seed" \
  --batch_size=16 --warmup_steps=50 --learning_rate=2e-4 --ema_decay=0.998 --reversal_pairs \
  --mirror_pairs --high_sigma_share=0.5 --high_sigma_min=0.9 --sigma_logit_mean=0.5 \
  --text_lr_scale=10 --log_every=50 --output_dir=/tmp/ckpt --time_budget_s="$budget"
python3 - <<'PY'
import json, os
import jax.numpy as jnp
from adaspa_jax.harness import embedded_eval
r = embedded_eval.evaluate('/tmp/ckpt', n=16, batch=8, dtype=jnp.bfloat16)
json.dump(r, open(os.path.join(os.environ['OUT'], 'eval16.json'), 'w'), default=str)
print({k: r[k] for k in ('dense_strict_pass_rate', 'dense_extra_object_rate', 'dense_pass_rate',
                         'adaspa_strict_pass_rate', 'adaspa_extra_object_rate', 'psnr_db', 'ssim',
                         'mean_recall')})
PY
(cd /tmp && tar cf - ckpt | split -b 15m - "$OUT/ckpt.tar.part-")
