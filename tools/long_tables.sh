#!/bin/bash
# Table 1 (issue 21) on the long and the tiny embedded model, then the paper's
# observations on the long model, on the GPU machine. Usage, from the repository root:
#   tools/long_tables.sh [N] [LONG_CHECKPOINT]
# N held-out pairs (default 64); the long checkpoint defaults to checkpoints/long_t2v (on a
# warm machine, /tmp/ckpt is the last training chunk's output).
# Outputs under $OUT/table1_long, $OUT/table1_tiny, $OUT/observe_long.
set -uo pipefail
n=${1:-64}
long=${2:-checkpoints/long_t2v}
source "$(dirname "$0")/device_env.sh"
case $long in /*) ;; *) long=$REPO/$long ;; esac
echo "long checkpoint: $long"
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
timeout 330 python3 -m adaspa_jax.experiments.ablate --checkpoint="$long" \
  --groups=table1 --n="$n" --num_steps=25 --batch=16 --output_dir="$OUT/table1_long"
timeout 120 python3 -m adaspa_jax.experiments.ablate --checkpoint="$REPO/checkpoints/tiny_t2v" \
  --groups=table1 --n="$n" --num_steps=25 --batch=32 --block_size=32 \
  --output_dir="$OUT/table1_tiny"
timeout 120 python3 -m adaspa_jax.experiments.observe --checkpoint="$long" \
  --n=8 --batch=8 --output_dir="$OUT/observe_long"
