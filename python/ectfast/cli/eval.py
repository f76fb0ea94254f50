"""``ectfast eval``: NME, failure rate, AUC and the CED plot on a 300-W-layout folder
(:func:`ectfast.app.evaluate.evaluate`)."""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from ectfast.app.evaluate import DataWarning, evaluate
from ectfast.cli._argtypes import device_arg, unit_float
from ectfast.core import metrics
from ectfast.core.fit import METHODS
from ectfast.nets import engine as E


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", metavar="DATA", help="a 300-W-layout folder (NAME.jpg + NAME.pts, any depth)")
    p.add_argument("--method", default="all", choices=("all",) + METHODS,
                   help="fitting method, or all of them on the same response maps (default: all)")
    p.add_argument("--boxes", default="landmarks", choices=("landmarks", "detector"),
                   help="face boxes from the ground-truth landmarks (the paper's protocol) or from the "
                        "face detector, ectfast.faces (default: landmarks)")
    p.add_argument("--out", default="ectfast-eval", metavar="DIR",
                   help="folder for results.md, results.csv, per_face.csv, ced.png (default: %(default)s)")
    p.add_argument("--occlusion-labels", action="store_true",
                   help="read NAME.occ (one 0/1 per landmark, 1 = occluded) and report occlusion precision/recall")
    p.add_argument("--norm", default="inter-ocular", choices=metrics.NORMALIZATIONS,
                   help="NME used for failure rate, AUC and CED (all three NMEs are always reported)")
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="the network: a .onnx or .pt file (default: the shipped one)")
    p.add_argument("--flip", action="store_true",
                   help="test-time flip: the network also runs on the mirrored crops (twice its time; no lower error measured with the shipped network)")
    p.add_argument("--precision", default=E.DEFAULT_PRECISION, choices=E.PRECISIONS,
                   help="the network's precision: fp32, or int8 (the shipped int8 ONNX file on ONNX Runtime: "
                        "as accurate as fp32, faster only on CPUs with VNNI; default: %(default)s)")
    p.add_argument("--engine", default="auto", choices=E.ENGINES,
                   help="inference engine: auto, onnxruntime, torch (default: auto)")
    p.add_argument("--device", default="auto", type=device_arg,
                   help="where the network runs: auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--backend", default="auto", choices=("auto", "reference", "cpu", "cuda"),
                   help="ectfast.fit backend (default: auto)")
    p.add_argument("--batch-size", type=int, default=8, help="faces per FCN/fit batch (default: 8)")
    p.add_argument("--threshold", type=unit_float, default=0.5,
                   help="visibility threshold tau in [0, 1] (default: 0.5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.epilog = "Exit status: 0 when faces were evaluated, 1 when none could be, 2 for a usage/setup error."


def run(args, *, estimator=None) -> int:
    """``ectfast eval``; ``estimator`` (Python callers and tests only) replaces the FCN."""
    def say(msg):
        print(f"ectfast eval: {msg}", file=sys.stderr)

    if not os.path.isdir(args.data):
        say(f"{args.data} is not a folder")
        return 2
    if args.batch_size < 1:
        say(f"--batch-size must be >= 1, got {args.batch_size}")
        return 2
    warnings.simplefilter("always", DataWarning)
    old = warnings.showwarning
    warnings.showwarning = lambda msg, cat, *a, **k: print(f"warning: {msg}", file=sys.stderr)
    try:
        result = evaluate(args.data, methods=args.method, boxes=args.boxes, estimator=estimator,
                          weights=args.weights, device=args.device, backend=args.backend,
                          engine=getattr(args, "engine", "auto"), flip=getattr(args, "flip", False),
                          precision=getattr(args, "precision", E.DEFAULT_PRECISION),
                          batch_size=args.batch_size, out=args.out, occlusion_labels=args.occlusion_labels,
                          norm=args.norm, visibility_threshold=args.threshold, progress=not args.no_progress)
    except FileNotFoundError as e:
        say(E.NO_WEIGHTS_MESSAGE if args.weights is None and "Haar" not in str(e) else str(e))
        return 2
    except ImportError as e:
        say(str(e))
        return 2
    except ValueError as e:
        say(str(e))
        return 1 if "could be evaluated" in str(e) or "no NAME" in str(e) else 2
    finally:
        warnings.showwarning = old
    print(result.table)
    print("wrote " + ", ".join(result.files.values()))
    return 0
