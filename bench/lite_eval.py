"""The shipped estimation network with the fit, on real faces: fit-parameter cross-validation on
held-out TRAINING faces, and the test-set report (ablation, CED, confidence, occlusion, box
jitter) on LFPW test.

  # choose a, b, rho on the 150 training faces held out of training; store them in the weights
  python bench/lite_eval.py tune --weights python/ectfast/assets/lite_300w.pt --write
  # the report on lfpw/testset (224 faces), Markdown to stdout, CED + confidence plots to --out
  python bench/lite_eval.py report --out bench/lite_report
  # ECT on the held-out faces for other patch-size schedules (the paper's first)
  python bench/lite_eval.py schedules
  # only the landmark offset (tune measures it too): mean residual on the held-out faces
  python bench/lite_eval.py offset --weights python/ectfast/assets/lite_300w.pt --write

Faces are cropped as ``ectfast eval`` does (square box from the landmarks, 256 x 256 crop, the
network's own input size inside the estimator). The occluder of the occlusion experiment is
seeded: a rectangle of 25 % of the landmarks' bounding-box area (aspect 0.5-2) centred on a
random landmark, filled with a flat random colour plus noise or with a patch of another test
face; landmarks under it count as occluded. Box jitter: the square box shifted by up to +-10 % of
its side per axis and scaled by 0.9-1.1, seeded.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import cv2
import numpy as np

import ectfast
from ectfast.nets import data as D
from ectfast.core import metrics
from ectfast.io.datasets import TRAIN_SUBSETS
from ectfast.app.crops import crops_to_input
from ectfast.nets.engine import PRECISIONS, TorchEstimator, make_estimator
from ectfast.core.peaks import subpixel_peaks
from ectfast.io.pts import read_pts

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "300w")
METHODS = ["crm", "crm-subpixel", "crm-pdm", "crm-clm", "crm-clm-c", "ect"]
LABELS = {"crm": "CRM (argmax)", "crm-subpixel": "CRM + DARK sub-pixel", "crm-pdm": "CRM-PDM",
          "crm-clm": "CRM-CLM", "crm-clm-c": "CRM-CLM-C", "ect": "ECT"}


def holdout_faces(root, n=150, seed=0):
    """The training faces that ``ectfast train`` held out (same split: ectfast.nets.train.split_holdout)."""
    faces = D.list_faces(root, TRAIN_SUBSETS)
    perm = np.random.default_rng([seed, 3]).permutation(len(faces))
    return [faces[i] for i in np.sort(perm[:n])]


def occluder(rng, lm, shape, frac=0.25):
    """(x0, y0, x1, y1) integer rectangle of ``frac`` of the landmark box's area on a random landmark."""
    lo, hi = lm.min(0), lm.max(0)
    area = frac * np.prod(hi - lo)
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
    w, h = np.sqrt(area * aspect), np.sqrt(area / aspect)
    c = lm[rng.integers(len(lm))]
    x0, y0 = int(round(c[0] - w / 2)), int(round(c[1] - h / 2))
    x0, y0 = max(0, x0), max(0, y0)
    return x0, y0, min(shape[1], x0 + int(round(w))), min(shape[0], y0 + int(round(h)))


def load(faces, *, jitter=0.0, occlude=False, seed=0):
    """Crops (B, 256, 256, 3) BGR, landmarks in crop pixels (B, 68, 2), occluded (B, 68) bool, and
    each crop's scale (B,) (crop pixels per image pixel: the crop is a scaled, shifted copy of the
    image, so an offset of d image pixels is d x scale crop pixels)."""
    rng = np.random.default_rng(seed)
    imgs, lms = [], []
    for ip, pp in faces:
        imgs.append(cv2.imread(ip, cv2.IMREAD_COLOR))
        lms.append(read_pts(pp))
    crops, gts, occ, scales = [], [], [], []
    for i, (img, lm) in enumerate(zip(imgs, lms)):
        o = np.zeros(len(lm), bool)
        if occlude:
            img = img.copy()
            x0, y0, x1, y1 = occluder(rng, lm, img.shape)
            if rng.random() < 0.5:
                col = rng.integers(0, 256, 3)
                img[y0:y1, x0:x1] = np.clip(col + rng.normal(0, 12, (y1 - y0, x1 - x0, 3)), 0, 255)
            else:
                src = imgs[(i + 1 + rng.integers(len(imgs) - 1)) % len(imgs)]
                patch = cv2.resize(src, (max(1, x1 - x0), max(1, y1 - y0)), interpolation=cv2.INTER_AREA)
                img[y0:y1, x0:x1] = patch[: y1 - y0, : x1 - x0]
            o = (lm[:, 0] >= x0 - 0.5) & (lm[:, 0] <= x1 - 0.5) & (lm[:, 1] >= y0 - 0.5) & (lm[:, 1] <= y1 - 0.5)
        box = np.array(D.box_from_landmarks(lm))
        if jitter:
            side = box[2] - box[0]
            c = (box[:2] + box[2:]) / 2 + rng.uniform(-jitter, jitter, 2) * side
            side *= rng.uniform(1 - jitter, 1 + jitter)
            box = np.concatenate([c - side / 2, c + side / 2])
        crop, A = D.crop_face(img, tuple(box), size=256)
        crops.append(crop)
        gts.append(D.transform_points(A, lm))
        occ.append(o)
        scales.append(np.sqrt(abs(np.linalg.det(np.asarray(A, np.float64)[:, :2]))))
    return np.stack(crops), np.stack(gts), np.stack(occ), np.array(scales)


def estimate(est, crops, batch=32):
    out = []
    for s in range(0, len(crops), batch):
        out.append(np.asarray(est(crops_to_input(list(crops[s:s + batch])))))
    return np.concatenate(out)


def run_methods(maps, pdm, methods=METHODS, offset=None, **opts):
    """{method: (landmarks in the 256 frame, confidence or None)}; ``offset`` (B, 2) crop pixels
    added to every method's landmarks (the network's landmark offset: see :func:`crop_offset`)."""
    f = 256 // maps.shape[-1]
    add = 0.0 if offset is None else np.asarray(offset, np.float64)[:, None, :]
    res = {}
    for m in methods:
        if m == "crm-subpixel":
            res[m] = (subpixel_peaks(maps, f) + add, None)
        else:
            r = ectfast.fit(maps, pdm, method=m, upsample=f, **opts)
            res[m] = (np.asarray(r.landmarks, np.float64) + add, np.asarray(r.confidence, np.float64))
    return res


def crop_offset(est, scales):
    """(B, 2): the estimator's landmark offset (image pixels; ectfast.nets.engine.landmark_offset)
    in the crop pixels of faces of the given scales: what ectfast.Detector adds in the image."""
    return np.asarray(scales, np.float64)[:, None] * np.asarray(est.landmark_offset, np.float64)[None, :]


def measure_offset(pred, gt, scales):
    """The mean residual (annotation - prediction) in image pixels, (dx, dy)."""
    return ((gt - pred) / np.asarray(scales, np.float64)[:, None, None]).reshape(-1, 2).mean(0)


def spearman(a, b) -> float:
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


# ------------------------------------------------------------------ tune


def heldout_sets(est, data):
    """[(maps, landmarks, scales)] of the held-out training faces, clean and occluded (box jitter
    5 %, seeded), and the covered landmarks of each set."""
    faces = holdout_faces(data)
    t = time.time()
    sets, covered = [], []
    for occ in (False, True):
        crops, gt, cov, scales = load(faces, occlude=occ, jitter=0.05, seed=11 + occ)
        sets.append((estimate(est, crops), gt, scales))
        covered.append(cov)
    print(f"{len(faces)} held-out training faces, clean + occluded, maps in {time.time() - t:.0f} s", file=sys.stderr)
    return sets, covered


#: (iterations, patch sizes, correction patch size) tried by `schedules`; the first is the paper's
SCHEDULES = [(5, (30, 30, 30, 20, 20), 30), (5, (20, 20, 20, 12, 12), 30), (5, (30, 20, 12, 8, 8), 30),
             (5, (40, 40, 30, 20, 20), 30), (8, (30, 30, 30, 20, 20, 20, 12, 12), 30), (10, (30,), 30),
             (5, (30, 30, 30, 20, 20), 20), (5, (30, 30, 30, 20, 20), 40), (5, (16, 16, 16, 16, 16), 30)]


def schedules(args) -> int:
    """ECT's NME on the held-out training faces for other patch-size schedules, with the fit
    options stored in the weights."""
    est = TorchEstimator(args.weights, "cpu")
    sets, _ = heldout_sets(est, args.data)
    pdm = ectfast.default_pdm()
    opts = est.fit_options
    print(f"fit options {opts}\n| iterations | patch sizes | correction patch | NME clean | NME occluded |\n|---|---|---|---|---|")
    for it, sizes, r0 in SCHEDULES:
        e = [metrics.nme(ectfast.fit(maps, pdm, method="ect", upsample=256 // maps.shape[-1], iterations=it,
                                     patch_sizes=sizes, correction_patch_size=r0, **opts).landmarks, gt).mean()
             for maps, gt, _ in sets]
        print(f"| {it} | {sizes} | {r0} | {100 * e[0]:.3f}% | {100 * e[1]:.3f}% |")
    return 0


def tune(args) -> int:
    est = TorchEstimator(args.weights, "cpu", flip=args.flip)
    pdm = ectfast.default_pdm()
    sets, covered = heldout_sets(est, args.data)
    base = {}
    for i, (maps, gt, _) in enumerate(sets):
        r = run_methods(maps, pdm, ["crm-subpixel", "crm-clm"])
        base[i] = {m: metrics.nme(r[m][0], gt).mean() for m in r}
    print("baselines (clean, occluded):", base, file=sys.stderr)
    grid = list(itertools.product(args.a, args.b, args.rho))
    rows = []
    for a, b, rho in grid:
        e = [metrics.nme(run_methods(maps, pdm, ["ect"], a=a, b=b, rho=rho)["ect"][0], gt).mean()
             for maps, gt, _ in sets]
        rows.append((float(np.mean(e)), e[0], e[1], a, b, rho))
    rows.sort()
    print("| a | b | rho | NME clean | NME occluded | mean |\n|---|---|---|---|---|---|")
    for m, e0, e1, a, b, rho in rows[:12]:
        print(f"| {a} | {b} | {rho} | {100 * e0:.3f}% | {100 * e1:.3f}% | {100 * m:.3f}% |")
    d = [r for r in rows if (r[3], r[4], r[5]) == (0.25, 25.0, 20.0)]
    if d:
        print(f"| paper 0.25 | 25 | 20 | {100 * d[0][1]:.3f}% | {100 * d[0][2]:.3f}% | {100 * d[0][0]:.3f}% |")
    best = rows[0]
    chosen = {"a": best[3], "b": best[4], "rho": best[5]}
    # the visibility threshold tau: best F1 of "not visible" against the covered landmarks over
    # the clean and the occluded faces, with the chosen a, b, rho
    conf = np.concatenate([np.asarray(ectfast.fit(maps, pdm, method="ect", upsample=256 // maps.shape[-1],
                                                  **chosen).confidence).ravel() for maps, _, _ in sets])
    cov = np.concatenate([c.ravel() for c in covered])
    print("| tau | precision | recall | F1 |\n|---|---|---|---|")
    f1s = []
    for tau in (0.005, 0.01, 0.02, 0.03, 0.04, *np.round(np.arange(0.05, 0.61, 0.05), 2)):
        pred = conf < tau
        tp = (pred & cov).sum()
        p, r = tp / max(1, pred.sum()), tp / max(1, cov.sum())
        f1 = 2 * p * r / max(1e-12, p + r)
        f1s.append((f1, float(tau)))
        print(f"| {tau} | {p:.3f} | {r:.3f} | {f1:.3f} |")
    chosen["visibility_threshold"] = max(f1s)[1]
    print(f"chosen on held-out training faces: {chosen}")
    off = heldout_offset(sets[0], pdm, chosen)
    if args.write:
        _write_meta(args.weights, {
            "fit": chosen,
            "fit_selection": (f"grid a x b x rho on {len(sets[0][1])} held-out training faces (clean + "
                              "seeded occluder), mean NME of ECT; visibility_threshold: best F1 of "
                              "'not visible' against covered points; bench/lite_eval.py tune"),
            **off})
    return 0


def heldout_offset(clean, pdm, opts) -> dict:
    """The landmark offset (ectfast.nets.engine.landmark_offset) measured on the clean held-out
    faces: the mean residual of ECT with ``opts`` in image pixels; prints ECT's NME without and
    with it. Returns the metadata entries to store."""
    maps, gt, scales = clean
    pred = run_methods(maps, pdm, ["ect"], **opts)["ect"][0]
    off = measure_offset(pred, gt, scales)
    shifted = pred + scales[:, None, None] * off
    print(f"landmark offset on {len(gt)} held-out training faces: dx {off[0]:+.3f}, dy {off[1]:+.3f} image px; "
          f"ECT NME {100 * metrics.nme(pred, gt).mean():.3f}% without, {100 * metrics.nme(shifted, gt).mean():.3f}% with it")
    return {"landmark_offset": [round(float(v), 3) for v in off],
            "landmark_offset_selection": (f"mean residual (annotation - ECT) in image pixels on {len(gt)} held-out "
                                          "training faces; bench/lite_eval.py tune")}


def _write_meta(path, updates: dict) -> None:
    """Store ``updates`` in the metadata of the weights file ``path`` (same tensors and sha256)."""
    import torch  # noqa: F401  (the .pt weights file needs torch)
    from ectfast.nets.model import read_weights, save_weights

    if path is None:
        raise ValueError("weights: --write needs the weights file to write (--weights FILE)")
    blob = read_weights(path)
    meta = {**blob["meta"], **updates}
    sha = save_weights(dict(blob["state_dict"]), path, meta={**meta, "arch": blob["arch"]})
    print(f"wrote {sorted(updates)} into {path} (sha256 {sha})")


def offset(args) -> int:
    """Only the landmark offset, with the fit options stored in the weights."""
    est = TorchEstimator(args.weights, "cpu")
    sets, _ = heldout_sets(est, args.data)
    off = heldout_offset(sets[0], ectfast.default_pdm(), est.fit_options)
    if args.write:
        _write_meta(args.weights, off)
    return 0


# ------------------------------------------------------------------ report


def report(args) -> int:
    est = make_estimator(args.weights, "cpu", flip=args.flip, precision=args.precision)
    opts = dict(est.fit_options)
    pdm = ectfast.default_pdm()
    faces = D.list_faces(args.data, ["lfpw/testset"])
    os.makedirs(args.out, exist_ok=True)
    print(f"fit options from the weights: {opts or 'none (paper defaults)'}; {len(faces)} faces; test-time flip "
          f"{est.flip}; {est.engine} {est.precision} ({est.path})")
    out = {}
    for name, kw in (("clean", {}), ("occluded", dict(occlude=True, seed=5)), ("jitter", dict(jitter=0.10, seed=7))):
        crops, gt, occ, scales = load(faces, **kw)
        maps = estimate(est, crops)
        shift = crop_offset(est, scales)  # the landmark offset the detector adds in the image
        res = run_methods(maps, pdm, offset=shift, **opts)
        res_paper = run_methods(maps, pdm, ["ect"], offset=shift)
        res_raw = run_methods(maps, pdm, ["ect"], **opts)
        out[name] = (gt, occ, res, res_paper, res_raw)

    gt, occ, res, res_paper, _ = out["clean"]
    print("\n### LFPW test (224 faces), landmark boxes\n")
    print("| method | NME (inter-ocular) | failure @0.08 | AUC@0.08 | NME occluded (25 % occluder) | NME box jitter (+-10 %) |")
    print("|---|---|---|---|---|---|")
    for m in METHODS:
        e = metrics.nme(res[m][0], gt)
        eo = metrics.nme(out["occluded"][2][m][0], out["occluded"][0])
        ej = metrics.nme(out["jitter"][2][m][0], out["jitter"][0])
        print(f"| {LABELS[m]} | {100 * e.mean():.2f}% | {100 * metrics.failure_rate(e, 0.08):.1f}% | "
              f"{metrics.auc(e):.3f} | {100 * eo.mean():.2f}% | {100 * ej.mean():.2f}% |")
    for name in ("clean", "occluded", "jitter"):
        g = out[name][0]
        print(f"\nECT with the paper's a, b, rho ({name}): NME {100 * metrics.nme(out[name][3]['ect'][0], g).mean():.2f}%", end="")
    print(f"\nlandmark offset (dx, dy) {est.landmark_offset.tolist()} image px; ECT without it: " + ", ".join(
        f"{name} {100 * metrics.nme(out[name][4]['ect'][0], out[name][0]).mean():.2f}%" for name in out))

    # confidence: distribution and rank correlation with the per-landmark error
    conf = res["ect"][1]
    err = np.linalg.norm(res["ect"][0] - gt, axis=-1)
    conf_o = out["occluded"][2]["ect"][1]
    occ_o = out["occluded"][1]
    print(f"\nconfidence (ECT, clean): mean {conf.mean():.3f}, quartiles {np.percentile(conf, [25, 50, 75]).round(3).tolist()}, "
          f"Spearman(confidence, error) = {spearman(conf.ravel(), err.ravel()):.3f}")
    print(f"confidence (ECT, occluded): covered points mean {conf_o[occ_o].mean():.3f}, uncovered {conf_o[~occ_o].mean():.3f}")
    tau = opts.get("visibility_threshold", 0.5)
    maps_o = estimate(est, load(faces, occlude=True, seed=5)[0])
    vis = np.asarray(ectfast.fit(maps_o, pdm, method="ect", upsample=256 // maps_o.shape[-1], **opts).visible)
    pred_occ = ~vis
    tp = (pred_occ & occ_o).sum()
    prec = tp / max(1, pred_occ.sum())
    rec = tp / max(1, occ_o.sum())
    print(f"occlusion prediction (not visible at tau {tau}) vs covered landmarks: precision {prec:.3f}, recall {rec:.3f} "
          f"({occ_o.sum()} covered of {occ_o.size})")
    pr = metrics.visibility_pr(conf_o, occ_o, thresholds=(0.3, 0.5, 0.7, 0.9))
    print("precision/recall over tau:", {k: np.round(v, 3).tolist() for k, v in pr.items()})

    if args.no_plots:
        return 0
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for m in METHODS:
        e = metrics.nme(res[m][0], gt)
        x, y = metrics.ced(e, 0.10)
        ax.plot(x, y, label=f"{LABELS[m]} ({100 * e.mean():.2f}%)")
    ax.set_xlabel("NME (inter-ocular)")
    ax.set_ylabel("fraction of faces")
    ax.set_title("LFPW test, lite network + fit")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "ced_lfpw.png"), dpi=110)
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].hist(conf.ravel(), bins=40)
    ax[0].set_title("ECT confidence, clean faces")
    ax[1].hist([conf_o[~occ_o], conf_o[occ_o]], bins=40, density=True, label=["uncovered", "covered"])
    ax[1].set_title("occluded faces")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "confidence.png"), dpi=110)
    print(f"\nplots: {args.out}/ced_lfpw.png, {args.out}/confidence.png")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tune")
    t.add_argument("--weights", default=None)
    t.add_argument("--flip", action="store_true", help="test-time flip (the product's default is off)")
    t.add_argument("--data", default=ROOT)
    t.add_argument("--a", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.5, 1.0])
    t.add_argument("--b", type=float, nargs="+", default=[5, 10, 15, 20, 25, 30, 40])
    t.add_argument("--rho", type=float, nargs="+", default=[10.0, 20.0, 40.0])
    t.add_argument("--write", action="store_true", help="store the chosen values in the weights file's meta['fit']")
    r = sub.add_parser("report")
    r.add_argument("--weights", default=None)
    r.add_argument("--flip", action="store_true", help="test-time flip (the product's default is off)")
    r.add_argument("--data", default=ROOT)
    r.add_argument("--out", default="bench/lite_report")
    r.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="fp32, or int8 (the int8 ONNX file beside the weights / shipped)")
    r.add_argument("--no-plots", action="store_true", help="tables only")
    c = sub.add_parser("schedules", help="ECT on the held-out faces for other patch-size schedules")
    c.add_argument("--weights", default=None)
    c.add_argument("--data", default=ROOT)
    o = sub.add_parser("offset", help="measure (and --write) only the landmark offset on the held-out faces")
    o.add_argument("--weights", default=None)
    o.add_argument("--data", default=ROOT)
    o.add_argument("--write", action="store_true", help="store it in the weights file's meta['landmark_offset']")
    a = p.parse_args(argv)
    return {"tune": tune, "report": report, "schedules": schedules, "offset": offset}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
