"""The classic face detectors: OpenCV's frontal-face Haar cascade (shipped in cv2.data by
opencv 4.x) and dlib's HOG detector (only where ``import dlib`` works; dlib is not a dependency
of ectfast)."""
from __future__ import annotations

import os
from typing import List

import numpy as np

from ectfast.faces.base import MIN_IMAGE_SIDE, FaceBox, check_image

HAAR_FILE = "haarcascade_frontalface_default.xml"
HAAR_SCALE_FACTOR = 1.1
HAAR_MIN_NEIGHBORS = 5
#: images larger than this (longer side, px) are downscaled for the Haar search only
HAAR_MAX_SIDE = 1280


def haar_cascade_path() -> str:
    """Path of the frontal-face Haar cascade shipped with opencv-python(-headless) 4.x."""
    import cv2

    folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
    path = os.path.join(folder, HAAR_FILE) if folder else None
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            f"the OpenCV Haar cascade {HAAR_FILE} was not found ({path or 'cv2.data.haarcascades is missing'});"
            " install opencv-python-headless 4.x, which ships it, or pass face boxes")
    return path


def haar_cascade():
    """A newly loaded frontal-face Haar cascade (one per detector: a cascade is not shared
    between threads)."""
    import cv2

    path = haar_cascade_path()
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise FileNotFoundError(f"{path}: OpenCV could not load the Haar cascade (corrupt file?)")
    return cascade


class HaarDetector:
    """OpenCV's frontal-face Haar cascade (histogram-equalized grey image, downscaled to
    HAAR_MAX_SIDE for the search). ``score`` is the number of merged neighbour windows. Each
    instance loads its own cascade: use one instance per thread."""

    name = "haar"
    calibration_name = "haar"

    def __init__(self, scale_factor: float = HAAR_SCALE_FACTOR, min_neighbors: int = HAAR_MIN_NEIGHBORS):
        self.cascade = haar_cascade()
        self.scale_factor = float(scale_factor)
        self.min_neighbors = int(min_neighbors)

    def detect(self, image_bgr: np.ndarray) -> List[FaceBox]:
        import cv2

        img = check_image(image_bgr)
        if min(img.shape[:2]) < MIN_IMAGE_SIDE:
            return []
        grey = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        scale = 1.0
        if max(grey.shape) > HAAR_MAX_SIDE:
            scale = HAAR_MAX_SIDE / max(grey.shape)
            grey = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        grey = cv2.equalizeHist(grey)
        found, neighbours = self.cascade.detectMultiScale2(
            grey, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
            minSize=(MIN_IMAGE_SIDE, MIN_IMAGE_SIDE))
        boxes = np.asarray(found, dtype=np.float64).reshape(-1, 4) / scale
        nb = np.asarray(neighbours, dtype=np.float64).reshape(-1)
        out = [FaceBox((x, y, x + w, y + h), float(n), None, self.name) for (x, y, w, h), n in zip(boxes, nb)]
        return sorted(out, key=lambda f: (-f.score, -f.width))

    __call__ = detect


class DlibHogDetector:
    """dlib's HOG + linear SVM frontal-face detector (only where ``import dlib`` works; dlib is
    not a dependency of ectfast). ``upsample``: image doublings before the search (finds faces
    smaller than 80 px at about 4x the time each)."""

    name = "dlib-hog"
    calibration_name = "dlib-hog"

    def __init__(self, upsample: int = 0):
        import dlib  # ImportError where dlib is not installed

        self.detector = dlib.get_frontal_face_detector()
        self.upsample = int(upsample)

    def detect(self, image_bgr: np.ndarray) -> List[FaceBox]:
        img = check_image(image_bgr)
        rgb = np.ascontiguousarray(img[:, :, ::-1])
        rects, scores, _ = self.detector.run(rgb, self.upsample, 0.0)
        out = [FaceBox((float(r.left()), float(r.top()), float(r.right() + 1), float(r.bottom() + 1)),
                       float(s), None, self.name) for r, s in zip(rects, scores)]
        return sorted(out, key=lambda f: -f.score)

    __call__ = detect
