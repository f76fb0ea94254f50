"""``ectfast bench``: throughput and accuracy of every built fit backend on synthetic maps.

Faces are random shapes of the shipped PDM placed in a size x size frame; their response maps
are Gaussian peaks of the training targets' scale, with a fraction of false peaks far away.
Prints, per backend, faces/s and the mean landmark error of ECT and CRM against the truth.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from ectfast.cli._argtypes import bounded_int, unit_float


#: (low, high) of each sized option: the maps are batch x 68 x size^2 float32, so the upper
#: bounds keep one run under about 4.5 GiB and a few minutes
LIMITS = {"batch": (1, 1024), "size": (16, 1024), "repeat": (1, 100), "reference_batch": (1, 64)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=bounded_int(*LIMITS["batch"]), default=64, help="faces per batch (default 64, at most 1024)")
    p.add_argument("--size", type=bounded_int(*LIMITS["size"]), default=256, help="map size in pixels (default 256, 16-1024)")
    p.add_argument("--outliers", type=unit_float, default=0.2, help="fraction of false peaks (default 0.2)")
    p.add_argument("--repeat", type=bounded_int(*LIMITS["repeat"]), default=3, help="timed runs per backend (median, at most 100)")
    p.add_argument("--reference-batch", type=bounded_int(*LIMITS["reference_batch"]), default=4,
                   help="faces for the (slow) reference backend (default 4, at most 64)")
    p.add_argument("--backends", nargs="*", default=None, help="subset of ectfast.backends()")
    p.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    import ectfast
    from ectfast.core import synthetic as sy

    for name, v, lo in (("--batch", args.batch, 1), ("--size", args.size, 16), ("--repeat", args.repeat, 1),
                        ("--reference-batch", args.reference_batch, 1)):
        if v < lo:
            raise SystemExit(f"ectfast bench: {name} must be >= {lo}, got {v}")
    pdm = ectfast.default_pdm()
    names = args.backends or [b for b in ectfast.backends() if b != "cuda"]
    unknown = set(names) - set(ectfast.backends())
    if unknown:
        raise SystemExit(f"ectfast bench: backends {sorted(unknown)} are not built here "
                         f"(available: {ectfast.backends()})")
    shapes = sy.random_pdm_shapes(pdm, args.batch, size=args.size, seed=args.seed)
    batch = sy.make_maps(shapes, size=args.size, outlier_fraction=args.outliers, seed=args.seed + 1)
    print(f"ectfast {ectfast.__version__}: {args.batch} faces of {pdm.n_landmarks} "
          f"{args.size}x{args.size} maps ({batch.maps.nbytes / 1e6:.0f} MB), "
          f"{args.outliers:.0%} false peaks, 5 iterations")
    print(f"{'backend':<10} {'faces':>6} {'faces/s':>10} {'ECT err px':>11} {'CRM err px':>11}")
    rates = {}
    for name in names:
        n = min(args.batch, args.reference_batch) if name == "reference" else args.batch
        maps = batch.maps[:n]
        ectfast.fit(maps[:1], pdm, backend=name)  # warm-up
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            res = ectfast.fit(maps, pdm, backend=name)
            times.append(time.perf_counter() - t0)
        crm = ectfast.fit(maps, pdm, method="crm", backend=name)
        rates[name] = n / float(np.median(times))
        err = np.linalg.norm(res.landmarks - shapes[:n], axis=-1).mean()
        err_crm = np.linalg.norm(crm.landmarks - shapes[:n], axis=-1).mean()
        print(f"{name:<10} {n:>6} {rates[name]:>10.1f} {err:>11.2f} {err_crm:>11.2f}")
    if "reference" in rates and len(rates) > 1:
        for name, r in rates.items():
            if name != "reference":
                print(f"{name} / reference: {r / rates['reference']:.0f}x")
    return 0
