"""``ectfast export-onnx``: the network to ONNX, checked against PyTorch
(:func:`ectfast.nets.export.export_weights`)."""
from __future__ import annotations

import argparse
import os
import sys

from ectfast.nets import engine as E
from ectfast.nets.export import calibration_crops, export_weights, quantize_int8
from ectfast.nets.model import ARCHS, DEFAULT_ARCH


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="shipped-weights .pt file or training checkpoint (default: the packaged "
                        f"{os.path.basename(E.DEFAULT_PT)}; 'random' for an untrained net)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="output .onnx file (default: the weights' path with .onnx; for the packaged "
                        f"weights the packaged {os.path.basename(E.DEFAULT_ONNX)})")
    p.add_argument("--arch", default=DEFAULT_ARCH, choices=sorted(ARCHS), help="architecture for --weights random")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-PyTorch check")
    p.add_argument("--int8", action="store_true",
                   help="also write the int8 model (static quantisation) as OUT_int8.onnx, calibrated on "
                        "held-out training faces of --calibration-data")
    p.add_argument("--calibration-data", metavar="DIR", default=None,
                   help="300-W root (afw/, helen/trainset/, lfpw/trainset/) for --int8's calibration")
    p.add_argument("--calibration-faces", type=int, default=64,
                   help="held-out training faces the int8 ranges are calibrated on (default: %(default)s)")
    p.add_argument("--check", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    p.epilog = ("Exit status: 0 written (and checked), 1 the check failed (file removed), 2 bad "
                "weights/arguments or a missing package.")


def run(args) -> int:
    if args.int8 and not args.calibration_data:
        print("ectfast export-onnx: --int8 needs --calibration-data DIR (a 300-W root with the training faces)",
              file=sys.stderr)
        return 2
    try:
        res = export_weights(args.weights, args.out, arch=args.arch, opset=args.opset, check=not args.no_check)
    except ValueError as e:
        print(f"ectfast export-onnx: {e}", file=sys.stderr)
        return 1 if "differs from PyTorch" in str(e) else 2
    except (FileNotFoundError, ImportError, OSError) as e:
        print(f"ectfast export-onnx: {e}", file=sys.stderr)
        return 2
    print(f"wrote {res['path']} ({res['bytes'] / 2**20:.2f} MiB, weights sha256 {res['sha256']})")
    if res["check"] is not None:
        c = res["check"]
        print(f"onnxruntime vs PyTorch: max abs difference {c['max_abs']:.2e}, same argmax in "
              f"{100 * c['argmax_agree']:.1f}% of maps {c['maps']}")
    if args.int8:
        try:
            crops = calibration_crops(args.calibration_data, args.calibration_faces,
                                      E.read_onnx_metadata(res["path"])["input_size"])
            q = quantize_int8(res["path"], E.int8_sibling(res["path"]), crops,
                              calibration=f"{len(crops)} held-out training faces (calibration_crops), MinMax")
        except (ValueError, FileNotFoundError, ImportError, OSError) as e:
            print(f"ectfast export-onnx: --int8: {e}", file=sys.stderr)
            return 2
        c = q["check"]
        print(f"wrote {q['path']} ({q['bytes'] / 2**20:.2f} MiB, int8); against the float model on the "
              f"calibration crops: peak shift mean {c['peak_shift_mean']:.3f} / max {c['peak_shift_max']:.2f} "
              f"map px, {100 * c['within_half_px']:.1f}% of maps within 0.5 px")
    return 0
