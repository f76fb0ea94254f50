"""Throughput of ectfast.fit: the NumPy ``reference`` backend vs the C++ ``cpu`` backend, in one run.

    PYTHONPATH=python python3 bench/fit_cpu.py [--batch 64] [--threads 1,2] [--repeat 3]

On synthetic 256x256 response maps (68 points, float32, Gaussian peaks of the FCN target's scale,
10% outliers, 10% occluded, light noise), method ect, 5 iterations. Reports faces/s of each
backend (the reference is timed on --ref-faces faces only: it is slow), the cpu backend's time
split (the argmax pass over the maps vs everything else), and the memory-bandwidth floor: the
time NumPy takes to read the same maps once (``maps.max()``, single-threaded), since Estimation
must read every map value. Optionally (--upsample-size 64) also 64x64 maps fitted with
upsample=4, which the cpu backend samples on the fly without materialising 256x256 maps.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

import ectfast
from ectfast.core import synthetic
from ectfast.core._cpu import CpuOps


def make_batch(pdm, B, size, seed=0, noise=0.01):
    rng = np.random.default_rng(seed)
    shapes = synthetic.random_pdm_shapes(pdm, B, size=size, seed=seed)
    peaks = shapes.copy()
    n = pdm.n_landmarks
    for f in range(B):  # 10% false peaks far away
        idx = rng.choice(n, n // 10, replace=False)
        peaks[f, idx] = rng.uniform(2, size - 3, (len(idx), 2))
    maps = synthetic.gaussian_maps(peaks, size, size, synthetic.TARGET_SIGMA_256 * size / 256.0,
                                   dtype=np.float32)
    for f in range(B):  # noise and 10% occluded, face by face (no B-sized float64 temporaries)
        maps[f] += rng.normal(0, noise, maps.shape[1:]).astype(np.float32)
        maps[f, rng.choice(n, n // 10, replace=False)] = 0.0
    return maps


def best_time(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64, help="faces per fit call (cpu backend)")
    ap.add_argument("--size", type=int, default=256, help="map size (H = W)")
    ap.add_argument("--threads", default="1,2", help="comma-separated cpu thread counts")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per configuration (best kept)")
    ap.add_argument("--ref-faces", type=int, default=8, help="faces the reference is timed on")
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--method", default="ect", choices=ectfast.METHODS)
    ap.add_argument("--upsample-size", type=int, default=64,
                    help="also time SxS maps with upsample=4 (0: skip)")
    args = ap.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    pdm = ectfast.default_pdm()
    kw = dict(method=args.method, iterations=args.iterations)

    maps = make_batch(pdm, args.batch, args.size)
    mb_face = maps[0].nbytes / 1e6
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, "
          f"load avg {os.getloadavg()[0]:.2f} at start; numpy {np.__version__}")
    print(f"# maps: B={args.batch} x {pdm.n_landmarks} x {args.size}x{args.size} float32 "
          f"= {maps.nbytes / 1e9:.2f} GB ({mb_face:.1f} MB per face); method {args.method}, "
          f"{args.iterations} iterations")

    # bandwidth floor: one single-threaded NumPy read of the same maps
    t_read = best_time(lambda: maps.max(), args.repeat)
    gbs = maps.nbytes / t_read / 1e9
    print(f"# numpy read (maps.max(), 1 thread): {gbs:.1f} GB/s -> floor "
          f"{args.batch / t_read:.0f} faces/s for reading the maps once")

    rows = []
    nref = min(args.ref_faces, args.batch)
    t_ref = best_time(lambda: ectfast.fit(maps[:nref], pdm, backend="reference", **kw),
                      max(1, min(args.repeat, 2)))
    ref_fps = nref / t_ref
    rows.append(("reference", "-", nref, ref_fps, None, None))

    # same results? (on the reference's faces)
    r = ectfast.fit(maps[:nref], pdm, backend="reference", **kw)
    c = ectfast.fit(maps[:nref], pdm, backend="cpu", **kw)
    diff = float(np.abs(r.landmarks - c.landmarks).max())

    for t in threads:
        ops = CpuOps(num_threads=t)
        t_fit = best_time(lambda: ectfast.fit(maps, pdm, backend="cpu", num_threads=t, **kw), args.repeat)
        t_arg = best_time(lambda: ops.argmax(maps), args.repeat)
        rows.append(("cpu", t, args.batch, args.batch / t_fit, t_arg / t_fit,
                     maps.nbytes / t_arg / 1e9))

    print(f"\n{'backend':<10} {'threads':>7} {'faces':>6} {'faces/s':>10} {'x ref':>8} "
          f"{'ms/face':>8} {'argmax share':>13} {'argmax GB/s':>12}")
    for name, t, nf, fps, share, agbs in rows:
        print(f"{name:<10} {t!s:>7} {nf:>6} {fps:>10.1f} {fps / ref_fps:>8.1f} {1e3 / fps:>8.3f} "
              f"{'' if share is None else f'{100 * share:.0f}%':>13} "
              f"{'' if agbs is None else f'{agbs:.1f}':>12}")
    print(f"max |cpu - reference| landmark difference on {nref} faces: {diff:.2e} px")
    del maps

    if args.upsample_size:
        s = args.upsample_size
        small = make_batch(pdm, args.batch, s)
        print(f"\n# upsample=4: B={args.batch} x {pdm.n_landmarks} x {s}x{s} float32 maps "
              f"({small[0].nbytes / 1e6:.2f} MB per face) fitted at {4 * s}x{4 * s}")
        nref_u = min(nref, 4)
        t_ref_u = best_time(lambda: ectfast.fit(small[:nref_u], pdm, backend="reference", upsample=4, **kw), 1)
        ref_u = nref_u / t_ref_u
        r = ectfast.fit(small[:nref_u], pdm, backend="reference", upsample=4, **kw)
        c = ectfast.fit(small[:nref_u], pdm, backend="cpu", upsample=4, **kw)
        print(f"{'backend':<28} {'threads':>7} {'faces/s':>10} {'x ref':>8}")
        print(f"{'reference':<28} {'-':>7} {ref_u:>10.1f} {1.0:>8.1f}")
        for t in threads:
            for lazy in (True, False):
                ops = CpuOps(num_threads=t, lazy_upsample=lazy)

                def run():  # what fit does, with this ops object (lazy or materialising)
                    import ectfast.core._dispatch as d
                    orig = d.get_ops
                    d.get_ops = lambda *a, **k: ops
                    try:
                        ectfast.fit(small, pdm, backend="cpu", upsample=4, **kw)
                    finally:
                        d.get_ops = orig

                fps = args.batch / best_time(run, args.repeat)
                label = "cpu on the fly" if lazy else "cpu materialised 256x256"
                print(f"{label:<28} {t:>7} {fps:>10.1f} {fps / ref_u:>8.1f}")
        print(f"max |cpu - reference| landmark difference on {nref_u} faces: "
              f"{float(np.abs(r.landmarks - c.landmarks).max()):.2e} px")
    print(f"# load avg {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
