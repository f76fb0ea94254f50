"""Whole photographs to 68 landmarks on CPU: images/s and faces/s of ``ectfast detect``'s path
(read + decode, face detection, crops, network, ECT fit; nothing written), with each inference
engine (torch, onnxruntime) in the same run, and optionally dlib (HOG detector + its 68-point
shape predictor) side by side (issue 10).

Every engine runs the same images through ``Detector.detect_files`` (``--workers`` threads read,
decode, search and crop ahead; the main thread runs the network and the fit on batches of
``--batch-size`` faces). One warm-up pass over the first few images, then ``--repeat`` timed
passes; the best pass is reported. A stage breakdown (sequential, one image at a time for
reading and face search, batches for the network and the fit) says where the time goes. Where an
image has a NAME.pts beside it (300-W layout), the inter-ocular NME of the detected face nearest
to the annotation is reported too, and the images whose annotated face was not found.

    OMP_NUM_THREADS=2 python bench/pipeline.py --weights python/ectfast/assets/lite_300w.pt
    OMP_NUM_THREADS=2 python bench/pipeline.py --weights runs/lite/light.pt --dlib-model shape_predictor_68_face_landmarks.dat

``--weights`` is the .pt file (torch engine); the ONNX file is NAME.onnx beside it, or exported
to a temporary file when absent; ``--engines ... onnxruntime-int8`` adds the int8 file
NAME_int8.onnx (``ectfast export-onnx --int8``). The engine that ``engine="auto"`` picks on CPU
(``ectfast.nets.engine.CPU_PREFERENCE``) should be the faster one here: the script says whether it is.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("ECTFAST_DATA", os.path.join(os.path.dirname(ROOT), "shared", "data"))
DEFAULT_IMAGES = [os.path.join(DATA, "300w", "lfpw", "testset"), os.path.join(DATA, "300w", "afw"),
                  os.path.join(DATA, "faces")]


def list_images(folders, limit):
    from ectfast.io.images import IMAGE_EXTENSIONS

    out = []
    for f in folders:
        if os.path.isfile(f):
            out.append(f)
            continue
        for p in sorted(glob.glob(os.path.join(f, "**", "*"), recursive=True)):
            if os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS:
                out.append(p)
    return out[:limit] if limit else out


def annotation(path):
    from ectfast.io.pts import read_pts

    pts = os.path.splitext(path)[0] + ".pts"
    if not os.path.isfile(pts):
        return None
    try:
        gt = read_pts(pts)
    except (ValueError, OSError):
        return None
    return gt if gt.shape == (68, 2) else None


def score(per_image, gts):
    """(mean NME, median NME, annotated faces found, annotated faces) over images with a .pts:
    the face whose landmark centre is nearest the annotation's, if that centre lies inside the
    annotation's box."""
    from ectfast.core import metrics

    errs, total = [], 0
    for lms, gt in zip(per_image, gts):
        if gt is None:
            continue
        total += 1
        if not len(lms):
            continue
        best = min(lms, key=lambda lm: np.linalg.norm(lm.mean(0) - gt.mean(0)))
        c = best.mean(0)
        if ((gt.min(0) <= c) & (c <= gt.max(0))).all():
            errs.append(float(metrics.nme(best[None], gt[None], "inter-ocular")[0]))
    if not errs:
        return None, None, 0, total
    return float(np.mean(errs)), float(np.median(errs)), len(errs), total


def run_ectfast(det, paths, repeat, workers):
    best, faces, lms = None, 0, []
    list(det.detect_files(paths[:4], workers=workers, keep_images=False))  # warm-up
    for _ in range(repeat):
        t0 = time.perf_counter()
        res = list(det.detect_files(paths, workers=workers, keep_images=False))
        dt = time.perf_counter() - t0
        if best is None or dt < best:
            best = dt
            faces = sum(len(r.faces) for r in res)
            lms = [[f.landmarks / r.scale for f in r.faces] for r in res]
            failed = [r.path for r in res if r.error]
    return best, faces, lms, failed


def stage_breakdown(det, paths, n=40):
    """ms per image (read, face search) and per face (crop, network, fit), sequential."""
    from ectfast.app import crops as C
    from ectfast.core.arrays import to_numpy
    from ectfast.io import images

    t = {"read": 0.0, "faces": 0.0, "crop": 0.0, "network": 0.0, "fit": 0.0}
    crops_all, Ms_all = [], []
    paths = paths[:n]
    for p in paths:
        t0 = time.perf_counter()
        img = images.read_image(p).image
        t1 = time.perf_counter()
        boxes, angles, _ = det.find_faces_full(img)
        t2 = time.perf_counter()
        crops, Ms = C.crop_faces([img], [0] * len(boxes), boxes, angles)
        t3 = time.perf_counter()
        t["read"] += t1 - t0
        t["faces"] += t2 - t1
        t["crop"] += t3 - t2
        crops_all += crops
        Ms_all.append(Ms)
    k = len(crops_all)
    from ectfast.core.fit import fit

    for s in range(0, k, det.batch_size):
        x = C.crops_to_input(crops_all[s:s + det.batch_size])
        t0 = time.perf_counter()
        maps = to_numpy(det.estimator(x))
        t1 = time.perf_counter()
        fit(maps, det.pdm, method=det.method, upsample=256 // maps.shape[-1],
            **{**det.estimator.fit_options, **det.fit_options})
        t2 = time.perf_counter()
        t["network"] += t1 - t0
        t["fit"] += t2 - t1
    per_img = {s: 1e3 * t[s] / len(paths) for s in ("read", "faces")}
    per_face = {s: 1e3 * t[s] / max(k, 1) for s in ("crop", "network", "fit")}
    return per_img, per_face, k


def run_dlib(model_path, paths, upsample):
    import cv2
    import dlib

    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(model_path)
    for p in paths[:2]:  # warm-up
        rgb = cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB)
        detector(rgb, upsample)
    lms, faces = [], 0
    t0 = time.perf_counter()
    for p in paths:
        rgb = cv2.cvtColor(cv2.imread(p, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        rects = detector(rgb, upsample)
        pts = []
        for r in rects:
            s = predictor(rgb, r)
            pts.append(np.array([[s.part(i).x, s.part(i).y] for i in range(68)], float))
        faces += len(pts)
        lms.append(pts)
    return time.perf_counter() - t0, faces, lms


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", nargs="+", default=DEFAULT_IMAGES, help="image files or folders (recursive)")
    ap.add_argument("--limit", type=int, default=300, help="at most this many images (default 300; 0: all)")
    ap.add_argument("--weights", default=None, help="the network's .pt (default: the shipped one)")
    ap.add_argument("--engines", nargs="+", default=["torch", "onnxruntime"],
                    choices=["torch", "onnxruntime", "onnxruntime-int8"],
                    help="onnxruntime-int8: the int8 file NAME_int8.onnx beside the weights (precision='int8')")
    ap.add_argument("--threads", type=int, default=2, help="the engines' CPU threads (default 2)")
    ap.add_argument("--workers", type=int, default=2, help="reading/face-search threads (default 2)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--face-detector", default="auto")
    ap.add_argument("--no-align", action="store_true", help="crops not rotated by the eye line")
    ap.add_argument("--flip", action="store_true", help="test-time flip (the network runs twice per face)")
    ap.add_argument("--repeat", type=int, default=2, help="timed passes per engine; the best is kept (default 2)")
    ap.add_argument("--dlib-model", default=None,
                    help="dlib's shape_predictor_68_face_landmarks.dat: adds dlib (HOG + shape predictor) side by side")
    ap.add_argument("--dlib-upsample", type=int, default=1, help="dlib HOG image doublings (default 1)")
    ap.add_argument("--json", default=None, help="also write the results as JSON to this file")
    args = ap.parse_args(argv)

    import ectfast
    from ectfast.nets import engine as E
    from ectfast.app.detector import Detector

    paths = list_images(args.images, args.limit)
    if not paths:
        print(f"pipeline bench: no images under {args.images}")
        return 2
    gts = [annotation(p) for p in paths]
    pt = args.weights or E.DEFAULT_PT
    onnx_path = os.path.splitext(pt)[0] + ".onnx"
    tmp = None
    if "onnxruntime" in args.engines and not os.path.isfile(onnx_path):
        from ectfast.nets import export

        tmp = tempfile.TemporaryDirectory()
        onnx_path = export.export_weights(pt, os.path.join(tmp.name, "net.onnx"))["path"]
    try:
        import torch

        torch.set_num_threads(args.threads)
        tv = torch.__version__
    except ImportError:
        tv = "not installed"
    import onnxruntime

    print(f"ectfast {ectfast.__version__}, fit backends {ectfast.backends()}, torch {tv}, "
          f"onnxruntime {onnxruntime.__version__}, python {platform.python_version()}, {os.cpu_count()} CPUs")
    print(f"images: {len(paths)} from {', '.join(args.images)} ({sum(g is not None for g in gts)} annotated); "
          f"weights {pt}; batch {args.batch_size}; engine threads {args.threads}; workers {args.workers}; "
          f"crops {'not ' if args.no_align else ''}levelled by the eye line; test-time flip {args.flip}")
    rows, results = [], {}
    for eng in args.engines:
        int8 = eng == "onnxruntime-int8"
        det = Detector(device="cpu", engine="onnxruntime" if int8 else eng,
                       weights=pt if eng != "onnxruntime" else onnx_path, precision="int8" if int8 else "fp32",
                       face_detector=args.face_detector, batch_size=args.batch_size, threads=args.threads,
                       align=not args.no_align, flip=args.flip)
        dt, faces, lms, failed = run_ectfast(det, paths, args.repeat, args.workers)
        per_img, per_face, k = stage_breakdown(det, paths)
        mean, med, found, total = score(lms, gts)
        results[eng] = {"seconds": dt, "images_per_s": len(paths) / dt, "faces_per_s": faces / dt, "faces": faces,
                        "failed": failed, "nme_mean": mean, "nme_median": med, "annotated_found": found,
                        "annotated": total, "stage_ms_per_image": per_img, "stage_ms_per_face": per_face,
                        "face_detector": det.face_detector_name}
        rows.append((f"ectfast, {eng}", results[eng]))
    if args.dlib_model:
        try:
            dt, faces, lms = run_dlib(args.dlib_model, paths, args.dlib_upsample)
            mean, med, found, total = score(lms, gts)
            results["dlib"] = {"seconds": dt, "images_per_s": len(paths) / dt, "faces_per_s": faces / dt,
                               "faces": faces, "nme_mean": mean, "nme_median": med, "annotated_found": found,
                               "annotated": total, "upsample": args.dlib_upsample}
            rows.append((f"dlib {__import__('dlib').__version__} HOG (upsample {args.dlib_upsample}) + "
                         "shape predictor, 1 thread", results["dlib"]))
        except ImportError:
            print("dlib: not installed (pip install dlib-bin), skipped")
    print()
    print("| pipeline | images/s | faces/s | faces | annotated found | NME mean / median (inter-ocular) |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        nme = "-" if r["nme_mean"] is None else f"{r['nme_mean']:.4f} / {r['nme_median']:.4f}"
        print(f"| {name} | {r['images_per_s']:.1f} | {r['faces_per_s']:.1f} | {r['faces']} | "
              f"{r['annotated_found']}/{r['annotated']} | {nme} |")
    print()
    for eng in args.engines:
        r = results[eng]
        pi, pf = r["stage_ms_per_image"], r["stage_ms_per_face"]
        print(f"{eng} stages (sequential): read {pi['read']:.1f} ms/image, face search ({r['face_detector']}) "
              f"{pi['faces']:.1f} ms/image, crop {pf['crop']:.2f} ms/face, network {pf['network']:.2f} ms/face, "
              f"fit {pf['fit']:.2f} ms/face")
    pair = [e for e in args.engines if e in ("torch", "onnxruntime")]
    if len(pair) == 2:
        fast = max(pair, key=lambda e: results[e]["faces_per_s"])
        agree = fast == E.CPU_PREFERENCE[0]
        print(f"\nfaster here: {fast} ({results[fast]['faces_per_s']:.1f} vs "
              f"{min(results[e]['faces_per_s'] for e in pair):.1f} faces/s); engine='auto' prefers "
              f"{E.CPU_PREFERENCE[0]} on CPU: {'consistent' if agree else 'NOT consistent -- update CPU_PREFERENCE'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"paths": len(paths), "results": results}, fh, indent=1)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(ROOT, "python"))
    sys.exit(main())
