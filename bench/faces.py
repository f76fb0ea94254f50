"""Face detectors (ectfast.faces) on the 300-W test faces and the 4 photographs (issue 10).

For each detector:

* recall on the 561 face images of LFPW test (224) + AFW (337): a face counts as found when a
  detection's box has IoU > 0.4 with the landmark box ``box_from_landmarks(pts, 1.0)`` (the
  square of the landmarks' larger side, centred on their bounding box -- the same box for every
  detector). Two boxes per detection are scored: the detector's own box ("raw") and the
  calibrated crop box ``crop_box`` shrunk by 1.3 to the landmark-box convention ("calibrated");
* time per image (wall clock of ``detect``, single thread, image already decoded);
* on ../shared/data/faces (einstein, breakingbad, lenna, takeo): whether the annotated face is
  found (a detection with IoU > 0.4, raw box), and how many faces were detected.

    OMP_NUM_THREADS=1 python bench/faces.py                      # every detector that loads
    OMP_NUM_THREADS=1 python bench/faces.py --detectors blazeface-short haar
    PYTHONPATH=/tmp/dlibenv OMP_NUM_THREADS=1 python bench/faces.py   # + dlib-bin HOG if installed there

``--keypoints`` also prints the mean distance of BlazeFace's 6 keypoints from the matching
68-point landmarks (eye centres, nose tip 30, mouth centre, ear ~ jaw points 0/16), which is how
the keypoint order in ectfast.faces was checked.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("ECTFAST_DATA", os.path.join(os.path.dirname(ROOT), "shared", "data"))
ALL = ("blazeface", "blazeface-short", "blazeface-short-notiles", "blazeface-full",
       "blazeface-full-notiles", "haar", "dlib-hog")


def landmark_box(pts):
    from ectfast.nets.data import box_from_landmarks

    return np.asarray(box_from_landmarks(pts, 1.0), dtype=np.float64)


def calibrated_landmark_box(face):
    """crop_box shrunk from the 1.3 crop convention back to the landmark box (same centre)."""
    from ectfast.nets.data import BOX_SCALE
    from ectfast.faces import crop_box

    b = np.asarray(crop_box(face), dtype=np.float64)
    c, half = (b[:2] + b[2:]) / 2, (b[2] - b[0]) / 2 / BOX_SCALE
    return np.concatenate([c - half, c + half])


def keypoint_targets(pts):
    """The 68-point positions BlazeFace's 6 keypoints should be near (right eye, left eye, nose,
    mouth, right ear, left ear)."""
    return np.array([pts[36:42].mean(0), pts[42:48].mean(0), pts[30], pts[[62, 66]].mean(0), pts[0], pts[16]])


def items(folders):
    from ectfast.io.datasets import find_faces

    out = []
    for f in folders:
        out.extend(find_faces(os.path.join(DATA, f)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--detectors", nargs="+", default=None, help=f"names (default: all that load of {ALL})")
    ap.add_argument("--sets", nargs="+", default=["300w/lfpw/testset", "300w/afw"])
    ap.add_argument("--limit", type=int, default=0, help="first N images only (quick runs)")
    ap.add_argument("--keypoints", action="store_true", help="keypoint distances to the landmarks")
    ap.add_argument("--misses", action="store_true", help="list the missed images")
    args = ap.parse_args(argv)

    import cv2

    from ectfast import faces as F
    from ectfast.io.pts import read_pts

    cv2.setNumThreads(1)
    if not os.path.isdir(os.path.join(DATA, "300w")):
        print(f"faces bench: no data at {DATA}")
        return 2
    dets = []
    for name in args.detectors or ALL:
        try:
            dets.append(F.make_detector(name))
        except Exception as e:
            print(f"{name}: not available ({type(e).__name__}: {e})")
    pairs = items(args.sets)
    if args.limit:
        pairs = pairs[:args.limit]
    data = [(p, cv2.imread(p, cv2.IMREAD_COLOR), read_pts(q)) for p, q in pairs]
    photos = [(p, cv2.imread(p, cv2.IMREAD_COLOR), read_pts(q)) for p, q in items(["faces"])]
    print(f"OpenCV {cv2.__version__}, {len(data)} face images from {', '.join(args.sets)}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print()
    print("| detector | found (raw box) | found (calibrated box) | mean IoU (raw) | ms/image | "
          "photographs: annotated face found | faces per photograph |")
    print("|---|---|---|---|---|---|---|")
    for det in dets:
        for _, img, _ in data[:3]:  # warm-up
            det.detect(img)
        hit_raw = hit_cal = 0
        ious, times, kp_err, misses = [], [], [], []
        for path, img, pts in data:
            t = time.perf_counter()
            found = det.detect(img)
            times.append(time.perf_counter() - t)
            lb = landmark_box(pts)
            if found:
                raw = F.box_iou(np.array([f.box for f in found]), lb)[:, 0]
                cal = F.box_iou(np.array([calibrated_landmark_box(f) for f in found]), lb)[:, 0]
                j = int(np.argmax(raw))
                hit_raw += raw[j] > F.MATCH_IOU
                hit_cal += cal.max() > F.MATCH_IOU
                if raw[j] > F.MATCH_IOU:
                    ious.append(raw[j])
                    if args.keypoints and found[j].keypoints is not None:
                        side = lb[2] - lb[0]
                        kp_err.append(np.linalg.norm(found[j].keypoints - keypoint_targets(pts), axis=1) / side)
                else:
                    misses.append(os.path.relpath(path, DATA))
            else:
                misses.append(os.path.relpath(path, DATA))
        photo_found, counts = [], []
        for path, img, pts in photos:
            found = det.detect(img)
            lb = landmark_box(pts)
            ok = bool(found) and F.box_iou(np.array([f.box for f in found]), lb)[:, 0].max() > F.MATCH_IOU
            name = os.path.splitext(os.path.basename(path))[0]
            photo_found.append(f"{name} {'yes' if ok else 'NO'}")
            counts.append(f"{name} {len(found)}")
        n = len(data)
        print(f"| {det.name} | {hit_raw}/{n} = {100 * hit_raw / n:.1f}% | {hit_cal}/{n} = {100 * hit_cal / n:.1f}% | "
              f"{np.mean(ious):.3f} | {1000 * np.mean(times):.1f} | "
              f"{sum(s.endswith('yes') for s in photo_found)}/{len(photos)}: {', '.join(photo_found)} | "
              f"{', '.join(counts)} |", flush=True)
        if args.keypoints and kp_err:
            e = np.mean(kp_err, axis=0)
            print("    keypoint distance / landmark-box side (right eye, left eye, nose, mouth, right ear, "
                  "left ear):", " ".join(f"{v:.3f}" for v in e))
        if args.misses and misses:
            print("    missed:", " ".join(misses))
    print(f"\nload average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
