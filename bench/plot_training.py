"""Training curve of an ``ectfast train`` run: loss and validation NME against wall time.

  python bench/plot_training.py runs/lite/log.jsonl --out bench/lite_training.png

Reads the run's log.jsonl (one JSON record per log step: step, loss, img_per_s; and per
validation: step, val_nme). Wall time is rebuilt from the logged speed (steps x batch / img_per_s).
"""
from __future__ import annotations

import argparse
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log", help="OUT/log.jsonl of a training run")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--batch-size", type=int, default=32)
    a = p.parse_args(argv)
    train, val = [], []
    with open(a.log) as f:
        for line in f:
            r = json.loads(line)
            (val if "val_nme" in r else train).append(r)
    if not train:
        print(f"{a.log}: no training records", file=sys.stderr)
        return 1
    # wall time: each record covers the steps since the previous one at its logged speed
    t, prev, tmin = 0.0, 0, {}
    for r in sorted(train, key=lambda r: r["step"]):
        t += (r["step"] - prev) * a.batch_size / max(r["img_per_s"], 1e-9) / 60
        prev = r["step"]
        tmin[r["step"]] = t
    steps = sorted(tmin)

    def minutes(step):
        return tmin[min(steps, key=lambda s: abs(s - step))]

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    tr = sorted(train, key=lambda r: r["step"])
    ax[0].plot([minutes(r["step"]) for r in tr], [r["loss"] for r in tr], lw=0.8)
    ax[0].set_xlabel("minutes (from the logged speed)")
    ax[0].set_ylabel("training loss (sum over outputs)")
    ax[0].grid(alpha=0.3)
    vs = sorted(val, key=lambda r: r["step"])
    ax[1].plot([minutes(r["step"]) for r in vs], [100 * r["val_nme"] for r in vs], "o-", ms=3)
    ax[1].set_xlabel("minutes")
    ax[1].set_ylabel("validation NME %, sub-pixel peaks")
    ax[1].set_ylim(0, min(12, max(100 * r["val_nme"] for r in vs) * 1.05) if vs else 12)
    ax[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(a.out, dpi=100)
    print(f"{a.out}: {len(tr)} training records, {len(vs)} validations, {t:.0f} min of training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
