#!/usr/bin/env bash
# Ship a lite network trained by `ectfast train ... --export-weights FILE` (lite, lite64 or lite-hr): the
# package's weights with their record, the fit options cross-validated on held-out training
# faces, the ONNX files (fp32 and int8), then every measurement bench/RESULTS.md reports.
#
#   tools/ship_lite.sh RUN "TRAIN COMMAND" "MACHINE" "WALL TIME" [OUT]
#
# Outputs of each step go to OUT (default runs/ship-NAME, not committed); the plots to bench/.
# Needs the 300-W data under ${ECTFAST_DATA:-../shared/data}. About 20 minutes on 2 cores.
set -euo pipefail
RUN=$1 CMD=$2 MACHINE=$3 WALL=$4
OUT=${5:-runs/ship-$(basename "$RUN")}
DATA=${ECTFAST_DATA:-../shared/data}
W=python/ectfast/assets/lite_300w.pt
mkdir -p "$OUT"
step() { echo "$(date -u +%H:%M:%S) $1 (load $(cut -d' ' -f1-3 /proc/loadavg))" | tee -a "$OUT/steps.txt"; }

step "weights + record"
python - "$RUN" "$CMD" "$MACHINE" "$WALL" "$W" <<'EOF' > "$OUT/weights.txt"
import json, sys
from ectfast.nets.model import read_weights, save_weights
run, cmd, machine, wall, dest = sys.argv[1:]
with open(f"{run}/summary.json") as f:  # the file `--export-weights` wrote
    blob = read_weights(json.load(f)["weights"])
meta = {k: v for k, v in blob["meta"].items() if k != "train_state"}
meta.update(command=cmd, machine=machine, wall=wall,
            data="300-W training faces (AFW, HELEN train, LFPW train; research-use annotations), "
                 "150 of them held out for validation")
with open(f"{run}/log.jsonl") as f:
    meta["history_val"] = [{"step": r["step"], "val_nme": r["val_nme"]} for r in map(json.loads, f) if "val_nme" in r]
sha = save_weights(blob["state_dict"], dest, meta={**meta, "arch": blob["arch"]})
print(json.dumps({k: v for k, v in meta.items() if k != "history_val"}, default=str), sha)
EOF
step "fit options on held-out training faces"
python bench/lite_eval.py tune --data "$DATA/300w" --weights "$W" --write > "$OUT/tune.txt"
step "ONNX fp32 + int8"
ectfast export-onnx --int8 --calibration-data "$DATA/300w" > "$OUT/export.txt" 2>&1
step "LFPW report fp32"
python bench/lite_eval.py report --data "$DATA/300w" --out bench/lite_report > "$OUT/report.txt"
step "LFPW report int8"
python bench/lite_eval.py report --data "$DATA/300w" --precision int8 --no-plots > "$OUT/report_int8.txt"
step "training curve"
python bench/plot_training.py "$RUN/log.jsonl" --out bench/lite_training.png > "$OUT/plot.txt"
step "photographs"
python - "$DATA/faces" <<'EOF' > "$OUT/photos.txt"
import os, sys
import numpy as np
import ectfast
from ectfast.core import metrics
from ectfast.io.pts import read_pts
folder = sys.argv[1]
for precision in ("fp32", "int8"):
    det = ectfast.Detector(device="cpu", precision=precision)
    out = []
    for name in ("lenna.png", "takeo.ppm", "breakingbad.jpg", "einstein.jpg"):
        gt = read_pts(os.path.join(folder, name.rsplit(".", 1)[0] + ".pts"))
        faces = det.detect(os.path.join(folder, name))
        f = min(faces, key=lambda f: np.linalg.norm(f.landmarks.mean(0) - gt.mean(0)))
        out.append(f"{name} {metrics.nme(f.landmarks, gt)[0]:.4f} ({len(faces)} faces)")
    print(precision, "; ".join(out))
EOF
step "network speed"
ARCH=$(python -c "from ectfast.nets.model import read_weights; print(read_weights('$W')['arch'])")
python bench/fcn.py --arch "$ARCH" --threads 2 > "$OUT/fcn.txt" 2>&1
step "pipeline speed"
OMP_NUM_THREADS=2 python bench/pipeline.py --limit 300 --repeat 2 \
    --engines torch onnxruntime onnxruntime-int8 > "$OUT/pipeline.txt" 2>&1
step "done"
