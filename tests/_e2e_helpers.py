"""Test helpers for the end-to-end pipeline (evaluate, Detector, ectfast detect).

* :class:`FiducialEstimator`: a fake FCN that needs no weights. Test images carry three dots of
  pure colours at known landmarks (36, 45, 8) of a template shape; the estimator finds the dots
  in each crop it is given, fits the similarity template -> crop from them, and returns Gaussian
  maps (the training target's scale) at the template shape mapped into the crop, optionally with
  outliers / zeroed (occluded) maps. This checks cropping and back-mapping independently of how
  the pipeline computes them.
"""
from __future__ import annotations

import cv2
import numpy as np

from ectfast.core.synthetic import TARGET_SIGMA_256, gaussian_maps, make_maps

DOT_LANDMARKS = (36, 45, 8)
DOT_COLOURS_BGR = ((0, 255, 0), (255, 0, 255), (255, 255, 0))  # green, magenta, cyan


# ------------------------------------------------------------------ fiducial dots and the fake FCN


def draw_dots(image_bgr, shape, radius):
    """Draw the three fiducial dots at ``shape[DOT_LANDMARKS]`` (sub-pixel centres)."""
    for i, colour in zip(DOT_LANDMARKS, DOT_COLOURS_BGR):
        x, y = shape[i]
        cv2.circle(image_bgr, (int(round(x * 16)), int(round(y * 16))), int(round(radius * 16)),
                   colour, -1, cv2.LINE_8, 4)
    return image_bgr


def find_dots(crop_rgb01):
    """Centroids (3, 2) of the three dots in a (3, H, W) RGB [0, 1] crop (NaN when absent)."""
    img = (np.transpose(crop_rgb01, (1, 2, 0))[..., ::-1] * 255.0)  # -> BGR 0..255
    out = np.full((3, 2), np.nan)
    for k, colour in enumerate(DOT_COLOURS_BGR):
        mask = (np.abs(img - np.array(colour, float)) < 30).all(-1)
        ys, xs = np.nonzero(mask)
        if len(xs) >= 3:
            out[k] = xs.mean(), ys.mean()
    return out


def fit_similarity(src, dst):
    """Least-squares similarity (a, b, tx, ty): dst = [[a, -b], [b, a]] src + t."""
    A = np.zeros((2 * len(src), 4))
    A[0::2] = np.c_[src[:, 0], -src[:, 1], np.ones(len(src)), np.zeros(len(src))]
    A[1::2] = np.c_[src[:, 1], src[:, 0], np.zeros(len(src)), np.ones(len(src))]
    a, b, tx, ty = np.linalg.lstsq(A, dst.reshape(-1), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


class FiducialEstimator:
    """Fake FCN: crops (B, 3, 256, 256) -> Gaussian maps at the template shape placed by the dots.

    map_size: 256 (maps as fitted) or 64 (the FusionNet's size, fitted with upsample=4);
    outlier_fraction: landmarks whose peak is moved >= 60 px away (seeded, per face);
    occluded: landmark indices whose maps are all zero; strict=False: crops without the dots get
    the template at the standard landmark-box placement instead of an AssertionError."""

    def __init__(self, template, *, map_size=256, outlier_fraction=0.0, occluded=(), seed=0, strict=True):
        self.strict = strict
        self.template = np.asarray(template, float)
        self.map_size = map_size
        self.outlier_fraction = outlier_fraction
        self.occluded = list(occluded)
        self.rng = np.random.default_rng(seed)
        self.calls = 0
        self.faces = 0
        self.crop_shapes = []

    def __call__(self, crops):
        crops = np.asarray(crops)
        assert crops.ndim == 4 and crops.shape[1:] == (3, 256, 256) and crops.dtype == np.float32
        assert crops.min() >= 0 and crops.max() <= 1
        self.calls += 1
        self.faces += len(crops)
        shapes = []
        for c in crops:
            dots = find_dots(c)
            if np.isnan(dots).any():
                if self.strict:
                    raise AssertionError("fiducial dots not visible in the crop")
                # no dots (e.g. a grey image): the template where a landmark-box crop puts it
                lo, hi = self.template.min(0), self.template.max(0)
                k = 256 / 1.3 / (hi - lo).max()
                M = np.array([[k, 0, 127.5 - k * (lo[0] + hi[0]) / 2], [0, k, 127.5 - k * (lo[1] + hi[1]) / 2]])
            else:
                M = fit_similarity(self.template[list(DOT_LANDMARKS)], dots)
            shapes.append(self.template @ M[:, :2].T + M[:, 2])
        shapes = np.array(shapes)
        self.crop_shapes.extend(shapes)
        batch = make_maps(shapes, size=256, outlier_fraction=self.outlier_fraction,
                          seed=int(self.rng.integers(1 << 31)))
        if self.map_size == 256:
            maps = batch.maps
        else:
            f = 256 // self.map_size
            maps = gaussian_maps((batch.peaks - (f - 1) / 2) / f, self.map_size, self.map_size,
                                 TARGET_SIGMA_256 / f)
        maps[:, self.occluded] = 0
        return maps


# ------------------------------------------------------------------ synthetic 300-W-layout faces


def template_shape(pdm):
    """A fixed non-mean face the PDM represents exactly, in a 200 px frame."""
    p = np.zeros(pdm.n_params)
    p[4:7] = np.array([1.0, -0.8, 0.5]) * np.sqrt(pdm.eigenvalues[:3])
    s = pdm.shape(p)
    lo, hi = s.min(0), s.max(0)
    return (s - (lo + hi) / 2) * (150.0 / (hi - lo).max())  # landmark box side 150, centred at 0


def synthetic_face(template, rng, size=320, features=True):
    """(image_bgr, gt) : a drawn face whose landmarks are a random similarity of ``template``
    (``features=False``: only the fiducial dots on a plain background, no face to detect)."""
    t = np.deg2rad(rng.uniform(-12, 12))
    s = rng.uniform(0.8, 1.1)
    R = s * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    gt = template @ R.T + (size / 2 + rng.uniform(-15, 15, 2))
    img = np.full((size, size, 3), 90, np.uint8)
    img[:] = (60 + rng.integers(0, 60), 80, 100)
    if features:
        hull = cv2.convexHull(np.round(gt[:27]).astype(np.int32))
        cv2.fillConvexPoly(img, hull, (140, 170, 210))
        for a, b in ((36, 41), (42, 47), (48, 59), (27, 35)):
            cv2.polylines(img, [np.round(gt[a:b + 1]).astype(np.int32)], True, (40, 40, 60), 2)
    draw_dots(img, gt, radius=3.5 * s)
    return img, gt
