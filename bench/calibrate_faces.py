"""Calibrate each face detector's box against the training crop box (issue 10).

The landmark network is trained on square crops ``ectfast.nets.data.box_from_landmarks(landmarks)``
(side 1.3 x the landmarks' larger side, centred on their bounding box). For every 300-W TRAINING
face (afw, helen/trainset, lfpw/trainset -- never lfpw/testset) and every detector, take the
detection whose box has the largest IoU with the landmark box ``box_from_landmarks(pts, 1.0)``,
keep it when that IoU > 0.4, and fit by least squares, with the detector box centre (cx, cy) and
side s = (w + h) / 2 and the crop box centre (tx, ty) and side t:

    tx - cx = dx * s,   ty - cy = dy * s,   t = scale * s

(dx = sum(s (tx - cx)) / sum(s^2), etc.: ectfast.faces.fit_crop_calibration). Prints the constants for ``CROP_CALIBRATION`` in
ectfast/faces.py and the residuals (IoU of the predicted with the true crop box; centre error
and log side ratio relative to t).

``--mosaic N`` also measures the score threshold of BlazeFace full range on tiles
(``BLAZEFACE_TILE_SCORE_THRESHOLD``): N mosaics of 4 x 4 training faces, each scaled to 256 px,
on a 1024 x 1024 canvas; for each threshold, how many of the faces the "blazeface" detector finds
and how many other boxes it returns.

    OMP_NUM_THREADS=1 python bench/calibrate_faces.py --mosaic 12
    PYTHONPATH=/tmp/dlibenv OMP_NUM_THREADS=1 python bench/calibrate_faces.py   # + dlib-hog
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("ECTFAST_DATA", os.path.join(os.path.dirname(ROOT), "shared", "data"))
TRAIN_SETS = ("300w/afw", "300w/helen/trainset", "300w/lfpw/trainset")
DETECTORS = ("blazeface-short-notiles", "blazeface-full", "haar", "dlib-hog")


def calibrate(names, limit=0):
    import cv2

    from ectfast import faces as F
    from ectfast.nets.data import box_from_landmarks
    from ectfast.io.datasets import find_faces
    from ectfast.io.pts import read_pts

    pairs = []
    for f in TRAIN_SETS:
        pairs.extend(find_faces(os.path.join(DATA, f)))
    if limit:
        pairs = pairs[:limit]
    images = [(cv2.imread(p, cv2.IMREAD_COLOR), read_pts(q)) for p, q in pairs]
    print(f"{len(images)} training faces from {', '.join(TRAIN_SETS)}")
    result = {}
    for name in names:
        try:
            det = F.make_detector(name)
        except Exception as e:
            print(f"{name}: not available ({type(e).__name__}: {e})")
            continue
        dboxes, cboxes = [], []
        for img, pts in images:
            found = det.detect(img)
            if not found:
                continue
            lb = np.asarray(box_from_landmarks(pts, 1.0))
            iou = F.box_iou(np.array([f.box for f in found]), lb)[:, 0]
            j = int(np.argmax(iou))
            if iou[j] > F.MATCH_IOU:
                dboxes.append(found[j].box)
                cboxes.append(box_from_landmarks(pts))
        d, t = np.array(dboxes), np.array(cboxes)
        dx, dy, k = F.fit_crop_calibration(d, t)
        calib = getattr(det, "calibration_name", det.name)
        result[calib] = (dx, dy, k)
        # residuals with the fitted constants
        F.CROP_CALIBRATION[calib] = (dx, dy, k)
        pred = np.array([F.crop_box(F.FaceBox(tuple(b), 1.0, None, calib)) for b in d])
        ious = np.diag(F.box_iou(pred, t))
        ts = t[:, 2] - t[:, 0]
        cerr = np.linalg.norm((pred[:, :2] + pred[:, 2:]) / 2 - (t[:, :2] + t[:, 2:]) / 2, axis=1) / ts
        lr = np.log((pred[:, 2] - pred[:, 0]) / ts)
        print(f"{calib}: matched {len(d)}/{len(images)}; dx {dx:+.4f} dy {dy:+.4f} scale {k:.4f}; "
              f"crop IoU mean {ious.mean():.3f} (10%: {np.percentile(ious, 10):.3f}); "
              f"centre error / side median {np.median(cerr):.3f} (90%: {np.percentile(cerr, 90):.3f}); "
              f"|log side ratio| median {np.median(np.abs(lr)):.3f} (90%: {np.percentile(np.abs(lr), 90):.3f})",
              flush=True)
    print("\nCROP_CALIBRATION = {")
    for calib, (dx, dy, k) in result.items():
        print(f'    "{calib}": ({dx:.4f}, {dy:.4f}, {k:.4f}),')
    print("}")
    return result


def mosaic(n, thresholds=(0.5, 0.55, 0.6, 0.65, 0.7, 0.75)):
    import cv2

    from ectfast import faces as F
    from ectfast.nets.data import box_from_landmarks
    from ectfast.io.datasets import find_faces
    from ectfast.io.pts import read_pts

    pairs = find_faces(os.path.join(DATA, "300w/helen/trainset")) + find_faces(os.path.join(DATA, "300w/lfpw/trainset"))
    rng = np.random.default_rng(0)
    rng.shuffle(pairs)
    canvases = []
    for m in range(n):
        canvas, boxes = np.zeros((1024, 1024, 3), np.uint8), []
        for i in range(16):
            p, q = pairs[(m * 16 + i) % len(pairs)]
            im, pts = cv2.imread(p, cv2.IMREAD_COLOR), read_pts(q)
            s = 256 / max(im.shape[:2])
            im = cv2.resize(im, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
            y, x = (i // 4) * 256, (i % 4) * 256
            canvas[y:y + im.shape[0], x:x + im.shape[1]] = im
            boxes.append(box_from_landmarks(pts * s + [x, y], 1.0))
        canvases.append((canvas, np.array(boxes)))
    print(f"\nmosaics: {n} x 16 training faces (256 px each) on 1024 x 1024; detector 'blazeface'")
    print("| full-range tile score threshold | faces found | other boxes |")
    print("|---|---|---|")
    for t in thresholds:
        det = F.BlazeFaceComboDetector(tile_score_threshold=t)
        found = other = 0
        for canvas, boxes in canvases:
            b = np.array([f.box for f in det.detect(canvas)]).reshape(-1, 4)
            iou = F.box_iou(b, boxes)
            found += int((iou.max(0) > F.MATCH_IOU).sum()) if len(b) else 0
            other += int((iou.max(1) <= F.MATCH_IOU).sum()) if len(b) else 0
        print(f"| {t} | {found}/{16 * n} | {other} |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--detectors", nargs="*", default=list(DETECTORS))
    ap.add_argument("--limit", type=int, default=0, help="first N training faces only (quick runs)")
    ap.add_argument("--mosaic", type=int, default=0, help="also the tile-threshold measurement on N mosaics")
    args = ap.parse_args(argv)
    import cv2

    cv2.setNumThreads(1)
    if not os.path.isdir(os.path.join(DATA, "300w")):
        print(f"calibrate_faces: no data at {DATA}")
        return 2
    print(f"load average {os.getloadavg()[0]:.2f}")
    if args.detectors:
        calibrate(args.detectors, args.limit)
    if args.mosaic:
        mosaic(args.mosaic)
    return 0


if __name__ == "__main__":
    sys.exit(main())
