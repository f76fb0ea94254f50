"""Estimation-network throughput: forward faces/s on CPU (and CUDA), the network + fit rate,
and (on CUDA) a training step's images/s.

    python bench/fcn.py --arch lite --threads 2           # CPU rows of the shipped lite net + fit
    python bench/fcn.py --arch paper --no-cuda            # the paper FCN on CPU (batch 1 only)
    python bench/fcn.py --arch paper --train              # + training-step throughput (CUDA)

CPU rows (--arch lite): batch 1 and 32, fp32 and bf16 autocast, each also with channels_last;
then "net + fit": the network on batch-32 256x256 crops (averaged to its input inside the
estimator, as the detector does) followed by ``ectfast.fit(method="ect", upsample=256 / map size)`` on the
cpu backend, in faces/s.

CUDA variants (batch 1 and 256): fp32, bf16 autocast, bf16 + channels_last, bf16 +
channels_last + torch.compile, and for batch 1 a CUDA graph of the bf16 channels_last forward.
Timings use CUDA events after warm-up; weights are random (speed does not depend on them).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from ectfast.nets.model import ARCHS, FCN, build, count_parameters, forward_flops  # noqa: E402

TRAIN_SET = 2012  # faces per epoch in the compact 300-W copy


def bench_cpu(threads: int, iters: int) -> float:
    torch.set_num_threads(threads)
    m = FCN().eval()
    x = torch.rand(1, 3, 256, 256)
    with torch.inference_mode():
        m(x)
        t = time.perf_counter()
        for _ in range(iters):
            m(x)
        dt = time.perf_counter() - t
    return iters / dt


def _rate(fn, batch: int, min_seconds: float = 2.0) -> float:
    fn()
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < min_seconds or n < 3:
        fn()
        n += 1
    return n * batch / (time.perf_counter() - t)


def _fit(maps, pdm, options=None):
    """ECT on the CPU backend in the 256 frame, whatever the maps' size (32 or 64)."""
    import ectfast

    return ectfast.fit(maps, pdm, method="ect", upsample=256 // maps.shape[-1], backend="cpu", **(options or {}))


def bench_cpu_lite(threads: int, arch: str = "lite"):
    """Rows {batch, variant, faces_per_s} of the CPU forward, and the net + fit rate."""
    import ectfast

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    m = build(arch).eval()
    size = m.input_size
    rows = []
    for B in (1, 32):
        x = torch.rand(B, 3, size, size)
        for cl in (False, True):
            net = m.to(memory_format=torch.channels_last) if cl else m.to(memory_format=torch.contiguous_format)
            inp = x.contiguous(memory_format=torch.channels_last) if cl else x
            for dt in (None, torch.bfloat16):
                def fn(net=net, inp=inp, dt=dt):
                    with torch.inference_mode(), torch.autocast("cpu", dtype=dt or torch.float32, enabled=dt is not None):
                        return net(inp)
                name = ("bf16" if dt else "fp32") + ("+channels_last" if cl else "")
                rows.append({"batch": B, "variant": name, "faces_per_s": _rate(fn, B)})
    # the network + fit on batch-32 crops of 256 x 256, as the detector runs them
    net = m.to(memory_format=torch.contiguous_format)
    crops = torch.rand(32, 3, 256, 256)
    pdm = ectfast.default_pdm()

    def pipeline():
        with torch.inference_mode():
            maps = net(torch.nn.functional.avg_pool2d(crops, 256 // size))[1].numpy()
        return _fit(maps, pdm)

    def net_only():
        with torch.inference_mode():
            return net(torch.nn.functional.avg_pool2d(crops, 256 // size))

    rows.append({"batch": 32, "variant": "torch fp32 net + ECT fit (cpu)", "faces_per_s": _rate(pipeline, 32),
                 "net_only_faces_per_s": _rate(net_only, 32)})
    # the shipped ONNX files with ONNX Runtime (the plain-install engine), same crops: fp32 and
    # int8; test-time flip (off by default) runs the net twice
    from ectfast.nets.engine import make_estimator

    x = crops.numpy()
    for precision, flip in (("fp32", False), ("int8", False), ("fp32", True)):
        variant = f"onnxruntime {precision} net + ECT fit (cpu)" + (", test-time flip" if flip else "")
        try:
            est = make_estimator(None, "cpu", "onnxruntime", threads=threads, flip=flip, precision=precision)
        except (ImportError, FileNotFoundError, ValueError) as e:  # no onnxruntime / no shipped file
            rows.append({"batch": 32, "variant": variant, "faces_per_s": float("nan"), "error": str(e)[:200]})
            continue
        # the network's own fit options, as the detector uses them
        rows.append({"batch": 32, "variant": variant,
                     "faces_per_s": _rate(lambda: _fit(est(x), pdm, est.fit_options), 32),
                     "net_only_faces_per_s": _rate(lambda: est(x), 32)})
    return rows


def _cuda_time(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 1000 / iters


def bench_cuda(batches, compile_model: bool):
    rows = []
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    for B in batches:
        iters = 50 if B == 1 else 10
        base = FCN().to(dev).eval()
        x = torch.rand(B, 3, 256, 256, device=dev)
        variants = [("fp32", base, x, None),
                    ("bf16", base, x, torch.bfloat16)]
        cl = FCN().to(dev).eval().to(memory_format=torch.channels_last)
        xcl = x.contiguous(memory_format=torch.channels_last)
        variants.append(("bf16+channels_last", cl, xcl, torch.bfloat16))
        if compile_model:
            variants.append(("bf16+channels_last+compile", torch.compile(cl), xcl, torch.bfloat16))
        for name, m, inp, dt in variants:
            def fn(m=m, inp=inp, dt=dt):
                with torch.inference_mode(), torch.autocast("cuda", dtype=dt or torch.float32, enabled=dt is not None):
                    return m(inp)
            try:
                s = _cuda_time(fn, iters)
                rows.append({"batch": B, "variant": name, "ms": s * 1e3, "faces_per_s": B / s})
            except Exception as e:  # e.g. compile unavailable
                rows.append({"batch": B, "variant": name, "error": f"{type(e).__name__}: {e}"[:200]})
        if B == 1:  # CUDA graph of the bf16 channels_last forward
            static = xcl.clone()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s), torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                for _ in range(3):
                    cl(static)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16), torch.cuda.graph(g):
                cl(static)
            t = _cuda_time(g.replay, 200)
            rows.append({"batch": 1, "variant": "bf16+channels_last+cuda_graph", "ms": t * 1e3, "faces_per_s": 1 / t})
        del base, cl
        torch.cuda.empty_cache()
    return rows


def bench_train(batch: int, compile_model: bool, steps: int = 20):
    """Images/s of full training steps (augmentation + targets + bf16 forward/backward + AdamW)
    on synthetic margin crops, through the real Trainer."""
    import numpy as np

    from ectfast.nets import data as D
    from ectfast.nets.train import Trainer

    n = max(4 * batch, 256)
    rng = np.random.default_rng(0)
    lm = rng.uniform(90, 200, (n, 68, 2)).astype(np.float32)
    cs = D.CropSet(rng.integers(0, 256, (n, 288, 288, 3), dtype=np.uint8), lm, np.ones((n, 68), bool),
                   np.array([str(i) for i in range(n)]))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        t = Trainer(cs, None, tmp, arch="paper", loss=None, epochs=10, batch_size=batch, lr=1e-3,
                    weight_decay=1e-4, seed=0, input_size=256, warmup=0.03, clip=5.0, device="cuda", amp="bf16", channels_last=True,
                    compile_model=compile_model, ckpt_every=0, val_every=10**9, log_every=10**9,
                    progress=False, augment=True, data_desc="synthetic")
        for _ in range(5):
            t.train_step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            loss, _ = t.train_step()
        float(loss)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    ips = steps * batch / dt
    return {"batch": batch, "compile": compile_model, "img_per_s": ips,
            "epochs_per_min": ips * 60 / TRAIN_SET, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="lite", choices=sorted(ARCHS),
                   help="architecture of the torch rows (random weights); the ONNX rows are the shipped file's")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--iters", type=int, default=5, help="CPU iterations")
    p.add_argument("--no-cuda", action="store_true")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--train", action="store_true", help="also time training steps (CUDA)")
    p.add_argument("--train-batch", type=int, nargs="+", default=[32, 64])
    p.add_argument("--skip-forward", action="store_true", help="only the training-step timing (with --train)")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    res = {"arch": a.arch, "params_M": count_parameters(build(a.arch)) / 1e6,
           "gflop_per_face": forward_flops(arch=a.arch) / 1e9}
    print(f"{a.arch}: {res['params_M']:.2f} M parameters, {res['gflop_per_face']:.2f} GFLOP per face (forward)")
    if a.arch != "paper":
        print(f"CPU: {a.threads} threads, torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}")
        res["cpu"] = bench_cpu_lite(a.threads, a.arch)
        for r in res["cpu"]:
            extra = f"  (net alone {r['net_only_faces_per_s']:.0f})" if "net_only_faces_per_s" in r else ""
            print(f"  batch {r['batch']:>3} {r['variant']:<34} {r['faces_per_s']:9.1f} faces/s{extra}")
        a.skip_forward = True
    elif not a.skip_forward:
        cpu = bench_cpu(a.threads, a.iters)
        res["cpu_batch1_fp32_faces_per_s"] = cpu
        print(f"CPU ({a.threads} threads) batch 1 fp32: {cpu:.2f} faces/s ({1e3 / cpu:.0f} ms/face)")
    if a.no_cuda or not torch.cuda.is_available():
        print("CUDA: skipped (no GPU)" if not a.no_cuda else "CUDA: skipped (--no-cuda)")
    else:
        print(f"CUDA: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
        res["cuda_device"] = torch.cuda.get_device_name(0)
        res["cuda"] = [] if a.skip_forward else bench_cuda([1, 256], not a.no_compile)
        for r in res["cuda"]:
            if "error" in r:
                print(f"  batch {r['batch']:>3} {r['variant']:<32} failed: {r['error']}")
            else:
                print(f"  batch {r['batch']:>3} {r['variant']:<32} {r['ms']:8.2f} ms  {r['faces_per_s']:9.1f} faces/s")
        if a.train:
            res["train"] = []
            for B in a.train_batch:
                for comp in ([False] if a.no_compile else [False, True]):
                    try:
                        r = bench_train(B, comp)
                    except Exception as e:
                        r = {"batch": B, "compile": comp, "error": f"{type(e).__name__}: {e}"[:300]}
                    res["train"].append(r)
                    print("  train", json.dumps(r))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
