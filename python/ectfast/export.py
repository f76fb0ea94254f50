"""``ectfast export-onnx``: the FCN as an ONNX model.

Inputs/outputs of the ONNX graph: ``image`` (B, 3, H, W) float32 RGB in [0, 1] (normalised
inside, as the PyTorch model); outputs ``primary64``, ``fusion64``, ``up256`` as
``ectfast.model.FCN.forward``. The batch axis is dynamic (``--static-batch`` fixes it); H, W are
fixed at export (``--size``, default 256). The weights are the shipped ones
(``--weights``, default the packaged file) or a run's ``best.pt``/``last.pt`` checkpoint.
``--check`` runs the exported model with onnxruntime (when installed) and compares it with
PyTorch (max abs difference <= 1e-3).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import numpy as np
import torch

from .model import FCN, load_pretrained

OUTPUT_NAMES = ["primary64", "fusion64", "up256"]


def load_model(weights=None) -> FCN:
    """FCN from shipped weights, a training checkpoint (dict with 'model'), or random init ('random')."""
    if weights == "random":
        torch.manual_seed(0)
        return FCN().eval()
    if weights is not None and os.path.isfile(weights):
        blob = torch.load(weights, map_location="cpu", weights_only=False)
        if isinstance(blob, dict) and "model" in blob:
            m = FCN()
            m.load_state_dict(blob["model"])
            return m.eval()
    return load_pretrained(weights)


def export_onnx(model: FCN, path, size: int = 256, dynamic_batch: bool = True, opset: int = 18) -> str:
    """Write ``model`` as ONNX to ``path``; returns the path."""
    if size % 4 or size < 16:
        raise ValueError(f"size: expected a multiple of 4 >= 16, got {size}")
    try:
        import onnx  # noqa: F401  (both torch exporters serialise through it)
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install onnx onnxscript") from None
    model = model.eval().float().cpu()
    x = torch.rand(2 if dynamic_batch else 1, 3, size, size)
    path = os.fspath(path)
    kw = dict(input_names=["image"], output_names=OUTPUT_NAMES, opset_version=opset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:  # the dynamo exporter (needs onnxscript)
            import onnxscript  # noqa: F401

            dyn = {"x": {0: torch.export.Dim("batch", min=1, max=4096)}} if dynamic_batch else None
            torch.onnx.export(model, (x,), path, dynamo=True, dynamic_shapes=dyn, external_data=False,
                              verbose=False, **kw)
        except ImportError:
            dyn = {"image": {0: "batch"}, **{n: {0: "batch"} for n in OUTPUT_NAMES}} if dynamic_batch else None
            torch.onnx.export(model, (x,), path, dynamo=False, dynamic_axes=dyn, **kw)
    return path


def check_onnx(model: FCN, path, size: int = 256, batch: int = 3, seed: int = 0) -> float:
    """Max abs difference between onnxruntime and PyTorch on a random batch (ImportError when
    onnxruntime is missing)."""
    import onnxruntime as ort

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, size, size, generator=g)
    with torch.no_grad():
        ref = [t.numpy() for t in model.eval().float().cpu()(x)]
    sess = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    got = sess.run(OUTPUT_NAMES, {sess.get_inputs()[0].name: x.numpy()})
    return max(float(np.abs(a - b).max()) for a, b in zip(ref, got))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output .onnx file")
    p.add_argument("--weights", default=None,
                   help="shipped weights file or training checkpoint (default: the packaged weights; "
                        "'random' for an untrained net)")
    p.add_argument("--size", type=int, default=256, help="input side H = W (default 256)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch size at 1")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--check", action="store_true", help="compare onnxruntime with PyTorch (needs onnxruntime)")


def run(args) -> int:
    try:
        model = load_model(args.weights)
        export_onnx(model, args.out, args.size, not args.static_batch, args.opset)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"ectfast export-onnx: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB)")
    if args.check:
        try:
            err = check_onnx(model, args.out, args.size)
        except ImportError:
            print("onnxruntime not installed: numeric check skipped", file=sys.stderr)
            return 0
        print(f"onnxruntime vs PyTorch: max abs difference {err:.2e}")
        if err > 1e-3:
            print("ectfast export-onnx: ONNX output differs from PyTorch by more than 1e-3", file=sys.stderr)
            return 1
    return 0
