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
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from .pdm import PDM, default_pdm

METHODS = ("crm", "crm-pdm", "crm-clm", "crm-clm-c", "ect")
DEFAULT_PATCH_SIZES = (30, 30, 30, 20, 20)
#: tiny pull of the 4 similarity parameters (which have no prior) towards a defined placement,
#: so that faces with no confident landmark get the prior shape instead of a singular system.
SIMILARITY_EPS = 1e-6


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


def _is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _on_cuda(x) -> bool:
    if _is_torch(x):
        return x.device.type == "cuda"
    if hasattr(x, "__cuda_array_interface__"):
        return True
    dl = getattr(x, "__dlpack_device__", None)
    if dl is not None and not isinstance(x, np.ndarray):
        try:
            return int(dl()[0]) in (2, 3, 13)  # kDLCUDA, kDLCUDAHost, kDLCUDAManaged
        except Exception:
            return False
    return False


def _to_numpy(maps) -> np.ndarray:
    if _is_torch(maps):
        t = maps.detach()
        if t.dtype.is_floating_point and t.element_size() < 4:
            t = t.float()  # float16 / bfloat16 -> float32 (NumPy has no bfloat16)
        return t.numpy()
    if isinstance(maps, np.ndarray):
        return maps
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


def _positive_int(name, v, minimum=1):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {v!r}")
    return int(v)


def _real(name, v, *, positive=False, nonneg=False):
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not np.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, got {v!r}")
    if positive and not v > 0:
        raise ValueError(f"{name}: must be > 0, got {v!r}")
    if nonneg and v < 0:
        raise ValueError(f"{name}: must be >= 0, got {v!r}")
    return float(v)


def schedule(iterations: int, patch_sizes: Sequence[int]) -> tuple:
    """The patch size of each tuning iteration: the first ``iterations`` of ``patch_sizes``,
    the last size repeated when more iterations than sizes are asked for."""
    iterations = _positive_int("iterations", iterations, minimum=0)
    if isinstance(patch_sizes, (str, bytes)) or not hasattr(patch_sizes, "__len__") or len(patch_sizes) == 0:
        raise ValueError(f"patch_sizes: expected a non-empty sequence of integers, got {patch_sizes!r}")
    sizes = tuple(_positive_int("patch_sizes", r, minimum=2) for r in patch_sizes)
    return tuple(sizes[min(k, len(sizes) - 1)] for k in range(iterations))


# ------------------------------------------------------------------ Algorithm 1


def fit(response_maps, pdm: Optional[PDM] = None, *, method: str = "ect", iterations: int = 5,
        patch_sizes: Sequence[int] = DEFAULT_PATCH_SIZES, correction_patch_size: int = 30,
        a: float = 0.25, b: float = 25.0, gamma: float = 20.0, rho: float = 20.0,
        early_stop: Optional[float] = None, visibility_threshold: float = 0.5, upsample: int = 1,
        backend: str = "auto", num_threads: Optional[int] = None) -> FitResult:
    """Fit 68-point shapes to a batch of response maps by ECT (or one of its ablation variants).

    response_maps: (B, n, H, W) float32/float64 NumPy array or torch tensor (CUDA tensors and
        other DLPack producers go to the cuda backend); one map per landmark, in the scale of the
        FCN's training targets (peak ~1.06).
    pdm: the point distribution model (default: the one shipped, built from 300-W).
    method: "crm" (argmax), "crm-pdm" (argmax projected on the PDM), "crm-clm" (CRM-PDM + RLMS),
        "crm-clm-c" (Correction + RLMS), "ect" (Correction + weighted RLMS).
    iterations, patch_sizes: tuning iterations and the patch size r_k of each (pixels of the
        maps as fitted, i.e. after upsampling); correction_patch_size: r of the Correction step.
    a, b: the confidence sigmoid (Eq. 15). gamma: Correction's regularisation (Eq. 14).
    rho: the mean-shift kernel variance (Eq. 9). early_stop: per-face stop once |Delta s| < it.
    visibility_threshold: tau; a landmark is visible when its final confidence >= tau.
    upsample: fit maps at ``upsample`` x their size, upsampled bilinearly exactly like the FCN's
        UpsampleNet (1 = as given; use 4 with the FCN's native 64x64 maps).
    backend: "auto" (the fastest built one for the input's device), "reference", "cpu", "cuda".
    """
    from . import _dispatch

    if pdm is None:
        pdm = default_pdm()
    if not isinstance(pdm, PDM):
        raise TypeError(f"pdm: expected an ectfast.PDM, got {type(pdm).__name__}")
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    sizes = schedule(iterations, patch_sizes)
    r0 = _positive_int("correction_patch_size", correction_patch_size, minimum=2)
    a = _real("a", a, positive=True)
    b = _real("b", b)
    gamma = _real("gamma", gamma, nonneg=True)
    rho = _real("rho", rho, positive=True)
    tol = None if early_stop is None else _real("early_stop", early_stop, positive=True)
    tau = _real("visibility_threshold", visibility_threshold)
    factor = _positive_int("upsample", upsample)
    if factor > 1 and factor % 2:
        raise ValueError(f"upsample: expected 1 or an even integer (the FCN uses 4), got {factor}")

    on_device = _on_cuda(response_maps)
    ops = _dispatch.get_ops(backend, on_device=on_device, num_threads=num_threads)
    if ops.name == "cuda":
        maps = ops.prepare(response_maps, factor, pdm.n_landmarks)
    else:
        maps = ops.prepare(check_maps(_to_numpy(response_maps), pdm.n_landmarks), factor)
    B, n, H, W = ops.dims(maps)

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
            weighted = method == "ect"
            active = ops.all_true(B)
            for r in sizes:
                w, target = ops.mean_shift(maps, ops.shape(pdm, p), r, a, b, rho, weighted)
                p_new = ops.project(pdm, w if weighted else None, target, pdm.noise_variance, p,
                                    SIMILARITY_EPS)
                p, active = (p_new, active) if tol is None else ops.freeze(p, p_new, active, tol)
        landmarks = ops.clamp(ops.shape(pdm, p), H, W)
    # Final confidence (Eq. 15) at the result, with the last patch size; visibility = conf >= tau.
    r_final = sizes[-1] if (sizes and method not in ("crm", "crm-pdm")) else r0
    confidence = ops.confidence_of(ops.weights(maps, landmarks, r_final, a, b))
    return FitResult(landmarks=landmarks, confidence=confidence, visible=ops.visible(confidence, tau),
                     initial=initial, peaks=peaks, params=p, method=method, backend=ops.name)
