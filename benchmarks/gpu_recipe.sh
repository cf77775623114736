#!/usr/bin/env bash
# The refinement-recipe GPU run (about 8 minutes on one H100 or H200): train the recipe
# variants side by side on one GPU (they share the 16 CPU cores' data workers), then evaluate
# every new export and every export named in COMPARE (e.g. the previously shipped model) on
# one benchmark (eval.py: calibration and report halves), and compare samplers and guidance
# on held-out refinement pairs.
#   BENCH=results/<bench> OUT=DIR bash benchmarks/gpu_recipe.sh   (CUDA machine; wheels of
#   packages the machine lacks in .whl/)
#   CPU check: SMOKE=1 PYTHON=.venv/bin/python OUT=/tmp/o bash benchmarks/gpu_recipe.sh
# EVAL=0 stops after training (evaluate the exports here, on the CPU machine, instead).
# Files back in $OUT: <variant>.tar.partNN (cat them, then untar: the pipeline folder), runs.tar.gz
# (train logs, metrics, sample grids, eval reports and figures, sampler comparisons).
set -u -o pipefail
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
if [ "${SMOKE:-0}" != 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
TRAIN_TIME=${TRAIN_TIME:-00:00:04:30}
WORKERS=${WORKERS:-14}
COMPARE=${COMPARE:-}  # name:export_dir pairs, evaluated beside the new exports
RUNS=$(mktemp -d)
START=$(date +%s)
stamp() { echo "[$(( $(date +%s) - START ))s] $*"; }

# name:overrides (comma-separated); every variant is experiment=tiny_gpu plus these. The
# default retrains the shipped recipe (v-prediction since 2026-11-27) under another seed;
# e.g. VARIANTS="eps:model.noise_scheduler.prediction_type=epsilon wide:..." for a comparison.
# Commas inside [...] belong to a list value: wide:model.denoiser.config.block_out_channels=[64,128,256]
VARIANTS=${VARIANTS:-"seed1:seed=1"}
if [ "${SMOKE:-0}" = 1 ]; then
  TRAIN_ARGS=(trainer=cpu trainer.max_steps=3 data.batch_size=4 data.val_length=8
              trainer.val_check_interval=3 model.val_sample_steps=2)
  EVAL_ARGS=(bench_cases=6 sweep.num_timesteps=3 refinement.num_steps=3 device=cpu)
  SAMPLER_ARGS=(--cases 2 --device cpu)
  WORKERS=1
else
  TRAIN_ARGS=()
  EVAL_ARGS=()
  SAMPLER_ARGS=(--cases 64)
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
split_overrides() {  # one override per line: commas split, except inside [...]
  local text=$1 depth=0 part="" char i
  for (( i = 0; i < ${#text}; i++ )); do
    char=${text:i:1}
    case $char in
      "[") depth=$((depth + 1)) ;;
      "]") depth=$((depth - 1)) ;;
      ",") if [ "$depth" = 0 ]; then printf '%s\n' "$part"; part=""; continue; fi ;;
    esac
    part+=$char
  done
  [ -n "$part" ] && printf '%s\n' "$part"
}
stamp "training: $VARIANTS"
for variant in $VARIANTS; do
  name=${variant%%:*}; mapfile -t extra < <(split_overrides "${variant#*:}")
  "$PY" train.py experiment=tiny_gpu task_name="$name" trainer.max_time="$TRAIN_TIME" \
    data.num_workers="$WORKERS" paths.log_dir="$RUNS" "${extra[@]}" "${TRAIN_ARGS[@]}" 2>&1 \
    | tr '\r' '\n' | grep -v "it/s\]$" > "$RUNS/$name.train.log" &
done
wait
for variant in $VARIANTS; do
  name=${variant%%:*}; run=$(ls -d "$RUNS/$name"/*/ | head -1)
  stamp "$name trained: $(grep -E 'best block|steps' "$RUNS/$name.train.log" | tail -3 | tr '\n' ' ')"
  # output files stay under 16 MiB each: the pipeline folder is split into parts (cat, untar)
  tar cf - -C "$run" export | split -b 15M -d - "$OUT/$name.tar.part"
done

if [ "${EVAL:-1}" = 0 ]; then  # training only: evaluate the exports on the CPU machine
  find "$RUNS" -name "*.ckpt" -delete
  find "$RUNS" -path "*/export/*" -name "*.safetensors" -delete
  tar czf "$OUT/runs.tar.gz" -C "$RUNS" .
  stamp "done (EVAL=0)"; ls -la "$OUT"
  exit 0
fi

# the benchmark: a committed folder generated on the CPU machine (pinned libraries), or a new one
[ -n "${BENCH:-}" ] && EVAL_ARGS+=(bench_dir="$PWD/$BENCH")
stamp "evaluating on ${BENCH:-a generated benchmark}"
EXPORTS=()
for variant in $VARIANTS; do
  name=${variant%%:*}; EXPORTS+=("$name:$(ls -d "$RUNS/$name"/*/ | head -1)export")
done
for pair in "${EXPORTS[@]}" $COMPARE; do
  name=${pair%%:*}; export_dir=${pair#*:}
  ( "$PY" eval.py ckpt_path="$export_dir" paths.log_dir="$RUNS/eval_$name" progress=false \
      "${EVAL_ARGS[@]}" > "$RUNS/$name.eval.log" 2>&1
    "$PY" scripts/compare_samplers.py --ckpt "$export_dir" "${SAMPLER_ARGS[@]}" \
      --out "$RUNS/$name.samplers.json" > "$RUNS/$name.samplers.log" 2>&1 ) &
done
wait
for pair in "${EXPORTS[@]}" $COMPARE; do
  name=${pair%%:*}
  stamp "$name eval: $(tail -1 "$RUNS/$name.eval.log")"
  cat "$RUNS/$name.samplers.log" | tail -9
  report=$(ls "$RUNS/eval_$name"/eval/*/report.md 2>/dev/null | head -1)
  [ -n "$report" ] && sed -n '/## Refinement/,/^$/p;/## Refinement/,+14p' "$report" | head -20
done
find "$RUNS" -name "*.ckpt" -delete
find "$RUNS" -path "*/export/*" -name "*.safetensors" -delete
find "$RUNS" -path "*/benchmark/*" -delete 2>/dev/null
tar czf "$OUT/runs.tar.gz" -C "$RUNS" .
stamp "done"; ls -la "$OUT"
