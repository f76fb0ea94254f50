"""Speed of narrower LiteUNet widths (the ``c`` and ``width`` arguments), to size a network for
the 300 faces/s target: parameters, GFLOP/face, ONNX Runtime fp32 net alone and net + ECT fit
(cpu backend) at batch 32 with 2 threads, and one training step (batch 32, 2 threads, fp32 +
channels_last, a stand-in squared loss). Random weights: the fit's time on a random net's noisy
maps is higher than on trained maps (bench/RESULTS.md, "Speed target").

    python bench/lite_widths.py
"""
from __future__ import annotations

import os
import tempfile
import time
import warnings

import numpy as np
import torch

import ectfast
from ectfast.nets.engine import OnnxEstimator
from ectfast.nets.export import export_onnx
from ectfast.nets.model import LiteUNet, conv_flops, count_parameters

WIDTHS = [((32, 64, 96, 128), 64), ((24, 48, 72, 96), 48), ((16, 32, 64, 96), 48), ((16, 32, 48, 64), 32)]


def rate(fn, seconds: float = 3.0, batch: int = 32) -> float:
    """Best of two timed passes, faces/s."""
    fn()
    best = 0.0
    for _ in range(2):
        t, n = time.perf_counter(), 0
        while time.perf_counter() - t < seconds:
            fn()
            n += 1
        best = max(best, batch * n / (time.perf_counter() - t))
    return best


def train_step_seconds(c, w, steps: int = 4) -> float:
    tr = LiteUNet(c=c, width=w).train().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(tr.parameters(), 1e-3)
    xb = torch.rand(32, 3, 128, 128).contiguous(memory_format=torch.channels_last)

    def step():
        loss = sum((o ** 2).mean() for o in tr(xb))
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps


def main() -> int:
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    tmp = tempfile.mkdtemp(prefix="ectfast-widths-")
    pdm = ectfast.default_pdm()
    x = np.random.default_rng(0).random((32, 3, 256, 256), dtype=np.float32)
    for c, w in WIDTHS:
        torch.manual_seed(0)
        net = LiteUNet(c=c, width=w).eval()
        net.arch, net.input_size = "lite", 128
        path = export_onnx(net, os.path.join(tmp, f"n{c[0]}_{w}.onnx"))
        est = OnnxEstimator(path, threads=2)
        r_net = rate(lambda: est(x))
        r_fit = rate(lambda: ectfast.fit(est(x), pdm, method="ect", upsample=8, backend="cpu", a=0.25, b=30, rho=40))
        print(f"c={c} width={w}: {count_parameters(net) / 1e6:.2f} M parameters, {conv_flops(net, 128) / 1e9:.3f} GFLOP, "
              f"onnxruntime net {r_net:.0f} / + ECT fit {r_fit:.0f} faces/s, training step "
              f"{train_step_seconds(c, w):.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
