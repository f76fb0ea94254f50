"""Peak decoding of response maps: the integer argmax and its sub-pixel refinement.

NumPy only (no torch). Coordinates are (x, y), 0-based pixel centres. ``factor`` maps a low-
resolution map's pixel ``i`` to the fit's frame coordinate ``factor * i + (factor - 1) / 2`` (the
align_corners=False convention of the fixed bilinear upsampling, ``ectfast.nets.data.to_map64``), so
``factor = 256 / map_size`` gives coordinates in the paper's 256-pixel frame.

Sub-pixel refinement (DARK, Zhang et al., CVPR 2020): around the argmax ``m`` of a map ``M``,
``L = log(max(M, eps))`` is expanded to second order, ``L(m + d) ~ L(m) + g.d + d.H d / 2``,
and the peak moves to ``d = -H^-1 g`` (first and second differences at ``m``). The step is taken
only where H is negative definite (a true maximum of the log) and is clipped to half a pixel of
the map per axis; at the border, or on flat / non-positive maps, the integer argmax stays.
"""
from __future__ import annotations

import numpy as np


def _check_maps(maps) -> np.ndarray:
    m = np.asarray(maps)
    if m.ndim != 4:
        raise ValueError(f"maps: expected (B, n, H, W), got shape {m.shape}")
    if m.shape[2] < 1 or m.shape[3] < 1:
        raise ValueError(f"maps: empty maps of shape {m.shape}")
    if m.dtype.kind != "f":
        raise TypeError(f"maps: expected a float array, got dtype {m.dtype}")
    return m


def argmax_peaks(maps) -> np.ndarray:
    """(B, n, 2) float64 (x, y) of each map's first maximum in row-major order (NaN-free maps)."""
    m = _check_maps(maps)
    B, n, H, W = m.shape
    idx = m.reshape(B, n, H * W).argmax(-1)
    return np.stack([idx % W, idx // W], -1).astype(np.float64)


def subpixel_peaks(maps, factor: float = 1.0, eps: float = 1e-10) -> np.ndarray:
    """(B, n, 2) sub-pixel peaks (DARK, see the module docstring) in the frame of ``factor``."""
    m = _check_maps(maps)
    if not (np.isfinite(factor) and factor > 0):
        raise ValueError(f"factor: expected a positive number, got {factor!r}")
    B, n, H, W = m.shape
    pk = argmax_peaks(m)
    x, y = pk[..., 0].astype(np.int64), pk[..., 1].astype(np.int64)
    inner = (x >= 1) & (x <= W - 2) & (y >= 1) & (y <= H - 2)
    xc, yc = np.clip(x, 1, max(W - 2, 1)), np.clip(y, 1, max(H - 2, 1))
    if H >= 3 and W >= 3:
        flat = m.reshape(B * n, H, W)
        r = np.arange(B * n)
        yy, xx = yc.reshape(-1), xc.reshape(-1)

        def L(dy, dx):
            return np.log(np.maximum(flat[r, yy + dy, xx + dx].astype(np.float64), eps))

        c = L(0, 0)
        gx, gy = (L(0, 1) - L(0, -1)) / 2, (L(1, 0) - L(-1, 0)) / 2
        hxx, hyy = L(0, 1) - 2 * c + L(0, -1), L(1, 0) - 2 * c + L(-1, 0)
        hxy = (L(1, 1) - L(1, -1) - L(-1, 1) + L(-1, -1)) / 4
        det = hxx * hyy - hxy * hxy
        ok = (hxx < 0) & (det > 1e-12) & (flat[r, yy, xx] > eps)
        with np.errstate(divide="ignore", invalid="ignore"):
            dx = -(hyy * gx - hxy * gy) / det
            dy = -(hxx * gy - hxy * gx) / det
        ok &= np.isfinite(dx) & np.isfinite(dy)
        ok &= inner.reshape(-1)
        d = np.stack([np.where(ok, np.clip(dx, -0.5, 0.5), 0.0), np.where(ok, np.clip(dy, -0.5, 0.5), 0.0)], -1)
        pk = pk + d.reshape(B, n, 2)
    return factor * pk + (factor - 1) / 2.0
