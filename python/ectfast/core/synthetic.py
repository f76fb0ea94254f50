"""Synthetic response maps for tests and benchmarks.

Maps are Gaussian peaks with the FCN training targets' scale (DESIGN.md: peak 16/(sigma sqrt(2 pi)),
sigma = 6 px at 256, so peak 1.064), centred at given shapes. At other sizes the maps are what the
network is trained to output there (``ectfast.nets.data.make_targets``): sigma scales with the size
(1.5 px at 64) and the peak stays the 256 target's 1.064 at every size. Controllable corruption:

* ``outlier_fraction``: landmarks whose peak is moved to a false position at least
  ``outlier_distance`` px away (default 60 px at 256, scaled with the size; the "wrong peak"
  failure of a data-driven detector);
* ``occluded_fraction``: landmarks whose map is all zero (occluded / no response);
* ``noise``: standard deviation of additive Gaussian noise on every map.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

TARGET_SIGMA_256 = 6.0


def peak_scale(sigma: float) -> float:
    """The training targets' peak value 16 / (sigma sqrt(2 pi))."""
    return 16.0 / (sigma * np.sqrt(2.0 * np.pi))


def gaussian_maps(centres: np.ndarray, height: int, width: int, sigma: float,
                  dtype=np.float32, peak: Optional[float] = None) -> np.ndarray:
    """(B, n, H, W) maps with one Gaussian peak at each (x, y) centre: of height ``peak``
    (default ``peak_scale(sigma)``, the target scale of a map drawn with this sigma)."""
    peak = peak_scale(sigma) if peak is None else float(peak)
    c = np.asarray(centres, dtype=np.float64)
    xs = np.arange(width, dtype=np.float64)
    ys = np.arange(height, dtype=np.float64)
    gx = np.exp(-((xs - c[..., 0:1]) ** 2) / (2 * sigma**2))  # (B, n, W)
    gy = np.exp(-((ys - c[..., 1:2]) ** 2) / (2 * sigma**2))  # (B, n, H)
    out = np.empty(c.shape[:-1] + (height, width), dtype=dtype)
    np.multiply(gy[..., :, None] * peak, gx[..., None, :], out=out, casting="same_kind")
    return out


@dataclass
class SyntheticBatch:
    maps: np.ndarray  #: (B, n, H, W)
    shapes: np.ndarray  #: (B, n, 2) true landmark positions
    peaks: np.ndarray  #: (B, n, 2) where each map's peak was put
    outliers: np.ndarray  #: (B, n) bool, peak moved far away
    occluded: np.ndarray  #: (B, n) bool, map is all zero


def make_maps(shapes: np.ndarray, *, size: int = 256, sigma: Optional[float] = None,
              outlier_fraction: float = 0.0, outlier_distance: Optional[float] = None,
              occluded_fraction: float = 0.0, noise: float = 0.0, dtype=np.float32,
              seed=None) -> SyntheticBatch:
    """Response maps of ``size`` x ``size`` for shapes (B, n, 2) given in that map's pixels.

    sigma: the peaks' width (default 6 px scaled to the size); the peak height is that of the
    256 target of the same width in the 256 frame, ``peak_scale(sigma * 256 / size)``: 1.064
    at every size with the default sigma, as the network's training targets."""
    rng = np.random.default_rng(seed)
    shapes = np.asarray(shapes, dtype=np.float64)
    if shapes.ndim != 3 or shapes.shape[-1] != 2:
        raise ValueError(f"shapes: expected (B, n, 2), got {shapes.shape}")
    sigma = TARGET_SIGMA_256 * size / 256.0 if sigma is None else float(sigma)
    peak = peak_scale(sigma * 256.0 / size)
    if outlier_distance is None:
        outlier_distance = 60.0 * size / 256.0
    B, n, _ = shapes.shape
    peaks = shapes.copy()
    outliers = np.zeros((B, n), bool)
    occluded = np.zeros((B, n), bool)
    for f in range(B):
        k_out = int(round(outlier_fraction * n))
        k_occ = int(round(occluded_fraction * n))
        idx = rng.permutation(n)
        outliers[f, idx[:k_out]] = True
        occluded[f, idx[k_out:k_out + k_occ]] = True
        for i in idx[:k_out]:
            for _ in range(1000):  # a false peak inside the map, far from the true point
                cand = rng.uniform(2, size - 3, 2)
                if np.linalg.norm(cand - shapes[f, i]) >= outlier_distance:
                    break
            peaks[f, i] = cand
    maps = gaussian_maps(peaks, size, size, sigma, dtype=dtype, peak=peak)
    if noise > 0:
        maps += rng.normal(0.0, noise, maps.shape).astype(dtype)
    maps[occluded] = 0
    return SyntheticBatch(maps=maps, shapes=shapes, peaks=peaks, outliers=outliers, occluded=occluded)


def place_in_map(shapes: np.ndarray, size: int = 256, extent: float = 0.75,
                 rotation_deg: float = 0.0) -> np.ndarray:
    """Similarity-place shapes (B, n, 2) in a size x size map: centred, the larger side of the
    landmark box spanning ``extent`` of the map, optionally rotated."""
    s = np.asarray(shapes, dtype=np.float64)
    lo, hi = s.min(-2, keepdims=True), s.max(-2, keepdims=True)
    c = (lo + hi) / 2
    scale = extent * size / (hi - lo).max(-1, keepdims=True)
    t = np.deg2rad(rotation_deg)
    R = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return ((s - c) * scale) @ R.T + (size - 1) / 2.0


def random_pdm_shapes(pdm, batch: int, *, size: int = 256, extent: float = 0.75,
                      max_rotation_deg: float = 15.0, sd: float = 1.0, seed=None) -> np.ndarray:
    """Shapes the PDM can represent exactly: random modes q ~ N(0, sd^2 lambda), mean + Phi q,
    then a random similarity into the map (a similarity of a model shape stays in the model's
    span only approximately for rotations; rotation is applied to the mean part exactly)."""
    rng = np.random.default_rng(seed)
    out = np.empty((batch, pdm.n_landmarks, 2))
    for f in range(batch):
        p = np.zeros(pdm.n_params)
        p[4:] = rng.normal(0, sd, pdm.n_components) * np.sqrt(pdm.eigenvalues)
        base = pdm.shape(p)
        out[f] = place_in_map(base[None], size, extent * rng.uniform(0.9, 1.05),
                              rng.uniform(-max_rotation_deg, max_rotation_deg))[0]
        out[f] += rng.uniform(-8, 8, 2)
    # make them exactly representable: project onto the model's span
    return pdm.best_fit(out)
