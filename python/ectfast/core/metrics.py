"""Landmark accuracy metrics of the paper's evaluation (DESIGN.md, "Evaluation"). Pure NumPy.

All functions take shapes as (B, n, 2) arrays of (x, y) (a single (n, 2) shape is treated as a
batch of one) and return per-face values or summaries:

* :func:`point_errors`  Euclidean error of every landmark, pixels, (B, n).
* :func:`normalizer`    the per-face distance d of a protocol:
    - ``"inter-pupil"``: distance between the pupils, pupil = mean of the six eye points
      36-41 (right eye in the image's left) and 42-47 (0-based iBUG 68-point order);
    - ``"inter-ocular"``: distance between the outer eye corners 36 and 45;
    - ``"box"``: sqrt(w * h) of the ground truth's landmark bounding box.
* :func:`nme`           mean over landmarks of |x - x*| / d, per face, (B,).
* :func:`mape`          mean point error in pixels, per face, (B,).
* :func:`failure_rate`  fraction of faces with NME > threshold (0.08 and 0.10 in the paper).
* :func:`ced`           cumulative error distribution: fraction of faces with NME <= t.
* :func:`auc`           area under the CED curve on [0, max_error], divided by max_error
  (so it is in [0, 1]); computed exactly: mean over faces of max(0, 1 - e / max_error).
* :func:`visibility_pr` precision / recall of occlusion prediction (a landmark is predicted
  occluded when its confidence < tau) for one or many thresholds tau.
* :func:`summarize`     all of the above for one method, as a dict.
"""
from __future__ import annotations

import numbers
from typing import Dict, Optional, Sequence

import numpy as np

NORMALIZATIONS = ("inter-pupil", "inter-ocular", "box")
_ALIASES = {"pupil": "inter-pupil", "interpupil": "inter-pupil", "ipn": "inter-pupil",
            "ocular": "inter-ocular", "interocular": "inter-ocular", "ion": "inter-ocular",
            "bbox": "box"}
RIGHT_EYE = tuple(range(36, 42))  #: 0-based, iBUG 68-point order
LEFT_EYE = tuple(range(42, 48))
OUTER_CORNERS = (36, 45)
FAILURE_THRESHOLDS = (0.08, 0.10)
AUC_MAX_ERROR = 0.08


# ------------------------------------------------------------------ validation


def _as_shapes(name: str, x) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a numeric array of shape (B, n, 2) or (n, 2), "
                        f"got {type(x).__name__}") from None
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[-1] != 2 or a.shape[1] == 0:
        raise ValueError(f"{name}: expected shape (B, n, 2) or (n, 2) with n > 0, got {np.shape(x)}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: contains NaN or infinite coordinates")
    return a


def _pair(pred, gt):
    p = _as_shapes("pred", pred)
    g = _as_shapes("gt", gt)
    if p.shape != g.shape:
        raise ValueError(f"pred and gt: shapes differ, {p.shape} vs {g.shape}")
    return p, g


def _errors_1d(name: str, e) -> np.ndarray:
    a = np.asarray(e, dtype=np.float64)
    if a.ndim == 0:
        a = a[None]
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of per-face errors, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name}: no faces (empty array)")
    if not np.isfinite(a).all() or (a < 0).any():
        raise ValueError(f"{name}: errors must be finite and >= 0")
    return a


def _threshold(name: str, t) -> float:
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or not np.isfinite(t) or t <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {t!r}")
    return float(t)


def canonical_norm(norm: str) -> str:
    """The canonical name of a normalisation ("inter-pupil", "inter-ocular", "box")."""
    if not isinstance(norm, str):
        raise TypeError(f"norm: expected one of {NORMALIZATIONS}, got {norm!r}")
    key = norm.strip().lower().replace("_", "-")
    key = _ALIASES.get(key.replace("-", ""), _ALIASES.get(key, key))
    if key not in NORMALIZATIONS:
        raise ValueError(f"norm: expected one of {NORMALIZATIONS}, got {norm!r}")
    return key


# ------------------------------------------------------------------ per-face values


def point_errors(pred, gt) -> np.ndarray:
    """(B, n) Euclidean distance of every predicted landmark to its ground truth, pixels."""
    p, g = _pair(pred, gt)
    return np.linalg.norm(p - g, axis=-1)


def normalizer(gt, norm: str = "inter-ocular") -> np.ndarray:
    """(B,) the normalising distance d of each ground-truth face under ``norm``.

    Raises ValueError when a face's d is 0 (degenerate annotation) or, for the eye-based
    protocols, when the shapes have fewer than 48 points (not the 68-point markup)."""
    g = _as_shapes("gt", gt)
    norm = canonical_norm(norm)
    if norm == "box":
        wh = g.max(1) - g.min(1)
        d = np.sqrt(wh[:, 0] * wh[:, 1])
    else:
        if g.shape[1] < 48:
            raise ValueError(f"gt: the {norm} normalisation needs the 68-point iBUG markup, "
                             f"got {g.shape[1]} points")
        if norm == "inter-pupil":
            d = np.linalg.norm(g[:, RIGHT_EYE].mean(1) - g[:, LEFT_EYE].mean(1), axis=-1)
        else:
            d = np.linalg.norm(g[:, OUTER_CORNERS[0]] - g[:, OUTER_CORNERS[1]], axis=-1)
    bad = np.flatnonzero(~(d > 0))
    if bad.size:
        raise ValueError(f"gt: the {norm} distance is 0 for face(s) {bad[:10].tolist()} "
                         "(degenerate annotation)")
    return d


def nme(pred, gt, norm: str = "inter-ocular") -> np.ndarray:
    """(B,) normalised mean error of each face: mean_i |pred_i - gt_i| / d (see :func:`normalizer`)."""
    p, g = _pair(pred, gt)
    return np.linalg.norm(p - g, axis=-1).mean(1) / normalizer(g, norm)


def mape(pred, gt) -> np.ndarray:
    """(B,) mean absolute point error of each face in pixels (mean Euclidean landmark error)."""
    return point_errors(pred, gt).mean(1)


# ------------------------------------------------------------------ summaries of per-face errors


def failure_rate(errors, threshold: float = 0.08) -> float:
    """Fraction of faces whose error is strictly greater than ``threshold``."""
    e = _errors_1d("errors", errors)
    return float((e > _threshold("threshold", threshold)).mean())


def ced(errors, max_error: float = AUC_MAX_ERROR, num: int = 161):
    """The cumulative error distribution on ``num`` evenly spaced thresholds in [0, max_error]:
    returns (thresholds, fraction of faces with error <= threshold)."""
    e = np.sort(_errors_1d("errors", errors))
    t = np.linspace(0.0, _threshold("max_error", max_error), _count("num", num, 2))
    return t, np.searchsorted(e, t, side="right") / e.size


def auc(errors, max_error: float = AUC_MAX_ERROR) -> float:
    """Area under the CED curve on [0, max_error] divided by max_error, in [0, 1].

    Exact (no grid): the integral of the CED from 0 to T equals the mean over faces of
    max(0, T - e), so AUC = mean(max(0, 1 - e / T))."""
    e = _errors_1d("errors", errors)
    T = _threshold("max_error", max_error)
    return float(np.clip(1.0 - e / T, 0.0, 1.0).mean())


def _count(name, v, minimum):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {v!r}")
    return int(v)


# ------------------------------------------------------------------ visibility


def visibility_pr(confidence, occluded, thresholds=(0.5,)) -> Dict[str, np.ndarray]:
    """Precision and recall of occlusion prediction over landmarks.

    confidence: (B, n) or (N,) landmark confidences; occluded: same shape, bool ground truth
    (True = occluded). A landmark is predicted occluded when confidence < tau. For each tau in
    ``thresholds`` returns counts tp, fp, fn and precision = tp / (tp + fp), recall = tp /
    (tp + fn). Conventions for empty denominators (no NaN): precision = 1 when nothing is
    predicted occluded (no false alarm), recall = 1 when nothing is occluded."""
    c = np.asarray(confidence, dtype=np.float64)
    try:
        occ = np.asarray(occluded)
    except (TypeError, ValueError):
        raise TypeError("occluded: expected a boolean array") from None
    if occ.dtype != bool:
        if occ.dtype.kind not in "iuf" or not np.isin(occ, (0, 1)).all():
            raise ValueError("occluded: expected booleans (or 0/1 values)")
        occ = occ.astype(bool)
    if c.shape != occ.shape or c.size == 0:
        raise ValueError(f"confidence and occluded: expected equal non-empty shapes, "
                         f"got {c.shape} and {occ.shape}")
    if not np.isfinite(c).all():
        raise ValueError("confidence: contains NaN or infinite values")
    t = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    if t.ndim != 1 or t.size == 0 or not np.isfinite(t).all():
        raise ValueError(f"thresholds: expected a non-empty 1-D sequence of finite numbers, got {thresholds!r}")
    c, occ = c.ravel(), occ.ravel()
    pred = c[None, :] < t[:, None]  # (T, N) predicted occluded
    tp = (pred & occ).sum(1)
    fp = (pred & ~occ).sum(1)
    fn = (~pred & occ).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 1.0)
        recall = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 1.0)
    return {"thresholds": t, "precision": precision, "recall": recall, "tp": tp, "fp": fp, "fn": fn}


# ------------------------------------------------------------------ everything for one method


def summarize(pred, gt, *, norm: str = "inter-ocular", failure_thresholds: Sequence[float] = FAILURE_THRESHOLDS,
              auc_max_error: float = AUC_MAX_ERROR, confidence=None, occluded=None,
              visibility_thresholds=(0.5,)) -> Dict[str, object]:
    """Every metric for one method on B faces. ``norm`` picks the NME that the failure rate and
    AUC use; the NME of all three protocols is always reported. Returns a dict with keys
    ``faces``, ``nme_inter-pupil``, ``nme_inter-ocular``, ``nme_box`` (means), ``fr@T`` per
    threshold, ``auc@T``, ``mape_px``, ``per_face`` (dict of (B,) arrays) and, when
    ``confidence`` and ``occluded`` are given, ``visibility`` (see :func:`visibility_pr`)."""
    p, g = _pair(pred, gt)
    norm = canonical_norm(norm)
    per_face = {f"nme_{k}": nme(p, g, k) for k in NORMALIZATIONS}
    per_face["mape_px"] = mape(p, g)
    e = per_face[f"nme_{norm}"]
    out: Dict[str, object] = {"faces": int(len(p)), "norm": norm}
    for k in NORMALIZATIONS:
        out[f"nme_{k}"] = float(per_face[f"nme_{k}"].mean())
    for t in failure_thresholds:
        out[f"fr@{t:g}"] = failure_rate(e, t)
    out[f"auc@{auc_max_error:g}"] = auc(e, auc_max_error)
    out["mape_px"] = float(per_face["mape_px"].mean())
    if (confidence is None) != (occluded is None):
        raise ValueError("confidence and occluded: pass both (visibility metrics) or neither")
    if confidence is not None:
        out["visibility"] = visibility_pr(confidence, occluded, visibility_thresholds)
    out["per_face"] = per_face
    return out
