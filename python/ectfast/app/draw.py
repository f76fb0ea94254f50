"""Drawing detected faces on an image (OpenCV)."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ectfast.app.detector import Face


def draw_faces(image_bgr: np.ndarray, faces: Sequence[Face]) -> np.ndarray:
    """A copy of the image with every face's box and landmarks drawn: each point coloured from
    red (confidence 0) to green (confidence 1); points predicted occluded get a cross instead of
    a dot."""
    import cv2

    out = image_bgr.copy()
    for f in faces:
        side = float(f.box[2] - f.box[0])
        r = max(1, int(round(side / 160)))
        th = max(1, r // 2)
        if f.angle:  # the rotated crop's square
            c = (f.box[:2] + f.box[2:]) / 2
            corners = cv2.boxPoints(((float(c[0]), float(c[1])), (side, side), math.degrees(f.angle)))
            cv2.polylines(out, [np.round(corners).astype(np.int32)], True, (255, 160, 0), th, cv2.LINE_AA)
        else:
            x0, y0, x1, y1 = (int(round(v)) for v in f.box)
            cv2.rectangle(out, (x0, y0), (x1, y1), (255, 160, 0), th, cv2.LINE_AA)
        for (x, y), c, v in zip(f.landmarks, f.confidence, f.visible):
            c = float(np.clip(c, 0.0, 1.0))
            colour = (0, int(round(255 * c)), int(round(255 * (1 - c))))
            p = (int(round(x)), int(round(y)))
            if v:
                cv2.circle(out, p, r + 1, colour, -1, cv2.LINE_AA)
            else:
                cv2.drawMarker(out, p, colour, cv2.MARKER_TILTED_CROSS, 4 * r + 4, th + 1, cv2.LINE_AA)
    return out
