"""Heatmap losses of the estimation networks (summed over the network's outputs by the
trainer: intermediate supervision). ``l2`` is the paper's; ``awing`` (Adaptive Wing,
foreground-weighted) trains the small CPU networks better."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ectfast.core.synthetic import TARGET_SIGMA_256, peak_scale

LOSSES = ("l2", "awing")
#: heatmap loss per architecture when --loss is not given
DEFAULT_LOSS = {"lite": "awing", "lite64": "awing", "lite-hr": "awing", "paper": "l2"}


def _awing_terms(y, d, alpha, omega, eps, theta):
    """Adaptive Wing per pixel: (loss, d loss / d d) for scaled targets ``y`` and |errors| ``d``."""
    p = alpha - y
    r = (theta / eps) ** p
    A = omega / (1 + r) * p * (theta / eps) ** (p - 1) / eps
    C = theta * A - omega * torch.log1p(r)
    small = d < theta
    q1 = (d / eps) ** (p - 1)  # (d/eps)^(p-1): the power and its derivative from one pow
    q = q1 * (d / eps)
    loss = torch.where(small, omega * torch.log1p(q), A * d - C)
    grad = torch.where(small, omega * p * q1 / (eps * (1 + q)), A)
    return loss, grad


def _foreground_weight(y, fg_weight):
    return 1 + fg_weight * F.max_pool2d((y > 0.2).float(), 3, 1, 1)


class _AdaptiveWing(torch.autograd.Function):
    """The loss and its gradient in one pass (no autograd graph over the per-pixel terms): on
    64 x 64 maps, forward + backward of a batch of 32 took 1.0 s instead of 1.2 s on the 2-core
    CPU (bench/RESULTS.md, "lite64")."""

    @staticmethod
    def forward(ctx, pred, target, peak, alpha, omega, eps, theta, fg_weight):
        y = target / peak
        diff = pred / peak - y
        loss, grad = _awing_terms(y, diff.abs(), alpha, omega, eps, theta)
        w = _foreground_weight(y, fg_weight)
        ctx.save_for_backward(grad.mul_(w).mul_(torch.sign(diff)).div_(peak * pred.numel()))
        return (loss * w).mean()

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g, None, None, None, None, None, None, None


def adaptive_wing(pred, target, peak: float, alpha: float = 2.1, omega: float = 14.0, eps: float = 1.0,
                  theta: float = 0.5, fg_weight: float = 10.0):
    """Adaptive Wing loss (Wang et al., ICCV 2019) of heatmaps scaled by ``peak`` to [0, 1],
    with the foreground (target > 0.2, dilated 3x3) weighted ``fg_weight`` + 1. The gradient
    is closed-form (:class:`_AdaptiveWing`)."""
    return _AdaptiveWing.apply(pred, target.detach(), float(peak), alpha, omega, eps, theta, fg_weight)


def heatmap_loss(name: str, pred, target):
    """The loss ``name`` ('l2' or 'awing') of one output's maps against its targets."""
    if name == "awing":
        return adaptive_wing(pred, target, float(peak_scale(TARGET_SIGMA_256)))
    if name == "l2":
        return F.mse_loss(pred, target)
    raise ValueError(f"loss: expected one of {LOSSES}, got {name!r}")
