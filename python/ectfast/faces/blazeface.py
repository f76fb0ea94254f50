"""BlazeFace (MediaPipe, Apache-2.0; ``assets/BLAZEFACE_LICENSE.txt``), short range (128 x 128
input) and full range (192 x 192), run by OpenCV's DNN module from the shipped .tflite files:
anchors, box/keypoint decoding, scores and the weighted non-maximum suppression are here.
Large images are letterboxed to the model input and, with ``tiles``, also searched in
overlapping tiles so that small faces in big photographs are found."""
from __future__ import annotations

import math
import os
from typing import List, Optional, Tuple

import numpy as np

from ectfast.assets import ASSETS
from ectfast.faces.base import FaceBox, box_iou, check_image

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
