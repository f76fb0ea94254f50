#!/usr/bin/env bash
# Train the FCN on the lent GPU machine, one device call (<= 10 min) at a time; resumable.
#
# Before the first call (here, on the development machine; the data must not be committed):
#   PYTHONPATH=python python -m ectfast.cli.pack --data ../shared/data/300w --out .devdata/300w_288.npz
#       (34 MiB: 2012 training + 224 validation faces as JPEG margin crops; .devdata/ is ignored)
# Each device call (tool `run`, carry [".devdata/300w_288.npz", ".devdata/ckpt"], timeout_s 600;
# exact calls and budget: docs/DEVICE_RUNBOOK.md):
#   bash tools/train_on_device.sh       # env: EPOCHS (default auto) BS LR CALL_MINUTES COMPILE RUN
# ARCH (default paper: the GPU script trains the paper FCN; HOLDOUT default 0 = validate on lfpw/testset).
# Dry runs / small runs (env, passed to `ectfast train` only when set): DEVICE (cpu|cuda; the
# script refuses to train without a GPU unless DEVICE=cpu), MAX_STEPS, INPUT_SIZE, LIMIT (first N
# faces of each split), VAL_EVERY, WORKERS (decoding threads, default min(16, cores)). E.g.
#   DEVICE=cpu EPOCHS=2 BS=4 INPUT_SIZE=64 LIMIT=16 MAX_STEPS=3 OUT=/tmp/dry_out bash tools/train_on_device.sh
# EPOCHS=auto (first call only): times 20 training steps on the GPU (bench/fcn.py --train) and
# picks the number of epochs that fits TRAIN_BUDGET_MIN minutes of training (default 15: two
# calls of ~8 min of training each; a 30-minute session also pays ~1.5 min per machine start and
# the transfers, see docs/DEVICE_RUNBOOK.md); later calls take it from the checkpoint.
# CALL_MINUTES (default 9.0): the whole call, bench and export included; lower it when the
# session's device time left (tool `status`, budget_left_s) is short.
# After each call, replace .devdata/ckpt/ with what came back (so a cold machine can resume):
#   rm -rf .devdata/ckpt && mkdir -p .devdata/ckpt && cp <files_at>/light.pt.part-* .devdata/ckpt/
# What comes back ($OUT, at most 6 files of <= 15 MiB): light.pt.part-NN (2), fcn_300w.pt.part-NN
# (2), train.log (bench output included), log.jsonl. The run's exit status: 0 when the trainer
# stopped cleanly (done or time limit); 'stopped' in train.log tells which.
# When training is done, join the shipped weights and commit them:
#   cat <files_at>/fcn_300w.pt.part-* > python/ectfast/assets/fcn_300w.pt
#
# Resume: the full checkpoint (runs/fcn/last.pt: weights + AdamW state + RNG + step) stays on the
# machine while it is warm (call again within its idle window): the next call then continues
# exactly. On a fresh machine the script rebuilds runs/fcn/light.pt from the carried parts and
# the trainer continues at the same step, data order and schedule with fresh optimizer moments
# (the full checkpoint, ~120 MB, cannot travel: 64 MiB limit each way, 16 MiB per file back).
# Needs only what the device image has: torch (CUDA), numpy, tqdm, and OpenCV or torchvision
# to decode the packed JPEGs; the augmentation runs on the GPU (affine_grid / grid_sample).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=python PYTHONUNBUFFERED=1
PACKED=${PACKED:-.devdata/300w_288.npz}
RUN=${RUN:-runs/fcn}
CARRIED=${CARRIED:-.devdata/ckpt}
EPOCHS=${EPOCHS:-auto}
TRAIN_BUDGET_MIN=${TRAIN_BUDGET_MIN:-15}
CALL_MINUTES=${CALL_MINUTES:-9.0}   # whole call, bench and export included
BS=${BS:-64}
LR=${LR:-5e-4}
OUT=${OUT:-/tmp/fcn_out}
WORKERS=${WORKERS:-$(( $(nproc) < 16 ? $(nproc) : 16 ))}
EXTRA=()
[ "${COMPILE:-0}" = 1 ] && EXTRA+=(--compile)
[ -n "${DEVICE:-}" ] && EXTRA+=(--device "$DEVICE")
[ -n "${MAX_STEPS:-}" ] && EXTRA+=(--max-steps "$MAX_STEPS")
[ -n "${INPUT_SIZE:-}" ] && EXTRA+=(--input-size "$INPUT_SIZE")
[ -n "${LIMIT:-}" ] && EXTRA+=(--limit "$LIMIT")
[ -n "${VAL_EVERY:-}" ] && EXTRA+=(--val-every "$VAL_EVERY")
mkdir -p "$RUN" "$OUT"
rm -f "$OUT"/light.pt.part-* "$OUT"/fcn_300w.pt.part-*   # stale parts of an earlier local run

[ -f "$PACKED" ] || { echo "missing $PACKED: pack it first (see the top of this script) and carry .devdata/300w_288.npz" >&2; exit 2; }
if [ ! -f "$RUN/last.pt" ] && [ ! -f "$RUN/light.pt" ] && compgen -G "$CARRIED/light.pt.part-*" >/dev/null; then
  cat "$CARRIED"/light.pt.part-* > "$RUN/light.pt"
  echo "cold machine: resuming from the carried light checkpoint ($(ls "$CARRIED"/light.pt.part-* | wc -l) parts)" >&2
fi
HAS_CUDA=$(python3 -c "import torch; print(int(torch.cuda.is_available()), 'torch', torch.__version__)")
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  echo "cuda available: $HAS_CUDA"
} 2>&1 | tee "$OUT/train.log"
HAS_CUDA=${HAS_CUDA%% *}
if [ "$HAS_CUDA" != 1 ] && [ "${DEVICE:-}" != cpu ]; then
  echo "no CUDA GPU visible to torch: refusing to train on the CPU (set DEVICE=cpu for a dry run)" | tee -a "$OUT/train.log" >&2
  exit 3
fi

EP_ARGS=()
if [ "$EPOCHS" = auto ]; then
  if [ ! -f "$RUN/last.pt" ] && [ ! -f "$RUN/light.pt" ]; then
    if [ "$HAS_CUDA" = 1 ]; then
      python3 bench/fcn.py --skip-forward --no-compile --train --train-batch "$BS" --json "$RUN/bench.json" 2>&1 | tee -a "$OUT/train.log" || true
      EPOCHS=$(python3 - "$RUN/bench.json" "$TRAIN_BUDGET_MIN" 2>>"$OUT/train.log" <<'PY'
import json, sys
try:
    r = (json.load(open(sys.argv[1])).get("train") or [{}])[0]
except (OSError, ValueError) as e:
    r = {"error": f"no readable bench.json ({e})"}
if "epochs_per_min" in r:
    print(max(10, min(400, int(r["epochs_per_min"] * float(sys.argv[2]) * 0.85))))
else:
    print(f"EPOCHS=auto: the training-step timing failed ({r.get('error', 'no result')}); using 150 epochs",
          file=sys.stderr)
    print(150)
PY
)
      echo "EPOCHS=auto -> $EPOCHS epochs for about $TRAIN_BUDGET_MIN minutes of training" | tee -a "$OUT/train.log" >&2
    else
      EPOCHS=2
      echo "EPOCHS=auto without a GPU (DEVICE=cpu dry run): no timing possible, using $EPOCHS epochs" | tee -a "$OUT/train.log" >&2
    fi
    EP_ARGS=(--epochs "$EPOCHS")
  fi
else
  EP_ARGS=(--epochs "$EPOCHS")
fi
MINUTES=$(python3 -c "print(round($CALL_MINUTES - $SECONDS / 60 - 0.5, 2))")
# a hard stop 20 s after the trainer's own limit, so that the parts below always get written
HARD_S=$(python3 -c "print(max(30, int(($CALL_MINUTES - 0.2) * 60 - $SECONDS)))")
echo "training for at most $MINUTES minutes in this call (hard stop after $HARD_S s)" | tee -a "$OUT/train.log" >&2

set +e
timeout -k 10 "$HARD_S" python3 -m ectfast.cli train --arch "${ARCH:-paper}" --holdout "${HOLDOUT:-0}" --packed "$PACKED" --out "$RUN" --resume "${EP_ARGS[@]}" \
  --batch-size "$BS" --lr "$LR" --max-minutes "$MINUTES" --ckpt-every 300 --log-every 50 --log-lines \
  --workers "$WORKERS" --export-weights "$RUN/fcn_300w.pt" "${EXTRA[@]}" 2>&1 | tee -a "$OUT/train.log"
rc=${PIPESTATUS[0]}
set -e
[ "$rc" = 0 ] || echo "ectfast train exited with $rc (124: hard stop; the parts below are from the last checkpoint)" | tee -a "$OUT/train.log" >&2

# what comes back (<= 8 files, <= 16 MiB each): 2 + 2 parts, train.log, log.jsonl
[ -f "$RUN/light.pt" ] && split -b 15M -d "$RUN/light.pt" "$OUT/light.pt.part-"
[ -f "$RUN/fcn_300w.pt" ] && split -b 15M -d "$RUN/fcn_300w.pt" "$OUT/fcn_300w.pt.part-"
cp "$RUN/log.jsonl" "$OUT/" 2>/dev/null || true
{ echo "--- summary.json"; cat "$RUN/summary.json" 2>/dev/null; echo; sha256sum "$RUN/light.pt" "$RUN/fcn_300w.pt" 2>/dev/null; ls -la "$OUT"; } | tee -a "$OUT/train.log"
exit "$rc"
