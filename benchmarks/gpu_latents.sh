#!/usr/bin/env bash
# GPU run (about 6 minutes on one H100): the latent-shard training path at SD-1.5 scale,
# random weights, 512 px, measured two ways.
#   OUT=DIR bash benchmarks/gpu_latents.sh   (on a CUDA machine; wheels of missing packages in .whl/)
#   CPU check: SMOKE=1 PYTHON=.venv/bin/python OUT=/tmp/o bash benchmarks/gpu_latents.sh
# 1. benchmark_train.py --precomputed-latents --fused-adamw: the module's step fed a latent
#    batch, against the raw UNet anchor in the same process (ratio).
# 2. make_latent_shards.py: procedural 512 px pairs, encoded by the (random) SD VAE on the GPU.
# 3. train.py data=latent_shards through Lightning (DataLoader workers, bf16-mixed, fused
#    AdamW, EMA): ThroughputMonitor's train/device/samples_per_sec, data loading included.
# Files in $OUT: gpu_latents.log, train_latents_fused.json, fit_latents.json, train.log.
set -u -o pipefail
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
if ! "$PY" -c "import diffusers, hydra, webdataset" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
exec > >(tee "$OUT/gpu_latents.log") 2>&1
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
WORK=$(mktemp -d)

if [ "${SMOKE:-0}" = 1 ]; then
  mapfile -t MODEL < <("$PY" -c "from benchmarks.bench_common import SMOKE_MODEL_OVERRIDES as o
print('\n'.join(o))")
  NUM=16 BATCH=2 STEPS=25 DEVICE=cpu WORKERS=2 BENCH=(--smoke) FIT=(trainer.accelerator=cpu)
else
  MODEL=(model=sd15_dinov2_random data.image_size=512)
  NUM=1024 BATCH=32 STEPS=60 DEVICE=cuda WORKERS=14 BENCH=(--batch-size 32 --steps 8)
  FIT=(trainer=gpu)
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true

echo "=== [$(elapsed)s] 1. module step on a latent batch vs anchor"
timeout 150 "$PY" benchmarks/benchmark_train.py "${BENCH[@]}" --precomputed-latents --fused-adamw \
  --out "$OUT/train_latents_fused.json" || echo "=== step 1 FAILED (rc $?)"

echo "=== [$(elapsed)s] 2. write $NUM latent samples"
T0=$(date +%s)
OVR=(); for o in "${MODEL[@]}"; do OVR+=(-o "$o"); done
timeout 180 "$PY" scripts/make_latent_shards.py --synthetic "$NUM" --per-shard 256 \
  --workers "$WORKERS" --batch-size 32 --device "$DEVICE" --bf16 --out "$WORK/latents" \
  "${OVR[@]}" 2>&1 | tr '\r' '\n' | grep -v "sample/s]$" || echo "=== step 2 FAILED"
ENCODE_S=$(( $(date +%s) - T0 ))
URLS=$(ls "$WORK"/latents/latent-*.tar | paste -sd, -)
echo "wrote $(ls "$WORK"/latents/latent-*.tar | wc -l) shards in ${ENCODE_S}s"

echo "=== [$(elapsed)s] 3. train.py data=latent_shards, $STEPS steps x $BATCH"
timeout 260 "$PY" train.py "${MODEL[@]}" "${FIT[@]}" data=latent_shards "data.shard_urls=[$URLS]" \
  data.batch_size="$BATCH" data.num_workers=6 data.pin_memory=true data.val_length=4 \
  +model.optimizer.fused=true model.val_sample_steps=2 model.val_num_samples=1 \
  trainer.max_steps="$STEPS" trainer.val_check_interval=100000 trainer.log_every_n_steps=5 \
  "~callbacks.model_checkpoint" callbacks.progress_bar.refresh_rate=10 \
  paths.log_dir="$WORK/runs" export_dir="$WORK/export" 2>&1 | tr '\r' '\n' \
  | grep -v "it/s\]$" > "$OUT/train.log"
echo "train rc=$?"; tail -5 "$OUT/train.log"
"$PY" - "$WORK/runs" "$OUT/fit_latents.json" "$NUM" "$ENCODE_S" "$BATCH" <<'EOF'
import csv, json, sys
from pathlib import Path

import torch

runs, out, num, encode_s, batch = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
files = sorted(Path(runs).rglob("metrics.csv"))
rows = [r for f in files for r in csv.DictReader(f.open())]
rate = [(int(r["step"]), float(r["train/device/samples_per_sec"])) for r in rows
        if r.get("train/device/samples_per_sec")]
result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
          "torch": torch.__version__, "batch_size": batch, "latent_samples": num,
          "encode_wall_s": encode_s, "samples_per_s_by_step": rate,
          "samples_per_s_last": rate[-1][1] if rate else None}
Path(out).write_text(json.dumps(result, indent=2))
print(json.dumps({k: v for k, v in result.items() if k != "samples_per_s_by_step"}))
EOF
echo "=== done in $(elapsed)s"; ls -la "$OUT"
