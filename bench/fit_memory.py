"""Memory of a long-running fit loop: RSS over many ``ectfast.fit`` calls on small batches.

A library used inside other people's pipelines must not grow: this calls ``ectfast.fit`` N times
per backend, cycling through a pool of prepared batches (every method, with and without early
stop, 64x64 maps upsampled x4 and 256x256 maps; 2 faces a call, 1 on the slow reference), and
every 50th call is an error path (maps with a NaN: ValueError). It records the resident set size (VmRSS) every ``--every`` calls and reports the
growth after the warm-up and the slope over the second half.

    OMP_NUM_THREADS=1 python bench/fit_memory.py                       # cpu 100,000, reference 5,000
    OMP_NUM_THREADS=1 python bench/fit_memory.py --calls 1000 --reference-calls 100   # a quick look

Prints one line per sample and a summary per backend; ``--json PATH`` writes the samples.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import numpy as np


def rss_kib() -> int:
    """Resident set size of this process in KiB (Linux /proc; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def make_pool(pdm, batch: int, seed: int):
    """(maps, kwargs) cases cycled by the loop: the FCN's 64x64 maps fitted with upsample=4 in the
    256 frame (six cases), 256x256 maps (two cases); every method, early stop on every third."""
    from ectfast import METHODS
    from ectfast.core import synthetic as sy

    pool = []
    rng = np.random.default_rng(seed)
    for k in range(8):
        s = int(rng.integers(0, 2**31))
        shapes = sy.random_pdm_shapes(pdm, batch, size=256, seed=s)
        if k in (3, 6):
            maps = sy.make_maps(shapes, size=256, outlier_fraction=0.2, occluded_fraction=0.05, seed=s + 1).maps
            up = 1
        else:
            maps = sy.make_maps((shapes + 0.5) / 4 - 0.5, size=64, outlier_fraction=0.2, occluded_fraction=0.05,
                                seed=s + 1).maps
            up = 4
        method = METHODS[k % len(METHODS)]
        pool.append((maps, dict(method=method, upsample=up, early_stop=1e-2 if k % 3 == 0 else None)))
    bad = pool[0][0].copy()
    bad[0, 3, 10, 10] = np.nan
    return pool, (bad, pool[0][1])


def run(backend: str, calls: int, every: int, batch: int, seed: int, quiet: bool):
    import ectfast

    pdm = ectfast.default_pdm()
    pool, bad = make_pool(pdm, batch, seed)
    for maps, kw in pool:  # warm-up: every path once (imports, caches, allocator pools)
        ectfast.fit(maps, pdm, backend=backend, **kw)
    gc.collect()
    samples = [(0, rss_kib(), 0.0)]
    errors = 0
    t0 = time.perf_counter()
    for i in range(1, calls + 1):
        if i % 50 == 0:
            try:
                ectfast.fit(bad[0], pdm, backend=backend, **bad[1])
            except ValueError:
                errors += 1
        else:
            maps, kw = pool[i % len(pool)]
            res = ectfast.fit(maps, pdm, backend=backend, **kw)
            del res
        if i % every == 0 or i == calls:
            samples.append((i, rss_kib(), time.perf_counter() - t0))
            if not quiet:
                print(f"{backend:<10} {i:>8} calls  RSS {samples[-1][1] / 1024:8.1f} MiB  {samples[-1][2]:7.1f} s",
                      flush=True)
    calls_arr = np.array([s[0] for s in samples], float)
    rss = np.array([s[1] for s in samples], float)
    half = calls_arr >= calls / 2
    slope = float(np.polyfit(calls_arr[half], rss[half], 1)[0]) * 1000 if half.sum() >= 2 else float("nan")
    summary = dict(backend=backend, calls=calls, batch=batch, error_calls=errors,
                   rss_start_mib=rss[0] / 1024, rss_end_mib=rss[-1] / 1024, rss_max_mib=rss.max() / 1024,
                   growth_mib=(rss[-1] - rss[0]) / 1024, slope_kib_per_1000_calls_second_half=slope,
                   seconds=samples[-1][2], calls_per_s=calls / samples[-1][2])
    return summary, samples


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=100_000, help="fit calls on the cpu backend (default 100,000)")
    p.add_argument("--reference-calls", type=int, default=5_000,
                   help="fit calls on the reference backend (default 5,000: it is plain Python, ~0.1 s a call)")
    p.add_argument("--batch", type=int, default=2, help="faces per call (default 2)")
    p.add_argument("--reference-batch", type=int, default=1, help="faces per reference call (default 1)")
    p.add_argument("--every", type=int, default=0, help="calls between RSS samples (default calls / 50)")
    p.add_argument("--backends", nargs="*", default=None, help="default: cpu (if built) and reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the samples and summaries here")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    import ectfast

    names = args.backends or [b for b in ("cpu", "reference") if b in ectfast.backends()]
    print(f"ectfast {ectfast.__version__}, numpy {np.__version__}, python {sys.version.split()[0]}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, batch {args.batch}", flush=True)
    out = {}
    for name in names:
        n = args.reference_calls if name == "reference" else args.calls
        if n < 1:
            continue
        batch = args.reference_batch if name == "reference" else args.batch
        every = args.every or max(1, n // 50)
        summary, samples = run(name, n, every, batch, args.seed, args.quiet)
        out[name] = dict(summary=summary, samples=samples)
        print("summary " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in summary.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
