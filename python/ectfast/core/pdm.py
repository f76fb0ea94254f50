"""Point distribution model (DESIGN.md, "Point distribution model").

A shape is (n, 2) in (x, y). Vectorised shapes interleave the coordinates:
``vec(s) = [x_0, y_0, x_1, y_1, ...]`` (length 2n), so the weight matrix of the fit is
``W = diag(w_x0, w_y0, w_x1, ...)``.

The model is linear: ``vec(s) = vec(mean) + basis @ p`` with an orthonormal basis
``basis = [b1..b4, Phi']`` (2n x (4 + m)): four similarity vectors (scale/rotation of the mean,
x and y translation) followed by the m PCA modes orthonormalised against them. The prior
``Lambda~^-1 = diag(0, 0, 0, 0, 1/lambda_1, ..., 1/lambda_m)`` leaves the similarity part free.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ectfast.assets import asset
from ectfast.io.pts import _path_arg  # one home for the path-argument check

FORMAT = "ectfast-pdm"
VERSION = 1
N_SIMILARITY = 4
REFERENCE_DIAGONAL = 200.0


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def procrustes_align(shape: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Similarity transform (scale, rotation, translation; no reflection) of ``shape`` onto
    ``target`` minimising the squared distance. Both (n, 2)."""
    mu_s, mu_t = shape.mean(0), target.mean(0)
    a, b = shape - mu_s, target - mu_t
    # complex form: b ~ z * a with z = s * e^{i theta}
    za = a[:, 0] + 1j * a[:, 1]
    zb = b[:, 0] + 1j * b[:, 1]
    z = np.vdot(za, zb) / np.vdot(za, za).real
    out = z * za
    return np.stack([out.real, out.imag], 1) + mu_t


def generalized_procrustes(shapes: np.ndarray, iterations: int = 100, tol: float = 1e-10) -> tuple:
    """Generalized Procrustes analysis. Returns (mean (n,2) centred with unit norm, aligned
    (N, n, 2) in the mean's frame)."""
    mean = shapes[0] - shapes[0].mean(0)
    mean = mean / np.linalg.norm(mean)
    aligned = shapes
    for _ in range(iterations):
        aligned = np.stack([procrustes_align(s, mean) for s in shapes])
        new_mean = aligned.mean(0)
        new_mean = new_mean - new_mean.mean(0)
        # keep the reference orientation and unit size: re-align the new mean to the old one
        new_mean = procrustes_align(new_mean, mean)
        new_mean = new_mean - new_mean.mean(0)
        new_mean = new_mean / np.linalg.norm(new_mean)
        delta = np.linalg.norm(new_mean - mean)
        mean = new_mean
        if delta < tol:
            break
    aligned = np.stack([procrustes_align(s, mean) for s in shapes])
    return mean, aligned


def similarity_basis(mean: np.ndarray) -> np.ndarray:
    """Orthonormal 2n x 4 basis of the similarity transforms of the centred mean shape."""
    n = mean.shape[0]
    c = mean - mean.mean(0)
    b1 = c.reshape(-1)
    b2 = np.stack([-c[:, 1], c[:, 0]], 1).reshape(-1)
    b3 = np.tile([1.0, 0.0], n)
    b4 = np.tile([0.0, 1.0], n)
    return gram_schmidt(np.stack([b1, b2, b3, b4], 1))


def gram_schmidt(columns: np.ndarray, against: Optional[np.ndarray] = None) -> np.ndarray:
    """Modified Gram-Schmidt (twice, for stability) of the columns, optionally against an
    orthonormal set; keeps the column order (so PCA modes keep their eigenvalues)."""
    out = []
    prev = [] if against is None else [against[:, j] for j in range(against.shape[1])]
    for j in range(columns.shape[1]):
        v = columns[:, j].astype(np.float64).copy()
        for _ in range(2):
            for u in prev + out:
                v -= np.dot(u, v) * u
        out.append(_unit(v))
    return np.stack(out, 1)


@dataclass(frozen=True)
class PDM:
    """A 2-D point distribution model with a similarity part.

    Attributes: ``mean`` (n, 2) in the reference frame (centred, bounding-box diagonal 200),
    ``basis`` (2n, 4 + m) orthonormal, ``eigenvalues`` (m,) descending, ``noise_variance``
    (mean of the discarded eigenvalues, the rho~ of the tuning step).
    """

    mean: np.ndarray
    basis: np.ndarray
    eigenvalues: np.ndarray
    noise_variance: float

    def __post_init__(self):
        validate_arrays(self.mean, self.basis, self.eigenvalues, self.noise_variance)

    # ------------------------------------------------------------------ properties
    @property
    def n_landmarks(self) -> int:
        return int(self.mean.shape[0])

    @property
    def n_components(self) -> int:
        """Number of non-rigid modes m."""
        return int(self.eigenvalues.shape[0])

    @property
    def n_params(self) -> int:
        return N_SIMILARITY + self.n_components

    @property
    def prior_inverse(self) -> np.ndarray:
        """diag of Lambda~^-1: zeros for the similarity part, 1/lambda for the modes."""
        return np.concatenate([np.zeros(N_SIMILARITY), 1.0 / self.eigenvalues])

    # ------------------------------------------------------------------ model
    def shape(self, params: np.ndarray) -> np.ndarray:
        """s = mean + basis @ p for params (..., 4 + m) -> (..., n, 2)."""
        p = np.asarray(params, dtype=np.float64)
        v = self.mean.reshape(-1) + p @ self.basis.T
        return v.reshape(p.shape[:-1] + (self.n_landmarks, 2))

    def project(self, shapes: np.ndarray) -> np.ndarray:
        """Least-squares params of shapes (..., n, 2) without prior: basis^T (s - mean)."""
        s = np.asarray(shapes, dtype=np.float64)
        return (s.reshape(s.shape[:-2] + (-1,)) - self.mean.reshape(-1)) @ self.basis

    def best_fit(self, shapes: np.ndarray) -> np.ndarray:
        """The closest shape the model can represent (orthogonal projection)."""
        return self.shape(self.project(shapes))

    def checksum(self) -> str:
        h = hashlib.sha256()
        for a in (self.mean, self.basis, self.eigenvalues, np.float64(self.noise_variance)):
            h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_shapes(cls, shapes, n_components: int = 30) -> "PDM":
        """Build by GPA + PCA + orthonormal similarity basis from training shapes (N, n, 2)."""
        s = np.asarray(shapes, dtype=np.float64)
        if s.ndim != 3 or s.shape[2] != 2:
            raise ValueError(f"shapes: expected (N, n, 2), got shape {s.shape}")
        N, n, _ = s.shape
        if n < 3:
            raise ValueError(f"shapes: need at least 3 landmarks, got {n}")
        if not np.isfinite(s).all():
            raise ValueError("shapes: non-finite coordinates")
        max_modes = 2 * n - N_SIMILARITY
        if not (isinstance(n_components, (int, np.integer)) and 1 <= n_components < max_modes):
            raise ValueError(f"n_components: expected an int in [1, {max_modes - 1}], got {n_components!r}")
        if N <= n_components:
            raise ValueError(f"shapes: need more than n_components={n_components} shapes, got {N}")
        mean, aligned = generalized_procrustes(s)
        lo, hi = mean.min(0), mean.max(0)
        scale = REFERENCE_DIAGONAL / np.linalg.norm(hi - lo)
        mean = mean * scale
        aligned = aligned * scale
        X = aligned.reshape(N, -1) - mean.reshape(-1)
        cov = X.T @ X / (N - 1)
        evals, evecs = np.linalg.eigh(cov)
        order = np.argsort(evals)[::-1]
        evals, evecs = evals[order], evecs[:, order]
        kept = evals[:n_components]
        discarded = evals[n_components:max_modes]
        noise = float(np.mean(discarded))
        sim = similarity_basis(mean)
        modes = gram_schmidt(evecs[:, :n_components], against=sim)
        basis = np.concatenate([sim, modes], 1)
        return cls(mean=mean, basis=basis, eigenvalues=kept.copy(), noise_variance=noise)

    # ------------------------------------------------------------------ I/O
    def save(self, path) -> None:
        """Save as a versioned .npz file."""
        with open(os.fspath(path), "wb") as f:
            np.savez(f, format=np.array(FORMAT), version=np.array(VERSION), mean=self.mean,
                     basis=self.basis, eigenvalues=self.eigenvalues,
                     noise_variance=np.array(self.noise_variance))

    @classmethod
    def load(cls, path) -> "PDM":
        """Load a file written by :meth:`save`. ``ValueError`` naming the file if it is not a PDM
        file (not an .npz archive, corrupt, another format or version, larger than
        :data:`MAX_FILE_BYTES` unpacked) or inconsistent; ``FileNotFoundError`` if it does not
        exist. Pickled data is never loaded."""
        path = _path_arg(path)
        if os.path.isdir(path):
            raise ValueError(f"{path}: is a folder, not a PDM file")
        try:
            with open(path, "rb") as f:
                head = f.read(4)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such PDM file") from None
        except OSError as e:
            raise OSError(f"{path}: cannot read the PDM file ({e.strerror or type(e).__name__})") from None
        if head not in (b"PK\x03\x04", b"PK\x05\x06"):
            raise ValueError(f"{path}: not a PDM file (not an .npz archive)")
        try:
            with zipfile.ZipFile(path) as zf:
                infos = zf.infolist()
            unpacked = sum(i.file_size for i in infos)
        except Exception as e:  # zipfile.BadZipFile, OSError, ...
            raise ValueError(f"{path}: not a readable PDM file ({_reason(e)})") from None
        if len(infos) > 64 or unpacked > MAX_FILE_BYTES:
            raise ValueError(f"{path}: not a PDM file ({len(infos)} arrays, {unpacked} bytes unpacked; a PDM "
                             f"file holds 6 arrays of at most {MAX_FILE_BYTES} bytes in all)")
        data = {}
        try:
            with np.load(path, allow_pickle=False) as z:
                for k in z.files:
                    try:
                        data[k] = z[k]
                    except ValueError as e:
                        if "pickle" in str(e) or "Object arrays" in str(e):
                            raise ValueError(f"{path}: array {k!r} holds Python objects; a PDM file holds "
                                             "numeric arrays only (pickled data is never loaded)") from None
                        raise
        except ValueError as e:
            if str(e).startswith(f"{path}: array "):
                raise
            raise ValueError(f"{path}: not a readable PDM file ({_reason(e)})") from None
        except Exception as e:  # zipfile.BadZipFile, OSError, EOFError, zlib.error, ...
            raise ValueError(f"{path}: not a readable PDM file ({_reason(e)})") from None
        missing = {"format", "version", "mean", "basis", "eigenvalues", "noise_variance"} - set(data)
        if missing:
            raise ValueError(f"{path}: not a PDM file (missing {sorted(missing)})")
        fmt = data["format"]
        if fmt.shape != () or fmt.dtype.kind not in "US" or str(fmt) != FORMAT:
            raise ValueError(f"{path}: not an ectfast PDM file (format {_short(fmt)})")
        try:
            version = _scalar(data["version"], int)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{path}: malformed PDM version {_short(data['version'])}") from None
        if version != VERSION:
            raise ValueError(f"{path}: PDM file version {version}, this ectfast reads version {VERSION}")
        try:
            noise = _scalar(data["noise_variance"], float)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{path}: malformed noise_variance {_short(data['noise_variance'])}") from None
        try:
            return cls(mean=data["mean"], basis=data["basis"], eigenvalues=data["eigenvalues"],
                       noise_variance=noise)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


#: The range of the eigenvalues and the noise variance (variances in pixels^2 of the reference
#: frame; the shipped model's eigenvalues are 6.9 to 2,900, its noise variance 1.1): outside it 1 / lambda or the solves over- or
#: underflow.
VALUE_RANGE = (1e-12, 1e12)

#: The largest PDM file :meth:`PDM.load` unpacks (the shipped 68-point model is ~150 kB).
MAX_FILE_BYTES = 64 * 1024 * 1024


def _reason(e: BaseException) -> str:
    """An exception's type and message for an error message, never a hint to unpickle."""
    msg = str(e)
    if "pickle" in msg.lower():
        return "it holds pickled Python objects, which are never loaded"
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _short(a) -> str:
    r = repr(a)
    return r if len(r) <= 80 else r[:77] + "..."


def _scalar(a: np.ndarray, kind):
    """A 0-d (or one-element) real numeric array as ``kind``; TypeError/ValueError otherwise."""
    if a.size != 1 or a.dtype.kind not in ("i", "u", "f"):
        raise TypeError("not a real number")
    v = a.reshape(()).item()
    if kind is int and float(v) != int(v):
        raise ValueError("not an integer")
    return kind(v)


def validate_arrays(mean, basis, eigenvalues, noise_variance) -> None:
    """Check a PDM's arrays for consistency; ``ValueError`` naming what is wrong."""
    for name, a in (("mean", mean), ("basis", basis), ("eigenvalues", eigenvalues)):
        if not isinstance(a, np.ndarray) or a.dtype != np.float64:
            raise ValueError(f"PDM {name}: expected a float64 ndarray, got {type(a).__name__} "
                             f"{getattr(a, 'dtype', '')}")
        if not np.isfinite(a).all():
            raise ValueError(f"PDM {name}: non-finite values")
    if mean.ndim != 2 or mean.shape[1] != 2 or mean.shape[0] < 3:
        raise ValueError(f"PDM mean: expected (n, 2) with n >= 3, got {mean.shape}")
    n = mean.shape[0]
    if eigenvalues.ndim != 1 or eigenvalues.shape[0] < 1:
        raise ValueError(f"PDM eigenvalues: expected (m,) with m >= 1, got {eigenvalues.shape}")
    m = eigenvalues.shape[0]
    if basis.ndim != 2 or basis.shape[1] != N_SIMILARITY + m:
        raise ValueError(f"PDM basis: expected ({2 * n}, {N_SIMILARITY + m}) for {n} points and {m} "
                         f"eigenvalues, got {basis.shape}")
    if basis.shape[0] != 2 * n:
        if basis.shape[0] % 2 == 0 and basis.shape[0] >= 2 * N_SIMILARITY:
            # the basis agrees with the eigenvalues: the mean is the odd one out
            raise ValueError(f"PDM mean: {n} points, but the basis has {basis.shape[0]} rows "
                             f"({basis.shape[0] // 2} points)")
        raise ValueError(f"PDM basis: expected ({2 * n}, {N_SIMILARITY + m}) for {n} points, got {basis.shape}")
    if not (eigenvalues > 0).all():
        raise ValueError("PDM eigenvalues: must all be positive")
    if not ((eigenvalues >= VALUE_RANGE[0]) & (eigenvalues <= VALUE_RANGE[1])).all():
        raise ValueError(f"PDM eigenvalues: expected values in [{VALUE_RANGE[0]:g}, {VALUE_RANGE[1]:g}] "
                         f"(pixels^2 of the 200-pixel reference frame), got [{eigenvalues.min()!r}, "
                         f"{eigenvalues.max()!r}]")
    rise = np.flatnonzero(np.diff(eigenvalues) > 0)
    if rise.size:
        k = int(rise[0])
        raise ValueError(f"PDM eigenvalues: must be in descending order (lambda_1 >= ... >= lambda_m), "
                         f"got {eigenvalues[k]!r} then {eigenvalues[k + 1]!r} at positions {k + 1}, {k + 2}")
    if not (np.isfinite(noise_variance) and noise_variance > 0):
        raise ValueError(f"PDM noise_variance: must be a positive number, got {noise_variance!r}")
    if not VALUE_RANGE[0] <= noise_variance <= VALUE_RANGE[1]:
        raise ValueError(f"PDM noise_variance: expected a value in [{VALUE_RANGE[0]:g}, {VALUE_RANGE[1]:g}], "
                         f"got {noise_variance!r}")
    with np.errstate(all="ignore"):  # a huge basis overflows: not orthonormal either
        gram = basis.T @ basis
    if not np.allclose(gram, np.eye(gram.shape[0]), atol=1e-6):
        raise ValueError("PDM basis: columns are not orthonormal")


_DEFAULT: Optional[PDM] = None
DEFAULT_PDM_PATH = asset("pdm_300w.npz")


def default_pdm() -> PDM:
    """The PDM shipped with the package (built from the 2012 300-W training shapes; see
    ``tools/build_pdm.py``)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = PDM.load(DEFAULT_PDM_PATH)
    return _DEFAULT
