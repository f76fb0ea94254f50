"""The face-detector layer's common ground: :class:`FaceBox` (one detection), image checks and
box overlap."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

#: the smallest image side a face can be found in (the smallest window the detectors scan)
MIN_IMAGE_SIDE = 24


@dataclass
class FaceBox:
    """One detected face: ``box`` (x0, y0, x1, y1) in image pixels as the detector gives it,
    ``score`` (BlazeFace: probability; Haar: neighbour count; dlib: SVM score), ``keypoints``
    (k, 2) image pixels or None (BlazeFace: 6, in the order BLAZEFACE_KEYPOINTS), ``detector``
    the model that found it, i.e. the key of its box calibration in CROP_CALIBRATION
    ("blazeface-short", "blazeface-full", "haar", "dlib-hog")."""
    box: Tuple[float, float, float, float]
    score: float
    keypoints: Optional[np.ndarray] = None
    detector: str = ""

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])


def check_image(image, name: str = "image") -> np.ndarray:
    """``image`` as a C-contiguous H x W x 3 uint8 BGR array (grey H x W / H x W x 1 converted).
    TypeError for a non-array or a dtype other than uint8, ValueError for a bad shape or an empty
    image; both messages name ``name``."""
    import cv2

    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name}: expected a NumPy uint8 image array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(f"{name}: expected dtype uint8 (0..255 BGR), got {image.dtype}")
    a = image
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3):
        raise ValueError(f"{name}: expected an H x W x 3 (BGR) or H x W (grey) image, got shape {image.shape}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{name}: empty image of shape {image.shape}")
    if a.ndim == 2:
        a = cv2.cvtColor(np.ascontiguousarray(a), cv2.COLOR_GRAY2BGR)
    return np.ascontiguousarray(a)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of boxes (x0, y0, x1, y1)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)
