#!/usr/bin/env bash
# One GPU check of the "Scale and speed" benchmarks, about 4 minutes on one H100/H200:
#   OUT=DIR bash benchmarks/gpu_check.sh            (on a CUDA machine; 7 files in $OUT)
#   SMOKE=1 PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh   (CPU check of this script)
# Packages missing from the machine (diffusers, hydra-core, omegaconf, antlr4, webdataset,
# braceexpand, importlib_metadata) are installed first from wheels in .whl/, if any.
# Order = priority: each step has its own timeout, and the torch.compile run only gets the
# time left before DEADLINE_S, so a slow step costs the later ones, never the whole run.
set -u -o pipefail
PY=${PYTHON:-python3}
if ! "$PY" -c "import diffusers, hydra, webdataset" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
OUT=${OUT:-$(mktemp -d)}
DEADLINE_S=${DEADLINE_S:-235}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
SMOKE_ARG=()
if [ "${SMOKE:-0}" = 1 ]; then SMOKE_ARG=(--smoke); fi
exec > >(tee "$OUT/gpu_check.log") 2>&1
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
step() {  # step NAME TIMEOUT_S ARGS...: one benchmark, its JSON in $OUT/NAME.json
  local name=$1 limit=$2; shift 2
  echo "=== [$(elapsed)s] $name (timeout ${limit}s)"
  timeout "$limit" "$PY" "$@" "${SMOKE_ARG[@]}" --out "$OUT/$name.json" \
    || echo "=== $name FAILED or timed out (rc $?)"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
"$PY" -c "import torch, diffusers, hydra, webdataset; print('torch', torch.__version__, \
'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__)" || exit 1

# 1. the real latent-shard step (data=latent_shards: no VAE encodes) + fused AdamW vs the
#    raw UNet anchor in the same process, batch 32, 512 px (~45 s)
step train_latents_fused 110 benchmarks/benchmark_train.py --batch-size 32 --precomputed-latents \
  --fused-adamw --steps 8
# 2. alignment / sweep / 50-step guided refinement (~40 s)
step infer 90 benchmarks/benchmark_infer.py
# 3. data (CPU only, latent-shard reader included) in the background while step 4 compiles
echo "=== [$(elapsed)s] data (background, timeout 100s)"
timeout 100 "$PY" benchmarks/benchmark_data.py --samples 48 --loader-workers 8 "${SMOKE_ARG[@]}" \
  --out "$OUT/data.json" > "$OUT/data.log" 2>&1 &
DATA_PID=$!
# 4. torch.compile of the UNet on the latent step (compile ~2 min on an H100), time left
LEFT=$(( DEADLINE_S - $(elapsed) - 20 ))
if [ "${SMOKE:-0}" = 1 ] && [ "${SMOKE_COMPILE:-0}" != 1 ]; then
  echo "=== compile step skipped in SMOKE mode (SMOKE_COMPILE=1 runs it)"
elif [ "$LEFT" -ge 90 ]; then
  step train_latents_compile "$LEFT" benchmarks/benchmark_train.py --batch-size 32 --compile \
    --precomputed-latents --fused-adamw --anchor none --no-breakdown --warmup 2 --steps 8
else
  echo "=== compile step skipped: ${LEFT}s left before the ${DEADLINE_S}s deadline"
fi
wait "$DATA_PID" || echo "=== data FAILED or timed out"
cat "$OUT/data.log"
# 5. the full pixel step with its per-part breakdown (VAE share), if time is left
LEFT=$(( DEADLINE_S - $(elapsed) ))
if [ "$LEFT" -ge 50 ]; then
  step train_eager "$LEFT" benchmarks/benchmark_train.py --batch-size 32 --steps 8
else
  echo "=== eager pixel step skipped: ${LEFT}s left (benchmarks/h100-2026-11-26 has it)"
fi
echo "=== done in $(elapsed)s; files in $OUT:"
ls -la "$OUT"
