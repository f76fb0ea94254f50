"""``ectfast eval``: accuracy of ECT and its ablation variants on a 300-W-layout folder.

Every ``NAME.<image>`` + ``NAME.pts`` pair under the folder (any depth) is one face:

1. face box: by default from the ground-truth landmarks, ``ectfast.nets.data.box_from_landmarks``
   (the paper's protocol: faces cropped around their annotation, so the numbers measure the
   landmark detector, not the face detector); with ``boxes="detector"`` from the face
   detector (``ectfast.faces``: BlazeFace, Haar fallback) mapped to the crop convention by
   ``faces.crop_box`` (the detection that overlaps the annotation best; a face the detector
   misses falls back to the landmark box and is counted in ``detector_missed``);
2. the face is cropped to 256 x 256, the estimator (the FCN) runs **once** per face, and
   ``ectfast.fit`` runs every requested method on the same response maps;
3. landmarks are mapped back to image pixels and compared with the .pts (ectfast.core.metrics):
   NME (inter-pupil, inter-ocular, box), failure rate at 0.08 / 0.10, AUC of the CED up to 0.08,
   MAPE in pixels; with occlusion labels, precision / recall of occlusion prediction.

Outputs (``out``): ``results.md`` (Markdown table), ``results.csv`` (one row per method),
``per_face.csv`` (every face's NME per method), ``ced.png`` (CED curve of every method) and,
with occlusion labels, ``visibility.csv`` (precision / recall over thresholds).

Occlusion labels (``occlusion_labels=True``): a text file ``NAME.occ`` beside ``NAME.pts`` with
one 0/1 value per landmark (1 = occluded), whitespace separated.

Bad data (an unreadable image, a .pts that cannot be parsed or has the wrong number of points,
a degenerate annotation) gives a :class:`DataWarning` naming the file, and the face is skipped.
"""
from __future__ import annotations

import csv
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from ectfast.core import metrics
from ectfast.core.fit import METHODS
from ectfast.app.crops import crop_faces
from ectfast.io.images import load_image
from ectfast.nets import engine as E
from ectfast.nets.data import box_from_landmarks

#: the methods (in ectfast.fit.METHODS order in tables and plots) as the paper names them
DISPLAY = {"crm": "CRM", "crm-pdm": "CRM-PDM", "crm-clm": "CRM-CLM", "crm-clm-c": "CRM-CLM-C", "ect": "ECT"}
VISIBILITY_SWEEP = tuple(np.round(np.arange(0.05, 1.0, 0.05), 2))


class DataWarning(UserWarning):
    """A face of the evaluation folder could not be used (the message names the file)."""


@dataclass
class EvalResult:
    summary: Dict[str, dict]  #: method -> metrics.summarize(...) (plus "visibility" with labels)
    faces: List[str]  #: image paths evaluated, in order
    gt: np.ndarray  #: (F, n, 2) ground truth, image pixels
    landmarks: Dict[str, np.ndarray]  #: method -> (F, n, 2) predictions, image pixels
    confidence: Dict[str, np.ndarray]  #: method -> (F, n)
    skipped: List[Tuple[str, str]] = field(default_factory=list)  #: (file, reason)
    detector_missed: int = 0
    boxes: str = "landmarks"
    norm: str = "inter-ocular"
    table: str = ""
    files: Dict[str, str] = field(default_factory=dict)
    plot_labels: List[str] = field(default_factory=list)  #: the CED plot's curves (with out=)


def parse_methods(methods) -> List[str]:
    if methods is None or methods == "all":
        return list(METHODS)
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    out = []
    for m in methods:
        m = str(m).lower()
        if m == "all":
            return list(METHODS)
        if m not in METHODS:
            raise ValueError(f"methods: expected 'all' or some of {METHODS}, got {m!r}")
        if m not in out:
            out.append(m)
    if not out:
        raise ValueError("methods: no method given")
    return sorted(out, key=METHODS.index)


def read_occlusion(path: str, n: int) -> np.ndarray:
    with open(path, "r", encoding="utf-8") as f:
        tokens = f.read().split()
    if len(tokens) != n or any(t not in ("0", "1") for t in tokens):
        raise ValueError(f"{path}: expected {n} values 0/1 (1 = occluded), got {len(tokens)} tokens")
    return np.array([t == "1" for t in tokens])


def _warn(skipped, path, reason):
    skipped.append((path, reason))
    warnings.warn(f"{path}: {reason} -- skipped", DataWarning, stacklevel=3)


def _pick_detection(candidates: np.ndarray, gt: np.ndarray, gt_box: np.ndarray) -> Optional[np.ndarray]:
    """The detected crop box that matches the annotated face: centre inside the landmark box,
    then the largest IoU with the landmark-derived box."""
    lo, hi = gt.min(0), gt.max(0)
    best, best_iou = None, 0.0
    for b in candidates:
        c = (b[:2] + b[2:]) / 2
        if not ((lo <= c) & (c <= hi)).all():
            continue
        ix = max(0.0, min(b[2], gt_box[2]) - max(b[0], gt_box[0]))
        iy = max(0.0, min(b[3], gt_box[3]) - max(b[1], gt_box[1]))
        inter = ix * iy
        union = (b[2] - b[0]) * (b[3] - b[1]) + (gt_box[2] - gt_box[0]) * (gt_box[3] - gt_box[1]) - inter
        iou = inter / union if union > 0 else 0.0
        if iou > best_iou:
            best, best_iou = b, iou
    return best


def evaluate(data, *, methods="all", boxes: str = "landmarks", estimator: Optional[Callable] = None,
             weights=None, device: str = "auto", backend: str = "auto", batch_size: int = 8,
             engine: str = "auto", flip: bool = E.DEFAULT_FLIP, precision: str = E.DEFAULT_PRECISION,
             out=None, occlusion_labels: bool = False, norm: str = "inter-ocular", pdm=None,
             visibility_threshold: float = 0.5, progress: bool = True,
             fit_options: Optional[dict] = None) -> EvalResult:
    """Evaluate on every face under the 300-W-layout folder ``data`` (see the module docstring).

    methods: "all" or a list of ectfast.fit methods. boxes: "landmarks" or "detector".
    estimator: a callable crops (B, 3, 256, 256) float32 RGB [0, 1] -> maps (B, 68, h, h); None
    loads the network (``weights``, or the shipped one: FileNotFoundError when there is none) on
    ``device`` with ``engine`` ('auto', 'onnxruntime', 'torch'; ectfast.nets.engine) at ``precision``
    ('fp32' or 'int8'). backend:
    ectfast.fit's backend. out: folder for the tables and the CED plot (None: write nothing). norm: the NME that the failure rate, AUC and CED use.
    """
    from ectfast.app import detector as D
    from ectfast.io.datasets import find_faces
    from ectfast.core.pdm import default_pdm
    from ectfast.io.pts import read_pts

    methods = parse_methods(methods)
    if boxes not in ("landmarks", "detector"):
        raise ValueError(f"boxes: expected 'landmarks' or 'detector', got {boxes!r}")
    norm = metrics.canonical_norm(norm)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    pairs = find_faces(data)
    if not pairs:
        raise ValueError(f"data: no NAME.<image> + NAME.pts pairs found under {os.fspath(data)!r}")
    if boxes == "detector":
        from ectfast import faces as face_layer

        face_detector = face_layer.default_detector()
    if estimator is None:
        estimator = E.make_estimator(weights, device, engine, flip=flip, precision=precision)
    elif not callable(estimator):
        raise TypeError(f"estimator: expected a callable, got {type(estimator).__name__}")
    pdm = pdm if pdm is not None else default_pdm()
    n = pdm.n_landmarks
    opts = dict(fit_options or {})
    opts["visibility_threshold"] = float(visibility_threshold)

    skipped: List[Tuple[str, str]] = []
    faces, gts, occ = [], [], []
    preds = {m: [] for m in methods}
    confs = {m: [] for m in methods}
    missed = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pairs), desc="eval", unit="face")
    try:
        for s in range(0, len(pairs), batch_size):
            chunk_imgs, chunk_boxes, chunk_gt, chunk_paths, chunk_occ = [], [], [], [], []
            for image_path, pts_path in pairs[s:s + batch_size]:
                try:
                    gt = read_pts(pts_path)
                except (ValueError, OSError) as e:
                    _warn(skipped, pts_path, f"unreadable .pts ({e})")
                    continue
                if gt.shape != (n, 2):
                    _warn(skipped, pts_path, f"{len(gt)} points, expected {n}")
                    continue
                if not (np.ptp(gt, 0) > 0).all():
                    _warn(skipped, pts_path, "degenerate annotation (zero-size landmark box)")
                    continue
                try:
                    img = load_image(image_path)
                except (ValueError, OSError) as e:
                    _warn(skipped, image_path, f"cannot read the image ({e})")
                    continue
                o = None
                if occlusion_labels:
                    occ_path = os.path.splitext(pts_path)[0] + ".occ"
                    try:
                        o = read_occlusion(occ_path, n)
                    except (ValueError, OSError) as e:
                        warnings.warn(f"{occ_path}: no usable occlusion labels ({e}); the face counts for "
                                      "the NME but not for visibility", DataWarning, stacklevel=2)
                gt_box = np.asarray(box_from_landmarks(gt), dtype=np.float64)
                box = gt_box
                if boxes == "detector":
                    cand = np.array([face_layer.crop_box(f) for f in face_layer.detect_faces(img, face_detector)])
                    cand = cand.reshape(-1, 4)
                    picked = _pick_detection(cand, gt, gt_box)
                    if picked is None:
                        missed += 1
                    else:
                        box = picked
                chunk_imgs.append(img)
                chunk_boxes.append(box)
                chunk_gt.append(gt)
                chunk_paths.append(image_path)
                chunk_occ.append(o)
            if chunk_imgs:
                crops, Ms = crop_faces(chunk_imgs, range(len(chunk_imgs)), np.array(chunk_boxes))
                res = D.run_pipeline(estimator, crops, Ms, methods, pdm=pdm, backend=backend,
                                     batch_size=batch_size, fit_options=opts)
                for m in methods:
                    preds[m].append(res[m]["landmarks"])
                    confs[m].append(res[m]["confidence"])
                faces.extend(chunk_paths)
                gts.extend(chunk_gt)
                occ.extend(chunk_occ)
            if bar is not None:
                bar.update(len(pairs[s:s + batch_size]))
    finally:
        if bar is not None:
            bar.close()
    if not faces:
        raise ValueError(f"data: none of the {len(pairs)} faces under {os.fspath(data)!r} could be evaluated")

    gt_arr = np.array(gts)
    landmarks = {m: np.concatenate(preds[m]) for m in methods}
    confidence = {m: np.concatenate(confs[m]) for m in methods}
    labelled = np.array([o is not None for o in occ])
    summary = {}
    for m in methods:
        kw = {}
        if occlusion_labels and labelled.any():
            kw = dict(confidence=confidence[m][labelled], occluded=np.array([o for o in occ if o is not None]),
                      visibility_thresholds=tuple(sorted(set(VISIBILITY_SWEEP) | {float(visibility_threshold)})))
        summary[m] = metrics.summarize(landmarks[m], gt_arr, norm=norm, **kw)
        summary[m]["visibility_threshold"] = float(visibility_threshold)
    result = EvalResult(summary=summary, faces=faces, gt=gt_arr, landmarks=landmarks, confidence=confidence,
                        skipped=skipped, detector_missed=missed, boxes=boxes, norm=norm)
    result.table = markdown_table(result)
    if out is not None:
        result.files = write_outputs(result, out)
    return result


# ------------------------------------------------------------------ reports


def _vis_at(summary: dict, tau: float):
    v = summary.get("visibility")
    if v is None:
        return None
    k = int(np.argmin(np.abs(v["thresholds"] - tau)))
    return float(v["precision"][k]), float(v["recall"][k])


def rows(result: EvalResult) -> List[dict]:
    out = []
    for m, s in result.summary.items():
        r = {"method": DISPLAY[m], "faces": s["faces"],
             "nme_inter_pupil_pct": 100 * s["nme_inter-pupil"], "nme_inter_ocular_pct": 100 * s["nme_inter-ocular"],
             "nme_box_pct": 100 * s["nme_box"], "fr_0.08_pct": 100 * s["fr@0.08"], "fr_0.10_pct": 100 * s["fr@0.1"],
             "auc_0.08": s["auc@0.08"], "mape_px": s["mape_px"]}
        pr = _vis_at(s, s["visibility_threshold"])
        if pr is not None:
            r["occlusion_precision"], r["occlusion_recall"] = pr
        out.append(r)
    return out


def markdown_table(result: EvalResult) -> str:
    rs = rows(result)
    vis = "occlusion_precision" in rs[0]
    head = ["method", "faces", "NME pupil %", "NME ocular %", "NME box %", "FR@0.08 %", "FR@0.10 %",
            "AUC@0.08", "MAPE px"] + (["occl. precision", "occl. recall"] if vis else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rs:
        cells = [r["method"], str(r["faces"]), f"{r['nme_inter_pupil_pct']:.2f}", f"{r['nme_inter_ocular_pct']:.2f}",
                 f"{r['nme_box_pct']:.2f}", f"{r['fr_0.08_pct']:.2f}", f"{r['fr_0.10_pct']:.2f}",
                 f"{r['auc_0.08']:.4f}", f"{r['mape_px']:.2f}"]
        if vis:
            cells += [f"{r['occlusion_precision']:.3f}", f"{r['occlusion_recall']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"\nFailure rate, AUC and CED use the {result.norm} NME. Face boxes: "
            + ("from the ground-truth landmarks (box_from_landmarks)." if result.boxes == "landmarks"
               else f"face detector ({result.detector_missed} missed faces fell back to the landmark box)."))
    if result.skipped:
        note += f" {len(result.skipped)} file(s) skipped (bad data)."
    return "\n".join(lines) + "\n" + note + "\n"


def plot_ced(result: EvalResult, path: str, max_error: float = 0.10) -> List[str]:
    """Write the CED plot (one curve per method) to ``path``; returns the curves' legend labels."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    try:
        for m, s in result.summary.items():
            t, f = metrics.ced(s["per_face"][f"nme_{result.norm}"], max_error, 401)
            ax.plot(t, f, label=f"{DISPLAY[m]} (AUC@0.08 {s['auc@0.08']:.3f})")
        ax.axvline(metrics.AUC_MAX_ERROR, color="grey", lw=0.8, ls="--")
        ax.set_xlim(0, max_error)
        ax.set_ylim(0, 1)
        ax.set_xlabel(f"NME ({result.norm})")
        ax.set_ylabel("fraction of faces")
        ax.set_title(f"CED, {len(result.faces)} faces")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
        return [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]
    finally:
        plt.close(fig)


def write_outputs(result: EvalResult, out) -> Dict[str, str]:
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    files = {"table": os.path.join(out, "results.md"), "csv": os.path.join(out, "results.csv"),
             "per_face": os.path.join(out, "per_face.csv"), "plot": os.path.join(out, "ced.png")}
    with open(files["table"], "w", encoding="utf-8") as f:
        f.write(result.table)
    rs = rows(result)
    with open(files["csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rs[0].keys()))
        w.writeheader()
        w.writerows(rs)
    with open(files["per_face"], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "method", "nme_inter_pupil", "nme_inter_ocular", "nme_box", "mape_px"])
        for m, s in result.summary.items():
            pf = s["per_face"]
            for k, path in enumerate(result.faces):
                w.writerow([path, DISPLAY[m], f"{pf['nme_inter-pupil'][k]:.6f}", f"{pf['nme_inter-ocular'][k]:.6f}",
                            f"{pf['nme_box'][k]:.6f}", f"{pf['mape_px'][k]:.4f}"])
    if any("visibility" in s for s in result.summary.values()):
        files["visibility"] = os.path.join(out, "visibility.csv")
        with open(files["visibility"], "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["method", "threshold", "precision", "recall", "tp", "fp", "fn"])
            for m, s in result.summary.items():
                v = s["visibility"]
                for k, t in enumerate(v["thresholds"]):
                    w.writerow([DISPLAY[m], f"{t:.2f}", f"{v['precision'][k]:.4f}", f"{v['recall'][k]:.4f}",
                                int(v["tp"][k]), int(v["fp"][k]), int(v["fn"][k])])
    result.plot_labels = plot_ced(result, files["plot"])
    return files
