"""End-to-end throughput of the ECT pipeline on 256 x 256 face crops: FCN (ectfast.model) +
ectfast.fit, in faces/s, per device and batch size (issue 6).

Face detection and cropping are not included (they depend on the image size); the crops are
random pixels. The FCN runs with the shipped weights when there are some, else with random
weights -- the speed is the same, and the output says so. Timing: one warm-up batch, then
``--repeat`` timed batches; FCN and fit are timed separately (the FCN's maps are synchronised
before fit starts) and together.

    PYTHONPATH=python python bench/pipeline.py                       # CPU, batch 1 and 8
    PYTHONPATH=python python bench/pipeline.py --device cuda --batch-sizes 1 8 32
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time

import numpy as np


def _sync(torch, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="all", help="cpu, cuda, or all (cpu + cuda when available)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                    help="faces per batch (default: 1 8 on CPU, 1 8 32 on CUDA)")
    ap.add_argument("--repeat", type=int, default=3, help="timed batches per setting (default 3)")
    ap.add_argument("--method", default="ect", help="ectfast.fit method (default ect)")
    ap.add_argument("--backend", default="auto", help="ectfast.fit backend (default auto)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)

    try:
        import torch
    except ImportError:
        print("pipeline bench: PyTorch is not installed (pip install 'ectfast[torch]')")
        return 2
    try:
        model = importlib.import_module("ectfast.model")
    except ImportError as e:
        print(f"pipeline bench: the FCN module ectfast.model is not available ({e})")
        return 2
    import ectfast

    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    pretrained = model.has_pretrained()
    print(f"ectfast {ectfast.__version__}, torch {torch.__version__}, fit backends {ectfast.backends()}, "
          f"torch CPU threads {torch.get_num_threads()}")
    print("weights: shipped" if pretrained else
          "weights: RANDOM (no shipped weights) -- speed only, the landmarks are meaningless")
    pdm = ectfast.default_pdm()
    for device in devices:
        if device.startswith("cuda") and not torch.cuda.is_available():
            print(f"{device}: skipped (torch sees no CUDA device)")
            continue
        if pretrained:
            net = model.load_pretrained(device=device)
        else:
            cls = getattr(model, "ECTNet", None) or getattr(model, "FCN")
            net = cls().to(device).eval()
        name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "CPU"
        sizes = args.batch_sizes or ([1, 8] if device == "cpu" else [1, 8, 32])
        backend = args.backend
        print(f"\n{device} ({name}), method {args.method}, fit backend {backend}")
        print(f"{'batch':>5} {'FCN ms/batch':>13} {'fit ms/batch':>13} {'total ms/batch':>15} {'faces/s':>9}")
        rng = np.random.default_rng(0)
        for B in sizes:
            x = torch.from_numpy(rng.random((B, 3, 256, 256), dtype=np.float32)).to(device)
            t_fcn, t_fit = [], []
            for it in range(args.repeat + 1):
                with torch.inference_mode():
                    _sync(torch, device)
                    t0 = time.perf_counter()
                    maps = net(x)[1]
                    _sync(torch, device)
                    t1 = time.perf_counter()
                fit_in = maps if (device.startswith("cuda") and "cuda" in ectfast.backends()) else maps.cpu().numpy()
                r = ectfast.fit(fit_in, pdm, method=args.method, upsample=4, backend=backend)
                _ = np.asarray(r.landmarks if not hasattr(r.landmarks, "cpu") else r.landmarks.cpu())
                _sync(torch, device)
                t2 = time.perf_counter()
                if it:  # the first batch is the warm-up
                    t_fcn.append(t1 - t0)
                    t_fit.append(t2 - t1)
            f, g = np.median(t_fcn), np.median(t_fit)
            print(f"{B:>5} {1e3 * f:>13.1f} {1e3 * g:>13.1f} {1e3 * (f + g):>15.1f} {B / (f + g):>9.2f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
