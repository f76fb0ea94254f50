"""Face detectors: image in, face boxes (with scores and, where the detector has them, keypoints) out.

One small interface over several backends::

    from ectfast.faces import detect_faces, crop_box, crop_angle
    faces = detect_faces(image_bgr)               # list[FaceBox], best score first
    box = crop_box(faces[0])                      # the crop box ectfast.nets.data.box_from_landmarks gives
    angle = crop_angle(faces[0])                  # eye-line angle (radians), 0 without keypoints

Backends (each a class with ``name`` and ``detect(image_bgr) -> list[FaceBox]``):

* :class:`BlazeFaceDetector` -- MediaPipe's BlazeFace, short range (128 x 128 input) or full range
  (192 x 192), shipped as .tflite files in ``ectfast/assets`` (Apache-2.0, see
  ``assets/BLAZEFACE_LICENSE.txt``) and run by OpenCV's DNN module. Anchors, box/keypoint
  decoding, scores and the weighted non-maximum suppression are implemented here. Gives 6
  keypoints per face: right eye, left eye, nose tip, mouth centre, right ear, left ear (the
  subject's right/left: the right eye is on the image's left in an upright frontal face).
  Large images are letterboxed to the model input and, with ``tiles`` (default), also searched
  in overlapping tiles so that small faces in big photographs are found.
* :class:`HaarDetector` -- OpenCV's frontal-face Haar cascade (opencv 4.x ships it in cv2.data).
* :class:`DlibHogDetector` -- dlib's HOG detector, only where ``import dlib`` works (dlib is not
  a dependency of ectfast).

:class:`BlazeFaceComboDetector` ("blazeface") combines them: short range on the whole image, full
range on tiles of large images (small faces in big photographs). :func:`default_detector` picks
the first backend that loads in the order measured best (bench/faces.py, bench/RESULTS.md "face
detectors (issue 10)"): "blazeface", BlazeFace short range alone, full range alone, Haar.
Nothing is downloaded at run time.

:func:`crop_box` maps a detector's box to the training crop convention with per-detector
constants (CROP_CALIBRATION) fitted on the 300-W training faces (bench/calibrate_faces.py).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from ectfast.assets import ASSETS

# ------------------------------------------------------------------ BlazeFace model description

#: per variant: model file, input side, anchor layers as (stride, anchors per cell); the output
#: has sum over layers of (side/stride)^2 * anchors rows (short: 16*16*2 + 8*8*6 = 896, full:
#: 48*48 = 2304), each row 16 regressors (box centre dx, dy, w, h, then 6 keypoints x, y) in
#: input pixels relative to the anchor centre, and one score logit.
BLAZEFACE_MODELS = {
    "short": {"file": "face_detection_short_range.tflite", "size": 128,
              "layers": ((8, 2), (16, 6))},
    "full": {"file": "face_detection_full_range.tflite", "size": 192,
             "layers": ((4, 1),)},
}
#: keypoint order of BlazeFace's 6 keypoints (checked against the 68-point markup: bench/faces.py)
BLAZEFACE_KEYPOINTS = ("right_eye", "left_eye", "nose", "mouth", "right_ear", "left_ear")
#: raw score logits are clipped to +-this before the sigmoid (as MediaPipe does)
BLAZEFACE_SCORE_CLIP = 100.0
BLAZEFACE_SCORE_THRESHOLD = 0.5
BLAZEFACE_NMS_IOU = 0.3
#: score threshold of the full-range model on tiles in "blazeface" (tiles multiply the chances of
#: a false positive): measured on mosaics of training faces by
#:     OMP_NUM_THREADS=1 python bench/calibrate_faces.py --detectors --mosaic 12
#: (12 mosaics of 16 faces: 0.6 -> 187/192 faces found, 5 other boxes; 0.65 -> 182/192, 2 other
#: boxes; 0.7 -> 176/192, 0)
BLAZEFACE_TILE_SCORE_THRESHOLD = 0.65
#: tiles: square windows of side TILE_FRACTION x the image's shorter side (but at least
#: 2 x the model input), overlapping by half, searched in addition to the whole letterboxed image
#: when the image's longer side exceeds TILE_MIN_SIDE px.
BLAZEFACE_TILE_FRACTION = 0.5
BLAZEFACE_TILE_MIN_SIDE = 512

# ------------------------------------------------------------------ Haar settings (moved from detector.py)

#: the smallest window the Haar cascade scans; smaller images cannot contain a detectable face
MIN_IMAGE_SIDE = 24
HAAR_FILE = "haarcascade_frontalface_default.xml"
HAAR_SCALE_FACTOR = 1.1
HAAR_MIN_NEIGHBORS = 5
#: images larger than this (longer side, px) are downscaled for the Haar search only
HAAR_MAX_SIDE = 1280

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


# ------------------------------------------------------------------ result type


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


# ------------------------------------------------------------------ input checks


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


# ------------------------------------------------------------------ BlazeFace maths (pure NumPy)


def blazeface_anchors(variant: str = "short") -> np.ndarray:
    """(N, 2) anchor centres (x, y) in input pixels of a BlazeFace variant: for each layer
    (stride, k), the cells row by row, k anchors per cell at the cell centre."""
    spec = _spec(variant)
    size = spec["size"]
    out = []
    for stride, k in spec["layers"]:
        n = int(math.ceil(size / stride))
        c = (np.arange(n) + 0.5) * stride
        yy, xx = np.meshgrid(c, c, indexing="ij")
        cells = np.stack([xx.ravel(), yy.ravel()], axis=1)
        out.append(np.repeat(cells, k, axis=0))
    return np.concatenate(out, axis=0)


def decode_blazeface(raw_boxes: np.ndarray, raw_scores: np.ndarray, anchors: np.ndarray,
                     score_threshold: float = BLAZEFACE_SCORE_THRESHOLD):
    """Raw outputs -> (boxes (k, 4) x0 y0 x1 y1, scores (k,), keypoints (k, 6, 2)), in input
    pixels, of the anchors whose sigmoid score is >= ``score_threshold``.

    ``raw_boxes`` (N, 16): centre offset (dx, dy) from the anchor, width, height, then 6 keypoint
    offsets (x, y) from the anchor, all in input pixels; ``raw_scores`` (N,) or (N, 1) logits."""
    rb = np.asarray(raw_boxes, dtype=np.float64).reshape(len(anchors), -1)
    if rb.shape[1] < 4 or (rb.shape[1] - 4) % 2:
        raise ValueError(f"raw_boxes: expected (N, 4 + 2k) regressors, got {rb.shape}")
    logits = np.clip(np.asarray(raw_scores, dtype=np.float64).reshape(len(anchors)),
                     -BLAZEFACE_SCORE_CLIP, BLAZEFACE_SCORE_CLIP)
    scores = 1.0 / (1.0 + np.exp(-logits))
    keep = np.flatnonzero(scores >= score_threshold)
    rb, a, scores = rb[keep], anchors[keep], scores[keep]
    c = a + rb[:, 0:2]
    half = rb[:, 2:4] / 2
    boxes = np.concatenate([c - half, c + half], axis=1)
    kps = rb[:, 4:].reshape(len(rb), (rb.shape[1] - 4) // 2, 2) + a[:, None, :]
    return boxes, scores, kps


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


def weighted_nms(boxes: np.ndarray, scores: np.ndarray, keypoints: Optional[np.ndarray] = None,
                 iou_threshold: float = BLAZEFACE_NMS_IOU):
    """Weighted non-maximum suppression (BlazeFace's "blending"): take the best remaining box, take
    every remaining box whose IoU with it exceeds ``iou_threshold`` (itself included), and replace
    the cluster by the score-weighted mean of its boxes (and keypoints), with the best score.
    Returns (boxes (m, 4), scores (m,), keypoints (m, k, 2) or None), best first."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(scores) != len(boxes):
        raise ValueError(f"scores: expected {len(boxes)} scores, got {len(scores)}")
    kps = None
    if keypoints is not None:
        kps = np.asarray(keypoints, dtype=np.float64)
        if kps.ndim != 3 or kps.shape[0] != len(boxes) or kps.shape[2] != 2:
            raise ValueError(f"keypoints: expected shape ({len(boxes)}, k, 2), got {kps.shape}")
    order = np.argsort(-scores, kind="stable")
    out_b, out_s, out_k = [], [], []
    while len(order):
        ious = box_iou(boxes[order[:1]], boxes[order])[0]
        cluster = order[ious > iou_threshold]
        if len(cluster) == 0:  # degenerate (zero-area) best box: keep it alone
            cluster = order[:1]
        w = scores[cluster] / scores[cluster].sum() if scores[cluster].sum() > 0 else \
            np.full(len(cluster), 1.0 / len(cluster))
        out_b.append(w @ boxes[cluster])
        out_s.append(scores[order[0]])
        if kps is not None:
            out_k.append(np.tensordot(w, kps[cluster], axes=1))
        order = order[~np.isin(order, cluster)]
    nb = np.asarray(out_b, dtype=np.float64).reshape(-1, 4)
    ns = np.asarray(out_s, dtype=np.float64)
    nk = None if kps is None else np.asarray(out_k, dtype=np.float64).reshape(len(nb), kps.shape[1], 2)
    return nb, ns, nk


def _spec(variant: str) -> dict:
    if variant not in BLAZEFACE_MODELS:
        raise ValueError(f"variant: expected one of {sorted(BLAZEFACE_MODELS)}, got {variant!r}")
    return BLAZEFACE_MODELS[variant]


def _tile_origins(length: int, tile: int) -> List[int]:
    """Start positions of windows of ``tile`` px over ``length`` px, overlapping by about half."""
    if tile >= length:
        return [0]
    n = int(math.ceil((length - tile) / (tile / 2))) + 1
    return [int(round(v)) for v in np.linspace(0, length - tile, n)]


# ------------------------------------------------------------------ detectors


class BlazeFaceDetector:
    """MediaPipe BlazeFace (short or full range) run by OpenCV's DNN module.

    The whole image is searched letterboxed (aspect ratio kept, zero padding) to the model input.
    ``tiles``: images whose longer side exceeds ``BLAZEFACE_TILE_MIN_SIDE`` are also searched in
    overlapping square tiles (side ``BLAZEFACE_TILE_FRACTION`` x the shorter image side, at least
    twice the model input, overlapping by half), for faces too small to find in the downscaled
    whole image; a tile's detection that reaches a tile edge inside the image (a face cut by the
    tile) is dropped. All detections are merged by weighted NMS."""

    def __init__(self, variant: str = "short", *, tiles: bool = True,
                 score_threshold: float = BLAZEFACE_SCORE_THRESHOLD,
                 nms_iou: float = BLAZEFACE_NMS_IOU, model_path: Optional[str] = None):
        import cv2

        spec = _spec(variant)
        if not 0.0 < score_threshold < 1.0:
            raise ValueError(f"score_threshold: expected in (0, 1), got {score_threshold!r}")
        if not 0.0 < nms_iou < 1.0:
            raise ValueError(f"nms_iou: expected in (0, 1), got {nms_iou!r}")
        self.variant = variant
        self.name = f"blazeface-{variant}" + ("" if tiles else "-notiles")
        self.calibration_name = f"blazeface-{variant}"
        self.size = spec["size"]
        self.tiles = bool(tiles)
        self.score_threshold = float(score_threshold)
        self.nms_iou = float(nms_iou)
        path = model_path or os.path.join(ASSETS, spec["file"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"the BlazeFace model {path} is missing from this installation")
        if not hasattr(cv2, "dnn") or not hasattr(cv2.dnn, "readNetFromTFLite"):
            raise ImportError(f"OpenCV {cv2.__version__} cannot read TFLite models "
                              "(cv2.dnn.readNetFromTFLite needs OpenCV >= 4.8)")
        if hasattr(cv2.dnn, "ENGINE_CLASSIC"):  # OpenCV 5: the new engine drops the score output
            self.net = cv2.dnn.readNetFromTFLite(path, engine=cv2.dnn.ENGINE_CLASSIC)
        else:
            self.net = cv2.dnn.readNetFromTFLite(path)
        self.out_names = list(self.net.getUnconnectedOutLayersNames())
        self.anchors = blazeface_anchors(variant)
        # one forward pass checks the model against the anchors (and which output is which)
        self._raw(np.zeros((self.size, self.size, 3), np.uint8))

    def _raw(self, square_bgr: np.ndarray):
        """The network on one size x size BGR uint8 image -> (raw_boxes (N, 16), logits (N,))."""
        import cv2

        blob = cv2.dnn.blobFromImage(square_bgr, 1.0 / 127.5, (self.size, self.size),
                                     (127.5, 127.5, 127.5), swapRB=True, crop=False)
        self.net.setInput(blob)
        outs = self.net.forward(self.out_names)
        n = len(self.anchors)
        regs = [o for o in outs if o.size == n * 16]
        logits = [o for o in outs if o.size == n]
        if len(regs) != 1 or len(logits) != 1:
            raise RuntimeError(f"{self.name}: unexpected model outputs {[o.shape for o in outs]} "
                               f"(expected (1, {n}, 16) and (1, {n}, 1))")
        return regs[0].reshape(n, 16), logits[0].reshape(n)

    def _detect_window(self, image: np.ndarray, x0: int, y0: int, side: int, drop_cut: bool = False):
        """Detections in the square window (x0, y0, side) of ``image`` (zero padding beyond the
        image), in image pixels. ``drop_cut``: drop boxes reaching a window edge that lies inside
        the image."""
        import cv2

        h, w = image.shape[:2]
        win = image[y0:min(y0 + side, h), x0:min(x0 + side, w)]
        scale = self.size / side
        wh = (max(1, min(self.size, int(round(win.shape[1] * scale)))),
              max(1, min(self.size, int(round(win.shape[0] * scale)))))
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        small = cv2.resize(win, wh, interpolation=interp)
        square = np.zeros((self.size, self.size, 3), np.uint8)
        square[:wh[1], :wh[0]] = small
        rb, lg = self._raw(square)
        boxes, scores, kps = decode_blazeface(rb, lg, self.anchors, self.score_threshold)
        # the resized window spans wh input px for win.shape image px
        sx, sy = win.shape[1] / wh[0], win.shape[0] / wh[1]
        boxes = boxes * np.array([sx, sy, sx, sy]) + np.array([x0, y0, x0, y0])
        kps = kps * np.array([sx, sy]) + np.array([x0, y0])
        if drop_cut and len(boxes):
            m = 0.01 * side
            cut = np.zeros(len(boxes), bool)
            if x0 > 0:
                cut |= boxes[:, 0] < x0 + m
            if y0 > 0:
                cut |= boxes[:, 1] < y0 + m
            if x0 + side < w:
                cut |= boxes[:, 2] > x0 + side - m
            if y0 + side < h:
                cut |= boxes[:, 3] > y0 + side - m
            boxes, scores, kps = boxes[~cut], scores[~cut], kps[~cut]
        return boxes, scores, kps

    def tile_windows(self, h: int, w: int) -> List[Tuple[int, int, int]]:
        """The (x0, y0, side) tiles searched in an h x w image (empty for small images)."""
        out = []
        if max(h, w) > BLAZEFACE_TILE_MIN_SIDE:
            side = int(round(max(BLAZEFACE_TILE_FRACTION * min(h, w), 2 * self.size)))
            if side < max(h, w):
                for ty in _tile_origins(h, side):
                    for tx in _tile_origins(w, side):
                        out.append((tx, ty, side))
        return out

    def detect_arrays(self, image: np.ndarray, *, whole: bool = True, tiles: Optional[bool] = None):
        """(boxes (k, 4), scores (k,), keypoints (k, 6, 2)) after weighted NMS, best first, of a
        checked image; ``whole``/``tiles`` select the windows (``tiles`` default: self.tiles)."""
        h, w = image.shape[:2]
        parts = []
        if whole:
            parts.append(self._detect_window(image, 0, 0, max(h, w)))
        if self.tiles if tiles is None else tiles:
            parts.extend(self._detect_window(image, *win, drop_cut=True) for win in self.tile_windows(h, w))
        if not parts:
            return np.zeros((0, 4)), np.zeros(0), np.zeros((0, 6, 2))
        boxes = np.concatenate([p[0] for p in parts])
        scores = np.concatenate([p[1] for p in parts])
        kps = np.concatenate([p[2] for p in parts])
        return weighted_nms(boxes, scores, kps, self.nms_iou)

    def detect(self, image_bgr: np.ndarray) -> List[FaceBox]:
        img = check_image(image_bgr)
        boxes, scores, kps = self.detect_arrays(img)
        return [FaceBox(tuple(float(v) for v in b), float(s), k, self.calibration_name)
                for b, s, k in zip(boxes, scores, kps)]

    __call__ = detect


class BlazeFaceComboDetector:
    """BlazeFace short range on the whole (letterboxed) image, plus BlazeFace full range (score
    threshold ``tile_score_threshold``) on overlapping tiles of large images (longer side > BLAZEFACE_TILE_MIN_SIDE) for small faces;
    a full-range face is added when no short-range face overlaps it (IoU > nms_iou). Each
    FaceBox's ``detector`` names the model that found it (its crop calibration)."""

    name = "blazeface"

    def __init__(self, *, score_threshold: float = BLAZEFACE_SCORE_THRESHOLD,
                 tile_score_threshold: float = BLAZEFACE_TILE_SCORE_THRESHOLD,
                 nms_iou: float = BLAZEFACE_NMS_IOU):
        self.short = BlazeFaceDetector("short", tiles=False, score_threshold=score_threshold, nms_iou=nms_iou)
        self.full = BlazeFaceDetector("full", tiles=True, score_threshold=tile_score_threshold, nms_iou=nms_iou)
        self.nms_iou = float(nms_iou)

    def detect(self, image_bgr: np.ndarray) -> List[FaceBox]:
        img = check_image(image_bgr)
        out = self.short.detect(img)
        if self.full.tile_windows(*img.shape[:2]):
            boxes, scores, kps = self.full.detect_arrays(img, whole=False, tiles=True)
            have = np.array([f.box for f in out]).reshape(-1, 4)
            for b, s, k in zip(boxes, scores, kps):
                if len(have) and box_iou(b, have).max() > self.nms_iou:
                    continue
                out.append(FaceBox(tuple(float(v) for v in b), float(s), k, self.full.calibration_name))
        return sorted(out, key=lambda f: -f.score)

    __call__ = detect


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


# ------------------------------------------------------------------ choice of detector

#: backends in the order default_detector tries them (measured best first)
DEFAULT_ORDER = ("blazeface", "blazeface-short-notiles", "blazeface-full", "haar")
_DEFAULT = None


def make_detector(name: str):
    """A detector by name: blazeface-short, blazeface-full (tiles on), blazeface-short-notiles,
    blazeface-full-notiles, haar, dlib-hog."""
    if not isinstance(name, str):
        raise TypeError(f"name: expected a detector name, got {type(name).__name__}")
    if name == "blazeface":
        return BlazeFaceComboDetector()
    if name.startswith("blazeface-"):
        rest = name[len("blazeface-"):]
        tiles = not rest.endswith("-notiles")
        variant = rest[:-len("-notiles")] if not tiles else rest
        return BlazeFaceDetector(variant, tiles=tiles)
    if name == "haar":
        return HaarDetector()
    if name == "dlib-hog":
        return DlibHogDetector()
    raise ValueError(f"name: unknown face detector {name!r} (blazeface-short, blazeface-full, "
                     "blazeface-short-notiles, blazeface-full-notiles, haar, dlib-hog)")


def default_detector():
    """The best backend that loads here (cached), in the order DEFAULT_ORDER: "blazeface"
    (short range on the whole image + full range on tiles of large images), else BlazeFace short
    range alone, else full range alone, else Haar. RuntimeError naming every failure when none
    loads. The instance is shared: detectors hold OpenCV nets/cascades that must not be used by
    two threads at once, so threads should each call ``make_detector(default_detector().name)``."""
    global _DEFAULT
    if _DEFAULT is None:
        errors = []
        for name in DEFAULT_ORDER:
            try:
                _DEFAULT = make_detector(name)
                break
            except Exception as e:  # any backend failure: try the next one
                errors.append(f"{name}: {e}")
        else:
            raise RuntimeError("no face detector could be loaded: " + "; ".join(errors))
    return _DEFAULT


def detect_faces(image, detector=None) -> List[FaceBox]:
    """Faces in ``image`` (H x W x 3 uint8 BGR or H x W grey), best score first. ``detector``: a
    detector object, a name for :func:`make_detector`, or None for :func:`default_detector`."""
    if detector is None:
        det = default_detector()
    elif isinstance(detector, str):
        det = make_detector(detector)
    else:
        det = detector
    faces = list(det.detect(image))
    return sorted(faces, key=lambda f: -f.score)


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
