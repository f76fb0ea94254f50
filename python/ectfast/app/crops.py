"""Face crops: every face of every image cut to a 256 x 256 crop by one 2x3 affine (image ->
crop) that scales its box to the crop and rotates the eye line level; landmarks mapped back with
the inverse affine; crops to the network's input."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from ectfast.nets import data

#: the side of the face crops: the paper's 256-pixel frame, where the fit runs
CROP_SIZE = 256


def check_boxes(boxes, name: str = "boxes") -> np.ndarray:
    """(k, 4) float64 boxes (x0, y0, x1, y1) with x1 > x0, y1 > y0, finite."""
    try:
        b = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected (k, 4) numbers (x0, y0, x1, y1), got {type(boxes).__name__}") from None
    if b.ndim == 1 and b.shape[0] == 4:
        b = b[None]
    if b.size == 0:
        return np.zeros((0, 4))
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"{name}: expected shape (k, 4) of (x0, y0, x1, y1), got {b.shape}")
    if not np.isfinite(b).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    if ((b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])).any():
        raise ValueError(f"{name}: every box needs x1 > x0 and y1 > y0 (x0, y0, x1, y1), got {b.tolist()}")
    return b


def crops_to_input(crops_bgr: Sequence[np.ndarray], size: Optional[int] = None) -> np.ndarray:
    """Crops (S x S x 3 BGR, uint8 or float 0..255) -> (B, 3, S, S) float32 RGB in [0, 1]; with
    ``size`` dividing S, averaged down to (B, 3, size, size) by k x k block means first (the
    network's input; cv2.resize INTER_AREA at an integer factor is that exact mean, and pooling
    before the layout change does 4x less work than after)."""
    import cv2

    crops = [np.asarray(c) for c in crops_bgr]
    side = crops[0].shape[0] if crops else 0
    pool = size is not None and 0 < size < side and side % size == 0
    out_side = size if pool else side
    out = np.empty((len(crops), 3, out_side, out_side), np.float32)
    for i, c in enumerate(crops):
        f = c.astype(np.float32)
        if f.ndim != 3 or f.shape[2] != 3 or f.shape[0] != side or f.shape[1] != side:
            raise ValueError(f"crops: expected {side}x{side}x3 crops, got shape {c.shape}")
        if pool:
            f = cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA)
        out[i] = f[..., ::-1].transpose(2, 0, 1)
    out *= np.float32(1.0 / 255.0)
    return np.clip(out, 0.0, 1.0, out=out)


def crop_affine(box, angle: float = 0.0, size: int = CROP_SIZE) -> np.ndarray:
    """The 2x3 affine image -> crop of the square ``size`` crop of ``box`` (x0, y0, x1, y1, the
    convention of ectfast.nets.data.crop_transform: the box centre at the crop centre, its larger side
    spanning the crop), rotated by -``angle`` (radians, image y down) about the box centre, so
    that a line at ``angle`` in the image (the eye line) is level in the crop."""
    b = np.asarray(box, dtype=np.float64).reshape(4)
    side = max(b[2] - b[0], b[3] - b[1])
    if not (np.isfinite(b).all() and side > 0):
        raise ValueError(f"box: expected a finite non-empty (x0, y0, x1, y1), got {box!r}")
    if not math.isfinite(angle):
        raise ValueError(f"angle: expected a finite number of radians, got {angle!r}")
    s = size / side
    c = (b[:2] + b[2:]) / 2
    h = (size - 1) / 2.0
    co, si = math.cos(angle), math.sin(angle)
    A = s * np.array([[co, si], [-si, co]])
    return np.hstack([A, (h - A @ c)[:, None]])


def crop_faces(images_bgr: Sequence[np.ndarray], image_index: Sequence[int], boxes: np.ndarray, angles=None):
    """Crop face k (box ``boxes[k]``, eye-line angle ``angles[k]`` radians or 0, in image
    ``image_index[k]``) of every face: returns the crops (list of 256 x 256 x 3) and their
    (k, 2, 3) image -> crop affine transforms."""
    import cv2

    crops, Ms = [], []
    angles = np.zeros(len(boxes)) if angles is None else np.asarray(angles, dtype=np.float64).reshape(-1)
    for i, box, a in zip(image_index, boxes, angles):
        if a == 0.0:  # exactly the training crops' transform (ectfast.nets.data.crop_face)
            crop, M = data.crop_face(images_bgr[i], tuple(float(v) for v in box), size=CROP_SIZE)
        else:
            M = crop_affine(box, float(a))
            crop = cv2.warpAffine(images_bgr[i], M, (CROP_SIZE, CROP_SIZE), flags=cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        crops.append(crop)
        Ms.append(np.asarray(M, dtype=np.float64).reshape(2, 3))
    return crops, np.stack(Ms) if Ms else np.zeros((0, 2, 3))


def crop_to_image(points: np.ndarray, Ms: np.ndarray) -> np.ndarray:
    """Map (k, n, 2) crop points back to image pixels with the inverses
    (``cv2.invertAffineTransform``) of the (k, 2, 3) image -> crop affines M."""
    import cv2

    Ms = np.asarray(Ms, dtype=np.float64).reshape(-1, 2, 3)
    pts = np.asarray(points, dtype=np.float64)
    out = np.empty_like(pts)
    for k, M in enumerate(Ms):
        if abs(np.linalg.det(M[:, :2])) < 1e-12:
            raise ValueError("crop transform: singular affine (an empty face box?)")
        inv = cv2.invertAffineTransform(M)
        out[k] = pts[k] @ inv[:, :2].T + inv[:, 2]
    return out
