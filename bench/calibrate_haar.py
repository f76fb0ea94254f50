"""Calibrate OpenCV's Haar face box against the 68-point landmark box (issue 6).

For every image with a .pts under the given folders, run the frontal-face Haar cascade (the
settings of ectfast.detector), keep the detection that matches the annotated face (its centre
inside the landmark box, largest overlap), and measure, in units of the Haar box width w:

    dx = (landmark-box centre x - Haar centre x) / w     dy = same for y
    sw = landmark-box width / w                          sh = landmark-box height / w

Prints the medians (the constants in ectfast/detector.py) and the spread.

    PYTHONPATH=python python bench/calibrate_haar.py ../shared/data/faces ../shared/data/300w/lfpw/testset
"""
import sys

import cv2
import numpy as np

from ectfast.datasets import find_faces
from ectfast.detector import haar_faces
from ectfast.pts import read_pts


def main(folders):
    rows, missed, total = [], 0, 0
    for folder in folders:
        for image_path, pts_path in find_faces(folder):
            img = cv2.imread(image_path, cv2.IMREAD_COLOR)
            if img is None:
                continue
            total += 1
            pts = read_pts(pts_path)
            lo, hi = pts.min(0), pts.max(0)
            c, wh = (lo + hi) / 2, hi - lo
            best, best_iou = None, 0.0
            for x, y, w, h in haar_faces(img):
                hc = np.array([x + w / 2, y + h / 2])
                if not (lo <= hc).all() or not (hc <= hi).all():
                    continue
                ix = max(0, min(x + w, hi[0]) - max(x, lo[0]))
                iy = max(0, min(y + h, hi[1]) - max(y, lo[1]))
                inter = ix * iy
                iou = inter / (w * h + wh[0] * wh[1] - inter)
                if iou > best_iou:
                    best, best_iou = (x, y, w, h), iou
            if best is None:
                missed += 1
                continue
            x, y, w, h = best
            rows.append(((c[0] - (x + w / 2)) / w, (c[1] - (y + h / 2)) / w, wh[0] / w, wh[1] / w))
    r = np.array(rows)
    print(f"images {total}, Haar matched {len(r)}, missed {missed}")
    for name, col in zip(("dx", "dy", "sw", "sh"), r.T):
        q = np.percentile(col, [10, 50, 90])
        print(f"{name}: median {q[1]:+.4f}  (10%: {q[0]:+.4f}, 90%: {q[2]:+.4f})")


if __name__ == "__main__":
    main(sys.argv[1:] or ["../shared/data/faces", "../shared/data/300w/lfpw/testset"])
