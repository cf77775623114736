#!/usr/bin/env bash
# The GPU speed rows of benchmarks/README.md, inside BUDGET_S (240 s), on any CUDA machine:
#   OUT=DIR bash benchmarks/gpu_speed.sh
#   (where diffusers, hydra-core, webdataset... are missing: put their wheels in .whl/, then
#    pip install --no-index --no-deps --target /tmp/site .whl/*.whl; PYTHONPATH=/tmp/site)
#   CPU check: SMOKE=1 PYTHON=.venv/bin/python OUT=/tmp/o bash benchmarks/gpu_speed.sh
# Order = priority; each part starts only if its minimum fits in the time left, runs under a
# timeout of the time left, and writes its JSON as it goes (a part cut short keeps what it
# measured). Skipped parts are logged with the reason and listed in summary.json.
#  1. infer.json: alignment forward, capture of block l* vs plain (interleaved; <= 1.05x),
#     the T x L sweep, 50-step guided refinement at 512 px (<= 1.0 s): fp32 weights under
#     autocast and all-bf16 weights.
#  2. train.json: the eager raw diffusers UNet anchor, then the module's real latent-shard
#     step (model=sd15_dinov2_random, DINOv2-L, EMA, bf16 autocast, fused AdamW, batches
#     from the data=latent_shards DataLoader with 8 workers and pinned memory), eager with its
#     per-part breakdown, then the same step with the UNet compiled in place; ratios to the
#     anchor (targets: >= 127 samples/s, >= 1.44x).
#  3. infer_compiled.json: refinement with bf16 weights and the UNet compiled (CUDA graphs).
#  4-5. fit_ddp.json, fit_fsdp.json: train.py end to end, trainer=ddp / trainer=fsdp with
#     trainer.devices=1 (NCCL, bf16-mixed), tiny model on synthetic pairs, 40 steps:
#     ThroughputMonitor samples/s and DeviceStatsMonitor peak allocated memory.
# Measured part times (H100/H200, 2026-11-27): infer ~65 s, train eager ~70 s plus the
# compile, each fit ~55 s, start-up ~16 s. BUDGET_S=420 is meant for all five with regional
# compilation (not yet measured); COMPILE_SCOPE=full needs several minutes more.
# COMPILE_SCOPE=regional (the default) compiles only the UNet's repeated transformer blocks
# (diffusers' compile_repeated_blocks); full compiles the whole UNet, which on the H100 of
# 2026-11-27 had not finished compiling the training step after about 3 minutes.
# COMPILE=0 leaves out both compiled measurements (for a short budget: infer, eager, ddp, fsdp).
# PARTS (comma-separated, default all) runs a subset, e.g. PARTS=infer_compiled,fit_ddp,fit_fsdp
# to finish in a second call what a first left out (put both calls' JSONs in one folder and
# run `speed_summary.py all` on it for one summary).
# Files in $OUT (<= 8): gpu_speed.log, infer.json, train.json, infer_compiled.json,
# fit_ddp.json, fit_fsdp.json, summary.json.
set -u -o pipefail
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
BUDGET_S=${BUDGET_S:-240}
COMPILE_SCOPE=${COMPILE_SCOPE:-regional}
PARTS=${PARTS:-infer,train,infer_compiled,fit_ddp,fit_fsdp}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
exec > >(tee "$OUT/gpu_speed.log") 2>&1
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET_S - $(elapsed) )); }
SKIPPED=()
WORK=$(mktemp -d)

if [ "${SMOKE:-0}" = 1 ]; then
  SMOKE_ARG=(--smoke) BATCH=2 WORKERS=2
  FIT=(trainer.accelerator=cpu data.batch_size=2 data.num_workers=1 trainer.max_steps=3
       data.image_size=32 data.reference_size=56 callbacks.throughput.window_size=2
       trainer.log_every_n_steps=1 data.val_length=4)
else
  SMOKE_ARG=() BATCH=32 WORKERS=8
  FIT=(data.batch_size=128 data.num_workers=14 data.pin_memory=true trainer.max_steps=40
       trainer.log_every_n_steps=5 data.val_length=16)
fi

# part NAME MIN_S CMD...: run CMD under a timeout of the time left if at least MIN_S is left;
# RAN says whether it started (a part not started writes no file: $OUT holds 8 files at most)
part() {
  local name=$1 need=$2; shift 2
  RAN=0
  if [[ ",$PARTS," != *",$name,"* ]]; then
    echo "=== $name not in PARTS ($PARTS)"
    return 1
  fi
  local have; have=$(left)
  if [ "$have" -lt "$need" ]; then
    echo "=== [$(elapsed)s] $name SKIPPED: ${have}s left of ${BUDGET_S}s, needs ${need}s"
    SKIPPED+=("$name: ${have}s left of ${BUDGET_S}s, needs ${need}s")
    return 1
  fi
  echo "=== [$(elapsed)s] $name (timeout ${have}s)"
  RAN=1
  timeout "$have" "$@"
  local rc=$?
  [ "$rc" = 0 ] || { echo "=== $name FAILED or timed out (rc $rc)"; SKIPPED+=("$name: rc $rc"); }
  return "$rc"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
# every package the parts import, so that a missing wheel fails here, by name
"$PY" - <<'EOF' || exit 1
import importlib, sys
names = ("torch diffusers transformers hydra omegaconf webdataset braceexpand pytorch_lightning "
         "torchmetrics cv2 PIL safetensors huggingface_hub").split()
missing = []
for name in names:
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - report every missing package by name
        missing.append(f"{name} ({type(e).__name__}: {e})")
if missing:
    sys.exit("MISSING python packages: " + "; ".join(missing))
import diffusers, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "diffusers",
      diffusers.__version__)
EOF

part infer 60 "$PY" benchmarks/benchmark_infer.py "${SMOKE_ARG[@]}" \
  --refine-variants autocast,bf16_weights --out "$OUT/infer.json"

# the eager half (~70 s) is written before compiling starts (a cut-short compile keeps it)
part train 70 "$PY" benchmarks/benchmark_train.py "${SMOKE_ARG[@]}" --batch-size "$BATCH" \
  --loader-workers "$WORKERS" --fused-adamw --anchor eager --steps 8 --warmup 3 \
  --compile-scope "$COMPILE_SCOPE" \
  $( { [ "${SMOKE:-0}" = 1 ] && [ "${SMOKE_COMPILE:-0}" != 1 ]; } || [ "${COMPILE:-1}" = 0 ] \
     || echo --then-compile) \
  --out "$OUT/train.json"

if [ "${COMPILE:-1}" = 0 ]; then
  echo "=== infer_compiled skipped: COMPILE=0 (compiling needs about two minutes)"
  SKIPPED+=("infer_compiled: COMPILE=0")
elif [ "${SMOKE:-0}" = 1 ] && [ "${SMOKE_COMPILE:-0}" != 1 ]; then
  echo "=== infer_compiled skipped in SMOKE mode (SMOKE_COMPILE=1 runs it; CPU compile is slow)"
  SKIPPED+=("infer_compiled: SMOKE mode")
else
  part infer_compiled 90 "$PY" benchmarks/benchmark_infer.py "${SMOKE_ARG[@]}" --parts refine \
    --refine-variants bf16_weights,bf16_weights_compiled --compile-scope "$COMPILE_SCOPE" \
    --out "$OUT/infer_compiled.json"
fi

# fit STRATEGY EXTRA...: train.py end to end, its metrics.csv summarised into fit_STRATEGY.json
fit() {
  local strategy=$1; shift
  part "fit_$strategy" 50 "$PY" train.py "trainer=$strategy" trainer.devices=1 "${FIT[@]}" \
    "$@" trainer.val_check_interval=100000 \
    model.val_sample_steps=2 model.val_num_samples=1 "~callbacks.model_checkpoint" \
    callbacks.progress_bar.refresh_rate=10 \
    "+callbacks.device_stats._target_=pytorch_lightning.callbacks.DeviceStatsMonitor" \
    paths.log_dir="$WORK/$strategy" export_dir="$WORK/$strategy/export" \
    > "$WORK/$strategy.log" 2>&1
  local rc=$?
  [ "$RAN" = 1 ] || { cat "$WORK/$strategy.log"; return; }
  tr '\r' '\n' < "$WORK/$strategy.log" | grep -v "it/s\]$" | tail -8
  "$PY" benchmarks/speed_summary.py fit "$WORK/$strategy" "$OUT/fit_$strategy.json" "$strategy" "$rc" \
    || true
}
fit ddp
if [ "${SMOKE:-0}" = 1 ]; then
  echo "=== fit_fsdp skipped in SMOKE mode: Lightning's FSDPStrategy needs CUDA"
  SKIPPED+=("fit_fsdp: SMOKE mode (FSDPStrategy needs CUDA)")
else
  fit fsdp model.ema_decay=null  # train.py refuses FSDP with EMA (full shadow weights)
fi

printf '%s\n' "${SKIPPED[@]}" > "$WORK/skipped.txt"
"$PY" benchmarks/speed_summary.py all "$OUT" "$WORK/skipped.txt" "$(elapsed)" "$BUDGET_S"
echo "=== done in $(elapsed)s of ${BUDGET_S}s; files in $OUT:"
ls -la "$OUT"
