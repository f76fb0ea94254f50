"""``ectfast.fit``: Algorithm 1 of ECT, top to bottom, dispatching each step to a backend.

    Estimation  peaks = argmax of each response map
    Correction  p0 = (gamma Lambda~^-1 + S^T W S)^-1 S^T W (s_peak - mean)          (Eq. 14)
                with W from the confidence of the peaks' patches                      (Eq. 15)
    Tuning      K times: weights (Eq. 15) and mean-shift vectors v (Eq. 9) on r_k x r_k patches
                around the current shape s = mean + S p, then
                p <- p + Delta p = (rho~ Lambda~^-1 + S^T W S)^-1 S^T W (s + v - mean)  (Eq. 8)

The backends ("reference": NumPy, one function per equation; "cpu": C++/Eigen, threaded;
"cuda": device kernels) implement the same small set of batched operations, so the ablation
variants of the paper run through this one code path.
"""
from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from ectfast.core.arrays import is_torch, on_cuda, to_numpy
from ectfast.core.pdm import PDM, default_pdm

METHODS = ("crm", "crm-pdm", "crm-clm", "crm-clm-c", "ect")
DEFAULT_PATCH_SIZES = (30, 30, 30, 20, 20)
#: tiny pull of the 4 similarity parameters (which have no prior) towards a defined placement,
#: so that faces with no confident landmark get the prior shape instead of a singular system.
SIMILARITY_EPS = 1e-6

# ------------------------------------------------------------------ the arguments' domains
# One table for every bounded integer argument of ``fit``. ``fit`` and ``_cuda.fit_fused``
# validate through the helpers below, so every backend accepts exactly this domain and rejects
# the rest with a ValueError that names the public argument and states the limit.

#: Tuning iterations. The paper uses 5 and the fit has converged long before 1000; more could
#: not finish in reasonable time for a batch (each iteration reads every landmark's patch).
MAX_ITERATIONS = 1000
#: Patch sizes r (pixels of the maps as fitted). The paper's are 20 and 30 on 256 maps; a patch
#: larger than the map only adds zeros (every backend reads only the part inside the map).
MAX_PATCH_SIZE = 1024
#: The FCN's bilinear upsampling factor: 1 or even, at most 16 (the cuda kernels' limit; 32x32
#: maps reach the paper's 256 frame with 8).
MAX_UPSAMPLE = 16
#: Worker threads of the cpu backend.
MAX_THREADS = 1024

INT_DOMAINS = {
    # name: (minimum, maximum, what the bound is)
    "iterations": (0, MAX_ITERATIONS, "tuning iterations; the paper uses 5"),
    "patch_sizes": (2, MAX_PATCH_SIZE, "patch size in pixels of the maps as fitted"),
    "correction_patch_size": (2, MAX_PATCH_SIZE, "patch size in pixels of the maps as fitted"),
    "upsample": (1, MAX_UPSAMPLE, "1 or an even factor; the FCN uses 4 on 64x64 maps"),
    "num_threads": (1, MAX_THREADS, "cpu worker threads"),
}

#: Lower bounds of real arguments beyond "finite" (and > 0 / >= 0). gamma = 0 leaves the
#: Correction system singular (not positive definite) for a face with no confident landmark:
#: cuda reported it, cpu returned zeros for the undetermined parameters and the reference raised
#: numpy's LinAlgError; a smaller gamma underflows to 0 against the prior's 1 / lambda.
MIN_GAMMA = 1e-6
REAL_MINIMUM = {
    "gamma": (MIN_GAMMA, "gamma = 0 leaves the Correction system not positive definite where no "
                         "landmark is confident; the paper uses 20"),
}

#: The maps' size (as fitted) the defaults of patch_sizes, correction_patch_size, rho, a and b
#: (and the PDM's prior, in pixels of faces of that size) are the paper's for.
FRAME = 256
#: fit warns (MapScaleWarning) when the fitted maps are more than this factor smaller or larger
#: than FRAME and those parameters are all at their defaults (measured on the package's
#: synthetic maps: ECT's error grows from 0.44 px at 256 to 2.0 px at 512 and 12 px at 2048
#: while the argmax stays at 0.4 px; at 128 the confidence of clean peaks falls to 0.23).
FRAME_TOLERANCE = 1.5


class MapScaleWarning(UserWarning):
    """``fit`` was given maps far from the 256-pixel frame its default parameters are for."""


@dataclass
class FitResult:
    """What :func:`fit` returns. Arrays are NumPy on CPU backends and device arrays (of the
    input's kind) on the cuda backend. Coordinates are (x, y) in pixels of the (upsampled)
    response maps."""

    landmarks: Any  #: (B, n, 2) final shape
    confidence: Any  #: (B, n) final confidence (w_x + w_y) / 2 in [0, 1]
    visible: Any  #: (B, n) bool, confidence >= visibility_threshold
    initial: Any  #: (B, n, 2) shape after Estimation + Correction (the peaks for "crm")
    peaks: Any  #: (B, n, 2) argmax of each map
    params: Any  #: (B, 4 + m) PDM parameters (None for "crm")
    method: str
    backend: str

    def __len__(self):
        return len(self.landmarks)


# ------------------------------------------------------------------ input checking


def _to_numpy(maps) -> np.ndarray:
    if is_torch(maps) or isinstance(maps, np.ndarray):
        return to_numpy(maps)
    raise TypeError(f"response_maps: expected a NumPy array or a torch tensor of shape "
                    f"(B, n, H, W), got {type(maps).__name__}")


def check_maps(maps: np.ndarray, n_landmarks: int) -> np.ndarray:
    """Validate (B, n, H, W) float maps; returns a C-contiguous float32/float64 array."""
    if maps.dtype == np.float16:
        maps = maps.astype(np.float32)
    if maps.dtype not in (np.float32, np.float64):
        raise TypeError(f"response_maps: expected float32 or float64 values, got dtype {maps.dtype}")
    if maps.ndim != 4:
        hint = " (a single face's (n, H, W) maps need a batch axis: maps[None])" if maps.ndim == 3 else ""
        raise ValueError(f"response_maps: expected 4 dimensions (B, n, H, W), got shape {maps.shape}{hint}")
    B, n, H, W = maps.shape
    if n != n_landmarks:
        raise ValueError(f"response_maps: {n} maps per face but the PDM has {n_landmarks} landmarks")
    if H < 3 or W < 3:
        raise ValueError(f"response_maps: maps must be at least 3x3, got {H}x{W}")
    return np.ascontiguousarray(maps)


def check_int(name: str, v) -> int:
    """An integer argument against its domain in :data:`INT_DOMAINS`."""
    lo, hi, what = INT_DOMAINS[name]
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ValueError(f"{name}: expected an integer in [{lo}, {hi}] ({what}), got {v!r}")
    if not lo <= v <= hi:
        raise ValueError(f"{name}: expected an integer in [{lo}, {hi}] ({what}), got {v}")
    return int(v)


def check_upsample(v) -> int:
    f = check_int("upsample", v)
    if f > 1 and f % 2:
        raise ValueError(f"upsample: expected 1 or an even integer up to {MAX_UPSAMPLE} "
                         f"(the FCN uses 4), got {f}")
    return f


def check_num_threads(v) -> Optional[int]:
    return None if v is None else check_int("num_threads", v)


def _positive_int(name, v, minimum=1):
    """An integer >= ``minimum``; arguments listed in :data:`INT_DOMAINS` get their domain."""
    if name in INT_DOMAINS:
        return check_int(name, v)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {v!r}")
    return int(v)


def _real(name, v, *, positive=False, nonneg=False):
    ok = not isinstance(v, bool) and isinstance(v, numbers.Real)
    try:
        f = float(v) if ok else float("nan")
    except (OverflowError, ValueError, TypeError):
        f = float("nan")
    if not np.isfinite(f):
        raise ValueError(f"{name}: expected a finite number, got {v!r}")
    if name in REAL_MINIMUM:
        lo, why = REAL_MINIMUM[name]
        if not f >= lo:
            raise ValueError(f"{name}: expected a finite number >= {lo:g} ({why}), got {v!r}")
        return f
    if positive and not f > 0:
        raise ValueError(f"{name}: must be > 0, got {v!r}")
    if nonneg and f < 0:
        raise ValueError(f"{name}: must be >= 0, got {v!r}")
    return f


def schedule(iterations: int, patch_sizes: Sequence[int]) -> tuple:
    """The patch size of each tuning iteration: the first ``iterations`` of ``patch_sizes``,
    the last size repeated when more iterations than sizes are asked for. ``iterations`` is at
    most :data:`MAX_ITERATIONS` and each size in [2, :data:`MAX_PATCH_SIZE`]."""
    iterations = check_int("iterations", iterations)
    try:
        count = len(patch_sizes)
    except TypeError:
        count = 0
    if isinstance(patch_sizes, (str, bytes, dict, set, frozenset)) or count == 0:
        raise ValueError(f"patch_sizes: expected a non-empty sequence of integers, got {patch_sizes!r}")
    if count > MAX_ITERATIONS:
        raise ValueError(f"patch_sizes: expected at most {MAX_ITERATIONS} sizes (one per iteration), "
                         f"got {count}")
    sizes = tuple(check_int("patch_sizes", r) for r in list(patch_sizes)[:count])
    if not sizes:
        raise ValueError(f"patch_sizes: expected a non-empty sequence of integers, got {patch_sizes!r}")
    return tuple(sizes[min(k, len(sizes) - 1)] for k in range(iterations))


def _scale_warning(H: int, W: int, factor: int, method: str, patch_sizes, r0, rho, a, b) -> None:
    """Warn when maps far from the 256 frame are fitted with the paper's (256-frame) defaults."""
    if method == "crm":
        return  # the argmax has no scale-dependent parameter
    size = max(H, W)
    if FRAME / FRAME_TOLERANCE <= size <= FRAME * FRAME_TOLERANCE:
        return
    if (tuple(patch_sizes) != DEFAULT_PATCH_SIZES or r0 != 30 or rho != 20.0 or a != 0.25 or b != 25.0):
        return  # the caller chose parameters for these maps
    up = f" (after upsample={factor})" if factor > 1 else ""
    hint = (f"upsample={FRAME // size} for the FCN's native maps, " if FRAME % size == 0 and FRAME // size % 2 == 0
            else "")
    warnings.warn(
        f"fit: response maps of {H}x{W} px{up} are far from the {FRAME}x{FRAME} frame that the default "
        f"patch_sizes, correction_patch_size, rho, a and b (and the PDM's prior, in pixels) are the paper's "
        f"for: confidence weights and the mean shift are off at this scale and ECT can end far from the "
        f"argmax. Fit maps of about {FRAME}x{FRAME} ({hint}or resample them), or pass those parameters "
        f"scaled to these maps.", MapScaleWarning, stacklevel=3)


# ------------------------------------------------------------------ Algorithm 1


def fit(response_maps, pdm: Optional[PDM] = None, *, method: str = "ect", iterations: int = 5,
        patch_sizes: Sequence[int] = DEFAULT_PATCH_SIZES, correction_patch_size: int = 30,
        a: float = 0.25, b: float = 25.0, gamma: float = 20.0, rho: float = 20.0,
        early_stop: Optional[float] = None, visibility_threshold: float = 0.5, upsample: int = 1,
        backend: str = "auto", num_threads: Optional[int] = None) -> FitResult:
    """Fit 68-point shapes to a batch of response maps by ECT (or one of its ablation variants).

    response_maps: (B, n, H, W) float32/float64 NumPy array or torch tensor (CUDA tensors and
        other DLPack producers go to the cuda backend); one map per landmark, in the scale of the
        FCN's training targets (peak ~1.06) and, as fitted, about 256x256: the defaults below are
        the paper's for that frame, and fit warns (:class:`MapScaleWarning`) when maps more than
        1.5x smaller or larger are fitted with all of patch_sizes, correction_patch_size, rho,
        a and b at their defaults.
    pdm: the point distribution model (default: the one shipped, built from 300-W).
    method: "crm" (argmax), "crm-pdm" (argmax projected on the PDM), "crm-clm" (CRM-PDM + RLMS),
        "crm-clm-c" (Correction + RLMS), "ect" (Correction + weighted RLMS).
    iterations, patch_sizes: tuning iterations (0 to 1000) and the patch size r_k of each (2 to
        1024 pixels of the maps as fitted, i.e. after upsampling); correction_patch_size: r of
        the Correction step (2 to 1024).
    a, b: the confidence sigmoid (Eq. 15). gamma: Correction's regularisation (Eq. 14), >= 1e-6.
    rho: the mean-shift kernel variance (Eq. 9). early_stop: per-face stop once |Delta s| < it
        (on the cpu and reference backends the stopped faces cost nothing more and the loop ends
        when every face has stopped).
    visibility_threshold: tau; a landmark is visible when its final confidence >= tau.
    upsample: fit maps at ``upsample`` x their size, upsampled bilinearly exactly like the FCN's
        UpsampleNet (1 = as given, or an even factor up to 16; 4 for the FCN's 64x64 maps,
        8 for the lite network's 32x32 maps).
    backend: "auto" (the fastest built one for the input's device), "reference", "cpu", "cuda".
    num_threads: cpu worker threads (None: all cores; 1 to 1024; ignored by other backends).

    Every argument has one domain for every backend (:data:`INT_DOMAINS`); a value outside it is
    a ValueError (TypeError for a wrong kind of maps or PDM) whose message begins with the
    argument's name and states the limit.
    """
    from ectfast.core import _dispatch

    if pdm is None:
        pdm = default_pdm()
    if not isinstance(pdm, PDM):
        raise TypeError(f"pdm: expected an ectfast.PDM, got {type(pdm).__name__}")
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    sizes = schedule(iterations, patch_sizes)
    r0 = check_int("correction_patch_size", correction_patch_size)
    a = _real("a", a, positive=True)
    b = _real("b", b)
    gamma = _real("gamma", gamma)
    rho = _real("rho", rho, positive=True)
    tol = None if early_stop is None else _real("early_stop", early_stop, positive=True)
    tau = _real("visibility_threshold", visibility_threshold)
    factor = check_upsample(upsample)
    num_threads = check_num_threads(num_threads)

    on_device = on_cuda(response_maps)
    ops = _dispatch.get_ops(backend, on_device=on_device, num_threads=num_threads)
    if ops.name == "cuda":
        maps = ops.prepare(response_maps, factor, pdm.n_landmarks)
    else:
        maps = ops.prepare(check_maps(_to_numpy(response_maps), pdm.n_landmarks), factor)
    B, n, H, W = ops.dims(maps)
    if B:
        _scale_warning(H, W, factor, method, patch_sizes, r0, rho, a, b)

    # Estimation: the peak of each response map.
    peaks = ops.argmax(maps)
    if method == "crm":
        landmarks, initial, p = peaks, peaks, None
    else:
        # Correction (Eq. 14): weights from the confidence of the peaks (W = I for CRM-PDM/CLM).
        corrected = method in ("crm-clm-c", "ect")
        w0 = ops.weights(maps, peaks, r0, a, b) if corrected else None
        x0 = ops.prior_params(pdm, B, H, W)
        p = ops.project(pdm, w0, peaks, gamma, x0, SIMILARITY_EPS)
        initial = ops.clamp(ops.shape(pdm, p), H, W)
        # Tuning (Eqs. 8, 9): regularised landmark mean shift, confidence-weighted for ECT.
        if method != "crm-pdm":
            p = tune(ops, pdm, maps, p, sizes, a, b, rho, weighted=method == "ect", tol=tol)
        landmarks = ops.clamp(ops.shape(pdm, p), H, W)
    # Final confidence (Eq. 15) at the result, with the last patch size; visibility = conf >= tau.
    r_final = sizes[-1] if (sizes and method not in ("crm", "crm-pdm")) else r0
    confidence = ops.confidence_of(ops.weights(maps, landmarks, r_final, a, b))
    return FitResult(landmarks=landmarks, confidence=confidence, visible=ops.visible(confidence, tau),
                     initial=initial, peaks=peaks, params=p, method=method, backend=ops.name)


#: On backends without face subsets (cuda), whether every face has converged is read back
#: (one device synchronisation) after iterations 1, 2, 4, 8 and then every 16.
_SYNC_EVERY = 16


def tune(ops, pdm: PDM, maps, p, sizes, a, b, rho, *, weighted: bool, tol: Optional[float]):
    """The Tuning step (Eqs. 8, 9): one regularised landmark mean-shift iteration per entry of
    ``sizes`` (the patch size of that iteration), from parameters ``p`` (B, 4 + m).

    Early stop (``tol``): a face whose step |Delta p| = |Delta s| (the basis is orthonormal)
    falls under ``tol`` keeps its parameters from then on. On host backends (``ops.faces``) the
    frozen faces are no longer computed at all and the loop ends when every face has stopped.
    """
    lam = pdm.noise_variance
    if tol is None:
        for r in sizes:
            w, target = ops.mean_shift(maps, ops.shape(pdm, p), r, a, b, rho, weighted)
            p = ops.project(pdm, w if weighted else None, target, lam, p, SIMILARITY_EPS)
        return p
    if not hasattr(ops, "faces"):  # device arrays: freeze on the device, read back rarely
        active = ops.all_true(int(p.shape[0]))
        for k, r in enumerate(sizes):
            w, target = ops.mean_shift(maps, ops.shape(pdm, p), r, a, b, rho, weighted)
            p_new = ops.project(pdm, w if weighted else None, target, lam, p, SIMILARITY_EPS)
            p, active = ops.freeze(p, p_new, active, tol)
            done = k + 1
            if (done & (done - 1) == 0 or done % _SYNC_EVERY == 0) and not bool(active.any()):
                break
        return p
    p = np.array(p, dtype=np.float64, copy=True)
    idx = np.arange(p.shape[0])  # the faces still moving, ascending
    for r in sizes:
        if idx.size == 0:
            break
        pa = p[idx]
        w, target = _mean_shift_faces(ops, maps, pdm, pa, idx, r, a, b, rho, weighted)
        p_new = ops.project(pdm, w if weighted else None, target, lam, pa, SIMILARITY_EPS)
        step = np.linalg.norm(p_new - pa, axis=1)
        p[idx] = p_new
        idx = idx[step >= tol]  # NaN steps stop too
    return p


def _runs(idx: np.ndarray):
    """Maximal runs [start, stop) of consecutive values of the sorted index array ``idx``."""
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [idx.size]])
    return [(int(idx[s]), int(idx[e - 1]) + 1, int(s), int(e)) for s, e in zip(starts, stops)]


def _mean_shift_faces(ops, maps, pdm, p_active, idx, r, a, b, rho, weighted):
    """ops.mean_shift on the faces ``idx`` only: one call per run of consecutive faces, on a view
    of the maps (never a copy)."""
    shape = ops.shape(pdm, p_active)
    runs = _runs(idx)
    if len(runs) == 1:
        f0, f1, _, _ = runs[0]
        return ops.mean_shift(ops.faces(maps, f0, f1), shape, r, a, b, rho, weighted)
    ws, ts = [], []
    for f0, f1, s, e in runs:
        w, t = ops.mean_shift(ops.faces(maps, f0, f1), shape[s:e], r, a, b, rho, weighted)
        ws.append(w)
        ts.append(t)
    return np.concatenate(ws), np.concatenate(ts)
