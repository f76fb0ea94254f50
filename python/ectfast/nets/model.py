"""The Estimation networks of ECT: fully convolutional networks that map a face crop to one
response map per landmark (DESIGN.md, "FCN" and "Estimation network sized for CPU"). Needs
PyTorch; ``import ectfast`` does not import this module. Chosen by name (:func:`build`):

==========  ==========  ===========  ==========  ==========  =======================================
arch        input       maps         parameters  GFLOP/face  use
==========  ==========  ===========  ==========  ==========  =======================================
``lite``    128 x 128   32 x 32      0.68 M      0.64        ``ectfast train``'s default
``lite64``  128 x 128   64 x 64      0.70 M      0.81        ``lite`` + a 64-px refinement head
``lite-hr`` 256 x 256   32 x 32      0.68 M      0.69        ``lite`` reading the full 256 crop; ships
``paper``   256 x 256   64 x 64 (+   10.0 M      93          the paper's FCN, for GPU users
                        256 x 256)
==========  ==========  ===========  ==========  ==========  =======================================

(GFLOP = 2 x multiply-adds of the convolutions, :func:`forward_flops`.) Both work in the paper's
256-pixel frame: a face is cropped to 256 x 256 (``ectfast.nets.data.crop_face``), the lite net sees it
averaged 2 x 2 to 128 x 128, and its 32 x 32 maps are fitted with ``ectfast.fit(...,
upsample=8)`` (map pixel ``i`` sits at ``8 i + 3.5`` of the 256 frame), so the fit's patch sizes,
rho and the target scale of Eq. 15 are the paper's. The 64 x 64 maps of ``lite64`` and the
paper FCN use ``upsample=4`` (map pixel ``i`` at ``4 i + 1.5``). ``lite-hr`` sees the 256 x 256
crop itself (a high-resolution branch beside the averaged input, :class:`LiteUNetHR`) and gives
32 x 32 maps like ``lite``.

The lite network (:class:`LiteUNet`) keeps the paper's ideas in a CPU-sized form: a PrimaryNet
(a U-Net of dense 3 x 3 convolutions, 128 -> 8 px and back to 32 px, with depthwise-separable
multi-scale dilated blocks at 8 px) gives intermediate-supervision maps, and a FusionNet (the
primary maps concatenated with the decoder features, two depthwise-separable dilated-inception
blocks with dilations 1, 2, 3 and a 5x5 d3 branch) gives the final maps; BatchNorm after every
convolution. Its ``forward`` returns ``(primary32, fusion32)``. It replaced a MobileNetV2-style
form (0.24 M parameters, 0.22 GFLOP) that cost as much per training step on this project's CPU
(the backward pass of depthwise convolutions is slow there) and learned less (bench/RESULTS.md,
"Lite network").

The paper FCN (:class:`FCN`) follows.

Input convention
----------------
``forward(x)`` takes ``x`` of shape (B, 3, H, W), float, **RGB in [0, 1]** (H = W = 256 for the
trained model; the net is fully convolutional, so any H, W divisible by 4 runs). The model
normalises inside: ``(x - MEAN) / STD`` per channel with MEAN = (0.485, 0.456, 0.406),
STD = (0.229, 0.224, 0.225) (fixed buffers, part of the state dict). It returns the tuple
``(primary64, fusion64, up256)``: the PrimaryNet and FusionNet maps at H/4 x W/4 and the final
maps at H x W (the FusionNet maps upsampled x4 by the fixed bilinear UpsampleNet).

Architecture and every kernel size (those not fixed by DESIGN.md are this project's choice,
marked *chosen*). Every conv is followed by ReLU except the two 68-channel outputs; all
"same" padding (padding = dilation * (k - 1) / 2).

PrimaryNet (input 3 x 256 x 256)
    conv1   5x5, 3 -> 128, then 2x2 max-pool stride 2            -> 128 x 128 x 128
    conv2   5x5, 128 -> 128, then 2x2 max-pool stride 2          -> 128 x 64 x 64
    conv3   5x5, 128 -> 128                                      -> 128 x 64 x 64
    conv4   four parallel 3x3 branches (*chosen* 3x3), dilation 1, 2, 3, 4, 128 -> 128 each,
            concatenated                                         -> 512 x 64 x 64
    conv5   four parallel 3x3 branches (*chosen* 3x3), dilation 1, 2, 3, 4, 512 -> 256 each,
            concatenated                                         -> 1024 x 64 x 64
    conv6   1x1, 1024 -> 512
    conv7   1x1, 512 -> 256
    conv8   1x1, 256 -> 68, no ReLU                              -> primary64
FusionNet (input concat(conv3, conv7) = 384 x 64 x 64)
    block1  dilated inception, 3 branches x 64: 3x3 d1, 3x3 d2, 5x5 d3      -> 192
    block2  dilated inception, 4 branches x 64: 1x1, 3x3 d1, 3x3 d2, 5x5 d3 -> 256
    block3  dilated inception, 4 branches x 128: 1x1, 3x3 d1, 3x3 d2, 5x5 d3 -> 512
            (*chosen*: the branches before the last one; DESIGN.md fixes only the last branch
            of each block as 5x5 with dilation 3)
    fuse1   1x1, 512 -> 256
    fuse2   1x1, 256 -> 68, no ReLU                              -> fusion64
UpsampleNet
    ConvTranspose2d(68, 68, kernel 8, stride 4, padding 2, groups 68, no bias), weights fixed
    to the separable bilinear kernel K[j] = 1 - |j - 3.5| / 4 (outer(K, K)), the same kernel as
    ``ectfast.core._reference.upsample_matrix(size, 4)``; not trainable (a buffer)  -> up256

Pixel alignment: 64-map pixel i sits at 256-map coordinate 4 i + 1.5 (the align_corners=False
convention of this upsampling), which is how the 64x64 training targets are placed
(``ectfast.nets.data.to_map64``).

Weights files (``ectfast train --export-weights FILE``): a dict ``{format, version, arch,
n_landmarks, sha256, meta, state_dict}`` with an fp16 state dict whose checksum is verified
before use; ``meta`` records the training (command, data, epochs, validation NME) and ``meta["fit"]``
the fit parameters chosen for the network's maps. ``load_pretrained()`` reads the shipped lite
network, ``python/ectfast/assets/lite_300w.pt`` (trained on 300-W: research-use annotations).
"""
from __future__ import annotations

import hashlib
import os
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ectfast.nets.engine import DEFAULT_PT
from ectfast.io.pts import N_LANDMARKS

WEIGHTS_FORMAT = "ectfast-fcn"
WEIGHTS_VERSION = 1
DEFAULT_WEIGHTS = DEFAULT_PT  # the shipped lite network (one home: ectfast.nets.engine)
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
UPSAMPLE_FACTOR = 4
_FP32_KEYS = ("mean", "std")  # the normalisation buffers stay float32 in the fp16 weights file


def _conv(cin: int, cout: int, k: int, d: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=d * (k - 1) // 2, dilation=d)


class DilatedBranches(nn.Module):
    """Parallel convolutions (kernel, dilation) on the same input, each + ReLU, concatenated."""

    def __init__(self, cin: int, cout_each: int, specs):
        super().__init__()
        self.branches = nn.ModuleList(_conv(cin, cout_each, k, d) for k, d in specs)

    def forward(self, x):
        return torch.cat([F.relu(b(x)) for b in self.branches], 1)


def bilinear_kernel(factor: int = UPSAMPLE_FACTOR) -> torch.Tensor:
    """The (2f, 2f) kernel of the fixed bilinear upsampling: outer(K, K), K[j] = 1 - |j - (2f-1)/2| / f."""
    k = 2 * factor
    K = 1.0 - np.abs(np.arange(k) - (k - 1) / 2.0) / factor
    return torch.from_numpy(np.outer(K, K)).float()


class UpsampleNet(nn.Module):
    """Fixed bilinear x4 (transposed conv, kernel 8, stride 4, padding 2, one group per map)."""

    def __init__(self, channels: int = N_LANDMARKS, factor: int = UPSAMPLE_FACTOR):
        super().__init__()
        self.channels, self.factor = channels, factor
        w = bilinear_kernel(factor)[None, None].repeat(channels, 1, 1, 1)
        self.register_buffer("weight", w)

    def forward(self, x):
        return F.conv_transpose2d(x, self.weight.to(x.dtype), stride=self.factor,
                                  padding=self.factor // 2, groups=self.channels)


class PrimaryNet(nn.Module):
    def __init__(self, n: int = N_LANDMARKS):
        super().__init__()
        self.conv1 = _conv(3, 128, 5)
        self.conv2 = _conv(128, 128, 5)
        self.conv3 = _conv(128, 128, 5)
        self.conv4 = DilatedBranches(128, 128, [(3, 1), (3, 2), (3, 3), (3, 4)])
        self.conv5 = DilatedBranches(512, 256, [(3, 1), (3, 2), (3, 3), (3, 4)])
        self.conv6 = _conv(1024, 512, 1)
        self.conv7 = _conv(512, 256, 1)
        self.conv8 = _conv(256, n, 1)

    def forward(self, x) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (conv3 features, conv7 features, primary maps)."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        c3 = F.relu(self.conv3(x))
        x = self.conv5(self.conv4(c3))
        x = F.relu(self.conv6(x))
        c7 = F.relu(self.conv7(x))
        return c3, c7, self.conv8(c7)


class FusionNet(nn.Module):
    def __init__(self, n: int = N_LANDMARKS, cin: int = 128 + 256):
        super().__init__()
        self.block1 = DilatedBranches(cin, 64, [(3, 1), (3, 2), (5, 3)])
        self.block2 = DilatedBranches(192, 64, [(1, 1), (3, 1), (3, 2), (5, 3)])
        self.block3 = DilatedBranches(256, 128, [(1, 1), (3, 1), (3, 2), (5, 3)])
        self.fuse1 = _conv(512, 256, 1)
        self.fuse2 = _conv(256, n, 1)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(x)))
        return self.fuse2(F.relu(self.fuse1(x)))


def _check_input(x, multiple: int) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"x: expected (B, 3, H, W) RGB in [0, 1], got shape {tuple(x.shape)}")
    if x.shape[-1] % multiple or x.shape[-2] % multiple:
        raise ValueError(f"x: H and W must be multiples of {multiple}, got {tuple(x.shape[-2:])}")


class FCN(nn.Module):
    """PrimaryNet + FusionNet + UpsampleNet. ``forward(x)`` -> (primary64, fusion64, up256)."""

    def __init__(self, n_landmarks: int = N_LANDMARKS):
        super().__init__()
        self.n_landmarks = n_landmarks
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))
        self.primary = PrimaryNet(n_landmarks)
        self.fusion = FusionNet(n_landmarks)
        self.upsample = UpsampleNet(n_landmarks)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        for out in (self.primary.conv8, self.fusion.fuse2):  # small outputs at the start
            nn.init.normal_(out.weight, std=1e-3)

    def forward(self, x):
        _check_input(x, 4)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        c3, c7, primary = self.primary(x)
        fusion = self.fusion(torch.cat([c3, c7], 1))
        return primary, fusion, self.upsample(fusion)


# ------------------------------------------------------------------ the lite network (CPU)


def _bn_act(cout: int, act: bool = True):
    return [nn.BatchNorm2d(cout)] + ([nn.ReLU(inplace=True)] if act else [])


def conv_bn(cin: int, cout: int, k: int = 1, stride: int = 1, act: bool = True) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, bias=False), *_bn_act(cout, act))


class DilatedInception(nn.Module):
    """The paper's multi-scale dilated block in depthwise-separable form: parallel depthwise
    k x k convolutions with dilations ``specs`` = [(k, d), ...], each projected to C / len(specs)
    channels, concatenated, BN + ReLU, plus the input (residual)."""

    def __init__(self, c: int, specs=((3, 1), (3, 2), (3, 3), (3, 4))):
        super().__init__()
        each = c // len(specs)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, c, k, 1, d * (k - 1) // 2, dilation=d, groups=c, bias=False),
                          nn.Conv2d(c, each, 1, bias=False)) for k, d in specs)
        self.post = nn.Sequential(*_bn_act(each * len(specs)))
        self.fix = None if each * len(specs) == c else nn.Conv2d(each * len(specs), c, 1, bias=False)

    def forward(self, x):
        y = self.post(torch.cat([b(x) for b in self.branches], 1))
        return x + (y if self.fix is None else self.fix(y))


def _up2(x):
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


class LiteUNet(nn.Module):
    """The CPU-sized ECT estimation network, ``lite`` (see the module docstring's table).

    PrimaryNet: a U-Net encoder of dense 3 x 3 convolutions (128 -> 64 -> 32 -> 16 -> 8 px,
    channels ``c``) with two depthwise-separable dilated inception blocks (dilations 1-4) at
    8 px, and a decoder with skip connections back to 32 px -> 68 primary maps (32 x 32,
    intermediate supervision). FusionNet: the primary maps concatenated with the 32-px decoder
    features, two dilated inception blocks (dilations 1, 2, 3 and a 5x5 d3 branch, as the
    paper's FusionNet) -> 68 maps (32 x 32). ``forward(x)`` -> (primary32, fusion32).

    Dense 3 x 3 convolutions where the maps are large: on this project's CPU one training step
    of this 0.64 GFLOP net costs what a 0.22 GFLOP MobileNetV2-style net costs (the backward pass
    of depthwise convolutions is slow on CPU), for three times the capacity."""

    def __init__(self, n_landmarks: int = N_LANDMARKS, c=(32, 64, 96, 128), width: int = 64):
        super().__init__()
        self.n_landmarks = n_landmarks
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))
        c1, c2, c3, c4 = c
        w = width
        self.enc64 = nn.Sequential(conv_bn(3, c1, 3, 2), conv_bn(c1, c1, 3))
        self.enc32 = nn.Sequential(conv_bn(c1, c2, 3, 2), conv_bn(c2, c2, 3))
        self.enc16 = nn.Sequential(conv_bn(c2, c3, 3, 2), conv_bn(c3, c3, 3))
        self.enc8 = nn.Sequential(conv_bn(c3, c4, 3, 2), DilatedInception(c4), DilatedInception(c4))
        self.dec16 = conv_bn(c4 + c3, c3, 3)
        self.dec32 = conv_bn(c3 + c2, w, 3)
        self.primary_out = nn.Conv2d(w, n_landmarks, 1)
        self.fuse_in = conv_bn(w + n_landmarks, w, 1)
        self.fusion = nn.Sequential(DilatedInception(w, ((3, 1), (3, 2), (3, 3), (5, 3))),
                                    DilatedInception(w, ((3, 1), (3, 2), (3, 3), (5, 3))))
        self.fusion_out = nn.Conv2d(w, n_landmarks, 1)
        for m in self.modules():  # He initialisation; the two map outputs start near zero
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for out in (self.primary_out, self.fusion_out):
            nn.init.normal_(out.weight, std=1e-3)

    def trunk(self, x):
        """(64-px encoder features, primary maps, FusionNet features before its 1x1 output)."""
        _check_input(x, 16)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        f64 = self.stem(x)
        f32 = self.enc32(f64)
        f16 = self.enc16(f32)
        f8 = self.enc8(f16)
        d16 = self.dec16(torch.cat([_up2(f8), f16], 1))
        d32 = self.dec32(torch.cat([_up2(d16), f32], 1))
        primary = self.primary_out(d32)
        return f64, primary, self.fusion(self.fuse_in(torch.cat([d32, primary], 1)))

    def stem(self, x):
        """The 64-px encoder features of the normalised input."""
        return self.enc64(x)

    def forward(self, x):
        _, primary, feat = self.trunk(x)
        return primary, self.fusion_out(feat)


class LiteUNetHR(LiteUNet):
    """``lite-hr``: :class:`LiteUNet` reading the full 256 x 256 crop instead of its 2 x 2
    average. The stem's first convolution still sees the averaged 128 x 128 image; a
    high-resolution branch (3 x 3 stride-2 convolution to ``hr`` channels at 128 px, BN + ReLU,
    then a 3 x 3 stride-2 convolution to the stem's channels at 64 px) adds its output to that
    convolution's before the stem's BatchNorm. The branch's last convolution starts at zero, so a
    network initialised from trained ``lite`` weights (``ectfast train --init FILE``) starts as
    that network. Same 32 x 32 maps (``upsample=8``). ``forward(x)`` -> (primary32, fusion32)."""

    def __init__(self, n_landmarks: int = N_LANDMARKS, c=(32, 64, 96, 128), width: int = 64, hr: int = 16):
        super().__init__(n_landmarks, c, width)
        self.hr_in = conv_bn(3, hr, 3, 2)
        self.hr_out = nn.Conv2d(hr, c[0], 3, 2, 1, bias=False)
        nn.init.kaiming_normal_(self.hr_in[0].weight, nonlinearity="relu")
        nn.init.zeros_(self.hr_out.weight)  # starts as the lite network exactly

    def stem(self, x):
        _check_input(x, 32)
        conv, *bn_act = self.enc64[0]
        first = conv(F.avg_pool2d(x, 2)) + self.hr_out(self.hr_in(x))
        for m in bn_act:
            first = m(first)
        return self.enc64[1:](first)


class LiteUNet64(LiteUNet):
    """``lite64``: :class:`LiteUNet` plus a 64-px refinement head, so that its final maps are
    64 x 64 (the paper FCN's map size; fit with ``upsample=4``). The head reduces the FusionNet
    features to ``head`` channels, upsamples them x2, concatenates the 64-px encoder features
    (``enc64``), and a 3 x 3 convolution + 1 x 1 output give a *residual* added to the bilinearly
    upsampled 32 x 32 fusion maps: ``final64 = up2(fusion32) + refine``. The residual's output
    starts at zero, so a network initialised from trained ``lite`` weights
    (``ectfast train --init FILE``) starts as that network. ``forward(x)`` -> (primary32,
    final64)."""

    def __init__(self, n_landmarks: int = N_LANDMARKS, c=(32, 64, 96, 128), width: int = 64, head: int = 32):
        super().__init__(n_landmarks, c, width)
        self.head_in = conv_bn(width, head, 1)
        self.head64 = conv_bn(head + c[0], head, 3)
        self.head_out = nn.Conv2d(head, n_landmarks, 1)
        for m in (self.head_in[0], self.head64[0]):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        nn.init.zeros_(self.head_out.weight)  # the residual starts at zero: up2(fusion32) exactly
        nn.init.zeros_(self.head_out.bias)

    def forward(self, x):
        f64, primary, feat = self.trunk(x)
        h = self.head64(torch.cat([_up2(self.head_in(feat)), f64], 1))
        return primary, _up2(self.fusion_out(feat)) + self.head_out(h)


#: architecture name -> (class, input size, output-layer weight key); "lite-hr" ships, "lite" is the
#: training default
ARCHS = {"paper": (FCN, 256, "fusion.fuse2.weight"), "lite": (LiteUNet, 128, "fusion_out.weight"),
         "lite64": (LiteUNet64, 128, "head_out.weight"), "lite-hr": (LiteUNetHR, 256, "fusion_out.weight")}
DEFAULT_ARCH = "lite"


def _arch(arch: str):
    if arch not in ARCHS:
        raise ValueError(f"arch: expected one of {sorted(ARCHS)}, got {arch!r}")
    return ARCHS[arch]


def build(arch: str = DEFAULT_ARCH, n_landmarks: int = N_LANDMARKS) -> nn.Module:
    """A fresh network of architecture ``arch`` ('lite' or 'paper'); ``.arch`` and
    ``.input_size`` are set on it."""
    cls, size, _ = _arch(arch)
    model = cls(n_landmarks)
    model.arch, model.input_size = arch, size
    return model


def input_size(arch: str) -> int:
    """The crop side the architecture is trained on (its fit frame is always 256)."""
    return _arch(arch)[1]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(size: Optional[int] = None, n_landmarks: int = N_LANDMARKS, arch: str = "paper") -> int:
    """Multiply-adds x 2 of one forward pass at ``size`` x ``size`` (convolutions only;
    default: the architecture's input size)."""
    model = build(arch, n_landmarks)
    return conv_flops(model, model.input_size if size is None else size)


def conv_flops(model: nn.Module, size: int) -> int:
    """Multiply-adds x 2 of the convolutions of ``model`` on one ``size`` x ``size`` input."""
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        k = mod.weight.shape[1] * mod.weight.shape[2] * mod.weight.shape[3]
        total += 2 * k * out.numel()

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in hs:
        h.remove()
    return total


# ------------------------------------------------------------------ shipped weights


def state_dict_sha256(state_dict: Dict[str, torch.Tensor]) -> str:
    """SHA-256 over the sorted keys, dtypes, shapes and raw bytes of a state dict."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_weights(model_or_state, path, meta: Optional[dict] = None) -> str:
    """Write the shipped-weights file (fp16 state dict + format/version/sha256/n_landmarks),
    atomically. Returns the checksum."""
    sd = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    sd = {k: (v.detach().cpu().half() if v.is_floating_point() and k not in _FP32_KEYS
              else v.detach().cpu()).contiguous()
          for k, v in sd.items() if not k.startswith("upsample.")}
    arch = getattr(model_or_state, "arch", None) or (meta or {}).get("arch") or \
        next((a for a, (_, _, key) in ARCHS.items() if key in sd), None)
    if arch is None:
        raise ValueError("model_or_state: no known output layer: not an FCN of any architecture")
    n = sd[_arch(arch)[2]].shape[0]
    blob = {"format": WEIGHTS_FORMAT, "version": WEIGHTS_VERSION, "arch": arch, "n_landmarks": int(n),
            "sha256": state_dict_sha256(sd), "meta": dict(meta or {}), "state_dict": sd}
    path = os.fspath(path)
    tmp = path + ".tmp"
    torch.save(blob, tmp)
    os.replace(tmp, path)
    return blob["sha256"]


def read_weights(path) -> dict:
    """Load and verify a shipped-weights file. FileNotFoundError when absent; ValueError when
    it is not such a file, is corrupt (checksum) or is of another format/version."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FCN weights not found at {path!r} (train them with "
                                "`ectfast train ... --export-weights FILE`)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated / not a torch file
        raise ValueError(f"{path}: not a readable FCN weights file ({type(e).__name__}: {e})") from None
    if not isinstance(blob, dict) or blob.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{path}: not an ectfast FCN weights file (format {blob.get('format') if isinstance(blob, dict) else type(blob).__name__!r})")
    if blob.get("version") != WEIGHTS_VERSION:
        raise ValueError(f"{path}: weights version {blob.get('version')!r}, this ectfast reads {WEIGHTS_VERSION}")
    sd = blob.get("state_dict")
    if not isinstance(sd, dict) or not sd:
        raise ValueError(f"{path}: no state_dict in the weights file")
    got = state_dict_sha256(sd)
    if got != blob.get("sha256"):
        raise ValueError(f"{path}: checksum mismatch (file says {blob.get('sha256')}, contents give {got}): corrupt weights")
    n = blob.get("n_landmarks")
    arch = blob.setdefault("arch", "paper")
    if arch not in ARCHS:
        raise ValueError(f"{path}: unknown architecture {arch!r} (this ectfast knows {sorted(ARCHS)})")
    key = ARCHS[arch][2]
    out_w = sd.get(key)
    if not isinstance(out_w, torch.Tensor) or out_w.ndim != 4:
        raise ValueError(f"{path}: no {arch} output layer ({key}) in the state dict")
    if out_w.shape[0] != n:
        raise ValueError(f"{path}: n_landmarks {n} disagrees with the output layer")
    return blob


def has_pretrained(path=None) -> bool:
    """Whether a shipped-weights file exists (at ``path`` or the packaged default)."""
    return os.path.isfile(os.fspath(path) if path is not None else DEFAULT_WEIGHTS)


def load_pretrained(path=None, device="cpu", n_landmarks: int = N_LANDMARKS) -> nn.Module:
    """The network of a weights file (default: the shipped lite network,
    python/ectfast/assets/lite_300w.pt), its architecture read from the file, verified by
    checksum, in eval mode, float32 on ``device``; ``.meta`` holds the file's metadata."""
    blob = read_weights(DEFAULT_WEIGHTS if path is None else path)
    if blob["n_landmarks"] != n_landmarks:
        raise ValueError(f"weights have n_landmarks {blob['n_landmarks']}, expected {n_landmarks}")
    model = build(blob["arch"], n_landmarks)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("upsample.")]
    if missing or unexpected:
        raise ValueError(f"weights do not match the FCN: missing {missing}, unexpected {unexpected}")
    model.meta = dict(blob.get("meta") or {})
    return model.to(device).eval()
