"""The NumPy reference backend: one function per equation of DESIGN.md, readable next to the
paper. Every fast backend is tested against these functions.

Conventions shared by all backends (the parity tests hold every backend to them):

* Shapes are (n, 2) arrays of (x, y), 0-based pixel centres of the response map.
* Estimation: the peak of a map is its first maximum in row-major order
  (:func:`ectfast.core.peaks.argmax_peaks`, the one home of the argmax).
* A landmark's patch is centred exactly on the pixel ``c = floor(x + 0.5)``: it covers
  ``c - r//2 .. c + r//2`` on each axis (so r = 30 gives a 31 x 31 patch); pixels outside the
  map count as zero. Negative responses are clamped to zero.
* Patches are taken at the shape clamped to ``[1, W - 2] x [1, H - 2]`` (the released code
  clamps to [1, 254] on 256 maps); the model parameters themselves are never clamped.
* Linear algebra is float64; maps may be float32 or float64.
"""
from __future__ import annotations

import math

import numpy as np

from ectfast.core.peaks import argmax_peaks

# ------------------------------------------------------------------ small helpers


def centre_pixel(x: float) -> int:
    """The pixel a patch is centred on: round half up."""
    return int(math.floor(x + 0.5))


def clamp_shape(shape: np.ndarray, height: int, width: int) -> np.ndarray:
    """Keep points inside the map: x in [1, W - 2], y in [1, H - 2]."""
    out = np.array(shape, dtype=np.float64, copy=True)
    np.clip(out[..., 0], 1.0, width - 2.0, out=out[..., 0])
    np.clip(out[..., 1], 1.0, height - 2.0, out=out[..., 1])
    return out


def extract_patch(response: np.ndarray, x: float, y: float, r: int):
    """The patch of one map (H, W) centred on the pixel of (x, y): the (2h+1) x (2h+1) window,
    h = r // 2, of which pixels outside the map count as zero, negatives clamped to zero.

    Zeros add nothing to any sum of Eqs. 9 and 15, so only the part of the window inside the
    map is returned (memory and time are bounded by the map, whatever r): (patch, xs, ys), the
    patch and the pixel coordinates of its columns and rows (empty when nothing overlaps)."""
    H, W = response.shape
    h = r // 2
    cx, cy = centre_pixel(x), centre_pixel(y)
    x0, x1 = max(cx - h, 0), min(cx + h + 1, W)
    y0, y1 = max(cy - h, 0), min(cy + h + 1, H)
    x1, y1 = max(x1, x0), max(y1, y0)
    patch = np.maximum(response[y0:y1, x0:x1].astype(np.float64), 0.0)
    return patch, np.arange(x0, x1, dtype=np.float64), np.arange(y0, y1, dtype=np.float64)


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


# ------------------------------------------------------------------ the equations


def confidence(patch: np.ndarray, xs: np.ndarray, ys: np.ndarray, a: float, b: float):
    """Eq. 15: the confidence weights (w_x, w_y) of a landmark from its patch.

    S = sum of the patch; sigma_x, sigma_y = standard deviations of the x and y marginals of the
    normalised patch; w = sigmoid(a (S / sigma - b)). S = 0 or sigma = 0 gives weight 0.
    """
    S = float(patch.sum())
    if not S > 0.0:
        return 0.0, 0.0
    px = patch.sum(0) / S
    py = patch.sum(1) / S
    weights = []
    for p, c in ((px, xs), (py, ys)):
        mu = float(p @ c)
        sd = math.sqrt(max(float(p @ (c - mu) ** 2), 0.0))
        if np.count_nonzero(p) < 2:  # all mass in one column/row: sigma is exactly 0 (rounding
            sd = 0.0  # in mu could leave ~1e-15 and flip the weight from 0 to 1)
        weights.append(sigmoid(a * (S / sd - b)) if sd > 0.0 else 0.0)
    return weights[0], weights[1]


def kernel_variance(wx: float, wy: float, rho: float, weighted: bool) -> float:
    """Eq. 9's kernel variance: rho_i = 2 rho / (w_x + w_y) (weighted), rho (unweighted)."""
    return 2.0 * rho / (wx + wy) if weighted else rho


def mean_shift(patch: np.ndarray, xs: np.ndarray, ys: np.ndarray, x: float, y: float, rho_i: float):
    """Eq. 9: the mean-shift vector v = sum_y omega_y y - x, with
    omega_y proportional to pi_y exp(-|x - y|^2 / (2 rho_i)). The Gaussian is separable.
    An empty patch (or a kernel that underflows) gives v = 0."""
    with np.errstate(over="ignore", under="ignore"):  # a tiny rho_i: the kernel underflows to 0
        gx = np.exp(-((xs - x) ** 2) / (2.0 * rho_i))
        gy = np.exp(-((ys - y) ** 2) / (2.0 * rho_i))
    omega = patch * gy[:, None] * gx[None, :]
    Z = float(omega.sum())
    if not Z > 0.0:
        return 0.0, 0.0
    return float(omega.sum(0) @ xs) / Z - x, float(omega.sum(1) @ ys) / Z - y


def regularized_projection(basis, mean_vec, prior_inv, lam, w, target, x0, eps):
    """Eqs. 14 and 8 in one solve (SPD system, never an inverse):

        p = (lam Lambda~^-1 + S^T W S + eps E)^-1 (S^T W (t - mean) + eps E x0)

    Eq. 14 (Correction): t = the argmax peaks, lam = gamma. Eq. 8 (Tuning): t = s + v, the
    mean-shift targets from the current unclamped shape s = mean + S p, lam = rho~; then this p
    equals p + Delta p of Eq. 8 exactly. ``E`` selects the 4 similarity parameters, which have no
    prior: ``eps`` (tiny) pulls them to ``x0`` only where the weights leave them undetermined
    (all-zero maps: the prior shape at the map centre).
    """
    k = basis.shape[1]
    E = np.zeros(k)
    E[:4] = eps
    A = lam * np.diag(prior_inv) + basis.T @ (w[:, None] * basis) + np.diag(E)
    rhs = basis.T @ (w * (target - mean_vec)) + E * x0
    return np.linalg.solve(A, rhs)


def upsample_matrix(size: int, factor: int) -> np.ndarray:
    """(size*factor, size) matrix U of the FCN's fixed bilinear upsampling, a transposed
    convolution with kernel 2f, stride f, padding f/2 and weights K[j] = 1 - |j - (2f-1)/2| / f:
    out[o] = sum_i in[i] K[o + f/2 - f i] (zero outside). A map M upsamples to U M U^T."""
    f = int(factor)
    k = 2 * f
    K = 1.0 - np.abs(np.arange(k) - (k - 1) / 2.0) / f
    U = np.zeros((size * f, size))
    for o in range(size * f):
        for i in range(size):
            j = o + f // 2 - f * i
            if 0 <= j < k:
                U[o, i] = K[j]
    return U


def upsample(maps: np.ndarray, factor: int) -> np.ndarray:
    """Bilinear x factor of (B, n, H, W) maps, exactly as the FCN's UpsampleNet."""
    B, n, H, W = maps.shape
    Uy, Ux = upsample_matrix(H, factor), upsample_matrix(W, factor)
    out = np.empty((B, n, H * factor, W * factor), dtype=maps.dtype)
    for f in range(B):  # one face at a time: float64 scratch of one face, not of the batch
        out[f] = np.einsum("oh,nhw,pw->nop", Uy, maps[f].astype(np.float64), Ux, optimize=True)
    return out


# ------------------------------------------------------------------ the backend interface


class ReferenceOps:
    """The batched operations Algorithm 1 (``ectfast.fit``) is written in, in plain NumPy.
    Each loops over faces and landmarks and calls the equations above."""

    name = "reference"

    def prepare(self, maps: np.ndarray, factor: int) -> np.ndarray:
        if not np.isfinite(maps).all():
            raise ValueError("response_maps: contains NaN or infinite values")
        return upsample(maps, factor) if factor > 1 else maps

    def dims(self, maps):
        """(B, n, H, W) of the maps as fitted (after upsampling)."""
        return tuple(maps.shape)

    def faces(self, maps, start, stop):
        """The prepared maps of faces start..stop-1 (a view, never a copy): lets ``fit`` compute
        only the faces that early stop has not frozen."""
        return maps[start:stop]

    def argmax(self, maps):
        return argmax_peaks(maps)

    def weights(self, maps, shape, r, a, b):
        B, n, H, W = maps.shape
        s = clamp_shape(shape, H, W)
        w = np.zeros((B, n, 2))
        for f in range(B):
            for i in range(n):
                patch, xs, ys = extract_patch(maps[f, i], *s[f, i], r)
                w[f, i] = confidence(patch, xs, ys, a, b)
        return w

    def mean_shift(self, maps, shape, r, a, b, rho, weighted):
        """(w, t): weights (Eq. 15; ones when unweighted) and targets t = shape + v (Eq. 9)."""
        B, n, H, W = maps.shape
        s = clamp_shape(shape, H, W)
        w = np.ones((B, n, 2))
        v = np.zeros((B, n, 2))
        for f in range(B):
            for i in range(n):
                x, y = s[f, i]
                patch, xs, ys = extract_patch(maps[f, i], x, y, r)
                if weighted:
                    w[f, i] = confidence(patch, xs, ys, a, b)
                    if w[f, i].sum() <= 0.0:
                        continue  # no information: v = 0 (and W = 0 for this landmark)
                rho_i = kernel_variance(w[f, i, 0], w[f, i, 1], rho, weighted)
                v[f, i] = mean_shift(patch, xs, ys, x, y, rho_i)
        return w, shape + v

    def project(self, pdm, w, target, lam, x0, eps):
        B = target.shape[0]
        mean_vec = pdm.mean.reshape(-1)
        ones = np.ones(2 * pdm.n_landmarks)
        out = np.empty((B, pdm.n_params))
        for f in range(B):
            wf = ones if w is None else w[f].reshape(-1)
            out[f] = regularized_projection(pdm.basis, mean_vec, pdm.prior_inverse, lam, wf,
                                            target[f].reshape(-1), x0[f], eps)
        return out

    def shape(self, pdm, params):
        return pdm.shape(params)

    def clamp(self, shape, height, width):
        return clamp_shape(shape, height, width)

    def prior_params(self, pdm, batch, height, width):
        """Params of the mean shape centred in the map (the prior's placement)."""
        centre = np.tile([(width - 1) / 2.0, (height - 1) / 2.0], pdm.n_landmarks)
        p = np.zeros(pdm.n_params)
        p[:4] = pdm.basis[:, :4].T @ centre
        return np.tile(p, (batch, 1))

    def freeze(self, p_old, p_new, active, tol):
        """Early stop per face: faces whose step |Delta s| = |Delta p| (S is orthonormal) falls
        under tol keep their parameters for the remaining iterations."""
        p = np.where(active[:, None], p_new, p_old)
        step = np.linalg.norm(p_new - p_old, axis=1)
        return p, active & (step >= tol)

    def all_true(self, batch):
        return np.ones(batch, dtype=bool)

    def confidence_of(self, w):
        return w.mean(-1)

    def visible(self, conf, tau):
        return conf >= tau
