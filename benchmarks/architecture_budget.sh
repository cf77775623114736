#!/usr/bin/env bash
# Architecture variants of the tiny preset trained from scratch at equal training FLOPs, one
# run at a time (2 seeds each), for benchmarks/recipe_budget.py to score along each run.
#   PYTHON=.venv/bin/python OUT=runs/arch_budget bash benchmarks/architecture_budget.sh
# VARIANTS: one per line, "name steps checkpoint_every [overrides...]"; steps scale inversely
# with the GFLOP of one training sample (benchmarks/flops_by_part.py, 64 px): preset 16.90,
# no_attention_32px 12.29 (1.375x the samples), wider 57.49 (0.294x), cross_only_32px 15.01
# (the 32x32 blocks' first attention reads the reference too; 1.125x). A finished run is skipped.
set -u -o pipefail
PY=${PYTHON:-python}
OUT=${OUT:-runs/arch_budget}
SEEDS=${SEEDS:-"1 2"}
BATCH=${BATCH:-8}
NO_ATTN="model.denoiser.config.down_block_types=[DownBlock2D,DownBlock2D,CrossAttnDownBlock2D]
 model.denoiser.config.up_block_types=[CrossAttnUpBlock2D,UpBlock2D,UpBlock2D]"
VARIANTS=${VARIANTS:-"preset 400 100
no_attention_32px 552 138 ${NO_ATTN//$'\n'/}
wider 116 29 model.denoiser.config.block_out_channels=[64,128,256]
cross_only_32px 448 112 +model.denoiser.config.only_cross_attention=[false,true,false]"}
mkdir -p "$OUT"
for seed in $SEEDS; do
  while read -r name steps every extra; do
    [ -z "$name" ] && continue
    run="$OUT/${name}_s$seed"
    [ -f "$run/export/model_index.json" ] && { echo "$run: done, skipped"; continue; }
    echo "$(date -u +%H:%M:%S) $run: $steps steps ${extra:+($extra)}"
    # shellcheck disable=SC2086  # the overrides are words
    "$PY" train.py trainer.max_steps="$steps" trainer.val_check_interval="$steps" \
      data.batch_size="$BATCH" callbacks.model_checkpoint.every_n_train_steps="$every" \
      seed="$seed" task_name="${name}_s$seed" hydra.run.dir="$run" $extra \
      > "$run.log" 2>&1 < /dev/null || { echo "$run: train.py failed (see $run.log)"; exit 1; }
    echo "$(date -u +%H:%M:%S) $run: $(grep -E '<- best' "$run.log" | tail -1 | tr -s ' ')"
  done <<< "$VARIANTS"
done
