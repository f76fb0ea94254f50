"""``ectfast train``: train (or resume) an estimation network within a time budget
(:func:`ectfast.nets.train.train`)."""
from __future__ import annotations

import argparse
import json
import math
import sys

from ectfast.nets.data import STORED_SIZE, STORED_SIZE_FULL
from ectfast.nets.model import ARCHS
from ectfast.nets.train import DEFAULTS, train


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="300-W root folder (afw/, helen/trainset/, lfpw/trainset/, lfpw/testset/)")
    p.add_argument("--packed", help="packed crops (.npz from `python -m ectfast.cli.pack`); preferred over --data")
    p.add_argument("--out", required=True, help="run folder: checkpoints, log.jsonl, summary.json")
    p.add_argument("--arch", default=None, choices=sorted(ARCHS),
                   help=f"network architecture (default {DEFAULTS['arch']}; 'paper' is the 93 GFLOP FCN)")
    p.add_argument("--loss", default=None, choices=["l2", "awing"],
                   help="heatmap loss (default: awing for lite, l2 for paper)")
    p.add_argument("--holdout", type=int, default=None,
                   help=f"training faces held out for validation (default {DEFAULTS['holdout']}; 0: validate on lfpw/testset)")
    p.add_argument("--minutes", type=float, default=None,
                   help="time budget: the schedule is sized from the first steps' speed to end inside it")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 holds steady on a shared 2-core machine)")
    p.add_argument("--epochs", type=int, default=None, help=f"default {DEFAULTS['epochs']}")
    p.add_argument("--batch-size", type=int, default=None, help=f"default {DEFAULTS['batch_size']}")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate, default {DEFAULTS['lr']}")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ema", type=float, default=None,
                   help=f"decay of the weights' moving average that is validated and exported "
                        f"(0 = none), default {DEFAULTS['ema']}")
    p.add_argument("--input-size", type=int, default=None, help="crop side (256 for the shipped model)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after M minutes")
    p.add_argument("--max-steps", type=int, default=None, help="stop (with a checkpoint) at this global step")
    p.add_argument("--init", metavar="FILE",
                   help="start a new run from the matching tensors of a weights file (e.g. the shipped "
                        "lite weights for --arch lite64 or lite-hr)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt (or OUT/light.pt)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--ckpt-every", type=int, default=500, help="checkpoint every N steps")
    p.add_argument("--val-every", type=int, default=None, help="validate every N steps (default: each epoch)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--limit", type=int, default=None, help="use only the first N faces of each split")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--workers", type=int, default=4, help="decoding threads")
    p.add_argument("--label-offset-x", type=float, default=None, metavar="PX",
                   help="the labels' offset to the right of the image content, in original-image pixels, kept "
                        "through flip augmentation (default 0: flips mirror the labels as they are; 300-W's "
                        "measured offset is ~1, see ectfast.nets.data.flip_label_shift)")
    p.add_argument("--stored-size", type=int, default=None,
                   help=f"side of the stored margin crops read from --data (default {STORED_SIZE}, or the "
                        f"run's own when resuming: 213 px "
                        f"per 256-px face crop; {STORED_SIZE_FULL} keeps the full resolution that the 256-px "
                        f"input of lite-hr sees)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--log-lines", action="store_true",
                   help="print one line per log record instead of a progress bar (for logs/pipes)")
    p.add_argument("--export-weights", metavar="FILE",
                   help="write the best model as shipped fp16 weights (e.g. python/ectfast/assets/lite_300w.pt)")


def run(args) -> int:
    try:
        s = train(args.data, args.out, arch=args.arch, loss=args.loss, holdout=args.holdout,
                  minutes=args.minutes, threads=args.threads, packed=args.packed, epochs=args.epochs, batch_size=args.batch_size,
                  lr=args.lr, weight_decay=args.weight_decay, seed=args.seed, ema=args.ema, input_size=args.input_size,
                  max_minutes=args.max_minutes, max_steps=args.max_steps, resume=args.resume,
                  device=args.device, amp=args.amp, compile_model=args.compile, ckpt_every=args.ckpt_every,
                  val_every=args.val_every, log_every=args.log_every, limit=args.limit,
                  augment=not args.no_augment,
                  progress=False if args.quiet else ("lines" if args.log_lines else True), export_weights=args.export_weights,
                  workers=args.workers, init=args.init, stored_size=args.stored_size,
                  label_offset_x=args.label_offset_x)
    except (ValueError, FileNotFoundError) as e:
        print(f"ectfast train: {e}", file=sys.stderr)
        return 2
    best = s["best_nme"] if math.isfinite(s["best_nme"]) else None
    print(json.dumps({"step": s["step"], "total_steps": s["total_steps"], "stopped": s["stopped"], "best_nme": best}))
    if s["stopped"] != "done":
        print(f"stopped at step {s['step']} of {s['total_steps']} ({s['stopped']}): "
              f"continue with the same command plus --resume", file=sys.stderr)
    return 0
