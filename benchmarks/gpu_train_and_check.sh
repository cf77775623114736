#!/usr/bin/env bash
# One GPU run (about 9 minutes on one H100): train the shipped tiny model
# (experiment=tiny_gpu, TRAIN_TIME of wall time), then the scale benchmarks (gpu_check.sh).
#   OUT=DIR bash benchmarks/gpu_train_and_check.sh   (CUDA machine; wheels of missing packages in .whl/)
#   CPU check: SMOKE=1 PYTHON=.venv/bin/python OUT=/tmp/o bash benchmarks/gpu_train_and_check.sh
# Files in $OUT: export.tar.part00/01 (cat them, then untar: the pipeline folder),
# train.tar.gz (log, metrics, sample grids), bench.tar.gz (benchmark JSON and logs). The lettering fonts come from matplotlib
# (its wheel must be in .whl), so the GPU sees the same data as the CPU machines.
set -u -o pipefail
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
if [ "${SMOKE:-0}" != 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
TRAIN_TIME=${TRAIN_TIME:-00:00:04:00}
RUNS=$(mktemp -d)
START=$(date +%s)

if [ "${SMOKE:-0}" = 1 ]; then
  TRAIN_ARGS=(trainer.accelerator=cpu trainer.max_steps=3 data.batch_size=4 data.num_workers=2
              data.val_length=8 trainer.val_check_interval=2 model.val_sample_steps=2)
else
  TRAIN_ARGS=()
fi
"$PY" train.py experiment=tiny_gpu trainer.max_time="$TRAIN_TIME" paths.log_dir="$RUNS" \
  "${TRAIN_ARGS[@]}" 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" > "$RUNS/train.log"
echo "train rc=$? after $(( $(date +%s) - START ))s"; tail -25 "$RUNS/train.log"
RUN=$(ls -d "$RUNS"/tiny_gpu/*/ | head -1)
# output files stay under 16 MiB each: the pipeline folder is split into parts (cat, untar)
tar cf - -C "$RUN" export | split -b 15M -d - "$OUT"/export.tar.part
tar czf "$OUT/train.tar.gz" -C "$RUNS" train.log -C "$RUN" csv .hydra 2>/dev/null
ls -la "$OUT"

BENCH=$(mktemp -d)
OUT=$BENCH DEADLINE_S=${DEADLINE_S:-230} bash benchmarks/gpu_check.sh > /dev/null 2>&1
tar czf "$OUT/bench.tar.gz" -C "$BENCH" .
echo "all done after $(( $(date +%s) - START ))s"; ls -la "$OUT"
