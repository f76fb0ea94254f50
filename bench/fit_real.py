"""CPU time of ``ectfast.fit`` (cpu backend, 1 thread) on a trained network's real maps, per
method and per backend operation: the maps of the first N held-out training faces (the split
``ectfast train`` holds out) from the given weights (default: the shipped network), with the
fit options stored beside them. ``--core FILE`` loads another build of the extension
(``ectfast.core._core``) first, to compare two builds in alternating processes with the same
maps: CPU time (``time.process_time``), min and median of ``--repeat`` calls.

    python bench/fit_real.py                                   # the installed extension
    python bench/fit_real.py --core /tmp/old/_core.cpython-311-x86_64-linux-gnu.so
"""
from __future__ import annotations

import argparse
import collections
import importlib.machinery
import importlib.util
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data", "300w")


def load_core(path: str) -> None:
    """Make ``path`` the ``ectfast.core._core`` extension of this process (before ectfast loads it)."""
    loader = importlib.machinery.ExtensionFileLoader("ectfast.core._core", path)
    spec = importlib.util.spec_from_loader("ectfast.core._core", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    sys.modules["ectfast.core._core"] = mod


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DATA, help="300-W root (default ../shared/data/300w)")
    p.add_argument("--weights", default=None, help="weights .pt (default: the shipped network)")
    p.add_argument("--faces", type=int, default=64)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--core", default=None, help="another build of the extension to time")
    a = p.parse_args(argv)
    if a.core:
        load_core(a.core)
    sys.path.insert(0, HERE)
    import ectfast
    from ectfast.core import _dispatch
    from ectfast.nets.engine import make_estimator
    from lite_eval import estimate, holdout_faces, load

    crops = load(holdout_faces(a.data)[:a.faces])[0]
    est = make_estimator(a.weights, "cpu", "onnxruntime", threads=1)
    maps = estimate(est, crops)
    pdm = ectfast.default_pdm()
    opts = dict(upsample=256 // maps.shape[-1], backend="cpu", num_threads=1, **est.fit_options)
    spent = collections.Counter()
    get_ops = _dispatch.get_ops

    def timed_ops(*args, **kw):  # every backend operation timed
        ops = get_ops(*args, **kw)

        class Timed:
            def __getattr__(self, name):
                f = getattr(ops, name)
                if not callable(f):
                    return f

                def g(*x, **k):
                    t = time.process_time()
                    try:
                        return f(*x, **k)
                    finally:
                        spent[name] += time.process_time() - t
                return g
        return Timed()

    print(f"extension {a.core or 'installed'}; {len(maps)} faces, maps {maps.shape[-1]}x{maps.shape[-1]}, "
          f"fit options {est.fit_options}; CPU time per face, 1 thread")
    for method in ("crm", "crm-pdm", "crm-clm", "ect"):
        ts = []
        for _ in range(a.repeat):
            t = time.process_time()
            ectfast.fit(maps, pdm, method=method, **opts)
            ts.append(time.process_time() - t)
        print(f"  {method:<8} min {1e3 * min(ts) / len(maps):.3f}  median {1e3 * np.median(ts) / len(maps):.3f} ms/face")
    _dispatch.get_ops = timed_ops
    for _ in range(a.repeat):
        ectfast.fit(maps, pdm, method="ect", **opts)
    _dispatch.get_ops = get_ops
    per = {k: round(1e3 * v / a.repeat / len(maps), 3) for k, v in spent.most_common() if v > 0}
    print(f"  ECT by operation (mean, ms/face): {per}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
