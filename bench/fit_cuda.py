"""Throughput of ectfast.fit on the cuda backend, with the cpu and reference backends in the same run.

    python bench/fit_cuda.py                      # defaults below, method "ect"
    python bench/fit_cuda.py --method crm-clm --dtype float16

Measures faces/s for
  * 256x256 float maps (as the FCN's UpsampleNet outputs them): B in {1, 64, 1024};
  * 64x64 maps fitted with upsample=4 (sampled bilinearly inside the kernels): B in {1, 64, 1024, 8192};
through ectfast.fit (one binding call per step) with the device Cholesky, through the fused
path (ectfast.core._cuda.fit_fused: the whole fit in one call) and with the host (Eigen) solve of the
(4+m)x(4+m) systems (ECTFAST_CUDA_SOLVER=host), and prints the memory-bandwidth floor: the time to read every map once
at the device's peak bandwidth (from its bus width and memory clock) and at the bandwidth a plain
torch reduction over the same maps reaches. The cpu and reference backends run on the same maps
(reference only for small B: it is plain Python loops); the cuda results are checked against the
reference (max |difference| in px). The GPU is named in the output.

Without a CUDA device this prints why and exits with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def _parse_batches(s):
    return tuple(int(v) for v in s.split(",") if v)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="ect")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--batches-256", type=_parse_batches, default=(1, 64, 1024))
    ap.add_argument("--batches-64", type=_parse_batches, default=(1, 64, 1024, 8192))
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per point (median reported)")
    ap.add_argument("--reference-max-batch", type=int, default=4)
    ap.add_argument("--cpu-max-batch", type=int, default=64)
    ap.add_argument("--distinct-faces", type=int, default=16,
                    help="distinct synthetic faces generated on the host; larger batches tile them")
    args = ap.parse_args(argv)

    import ectfast
    from ectfast.core.synthetic import gaussian_maps, make_maps, random_pdm_shapes

    available = ectfast.backends()
    if "cuda" not in available:
        try:
            from ectfast.core import _core

            why = ("the extension was built without CUDA" if not getattr(_core, "cuda_built", False)
                   else "no CUDA device/driver is usable here")
        except ImportError:
            why = "the compiled extension is not built"
        print(f"bench/fit_cuda.py: cannot measure the cuda backend: {why} (backends here: {available}).",
              file=sys.stderr)
        return 2
    try:
        import torch
    except ImportError:
        print("bench/fit_cuda.py: needs torch (with CUDA) to hold the maps on the device", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench/fit_cuda.py: torch reports no CUDA device (CPU-only torch build?)", file=sys.stderr)
        return 2

    from ectfast.core import _core
    from ectfast.core._cuda import fit_fused

    info = _core.cuda_device_info(0)
    peak_bw = 2.0 * info["memory_clock_khz"] * 1e3 * info["bus_width_bits"] / 8.0  # bytes/s (DDR)
    print(f"GPU: {info['name']} (sm_{info['major']}{info['minor']}, {info['sm_count']} SMs), "
          f"peak memory bandwidth {peak_bw / 1e12:.2f} TB/s (from bus width x clock)")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); method={args.method}, maps dtype={args.dtype}, "
          f"median of {args.repeats} runs; backends: {available}")
    pdm = ectfast.default_pdm()
    tdtype = getattr(torch, args.dtype)

    def timed(fn, repeats):
        fn()  # warm-up (PDM upload, allocator)
        torch.cuda.synchronize()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts))

    def read_bandwidth(maps):
        t = timed(lambda: maps.amax(), args.repeats)
        return maps.numel() * maps.element_size() / t

    def run(label, maps_host, factor, B):
        reps = -(-B // maps_host.shape[0])
        dev = torch.as_tensor(maps_host, device="cuda").to(tdtype)
        dev = dev.repeat(reps, 1, 1, 1)[:B].contiguous()
        nbytes = dev.numel() * dev.element_size()
        bw = read_bandwidth(dev)
        floor_peak = nbytes / peak_bw if peak_bw > 0 else float("nan")
        floor_meas = nbytes / bw
        res = {}
        for solver in ("device", "host"):
            os.environ["ECTFAST_CUDA_SOLVER"] = solver
            t = timed(lambda: ectfast.fit(dev, pdm, method=args.method, upsample=factor, backend="cuda"),
                      args.repeats)
            res[solver] = t
        os.environ.pop("ECTFAST_CUDA_SOLVER", None)
        res["fused"] = timed(lambda: fit_fused(dev, pdm, method=args.method, upsample=factor), args.repeats)
        line = (f"{label:>16} B={B:<5d} cuda {B / res['device']:>10.0f} faces/s "
                f"({res['device'] * 1e3:8.2f} ms) | fused {B / res['fused']:>10.0f} faces/s | "
                f"host-Eigen solve {B / res['host']:>9.0f} faces/s | "
                f"read-once floor {floor_peak * 1e3:7.3f} ms at peak, {floor_meas * 1e3:7.3f} ms at measured "
                f"{bw / 1e12:.2f} TB/s ({B / floor_peak:.0f} / {B / floor_meas:.0f} faces/s)")
        host = dev.float().cpu().numpy() if B <= max(args.cpu_max_batch, args.reference_max_batch) else None
        if "cpu" in available and B <= args.cpu_max_batch:
            try:
                t = timed(lambda: ectfast.fit(host, pdm, method=args.method, upsample=factor, backend="cpu"), 1)
                line += f" | cpu {B / t:.0f} faces/s"
            except Exception as e:  # the cpu backend is another module; report, keep measuring
                line += f" | cpu failed: {type(e).__name__}: {e}"
        if B <= args.reference_max_batch:
            t0 = time.perf_counter()
            ref = ectfast.fit(host, pdm, method=args.method, upsample=factor, backend="reference")
            t = time.perf_counter() - t0
            got = ectfast.fit(dev, pdm, method=args.method, upsample=factor, backend="cuda")
            diff = np.abs(got.landmarks.cpu().numpy() - ref.landmarks).max()
            line += f" | reference {B / t:.1f} faces/s, max |cuda - reference| = {diff:.2e} px"
        print(line, flush=True)
        del dev

    distinct = args.distinct_faces
    shapes = random_pdm_shapes(pdm, distinct, seed=0)
    maps256 = make_maps(shapes, outlier_fraction=0.1, occluded_fraction=0.05, seed=1).maps
    for B in args.batches_256:
        run("256x256", maps256[: min(B, distinct)], 1, B)
    maps64 = gaussian_maps((shapes + 0.5) / 4.0 - 0.5, 64, 64, sigma=1.5)
    for B in args.batches_64:
        run("64x64 upsample=4", maps64[: min(B, distinct)], 4, B)
    return 0


if __name__ == "__main__":
    sys.exit(main())
