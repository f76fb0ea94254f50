"""Heatmap losses of the estimation networks (summed over the network's outputs by the
trainer: intermediate supervision). ``l2`` is the paper's; ``awing`` (Adaptive Wing,
foreground-weighted) trains the small CPU networks better."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ectfast.core.synthetic import TARGET_SIGMA_256, peak_scale

LOSSES = ("l2", "awing")
#: heatmap loss per architecture when --loss is not given
DEFAULT_LOSS = {"lite": "awing", "paper": "l2"}


def adaptive_wing(pred, target, peak: float, alpha: float = 2.1, omega: float = 14.0, eps: float = 1.0,
                  theta: float = 0.5, fg_weight: float = 10.0):
    """Adaptive Wing loss (Wang et al., ICCV 2019) of heatmaps scaled by ``peak`` to [0, 1],
    with the foreground (target > 0.2, dilated 3x3) weighted ``fg_weight`` + 1."""
    y = target / peak
    d = (pred / peak - y).abs()
    p = alpha - y
    r = (theta / eps) ** p
    A = omega / (1 + r) * p * (theta / eps) ** (p - 1) / eps
    C = theta * A - omega * torch.log1p(r)
    loss = torch.where(d < theta, omega * torch.log1p((d / eps) ** p), A * d - C)
    fg = F.max_pool2d((y > 0.2).float(), 3, 1, 1)
    return (loss * (1 + fg_weight * fg)).mean()


def heatmap_loss(name: str, pred, target):
    """The loss ``name`` ('l2' or 'awing') of one output's maps against its targets."""
    if name == "awing":
        return adaptive_wing(pred, target, float(peak_scale(TARGET_SIGMA_256)))
    if name == "l2":
        return F.mse_loss(pred, target)
    raise ValueError(f"loss: expected one of {LOSSES}, got {name!r}")
