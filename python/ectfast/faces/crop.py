"""Detector box -> crop box (the training crops' convention) and the eye-line angle."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np

from ectfast.faces.base import FaceBox

# ------------------------------------------------------------------ crop calibration

#: Detector box -> crop box (the square box of ectfast.nets.data.box_from_landmarks(landmarks), 1.3 x
#: the landmarks' larger side). With the detector box centre (cx, cy) and side s = (w + h) / 2,
#: the crop box is the square of side scale * s centred at (cx + dx * s, cy + dy * s), where
#: (dx, dy, scale) = CROP_CALIBRATION[detector]. Least-squares fits (fit_crop_calibration) on the
#: 300-W TRAINING faces only (afw, helen/trainset, lfpw/trainset: 2012 faces; a detection is
#: used when its box has IoU > 0.4 with the landmark box), measured by
#:     PYTHONPATH=/tmp/dlibenv OMP_NUM_THREADS=1 python bench/calibrate_faces.py --mosaic 12
#: matched faces and residuals (mean IoU of the predicted with the true crop box):
#: blazeface-short 2012, 0.875; blazeface-full 1978, 0.824; haar 1829, 0.811; dlib-hog 1913, 0.807
#: (bench/RESULTS.md, "face detectors (issue 10)"). "blazeface-full" is also used for the full-range
#: model's detections on tiles.
CROP_CALIBRATION = {
    "blazeface-short": (0.0008, 0.0567, 1.2499),
    "blazeface-full": (0.0084, 0.0947, 1.1740),
    "haar": (0.0044, 0.1424, 1.1285),
    "dlib-hog": (0.0091, 0.0875, 1.2672),
}
#: the IoU with the landmark box above which a detection counts as the annotated face
MATCH_IOU = 0.4


# ------------------------------------------------------------------ box -> crop


def _calibration(name: str):
    base = name[:-len("-notiles")] if name.endswith("-notiles") else name
    if base not in CROP_CALIBRATION:
        raise ValueError(f"detector_name: no crop calibration for {name!r} "
                         f"(known: {', '.join(sorted(CROP_CALIBRATION))})")
    return CROP_CALIBRATION[base]


def crop_box(facebox: FaceBox, detector_name: Optional[str] = None) -> Tuple[float, float, float, float]:
    """The square crop box (x0, y0, x1, y1) in the convention of ectfast.nets.data.box_from_landmarks
    (1.3 x the landmarks' larger side, centred on their bounding box) predicted from a detector
    box by the calibration ``CROP_CALIBRATION[detector_name]`` (default: ``facebox.detector``)."""
    name = detector_name if detector_name is not None else facebox.detector
    dx, dy, k = _calibration(name)
    x0, y0, x1, y1 = (float(v) for v in facebox.box)
    s = ((x1 - x0) + (y1 - y0)) / 2
    if not (s > 0 and np.isfinite([x0, y0, x1, y1]).all()):
        raise ValueError(f"facebox: box {facebox.box!r} is empty or not finite")
    cx, cy = (x0 + x1) / 2 + dx * s, (y0 + y1) / 2 + dy * s
    half = k * s / 2
    return (cx - half, cy - half, cx + half, cy + half)


def fit_crop_calibration(det_boxes, crop_boxes) -> Tuple[float, float, float]:
    """Least-squares (dx, dy, scale) of :func:`crop_box` mapping detector boxes (k, 4) to crop
    boxes (k, 4): with detector centre (cx, cy), side s = (w + h) / 2 and crop centre (tx, ty),
    side t: tx - cx = dx s, ty - cy = dy s, t = scale s (each a one-parameter fit)."""
    d = np.asarray(det_boxes, dtype=np.float64).reshape(-1, 4)
    t = np.asarray(crop_boxes, dtype=np.float64).reshape(-1, 4)
    if len(d) != len(t) or len(d) == 0:
        raise ValueError(f"crop_boxes: expected as many boxes as det_boxes (>= 1), got {len(t)} and {len(d)}")
    s = ((d[:, 2] - d[:, 0]) + (d[:, 3] - d[:, 1])) / 2
    c = (d[:, :2] + d[:, 2:]) / 2
    tc = (t[:, :2] + t[:, 2:]) / 2
    ts = ((t[:, 2] - t[:, 0]) + (t[:, 3] - t[:, 1])) / 2
    ss = float(s @ s)
    return (float(s @ (tc[:, 0] - c[:, 0])) / ss, float(s @ (tc[:, 1] - c[:, 1])) / ss, float(s @ ts) / ss)


def crop_angle(facebox: FaceBox) -> float:
    """Angle (radians) of the line from the right eye to the left eye (image y down: positive
    when the left eye is lower in the image), from BlazeFace's keypoints; 0 without keypoints.
    Rotating the image by -angle about the face centre makes the eye line horizontal."""
    k = facebox.keypoints
    if k is None:
        return 0.0
    k = np.asarray(k, dtype=np.float64)
    if k.ndim != 2 or k.shape[0] < 2 or k.shape[1] != 2:
        return 0.0
    d = k[1] - k[0]
    if not np.isfinite(d).all() or not d.any():
        return 0.0
    return float(math.atan2(d[1], d[0]))
